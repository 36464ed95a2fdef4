//! What every record carries besides its measurement: the command line that produced it, the
//! git commit, and the machine (CPU, cores, the instruction sets that matter here, and whether
//! edgellm's int4 kernel runs on it). The printer adds the date.

use serde::Serialize;

use crate::kit::fixtures::root;
use crate::{
    bandwidth, chat_reuse, engines, forward_cost, load, multitoken, priority, prompt_lookup, speculative, streaming, work_per_token,
};

/// One table's record.
#[derive(Serialize, Debug)]
#[serde(untagged)]
pub enum Measurement {
    Engines(engines::Record),
    Speculative(speculative::Record),
    PromptLookup(prompt_lookup::Record),
    ForwardCost(forward_cost::Record),
    WorkPerToken(work_per_token::Record),
    Multitoken(multitoken::Record),
    Load(load::Record),
    Streaming(streaming::Record),
    Bandwidth(bandwidth::Record),
    Priority(priority::Record),
    ChatReuse(chat_reuse::Record),
}

impl Measurement {
    /// The table's name in JSON records.
    pub fn name(&self) -> &'static str {
        match self {
            Measurement::Engines(_) => "engines",
            Measurement::Speculative(_) => "speculative",
            Measurement::PromptLookup(_) => "prompt_lookup",
            Measurement::ForwardCost(_) => "forward_cost",
            Measurement::WorkPerToken(_) => "work_per_token",
            Measurement::Multitoken(_) => "multitoken",
            Measurement::Load(_) => "load",
            Measurement::Streaming(_) => "streaming",
            Measurement::Bandwidth(_) => "bandwidth",
            Measurement::Priority(_) => "priority",
            Measurement::ChatReuse(_) => "chat_reuse",
        }
    }
}

/// Where and how the records of this run were made.
#[derive(Serialize, Debug)]
pub struct Context {
    /// The command line, as `cargo bench` takes it, with the environment that changes what runs.
    pub command: String,
    /// `git rev-parse --short HEAD`, "-dirty" when the tree has changes.
    pub commit: String,
    pub machine: Machine,
}

#[derive(Serialize, Debug)]
pub struct Machine {
    /// /proc/cpuinfo's model name.
    pub cpu: String,
    /// The cores this process may run on.
    pub cores: usize,
    /// The instruction sets of `ISA` that /proc/cpuinfo lists.
    pub isa: Vec<String>,
    /// Whether edgellm's int4 kernel runs on this CPU (AVX-512 VNNI).
    pub int4_supported: bool,
    /// EDGELLM_BENCH_INT4: who the engine children ask to run the int4 products.
    pub int4_choice: String,
}

/// The instruction sets that decide which kernels run (names as /proc/cpuinfo gives them).
const ISA: [&str; 11] =
    ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"];

/// The environment variables that change what the children run.
const ENV: [&str; 2] = ["EDGELLM_BENCH_INT4", "EDGELLM_BENCH_SPIN_BETWEEN_RUNS"];

impl Context {
    pub fn here() -> Context {
        Context { command: command(), commit: commit(), machine: Machine::here() }
    }
}

impl Machine {
    fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == name).map(|(_, v)| v.trim().to_string()))
        };
        let flags = field("flags").unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        Machine {
            cpu: field("model name").unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            isa: ISA.iter().filter(|isa| flags.contains(isa)).map(|isa| isa.to_string()).collect(),
            int4_supported: edgellm::runtime::int4_supported(),
            int4_choice: std::env::var("EDGELLM_BENCH_INT4").unwrap_or_else(|_| "auto".into()),
        }
    }
}

fn command() -> String {
    let quote = |a: &str| {
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_.,:/=@+".contains(c)) {
            a.to_string()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    let env = ENV.iter().filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={} ", quote(&v))));
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").map(|a| quote(&a)).collect();
    let args = if args.is_empty() { String::new() } else { format!(" -- {}", args.join(" ")) };
    format!("{}cargo bench --bench engine{args}", env.collect::<String>())
}

fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) if git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()) => format!("{head}-dirty"),
        Some(head) => head,
        None => "unknown".into(),
    }
}
