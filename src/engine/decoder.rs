//! One decoder graph of the onnxruntime-genai builder, run with its KV cache.
//!
//! Two KV layouts, as GroupQueryAttention supports both:
//! - `Shared`: one buffer per layer and kind of `context` positions, bound as both the past input
//!   and the present output, so ONNX Runtime appends in place: nothing is copied per step.
//!   (The builder's default, `past_present_share_buffer: true`.)
//! - `Growing`: the present outputs of one step are the past inputs of the next, as they are;
//!   each step ONNX Runtime allocates the grown tensors.
//!
//! Rolling back (speculative decoding) is a length change for `Shared` and a slice for `Growing`.

use std::ffi::{c_char, CString};
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use half::f16;
use ort::session::{RunOptions, Session};
use ort::sys::OrtValue;
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};
use ort::AsPointer;

use crate::error::{Error, Result};
use crate::model::GenaiConfig;
use crate::runtime::{ProviderReport, Runtime, SessionOptions};

/// The run options of one sequence, shared with its `CancelToken`: another thread may only call
/// `terminate`, which sets ONNX Runtime's atomic terminate flag (made for exactly this).
#[derive(Clone)]
pub struct SharedRunOptions(Arc<RunOptions>);

impl SharedRunOptions {
    pub fn new() -> Result<Self> {
        Ok(SharedRunOptions(Arc::new(RunOptions::new()?)))
    }
    pub(crate) fn get(&self) -> &RunOptions {
        &self.0
    }
    pub fn terminate(&self) -> Result<()> {
        Ok(self.0.terminate()?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    Shared,
    Growing,
}

/// Element type of the KV cache and logits: float32 from CPU exports, float16 from GPU ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    fn of(ty: &ValueType, what: &str) -> Result<Precision> {
        match ty.tensor_type() {
            Some(TensorElementType::Float32) => Ok(Precision::F32),
            Some(TensorElementType::Float16) => Ok(Precision::F16),
            other => Err(Error::Inference(format!("{what}: unsupported element type {other:?} (float32 or float16 expected)"))),
        }
    }
}

pub struct Decoder {
    session: Session,
    num_layers: usize,
    num_kv_heads: usize,
    head_size: usize,
    context: usize,
    vocab: usize,
    kv_precision: Precision,
    logits_precision: Precision,
    has_position_ids: bool,
    /// Input names in the order `forward` feeds them (ids, mask, positions if any, pasts), and
    /// output names (logits, presents), as ONNX Runtime's `Run` takes them.
    run_names: RunNames,
    pub provider: ProviderReport,
}

/// C strings of the names a forward feeds and fetches, built once: the decode loop is hot, and
/// ONNX Runtime's `Run` takes arrays of name pointers.
struct RunNames {
    inputs: Vec<*const c_char>,
    outputs: Vec<*const c_char>,
    _owned: Vec<CString>,
}

// SAFETY: the pointers point at the heap buffers of the C strings in `_owned`, which do not move
// when the struct moves and are never changed after construction.
unsafe impl Send for RunNames {}

impl RunNames {
    fn new(inputs: &[&str], outputs: &[&str]) -> Result<RunNames> {
        let c = |n: &&str| CString::new(*n).map_err(|_| Error::Inference(format!("graph name {n:?} holds a NUL byte")));
        let inputs: Vec<CString> = inputs.iter().map(c).collect::<Result<_>>()?;
        let outputs: Vec<CString> = outputs.iter().map(c).collect::<Result<_>>()?;
        Ok(RunNames {
            inputs: inputs.iter().map(|n| n.as_ptr()).collect(),
            outputs: outputs.iter().map(|n| n.as_ptr()).collect(),
            _owned: inputs.into_iter().chain(outputs).collect(),
        })
    }
}

