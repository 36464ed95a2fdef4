//! The test kit, shared by the integration tests (`tests/it`) and the benchmark (`benches/`):
//! - `fixtures`: the committed models and their reference outputs, the ONNX Runtime of the
//!   process, the reference programs (onnxruntime-genai, Python), the emulator for OpenVINO;
//! - `generate`: the engine's request options most tests use, and its ids as onnxruntime-genai
//!   reports them;
//! - `bus`: a private dbus-daemon and an edgellmd on it, and its requests.
//!
//! Each user includes it with `#[path]`, and each uses part of it.
#![allow(dead_code)]

pub mod bus;
pub mod fixtures;
pub mod generate;
