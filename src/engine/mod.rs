//! One generation at a time on a loaded model: prefill, decode loop with the KV cache, sampling,
//! stop conditions, streaming text. Knows nothing of who asked (no D-Bus here).

pub mod decoder;
pub mod sampler;
pub mod text;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use decoder::{Decoder, KvCache, KvLayout};
pub use sampler::{Sampler, SamplingParams};

use crate::error::{Error, Result};
pub use crate::model::Prompt;
use crate::model::{Detokenizer, ModelFolder};
use crate::runtime::{ProviderReport, Runtime, SessionOptions};
use text::{Piece, StopText};

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub session: SessionOptions,
    /// `None` follows `search.past_present_share_buffer` of genai_config.json.
    pub kv_layout: Option<KvLayout>,
}

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length.
    Length,
    Cancelled,
    Timeout,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
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
    running: Mutex<Option<decoder::SharedRunOptions>>,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        if let Some(run) = self.inner.running.lock().expect("cancel lock").as_ref() {
            let _ = run.terminate();
        }
    }
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }
    fn attach(&self, run: &decoder::SharedRunOptions) {
        *self.inner.running.lock().expect("cancel lock") = Some(run.clone());
        if self.is_cancelled() {
            let _ = run.terminate();
        }
    }
}

/// A model ready to generate. Owned by the one thread that runs it.
pub struct Engine {
    pub name: String,
    pub folder: Arc<ModelFolder>,
    decoder: Decoder,
    kv_layout: KvLayout,
    pub load_time: Duration,
}

impl Engine {
    pub fn load(runtime: &Runtime, name: &str, dir: &Path, options: &LoadOptions) -> Result<Engine> {
        Self::load_folder(runtime, name, Arc::new(ModelFolder::open(dir)?), options)
    }

    /// Loads the weights of an opened folder (the daemon opens folders first, to tokenize and
    /// validate requests before they are queued).
    pub fn load_folder(runtime: &Runtime, name: &str, folder: Arc<ModelFolder>, options: &LoadOptions) -> Result<Engine> {
        let started = Instant::now();
        let dir = folder.dir.clone();
        let dir = dir.as_path();
        // Loading path, measured (see `cargo run --release --bin bench`, "load"): ONNX Runtime
        // reading model.onnx.data from its own path peaked lower in RSS than handing it a
        // memory-mapped copy (it copies in-memory external data, and prepacking MatMulNBits
        // makes a private copy either way), so the session is built from the file path.
        let decoder = Decoder::load(runtime, dir, &folder.config, &options.session)?;
        let kv_layout = options.kv_layout.unwrap_or(if folder.config.search.past_present_share_buffer {
            KvLayout::Shared
        } else {
            KvLayout::Growing
        });
        tracing::info!(model = name, provider = decoder.provider.provider.name(), ?kv_layout, ms = started.elapsed().as_millis() as u64, "model loaded");
        Ok(Engine { name: name.into(), folder, decoder, kv_layout, load_time: started.elapsed() })
    }

    pub fn provider(&self) -> &ProviderReport {
        &self.decoder.provider
    }
    pub fn context(&self) -> usize {
        self.folder.config.context_length
    }
    pub fn kv_layout(&self) -> KvLayout {
        self.kv_layout
    }

    /// The sampling a request gets: the model's `search` defaults, overridden by the request.
    pub fn sampling_params(&self, options: &GenerateOptions) -> SamplingParams {
        let search = &self.folder.config.search;
        let sample = options.temperature.map(|t| t > 0.0).unwrap_or(search.do_sample);
        SamplingParams {
            temperature: if sample { options.temperature.unwrap_or(search.temperature as f32) } else { 0.0 },
            top_k: options.top_k.unwrap_or(if sample { search.top_k as usize } else { 0 }),
            top_p: options.top_p.unwrap_or(if sample { search.top_p as f32 } else { 1.0 }),
            repetition_penalty: options.repetition_penalty.unwrap_or(search.repetition_penalty as f32),
            seed: options.seed.unwrap_or_else(rand::random),
        }
    }