/// One KV tensor, fed as the past input. `Shared`: also given to ONNX Runtime as the preallocated
/// present output, so GroupQueryAttention appends in place. `Growing`: replaced by the present
/// output ONNX Runtime allocates. Every caller keeps a cache local to one request of the decoder
/// that made it.
pub struct KvCache {
    layout: KvLayout,
    slots: Vec<DynValue>,
    run_options: SharedRunOptions,
    /// The logits output of one-token steps, preallocated (as onnxruntime-genai does) so that ONNX
    /// Runtime writes them where the sampler reads them; multi-token forwards let it allocate.
    step_logits: DynValue,
    /// Logits handed out when they cannot be read in place: several rows, or float16.
    scratch: Vec<f32>,
    len: usize,
    capacity: usize,
    /// The step's input data, kept between steps so that a step does not rebuild it: `ones`
    /// holds `capacity` ones, of which the attention mask is a prefix.
    ones: Vec<i64>,
    ids: Vec<i64>,
    positions: Vec<i64>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// The run options every forward of this cache uses; `terminate()` on them interrupts a run.
    pub fn run_options(&self) -> &SharedRunOptions {
        &self.run_options
    }

    /// Forget everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len {
            return Ok(());
        }
        if self.layout == KvLayout::Growing {
            for value in &mut self.slots {
                *value = slice_positions(value, len)?;
            }
        }
        self.len = len;
        Ok(())
    }
}

pub(crate) fn slice_positions(value: &DynValue, len: usize) -> Result<DynValue> {
    fn slice<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
        value: &DynValue,
        len: usize,
    ) -> Result<DynValue> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        let (b, h, t, d) = (shape[0] as usize, shape[1] as usize, shape[2] as usize, shape[3] as usize);
        let mut out = Vec::with_capacity(b * h * len * d);
        for bh in 0..b * h {
            out.extend_from_slice(&data[bh * t * d..bh * t * d + len * d]);
        }
        Ok(Tensor::from_array(([b, h, len, d], out))?.into_dyn())
    }
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => slice::<f16>(value, len),
        _ => slice::<f32>(value, len),
    }
}

fn kv_tensor(precision: Precision, shape: [usize; 4]) -> Result<DynValue> {
    let n = shape.iter().product::<usize>();
    Ok(match precision {
        Precision::F32 => Tensor::from_array((shape, vec![0f32; n]))?.into_dyn(),
        Precision::F16 => Tensor::from_array((shape, vec![f16::ZERO; n]))?.into_dyn(),
    })
}

