//! Speculative decoding with a small draft model beside the target (Leviathan et al. 2023,
//! Chen et al. 2023): the draft proposes up to k tokens, the target scores them all in one
//! forward over k+1 positions, the accepted prefix plus one target token are emitted, and both
//! KV caches roll back to what was accepted.
//!
//! Split as in mistral.rs: `Draft` proposes, `verify_greedy`/`verify_sampled` decide (pure
//! functions, tested on their own), `decode` drives the rounds. Greedy output is identical to
//! the target alone; sampled output follows the target's distribution.

use crate::engine::decoder::{Decoder, KvCache, KvLayout, LoadOptions};
use crate::engine::run::{CancelToken, FinishReason, Run, SpeculativeStats};
use crate::engine::sampler::{apply_repetition_penalty, argmax, distribution, Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::model::ModelFolder;
use crate::runtime::{ProviderReport, Runtime};

pub mod lookup;

/// Draft length bounds and the confidence cut-off (the target's `[[model]]` keys).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub min_tokens: usize,
    pub max_tokens: usize,
    /// Stop drafting when the draft's own probability of its token falls under this (0: off).
    pub min_confidence: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { min_tokens: 1, max_tokens: 8, min_confidence: 0.0 }
    }
}

/// The proposer: a small model with its own session, possibly on another execution provider.
pub struct Draft {
    decoder: Decoder,
    layout: KvLayout,
    settings: Settings,
}

impl Draft {
    pub fn load(runtime: &Runtime, target: &ModelFolder, draft: &ModelFolder, options: &LoadOptions, settings: Settings) -> Result<Draft> {
        let mismatch = |field: &str, reason: String| Error::ModelConfig { path: draft.config.path.clone(), field: field.into(), reason };
        if draft.config.vocab_size != target.config.vocab_size {
            return Err(mismatch(
                "model.vocab_size",
                format!(
                    "{} differs from the target's {}: a draft must share the target's tokenizer",
                    draft.config.vocab_size, target.config.vocab_size
                ),
            ));
        }
        if draft.config.context_length < target.config.context_length {
            return Err(mismatch(
                "model.context_length",
                format!("{} is shorter than the target's {}", draft.config.context_length, target.config.context_length),
            ));
        }
        // A draft's forwards are small: on the calling thread alone they are faster than through
        // a pool of its own whose threads spin against the target's (unless its [[model]] sets
        // `threads`).
        let session = if options.session.threads == 0 {
            crate::runtime::SessionOptions { threads: 1, ..options.session.clone() }
        } else {
            options.session.clone()
        };
        let decoder = Decoder::load(runtime, &draft.dir, &draft.config, &session)?;
        if let Some(state) = decoder.recurrent_states().first() {
            return Err(mismatch(
                "model.decoder",
                format!("the draft carries recurrent states (`{state}`), which speculative decoding cannot roll back"),
            ));
        }
        let layout = decoder.choose_layout(&draft.config, options.kv_layout)?;
        Ok(Draft { decoder, layout, settings })
    }

    pub fn provider(&self) -> &ProviderReport {
        &self.decoder.provider
    }

    pub(crate) fn settings(&self) -> Settings {
        self.settings
    }
}

/// Logit gap under which a greedy decision from a batched verify row is re-checked with a
/// single-token forward. Batched and single-token forwards of the committed target differed by
/// up to ~0.04 in a logit (measured with onnxruntime on CPU); 0.1 leaves room for that.
pub const TIE_MARGIN: f32 = 0.1;

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

/// Draft length control: grows after a fully accepted round, shrinks after a poor one.
struct AdaptiveK {
    k: usize,
    min: usize,
    max: usize,
}

impl AdaptiveK {
    fn update(&mut self, proposed: usize, accepted: usize) {
        if proposed > 0 && accepted == proposed {
            self.k = (self.k + 1).min(self.max);
        } else if accepted * 2 < proposed {
            self.k = self.k.saturating_sub(1).max(self.min);
        }
    }
}

