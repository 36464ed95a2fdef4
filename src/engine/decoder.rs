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

use std::path::Path;
use std::sync::Arc;

use half::f16;
use ort::memory::MemoryInfo;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session};
use ort::value::{DynValue, DynValueTypeMarker, Shape, Tensor, TensorElementType, TensorRefMut, ValueRefMut, ValueType};

use crate::error::{Error, Result};
use crate::model::{DecoderNames, GenaiConfig};
use crate::runtime::{ProviderReport, Runtime, SessionOptions};

/// The run options of one sequence, shared with its `CancelToken`.
#[derive(Clone)]
pub struct SharedRunOptions(Arc<RunOptions<HasSelectedOutputs>>);

// SAFETY: other threads only call `terminate`, which sets ONNX Runtime's atomic terminate flag
// (made for exactly this); the preallocated outputs inside are used only by the thread that
// owns the cache and runs the session.
unsafe impl Send for SharedRunOptions {}
unsafe impl Sync for SharedRunOptions {}

impl SharedRunOptions {
    /// Run options without preallocated outputs.
    pub fn new() -> Result<Self> {
        Ok(SharedRunOptions(Arc::new(RunOptions::new()?.with_outputs(OutputSelector::default()))))
    }
    pub(crate) fn get(&self) -> &RunOptions<HasSelectedOutputs> {
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
    names: DecoderNames,
    input_ids: String,
    /// Input and output names per layer, built once (the decode loop is hot).
    past_names: Vec<String>,
    present_names: Vec<String>,
    num_layers: usize,
    num_kv_heads: usize,
    head_size: usize,
    context: usize,
    vocab: usize,
    kv_precision: Precision,
    logits_precision: Precision,
    has_position_ids: bool,
    pub provider: ProviderReport,
}

/// Backing store of one KV tensor. The owned tensor sits in the run options as the preallocated
/// output; `view` is a second ONNX Runtime value over the same memory, fed as the past input.
enum KvSlot {
    Shared { view: ValueRefMut<'static, DynValueTypeMarker> },
    Growing { value: DynValue },
}

pub struct KvCache {
    layout: KvLayout,
    // `slots` views point into tensors owned by `run_options`: declared first, dropped first.
    slots: Vec<KvSlot>,
    run_options: SharedRunOptions,
    len: usize,
    capacity: usize,
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
            for slot in &mut self.slots {
                if let KvSlot::Growing { value } = slot {
                    *value = slice_positions(value, len)?;
                }
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

/// An owned zeroed tensor and a second ONNX Runtime value over the same memory.
/// Safety: the owned tensor's heap buffer does not move when the value is moved into the output
/// selector, and the cache keeps both alive together, dropping the view first.
fn shared_kv<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
    shape: [usize; 4],
    zero: T,
) -> Result<(DynValue, ValueRefMut<'static, DynValueTypeMarker>)> {
    let n = shape.iter().product::<usize>();
    let mut owned = Tensor::<T>::from_array((shape, vec![zero; n]))?;
    let ptr = owned.data_ptr_mut();
    let dims = Shape::new(shape.iter().map(|&d| d as i64));
    let view = unsafe { TensorRefMut::<'static, T>::from_raw(MemoryInfo::default(), ptr, dims)? };
    Ok((owned.into_dyn(), view.into_dyn()))
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
        let names = config.names.clone();
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
        Ok(Decoder {
            session,
            names,
            input_ids,
            past_names,
            present_names,
            num_layers: config.num_layers,
            num_kv_heads: config.num_kv_heads,
            head_size: config.head_size,
            context: config.context_length,
            vocab: config.vocab_size,
            kv_precision,
            logits_precision,
            has_position_ids,
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
        let mut selector = OutputSelector::default();
        let mut slots = Vec::with_capacity(self.past_names.len());
        for present in &self.present_names {
            match layout {
                KvLayout::Shared => {
                    let shape = [1, self.num_kv_heads, capacity, self.head_size];
                    let (owned, view) = match self.kv_precision {
                        Precision::F32 => shared_kv::<f32>(shape, 0.0)?,
                        Precision::F16 => shared_kv::<f16>(shape, f16::ZERO)?,
                    };
                    selector = selector.preallocate(present.clone(), owned);
                    slots.push(KvSlot::Shared { view });
                }
                KvLayout::Growing => {
                    let value = kv_tensor(self.kv_precision, [1, self.num_kv_heads, 0, self.head_size])?;
                    slots.push(KvSlot::Growing { value });
                }
            }
        }
        let run_options = SharedRunOptions(Arc::new(RunOptions::new()?.with_outputs(selector)));
        Ok(KvCache { layout, slots, run_options, len: 0, capacity })
    }

    /// Runs `ids` after what the cache holds. Returns the logits of the last `rows` positions,
    /// row-major `rows x vocab`, as float32.
    pub fn forward(&mut self, cache: &mut KvCache, ids: &[u32], rows: usize) -> Result<Vec<f32>> {
        let n = ids.len();
        let total = cache.len + n;
        if total > cache.capacity {
            return Err(Error::PromptTooLong { tokens: total, context: cache.capacity });
        }
        let mut inputs: Vec<(&str, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(3 + cache.slots.len());
        let input_ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        inputs.push((&self.input_ids, Tensor::from_array(([1, n], input_ids))?.into()));
        inputs.push((&self.names.attention_mask, Tensor::from_array(([1, total], vec![1i64; total]))?.into()));
        if self.has_position_ids {
            let positions: Vec<i64> = (cache.len..total).map(|p| p as i64).collect();
            let name = self.names.position_ids.as_deref().expect("checked at load");
            inputs.push((name, Tensor::from_array(([1, n], positions))?.into()));
        }
        for (name, slot) in self.past_names.iter().zip(&cache.slots) {
            let value = match slot {
                KvSlot::Shared { view } => (**view).view(),
                KvSlot::Growing { value } => value.view(),
            };
            inputs.push((name.as_str(), value.into()));
        }
        let mut outputs = self.session.run_with_options(inputs, &*cache.run_options.0).map_err(|e| {
            let message = e.to_string();
            if message.contains("terminate") {
                Error::Cancelled
            } else {
                Error::Inference(message)
            }
        })?;
        let logits_value = outputs.get(&self.names.logits).ok_or_else(|| Error::Inference("no logits output".into()))?;
        let rows = rows.min(n);
        let logits = match self.logits_precision {
            Precision::F32 => {
                let (_, data) = logits_value.try_extract_tensor::<f32>()?;
                data[(n - rows) * self.vocab..n * self.vocab].to_vec()
            }
            Precision::F16 => {
                let (_, data) = logits_value.try_extract_tensor::<f16>()?;
                data[(n - rows) * self.vocab..n * self.vocab].iter().map(|v| v.to_f32()).collect()
            }
        };
        if cache.layout == KvLayout::Growing {
            for (name, slot) in self.present_names.iter().zip(cache.slots.iter_mut()) {
                let present = outputs.remove(name).ok_or_else(|| Error::Inference(format!("no output {name}")))?;
                *slot = KvSlot::Growing { value: present };
            }
        }
        drop(outputs);
        cache.len = total;
        Ok(logits)
    }
}
