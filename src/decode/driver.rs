//! The one decode loop. Every request runs through `drive`, whatever decodes it:
//! - a `Target` (`super::target`) runs the forwards: a decoder graph with its KV cache, or a
//!   multi-token base;
//! - a `Proposer` (`super::proposer`) suggests tokens to follow the sequence: none (plain
//!   decoding), a draft model, prompt lookup, a multi-token micro decoder; how long its drafts
//!   are is decided in `super::draft_length`;
//! - the verifier (`super::verify`) judges the proposals against the target's rows, and
//!   re-decides a near tie with a one-token forward.
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

use super::proposer::{Policy, Proposal, Proposer};
use super::run::{CancelToken, FinishReason, Run, SpeculativeStats};
use super::sampler::SamplingParams;
use super::target::Target;
use super::verify::{greedy_verdict, one_hot_rows, penalised_rows, row_distributions, verify_sampled};
use crate::error::{Error, Result};
use crate::model::ModelFolder;

/// Prompt positions per prefill forward. Each chunk is an engine step (the watchdog's progress,
/// a point to notice cancellation), and a chunk's logits output is `chunk x vocab` floats, not
/// the whole prompt's (311 MB for 512 positions of a 151,936-token vocabulary; a prompt of 8k
/// positions would take 5 GB in one forward). llama.cpp's `n_batch` bounds it the same way.
pub const PREFILL_CHUNK: usize = 512;

/// One request's decoding: the two roles, and what the loop threads through every step.
pub(crate) struct Decoding<'a> {
    pub target: &'a mut dyn Target,
    pub proposer: &'a mut dyn Proposer,
    pub folder: &'a ModelFolder,
    pub run: &'a mut Run,
    pub cancel: &'a CancelToken,
    /// Streamed text; false stops the request (the caller is gone).
    pub on_text: &'a mut dyn FnMut(&str) -> bool,
    /// The proposal counters.
    pub stats: &'a mut SpeculativeStats,
}

/// What a step leaves: the next decided token, or why the request ended.
enum Step {
    Next(u32),
    Done(FinishReason),
}

