//! The daemon's TOML file: parsed into raw structs (unknown fields rejected), then validated into
//! `Config`. Every error names the file, the line and the field, and says what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::engine::{KvLayout, LoadOptions};
use crate::runtime::{Int4Choice, Provider, SessionOptions};
use crate::speculative::lookup::LookupSettings;

pub const DEFAULT_PATH: &str = "/etc/edgellm/edgellm.toml";

#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

// ---------------------------------------------------------------- raw (as written)

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    model: Vec<RawModel>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    bus: Option<Spanned<String>>,
    address: Option<String>,
    admin_group: Option<String>,
    log_text: Option<bool>,
    shutdown_grace_s: Option<Spanned<u64>>,
    token_interval_ms: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    library: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_queue: Option<Spanned<u32>>,
    max_per_client: Option<Spanned<u32>>,
    max_per_user: Option<Spanned<u32>>,
    max_prompt_bytes: Option<Spanned<u32>>,
    max_new_tokens: Option<Spanned<u32>>,
    request_timeout_s: Option<Spanned<u64>>,
    memory_reserve_mib: Option<Spanned<u64>>,
    background_users: Option<Vec<String>>,
    background_min_share: Option<Spanned<f64>>,
    kv_cache_mib: Option<Spanned<u64>>,
    kv_cache_idle_s: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    path: Spanned<PathBuf>,
    providers: Option<Spanned<Vec<String>>>,
    strict: Option<bool>,
    threads: Option<u32>,
    spinning: Option<bool>,
    spin_between_runs: Option<bool>,
    int4_kernel: Option<Spanned<String>>,
    provider_options: Option<Spanned<BTreeMap<String, toml::Value>>>,
    kv_layout: Option<Spanned<String>>,
    draft: Option<Spanned<String>>,
    preload: Option<bool>,
    keep_alive_s: Option<u64>,
    speculative_min_tokens: Option<Spanned<u32>>,
    speculative_max_tokens: Option<Spanned<u32>>,
    speculative_min_confidence: Option<Spanned<f64>>,
    speculative_cost_aware: Option<bool>,
    multitoken_mode: Option<Spanned<String>>,
    multitoken_threshold: Option<Spanned<f64>>,
    multitoken_max_tokens: Option<Spanned<u32>>,
    prompt_lookup: Option<Spanned<bool>>,
    prompt_lookup_ngram: Option<Spanned<u32>>,
    prompt_lookup_max_draft: Option<Spanned<u32>>,
}

/// `keep_alive_s` of a model that is not preloaded, unless it sets one.
pub const DEFAULT_KEEP_ALIVE_S: u64 = 300;

// ---------------------------------------------------------------- validated

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    Session,
    System,
    Address(String),
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub bus: Bus,
    /// Unix group whose members may call the admin methods (LoadModel, UnloadModel), besides root.
    pub admin_group: Option<String>,
    /// Log prompts and generated text (debug only; off by default).
    pub log_text: bool,
    pub shutdown_grace: std::time::Duration,
    /// The shortest time between two `Token` signals of one request; the text made meanwhile
    /// goes in the next one.
    pub token_interval: std::time::Duration,
}

/// `[daemon] token_interval_ms` when unset.
pub const DEFAULT_TOKEN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_queue: usize,
    pub max_per_client: usize,
    /// Requests running or waiting of one Unix user, over all its connections.
    pub max_per_user: usize,
    pub max_prompt_bytes: usize,
    pub max_new_tokens: usize,
    pub request_timeout: std::time::Duration,
    /// Memory (MiB) a model load must leave available to the rest of the system.
    pub memory_reserve_mib: u64,
    /// Unix user names whose requests are `background` unless they say otherwise.
    pub background_users: Vec<String>,
    /// The share of the engine's time a paused background request keeps while interactive work
    /// is continuous.
    pub background_min_share: f64,
    /// Memory (MiB) that the KV kept between requests may hold, all clients together (0: none
    /// is kept).
    pub kv_cache_mib: u64,
    /// Kept KV unused for this long is freed.
    pub kv_cache_idle: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queue: 64,
            max_per_client: 8,
            max_per_user: 16,
            max_prompt_bytes: 64 * 1024,
            max_new_tokens: 1024,
            request_timeout: std::time::Duration::from_secs(300),
            memory_reserve_mib: 256,
            background_users: Vec::new(),
            background_min_share: 0.1,
            kv_cache_mib: 256,
            kv_cache_idle: std::time::Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpeculativeConfig {
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub min_confidence: f32,
    pub cost_aware: bool,
}

