//! edgellm's int4 kernel (`int4`) in ONNX Runtime's place for a model's `MatMulNBits` nodes, on
//! the CPU provider, where every such node is one the kernel computes exactly as ONNX Runtime
//! would (4 bits, blocks of 32, no zero points, float scales, int8 compute).
//!
//! ONNX Runtime takes a custom operator registered under a built-in operator's domain and name in
//! place of its own kernel. The whole session gets one or the other, so a model with any node the
//! kernel does not cover keeps ONNX Runtime's for all of them, and the report says why.

use std::collections::HashMap;
use std::ops::Range;

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::value::{TensorElementType, TensorValueType};

use super::attention;
use super::int4::{self, Activations, Int4Weights, PackedWeights, TaskPointer, BLOCK};
use super::onnx_proto::{graph_input_types, graph_nodes, initializers, Initializer, Node};

const DOMAIN: &str = "com.microsoft";
const OP: &str = "MatMulNBits";
/// Groups of 16 weight rows per task of ONNX Runtime's thread pool: each task reads its groups
/// as one sequential stream (`int4`).
const GROUPS_PER_TASK: usize = 16;
/// Multiply-adds below which a product runs on the calling thread alone.
const PARALLEL_MACS: usize = 1 << 20;

/// Which kernel runs a model's int4 matrix products.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Int4Kernel {
    /// edgellm's, for this many `MatMulNBits` nodes; with edgellm's `GroupQueryAttention`
    /// (`attention`) where it covers every such node.
    Edgellm { nodes: usize, attention: Attention },
    /// ONNX Runtime's own (MLAS on the CPU), and why.
    OnnxRuntime { reason: String },
}

/// Who runs the model's `GroupQueryAttention` nodes beside edgellm's int4 kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attention {
    /// edgellm's (`attention`), and whether every node of the graph then computes a position
    /// from that position alone, so that a forward's row does not depend on the rows beside it.
    Edgellm { rows_exact: bool },
    /// ONNX Runtime's, and why.
    OnnxRuntime { reason: String },
}

impl Int4Kernel {
    /// Whether a forward over several positions gives each the bits a forward over it alone
    /// gives: then a verify's greedy decisions are plain decoding's, ties included.
    pub fn rows_exact(&self) -> bool {
        matches!(self, Int4Kernel::Edgellm { attention: Attention::Edgellm { rows_exact: true }, .. })
    }
}

/// Operators whose output rows each depend on their own input row only (elementwise, per-row
/// normalisation, rotary embedding by position, an embedding lookup, moving data, shapes and
/// the attention mask's bookkeeping), besides the two kernels of edgellm. ONNX Runtime's matrix
/// products are not among them: their order of sums changes with the number of rows.
const ROW_EXACT_OPS: &[&str] = &[
    "MatMulNBits",
    "GroupQueryAttention",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding",
    "Sigmoid",
    "Mul",
    "Add",
    "Sub",
    "Cast",
    "Gather",
    "Split",
    "Concat",
    "Slice",
    "Pad",
    "Unsqueeze",
    "Squeeze",
    "Shape",
    "ReduceSum",
    "Constant",
];

impl std::fmt::Display for Int4Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Int4Kernel::Edgellm { nodes, attention: Attention::Edgellm { rows_exact } } => write!(
                f,
                "edgellm AVX-512 VNNI ({nodes} MatMulNBits nodes), edgellm's GroupQueryAttention{}",
                if *rows_exact { " (a verify's rows are plain decoding's exactly)" } else { "" }
            ),
            Int4Kernel::Edgellm { nodes, attention: Attention::OnnxRuntime { reason } } => {
                write!(f, "edgellm AVX-512 VNNI ({nodes} MatMulNBits nodes), ONNX Runtime's attention ({reason})")
            }
            Int4Kernel::OnnxRuntime { reason } => write!(f, "ONNX Runtime ({reason})"),
        }
    }
}


