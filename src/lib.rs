//! edgellm: run int4 ONNX language models on the user's machine and serve them over D-Bus.
//!
//! Data flows one way: D-Bus call (`service`) -> validation -> queue (`scheduler`) -> engine thread
//! (`engine`) -> token events -> the caller. Only `service` and the binaries know zbus; only
//! `runtime`, `model` and `engine` know ONNX Runtime.

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