fn forward(decoder: &mut Decoder, cache: &mut KvCache, ids: &[u32], rows: usize) -> Result<Option<Vec<f32>>> {
    match decoder.forward(cache, ids, rows) {
        Ok(logits) => Ok(Some(logits)),
        Err(Error::Cancelled) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a proposer suggests for the target to verify: tokens after the sequence and, for
/// sampled decoding, the distribution each was drawn from (the rejection rule needs q).
pub(crate) struct Proposal {
    pub tokens: Vec<u32>,
    pub q_rows: Vec<Vec<f32>>,
}

/// Suggests continuations; the driver below verifies them with the target. Implementations:
/// a draft model (`DraftProposer`) and prompt lookup (`lookup::PromptLookup`).
pub(crate) trait Proposer {
    /// Up to `k` tokens after `run.sequence` (stopping early where it is unsure, but not below
    /// `min`); `None` when the request was cancelled meanwhile.
    fn propose(&mut self, run: &mut Run, k: usize, min: usize) -> Result<Option<Proposal>>;
    /// The target kept the sequence up to `len` tokens (`accepted` of `proposed` drafts).
    fn accepted(&mut self, len: usize, proposed: usize, accepted: usize) -> Result<()>;
    /// Positions the proposer may look ahead of the request's tokens (sizes the caches).
    fn max_tokens(&self) -> usize;
}

/// The draft model as a proposer, with its own KV cache for this request.
pub(crate) struct DraftProposer<'d> {
    draft: &'d mut Draft,
    cache: KvCache,
}

impl<'d> DraftProposer<'d> {
    pub(crate) fn new(draft: &'d mut Draft, positions: usize, cancel: &CancelToken) -> Result<Self> {
        let cache = draft.decoder.new_cache(draft.layout, positions + draft.settings.max_tokens + 1)?;
        // The draft's runs are terminated with the target's: its first catch-up is a prefill.
        cancel.attach(cache.run_options());
        Ok(DraftProposer { draft, cache })
    }
}

impl Proposer for DraftProposer<'_> {
    fn propose(&mut self, run: &mut Run, k: usize, min: usize) -> Result<Option<Proposal>> {
        let params = run.sampler.params().clone();
        let greedy = params.is_greedy();
        let min_confidence = self.draft.settings.min_confidence;
        let mut tokens: Vec<u32> = Vec::with_capacity(k);
        let mut q_rows: Vec<Vec<f32>> = Vec::new();
        // The draft first catches up with what it has not seen (1 or 2 tokens; the prompt at first).
        let mut feed: Vec<u32> = run.sequence[self.cache.len()..].to_vec();
        while tokens.len() < k {
            let Some(row) = forward(&mut self.draft.decoder, &mut self.cache, &feed, 1)? else { return Ok(None) };
            // What the repetition penalty looks at; only built when there is a penalty.
            let seen: Vec<u32> =
                if params.repetition_penalty == 1.0 { Vec::new() } else { run.sequence.iter().chain(&tokens).copied().collect() };
            let (token, confidence) = if greedy {
                let t = penalised_argmax(&row, &seen, params.repetition_penalty);
                let confidence = if min_confidence > 0.0 {
                    row_distribution(&row, &seen, &SamplingParams { temperature: 1.0, ..params.clone() })[t as usize]
                } else {
                    1.0
                };
                (t, confidence)
            } else {
                let q = row_distribution(&row, &seen, &params);
                let t = run.sampler.draw(&q) as u32;
                let confidence = q[t as usize];
                q_rows.push(q);
                (t, confidence)
            };
            tokens.push(token);
            feed = vec![token];
            if confidence < min_confidence && tokens.len() >= min {
                break;
            }
        }
        Ok(Some(Proposal { tokens, q_rows }))
    }

    fn accepted(&mut self, len: usize, _proposed: usize, _accepted: usize) -> Result<()> {
        // The draft keeps no more than the target did (it may not have seen the last draft).
        let keep = len.min(self.cache.len());
        self.cache.truncate(keep)
    }

    fn max_tokens(&self) -> usize {
        self.draft.settings.max_tokens
    }
}

