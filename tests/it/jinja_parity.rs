//! jinja2's builtins, rendered by edgellm and by jinja2 set up as transformers sets it up: every
//! filter of `jinja2.filters.FILTERS`, every test of `jinja2.tests.TESTS`, the globals, and the
//! Python `str`/`list`/`dict` methods a template reaches in the immutable sandbox. The case list
//! (tests/py/jinja_builtins_cases.json) holds templates only; what they should render is what
//! jinja2 renders now (tests/py/render_chat.py).

use edgellm::error::Error;
use edgellm::model::{ChatMessage, ChatTemplate};
use serde_json::{json, Value};

use crate::kit::fixtures::{python_reference, root};

#[test]
fn jinja2_builtins_render_as_transformers_renders_them() {
    let path = root().join("tests/py/jinja_builtins_cases.json");
    let templates: Vec<String> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(templates.len() >= 100, "{} cases", templates.len());
    let messages = vec![
        ChatMessage { role: "user".into(), content: "Hello World".into() },
        ChatMessage { role: "assistant".into(), content: "Hi there".into() },
    ];
    let special = json!({ "bos_token": "<s>", "eos_token": "</s>" });
    let cases: Vec<Value> = templates.iter().map(|t| json!({ "template": t, "special_tokens": special, "messages": messages })).collect();
    let reference = python_reference("render_chat.py", &json!({ "cases": cases }));
    let reference = reference.as_array().unwrap();
    assert_eq!(reference.len(), templates.len());

    let mut differences = Vec::new();
    let (mut same, mut refused) = (0, 0);
    for (template, want) in templates.iter().zip(reference) {
        let tokens = vec![("bos_token", "<s>".to_string()), ("eos_token", "</s>".to_string())];
        let ours = ChatTemplate::new(template.clone(), tokens, "case").render(&messages, true);
        match (&ours, want.get("text"), want.get("error")) {
            (Ok(text), Some(Value::String(want)), _) if text == want => same += 1,
            // Both refuse (an unknown argument, a mutating method the sandbox forbids): the
            // messages are each engine's own.
            (Err(Error::ChatTemplate(_)), _, Some(Value::String(_))) => refused += 1,
            _ => differences.push(format!("{template}\n  jinja2:  {want}\n  edgellm: {ours:?}")),
        }
    }
    eprintln!("jinja2 builtins: {same} renders identical to jinja2's, {refused} refused by both");
    assert!(differences.is_empty(), "{} of {} cases differ from jinja2:\n{}", differences.len(), templates.len(), differences.join("\n"));
    assert!(refused >= 10, "the mutating methods are refused ({refused})");
}
