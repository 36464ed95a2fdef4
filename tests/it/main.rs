//! One integration-test binary: shared fixtures, the committed models, a private dbus-daemon.
//! Needs the ONNX Runtime library (`scripts/setup-runtime.sh`, which `scripts/test.sh` runs).

#[path = "../kit/mod.rs"]
mod kit;

mod daemon;
mod engine;
mod fuzz;
mod jinja_parity;
mod layouts;
mod load;
mod multitoken;
mod openai;
mod real_models;
mod reuse;
mod robustness;
mod scheduler;
mod shape;
mod speculative;
mod structured;
mod system_bus;
mod token_api;
