//! Prompt lookup (n-gram) drafting, as onnxruntime-genai (`speculative.ngram_size`), OpenVINO
//! GenAI (`prompt_lookup`) and llama.cpp (`--spec-type ngram-*`) have it: the last `ngram`
//! tokens are looked up in the prompt and the output so far, and what followed their latest
//! earlier occurrence is proposed. It needs no draft model, and its drafts cost no forward.
//! How long its drafts are, and its back-off when they keep failing, are decided in
//! `crate::decode::draft_length`.

use crate::decode::draft_length::{AdaptiveK, BackOff};
use crate::decode::proposer::{Proposal, Proposer};
use crate::decode::target::RowState;
use crate::decode::run::Run;
use crate::error::Result;

/// `[[model]] prompt_lookup_ngram` and `prompt_lookup_max_draft`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupSettings {
    pub ngram: usize,
    pub max_draft: usize,
}

impl Default for LookupSettings {
    fn default() -> Self {
        LookupSettings { ngram: 3, max_draft: 8 }
    }
}

pub struct PromptLookup {
    settings: LookupSettings,
    length: AdaptiveK,
    back_off: BackOff,
}

impl PromptLookup {
    pub fn new(settings: LookupSettings) -> PromptLookup {
        PromptLookup { settings, length: AdaptiveK::new(1, settings.max_draft), back_off: BackOff::new() }
    }
}

/// What followed the latest earlier occurrence of the last `ngram` tokens of `sequence`, at most
/// `k` tokens (none when they do not occur before).
pub fn lookup(sequence: &[u32], ngram: usize, k: usize) -> &[u32] {
    let len = sequence.len();
    if k == 0 || len <= ngram {
        return &[];
    }
    let tail = &sequence[len - ngram..];
    // Latest first: the most recent context is the likeliest to be repeated.
    (0..len - ngram)
        .rev()
        .find(|&start| &sequence[start..start + ngram] == tail)
        .map(|start| {
            let from = start + ngram;
            &sequence[from..(from + k).min(len)]
        })
        .unwrap_or(&[])
}

impl Proposer for PromptLookup {
    fn propose(&mut self, run: &mut Run, _row: Option<RowState<'_>>, limit: usize) -> Result<Proposal> {
        if self.back_off.pausing() {
            return Ok(Proposal::default());
        }
        let tokens = lookup(&run.sequence, self.settings.ngram, self.length.now(limit)).to_vec();
        Ok(Proposal { tokens, q_rows: Vec::new() })
    }

    fn accepted(&mut self, _len: usize, proposed: usize, accepted: usize) -> Result<()> {
        self.length.update(proposed, accepted);
        self.back_off.update(proposed, accepted);
        Ok(())
    }

    fn max_tokens(&self) -> usize {
        self.settings.max_draft
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposes_what_followed_the_latest_earlier_occurrence() {
        // "a b c d e a b c" -> after "a b c": "d e a" (k = 3), from the occurrence at 0.
        let s = [1, 2, 3, 4, 5, 1, 2, 3];
        assert_eq!(lookup(&s, 3, 3), &[4, 5, 1]);
        // The latest occurrence wins: "x y" follows the second "1 2".
        let s = [1, 2, 7, 1, 2, 8, 9, 1, 2];
        assert_eq!(lookup(&s, 2, 2), &[8, 9]);
        // Bounded by what the sequence holds.
        let s = [1, 2, 3, 1, 2];
        assert_eq!(lookup(&s, 2, 8), &[3, 1, 2]);
        // No earlier occurrence, or too short a sequence.
        assert!(lookup(&[1, 2, 3, 4], 2, 4).is_empty());
        assert!(lookup(&[1, 2], 3, 4).is_empty());
    }
}