/// Whether edgellm's kernel can run every `MatMulNBits` node of the model `graph` (ModelProto
/// bytes), and if not, why. `auto` and `edgellm` plan alike: edgellm's wherever it covers the
/// model. Its rows are computed each on its own, so greedy output does not depend on how
/// positions were batched (a verify's draft lengths follow timings; ONNX Runtime's kernel sums a
/// row in another order inside a batch, which made greedy speculative output differ between
/// runs), and it is faster in and out of the caches.
pub(crate) fn plan(graph: &[u8]) -> Int4Kernel {
    let keep = |reason: String| Int4Kernel::OnnxRuntime { reason };
    if !int4::supported() {
        return keep("this CPU has no AVX-512 VNNI".into());
    }
    let Some(nodes) = graph_nodes(graph) else { return keep("the graph could not be read".into()) };
    if nodes.iter().any(|n| n.has_subgraph) {
        return keep("the graph has subgraphs".into());
    }
    let types = initializers(graph);
    let mut count = 0;
    for node in nodes.iter().filter(|n| n.op_type == OP && n.domain == DOMAIN) {
        if let Err(why) = covered(node, &types) {
            return keep(format!("node `{}`: {why}", node.name));
        }
        count += 1;
    }
    if count == 0 {
        return keep("the model has no MatMulNBits nodes".into());
    }
    let attention = attention_plan(&nodes, &types, &graph_input_types(graph));
    Int4Kernel::Edgellm { nodes: count, attention }
}

/// Whether edgellm's attention covers every `GroupQueryAttention` node, and if it does, whether
/// the graph's rows are then exact (`ROW_EXACT_OPS`).
fn attention_plan(nodes: &[Node], types: &HashMap<String, Initializer>, graph_inputs: &HashMap<String, i32>) -> Attention {
    let mut count = 0;
    for node in nodes.iter().filter(|n| n.op_type == attention::OP && n.domain == DOMAIN) {
        if let Err(why) = attention::covered(node, types, graph_inputs) {
            return Attention::OnnxRuntime { reason: format!("node `{}`: {why}", node.name) };
        }
        count += 1;
    }
    if count == 0 {
        return Attention::OnnxRuntime { reason: "the model has no GroupQueryAttention nodes".into() };
    }
    Attention::Edgellm { rows_exact: nodes.iter().all(|n| ROW_EXACT_OPS.contains(&n.op_type.as_str())) }
}

fn covered(node: &Node, initializers: &std::collections::HashMap<String, Initializer>) -> Result<(), String> {
    let attribute = |name: &str| node.ints.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
    if attribute("bits").unwrap_or(4) != 4 {
        return Err("not 4 bits".into());
    }
    if attribute("block_size") != Some(BLOCK as i64) {
        return Err(format!("block size is not {BLOCK}"));
    }
    // 4 is int8 compute, which the kernel does; below it ONNX Runtime computes in float.
    if attribute("accuracy_level").unwrap_or(0) != 4 {
        return Err("accuracy_level is not 4 (int8 compute)".into());
    }
    if attribute("K").is_none_or(|k| k <= 0) || attribute("N").is_none_or(|n| n <= 0) {
        return Err("no K or N".into());
    }
    let inputs: Vec<&str> = node.inputs.iter().map(String::as_str).filter(|i| !i.is_empty()).collect();
    if inputs.len() != 3 || node.inputs.len() > 3 {
        return Err("zero points, g_idx or bias".into());
    }
    match (initializers.get(inputs[1]), initializers.get(inputs[2])) {
        (Some(b), Some(s)) if b.data_type == 2 && s.data_type == 1 => Ok(()),
        (Some(_), Some(_)) => Err("weights are not uint8 or scales not float32".into()),
        _ => Err("weights or scales are not initializers".into()),
    }
}

/// The operator domain that puts edgellm's kernels in ONNX Runtime's place, as `plan` chose.
pub(crate) fn domain(kernel: &Int4Kernel) -> ort::Result<OperatorDomain> {
    let domain = OperatorDomain::new(DOMAIN)?.add(MatMulNBits)?;
    match kernel {
        Int4Kernel::Edgellm { attention: Attention::Edgellm { .. }, .. } => domain.add(attention::GroupQueryAttention),
        _ => Ok(domain),
    }
}

