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
        "max_per_user",
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
        (0.0f64..=2.0).prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,8}".prop_map(Value::from),
        // The words the string options take, a JSON schema and a grammar, and text over 64 KiB.
        prop::sample::select(vec!["interactive", "background", "trust", "verify", "{\"type\":\"integer\"}", "start: \"a\"", ""])
            .prop_map(Value::from),
        (65_000usize..70_000).prop_map(|n| Value::from("x".repeat(n))),
        prop::collection::vec(".{0,300}", 0..20).prop_map(Value::from),
        prop::collection::vec(any::<u32>(), 0..40).prop_map(Value::from),
        prop::sample::select(vec!["/org/edgellm/Daemon1/session/s1", "/"])
            .prop_map(|p| Value::ObjectPath(zbus::zvariant::ObjectPath::try_from(p).unwrap())),
        Just(Value::Value(Box::new(Value::U32(4)))),
    ]
}

/// Every option the parser knows, and one it does not.
fn option_name() -> impl Strategy<Value = &'static str> {
    let mut names: Vec<&'static str> = options::OPTIONS.iter().map(|(name, _)| *name).collect();
    names.push("other");
    prop::sample::select(names)
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
    fn option_parser_never_panics(entries in prop::collection::vec((option_name(), variant()), 0..8)) {
        let map: HashMap<String, OwnedValue> = entries.into_iter().filter_map(|(k, v)| OwnedValue::try_from(v).ok().map(|v| (k.to_string(), v))).collect();
        if let Ok(parsed) = options::parse(&map) {
            // Whatever is accepted is in range.
            let g = &parsed.generate;
            if let Some(t) = g.temperature { prop_assert!((0.0..=100.0).contains(&t)); }
            if let Some(p) = g.top_p { prop_assert!(p > 0.0 && p <= 1.0); }
            if let Some(k) = g.top_k { prop_assert!(k >= 1); }
            if let Some(n) = g.max_new_tokens { prop_assert!(n >= 1); }
            if let Some(t) = g.multitoken_threshold { prop_assert!((0.0..=1.0).contains(&t)); }
            if let Some(n) = g.multitoken_max_tokens { prop_assert!(n >= 1); }
            prop_assert!(g.stop.len() <= 16 && g.stop.iter().all(|s| !s.is_empty() && s.len() <= 256));
            if let Some(grammar) = &g.grammar {
                let text = match grammar {
                    edgellm::model::grammar::OutputGrammar::JsonSchema(t) | edgellm::model::grammar::OutputGrammar::Lark(t) => t,
                };
                prop_assert!(!text.is_empty() && text.len() <= 64 * 1024, "a grammar of {} bytes was taken", text.len());
            }
        }
    }
}

/// The fuzzer reaches every option: each one is accepted with some value it generates.
#[test]
fn the_option_fuzzer_reaches_every_option() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut accepted = std::collections::BTreeSet::new();
    for _ in 0..20_000 {
        let (name, value) = (option_name(), variant()).new_tree(&mut runner).unwrap().current();
        let map = HashMap::from([(name.to_string(), OwnedValue::try_from(value).unwrap())]);
        if options::parse(&map).is_ok() {
            accepted.insert(name);
        }
    }
    let missing: Vec<&str> = options::OPTIONS.iter().map(|(n, _)| *n).filter(|n| !accepted.contains(n)).collect();
    assert!(missing.is_empty(), "the fuzzer never gets these options past the parser: {missing:?}");
}
