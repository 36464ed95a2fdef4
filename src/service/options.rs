//! Request options (`a{sv}`) to typed engine options. Every option has one D-Bus type; an
//! unknown option, a wrong type or an out-of-range value is an `InvalidArgument` that names it.

use std::collections::HashMap;

use zbus::zvariant::{OwnedValue, Value};

use crate::engine::GenerateOptions;
use crate::error::Error;

/// Options a request may carry, with their D-Bus signatures (also listed in the README).
pub const OPTIONS: &[(&str, &str)] = &[
    ("max_new_tokens", "u"),
    ("temperature", "d"),
    ("top_k", "u"),
    ("top_p", "d"),
    ("repetition_penalty", "d"),
    ("seed", "t"),
    ("stop", "as"),
    ("speculative", "b"),
    ("prompt_lookup", "b"),
    ("multitoken_mode", "s"),
    ("multitoken_threshold", "d"),
    ("multitoken_max_tokens", "u"),
    ("prompt_ids", "au"),
    ("return_token_ids", "b"),
    ("json_schema", "s"),
    ("grammar", "s"),
    ("priority", "s"),
    ("session", "o"),
];

/// The largest `json_schema` or `grammar` taken: llguidance compiles it on the caller's request.
const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// Parsed options, plus the ones the engine does not take itself.
#[derive(Debug, Default, Clone)]
pub struct RequestOptions {
    pub generate: GenerateOptions,
    pub speculative: Option<bool>,
    /// Continue these ids instead of a prompt string (`Generate`, `Complete`).
    pub prompt_ids: Option<Vec<u32>>,
    /// Add the generated ids to the stats as `token_ids`.
    pub return_token_ids: bool,
    /// `interactive` or `background`; the caller's default (`limits.background_users`) if unset.
    pub priority: Option<crate::scheduler::Priority>,
    /// A session of the caller's (`CreateSession`) whose KV the request reuses and keeps.
    pub session: Option<String>,
}

fn invalid(argument: &str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument { argument: argument.into(), reason: reason.into() }
}

fn wrong_type(name: &str, want: &str, got: &Value<'_>) -> Error {
    invalid(name, format!("expected D-Bus type `{want}`, got `{}`", got.value_signature()))
}

fn as_f64(name: &str, v: &Value<'_>) -> Result<f64, Error> {
    match v {
        Value::F64(x) if x.is_finite() => Ok(*x),
        Value::F64(_) => Err(invalid(name, "must be a finite number")),
        other => Err(wrong_type(name, "d", other)),
    }
}

fn as_u32(name: &str, v: &Value<'_>) -> Result<u32, Error> {
    match v {
        Value::U32(x) => Ok(*x),
        other => Err(wrong_type(name, "u", other)),
    }
}

/// A count of at least 1; `if_zero` says why 0 is refused.
fn at_least_one(name: &str, v: &Value<'_>, if_zero: &str) -> Result<usize, Error> {
    match as_u32(name, v)? {
        0 => Err(invalid(name, if_zero)),
        n => Ok(n as usize),
    }
}

/// A number in `range`, as the f32 the engine takes; `allowed` says the range to the caller.
fn f64_within(name: &str, v: &Value<'_>, range: std::ops::RangeInclusive<f64>, allowed: &str) -> Result<f32, Error> {
    let x = as_f64(name, v)?;
    if !range.contains(&x) {
        return Err(invalid(name, format!("{x} is out of range: use {allowed}")));
    }
    Ok(x as f32)
}

/// A number in (0, `max`], as the f32 the sampler uses.
fn positive_up_to(name: &str, v: &Value<'_>, max: f64) -> Result<f32, Error> {
    let x = as_f64(name, v)?;
    // Checked as the f32 the sampler uses: 1e-308 is positive but rounds to 0.
    if !(x as f32 > 0.0 && x <= max) {
        return Err(invalid(name, format!("{x} is out of range: use a number in (0, {max}]")));
    }
    Ok(x as f32)
}

