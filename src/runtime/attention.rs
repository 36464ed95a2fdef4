//! `GroupQueryAttention` (com.microsoft) on the CPU, each query row computed on its own: the same
//! position gives the same bits whether a forward runs it alone (plain decoding) or among others
//! (a speculative verify, a prefill).
//!
//! Why: ONNX Runtime's kernel multiplies a head's query rows with the keys and values as one
//! matrix product, and its product for one row sums in another order than for several: a row of a
//! several-row call differs from the same row alone in its last bits. Through the layers that
//! grows to a difference in the logits, so a verify's decision at a near tie could differ from
//! plain decoding's, and every near tie was re-run as a one-position forward (a share of a
//! speculative run's target forwards). With this kernel and edgellm's int4 products, every
//! node of the builder's graph computes a row from that row alone, and a verify's rows are plain
//! decoding's exactly (`Int4Kernel::rows_exact`).
//!
//! The arithmetic is ONNX Runtime's: rotary embedding of the new query and key rows at their
//! positions (from `seqlens_k`; where `do_rotary`, else the graph rotated them), keys and values
//! appended to the cache (in place when past and present share a buffer), scores `scale x q.k`
//! over the causal prefix, softmax (maximum, sums of exponentials, times the reciprocal), and the
//! probabilities' sum of value rows. Batch 1 only:
//! edgellm runs one sequence per cache.

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::{TensorElementType, ValueRef};

use std::collections::HashMap;

use super::int4::TaskPointer;
use super::onnx_proto::{Initializer, Node};

pub(crate) const OP: &str = "GroupQueryAttention";

/// Why this kernel cannot stand in for ONNX Runtime's at `node`, if it cannot.
pub(crate) fn covered(node: &Node, initializers: &HashMap<String, Initializer>, graph_inputs: &HashMap<String, i32>) -> Result<(), String> {
    let int = |name: &str| node.ints.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
    let float = |name: &str| node.floats.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
    if int("local_window_size").is_some_and(|w| w != -1) {
        return Err("a local window".into());
    }
    if int("smooth_softmax").is_some_and(|s| s != 0) || float("softcap").is_some_and(|s| s != 0.0) {
        return Err("smooth softmax or a softcap".into());
    }
    if int("qk_output").is_some_and(|q| q != 0) {
        return Err("it outputs its scores".into());
    }
    if node.inputs.iter().skip(9).any(|i| !i.is_empty()) {
        return Err("position ids, an attention bias or head sinks".into());
    }
    // The kernel is float32 only: the cos cache or the graph's past key tells the element type.
    let float = |name: Option<&String>| {
        name.and_then(|n| initializers.get(n).map(|i| i.data_type).or(graph_inputs.get(n).copied())).map(|t| t == 1)
    };
    let rotary = int("do_rotary") == Some(1);
    match float(node.inputs.get(if rotary { 7 } else { 3 })) {
        Some(true) => Ok(()),
        Some(false) => Err("not float32".into()),
        None if rotary => Err("its cos cache is not an initializer".into()),
        None => Err("no past key among the graph's inputs to tell its element type".into()),
    }
}

pub(crate) struct GroupQueryAttention;

impl Operator for GroupQueryAttention {
    type Kernel<'attr> = Attention;

    fn name(&self) -> &str {
        OP
    }

