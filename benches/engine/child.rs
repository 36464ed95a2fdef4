//! The measuring child (`--child`): edgellm's side, in a process of its own so that its RSS is
//! its own. It prints JSON lines on stdout, the protocol the harness and benches/ab.py read.

use std::time::Instant;

use edgellm::engine::{CancelToken, Engine, GenerateOptions, KvLayout, LoadOptions, Outcome, Prompt};
use edgellm::runtime::{Int4Choice, Runtime, SessionOptions, WeightLoading};
use serde_json::{json, Value};

use crate::cli::{ChildArgs, Kv, Weights};
use crate::kit::fixtures::proc_status_kib;
use crate::kit::generate::{greedy, with_eos};

/// A field of this process's /proc status in KiB (VmRSS, VmHWM).
fn status_kib(field: &str) -> u64 {
    proc_status_kib(std::process::id(), field).unwrap_or(0)
}

/// EDGELLM_BENCH_INT4=edgellm|onnxruntime: who runs the int4 products (default: auto, edgellm's where it runs).
pub fn int4_choice() -> Int4Choice {
    match std::env::var("EDGELLM_BENCH_INT4").as_deref() {
        Ok("edgellm") => Int4Choice::Edgellm,
        Ok("onnxruntime") => Int4Choice::OnnxRuntime,
        _ => Int4Choice::Auto,
    }
}

/// What the load took: its time and the peak resident memory it added.
struct Loaded {
    started: Instant,
    rss_before: u64,
    load_s: f64,
    rss_load_mib: f64,
    int4_kernel: String,
}

impl Loaded {
    /// The peak resident memory added since before the load, in MiB.
    fn peak_mib(&self) -> f64 {
        (status_kib("VmHWM") - self.rss_before) as f64 / 1024.0
    }
}

pub fn run(args: &ChildArgs) {
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&args.prompts).unwrap()).unwrap();
    let runtime = Runtime::load(None).expect("runtime");
    let rss_before = status_kib("VmRSS");
    let started = Instant::now();
    let mut engine = load(&runtime, args);
    let int4_kernel = engine.provider().int4.to_string();
    let load_s = started.elapsed().as_secs_f64();
    let mut loaded = Loaded { started, rss_before, load_s, rss_load_mib: 0.0, int4_kernel };
    loaded.rss_load_mib = loaded.peak_mib();
    if args.load_only {
        return load_only(&mut engine, &prompts[0], args.new_tokens, &loaded);
    }
    let mut gen = greedy(args.new_tokens);
    if args.prompt_lookup {
        gen.prompt_lookup = Some(true);
    }
    if let Some(spec) = &args.multitoken {
        // MODE[:THRESHOLD]; without a threshold, the model's default (greedy verify: by cost)
        let (mode, threshold) = spec.split_once(':').map_or((spec.as_str(), None), |(m, t)| (m, Some(t)));
        gen.multitoken_mode = Some(edgellm::multitoken::Mode::parse(mode).expect("trust or verify"));
        gen.multitoken_threshold = threshold.map(|t| t.parse().expect("threshold"));
    }
    generate(&mut engine, &prompts[0], &gen); // warm-up
    if args.serve {
        return serve(&mut engine, &prompts, &gen, &loaded);
    }
    let outcomes: Vec<_> = prompts.iter().map(|ids| generate(&mut engine, ids, &gen)).collect();
    let nll = args.nll.then(|| nll(&mut engine, &prompts, &outcomes));
    println!("{}", report(&prompts, &outcomes, nll.unwrap_or(0.0), &loaded));
}

/// The engine of `args`, with its draft model if it has one.
fn load(runtime: &Runtime, args: &ChildArgs) -> Engine {
    let weights = match args.weights {
        Weights::File => WeightLoading::File,
        Weights::Mapped => WeightLoading::Mapped,
        Weights::Default => WeightLoading::default(),
    };
    let kv_layout = args.kv.map(|kv| match kv {
        Kv::Growing => KvLayout::Growing,
        Kv::Shared => KvLayout::Shared,
    });
    let options = LoadOptions {
        // EDGELLM_BENCH_SPIN_BETWEEN_RUNS=1: ONNX Runtime's default spinning after each run.
        session: SessionOptions {
            providers: vec![args.provider],
            strict: true,
            weights,
            threads: args.threads,
            spin_between_runs: std::env::var_os("EDGELLM_BENCH_SPIN_BETWEEN_RUNS").is_some_and(|v| v == "1"),
            int4: int4_choice(),
            ..Default::default()
        },
        kv_layout,
    };
    let mut engine = Engine::load(runtime, "bench", &args.model, &options).expect("load");
    eprintln!("int4 matrix products: {}", engine.provider().int4);
    if let Some(draft) = &args.draft {
        let folder = edgellm::model::ModelFolder::open(draft).expect("draft folder");
        let cost_aware = !args.by_acceptance;
        let settings = edgellm::speculative::Settings { min_tokens: 1, max_tokens: args.k, min_confidence: 0.0, cost_aware };
        engine.attach_draft(runtime, &folder, &options, settings).expect("draft");
    }
    engine
}

fn generate(engine: &mut Engine, ids: &[u32], gen: &GenerateOptions) -> Outcome {
    engine.generate(&Prompt::Tokens(ids.to_vec()), gen, &CancelToken::new(), &mut |_| true).expect("generate")
}

