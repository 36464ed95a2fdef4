//! HAMburger-style multi-token steps (Accelerating LLM Inference via Token Smashing, 2025).
//!
//! A model in this contract (`multitoken_config.json` beside `genai_config.json`, documented in
//! models/README.md) has three graphs:
//! - embedder: the tokens of one step -> one input embedding (a one-token step is its plain
//!   embedding; the prompt goes in one token per step);
//! - base: the LLM on `inputs_embeds`, returning `logits`, the tapped `hidden_states`
//!   `[1,S,F,D]`, the stop head's `stop_logits` for the step's first token, and `present.*`;
//! - micro: the micro-step decoder, `[features..., emb(t_i-1)]` with its own KV (reset every
//!   step) -> `logits` of t_i and `stop_logits` (the step ends after t_i).
//!
//! Two modes:
//! - `Trust`: one base forward ("macro step") per step of 1..max tokens; the step's tokens are
//!   merged into one embedding, so the base stores one KV entry per step. Lossy but trained.
//! - `Verify`: the micro tokens are drafts that the base checks in its next forward, one KV
//!   entry per token, as in Medusa/EAGLE: the output is the base's own (greedy: identical; sampled:
//!   the base's distribution, by the rule of speculative sampling).

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ort::value::{DynValue, Tensor};

use crate::decode::draft_length::{CostModel, RoundCosts};
use crate::decode::proposer::{Policy, Proposal, Proposer};
use crate::decode::target::{RowState, Target};
use crate::decode::graph::SharedRunOptions;
use crate::decode::graph::{float_tensor, floats, Graph, KvStates, Precision};
use crate::decode::run::{CancelToken, Run};
use crate::decode::sampler::SamplingParams;
use crate::decode::tie_margin::TieMargin;
use crate::decode::verify::{penalised_argmax, row_distribution};
use crate::error::{Error, Result};
use crate::model::DecoderNames;
use crate::runtime::{ProviderReport, Runtime, SessionOptions};

pub use crate::decode::run::MultiTokenStats;
pub use crate::model::multitoken_contract::{Contract, Mode, Settings, CONTRACT_FILE};

/// What one base forward returns for its last rows.
struct BaseOut {
    /// `rows x vocab`, row-major.
    logits: Vec<f32>,
    /// `rows x (F*D)`: the tapped states of each row, flattened.
    features: Vec<f32>,
    /// The stop head on each row (the step ends after the token that row emits).
    stop_logits: Vec<f32>,
}

/// The embedder and the base: the LLM that takes steps of one or more tokens.
struct BaseGraphs {
    embedder: Graph,
    base: Graph,
    /// Of the base's past inputs.
    kv_precision: Precision,
    past: Vec<String>,
    kv_heads: usize,
    head_size: usize,
    vocab: usize,
    /// The near-tie margin of the base's verify rows, learnt from its re-checks.
    ties: Mutex<TieMargin>,
}

/// The micro-step decoder, with its own KV (reset every step).
struct MicroGraph {
    graph: Graph,
    /// Of its `features` input and its past inputs.
    features_precision: Precision,
    kv_precision: Precision,
    past: Vec<String>,
    kv_heads: usize,
    head_size: usize,
    /// Rows F of tapped states it takes.
    features: usize,
}

pub struct MultiTokenModel {
    graphs: BaseGraphs,
    micro: MicroGraph,
    /// What verify mode's micro drafts cost and are worth, learnt across requests.
    costs: Mutex<CostModel>,
    pub contract: Contract,
    pub provider: ProviderReport,
}

fn strs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Whether a step goes on after a token whose stop logit is `stop_logit`.
fn continues(stop_logit: f32, threshold: f32) -> bool {
    threshold < 1.0 && 1.0 - sigmoid(stop_logit) >= threshold
}

/// Empty past tensors, one per name (`key` and `value` of each layer).
fn empty_kv(precision: Precision, names: usize, heads: usize, head: usize) -> Result<Vec<DynValue>> {
    (0..names).map(|_| float_tensor(precision, vec![1, heads, 0, head], &[])).collect()
}

/// The float type the graph declares for input `name`.
fn input_precision(graph: &Graph, name: &str) -> Result<Precision> {
    Precision::of(graph.input_type(name).ok_or_else(|| Error::Inference(format!("no input {name}")))?, name)
}

