//! The ONNX execution layer: the one way edgellm runs a graph, whichever it is (a decoder, a
//! draft, a multi-token model's embedder, base and micro decoder). A `Graph` is a session with
//! the names it is fed and fetched by, resolved once at load (from genai_config or the
//! multi-token contract) and checked against the graph; every run goes through ONNX Runtime's
//! `Run` with the request's run options, so that a terminated run is known as `Cancelled` from
//! the cancel token's flag; float data is read and written as float32 or float16, as the graph
//! declares it.

use std::borrow::Cow;
use std::ffi::{c_char, CString};
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use half::f16;
use ort::session::RunOptions;
use ort::sys::OrtValue;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use ort::AsPointer;

use crate::error::{Error, Result};
use crate::runtime::LoadedSession;

/// The run options of one sequence, shared with its `CancelToken`: another thread may only call
/// `terminate`, which sets ONNX Runtime's atomic terminate flag (made for exactly this) and our
/// own, from which a failed run is known to be a cancellation (not from the error's wording).
#[derive(Clone)]
pub struct SharedRunOptions(Arc<(RunOptions, AtomicBool)>);

impl SharedRunOptions {
    pub fn new() -> Result<Self> {
        Ok(SharedRunOptions(Arc::new((RunOptions::new()?, AtomicBool::new(false)))))
    }
    pub(crate) fn get(&self) -> &RunOptions {
        &self.0 .0
    }
    pub fn terminate(&self) -> Result<()> {
        self.0 .1.store(true, Ordering::SeqCst);
        Ok(self.0 .0.terminate()?)
    }
    /// The error of a failed run under these options: `Cancelled` once `terminate` was called.
    pub(crate) fn run_error(&self, e: ort::Error) -> Error {
        if self.0 .1.load(Ordering::SeqCst) {
            Error::Cancelled
        } else {
            Error::Inference(e.to_string())
        }
    }
}

/// Element type of float data (KV cache, logits, hidden states): float32 from CPU exports,
/// float16 from GPU ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    pub(crate) fn of(ty: &ValueType, what: &str) -> Result<Precision> {
        match ty.tensor_type() {
            Some(TensorElementType::Float32) => Ok(Precision::F32),
            Some(TensorElementType::Float16) => Ok(Precision::F16),
            other => Err(Error::Inference(format!("{what}: unsupported element type {other:?} (float32 or float16 expected)"))),
        }
    }
}

/// A tensor of `precision` holding `data` (float32 values, converted where the graph takes float16).
pub(crate) fn float_tensor(precision: Precision, shape: Vec<usize>, data: &[f32]) -> Result<DynValue> {
    Ok(match precision {
        Precision::F32 => Tensor::from_array((shape, data.to_vec()))?.into_dyn(),
        Precision::F16 => Tensor::from_array((shape, data.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()))?.into_dyn(),
    })
}

/// The data of a float32 tensor as it is, or of a float16 one converted.
pub(crate) fn floats(value: &DynValue) -> Result<Cow<'_, [f32]>> {
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => Ok(Cow::Owned(value.try_extract_tensor::<f16>()?.1.iter().map(|v| v.to_f32()).collect())),
        _ => Ok(Cow::Borrowed(value.try_extract_tensor::<f32>()?.1)),
    }
}

/// C strings of the names a run feeds and fetches, built once: the decode loop is hot, and
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

/// A session and the names of what it is fed and fetched, in the order `run` takes them.
pub struct Graph {
    /// Shared with the KV caches of this graph: the values its allocator made outlive it.
    session: Arc<LoadedSession>,
    names: RunNames,
}

impl Graph {
    /// `session` fed `inputs` and fetched `outputs`: each must be one of the graph's (the error
    /// names `file`, the graph file, and the missing name).
    pub(crate) fn new(session: LoadedSession, file: &Path, inputs: &[&str], outputs: &[&str]) -> Result<Graph> {
        for name in inputs {
            if !session.inputs().iter().any(|i| i.name() == *name) {
                return Err(Error::ModelFile { path: file.to_path_buf(), reason: format!("the graph has no input named `{name}`") });
            }
        }
        for name in outputs {
            if !session.outputs().iter().any(|o| o.name() == *name) {
                return Err(Error::ModelFile { path: file.to_path_buf(), reason: format!("the graph has no output named `{name}`") });
            }
        }
        Ok(Graph { session: Arc::new(session), names: RunNames::new(inputs, outputs)? })
    }

