//! One generation at a time on a loaded model: the engine loads a model (a decoder graph, or a
//! multi-token model's graphs, and a draft), picks each request's target and proposer, and runs
//! the one decode loop (`crate::decode::driver`) over them. Knows nothing of who asked (no D-Bus
//! here).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::decode::decoder::{Decoder, KvCache, KvLayout, LoadOptions};
use crate::decode::driver::{self, Decoding};
use crate::decode::proposer::{NoProposer, Proposer as _};
pub use crate::decode::reuse::PromptCache;
use crate::decode::reuse::{reusable_prefix, CachedKv};
use crate::decode::run::Run;
pub use crate::decode::run::{CancelToken, FinishReason, GenerateOptions, GenerationStats, MultiTokenStats, Outcome, SpeculativeStats};
pub use crate::decode::sampler::{Sampler, SamplingParams};

use crate::error::{Error, Result};
use crate::model::ModelFolder;
pub use crate::model::Prompt;
use crate::multitoken::{MultiTokenModel, Settings as MultiTokenSettings};
use crate::runtime::{ProviderReport, Runtime};

use crate::decode::target::DecoderTarget;
use crate::speculative::lookup::{LookupSettings, PromptLookup};
use crate::speculative::DraftProposer;
use roles::{KeptKv, Roles};

mod roles;

/// What runs a model's forwards: one decoder graph, or the three graphs of a multi-token model.
enum Core {
    Decoder(Decoder),
    MultiToken(MultiTokenModel, MultiTokenSettings),
}

/// A model ready to generate. Owned by the one thread that runs it.
pub struct Engine {
    pub name: String,
    pub folder: Arc<ModelFolder>,
    core: Core,
    kv_layout: KvLayout,
    draft: Option<crate::speculative::Draft>,
    /// Prompt lookup settings where the model's config turns it on.
    prompt_lookup: Option<LookupSettings>,
    pub load_time: Duration,
    /// Unique per load: a kept cache is only fed back to the engine that made it.
    id: u64,
}

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

impl Engine {
    pub fn load(runtime: &Runtime, name: &str, dir: &Path, options: &LoadOptions) -> Result<Engine> {
        Self::load_folder(runtime, name, Arc::new(ModelFolder::open(dir)?), options)
    }

    /// Loads the weights of an opened folder (the daemon opens folders first, to tokenize and
    /// validate requests before they are queued).
    pub fn load_folder(runtime: &Runtime, name: &str, folder: Arc<ModelFolder>, options: &LoadOptions) -> Result<Engine> {
        let started = Instant::now();
        let dir = folder.dir.clone();
        let dir = dir.as_path();
        // How the weights are read (edgellm's own map of the data file, or ONNX Runtime reading
        // the file) is the session's choice (`runtime::WeightLoading`); the benchmark's
        // `--load-rounds` measures both.
        let (core, kv_layout) = match &folder.multitoken {
            Some(contract) => {
                let model = MultiTokenModel::load(runtime, dir, &folder.config, contract, &options.session)?;
                let settings = model.default_settings();
                // The multi-token loop keeps its own growing KV (merged steps and rollbacks).
                (Core::MultiToken(model, settings), KvLayout::Growing)
            }
            None => {
                let decoder = Decoder::load(runtime, dir, &folder.config, &options.session)?;
                let kv_layout = decoder.choose_layout(&folder.config, options.kv_layout)?;
                (Core::Decoder(decoder), kv_layout)
            }
        };
        let engine = Engine {
            name: name.into(),
            folder,
            core,
            kv_layout,
            draft: None,
            prompt_lookup: None,
            load_time: started.elapsed(),
            id: NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed),
        };
        tracing::info!(
            model = name,
            provider = engine.provider().provider.name(),
            int4 = %engine.provider().int4,
            ?kv_layout,
            multitoken = engine.is_multitoken(),
            ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(engine)
    }

    pub fn is_multitoken(&self) -> bool {
        matches!(self.core, Core::MultiToken(..))
    }