    /// query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
    /// sin_cache, position_ids, attention_bias, head_sink: the builder's nodes name twelve.
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let float = TensorElementType::Float32;
        [
            OperatorInput::required(float),
            OperatorInput::optional(float),
            OperatorInput::optional(float),
            OperatorInput::optional(float),
            OperatorInput::optional(float),
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::optional(float),
            OperatorInput::optional(float),
            OperatorInput::optional(TensorElementType::Int64),
            OperatorInput::optional(float),
            OperatorInput::optional(float),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        let float = TensorElementType::Float32;
        [OperatorOutput::required(float), OperatorOutput::required(float), OperatorOutput::required(float)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Attention> {
        let count = |name: &str| -> ort::Result<usize> {
            let value: i64 = kctx.get(name).ok_or_else(|| ort::Error::new(format!("GroupQueryAttention without {name}")))?;
            usize::try_from(value)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| ort::Error::new(format!("GroupQueryAttention with {name} = {value}")))
        };
        let (heads, kv_heads) = (count("num_heads")?, count("kv_num_heads")?);
        if heads % kv_heads != 0 {
            return Err(ort::Error::new(format!("GroupQueryAttention: {heads} heads are not groups of {kv_heads}")));
        }
        Ok(Attention {
            heads,
            kv_heads,
            scale: kctx.get::<f32>("scale").unwrap_or(0.0),
            rotary: kctx.get::<i64>("do_rotary").unwrap_or(0) == 1,
            interleaved: kctx.get::<i64>("rotary_interleaved").unwrap_or(0) == 1,
        })
    }
}

pub(crate) struct Attention {
    heads: usize,
    kv_heads: usize,
    /// 0: 1 / sqrt(head size).
    scale: f32,
    /// Whether the kernel rotates the new query and key rows (else the graph did).
    rotary: bool,
    interleaved: bool,
}

impl Kernel for Attention {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let query = ctx.input(0)?.ok_or_else(|| fail("no query".into()))?;
        let (q_shape, q) = query.try_extract_tensor::<f32>()?;
        let (rows, width) = query_rows(q_shape)?;
        let (key, value) = (ctx.input(1)?, ctx.input(2)?);
        let shape = self.shape(rows, width, key.is_none())?;
        let (new_keys, new_values) = shape.new_keys_and_values(q, key.as_ref(), value.as_ref())?;
        let seqlens = ctx.input(5)?.ok_or_else(|| fail("no seqlens_k".into()))?;
        let total = usize::try_from(seqlens.try_extract_tensor::<i32>()?.1[0] + 1).map_err(|_| fail("a negative seqlens_k".into()))?;
        let total_input = ctx.input(6)?.ok_or_else(|| fail("no total_sequence_length".into()))?;
        let total_length = total_input.try_extract_tensor::<i32>()?.1[0].max(0) as usize;
        let past = total.checked_sub(rows).ok_or_else(|| fail(format!("{rows} new rows with seqlens_k + 1 = {total}")))?;
        let (cos_input, sin_input) = (ctx.input(7)?, ctx.input(8)?);
        let rotary = self.rotary(cos_input.as_ref(), sin_input.as_ref(), shape.head, total)?;
        // The cache: past (if any) and present, which may be one buffer.
        let (past_key, past_value) = (ctx.input(3)?, ctx.input(4)?);
        let (past_keys, past_values, past_len) = match (&past_key, &past_value) {
            (Some(k), Some(v)) => {
                let (shape, k) = k.try_extract_tensor::<f32>()?;
                let (_, v) = v.try_extract_tensor::<f32>()?;
                (k.as_ptr(), v.as_ptr(), shape.get(2).copied().unwrap_or(0) as usize)
            }
            _ => (std::ptr::null(), std::ptr::null(), 0),
        };
        let present_len = total_length.max(past_len).max(total);
        let present_shape = [1, self.kv_heads as i64, present_len as i64, shape.head as i64];
        let mut output = ctx.output(0, [1, rows as i64, (self.heads * shape.head) as i64])?.ok_or_else(|| fail("no output".into()))?;
        let mut present_key = ctx.output(1, present_shape)?.ok_or_else(|| fail("no present key".into()))?;
        let mut present_value = ctx.output(2, present_shape)?.ok_or_else(|| fail("no present value".into()))?;
        let out = output.try_extract_tensor_mut::<f32>()?.1.as_mut_ptr();
        let cache = Cache {
            keys: present_key.try_extract_tensor_mut::<f32>()?.1.as_mut_ptr(),
            values: present_value.try_extract_tensor_mut::<f32>()?.1.as_mut_ptr(),
            present_len,
            past,
            total,
            past_keys,
            past_values,
            past_len,
        };
        if !past_keys.is_null() && past_len < past {
            return Err(fail(format!("a past of {past_len} positions where seqlens_k says {past}")));
        }
        shape.append_to_cache(&cache, new_keys, new_values, &rotary)?;
        shape.attend_every_head(ctx, q, &rotary, &cache, out)
    }
}

