//! The harness's flags, declared: the parent's (`Cli`, what `--help` lists) and the measuring
//! child's (`ChildArgs`: the hidden `--child ...` mode that the harness and benches/ab.py run).
//! An unknown or misspelt flag is an error in both.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use edgellm::runtime::Provider;

/// `cargo bench --bench engine -- [FLAGS]`: edgellm's engine against onnxruntime-genai on the
/// same model, prompts, greedy decoding and intra-op threads, each in its own process; then the
/// tables the flags below add or leave out. Tables go to stdout as markdown (or JSON records,
/// `--format json`), progress to stderr.
///
/// Environment: EDGELLM_BENCH_SPIN_BETWEEN_RUNS=1 gives the engine children ONNX Runtime's
/// default of spinning on after each run (edgellm's default stops it);
/// EDGELLM_BENCH_INT4=edgellm|onnxruntime chooses who runs the int4 products (default: auto).
#[derive(Parser, Debug)]
#[command(name = "engine", bin_name = "cargo bench --bench engine --", verbatim_doc_comment)]
pub struct Cli {
    /// The model folder of the tables [default: models/kjv-target]
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,

    /// New tokens per prompt (greedy)
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub new_tokens: usize,

    /// Providers of the first table and its paired rows; `none` skips them
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST", default_values_t = [Providers::Cpu, Providers::Openvino])]
    pub providers: Vec<Providers>,

    /// Intra-op threads, the same for both engines (0: ONNX Runtime's default pool in both;
    /// onnxruntime-genai would otherwise pick half the cores)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,

    /// Rounds of the paired rows, where both engines stay loaded and run each prompt in turn
    /// (0 skips them; the prompt-lookup table runs at least 1, --bandwidth at least 2)
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub pair_rounds: usize,

    /// Leave out the speculative decoding table (kjv-target or its twin with kjv-draft)
    #[arg(long)]
    pub no_speculative: bool,

    /// Leave out prompt lookup against plain decoding
    #[arg(long)]
    pub no_prompt_lookup: bool,

    /// Leave out the multi-token (HAMburger) table
    #[arg(long)]
    pub no_multitoken: bool,

    /// Thresholds of the multi-token table's trust and verify rows
    #[arg(long, value_delimiter = ',', value_name = "LIST", default_value = "0.7,0.5", value_parser = threshold)]
    pub thresholds: Vec<String>,

    /// The multi-token table's model (its plain row is --model's) [default: models/kjv-hamburger]
    #[arg(long, value_name = "DIR")]
    pub hamburger: Option<PathBuf>,

    /// Adds how a forward's cost grows with its positions (what a speculative verify pays) on
    /// these models, and the int4 kernel's arithmetic floor for one more position from this
    /// core's measured VNNI rate
    #[arg(long, value_delimiter = ',', value_name = "DIR,...")]
    pub forward_cost: Vec<PathBuf>,

    /// The draft acceptance the --forward-cost table's ceilings assume
    #[arg(long, value_name = "A", default_value_t = 0.79)]
    pub acceptance: f64,

    /// Adds instructions per decoded token under callgrind on these providers
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    pub work_per_token: Vec<EngineProvider>,

    /// Adds loading alone, a new process per load, N rounds: edgellm (its own map of the
    /// weights), edgellm with ONNX Runtime reading the file, onnxruntime-genai
    #[arg(long, value_name = "N")]
    pub load_rounds: Option<usize>,

    /// Adds streamed Generate against Complete over D-Bus (the daemon's own engine time), CALLS
    /// pairs per variant
    #[arg(long, value_name = "CALLS")]
    pub streaming: Option<usize>,

    /// The --streaming table's daemons: intra-op threads, spinning (on; runs: only during a
    /// run, spin_between_runs = false; off) and the daemon's token_interval_ms (its default when
    /// left out)
    #[arg(long, value_delimiter = ',', value_name = "THREADS:on|runs|off[:MS],...", default_value = "0:runs:0,0:runs,0:on,1:on", value_parser = variant)]
    pub streaming_variants: Vec<Variant>,

    /// Adds the physical limit of plain decoding on --model: the read bandwidth, the weight
    /// bytes a token reads, and each engine's fraction of the bound (paired rounds)
    #[arg(long)]
    pub bandwidth: bool,

    /// Adds an interactive streamed request timed by its client on an idle daemon and beside 4
    /// background clients, in alternating rounds
    #[arg(long, value_name = "ROUNDS")]
    pub priority: Option<usize>,

    /// Adds the last turn of a 4-turn chat timed to its first Token, on the connection that ran
    /// the earlier turns (KV kept) and on a fresh one, in alternating pairs
    #[arg(long, value_name = "ROUNDS")]
    pub chat_reuse: Option<usize>,

