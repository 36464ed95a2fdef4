//! One request's run, and the types that the decode driver and its proposers share: what the
//! caller asked for, the cancel token, why it ended, its statistics. Below the driver and the
//! proposers, so that they import it and not the engine that builds them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::constraint::Constraint;
use super::graph::SharedRunOptions;
use super::sampler::{Sampler, SamplingParams};
use super::text::{Piece, StopText};
use crate::error::Result;
use crate::model::grammar::OutputGrammar;
use crate::model::multitoken_contract::Mode;
use crate::model::{Detokenizer, ModelFolder};
use crate::runtime::ProviderReport;

/// What a caller asks for, already validated at the edge; `None` means the model's default.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Ends the request with `FinishReason::Timeout` when passed.
    pub deadline: Option<Instant>,
    /// Speculative decoding for a model with a draft: on unless `Some(false)`.
    pub speculative: Option<bool>,
    /// Prompt lookup drafting (models without a draft): the model's setting unless given.
    pub prompt_lookup: Option<bool>,
    /// Multi-token models: mode, threshold and step maximum for this request.
    pub multitoken_mode: Option<Mode>,
    pub multitoken_threshold: Option<f32>,
    pub multitoken_max_tokens: Option<usize>,
    /// The grammar the output must match (`json_schema` or `grammar`).
    pub grammar: Option<OutputGrammar>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length.
    Length,
    Cancelled,
    Timeout,
    /// The request failed (the engine returned an error, or its model did not load): the
    /// scheduler's `Finished` carries the typed error. The engine itself never ends with it.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
            FinishReason::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token: Duration,
    pub total_time: Duration,
    pub decode_tokens_per_s: f64,
    pub provider: String,
    /// Forward passes of the (target) model, prefill included.
    pub target_forwards: usize,
    pub speculative: Option<SpeculativeStats>,
    pub multitoken: Option<MultiTokenStats>,
    /// Time in the queue before the engine took the request (the scheduler fills it in; the
    /// other times start when the engine takes it).
    pub queued: Duration,
    /// Time a background request spent paused for interactive ones (the scheduler fills it in).
    pub paused: Duration,
    /// Prompt tokens whose KV was kept from an earlier request and not prefilled again.
    pub cached_prompt_tokens: usize,
}

/// Counters of speculative decoding for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpeculativeStats {
    /// Draft tokens proposed (and checked by the target).
    pub draft_tokens: usize,
    /// Draft tokens the target judged: those accepted and the first rejected of each round
    /// (the ones after it were never looked at).
    pub evaluated_tokens: usize,
    /// Draft tokens the target accepted.
    pub accepted_tokens: usize,
    /// Wall time in draft forwards and in target forwards after the prefill (verifications, and
    /// steps the proposer left to the target alone).
    pub draft_time: Duration,
    pub verify_time: Duration,
    /// Rounds by how many drafts were accepted (index = accepted count, up to 16).
    pub accepted_per_round: [usize; 17],
    /// Greedy positions re-decided by a single-token forward because of a near tie.
    pub near_tie_recomputes: usize,
    /// Of those, the ones inside a round whose token was the draft's: the rows verified after
    /// it still counted.
    pub near_ties_inside: usize,
    /// The near-tie margin greedy verification used last (`TieMargin`: learnt per target).
    pub tie_margin: f32,
}

impl SpeculativeStats {
    /// Accepted / judged draft tokens (as onnxruntime-genai's `get_speculative_stats` counts).
    pub fn acceptance_rate(&self) -> f64 {
        if self.evaluated_tokens == 0 {
            0.0
        } else {
            self.accepted_tokens as f64 / self.evaluated_tokens as f64
        }
    }

    /// A verified round: `accepted` of its `proposed` drafts.
    pub(crate) fn count_round(&mut self, proposed: usize, accepted: usize) {
        self.draft_tokens += proposed;
        self.accepted_tokens += accepted;
        self.evaluated_tokens += (accepted + 1).min(proposed);
        self.accepted_per_round[accepted.min(16)] += 1;
    }
}

/// Counters of one multi-token request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiTokenStats {
    pub mode: Mode,
    /// Base forwards, the prefill included: every one emits the first token of a step.
    pub base_forwards: usize,
    /// Micro-decoder forwards.
    pub micro_forwards: usize,
    /// Entries in the base's KV cache at the end, the prompt's included.
    pub kv_entries: usize,
    /// Verify mode: micro tokens proposed and accepted by the base.
    pub drafted: usize,
    pub accepted: usize,
    /// Verify mode: steps whose micro tokens were sent by what they are worth (`decode::draft_length`),
    /// not by the stop head (0 with a threshold asked for, and until the costs are measured).
    pub steps_by_cost: usize,
    pub base_time: Duration,
    pub micro_time: Duration,
}

