//! The OpenAI API's JSON, as far as `edgellm serve` takes and gives it. Requests parse into
//! D-Bus calls here; an argument that edgellm cannot honour is an error naming it, never
//! silently dropped.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{json, Value as Json};
use zbus::zvariant::Value;

use super::ApiError;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    schema: Option<Json>,
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and text completions share.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub model: String,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    response_format: Option<ResponseFormat>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logprobs: Option<bool>,
    tools: Option<Vec<Json>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub sampling: Sampling,
    pub messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub sampling: Sampling,
    pub prompt: PromptField,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<u32>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(message, Some(param))
}

impl Sampling {
    /// The D-Bus options of the request. `default_max_tokens` applies when the request sets
    /// neither `max_tokens` nor `max_completion_tokens` (OpenAI's completions default to 16).
    pub fn options(&self, default_max_tokens: Option<u32>) -> Result<HashMap<&'static str, Value<'static>>, ApiError> {
        let mut o = HashMap::new();
        if let Some(n) = self.n.filter(|n| *n != 1) {
            return Err(invalid("n", format!("edgellm gives one choice per request; `n` must be 1, not {n}")));
        }
        for (name, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(invalid(name, format!("`{name}` is not supported; leave it out or 0")));
            }
        }
        if self.logprobs == Some(true) {
            return Err(invalid("logprobs", "log-probabilities are not returned; leave `logprobs` out"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(invalid("tools", "tool calls are not supported"));
        }
        if let Some(max) = self.max_completion_tokens.or(self.max_tokens).or(default_max_tokens) {
            o.insert("max_new_tokens", Value::U32(max));
        }
        if let Some(t) = self.temperature {
            o.insert("temperature", Value::F64(t));
        }
        if let Some(p) = self.top_p {
            o.insert("top_p", Value::F64(p));
        }
        if let Some(seed) = self.seed {
            let seed = u64::try_from(seed).map_err(|_| invalid("seed", "must not be negative"))?;
            o.insert("seed", Value::U64(seed));
        }
        match &self.stop {
            Some(Stop::One(s)) => {
                o.insert("stop", Value::from(vec![s.clone()]));
            }
            Some(Stop::Many(v)) if !v.is_empty() => {
                o.insert("stop", Value::from(v.clone()));
            }
            _ => {}
        }
        if let Some(format) = &self.response_format {
            match format.kind.as_str() {
                "text" => {}
                "json_object" => {
                    o.insert("json_schema", Value::from(r#"{"type":"object"}"#.to_string()));
                }
                "json_schema" => {
                    let schema = format.json_schema.as_ref().and_then(|f| f.schema.as_ref()).ok_or_else(|| {
                        invalid("response_format", "`json_schema` needs `json_schema.schema`, the JSON Schema the output must match")
                    })?;
                    o.insert("json_schema", Value::from(schema.to_string()));
                }
                other => {
                    return Err(invalid(
                        "response_format",
                        format!("type `{other}` is unknown; use `text`, `json_object` or `json_schema`"),
                    ))
                }
            }
        }
        Ok(o)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    /// The messages as the daemon's `Chat` takes them: (role, text).
    pub fn messages(&self) -> Result<Vec<(String, String)>, ApiError> {
        if self.messages.is_empty() {
            return Err(invalid("messages", "give at least one message"));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(invalid(
                            &format!("messages[{i}].role"),
                            format!("role `{other}` is not supported; use system, developer, user or assistant"),
                        ))
                    }
                };
                let text = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(invalid(
                                        &format!("messages[{i}].content[{j}]"),
                                        format!("content of type `{kind}` is not supported; only text"),
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok((role.to_string(), text))
            })
            .collect()
    }
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<String, ApiError> {
        if self.echo == Some(true) {
            return Err(invalid("echo", "echoing the prompt is not supported"));
        }
        if self.suffix.is_some() {
            return Err(invalid("suffix", "insertion with a suffix is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(invalid("best_of", "must be 1"));
        }
        match &self.prompt {
            PromptField::One(p) => Ok(p.clone()),
            PromptField::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            PromptField::Many(_) => Err(invalid("prompt", "give one prompt per request")),
        }
    }
}

/// The request's end, as the daemon's `Finished` reports it.
#[derive(Debug, Clone)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    pub fn json(&self) -> Json {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}
