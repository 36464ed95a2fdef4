//! `genai_config.json`, the file onnxruntime-genai's model builder writes beside `model.onnx`.
//! Only what the engine uses is read; real configs carry many more fields, which are ignored.
//! A missing required field or a wrong type names the file and the field.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder graph's input and output names. A name genai_config leaves out takes
/// onnxruntime-genai's default (its `config.h`); which of them the graph really has is read from
/// the graph at load.
#[derive(Debug, Clone)]
pub struct DecoderNames {
    /// Token ids in; absent where the graph takes `inputs_embeds` (a multi-token base).
    pub input_ids: Option<String>,
    pub inputs_embeds: Option<String>,
    pub attention_mask: String,
    pub position_ids: String,
    /// Patterns with `%d` for the layer index: KV as separate key and value tensors
    /// `[batch, heads, seq, head]`...
    pub past_key: String,
    pub past_value: String,
    /// ...as one GPT-2-style tensor `[2, batch, heads, seq, head]`...
    pub past_combined: String,
    /// ...and the rolling convolution state of hybrid models (LFM2), which has no sequence axis.
    pub past_conv: String,
    pub logits: String,
    pub present_key: String,
    pub present_value: String,
    pub present_combined: String,
    pub present_conv: String,
}

impl DecoderNames {
    pub fn layer(pattern: &str, layer: usize) -> String {
        pattern.replace("%d", &layer.to_string())
    }

    /// Past input names and present output names, key then value for each layer.
    pub fn kv_names(&self, layers: usize) -> (Vec<String>, Vec<String>) {
        let per_layer = |key: &str, value: &str| (0..layers).flat_map(|l| [Self::layer(key, l), Self::layer(value, l)]).collect();
        (per_layer(&self.past_key, &self.past_value), per_layer(&self.present_key, &self.present_value))
    }

    /// The per-layer state patterns, (past input, present output, what it is), in the order
    /// a graph's states are matched against them.
    pub fn state_patterns(&self) -> [(&str, &str, StateKind); 4] {
        [
            (&self.past_key, &self.present_key, StateKind::Kv),
            (&self.past_value, &self.present_value, StateKind::Kv),
            (&self.past_combined, &self.present_combined, StateKind::Kv),
            (&self.past_conv, &self.present_conv, StateKind::Recurrent),
        ]
    }
}

/// What a per-layer state is, which decides how it grows and whether it can be rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// Attention keys and values: one entry per position along the second-to-last axis.
    Kv,
    /// A fixed-size state that each step replaces (a convolution's window): no position axis.
    Recurrent,
}

/// The layer index of `name` under `pattern` (`past_key_values.%d.key` and
/// `past_key_values.3.key` give 3).
pub fn layer_of(pattern: &str, name: &str) -> Option<usize> {
    let (prefix, suffix) = pattern.split_once("%d")?;
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// The `search` block: defaults for a request that does not say otherwise.
#[derive(Debug, Clone)]
pub struct SearchDefaults {
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: u32,
    pub top_p: f64,
    pub repetition_penalty: f64,
    pub max_length: usize,
    pub past_present_share_buffer: bool,
}

#[derive(Debug, Clone)]
pub struct GenaiConfig {
    pub path: PathBuf,
    pub model_type: String,
    pub decoder_file: String,
    pub names: DecoderNames,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub search: SearchDefaults,
}

struct Reader<'a> {
    path: &'a Path,
    root: &'a Value,
}

impl<'a> Reader<'a> {
    fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        Error::ModelConfig { path: self.path.to_path_buf(), field: field.into(), reason: reason.into() }
    }
    fn get(&self, field: &str) -> Option<&'a Value> {
        field.split('.').try_fold(self.root, |v, key| v.get(key)).filter(|v| !v.is_null())
    }
    fn required(&self, field: &str) -> Result<&'a Value> {
        self.get(field).ok_or_else(|| self.err(field, "missing (required)"))
    }
    fn string(&self, field: &str) -> Result<String> {
        self.required(field)?.as_str().map(str::to_owned).ok_or_else(|| self.err(field, "expected a string"))
    }
    fn opt_string(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_owned())).ok_or_else(|| self.err(field, "expected a string")),
        }
    }
    fn usize(&self, field: &str) -> Result<usize> {
        let v = self.required(field)?;
        v.as_u64().map(|n| n as usize).ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}")))
    }
    fn opt_u32(&self, field: &str) -> Result<Option<u32>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as u32)).ok_or_else(|| self.err(field, format!("expected an integer, found {v}"))),
        }
    }
    fn u32_or_list(&self, field: &str) -> Result<Vec<u32>> {
        let v = self.required(field)?;
        let bad = || self.err(field, format!("expected an integer or a list of integers, found {v}"));
        match v {
            Value::Array(items) => items.iter().map(|i| i.as_u64().map(|n| n as u32).ok_or_else(bad)).collect(),
            other => other.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
        }
    }
    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }
    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }
}