impl MultiTokenStats {
    /// Generated tokens per base forward.
    pub fn tokens_per_step(&self, generated: usize) -> f64 {
        if self.base_forwards == 0 {
            0.0
        } else {
            generated as f64 / self.base_forwards as f64
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub text: String,
    /// Generated ids, without the end-of-sequence token.
    pub token_ids: Vec<u32>,
    /// The end-of-sequence token that ended generation, if one did.
    pub eos_token: Option<u32>,
    pub reason: FinishReason,
    pub stats: GenerationStats,
}

/// Cancels one request from any thread: checked at every engine step, and a running forward
/// (a long prefill) is interrupted through ONNX Runtime's run termination.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    /// The run options of every session the request runs (a target and its draft).
    running: Mutex<Vec<SharedRunOptions>>,
    /// Told of every engine step (the caller's watchdog counts them as progress).
    on_step: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    /// A token that also calls `on_step` at every engine step of the request (its prefill
    /// included), whether or not the step releases text: held-back text (a possible stop string,
    /// an unfinished character) is progress too.
    pub fn with_progress(on_step: Arc<dyn Fn() + Send + Sync>) -> Self {
        CancelToken { inner: Arc::new(CancelInner { on_step: Some(on_step), ..Default::default() }) }
    }
    pub(crate) fn step(&self) {
        if let Some(on_step) = &self.inner.on_step {
            on_step();
        }
    }
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        for run in self.inner.running.lock().expect("cancel lock").iter() {
            let _ = run.terminate();
        }
    }
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }
    pub(crate) fn attach(&self, run: &SharedRunOptions) {
        self.inner.running.lock().expect("cancel lock").push(run.clone());
        if self.is_cancelled() {
            let _ = run.terminate();
        }
    }
}

/// The state of one request's output: tokens, streamed text, stop conditions, counters.
pub(crate) struct Run {
    pub(crate) sequence: Vec<u32>,
    pub(crate) prompt_len: usize,
    pub(crate) generated: Vec<u32>,
    eos_token: Option<u32>,
    eos_ids: Vec<u32>,
    pub(crate) sampler: Sampler,
    detok: Detokenizer,
    stop: StopText,
    started: Instant,
    first_token_at: Option<Duration>,
    pub(crate) max_new: usize,
    context: usize,
    deadline: Option<Instant>,
    pub(crate) target_forwards: usize,
    pub(crate) speculative: Option<SpeculativeStats>,
    pub(crate) multitoken: Option<MultiTokenStats>,
    /// The output constraint, advanced with every accepted token.
    constraint: Option<Constraint>,
    /// Prompt positions the target's cache held from an earlier request.
    pub(crate) cached_prompt_tokens: usize,
}

impl Run {
    pub(crate) fn new(
        folder: &ModelFolder,
        prompt_ids: Vec<u32>,
        params: SamplingParams,
        options: &GenerateOptions,
        max_new: usize,
        context: usize,
    ) -> Run {
        Run {
            prompt_len: prompt_ids.len(),
            detok: Detokenizer::continuing(&prompt_ids),
            sequence: prompt_ids,
            generated: Vec::new(),
            eos_token: None,
            eos_ids: folder.config.eos_token_ids.clone(),
            sampler: Sampler::new(params),
            stop: StopText::new(options.stop.clone()),
            started: Instant::now(),
            first_token_at: None,
            max_new,
            context,
            deadline: options.deadline,
            target_forwards: 0,
            speculative: None,
            multitoken: None,
            constraint: None,
            cached_prompt_tokens: 0,
        }
    }

    /// Constrains the output to what `matcher` accepts.
    pub(crate) fn constrain(&mut self, matcher: llguidance::Matcher, option: &'static str) {
        self.constraint = Some(Constraint::new(matcher, option));
    }

    /// Masks the logits of the position after the sequence and then `ahead` (proposed tokens not
    /// yet accepted) to what the output constraint allows; nothing without one.
    pub(crate) fn mask(&mut self, logits: &mut [f32], ahead: &[u32]) -> Result<()> {
        match &mut self.constraint {
            Some(c) => c.mask(logits, ahead),
            None => Ok(()),
        }
    }

    /// Masks verification rows (row i follows `drafts[..i]`).
    pub(crate) fn mask_rows(&mut self, rows: &mut [Vec<f32>], drafts: &[u32]) -> Result<()> {
        match &mut self.constraint {
            Some(c) => c.mask_rows(rows, drafts),
            None => Ok(()),
        }
    }