fn fail(what: String) -> ort::Error {
    ort::Error::new(format!("GroupQueryAttention: {what}"))
}

/// The query's rows and their width, from its shape `[1, rows, width]`.
fn query_rows(q_shape: &[i64]) -> ort::Result<(usize, usize)> {
    let [batch, rows, width] = q_shape[..] else { return Err(fail(format!("a query of shape {q_shape:?}"))) };
    if batch != 1 {
        return Err(fail(format!("a batch of {batch}; edgellm's kernel runs batch 1")));
    }
    let (rows, width) = (rows as usize, width as usize);
    if rows == 0 {
        return Err(fail("a query of no positions".into()));
    }
    Ok((rows, width))
}

impl Attention {
    /// The call's heads and rows; `packed` where the query input also holds the new keys and values.
    fn shape(&self, rows: usize, width: usize, packed: bool) -> ort::Result<Shape> {
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let head = if packed { width / (heads + 2 * kv_heads) } else { width / heads };
        if head == 0 || head * if packed { heads + 2 * kv_heads } else { heads } != width {
            return Err(fail(format!("a query width of {width} for {heads} heads and {kv_heads} KV heads")));
        }
        let scale = if self.scale == 0.0 { 1.0 / (head as f32).sqrt() } else { self.scale };
        Ok(Shape { heads, kv_heads, head, rows, width, packed, scale })
    }

    /// The rotation of the new rows: none where the graph rotated them, else by the cos and sin
    /// caches, which must reach position `total - 1`.
    fn rotary<'a>(
        &self,
        cos: Option<&'a ValueRef<'_>>,
        sin: Option<&'a ValueRef<'_>>,
        head: usize,
        total: usize,
    ) -> ort::Result<Rotary<'a>> {
        match (self.rotary, cos, sin) {
            (false, _, _) => Ok(Rotary { cos: &[], sin: &[], half: 0, interleaved: false }),
            (true, Some(cos), Some(sin)) => {
                let (cos_shape, cos) = cos.try_extract_tensor::<f32>()?;
                let (_, sin) = sin.try_extract_tensor::<f32>()?;
                let half = cos_shape.get(1).copied().unwrap_or(0) as usize;
                if half == 0 || 2 * half > head || (total * half) > cos.len() || cos.len() != sin.len() {
                    return Err(fail(format!("a cos cache of shape {cos_shape:?} for head size {head} and position {}", total - 1)));
                }
                Ok(Rotary { cos, sin, half, interleaved: self.interleaved })
            }
            (true, _, _) => Err(fail("do_rotary without a cos and a sin cache".into())),
        }
    }
}

/// One call's heads and rows.
struct Shape {
    heads: usize,
    kv_heads: usize,
    /// The head size.
    head: usize,
    /// New positions.
    rows: usize,
    /// A query row's width: its heads, and with `packed` the new key and value heads after them.
    width: usize,
    packed: bool,
    scale: f32,
}

/// The KV cache a call writes: `present_len` positions a KV head, of which the first `past` were
/// there before the call and `total` are after it. The past comes from a separate buffer (read
/// only) unless both are one.
struct Cache {
    keys: *mut f32,
    values: *mut f32,
    present_len: usize,
    past: usize,
    total: usize,
    /// Null without a past input.
    past_keys: *const f32,
    past_values: *const f32,
    past_len: usize,
}