/// The shape of a run's output value.
fn shape_of(value: &DynValue) -> Vec<usize> {
    value.dtype().tensor_shape().map(|s| s.iter().map(|&d| d.max(0) as usize).collect()).unwrap_or_default()
}

impl MultiTokenModel {
    pub fn load(
        runtime: &Runtime,
        dir: &Path,
        config: &crate::model::GenaiConfig,
        contract: &Contract,
        options: &SessionOptions,
    ) -> Result<MultiTokenModel> {
        let (base, provider) = runtime.session(&dir.join(&contract.base_file), options)?;
        // Three sessions would make three intra-op pools whose threads spin against each other.
        // The embedder and the micro decoder run small forwards (one step, one to four
        // positions): on the calling thread alone they are faster than with pools of their own.
        let single = SessionOptions { threads: 1, ..options.clone() };
        let (embedder, _) = runtime.session(&dir.join(&contract.embedder_file), &single)?;
        let (micro, _) = runtime.session(&dir.join(&contract.micro_file), &single)?;
        // The names: the base's own from genai_config, the rest from the contract.
        let names = &config.names;
        let c = &contract.names;
        let (base_past, base_present) = names.kv_names(config.num_layers);
        let layers = |key: &str, value: &str| -> Vec<String> {
            (0..contract.micro_layers).flat_map(|l| [DecoderNames::layer(key, l), DecoderNames::layer(value, l)]).collect()
        };
        let micro_past = layers(&c.micro_past_key, &c.micro_past_value);
        let micro_present = layers(&c.micro_present_key, &c.micro_present_value);
        let listed = |fixed: &[&str], layers: &[String]| -> Vec<String> {
            fixed.iter().map(|s| s.to_string()).chain(layers.iter().cloned()).collect()
        };
        let inputs_embeds = names.inputs_embeds.clone().unwrap_or_else(|| c.inputs_embeds.clone());
        let embedder = Graph::new(embedder, &dir.join(&contract.embedder_file), &[&c.step_ids, &c.step_lengths], &[&c.inputs_embeds])?;
        let base_in = listed(&[&inputs_embeds, &names.attention_mask, &names.position_ids], &base_past);
        let base_out = listed(&[&names.logits, &c.hidden_states, &c.stop_logits], &base_present);
        let base = Graph::new(base, &dir.join(&contract.base_file), &strs(&base_in), &strs(&base_out))?;
        let micro_in = listed(&[&c.micro_features, &c.micro_input_ids], &micro_past);
        let micro_out = listed(&[&c.micro_logits, &c.micro_stop_logits], &micro_present);
        let micro = Graph::new(micro, &dir.join(&contract.micro_file), &strs(&micro_in), &strs(&micro_out))?;
        let base_kv = match base_past.first() {
            Some(name) => input_precision(&base, name)?,
            None => Precision::F32,
        };
        let micro_kv = match micro_past.first() {
            Some(name) => input_precision(&micro, name)?,
            None => Precision::F32,
        };
        let features_precision = input_precision(&micro, &c.micro_features)?;
        Ok(MultiTokenModel {
            graphs: BaseGraphs {
                embedder,
                base,
                kv_precision: base_kv,
                past: base_past,
                kv_heads: config.num_kv_heads,
                head_size: config.head_size,
                vocab: config.vocab_size,
                ties: Mutex::new(if provider.int4.rows_exact() { TieMargin::exact() } else { TieMargin::default() }),
            },
            micro: MicroGraph {
                graph: micro,
                features_precision,
                kv_precision: micro_kv,
                past: micro_past,
                kv_heads: contract.micro_kv_heads,
                head_size: contract.micro_head_size,
                features: contract.features,
            },
            costs: Mutex::new(CostModel::new()),
            contract: contract.clone(),
            provider,
        })
    }

    /// Settings of a request: the model's defaults, checked against the contract's maximum.
    pub fn default_settings(&self) -> Settings {
        Settings {
            mode: Mode::Trust,
            threshold: self.contract.threshold,
            max_tokens: self.contract.max_tokens_per_step,
            verify_by_cost: true,
        }
    }

    pub fn vocab(&self) -> usize {
        self.graphs.vocab
    }

