//! Instructions per decoded token of each engine, counted by callgrind: repeatable where wall time
//! on these shared machines is not, and valgrind's CPUID says GenuineIntel, so the OpenVINO plugin
//! offers its CPU device under it even on an AMD CPU. Each engine generates for one prompt (after
//! a warm-up run of it) at two lengths; the difference in instructions over the difference in
//! tokens is the cost of one decode step, with loading and prefill cancelled out. One intra-op
//! thread in both (valgrind runs threads one at a time, and idle pools spin).

use std::path::Path;
use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use crate::cli::EngineProvider;
use crate::harness::{shown, temp_file, Bench, Workload};

const LENGTHS: [usize; 2] = [16, 64];
const WORK_REPEATS: usize = 3;

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    /// The two generation lengths whose difference is counted.
    pub lengths: [usize; 2],
    /// Counts per length; the median is kept.
    pub repeats: usize,
    pub rows: Vec<Row>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub provider: String,
    /// Instructions per decoded token.
    pub genai: f64,
    pub edgellm: f64,
}

pub fn measure(bench: &Bench, providers: &[EngineProvider]) -> Record {
    let prompt_file = temp_file("prompt");
    std::fs::write(&prompt_file, serde_json::to_string(&bench.prompts[..1]).unwrap()).unwrap();
    let rows = providers.iter().map(|p| provider_row(bench, p.name(), &prompt_file)).collect();
    let _ = std::fs::remove_file(&prompt_file);
    Record { model: shown(&bench.model), lengths: LENGTHS, repeats: WORK_REPEATS, rows }
}

fn callgrind(program: &Path) -> Command {
    let mut cmd = Command::new("valgrind");
    cmd.args(["--tool=callgrind", "--callgrind-out-file=/dev/null"]).arg(program);
    cmd
}

/// The instructions callgrind collected, and the tokens the measured (second) run generated.
fn count(mut cmd: Command) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let out = cmd.output().expect("valgrind (Debian's valgrind package)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd:?}: {stderr}");
        let collected = stderr
            .lines()
            .find_map(|l| l.split_once("Collected :").map(|(_, n)| n.trim().parse::<u64>().unwrap()))
            .unwrap_or_else(|| panic!("no callgrind total in: {stderr}"));
        let report: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        (collected, report["tokens"].as_u64().unwrap())
    })
}

fn provider_row(bench: &Bench, provider: &str, prompt_file: &Path) -> Row {
    eprintln!("work per token, {provider} (callgrind)");
    let per_token: Vec<f64> = ["genai", "edgellm"]
        .iter()
        .map(|engine| {
            let command = |new_tokens: usize| {
                let work = Workload { model: &bench.model, provider, new_tokens, threads: 1, prompts: prompt_file };
                if *engine == "genai" {
                    let mut python = callgrind(&bench.python);
                    python.env("OPENBLAS_NUM_THREADS", "1"); // numpy's BLAS pool would spin under valgrind
                    work.genai(python)
                } else {
                    work.edgellm(callgrind(&bench.me), "default")
                }
            };
            // Both lengths at once (valgrind keeps to one core), WORK_REPEATS times; the
            // median count of each length (a rare run of onnxruntime-genai counts more).
            let mut counts: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
            for _ in 0..WORK_REPEATS {
                let handles = LENGTHS.map(|n| count(command(n)));
                for (runs, handle) in counts.iter_mut().zip(handles) {
                    runs.push(handle.join().unwrap());
                }
            }
            let [(short_instr, short_tokens), (long_instr, long_tokens)] = counts.map(|mut runs| {
                runs.sort();
                runs[runs.len() / 2]
            });
            assert!(long_tokens > short_tokens, "{engine}: the prompt ended before {} tokens", LENGTHS[0]);
            // Each run generates the prompt twice (the warm-up and the measured run).
            (long_instr as f64 - short_instr as f64) / (2 * (long_tokens - short_tokens)) as f64
        })
        .collect();
    Row { provider: provider.into(), genai: per_token[0], edgellm: per_token[1] }
}