impl Shape {
    /// The width from one new key or value row to the next in their inputs.
    #[inline]
    fn new_row_width(&self) -> usize {
        if self.packed {
            self.width
        } else {
            self.kv_heads * self.head
        }
    }

    /// The new key and value rows: in the query where packed, else their own inputs.
    fn new_keys_and_values<'a>(
        &self,
        q: &'a [f32],
        key: Option<&'a ValueRef<'_>>,
        value: Option<&'a ValueRef<'_>>,
    ) -> ort::Result<(&'a [f32], &'a [f32])> {
        let head = self.head;
        let (k_in, v_in): (&[f32], &[f32]) = if self.packed {
            (&q[self.heads * head..], &q[(self.heads + self.kv_heads) * head..])
        } else {
            let (Some(k), Some(v)) = (key, value) else { return Err(fail("a key without a value".into())) };
            (k.try_extract_tensor::<f32>()?.1, v.try_extract_tensor::<f32>()?.1)
        };
        let needed = (self.rows - 1) * self.new_row_width() + self.kv_heads * head;
        if k_in.len() < needed || v_in.len() < needed {
            return Err(fail("keys or values shorter than the query".into()));
        }
        Ok((k_in, v_in))
    }

    /// Copies the past into the present (unless they are one buffer) and writes the new rows
    /// after it, keys rotated.
    fn append_to_cache(&self, cache: &Cache, new_keys: &[f32], new_values: &[f32], rotary: &Rotary) -> ort::Result<()> {
        let (head, past, present_len) = (self.head, cache.past, cache.present_len);
        let (keys, values) = (cache.keys, cache.values);
        let shared = std::ptr::eq(keys, cache.past_keys) && std::ptr::eq(values, cache.past_values);
        let row_width = self.new_row_width();
        // SAFETY: `keys` and `values` hold kv_heads x present_len x head floats (their shape), the
        // past ones kv_heads x past_len x head; a separate past is only read, and every position
        // written is below total <= present_len.
        unsafe {
            for kv in 0..self.kv_heads {
                let at = kv * present_len * head;
                if !shared && past > 0 {
                    if cache.past_keys.is_null() {
                        return Err(fail(format!("no past for {past} positions")));
                    }
                    let from = kv * cache.past_len * head;
                    std::ptr::copy_nonoverlapping(cache.past_keys.add(from), keys.add(at), past * head);
                    std::ptr::copy_nonoverlapping(cache.past_values.add(from), values.add(at), past * head);
                }
                for r in 0..self.rows {
                    let source = r * row_width + kv * head;
                    let slot = at + (past + r) * head;
                    rotary.apply(&new_keys[source..source + head], std::slice::from_raw_parts_mut(keys.add(slot), head), past + r);
                    std::ptr::copy_nonoverlapping(new_values[source..].as_ptr(), values.add(slot), head);
                }
            }
        }
        Ok(())
    }

    /// Every query row of every head against the cache, into `out` (rows x heads x head).
    fn attend_every_head(&self, ctx: &ComputeContext, q: &[f32], rotary: &Rotary, cache: &Cache, out: *mut f32) -> ort::Result<()> {
        let (head, rows, past, total, present_len) = (self.head, self.rows, cache.past, cache.total, cache.present_len);
        let (heads, group, scale) = (self.heads, self.heads / self.kv_heads, self.scale);
        let (out, keys, values) = (TaskPointer(out), TaskPointer(cache.keys), TaskPointer(cache.values));
        let q_stride = if self.packed { self.width } else { self.heads * head };
        let wide = head % 16 == 0 && super::int4::supported();
        let run = |h: usize| {
            let (out, keys, values) = (out, keys, values);
            let at = (h / group) * present_len * head;
            // Per thread, so that a decode step allocates nothing here.
            thread_local! {
                static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            SCRATCH.with_borrow_mut(|scratch| {
                scratch.clear();
                scratch.resize(head + total, 0.0);
                let (query, scores) = scratch.split_at_mut(head);
                for r in 0..rows {
                    let length = past + r + 1;
                    rotary.apply(&q[r * q_stride + h * head..][..head], query, past + r);
                    // SAFETY: the cache holds `total` positions of this KV head, written above and
                    // only read from here on; each task writes its own head's columns of `out`.
                    unsafe {
                        let keys = std::slice::from_raw_parts(keys.0.add(at), length * head);
                        let values = std::slice::from_raw_parts(values.0.add(at), length * head);
                        let row = std::slice::from_raw_parts_mut(out.0.add((r * heads + h) * head), head);
                        let scores = &mut scores[..length];
                        if wide {
                            // SAFETY: `supported()` says AVX-512; the head is whole vectors.
                            avx512::attend(query, keys, values, scale, scores, row);
                        } else {
                            attend(query, keys, values, scale, scores, row);
                        }
                    }
                }
            });
        };
        // Waking the pool costs more than a small call's work: it runs on this thread below the
        // threshold.
        if rows * total * heads * head < 1 << 16 {
            (0..heads).for_each(run);
            Ok(())
        } else {
            ctx.par_for(heads, heads, run)
        }
    }
}

