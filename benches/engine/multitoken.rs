//! The HAMburger-style model (`--hamburger`: kjv-hamburger, or its memory-bound twin) in both
//! modes at each threshold, against plain decoding of its own base (one token per step) and of
//! `--model`.

use std::path::Path;
use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use crate::harness::{folder_name, int4_kernel, run_interleaved, Bench};

#[derive(Serialize, Debug)]
pub struct Record {
    pub hamburger: String,
    pub target: String,
    pub rows: Vec<Row>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub decoding: String,
    pub decode_tps: f64,
    pub tokens_per_base_forward: f64,
    /// KV entries stored per generated token.
    pub kv_per_token: f64,
    pub x_base: f64,
    pub x_target: f64,
    /// The model's own loss (nats/token) on the text it generated (the target's row: the
    /// target's own).
    pub base_nll: f64,
    /// Whether the greedy outputs are the base alone's.
    pub same_text: bool,
    /// Micro steps' share of the generation time.
    pub micro_pct: f64,
    pub int4_kernel: Option<String>,
}

pub fn measure(bench: &Bench, hamburger: &Path, thresholds: &[String]) -> Record {
    let target = &bench.model;
    let ours = |model: &Path, multitoken: Option<&str>| {
        let mut cmd = bench.work_on(model, "cpu").edgellm(Command::new(&bench.me), "default");
        cmd.arg("--nll");
        if let Some(m) = multitoken {
            cmd.args(["--multitoken", m]);
        }
        cmd
    };
    let target_name = folder_name(target);
    let mut labels = vec![format!("{target_name} plain"), "base alone (1 token/step)".to_string()];
    let mut cmds = vec![ours(target, None), ours(hamburger, Some("trust:1"))];
    for threshold in thresholds {
        for mode in ["trust", "verify"] {
            labels.push(format!("{mode} @ {threshold}"));
            cmds.push(ours(hamburger, Some(&format!("{mode}:{threshold}"))));
        }
    }
    // Verify mode's default: lengths by what the micro tokens are worth (decode::draft_length).
    labels.push("verify by cost (default)".to_string());
    cmds.push(ours(hamburger, Some("verify")));
    eprintln!("multi-token steps");
    let reports: Vec<(String, Value)> = labels.into_iter().zip(run_interleaved(cmds)).collect();
    let (target_plain, base_plain) = (&reports[0].1, &reports[1].1);
    let base_tps = base_plain["decode_tps"].as_f64().unwrap();
    let target_tps = target_plain["decode_tps"].as_f64().unwrap();
    let rows = reports
        .iter()
        .map(|(label, r)| {
            let tps = r["decode_tps"].as_f64().unwrap();
            Row {
                decoding: label.clone(),
                decode_tps: tps,
                tokens_per_base_forward: r["tokens_per_target_forward"].as_f64().unwrap_or(0.0),
                kv_per_token: r["kv_per_token"].as_f64().unwrap_or(0.0),
                x_base: tps / base_tps,
                x_target: tps / target_tps,
                base_nll: r["nll"].as_f64().unwrap_or(0.0),
                same_text: r["outputs"] == base_plain["outputs"],
                micro_pct: 100.0 * r["micro_ms"].as_f64().unwrap_or(0.0) / r["total_ms"].as_f64().unwrap(),
                int4_kernel: int4_kernel(r),
            }
        })
        .collect();
    Record { hamburger: folder_name(hamburger), target: target_name, rows }
}
