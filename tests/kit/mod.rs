//! The test kit, shared by the integration tests (`tests/it`) and the benchmark (`benches/`):
//! - `fixtures`: the committed models and their reference outputs, the ONNX Runtime of the
//!   process, the reference programs (onnxruntime-genai, Python), the emulator for OpenVINO;
//! - `bus`: a private dbus-daemon and an edgellmd on it.
//!
//! Each user includes it with `#[path]`, and each uses part of it.
#![allow(dead_code)]

pub mod bus;
pub mod fixtures;
