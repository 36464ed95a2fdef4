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
use std::time::Instant;

use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::{DynValue, Tensor};

use crate::engine::decoder::{slice_positions, SharedRunOptions};
use crate::engine::run::{CancelToken, FinishReason, Run};
use crate::error::{Error, Result};
use crate::model::ModelFolder;
use crate::runtime::{ProviderReport, Runtime, SessionOptions};
use crate::speculative::{
    penalised_argmax, penalised_rows, row_distribution, row_distributions, verify_greedy_guarded, verify_sampled, GreedyVerdict, TIE_MARGIN,
};

pub mod contract;

pub use contract::{Contract, Mode, MultiTokenStats, Settings, CONTRACT_FILE};

/// The base's KV cache: growing tensors (present outputs become the next past inputs).
struct BaseKv {
    values: Vec<DynValue>,
    len: usize,
}

/// What one base forward returns for its last rows.
struct BaseOut {
    /// `rows x vocab`
    logits: Vec<Vec<f32>>,
    /// `rows x (F*D)`: the tapped states of each row, flattened.
    features: Vec<Vec<f32>>,
    /// The stop head on each row (the step ends after the token that row emits).
    stop_logits: Vec<f32>,
}

pub struct MultiTokenModel {
    embedder: Session,
    base: Session,
    micro: Session,
    pub contract: Contract,
    base_past: Vec<String>,
    base_present: Vec<String>,
    micro_past: Vec<String>,
    micro_present: Vec<String>,
    base_kv_heads: usize,
    head_size: usize,
    vocab: usize,
    /// Width D of one tapped state, learnt from the first features seen.
    hidden: usize,
    pub provider: ProviderReport,
}