    /// Logits of the last `rows` positions of `ids` from the base alone (one token per step):
    /// for tests and quality measurements.
    pub fn sequence_logits(&mut self, ids: &[u32], rows: usize) -> Result<Vec<Vec<f32>>> {
        let run = SharedRunOptions::new()?;
        let mut kv = self.graphs.new_kv()?;
        let steps: Vec<&[u32]> = ids.chunks(1).collect();
        let positions: Vec<usize> = (0..ids.len()).collect();
        let out = self.graphs.forward(&mut kv, &steps, &positions, rows, &run)?;
        Ok(out.logits.chunks(self.graphs.vocab).map(<[f32]>::to_vec).collect())
    }

    pub fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.sequence_logits(ids, 1)?.pop().expect("one row"))
    }

    /// The request's two halves for the decode driver: the base as its target (with a KV cache
    /// for this request) and the micro decoder as its proposer, in `settings.mode`. Their runs
    /// are terminated with `cancel`.
    /// `kept`: the base's KV from an earlier request, one entry per token of a prefix of the
    /// prompt.
    pub(crate) fn split(
        &self,
        settings: Settings,
        cancel: &CancelToken,
        kept: Option<KvStates>,
    ) -> Result<(BaseTarget<'_>, MicroProposer<'_>)> {
        let options = SharedRunOptions::new()?;
        cancel.attach(&options);
        let kv = match kept {
            Some(kv) => kv,
            None => self.graphs.new_kv()?,
        };
        let target = BaseTarget {
            graphs: &self.graphs,
            next_position: kv.len(),
            kv,
            merged_from: None,
            out: BaseOut { logits: Vec::new(), features: Vec::new(), stop_logits: Vec::new() },
            selected: 0,
            options: options.clone(),
            time: Duration::ZERO,
        };
        let proposer = MicroProposer {
            micro: &self.micro,
            settings,
            options,
            forwards: 0,
            time: Duration::ZERO,
            steps_by_cost: 0,
            hidden: 0,
            costs: &self.costs,
            round: RoundCosts::default(),
        };
        Ok((target, proposer))
    }
}

impl BaseGraphs {
    /// The base's KV: growing tensors (present outputs become the next past inputs).
    fn new_kv(&self) -> Result<KvStates> {
        let values = empty_kv(self.kv_precision, self.past.len(), self.kv_heads, self.head_size)?;
        Ok(KvStates::new(&self.base, values, vec![Some(2); self.past.len()]))
    }

    /// Embeddings of `steps` (each 1..=max tokens), `[1, steps, D]`.
    fn embed(&self, steps: &[&[u32]], run: &SharedRunOptions) -> Result<DynValue> {
        let width = steps.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut ids = vec![0i64; steps.len() * width];
        for (row, step) in steps.iter().enumerate() {
            for (col, &t) in step.iter().enumerate() {
                ids[row * width + col] = t as i64;
            }
        }
        let lengths: Vec<i64> = steps.iter().map(|s| s.len() as i64).collect();
        let ids = Tensor::from_array(([steps.len(), width], ids))?.into_dyn();
        let lengths = Tensor::from_array(([steps.len()], lengths))?.into_dyn();
        Ok(self.embedder.run(run, &[&ids, &lengths])?.remove(0))
    }

    /// One base forward over `steps` (each becomes one KV entry) at `positions`; returns the
    /// last `rows` rows.
    fn forward(&self, kv: &mut KvStates, steps: &[&[u32]], positions: &[usize], rows: usize, run: &SharedRunOptions) -> Result<BaseOut> {
        let embeds = self.embed(steps, run)?;
        let n = steps.len();
        kv.check_owner(&self.base)?;
        let total = kv.len() + n;
        let mask = Tensor::from_array(([1, total], vec![1i64; total]))?.into_dyn();
        let pos: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let pos = Tensor::from_array(([1, n], pos))?.into_dyn();
        let mut inputs: Vec<&DynValue> = vec![&embeds, &mask, &pos];
        inputs.extend(kv.values.iter());
        let mut outputs = self.base.run(run, &inputs)?.into_iter();
        let (logits, hidden, stop) = (outputs.next().expect("logits"), outputs.next().expect("hidden"), outputs.next().expect("stop"));
        let rows = rows.min(n);
        let hshape = shape_of(&hidden);
        let width = hshape[2] * hshape[3];
        let out = BaseOut {
            logits: floats(&logits)?[(n - rows) * self.vocab..n * self.vocab].to_vec(),
            features: floats(&hidden)?[(n - rows) * width..n * width].to_vec(),
            stop_logits: floats(&stop)?[n - rows..n].to_vec(),
        };
        for (slot, present) in kv.values.iter_mut().zip(outputs) {
            *slot = present;
        }
        kv.grew(n);
        Ok(out)
    }
}

