//! How the time of one forward grows with the positions it runs after a 64-token past: a
//! speculative verify runs k+1 of them where plain decoding runs one. From it, the speed-up that
//! speculative decoding with a fixed k can reach over plain decoding, if each draft token is
//! accepted with probability `acceptance` (tokens per verify (1 - a^(k+1)) / (1 - a)). The draft
//! costs kjv-draft's measured one-token forward beside kjv-target, and an eighth of the model's
//! own one-token forward beside any other model (as in real pairs).

use std::path::{Path, PathBuf};
use std::time::Instant;

use edgellm::runtime::{Provider, Runtime, SessionOptions};
use serde::Serialize;

use crate::child::int4_choice;
use crate::harness::{folder_name, weight_counts};
use crate::kit::fixtures::model_dir;

/// The positions a forward is timed at.
pub const POSITIONS: [usize; 5] = [1, 2, 3, 5, 9];
const PAST: usize = 64;
const ROUNDS: usize = 40;

#[derive(Serialize, Debug)]
pub struct Record {
    pub acceptance: f64,
    pub positions: [usize; 5],
    pub rows: Vec<Row>,
    /// kjv-draft's one-token forward.
    pub draft_one_ms: f64,
    /// The int4 kernel's arithmetic floor (only where this core has AVX-512 VNNI).
    pub floor: Option<Floor>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub model: String,
    /// Median ms of a forward over each of `POSITIONS`.
    pub ms: Vec<f64>,
    /// Speculative ceilings for k = 4 and k = 8: tokens per verify x one-token ms / (verify ms +
    /// k x draft ms).
    pub ceiling_k4: f64,
    pub ceiling_k8: f64,
}

/// What one more position of a forward costs at least in edgellm's int4 kernel, from this core's
/// measured instruction rates, beside the slope measured. Per block of 32 weights in each of 16
/// rows (512 weights) and position the kernel issues 8 VNNI dot products, a multiply of the two
/// blocks' scales and a fused multiply-add (and a convert, which `vnni_rates` finds on other
/// pipes or not).
#[derive(Serialize, Debug)]
pub struct Floor {
    /// ns per 512-bit VNNI dot product (12 independent sums).
    pub vnni_ns: f64,
    /// ns per VNNI and FMA.
    pub vnni_fma_ns: f64,
    /// Whether the VNNI and the FMA share pipes.
    pub share_pipes: bool,
    pub cores: usize,
    pub rows: Vec<FloorRow>,
}

#[derive(Serialize, Debug)]
pub struct FloorRow {
    pub model: String,
    pub int4_weights: f64,
    /// One more position at least, at 10 such slots per 512 weights.
    pub floor_ms: f64,
    /// Measured: (9-position minus 5-position forward) / 4.
    pub slope_ms: f64,
}