/// One query row against `keys` and `values` (its causal prefix, `scores.len()` positions):
/// scores, softmax, and their sum of values into `row`.
fn attend(query: &[f32], keys: &[f32], values: &[f32], scale: f32, scores: &mut [f32], row: &mut [f32]) {
    let head = query.len();
    for (score, key) in scores.iter_mut().zip(keys.chunks_exact(head)) {
        *score = scale * dot(query, key);
    }
    softmax(scores);
    row.fill(0.0);
    for (&p, value) in scores.iter().zip(values.chunks_exact(head)) {
        row.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `super::attend` in 512-bit vectors, for a head of whole vectors: the scalar loops are a
    /// visible part of a decode step's time. One fixed order of sums for every row.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend(query: &[f32], keys: &[f32], values: &[f32], scale: f32, scores: &mut [f32], row: &mut [f32]) {
        let head = query.len();
        let length = scores.len();
        // SAFETY (whole function): `keys` and `values` hold `length` rows of `head` floats,
        // `head` is a multiple of 16, the tails are masked.
        unsafe {
            let q = query.as_ptr();
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for t in 0..length {
                let k = keys.as_ptr().add(t * head);
                let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                let mut d = 0;
                while d + 32 <= head {
                    even = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(d)), _mm512_loadu_ps(k.add(d)), even);
                    odd = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(d + 16)), _mm512_loadu_ps(k.add(d + 16)), odd);
                    d += 32;
                }
                if d < head {
                    even = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(d)), _mm512_loadu_ps(k.add(d)), even);
                }
                let score = scale * _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
                scores[t] = score;
                max = _mm512_max_ps(max, _mm512_set1_ps(score));
            }
            // Softmax: exponentials of the differences to the maximum, their sum, its reciprocal.
            let max = _mm512_reduce_max_ps(max);
            let mut sum = _mm512_setzero_ps();
            let p = scores.as_mut_ptr();
            let mut t = 0;
            while t < length {
                let mask: __mmask16 = if length - t >= 16 { 0xffff } else { (1u16 << (length - t)) - 1 };
                let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p.add(t)), _mm512_set1_ps(max));
                let e = _mm512_maskz_mov_ps(mask, exp(x));
                _mm512_mask_storeu_ps(p.add(t), mask, e);
                sum = _mm512_add_ps(sum, e);
                t += 16;
            }
            let inverse = 1.0 / _mm512_reduce_add_ps(sum);
            // The probabilities' sum of value rows, 16 dimensions at a time.
            let mut d = 0;
            while d < head {
                let mut acc = _mm512_setzero_ps();
                for t in 0..length {
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[t] * inverse), _mm512_loadu_ps(values.as_ptr().add(t * head + d)), acc);
                }
                _mm512_storeu_ps(row.as_mut_ptr().add(d), acc);
                d += 16;
            }
        }
    }

    /// e^x for x <= 0 (a softmax's differences): 2^n e^r with |r| <= ln 2 / 2 and e^r by its
    /// Taylor series to r^6 (relative error ~1e-7).
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) unsafe fn attend(query: &[f32], keys: &[f32], values: &[f32], scale: f32, scores: &mut [f32], row: &mut [f32]) {
        super::attend(query, keys, values, scale, scores, row)
    }
}