/// Decodes `run` with `proposer`'s suggestions verified by `target`; returns why it ended.
/// Greedy: the target's argmax decides (near ties recomputed one token at a time, as plain
/// decoding runs); sampled: the rejection rule keeps the target's distribution.
pub(crate) fn decode(
    target: &mut Decoder,
    target_layout: KvLayout,
    proposer: &mut dyn Proposer,
    bounds: Settings,
    folder: &ModelFolder,
    run: &mut Run,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<FinishReason> {
    let params = run.sampler.params().clone();
    let greedy = params.is_greedy();
    let vocab = target.vocab();
    let mut stats = SpeculativeStats::default();
    // Room for the request's tokens plus one round of drafts past them.
    let positions = run.prompt_len + run.max_new + proposer.max_tokens() + 1;
    let mut t_cache = target.new_cache(target_layout, positions)?;
    cancel.attach(t_cache.run_options());

    // Prefill: the first token comes from the target alone.
    let prompt = run.sequence.clone();
    let Some(mut logits) = forward(target, &mut t_cache, &prompt, 1)? else { return Ok(FinishReason::Cancelled) };
    run.target_forwards += 1;
    let first = run.sampler.next(&mut logits, &run.sequence);
    if let Some(reason) = run.accept(folder, first, on_text)? {
        run.speculative = Some(stats);
        return Ok(reason);
    }
    let mut k = AdaptiveK { k: bounds.max_tokens.div_ceil(2).max(bounds.min_tokens), min: bounds.min_tokens, max: bounds.max_tokens };
    let reason = 'rounds: loop {
        // Invariant: the target's cache holds all of `sequence` but its last token.
        let base = t_cache.len();
        // Room for the last token and k drafts, leaving one position to generate into.
        let room = run.context_left(base);
        if let Some(reason) = run.should_stop(base + 1, cancel) {
            break reason;
        }
        let k_now = k.k.min(room.saturating_sub(2)).min(run.tokens_left().saturating_sub(1));

        let drafting = std::time::Instant::now();
        let Some(Proposal { tokens: drafts, q_rows }) = proposer.propose(run, k_now, k.min)? else {
            break 'rounds FinishReason::Cancelled;
        };
        stats.draft_time += drafting.elapsed();
        let verifying = std::time::Instant::now();
        // Verify: one target forward over the last token and the drafts.
        let last = *run.sequence.last().expect("a token was emitted");
        let mut verify_ids = Vec::with_capacity(drafts.len() + 1);
        verify_ids.push(last);
        verify_ids.extend_from_slice(&drafts);
        let Some(flat) = forward(target, &mut t_cache, &verify_ids, verify_ids.len())? else { break FinishReason::Cancelled };
        run.target_forwards += 1;
        let rows: Vec<Vec<f32>> = flat.chunks(vocab).map(<[f32]>::to_vec).collect();
        let (accepted, next) = if greedy {
            let rows = penalised_rows(rows, &run.sequence, &drafts, params.repetition_penalty);
            match verify_greedy_guarded(&rows, &drafts, TIE_MARGIN) {
                GreedyVerdict::Decided(accepted, next) => (accepted, next),
                GreedyVerdict::NearTie(at) => {
                    // A batched forward can differ from a single-token one by up to ~0.1 logit
                    // (ONNX Runtime picks other kernels); where the target's top two logits are
                    // that close, decide the position with a single-token forward, as plain
                    // decoding does.
                    t_cache.truncate(base + at)?;
                    let Some(mut row) = forward(target, &mut t_cache, &verify_ids[at..=at], 1)? else { break FinishReason::Cancelled };
                    run.target_forwards += 1;
                    stats.near_tie_recomputes += 1;
                    let mut seen = run.sequence.clone();
                    seen.extend_from_slice(&drafts[..at]);
                    apply_repetition_penalty(&mut row, &seen, params.repetition_penalty);
                    (at, argmax(&row) as u32)
                }
            }
        } else {
            let p_rows = row_distributions(&rows, &run.sequence, &drafts, &params);
            // A deterministic proposal (prompt lookup) drew each token with probability 1.
            let q_rows = if q_rows.len() == drafts.len() { q_rows } else { one_hot_rows(&drafts, vocab) };
            verify_sampled(&p_rows, &q_rows, &drafts, &mut run.sampler)
        };
        stats.verify_time += verifying.elapsed();
        stats.draft_tokens += drafts.len();
        stats.accepted_tokens += accepted;
        stats.evaluated_tokens += (accepted + 1).min(drafts.len());
        stats.accepted_per_round[accepted.min(16)] += 1;
        k.update(drafts.len(), accepted);

        // Roll back to what was accepted: the target keeps `last` and the accepted drafts.
        t_cache.truncate(base + 1 + accepted)?;
        proposer.accepted(base + 1 + accepted, drafts.len(), accepted)?;
        for &token in drafts[..accepted].iter().chain(std::iter::once(&next)) {
            if let Some(reason) = run.accept(folder, token, on_text)? {
                break 'rounds reason;
            }
        }
    };
    run.speculative = Some(stats);
    Ok(reason)
}

fn one_hot_rows(tokens: &[u32], vocab: usize) -> Vec<Vec<f32>> {
    tokens
        .iter()
        .map(|&t| {
            let mut row = vec![0.0; vocab];
            row[t as usize] = 1.0;
            row
        })
        .collect()
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

    #[test]
    fn adaptive_k_moves_within_bounds() {
        let mut k = AdaptiveK { k: 4, min: 2, max: 6 };
        k.update(4, 4);
        k.update(5, 5);
        k.update(6, 6);
        assert_eq!(k.k, 6);
        for _ in 0..10 {
            k.update(6, 0);
        }
        assert_eq!(k.k, 2);
    }
}