pub fn measure(python: &Path, models: &[PathBuf], threads: usize, acceptance: f64) -> Record {
    eprintln!("forward cost by positions");
    let runtime = Runtime::load(None).expect("runtime");
    let session = SessionOptions { providers: vec![Provider::Cpu], strict: true, threads, int4: int4_choice(), ..Default::default() };
    let draft_one = forward_costs(&runtime, &model_dir("kjv-draft"), &session, &[1])[0];
    let tokens_per_verify = |k: i32| (1.0 - acceptance.powi(k + 1)) / (1.0 - acceptance);
    let mut slopes = Vec::new();
    let mut rows = Vec::new();
    for model in models {
        let costs = forward_costs(&runtime, model, &session, &POSITIONS);
        slopes.push((costs[4] - costs[3]) / 4.0);
        let one = costs[0];
        // kjv-draft drafts for kjv-target and its memory-bound twin.
        let draft = if model.to_string_lossy().contains("kjv-target") { draft_one } else { one / 8.0 };
        let ceiling = |k: i32, verify: f64| tokens_per_verify(k) * one / (verify + k as f64 * draft);
        rows.push(Row { model: folder_name(model), ceiling_k4: ceiling(4, costs[3]), ceiling_k8: ceiling(8, costs[4]), ms: costs });
    }
    let floor = vnni_rates().map(|(vnni_ns, vnni_fma_ns)| {
        let cores = if threads > 0 { threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
        let rows = models
            .iter()
            .zip(&slopes)
            .map(|(model, &slope_ms)| {
                let weights = weight_counts(python, model)["int4_weights"].as_f64().unwrap();
                // The multiply and the FMA take a VNNI's slot where they share its pipes.
                let slot = vnni_fma_ns / 2.0;
                let floor_ms = weights / 512.0 * 10.0 * slot / cores as f64 / 1e6;
                FloorRow { model: folder_name(model), int4_weights: weights, floor_ms, slope_ms }
            })
            .collect();
        Floor { vnni_ns, vnni_fma_ns, share_pipes: vnni_fma_ns > 1.5 * vnni_ns, cores, rows }
    });
    Record { acceptance, positions: POSITIONS, rows, draft_one_ms: draft_one, floor }
}

/// Nanoseconds per 512-bit VNNI (`vpdpbusd`) and per VNNI + FMA pair on one core, over twelve
/// independent accumulators (throughput, not latency); None without AVX-512 VNNI.
fn vnni_rates() -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512vnni") || !std::arch::is_x86_feature_detected!("avx512bw") {
            return None;
        }
        const STEPS: usize = 20_000_000;
        let time = |f: &dyn Fn() -> i64, ops: usize| {
            let started = Instant::now();
            std::hint::black_box(f());
            started.elapsed().as_secs_f64() * 1e9 / ops as f64
        };
        // SAFETY: the features were detected above.
        let vnni = time(&|| unsafe { vnni_loop(STEPS, false) }, STEPS * 12);
        // SAFETY: as above.
        let pair = time(&|| unsafe { vnni_loop(STEPS, true) }, STEPS * 12);
        Some((vnni, pair))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_loop(steps: usize, with_fma: bool) -> i64 {
    use std::arch::x86_64::*;
    let a = std::hint::black_box(_mm512_set1_epi8(3));
    let b = std::hint::black_box(_mm512_set1_epi8(5));
    let (x, y) = (std::hint::black_box(_mm512_set1_ps(0.999)), std::hint::black_box(_mm512_set1_ps(1e-3)));
    let mut sums = [_mm512_setzero_si512(); 12];
    let mut floats = [_mm512_setzero_ps(); 12];
    for _ in 0..steps {
        for sum in sums.iter_mut() {
            *sum = _mm512_dpbusd_epi32(*sum, a, b);
        }
        if with_fma {
            for f in floats.iter_mut() {
                *f = _mm512_fmadd_ps(*f, x, y);
            }
        }
    }
    let total = sums.iter().fold(_mm512_setzero_si512(), |t, s| _mm512_add_epi32(t, *s));
    let float = floats.iter().fold(_mm512_setzero_ps(), |t, f| _mm512_add_ps(t, *f));
    i64::from(_mm512_reduce_add_epi32(total)) + _mm512_reduce_add_ps(float) as i64
}

/// Median milliseconds of a forward over each number of `positions`, in rounds over all of them.
fn forward_costs(runtime: &Runtime, dir: &Path, session: &SessionOptions, positions: &[usize]) -> Vec<f64> {
    use edgellm::engine::{Decoder, KvLayout};
    let folder = edgellm::model::ModelFolder::open(dir).expect("model folder");
    let decoder = Decoder::load(runtime, dir, &folder.config, session).expect("load");
    let layout = if folder.config.search.past_present_share_buffer { KvLayout::Shared } else { KvLayout::Growing };
    let mut cache = decoder.new_cache(layout, PAST + 16).expect("cache");
    // Any ids will do: only the time is measured.
    let ids: Vec<u32> = (0..PAST).map(|i| (i * 37 % decoder.vocab()) as u32).collect();
    decoder.forward(&mut cache, &ids, 1).expect("prefill");
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); positions.len()];
    for round in 0..ROUNDS + 3 {
        for (i, &n) in positions.iter().enumerate() {
            let started = Instant::now();
            decoder.forward(&mut cache, &ids[..n], n).expect("forward");
            if round >= 3 {
                times[i].push(started.elapsed().as_secs_f64() * 1000.0);
            }
            cache.truncate(PAST).expect("roll back");
        }
    }
    times.into_iter().map(|mut t| crate::stats::median(&mut t)).collect()
}
