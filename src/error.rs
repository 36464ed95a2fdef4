//! Typed errors of the core. The D-Bus edge (`service`) maps each to an `org.edgellm.Error.*`
//! name; nothing here knows about D-Bus.

use std::path::PathBuf;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// libonnxruntime.so could not be found or loaded.
    #[error("ONNX Runtime library {path}: {reason}. Install it with `scripts/setup-runtime.sh` or point `[runtime] library` (or ORT_DYLIB_PATH) at libonnxruntime.so.1.31.x from the `onnxruntime` PyPI wheel")]
    RuntimeLibrary { path: PathBuf, reason: String },

    /// A file of a model folder is missing or unreadable.
    #[error("{path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },

    /// A field of genai_config.json (or another model file) is missing or has the wrong type.
    #[error("{path}: field `{field}`: {reason}")]
    ModelConfig { path: PathBuf, field: String, reason: String },

    /// An execution provider could not be used (with `strict = true`, or none of the list worked).
    #[error("execution provider `{provider}` is not available: {reason}")]
    ProviderUnavailable { provider: String, reason: String },

    /// A request argument is out of range or of the wrong kind; `argument` names it.
    #[error("invalid argument `{argument}`: {reason}")]
    InvalidArgument { argument: String, reason: String },

    #[error("the prompt has {tokens} tokens, more than the model's context of {context} (keep it under {context} tokens including max_new_tokens)")]
    PromptTooLong { tokens: usize, context: usize },

    #[error("model `{0}` has no chat template (neither tokenizer_config.json `chat_template` nor chat_template.jinja)")]
    NoChatTemplate(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("the request was cancelled")]
    Cancelled,

    /// ONNX Runtime failed while running a model.
    #[error("inference failed: {0}")]
    Inference(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Inference(e.to_string())
    }
}
