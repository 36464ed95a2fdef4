//! KV kept from one request for the next of the same caller: the tokens a finished request's
//! caches hold, and the caches. The next request reuses the longest common prefix of its prompt
//! with those tokens and prefills only the rest. Who may reuse what is the caller's business
//! (the scheduler keeps one per client and model); this only knows tokens and caches.

use super::decoder::KvCache;
use super::graph::KvStates;

/// The KV a finished request left, and the tokens it holds.
pub struct PromptCache {
    /// The engine that made it: its caches are fed back to that engine's sessions only.
    pub(crate) engine: u64,
    /// The tokens of the positions the target's cache holds (the draft's holds a prefix of them).
    pub(crate) tokens: Vec<u32>,
    pub(crate) kv: CachedKv,
}

pub(crate) enum CachedKv {
    /// A decoder's cache and, where a draft model ran, the draft's.
    Decoder { target: KvCache, draft: Option<KvCache> },
    /// A multi-token model's base, one entry per token (merged steps are not kept).
    Base(KvStates),
}

impl PromptCache {
    /// Positions it holds.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Memory it holds, in bytes.
    pub fn bytes(&self) -> usize {
        match &self.kv {
            CachedKv::Decoder { target, draft } => target.bytes() + draft.as_ref().map_or(0, KvCache::bytes),
            CachedKv::Base(kv) => kv.bytes(),
        }
    }
}

/// How many positions of a cache holding `cached` a request for `prompt` can keep: their common
/// prefix, less one, since the prompt's last position must run to give the first token's logits.
pub(crate) fn reusable_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    let common = cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    common.min(prompt.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::reusable_prefix;

    #[test]
    fn keeps_the_common_prefix_but_not_the_last_prompt_position() {
        assert_eq!(reusable_prefix(&[1, 2, 3, 4], &[1, 2, 3, 9, 9]), 3);
        assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3]), 2, "the whole prompt cached: its last position runs again");
        assert_eq!(reusable_prefix(&[1, 2], &[1, 2, 3, 4]), 2);
        assert_eq!(reusable_prefix(&[5, 2], &[1, 2, 3]), 0);
        assert_eq!(reusable_prefix(&[], &[1]), 0);
    }
}
