//! The model's chat template (Jinja, rendered with minijinja), from `chat_template.jinja` or
//! `tokenizer_config.json`'s `chat_template`.

use std::path::Path;

use serde::Serialize;

use super::TextTokenizer;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn special_token(config: &serde_json::Value, key: &str) -> String {
    match config.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// `chat_template.jinja` wins over `tokenizer_config.json` (newer exports write the former).
    pub fn find(dir: &Path, _tokenizer: &TextTokenizer) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::ModelConfig {
                path: config_path.clone(),
                field: format!("line {}", e.line()),
                reason: format!("not valid JSON: {e}"),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::ModelFile { path: jinja.clone(), reason: e.to_string() })?)
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(_) => {
                    return Err(Error::ModelConfig {
                        path: config_path,
                        field: "chat_template".into(),
                        reason: "expected a string".into(),
                    });
                }
                None => None,
            }
        };
        Ok(source.map(|source| ChatTemplate {
            source,
            bos_token: special_token(&config, "bos_token"),
            eos_token: special_token(&config, "eos_token"),
        }))
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_keep_trailing_newline(true);
        env.add_template("chat", &self.source).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let template = env.get_template("chat").map_err(|e| Error::ChatTemplate(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}
