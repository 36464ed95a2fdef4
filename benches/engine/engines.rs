//! The first table: each engine in its own process on the same model, prompts and threads (load
//! time, load RSS, time to first token, decode speed), with ratios edgellm / onnxruntime-genai;
//! then each provider's paired rows.

use std::process::Command;

use edgellm::runtime::Runtime;
use serde::Serialize;
use serde_json::Value;

use crate::cli::EngineProvider;
use crate::harness::{int4_kernel, run_interleaved, shown, weight_file_mib, Bench};
use crate::paired;

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    pub prompts: usize,
    pub new_tokens: usize,
    /// Intra-op threads in both (0: ONNX Runtime's default).
    pub threads: usize,
    /// The weight files on disk (model.onnx.data), against which load RSS is told.
    pub weight_mib: f64,
    pub providers: Vec<ProviderRows>,
}

#[derive(Serialize, Debug)]
pub struct ProviderRows {
    pub provider: String,
    /// Why the provider was not measured.
    pub skipped: Option<String>,
    /// onnxruntime-genai, edgellm, and on the CPU edgellm with ONNX Runtime reading the file.
    pub rows: Vec<Row>,
    /// edgellm / onnxruntime-genai of each column (want decode >= 1, TTFT <= 1).
    pub ratio: Option<Ratio>,
    /// Whether edgellm's greedy outputs are onnxruntime-genai's.
    pub identical: Option<bool>,
    pub paired: Option<paired::Record>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub engine: String,
    pub load_s: f64,
    pub rss_load_mib: f64,
    pub ttft_ms: f64,
    pub decode_tps: f64,
    pub e2e_tps: f64,
    pub rss_peak_mib: f64,
    /// Load RSS against the weight files.
    pub x_weights: Option<f64>,
    pub int4_kernel: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct Ratio {
    pub load_s: f64,
    pub rss_load_mib: f64,
    pub ttft_ms: f64,
    pub decode_tps: f64,
    pub e2e_tps: f64,
}

pub fn measure(bench: &Bench, providers: &[EngineProvider], pair_rounds: usize) -> Record {
    let weight_mib = weight_file_mib(&bench.model);
    let mut results = Vec::new();
    for provider in providers.iter().map(|p| p.name()) {
        if provider == "openvino" {
            let runtime = Runtime::load(None).expect("runtime");
            if !runtime.openvino_device_types().iter().any(|t| t == "CPU") {
                let skipped = format!(
                    "the OpenVINO plugin offers no CPU device here (CPU vendor {:?}); --work-per-token openvino counts its work under valgrind",
                    runtime.cpu_vendor()
                );
                results.push(ProviderRows {
                    provider: provider.into(),
                    skipped: Some(skipped),
                    rows: vec![],
                    ratio: None,
                    identical: None,
                    paired: None,
                });
                continue;
            }
        }
        eprintln!("engines, {provider}");
        let work = bench.work(provider);
        let mut cmds = vec![work.genai(Command::new(&bench.python)), work.edgellm(Command::new(&bench.me), "default")];
        if provider == "cpu" {
            cmds.push(work.edgellm(Command::new(&bench.me), "file"));
        }
        let reports = run_interleaved(cmds);
        let (genai, edgellm) = (&reports[0], &reports[1]);
        let row = |engine: &str, r: &Value| {
            let f = |k: &str| r[k].as_f64().unwrap();
            Row {
                engine: engine.into(),
                load_s: f("load_s"),
                rss_load_mib: f("rss_load_mib"),
                ttft_ms: f("ttft_ms"),
                decode_tps: f("decode_tps"),
                e2e_tps: f("e2e_tps"),
                rss_peak_mib: f("rss_peak_mib"),
                x_weights: (weight_mib > 0.0).then(|| f("rss_load_mib") / weight_mib),
                int4_kernel: int4_kernel(r),
            }
        };
        let mut rows = vec![row("onnxruntime-genai", genai), row("edgellm", edgellm)];
        if let Some(file) = reports.get(2) {
            rows.push(row("edgellm (ORT file)", file));
        }
        let ratio = |k: &str| edgellm[k].as_f64().unwrap() / genai[k].as_f64().unwrap();
        let ratio = Ratio {
            load_s: ratio("load_s"),
            rss_load_mib: ratio("rss_load_mib"),
            ttft_ms: ratio("ttft_ms"),
            decode_tps: ratio("decode_tps"),
            e2e_tps: ratio("e2e_tps"),
        };
        let identical = edgellm["outputs"] == genai["outputs"];
        let paired = (pair_rounds > 0).then(|| paired::measure(&work, &bench.me, &bench.python, bench.prompts.len(), pair_rounds));
        results.push(ProviderRows {
            provider: provider.into(),
            skipped: None,
            rows,
            ratio: Some(ratio),
            identical: Some(identical),
            paired,
        });
    }
    Record {
        model: shown(&bench.model),
        prompts: bench.prompts.len(),
        new_tokens: bench.new_tokens,
        threads: bench.threads,
        weight_mib,
        providers: results,
    }
}
