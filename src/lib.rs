//! edgellm: run int4 ONNX language models on the user's machine and serve them over D-Bus.
//!
//! Data flows one way: D-Bus call (`service`) -> validation -> queue (`scheduler`) -> engine thread
//! (`engine`) -> token events -> the caller. Only `service`, `openai` (the HTTP edge, a D-Bus client of the daemon) and the binaries know
//! zbus. ONNX
//! Runtime is known to `runtime` (the library and its sessions), `decode::graph` (the one
//! execution layer: every graph's runs, names, float32/float16 data), `decode::decoder` (a
//! decoder's inputs and KV tensors), `multitoken` (its graphs' tensors) and `error` (its error
//! type); the decode loop and the proposers see tensors only through those.
//!
//! Decoding, from the bottom up: `decode::graph` runs any graph; `decode::decoder` runs a
//! decoder graph with its states; `decode::run` holds one request's run and the types every part
//! shares (options, cancel token, finish reason, stats). The decode roles, a file each:
//! - `decode::target`: the `Target` trait (what runs the forwards) and the decoder graph's target;
//! - `decode::proposer`: the `Proposer` trait and plain decoding's proposer (none);
//! - `decode::draft_length`: how long drafts are, for every proposer (by cost, by acceptance,
//!   prompt lookup's back-off);
//! - `decode::verify`: the verifier, with the near-tie re-forward;
//! - `decode::driver`: the one decode loop over a target and a proposer.
//!
//! The other proposers sit above it: `speculative` (a draft model, `speculative::lookup`) and
//! `multitoken` (the micro decoder, whose base is a target too). `engine` loads a model and picks
//! each request's target and proposer once (`engine::roles`), then calls the driver once. No
//! module imports one above it.

pub mod config;
pub mod decode;
pub mod engine;
pub mod error;
pub mod model;
pub mod multitoken;
pub mod openai;
pub mod runtime;
pub mod scheduler;
pub mod service;
pub mod skipped;
pub mod speculative;

pub use error::{Error, Result};