struct MatMulNBits;

impl Operator for MatMulNBits {
    type Kernel<'attr> = Product;

    fn name(&self) -> &str {
        OP
    }

    /// ONNX Runtime's inputs: A, B, scales, zero_points, g_idx, bias. The optional ones must be
    /// declared: its graph optimizer fuses a following Add into `bias` and expects six. `plan`
    /// admits no node with zero points or g_idx, so only a bias may come.
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Uint8),
            OperatorInput::optional(TensorElementType::Int32),
            OperatorInput::optional(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    /// Packs the node's weights (`int4`), which `plan` admitted only as initializers. This runs
    /// while the session is built, where `MappedWeights` drops the map's pages it read.
    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Product> {
        let size = |name: &str| -> ort::Result<usize> {
            let value: i64 = kctx.get(name).ok_or_else(|| ort::Error::new(format!("MatMulNBits without the attribute {name}")))?;
            usize::try_from(value).map_err(|_| ort::Error::new(format!("MatMulNBits with {name} = {value}")))
        };
        let (n, k) = (size("N")?, size("K")?);
        let node = kctx.node_name().unwrap_or_default();
        let constant =
            |what: &str| ort::Error::new(format!("MatMulNBits `{node}`: its {what} are not an initializer ONNX Runtime gives the kernel"));
        let blocks = kctx.constant_input::<TensorValueType<u8>>(1).map_err(|_| constant("weights"))?;
        let scales = kctx.constant_input::<TensorValueType<f32>>(2).map_err(|_| constant("scales"))?;
        let (_, blocks) = blocks.try_extract_tensor::<u8>()?;
        let (_, scales) = scales.try_extract_tensor::<f32>()?;
        let weights = Int4Weights { n, k, blocks, scales };
        if !weights.consistent() {
            return Err(ort::Error::new(format!("MatMulNBits `{node}`: weights and scales do not match K = {k} and N = {n}")));
        }
        Ok(Product { weights: PackedWeights::pack(&weights) })
    }
}

struct Product {
    weights: PackedWeights,
}

impl Kernel for Product {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let missing = |what: &str| ort::Error::new(format!("MatMulNBits without {what}"));
        let a = ctx.input(0)?.ok_or_else(|| missing("A"))?;
        if ctx.input(3)?.is_some() || ctx.input(4)?.is_some() {
            return Err(ort::Error::new("MatMulNBits: zero points and g_idx are ONNX Runtime's kernel's to run"));
        }
        let (n, k) = (self.weights.n(), self.weights.k());
        let bias = ctx.input(5)?;
        let bias = match &bias {
            Some(b) => Some(b.try_extract_tensor::<f32>()?.1),
            None => None,
        };
        if bias.is_some_and(|b| b.len() != n) {
            return Err(ort::Error::new(format!("MatMulNBits: a bias of other than N = {n} values")));
        }
        let (shape, x) = a.try_extract_tensor::<f32>()?;
        if shape.last().copied() != Some(k as i64) {
            return Err(ort::Error::new(format!("MatMulNBits: A's last dimension is not K = {k}")));
        }
        let rows = x.len() / k;
        let mut out_shape = shape.to_vec();
        *out_shape.last_mut().expect("A has a last dimension") = n as i64;
        let mut y = ctx.output(0, out_shape)?.ok_or_else(|| missing("an output"))?;
        let (_, out) = y.try_extract_tensor_mut::<f32>()?;
        if rows == 0 {
            return Ok(());
        }
        thread_local! {
            static ACTIVATIONS: std::cell::RefCell<Activations> = std::cell::RefCell::default();
        }
        ACTIVATIONS.with_borrow_mut(|activations| {
            activations.quantize_into(x, rows, k);
            self.multiply(ctx, activations, out)
        })?;
        if let Some(bias) = bias {
            for row in out.chunks_mut(n) {
                row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
            }
        }
        Ok(())
    }
}

