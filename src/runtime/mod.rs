//! ONNX Runtime: finding and loading libonnxruntime.so, the OpenVINO plugin, and building sessions
//! on an ordered list of execution providers with an explicit fallback.
//!
//! ONNX Runtime is loaded once per process (ort keeps the library in a global); `Runtime` is the
//! handle everything else is built from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::environment::Environment;
use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;

use crate::error::{Error, Result};

mod attention;
mod int4;
mod matmul_nbits;
mod onnx_proto;
mod weights;
pub use matmul_nbits::{Attention, Int4Kernel};

/// Whether this CPU runs edgellm's int4 kernel (AVX-512 VNNI).
pub fn int4_supported() -> bool {
    int4::supported()
}
pub(crate) use weights::MappedWeights;

/// File name of the OpenVINO plugin of the `onnxruntime-ep-openvino` wheel.
pub const OPENVINO_PLUGIN: &str = "libonnxruntime_providers_openvino_plugin.so";
const OPENVINO_EP: &str = "OpenVINOExecutionProvider";
const CPU_EP: &str = "CPUExecutionProvider";

/// An execution provider a model may ask for, in config order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    Cpu,
    Cuda,
    OpenVino,
}

impl Provider {
    pub fn parse(name: &str) -> Option<Provider> {
        match name {
            "cpu" => Some(Provider::Cpu),
            "cuda" => Some(Provider::Cuda),
            "openvino" => Some(Provider::OpenVino),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::OpenVino => "openvino",
        }
    }
}

/// How a session should be built: providers in order of preference and their options.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionOptions {
    pub providers: Vec<Provider>,
    /// A provider that fails to register is an error instead of a step down the list.
    pub strict: bool,
    /// Intra-op threads; 0 lets ONNX Runtime choose (one per core).
    pub threads: usize,
    /// Whether idle intra-op threads spin waiting for work (ONNX Runtime's default) or sleep.
    pub spinning: bool,
    /// Whether they go on spinning after a `Run` returns (ONNX Runtime's default) or stop until
    /// the next one (`session.force_spinning_stop`), leaving the cores between decode steps to
    /// the token's way out: the D-Bus connection, dbus-daemon and the client. Off by default:
    /// streaming measured faster and `Complete` no slower (docs/performance.md, "Streaming over D-Bus").
    pub spin_between_runs: bool,
    /// Passed through to the provider that runs (e.g. OpenVINO `device_type`, CUDA `device_id`).
    pub provider_options: Vec<(String, String)>,
    /// How the weights reach ONNX Runtime on the CPU provider (other providers read the file).
    pub weights: WeightLoading,
    /// Who runs the model's int4 `MatMulNBits` nodes on the CPU provider (`matmul_nbits`).
    pub int4: Int4Choice,
}

/// The config's `int4_kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int4Choice {
    /// edgellm's kernel wherever it covers every node, ONNX Runtime's elsewhere.
    #[default]
    Auto,
    /// The same as `Auto` since auto stopped keeping ONNX Runtime's kernel for small models;
    /// kept so that configs that name it still load.
    Edgellm,
    OnnxRuntime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightLoading {
    /// ONNX Runtime opens model.onnx and model.onnx.data by path and keeps what it reads.
    File,
    /// edgellm maps the external data files and hands each initializer to ONNX Runtime in place;
    /// the pages ONNX Runtime does not read after its load leave the resident set
    /// (`weights::MappedWeights`), so the peak resident set stays lower than with `File`
    /// (docs/performance.md, "Loading").
    #[default]
    Mapped,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            providers: vec![Provider::Cpu],
            strict: false,
            threads: 0,
            spinning: true,
            spin_between_runs: false,
            provider_options: Vec::new(),
            weights: WeightLoading::Mapped,
            int4: Int4Choice::Auto,
        }
    }
}

/// What really runs, and what was tried before it.
#[derive(Debug, Clone)]
pub struct ProviderReport {
    pub provider: Provider,
    /// What runs the int4 matrix products.
    pub int4: Int4Kernel,
    /// (provider, reason) for each provider that was tried and failed, in order.
    pub failed: Vec<(Provider, String)>,
}

