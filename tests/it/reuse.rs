//! KV kept between requests: a request that continues an earlier one's sequence reuses the KV
//! of their common prefix, in every decoding mode and both KV layouts, and its greedy ids are
//! the ones a fresh request gives (near-tie rule: ONNX Runtime's CPU kernels are not
//! batch-invariant, and a prefill split at the reused prefix is a different batch).

use edgellm::engine::{CancelToken, Engine, GenerateOptions, KvLayout, LoadOptions, Outcome, Prompt, PromptCache};
use edgellm::model::ModelFolder;
use edgellm::multitoken::Mode;
use edgellm::speculative::lookup::LookupSettings;

use crate::kit::fixtures::{model_dir, references, runtime, same_or_near_tie};
use crate::kit::generate::{greedy, with_eos};

const NEW_TOKENS: usize = 24;

fn run(engine: &Engine, ids: &[u32], options: &GenerateOptions, cache: Option<PromptCache>) -> (Outcome, Option<PromptCache>) {
    engine.generate_cached(&Prompt::Tokens(ids.to_vec()), options, &CancelToken::new(), &mut |_| true, cache).unwrap()
}

/// Three turns of a conversation, each prompt the previous prompt and answer plus the next
/// reference prompt, run with the KV kept from turn to turn and afresh; then a prompt that
/// shares only part of the kept tokens (the cache is cut back). Returns the turns whose ids were
/// identical and how many prompt tokens were reused in all. `near_tie_rule`: a difference must
/// follow a near tie of the model alone (not for multi-token trust mode, whose output is not the
/// base's alone: there a flipped near tie moves a step boundary and everything after it).
fn conversation(engine: &mut Engine, options: &GenerateOptions, what: &str, near_tie_rule: bool) -> (usize, usize) {
    let refs = references();
    let cases = &refs.models["kjv-target"];
    let mut prompt: Vec<u32> = Vec::new();
    let mut cache: Option<PromptCache> = None;
    let (mut identical, mut reused_total) = (0, 0);
    for (turn, case) in cases.iter().take(3).enumerate() {
        prompt.extend_from_slice(&case.prompt_ids);
        let held = cache.as_ref().map_or(0, PromptCache::len);
        let (kept, left) = run(engine, &prompt, options, cache.take());
        let (fresh, _) = run(engine, &prompt, options, None);
        // Every kept token continues this prompt, so all are reused, less the last prompt position.
        assert_eq!(kept.stats.cached_prompt_tokens, held.min(prompt.len() - 1), "{what}: turn {turn} reuses what the cache held");
        assert_eq!(fresh.stats.cached_prompt_tokens, 0);
        if turn > 0 {
            assert!(kept.stats.cached_prompt_tokens > 0, "{what}: turn {turn} reused nothing");
        }
        reused_total += kept.stats.cached_prompt_tokens;
        if same(engine, &format!("{what} turn {turn}"), &prompt, &kept, &fresh, near_tie_rule) {
            identical += 1;
        }
        prompt.extend_from_slice(&kept.token_ids);
        cache = left;
    }
    // A prompt that departs from the kept tokens part way: only the common part is reused.
    let cache = cache.expect("a cache is left");
    let common = cases[0].prompt_ids.len() + 2;
    let mut departing = prompt[..common].to_vec();
    departing.extend_from_slice(&cases[3].prompt_ids);
    let (kept, _) = run(engine, &departing, options, Some(cache));
    let (fresh, _) = run(engine, &departing, options, None);
    assert_eq!(kept.stats.cached_prompt_tokens, common, "{what}: the common prefix of a departing prompt");
    if same(engine, &format!("{what} departing"), &departing, &kept, &fresh, near_tie_rule) {
        identical += 1;
    }
    (identical, reused_total)
}

fn same(engine: &mut Engine, label: &str, prompt: &[u32], kept: &Outcome, fresh: &Outcome, near_tie_rule: bool) -> bool {
    if near_tie_rule {
        same_or_near_tie(engine, label, prompt, &with_eos(kept), &with_eos(fresh), label)
    } else {
        with_eos(kept) == with_eos(fresh)
    }
}

