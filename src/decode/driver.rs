//! The one decode loop. Every request runs through `drive`, whatever decodes it:
//! - a `Target` runs the forwards: a decoder graph with its KV cache, or a multi-token base;
//! - a `Proposer` suggests tokens to follow the sequence: none (plain decoding), a draft model,
//!   prompt lookup, a multi-token micro decoder;
//! - the verifier (`super::verify`) judges the proposals against the target's rows.
//!
//! The driver owns what they all share: the prefill (in chunks, each one a step the watchdog
//! sees), proposing and verifying, rolling the target's cache back to what was kept, accepting
//! tokens (eos, stop strings, streamed text), stop conditions, cancellation, the deadline, the
//! context rule and the counters. Split as mistral.rs and text-generation-inference split their
//! speculative code: the proposer knows nothing of verification, the verifier nothing of models.
//!
//! A proposer's `Policy` says what its tokens are: `Verify` (drafts the target checks in one
//! forward over all of them) or `Trust` (HAMburger's merged steps: committed unchecked, and fed
//! to the target as one position).

use std::time::Instant;

use super::run::{CancelToken, FinishReason, Run, SpeculativeStats};
use super::sampler::apply_repetition_penalty;
use super::verify::{one_hot_rows, penalised_rows, row_distributions, verify_greedy_guarded, verify_sampled, GreedyVerdict, TIE_MARGIN};
use crate::error::{Error, Result};
use crate::model::ModelFolder;

/// Prompt positions per prefill forward. Each chunk is an engine step (the watchdog's progress,
/// a point to notice cancellation), and a chunk's logits output is `chunk x vocab` floats, not
/// the whole prompt's (311 MB for 512 positions of a 151,936-token vocabulary; a prompt of 8k
/// positions would take 5 GB in one forward). llama.cpp's `n_batch` bounds it the same way.
pub const PREFILL_CHUNK: usize = 512;

/// The hidden state of the row that decided the sequence's last token, for proposers that
/// draft from the target's own features (a multi-token micro decoder; MTP or EAGLE heads).
pub(crate) struct RowState<'a> {
    pub hidden: &'a [f32],
    /// The model's stop head on that row: the logit that the step ends after the token.
    pub stop_logit: f32,
}

/// What runs the forwards the driver verifies with.
pub(crate) trait Target {
    fn vocab(&self) -> usize;
    /// Positions its cache holds.
    fn len(&self) -> usize;
    /// Runs `ids` after the cache, one position each; returns the logits of the last `rows`
    /// positions, row-major `rows x vocab`. The last row becomes the selected one.
    fn forward(&mut self, ids: &[u32], rows: usize) -> Result<&mut [f32]>;
    /// Runs the tokens of one trusted step as a single position (`Policy::Trust`).
    fn forward_merged(&mut self, _ids: &[u32]) -> Result<&mut [f32]> {
        Err(Error::Inference("this model does not take merged steps".into()))
    }
    /// Forgets every position after the first `len`.
    fn truncate(&mut self, len: usize) -> Result<()>;
    /// Runs `id` as a one-token step after the first `len` positions and keeps the positions
    /// after them: a near tie inside a verified round, decided as plain decoding decides it,
    /// without losing the rows after it. Returns its logits, or `None` where the target cannot
    /// (the driver then truncates and steps). The last verify's rows stay the selectable ones.
    fn step_inside(&mut self, _len: usize, _id: u32) -> Result<Option<&mut [f32]>> {
        Ok(None)
    }
    /// The gap between a verify row's top two under which a one-token forward decides the row
    /// (`super::verify::TieMargin`, where the target learns its own).
    fn tie_margin(&self) -> f32 {
        TIE_MARGIN
    }
    /// A near tie re-checked: the verify's row and the one-token forward's, as the decision
    /// reads them.
    fn observe_tie(&mut self, _batched: &[f32], _single: &[f32]) {}
    /// Row `row` of the last forward's rows decided the sequence's last token.
    fn select_row(&mut self, _row: usize) {}
    /// The selected row's hidden state, where the target exposes one.
    fn row_state(&self) -> Option<RowState<'_>> {
        None
    }
}

/// What a proposer's tokens are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Drafts: the target checks them all in one forward and keeps what it agrees with.
    Verify,
    /// Committed without a check and fed to the target as one merged position.
    Trust,
}

/// Tokens to follow the sequence and, for sampled decoding, the distribution each was drawn from
/// (the rejection rule needs it; without it the proposal counts as deterministic).
#[derive(Default)]
pub(crate) struct Proposal {
    pub tokens: Vec<u32>,
    pub q_rows: Vec<Vec<f32>>,
}

