//! The KV that finished requests leave, kept for the next request with the same key on the same
//! model: a client's connection or one of its sessions. Bounded in bytes over all keys and
//! models (least recently used goes first) and in idle time. A key belongs to one owner (the
//! client's opaque id) and is never looked up for another, so no client can learn anything from
//! another's cache timing.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::engine::PromptCache;

/// Whose cache a request uses: `owner` is the client; `name` tells its caches apart (the client
/// itself, or a session it opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub owner: String,
    pub name: String,
}

impl CacheKey {
    /// The cache of a client's connection.
    pub fn connection(client: &str) -> CacheKey {
        CacheKey { owner: client.to_string(), name: client.to_string() }
    }
}

struct Entry {
    key: CacheKey,
    model: String,
    cache: PromptCache,
    bytes: usize,
    used: Instant,
}

/// Owners forgotten recently: a request of theirs still running when they left must not keep
/// its cache when it ends (bus names are not reused, so a short memory does).
const GONE_REMEMBERED: usize = 1024;

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    gone: std::collections::VecDeque<String>,
    stopped: bool,
}

#[derive(Default)]
pub(super) struct KvStore {
    state: Mutex<State>,
    wake: Condvar,
}

impl KvStore {
    /// The cache kept for `key` on `model`, taken out while its request runs.
    pub(super) fn take(&self, key: &CacheKey, model: &str) -> Option<PromptCache> {
        let mut state = self.state.lock().expect("kv store");
        let at = state.entries.iter().position(|e| e.key == *key && e.model == model)?;
        Some(state.entries.swap_remove(at).cache)
    }

    /// Keeps `cache` for `key` on `model` within `max_bytes` in all, evicting the least recently
    /// used first. A cache larger than the whole bound is not kept.
    pub(super) fn put(&self, key: CacheKey, model: &str, cache: PromptCache, max_bytes: usize) {
        let bytes = cache.bytes();
        let mut state = self.state.lock().expect("kv store");
        state.entries.retain(|e| !(e.key == key && e.model == model));
        if bytes > max_bytes || cache.is_empty() || state.gone.contains(&key.owner) {
            return;
        }
        let mut evicted = 0;
        while state.entries.iter().map(|e| e.bytes).sum::<usize>() + bytes > max_bytes {
            let oldest = (0..state.entries.len()).min_by_key(|&i| state.entries[i].used).expect("over the bound means an entry");
            state.entries.swap_remove(oldest);
            evicted += 1;
        }
        if evicted > 0 {
            tracing::debug!(evicted, "kept KV evicted for `limits.kv_cache_mib`");
        }
        state.entries.push(Entry { key, model: model.to_string(), cache, bytes, used: Instant::now() });
    }

    /// Frees every cache of `owner` (it left the bus).
    pub(super) fn forget_owner(&self, owner: &str) {
        let mut state = self.state.lock().expect("kv store");
        state.entries.retain(|e| e.key.owner != owner);
        if state.gone.len() == GONE_REMEMBERED {
            state.gone.pop_front();
        }
        state.gone.push_back(owner.to_string());
    }

    /// Frees the caches of `key` on every model (a closed session).
    pub(super) fn forget(&self, key: &CacheKey) {
        self.state.lock().expect("kv store").entries.retain(|e| e.key != *key);
    }

    /// Frees the caches of `model` (it was unloaded: no later engine can use them, and they held
    /// the memory `UnloadModel` is asked to return).
    pub(super) fn forget_model(&self, model: &str) -> usize {
        let mut state = self.state.lock().expect("kv store");
        let before = state.entries.len();
        state.entries.retain(|e| e.model != model);
        before - state.entries.len()
    }

    /// Frees everything (memory is needed for a model load).
    pub(super) fn clear(&self) -> usize {
        let mut state = self.state.lock().expect("kv store");
        let bytes = state.entries.iter().map(|e| e.bytes).sum();
        state.entries.clear();
        bytes
    }

    /// Bytes kept, and how many caches.
    pub(super) fn usage(&self) -> (usize, usize) {
        let state = self.state.lock().expect("kv store");
        (state.entries.iter().map(|e| e.bytes).sum(), state.entries.len())
    }

    /// Until `stop`: frees caches unused for `idle()` (read each round: a reload may change it).
    pub(super) fn sweep_until_stopped(&self, idle: impl Fn() -> Duration) {
        let mut state = self.state.lock().expect("kv store");
        while !state.stopped {
            let idle = idle();
            state.entries.retain(|e| e.used.elapsed() < idle);
            // Until the next entry goes idle (a reload that changes the limit wakes it early).
            let next = state.entries.iter().map(|e| idle.saturating_sub(e.used.elapsed())).min().unwrap_or(idle);
            state = self.wake.wait_timeout(state, next.max(Duration::from_millis(10))).expect("kv store").0;
        }
    }

    /// The limits changed: the sweeper looks again.
    pub(super) fn limits_changed(&self) {
        self.wake.notify_all();
    }

    pub(super) fn stop(&self) {
        self.state.lock().expect("kv store").stopped = true;
        self.wake.notify_all();
    }
}
