//! Plain decoding against the memory bound: weight bytes per token x tokens/s / bandwidth, for
//! edgellm and onnxruntime-genai on the same folder. The bandwidth moves with the load on a
//! shared host, so it is measured again before each pair of the paired rounds, and each pair's
//! fraction is taken against the bandwidth measured just before it.

use std::time::Instant;

use edgellm::runtime::Int4Choice;
use serde::Serialize;

use crate::child::int4_choice;
use crate::harness::{shown, weight_counts, Bench};
use crate::paired;
use crate::stats::Spread;

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    /// Threads of the bandwidth reading (one per core).
    pub cores: usize,
    /// Read bandwidth before each pair (over 1 GiB, best of 3), GB/s.
    pub bandwidth_gbs: Spread,
    pub bandwidth_min_gbs: f64,
    pub bandwidth_max_gbs: f64,
    /// Weights read per token, as counted from the graph; the weight file; what MLAS's packed
    /// int8-compute layout reads (MB).
    pub per_token_mb: f64,
    pub file_mb: f64,
    pub mlas_mb: f64,
    pub rounds: usize,
    pub prompts: usize,
    pub rows: Vec<Row>,
    pub paired: paired::Record,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub engine: String,
    pub decode_tps: f64,
    pub weight_gbs: f64,
    /// Per pair: the model's bytes per token x tokens/s over the bandwidth read before it.
    pub fraction_of_bound: Spread,
    /// The same with the bytes this engine's int4 kernel reads.
    pub of_what_it_reads: Spread,
}

/// The machine's read bandwidth in bytes/s: every core sums its share of `buffer` (1 GiB, far
/// larger than the caches); the best of `passes` passes.
fn read_bandwidth(buffer: &[u64], passes: usize) -> (f64, usize) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = buffer.len().div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..passes {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> =
                buffer.chunks(chunk).map(|part| s.spawn(move || part.iter().fold(0u64, |a, &b| a.wrapping_add(b)))).collect();
            parts.into_iter().map(|p| p.join().unwrap()).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (std::mem::size_of_val(buffer) as f64 / best, threads)
}

pub fn measure(bench: &Bench, rounds: usize) -> Record {
    let buffer: Vec<u64> = (0..(1u64 << 30) / 8).collect();
    let bytes = weight_counts(&bench.python, &bench.model);
    let per_token = bytes["per_token_bytes"].as_f64().unwrap();
    let mlas = bytes["mlas_bytes"].as_f64().unwrap();
    let work = bench.work("cpu");
    let mut bandwidths = Vec::new();
    let mut cores = 0;
    let (paired, pairs) = paired::measure_probed(&work, &bench.me, &bench.python, bench.prompts.len(), rounds, &mut || {
        let (bandwidth, threads) = read_bandwidth(&buffer, 3);
        bandwidths.push(bandwidth);
        cores = threads;
    });
    let overall = paired.decode_tps;
    let (lo, hi) = bandwidths.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    // What each engine's int4 kernel reads per token: MLAS its packed layout, edgellm's own kernel
    // its packed copy, as many bytes as the model's (src/runtime/int4.rs).
    // (the bound's model is memory-bound: `auto` runs edgellm's kernel on it)
    let edgellm_kernel = edgellm::runtime::int4_supported() && int4_choice() != Int4Choice::OnnxRuntime;
    let reads = [mlas, if edgellm_kernel { per_token } else { mlas }];
    let rows = ["onnxruntime-genai", "edgellm"]
        .into_iter()
        .enumerate()
        .map(|(i, label)| {
            let fractions = |bytes: f64| -> Vec<f64> { pairs.iter().zip(&bandwidths).map(|(tps, bw)| bytes * tps[i] / bw).collect() };
            Row {
                engine: label.into(),
                decode_tps: overall[i],
                weight_gbs: per_token * overall[i] / 1e9,
                fraction_of_bound: Spread::of(&mut fractions(per_token)),
                of_what_it_reads: Spread::of(&mut fractions(reads[i])),
            }
        })
        .collect();
    let gbs = |b: f64| b / 1e9;
    Record {
        model: shown(&bench.model),
        cores,
        bandwidth_gbs: Spread::of(&mut bandwidths.iter().map(|&b| gbs(b)).collect::<Vec<_>>()),
        bandwidth_min_gbs: gbs(lo),
        bandwidth_max_gbs: gbs(hi),
        per_token_mb: per_token / 1e6,
        file_mb: bytes["file_bytes"].as_f64().unwrap() / 1e6,
        mlas_mb: mlas / 1e6,
        rounds,
        prompts: bench.prompts.len(),
        rows,
        paired,
    }
}
