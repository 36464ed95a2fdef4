//! genai_config layouts that edgellm's own builder does not write, on onnxruntime-genai's own test
//! models (../shared/reference/genai-test-models, used in place): GPT-2's combined `past_%d`
//! with int32 inputs in fp32 and fp16, a Llama with MultiHeadAttention and fp16 KV, LFM2's
//! convolution states beside the KV, and configs that leave names to onnxruntime-genai's
//! defaults. Each is compared with onnxruntime-genai run now on the same folder and prompt ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use edgellm::engine::{CancelToken, Engine, LoadOptions, Prompt};
use edgellm::service::client::Daemon1Proxy;

use crate::kit::bus::Daemon;
use crate::kit::fixtures::{genai_outputs, model_dir, runtime, shared_reference};
use crate::kit::generate::{greedy, with_eos};

/// A model folder for `model`: the shared folder itself when it has a tokenizer, otherwise a
/// scratch folder of links to its files plus gpt2-fp32's tokenizer (upstream ships none; the ids
/// under test do not depend on it). `config` rewrites genai_config.json in the scratch folder.
pub(crate) fn folder(model: &str, config: Option<&dyn Fn(&mut serde_json::Value)>) -> (PathBuf, Option<tempfile::TempDir>) {
    let source = shared_reference(&format!("genai-test-models/{model}"));
    if source.join("tokenizer.json").exists() && config.is_none() {
        return (source, None);
    }
    let scratch = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::os::unix::fs::symlink(&path, scratch.path().join(path.file_name().unwrap())).unwrap();
    }
    let tokenizer = scratch.path().join("tokenizer.json");
    if !tokenizer.exists() {
        std::os::unix::fs::symlink(shared_reference("genai-test-models/tiny-random-gpt2-fp32/tokenizer.json"), tokenizer).unwrap();
    }
    if let Some(edit) = config {
        let path = scratch.path().join("genai_config.json");
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(source.join("genai_config.json")).unwrap()).unwrap();
        edit(&mut value);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, value.to_string()).unwrap();
    }
    (scratch.path().to_path_buf(), Some(scratch))
}

fn greedy_ids(engine: &mut Engine, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    with_eos(&engine.generate(&Prompt::Tokens(prompt.to_vec()), &greedy(new_tokens), &CancelToken::new(), &mut |_| true).expect("generate"))
}

/// The prompts of onnxruntime-genai's own tests for these models, and a few more.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let mut prompts = vec![vec![0, 0, 0, 52], vec![0, 0, 195, 731]];
    // A fixed spread of ids over the vocabulary, of growing length.
    for len in [1usize, 7, 23] {
        prompts.push((0..len as u32).map(|i| (i * 7919 + len as u32 * 104_729) % vocab).collect());
    }
    prompts
}

fn check(model: &str, dir: &Path, vocab: u32) -> Engine {
    let new_tokens = 24;
    let prompts = prompts(vocab);
    let genai = genai_outputs(dir, "cpu", &prompts, new_tokens);
    let mut engine = Engine::load(&runtime(), model, dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("load {model}: {e}"));
    for (prompt, reference) in prompts.iter().zip(&genai) {
        assert_eq!(&greedy_ids(&mut engine, prompt, new_tokens), reference, "{model}: greedy ids for {prompt:?} against onnxruntime-genai");
    }
    engine
}

#[test]
fn gpt2_combined_past_int32_inputs_fp32_and_fp16_match_onnxruntime_genai() {
    let (fp32, _keep) = folder("tiny-random-gpt2-fp32", None);
    check("gpt2-fp32", &fp32, 1000);
    // onnxruntime-genai's own test (test/model_tests.cpp) expects these at max_length 10.
    let mut engine = Engine::load(&runtime(), "gpt2-fp32", &fp32, &LoadOptions::default()).unwrap();
    assert_eq!(greedy_ids(&mut engine, &[0, 0, 0, 52], 6), vec![204; 6]);
    assert_eq!(greedy_ids(&mut engine, &[0, 0, 195, 731], 6), vec![731, 114, 114, 114, 114, 114]);
    let (fp16, _keep) = folder("tiny-random-gpt2-fp16", None);
    check("gpt2-fp16", &fp16, 1000);
}

