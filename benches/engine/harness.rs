//! The measuring children and how they are run: what a child of either engine runs on
//! (`Workload`), rounds of one-shot children (`run_interleaved`), and children that stay loaded
//! and run the prompt they are told (`Server`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::kit::fixtures::root;

/// What every table measures on: the model, new tokens, intra-op threads and prompts, and the
/// programs of the two engines' children.
pub struct Bench {
    pub model: PathBuf,
    pub new_tokens: usize,
    pub threads: usize,
    pub prompts: Vec<Vec<u32>>,
    /// `prompts`, as the children read them.
    pub prompts_file: PathBuf,
    /// This binary, whose `--child` mode is edgellm's side.
    pub me: PathBuf,
    /// The venv's Python, which runs onnxruntime-genai's side (benches/genai_bench.py).
    pub python: PathBuf,
}

impl Bench {
    /// A workload on `provider` over `--model`, its new tokens and threads, and the prompts.
    pub fn work<'a>(&'a self, provider: &'a str) -> Workload<'a> {
        self.work_on(&self.model, provider)
    }

    /// `work` on another model.
    pub fn work_on<'a>(&'a self, model: &'a Path, provider: &'a str) -> Workload<'a> {
        Workload { model, provider, new_tokens: self.new_tokens, threads: self.threads, prompts: &self.prompts_file }
    }
}

/// Runs every measuring child of a table `REPEATS` times, in rounds (each round runs all of them
/// once, so a change of load on this shared machine hits every row alike), and keeps each one's
/// run with the median decode speed: single runs vary widely (docs/performance.md, "How the
/// bench measures").
pub const REPEATS: usize = 3;

pub fn run_interleaved(mut cmds: Vec<Command>) -> Vec<Value> {
    run_rounds(&mut cmds, REPEATS)
        .into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a["decode_tps"].as_f64().unwrap().total_cmp(&b["decode_tps"].as_f64().unwrap()));
            r.swap_remove(REPEATS / 2)
        })
        .collect()
}

/// Every command's reports over `rounds` rounds. Each round starts at another row, so that no
/// row always runs first (or right after the same neighbour) on this shared machine.
pub fn run_rounds(cmds: &mut [Command], rounds: usize) -> Vec<Vec<Value>> {
    let n = cmds.len();
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); n];
    for round in 0..rounds {
        eprintln!("  round {}/{rounds}", round + 1);
        for i in (0..n).map(|i| (i + round) % n) {
            runs[i].push(run_once(&mut cmds[i]));
        }
    }
    runs
}

/// Runs a child to its end; its report is the last line it prints.
pub fn run_once(cmd: &mut Command) -> Value {
    let out = cmd.output().expect("spawn");
    if !out.status.success() {
        panic!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The int4 kernel an edgellm child reports (onnxruntime-genai's report none).
pub fn int4_kernel(report: &Value) -> Option<String> {
    report["int4_kernel"].as_str().map(str::to_string)
}

/// What a measured child of either engine runs on: model, provider, new tokens, intra-op threads
/// and prompts, the same for both.
pub struct Workload<'a> {
    pub model: &'a Path,
    pub provider: &'a str,
    pub new_tokens: usize,
    pub threads: usize,
    pub prompts: &'a Path,
}

impl Workload<'_> {
    /// edgellm: this bench's `--child` mode, with `launcher` (this binary, or valgrind before it).
    pub fn edgellm(&self, mut launcher: Command, weights: &str) -> Command {
        launcher.args(["--child", "--model"]).arg(self.model);
        launcher.args(["--provider", self.provider, "--new-tokens", &self.new_tokens.to_string()]);
        launcher.args(["--threads", &self.threads.to_string(), "--weights", weights]);
        launcher.arg("--prompts").arg(self.prompts);
        launcher
    }

    /// onnxruntime-genai: benches/genai_bench.py, with `launcher` (the venv's Python, or valgrind
    /// before it).
    pub fn genai(&self, mut launcher: Command) -> Command {
        launcher.arg(root().join("benches/genai_bench.py")).arg("--model").arg(self.model);
        launcher.args(["--provider", self.provider, "--new-tokens", &self.new_tokens.to_string()]);
        launcher.args(["--threads", &self.threads.to_string(), "--plugin"]);
        launcher.arg(root().join(".edgellm/runtime/libonnxruntime_providers_openvino_plugin.so"));
        launcher.arg("--prompts").arg(self.prompts);
        launcher
    }
}

/// One engine's measuring child in `--serve` mode: loaded once, it runs the prompt it is told to.
pub struct Server {
    cmd: Command,
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// What its ready line says of the int4 kernel (edgellm's children).
    pub int4_kernel: Option<String>,
}

impl Server {
    pub fn start(mut cmd: Command) -> Server {
        use std::process::Stdio;
        let mut child = cmd.arg("--serve").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn");
        let stdin = child.stdin.take();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut server = Server { cmd, child, stdin, stdout, int4_kernel: None };
        let ready = server.reply();
        assert_eq!(ready["ready"], true);
        server.int4_kernel = int4_kernel(&ready);
        server
    }

    fn reply(&mut self) -> Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{:?}: {e}: {line:?}", self.cmd))
    }

    pub fn run(&mut self, prompt: usize) -> Value {
        use std::io::Write;
        writeln!(self.stdin.as_mut().expect("running"), "{prompt}").expect("write");
        self.reply()
    }

    /// Closes its stdin, which ends it, and waits for it.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        self.child.wait().expect("wait");
    }
}

/// What `benches/weight_bytes.py` counts in a model folder: bytes a token reads, MLAS's packed
/// bytes, the file's bytes and the int4 weights.
pub fn weight_counts(python: &Path, model: &Path) -> Value {
    let out = Command::new(python).arg(root().join("benches/weight_bytes.py")).arg(model).output().expect("python");
    assert!(out.status.success(), "weight_bytes.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The weight files on disk (`*.onnx.data`) in MiB, against which resident memory is told.
pub fn weight_file_mib(model: &Path) -> f64 {
    let bytes: u64 = std::fs::read_dir(model)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".onnx.data"))
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0);
    bytes as f64 / (1024.0 * 1024.0)
}

/// A path as the tables show it: relative to the checkout where it is inside it.
pub fn shown(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// A model folder's name.
pub fn folder_name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().to_string()
}

/// A temporary file name of this process's for the children's inputs.
pub fn temp_file(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("edgellm-bench-{what}-{}.json", std::process::id()))
}