/// Decodes the run with the proposer's suggestions; returns why it ended. Greedy output is the
/// target's own (near ties re-decided by a single-token forward, as plain decoding runs);
/// sampled output follows the target's distribution.
pub(crate) fn drive(mut decoding: Decoding<'_>) -> Result<FinishReason> {
    match decoding.rounds() {
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

impl Decoding<'_> {
    fn rounds(&mut self) -> Result<FinishReason> {
        let params = self.run.sampler.params().clone();
        let mut next = match prefill(self.target, self.run, self.cancel)? {
            Ok(first) => first,
            Err(reason) => return Ok(reason),
        };
        // The ids of one verify forward: reused, so that a round does not allocate them.
        let mut ids: Vec<u32> = Vec::with_capacity(self.proposer.max_tokens() + 1);
        loop {
            // `next` is decided; the target's cache holds the sequence before it (or, after
            // merged steps, one position per step before it).
            if let Some(reason) = self.run.accept(self.folder, next, self.on_text)? {
                return Ok(reason);
            }
            if let Some(reason) = self.run.should_stop(self.cancel) {
                return Ok(reason);
            }
            let step = match self.propose()? {
                (Policy::Trust, proposal) => self.trusted_step(&proposal.tokens)?,
                (Policy::Verify, proposal) if proposal.tokens.is_empty() => self.plain_step()?,
                (Policy::Verify, proposal) => self.verify_round(proposal, &mut ids, &params)?,
            };
            next = match step {
                Step::Next(token) => token,
                Step::Done(reason) => return Ok(reason),
            };
        }
    }

    /// The proposer's tokens for this round, within the context rule; verified drafts that the
    /// output constraint rules out are cut (never accepted, so not verified either).
    fn propose(&mut self) -> Result<(Policy, Proposal)> {
        let policy = self.proposer.policy();
        // The context rule, one for all: the sequence never holds more than `context` tokens.
        // Verified drafts leave room for the target's token after them.
        let limit = match policy {
            Policy::Verify => self.run.tokens_left().saturating_sub(1).min(self.run.context_left().saturating_sub(1)),
            Policy::Trust => self.run.tokens_left().min(self.run.context_left()),
        };
        // Timed only where the statistics report it: a plain step reads no clock.
        let proposing = self.proposer.drafts().then(Instant::now);
        let mut proposal = self.proposer.propose(self.run, self.target.row_state(), limit)?;
        if policy == Policy::Verify {
            let allowed = self.run.allowed_drafts(&proposal.tokens)?;
            proposal.tokens.truncate(allowed);
            proposal.q_rows.truncate(allowed);
        }
        if let Some(proposing) = proposing {
            self.stats.draft_time += proposing.elapsed();
        }
        Ok((policy, proposal))
    }

    /// A multi-token model's trusted step: its micro tokens are the model's own output in this
    /// mode, committed as they come and fed to the target as one merged position.
    fn trusted_step(&mut self, tokens: &[u32]) -> Result<Step> {
        for &token in tokens {
            if let Some(reason) = self.run.accept(self.folder, token, self.on_text)? {
                return Ok(Step::Done(reason));
            }
        }
        if let Some(reason) = self.run.should_stop(self.cancel) {
            return Ok(Step::Done(reason));
        }
        let step = &self.run.sequence[self.run.sequence.len() - 1 - tokens.len()..];
        let verifying = Instant::now();
        let logits = self.target.forward_merged(step)?;
        self.run.target_forwards += 1;
        self.run.mask(logits, &[])?;
        let next = self.run.sampler.next(logits, &self.run.sequence);
        self.stats.verify_time += verifying.elapsed();
        Ok(Step::Next(next))
    }

    /// A plain step: the logits are read where ONNX Runtime wrote them.
    fn plain_step(&mut self) -> Result<Step> {
        let base = self.target.len();
        let last = [*self.run.sequence.last().expect("a token was accepted")];
        let stepping = self.proposer.drafts().then(Instant::now);
        let logits = self.target.forward(&last, 1)?;
        if let Some(stepping) = stepping {
            // A step the proposer left to the target alone: its forward is verify time.
            let took = stepping.elapsed();
            self.proposer.verified(1, took);
            self.stats.verify_time += took;
        }
        self.run.target_forwards += 1;
        self.run.mask(logits, &[])?;
        let next = self.run.sampler.next(logits, &self.run.sequence);
        if self.proposer.drafts() {
            self.proposer.accepted(base + 1, 0, 0)?;
        }
        Ok(Step::Next(next))
    }

    /// The last token and the drafts in one target forward; the verifier keeps the drafts the
    /// target agrees with, and the target's cache rolls back to them.
    fn verify_round(&mut self, proposal: Proposal, ids: &mut Vec<u32>, params: &SamplingParams) -> Result<Step> {
        let Proposal { tokens: drafts, q_rows } = proposal;
        let base = self.target.len();
        let vocab = self.target.vocab();
        ids.clear();
        ids.push(*self.run.sequence.last().expect("a token was accepted"));
        ids.extend_from_slice(&drafts);
        let verifying = Instant::now();
        let flat = self.target.forward(ids, ids.len())?;
        self.run.target_forwards += 1;
        self.proposer.verified(ids.len(), verifying.elapsed());
        let mut rows: Vec<Vec<f32>> = flat.chunks(vocab).map(<[f32]>::to_vec).collect();
        self.run.mask_rows(&mut rows, &drafts)?;
        let (accepted, following) = if params.is_greedy() {
            let rows = penalised_rows(rows, &self.run.sequence, &drafts, params.repetition_penalty);
            greedy_verdict(self.target, self.run, &rows, ids, params.repetition_penalty, self.stats)?
        } else {
            let p_rows = row_distributions(&rows, &self.run.sequence, &drafts, params);
            let q_rows = if q_rows.len() == drafts.len() { q_rows } else { one_hot_rows(&drafts, vocab) };
            let (accepted, token) = verify_sampled(&p_rows, &q_rows, &drafts, &mut self.run.sampler);
            self.target.truncate(base + 1 + accepted)?;
            self.target.select_row(accepted);
            (accepted, token)
        };
        self.stats.verify_time += verifying.elapsed();
        self.stats.count_round(drafts.len(), accepted);
        self.proposer.accepted(base + 1 + accepted, drafts.len(), accepted)?;
        for (i, &token) in drafts[..accepted].iter().enumerate() {
            if let Some(reason) = self.run.accept(self.folder, token, self.on_text)? {
                // The cache keeps what the run fed before the token that ended it.
                self.target.truncate(base + 1 + i)?;
                return Ok(Step::Done(reason));
            }
        }
        Ok(Step::Next(following))
    }
}