impl Decoder {
    pub fn load(runtime: &Runtime, dir: &Path, config: &GenaiConfig, options: &SessionOptions) -> Result<Decoder> {
        let (session, provider) = runtime.session(&dir.join(&config.decoder_file), options)?;
        let names = &config.names;
        let input = |name: &str| session.inputs().iter().find(|i| i.name() == name);
        let output = |name: &str| session.outputs().iter().find(|o| o.name() == name);
        let mismatch = |field: &str, name: &str, kind: &str| Error::ModelConfig {
            path: config.path.clone(),
            field: field.into(),
            reason: format!("the graph {} has no {kind} named `{name}`", config.decoder_file),
        };
        let input_ids = names.input_ids.clone().ok_or_else(|| Error::ModelConfig {
            path: config.path.clone(),
            field: "model.decoder.inputs.input_ids".into(),
            reason: "missing: this decoder takes inputs_embeds, which only a multi-token model (multitoken_config.json) feeds".into(),
        })?;
        for (field, name) in
            [("model.decoder.inputs.input_ids", &input_ids), ("model.decoder.inputs.attention_mask", &names.attention_mask)]
        {
            input(name).ok_or_else(|| mismatch(field, name, "input"))?;
        }
        let logits = output(&names.logits).ok_or_else(|| mismatch("model.decoder.outputs.logits", &names.logits, "output"))?;
        let logits_precision = Precision::of(logits.dtype(), "logits")?;
        // One-token steps write the logits into a [1, 1, vocab_size] buffer: the graph must agree.
        if let Some(&last) = logits.dtype().tensor_shape().and_then(|s| s.last()) {
            if last > 0 && last as usize != config.vocab_size {
                return Err(Error::ModelConfig {
                    path: config.path.clone(),
                    field: "model.vocab_size".into(),
                    reason: format!("{} but the graph's `{}` output has {last} per position", config.vocab_size, names.logits),
                });
            }
        }
        let (past_names, present_names) = names.kv_names(config.num_layers);
        for name in &past_names {
            input(name).ok_or_else(|| mismatch("model.decoder.inputs.past_key_names", name, "input"))?;
        }
        for name in &present_names {
            output(name).ok_or_else(|| mismatch("model.decoder.outputs.present_key_names", name, "output"))?;
        }
        let kv_precision = Precision::of(input(&past_names[0]).expect("checked").dtype(), &past_names[0])?;
        let has_position_ids = match &names.position_ids {
            Some(name) => input(name).is_some(),
            None => false,
        };
        let mut feed: Vec<&str> = vec![&input_ids, &names.attention_mask];
        if has_position_ids {
            feed.push(names.position_ids.as_deref().expect("checked above"));
        }
        feed.extend(past_names.iter().map(String::as_str));
        let fetch: Vec<&str> = std::iter::once(names.logits.as_str()).chain(present_names.iter().map(String::as_str)).collect();
        let run_names = RunNames::new(&feed, &fetch)?;
        Ok(Decoder {
            session,
            num_layers: config.num_layers,
            num_kv_heads: config.num_kv_heads,
            head_size: config.head_size,
            context: config.context_length,
            vocab: config.vocab_size,
            kv_precision,
            logits_precision,
            has_position_ids,
            run_names,
            provider,
        })
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }
    pub fn context(&self) -> usize {
        self.context
    }
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// A fresh, empty cache for one sequence.
    /// `positions` is how many the sequence may reach (prompt + new tokens); the shared buffers
    /// are sized to it, not to the whole context, as onnxruntime-genai sizes them to max_length:
    /// allocating and zeroing a full-context buffer per request showed in time to first token.
    pub fn new_cache(&self, layout: KvLayout, positions: usize) -> Result<KvCache> {
        let capacity = positions.clamp(1, self.context);
        let kv_positions = match layout {
            KvLayout::Shared => capacity,
            KvLayout::Growing => 0,
        };
        let slots = (0..2 * self.num_layers)
            .map(|_| kv_tensor(self.kv_precision, [1, self.num_kv_heads, kv_positions, self.head_size]))
            .collect::<Result<_>>()?;
        let step_logits = match self.logits_precision {
            Precision::F32 => Tensor::from_array(([1, 1, self.vocab], vec![0f32; self.vocab]))?.into_dyn(),
            Precision::F16 => Tensor::from_array(([1, 1, self.vocab], vec![f16::ZERO; self.vocab]))?.into_dyn(),
        };
        Ok(KvCache {
            layout,
            slots,
            run_options: SharedRunOptions::new()?,
            step_logits,
            scratch: Vec::new(),
            len: 0,
            capacity,
            ones: vec![1; capacity],
            ids: Vec::new(),
            positions: Vec::new(),
        })
    }

    /// Runs `ids` after what the cache holds. Returns the logits of the last `rows` positions,
    /// row-major `rows x vocab`, as float32.
    pub fn forward(&mut self, cache: &mut KvCache, ids: &[u32], rows: usize) -> Result<Vec<f32>> {
        let allocated = self.run(cache, ids)?;
        let mut logits = Vec::new();
        self.read_rows(allocated.as_ref().unwrap_or(&cache.step_logits), ids.len(), rows, &mut logits)?;
        Ok(logits)
    }