    /// Generates for `prompt`, calling `on_text` with each piece of final text as it is decided.
    /// `on_text` returns false when nobody listens any more, which cancels the request.
    pub fn generate(
        &mut self,
        prompt: &Prompt,
        options: &GenerateOptions,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Outcome> {
        let prompt_ids = self.folder.prompt_ids(&self.name, prompt)?;
        let params = self.sampling_params(options);
        let started = Instant::now();
        let max_total = self.folder.config.search.max_length.min(self.context());
        let max_new = options.max_new_tokens.unwrap_or(max_total.saturating_sub(prompt_ids.len())).max(1);
        let mut cache = self.decoder.new_cache(self.kv_layout)?;
        cancel.attach(cache.run_options());
        let mut run = Run::new(&self.folder, prompt_ids.clone(), params, options.stop.clone());

        let mut logits = match self.decoder.forward(&mut cache, &prompt_ids, 1) {
            Ok(logits) => logits,
            Err(Error::Cancelled) => return Ok(run.finish(FinishReason::Cancelled, started, &self.decoder.provider)),
            Err(e) => return Err(e),
        };
        let reason = loop {
            let token = run.sampler.next(&mut logits, &run.sequence);
            if run.first_token_at.is_none() {
                run.first_token_at = Some(started.elapsed());
            }
            if let Some(reason) = run.accept(&self.folder, token, on_text)? {
                break reason;
            }
            if run.generated.len() >= max_new || cache.len() + 1 >= self.context() {
                break FinishReason::Length;
            }
            if cancel.is_cancelled() {
                break FinishReason::Cancelled;
            }
            if options.deadline.is_some_and(|d| Instant::now() >= d) {
                break FinishReason::Timeout;
            }
            logits = match self.decoder.forward(&mut cache, &[token], 1) {
                Ok(logits) => logits,
                Err(Error::Cancelled) => break FinishReason::Cancelled,
                Err(e) => return Err(e),
            };
        };
        if reason != FinishReason::Stop || run.eos_token.is_some() {
            let rest = run.release_held(&self.folder)?;
            if !rest.is_empty() && !on_text(&rest) && reason == FinishReason::Length {
                return Ok(run.finish(FinishReason::Cancelled, started, &self.decoder.provider));
            }
        }
        Ok(run.finish(reason, started, &self.decoder.provider))
    }
}

/// The state of one request's output: tokens, streamed text, stop conditions.
struct Run {
    sequence: Vec<u32>,
    prompt_len: usize,
    generated: Vec<u32>,
    eos_token: Option<u32>,
    eos_ids: Vec<u32>,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopText,
    first_token_at: Option<Duration>,
}

impl Run {
    fn new(folder: &ModelFolder, prompt_ids: Vec<u32>, params: SamplingParams, stops: Vec<String>) -> Run {
        Run {
            prompt_len: prompt_ids.len(),
            sequence: prompt_ids,
            generated: Vec::new(),
            eos_token: None,
            eos_ids: folder.config.eos_token_ids.clone(),
            sampler: Sampler::new(params),
            detok: Detokenizer::new(),
            stop: StopText::new(stops),
            first_token_at: None,
        }
    }

    /// Takes one generated token; returns the reason to stop, if it ends the request.
    fn accept(&mut self, folder: &ModelFolder, token: u32, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Option<FinishReason>> {
        if self.eos_ids.contains(&token) {
            self.eos_token = Some(token);
            return Ok(Some(FinishReason::Stop));
        }
        self.generated.push(token);
        self.sequence.push(token);
        let piece = self.detok.push(&folder.tokenizer, token)?;
        match self.stop.push(&piece) {
            Piece::Text(text) => {
                if !text.is_empty() && !on_text(&text) {
                    return Ok(Some(FinishReason::Cancelled));
                }
                Ok(None)
            }
            Piece::Stopped(text) => {
                if !text.is_empty() {
                    on_text(&text);
                }
                Ok(Some(FinishReason::Stop))
            }
        }
    }

    /// Text held back for a possible stop string or an unfinished character, now final.
    fn release_held(&mut self, folder: &ModelFolder) -> Result<String> {
        let tail = self.detok.flush(&folder.tokenizer)?;
        match self.stop.push(&tail) {
            Piece::Text(text) => Ok(text + &self.stop.finish()),
            Piece::Stopped(text) => Ok(text),
        }
    }

    fn finish(self, reason: FinishReason, started: Instant, provider: &ProviderReport) -> Outcome {
        let total = started.elapsed();
        let first = self.first_token_at.unwrap_or(total);
        let decode_time = total.saturating_sub(first).as_secs_f64();
        let n = self.generated.len();
        let decode_tokens_per_s = if n > 1 && decode_time > 0.0 { (n - 1) as f64 / decode_time } else { 0.0 };
        Outcome {
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
            },
        }
    }
}