    /// The model's own multi-token settings (from its `[[model]]` entry), checked against the
    /// folder's contract.
    pub fn set_multitoken_settings(&mut self, settings: MultiTokenSettings) -> Result<()> {
        match &mut self.core {
            Core::MultiToken(model, current) => {
                *current = checked_multitoken(model, settings)?;
                Ok(())
            }
            Core::Decoder(_) => Err(Error::InvalidArgument {
                argument: "multitoken".into(),
                reason: format!("model `{}` has no multitoken_config.json", self.name),
            }),
        }
    }

    pub fn multitoken_settings(&self) -> Option<MultiTokenSettings> {
        match &self.core {
            Core::MultiToken(_, settings) => Some(*settings),
            Core::Decoder(_) => None,
        }
    }

    /// The target's logits for the token after `ids` (one prefill, no sampling): for tests and
    /// quality measurements.
    pub fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        match &mut self.core {
            Core::Decoder(decoder) => {
                let mut cache = decoder.new_cache(self.kv_layout, ids.len())?;
                decoder.forward(&mut cache, ids, 1)
            }
            Core::MultiToken(model, _) => model.next_logits(ids),
        }
    }

    /// Mean negative log-likelihood (nats per token) of `continuation` after `prompt` under this
    /// model (a multi-token model's base, one token per step): the quality measure of the
    /// benchmarks.
    pub fn continuation_nll(&mut self, prompt: &[u32], continuation: &[u32]) -> Result<f64> {
        if continuation.is_empty() {
            return Ok(0.0);
        }
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(&continuation[..continuation.len() - 1]);
        let rows = continuation.len();
        let logits: Vec<Vec<f32>> = match &mut self.core {
            Core::Decoder(decoder) => {
                let mut cache = decoder.new_cache(self.kv_layout, ids.len())?;
                let flat = decoder.forward(&mut cache, &ids, rows)?;
                flat.chunks(decoder.vocab()).map(<[f32]>::to_vec).collect()
            }
            Core::MultiToken(model, _) => model.sequence_logits(&ids, rows)?,
        };
        let mut total = 0.0f64;
        for (row, &token) in logits.iter().zip(continuation) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_sum = row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() + max as f64;
            total += log_sum - row[token as usize] as f64;
        }
        Ok(total / continuation.len() as f64)
    }

    /// Loads `folder` as this model's draft for speculative decoding.
    pub fn attach_draft(
        &mut self,
        runtime: &Runtime,
        folder: &ModelFolder,
        options: &LoadOptions,
        settings: crate::speculative::Settings,
    ) -> Result<()> {
        if self.is_multitoken() {
            return Err(Error::ModelConfig {
                path: folder.config.path.clone(),
                field: "draft".into(),
                reason: format!("model `{}` is a multi-token model: its micro decoder drafts, a draft model is not used", self.name),
            });
        }
        // Speculative decoding rolls rejected positions back; a recurrent state cannot be.
        if let Core::Decoder(decoder) = &self.core {
            if let Some(state) = decoder.recurrent_states().first() {
                return Err(Error::ModelConfig {
                    path: self.folder.config.path.clone(),
                    field: "draft".into(),
                    reason: format!(
                        "model `{}` carries recurrent states (`{state}`), which speculative decoding cannot roll back: remove `draft`",
                        self.name
                    ),
                });
            }
        }
        self.draft = Some(crate::speculative::Draft::load(runtime, &self.folder, folder, options, settings)?);
        Ok(())
    }

    /// Turns prompt lookup drafting on for this model's requests (a request may turn it off).
    pub fn enable_prompt_lookup(&mut self, settings: LookupSettings) -> Result<()> {
        if self.is_multitoken() || self.draft.is_some() {
            return Err(Error::ModelConfig {
                path: self.folder.config.path.clone(),
                field: "prompt_lookup".into(),
                reason: format!("model `{}` already drafts (a draft model or multi-token steps)", self.name),
            });
        }
        self.prompt_lookup = Some(settings);
        Ok(())
    }

    pub fn has_draft(&self) -> bool {
        self.draft.is_some()
    }

    pub fn draft_provider(&self) -> Option<&ProviderReport> {
        self.draft.as_ref().map(|d| d.provider())
    }

    pub fn provider(&self) -> &ProviderReport {
        match &self.core {
            Core::Decoder(decoder) => &decoder.provider,
            Core::MultiToken(model, _) => &model.provider,
        }
    }
    pub fn context(&self) -> usize {
        self.folder.config.context_length
    }
    pub fn kv_layout(&self) -> KvLayout {
        self.kv_layout
    }

    /// The sampling a request gets: the model's `search` defaults, overridden by the request.
    pub fn sampling_params(&self, options: &GenerateOptions) -> SamplingParams {
        let search = &self.folder.config.search;
        let sample = options.temperature.map(|t| t > 0.0).unwrap_or(search.do_sample);
        SamplingParams {
            temperature: if sample { options.temperature.unwrap_or(search.temperature as f32) } else { 0.0 },
            top_k: options.top_k.unwrap_or(if sample { search.top_k as usize } else { 0 }),
            top_p: options.top_p.unwrap_or(if sample { search.top_p as f32 } else { 1.0 }),
            repetition_penalty: options.repetition_penalty.unwrap_or(search.repetition_penalty as f32),
            seed: options.seed.unwrap_or_else(rand::random),
        }
    }

    /// Generates for `prompt`, calling `on_text` with each piece of final text as it is decided.
    /// `on_text` returns false when nobody listens any more, which cancels the request.
    /// With a draft attached (and `options.speculative` not false) it decodes speculatively.
    pub fn generate(
        &self,
        prompt: &Prompt,
        options: &GenerateOptions,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Outcome> {
        self.generate_cached(prompt, options, cancel, on_text, None).map(|(outcome, _)| outcome)
    }

    /// `generate`, reusing `cache` (what an earlier request of the same caller left) for the
    /// longest common prefix of the prompt with it, and returning what this request leaves for
    /// the next one. Greedy output is the same as without it: the kept positions hold what a
    /// prefill of them would compute.
    pub fn generate_cached(
        &self,
        prompt: &Prompt,
        options: &GenerateOptions,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> bool,
        cache: Option<PromptCache>,
    ) -> Result<(Outcome, Option<PromptCache>)> {
        let prompt_ids = self.folder.prompt_ids(&self.name, prompt)?;
        let params = self.sampling_params(options);
        let max_total = self.folder.config.search.max_length.min(self.context());
        let max_new = options.max_new_tokens.unwrap_or(max_total.saturating_sub(prompt_ids.len())).max(1);
        let mut run = Run::new(&self.folder, prompt_ids, params, options, max_new, self.context());
        if let Some(grammar) = &options.grammar {
            run.constrain(self.folder.output_matcher(grammar)?, grammar.option());
        }
        let kept = self.kept_caches(cache, &run.sequence);
        let mut roles = self.roles(&run, options, cancel, kept)?;
        let mut stats = SpeculativeStats::default();
        let (target, proposer) = roles.parts();
        run.cached_prompt_tokens = target.len();
        let decoding = Decoding { target, proposer, folder: &self.folder, run: &mut run, cancel, on_text: &mut *on_text, stats: &mut stats };
        let reason = driver::drive(decoding)?;
        let left = roles.finish(&mut run, stats).and_then(|kv| self.left_for_next(kv, &run.sequence));
        Ok((run.end(&self.folder, reason, on_text, self.provider())?, left))
    }

    /// What `cache` holds of `sequence`'s prefix; a cache from another engine (the model was
    /// reloaded since) belongs to other sessions.
    fn kept_caches(&self, cache: Option<PromptCache>, sequence: &[u32]) -> KeptKv {
        let Some(PromptCache { tokens, kv, .. }) = cache.filter(|c| c.engine == self.id) else {
            return KeptKv::default();
        };
        let keep = reusable_prefix(&tokens, sequence);
        match kv {
            CachedKv::Decoder { target, draft } => KeptKv { target: cut(target, keep), draft: draft.and_then(|d| cut(d, keep)), base: None },
            CachedKv::Base(mut kv) => KeptKv { base: kv.truncate(keep.min(kv.len()), true).is_ok().then_some(kv), ..KeptKv::default() },
        }
    }

    /// The target and proposer this request decodes with: a multi-token model's base and micro
    /// decoder; else the decoder graph with the draft model (unless the request turns drafts
    /// off), prompt lookup (where the config or the request turns it on), or nothing proposed.
    fn roles<'e>(&'e self, run: &Run, options: &GenerateOptions, cancel: &CancelToken, kept: KeptKv) -> Result<Roles<'e>> {
        let decoder = match &self.core {
            Core::MultiToken(model, defaults) => {
                let settings = checked_multitoken(
                    model,
                    MultiTokenSettings {
                        mode: options.multitoken_mode.unwrap_or(defaults.mode),
                        threshold: options.multitoken_threshold.unwrap_or(defaults.threshold),
                        max_tokens: options.multitoken_max_tokens.unwrap_or(defaults.max_tokens),
                        verify_by_cost: defaults.verify_by_cost && options.multitoken_threshold.is_none(),
                    },
                )?;
                let (target, proposer) = model.split(settings, cancel, kept.base)?;
                return Ok(Roles::MultiToken(target, proposer, settings));
            }
            Core::Decoder(decoder) => decoder,
        };
        let lookup = match options.prompt_lookup {
            Some(true) => Some(self.prompt_lookup.unwrap_or_default()),
            Some(false) => None,
            None => self.prompt_lookup,
        };
        let target = |lookahead| DecoderTarget::new(decoder, self.kv_layout, run, lookahead, cancel, kept.target);
        match (&self.draft, options.speculative.unwrap_or(true)) {
            (Some(draft), true) => {
                let proposer = DraftProposer::new(draft, run.prompt_len + run.max_new, cancel, kept.draft)?;
                Ok(Roles::Draft(target(proposer.max_tokens())?, proposer))
            }
            (None, _) if lookup.is_some() => {
                if let Some(state) = decoder.recurrent_states().first() {
                    return Err(Error::InvalidArgument {
                        argument: "prompt_lookup".into(),
                        reason: format!("model `{}` carries recurrent states (`{state}`), which drafting cannot roll back", self.name),
                    });
                }
                let proposer = PromptLookup::new(lookup.expect("matched"));
                Ok(Roles::Lookup(target(proposer.max_tokens())?, proposer, kept.draft))
            }
            _ => Ok(Roles::Plain(target(0)?, NoProposer, kept.draft)),
        }
    }

    /// What a finished request leaves: its caches with the tokens they hold, a draft's cut to
    /// the target's length (it may hold a draft the run did not keep).
    fn left_for_next(&self, kv: CachedKv, sequence: &[u32]) -> Option<PromptCache> {
        let (kv, len) = match kv {
            CachedKv::Decoder { mut target, draft } => {
                let len = target.len();
                let mut draft = draft.and_then(|d| cut(d, len));
                // Kept, a cache holds its positions only (the next request widens it again).
                target.shrink_to_fit().ok()?;
                if let Some(d) = &mut draft {
                    d.shrink_to_fit().ok()?;
                }
                (CachedKv::Decoder { target, draft }, len)
            }
            CachedKv::Base(kv) => {
                let len = kv.len();
                (CachedKv::Base(kv), len)
            }
        };
        Some(PromptCache { engine: self.id, tokens: sequence[..len].to_vec(), kv })
    }
}

/// `cache` cut to its first `keep` positions (it keeps fewer where it holds fewer), or `None`
/// where it cannot be rolled back that far (recurrent states).
fn cut(mut cache: KvCache, keep: usize) -> Option<KvCache> {
    if keep < cache.len() && !cache.can_roll_back() {
        return None;
    }
    cache.truncate(keep).ok()?;
    Some(cache)
}

/// The request's multi-token settings against what the model's contract allows.
fn checked_multitoken(model: &MultiTokenModel, settings: MultiTokenSettings) -> Result<MultiTokenSettings> {
    let max = model.contract.max_tokens_per_step;
    if settings.max_tokens == 0 || settings.max_tokens > max {
        return Err(Error::InvalidArgument {
            argument: "multitoken_max_tokens".into(),
            reason: format!("{} is outside 1..={max} (the model's max_tokens_per_step)", settings.max_tokens),
        });
    }
    if !(0.0..=1.0).contains(&settings.threshold) {
        return Err(Error::InvalidArgument {
            argument: "multitoken_threshold".into(),
            reason: format!("{} is outside 0..1", settings.threshold),
        });
    }
    Ok(settings)
}
