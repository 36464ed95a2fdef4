//! Shared fixtures: paths of the committed models, their reference outputs, the runtime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use edgellm::runtime::Runtime;
use serde::Deserialize;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir(name: &str) -> PathBuf {
    root().join("models").join(name)
}

/// The one ONNX Runtime of the test process (ort loads the library once per process).
pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::load(None).expect("ONNX Runtime: run scripts/setup-runtime.sh first")).clone()
}

#[derive(Debug, Deserialize)]
pub struct ReferenceCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatReference {
    pub messages: Vec<(String, String)>,
    pub rendered: String,
}

#[derive(Debug, Deserialize)]
pub struct References {
    pub new_tokens: usize,
    pub models: std::collections::BTreeMap<String, Vec<ReferenceCase>>,
    pub chat: Vec<ChatReference>,
}

/// Greedy outputs of onnxruntime-genai for the committed models (written by models/build.py).
pub fn references() -> &'static References {
    static REFS: OnceLock<References> = OnceLock::new();
    REFS.get_or_init(|| {
        let path = root().join("tests/reference_outputs.json");
        serde_json::from_str(&std::fs::read_to_string(&path).expect("tests/reference_outputs.json")).expect("reference json")
    })
}

/// A copy of a model folder in a temporary directory, to break on purpose.
pub fn copy_model(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(model_dir(name)).expect("model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).expect("copy");
    }
    tmp
}

/// Whether the OpenVINO plugin offers a CPU device here. Where it does not (the plugin offers
/// devices only on Intel hardware: none on an AMD CPU), the OpenVINO tests say so and skip; the
/// fallback from OpenVINO to CPU is still tested. A missing plugin file is a failure, not a skip.
pub fn openvino_cpu_or_skip(test: &str) -> bool {
    let runtime = runtime();
    let plugin = root().join(".edgellm/runtime/libonnxruntime_providers_openvino_plugin.so");
    assert!(plugin.exists(), "{} is missing: run scripts/setup-runtime.sh", plugin.display());
    if runtime.openvino_device_types().iter().any(|t| t == "CPU") {
        return true;
    }
    eprintln!(
        "SKIPPED {test}: the OpenVINO plugin offers no CPU device on this machine (CPU vendor {:?}); it does on Intel CPUs",
        runtime.cpu_vendor()
    );
    false
}

/// Where `ours` first departs from `reference` (both continuing `prompt`), and the gap there
/// between the two tokens' logits under `engine`, computed from the reference's prefix: a
/// difference is acceptable only at a near tie (ONNX Runtime's CPU kernels are not
/// batch-invariant: a forward over several positions differs slightly from one-token forwards).
fn first_difference_gap(engine: &mut edgellm::engine::Engine, prompt: &[u32], ours: &[u32], reference: &[u32]) -> (usize, f32) {
    let at = ours.iter().zip(reference).position(|(a, b)| a != b).unwrap_or(ours.len().min(reference.len()));
    let mut prefix = prompt.to_vec();
    prefix.extend_from_slice(&reference[..at]);
    let logits = engine.next_logits(&prefix).unwrap();
    (at, (logits[ours[at] as usize] - logits[reference[at] as usize]).abs())
}

/// Whether `ours` equals `reference` (true), or differs first after a near tie of the model
/// alone (false); any other difference fails the test. A forward over several positions gives
/// ONNX Runtime's CPU kernels slightly different numbers than one-token forwards (up to ~0.1 in a
/// logit, measured), so speculative and multi-token verification may resolve a near tie the other
/// way. `what` names the decoding under test in the messages.
pub fn same_or_near_tie(engine: &mut edgellm::engine::Engine, label: &str, prompt: &[u32], ours: &[u32], reference: &[u32], what: &str) -> bool {
    if ours == reference {
        return true;
    }
    let (at, gap) = first_difference_gap(engine, prompt, ours, reference);
    eprintln!("{label:?}: first difference at token {at}, logit gap of the model alone {gap:.4}");
    assert!(gap < 0.25, "{what} differs from the model alone at token {at} of {label:?}, not at a near tie (gap {gap})");
    false
}