    /// The declared type of input `name`.
    pub(crate) fn input_type(&self, name: &str) -> Option<&ValueType> {
        self.session.inputs().iter().find(|i| i.name() == name).map(|i| i.dtype())
    }

    /// One run: `inputs` in the order of the input names, every output allocated by ONNX
    /// Runtime, returned in the order of the output names.
    pub(crate) fn run(&self, options: &SharedRunOptions, inputs: &[&DynValue]) -> Result<Vec<DynValue>> {
        let inputs: Vec<*const OrtValue> = inputs.iter().map(|v| v.ptr()).collect();
        let mut outputs = vec![ptr::null_mut(); self.names.outputs.len()];
        // SAFETY: the inputs are borrowed values, alive for the call; no output is preallocated.
        let taken = unsafe { self.run_raw(options, &inputs, &mut outputs)? };
        Ok(taken.into_iter().map(|v| v.expect("every output allocated")).collect())
    }

    /// One run with some outputs preallocated (non-null: ONNX Runtime writes into them) and the
    /// others allocated by ONNX Runtime (null: returned, owned, at their places; `None` at the
    /// preallocated ones).
    ///
    /// # Safety
    /// Every input pointer is a live value for the call; every non-null output is a live tensor
    /// of the shape and type the graph writes there, used by no one else during the call.
    pub(crate) unsafe fn run_raw(
        &self,
        options: &SharedRunOptions,
        inputs: &[*const OrtValue],
        outputs: &mut [*mut OrtValue],
    ) -> Result<Vec<Option<DynValue>>> {
        // ONNX Runtime reads as many names as values: the two must agree.
        assert_eq!((inputs.len(), outputs.len()), (self.names.inputs.len(), self.names.outputs.len()));
        let allocate: Vec<bool> = outputs.iter().map(|p| p.is_null()).collect();
        // SAFETY: the session, run options and names are alive for the call; the caller vouches
        // for the values.
        let status = unsafe {
            (ort::api().Run)(
                // ONNX Runtime's Run takes the session as mutable but is safe to call on a shared
                // one (ort's own `ptr_mut` is this cast).
                self.session.ptr().cast_mut(),
                options.get().ptr(),
                self.names.inputs.as_ptr(),
                inputs.as_ptr(),
                inputs.len(),
                self.names.outputs.as_ptr(),
                outputs.len(),
                outputs.as_mut_ptr(),
            )
        };
        // SAFETY: `status` was just returned by ONNX Runtime; this takes ownership of it. A failed
        // Run fills no output, so nothing is left to release.
        unsafe { ort::Error::result_from_status(status) }.map_err(|e| options.run_error(e))?;
        let allocator = self.session.allocator();
        // Take ownership of what ONNX Runtime allocated, so that it is released once.
        // SAFETY: a null output was filled by the successful Run with a value the caller now owns.
        let take = |p: *mut OrtValue| unsafe { DynValue::from_ptr(NonNull::new(p).expect("Run filled every output"), Some(allocator)) };
        Ok(outputs.iter().zip(allocate).map(|(&p, allocated)| allocated.then(|| take(p))).collect())
    }
}

/// The per-layer states of one sequence on one graph: the past inputs of its next run, and how
/// many positions they hold. The one KV type of every graph (a decoder's cache, a multi-token
/// base's, a micro decoder's). It holds the session of the graph that made it: the values that
/// session's allocator made outlive it, and a run of another graph refuses them.
pub struct KvStates {
    session: Arc<LoadedSession>,
    pub(crate) values: Vec<DynValue>,
    /// Each value's sequence axis; `None` for a recurrent state, which cannot be rolled back.
    seq_axes: Vec<Option<usize>>,
    len: usize,
}