/// Suggests continuations of `run.sequence`.
pub(crate) trait Proposer {
    fn policy(&self) -> Policy {
        Policy::Verify
    }
    /// At most `limit` tokens (what the request's length and the context leave); the proposer's
    /// own length control may propose fewer, or none. `row` is the target's state of the row
    /// that decided the last token.
    fn propose(&mut self, run: &mut Run, row: Option<RowState<'_>>, limit: usize) -> Result<Proposal>;
    /// A target forward over `positions` (the last token and the drafts) took `took`.
    fn verified(&mut self, _positions: usize, _took: std::time::Duration) {}
    /// The target kept the first `len` positions, `accepted` of the `proposed` tokens.
    fn accepted(&mut self, _len: usize, _proposed: usize, _accepted: usize) -> Result<()> {
        Ok(())
    }
    /// Tokens one proposal may hold (caches are sized for them).
    fn max_tokens(&self) -> usize;
    /// Whether the request's statistics report its proposals (`SpeculativeStats`).
    fn drafts(&self) -> bool {
        true
    }
}

/// Plain decoding: nothing proposed, one target forward per token.
pub(crate) struct NoProposer;

impl Proposer for NoProposer {
    fn propose(&mut self, _run: &mut Run, _row: Option<RowState<'_>>, _limit: usize) -> Result<Proposal> {
        Ok(Proposal::default())
    }
    fn max_tokens(&self) -> usize {
        0
    }
    fn drafts(&self) -> bool {
        false
    }
}

/// Decodes `run` on `target` with `proposer`'s suggestions; returns why it ended. Greedy output
/// is the target's own (near ties re-decided by a single-token forward, as plain decoding runs);
/// sampled output follows the target's distribution. Proposal counters go to `stats`.
pub(crate) fn drive(
    target: &mut dyn Target,
    proposer: &mut dyn Proposer,
    folder: &ModelFolder,
    run: &mut Run,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str) -> bool,
    stats: &mut SpeculativeStats,
) -> Result<FinishReason> {
    match rounds(target, proposer, folder, run, cancel, on_text, stats) {
        // The one place a terminated forward becomes a finish reason.
        Err(Error::Cancelled) => Ok(FinishReason::Cancelled),
        other => other,
    }
}

/// The prompt, in chunks, after what the target's cache holds already (kept from an earlier
/// request); the first token, from the target alone, or why the request ended between chunks
/// (cancelled, or past its deadline: a long prompt's prefill must not run minutes past it).
fn prefill(target: &mut dyn Target, run: &mut Run, cancel: &CancelToken) -> Result<std::result::Result<u32, FinishReason>> {
    let prompt = run.sequence[target.len()..].to_vec();
    let chunks = prompt.len().div_ceil(PREFILL_CHUNK);
    for (i, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
        if i > 0 {
            if let Some(reason) = run.interrupted(cancel) {
                return Ok(Err(reason));
            }
        }
        let logits = target.forward(chunk, 1)?;
        run.target_forwards += 1;
        if i + 1 == chunks {
            run.mask(logits, &[])?;
            let first = run.sampler.next(logits, &run.sequence);
            run.sequence.reserve(run.max_new);
            return Ok(Ok(first));
        }
    }
    unreachable!("a prompt has at least one token (checked when it was tokenized)")
}

