//! Tokenizers and chat templates made elsewhere, against the programs that made them: Hugging
//! Face `tokenizers` for ids and text, jinja2 set up as transformers sets it up for renders.

use edgellm::error::Error;
use edgellm::model::{ChatMessage, ChatTemplate, Detokenizer, TextTokenizer};
use serde_json::{json, Value};

use crate::kit::fixtures::{model_dir, python_reference, root, shared_reference};

/// Prompts with leading spaces, non-ASCII text and characters that byte-fallback and byte-level
/// tokenizers split over several tokens.
const TEXTS: &[&str] = &[
    "In the beginning God created",
    " And the earth was without form",
    "  two leading spaces, and a trailing one ",
    "naïve café — “quoted” über Straße",
    "日本語のテキスト and emoji 🎉🙂 mixed",
    "line one\nline two\n\n\ttabbed",
    "<s> written out, and </s> too",
];

/// (prompt, continuation) pairs: the continuation's first token starts with a space (the case
/// SentencePiece decoders strip) or is a partial UTF-8 character.
const CONTINUATIONS: &[(&str, &str)] = &[
    ("In the beginning God created", " Wh messengers of the heaven"),
    ("And God said", ", Let there be light: and there was light."),
    ("The word", " café 日本 🎉 and more"),
    ("Emoji:", "🎉🙂 then text"),
    ("Quote", "\n\n  indented “line”"),
];

struct Family {
    label: &'static str,
    tokenizer: std::path::PathBuf,
    /// Whether plain prompts get a BOS from the tokenizer's post-processor.
    adds_bos: bool,
}

