//! The verifier: how the target's rows of logits judge proposed tokens. One rule for every
//! proposer (a draft model, prompt lookup, a multi-token micro decoder):
//! - greedy: accept while the proposal is the target's argmax, with a guard for near ties
//!   (a batched forward can differ from a single-token one by a few hundredths of a logit);
//! - sampled: the rejection rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023),
//!   which keeps the target's distribution whatever the proposal's.
//!
//! Pure functions over logits, tested on their own; and `greedy_verdict`, which re-decides a
//! near tie with a one-token forward of the target, as plain decoding decides it.

use super::run::{Run, SpeculativeStats};
use super::sampler::{apply_repetition_penalty, argmax, distribution, Sampler, SamplingParams};
use super::target::Target;

use crate::error::Result;

#[derive(Debug, PartialEq, Eq)]
pub enum GreedyVerdict {
    /// (accepted drafts, the target's next token)
    Decided(usize, u32),
    /// Row `at` is too close to call from a batched forward.
    NearTie(usize),
}

fn top_two_gap(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in row {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// The greedy rule: accept while the draft's token is the target's argmax. `target_rows` holds
/// k+1 rows of logits (after the last accepted token, then after each draft token). Stops at the
/// first row whose decision is within `margin` of a tie.
pub fn verify_greedy_guarded(target_rows: &[Vec<f32>], drafts: &[u32], margin: f32) -> GreedyVerdict {
    for (i, row) in target_rows.iter().enumerate().take(drafts.len() + 1) {
        if top_two_gap(row) < margin {
            return GreedyVerdict::NearTie(i);
        }
        let best = argmax(row) as u32;
        if i == drafts.len() || best != drafts[i] {
            return GreedyVerdict::Decided(i, best);
        }
    }
    unreachable!("the loop returns at row drafts.len()")
}

/// The sampling rule: accept draft token d_i with probability min(1, p_i(d_i) / q_i(d_i)); on
/// the first rejection draw from normalize(max(0, p_i - q_i)); when all are accepted draw the
/// bonus token from p_k. `p` and `q` are the target's and the draft's distributions after the
/// same temperature/top-k/top-p (k+1 rows of p, k rows of q).
pub fn verify_sampled(p: &[Vec<f32>], q: &[Vec<f32>], drafts: &[u32], sampler: &mut Sampler) -> (usize, u32) {
    for (i, &d) in drafts.iter().enumerate() {
        let (pd, qd) = (p[i][d as usize], q[i][d as usize]);
        let u = sampler.uniform();
        if qd > 0.0 && u < (pd / qd).min(1.0) {
            continue;
        }
        let mut residual: Vec<f32> = p[i].iter().zip(&q[i]).map(|(a, b)| (a - b).max(0.0)).collect();
        let total: f32 = residual.iter().sum();
        if total <= 0.0 {
            // p == q up to rounding: the residual is empty, and p itself is the right law.
            return (i, sampler.draw(&p[i]) as u32);
        }
        residual.iter_mut().for_each(|r| *r /= total);
        return (i, sampler.draw(&residual) as u32);
    }
    (drafts.len(), sampler.draw(&p[drafts.len()]) as u32)
}

/// Each verified row, transformed with the tokens before it: row i follows `sequence` and
/// `drafts[..i]` (the repetition penalty must see them as plain decoding would).
fn rows_in_context(rows: &[Vec<f32>], sequence: &[u32], drafts: &[u32], f: impl Fn(&[f32], &[u32]) -> Vec<f32>) -> Vec<Vec<f32>> {
    let mut seen = sequence.to_vec();
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            if i > 0 {
                seen.push(drafts[i - 1]);
            }
            f(row, &seen)
        })
        .collect()
}

/// Verified rows for the greedy rule: the repetition penalty applied as plain decoding would.
pub(crate) fn penalised_rows(rows: Vec<Vec<f32>>, sequence: &[u32], drafts: &[u32], penalty: f32) -> Vec<Vec<f32>> {
    if penalty == 1.0 {
        return rows;
    }
    rows_in_context(&rows, sequence, drafts, |row, seen| {
        let mut row = row.to_vec();
        apply_repetition_penalty(&mut row, seen, penalty);
        row
    })
}

/// Verified rows for the sampling rule: each one's sampling distribution.
pub(crate) fn row_distributions(rows: &[Vec<f32>], sequence: &[u32], drafts: &[u32], params: &SamplingParams) -> Vec<Vec<f32>> {
    rows_in_context(rows, sequence, drafts, |row, seen| row_distribution(row, seen, params))
}

/// The sampling distribution of one row of logits, with the repetition penalty over `seen`.
pub(crate) fn row_distribution(logits: &[f32], seen: &[u32], params: &SamplingParams) -> Vec<f32> {
    let mut row = logits.to_vec();
    apply_repetition_penalty(&mut row, seen, params.repetition_penalty);
    distribution(&row, params)
}

pub(crate) fn penalised_argmax(logits: &[f32], seen: &[u32], penalty: f32) -> u32 {
    if penalty == 1.0 {
        return argmax(logits) as u32;
    }
    let mut row = logits.to_vec();
    apply_repetition_penalty(&mut row, seen, penalty);
    argmax(&row) as u32
}