fn rounds(
    target: &mut dyn Target,
    proposer: &mut dyn Proposer,
    folder: &ModelFolder,
    run: &mut Run,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str) -> bool,
    stats: &mut SpeculativeStats,
) -> Result<FinishReason> {
    let params = run.sampler.params().clone();
    let vocab = target.vocab();
    let mut next = match prefill(target, run, cancel)? {
        Ok(first) => first,
        Err(reason) => return Ok(reason),
    };
    let greedy = params.is_greedy();
    // The ids of one forward: reused, so that a plain step does not allocate.
    let mut ids: Vec<u32> = Vec::with_capacity(proposer.max_tokens() + 1);
    loop {
        // `next` is decided; the target's cache holds the sequence before it (or, after
        // merged steps, one position per step before it).
        if let Some(reason) = run.accept(folder, next, on_text)? {
            return Ok(reason);
        }
        if let Some(reason) = run.should_stop(cancel) {
            return Ok(reason);
        }
        let policy = proposer.policy();
        // The context rule, one for all: the sequence never holds more than `context` tokens.
        // Verified drafts leave room for the target's token after them.
        let limit = match policy {
            Policy::Verify => run.tokens_left().saturating_sub(1).min(run.context_left().saturating_sub(1)),
            Policy::Trust => run.tokens_left().min(run.context_left()),
        };
        // Timed only where the statistics report it: a plain step reads no clock.
        let proposing = proposer.drafts().then(Instant::now);
        let Proposal { tokens: mut drafts, mut q_rows } = proposer.propose(run, target.row_state(), limit)?;
        if policy == Policy::Verify {
            // Drafts the output constraint rules out are never accepted: not verified either.
            let allowed = run.allowed_drafts(&drafts)?;
            drafts.truncate(allowed);
            q_rows.truncate(allowed);
        }
        if let Some(proposing) = proposing {
            stats.draft_time += proposing.elapsed();
        }

        if policy == Policy::Trust {
            // Micro tokens are the model's own output in this mode: committed as they come.
            for &token in &drafts {
                if let Some(reason) = run.accept(folder, token, on_text)? {
                    return Ok(reason);
                }
            }
            if let Some(reason) = run.should_stop(cancel) {
                return Ok(reason);
            }
            let step = &run.sequence[run.sequence.len() - 1 - drafts.len()..];
            let verifying = Instant::now();
            let logits = target.forward_merged(step)?;
            run.target_forwards += 1;
            run.mask(logits, &[])?;
            next = run.sampler.next(logits, &run.sequence);
            stats.verify_time += verifying.elapsed();
            continue;
        }

        let base = target.len();
        ids.clear();
        ids.push(*run.sequence.last().expect("a token was accepted"));
        ids.extend_from_slice(&drafts);
        if drafts.is_empty() {
            // A plain step: the logits are read where ONNX Runtime wrote them.
            let stepping = proposer.drafts().then(Instant::now);
            let logits = target.forward(&ids, 1)?;
            if let Some(stepping) = stepping {
                // A step the proposer left to the target alone: its forward is verify time.
                let took = stepping.elapsed();
                proposer.verified(1, took);
                stats.verify_time += took;
            }
            run.target_forwards += 1;
            run.mask(logits, &[])?;
            next = run.sampler.next(logits, &run.sequence);
            if proposer.drafts() {
                proposer.accepted(base + 1, 0, 0)?;
            }
            continue;
        }

        let verifying = Instant::now();
        let flat = target.forward(&ids, ids.len())?;
        run.target_forwards += 1;
        proposer.verified(ids.len(), verifying.elapsed());
        let mut rows: Vec<Vec<f32>> = flat.chunks(vocab).map(<[f32]>::to_vec).collect();
        run.mask_rows(&mut rows, &drafts)?;
        let (accepted, following) = if greedy {
            let rows = penalised_rows(rows, &run.sequence, &drafts, params.repetition_penalty);
            greedy_verdict(target, run, &rows, &ids, params.repetition_penalty, stats)?
        } else {
            let p_rows = row_distributions(&rows, &run.sequence, &drafts, &params);
            let q_rows = if q_rows.len() == drafts.len() { q_rows } else { one_hot_rows(&drafts, vocab) };
            let (accepted, token) = verify_sampled(&p_rows, &q_rows, &drafts, &mut run.sampler);
            target.truncate(base + 1 + accepted)?;
            target.select_row(accepted);
            (accepted, token)
        };
        let kept = base + 1 + accepted;
        stats.verify_time += verifying.elapsed();
        stats.draft_tokens += drafts.len();
        stats.accepted_tokens += accepted;
        stats.evaluated_tokens += (accepted + 1).min(drafts.len());
        stats.accepted_per_round[accepted.min(16)] += 1;
        proposer.accepted(kept, drafts.len(), accepted)?;
        for (i, &token) in drafts[..accepted].iter().enumerate() {
            if let Some(reason) = run.accept(folder, token, on_text)? {
                // The cache keeps what the run fed before the token that ended it.
                target.truncate(base + 1 + i)?;
                return Ok(reason);
            }
        }
        next = following;
    }
}

/// The greedy verdict on a verify's `rows` over `ids` (the last token, then the drafts), the rows
/// masked and penalised: the drafts accepted and the target's token after them, the target left
/// holding what was kept. A row too close to call from a batched forward (ONNX Runtime picks other
/// kernels for it) is decided by a one-token forward, as plain decoding decides it, and measures
/// how far the target's batched rows stray. Where that gives the draft's own token and the
/// target kept the positions after it, the rows after it still count.
fn greedy_verdict(
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
