//! The engine against onnxruntime-genai's own outputs on the committed models.

use std::time::{Duration, Instant};

use edgellm::engine::{CancelToken, Engine, FinishReason, GenerateOptions, KvLayout, LoadOptions, Outcome, Prompt};
use edgellm::model::{ChatMessage, ModelFolder};
use edgellm::runtime::{Int4Choice, Int4Kernel, Provider, Runtime, SessionOptions};
use edgellm::Error;

use crate::kit::fixtures::{copy_model, genai_greedy, genai_greedy_texts, genai_outputs, model_dir, references, runtime, same_or_near_tie};
use crate::kit::generate::{greedy, sampled, with_eos};

fn load(name: &str, options: LoadOptions) -> Engine {
    Engine::load(&runtime(), name, &model_dir(name), &options).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// Greedy decoding of `ids`: what it gave, and the pieces it streamed, put together.
fn generate_greedy(engine: &mut Engine, ids: &[u32], max_new: usize) -> (Outcome, String) {
    let mut streamed = String::new();
    let outcome = engine
        .generate(&Prompt::Tokens(ids.to_vec()), &greedy(max_new), &CancelToken::new(), &mut |piece| {
            streamed.push_str(piece);
            true
        })
        .expect("generate");
    (outcome, streamed)
}

/// The engine's greedy ids against onnxruntime-genai's, run now on this machine: the random-weight
/// models have near ties that another CPU's kernels resolve the other way (tiny-qwen2's ids in
/// tests/reference_outputs.json, made on another machine, differ from what onnxruntime-genai
/// itself gives here on one prompt), so the committed ids give the prompts, not the answers.
/// With ONNX Runtime's int4 kernel (onnxruntime-genai's own) the ids are equal; with the default
/// (edgellm's kernel where the CPU has it, summing in another order) they are equal or part at a
/// near tie of the model alone, and most are equal.
fn check_against_reference(model: &str, options: LoadOptions) {
    let refs = references();
    let cases = &refs.models[model];
    assert!(cases.len() >= 8, "at least 8 reference prompts");
    let genai = genai_greedy(model, "cpu", cases, refs.new_tokens);
    let onnxruntime = SessionOptions { int4: Int4Choice::OnnxRuntime, ..options.session.clone() };
    for options in [LoadOptions { session: onnxruntime, ..options.clone() }, options] {
        let mut engine = load(model, options);
        let kernel = engine.provider().int4.clone();
        let exact = matches!(kernel, Int4Kernel::OnnxRuntime { .. });
        let mut identical = 0;
        for (case, genai_ids) in cases.iter().zip(&genai) {
            let ids = engine.folder.tokenizer.encode_prompt(&case.prompt).unwrap();
            assert_eq!(ids, case.prompt_ids, "{model}: tokenization of {:?} differs from onnxruntime-genai", case.prompt);
            let (outcome, streamed) = generate_greedy(&mut engine, &case.prompt_ids, refs.new_tokens);
            if exact {
                assert_eq!(&with_eos(&outcome), genai_ids, "{model} ({kernel}): greedy ids for {:?} differ from onnxruntime-genai", case.prompt);
            }
            let label = format!("{model} ({kernel}): {}", case.prompt);
            identical += same_or_near_tie(&mut engine, &label, &case.prompt_ids, &with_eos(&outcome), genai_ids, "greedy") as usize;
            assert_eq!(streamed, outcome.text, "streamed pieces concatenate to the final text");
            assert_eq!(outcome.text, engine.folder.tokenizer.decode(&outcome.token_ids).unwrap());
        }
        assert!(identical * 10 >= cases.len() * 7, "{model} ({kernel}): only {identical} of {} identical to onnxruntime-genai", cases.len());
    }
}

#[test]
fn target_greedy_matches_onnxruntime_genai_shared_kv() {
    check_against_reference("kjv-target", LoadOptions { kv_layout: Some(KvLayout::Shared), ..Default::default() });
}

#[test]
fn target_greedy_matches_onnxruntime_genai_growing_kv() {
    check_against_reference("kjv-target", LoadOptions { kv_layout: Some(KvLayout::Growing), ..Default::default() });
}

/// A prompt longer than one prefill chunk is prefilled in several forwards (onnxruntime-genai
/// prefills it in one): the greedy ids still equal onnxruntime-genai's (or part at a near tie, as
/// a forward over other positions may), in both KV layouts. Skipping a chunk, or restarting its
/// positions, changes them.
/// The reference prompts one after another until they are longer than a prefill chunk.
fn longer_than_a_prefill_chunk() -> Vec<u32> {
    let mut prompt: Vec<u32> = Vec::new();
    for case in references().models["kjv-target"].iter().cycle() {
        prompt.extend_from_slice(&case.prompt_ids);
        if prompt.len() > edgellm::decode::PREFILL_CHUNK + 100 {
            break;
        }
    }
    prompt
}

#[test]
fn a_prompt_longer_than_one_prefill_chunk_matches_onnxruntime_genai() {
    let prompt = longer_than_a_prefill_chunk();
    let new_tokens = 24;
    let genai = genai_outputs(&model_dir("kjv-target"), "cpu", std::slice::from_ref(&prompt), new_tokens).remove(0);
    for layout in [KvLayout::Shared, KvLayout::Growing] {
        let mut engine = load("kjv-target", LoadOptions { kv_layout: Some(layout), ..Default::default() });
        let (outcome, _) = generate_greedy(&mut engine, &prompt, new_tokens);
        assert!(outcome.stats.target_forwards >= 2 + outcome.token_ids.len() - 1, "the prompt took more than one forward");
        let label = format!("{} prompt tokens, {layout:?}", prompt.len());
        same_or_near_tie(&mut engine, &label, &prompt, &with_eos(&outcome), &genai, "chunked prefill");
    }
}

/// The deadline holds during a prefill of several chunks: a request past it ends as a timeout
/// within one chunk, not after the whole prompt (a 15 s timeout ran 61-67 s on long prompts).
#[test]
fn a_deadline_passed_during_a_long_prefill_ends_it_within_a_chunk() {
    let prompt = longer_than_a_prefill_chunk();
    let engine = load("kjv-target", LoadOptions::default());
    // Already past when the first chunk ends.
    let options = GenerateOptions { deadline: Some(Instant::now()), ..greedy(8) };
    let outcome = engine.generate(&Prompt::Tokens(prompt.clone()), &options, &CancelToken::new(), &mut |_| true).unwrap();
    assert_eq!(outcome.reason, FinishReason::Timeout);
    assert_eq!(outcome.stats.target_forwards, 1, "one chunk of {} prompt tokens ran, no more", prompt.len());
    assert!(outcome.token_ids.is_empty());
}

#[test]
fn draft_greedy_matches_onnxruntime_genai() {
    check_against_reference("kjv-draft", LoadOptions::default());
}

#[test]
fn second_architecture_qwen2_matches_onnxruntime_genai() {
    check_against_reference("tiny-qwen2", LoadOptions::default());
}

#[test]
fn openvino_provider_matches_onnxruntime_genai_on_openvino() {
    if !crate::kit::fixtures::openvino_cpu_here("engine::openvino_provider_matches_onnxruntime_genai_on_openvino") {
        return;
    }
    let options = LoadOptions {
        session: SessionOptions { providers: vec![Provider::OpenVino], strict: true, ..Default::default() },
        ..Default::default()
    };
    let mut engine = load("kjv-target", options);
    assert_eq!(engine.provider().provider, Provider::OpenVino);
    let refs = references();
    let cases = &refs.models["kjv-target"];
    // Under the emulator (AMD machines) every forward costs ~100x: 4 of the 10 prompts keep the
    // run to minutes, and CI (whose machines are often AMD) under its 30-minute budget.
    let cases = if crate::kit::fixtures::emulated() { &cases[..4] } else { &cases[..] };
    let genai_openvino = genai_greedy("kjv-target", "openvino", cases, refs.new_tokens);
    let genai_cpu = genai_greedy("kjv-target", "cpu", cases, refs.new_tokens);
    // The CPU provider's logits judge a departure from the CPU reference.
    let mut on_cpu = load("kjv-target", LoadOptions::default());
    let mut same_as_cpu = 0;
    for ((case, reference), cpu_reference) in cases.iter().zip(&genai_openvino).zip(&genai_cpu) {
        let (outcome, _) = generate_greedy(&mut engine, &case.prompt_ids, refs.new_tokens);
        let ours = with_eos(&outcome);
        // The same provider in both engines gives the same tokens...
        assert_eq!(&ours, reference, "OpenVINO: edgellm and onnxruntime-genai differ for {:?}", case.prompt);
        // ...and against CPU, OpenVINO's own MatMulNBits kernels may flip a near tie, and only that.
        same_as_cpu += same_or_near_tie(&mut on_cpu, &case.prompt, &case.prompt_ids, &ours, cpu_reference, "OpenVINO") as usize;
    }
    eprintln!("openvino vs cpu: {same_as_cpu} of {} prompts identical", cases.len());
}

#[test]
fn sampling_with_a_seed_repeats_and_differs_across_seeds() {
    let engine = load("kjv-target", LoadOptions::default());
    let prompt = Prompt::Text("And the LORD said".into());
    let run = |seed| {
        let options = GenerateOptions { top_p: Some(0.95), ..sampled(40, seed) };
        engine.generate(&prompt, &options, &CancelToken::new(), &mut |_| true).unwrap().text
    };
    let (a, b, c) = (run(11), run(11), run(12));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// A stop string ends the output before it: stopped at a word from the middle of
/// onnxruntime-genai's greedy text, run now, the output is that text up to the word. ONNX
/// Runtime's int4 kernel (onnxruntime-genai's own) gives its greedy ids exactly, so no near tie
/// can move the word.
#[test]
fn stop_string_ends_output_before_it() {
    let refs = references();
    let cases = &refs.models["kjv-target"];
    let texts = genai_greedy_texts("kjv-target", cases, refs.new_tokens);
    let (case, text) = cases.iter().zip(&texts).find(|(_, text)| text.len() > 40).expect("a long reference");
    let stop = text[20..].split_whitespace().find(|w| w.len() >= 4).expect("a word").to_string();
    let expected = &text[..text.find(&stop).unwrap()];
    let onnxruntime = SessionOptions { int4: Int4Choice::OnnxRuntime, ..Default::default() };
    let engine = load("kjv-target", LoadOptions { session: onnxruntime, ..Default::default() });
    let options = GenerateOptions { stop: vec![stop.clone()], ..greedy(refs.new_tokens) };
    let mut streamed = String::new();
    let outcome = engine
        .generate(&Prompt::Tokens(case.prompt_ids.clone()), &options, &CancelToken::new(), &mut |p| {
            streamed.push_str(p);
            true
        })
        .unwrap();
    assert_eq!(outcome.reason, FinishReason::Stop);
    assert_eq!(outcome.text, expected, "stop string {stop:?}");
    assert_eq!(streamed, expected);
}

#[test]
fn max_new_tokens_and_cancel_end_generation() {
    let engine = load("kjv-target", LoadOptions::default());
    let prompt = Prompt::Text("In the beginning".into());
    let options = greedy(5);
    let outcome = engine.generate(&prompt, &options, &CancelToken::new(), &mut |_| true).unwrap();
    assert!(outcome.reason == FinishReason::Length && outcome.token_ids.len() == 5 || outcome.reason == FinishReason::Stop);

    // Cancelled from another thread after the first piece: ends within one step.
    let cancel = CancelToken::new();
    let options = sampled(900, 1);
    let mut pieces = 0;
    let outcome = engine
        .generate(&prompt, &options, &cancel, &mut |_| {
            pieces += 1;
            if pieces == 3 {
                let c = cancel.clone();
                std::thread::spawn(move || c.cancel()).join().unwrap();
            }
            true
        })
        .unwrap();
    assert_eq!(outcome.reason, FinishReason::Cancelled);
    assert!(outcome.token_ids.len() < 10, "stopped within a step of the cancel, got {}", outcome.token_ids.len());

    // A receiver that goes away cancels too.
    let outcome = engine.generate(&prompt, &options, &CancelToken::new(), &mut |_| false).unwrap();
    assert_eq!(outcome.reason, FinishReason::Cancelled);

    // A deadline in the past ends it as a timeout after the first step.
    let options = GenerateOptions { deadline: Some(Instant::now()), ..options };
    let outcome = engine.generate(&prompt, &options, &CancelToken::new(), &mut |_| true).unwrap();
    assert_eq!(outcome.reason, FinishReason::Timeout);
}

#[test]
fn long_prompt_is_refused_before_work() {
    let folder = ModelFolder::open(&model_dir("kjv-target")).unwrap();
    let context = folder.config.context_length;
    let ids = vec![5u32; context];
    match folder.prompt_ids("kjv-target", &Prompt::Tokens(ids)) {
        Err(Error::PromptTooLong { tokens, context: c }) => assert_eq!((tokens, c), (context, context)),
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
}

#[test]
fn chat_template_matches_onnxruntime_genai() {
    let folder = ModelFolder::open(&model_dir("kjv-target")).unwrap();
    let template = folder.chat_template.as_ref().expect("the bundled models have a chat template");
    assert!(!references().chat.is_empty());
    for case in &references().chat {
        let messages: Vec<ChatMessage> = case.messages.iter().map(|(r, c)| ChatMessage { role: r.clone(), content: c.clone() }).collect();
        assert_eq!(template.render(&messages, true).unwrap(), case.rendered);
    }
}

#[test]
fn missing_library_is_a_typed_error() {
    let err = Runtime::load(Some(std::path::Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
    assert!(matches!(err, Error::RuntimeLibrary { .. }), "{err:?}");
    assert!(err.to_string().contains("setup-runtime.sh"), "{err}");
}

#[test]
fn missing_weights_and_corrupt_config_are_named() {
    let tmp = copy_model("kjv-draft");
    std::fs::remove_file(tmp.path().join("model.onnx.data")).unwrap();
    let err = Engine::load(&runtime(), "broken", tmp.path(), &LoadOptions::default()).err().expect("must fail");
    assert!(matches!(&err, Error::ModelFile { path, .. } if path.ends_with("model.onnx.data")), "{err:?}");

    let tmp = copy_model("kjv-draft");
    std::fs::write(tmp.path().join("genai_config.json"), "{\"model\": {\"type\": \"llama\",").unwrap();
    let err = Engine::load(&runtime(), "broken", tmp.path(), &LoadOptions::default()).err().expect("must fail");
    assert!(matches!(&err, Error::ModelConfig { path, .. } if path.ends_with("genai_config.json")), "{err:?}");

    // A vocab_size the graph's logits disagree with is named before any step writes them.
    let tmp = copy_model("kjv-draft");
    let config_path = tmp.path().join("genai_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let vocab = config["model"]["vocab_size"].as_u64().unwrap();
    config["model"]["vocab_size"] = (vocab - 1).into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = Engine::load(&runtime(), "broken", tmp.path(), &LoadOptions::default()).err().expect("must fail");
    assert!(
        matches!(&err, Error::ModelConfig { field, reason, .. } if field == "model.vocab_size" && reason.contains(&vocab.to_string())),
        "{err:?}"
    );
}

/// A cancel that arrives during the prefill ends it through ONNX Runtime's run termination: no
/// token comes out (a finished prefill always yields one before the cancel is looked at).
#[test]
fn a_cancel_interrupts_the_prefill() {
    let engine = load("kjv-target", LoadOptions::default());
    let context = engine.folder.config.context_length;
    let prompt = Prompt::Tokens((0..context as u32 - 8).map(|i| 100 + i % 1000).collect());
    let options = greedy(1);
    let whole = engine.generate(&prompt, &options, &CancelToken::new(), &mut |_| true).unwrap();
    assert_eq!(whole.token_ids.len() + whole.eos_token.is_some() as usize, 1);
    let prefill = whole.stats.time_to_first_token;

    let cancel = CancelToken::new();
    let canceller = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(prefill / 4);
            cancel.cancel();
        })
    };
    let started = Instant::now();
    let outcome = engine.generate(&prompt, &options, &cancel, &mut |_| true).unwrap();
    canceller.join().unwrap();
    assert_eq!(outcome.reason, FinishReason::Cancelled);
    assert!(outcome.token_ids.is_empty() && outcome.eos_token.is_none(), "the prefill ran to its end: {outcome:?}");
    eprintln!("prefill of {} tokens: {prefill:?} whole, cancelled after {:?}", context - 8, started.elapsed());
}

#[test]
fn unavailable_provider_falls_back_or_fails_when_strict() {
    // No CUDA here (and the CPU wheel has no CUDA provider): strict is an error naming it...
    let strict = LoadOptions {
        session: SessionOptions { providers: vec![Provider::Cuda], strict: true, ..Default::default() },
        ..Default::default()
    };
    match Engine::load(&runtime(), "d", &model_dir("kjv-draft"), &strict) {
        Err(Error::ProviderUnavailable { provider, .. }) => assert_eq!(provider, "cuda"),
        Err(other) => panic!("expected ProviderUnavailable, got {other:?}"),
        Ok(_) => eprintln!("CUDA is available on this machine: nothing to fall back from"),
    }
    // ...and without strict the model runs on the next provider, with the failure reported.
    let fallback = LoadOptions {
        session: SessionOptions { providers: vec![Provider::Cuda, Provider::Cpu], strict: false, ..Default::default() },
        ..Default::default()
    };
    let engine = Engine::load(&runtime(), "d", &model_dir("kjv-draft"), &fallback).unwrap();
    if engine.provider().provider == Provider::Cpu {
        assert_eq!(engine.provider().failed.first().map(|f| f.0), Some(Provider::Cuda));
    }
}

#[test]
fn committed_configs_match_the_graphs() {
    // Loading checks every input and output named in genai_config.json against the graph.
    for name in ["kjv-target", "kjv-draft", "tiny-qwen2"] {
        let started = Instant::now();
        let engine = load(name, LoadOptions::default());
        assert!(started.elapsed() < Duration::from_secs(60));
        assert_eq!(engine.folder.config.model_type.is_empty(), false);
    }
}

#[test]
fn float16_io_matches_onnxruntime_genai_in_both_kv_layouts() {
    // tiny-qwen2-fp16io has float16 KV inputs/outputs and logits, as GPU exports do.
    for layout in [KvLayout::Shared, KvLayout::Growing] {
        check_against_reference("tiny-qwen2-fp16io", LoadOptions { kv_layout: Some(layout), ..Default::default() });
    }
}

/// A KV cache holds the session that made it: fed to another decoder (here the draft's cache to
/// the target, whose graph would take tensors of other shapes, or worse, the same), the forward
/// is refused, and the cache outlives its decoder without dangling.
#[test]
fn a_kv_cache_is_refused_by_a_decoder_that_did_not_make_it() {
    use edgellm::engine::Decoder;
    let runtime = runtime();
    let decoder = |name: &str| {
        let folder = ModelFolder::open(&model_dir(name)).unwrap();
        let decoder = Decoder::load(&runtime, &model_dir(name), &folder.config, &SessionOptions::default()).unwrap();
        let layout = decoder.choose_layout(&folder.config, None).unwrap();
        (decoder, layout)
    };
    let (target, target_layout) = decoder("kjv-target");
    let (draft, draft_layout) = decoder("kjv-draft");
    let mut draft_cache = draft.new_cache(draft_layout, 16).unwrap();
    let e = target.forward(&mut draft_cache, &[1, 2, 3], 1).unwrap_err().to_string();
    assert!(e.contains("other than the one that made it"), "{e}");
    let mut target_cache = target.new_cache(target_layout, 16).unwrap();
    target.forward(&mut target_cache, &[1, 2, 3], 1).expect("its own cache");
    drop(target);
    assert_eq!(target_cache.len(), 3, "the cache outlives its decoder");
    draft.forward(&mut draft_cache, &[1, 2, 3], 1).expect("the draft's own cache");
}

/// A near tie inside a verified round is decided by a one-token step after the positions before
/// it (`Decoder::step_inside`), and the positions verified after it stay: in both KV layouts the
/// cache still holds them, the step's row is the one plain decoding computes there, and the next
/// token's row is plain decoding's too (up to the few hundredths a batched forward differs by).
#[test]
fn a_step_inside_a_verified_round_keeps_the_positions_after_it() {
    use edgellm::engine::Decoder;
    let runtime = runtime();
    let folder = ModelFolder::open(&model_dir("kjv-target")).unwrap();
    let decoder = Decoder::load(&runtime, &model_dir("kjv-target"), &folder.config, &SessionOptions::default()).unwrap();
    let case = &references().models["kjv-target"][0];
    let (prompt, next) = (&case.prompt_ids, &case.output_ids[..6]);
    let max_gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    for layout in [KvLayout::Shared, KvLayout::Growing] {
        let mut plain = decoder.new_cache(layout, 64).unwrap();
        decoder.forward(&mut plain, prompt, 1).unwrap();
        let plain_rows: Vec<Vec<f32>> = next.iter().map(|&t| decoder.forward(&mut plain, &[t], 1).unwrap()).collect();

        let mut verified = decoder.new_cache(layout, 64).unwrap();
        decoder.forward(&mut verified, prompt, 1).unwrap();
        decoder.forward(&mut verified, &next[..5], 5).unwrap();
        let held = verified.len();
        let inside = decoder.step_inside(&mut verified, prompt.len() + 2, next[2]).unwrap().to_vec();
        assert_eq!(verified.len(), held, "{layout:?}: the positions after the step are kept");
        assert!(
            max_gap(&inside, &plain_rows[2]) < 0.05,
            "{layout:?}: the step's row is plain decoding's ({})",
            max_gap(&inside, &plain_rows[2])
        );
        let after = decoder.forward(&mut verified, &next[5..6], 1).unwrap();
        let gap = max_gap(&after, &plain_rows[5]);
        assert!(gap < 0.1, "{layout:?}: the row after the kept positions is plain decoding's (largest difference {gap})");
    }
}

/// With edgellm's int4 kernel and attention, a forward over several positions gives each position
/// the bits a forward over it alone gives (what lets a verify decide near ties without re-checks),
/// in both KV layouts; with ONNX Runtime's attention it does not, which is why the margin exists.
#[test]
fn a_verify_s_rows_are_plain_decoding_s_bit_for_bit_with_edgellm_s_kernels() {
    use edgellm::engine::Decoder;
    use edgellm::runtime::Attention;
    if !crate::kit::fixtures::edgellm_kernels_run("a_verify_s_rows_are_plain_decoding_s_bit_for_bit_with_edgellm_s_kernels") {
        return;
    }
    let runtime = runtime();
    let folder = ModelFolder::open(&model_dir("kjv-target")).unwrap();
    let case = &references().models["kjv-target"][0];
    let (prompt, next) = (&case.prompt_ids, &case.output_ids[..6]);
    let rows_of = |int4: Int4Choice, layout: KvLayout| {
        let options = SessionOptions { int4, ..Default::default() };
        let decoder = Decoder::load(&runtime, &model_dir("kjv-target"), &folder.config, &options).unwrap();
        let mut plain = decoder.new_cache(layout, 64).unwrap();
        decoder.forward(&mut plain, prompt, 1).unwrap();
        let single: Vec<Vec<f32>> = next.iter().map(|&t| decoder.forward(&mut plain, &[t], 1).unwrap().to_vec()).collect();
        let mut verified = decoder.new_cache(layout, 64).unwrap();
        decoder.forward(&mut verified, prompt, 1).unwrap();
        let batched = decoder.forward(&mut verified, next, next.len()).unwrap().to_vec();
        let vocab = single[0].len();
        let differing = single.iter().zip(batched.chunks(vocab)).filter(|(s, b)| s.as_slice() != *b).count();
        (decoder.provider.int4.clone(), differing)
    };
    for layout in [KvLayout::Shared, KvLayout::Growing] {
        let (kernel, differing) = rows_of(Int4Choice::Edgellm, layout);
        assert!(
            matches!(kernel, Int4Kernel::Edgellm { attention: Attention::Edgellm { rows_exact: true }, .. }),
            "edgellm's kernels run kjv-target: {kernel}"
        );
        assert_eq!(differing, 0, "{layout:?}: rows of a 6-position forward differ from one-position forwards");
    }
    let (kernel, differing) = rows_of(Int4Choice::OnnxRuntime, KvLayout::Shared);
    assert!(!kernel.rows_exact());
    assert!(differing > 0, "ONNX Runtime's kernels: the rows were expected to differ somewhere ({kernel})");
}

/// KiB of this process's maps of `file` that are resident, and KiB mapped (/proc/self/smaps).
fn resident_and_mapped_kib(file: &std::path::Path) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let (mut resident, mut mapped, mut ours) = (0, 0, false);
    for line in smaps.lines() {
        let field = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        if line.starts_with("Size:") && ours {
            mapped += field(line);
        } else if line.starts_with("Rss:") && ours {
            resident += field(line);
        } else if line.split_whitespace().next().is_some_and(|range| range.contains('-') && !range.ends_with(':')) {
            ours = line.ends_with(&*file.to_string_lossy());
        }
    }
    (resident, mapped)
}

/// edgellm maps the external data itself and hands ONNX Runtime each initializer in place. Both
/// int4 kernels repack the weights while the session is built (ONNX Runtime's for MLAS, edgellm's
/// into its packed layout), and the map's pages they do not read again leave the resident set. On
/// a copy of the model of its own (no other test's maps of the file
/// count): the whole file is mapped, almost none of it resident after the load, and the run
/// decodes as onnxruntime-genai.
#[test]
fn mapped_weights_stay_out_of_the_resident_set_and_decode_as_onnxruntime_genai() {
    let refs = references();
    let case = &refs.models["kjv-target"][0];
    let genai = genai_greedy("kjv-target", "cpu", std::slice::from_ref(case), refs.new_tokens).remove(0);
    for int4 in [Int4Choice::OnnxRuntime, Int4Choice::Edgellm] {
        let dir = copy_model("kjv-target");
        let data = dir.path().join("model.onnx.data");
        let file_kib = std::fs::metadata(&data).unwrap().len() / 1024;
        let options = LoadOptions {
            session: SessionOptions { weights: edgellm::runtime::WeightLoading::Mapped, int4, ..Default::default() },
            ..Default::default()
        };
        let mut engine = Engine::load(&runtime(), "kjv-target", dir.path(), &options).expect("load");
        let kernel = engine.provider().int4.clone();
        let (resident, mapped) = resident_and_mapped_kib(&data);
        assert!(mapped >= file_kib, "{kernel}: the data file is mapped by edgellm: {mapped} KiB mapped of {file_kib}");
        assert!(resident * 50 < file_kib, "{kernel}: {resident} KiB of the {file_kib} KiB file resident after the load");
        let (outcome, _) = generate_greedy(&mut engine, &case.prompt_ids, refs.new_tokens);
        assert!(same_or_near_tie(&mut engine, &case.prompt, &case.prompt_ids, &with_eos(&outcome), &genai, "mapped weights"));
        let (resident, _) = resident_and_mapped_kib(&data);
        // What a run reads again comes back, no more: the pages of the embedding's rows of these
        // tokens (half the file is the embedding; 1.2 MiB measured after this run) and the norms.
        // The int4 blocks and scales (the other half) are read from the packed copies.
        assert!(resident * 4 < file_kib, "{kernel}: {resident} KiB of the {file_kib} KiB file resident after a run");
        if int4 == Int4Choice::OnnxRuntime {
            assert!(matches!(kernel, Int4Kernel::OnnxRuntime { .. }), "asked for ONNX Runtime's kernel: {kernel}");
        }
    }
}

/// edgellm's int4 kernel against ONNX Runtime's own on the bundled models: the next-token logits
/// after a few prefixes, every model graph with MatMulNBits loaded once with each. Both quantize
/// the activations to int8 per block; only the order of the float sums differs.
#[test]
fn edgellm_int4_logits_equal_onnxruntime_kernel_logits() {
    let refs = references();
    for model in ["kjv-target", "kjv-draft", "tiny-qwen2", "kjv-hamburger"] {
        let with = |int4: Int4Choice| {
            let options = LoadOptions { session: SessionOptions { int4, ..Default::default() }, ..Default::default() };
            Engine::load(&runtime(), model, &model_dir(model), &options).expect("load")
        };
        let (mut ours, mut theirs) = (with(Int4Choice::Edgellm), with(Int4Choice::OnnxRuntime));
        assert!(matches!(theirs.provider().int4, Int4Kernel::OnnxRuntime { .. }));
        match &ours.provider().int4 {
            Int4Kernel::Edgellm { nodes, .. } => assert!(*nodes > 0),
            other => {
                assert!(!edgellm::runtime::int4_supported(), "{model}: the CPU has AVX-512 VNNI, yet {other}");
                eprintln!("{model}: {other}: nothing to compare");
                continue;
            }
        }
        let cases = refs.models.get(model).or(refs.models.get("kjv-target")).unwrap();
        for case in cases.iter().take(3) {
            for len in [1, case.prompt_ids.len()] {
                let prefix = &case.prompt_ids[..len];
                let (a, b) = (ours.next_logits(prefix).unwrap(), theirs.next_logits(prefix).unwrap());
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let gap = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                // One position: the same arithmetic but the order of sums. Several: ONNX Runtime's
                // kernel takes another path inside a session for them, which moves a logit by up
                // to ~0.1 against its own one-position forwards (fixtures::same_or_near_tie);
                // 0.048 of 15.7 measured here on kjv-hamburger.
                let bound = if len == 1 { 2e-3 } else { 1e-2 };
                assert!(
                    gap <= bound * scale.max(1.0),
                    "{model}, {len} tokens of {:?}: logits differ by {gap} (largest {scale})",
                    case.prompt
                );
            }
        }
    }
}
