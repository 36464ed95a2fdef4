//! The last turn of a 4-turn chat, its client's time to the first `Token`: on the connection
//! that ran turns 1-3 (their KV kept) against a fresh connection sending the same messages, in
//! pairs whose order alternates.

use std::path::Path;

use edgellm::service::client::Daemon1Proxy;
use serde::Serialize;

use crate::dbus::{self, timed_chat};
use crate::harness::shown;
use crate::stats::Spread;

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    pub rounds: usize,
    /// The last turn's prompt, and how much of it the kept KV covered.
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    /// TTFT on the connection that ran the earlier turns.
    pub kept_ms: Spread,
    /// TTFT on a fresh connection.
    pub fresh_ms: Spread,
    /// Kept / fresh, per pair.
    pub ratio: Spread,
    pub int4_kernel: Option<String>,
}

/// Each user turn quotes a few verses: about 800 tokens of history before the last turn.
const VERSES: [&str; 4] = [
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.",
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: and God divided the light from the darkness. And God called the light Day, and the darkness he called Night.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: he leadeth me beside the still waters. He restoreth my soul: he leadeth me in the paths of righteousness for his name's sake.",
    "Blessed are the poor in spirit: for theirs is the kingdom of heaven. Blessed are they that mourn: for they shall be comforted. Blessed are the meek: for they shall inherit the earth.",
];

pub fn measure(model: &Path, rounds: usize) -> Record {
    eprintln!("chat reuse: {rounds} pairs");
    let (daemon, int4_kernel) = dbus::start(model, 0, None, None);
    let rt = dbus::rt1();
    let user = |turn: usize| format!("Read this and go on: {} {} {}", VERSES[turn % 4], VERSES[(turn + 1) % 4], VERSES[(turn + 2) % 4]);
    let (mut reused, mut fresh, cached, prompt_tokens, mut ratios) = rt.block_on(async {
        // The conversation, once: greedy, so every round replays the same turns.
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let mut history: Vec<(String, String)> = Vec::new();
        for turn in 0..3 {
            history.push(("user".into(), user(turn)));
            let (_, _, answer) = timed_chat(&proxy, &history, 64).await;
            history.push(("assistant".into(), answer));
        }
        history.push(("user".into(), user(3)));
        drop(proxy);
        drop(conn);
        let (mut reused, mut fresh, mut cached, mut prompt_tokens, mut ratios) = (Vec::new(), Vec::new(), 0u32, 0u32, Vec::new());
        for round in 0..rounds + 2 {
            let mut pair = [0.0; 2];
            for half in 0..2 {
                let with_reuse = (half == 0) == (round % 2 == 0);
                let conn = daemon.connect().await;
                let proxy = Daemon1Proxy::new(&conn).await.unwrap();
                if with_reuse {
                    for turn in 0..3 {
                        timed_chat(&proxy, &history[..turn * 2 + 1], 64).await;
                    }
                }
                let (ttft, stats, _) = timed_chat(&proxy, &history, 32).await;
                if with_reuse {
                    cached = u32::try_from(&stats["cached_prompt_tokens"]).unwrap();
                    prompt_tokens = u32::try_from(&stats["prompt_tokens"]).unwrap();
                }
                pair[usize::from(!with_reuse)] = ttft;
            }
            // The first two rounds warm up.
            if round >= 2 {
                reused.push(pair[0]);
                fresh.push(pair[1]);
                ratios.push(pair[0] / pair[1]);
            }
        }
        (reused, fresh, cached, prompt_tokens, ratios)
    });
    drop(daemon);
    Record {
        model: shown(model),
        rounds,
        prompt_tokens,
        cached_prompt_tokens: cached,
        kept_ms: Spread::of(&mut reused),
        fresh_ms: Spread::of(&mut fresh),
        ratio: Spread::of(&mut ratios),
        int4_kernel,
    }
}
