//! What a model is doing, as `ListModels` and the state signals show it.

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
    /// What runs the model's int4 matrix products, while loaded (`runtime::Int4Kernel`).
    pub int4_kernel: Option<String>,
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