pub fn parse(options: &HashMap<String, OwnedValue>) -> Result<RequestOptions, Error> {
    let mut out = RequestOptions::default();
    for (name, value) in options {
        let v: &Value<'_> = value;
        // A variant inside a variant (`v` of `v`) is unwrapped once, as gdbus sends some that way.
        let v = match v {
            Value::Value(inner) => inner.as_ref(),
            other => other,
        };
        out.set(name, v)?;
    }
    Ok(out)
}

impl RequestOptions {
    /// Sets option `name` from its value, or says why it cannot.
    fn set(&mut self, name: &str, v: &Value<'_>) -> Result<(), Error> {
        match name {
            "json_schema" | "grammar" => set_output_grammar(&mut self.generate, name, v),
            _ if set_sampling_option(&mut self.generate, name, v)? => Ok(()),
            _ if self.set_drafting_option(name, v)? => Ok(()),
            _ if self.set_request_option(name, v)? => Ok(()),
            other => {
                let known: Vec<&str> = OPTIONS.iter().map(|(n, _)| *n).collect();
                Err(invalid(other, format!("unknown option; known options are {}", known.join(", "))))
            }
        }
    }

    /// How the request drafts tokens (speculative, prompt lookup, multi-token); false if `name`
    /// is not one of these.
    fn set_drafting_option(&mut self, name: &str, v: &Value<'_>) -> Result<bool, Error> {
        let g = &mut self.generate;
        match name {
            "prompt_lookup" => match v {
                Value::Bool(b) => g.prompt_lookup = Some(*b),
                other => return Err(wrong_type(name, "b", other)),
            },
            "speculative" => match v {
                Value::Bool(b) => self.speculative = Some(*b),
                other => return Err(wrong_type(name, "b", other)),
            },
            "multitoken_mode" => match v {
                Value::Str(s) => {
                    g.multitoken_mode = Some(
                        crate::multitoken::Mode::parse(s.as_str())
                            .ok_or_else(|| invalid(name, format!("`{s}`; use \"trust\" or \"verify\"")))?,
                    )
                }
                other => return Err(wrong_type(name, "s", other)),
            },
            "multitoken_threshold" => {
                g.multitoken_threshold = Some(f64_within(name, v, 0.0..=1.0, "0..1 (1 stops every step after one token)")?)
            }
            "multitoken_max_tokens" => g.multitoken_max_tokens = Some(at_least_one(name, v, "must be at least 1")?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// What the request continues, returns and keeps, and how it queues; false if `name` is not
    /// one of these.
    fn set_request_option(&mut self, name: &str, v: &Value<'_>) -> Result<bool, Error> {
        match name {
            "prompt_ids" => match v {
                Value::Array(a) if a.element_signature() == "u" => {
                    self.prompt_ids = Some(a.iter().map(|id| if let Value::U32(id) = id { *id } else { 0 }).collect())
                }
                other => return Err(wrong_type(name, "au", other)),
            },
            "return_token_ids" => match v {
                Value::Bool(b) => self.return_token_ids = *b,
                other => return Err(wrong_type(name, "b", other)),
            },
            "session" => match v {
                Value::ObjectPath(path) => self.session = Some(path.to_string()),
                other => return Err(wrong_type(name, "o", other)),
            },
            "priority" => match v {
                Value::Str(s) => {
                    self.priority = Some(
                        crate::scheduler::Priority::parse(s.as_str())
                            .ok_or_else(|| invalid(name, format!("`{s}`; use \"interactive\" or \"background\"")))?,
                    )
                }
                other => return Err(wrong_type(name, "s", other)),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Length and sampling (`max_new_tokens`, `temperature`, ..., `stop`); false if `name` is not
/// one of these.
fn set_sampling_option(g: &mut GenerateOptions, name: &str, v: &Value<'_>) -> Result<bool, Error> {
    match name {
        "max_new_tokens" => g.max_new_tokens = Some(at_least_one(name, v, "must be at least 1")?),
        "temperature" => g.temperature = Some(f64_within(name, v, 0.0..=100.0, "0 (greedy) up to 100")?),
        "top_k" => g.top_k = Some(at_least_one(name, v, "must be at least 1 (leave it out for no top-k cut)")?),
        "top_p" => g.top_p = Some(positive_up_to(name, v, 1.0)?),
        "repetition_penalty" => g.repetition_penalty = Some(positive_up_to(name, v, 10.0)?),
        "seed" => match v {
            Value::U64(s) => g.seed = Some(*s),
            other => return Err(wrong_type(name, "t", other)),
        },
        "stop" => g.stop = stop_strings(name, v)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn stop_strings(name: &str, v: &Value<'_>) -> Result<Vec<String>, Error> {
    let list = match v {
        Value::Array(a) if a.element_signature() == "s" => a
            .iter()
            .map(|s| match s {
                Value::Str(s) => s.to_string(),
                _ => String::new(),
            })
            .collect::<Vec<_>>(),
        other => return Err(wrong_type(name, "as", other)),
    };
    if list.len() > 16 || list.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(invalid(name, "use at most 16 non-empty strings of at most 256 bytes"));
    }
    Ok(list)
}

/// `json_schema` or `grammar`: the one grammar the output follows.
fn set_output_grammar(g: &mut GenerateOptions, name: &str, v: &Value<'_>) -> Result<(), Error> {
    // The size is checked before anything else looks at the text: llguidance's time and memory
    // grow with it.
    let text = match v {
        Value::Str(s) if s.len() > MAX_GRAMMAR_BYTES => {
            return Err(invalid(name, format!("is {} bytes; at most {MAX_GRAMMAR_BYTES}", s.len())))
        }
        Value::Str(s) if s.is_empty() => return Err(invalid(name, "is empty")),
        Value::Str(s) => s.to_string(),
        other => return Err(wrong_type(name, "s", other)),
    };
    if g.grammar.is_some() {
        return Err(invalid(name, "give either json_schema or grammar, not both"));
    }
    g.grammar = Some(if name == "json_schema" {
        crate::model::grammar::OutputGrammar::JsonSchema(text)
    } else {
        crate::model::grammar::OutputGrammar::Lark(text)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: Vec<(&str, Value<'static>)>) -> HashMap<String, OwnedValue> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), OwnedValue::try_from(v).unwrap())).collect()
    }

    #[test]
    fn typed_options_parse() {
        let o = parse(&opts(vec![
            ("max_new_tokens", Value::U32(5)),
            ("temperature", Value::F64(0.7)),
            ("seed", Value::U64(9)),
            ("stop", Value::from(vec!["\n\n".to_string()])),
            ("speculative", Value::Bool(false)),
        ]))
        .unwrap();
        assert_eq!(o.generate.max_new_tokens, Some(5));
        assert_eq!(o.generate.seed, Some(9));
        assert_eq!(o.generate.stop, vec!["\n\n".to_string()]);
        assert_eq!(o.speculative, Some(false));
    }

    #[test]
    fn wrong_type_unknown_and_out_of_range_are_named() {
        let e = parse(&opts(vec![("max_new_tokens", Value::I32(5))])).unwrap_err().to_string();
        assert!(e.contains("max_new_tokens") && e.contains("`u`") && e.contains("`i`"), "{e}");
        let e = parse(&opts(vec![("temprature", Value::F64(1.0))])).unwrap_err().to_string();
        assert!(e.contains("temprature") && e.contains("unknown option"), "{e}");
        let e = parse(&opts(vec![("temperature", Value::F64(-1.0))])).unwrap_err().to_string();
        assert!(e.contains("temperature") && e.contains("out of range"), "{e}");
        let e = parse(&opts(vec![("top_p", Value::F64(1.5))])).unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
        let e = parse(&opts(vec![("top_k", Value::U32(0))])).unwrap_err().to_string();
        assert!(e.contains("top_k"), "{e}");
    }
}