pub struct Runtime {
    env: Environment,
    library: PathBuf,
    openvino_plugin: Option<PathBuf>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("library", &self.library).field("openvino_plugin", &self.openvino_plugin).finish()
    }
}

/// Where to look for libonnxruntime.so, in order: the config's `[runtime] library`,
/// `ORT_DYLIB_PATH`, the folder `scripts/setup-runtime.sh` installs into (`$EDGELLM_RUNTIME_DIR`,
/// else `.edgellm/runtime` of this source tree), and the system install (/usr/lib/edgellm).
pub fn library_candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(path) = configured {
        return vec![path.to_path_buf()];
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return vec![PathBuf::from(path)];
    }
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("EDGELLM_RUNTIME_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".edgellm/runtime"));
    dirs.push(PathBuf::from("/usr/lib/edgellm"));
    dirs.into_iter().map(|d| d.join("libonnxruntime.so")).collect()
}

impl Runtime {
    /// Loads ONNX Runtime from the first candidate that exists; a missing or wrong library is a
    /// typed error that says how to install it (ort itself would panic at its first call).
    pub fn load(configured: Option<&Path>) -> Result<Arc<Runtime>> {
        let candidates = library_candidates(configured);
        let library = match candidates.iter().find(|p| p.exists()) {
            Some(found) => found.clone(),
            None => {
                return Err(Error::RuntimeLibrary {
                    path: candidates[0].clone(),
                    reason: format!(
                        "not found (looked at {})",
                        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        };
        let builder = ort::init_from(&library).map_err(|e| Error::RuntimeLibrary { path: library.clone(), reason: e.to_string() })?;
        let env =
            builder.with_name("edgellm").build().map_err(|e| Error::RuntimeLibrary { path: library.clone(), reason: e.to_string() })?;
        // ort forwards ONNX Runtime's log to `tracing` and opens it at VERBOSE, so ONNX Runtime
        // formats messages on every forward pass that are then dropped. Open it only as far as
        // tracing listens.
        env.set_log_level(ort_log_level(tracing::level_filters::LevelFilter::current()));
        // The OpenVINO plugin lives beside the runtime library when the setup script installed it.
        // A symlink is resolved so that the plugin finds its OpenVINO libraries beside itself.
        let plugin = library.parent().map(|d| d.join(OPENVINO_PLUGIN)).and_then(|p| std::fs::canonicalize(p).ok());
        let openvino_plugin = match plugin {
            Some(path) => match env.register_ep_library("openvino", &path) {
                Ok(()) => Some(path),
                Err(e) => {
                    tracing::warn!(plugin = %path.display(), error = %e, "OpenVINO plugin did not register");
                    None
                }
            },
            None => None,
        };
        tracing::info!(library = %library.display(), openvino = openvino_plugin.is_some(), "ONNX Runtime loaded");
        Ok(Arc::new(Runtime { env, library, openvino_plugin }))
    }

    /// Device types (CPU, GPU, NPU) the OpenVINO plugin offers here; empty without the plugin
    /// or where it offers none.
    pub fn openvino_device_types(&self) -> Vec<String> {
        self.env
            .devices()
            .filter(|d| d.ep().map(|n| n == OPENVINO_EP).unwrap_or(false))
            .map(|d| format!("{:?}", d.hardware_device().ty()).to_uppercase())
            .collect()
    }

    /// The CPU's vendor as ONNX Runtime reports it.
    pub fn cpu_vendor(&self) -> Option<String> {
        self.env
            .devices()
            .find(|d| d.ep().map(|n| n == CPU_EP).unwrap_or(false))
            .and_then(|d| d.hardware_device().vendor().ok().map(str::to_string))
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Builds a session for `model_file` on the first provider of `options` that registers.
    pub fn session(&self, model_file: &Path, options: &SessionOptions) -> Result<(LoadedSession, ProviderReport)> {
        let mut failed = Vec::new();
        let mut providers = options.providers.clone();
        if !options.strict && !providers.contains(&Provider::Cpu) {
            // The explicit fallback: CPU always exists, so a non-strict model still loads.
            providers.push(Provider::Cpu);
        }
        for provider in providers {
            match self.session_on(model_file, provider, options) {
                Ok(session) => {
                    if !failed.is_empty() {
                        tracing::warn!(model = %model_file.display(), provider = provider.name(), ?failed, "fell back to a later execution provider");
                    }
                    let int4 = session.int4.clone();
                    return Ok((session, ProviderReport { provider, int4, failed }));
                }
                Err(Error::ProviderUnavailable { reason, .. }) => {
                    if options.strict {
                        return Err(Error::ProviderUnavailable { provider: provider.name().into(), reason });
                    }
                    failed.push((provider, reason));
                }
                Err(other) => return Err(other),
            }
        }
        let (provider, reason) = failed.pop().expect("at least one provider was tried");
        Err(Error::ProviderUnavailable { provider: provider.name().into(), reason })
    }

    fn builder(&self, options: &SessionOptions) -> Result<SessionBuilder> {
        let mut builder = Session::builder(&self.env)?;
        builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(ort::Error::from)?;
        if options.threads > 0 {
            builder = builder.with_intra_threads(options.threads).map_err(ort::Error::from)?;
        }
        if !options.spinning {
            builder = builder.with_intra_op_spinning(false).map_err(ort::Error::from)?;
        } else if !options.spin_between_runs {
            builder = builder.with_config_entry("session.force_spinning_stop", "1").map_err(ort::Error::from)?;
        }
        // ONNX Runtime's per-node profile, to compare where time goes with onnxruntime-genai's.
        if let Some(prefix) = std::env::var_os("EDGELLM_ORT_PROFILE") {
            builder = builder.with_profiling(prefix).map_err(ort::Error::from)?;
        }
        Ok(builder)
    }

    fn session_on(&self, model_file: &Path, provider: Provider, options: &SessionOptions) -> Result<LoadedSession> {
        let mut builder = self.on_provider(self.builder(options)?, provider, options)?;
        // The graph's bytes, read once for the CPU provider's two uses of them.
        let graph = match provider {
            Provider::Cpu => {
                Some(std::fs::read(model_file).map_err(|e| Error::ModelFile { path: model_file.to_path_buf(), reason: e.to_string() })?)
            }
            _ => None,
        };
        let int4 = match (&graph, options.int4) {
            (Some(_), Int4Choice::OnnxRuntime) => Int4Kernel::OnnxRuntime { reason: "asked for: `int4_kernel = \"onnxruntime\"`".into() },
            (Some(graph), _) => matmul_nbits::plan(graph),
            (None, _) => Int4Kernel::OnnxRuntime { reason: format!("the {} provider runs the graph", provider.name()) },
        };
        if let Int4Kernel::Edgellm { .. } = int4 {
            builder = builder.with_operators(matmul_nbits::domain(&int4)?).map_err(ort::Error::from)?;
        }
        let weights = match (options.weights, &graph) {
            (WeightLoading::Mapped, Some(graph)) => Some(MappedWeights::attach(&mut builder, model_file, graph)?),
            _ => None,
        };
        let committed = match &weights {
            Some(weights) => weights.while_building(|| builder.commit_from_file(model_file)),
            None => builder.commit_from_file(model_file),
        };
        let session = committed.map_err(|e| {
            if provider == Provider::Cpu {
                Error::ModelFile { path: model_file.to_path_buf(), reason: e.to_string() }
            } else {
                unavailable(provider, e.to_string())
            }
        })?;
        Ok(LoadedSession { session, int4, _weights: weights })
    }

    /// `builder` set to run on `provider`, or why it cannot.
    fn on_provider(&self, builder: SessionBuilder, provider: Provider, options: &SessionOptions) -> Result<SessionBuilder> {
        match provider {
            Provider::Cpu => {
                // Name the CPU provider's device explicitly: ort otherwise sets an automatic
                // device policy, which picks the OpenVINO plugin's CPU device once that is
                // registered (seen here as different logits from plain ONNX Runtime).
                let devices: Vec<_> = self.env.devices().filter(|d| d.ep().map(|n| n == CPU_EP).unwrap_or(false)).collect();
                builder.with_devices(devices, None).map_err(|e| unavailable(provider, e.to_string()))
            }
            Provider::Cuda => {
                let mut cuda = ep::CUDA::default();
                for (key, value) in &options.provider_options {
                    cuda = cuda.with_arbitrary_config(key, value);
                }
                builder.with_execution_providers([cuda.build().error_on_failure()]).map_err(|e| {
                    unavailable(provider, format!("{e} (install the `onnxruntime-gpu` wheel and point `[runtime] library` at its libonnxruntime.so; a CUDA GPU and driver are needed)"))
                })
            }
            Provider::OpenVino => self.on_openvino(builder, options),
        }
    }

    /// `builder` set to run on the OpenVINO plugin's device of the options' `device_type` (CPU
    /// if unset), the other provider options passed to it.
    fn on_openvino(&self, builder: SessionBuilder, options: &SessionOptions) -> Result<SessionBuilder> {
        if self.openvino_plugin.is_none() {
            return Err(unavailable(
                Provider::OpenVino,
                format!(
                    "{OPENVINO_PLUGIN} was not found beside {} (scripts/setup-runtime.sh installs it from the `onnxruntime-ep-openvino` wheel)",
                    self.library.display()
                ),
            ));
        }
        let device_type = options
            .provider_options
            .iter()
            .find(|(k, _)| k == "device_type")
            .map(|(_, v)| v.to_uppercase())
            .unwrap_or_else(|| "CPU".into());
        let devices: Vec<_> = self
            .env
            .devices()
            .filter(|d| d.ep().map(|n| n == OPENVINO_EP).unwrap_or(false))
            .filter(|d| format!("{:?}", d.hardware_device().ty()).eq_ignore_ascii_case(device_type.split('.').next().unwrap_or("CPU")))
            .take(1) // one device, as onnxruntime-genai passes it
            .collect();
        if devices.is_empty() {
            let why = match self.cpu_vendor() {
                // Seen here: on an AMD EPYC the plugin (1.8.1) offers no device at all.
                Some(vendor) if !vendor.to_ascii_lowercase().contains("intel") => {
                    format!(" (the onnxruntime-ep-openvino plugin offers devices on Intel hardware; this machine's CPU is from {vendor})")
                }
                _ => String::new(),
            };
            return Err(unavailable(Provider::OpenVino, format!("OpenVINO offers no {device_type} device on this machine{why}")));
        }
        let prefixed: Vec<(String, String)> = options
            .provider_options
            .iter()
            .filter(|(k, _)| k != "device_type")
            .map(|(k, v)| (format!("{OPENVINO_EP}.{k}"), v.clone()))
            .collect();
        builder.with_devices(devices, Some(&prefixed)).map_err(|e| unavailable(Provider::OpenVino, e.to_string()))
    }
}

fn unavailable(provider: Provider, reason: String) -> Error {
    Error::ProviderUnavailable { provider: provider.name().into(), reason }
}

/// A session and, where edgellm mapped its weights, the maps its initializers point into. The
/// session is declared first, so that it is dropped before the maps.
pub struct LoadedSession {
    session: Session,
    int4: Int4Kernel,
    _weights: Option<MappedWeights>,
}

impl std::ops::Deref for LoadedSession {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

/// The ONNX Runtime log level that `tracing` at `filter` would show: its TRACE is ONNX Runtime's
/// VERBOSE, DEBUG its INFO.
fn ort_log_level(filter: tracing::level_filters::LevelFilter) -> ort::logging::LogLevel {
    use ort::logging::LogLevel;
    use tracing::level_filters::LevelFilter;
    if filter >= LevelFilter::TRACE {
        LogLevel::Verbose
    } else if filter >= LevelFilter::DEBUG {
        LogLevel::Info
    } else {
        LogLevel::Warning
    }
}
