//! One decoder graph in onnxruntime-genai's layout, run with its per-layer states.
//!
//! What the graph takes is read from the graph itself: int32 or int64 ids, mask and positions
//! (GPT-2 exports use int32), an optional `position_ids` and `attention_mask`, and its states:
//! KV as separate key and value tensors `[batch, heads, seq, head]` or GPT-2's combined
//! `[2, batch, heads, seq, head]`, in float32 or float16, and fixed-size recurrent states without
//! a sequence axis (LFM2's `past_conv.%d`). An input that is none of these is refused at load.
//!
//! Two KV layouts, as GroupQueryAttention supports both:
//! - `Shared`: one buffer per layer and kind of `context` positions, bound as both the past input
//!   and the present output, so ONNX Runtime appends in place: nothing is copied per step.
//!   (The builder's default, `past_present_share_buffer: true`.)
//! - `Growing`: the present outputs of one step are the past inputs of the next, as they are;
//!   each step ONNX Runtime allocates the grown tensors.
//!
//! Rolling back (speculative decoding) is a length change for `Shared` and a slice for `Growing`;
//! a model with recurrent states cannot be rolled back, and `Shared` needs a graph whose every
//! state is a 4-D KV tensor (the builder's GroupQueryAttention).

use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use half::f16;
use ort::session::Session;
use ort::sys::OrtValue;
use ort::value::{DynValue, Tensor, TensorElementType, TensorRef, ValueType};
use ort::AsPointer;

use super::graph::{Graph, KvStates};
pub use super::graph::{Precision, SharedRunOptions};
use super::tie_margin::TieMargin;
use crate::error::{Error, Result};
use crate::model::genai_config::{layer_of, StateKind};
use crate::model::{DecoderNames, GenaiConfig};
use crate::runtime::{ProviderReport, Runtime, SessionOptions};

/// How to load a model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    pub session: SessionOptions,
    /// `None` follows `search.past_present_share_buffer` of genai_config.json.
    pub kv_layout: Option<KvLayout>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    Shared,
    Growing,
}

/// Integer element type of the ids, mask and positions a graph takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntType {
    I32,
    I64,
}

impl IntType {
    fn of(ty: &ValueType, name: &str, path: &Path) -> Result<IntType> {
        match ty.tensor_type() {
            Some(TensorElementType::Int64) => Ok(IntType::I64),
            Some(TensorElementType::Int32) => Ok(IntType::I32),
            other => Err(Error::ModelFile {
                path: path.to_path_buf(),
                reason: format!("graph input `{name}` is {other:?}; edgellm feeds int32 or int64 there"),
            }),
        }
    }
}

/// One per-layer state: fed as `past`, fetched as `present`, and the present of one step is the
/// past of the next.
#[derive(Debug, Clone)]
struct State {
    past: String,
    present: String,
    kind: StateKind,
    precision: Precision,
    /// The shape of an empty state of batch 1; for a KV state the sequence axis (second to
    /// last) is 0.
    shape: Vec<usize>,
}

impl State {
    fn seq_axis(&self) -> Option<usize> {
        (self.kind == StateKind::Kv).then(|| self.shape.len() - 2)
    }
    fn shape_with(&self, positions: usize) -> Vec<usize> {
        let mut shape = self.shape.clone();
        if let Some(axis) = self.seq_axis() {
            shape[axis] = positions;
        }
        shape
    }
}

pub struct Decoder {
    /// Its session is shared with every cache this decoder made: their growing values were
    /// allocated by its allocator, and a cache is only ever fed back to the session that made it.
    graph: Graph,
    context: usize,
    vocab: usize,
    logits_precision: Precision,
    ids_type: IntType,
    mask_type: Option<IntType>,
    positions_type: Option<IntType>,
    states: Vec<State>,
    pub provider: ProviderReport,
    /// How close a verify row's top two must be to be re-checked by a one-token forward: learnt
    /// from this graph's own re-checks, across the engine's requests.
    ties: Mutex<TieMargin>,
    /// Whether the graph runs several positions after a non-empty cache (`EXTENDS_*`), learnt
    /// from the first such forward. onnxruntime-genai's builder's MultiHeadAttention graphs
    /// cannot: their `attn_mask_reformat/input_ids_subgraph` builds the causal mask as
    /// [seq, seq] and expands it to [seq, past + seq], which ONNX Runtime refuses ("invalid
    /// expand shape") unless past is 0 or seq is 1. onnxruntime-genai fails there too
    /// (`append_tokens` twice); its one-shot prompt never meets it.
    extends: AtomicU8,
}