    /// How many of `drafts` the output constraint allows (all without one): drafts past that
    /// could never be accepted, so they are not verified.
    pub(crate) fn allowed_drafts(&mut self, drafts: &[u32]) -> Result<usize> {
        match &mut self.constraint {
            Some(c) => c.allowed_prefix(drafts),
            None => Ok(drafts.len()),
        }
    }

    /// Takes one generated token; returns the reason to stop, if it ends the request.
    pub(crate) fn accept(
        &mut self,
        folder: &ModelFolder,
        token: u32,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Option<FinishReason>> {
        if self.first_token_at.is_none() {
            self.first_token_at = Some(self.started.elapsed());
        }
        if self.eos_ids.contains(&token) {
            self.eos_token = Some(token);
            return Ok(Some(FinishReason::Stop));
        }
        if let Some(c) = &mut self.constraint {
            c.accept(token)?;
        }
        self.generated.push(token);
        self.sequence.push(token);
        let piece = self.detok.push(&folder.tokenizer, token)?;
        match self.stop.push(&piece) {
            Piece::Text(text) => {
                if !text.is_empty() && !on_text(&text) {
                    return Ok(Some(FinishReason::Cancelled));
                }
            }
            Piece::Stopped(text) => {
                if !text.is_empty() {
                    on_text(&text);
                }
                return Ok(Some(FinishReason::Stop));
            }
        }
        Ok((self.generated.len() >= self.max_new).then_some(FinishReason::Length))
    }

    /// Tokens the sequence may still grow by: it never holds more than the context's length.
    pub(crate) fn context_left(&self) -> usize {
        self.context.saturating_sub(self.sequence.len())
    }

    /// New tokens the request may still produce.
    pub(crate) fn tokens_left(&self) -> usize {
        self.max_new.saturating_sub(self.generated.len())
    }

    /// Checked before every engine step after the prefill: the context full, cancelled, past the
    /// deadline. The step is reported to the caller's progress hook here.
    pub(crate) fn should_stop(&self, cancel: &CancelToken) -> Option<FinishReason> {
        if self.sequence.len() >= self.context {
            cancel.step();
            return Some(FinishReason::Length);
        }
        self.interrupted(cancel)
    }

    /// Cancelled or past the deadline, checked between engine steps (prefill chunks included),
    /// each reported to the caller's progress hook.
    pub(crate) fn interrupted(&self, cancel: &CancelToken) -> Option<FinishReason> {
        cancel.step();
        if cancel.is_cancelled() {
            Some(FinishReason::Cancelled)
        } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(FinishReason::Timeout)
        } else {
            None
        }
    }

    /// Whether `token` ends the sequence (a proposer stops drafting there).
    pub(crate) fn is_eos(&self, token: u32) -> bool {
        self.eos_ids.contains(&token)
    }

    /// Releases text held back for a possible stop string or an unfinished character (unless a
    /// stop string ended the text) and builds the outcome.
    pub(crate) fn end(
        mut self,
        folder: &ModelFolder,
        mut reason: FinishReason,
        on_text: &mut dyn FnMut(&str) -> bool,
        provider: &ProviderReport,
    ) -> Result<Outcome> {
        let stopped_by_string = reason == FinishReason::Stop && self.eos_token.is_none();
        if !stopped_by_string {
            let tail = self.detok.flush(&folder.tokenizer)?;
            let rest = match self.stop.push(&tail) {
                Piece::Text(text) => text + &self.stop.finish(),
                Piece::Stopped(text) => {
                    reason = FinishReason::Stop;
                    text
                }
            };
            if !rest.is_empty() && !on_text(&rest) && reason == FinishReason::Length {
                reason = FinishReason::Cancelled;
            }
        }
        let total = self.started.elapsed();
        let first = self.first_token_at.unwrap_or(total);
        let decode_time = total.saturating_sub(first).as_secs_f64();
        let n = self.generated.len() + self.eos_token.is_some() as usize;
        let decode_tokens_per_s = if n > 1 && decode_time > 0.0 { (n - 1) as f64 / decode_time } else { 0.0 };
        Ok(Outcome {
            text: self.stop.text().to_string(),
            token_ids: self.generated,
            eos_token: self.eos_token,
            reason,
            stats: GenerationStats {
                prompt_tokens: self.prompt_len,
                generated_tokens: n,
                time_to_first_token: first,
                total_time: total,
                decode_tokens_per_s,
                provider: provider.provider.name().to_string(),
                target_forwards: self.target_forwards,
                speculative: self.speculative,
                multitoken: self.multitoken,
                queued: Duration::ZERO,
                paused: Duration::ZERO,
                cached_prompt_tokens: self.cached_prompt_tokens,
            },
        })
    }
}