/// Overrides of a multi-token model's defaults (its multitoken_config.json); checked against
/// the folder's contract when the model loads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MultiTokenConfig {
    pub mode: Option<crate::multitoken::Mode>,
    pub threshold: Option<f32>,
    pub max_tokens: Option<usize>,
}

impl MultiTokenConfig {
    pub fn is_set(&self) -> bool {
        self.mode.is_some() || self.threshold.is_some() || self.max_tokens.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub name: String,
    /// Absolute (relative paths in the file are relative to the file).
    pub path: PathBuf,
    pub load: LoadOptions,
    pub draft: Option<String>,
    pub preload: bool,
    /// Unload after this long without a request; `None` never (`keep_alive_s = 0`).
    pub keep_alive: Option<std::time::Duration>,
    pub speculative: SpeculativeConfig,
    pub multitoken: MultiTokenConfig,
    /// Prompt lookup drafting (`prompt_lookup = true`), never together with `draft`.
    pub prompt_lookup: Option<LookupSettings>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub daemon: DaemonConfig,
    pub runtime_library: Option<PathBuf>,
    pub limits: Limits,
    pub models: Vec<ModelConfig>,
}

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            line: None,
            message: format!("cannot read the config file: {e} (pass another with --config PATH)"),
        })?;
        Config::parse(file, &text)
    }

    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let source = Source { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            line: e.span().map(|s| source.line_of(s.start)),
            message: e.message().trim().to_string(),
        })?;
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let daemon = raw.daemon.validate(&source)?;
        let limits = raw.limits.validate(&source)?;
        let models = validate_models(&raw.model, &base, &source)?;
        Ok(Config { file: file.to_path_buf(), daemon, runtime_library: raw.runtime.library.map(|l| base.join(l)), limits, models })
    }
}

/// The file being parsed: turns a span of its text into an error that names the file and line.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].matches('\n').count() + 1
    }

    fn err(&self, span: std::ops::Range<usize>, message: String) -> ConfigError {
        ConfigError { file: self.file.to_path_buf(), line: Some(self.line_of(span.start)), message }
    }
}

impl RawDaemon {
    fn validate(&self, source: &Source) -> Result<DaemonConfig, ConfigError> {
        let bus = match (&self.address, &self.bus) {
            (Some(address), _) => Bus::Address(address.clone()),
            (None, None) => Bus::Session,
            (None, Some(bus)) => match bus.get_ref().as_str() {
                "session" => Bus::Session,
                "system" => Bus::System,
                other => {
                    return Err(source.err(
                        bus.span(),
                        format!("field `daemon.bus`: `{other}` is not a bus; use \"session\" or \"system\", or set `daemon.address`"),
                    ))
                }
            },
        };
        let grace = match &self.shutdown_grace_s {
            Some(g) if *g.get_ref() > 3600 => {
                return Err(source.err(g.span(), "field `daemon.shutdown_grace_s`: at most 3600 seconds".into()))
            }
            Some(g) => *g.get_ref(),
            None => 10,
        };
        let token_interval = match &self.token_interval_ms {
            Some(t) if *t.get_ref() > 60_000 => {
                return Err(source.err(
                    t.span(),
                    "field `daemon.token_interval_ms`: at most 60000 milliseconds (0 sends every piece as it comes)".into(),
                ))
            }
            Some(t) => std::time::Duration::from_millis(*t.get_ref()),
            None => DEFAULT_TOKEN_INTERVAL,
        };
        Ok(DaemonConfig {
            bus,
            admin_group: self.admin_group.clone(),
            log_text: self.log_text.unwrap_or(false),
            shutdown_grace: std::time::Duration::from_secs(grace),
            token_interval,
        })
    }
}