const EXTENDS_UNKNOWN: u8 = 0;
const EXTENDS_YES: u8 = 1;
/// Positions after a non-empty cache run one at a time.
const EXTENDS_NO: u8 = 2;

/// How a forward ran: once (its logits output, if ONNX Runtime allocated it), or one position at
/// a time (the rows asked for are in the cache's scratch).
enum Ran {
    Once(Option<DynValue>),
    Stepwise,
}

/// One KV tensor, fed as the past input. `Shared`: also given to ONNX Runtime as the preallocated
/// present output, so GroupQueryAttention appends in place. `Growing`: replaced by the present
/// output ONNX Runtime allocates. A cache holds the session that made it: the session outlives
/// the values its allocator made, and a forward of another decoder refuses the cache.
pub struct KvCache {
    states: KvStates,
    layout: KvLayout,
    run_options: SharedRunOptions,
    /// The logits output of one-token steps, preallocated (as onnxruntime-genai does) so that ONNX
    /// Runtime writes them where the sampler reads them; multi-token forwards let it allocate.
    step_logits: DynValue,
    /// Logits handed out when they cannot be read in place: several rows, or float16.
    scratch: Vec<f32>,
    capacity: usize,
    /// The step's input data, kept between steps so that a step does not rebuild it: `ones`
    /// holds `capacity` ones, of which the attention mask is a prefix.
    ones: IntBuffer,
    ids: IntBuffer,
    positions: IntBuffer,
}

/// Integer input data in the type the graph takes.
enum IntBuffer {
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl IntBuffer {
    fn new(ty: IntType) -> IntBuffer {
        match ty {
            IntType::I32 => IntBuffer::I32(Vec::new()),
            IntType::I64 => IntBuffer::I64(Vec::new()),
        }
    }
    fn set(&mut self, values: impl Iterator<Item = i64>) {
        match self {
            IntBuffer::I32(v) => {
                v.clear();
                v.extend(values.map(|x| x as i32));
            }
            IntBuffer::I64(v) => {
                v.clear();
                v.extend(values);
            }
        }
    }
    /// The first `n` values as a `[1, n]` tensor that borrows them.
    fn view(&self, n: usize) -> Result<IntView<'_>> {
        Ok(match self {
            IntBuffer::I32(v) => IntView::I32(TensorRef::from_array_view(([1, n], &v[..n]))?),
            IntBuffer::I64(v) => IntView::I64(TensorRef::from_array_view(([1, n], &v[..n]))?),
        })
    }
}

enum IntView<'a> {
    I32(TensorRef<'a, i32>),
    I64(TensorRef<'a, i64>),
}

impl IntView<'_> {
    fn ptr(&self) -> *const OrtValue {
        match self {
            IntView::I32(v) => v.ptr(),
            IntView::I64(v) => v.ptr(),
        }
    }
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.states.len()
    }
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// The run options every forward of this cache uses; `terminate()` on them interrupts a run.
    pub fn run_options(&self) -> &SharedRunOptions {
        &self.run_options
    }

    /// Whether `truncate` can roll this cache back: not where a model carries recurrent states.
    pub fn can_roll_back(&self) -> bool {
        self.states.can_roll_back()
    }

    /// Forget everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.states.truncate(len, self.layout == KvLayout::Growing)
    }

    /// Bytes the cache holds: its KV (a shared layout's whole buffers) and its logits buffer.
    pub fn bytes(&self) -> usize {
        self.states.bytes() + super::graph::value_bytes(&self.step_logits)
    }

    /// Fresh run options, for a cache kept from an earlier request (whose options that
    /// request's cancel may have terminated).
    pub fn renew_run_options(&mut self) -> Result<()> {
        self.run_options = SharedRunOptions::new()?;
        Ok(())
    }

    /// Gives back the room past what the cache holds (a shared buffer is reallocated to its
    /// length): a cache kept between requests holds its positions only.
    pub fn shrink_to_fit(&mut self) -> Result<()> {
        let len = self.len().max(1);
        if self.layout == KvLayout::Shared && len < self.capacity {
            self.states.widen(len)?;
            self.capacity = len;
            self.ones.set(std::iter::repeat_n(1, len));
        }
        self.scratch = Vec::new();
        Ok(())
    }

    /// Room for `positions` in all: a shared buffer sized for an earlier, shorter request is
    /// reallocated with what it holds copied (a growing cache has room for anything).
    pub fn reserve(&mut self, positions: usize, context: usize) -> Result<()> {
        let capacity = positions.clamp(1, context);
        if capacity <= self.capacity {
            return Ok(());
        }
        if self.layout == KvLayout::Shared {
            self.states.widen(capacity)?;
        }
        self.ones.set(std::iter::repeat_n(1, capacity));
        self.capacity = capacity;
        Ok(())
    }
}