impl MicroGraph {
    fn new_kv(&self) -> Result<KvStates> {
        let values = empty_kv(self.kv_precision, self.past.len(), self.kv_heads, self.head_size)?;
        Ok(KvStates::new(&self.graph, values, vec![Some(2); self.past.len()]))
    }

    /// One micro step: appends `features` (first call of a step; empty later) and `token` to
    /// the micro decoder's KV; returns the logits of the next token and its stop logit.
    /// `hidden` is the width D of one tapped state, learnt from the first features seen.
    fn forward(
        &self,
        kv: &mut KvStates,
        features: &[f32],
        token: u32,
        run: &SharedRunOptions,
        hidden: &mut usize,
    ) -> Result<(Vec<f32>, f32)> {
        let rows = if features.is_empty() { 0 } else { self.features };
        // Every step's first micro call carries the features, so the width is known by the
        // calls that carry none.
        if let Some(width) = features.len().checked_div(rows) {
            *hidden = width;
        }
        let width = *hidden;
        let features = float_tensor(self.features_precision, vec![1, rows, width], features)?;
        let token = Tensor::from_array(([1, 1], vec![token as i64]))?.into_dyn();
        let mut inputs: Vec<&DynValue> = vec![&features, &token];
        kv.check_owner(&self.graph)?;
        inputs.extend(kv.values.iter());
        let mut outputs = self.graph.run(run, &inputs)?.into_iter();
        let (logits, stop) = (outputs.next().expect("logits"), outputs.next().expect("stop"));
        let (logits, stop) = (floats(&logits)?.into_owned(), floats(&stop)?[0]);
        for (slot, present) in kv.values.iter_mut().zip(outputs) {
            *slot = present;
        }
        kv.grew(rows + 1);
        Ok((logits, stop))
    }
}

/// The base as the decode driver's target: one KV entry per step, a step being one token
/// (the prompt, verified drafts) or a merged trusted step.
pub(crate) struct BaseTarget<'m> {
    graphs: &'m BaseGraphs,
    kv: KvStates,
    /// The sequence position of the next token: a merged step of n tokens takes n positions
    /// and one KV entry.
    next_position: usize,
    /// KV entries before the first merged step of several tokens: past it, entries no longer
    /// match positions (no rollback there, and nothing kept for the next request).
    merged_from: Option<usize>,
    out: BaseOut,
    selected: usize,
    options: SharedRunOptions,
    /// Time in base forwards.
    pub(crate) time: Duration,
}

impl BaseTarget<'_> {
    fn run(&mut self, steps: &[&[u32]], positions: &[usize], rows: usize) -> Result<&mut [f32]> {
        let started = Instant::now();
        self.out = self.graphs.forward(&mut self.kv, steps, positions, rows, &self.options)?;
        self.time += started.elapsed();
        self.selected = self.out.stop_logits.len() - 1;
        Ok(&mut self.out.logits)
    }
}

impl BaseTarget<'_> {
    /// Its KV up to the first merged step, for the next request of the same caller: there each
    /// entry is one token at its position, as a prefill computes it.
    pub(crate) fn into_kv(mut self) -> Option<KvStates> {
        let keep = self.merged_from.unwrap_or(self.kv.len());
        self.kv.truncate(keep, true).ok()?;
        Some(self.kv)
    }
}