impl RawLimits {
    fn validate(&self, source: &Source) -> Result<Limits, ConfigError> {
        let defaults = Limits::default();
        let positive = |v: &Option<Spanned<u32>>, field: &str, default: usize| -> Result<usize, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) if *s.get_ref() == 0 => Err(source.err(s.span(), format!("field `limits.{field}`: must be at least 1"))),
                Some(s) => Ok(*s.get_ref() as usize),
            }
        };
        Ok(Limits {
            max_queue: positive(&self.max_queue, "max_queue", defaults.max_queue)?,
            max_per_client: positive(&self.max_per_client, "max_per_client", defaults.max_per_client)?,
            max_per_user: positive(&self.max_per_user, "max_per_user", defaults.max_per_user)?,
            max_prompt_bytes: positive(&self.max_prompt_bytes, "max_prompt_bytes", defaults.max_prompt_bytes)?,
            max_new_tokens: positive(&self.max_new_tokens, "max_new_tokens", defaults.max_new_tokens)?,
            request_timeout: match &self.request_timeout_s {
                None => defaults.request_timeout,
                Some(s) if *s.get_ref() == 0 => {
                    return Err(source.err(s.span(), "field `limits.request_timeout_s`: must be at least 1".into()))
                }
                Some(s) => std::time::Duration::from_secs(*s.get_ref()),
            },
            memory_reserve_mib: self.memory_reserve_mib.as_ref().map(|s| *s.get_ref()).unwrap_or(defaults.memory_reserve_mib),
            background_users: self.background_users.clone().unwrap_or_default(),
            background_min_share: match &self.background_min_share {
                None => defaults.background_min_share,
                Some(s) if s.get_ref().is_finite() && *s.get_ref() > 0.0 && *s.get_ref() <= 1.0 => *s.get_ref(),
                Some(s) => {
                    return Err(source.err(
                        s.span(),
                        format!("field `limits.background_min_share`: {} is out of range: use a share in (0, 1]", s.get_ref()),
                    ))
                }
            },
            kv_cache_mib: self.kv_cache_mib.as_ref().map(|s| *s.get_ref()).unwrap_or(defaults.kv_cache_mib),
            kv_cache_idle: match &self.kv_cache_idle_s {
                None => defaults.kv_cache_idle,
                Some(s) if *s.get_ref() == 0 => {
                    return Err(source.err(
                        s.span(),
                        "field `limits.kv_cache_idle_s`: must be at least 1 (to keep no KV, set `kv_cache_mib = 0`)".into(),
                    ))
                }
                Some(s) => std::time::Duration::from_secs(*s.get_ref()),
            },
        })
    }
}

/// Every `[[model]]`, each validated in file order, then the checks across them: at least one
/// model, and drafts that name another one.
fn validate_models(raw: &[RawModel], base: &Path, source: &Source) -> Result<Vec<ModelConfig>, ConfigError> {
    let mut models: Vec<ModelConfig> = Vec::new();
    for m in raw {
        let model = m.validate(base, source, &models)?;
        models.push(model);
    }
    // A daemon with no model serves nothing: on SIGHUP an emptied file would unload every
    // model, so a config without one is an error like any other and the running one stays.
    if models.is_empty() {
        return Err(ConfigError {
            file: source.file.to_path_buf(),
            line: None,
            message: "no [[model]] is configured: add one (`[[model]]` with `name` and `path`, see config/edgellm.toml)".into(),
        });
    }
    // Drafts must name another configured model.
    for (m, raw_m) in models.iter().zip(raw) {
        if let (Some(draft), Some(span)) = (&m.draft, raw_m.draft.as_ref().map(|d| d.span())) {
            if draft == &m.name || !models.iter().any(|o| &o.name == draft) {
                return Err(source.err(span, format!("field `model.draft`: `{draft}` is not another configured [[model]]")));
            }
        }
    }
    Ok(models)
}

