//! The decode roles a request runs with, picked once per request by the engine: a target and a
//! proposer for the one decode loop (`crate::decode::driver`), and what each pair leaves when
//! the request ends (its statistics, the caches kept for the caller's next request).

use crate::decode::decoder::KvCache;
use crate::decode::graph::KvStates;
use crate::decode::proposer::{NoProposer, Proposer};
use crate::decode::reuse::CachedKv;
use crate::decode::run::{MultiTokenStats, Run, SpeculativeStats};
use crate::decode::target::{DecoderTarget, Target};
use crate::multitoken::{BaseTarget, MicroProposer, Mode, Settings as MultiTokenSettings};
use crate::speculative::lookup::PromptLookup;
use crate::speculative::DraftProposer;

/// A target and its proposer.
pub(super) enum Roles<'e> {
    /// Plain decoding; a kept draft cache passes through untouched (the request turned drafts off).
    Plain(DecoderTarget<'e>, NoProposer, Option<KvCache>),
    Draft(DecoderTarget<'e>, DraftProposer<'e>),
    /// Prompt lookup; as `Plain`, a kept draft cache passes through.
    Lookup(DecoderTarget<'e>, PromptLookup, Option<KvCache>),
    MultiToken(BaseTarget<'e>, MicroProposer<'e>, MultiTokenSettings),
}

/// Caches an earlier request left, cut to the prefix this request shares with it.
#[derive(Default)]
pub(super) struct KeptKv {
    pub target: Option<KvCache>,
    pub draft: Option<KvCache>,
    pub base: Option<KvStates>,
}

impl Roles<'_> {
    pub(super) fn parts(&mut self) -> (&mut dyn Target, &mut dyn Proposer) {
        match self {
            Roles::Plain(target, proposer, _) => (target, proposer),
            Roles::Draft(target, proposer) => (target, proposer),
            Roles::Lookup(target, proposer, _) => (target, proposer),
            Roles::MultiToken(target, proposer, _) => (target, proposer),
        }
    }

    /// The request's statistics of its proposals go to `run`; returns the caches it leaves.
    pub(super) fn finish(self, run: &mut Run, stats: SpeculativeStats) -> Option<CachedKv> {
        match self {
            Roles::Plain(target, _, draft) => Some(CachedKv::Decoder { target: target.cache, draft }),
            Roles::Draft(target, proposer) => {
                run.speculative = Some(stats);
                Some(CachedKv::Decoder { target: target.cache, draft: Some(proposer.into_cache()) })
            }
            Roles::Lookup(target, _, draft) => {
                run.speculative = Some(stats);
                Some(CachedKv::Decoder { target: target.cache, draft })
            }
            Roles::MultiToken(target, proposer, settings) => {
                let verify = settings.mode == Mode::Verify;
                run.multitoken = Some(MultiTokenStats {
                    mode: settings.mode,
                    base_forwards: run.target_forwards,
                    micro_forwards: proposer.forwards,
                    kv_entries: target.len(),
                    drafted: if verify { stats.draft_tokens } else { 0 },
                    accepted: if verify { stats.accepted_tokens } else { 0 },
                    steps_by_cost: proposer.steps_by_cost,
                    base_time: target.time,
                    micro_time: proposer.time,
                });
                target.into_kv().map(CachedKv::Base)
            }
        }
    }
}
