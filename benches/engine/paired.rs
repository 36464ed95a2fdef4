//! Decode speed and time to first token measured in pairs: both engines load once, then run the
//! same prompt one right after the other, alternating which goes first. Load on this shared
//! machine moves single runs widely over seconds; within a pair it hits both engines alike.

use std::path::Path;
use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use crate::harness::{Server, Workload};
use crate::stats::Spread;

/// The pause before each half of a pair. onnxruntime-genai's ONNX Runtime pool spins on after its
/// run, and a short pause let that spinning slow the start of edgellm's half (its TTFT most);
/// docs/performance.md, "How the bench measures", has the figures.
const PAIR_GAP: std::time::Duration = std::time::Duration::from_millis(150);

#[derive(Serialize, Debug)]
pub struct Record {
    pub provider: String,
    /// Prompts run by both engines in turn (rounds x prompts).
    pub pairs: usize,
    /// edgellm / onnxruntime-genai decode speed, per pair.
    pub decode_ratio: Spread,
    /// The share of pairs where edgellm decoded faster.
    pub edgellm_faster: f64,
    /// edgellm / onnxruntime-genai decode speed over all tokens.
    pub all_tokens_ratio: f64,
    /// edgellm / onnxruntime-genai time to first token, per pair.
    pub ttft_ratio: Spread,
    /// Pairs whose greedy outputs are identical.
    pub identical: usize,
    /// Decode speed over all tokens: [onnxruntime-genai, edgellm].
    pub decode_tps: [f64; 2],
    pub int4_kernel: Option<String>,
}

/// The paired rows of `work`: `rounds` rounds of `prompts` prompts.
pub fn measure(work: &Workload, me: &Path, python: &Path, prompts: usize, rounds: usize) -> Record {
    measure_probed(work, me, python, prompts, rounds, &mut || {}).0
}

/// `measure`, calling `before_pair` before each pair; also gives each pair's decode speeds
/// (genai, edgellm).
pub fn measure_probed(
    work: &Workload,
    me: &Path,
    python: &Path,
    prompts: usize,
    rounds: usize,
    before_pair: &mut dyn FnMut(),
) -> (Record, Vec<[f64; 2]>) {
    eprintln!("paired rows, {}: {rounds} rounds of {prompts} prompts", work.provider);
    let mut per_pair = Vec::new();
    let mut servers = [work.genai(Command::new(python)), work.edgellm(Command::new(me), "default")].map(Server::start);
    let (mut decode, mut ttft, mut identical) = (Vec::new(), Vec::new(), 0usize);
    let (mut decode_s, mut decoded) = ([0.0f64; 2], [0u64; 2]);
    for round in 0..rounds {
        for prompt in 0..prompts {
            let mut replies = [Value::Null, Value::Null];
            before_pair();
            let first = (round + prompt) % 2;
            for engine in [first, 1 - first] {
                // Let the other engine's ONNX Runtime pool stop spinning before this one starts.
                std::thread::sleep(PAIR_GAP);
                replies[engine] = servers[engine].run(prompt);
            }
            let f = |r: &Value, k: &str| r[k].as_f64().unwrap();
            for (i, r) in replies.iter().enumerate() {
                decode_s[i] += f(r, "decode_s");
                decoded[i] += r["decoded"].as_u64().unwrap();
            }
            let tps = |r: &Value| f(r, "decoded") / f(r, "decode_s");
            per_pair.push([tps(&replies[0]), tps(&replies[1])]);
            decode.push(tps(&replies[1]) / tps(&replies[0]));
            ttft.push(f(&replies[1], "ttft_s") / f(&replies[0], "ttft_s"));
            identical += usize::from(replies[0]["output"] == replies[1]["output"]);
        }
    }
    let int4_kernel = servers[1].int4_kernel.clone();
    servers.into_iter().for_each(Server::finish);
    let faster = decode.iter().filter(|&&r| r > 1.0).count() as f64 / decode.len() as f64;
    let tps = [decoded[0] as f64 / decode_s[0], decoded[1] as f64 / decode_s[1]];
    let record = Record {
        provider: work.provider.to_string(),
        pairs: decode.len(),
        decode_ratio: Spread::of(&mut decode),
        edgellm_faster: faster,
        all_tokens_ratio: tps[1] / tps[0],
        ttft_ratio: Spread::of(&mut ttft),
        identical,
        decode_tps: tps,
        int4_kernel,
    };
    (record, per_pair)
}