    /// How the tables are printed: markdown tables, or one JSON record per line
    #[arg(long, value_enum, default_value_t = Format::Markdown)]
    pub format: Format,

    /// Passed by `cargo bench`
    #[arg(long, hide = true)]
    pub bench: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Json,
}

/// A provider both engines run on.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineProvider {
    Cpu,
    Openvino,
}

impl EngineProvider {
    pub fn name(self) -> &'static str {
        match self {
            EngineProvider::Cpu => "cpu",
            EngineProvider::Openvino => "openvino",
        }
    }
}

/// `--providers`: an engine provider, or `none`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Providers {
    Cpu,
    Openvino,
    #[value(name = "none")]
    Skip,
}

impl Providers {
    pub fn provider(self) -> Option<EngineProvider> {
        match self {
            Providers::Cpu => Some(EngineProvider::Cpu),
            Providers::Openvino => Some(EngineProvider::Openvino),
            Providers::Skip => None,
        }
    }
}

/// Intra-op pool spinning of a daemon's model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Spin {
    /// ONNX Runtime's default: spinning, and on after each run.
    On,
    /// Spinning only during a run (`spin_between_runs = false`).
    Runs,
    Off,
}

impl Spin {
    pub fn name(self) -> &'static str {
        match self {
            Spin::On => "on",
            Spin::Runs => "runs",
            Spin::Off => "off",
        }
    }
}

/// One daemon of the --streaming table: THREADS:on|runs|off[:MS].
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub threads: u32,
    pub spin: Spin,
    pub token_interval_ms: Option<u64>,
}

fn variant(text: &str) -> Result<Variant, String> {
    let mut parts = text.split(':');
    let threads = parts.next().unwrap_or_default().parse().map_err(|e| format!("threads: {e}"))?;
    let spin = match parts.next() {
        Some("on") => Spin::On,
        Some("runs") => Spin::Runs,
        Some("off") => Spin::Off,
        _ => return Err("THREADS:on|runs|off[:MS]: spinning on, runs or off".into()),
    };
    let token_interval_ms = parts.next().map(|ms| ms.parse().map_err(|e| format!("token_interval_ms: {e}"))).transpose()?;
    if parts.next().is_some() {
        return Err("THREADS:on|runs|off[:MS]: too many parts".into());
    }
    Ok(Variant { threads, spin, token_interval_ms })
}

/// A threshold, kept as written (it labels its rows).
fn threshold(text: &str) -> Result<String, String> {
    text.parse::<f32>().map(|_| text.to_string()).map_err(|e| format!("{e}"))
}

/// The measuring child: loads one engine and runs the prompts, printing JSON on stdout. The
/// harness runs it, and so does benches/ab.py:
/// `--child --model M --provider cpu --new-tokens N --threads 0 --weights file --prompts F [extra] --serve`.
#[derive(Parser, Debug)]
#[command(name = "engine --child")]
pub struct ChildArgs {
    /// This mode (the harness's parent mode runs without it)
    #[arg(long, required = true)]
    pub child: bool,

    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,

    #[arg(long, default_value = "cpu", value_parser = provider)]
    pub provider: Provider,

    #[arg(long, value_name = "N")]
    pub new_tokens: usize,

    /// Intra-op threads (0: ONNX Runtime's default)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,

    /// How the weights reach ONNX Runtime (default: edgellm's default)
    #[arg(long, value_enum, default_value_t = Weights::Default)]
    pub weights: Weights,

    /// JSON list of prompt token id lists
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,

    /// The KV layout (default: the model's)
    #[arg(long, value_enum)]
    pub kv: Option<Kv>,

    /// Speculative decoding with this draft model
    #[arg(long, value_name = "DIR")]
    pub draft: Option<PathBuf>,

    /// The most drafts a speculative round holds
    #[arg(long, default_value_t = 8)]
    pub k: usize,

    /// Draft lengths by acceptance alone instead of by what drafts are worth
    #[arg(long)]
    pub by_acceptance: bool,

    /// Print the load's time and peak RSS, and the first token's, then exit
    #[arg(long)]
    pub load_only: bool,

    #[arg(long)]
    pub prompt_lookup: bool,

    /// Multi-token steps: trust or verify, with a threshold or the model's default
    #[arg(long, value_name = "MODE[:THRESHOLD]")]
    pub multitoken: Option<String>,

    /// The base's own loss on the generated text
    #[arg(long)]
    pub nll: bool,

    /// After the warm-up, run the prompt whose index each stdin line gives; one JSON line each
    #[arg(long)]
    pub serve: bool,
}

fn provider(name: &str) -> Result<Provider, String> {
    Provider::parse(name).ok_or_else(|| format!("no provider {name:?} (cpu, cuda, openvino)"))
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    Default,
    File,
    Mapped,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kv {
    Growing,
    Shared,
}