impl Target for BaseTarget<'_> {
    fn vocab(&self) -> usize {
        self.graphs.vocab
    }
    fn len(&self) -> usize {
        self.kv.len()
    }
    fn forward(&mut self, ids: &[u32], rows: usize) -> Result<&mut [f32]> {
        let steps: Vec<&[u32]> = ids.chunks(1).collect();
        let positions: Vec<usize> = (self.next_position..self.next_position + ids.len()).collect();
        self.next_position += ids.len();
        self.run(&steps, &positions, rows)
    }
    fn forward_merged(&mut self, ids: &[u32]) -> Result<&mut [f32]> {
        // The whole step as one embedding, one KV entry, at the position of its last token (the
        // reference's training path).
        // A one-token step is the token's plain embedding at its own position, as `forward`.
        let position = self.next_position + ids.len() - 1;
        self.next_position += ids.len();
        if ids.len() > 1 && self.merged_from.is_none() {
            self.merged_from = Some(self.kv.len());
        }
        self.run(&[ids], &[position], 1)
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        if self.merged_from.is_some_and(|from| len > from) {
            return Err(Error::Inference("a KV cache cannot be rolled back into merged steps".into()));
        }
        if len < self.kv.len() {
            self.kv.truncate(len, true)?;
            self.next_position = len;
            self.merged_from = None;
        }
        Ok(())
    }
    fn select_row(&mut self, row: usize) {
        self.selected = row;
    }
    fn tie_margin(&self) -> f32 {
        self.graphs.ties.lock().unwrap_or_else(|e| e.into_inner()).margin()
    }
    fn observe_tie(&mut self, batched: &[f32], single: &[f32]) {
        self.graphs.ties.lock().unwrap_or_else(|e| e.into_inner()).observe(batched, single);
    }
    fn row_state(&self) -> Option<RowState<'_>> {
        let width = self.out.features.len() / self.out.stop_logits.len().max(1);
        let row = self.selected;
        Some(RowState { hidden: &self.out.features[row * width..(row + 1) * width], stop_logit: *self.out.stop_logits.get(row)? })
    }
}

/// The micro decoder as a proposer: in trust mode its tokens are the step's own (HAMburger),
/// in verify mode drafts the base checks (as Medusa or EAGLE heads).
pub(crate) struct MicroProposer<'m> {
    micro: &'m MicroGraph,
    settings: Settings,
    options: SharedRunOptions,
    pub(crate) forwards: usize,
    pub(crate) time: Duration,
    pub(crate) steps_by_cost: usize,
    /// The width of one tapped state, learnt from the first features of the request.
    hidden: usize,
    /// Verify mode's length rule, as a draft model's (`decode::draft_length`).
    costs: &'m Mutex<CostModel>,
    round: RoundCosts,
}

