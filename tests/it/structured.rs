//! Structured output (`json_schema`, `grammar`): every output of ten schemas, sampled at
//! temperature 1 with five seeds, parses and validates with Python's `jsonschema`, in plain,
//! speculative, prompt-lookup and multi-token decoding; rejected schemas are InvalidArgument.

use edgellm::service::client::Daemon1Proxy;
use serde_json::{json, Value as Json};
use zbus::zvariant::Value;

use crate::kit::bus::{complete, rt, sampled_options, Daemon};
use crate::kit::fixtures::{model_dir, python_reference};

fn schemas() -> Vec<Json> {
    let int = |lo: i64, hi: i64| json!({"type": "integer", "minimum": lo, "maximum": hi});
    let string = |n: u32| json!({"type": "string", "maxLength": n});
    let object = |properties: Json, required: &[&str]| json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false});
    vec![
        object(json!({"name": string(20), "age": int(0, 120)}), &["name", "age"]),
        object(json!({"book": object(json!({"title": string(16), "chapter": int(1, 150)}), &["title", "chapter"])}), &["book"]),
        json!({"type": "array", "items": string(10), "minItems": 1, "maxItems": 3}),
        object(json!({"tribe": {"enum": ["Judah", "Levi", "Benjamin"]}}), &["tribe"]),
        object(json!({"score": {"type": "number", "minimum": 0, "maximum": 1}, "kept": {"type": "boolean"}}), &["score", "kept"]),
        object(json!({"faithful": {"type": "boolean"}, "years": int(1, 999)}), &["faithful", "years"]),
        json!({"type": "array", "maxItems": 2, "items": object(json!({"verse": int(1, 50), "text": string(12)}), &["verse", "text"])}),
        json!({"enum": ["light", "darkness", "water"]}),
        object(json!({"a": string(8), "b": int(-10, 10)}), &["a"]),
        object(json!({"grid": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 3, "items": int(0, 9)}}}), &["grid"]),
    ]
}

const PROMPT: &str = "And the record of it, written as JSON:";

#[test]
fn every_output_matches_its_schema_in_every_decoding_mode() {
    let daemon = Daemon::start(&format!(
        "\n[[model]]\nname = \"kjv-spec\"\npath = \"{}\"\ndraft = \"kjv-draft\"\n\n[[model]]\nname = \"kjv-hamburger\"\npath = \"{}\"\n",
        model_dir("kjv-target").display(),
        model_dir("kjv-hamburger").display()
    ));
    let schemas = schemas();
    // (model, extra options, seeds): plain and speculative on all five seeds; prompt lookup and
    // the multi-token modes on two.
    let modes: Vec<(&str, Vec<(&str, Value<'static>)>, Vec<u64>)> = vec![
        ("kjv", vec![], (1..=5).collect()),
        ("kjv-spec", vec![], (1..=5).collect()),
        ("kjv", vec![("prompt_lookup", Value::Bool(true))], vec![1, 2]),
        ("kjv-hamburger", vec![("multitoken_mode", Value::from("trust"))], vec![1, 2]),
        ("kjv-hamburger", vec![("multitoken_mode", Value::from("verify"))], vec![1, 2]),
    ];
    let outputs = rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let mut outputs = Vec::new();
        for (model, extra, seeds) in &modes {
            for schema in &schemas {
                for &seed in seeds {
                    let mut options = sampled_options(200, seed);
                    options.insert("json_schema", Value::from(schema.to_string()));
                    options.extend(extra.iter().map(|(k, v)| (*k, v.try_clone().unwrap())));
                    let done = complete(&proxy, model, PROMPT, options).await.unwrap_or_else(|e| panic!("{model} {schema}: {e}"));
                    let reason = done.finish_reason().to_string();
                    outputs.push((format!("{model} {extra:?} seed {seed}"), schema.clone(), done.text, reason));
                }
            }
        }
        outputs
    });
    let cases: Vec<Json> = outputs.iter().map(|(_, schema, text, _)| json!({"schema": schema, "text": text})).collect();
    let verdicts = python_reference("validate_json.py", &Json::Array(cases));
    let mut bad = Vec::new();
    for ((label, schema, text, reason), verdict) in outputs.iter().zip(verdicts.as_array().unwrap()) {
        if reason != "stop" || verdict["ok"] != true {
            bad.push(format!("{label}: {schema}\n  -> {text:?} ({reason}): {}", verdict["error"]));
        }
    }
    assert!(bad.is_empty(), "{} of {} outputs do not match their schema:\n{}", bad.len(), outputs.len(), bad.join("\n"));
    // The outputs are the model's choices, not one forced string: the seeds differ.
    let first: std::collections::HashSet<&String> = outputs.iter().take(5).map(|(_, _, text, _)| text).collect();
    assert!(first.len() > 1, "five seeds gave one output: {first:?}");
}

#[test]
fn grammars_cut_short_and_rejected_schemas() {
    let daemon = Daemon::start("");
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        // A Lark grammar.
        for seed in 1..=5 {
            let mut options = sampled_options(20, seed);
            options.insert("grammar", Value::from(r#"start: ("yea" | "nay") "." "#));
            let done = complete(&proxy, "kjv", PROMPT, options).await.unwrap();
            let (text, reason) = (done.text.as_str(), done.finish_reason());
            assert!(["yea.", "nay."].contains(&text) && reason == "stop", "{text:?} {reason}");
        }
        // Cut short by max_new_tokens: `length`, as any other request.
        let mut options = sampled_options(3, 1);
        options.insert("json_schema", Value::from(json!({"type": "array", "items": {"type": "string"}, "minItems": 5}).to_string()));
        assert_eq!(complete(&proxy, "kjv", PROMPT, options).await.unwrap().finish_reason(), "length");
        // What llguidance rejects is InvalidArgument with its message, naming the option.
        for (name, text, says) in [
            ("json_schema", "{not json", "not JSON"),
            ("json_schema", r#"{"type": "no-such-type"}"#, "llguidance"),
            ("grammar", "start: undefined_rule", "llguidance"),
        ] {
            let mut options = sampled_options(8, 1);
            options.insert(name, Value::from(text));
            let e = complete(&proxy, "kjv", PROMPT, options).await.unwrap_err();
            assert!(e.contains("InvalidArgument") && e.contains(name) && e.contains(says), "{name} {text}: {e}");
        }
        let mut options = sampled_options(8, 1);
        options.insert("json_schema", Value::from("{}"));
        options.insert("grammar", Value::from("start: \"a\""));
        let e = complete(&proxy, "kjv", PROMPT, options).await.unwrap_err();
        assert!(e.contains("InvalidArgument") && e.contains("not both"), "{e}");
        // The daemon keeps serving.
        assert!(complete(&proxy, "kjv", PROMPT, sampled_options(4, 1)).await.is_ok());
    });
}
