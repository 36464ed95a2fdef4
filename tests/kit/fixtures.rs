//! Shared fixtures: paths of the committed models, their reference outputs, the runtime.

use std::path::{Path, PathBuf};
use std::process::Command;
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

/// A committed prompt and onnxruntime-genai's greedy answer to it. The answer (`output_ids`,
/// `text`) was made on the machine that built the models: the tests take the prompt from here and
/// compare with `genai_greedy`, onnxruntime-genai run on this machine.
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

/// Set in the environment of a test that re-runs itself under `EMULATE_INTEL`.
const EMULATOR_ENV: &str = "EDGELLM_TEST_EMULATOR";

/// qemu-x86_64 (Debian's qemu-user) running an x86-64 program under a Haswell model, whose CPUID
/// says GenuineIntel; the features TCG cannot give are turned off so that it does not warn.
const EMULATE_INTEL: [&str; 3] = ["qemu-x86_64", "-cpu", "Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid"];

/// Whether this test process runs under `EMULATE_INTEL`.
pub fn emulated() -> bool {
    std::env::var_os(EMULATOR_ENV).is_some()
}

/// A command for `program`, under the emulator when this process runs under it: qemu-user does
/// not follow exec, so a child would otherwise run natively and see the real CPU.
pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if emulated() {
        let mut cmd = Command::new(EMULATE_INTEL[0]);
        cmd.args(&EMULATE_INTEL[1..]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Whether an OpenVINO test should run its body in this process. The onnxruntime-ep-openvino
/// plugin offers devices only where ONNX Runtime reads an Intel vendor id from CPUID (none on an
/// AMD CPU). There the test re-runs itself, with its children, under `EMULATE_INTEL`, checks that
/// run and returns false; it skips (saying so) only when qemu-x86_64 is not installed
/// (scripts/ensure-system-packages.sh installs it). `test` is the test's path, as
/// `cargo test -- --exact` takes it. A missing plugin file is a failure, not a skip.
pub fn openvino_cpu_here(test: &str) -> bool {
    let runtime = runtime();
    let plugin = root().join(".edgellm/runtime/libonnxruntime_providers_openvino_plugin.so");
    assert!(plugin.exists(), "{} is missing: run scripts/setup-runtime.sh", plugin.display());
    if runtime.openvino_device_types().iter().any(|t| t == "CPU") {
        return true;
    }
    assert!(!emulated(), "under {}, the OpenVINO plugin still offers no CPU device", EMULATE_INTEL.join(" "));
    let vendor = runtime.cpu_vendor();
    if Command::new(EMULATE_INTEL[0]).arg("--version").output().is_err() {
        edgellm::skipped::report(test, &format!("the OpenVINO plugin offers no CPU device on this CPU (vendor {vendor:?}) and qemu-x86_64 (Debian's qemu-user), which would report an Intel CPU, is not installed"));
        return false;
    }
    eprintln!(
        "{test}: the OpenVINO plugin offers no CPU device on this CPU (vendor {vendor:?}); running it under `{}` (an Intel CPU to CPUID; minutes, and timings mean nothing)",
        EMULATE_INTEL.join(" ")
    );
    let started = std::time::Instant::now();
    let out = Command::new(EMULATE_INTEL[0])
        .args(&EMULATE_INTEL[1..])
        .arg(std::env::current_exe().expect("the test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(EMULATOR_ENV, "1")
        .output()
        .expect("qemu-x86_64");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "--- {test} under the emulator ({:.0} s):\n{stdout}{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{test} failed under the emulator");
    assert!(stdout.contains("1 passed"), "the emulated run did not run {test}");
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
/// way; OpenVINO's kernels may too. `what` names the decoding or provider under test in the
/// messages.
pub fn same_or_near_tie(
    engine: &mut edgellm::engine::Engine,
    label: &str,
    prompt: &[u32],
    ours: &[u32],
    reference: &[u32],
    what: &str,
) -> bool {
    if ours == reference {
        return true;
    }
    let (at, gap) = first_difference_gap(engine, prompt, ours, reference);
    eprintln!("{label:?}: first difference at token {at}, logit gap of the model alone {gap:.4}");
    assert!(gap < 0.25, "{what} differs from the model alone at token {at} of {label:?}, not at a near tie (gap {gap})");
    false
}

/// Runs `tests/py/<script>` in the test venv (scripts/setup-runtime.sh makes it) with `input` as
/// JSON on stdin, and returns the JSON it prints: the reference programs nobody here wrote
/// (Hugging Face tokenizers, jinja2 as transformers sets it up) are driven this way.
pub fn python_reference(script: &str, input: &serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    let mut child = Command::new(root().join(".edgellm/venv/bin/python"))
        .arg(root().join("tests/py").join(script))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the test venv's python (run scripts/setup-runtime.sh)");
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "tests/py/{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("tests/py/{script} printed no JSON ({e})"))
}

/// Real files made elsewhere (`../shared/reference/`, its README says where each comes from).
pub fn shared_reference(path: &str) -> PathBuf {
    let dir = root().join("../shared/reference").join(path);
    assert!(dir.exists(), "{} is missing: the tests need shared/reference beside the checkout", dir.display());
    dir
}

/// onnxruntime-genai's greedy ids (its eos included) on `provider` ("cpu" or "openvino"), from
/// its Python API (benches/genai_bench.py).
pub fn genai_outputs(model: &std::path::Path, provider: &str, prompts: &[Vec<u32>], new_tokens: usize) -> Vec<Vec<u32>> {
    let root = root();
    let prompts_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(prompts_file.path(), serde_json::to_string(prompts).unwrap()).unwrap();
    let out = command(root.join(".edgellm/venv/bin/python"))
        .arg(root.join("benches/genai_bench.py"))
        .arg("--model")
        .arg(model)
        .args(["--provider", provider, "--new-tokens", &new_tokens.to_string(), "--plugin"])
        .arg(root.join(".edgellm/runtime/libonnxruntime_providers_openvino_plugin.so"))
        .arg("--prompts")
        .arg(prompts_file.path())
        .output()
        .expect("onnxruntime-genai (scripts/setup-runtime.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap()).unwrap();
    serde_json::from_value(report["outputs"].clone()).unwrap()
}

/// onnxruntime-genai's greedy ids (its eos included) on `provider` for the committed prompts of
/// `cases`, run now: the committed `output_ids` were made on another CPU, whose kernels resolve
/// the random-weight models' near ties otherwise, so they give the prompts, not the answers.
pub fn genai_greedy(model: &str, provider: &str, cases: &[ReferenceCase], new_tokens: usize) -> Vec<Vec<u32>> {
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
    genai_outputs(&model_dir(model), provider, &prompts, new_tokens)
}

/// onnxruntime-genai's greedy text on the CPU for the committed prompts of `cases`: its ids, run
/// now (`genai_greedy`), decoded by the model's tokenizer, as models/build.py made the committed
/// `text`.
pub fn genai_greedy_texts(model: &str, cases: &[ReferenceCase], new_tokens: usize) -> Vec<String> {
    let tokenizer = edgellm::model::ModelFolder::open(&model_dir(model)).expect("model folder").tokenizer;
    genai_greedy(model, "cpu", cases, new_tokens).iter().map(|ids| tokenizer.decode(ids).expect("decode")).collect()
}

/// Whether this CPU runs edgellm's own kernels (AVX-512 VNNI); if not, says the test is skipped.
pub fn edgellm_kernels_run(test: &str) -> bool {
    let supported = edgellm::runtime::int4_supported();
    if !supported {
        edgellm::skipped::report(test, "this CPU has no AVX-512 VNNI for edgellm's kernels");
    }
    supported
}

/// A field of a process's /proc status in KiB (`VmRSS`, `RssAnon`, `RssFile`), if the process
/// and the field are there.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

/// A process's resident set, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS").unwrap_or_else(|| panic!("no VmRSS for process {pid}"))
}
