//! Speculative decoding with a small draft model beside the target (Leviathan et al. 2023,
//! Chen et al. 2023): the draft proposes up to k tokens, the target scores them all in one
//! forward over k+1 positions, the accepted prefix plus one target token are emitted, and both
//! KV caches roll back to what was accepted.
//!
//! The proposers of drafts for the one decode loop (`crate::decode::driver`): `DraftProposer`
//! (the draft model) here and `lookup::PromptLookup`; their draft lengths are decided in
//! `crate::decode::draft_length`, and the verifier (`crate::decode::verify`) judges the drafts.
//! Greedy output is identical to the target alone; sampled output follows the target's
//! distribution.

use crate::decode::draft_length::{AdaptiveK, CostModel, RoundCosts};
use crate::decode::decoder::{Decoder, KvCache, KvLayout, LoadOptions};
use crate::decode::proposer::{Proposal, Proposer};
use crate::decode::target::RowState;
use crate::decode::run::{CancelToken, Run};
use crate::decode::sampler::SamplingParams;
use crate::decode::verify::{penalised_argmax, row_distribution};
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
    /// Choose each draft's length from what drafts are worth on this engine: the measured verify
    /// cost by positions, the draft's cost, the decoding rate, and the acceptance of draft tokens
    /// by the draft's confidence (`decode::draft_length::CostModel`); false: from acceptance alone (`AdaptiveK`).
    pub cost_aware: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { min_tokens: 1, max_tokens: 8, min_confidence: 0.0, cost_aware: true }
    }
}

/// The proposer: a small model with its own session, possibly on another execution provider.
pub struct Draft {
    decoder: Decoder,
    layout: KvLayout,
    settings: Settings,
    /// What drafts cost and are worth on this engine, learnt over its requests (one at a time).
    costs: std::sync::Mutex<CostModel>,
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
        Ok(Draft { decoder, layout, settings, costs: std::sync::Mutex::new(CostModel::new()) })
    }

    pub fn provider(&self) -> &ProviderReport {
        &self.decoder.provider
    }
}

/// The draft model as a proposer, with its own KV cache for this request.
pub(crate) struct DraftProposer<'d> {
    draft: &'d Draft,
    cache: KvCache,
    length: AdaptiveK,
    round: RoundCosts,
}

impl<'d> DraftProposer<'d> {
    /// `kept`: the draft's cache from an earlier request, holding a prefix of the prompt.
    pub(crate) fn new(draft: &'d Draft, positions: usize, cancel: &CancelToken, kept: Option<KvCache>) -> Result<Self> {
        let positions = positions + draft.settings.max_tokens + 1;
        let cache = match kept {
            Some(mut cache) => {
                cache.renew_run_options()?;
                cache.reserve(positions, draft.decoder.context())?;
                cache
            }
            None => draft.decoder.new_cache(draft.layout, positions)?,
        };
        // The draft's runs are terminated with the target's: its first catch-up is a prefill.
        cancel.attach(cache.run_options());
        let length = AdaptiveK::new(draft.settings.min_tokens, draft.settings.max_tokens);
        Ok(DraftProposer { draft, cache, length, round: RoundCosts::default() })
    }
}

impl DraftProposer<'_> {
    /// Its cache, for the next request of the same caller.
    pub(crate) fn into_cache(self) -> KvCache {
        self.cache
    }
}

impl Proposer for DraftProposer<'_> {
    fn propose(&mut self, run: &mut Run, _row: Option<RowState<'_>>, limit: usize) -> Result<Proposal> {
        let params = run.sampler.params().clone();
        let greedy = params.is_greedy();
        let settings = self.draft.settings;
        let mut costs = self.draft.costs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.round.begin(&mut costs, &run.sequence);
        // By what drafts are worth once their costs are known; by acceptance until then.
        let by_cost = settings.cost_aware && costs.ready();
        if by_cost && !costs.drafts_now() {
            // A paused draft: a plain step, not timed as a round with drafts.
            return Ok(Proposal::default());
        }
        let (k, min) = if by_cost { (settings.max_tokens.min(limit), 0) } else { (self.length.now(limit), self.length.min()) };
        let started = std::time::Instant::now();
        // The first catch-up is the prompt's prefill: not a draft token's cost.
        let timed = self.cache.len() + 2 >= run.sequence.len();
        if timed {
            self.round.timed(started);
        }
        let mut tokens: Vec<u32> = Vec::with_capacity(k);
        let mut q_rows: Vec<Vec<f32>> = Vec::new();
        let mut chain = 1.0;
        let mut drafted = 0;
        // The draft first catches up with what it has not seen (1 or 2 tokens; the prompt at first).
        let mut feed: Vec<u32> = run.sequence[self.cache.len()..].to_vec();
        while tokens.len() < k {
            let row = self.draft.decoder.forward(&mut self.cache, &feed, 1)?;
            drafted += 1;
            // What the repetition penalty looks at; only built when there is a penalty.
            let seen: Vec<u32> =
                if params.repetition_penalty == 1.0 { Vec::new() } else { run.sequence.iter().chain(&tokens).copied().collect() };
            // `peak`: the draft's probability of its likeliest token, known before a sampled
            // token is drawn. Whether this position gets a draft may depend on it, never on the
            // token drawn: that would bend the sampled law the verifier restores.
            let (token, confidence, peak, q) = if greedy {
                let t = penalised_argmax(&row, &seen, params.repetition_penalty);
                let confidence = if settings.min_confidence > 0.0 || settings.cost_aware {
                    row_distribution(&row, &seen, &SamplingParams { temperature: 1.0, ..params.clone() })[t as usize]
                } else {
                    1.0
                };
                (t, confidence, confidence, None)
            } else {
                let q = row_distribution(&row, &seen, &params);
                let peak = q.iter().copied().fold(0.0, f32::max);
                let t = run.sampler.draw(&q) as u32;
                (t, q[t as usize], peak, Some(q))
            };
            if by_cost && costs.worth(tokens.len(), peak, &mut chain) == Some(false) {
                if greedy {
                    self.round.withhold(run.sequence.len() + tokens.len(), token, confidence);
                }
                break;
            }
            tokens.push(token);
            q_rows.extend(q);
            self.round.sent(peak);
            feed = vec![token];
            if run.is_eos(token) || (confidence < settings.min_confidence && tokens.len() >= min) {
                break;
            }
        }
        drop(costs);
        if timed {
            self.draft.costs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).drafted(drafted, started.elapsed());
        }
        Ok(Proposal { tokens, q_rows })
    }

    fn verified(&mut self, positions: usize, took: std::time::Duration) {
        self.draft.costs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).forward(positions, took);
    }

    fn accepted(&mut self, len: usize, proposed: usize, accepted: usize) -> Result<()> {
        self.length.update(proposed, accepted);
        self.round.judged(&mut self.draft.costs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()), proposed, accepted);
        // The draft keeps no more than the target did (it may not have seen the last draft).
        let keep = len.min(self.cache.len());
        self.cache.truncate(keep)
    }

    fn max_tokens(&self) -> usize {
        self.draft.settings.max_tokens
    }
}