fn lock(costs: &Mutex<CostModel>) -> std::sync::MutexGuard<'_, CostModel> {
    costs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Proposer for MicroProposer<'_> {
    fn policy(&self) -> Policy {
        match self.settings.mode {
            Mode::Trust => Policy::Trust,
            Mode::Verify => Policy::Verify,
        }
    }

    fn propose(&mut self, run: &mut Run, row: Option<RowState<'_>>, limit: usize) -> Result<Proposal> {
        let threshold = self.settings.threshold;
        let params = run.sampler.params().clone();
        let greedy = params.is_greedy();
        // Greedy verify mode's lengths by what drafts are worth once their costs are known (the
        // stop head then unused: the output is the base's either way); by the stop head until
        // then. Sampled requests keep the stop head: on the bundled compute-bound model the rule
        // sends too few drafts for a test of the sampled law to have power.
        let verify = self.settings.mode == Mode::Verify;
        if verify {
            self.round.begin(&mut lock(self.costs), &run.sequence);
        }
        let by_cost = verify && self.settings.verify_by_cost && greedy && lock(self.costs).ready();
        if by_cost {
            self.steps_by_cost += 1;
            if !lock(self.costs).drafts_now() {
                return Ok(Proposal::default());
            }
        }
        // The step's first token is the base's, so the micro decoder adds at most max - 1.
        let want = self.settings.max_tokens.saturating_sub(1).min(limit);
        let Some(row) = row.filter(|row| want > 0 && (by_cost || continues(row.stop_logit, threshold))) else {
            return Ok(Proposal::default());
        };
        let started = Instant::now();
        if verify {
            self.round.timed(started);
        }
        let mut kv = self.micro.new_kv()?;
        let mut features: &[f32] = row.hidden;
        let mut last = *run.sequence.last().expect("a token was accepted");
        let mut seen = run.sequence.clone();
        let mut proposal = Proposal::default();
        let mut chain = 1.0;
        let mut micro_forwards = 0;
        while proposal.tokens.len() < want {
            let (mut logits, stop) = self.micro.forward(&mut kv, features, last, &self.options, &mut self.hidden)?;
            self.forwards += 1;
            micro_forwards += 1;
            features = &[];
            let (token, confidence) = match self.settings.mode {
                // The model's own output in this mode: sampled as the base's tokens are.
                Mode::Trust => {
                    // Committed unchecked: the output constraint masks it here.
                    run.mask(&mut logits, &proposal.tokens)?;
                    (run.sampler.next(&mut logits, &seen), 1.0)
                }
                Mode::Verify if greedy => {
                    let token = penalised_argmax(&logits, &seen, params.repetition_penalty);
                    let p = row_distribution(&logits, &seen, &SamplingParams { temperature: 1.0, ..params.clone() })[token as usize];
                    (token, p)
                }
                Mode::Verify => {
                    let q = row_distribution(&logits, &seen, &params);
                    // The row's peak, as a draft model's rounds record it.
                    let peak = q.iter().copied().fold(0.0, f32::max);
                    let token = run.sampler.draw(&q) as u32;
                    proposal.q_rows.push(q);
                    (token, peak)
                }
            };
            if by_cost && lock(self.costs).worth(proposal.tokens.len(), confidence, &mut chain) == Some(false) {
                self.round.withhold(run.sequence.len() + proposal.tokens.len(), token, confidence);
                break;
            }
            proposal.tokens.push(token);
            self.round.sent(confidence);
            seen.push(token);
            last = token;
            if run.is_eos(token) || (!by_cost && !continues(stop, threshold)) {
                break;
            }
        }
        if verify {
            lock(self.costs).drafted(micro_forwards, started.elapsed());
        }
        self.time += started.elapsed();
        Ok(proposal)
    }

    fn verified(&mut self, positions: usize, took: Duration) {
        if self.settings.mode == Mode::Verify {
            lock(self.costs).forward(positions, took);
        }
    }

    fn accepted(&mut self, _len: usize, proposed: usize, accepted: usize) -> Result<()> {
        if self.settings.mode != Mode::Verify {
            return Ok(());
        }
        self.round.judged(&mut lock(self.costs), proposed, accepted);
        Ok(())
    }

    fn max_tokens(&self) -> usize {
        self.settings.max_tokens.saturating_sub(1)
    }

    fn drafts(&self) -> bool {
        self.settings.mode == Mode::Verify
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"{"type":"hamburger","embedder":{"filename":"embedder.onnx"},"base":{"filename":"base.onnx"},
      "micro":{"filename":"micro.onnx","num_hidden_layers":2,"num_key_value_heads":2,"head_size":64},
      "features":3,"max_tokens_per_step":4,"threshold":0.9}"#;

    #[test]
    fn reads_the_contract_and_names_bad_fields() {
        let c = Contract::parse(Path::new("m/multitoken_config.json"), CONTRACT).unwrap();
        assert_eq!((c.micro_layers, c.features, c.max_tokens_per_step), (2, 3, 4));
        assert!((c.threshold - 0.9).abs() < 1e-6);
        let bad = CONTRACT.replace(r#""threshold":0.9"#, r#""threshold":1.5"#);
        let e = Contract::parse(Path::new("m/multitoken_config.json"), &bad).unwrap_err().to_string();
        assert!(e.contains("m/multitoken_config.json") && e.contains("threshold"), "{e}");
        assert_eq!((c.names.micro_features.as_str(), c.names.hidden_states.as_str()), ("features", "hidden_states"), "the defaults");
        let renamed = CONTRACT.replace(r#""micro":{"#, r#""micro":{"inputs":{"features":"taps"},"#);
        assert_eq!(Contract::parse(Path::new("m/multitoken_config.json"), &renamed).unwrap().names.micro_features, "taps");
        let bad = CONTRACT.replace(r#""micro":{"#, r#""micro":{"inputs":{"features":3},"#);
        let e = Contract::parse(Path::new("m/multitoken_config.json"), &bad).unwrap_err().to_string();
        assert!(e.contains("micro.inputs.features"), "{e}");
        let bad = CONTRACT.replace(r#""features":3,"#, "");
        let e = Contract::parse(Path::new("m/multitoken_config.json"), &bad).unwrap_err().to_string();
        assert!(e.contains("features") && e.contains("missing"), "{e}");
    }

    #[test]
    fn threshold_one_never_continues_and_zero_always_does() {
        assert!(!continues(-50.0, 1.0));
        assert!(continues(50.0, 0.0));
        assert!(continues(-3.0, 0.9)); // p(stop) 0.047: continue 0.953 >= 0.9
        assert!(!continues(-1.0, 0.9)); // p(stop) 0.27
    }
}
