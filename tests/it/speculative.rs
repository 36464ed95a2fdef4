//! Speculative decoding on the committed pair: lossless when greedy, the target's law when sampled.

use edgellm::engine::{CancelToken, Engine, GenerateOptions, KvLayout, LoadOptions, Prompt};
use edgellm::model::ModelFolder;
use edgellm::speculative::Settings;

use crate::fixtures::{model_dir, references, runtime};

fn pair(draft: &str, layout: KvLayout, max_tokens: usize) -> Engine {
    let options = LoadOptions { kv_layout: Some(layout), ..Default::default() };
    let mut engine = Engine::load(&runtime(), "kjv", &model_dir("kjv-target"), &options).unwrap();
    let folder = ModelFolder::open(&model_dir(draft)).unwrap();
    engine.attach_draft(&runtime(), &folder, &options, Settings { min_tokens: 1, max_tokens, min_confidence: 0.0 }).unwrap();
    engine
}

fn greedy_lossless(layout: KvLayout) {
    let refs = references();
    let mut engine = pair("kjv-draft", layout, 6);
    let mut per_round = [0usize; 17];
    let (mut proposed, mut accepted) = (0, 0);
    let (mut identical, mut near_ties) = (0, 0);
    for case in &refs.models["kjv-target"] {
        let options = GenerateOptions { max_new_tokens: Some(refs.new_tokens), temperature: Some(0.0), ..Default::default() };
        let mut streamed = String::new();
        let out = engine
            .generate(&Prompt::Tokens(case.prompt_ids.clone()), &options, &CancelToken::new(), &mut |p| {
                streamed.push_str(p);
                true
            })
            .unwrap();
        let mut ids = out.token_ids.clone();
        ids.extend(out.eos_token);
        assert_eq!(streamed, out.text);
        if crate::fixtures::same_or_near_tie(&mut engine, &case.prompt, &case.prompt_ids, &ids, &case.output_ids, "speculative greedy") {
            identical += 1;
        } else {
            near_ties += 1;
        }
        let spec = out.stats.speculative.expect("speculative stats");
        for (i, n) in spec.accepted_per_round.iter().enumerate() {
            per_round[i] += n;
        }
        proposed += spec.draft_tokens;
        accepted += spec.accepted_tokens;
        assert!(out.stats.target_forwards < ids.len() + 1, "fewer target forwards than tokens");
    }
    eprintln!("{layout:?}: acceptance {accepted}/{proposed}, rounds by accepted drafts {:?}; {identical} identical, {near_ties} differ after a near tie", &per_round[..8]);
    assert!(identical * 10 >= refs.models["kjv-target"].len() * 7, "only {identical} prompts identical");
    // Rejections happened at every draft position 0..k (and so did rollbacks), output unchanged.
    let k_seen = per_round.iter().rposition(|&n| n > 0).unwrap();
    assert!(k_seen >= 3, "drafts of several tokens were accepted: {per_round:?}");
    assert!(per_round[..k_seen].iter().all(|&n| n > 0), "a rejection at every position 0..{k_seen}: {per_round:?}");
}

#[test]
fn greedy_speculative_equals_target_alone_shared_kv() {
    greedy_lossless(KvLayout::Shared);
}

#[test]
fn greedy_speculative_equals_target_alone_growing_kv() {
    greedy_lossless(KvLayout::Growing);
}

/// Sampled speculative decoding draws from the target's distribution: compare the tokens at
/// positions 2 and 3 (decided by drafting; position 1 comes from the prefill alone) with plain
/// sampling, over many seeds. The draft here is the random-weight tiny-qwen2, whose
/// distribution is far from the target's, so a wrong acceptance rule shows at once.
#[test]
fn sampled_speculative_follows_the_target_distribution() {
    let prompt = Prompt::Text("And the LORD said unto".into());
    let seeds = 500u64;
    let sample = |engine: &mut Engine, speculative: bool| {
        let mut counts = [std::collections::HashMap::<u32, usize>::new(), std::collections::HashMap::new()];
        for seed in 0..seeds {
            let options = GenerateOptions {
                max_new_tokens: Some(3),
                temperature: Some(1.0),
                top_k: Some(8),
                seed: Some(seed * 7919 + if speculative { 1 } else { 0 }),
                speculative: Some(speculative),
                ..Default::default()
            };
            let out = engine.generate(&prompt, &options, &CancelToken::new(), &mut |_| true).unwrap();
            for pos in 1..3 {
                if let Some(&t) = out.token_ids.get(pos) {
                    *counts[pos - 1].entry(t).or_default() += 1;
                }
            }
        }
        counts
    };
    let tv = |a: &std::collections::HashMap<u32, usize>, b: &std::collections::HashMap<u32, usize>| {
        let (na, nb) = (a.values().sum::<usize>() as f64, b.values().sum::<usize>() as f64);
        let keys: std::collections::BTreeSet<u32> = a.keys().chain(b.keys()).copied().collect();
        keys.iter().map(|k| (*a.get(k).unwrap_or(&0) as f64 / na - *b.get(k).unwrap_or(&0) as f64 / nb).abs()).sum::<f64>() / 2.0
    };
    for draft in ["tiny-qwen2", "kjv-draft"] {
        let mut engine = pair(draft, KvLayout::Shared, 3);
        let plain = sample(&mut engine, false);
        let spec = sample(&mut engine, true);
        for pos in 0..2 {
            let d = tv(&plain[pos], &spec[pos]);
            eprintln!("draft {draft}: position {}: total variation {d:.3} over {seeds} seeds", pos + 2);
            // Two samples of 500 from the same law over ~8-30 tokens differ by ~0.1 in TV.
            assert!(d < 0.2, "draft {draft}, position {}: TV {d}", pos + 2);
        }
    }
}

/// A cancel that lands while the draft catches up on a long prompt (its prefill) ends the request
/// there: the draft's runs are terminated as the target's are. kjv-target drafts for itself, so
/// that the draft's prefill takes as long as the target's.
#[test]
fn a_cancel_interrupts_the_drafts_prefill() {
    let mut engine = pair("kjv-target", KvLayout::Growing, 4);
    let context = engine.folder.config.context_length;
    let prompt = Prompt::Tokens((0..context as u32 - 32).map(|i| 100 + i % 1000).collect());
    let options = GenerateOptions { max_new_tokens: Some(8), temperature: Some(0.0), ..Default::default() };
    // The target's prefill alone, the shorter of two runs.
    let prefill = (0..2)
        .map(|_| engine.generate(&prompt, &options, &CancelToken::new(), &mut |_| true).unwrap().stats.time_to_first_token)
        .min()
        .unwrap();

    // Cancel a quarter of a prefill after the target's: inside the draft's.
    let cancel = CancelToken::new();
    let canceller = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(prefill * 5 / 4);
            cancel.cancel();
        })
    };
    let started = std::time::Instant::now();
    let outcome = engine.generate(&prompt, &options, &cancel, &mut |_| true).unwrap();
    let elapsed = started.elapsed();
    canceller.join().unwrap();
    eprintln!("target prefill {prefill:?}; cancelled at {:?}, returned after {elapsed:?}", prefill * 5 / 4);
    assert_eq!(outcome.reason, edgellm::engine::FinishReason::Cancelled);
    assert!(outcome.token_ids.len() <= 1, "only the target's first token: {outcome:?}");
    // Without termination the draft's prefill runs to its end: 2 prefills in all.
    assert!(elapsed < prefill * 7 / 4, "the draft's prefill ran on after the cancel: {elapsed:?} against a prefill of {prefill:?}");
}