/// The proposal law of a deterministic proposer (prompt lookup): probability 1 at each token.
pub(crate) fn one_hot_rows(tokens: &[u32], vocab: usize) -> Vec<Vec<f32>> {
    tokens
        .iter()
        .map(|&t| {
            let mut row = vec![0.0; vocab];
            row[t as usize] = 1.0;
            row
        })
        .collect()
}

/// The greedy verdict on a verify's `rows` over `ids` (the last token, then the drafts), the rows
/// masked and penalised: the drafts accepted and the target's token after them, the target left
/// holding what was kept. A row too close to call from a batched forward (ONNX Runtime picks other
/// kernels for it) is decided by a one-token forward, as plain decoding decides it, and measures
/// how far the target's batched rows stray. Where that gives the draft's own token and the
/// target kept the positions after it, the rows after it still count.
pub(crate) fn greedy_verdict(
    target: &mut dyn Target,
    run: &mut Run,
    rows: &[Vec<f32>],
    ids: &[u32],
    penalty: f32,
    stats: &mut SpeculativeStats,
) -> Result<(usize, u32)> {
    let drafts = &ids[1..];
    let base = target.len() - ids.len();
    let mut from = 0;
    loop {
        stats.tie_margin = target.tie_margin();
        let at = match verify_greedy_guarded(&rows[from..], &drafts[from..], stats.tie_margin) {
            GreedyVerdict::Decided(accepted, token) => {
                let accepted = from + accepted;
                target.truncate(base + 1 + accepted)?;
                target.select_row(accepted);
                return Ok((accepted, token));
            }
            GreedyVerdict::NearTie(at) => from + at,
        };
        run.target_forwards += 1;
        stats.near_tie_recomputes += 1;
        let mut seen = run.sequence.clone();
        seen.extend_from_slice(&drafts[..at]);
        // The bonus row has no positions after it to keep.
        let inside = at < drafts.len();
        let single = match inside.then(|| target.step_inside(base + at, ids[at])).transpose()?.flatten() {
            Some(row) => row,
            None => {
                target.truncate(base + at)?;
                target.forward(&ids[at..=at], 1)?
            }
        };
        run.mask(single, &drafts[..at])?;
        let token = run.sampler.next(single, &seen);
        let mut judged = single.to_vec();
        apply_repetition_penalty(&mut judged, &seen, penalty);
        target.observe_tie(&rows[at], &judged);
        if target.len() > base + at + 1 {
            // The step kept the positions after it.
            if token == drafts[at] {
                stats.near_ties_inside += 1;
                from = at + 1;
                continue;
            }
            target.truncate(base + at + 1)?;
        }
        return Ok((at, token));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed })
    }

    /// A deterministic proposal (prompt lookup: q is 1 at the draft) keeps the target's law:
    /// the token in the draft's place is distributed as p, whichever token was drafted.
    #[test]
    fn a_deterministic_draft_keeps_the_target_distribution() {
        let p = vec![vec![0.5, 0.3, 0.2, 0.0], vec![0.25; 4]];
        let mut s = sampler(11);
        for draft in [0u32, 2, 3] {
            let q = one_hot_rows(&[draft], 4);
            let n = 200_000;
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let (accepted, next) = verify_sampled(&p, &q, &[draft], &mut s);
                counts[if accepted == 1 { draft } else { next } as usize] += 1;
            }
            for (token, &c) in counts.iter().enumerate() {
                let freq = c as f32 / n as f32;
                assert!((freq - p[0][token]).abs() < 0.005, "draft {draft}: token {token} drawn {freq}, p = {}", p[0][token]);
            }
        }
    }

    #[test]
    fn greedy_accepts_the_matching_prefix() {
        let rows = vec![vec![0.0, 5.0, 1.0], vec![3.0, 0.0, 1.0], vec![0.0, 0.0, 9.0]];
        assert_eq!(verify_greedy_guarded(&rows, &[1, 0], 0.1), GreedyVerdict::Decided(2, 2), "all accepted, bonus from the last row");
        assert_eq!(verify_greedy_guarded(&rows, &[1, 2], 0.1), GreedyVerdict::Decided(1, 0), "rejected at 1: the target's token");
        assert_eq!(verify_greedy_guarded(&rows, &[0, 0], 0.1), GreedyVerdict::Decided(0, 1), "rejected at 0");
        let close = vec![vec![0.0, 5.0, 4.95], vec![3.0, 0.0, 1.0], vec![0.0, 0.0, 9.0]];
        assert_eq!(verify_greedy_guarded(&close, &[1, 0], 0.1), GreedyVerdict::NearTie(0));
    }

    /// One draft position: the emitted token follows p whatever q is (the theorem of
    /// Leviathan et al.), measured by total variation over many draws.
    #[test]
    fn sampled_rule_reproduces_the_target_distribution() {
        let p = vec![0.5, 0.3, 0.15, 0.05];
        let q = vec![0.1, 0.2, 0.3, 0.4];
        let bonus = vec![0.25; 4];
        let mut s = sampler(1);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let d = s.draw(&q) as u32;
            let (acc, next) = verify_sampled(&[p.clone(), bonus.clone()], &[q.clone()], &[d], &mut s);
            let first = if acc == 1 { d } else { next };
            counts[first as usize] += 1;
        }
        let tv: f64 = counts.iter().zip(&p).map(|(&c, &pi)| (c as f64 / n as f64 - pi as f64).abs()).sum::<f64>() / 2.0;
        assert!(tv < 0.01, "total variation {tv}, counts {counts:?}");
    }
}