impl RawModel {
    /// This model's section; `earlier` are the models before it in the file.
    fn validate(&self, base: &Path, source: &Source, earlier: &[ModelConfig]) -> Result<ModelConfig, ConfigError> {
        let name = self.validate_name(source, earlier)?;
        let path = base.join(self.path.get_ref());
        let providers = self.validate_providers(source)?;
        let provider_options = self.validate_provider_options(source)?;
        let kv_layout = self.validate_kv_layout(source)?;
        let speculative = self.validate_speculative(source)?;
        let multitoken = self.validate_multitoken(source)?;
        let int4 = self.validate_int4_kernel(source)?;
        let prompt_lookup = self.validate_prompt_lookup(source)?;
        let preload = self.preload.unwrap_or(true);
        Ok(ModelConfig {
            prompt_lookup,
            name,
            path,
            load: LoadOptions {
                session: SessionOptions {
                    providers,
                    strict: self.strict.unwrap_or(false),
                    threads: self.threads.unwrap_or(0) as usize,
                    spinning: self.spinning.unwrap_or(true),
                    spin_between_runs: self.spin_between_runs.unwrap_or(false),
                    provider_options,
                    weights: Default::default(),
                    int4,
                },
                kv_layout,
            },
            draft: self.draft.as_ref().map(|d| d.get_ref().clone()),
            preload,
            // Never for a preloaded model, five minutes (Ollama's default) for one loaded on use.
            keep_alive: match self.keep_alive_s.unwrap_or(if preload { 0 } else { DEFAULT_KEEP_ALIVE_S }) {
                0 => None,
                s => Some(std::time::Duration::from_secs(s)),
            },
            speculative,
            multitoken,
        })
    }