#[test]
fn llama_multi_head_attention_fp16_matches_onnxruntime_genai_with_and_without_names_in_the_config() {
    let (dir, _keep) = folder("tiny-random-LlamaForCausalLM-fp16", None);
    check("llama-fp16", &dir, 32000);
    // The same folder with every input and output name left to onnxruntime-genai's defaults.
    let strip = |c: &mut serde_json::Value| {
        let decoder = c["model"]["decoder"].as_object_mut().unwrap();
        decoder.remove("inputs");
        decoder.remove("outputs");
    };
    let (bare, _keep) = folder("tiny-random-LlamaForCausalLM-fp16", Some(&strip));
    check("llama-fp16-default-names", &bare, 32000);
}

/// onnxruntime-genai's test prompts one after another with the KV kept, as a D-Bus connection's
/// requests run: each reuses the earlier prompt's leading `[0, 0]` and runs the rest after it.
/// The Llama's MultiHeadAttention graph refuses several positions after a non-empty cache
/// ("invalid expand shape" in `attn_mask_reformat`; onnxruntime-genai's own `append_tokens` in
/// two pieces fails there too): the ids must still be onnxruntime-genai's fresh ones.
#[test]
fn genai_test_prompts_after_a_kept_prefix_give_onnxruntime_genais_ids() {
    let prompts: Vec<Vec<u32>> = vec![vec![0, 0, 0, 52], vec![0, 0, 195, 731], vec![0, 0, 0, 0, 0, 195, 731], vec![0, 52]];
    for model in ["tiny-random-LlamaForCausalLM-fp16", "tiny-random-gpt2-fp32"] {
        let (dir, _keep) = folder(model, None);
        let new_tokens = 8;
        let genai = genai_outputs(&dir, "cpu", &prompts, new_tokens);
        let engine = Engine::load(&runtime(), model, &dir, &LoadOptions::default()).unwrap();
        let options = greedy(new_tokens);
        let mut cache = None;
        for (prompt, reference) in prompts.iter().zip(&genai) {
            let (outcome, left) = engine
                .generate_cached(&Prompt::Tokens(prompt.clone()), &options, &CancelToken::new(), &mut |_| true, cache.take())
                .unwrap_or_else(|e| panic!("{model}: {prompt:?} after a kept prefix: {e}"));
            assert_eq!(&with_eos(&outcome), reference, "{model}: {prompt:?} (reused {} prompt tokens)", outcome.stats.cached_prompt_tokens);
            cache = left;
        }
    }
}

#[test]
fn lfm2_convolution_states_beside_the_kv_match_onnxruntime_genai() {
    let (dir, _keep) = folder("tiny-random-lfm2-fp32", None);
    let mut engine = check("lfm2", &dir, 1000);
    // Speculative decoding would roll the convolution state back, which cannot be done.
    let draft = edgellm::model::ModelFolder::open(&model_dir("kjv-draft")).unwrap();
    let e = engine.attach_draft(&runtime(), &draft, &LoadOptions::default(), Default::default()).unwrap_err().to_string();
    assert!(e.contains("past_conv.0") && e.contains("draft"), "{e}");
}

#[test]
fn a_graph_input_edgellm_cannot_supply_is_named_and_the_model_fails_to_load() {
    // A config whose KV names do not match the graph's leaves `past_key_values.0.key` unfed.
    let rename = |c: &mut serde_json::Value| {
        c["model"]["decoder"]["inputs"]["past_key_names"] = "past_key.%d".into();
    };
    let (dir, _keep) = folder("tiny-random-LlamaForCausalLM-fp16", Some(&rename));
    let e = Engine::load(&runtime(), "renamed", &dir, &LoadOptions::default()).err().expect("the load fails").to_string();
    assert!(e.contains("`past_key_values.0.key`") && e.contains("model.onnx") && e.contains("cannot supply"), "{e}");

    // Over D-Bus: ModelLoadFailed with the same message, and the daemon serves its other model.
    let daemon = Daemon::start(&format!("\n[[model]]\nname = \"renamed\"\npath = \"{}\"\n", dir.display()));
    crate::kit::bus::rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let err = proxy.complete("renamed", "x", HashMap::new()).await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.ModelLoadFailed") && err.contains("past_key_values.0.key"), "{err}");
        let (text, _) = proxy.complete("kjv", "And God said", HashMap::from([("max_new_tokens", 3u32.into())])).await.unwrap();
        assert!(!text.is_empty());
    });
}