fn kv_tensor(precision: Precision, shape: Vec<usize>) -> Result<DynValue> {
    let n = shape.iter().product::<usize>();
    Ok(match precision {
        Precision::F32 => Tensor::from_array((shape, vec![0f32; n]))?.into_dyn(),
        Precision::F16 => Tensor::from_array((shape, vec![f16::ZERO; n]))?.into_dyn(),
    })
}

/// The shape of an empty state of batch 1, from the graph's declared shape: a KV state's
/// sequence axis is its second to last and starts at 0; another symbolic axis is the batch (1),
/// or, for a KV state whose head count or head size the graph leaves symbolic, genai_config's.
fn state_shape(ty: &ValueType, kind: StateKind, config: &GenaiConfig) -> std::result::Result<Vec<usize>, String> {
    let dims = ty.tensor_shape().ok_or("not a tensor")?;
    let rank = dims.len();
    match kind {
        StateKind::Kv if rank != 4 && rank != 5 => {
            return Err(format!("a KV state of shape {dims:?}; expected [batch, heads, seq, head] or [2, batch, heads, seq, head]"))
        }
        StateKind::Recurrent if rank < 2 => return Err(format!("a state of shape {dims:?}; expected [batch, ...]")),
        _ => {}
    }
    Ok(dims
        .iter()
        .enumerate()
        .map(|(axis, &d)| match (kind, axis) {
            (StateKind::Kv, a) if a == rank - 2 => 0,
            _ if d >= 0 => d as usize,
            (StateKind::Kv, a) if a == rank - 1 => config.head_size,
            (StateKind::Kv, a) if a == rank - 3 => config.num_kv_heads,
            _ => 1,
        })
        .collect())
}

/// The element type of the graph's logits output, which must have `vocab_size` per position:
/// one-token steps write the logits into a [1, 1, vocab_size] buffer.
fn logits_precision(session: &Session, config: &GenaiConfig) -> Result<Precision> {
    let names = &config.names;
    let logits = session.outputs().iter().find(|o| o.name() == names.logits).ok_or_else(|| Error::ModelConfig {
        path: config.path.clone(),
        field: "model.decoder.outputs.logits".into(),
        reason: format!("the graph {} has no output named `{}`", config.decoder_file, names.logits),
    })?;
    let precision = Precision::of(logits.dtype(), "logits")?;
    if let Some(&last) = logits.dtype().tensor_shape().and_then(|s| s.last()) {
        if last > 0 && last as usize != config.vocab_size {
            return Err(Error::ModelConfig {
                path: config.path.clone(),
                field: "model.vocab_size".into(),
                reason: format!("{} but the graph's `{}` output has {last} per position", config.vocab_size, names.logits),
            });
        }
    }
    Ok(precision)
}

/// What the graph's inputs take: the element types of the ids, mask and positions (the last two
/// optional) and the per-layer states, layer by layer.
struct GraphInputs {
    ids_type: IntType,
    mask_type: Option<IntType>,
    positions_type: Option<IntType>,
    states: Vec<State>,
}

