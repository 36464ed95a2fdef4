//! The token-level API over D-Bus (`Tokenize`, `Detokenize`, `prompt_ids`, `return_token_ids`),
//! called with busctl and the CLI, against Hugging Face tokenizers and onnxruntime-genai's ids.

use std::collections::HashMap;
use std::time::Duration;

use edgellm::service::client::Daemon1Proxy;
use futures_util::StreamExt;
use serde_json::{json, Value};
use zbus::zvariant::Value as DValue;

use crate::kit::bus::Daemon;
use crate::kit::fixtures::{genai_greedy, model_dir, python_reference, references, shared_reference};

fn as_ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// busctl's words for an `au` argument.
fn au(ids: &[u32]) -> Vec<String> {
    std::iter::once(ids.len().to_string()).chain(ids.iter().map(u32::to_string)).collect()
}

#[test]
fn tokenize_detokenize_and_prompt_ids_match_the_references() {
    // kjv's byte-level BPE, and a BOS-adding SentencePiece BPE (onnxruntime-genai's Llama test
    // model, used in place).
    let llama = shared_reference("genai-test-models/tiny-random-LlamaForCausalLM-fp16");
    let daemon = Daemon::start(&format!("\n[[model]]\nname = \"llama\"\npath = \"{}\"\npreload = false\n", llama.display()));
    let texts = ["In the beginning God created", "  Grüße, 日本 🎉 <|im_start|>"];
    let reference =
        python_reference("tokenizer_reference.py", &json!({ "tokenizer": llama.join("tokenizer.json"), "texts": texts, "sequences": [] }));
    for (i, text) in texts.iter().enumerate() {
        let ids = as_ids(&daemon.call("Tokenize", "ss", &["llama", text]).unwrap()["data"][0]);
        assert_eq!(ids, as_ids(&reference["encoded"][i]), "llama: Tokenize({text:?}) against tokenizers' encode");
        assert_eq!(ids[0], 1, "llama's tokenizer adds <s>");
        let mut args = vec!["llama".to_string()];
        args.extend(au(&ids));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text_back = daemon.call("Detokenize", "sau", &args).unwrap()["data"][0].as_str().unwrap().to_string();
        assert_eq!(text_back, reference["decoded"][i].as_str().unwrap(), "llama: Detokenize against tokenizers' decode");
    }

    let tokenizer = model_dir("kjv-target").join("tokenizer.json");
    let reference = python_reference("tokenizer_reference.py", &json!({ "tokenizer": tokenizer, "texts": texts, "sequences": [] }));
    for (i, text) in texts.iter().enumerate() {
        let ids = as_ids(&daemon.call("Tokenize", "ss", &["kjv", text]).unwrap()["data"][0]);
        assert_eq!(ids, as_ids(&reference["encoded"][i]), "Tokenize({text:?}) against tokenizers' encode");
        let mut args = vec!["kjv".to_string()];
        args.extend(au(&ids));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text_back = daemon.call("Detokenize", "sau", &args).unwrap()["data"][0].as_str().unwrap().to_string();
        assert_eq!(text_back, reference["decoded"][i].as_str().unwrap(), "Detokenize against tokenizers' decode");
    }

    // Complete continues the given ids as onnxruntime-genai (run now) does, and returns its ids on
    // request.
    let refs = references();
    let cases = &refs.models["kjv-target"][1..2];
    let case = &cases[0];
    let genai = genai_greedy("kjv-target", "cpu", cases, refs.new_tokens).remove(0);
    let new_tokens = refs.new_tokens.to_string();
    let mut args: Vec<String> = vec!["kjv".into(), "".into(), "4".into(), "prompt_ids".into(), "au".into()];
    args.extend(au(&case.prompt_ids));
    args.extend(["return_token_ids", "b", "true", "max_new_tokens", "u", &new_tokens, "temperature", "d", "0"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let reply = daemon.call("Complete", "ssa{sv}", &args).unwrap();
    let token_ids = as_ids(&reply["data"][1]["token_ids"]["data"]);
    // onnxruntime-genai's ids end with the eos where it stopped; token_ids leave the eos out.
    assert!(!token_ids.is_empty() && genai.len() - token_ids.len() <= 1, "{token_ids:?} against {genai:?}");
    assert_eq!(token_ids, genai[..token_ids.len()], "the ids continue the prompt ids as onnxruntime-genai's do");
    let text = reply["data"][0].as_str().unwrap();
    let decoded = python_reference(
        "tokenizer_reference.py",
        &json!({ "tokenizer": tokenizer, "texts": [], "sequences": [[case.prompt_ids, token_ids]] }),
    );
    assert_eq!(text, decoded["continuations"][0].as_str().unwrap(), "the text is decode(prompt + output) - decode(prompt)");

    // Without the option, no ids.
    let reply = daemon.call("Complete", "ssa{sv}", &["kjv", "And God said", "1", "max_new_tokens", "u", "3"]).unwrap();
    assert!(reply["data"][1].get("token_ids").is_none(), "{reply}");

    // Generate streams the same ids' text and puts the ids in Finished.
    let (streamed, finished_ids) = crate::kit::bus::rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let mut tokens = proxy.receive_token().await.unwrap();
        let mut finished = proxy.receive_finished().await.unwrap();
        let options = HashMap::from([
            ("prompt_ids", DValue::from(case.prompt_ids.clone())),
            ("return_token_ids", DValue::Bool(true)),
            ("max_new_tokens", DValue::U32(refs.new_tokens as u32)),
            ("temperature", DValue::F64(0.0)),
        ]);
        let id = proxy.generate("kjv", "", options).await.unwrap();
        let mut text = String::new();
        loop {
            tokio::select! {
                biased;
                Some(t) = tokens.next() => text.push_str(&t.args().unwrap().text),
                Some(f) = finished.next() => {
                    let a = f.args().unwrap();
                    assert_eq!(a.request_id, id);
                    while let Ok(Some(t)) = tokio::time::timeout(Duration::from_millis(50), tokens.next()).await {
                        text.push_str(&t.args().unwrap().text);
                    }
                    let ids: Vec<u32> = a.stats["token_ids"].clone().try_into().unwrap();
                    return (text, ids);
                }
            }
        }
    });
    assert_eq!(finished_ids, token_ids);
    assert_eq!(streamed, text);

    // The CLI.
    let out = daemon.cli(&["tokenize", "In the beginning God created"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ids: Vec<u32> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(ids, as_ids(&reference["encoded"][0]));
    let mut args = vec!["detokenize".to_string()];
    args.extend(ids.iter().map(u32::to_string));
    let out = daemon.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), texts[0]);
}

