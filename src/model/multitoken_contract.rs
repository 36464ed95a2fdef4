//! The multi-token contract (`multitoken_config.json`) and the settings of multi-token decoding
//! (mode, threshold, step length): what the model folder, the request options and the config
//! read, without the graphs that run it (`crate::multitoken`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub const CONTRACT_FILE: &str = "multitoken_config.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Trust,
    Verify,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "trust" => Some(Mode::Trust),
            "verify" => Some(Mode::Verify),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Trust => "trust",
            Mode::Verify => "verify",
        }
    }
}

/// How a request steps: the model's `[[model]]` settings, overridden per request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    /// A step goes on while the stop head's "continue" probability is at least this;
    /// 1 stops every step after its first token.
    pub threshold: f32,
    /// Tokens per step at most (1..=the contract's maximum).
    pub max_tokens: usize,
    /// Greedy verify mode: a step's micro tokens are sent for as long as they are worth their
    /// verify cost (`decode::draft_length`, measured as the model decodes), not by the stop head; off
    /// where a threshold was asked for. Trust mode and sampled requests follow the stop head.
    pub verify_by_cost: bool,
}

/// `multitoken_config.json`: which graphs, which names, the step maximum and the default threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Contract {
    pub path: PathBuf,
    pub embedder_file: String,
    pub base_file: String,
    pub micro_file: String,
    pub micro_layers: usize,
    pub micro_kv_heads: usize,
    pub micro_head_size: usize,
    pub features: usize,
    pub max_tokens_per_step: usize,
    pub threshold: f32,
    /// The graphs' tensor names, as the contract names them (models/README.md gives the
    /// defaults; the base's others come from genai_config).
    pub names: ContractNames,
}

/// The names the contract gives the graphs' inputs and outputs; `%d` is a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct ContractNames {
    pub step_ids: String,
    pub step_lengths: String,
    pub inputs_embeds: String,
    pub hidden_states: String,
    pub stop_logits: String,
    pub micro_features: String,
    pub micro_input_ids: String,
    pub micro_past_key: String,
    pub micro_past_value: String,
    pub micro_logits: String,
    pub micro_stop_logits: String,
    pub micro_present_key: String,
    pub micro_present_value: String,
}

impl Contract {
    /// `None` when the folder has no contract file (an ordinary model).
    pub fn find(dir: &Path) -> Result<Option<Contract>> {
        let path = dir.join(CONTRACT_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::ModelFile { path: path.clone(), reason: format!("cannot read: {e}") })?;
        let contract = Self::parse(&path, &text)?;
        for file in [&contract.embedder_file, &contract.base_file, &contract.micro_file] {
            crate::model::files::require_model_file(&dir.join(file))?;
        }
        Ok(Some(contract))
    }

    pub fn parse(path: &Path, text: &str) -> Result<Contract> {
        let err = |field: &str, reason: String| Error::ModelConfig { path: path.to_path_buf(), field: field.into(), reason };
        let root: Value = serde_json::from_str(text).map_err(|e| err(&format!("line {}", e.line()), format!("not valid JSON: {e}")))?;
        let get = |field: &str| field.split('.').try_fold(&root, |v, key| v.get(key));
        let string = |field: &str| -> Result<String> {
            get(field).and_then(Value::as_str).map(str::to_string).ok_or_else(|| err(field, "missing or not a string".into()))
        };
        // A name the contract may give, or its documented default.
        let name = |field: &str, default: &str| -> Result<String> {
            match get(field) {
                None => Ok(default.to_string()),
                Some(v) => v.as_str().map(str::to_string).ok_or_else(|| err(field, "not a string".into())),
            }
        };
        let count = |field: &str| -> Result<usize> {
            get(field).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| err(field, "missing or not a non-negative integer".into()))
        };
        match get("type").and_then(Value::as_str) {
            Some("hamburger") => {}
            other => return Err(err("type", format!("{other:?}: only \"hamburger\" is known"))),
        }
        let threshold = get("threshold").and_then(Value::as_f64).ok_or_else(|| err("threshold", "missing or not a number".into()))?;
        if !(0.0..=1.0).contains(&threshold) {
            return Err(err("threshold", format!("{threshold} is outside 0..1")));
        }
        let contract = Contract {
            path: path.to_path_buf(),
            embedder_file: string("embedder.filename")?,
            base_file: string("base.filename")?,
            micro_file: string("micro.filename")?,
            micro_layers: count("micro.num_hidden_layers")?,
            micro_kv_heads: count("micro.num_key_value_heads")?,
            micro_head_size: count("micro.head_size")?,
            features: count("features")?,
            max_tokens_per_step: count("max_tokens_per_step")?,
            threshold: threshold as f32,
            names: ContractNames {
                step_ids: name("embedder.inputs.step_ids", "step_ids")?,
                step_lengths: name("embedder.inputs.step_lengths", "step_lengths")?,
                inputs_embeds: name("embedder.outputs.inputs_embeds", "inputs_embeds")?,
                hidden_states: name("base.hidden_states", "hidden_states")?,
                stop_logits: name("base.stop_logits", "stop_logits")?,
                micro_features: name("micro.inputs.features", "features")?,
                micro_input_ids: name("micro.inputs.input_ids", "input_ids")?,
                micro_past_key: name("micro.inputs.past_key_names", "past_key_values.%d.key")?,
                micro_past_value: name("micro.inputs.past_value_names", "past_key_values.%d.value")?,
                micro_logits: name("micro.outputs.logits", "logits")?,
                micro_stop_logits: name("micro.outputs.stop_logits", "stop_logits")?,
                micro_present_key: name("micro.outputs.present_key_names", "present.%d.key")?,
                micro_present_value: name("micro.outputs.present_value_names", "present.%d.value")?,
            },
        };
        if contract.max_tokens_per_step == 0 {
            return Err(err("max_tokens_per_step", "must be at least 1".into()));
        }
        Ok(contract)
    }
}
