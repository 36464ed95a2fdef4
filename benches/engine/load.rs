//! Loading alone, each engine in a new process per load: edgellm (its default, edgellm's own map
//! of the weights), edgellm with ONNX Runtime reading the file, and onnxruntime-genai, in
//! `rounds` rounds whose order rotates. Medians of the time to a loaded model and of the peak
//! resident memory the load added (VmHWM), against the weight files on disk.

use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use crate::harness::{int4_kernel, run_rounds, shown, weight_file_mib, Bench, Workload};
use crate::stats::{median, Spread};

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    pub rounds: usize,
    pub weight_mib: f64,
    pub rows: Vec<Row>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub engine: String,
    pub load_s: f64,
    pub load_rss_mib: f64,
    /// The load and the first token of the first prompt.
    pub ready_s: Spread,
    pub x_genai_ready: f64,
    /// Peak RSS by the first token.
    pub peak_rss_mib: f64,
    pub x_weights: f64,
    pub x_genai_peak: f64,
    pub int4_kernel: Option<String>,
}

pub fn measure(bench: &Bench, rounds: usize) -> Record {
    let work = Workload { new_tokens: 1, ..bench.work("cpu") };
    let mut cmds = [
        work.edgellm(Command::new(&bench.me), "default"),
        work.edgellm(Command::new(&bench.me), "file"),
        work.genai(Command::new(&bench.python)),
    ];
    for cmd in &mut cmds {
        cmd.arg("--load-only");
    }
    let labels = ["edgellm", "edgellm (ORT file)", "onnxruntime-genai"];
    eprintln!("loading: {rounds} rounds");
    let runs = run_rounds(&mut cmds, rounds);
    let weight_mib = weight_file_mib(&bench.model);
    let column = |runs: &[Value], key: &str| -> Vec<f64> { runs.iter().map(|r| r[key].as_f64().unwrap()).collect() };
    let genai_ready = median(&mut column(&runs[2], "ready_s"));
    let genai_peak = median(&mut column(&runs[2], "rss_ready_mib"));
    let rows = labels
        .iter()
        .zip(&runs)
        .map(|(label, runs)| {
            let ready = Spread::of(&mut column(runs, "ready_s"));
            let peak = median(&mut column(runs, "rss_ready_mib"));
            Row {
                engine: label.to_string(),
                load_s: median(&mut column(runs, "load_s")),
                load_rss_mib: median(&mut column(runs, "rss_load_mib")),
                ready_s: ready,
                x_genai_ready: ready.median / genai_ready,
                peak_rss_mib: peak,
                x_weights: peak / weight_mib,
                x_genai_peak: peak / genai_peak,
                int4_kernel: runs.first().and_then(int4_kernel),
            }
        })
        .collect();
    Record { model: shown(&bench.model), rounds, weight_mib, rows }
}