    fn validate_name(&self, source: &Source, earlier: &[ModelConfig]) -> Result<String, ConfigError> {
        let name = self.name.get_ref().clone();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(
                source.err(self.name.span(), format!("field `model.name`: `{name}` may use only letters, digits, `-`, `_` and `.`"))
            );
        }
        if earlier.iter().any(|o| o.name == name) {
            return Err(source.err(self.name.span(), format!("field `model.name`: `{name}` is configured twice")));
        }
        Ok(name)
    }

    fn validate_providers(&self, source: &Source) -> Result<Vec<Provider>, ConfigError> {
        let Some(list) = &self.providers else { return Ok(vec![Provider::Cpu]) };
        if list.get_ref().is_empty() {
            return Err(
                source.err(list.span(), "field `model.providers`: empty; list at least one of \"cuda\", \"openvino\", \"cpu\"".into())
            );
        }
        let mut out = Vec::new();
        for p in list.get_ref() {
            out.push(Provider::parse(p).ok_or_else(|| {
                source.err(list.span(), format!("field `model.providers`: unknown provider `{p}`; use \"cuda\", \"openvino\" or \"cpu\""))
            })?);
        }
        Ok(out)
    }

    fn validate_provider_options(&self, source: &Source) -> Result<Vec<(String, String)>, ConfigError> {
        let mut provider_options = Vec::new();
        if let Some(opts) = &self.provider_options {
            for (k, v) in opts.get_ref() {
                let value = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    _ => {
                        return Err(source.err(opts.span(), format!("field `model.provider_options.{k}`: use a string, number or boolean")))
                    }
                };
                provider_options.push((k.clone(), value));
            }
        }
        Ok(provider_options)
    }

    fn validate_kv_layout(&self, source: &Source) -> Result<Option<KvLayout>, ConfigError> {
        let Some(s) = &self.kv_layout else { return Ok(None) };
        match s.get_ref().as_str() {
            "shared" => Ok(Some(KvLayout::Shared)),
            "growing" => Ok(Some(KvLayout::Growing)),
            "auto" => Ok(None),
            other => Err(source.err(s.span(), format!("field `model.kv_layout`: `{other}`; use \"auto\", \"shared\" or \"growing\""))),
        }
    }

    fn validate_speculative(&self, source: &Source) -> Result<SpeculativeConfig, ConfigError> {
        let min_tokens = self.speculative_min_tokens.as_ref().map(|s| (*s.get_ref() as usize, s.span()));
        let max_tokens = self.speculative_max_tokens.as_ref().map(|s| (*s.get_ref() as usize, s.span()));
        let (min_k, max_k) = (min_tokens.clone().map(|v| v.0).unwrap_or(1), max_tokens.clone().map(|v| v.0).unwrap_or(8));
        if min_k == 0 || max_k > 16 || min_k > max_k {
            let span = min_tokens.or(max_tokens).map(|v| v.1).unwrap_or(self.name.span());
            return Err(source.err(
                span,
                format!(
                    "fields `model.speculative_min_tokens` ({min_k}) and `speculative_max_tokens` ({max_k}): need 1 <= min <= max <= 16"
                ),
            ));
        }
        let min_confidence = match &self.speculative_min_confidence {
            Some(c) if !(0.0..=1.0).contains(c.get_ref()) => {
                return Err(source.err(c.span(), "field `model.speculative_min_confidence`: between 0 and 1".into()))
            }
            Some(c) => *c.get_ref() as f32,
            None => 0.0,
        };
        Ok(SpeculativeConfig {
            min_tokens: min_k,
            max_tokens: max_k,
            min_confidence,
            cost_aware: self.speculative_cost_aware.unwrap_or(true),
        })
    }

    fn validate_multitoken(&self, source: &Source) -> Result<MultiTokenConfig, ConfigError> {
        let mode = match &self.multitoken_mode {
            None => None,
            Some(s) => Some(crate::multitoken::Mode::parse(s.get_ref()).ok_or_else(|| {
                source.err(s.span(), format!("field `model.multitoken_mode`: `{}`; use \"trust\" or \"verify\"", s.get_ref()))
            })?),
        };
        let threshold = match &self.multitoken_threshold {
            Some(c) if !(0.0..=1.0).contains(c.get_ref()) => {
                return Err(
                    source.err(c.span(), "field `model.multitoken_threshold`: between 0 and 1 (1 stops every step after one token)".into())
                )
            }
            c => c.as_ref().map(|c| *c.get_ref() as f32),
        };
        let max_tokens = match &self.multitoken_max_tokens {
            Some(n) if *n.get_ref() == 0 => return Err(source.err(n.span(), "field `model.multitoken_max_tokens`: at least 1".into())),
            n => n.as_ref().map(|n| *n.get_ref() as usize),
        };
        Ok(MultiTokenConfig { mode, threshold, max_tokens })
    }

    fn validate_int4_kernel(&self, source: &Source) -> Result<Int4Choice, ConfigError> {
        match self.int4_kernel.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
            None | Some(("auto", _)) => Ok(Int4Choice::Auto),
            Some(("edgellm", _)) => Ok(Int4Choice::Edgellm),
            Some(("onnxruntime", _)) => Ok(Int4Choice::OnnxRuntime),
            Some((other, span)) => {
                Err(source.err(span, format!("field `model.int4_kernel`: `{other}`; use \"auto\", \"edgellm\" or \"onnxruntime\"")))
            }
        }
    }

    fn validate_prompt_lookup(&self, source: &Source) -> Result<Option<LookupSettings>, ConfigError> {
        let lookup_keys = self.prompt_lookup_ngram.as_ref().map(|n| n.span()).or(self.prompt_lookup_max_draft.as_ref().map(|n| n.span()));
        match &self.prompt_lookup {
            Some(on) if *on.get_ref() => {
                if let Some(d) = &self.draft {
                    return Err(source.err(
                        on.span(),
                        format!(
                            "fields `model.draft` (`{}`) and `model.prompt_lookup`: a model drafts with one proposer; remove one of them",
                            d.get_ref()
                        ),
                    ));
                }
                let ngram = self.prompt_lookup_ngram.as_ref().map(|n| (*n.get_ref() as usize, n.span()));
                if let Some((n, span)) = ngram.clone().filter(|(n, _)| !(2..=8).contains(n)) {
                    return Err(source.err(span, format!("field `model.prompt_lookup_ngram`: {n}; use 2 to 8")));
                }
                let max_draft = self.prompt_lookup_max_draft.as_ref().map(|n| (*n.get_ref() as usize, n.span()));
                if let Some((n, span)) = max_draft.clone().filter(|(n, _)| !(1..=16).contains(n)) {
                    return Err(source.err(span, format!("field `model.prompt_lookup_max_draft`: {n}; use 1 to 16")));
                }
                let defaults = LookupSettings::default();
                Ok(Some(LookupSettings {
                    ngram: ngram.map(|v| v.0).unwrap_or(defaults.ngram),
                    max_draft: max_draft.map(|v| v.0).unwrap_or(defaults.max_draft),
                }))
            }
            _ if lookup_keys.is_some() => Err(source.err(
                lookup_keys.expect("checked"),
                "fields `model.prompt_lookup_ngram`/`prompt_lookup_max_draft` take effect with `prompt_lookup = true`".into(),
            )),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/edgellm/test.toml"), text)
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse("[[model]]\nname = \"kjv\"\npath = \"models/kjv\"\n").unwrap();
        assert_eq!(c.daemon.bus, Bus::Session);
        assert_eq!(c.models[0].path, PathBuf::from("/etc/edgellm/models/kjv"));
        assert_eq!(c.models[0].load.session.providers, vec![Provider::Cpu]);
        assert!(c.models[0].preload);
        assert_eq!(c.models[0].keep_alive, None, "a preloaded model stays loaded");
        assert_eq!(c.limits.max_queue, Limits::default().max_queue);
        let c = parse("[[model]]\nname = \"kjv\"\npath = \"m\"\npreload = false\n[[model]]\nname = \"b\"\npath = \"m\"\nkeep_alive_s = 0\npreload = false\n").unwrap();
        assert_eq!(c.models[0].keep_alive, Some(std::time::Duration::from_secs(DEFAULT_KEEP_ALIVE_S)));
        assert_eq!(c.models[1].keep_alive, None, "0 is never");
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let e =
            parse("[daemon]\nbus = \"session\"\n\n[[model]]\nname = \"a\"\npath = \"x\"\nprovider = [\"cpu\"]\n").unwrap_err().to_string();
        assert!(e.starts_with("/etc/edgellm/test.toml:7:"), "{e}");
        assert!(e.contains("provider"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let e = parse("[daemon]\nbus = \"sesion\"\n").unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("daemon.bus"), "{e}");
        let e = parse("[[model]]\nname = \"a\"\npath = \"x\"\nproviders = [\"gpu\"]\n").unwrap_err().to_string();
        assert!(e.contains(":4:") && e.contains("unknown provider `gpu`"), "{e}");
        let e = parse("[[model]]\nname = \"a\"\npath = \"x\"\ndraft = \"b\"\n").unwrap_err().to_string();
        assert!(e.contains(":4:") && e.contains("model.draft"), "{e}");
        let e = parse("[limits]\nmax_queue = -1\n").unwrap_err().to_string();
        assert!(e.contains(":2:"), "{e}");
    }

    #[test]
    fn spinning_keys_and_their_defaults() {
        let session = |text: &str| parse(text).unwrap().models[0].load.session.clone();
        let default = session("[[model]]\nname = \"a\"\npath = \"x\"\n");
        assert!(default.spinning && !default.spin_between_runs);
        let set = session("[[model]]\nname = \"a\"\npath = \"x\"\nspinning = false\nspin_between_runs = true\n");
        assert!(!set.spinning && set.spin_between_runs);
    }

    #[test]
    fn int4_kernel_key_and_its_default() {
        let session = |text: &str| parse(text).unwrap().models[0].load.session.clone();
        assert_eq!(session("[[model]]\nname = \"a\"\npath = \"x\"\n").int4, Int4Choice::Auto);
        assert_eq!(session("[[model]]\nname = \"a\"\npath = \"x\"\nint4_kernel = \"edgellm\"\n").int4, Int4Choice::Edgellm);
        assert_eq!(session("[[model]]\nname = \"a\"\npath = \"x\"\nint4_kernel = \"onnxruntime\"\n").int4, Int4Choice::OnnxRuntime);
        let e = parse("[[model]]\nname = \"a\"\npath = \"x\"\nint4_kernel = \"mlas\"\n").unwrap_err().to_string();
        assert!(e.contains(":4:") && e.contains("model.int4_kernel") && e.contains("\"onnxruntime\""), "{e}");
    }

    #[test]
    fn token_interval_key_its_default_and_bound() {
        const MODEL: &str = "\n[[model]]\nname = \"a\"\npath = \"x\"\n";
        assert_eq!(parse(MODEL).unwrap().daemon.token_interval, DEFAULT_TOKEN_INTERVAL);
        let c = parse(&format!("[daemon]\ntoken_interval_ms = 0\n{MODEL}")).unwrap();
        assert_eq!(c.daemon.token_interval, std::time::Duration::ZERO);
        let e = parse("[daemon]\ntoken_interval_ms = 60001\n").unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("daemon.token_interval_ms"), "{e}");
    }

    #[test]
    fn a_config_without_a_model_is_refused() {
        for text in ["", "\n# nothing\n", "[daemon]\nbus = \"session\"\n", "[limits]\nmax_queue = 4\n"] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("test.toml") && e.contains("no [[model]]"), "{text:?}: {e}");
        }
    }

    #[test]
    fn prompt_lookup_keys() {
        let c = parse("[[model]]\nname = \"a\"\npath = \"x\"\nprompt_lookup = true\nprompt_lookup_ngram = 4\n").unwrap();
        assert_eq!(c.models[0].prompt_lookup, Some(LookupSettings { ngram: 4, max_draft: 8 }));
        let c = parse("[[model]]\nname = \"a\"\npath = \"x\"\n").unwrap();
        assert_eq!(c.models[0].prompt_lookup, None);
        let two = "[[model]]\nname = \"a\"\npath = \"x\"\ndraft = \"b\"\nprompt_lookup = true\n\n[[model]]\nname = \"b\"\npath = \"y\"\n";
        let e = parse(two).unwrap_err().to_string();
        assert!(e.contains(":5:") && e.contains("model.draft") && e.contains("model.prompt_lookup"), "{e}");
        let e = parse("[[model]]\nname = \"a\"\npath = \"x\"\nprompt_lookup = true\nprompt_lookup_ngram = 9\n").unwrap_err().to_string();
        assert!(e.contains(":5:") && e.contains("prompt_lookup_ngram") && e.contains("2 to 8"), "{e}");
        let e = parse("[[model]]\nname = \"a\"\npath = \"x\"\nprompt_lookup_max_draft = 4\n").unwrap_err().to_string();
        assert!(e.contains(":4:") && e.contains("prompt_lookup = true"), "{e}");
    }
}