impl GraphInputs {
    /// Every graph input is one edgellm knows how to feed, or the model does not load.
    fn read(session: &Session, graph_path: &Path, config: &GenaiConfig, input_ids: &str) -> Result<GraphInputs> {
        let names = &config.names;
        let (mut ids_type, mut mask_type, mut positions_type) = (None, None, None);
        let mut states: Vec<(usize, usize, State)> = Vec::new();
        for input in session.inputs() {
            let name = input.name();
            let ty = input.dtype();
            if name == input_ids {
                ids_type = Some(IntType::of(ty, name, graph_path)?);
            } else if name == names.attention_mask {
                mask_type = Some(IntType::of(ty, name, graph_path)?);
            } else if name == names.position_ids {
                positions_type = Some(IntType::of(ty, name, graph_path)?);
            } else if let Some(state) = state_input(session, graph_path, config, name, ty)? {
                states.push(state);
            } else {
                return Err(Error::ModelFile {
                    path: graph_path.to_path_buf(),
                    reason: format!(
                        "graph input `{name}` is one edgellm cannot supply: it feeds `{input_ids}`, `{}`, `{}` and the per-layer states that genai_config's model.decoder.inputs names (check past_key_names, past_value_names, past_names, past_conv_names there)",
                        names.attention_mask, names.position_ids
                    ),
                });
            }
        }
        let ids_type = ids_type.ok_or_else(|| Error::ModelConfig {
            path: config.path.clone(),
            field: "model.decoder.inputs.input_ids".into(),
            reason: format!("the graph {} has no input named `{input_ids}`", config.decoder_file),
        })?;
        if states.is_empty() {
            return Err(Error::ModelConfig {
                path: config.path.clone(),
                field: "model.decoder.inputs.past_key_names".into(),
                reason: format!(
                    "the graph {} has no past state input (`{}`, `{}`, `{}` or `{}`): edgellm runs decoders with a KV cache",
                    config.decoder_file, names.past_key, names.past_value, names.past_combined, names.past_conv
                ),
            });
        }
        // Layer by layer, key before value: the order does not matter to ONNX Runtime, but it
        // keeps the slots readable in a debugger.
        states.sort_by_key(|(layer, order, _)| (*layer, *order));
        let states: Vec<State> = states.into_iter().map(|(_, _, s)| s).collect();
        Ok(GraphInputs { ids_type, mask_type, positions_type, states })
    }
}

/// The per-layer state graph input `name` is, with its layer and the order of its kind among
/// genai_config's state patterns; `None` if it matches no pattern.
fn state_input(
    session: &Session,
    graph_path: &Path,
    config: &GenaiConfig,
    name: &str,
    ty: &ValueType,
) -> Result<Option<(usize, usize, State)>> {
    let Some((order, layer, present_pattern, kind)) = config
        .names
        .state_patterns()
        .into_iter()
        .enumerate()
        .find_map(|(order, (past, present, kind))| layer_of(past, name).map(|layer| (order, layer, present, kind)))
    else {
        return Ok(None);
    };
    let present = DecoderNames::layer(present_pattern, layer);
    if !session.outputs().iter().any(|o| o.name() == present) {
        return Err(Error::ModelFile {
            path: graph_path.to_path_buf(),
            reason: format!("graph input `{name}` has no matching output `{present}` (genai_config's present names)"),
        });
    }
    let shape = state_shape(ty, kind, config)
        .map_err(|reason| Error::ModelFile { path: graph_path.to_path_buf(), reason: format!("graph input `{name}`: {reason}") })?;
    let precision = Precision::of(ty, name)?;
    Ok(Some((layer, order, State { past: name.to_string(), present, kind, precision, shape })))
}