fn target(layout: KvLayout) -> Engine {
    let options = LoadOptions { kv_layout: Some(layout), ..Default::default() };
    Engine::load(&runtime(), "kjv", &model_dir("kjv-target"), &options).unwrap()
}

#[test]
fn plain_decoding_reuses_the_kv_in_both_layouts() {
    for layout in [KvLayout::Shared, KvLayout::Growing] {
        let mut engine = target(layout);
        let (identical, reused) = conversation(&mut engine, &greedy(NEW_TOKENS), &format!("plain {layout:?}"), true);
        eprintln!("plain {layout:?}: {identical}/4 identical, {reused} prompt tokens reused");
        assert!(identical >= 3, "plain {layout:?}: only {identical} of 4 identical");
    }
}

#[test]
fn speculative_decoding_reuses_the_target_and_draft_kv() {
    for layout in [KvLayout::Shared, KvLayout::Growing] {
        let options = LoadOptions { kv_layout: Some(layout), ..Default::default() };
        let mut engine = target(layout);
        let draft = ModelFolder::open(&model_dir("kjv-draft")).unwrap();
        engine.attach_draft(&runtime(), &draft, &options, Default::default()).unwrap();
        let (identical, _) = conversation(&mut engine, &greedy(NEW_TOKENS), &format!("speculative {layout:?}"), true);
        assert!(identical >= 3, "speculative {layout:?}: only {identical} of 4 identical");
    }
}

#[test]
fn prompt_lookup_reuses_the_kv() {
    let mut engine = target(KvLayout::Shared);
    engine.enable_prompt_lookup(LookupSettings::default()).unwrap();
    let (identical, _) = conversation(&mut engine, &greedy(NEW_TOKENS), "prompt lookup", true);
    assert!(identical >= 3, "prompt lookup: only {identical} of 4 identical");
}

#[test]
fn multitoken_trust_and_verify_reuse_the_base_kv() {
    let mut engine = Engine::load(&runtime(), "kjv-hamburger", &model_dir("kjv-hamburger"), &LoadOptions::default()).unwrap();
    for mode in [Mode::Verify, Mode::Trust] {
        let options = GenerateOptions { multitoken_mode: Some(mode), ..greedy(NEW_TOKENS) };
        let (identical, reused) = conversation(&mut engine, &options, &format!("multitoken {mode:?}"), mode == Mode::Verify);
        eprintln!("multitoken {mode:?}: {identical}/4 identical, {reused} reused");
        assert!(identical >= 3, "multitoken {mode:?}: only {identical} of 4 identical");
    }
}

#[test]
fn a_kept_cache_is_not_fed_to_another_engine() {
    let first = target(KvLayout::Shared);
    let second = target(KvLayout::Shared);
    let prompt = &references().models["kjv-target"][0].prompt_ids;
    let (_, left) = run(&first, prompt, &greedy(NEW_TOKENS), None);
    let mut longer = prompt.clone();
    longer.push(prompt[0]);
    let (out, _) = run(&second, &longer, &greedy(NEW_TOKENS), left);
    assert_eq!(out.stats.cached_prompt_tokens, 0, "another engine's sessions made that cache");
}