#[test]
fn bad_token_requests_are_invalid_arguments_naming_the_option() {
    let daemon = Daemon::start("");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "And God", "1", "prompt_ids", "au", "2", "1", "2"]).unwrap_err();
    assert!(e.contains("prompt_ids") && e.contains("not both"), "{e}");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "", "1", "prompt_ids", "au", "2", "1", "999999"]).unwrap_err();
    assert!(e.contains("prompt_ids") && e.contains("999999") && e.contains("outside the vocabulary"), "{e}");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "", "1", "prompt_ids", "au", "0"]).unwrap_err();
    assert!(e.contains("prompt_ids") && e.contains("empty"), "{e}");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "", "1", "prompt_ids", "as", "1", "x"]).unwrap_err();
    assert!(e.contains("prompt_ids") && e.contains("`au`"), "{e}");
    let e = daemon.call("Chat", "sa(ss)a{sv}", &["kjv", "1", "user", "hi", "1", "prompt_ids", "au", "1", "5"]).unwrap_err();
    assert!(e.contains("prompt_ids") && e.contains("Chat"), "{e}");
    let e = daemon.call("Detokenize", "sau", &["kjv", "2", "5", "999999"]).unwrap_err();
    assert!(e.contains("999999") && e.contains("outside the vocabulary"), "{e}");
    let e = daemon.call("Tokenize", "ss", &["nope", "x"]).unwrap_err();
    assert!(e.contains("no model named `nope`"), "{e}");
    // The errors are typed as a D-Bus client sees them, and the daemon still serves.
    crate::kit::bus::rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let err = proxy.detokenize("kjv", &[999_999]).await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.InvalidArgument"), "{err}");
        let err = proxy.tokenize("nope", "x").await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.ModelNotFound"), "{err}");
    });
    let ok = daemon.call("Tokenize", "ss", &["kjv", "In the beginning"]).unwrap();
    assert!(!as_ids(&ok["data"][0]).is_empty());
}