impl Decoder {
    pub fn load(runtime: &Runtime, dir: &Path, config: &GenaiConfig, options: &SessionOptions) -> Result<Decoder> {
        let graph_path = dir.join(&config.decoder_file);
        let (session, provider) = runtime.session(&graph_path, options)?;
        let rows_exact = provider.int4.rows_exact();
        let names = &config.names;
        let input_ids = names.input_ids.clone().ok_or_else(|| Error::ModelConfig {
            path: config.path.clone(),
            field: "model.decoder.inputs.input_ids".into(),
            reason: "missing: this decoder takes inputs_embeds, which only a multi-token model (multitoken_config.json) feeds".into(),
        })?;
        let logits_precision = logits_precision(&session, config)?;
        let inputs = GraphInputs::read(&session, &graph_path, config, &input_ids)?;
        let mut feed: Vec<&str> = vec![&input_ids];
        if inputs.mask_type.is_some() {
            feed.push(&names.attention_mask);
        }
        if inputs.positions_type.is_some() {
            feed.push(&names.position_ids);
        }
        feed.extend(inputs.states.iter().map(|s| s.past.as_str()));
        let fetch: Vec<&str> = std::iter::once(names.logits.as_str()).chain(inputs.states.iter().map(|s| s.present.as_str())).collect();
        // Input names in the order `forward` feeds them (ids, mask and positions if any, pasts),
        // output names (logits, presents).
        let graph = Graph::new(session, &graph_path, &feed, &fetch)?;
        Ok(Decoder {
            graph,
            context: config.context_length,
            vocab: config.vocab_size,
            logits_precision,
            ids_type: inputs.ids_type,
            mask_type: inputs.mask_type,
            positions_type: inputs.positions_type,
            states: inputs.states,
            provider,
            ties: Mutex::new(if rows_exact { TieMargin::exact() } else { TieMargin::default() }),
            extends: AtomicU8::new(EXTENDS_UNKNOWN),
        })
    }

    /// The near-tie margin of this graph's verify rows (see `TieMargin`).
    pub fn tie_margin(&self) -> f32 {
        self.ties.lock().unwrap_or_else(|e| e.into_inner()).margin()
    }

    /// A near tie re-checked: the verify's row and the one-token forward's.
    pub fn observe_tie(&self, batched: &[f32], single: &[f32]) {
        self.ties.lock().unwrap_or_else(|e| e.into_inner()).observe(batched, single);
    }

    /// Whether a cache of this graph can be rolled back (speculative decoding): every state is
    /// a KV state. The names of the others, if not.
    pub fn recurrent_states(&self) -> Vec<&str> {
        self.states.iter().filter(|s| s.kind == StateKind::Recurrent).map(|s| s.past.as_str()).collect()
    }

    /// Whether the `Shared` layout (one preallocated buffer bound as past and present) fits this
    /// graph: only GroupQueryAttention appends in place, and its states are 4-D KV tensors.
    pub fn supports_shared_kv(&self) -> bool {
        self.states.iter().all(|s| s.kind == StateKind::Kv && s.shape.len() == 4)
    }

    /// The KV layout to run with: `requested` by the config (or `None` for genai_config's
    /// `search.past_present_share_buffer`, which a graph without in-place KV overrides).
    pub fn choose_layout(&self, config: &GenaiConfig, requested: Option<KvLayout>) -> Result<KvLayout> {
        match requested {
            Some(KvLayout::Shared) if !self.supports_shared_kv() => Err(Error::ModelConfig {
                path: config.path.clone(),
                field: "kv_layout ([[model]] in the edgellm config)".into(),
                reason: format!(
                    "\"shared\" needs 4-D KV states appended in place (GroupQueryAttention); the graph {} has {}: use \"growing\" or \"auto\"",
                    config.decoder_file,
                    self.states.iter().map(|s| format!("`{}` {:?}", s.past, s.shape)).take(2).collect::<Vec<_>>().join(", ")
                ),
            }),
            Some(layout) => Ok(layout),
            None if config.search.past_present_share_buffer && self.supports_shared_kv() => Ok(KvLayout::Shared),
            None => Ok(KvLayout::Growing),
        }
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }
    pub fn context(&self) -> usize {
        self.context
    }