#[test]
fn recurrent_states_are_reused_when_extended_and_dropped_when_the_prompt_departs() {
    let (dir, _keep) = crate::layouts::folder("tiny-random-lfm2-fp32", None);
    let engine = Engine::load(&runtime(), "lfm2", &dir, &LoadOptions::default()).unwrap();
    let options = greedy(8);
    let prompt: Vec<u32> = vec![0, 0, 195, 731, 12, 77];
    let (first, left) = run(&engine, &prompt, &options, None);
    let left = left.expect("a cache is left");
    let mut extended = prompt.clone();
    extended.extend(&first.token_ids);
    extended.extend([5, 6, 7]);
    let held = left.len();
    let (kept, left) = run(&engine, &extended, &options, Some(left));
    let (fresh, _) = run(&engine, &extended, &options, None);
    assert_eq!(kept.stats.cached_prompt_tokens, held);
    assert_eq!(with_eos(&kept), with_eos(&fresh), "an extended prompt on kept convolution states");
    // A departing prompt would need the convolution state rolled back: the cache is not used.
    let (departed, _) = run(&engine, &[0, 0, 9, 9], &options, left);
    assert_eq!(departed.stats.cached_prompt_tokens, 0);
    let (fresh, _) = run(&engine, &[0, 0, 9, 9], &options, None);
    assert_eq!(with_eos(&departed), with_eos(&fresh));
}

mod over_dbus {
    use std::time::{Duration, Instant};

    use edgellm::service::client::Daemon1Proxy;
    use zbus::zvariant::Value;

    use crate::kit::bus::{complete, greedy_options, rt, Daemon};
    use crate::kit::fixtures::references;

    /// A greedy turn on `kjv`, in `session` if given; its text and how many prompt tokens it reused.
    async fn turn(proxy: &Daemon1Proxy<'_>, prompt: &str, session: Option<&str>) -> Result<(String, u32), String> {
        let mut options = greedy_options(24);
        if let Some(path) = session {
            options.insert("session", Value::ObjectPath(path.try_into().unwrap()));
        }
        let done = complete(proxy, "kjv", prompt, options).await?;
        let reused = done.cached_prompt_tokens();
        Ok((done.text, reused))
    }

    async fn kv_caches(proxy: &Daemon1Proxy<'_>) -> (u32, f64) {
        let status = proxy.status().await.unwrap();
        (u32::try_from(&status["kv_caches"]).unwrap(), f64::try_from(&status["kv_cache_mib"]).unwrap())
    }