impl GenaiConfig {
    pub fn load(dir: &Path) -> Result<GenaiConfig> {
        let path = dir.join("genai_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::ModelFile {
            path: path.clone(),
            reason: format!("cannot read: {e} (is this an onnxruntime-genai model folder?)"),
        })?;
        Self::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<GenaiConfig> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::ModelConfig {
            path: path.to_path_buf(),
            field: format!("line {} column {}", e.line(), e.column()),
            reason: format!("not valid JSON: {e}"),
        })?;
        let r = Reader { path, root: &root };
        let d = "model.decoder";
        // onnxruntime-genai's defaults for the names a config leaves out (its src/config.h).
        let name = |key: &str, default: &str| -> Result<String> {
            Ok(r.opt_string(&format!("{d}.{key}"))?.unwrap_or_else(|| default.to_string()))
        };
        let inputs_embeds = r.opt_string(&format!("{d}.inputs.inputs_embeds"))?;
        let input_ids = match r.opt_string(&format!("{d}.inputs.input_ids"))? {
            Some(given) => Some(given),
            None if inputs_embeds.is_none() => Some("input_ids".to_string()),
            None => None,
        };
        let names = DecoderNames {
            input_ids,
            inputs_embeds,
            attention_mask: name("inputs.attention_mask", "attention_mask")?,
            position_ids: name("inputs.position_ids", "position_ids")?,
            past_key: name("inputs.past_key_names", "past_key_values.%d.key")?,
            past_value: name("inputs.past_value_names", "past_key_values.%d.value")?,
            past_combined: name("inputs.past_names", "past_%d")?,
            past_conv: name("inputs.past_conv_names", "past_conv.%d")?,
            logits: name("outputs.logits", "logits")?,
            present_key: name("outputs.present_key_names", "present.%d.key")?,
            present_value: name("outputs.present_value_names", "present.%d.value")?,
            present_combined: name("outputs.present_names", "present_%d")?,
            present_conv: name("outputs.present_conv_names", "present_conv.%d")?,
        };
        let context_length = r.usize("model.context_length")?;
        let search = SearchDefaults {
            do_sample: r.bool_or("search.do_sample", false)?,
            temperature: r.f64_or("search.temperature", 1.0)?,
            top_k: r.opt_u32("search.top_k")?.unwrap_or(0),
            top_p: r.f64_or("search.top_p", 1.0)?,
            repetition_penalty: r.f64_or("search.repetition_penalty", 1.0)?,
            max_length: r.get("search.max_length").map(|_| r.usize("search.max_length")).transpose()?.unwrap_or(context_length),
            past_present_share_buffer: r.bool_or("search.past_present_share_buffer", false)?,
        };
        Ok(GenaiConfig {
            path: path.to_path_buf(),
            model_type: r.string("model.type")?,
            decoder_file: r.string(&format!("{d}.filename"))?,
            names,
            num_layers: r.usize(&format!("{d}.num_hidden_layers"))?,
            num_kv_heads: r.usize(&format!("{d}.num_key_value_heads"))?,
            head_size: r.usize(&format!("{d}.head_size"))?,
            context_length,
            vocab_size: r.usize("model.vocab_size")?,
            bos_token_id: r.opt_u32("model.bos_token_id")?,
            eos_token_ids: r.u32_or_list("model.eos_token_id")?,
            pad_token_id: r.opt_u32("model.pad_token_id")?,
            search,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"model":{"type":"llama","context_length":64,"vocab_size":10,"eos_token_id":[2,3],
      "decoder":{"filename":"model.onnx","num_hidden_layers":2,"num_key_value_heads":1,"head_size":8,
      "inputs":{"input_ids":"input_ids","attention_mask":"attention_mask","past_key_names":"pk.%d","past_value_names":"pv.%d"},
      "outputs":{"logits":"logits","present_key_names":"k.%d","present_value_names":"v.%d"}}},
      "search":{"past_present_share_buffer":true,"top_k":5}}"#;

    #[test]
    fn reads_fields_and_eos_list() {
        let c = GenaiConfig::parse(Path::new("x/genai_config.json"), MINIMAL).unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.search.top_k, 5);
        assert!(c.search.past_present_share_buffer);
        assert_eq!(c.search.max_length, 64);
        assert_eq!(DecoderNames::layer(&c.names.past_key, 1), "pk.1");
    }

    #[test]
    fn names_left_out_take_onnxruntime_genai_defaults() {
        let bare = MINIMAL
            .replace(r#""inputs":{"input_ids":"input_ids","attention_mask":"attention_mask","past_key_names":"pk.%d","past_value_names":"pv.%d"},"#, "")
            .replace(r#""outputs":{"logits":"logits","present_key_names":"k.%d","present_value_names":"v.%d"}"#, r#""outputs":{}"#);
        let c = GenaiConfig::parse(Path::new("x/genai_config.json"), &bare).unwrap();
        let n = &c.names;
        assert_eq!(n.input_ids.as_deref(), Some("input_ids"));
        assert_eq!((n.attention_mask.as_str(), n.position_ids.as_str(), n.logits.as_str()), ("attention_mask", "position_ids", "logits"));
        assert_eq!((n.past_key.as_str(), n.present_value.as_str()), ("past_key_values.%d.key", "present.%d.value"));
        assert_eq!((n.past_combined.as_str(), n.present_conv.as_str()), ("past_%d", "present_conv.%d"));
        assert_eq!(layer_of("past_key_values.%d.key", "past_key_values.12.key"), Some(12));
        assert_eq!(layer_of("past_%d", "past_key_values.1.key"), None);
        assert_eq!(layer_of("past_%d", "past_"), None);
    }

    #[test]
    fn names_missing_and_mistyped_fields() {
        let missing = MINIMAL.replace(r#""head_size":8,"#, "");
        let e = GenaiConfig::parse(Path::new("m/genai_config.json"), &missing).unwrap_err().to_string();
        assert!(e.contains("m/genai_config.json") && e.contains("model.decoder.head_size") && e.contains("missing"), "{e}");
        let wrong = MINIMAL.replace(r#""vocab_size":10"#, r#""vocab_size":"ten""#);
        let e = GenaiConfig::parse(Path::new("m/genai_config.json"), &wrong).unwrap_err().to_string();
        assert!(e.contains("model.vocab_size") && e.contains("non-negative integer"), "{e}");
        let e = GenaiConfig::parse(Path::new("m/genai_config.json"), "{\"model\": ").unwrap_err().to_string();
        assert!(e.contains("not valid JSON") && e.contains("line 1"), "{e}");
    }
}
