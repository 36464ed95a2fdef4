//! Structured output: the grammar a request's output must match (`json_schema` or `grammar`),
//! compiled by llguidance against the model's own tokenizer (its `tokenizer.json`, read by
//! llguidance's Hugging Face bridge into a token trie). One parser factory per model, built on
//! the first constrained request.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};

use crate::error::{Error, Result};

/// What a request's output must match, as the caller gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputGrammar {
    /// A JSON Schema document.
    JsonSchema(String),
    /// A Lark grammar, as llguidance takes it.
    Lark(String),
}

impl OutputGrammar {
    /// The request option it came from, for errors.
    pub fn option(&self) -> &'static str {
        match self {
            OutputGrammar::JsonSchema(_) => "json_schema",
            OutputGrammar::Lark(_) => "grammar",
        }
    }
}

/// A model's llguidance parser factory, made once.
#[derive(Default)]
pub struct GrammarCompiler {
    factory: OnceLock<std::result::Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarCompiler")
    }
}

impl GrammarCompiler {
    fn factory(&self, tokenizer_json: &std::path::Path, eos_ids: &[u32], vocab_size: usize) -> Result<Arc<ParserFactory>> {
        self.factory
            .get_or_init(|| {
                let shown = |e: &dyn std::fmt::Display| format!("{}: {e:#}", tokenizer_json.display());
                let mut tokenizer = toktrie_hf_tokenizers::ByteTokenizer::from_file(tokenizer_json).map_err(|e| shown(&e))?;
                if !eos_ids.is_empty() {
                    tokenizer.set_eos_tokens(eos_ids);
                }
                // The trie is as wide as the model's logits (the vocabulary may be padded).
                let env = tokenizer.into_tok_env(Some(vocab_size)).map_err(|e| shown(&e))?;
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| shown(&e))?;
                factory.quiet();
                Ok(Arc::new(factory))
            })
            .clone()
            .map_err(|reason| Error::InvalidArgument {
                argument: "json_schema/grammar".into(),
                reason: format!("this model's tokenizer cannot take constraints: {reason}"),
            })
    }

    /// A fresh matcher of `grammar`; a grammar or schema llguidance rejects is `InvalidArgument`
    /// with its message.
    pub fn matcher(
        &self,
        grammar: &OutputGrammar,
        tokenizer_json: &std::path::Path,
        eos_ids: &[u32],
        vocab_size: usize,
    ) -> Result<Matcher> {
        let factory = self.factory(tokenizer_json, eos_ids, vocab_size)?;
        // llguidance compiles recursively: a chain of a thousand rules or `$ref`s overflows an
        // ordinary thread's stack and aborts the process. The caller's text is at most 64 KiB
        // (`service::options`), and on a stack this size the deepest such chain compiles; the
        // stack is address space, touched only as deep as a grammar goes.
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("grammar".into())
                .stack_size(COMPILE_STACK_BYTES)
                .spawn_scoped(scope, || compile(&factory, grammar))
                .map_err(|e| Error::Inference(format!("cannot start the grammar compiler's thread: {e}")))?
                .join()
                .unwrap_or_else(|_| Err(Error::InvalidArgument { argument: grammar.option().into(), reason: "llguidance failed on it".into() }))
        })
    }
}

/// The stack the grammar compiler runs on.
const COMPILE_STACK_BYTES: usize = 256 << 20;

fn compile(factory: &ParserFactory, grammar: &OutputGrammar) -> Result<Matcher> {
    let invalid = |reason: String| Error::InvalidArgument { argument: grammar.option().into(), reason };
    let top = match grammar {
        OutputGrammar::JsonSchema(text) => {
            let mut schema: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(format!("is not JSON: {e}")))?;
            // JSON as Python's json.dumps writes it, with no whitespace of the model's own
            // choosing (llguidance's default lets a model emit blank lines forever); a schema's
            // own `x-guidance` options choose otherwise.
            if let Some(object) = schema.as_object_mut().filter(|o| !o.contains_key("x-guidance")) {
                object.insert(
                    "x-guidance".into(),
                    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
                );
            }
            TopLevelGrammar::from_json_schema(schema)
        }
        OutputGrammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
    };
    let matcher = Matcher::new(factory.create_parser(top));
    match matcher.get_error() {
        Some(e) => Err(invalid(format!("llguidance rejects it: {e}"))),
        None => Ok(matcher),
    }
}