fn layer_names(layers: usize, pattern: &str) -> Vec<String> {
    (0..layers).flat_map(|l| ["key", "value"].map(|kind| pattern.replace("%d", &l.to_string()).replace("%s", kind))).collect()
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Whether a step goes on after a token whose stop logit is `stop_logit`.
fn continues(stop_logit: f32, threshold: f32) -> bool {
    threshold < 1.0 && 1.0 - sigmoid(stop_logit) >= threshold
}

fn tensor_f32(outputs: &SessionOutputs<'_>, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let value = outputs.get(name).ok_or_else(|| Error::Inference(format!("no output {name}")))?;
    let (shape, data) = value.try_extract_tensor::<f32>()?;
    Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
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
        // positions): on the calling thread alone they are faster (measured, trust mode at
        // threshold 0.5: 1014 tok/s with their own pools, 1349 without).
        let single = SessionOptions { threads: 1, ..options.clone() };
        let (embedder, _) = runtime.session(&dir.join(&contract.embedder_file), &single)?;
        let (micro, _) = runtime.session(&dir.join(&contract.micro_file), &single)?;
        let names = &config.names;
        let (base_past, base_present) = names.kv_names(config.num_layers);
        let micro_past = layer_names(contract.micro_layers, "past_key_values.%d.%s");
        let micro_present = layer_names(contract.micro_layers, "present.%d.%s");
        let check = |session: &Session, file: &str, inputs: &[&str], outputs: &[&str]| -> Result<()> {
            for name in inputs {
                if !session.inputs().iter().any(|i| i.name() == *name) {
                    return Err(Error::ModelConfig {
                        path: contract.path.clone(),
                        field: file.into(),
                        reason: format!("the graph has no input named `{name}`"),
                    });
                }
            }
            for name in outputs {
                if !session.outputs().iter().any(|o| o.name() == *name) {
                    return Err(Error::ModelConfig {
                        path: contract.path.clone(),
                        field: file.into(),
                        reason: format!("the graph has no output named `{name}`"),
                    });
                }
            }
            Ok(())
        };
        check(&embedder, &contract.embedder_file, &["step_ids", "step_lengths"], &["inputs_embeds"])?;
        let mut base_in = vec!["inputs_embeds", "attention_mask", "position_ids"];
        base_in.extend(base_past.iter().map(String::as_str));
        let mut base_out = vec!["logits", "hidden_states", "stop_logits"];
        base_out.extend(base_present.iter().map(String::as_str));
        check(&base, &contract.base_file, &base_in, &base_out)?;
        let mut micro_in = vec!["features", "input_ids"];
        micro_in.extend(micro_past.iter().map(String::as_str));
        let mut micro_out = vec!["logits", "stop_logits"];
        micro_out.extend(micro_present.iter().map(String::as_str));
        check(&micro, &contract.micro_file, &micro_in, &micro_out)?;
        Ok(MultiTokenModel {
            embedder,
            base,
            micro,
            contract: contract.clone(),
            base_past,
            base_present,
            micro_past,
            micro_present,
            base_kv_heads: config.num_kv_heads,
            head_size: config.head_size,
            vocab: config.vocab_size,
            hidden: 0,
            provider,
        })
    }

    /// Settings of a request: the model's defaults, checked against the contract's maximum.
    pub fn default_settings(&self) -> Settings {
        Settings { mode: Mode::Trust, threshold: self.contract.threshold, max_tokens: self.contract.max_tokens_per_step }
    }

    fn empty_kv(layers: usize, heads: usize, head: usize) -> Result<Vec<DynValue>> {
        (0..layers).map(|_| Ok(Tensor::from_array(([1, heads, 0, head], Vec::<f32>::new()))?.into_dyn())).collect()
    }

    /// Embeddings of `steps` (each 1..=max tokens), `[1, steps, D]`.
    fn embed(&mut self, steps: &[&[u32]], run: &SharedRunOptions) -> Result<DynValue> {
        let width = steps.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut ids = vec![0i64; steps.len() * width];
        for (row, step) in steps.iter().enumerate() {
            for (col, &t) in step.iter().enumerate() {
                ids[row * width + col] = t as i64;
            }
        }
        let lengths: Vec<i64> = steps.iter().map(|s| s.len() as i64).collect();
        let inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
            ("step_ids", Tensor::from_array(([steps.len(), width], ids))?.into()),
            ("step_lengths", Tensor::from_array(([steps.len()], lengths))?.into()),
        ];
        let mut outputs = self.embedder.run_with_options(inputs, run.get()).map_err(|e| run.run_error(e))?;
        outputs.remove("inputs_embeds").ok_or_else(|| Error::Inference("embedder: no inputs_embeds".into()))
    }

    /// One base forward over `steps` (each becomes one KV entry) at `positions`; returns the
    /// last `rows` rows.
    fn base_forward(
        &mut self,
        kv: &mut BaseKv,
        steps: &[&[u32]],
        positions: &[usize],
        rows: usize,
        run: &SharedRunOptions,
    ) -> Result<BaseOut> {
        let embeds = self.embed(steps, run)?;
        let n = steps.len();
        let total = kv.len + n;
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(3 + kv.values.len());
        inputs.push(("inputs_embeds", embeds.view().into()));
        inputs.push(("attention_mask", Tensor::from_array(([1, total], vec![1i64; total]))?.into()));
        let pos: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        inputs.push(("position_ids", Tensor::from_array(([1, n], pos))?.into()));
        for (name, value) in self.base_past.iter().zip(&kv.values) {
            inputs.push((name.as_str(), value.view().into()));
        }
        let mut outputs = self.base.run_with_options(inputs, run.get()).map_err(|e| run.run_error(e))?;
        let rows = rows.min(n);
        let (_, logits) = tensor_f32(&outputs, "logits")?;
        let (hshape, hidden) = tensor_f32(&outputs, "hidden_states")?;
        let (_, stop) = tensor_f32(&outputs, "stop_logits")?;
        let width = hshape[2] * hshape[3];
        let out = BaseOut {
            logits: (n - rows..n).map(|r| logits[r * self.vocab..(r + 1) * self.vocab].to_vec()).collect(),
            features: (n - rows..n).map(|r| hidden[r * width..(r + 1) * width].to_vec()).collect(),
            stop_logits: stop[n - rows..n].to_vec(),
        };
        for (name, slot) in self.base_present.iter().zip(kv.values.iter_mut()) {
            *slot = outputs.remove(name.as_str()).ok_or_else(|| Error::Inference(format!("no output {name}")))?;
        }
        kv.len = total;
        Ok(out)
    }

    /// One micro step: appends `features` (first call of a step; empty later) and `token` to
    /// the micro decoder's KV; returns the logits of the next token and its stop logit.
    fn micro_forward(&mut self, kv: &mut [DynValue], features: &[f32], token: u32, run: &SharedRunOptions) -> Result<(Vec<f32>, f32)> {
        let rows = if features.is_empty() { 0 } else { self.contract.features };
        // Every step's first micro call carries the features, so the width is known by the
        // calls that carry none.
        if let Some(width) = features.len().checked_div(rows) {
            self.hidden = width;
        }
        let width = self.hidden;
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(2 + kv.len());
        inputs.push(("features", Tensor::from_array(([1, rows, width], features.to_vec()))?.into()));
        inputs.push(("input_ids", Tensor::from_array(([1, 1], vec![token as i64]))?.into()));
        for (name, value) in self.micro_past.iter().zip(kv.iter()) {
            inputs.push((name.as_str(), value.view().into()));
        }
        let mut outputs = self.micro.run_with_options(inputs, run.get()).map_err(|e| run.run_error(e))?;
        let (_, logits) = tensor_f32(&outputs, "logits")?;
        let (_, stop) = tensor_f32(&outputs, "stop_logits")?;
        for (name, slot) in self.micro_present.iter().zip(kv.iter_mut()) {
            *slot = outputs.remove(name.as_str()).ok_or_else(|| Error::Inference(format!("no output {name}")))?;
        }
        Ok((logits, stop[0]))
    }

    /// Logits of the last `rows` positions of `ids` from the base alone (one token per step):
    /// for tests and quality measurements.
    pub fn sequence_logits(&mut self, ids: &[u32], rows: usize) -> Result<Vec<Vec<f32>>> {
        let run = SharedRunOptions::new()?;
        let mut kv = self.new_base_kv()?;
        let steps: Vec<&[u32]> = ids.chunks(1).collect();
        let positions: Vec<usize> = (0..ids.len()).collect();
        Ok(self.base_forward(&mut kv, &steps, &positions, rows, &run)?.logits)
    }

    pub fn next_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.sequence_logits(ids, 1)?.pop().expect("one row"))
    }

    /// Decodes `run` with multi-token steps; returns why it ended.
    pub(crate) fn decode(
        &mut self,
        settings: Settings,
        folder: &ModelFolder,
        run: &mut Run,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<FinishReason> {
        let options = SharedRunOptions::new()?;
        cancel.attach(&options);
        let mut stats = MultiTokenStats::new(settings.mode);
        let result = match settings.mode {
            Mode::Trust => self.decode_trust(settings, folder, run, cancel, on_text, &options, &mut stats),
            Mode::Verify => self.decode_verify(settings, folder, run, cancel, on_text, &options, &mut stats),
        };
        run.target_forwards = stats.base_forwards;
        run.multitoken = Some(stats);
        match result {
            Err(Error::Cancelled) => Ok(FinishReason::Cancelled),
            other => other,
        }
    }

    fn new_base_kv(&self) -> Result<BaseKv> {
        Ok(BaseKv { values: Self::empty_kv(self.base_past.len(), self.base_kv_heads, self.head_size)?, len: 0 })
    }

    /// The prompt, one token per step (the reference keeps prompts unmerged), into a new KV.
    fn prefill(&mut self, run: &Run, options: &SharedRunOptions, stats: &mut MultiTokenStats) -> Result<(BaseKv, BaseOut)> {
        let started = Instant::now();
        let mut kv = self.new_base_kv()?;
        let prompt = run.sequence.clone();
        let steps: Vec<&[u32]> = prompt.chunks(1).collect();
        let positions: Vec<usize> = (0..prompt.len()).collect();
        let out = self.base_forward(&mut kv, &steps, &positions, 1, options)?;
        stats.base_forwards += 1;
        stats.base_time += started.elapsed();
        stats.kv_entries = kv.len;
        Ok((kv, out))
    }

    fn decode_trust(
        &mut self,
        settings: Settings,
        folder: &ModelFolder,
        run: &mut Run,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> bool,
        options: &SharedRunOptions,
        stats: &mut MultiTokenStats,
    ) -> Result<FinishReason> {
        let (mut kv, mut out) = self.prefill(run, options, stats)?;
        loop {
            // Micro step 0: the base's own token.
            let mut logits = out.logits.pop().expect("one row");
            let features = out.features.pop().expect("one row");
            let mut token = run.sampler.next(&mut logits, &run.sequence);
            let mut step = vec![token];
            if let Some(reason) = run.accept(folder, token, on_text)? {
                return Ok(reason);
            }
            // Micro steps 1..: while the stop head says go on.
            let mut go_on = settings.max_tokens > 1 && continues(out.stop_logits[0], settings.threshold);
            // The micro decoder's KV starts empty each step; made only for a step that goes on.
            let mut micro_kv = Vec::new();
            if go_on {
                micro_kv = Self::empty_kv(self.micro_past.len(), self.contract.micro_kv_heads, self.contract.micro_head_size)?;
            }
            let mut feats: &[f32] = &features;
            while go_on && step.len() < settings.max_tokens {
                if let Some(reason) = run.should_stop(run.sequence.len() + 1, cancel) {
                    return Ok(reason);
                }
                let started = Instant::now();
                let (mut micro_logits, stop) = self.micro_forward(&mut micro_kv, feats, token, options)?;
                stats.micro_forwards += 1;
                stats.micro_time += started.elapsed();
                feats = &[];
                token = run.sampler.next(&mut micro_logits, &run.sequence);
                step.push(token);
                if let Some(reason) = run.accept(folder, token, on_text)? {
                    return Ok(reason);
                }
                go_on = continues(stop, settings.threshold);
            }
            if let Some(reason) = run.should_stop(run.sequence.len() + 1, cancel) {
                return Ok(reason);
            }
            // The next macro step: the whole step as one embedding, one KV entry, at the
            // position of its last token (the reference's training path).
            let started = Instant::now();
            let position = run.sequence.len() - 1;
            out = self.base_forward(&mut kv, &[&step], &[position], 1, options)?;
            stats.base_forwards += 1;
            stats.base_time += started.elapsed();
            stats.kv_entries = kv.len;
        }
    }

    fn decode_verify(
        &mut self,
        settings: Settings,
        folder: &ModelFolder,
        run: &mut Run,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> bool,
        options: &SharedRunOptions,
        stats: &mut MultiTokenStats,
    ) -> Result<FinishReason> {
        let params = run.sampler.params().clone();
        let greedy = params.is_greedy();
        let (mut kv, mut out) = self.prefill(run, options, stats)?;
        let mut logits = out.logits.pop().expect("one row");
        let mut features = out.features.pop().expect("one row");
        let mut stop_logit = out.stop_logits[0];
        loop {
            // The base's token after everything accepted so far.
            let token = run.sampler.next(&mut logits, &run.sequence);
            if let Some(reason) = run.accept(folder, token, on_text)? {
                stats.kv_entries = kv.len;
                return Ok(reason);
            }
            // Drafts from the micro decoder, as many as the stop head allows.
            let room = run.tokens_left().min(run.context_left(kv.len + 2));
            let want = (settings.max_tokens - 1).min(room);
            let mut drafts: Vec<u32> = Vec::with_capacity(want);
            let mut draft_dists: Vec<Vec<f32>> = Vec::new();
            if want > 0 && continues(stop_logit, settings.threshold) {
                let mut micro_kv = Self::empty_kv(self.micro_past.len(), self.contract.micro_kv_heads, self.contract.micro_head_size)?;
                let mut feats: &[f32] = &features;
                let mut last = token;
                let started = Instant::now();
                while drafts.len() < want {
                    let (micro_logits, stop) = self.micro_forward(&mut micro_kv, feats, last, options)?;
                    stats.micro_forwards += 1;
                    feats = &[];
                    let mut seen = run.sequence.clone();
                    seen.extend(&drafts);
                    let d = if greedy {
                        penalised_argmax(&micro_logits, &seen, params.repetition_penalty)
                    } else {
                        let dist = row_distribution(&micro_logits, &seen, &params);
                        let d = run.sampler.draw(&dist) as u32;
                        draft_dists.push(dist);
                        d
                    };
                    drafts.push(d);
                    last = d;
                    if !continues(stop, settings.threshold) {
                        break;
                    }
                }
                stats.micro_time += started.elapsed();
            }
            if let Some(reason) = run.should_stop(kv.len + 1 + drafts.len(), cancel) {
                stats.kv_entries = kv.len;
                return Ok(reason);
            }
            // Verify: the base over [token, drafts...], one step (and KV entry) per token.
            let started = Instant::now();
            let mut inputs: Vec<u32> = vec![token];
            inputs.extend(&drafts);
            let steps: Vec<&[u32]> = inputs.chunks(1).collect();
            let first = kv.len;
            let positions: Vec<usize> = (first..first + inputs.len()).collect();
            let verified = self.base_forward(&mut kv, &steps, &positions, inputs.len(), options)?;
            stats.base_forwards += 1;
            stats.base_time += started.elapsed();
            stats.drafted += drafts.len();
            // What follows the accepted drafts: the verified row there, a token the sampling
            // rule drew, or (a near tie) a one-token forward, as plain decoding computes it.
            enum Next {
                Row,
                Token(u32),
                Recompute,
            }
            let (accepted, next) = if greedy {
                let rows = penalised_rows(verified.logits.clone(), &run.sequence, &drafts, params.repetition_penalty);
                match verify_greedy_guarded(&rows, &drafts, TIE_MARGIN) {
                    GreedyVerdict::Decided(a, _) => (a, Next::Row),
                    GreedyVerdict::NearTie(a) => (a, Next::Recompute),
                }
            } else {
                let p = row_distributions(&verified.logits, &run.sequence, &drafts, &params);
                let (a, token) = verify_sampled(&p, &draft_dists, &drafts, &mut run.sampler);
                (a, Next::Token(token))
            };
            stats.accepted += accepted;
            for (i, &d) in drafts[..accepted].iter().enumerate() {
                if let Some(reason) = run.accept(folder, d, on_text)? {
                    // The inputs before the last emitted token keep their entries.
                    kv_truncate(&mut kv, first + 1 + i)?;
                    stats.kv_entries = kv.len;
                    return Ok(reason);
                }
            }
            if let Next::Recompute = next {
                kv_truncate(&mut kv, first + accepted)?;
                let again = self.base_forward(&mut kv, &[&inputs[accepted..=accepted]], &[first + accepted], 1, options)?;
                stats.base_forwards += 1;
                logits = again.logits[0].clone();
                features = again.features[0].clone();
                stop_logit = again.stop_logits[0];
            } else {
                kv_truncate(&mut kv, first + 1 + accepted)?;
                // A drawn token reaches the loop's sampler as a one-hot row: it returns exactly it.
                logits = match next {
                    Next::Token(token) => one_hot(self.vocab, token),
                    _ => verified.logits[accepted].clone(),
                };
                features = verified.features[accepted].clone();
                stop_logit = verified.stop_logits[accepted];
            }
            stats.kv_entries = kv.len;
        }
    }
}

/// Logits that make any sampler pick `token` (its draws see probability 1 there).
fn one_hot(vocab: usize, token: u32) -> Vec<f32> {
    let mut row = vec![f32::NEG_INFINITY; vocab];
    row[token as usize] = 0.0;
    row
}

fn kv_truncate(kv: &mut BaseKv, len: usize) -> Result<()> {
    if len < kv.len {
        for value in &mut kv.values {
            *value = slice_positions(value, 2, len)?;
        }
        kv.len = len;
    }
    Ok(())
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