struct Rotary<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    half: usize,
    interleaved: bool,
}

impl Rotary<'_> {
    /// `x` rotated to `position` into `out` (ONNX Runtime's: `x[i] cos - x[j] sin` for the first
    /// of a pair, `+` for the second; dimensions past the rotary ones are copied).
    fn apply(&self, x: &[f32], out: &mut [f32], position: usize) {
        let (cos, sin) = (&self.cos[position * self.half..][..self.half], &self.sin[position * self.half..][..self.half]);
        let dim = 2 * self.half;
        for i in 0..dim {
            let (c, j, sign) = if self.interleaved {
                (i / 2, i ^ 1, if i % 2 == 0 { -1.0 } else { 1.0 })
            } else {
                (i % self.half, (i + self.half) % dim, if i < self.half { -1.0 } else { 1.0 })
            };
            out[i] = x[i] * cos[c] + sign * x[j] * sin[c];
        }
        out[dim..].copy_from_slice(&x[dim..]);
    }
}

/// A dot product in 16 fixed lanes, so that it vectorizes and sums in one order everywhere.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let (a_rest, b_rest) = (a16.remainder(), b16.remainder());
    for (x, y) in a16.zip(b16) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in a_rest.iter().zip(b_rest).enumerate() {
        lanes[i] += x * y;
    }
    lanes.iter().sum()
}

/// In place, as MLAS: the maximum, the sum of exponentials, then times its reciprocal.
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inverse = 1.0 / sum;
    scores.iter_mut().for_each(|s| *s *= inverse);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector path against the scalar one (f64 sums as the yardstick), on causal lengths
    /// across the 16-lane tails and scores wide enough to exercise the exponential.
    #[test]
    fn the_vector_attention_equals_the_definition() {
        if !crate::runtime::int4::supported() {
            return crate::skipped::report("runtime::attention::tests::the_vector_attention_equals_the_definition", "this CPU has no AVX-512");
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 20001) as f32 / 10000.0 - 1.0
        };
        for (head, length) in [(64usize, 1usize), (64, 15), (64, 17), (128, 40), (80, 33), (16, 200)] {
            let query: Vec<f32> = (0..head).map(|_| 3.0 * next()).collect();
            let keys: Vec<f32> = (0..head * length).map(|_| next()).collect();
            let values: Vec<f32> = (0..head * length).map(|_| next()).collect();
            let scale = 1.0 / (head as f32).sqrt();
            let logits: Vec<f64> =
                keys.chunks(head).map(|k| f64::from(scale) * k.iter().zip(&query).map(|(a, b)| f64::from(a * b)).sum::<f64>()).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            let want: Vec<f64> = (0..head)
                .map(|d| logits.iter().enumerate().map(|(t, l)| (l - max).exp() / total * f64::from(values[t * head + d])).sum())
                .collect();
            let (mut scores, mut row) = (vec![0f32; length], vec![f32::NAN; head]);
            // SAFETY: AVX-512 checked above; a whole number of vectors where `head % 16 == 0`.
            if head % 16 == 0 {
                unsafe { avx512::attend(&query, &keys, &values, scale, &mut scores, &mut row) };
            } else {
                attend(&query, &keys, &values, scale, &mut scores, &mut row);
            }
            for (d, (got, want)) in row.iter().zip(&want).enumerate() {
                assert!((f64::from(*got) - want).abs() < 2e-6, "head {head}, length {length}, dimension {d}: {got} against {want}");
            }
        }
    }
}
