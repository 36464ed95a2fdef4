//! Decoding, below the engine and the proposers that it builds:
//! - the ONNX execution layer that runs every graph (`graph`), the decoder graph with its KV
//!   cache (`decoder`);
//! - one request's run and the types every part shares (`run`: options, cancel token, finish
//!   reason, statistics), sampling (`sampler`), streamed text and stop strings (`text`), the
//!   output constraint (`constraint`), KV kept between requests (`reuse`);
//! - the decode roles, one file each: the target (`target`: the trait and the decoder graph's
//!   target), the proposer (`proposer`: the trait and plain decoding's), how long drafts are for
//!   every proposer (`draft_length`), the verifier with the near-tie re-forward (`verify`; the
//!   margin a target learns: `tie_margin`), and
//!   the one decode loop (`driver`). The other proposers: `crate::speculative` (a draft model,
//!   prompt lookup) and `crate::multitoken` (a micro decoder).

pub(crate) mod constraint;
pub mod decoder;
pub(crate) mod draft_length;
pub(crate) mod driver;
pub mod graph;
pub(crate) mod proposer;
pub mod reuse;
pub mod run;
pub mod sampler;
pub(crate) mod target;
pub mod text;
pub(crate) mod tie_margin;
pub(crate) mod verify;

pub use driver::PREFILL_CHUNK;
pub use tie_margin::{TIE_MARGIN, TIE_SAMPLES};