    /// A fresh, empty cache for one sequence.
    /// `positions` is how many the sequence may reach (prompt + new tokens); the shared buffers
    /// are sized to it, not to the whole context, as onnxruntime-genai sizes them to max_length:
    /// allocating and zeroing a full-context buffer per request showed in time to first token.
    pub fn new_cache(&self, layout: KvLayout, positions: usize) -> Result<KvCache> {
        let capacity = positions.clamp(1, self.context);
        let kv_positions = match layout {
            KvLayout::Shared if !self.supports_shared_kv() => {
                return Err(Error::Inference("the shared KV layout does not fit this graph's states".into()))
            }
            KvLayout::Shared => capacity,
            KvLayout::Growing => 0,
        };
        let slots = self.states.iter().map(|s| kv_tensor(s.precision, s.shape_with(kv_positions))).collect::<Result<_>>()?;
        let step_logits = match self.logits_precision {
            Precision::F32 => Tensor::from_array(([1, 1, self.vocab], vec![0f32; self.vocab]))?.into_dyn(),
            Precision::F16 => Tensor::from_array(([1, 1, self.vocab], vec![f16::ZERO; self.vocab]))?.into_dyn(),
        };
        let mut ones = IntBuffer::new(self.mask_type.unwrap_or(IntType::I64));
        ones.set(std::iter::repeat_n(1, capacity));
        Ok(KvCache {
            states: KvStates::new(&self.graph, slots, self.states.iter().map(State::seq_axis).collect()),
            layout,
            run_options: SharedRunOptions::new()?,
            step_logits,
            scratch: Vec::new(),
            capacity,
            ones,
            ids: IntBuffer::new(self.ids_type),
            positions: IntBuffer::new(self.positions_type.unwrap_or(IntType::I64)),
        })
    }

    /// Runs `ids` after what the cache holds. Returns the logits of the last `rows` positions,
    /// row-major `rows x vocab`, as float32.
    pub fn forward(&self, cache: &mut KvCache, ids: &[u32], rows: usize) -> Result<Vec<f32>> {
        let allocated = match self.run_positions(cache, ids, rows)? {
            Ran::Once(allocated) => allocated,
            Ran::Stepwise => return Ok(std::mem::take(&mut cache.scratch)),
        };
        let mut logits = Vec::new();
        self.read_rows(allocated.as_ref().unwrap_or(&cache.step_logits), ids.len(), rows, &mut logits)?;
        Ok(logits)
    }