    /// Polls `Status` until `kv_caches` is `want` (a client's leaving reaches the daemon as a
    /// bus signal, a moment later).
    async fn wait_for_caches(proxy: &Daemon1Proxy<'_>, want: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while kv_caches(proxy).await.0 != want {
            assert!(Instant::now() < deadline, "kv_caches stayed at {} (want {want})", kv_caches(proxy).await.0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn reuse_is_per_connection_sessions_are_the_callers_and_leaving_frees_them() {
        let daemon = Daemon::start("");
        let case = &references().models["kjv-target"][0];
        rt().block_on(async {
            let (a_conn, b_conn, watcher_conn) = (daemon.connect().await, daemon.connect().await, daemon.connect().await);
            let a = Daemon1Proxy::new(&a_conn).await.unwrap();
            let b = Daemon1Proxy::new(&b_conn).await.unwrap();
            let watcher = Daemon1Proxy::new(&watcher_conn).await.unwrap();
            let (first, cached) = turn(&a, &case.prompt, None).await.unwrap();
            assert_eq!(cached, 0);
            // The next turn continues the first: its prompt and answer are reused on A's connection.
            let next = format!("{}{first} And the", case.prompt);
            let (a_text, a_cached) = turn(&a, &next, None).await.unwrap();
            assert!(a_cached as usize > case.prompt_ids.len(), "A reused its own history: {a_cached}");
            // Another connection with the same prompt reuses nothing, and gets the same text.
            let (b_text, b_cached) = turn(&b, &next, None).await.unwrap();
            assert_eq!(b_cached, 0, "a second connection never gets the first one's KV");
            assert_eq!(a_text, b_text, "reuse gives the text a fresh prefill gives");

            // A session starts apart from the connection's cache, and keeps its own.
            let session = a.create_session("kjv").await.unwrap();
            let path = session.as_str();
            assert_eq!(turn(&a, &next, Some(path)).await.unwrap().1, 0, "a new session holds nothing yet");
            let (_, again) = turn(&a, &next, Some(path)).await.unwrap();
            assert!(again > 0, "the session reused its own request");
            // Only its owner may use or close it.
            let e = turn(&b, &next, Some(path)).await.unwrap_err();
            assert!(e.contains("org.edgellm.Error.AccessDenied"), "{e}");
            let e = b.close_session(&session.as_ref()).await.unwrap_err().to_string();
            assert!(e.contains("org.edgellm.Error.AccessDenied"), "{e}");
            let e = a.create_session("no-such-model").await.unwrap_err().to_string();
            assert!(e.contains("org.edgellm.Error.ModelNotFound"), "{e}");
            let draft_session = a.create_session("kjv-draft").await.unwrap();
            let e = turn(&a, &next, Some(draft_session.as_str())).await.unwrap_err();
            assert!(e.contains("InvalidArgument") && e.contains("kjv-draft"), "a session of another model: {e}");
            // A's connection cache, its session's and B's.
            assert_eq!(kv_caches(&watcher).await.0, 3);
            a.close_session(&session.as_ref()).await.unwrap();
            assert_eq!(kv_caches(&watcher).await.0, 2, "closing the session freed its KV");
            let e = turn(&a, &next, Some(path)).await.unwrap_err();
            assert!(e.contains("InvalidArgument") && e.contains("not an open session"), "{e}");
            // Leaving the bus frees the rest of A's.
            drop(a);
            drop(a_conn);
            wait_for_caches(&watcher, 1).await;
            drop(b);
            drop(b_conn);
            wait_for_caches(&watcher, 0).await;
        });
    }

    #[test]
    fn kept_kv_stays_within_kv_cache_mib_least_recently_used_first_and_goes_when_idle() {
        let daemon = Daemon::start("\n[limits]\nkv_cache_mib = 1\nkv_cache_idle_s = 2\n");
        let cases = &references().models["kjv-target"];
        rt().block_on(async {
            let (a_conn, b_conn) = (daemon.connect().await, daemon.connect().await);
            let a = Daemon1Proxy::new(&a_conn).await.unwrap();
            let b = Daemon1Proxy::new(&b_conn).await.unwrap();
            // Prompts of about 110 tokens: with 24 new ones, a cache of 0.8-0.9 MiB.
            let mut prompts = Vec::new();
            for start in [0, 5] {
                let mut prompt = String::new();
                for case in cases.iter().cycle().skip(start) {
                    if a.tokenize("kjv", &prompt).await.unwrap().len() >= 110 {
                        break;
                    }
                    prompt.push(' ');
                    prompt.push_str(&case.prompt);
                }
                prompts.push(prompt);
            }
            let (a_prompt, b_prompt) = (prompts[0].clone(), prompts[1].clone());
            let (a_first, _) = turn(&a, &a_prompt, None).await.unwrap();
            let (count, a_mib) = kv_caches(&a).await;
            assert_eq!(count, 1);
            let (b_first, _) = turn(&b, &b_prompt, None).await.unwrap();
            let (count, b_mib) = kv_caches(&a).await;
            assert!(a_mib > 0.5 && b_mib > 0.5, "the test needs caches of over half the bound: {a_mib:.2} and {b_mib:.2} MiB");
            assert_eq!(count, 1, "B's cache evicted A's, the least recently used");
            assert!(b_mib <= 1.0);
            // A's next turn is prefilled afresh (and still served); B's reuses its cache.
            assert_eq!(turn(&a, &format!("{a_prompt}{a_first} And"), None).await.unwrap().1, 0);
            assert_eq!(kv_caches(&a).await.0, 1, "A's new cache in turn evicted B's");
            assert_eq!(turn(&b, &format!("{b_prompt}{b_first} And"), None).await.unwrap().1, 0, "B's was evicted by A's");
            // Unused for kv_cache_idle_s, kept KV is freed.
            let idle_from = Instant::now();
            wait_for_caches(&a, 0).await;
            assert!(idle_from.elapsed() >= Duration::from_millis(1500), "freed before it was idle for 2 s");
        });
    }
}