fn families() -> Vec<Family> {
    vec![
        Family {
            label: "byte-level BPE (GPT-2)",
            tokenizer: shared_reference("genai-test-models/tiny-random-gpt2-fp32/tokenizer.json"),
            adds_bos: false,
        },
        Family { label: "byte-level BPE (kjv-target)", tokenizer: model_dir("kjv-target").join("tokenizer.json"), adds_bos: false },
        Family {
            label: "Metaspace BPE with byte fallback and a Strip decoder",
            tokenizer: root().join("models/tokenizers/kjv-metaspace/tokenizer.json"),
            adds_bos: false,
        },
        Family {
            label: "SentencePiece BPE that adds <s> (Llama)",
            tokenizer: shared_reference("genai-test-models/tiny-random-LlamaForCausalLM-fp16/tokenizer.json"),
            adds_bos: true,
        },
    ]
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Streams `output` through a detokenizer continuing `prompt`, as the engine does.
fn streamed(tokenizer: &TextTokenizer, prompt: &[u32], output: &[u32]) -> String {
    let mut detok = Detokenizer::continuing(prompt);
    let mut text = String::new();
    for &id in output {
        text.push_str(&detok.push(tokenizer, id).unwrap());
    }
    text + &detok.flush(tokenizer).unwrap()
}

#[test]
fn tokenizers_encode_decode_and_stream_as_hugging_face_tokenizers_does() {
    for family in families() {
        let tokenizer = TextTokenizer::load(&family.tokenizer).unwrap();
        let mut sequences = Vec::new();
        for (prompt, continuation) in CONTINUATIONS {
            let prompt_ids = tokenizer.encode_prompt(prompt).unwrap();
            let output_ids = tokenizer.encode_rendered(continuation).unwrap();
            sequences.push((prompt_ids, output_ids));
        }
        // An output cut inside a character: the bytes of 🎉 without their last token.
        let (prompt_ids, mut output_ids) = sequences[3].clone();
        let emoji_tokens = tokenizer.encode_rendered("🎉").unwrap().len();
        if emoji_tokens > 1 {
            output_ids.truncate(emoji_tokens - 1);
            sequences.push((prompt_ids, output_ids));
        }
        let reference =
            python_reference("tokenizer_reference.py", &json!({ "tokenizer": family.tokenizer, "texts": TEXTS, "sequences": sequences }));
        for (i, text) in TEXTS.iter().enumerate() {
            let ours = tokenizer.encode_prompt(text).unwrap();
            assert_eq!(
                ours,
                ids(&reference["encoded"][i]),
                "{}: Tokenize({text:?}) differs from encode(add_special_tokens=True)",
                family.label
            );
            let decoded = tokenizer.decode(&ours).unwrap();
            assert_eq!(decoded, reference["decoded"][i].as_str().unwrap(), "{}: Detokenize of {text:?}", family.label);
        }
        let bos = tokenizer.encode_prompt("Blessed").unwrap()[0] != tokenizer.encode_rendered("Blessed").unwrap()[0];
        assert_eq!(bos, family.adds_bos, "{}: whether a plain prompt gets a BOS", family.label);
        for (i, (prompt, output)) in sequences.iter().enumerate() {
            let want = reference["continuations"][i].as_str().unwrap();
            assert_eq!(
                streamed(&tokenizer, prompt, output),
                want,
                "{}: streamed pieces of {:?} differ from decode(prompt + output) minus decode(prompt)",
                family.label,
                CONTINUATIONS.get(i).map(|c| c.1).unwrap_or("(cut inside a character)")
            );
        }
        assert!(sequences.iter().any(|(_, o)| o.len() > 1), "{}: the outputs have several tokens", family.label);
    }
}

#[test]
fn a_sentencepiece_continuation_keeps_its_leading_space() {
    // The case of the issue, checked without the reference: a Strip decoder drops the first
    // space of a sequence, so a detokenizer that starts empty loses it.
    let tokenizer = TextTokenizer::load(&root().join("models/tokenizers/kjv-metaspace/tokenizer.json")).unwrap();
    let prompt = tokenizer.encode_prompt("In the beginning God created").unwrap();
    let output = tokenizer.encode_rendered(" the heaven").unwrap();
    assert_eq!(streamed(&tokenizer, &prompt, &output), " the heaven");
    assert_eq!(streamed(&tokenizer, &[], &output), "the heaven", "with no prompt the decoder strips the space");
}

#[derive(serde::Deserialize)]
struct TemplateSource {
    name: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn conversations() -> Vec<(&'static str, Vec<ChatMessage>)> {
    let m = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
    vec![
        ("one user turn", vec![m("user", "What did God create in the beginning?")]),
        ("system + user", vec![m("system", "You answer in one sentence."), m("user", "Who built the ark?")]),
        (
            "4-turn exchange",
            vec![m("user", "Name a prophet."), m("assistant", "  Elijah.  "), m("user", "And another?"), m("assistant", "Elisha.")],
        ),
        ("non-ASCII", vec![m("system", "Réponds en français, s’il te plaît."), m("user", "  Qu’est-ce que « la lumière » ? 日本語 🎉\n")]),
    ]
}

#[test]
fn real_chat_templates_render_as_transformers_renders_them() {
    let dir = shared_reference("chat-templates");
    let sources: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("sources.json")).unwrap()).unwrap();
    let sources: Vec<TemplateSource> = serde_json::from_value(sources["templates"].clone()).unwrap();
    assert_eq!(sources.len(), 20, "sources.json lists the twenty templates");
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for source in &sources {
        let text = std::fs::read_to_string(dir.join("templates").join(format!("{}.jinja", source.name))).unwrap();
        let tokens: Vec<(&'static str, String)> = [("bos_token", &source.bos_token), ("eos_token", &source.eos_token)]
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
            .collect();
        let special: serde_json::Map<String, Value> = tokens.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let template = ChatTemplate::new(text.clone(), tokens, &source.name);
        for (label, messages) in conversations() {
            cases.push(json!({ "template": text, "special_tokens": special, "messages": messages }));
            ours.push((source.name.clone(), label, template.render(&messages, true)));
        }
    }
    let reference = python_reference("render_chat.py", &json!({ "cases": cases }));
    let (mut same, mut refused) = (0, 0);
    for ((name, label, ours), want) in ours.iter().zip(reference.as_array().unwrap()) {
        match (ours, want.get("text"), want.get("error")) {
            (Ok(text), Some(Value::String(want)), _) => {
                assert_eq!(text, want, "{name}, {label}: edgellm's render differs from transformers'");
                same += 1;
            }
            (Err(Error::ChatTemplate(message)), _, Some(Value::String(want))) => {
                assert_eq!(message, want, "{name}, {label}: the template's own message");
                refused += 1;
            }
            (ours, _, _) => panic!("{name}, {label}: edgellm gave {ours:?}, transformers {want}"),
        }
    }
    eprintln!("chat templates: {same} renders identical to transformers', {refused} refusals with the same message");
    assert!(same >= 70, "most of the 80 renders succeed ({same})");
    assert!(refused >= 1, "some templates refuse a conversation (Gemma's system role, Mixtral's alternation)");
}