    /// `forward`, with the logits left in the cache until its next forward: a one-token step of a
    /// float32 model hands out the very buffer ONNX Runtime wrote, so the decode loop neither
    /// allocates nor copies its logits.
    pub fn forward_in_cache<'c>(&self, cache: &'c mut KvCache, ids: &[u32], rows: usize) -> Result<&'c mut [f32]> {
        match self.run_positions(cache, ids, rows)? {
            Ran::Once(allocated) => self.logits_in_cache(cache, allocated, ids.len(), rows),
            Ran::Stepwise => Ok(&mut cache.scratch),
        }
    }

    /// `run` of `ids` after what the cache holds, or, where the graph cannot take several
    /// positions after a non-empty cache (a kept prompt prefix, a prefill chunk after the first,
    /// a verify), one position at a time with the last `rows` rows left in `cache.scratch`: the
    /// inputs of each step are those of a plain decode step, so the rows are the one-token rows.
    fn run_positions(&self, cache: &mut KvCache, ids: &[u32], rows: usize) -> Result<Ran> {
        if ids.len() < 2 || cache.states.is_empty() {
            return self.run(cache, ids).map(Ran::Once);
        }
        let learning = match self.extends.load(Ordering::Relaxed) {
            EXTENDS_NO => None,
            EXTENDS_YES => return self.run(cache, ids).map(Ran::Once),
            _ => match self.run(cache, ids) {
                Ok(allocated) => {
                    self.extends.store(EXTENDS_YES, Ordering::Relaxed);
                    return Ok(Ran::Once(allocated));
                }
                // ONNX Runtime refused the run, which kept nothing (the cache grows after a run
                // succeeds): the positions run one at a time below, and only if they do is the
                // graph marked. Anything else (`Cancelled`, a full cache) is the request's error.
                Err(Error::Inference(reason)) => Some(reason),
                Err(e) => return Err(e),
            },
        };
        let first_row = ids.len() - rows.min(ids.len());
        let mut out = std::mem::take(&mut cache.scratch);
        out.clear();
        for (i, &id) in ids.iter().enumerate() {
            // A one-token run writes its logits into `cache.step_logits`.
            self.run(cache, &[id])?;
            if i >= first_row {
                match self.logits_precision {
                    Precision::F32 => out.extend_from_slice(cache.step_logits.try_extract_tensor::<f32>()?.1),
                    Precision::F16 => out.extend(cache.step_logits.try_extract_tensor::<f16>()?.1.iter().map(|v| v.to_f32())),
                }
            }
        }
        cache.scratch = out;
        if let Some(reason) = learning {
            tracing::warn!(%reason, "the graph cannot run several positions after a non-empty KV cache: they run one at a time");
            self.extends.store(EXTENDS_NO, Ordering::Relaxed);
        }
        Ok(Ran::Stepwise)
    }

    /// A one-token step of `id` after the first `len` positions, the positions after them kept:
    /// a near tie inside a verified round decided as plain decoding decides it, without losing
    /// the rows verified after it. Position `len` then holds the step's KV (buffers sized ahead)
    /// or the verify's (a growing layout's values, kept aside whole); either is the token's.
    pub fn step_inside<'c>(&self, cache: &'c mut KvCache, len: usize, id: u32) -> Result<&'c mut [f32]> {
        let aside = cache.states.cut_aside(len, cache.layout == KvLayout::Growing)?;
        let ran = self.run(cache, &[id]);
        cache.states.restore(aside);
        let allocated = ran?;
        self.logits_in_cache(cache, allocated, 1, 1)
    }

    /// The last `rows` of the `n` rows of logits a run left (in `allocated`, or written into the
    /// cache's step buffer), read in place where they can be.
    fn logits_in_cache<'c>(&self, cache: &'c mut KvCache, allocated: Option<DynValue>, n: usize, rows: usize) -> Result<&'c mut [f32]> {
        if allocated.is_none() && self.logits_precision == Precision::F32 {
            let range = self.row_range(n, rows);
            return Ok(&mut cache.step_logits.try_extract_tensor_mut::<f32>()?.1[range]);
        }
        self.read_rows(allocated.as_ref().unwrap_or(&cache.step_logits), n, rows, &mut cache.scratch)?;
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
    fn run(&self, cache: &mut KvCache, ids: &[u32]) -> Result<Option<DynValue>> {
        cache.states.check_owner(&self.graph)?;
        let n = ids.len();
        let total = cache.states.len() + n;
        if total > cache.capacity {
            return Err(Error::PromptTooLong { tokens: total, context: cache.capacity });
        }
        cache.ids.set(ids.iter().map(|&t| t as i64));
        let ids_value = cache.ids.view(n)?;
        let mask_value = self.mask_type.map(|_| cache.ones.view(total)).transpose()?;
        let positions_value = if self.positions_type.is_some() {
            cache.positions.set((cache.states.len()..total).map(|p| p as i64));
            Some(cache.positions.view(n)?)
        } else {
            None
        };

        let slots = &mut cache.states.values;
        let mut inputs: Vec<*const OrtValue> = Vec::with_capacity(slots.len() + 3);
        inputs.push(ids_value.ptr());
        inputs.extend(mask_value.as_ref().map(|v| v.ptr()));
        inputs.extend(positions_value.as_ref().map(|v| v.ptr()));
        inputs.extend(slots.iter().map(|v| v.ptr()));
        // A non-null output is preallocated: ONNX Runtime writes into it. A null one it allocates.
        let preallocated_logits = n == 1;
        let mut outputs: Vec<*mut OrtValue> = Vec::with_capacity(slots.len() + 1);
        outputs.push(if preallocated_logits { cache.step_logits.ptr_mut() } else { ptr::null_mut() });
        match cache.layout {
            KvLayout::Shared => outputs.extend(slots.iter_mut().map(|v| v.ptr_mut())),
            KvLayout::Growing => outputs.extend(std::iter::repeat_n(ptr::null_mut(), slots.len())),
        }
        // SAFETY: the input values are alive for the call; the preallocated outputs are tensors of
        // the shapes the graph writes ([1, 1, vocab] logits, checked at load; the shared KV buffers
        // of `capacity` positions) and this thread is their only user.
        let mut taken = unsafe { self.graph.run_raw(&cache.run_options, &inputs, &mut outputs)? }.into_iter();
        let allocated_logits = taken.next().flatten();
        if cache.layout == KvLayout::Growing {
            for (slot, present) in cache.states.values.iter_mut().zip(taken) {
                *slot = present.expect("a growing present is allocated");
            }
        }
        cache.states.grew(n);
        Ok(allocated_logits)
    }
}
