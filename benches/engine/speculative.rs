//! Plain and speculative decoding of the committed pair, ours and onnxruntime-genai's.
//! `--model` with kjv-draft: kjv-target, or its memory-bound twin (`models/build.sh --xl` writes
//! the twin and onnxruntime-genai's folder of the pair, kjv-speculative-xl, beside it).

use std::path::Path;
use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use crate::harness::{folder_name, int4_kernel, run_interleaved, Bench};
use crate::kit::fixtures::model_dir;

#[derive(Serialize, Debug)]
pub struct Record {
    pub target: String,
    pub draft: String,
    pub rows: Vec<Row>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub engine: String,
    pub decode_tps: f64,
    pub acceptance: f64,
    pub tokens_per_target_forward: f64,
    pub x_our_plain: f64,
    pub x_genai_spec: f64,
    /// Prompts whose greedy output equals our plain decoding's ("same/of"; the tests check that
    /// the others part at a near tie).
    pub same_as_plain: String,
    /// Where the time of our speculative runs goes.
    pub time: Option<TimeShare>,
    pub int4_kernel: Option<String>,
}

/// Shares of the total generation time, and the near-tie re-decisions.
#[derive(Serialize, Debug)]
pub struct TimeShare {
    pub draft_pct: f64,
    pub verify_pct: f64,
    /// Prefill, sampling and bookkeeping.
    pub rest_pct: f64,
    pub near_tie_recomputes: u64,
    pub target_forwards: u64,
    /// Re-decisions inside a round, its rows after kept.
    pub near_ties_inside: u64,
    /// The near-tie margin at the end.
    pub tie_margin: f64,
}

pub fn measure(bench: &Bench) -> Record {
    let target = &bench.model;
    let draft = model_dir("kjv-draft");
    let pair = if target.ends_with("kjv-target-xl") { target.with_file_name("kjv-speculative-xl") } else { model_dir("kjv-speculative") };
    // k: the most drafts a round holds; "acceptance": lengths by acceptance alone (AdaptiveK)
    // instead of edgellm's default, by what drafts are worth here (decode::draft_length::CostModel).
    let ours = |draft: Option<&Path>, k: &str| {
        let mut cmd = bench.work("cpu").edgellm(Command::new(&bench.me), "default");
        cmd.args(["--k", k.trim_end_matches("acceptance")]);
        if k.ends_with("acceptance") {
            cmd.arg("--by-acceptance");
        }
        if let Some(d) = draft {
            cmd.arg("--draft").arg(d);
        }
        cmd
    };
    let genai = |model: &Path, spec: bool| {
        let mut cmd = bench.work_on(model, "cpu").genai(Command::new(&bench.python));
        if spec {
            cmd.arg("--speculative");
        }
        cmd
    };
    let labels = [
        "edgellm plain",
        "edgellm spec k<=8",
        "edgellm k<=16",
        "by acceptance k<=8",
        "by acceptance k<=4",
        "genai plain",
        "genai spec k=4",
    ];
    let cmds = vec![
        ours(None, "8"),
        ours(Some(&draft), "8"),
        ours(Some(&draft), "16"),
        ours(Some(&draft), "8acceptance"),
        ours(Some(&draft), "4acceptance"),
        genai(target, false),
        genai(&pair, true),
    ];
    eprintln!("speculative decoding");
    let reports: Vec<(&str, Value)> = labels.into_iter().zip(run_interleaved(cmds)).collect();
    let plain = &reports[0].1;
    let genai_spec = reports[6].1["decode_tps"].as_f64().unwrap();
    let rows = reports.iter().map(|(label, r)| row(label, r, plain, genai_spec)).collect();
    Record { target: folder_name(target), draft: folder_name(&draft), rows }
}

/// A row of `r`, against our plain decoding and onnxruntime-genai's speculative decode speed.
fn row(label: &str, r: &Value, plain: &Value, genai_spec: f64) -> Row {
    let tps = r["decode_tps"].as_f64().unwrap();
    let speculative = !label.starts_with("genai") && label != "edgellm plain";
    let time = speculative.then(|| {
        let total = r["total_ms"].as_f64().unwrap();
        let (draft, verify) = (r["draft_ms"].as_f64().unwrap(), r["verify_ms"].as_f64().unwrap());
        TimeShare {
            draft_pct: 100.0 * draft / total,
            verify_pct: 100.0 * verify / total,
            rest_pct: 100.0 * (total - draft - verify) / total,
            near_tie_recomputes: r["near_tie_recomputes"].as_u64().unwrap_or(0),
            target_forwards: r["target_forwards"].as_u64().unwrap_or(0),
            near_ties_inside: r["near_ties_inside"].as_u64().unwrap_or(0),
            tie_margin: r["tie_margin"].as_f64().unwrap_or(0.0),
        }
    });
    // Prompts whose greedy output equals our plain decoding's.
    let same_as_plain = match (r["outputs"].as_array(), plain["outputs"].as_array()) {
        (Some(a), Some(b)) => format!("{}/{}", a.iter().zip(b).filter(|(x, y)| x == y).count(), b.len()),
        _ => "-".into(),
    };
    Row {
        engine: label.to_string(),
        decode_tps: tps,
        acceptance: r["acceptance_rate"].as_f64().unwrap_or(0.0),
        tokens_per_target_forward: r["tokens_per_target_forward"].as_f64().unwrap_or(0.0),
        x_our_plain: tps / plain["decode_tps"].as_f64().unwrap(),
        x_genai_spec: tps / genai_spec,
        same_as_plain,
        time,
        int4_kernel: int4_kernel(r),
    }
}
