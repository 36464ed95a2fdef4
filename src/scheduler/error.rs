//! The scheduler's typed errors (the service maps them to D-Bus errors).

use crate::error::Error;

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
