//! The model's chat template (Jinja, rendered with minijinja), from `chat_template.jinja` or
//! `tokenizer_config.json`'s `chat_template`.
//!
//! Real templates are written for transformers' `apply_chat_template`, so the environment is
//! set up as transformers sets up jinja2: `trim_blocks`, `lstrip_blocks`, loop controls, jinja2's
//! builtin filters, tests and globals and the Python `str`/`list`/`dict` methods as its immutable
//! sandbox has them (jinja_builtins.rs; values print as Python's `str()`), and its globals
//! `raise_exception` and `strftime_now` and its `tojson` (Python's `json.dumps`, not
//! minijinja's HTML-safe one).

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The special tokens transformers hands a template (those the tokenizer config sets).
const SPECIAL_TOKENS: &[&str] = &["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"];

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    /// Compiled once, at load; a template minijinja cannot parse keeps its error, naming the
    /// file, for the chat requests (plain prompts still work).
    env: std::result::Result<minijinja::Environment<'static>, String>,
    special_tokens: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("compiled", &self.env.is_ok()).finish()
    }
}

fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// `chat_template.jinja` wins over `tokenizer_config.json` (newer exports write the former).
    pub fn find(dir: &Path) -> Result<Option<ChatTemplate>> {
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
        let (source, origin) = if jinja.exists() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::ModelFile { path: jinja.clone(), reason: e.to_string() })?;
            (text, jinja.display().to_string())
        } else {
            match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => (s.clone(), format!("{} `chat_template`", config_path.display())),
                Some(_) => {
                    return Err(Error::ModelConfig {
                        path: config_path,
                        field: "chat_template".into(),
                        reason: "expected a string".into(),
                    });
                }
                None => return Ok(None),
            }
        };
        let tokens = SPECIAL_TOKENS.iter().filter_map(|&k| special_token(&config, k).map(|v| (k, v))).collect();
        Ok(Some(ChatTemplate::new(source, tokens, &origin)))
    }

    /// A template from its source and the special tokens that are set; `origin` names where the
    /// source came from in a compile error.
    pub fn new(source: String, special_tokens: Vec<(&'static str, String)>, origin: &str) -> ChatTemplate {
        let mut env = transformers_environment();
        let env = match env.add_template_owned(TEMPLATE_NAME, source) {
            Ok(()) => Ok(env),
            Err(e) => Err(format!("{origin} does not compile: {e}")),
        };
        ChatTemplate { env, special_tokens }
    }

    /// Renders `messages` as transformers' `apply_chat_template(messages, add_generation_prompt,
    /// tokenize=False)` does. A template that refuses the conversation (`raise_exception`) gives
    /// its own message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = self.env.as_ref().map_err(|e| Error::ChatTemplate(e.clone()))?;
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| Error::ChatTemplate(e.to_string()))?;
        let mut context: std::collections::BTreeMap<&str, Value> =
            self.special_tokens.iter().map(|(k, v)| (*k, Value::from(v.as_str()))).collect();
        context.insert("messages", Value::from_serialize(messages));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        context.insert("tools", Value::from(()));
        context.insert("documents", Value::from(()));
        template.render(context).map_err(|e| Error::ChatTemplate(template_error_message(&e)))
    }
}

/// The message a user needs: a template's own `raise_exception` text as it wrote it, anything
/// else with minijinja's description and where in the template it happened.
fn template_error_message(e: &minijinja::Error) -> String {
    if e.kind() == minijinja::ErrorKind::InvalidOperation {
        if let Some(detail) = e.detail() {
            if let Some(raised) = detail.strip_prefix(RAISED) {
                return raised.to_string();
            }
        }
    }
    e.to_string()
}

/// Marks the errors `raise_exception` makes, so their message reaches the caller verbatim.
const RAISED: &str = "raised: ";

fn transformers_environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // jinja2's builtins and Python's methods (minijinja-contrib's pycompat for the rest).
    super::jinja_builtins::install(&mut env);
    env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
    });
    env.add_function("strftime_now", |format: String| -> std::result::Result<String, minijinja::Error> {
        use std::fmt::Write;
        let mut out = String::new();
        write!(out, "{}", chrono::Local::now().format(&format))
            .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}")))?;
        Ok(out)
    });
    env.add_filter("tojson", tojson);
    env
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        Some(v) => Some(v.as_str().map(str::to_string).ok_or_else(|| bad_argument("indent must be a number or a string"))?),
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v.try_iter()?.map(|p| p.as_str().map(str::to_string).unwrap_or_default()).collect();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => return Err(bad_argument("separators must be two strings")),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let style = JsonStyle { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false), ensure_ascii: ensure_ascii.unwrap_or(false) };
    let mut out = String::new();
    style.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn bad_argument(message: &str) -> minijinja::Error {
    minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("tojson: {message}"))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn write(&self, value: &Value, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Undefined => return Err(bad_argument("an undefined value is not JSON serializable")),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)),
            ValueKind::String => self.write_str(value.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                let items: Vec<(Value, Value)> =
                    keys.into_iter().map(|k| (value.get_item(&k).unwrap_or_default(), k)).map(|(v, k)| (k, v)).collect();
                self.write_container(('{', '}'), items.len(), level, out, |i, level, out| {
                    let (k, v) = &items[i];
                    match k.as_str() {
                        Some(s) => self.write_str(s, out),
                        None => self.write_str(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(v, level, out)
                })?;
            }
            _ => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(('[', ']'), items.len(), level, out, |i, level, out| self.write(&items[i], level, out))?;
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        (open, close): (char, char),
        len: usize,
        level: usize,
        out: &mut String,
        mut item: impl FnMut(usize, usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(level));
            }
        };
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            newline(out, level + 1);
            item(i, level + 1, out)?;
        }
        newline(out, level);
        out.push(close);
        Ok(())
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A number as Python's `json.dumps` writes it: integers as they are, floats as `repr` does
/// (`1.0`, `1e-05`, `1e+16`, `Infinity`).
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    // JSON's names where Python's `str()` says nan and inf.
    match x {
        x if x.is_nan() => "NaN".into(),
        f64::INFINITY => "Infinity".into(),
        f64::NEG_INFINITY => "-Infinity".into(),
        x => super::jinja_builtins::py_float(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[(&str, &str)]) -> Result<String> {
        let messages: Vec<ChatMessage> =
            messages.iter().map(|(r, c)| ChatMessage { role: r.to_string(), content: c.to_string() }).collect();
        ChatTemplate::new(source.into(), vec![("bos_token", "<s>".into())], "test").render(&messages, true)
    }

    #[test]
    fn raise_exception_gives_the_templates_own_message() {
        let e = render(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}",
            &[("system", "x")],
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "chat template: Conversation roles must alternate user/assistant");
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let out = render(
            "{{ {'a': [1, 2.5, none, true], 'é': 'x\"\\n'} | tojson }}|{{ [1e-5, 1e16, 3.0] | tojson(indent=2) }}|{{ {} | tojson }}",
            &[],
        )
        .unwrap();
        assert_eq!(out, "{\"a\": [1, 2.5, null, true], \"é\": \"x\\\"\\n\"}|[\n  1e-05,\n  1e+16,\n  3.0\n]|{}");
    }

    #[test]
    fn a_template_that_does_not_compile_is_named_at_render() {
        let e = render("{% if %}", &[("user", "x")]).unwrap_err().to_string();
        assert!(e.contains("test does not compile"), "{e}");
    }
}