impl Product {
    fn multiply(&self, ctx: &ComputeContext, activations: &Activations, out: &mut [f32]) -> ort::Result<()> {
        let weights = &self.weights;
        // The pool's tasks write disjoint columns.
        let output = TaskPointer(out.as_mut_ptr());
        let groups = weights.groups();
        // A product this small takes microseconds, about what waking the pool for it costs.
        let tasks = if activations.rows() * weights.n() * weights.k() < PARALLEL_MACS { 1 } else { groups.div_ceil(GROUPS_PER_TASK) };
        let per_task = if tasks == 1 { groups } else { GROUPS_PER_TASK };
        let task_groups = |t: usize| -> Range<usize> { t * per_task..((t + 1) * per_task).min(groups) };
        let run = |t: usize| {
            let output = output;
            // SAFETY: `plan` registered this kernel only where `int4::supported()`; the
            // activations have K columns (checked by `compute`), and each task writes its own
            // columns of `out`, which outlives the tasks.
            unsafe { int4::matmul_groups(weights, activations, task_groups(t), output.0) }
        };
        if tasks == 1 {
            run(0);
            Ok(())
        } else {
            ctx.par_for(tasks, tasks, run)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::onnx_proto::wire_writer::{bytes, int};
    use super::*;

    /// A ModelProto with one MatMulNBits node (K = 64, N = 8) on initializers of `n_rows` rows,
    /// plus `extra_inputs` after A, B and the scales.
    fn model(accuracy_level: u64, extra_inputs: &[&str], n_rows: u64) -> Vec<u8> {
        let mut node = Vec::new();
        for input in ["a", "b", "s"].iter().chain(extra_inputs) {
            bytes(1, input.as_bytes(), &mut node);
        }
        bytes(2, b"y", &mut node);
        bytes(3, b"proj", &mut node);
        bytes(4, b"MatMulNBits", &mut node);
        bytes(7, b"com.microsoft", &mut node);
        for (name, value) in [("K", 64), ("N", n_rows), ("bits", 4), ("block_size", 32), ("accuracy_level", accuracy_level)] {
            let mut attribute = Vec::new();
            bytes(1, name.as_bytes(), &mut attribute);
            int(3, value, &mut attribute);
            bytes(5, &attribute, &mut node);
        }
        let tensor = |name: &str, data_type: u64, dims: &[u64]| {
            let mut t = Vec::new();
            for &d in dims {
                int(1, d, &mut t);
            }
            int(2, data_type, &mut t);
            bytes(8, name.as_bytes(), &mut t);
            t
        };
        let mut graph = Vec::new();
        bytes(1, &node, &mut graph);
        bytes(5, &tensor("b", 2, &[n_rows, 2, 16]), &mut graph);
        bytes(5, &tensor("s", 1, &[n_rows, 2]), &mut graph);
        let mut model = Vec::new();
        bytes(7, &graph, &mut model);
        model
    }

    /// Which kernel a model gets, and the reason named when it is ONNX Runtime's.
    #[test]
    fn the_plan_names_the_node_and_what_the_kernel_does_not_cover() {
        if !int4::supported() {
            assert_eq!(plan(&model(4, &[], 8)), Int4Kernel::OnnxRuntime { reason: "this CPU has no AVX-512 VNNI".into() });
            return;
        }
        assert_eq!(
            plan(&model(4, &[], 8)),
            Int4Kernel::Edgellm {
                nodes: 1,
                attention: Attention::OnnxRuntime { reason: "the model has no GroupQueryAttention nodes".into() }
            }
        );
        let reason = |kernel: Int4Kernel| match kernel {
            Int4Kernel::OnnxRuntime { reason } => reason,
            other => panic!("expected ONNX Runtime's kernel, got {other}"),
        };
        let zero_points = reason(plan(&model(4, &["zp"], 8)));
        assert!(zero_points.starts_with("node `proj`: zero points"), "{zero_points}");
        assert!(reason(plan(&model(1, &[], 8))).contains("accuracy_level is not 4"));
    }
}
