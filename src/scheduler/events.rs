//! What the scheduler tells its callers: model states, request events and results, and its
//! typed errors (the service maps them to D-Bus errors).

use crate::engine::{FinishReason, GenerationStats};
use crate::error::Error;

pub type ClientId = String;
pub type RequestId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Unloaded,
    Loading,
    Ready,
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub state: ModelState,
    pub provider: Option<String>,
    /// The execution provider the draft runs on (it may differ from the target's).
    pub draft_provider: Option<String>,
    pub draft: Option<String>,
    pub error: Option<String>,
    pub generated_tokens: u64,
    pub requests: u64,
    /// Running totals of speculative decoding.
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    /// When a loaded, idle model unloads (its `keep_alive_s`); `None` while it works or never.
    pub unloads_at: Option<std::time::Instant>,
    /// Resident memory its load added, while loaded.
    pub memory_mib: Option<u64>,
    /// Decode speed of its last request.
    pub tokens_per_s: Option<f64>,
}

/// Why admission or a model operation failed; the service maps these to D-Bus errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchedulerError {
    #[error("no model named `{0}` is configured (ListModels shows the names)")]
    ModelNotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("model `{model}` failed to load: {reason}")]
    LoadFailed { model: String, reason: String },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Request(#[from] Error),
}

/// What the caller receives for one request, in order: text pieces, then one `Finished`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Finished(Finished),
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    /// Set when the request failed (`reason` is then `Error`); typed, so that the D-Bus edge
    /// names it as it names the same error from a method call.
    pub error: Option<SchedulerError>,
    pub text: String,
    /// The generated ids, eos excluded (the caller may ask for them with `return_token_ids`).
    pub token_ids: Vec<u32>,
    pub stats: GenerationStats,
}