/// Ready to serve: the load and the first token of the first prompt (edgellm's int4 kernel
/// reads the weights in place, so the first run pays for their pages); the peak by then.
fn load_only(engine: &mut Engine, first: &[u32], new_tokens: usize, loaded: &Loaded) {
    let one = GenerateOptions { max_new_tokens: Some(1), ..greedy(new_tokens) };
    generate(engine, first, &one);
    let ready_s = loaded.started.elapsed().as_secs_f64();
    let (load_s, rss_load_mib, rss_ready_mib) = (loaded.load_s, loaded.rss_load_mib, loaded.peak_mib());
    println!(
        "{}",
        json!({"load_s": load_s, "rss_load_mib": rss_load_mib, "ready_s": ready_s, "rss_ready_mib": rss_ready_mib, "int4_kernel": loaded.int4_kernel})
    );
}

/// The paired rows: the parent alternates the engines prompt by prompt, each stdin line the
/// index of the prompt to run next.
fn serve(engine: &mut Engine, prompts: &[Vec<u32>], gen: &GenerateOptions, loaded: &Loaded) {
    println!("{}", json!({"ready": true, "int4_kernel": loaded.int4_kernel}));
    for line in std::io::stdin().lines() {
        let o = generate(engine, &prompts[line.expect("stdin").trim().parse::<usize>().expect("prompt index")], gen);
        let output = with_eos(&o);
        let ttft = o.stats.time_to_first_token.as_secs_f64();
        let decode = o.stats.total_time.as_secs_f64() - ttft;
        let spec = o.stats.speculative.unwrap_or_default();
        println!(
            "{}",
            json!({"ttft_s": ttft, "decode_s": decode, "decoded": output.len().saturating_sub(1), "output": output,
                   "draft_tokens": spec.draft_tokens, "accepted_tokens": spec.accepted_tokens,
                   "target_forwards": o.stats.target_forwards, "tokens": output.len()})
        );
    }
}

/// The base's own loss on the generated text (nats per token).
fn nll(engine: &mut Engine, prompts: &[Vec<u32>], outcomes: &[Outcome]) -> f64 {
    let mut sum = 0.0;
    let mut tokens = 0;
    for (o, p) in outcomes.iter().zip(prompts) {
        let ids = with_eos(o);
        sum += engine.continuation_nll(p, &ids).expect("nll") * ids.len() as f64;
        tokens += ids.len();
    }
    sum / tokens as f64
}

/// The report of a run over every prompt.
fn report(prompts: &[Vec<u32>], outcomes: &[Outcome], nll: f64, loaded: &Loaded) -> Value {
    let tokens: usize = outcomes.iter().map(|o| o.token_ids.len() + o.eos_token.is_some() as usize).sum();
    let decode_s: f64 = outcomes.iter().map(|o| (o.stats.total_time - o.stats.time_to_first_token).as_secs_f64()).sum();
    let total_s: f64 = outcomes.iter().map(|o| o.stats.total_time.as_secs_f64()).sum();
    let speculative = || outcomes.iter().filter_map(|o| o.stats.speculative);
    let (judged, accepted) = speculative().fold((0, 0), |(d, a), s| (d + s.evaluated_tokens, a + s.accepted_tokens));
    let acceptance = if judged == 0 { 0.0 } else { accepted as f64 / judged as f64 };
    let draft_ms: f64 = speculative().map(|s| s.draft_time.as_secs_f64() * 1000.0).sum();
    let verify_ms: f64 = speculative().map(|s| s.verify_time.as_secs_f64() * 1000.0).sum();
    let near_ties: usize = speculative().map(|s| s.near_tie_recomputes).sum();
    let near_ties_inside: usize = speculative().map(|s| s.near_ties_inside).sum();
    let tie_margin = speculative().map(|s| s.tie_margin).next_back().unwrap_or(0.0);
    let per_forward = tokens as f64 / outcomes.iter().map(|o| o.stats.target_forwards).sum::<usize>() as f64;
    // Multi-token models: KV entries stored per generated token, and the base's own loss on the
    // generated text (nats per token).
    let kv_generated: usize =
        outcomes.iter().zip(prompts).filter_map(|(o, p)| o.stats.multitoken.map(|m| m.kv_entries.saturating_sub(p.len()))).sum();
    let micro_ms: f64 = outcomes.iter().filter_map(|o| o.stats.multitoken).map(|m| m.micro_time.as_secs_f64() * 1000.0).sum();
    let base_ms: f64 = outcomes.iter().filter_map(|o| o.stats.multitoken).map(|m| m.base_time.as_secs_f64() * 1000.0).sum();
    json!({
        "engine": "edgellm",
        "int4_kernel": loaded.int4_kernel,
        "load_s": loaded.load_s,
        "rss_load_mib": loaded.rss_load_mib,
        // After every run: the load's peak or the runs', whichever is higher (KV, activations).
        "rss_peak_mib": loaded.peak_mib(),
        "ttft_ms": 1000.0 * outcomes.iter().map(|o| o.stats.time_to_first_token.as_secs_f64()).sum::<f64>() / outcomes.len() as f64,
        "decode_tps": outcomes.iter().map(|o| (o.token_ids.len() + o.eos_token.is_some() as usize).saturating_sub(1)).sum::<usize>() as f64 / decode_s,
        "e2e_tps": tokens as f64 / total_s,
        "tokens": tokens,
        "outputs": outcomes.iter().map(with_eos).collect::<Vec<_>>(),
        "acceptance_rate": acceptance,
        "tokens_per_target_forward": per_forward,
        "draft_ms": draft_ms,
        "verify_ms": verify_ms,
        "near_tie_recomputes": near_ties,
        "near_ties_inside": near_ties_inside,
        "tie_margin": tie_margin,
        "target_forwards": outcomes.iter().map(|o| o.stats.target_forwards).sum::<usize>(),
        "total_ms": total_s * 1000.0,
        "kv_per_token": kv_generated as f64 / tokens as f64,
        "micro_ms": micro_ms,
        "base_ms": base_ms,
        "nll": nll,
    })
}
