//! Requests to the engine: the options most tests ask for, and the ids a request gave as
//! onnxruntime-genai reports them.

use edgellm::engine::{GenerateOptions, Outcome};

/// Greedy decoding of at most `max_new_tokens` tokens.
pub fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: Some(max_new_tokens), temperature: Some(0.0), ..Default::default() }
}

/// Sampling at temperature 1 from `seed`, at most `max_new_tokens` tokens.
pub fn sampled(max_new_tokens: usize, seed: u64) -> GenerateOptions {
    GenerateOptions { max_new_tokens: Some(max_new_tokens), temperature: Some(1.0), seed: Some(seed), ..Default::default() }
}

/// The ids as onnxruntime-genai reports them: it appends the end-of-sequence token it stopped on.
pub fn with_eos(outcome: &Outcome) -> Vec<u32> {
    outcome.token_ids.iter().copied().chain(outcome.eos_token).collect()
}
