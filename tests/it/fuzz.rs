//! Property-based fuzzing of the parsers that take outside input: the config file and request
//! options. Whatever they get, they return a value or a typed error; they never panic.
//! PROPTEST_CASES raises the number of cases (CI runs the default 256 per property).

use std::collections::HashMap;
use std::path::Path;

use edgellm::config::Config;
use edgellm::service::options;
use proptest::prelude::*;
use zbus::zvariant::{OwnedValue, Value};

fn toml_fragment() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "bus",
        "address",
        "library",
        "max_queue",
        "max_per_client",
        "max_prompt_bytes",
        "max_new_tokens",
        "request_timeout_s",
        "name",
        "path",
        "providers",
        "strict",
        "threads",
        "draft",
        "preload",
        "kv_layout",
        "speculative_min_tokens",
        "speculative_max_tokens",
        "speculative_min_confidence",
        "provider_options",
        "shutdown_grace_s",
        "bogus",
    ]);
    let value = prop::sample::select(vec![
        "\"session\"",
        "\"system\"",
        "\"cpu\"",
        "[\"cpu\", \"openvino\"]",
        "[\"gpu\"]",
        "[]",
        "0",
        "1",
        "-1",
        "99999999999",
        "true",
        "1.5",
        "\"\"",
        "\"kjv\"",
        "{ device_type = \"CPU\" }",
        "{ a = [1] }",
        "\"../x\"",
    ]);
    let section = prop::sample::select(vec!["[daemon]", "[runtime]", "[limits]", "[[model]]", "[other]", ""]);
    prop::collection::vec((section, key, value), 0..12)
        .prop_map(|lines| lines.into_iter().map(|(s, k, v)| format!("{s}\n{k} = {v}\n")).collect::<String>())
}

fn variant() -> impl Strategy<Value = Value<'static>> {
    prop_oneof![
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<u64>().prop_map(Value::U64),
        any::<f64>().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,8}".prop_map(Value::from),
        prop::collection::vec(".{0,300}", 0..20).prop_map(Value::from),
    ]
}

proptest! {
    #[test]
    fn config_parser_never_panics(text in toml_fragment()) {
        let _ = Config::parse(Path::new("/tmp/fuzz.toml"), &text);
    }

    #[test]
    fn config_parser_survives_arbitrary_bytes(text in ".{0,200}") {
        let _ = Config::parse(Path::new("/tmp/fuzz.toml"), &text);
    }

    #[test]
    fn option_parser_never_panics(entries in prop::collection::vec((prop::sample::select(vec![
        "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "speculative", "other"]), variant()), 0..8)) {
        let map: HashMap<String, OwnedValue> = entries.into_iter().filter_map(|(k, v)| OwnedValue::try_from(v).ok().map(|v| (k.to_string(), v))).collect();
        if let Ok(parsed) = options::parse(&map) {
            // Whatever is accepted is in range.
            if let Some(t) = parsed.generate.temperature { prop_assert!((0.0..=100.0).contains(&t)); }
            if let Some(p) = parsed.generate.top_p { prop_assert!(p > 0.0 && p <= 1.0); }
            if let Some(k) = parsed.generate.top_k { prop_assert!(k >= 1); }
        }
    }
}
