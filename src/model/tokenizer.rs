//! `tokenizer.json` through the `tokenizers` crate, and incremental detokenization for streaming.

use std::path::Path;

use crate::error::{Error, Result};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// One more than the largest id it knows, added tokens included.
    id_bound: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextTokenizer")
    }
}

impl TextTokenizer {
    pub fn load(path: &Path) -> Result<TextTokenizer> {
        if !path.exists() {
            return Err(Error::ModelFile { path: path.to_path_buf(), reason: "missing".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::ModelFile { path: path.to_path_buf(), reason: format!("not a valid tokenizer.json: {e}") })?;
        let id_bound = inner.get_vocab(true).values().max().map_or(0, |&id| id + 1);
        Ok(TextTokenizer { inner, id_bound })
    }

    /// The ids it can decode are `0..id_bound()`. A model's output vocabulary may be smaller
    /// (onnxruntime-genai's tiny GPT-2: 1,000 logits, 50,257 tokens) or padded larger.
    pub fn id_bound(&self) -> u32 {
        self.id_bound
    }

    /// The ids a plain prompt is fed as: what the tokenizer's post-processor adds included (the
    /// `<s>` of Llama-family tokenizers), as transformers encodes text with
    /// `add_special_tokens=True`.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, true)
    }

    /// The ids of text a chat template rendered: nothing added, since a template that wants a BOS
    /// writes it itself (transformers' `apply_chat_template` encodes the same way). Special tokens
    /// written in the text (`<|im_start|>`) are still recognised.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, false)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// How many of the prompt's last tokens seed the detokenizer (text-generation-inference uses 5).
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Turns a growing list of token ids into text pieces. A piece never ends inside a UTF-8
/// character (byte-level BPE splits them across tokens), and the pieces concatenated equal
/// `decode(prompt + output)` minus `decode(prompt)`: the same offsets scheme as
/// text-generation-inference, whose offsets start inside the prompt. Starting there matters for
/// SentencePiece-style decoders, which strip the first space of a sequence: decoded alone, the
/// first generated token would lose the space that separates it from the prompt.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// A detokenizer for the output that continues `prompt`.
    pub fn continuing(prompt: &[u32]) -> Self {
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..].to_vec();
        Detokenizer { read_offset: ids.len(), ids, prefix_offset: 0 }
    }

    /// Adds one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held (an incomplete character at the end), as the full decode renders it.
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
