//! A model folder in onnxruntime-genai's layout: `genai_config.json`, the decoder graph with its
//! external data, `tokenizer.json`, and a chat template in `tokenizer_config.json` or
//! `chat_template.jinja`.

pub mod chat;
pub mod files;
pub mod genai_config;
pub mod grammar;
mod jinja_builtins;
pub mod multitoken_contract;
pub mod tokenizer;

use std::path::{Path, PathBuf};

pub use chat::{ChatMessage, ChatTemplate};
pub(crate) use files::require_model_file;
pub use genai_config::{DecoderNames, GenaiConfig, SearchDefaults};
pub use tokenizer::{Detokenizer, TextTokenizer};

use crate::error::{Error, Result};

/// What a request asks the model to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    /// (role, content) messages, rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
    Tokens(Vec<u32>),
}

#[derive(Debug)]
pub struct ModelFolder {
    pub dir: PathBuf,
    pub config: GenaiConfig,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// A HAMburger-style multi-token model's contract (`multitoken_config.json`), if present.
    pub multitoken: Option<multitoken_contract::Contract>,
    /// Compiles structured-output constraints against this tokenizer.
    grammar: grammar::GrammarCompiler,
}

impl ModelFolder {
    /// Reads and checks everything but the weights: a missing file is named before ONNX Runtime
    /// gets to it, so the user sees which file to fetch again.
    pub fn open(dir: &Path) -> Result<ModelFolder> {
        if !dir.is_dir() {
            return Err(Error::ModelFile { path: dir.to_path_buf(), reason: "not a directory".into() });
        }
        let config = GenaiConfig::load(dir)?;
        require_model_file(&dir.join(&config.decoder_file))?;
        let multitoken = multitoken_contract::Contract::find(dir)?;
        let tokenizer = TextTokenizer::load(&dir.join("tokenizer.json"))?;
        let chat_template = ChatTemplate::find(dir)?;
        Ok(ModelFolder { dir: dir.to_path_buf(), config, tokenizer, chat_template, multitoken, grammar: Default::default() })
    }

    /// Prompt token ids (through the chat template for messages), checked to leave room for at
    /// least one new token: too long a prompt is an error before any work, never a truncation.
    pub fn prompt_ids(&self, model_name: &str, prompt: &Prompt) -> Result<Vec<u32>> {
        let argument = if matches!(prompt, Prompt::Tokens(_)) { "prompt_ids" } else { "prompt" };
        let ids = match prompt {
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Text(text) => self.tokenizer.encode_prompt(text)?,
            Prompt::Chat(messages) => {
                let template = self.chat_template.as_ref().ok_or_else(|| Error::NoChatTemplate(model_name.to_string()))?;
                self.tokenizer.encode_rendered(&template.render(messages, true)?)?
            }
        };
        if ids.is_empty() {
            return Err(Error::InvalidArgument { argument: argument.into(), reason: "is empty".into() });
        }
        if ids.len() >= self.config.context_length {
            return Err(Error::PromptTooLong { tokens: ids.len(), context: self.config.context_length });
        }
        self.check_vocabulary(argument, &ids)?;
        Ok(ids)
    }

    /// Every id names a row of the model's logits (`model.vocab_size` of genai_config).
    pub fn check_vocabulary(&self, argument: &str, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            Some(&bad) => Err(Error::InvalidArgument {
                argument: argument.into(),
                reason: format!("token id {bad} is outside the vocabulary (0..{})", self.config.vocab_size),
            }),
            None => Ok(()),
        }
    }

    /// A matcher of `grammar` over this model's tokens; a grammar llguidance rejects is
    /// `InvalidArgument` naming the option.
    pub fn output_matcher(&self, grammar: &grammar::OutputGrammar) -> Result<llguidance::Matcher> {
        self.grammar.matcher(grammar, &self.dir.join("tokenizer.json"), &self.config.eos_token_ids, self.config.vocab_size)
    }

    pub fn decoder_path(&self) -> PathBuf {
        self.dir.join(&self.config.decoder_file)
    }
}