impl KvStates {
    /// Empty states of `graph` (`values` hold 0 positions, or are buffers sized ahead).
    pub(crate) fn new(graph: &Graph, values: Vec<DynValue>, seq_axes: Vec<Option<usize>>) -> KvStates {
        KvStates { session: Arc::clone(&graph.session), values, seq_axes, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The states are `graph`'s, or an error says they are not.
    pub(crate) fn check_owner(&self, graph: &Graph) -> Result<()> {
        if Arc::ptr_eq(&self.session, &graph.session) {
            Ok(())
        } else {
            Err(Error::Inference("a KV cache was fed to a graph other than the one that made it".into()))
        }
    }

    /// Bytes the state values hold (a shared layout's whole buffers).
    pub fn bytes(&self) -> usize {
        self.values.iter().map(value_bytes).sum()
    }

    /// Reallocates buffers sized ahead (a shared layout) to `capacity` positions (at least
    /// their length), keeping the positions they hold.
    pub(crate) fn widen(&mut self, capacity: usize) -> Result<()> {
        for (value, axis) in self.values.iter_mut().zip(&self.seq_axes) {
            if let Some(axis) = *axis {
                *value = widen_positions(value, axis, self.len, capacity)?;
            }
        }
        Ok(())
    }

    /// A run appended `n` positions.
    pub(crate) fn grew(&mut self, n: usize) {
        self.len += n;
    }

    /// Whether `truncate` can roll the states back: not where a model carries recurrent states.
    pub fn can_roll_back(&self) -> bool {
        self.seq_axes.iter().all(Option::is_some)
    }

    /// Cuts the states to their first `len` positions for a forward that `restore` then undoes,
    /// giving back the positions after them: where the values are buffers sized ahead (not
    /// `sliced`) they still hold those positions, and the forward wrote position `len` only;
    /// where they hold exactly their positions, the uncut values are kept aside whole.
    pub(crate) fn cut_aside(&mut self, len: usize, sliced: bool) -> Result<Aside> {
        let aside = Aside { len: self.len, values: None };
        if len >= self.len {
            return Ok(aside);
        }
        if !self.can_roll_back() {
            return Err(Error::Inference("this model carries recurrent states, which cannot be rolled back".into()));
        }
        let values = if sliced {
            let cut = self
                .values
                .iter()
                .zip(&self.seq_axes)
                .map(|(v, a)| slice_positions(v, a.expect("checked above"), len))
                .collect::<Result<Vec<_>>>()?;
            Some(std::mem::replace(&mut self.values, cut))
        } else {
            None
        };
        self.len = len;
        Ok(Aside { values, ..aside })
    }

    /// Gives back what `cut_aside` cut, after the forward it was cut for.
    pub(crate) fn restore(&mut self, aside: Aside) {
        if let Some(values) = aside.values {
            self.values = values;
        }
        self.len = aside.len;
    }

    /// Forgets every position after the first `len`: the values are sliced where they hold
    /// exactly their positions (`sliced`), and only the length changes where they are buffers
    /// sized ahead (a shared KV layout).
    pub(crate) fn truncate(&mut self, len: usize, sliced: bool) -> Result<()> {
        // A cut never given back.
        self.cut_aside(len, sliced).map(drop)
    }
}

/// What `KvStates::cut_aside` keeps to give the cut positions back.
pub(crate) struct Aside {
    len: usize,
    values: Option<Vec<DynValue>>,
}

/// Bytes of a float tensor's data.
pub(crate) fn value_bytes(value: &DynValue) -> usize {
    let elements: usize = value.dtype().tensor_shape().map(|s| s.iter().map(|&d| d.max(0) as usize).product()).unwrap_or(0);
    let size = match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => 2,
        _ => 4,
    };
    elements * size
}

/// `value` with its `axis` resized to `capacity` (>= `len`), the first `len` positions copied and
/// the rest zero: a buffer sized ahead, grown for a longer sequence than it was made for, or
/// shrunk to what it holds.
pub(crate) fn widen_positions(value: &DynValue, axis: usize, len: usize, capacity: usize) -> Result<DynValue> {
    fn widen<T: ort::value::PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static>(
        value: &DynValue,
        axis: usize,
        len: usize,
        capacity: usize,
    ) -> Result<DynValue> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let t = dims[axis];
        let mut out = vec![T::default(); outer * capacity * inner];
        for o in 0..outer {
            out[o * capacity * inner..(o * capacity + len) * inner].copy_from_slice(&data[o * t * inner..(o * t + len) * inner]);
        }
        let mut new_dims = dims;
        new_dims[axis] = capacity;
        Ok(Tensor::from_array((new_dims, out))?.into_dyn())
    }
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => widen::<f16>(value, axis, len, capacity),
        _ => widen::<f32>(value, axis, len, capacity),
    }
}

/// The first `len` positions of `value` along `axis`.
pub(crate) fn slice_positions(value: &DynValue, axis: usize, len: usize) -> Result<DynValue> {
    fn slice<T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
        value: &DynValue,
        axis: usize,
        len: usize,
    ) -> Result<DynValue> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        let t = dims[axis];
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            out.extend_from_slice(&data[o * t * inner..(o * t + len) * inner]);
        }
        let mut new_dims = dims;
        new_dims[axis] = len;
        Ok(Tensor::from_array((new_dims, out))?.into_dyn())
    }
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => slice::<f16>(value, axis, len),
        _ => slice::<f32>(value, axis, len),
    }
}