    /// `forward`, with the logits left in the cache until its next forward: a one-token step of a
    /// float32 model hands out the very buffer ONNX Runtime wrote, so the decode loop neither
    /// allocates nor copies its logits.
    pub fn forward_in_cache<'c>(&mut self, cache: &'c mut KvCache, ids: &[u32], rows: usize) -> Result<&'c mut [f32]> {
        let allocated = self.run(cache, ids)?;
        if allocated.is_none() && self.logits_precision == Precision::F32 {
            let range = self.row_range(ids.len(), rows);
            return Ok(&mut cache.step_logits.try_extract_tensor_mut::<f32>()?.1[range]);
        }
        self.read_rows(allocated.as_ref().unwrap_or(&cache.step_logits), ids.len(), rows, &mut cache.scratch)?;
        Ok(&mut cache.scratch)
    }

    /// The positions of the logits of the last `rows` of `n` positions.
    fn row_range(&self, n: usize, rows: usize) -> std::ops::Range<usize> {
        let rows = rows.min(n);
        (n - rows) * self.vocab..n * self.vocab
    }

    /// The last `rows` of `n` rows of `logits` into `out`, as float32.
    fn read_rows(&self, logits: &DynValue, n: usize, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let range = self.row_range(n, rows);
        out.clear();
        match self.logits_precision {
            Precision::F32 => out.extend_from_slice(&logits.try_extract_tensor::<f32>()?.1[range]),
            Precision::F16 => out.extend(logits.try_extract_tensor::<f16>()?.1[range].iter().map(|v| v.to_f32())),
        }
        Ok(())
    }

    /// One forward pass of `ids` after what the cache holds, appending to its KV. Returns the
    /// logits output when ONNX Runtime allocated it (several positions); a one-token step writes
    /// them into `cache.step_logits`.
    fn run(&mut self, cache: &mut KvCache, ids: &[u32]) -> Result<Option<DynValue>> {
        let n = ids.len();
        let total = cache.len + n;
        if total > cache.capacity {
            return Err(Error::PromptTooLong { tokens: total, context: cache.capacity });
        }
        cache.ids.clear();
        cache.ids.extend(ids.iter().map(|&t| t as i64));
        let ids_value = TensorRef::from_array_view(([1, n], &cache.ids[..]))?;
        let mask_value = TensorRef::from_array_view(([1, total], &cache.ones[..total]))?;
        let positions_value = if self.has_position_ids {
            cache.positions.clear();
            cache.positions.extend((cache.len..total).map(|p| p as i64));
            Some(TensorRef::from_array_view(([1, n], &cache.positions[..]))?)
        } else {
            None
        };

        let mut inputs: Vec<*const OrtValue> = Vec::with_capacity(self.run_names.inputs.len());
        inputs.push(ids_value.ptr());
        inputs.push(mask_value.ptr());
        inputs.extend(positions_value.as_ref().map(|v| v.ptr()));
        inputs.extend(cache.slots.iter().map(|v| v.ptr()));
        // A non-null output is preallocated: ONNX Runtime writes into it. A null one it allocates.
        let preallocated_logits = n == 1;
        let mut outputs: Vec<*mut OrtValue> = Vec::with_capacity(self.run_names.outputs.len());
        outputs.push(if preallocated_logits { cache.step_logits.ptr_mut() } else { ptr::null_mut() });
        match cache.layout {
            KvLayout::Shared => outputs.extend(cache.slots.iter_mut().map(|v| v.ptr_mut())),
            KvLayout::Growing => outputs.extend(std::iter::repeat_n(ptr::null_mut(), cache.slots.len())),
        }
        // ONNX Runtime reads as many names as values: the two must agree.
        assert_eq!((inputs.len(), outputs.len()), (self.run_names.inputs.len(), self.run_names.outputs.len()));
        // SAFETY: the session, run options, names and input values are alive for the call; the
        // preallocated outputs are tensors of the shapes the graph writes ([1, 1, vocab] logits,
        // checked at load; the shared KV buffers of `capacity` positions) and this thread is their
        // only user.
        let status = unsafe {
            (ort::api().Run)(
                self.session.ptr_mut(),
                cache.run_options.0.ptr(),
                self.run_names.inputs.as_ptr(),
                inputs.as_ptr(),
                inputs.len(),
                self.run_names.outputs.as_ptr(),
                outputs.len(),
                outputs.as_mut_ptr(),
            )
        };
        // SAFETY: `status` was just returned by ONNX Runtime; this takes ownership of it. A failed
        // Run fills no output, so nothing is left to release.
        unsafe { ort::Error::result_from_status(status) }.map_err(|e| {
            let message = e.to_string();
            if message.contains("terminate") {
                Error::Cancelled
            } else {
                Error::Inference(message)
            }
        })?;
        // Take ownership of what ONNX Runtime allocated, so that it is released once.
        let allocator = self.session.allocator();
        // SAFETY: a null output was filled by the successful Run with a value the caller now owns.
        let take = |p: *mut OrtValue| unsafe { DynValue::from_ptr(NonNull::new(p).expect("Run filled every output"), Some(allocator)) };
        let allocated_logits = (!preallocated_logits).then(|| take(outputs[0]));
        if cache.layout == KvLayout::Growing {
            for (slot, &present) in cache.slots.iter_mut().zip(&outputs[1..]) {
                *slot = take(present);
            }
        }
        cache.len = total;
        Ok(allocated_logits)
    }
}
