//! The proposer: what suggests tokens to follow the sequence, and the plain proposer (none). The
//! others: a draft model (`crate::speculative::DraftProposer`), prompt lookup
//! (`crate::speculative::lookup::PromptLookup`) and a multi-token model's micro decoder
//! (`crate::multitoken::MicroProposer`). How long their drafts are is decided in one place
//! (`super::draft_length`).

use super::run::Run;
use super::target::RowState;
use crate::error::Result;

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

