//! Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p and a
//! repetition penalty, from a seeded generator so that a seed reproduces the text.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Per-request sampling parameters, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// 1 means no penalty.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// The index of the largest value; the first of equals (as onnxruntime-genai's greedy search).
/// NaN is never chosen; with nothing above -inf it is 0. Two passes the compiler can vectorise
/// (the largest value in eight lanes, then the first block of 16 that holds it): one value at a
/// time, the scan cost 7 instructions per logit, the largest share of a greedy step outside ONNX
/// Runtime.
pub fn argmax(values: &[f32]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(lanes.len());
    for &v in chunks.remainder() {
        lanes[0] = if v > lanes[0] { v } else { lanes[0] };
    }
    for chunk in chunks {
        for (best, &v) in lanes.iter_mut().zip(chunk) {
            *best = if v > *best { v } else { *best };
        }
    }
    let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    const BLOCK: usize = 16;
    for (b, block) in values.chunks(BLOCK).enumerate() {
        if block.iter().fold(false, |hit, &v| hit | (v == max)) {
            return b * BLOCK + block.iter().position(|&v| v == max).expect("the block holds it");
        }
    }
    unreachable!("the largest value is in the slice")
}

/// Penalise tokens already seen (the CTRL rule, as transformers and onnxruntime-genai apply it).
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            if done.insert(id) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// The distribution sampling draws from: softmax(logits / temperature) restricted to the top-k
/// tokens and then to the smallest set whose mass reaches top_p, renormalised. Speculative
/// decoding applies the same function to draft and target.
pub fn distribution(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let t = params.temperature.max(1e-6);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    let need_order = params.top_k > 0 && params.top_k < probs.len() || params.top_p < 1.0;
    if need_order {
        order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut keep = if params.top_k > 0 { params.top_k.min(probs.len()) } else { probs.len() };
        if params.top_p < 1.0 {
            let total: f32 = order[..keep].iter().map(|&i| probs[i]).sum();
            let mut acc = 0.0;
            for (n, &i) in order[..keep].iter().enumerate() {
                acc += probs[i] / total;
                if acc >= params.top_p {
                    keep = n + 1;
                    break;
                }
            }
        }
        for &i in &order[keep..] {
            probs[i] = 0.0;
        }
    }
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    probs
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// A uniform number in [0, 1), from the request's seeded stream.
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Draws an index from a normalised distribution.
    pub fn draw(&mut self, probs: &[f32]) -> usize {
        let u = self.uniform();
        let mut acc = 0.0;
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                acc += p;
                last_nonzero = i;
                if u < acc {
                    return i;
                }
            }
        }
        last_nonzero // rounding left `acc` just under `u`
    }

    /// The next token for `logits` (modified in place by the repetition penalty).
    pub fn next(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        apply_repetition_penalty(logits, seen, self.params.repetition_penalty);
        if self.params.is_greedy() {
            return argmax(logits) as u32;
        }
        let probs = distribution(logits, &self.params);
        self.draw(&probs) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed: 7 }
    }

    #[test]
    fn top_k_keeps_exactly_k_most_likely() {
        let logits = [0.1, 3.0, 2.0, -1.0, 2.5];
        let p = distribution(&logits, &params(1.0, 2, 1.0));
        let kept: Vec<usize> = p.iter().enumerate().filter(|(_, &x)| x > 0.0).map(|(i, _)| i).collect();
        assert_eq!(kept, vec![1, 4]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_mass() {
        // softmax of ln(0.5), ln(0.3), ln(0.2) = 0.5, 0.3, 0.2
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let p = distribution(&logits, &params(1.0, 0, 0.7));
        assert!(p[0] > 0.0 && p[1] > 0.0 && p[2] == 0.0, "{p:?}");
        assert!((p[0] - 0.625).abs() < 1e-4);
        let p = distribution(&logits, &params(1.0, 0, 0.5));
        assert_eq!(p, vec![1.0, 0.0, 0.0]);
    }

    /// The first index of the largest value, one at a time: what `argmax` must equal.
    fn argmax_one_by_one(values: &[f32]) -> usize {
        let (mut best, mut best_value) = (0, f32::NEG_INFINITY);
        for (i, &v) in values.iter().enumerate() {
            if v > best_value {
                (best, best_value) = (i, v);
            }
        }
        best
    }

    #[test]
    fn argmax_is_the_first_of_the_largest() {
        let mut rng = StdRng::seed_from_u64(3);
        // Few distinct values, so ties are common; NaN and -inf among them.
        let pool = [0.0, 1.0, -1.0, 2.0, f32::NAN, f32::NEG_INFINITY, 2.0, 0.5];
        for len in 0..70 {
            for _ in 0..50 {
                let values: Vec<f32> = (0..len).map(|_| pool[rng.random_range(0..pool.len())]).collect();
                assert_eq!(argmax(&values), argmax_one_by_one(&values), "{values:?}");
            }
        }
        for special in [f32::NAN, f32::NEG_INFINITY] {
            assert_eq!(argmax(&[special; 19]), 0);
        }
        let logits: Vec<f32> = (0..4096).map(|i| ((i * 7919 % 4096) as f32).sin()).collect();
        assert_eq!(argmax(&logits), argmax_one_by_one(&logits));
    }

    #[test]
    fn temperature_near_zero_equals_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 50) as f32) * 0.1).collect();
        let want = argmax(&logits) as u32;
        let mut s = Sampler::new(params(1e-4, 0, 1.0));
        for _ in 0..20 {
            assert_eq!(s.next(&mut logits.clone(), &[]), want);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [1.0f32.ln(), 3.0f32.ln()]; // 0.25, 0.75
        let mut s = Sampler::new(params(1.0, 0, 1.0));
        let n = 20000;
        let ones = (0..n).filter(|_| s.next(&mut logits.clone(), &[]) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.75).abs() < 0.015, "{f}");
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params(1.0, 0, 1.0) });
            (0..30).map(|_| s.next(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn repetition_penalty_lowers_seen_tokens() {
        let mut logits = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 0], 2.0);
        assert_eq!(logits, vec![1.0, -4.0, 1.0]);
    }
}
