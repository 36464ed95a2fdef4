//! Decoding, below the engine and the proposers that it builds: the ONNX execution layer that
//! runs every graph (`graph`), the decoder graph with its KV cache (`decoder`), one request's run and the types every part shares (`run`: options, cancel
//! token, finish reason, statistics), sampling (`sampler`), streamed text and stop strings
//! (`text`), KV kept between requests (`reuse`), the verifier (`verify`) and the one decode loop (`driver`) with the `Target` and
//! `Proposer` traits that the proposers (`crate::speculative`, `crate::multitoken`) implement.

pub(crate) mod constraint;
pub(crate) mod cost;
pub mod decoder;
pub(crate) mod driver;
pub mod graph;
pub mod reuse;
pub mod run;
pub mod sampler;
pub mod text;
pub(crate) mod verify;

pub use driver::PREFILL_CHUNK;
pub use verify::{TIE_MARGIN, TIE_SAMPLES};
