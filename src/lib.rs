//! edgellm: run int4 ONNX language models on the user's machine and serve them over D-Bus.
//!
//! Data flows one way: D-Bus call (`service`) -> validation -> queue (`scheduler`) -> engine thread
//! (`engine`) -> token events -> the caller. Only `service` and the binaries know zbus. ONNX
//! Runtime is known to `runtime` (the library and its sessions), `engine::decoder` (decoder
//! graphs), `multitoken` (its three graphs) and `error` (its error type); the decoding loops
//! above them see tensors only through those.
//!
//! Inside the engine, from the bottom up: `engine::decoder` runs a graph with its states;
//! `engine::run` holds one request's run and the types every loop shares (options, cancel
//! token, finish reason, stats); `speculative` is the verifying driver with its proposers (a
//! draft model, `speculative::lookup`); `multitoken` the multi-token loop; `engine` loads a
//! model and dispatches each request to plain decoding or one of those. No module imports one
//! above it.

pub mod config;
pub mod engine;
pub mod error;
pub mod model;
pub mod multitoken;
pub mod runtime;
pub mod scheduler;
pub mod service;
pub mod speculative;

pub use error::{Error, Result};
