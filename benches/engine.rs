//! `cargo bench --bench engine`: edgellm's engine against onnxruntime-genai on the same model,
//! prompts, greedy decoding and thread count, each in its own process; prints a table of load
//! time, load RSS, time to first token and decode speed, with ratios (edgellm / genai).
//!
//! Options: --model DIR (default models/kjv-target), --new-tokens N (128), --providers cpu,openvino,
//! --threads N, --no-speculative, --no-multitoken, --thresholds 0.7,0.5 (multi-token table),
//! --hamburger DIR (its model: models/kjv-hamburger; its plain row is --model's);
//! --providers none skips the first table; --forward-cost DIR,DIR adds a table of how a forward's
//! cost grows with its positions (what a speculative verify pays) and the int4 kernel's arithmetic
//! floor for one more position from this core's measured VNNI rate, --acceptance A (0.79) for it;
//! --work-per-token cpu,openvino adds a table of instructions per decoded token under callgrind;
//! --pair-rounds N (20): rounds of the paired rows, where both engines stay loaded and run each
//! prompt in turn (0 skips them); --streaming CALLS adds streamed Generate against Complete over
//! D-Bus (the daemon's own engine time, CALLS pairs per variant), --streaming-variants
//! THREADS:on|runs|off[:MS],... (intra-op threads and spinning: on, only during a run
//! (spin_between_runs = false), off; MS the daemon's token_interval_ms, its default when left
//! out; default 0:runs:0,0:runs,0:on,1:on);
//! --bandwidth adds the physical limit of plain decoding on --model: the machine's read
//! bandwidth, the weight bytes a token reads, and each engine's fraction of the bound (paired
//! rounds: --pair-rounds, at least 2);
//! --priority ROUNDS adds an interactive streamed request timed by its client on an idle daemon
//! and beside 4 background clients streaming 256-token generations, in alternating rounds;
//! --chat-reuse ROUNDS adds the last turn of a 4-turn chat (about 800 tokens of history), timed by
//! its client to the first `Token`, on the connection that ran the earlier turns (KV kept) and on
//! a fresh one, in alternating pairs; --load-rounds N adds loading alone (a new process per load,
//! N rounds): time and peak RSS of edgellm (its own map of the weights), edgellm with ONNX
//! Runtime reading the file (--weights file in the children), and onnxruntime-genai.
//! EDGELLM_BENCH_SPIN_BETWEEN_RUNS=1 gives the engine children
//! ONNX Runtime's default of spinning on after each run (edgellm's default stops it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use edgellm::engine::{CancelToken, Engine, GenerateOptions, LoadOptions, Prompt};
use edgellm::runtime::{Int4Choice, Provider, Runtime, SessionOptions, WeightLoading};
use serde_json::{json, Value};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The generated ids with the eos token, as onnxruntime-genai reports them.
fn output_ids(o: &edgellm::engine::Outcome) -> Vec<u32> {
    o.token_ids.iter().copied().chain(o.eos_token).collect()
}

/// EDGELLM_BENCH_INT4=edgellm|onnxruntime: who runs the int4 products (default: auto, edgellm's where it runs).
fn int4_choice() -> Int4Choice {
    match std::env::var("EDGELLM_BENCH_INT4").as_deref() {
        Ok("edgellm") => Int4Choice::Edgellm,
        Ok("onnxruntime") => Int4Choice::OnnxRuntime,
        _ => Int4Choice::Auto,
    }
}

/// Our side, in a child process so that its RSS is its own.
fn child(args: &[String]) {
    let model = PathBuf::from(arg(args, "--model").unwrap());
    let new_tokens: usize = arg(args, "--new-tokens").unwrap().parse().unwrap();
    let prompts: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(arg(args, "--prompts").unwrap()).unwrap()).unwrap();
    let provider = Provider::parse(&arg(args, "--provider").unwrap()).unwrap();
    let weights = match arg(args, "--weights").as_deref() {
        Some("file") => WeightLoading::File,
        Some("mapped") => WeightLoading::Mapped,
        _ => WeightLoading::default(),
    };
    let runtime = Runtime::load(None).expect("runtime");
    let kv_layout = match arg(args, "--kv").as_deref() {
        Some("growing") => Some(edgellm::engine::KvLayout::Growing),
        Some("shared") => Some(edgellm::engine::KvLayout::Shared),
        _ => None,
    };
    let rss_before = rss_kib("VmRSS");
    let started = Instant::now();
    let threads: usize = arg(args, "--threads").map(|t| t.parse().unwrap()).unwrap_or(0);
    let options = LoadOptions {
        // EDGELLM_BENCH_SPIN_BETWEEN_RUNS=1: ONNX Runtime's default spinning after each run.
        session: SessionOptions {
            providers: vec![provider],
            strict: true,
            weights,
            threads,
            spin_between_runs: std::env::var_os("EDGELLM_BENCH_SPIN_BETWEEN_RUNS").is_some_and(|v| v == "1"),
            int4: int4_choice(),
            ..Default::default()
        },
        kv_layout,
    };
    let mut engine = Engine::load(&runtime, "bench", &model, &options).expect("load");
    eprintln!("int4 matrix products: {}", engine.provider().int4);
    if let Some(draft) = arg(args, "--draft") {
        let folder = edgellm::model::ModelFolder::open(Path::new(&draft)).expect("draft folder");
        let k: usize = arg(args, "--k").map(|k| k.parse().unwrap()).unwrap_or(8);
        let cost_aware = !args.iter().any(|a| a == "--by-acceptance");
        let settings = edgellm::speculative::Settings { min_tokens: 1, max_tokens: k, min_confidence: 0.0, cost_aware };
        engine.attach_draft(&runtime, &folder, &options, settings).expect("draft");
    }
    let load_s = started.elapsed().as_secs_f64();
    let rss_load_mib = (rss_kib("VmHWM") - rss_before) as f64 / 1024.0;
    let mut gen = GenerateOptions { max_new_tokens: Some(new_tokens), temperature: Some(0.0), ..Default::default() };
    if args.iter().any(|a| a == "--load-only") {
        // Ready to serve: the load and the first token of the first prompt (edgellm's int4 kernel
        // reads the weights in place, so the first run pays for their pages); the peak by then.
        let one = GenerateOptions { max_new_tokens: Some(1), ..gen.clone() };
        engine.generate(&Prompt::Tokens(prompts[0].clone()), &one, &CancelToken::new(), &mut |_| true).expect("first token");
        let ready_s = started.elapsed().as_secs_f64();
        let rss_ready_mib = (rss_kib("VmHWM") - rss_before) as f64 / 1024.0;
        println!("{}", json!({"load_s": load_s, "rss_load_mib": rss_load_mib, "ready_s": ready_s, "rss_ready_mib": rss_ready_mib}));
        return;
    }
    if args.iter().any(|a| a == "--prompt-lookup") {
        gen.prompt_lookup = Some(true);
    }
    if let Some(spec) = arg(args, "--multitoken") {
        // MODE[:THRESHOLD]; without a threshold, the model's default (greedy verify: by cost)
        let (mode, threshold) = spec.split_once(':').map_or((spec.as_str(), None), |(m, t)| (m, Some(t)));
        gen.multitoken_mode = Some(edgellm::multitoken::Mode::parse(mode).expect("trust or verify"));
        gen.multitoken_threshold = threshold.map(|t| t.parse().expect("threshold"));
    }
    let mut run =
        |ids: &Vec<u32>| engine.generate(&Prompt::Tokens(ids.clone()), &gen, &CancelToken::new(), &mut |_| true).expect("generate");
    run(&prompts[0]); // warm-up
    if args.iter().any(|a| a == "--serve") {
        // The paired table: the parent alternates the engines prompt by prompt.
        println!("{}", json!({"ready": true}));
        for line in std::io::stdin().lines() {
            let o = run(&prompts[line.expect("stdin").trim().parse::<usize>().expect("prompt index")]);
            let output = output_ids(&o);
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
        return;
    }
    let outcomes: Vec<_> = prompts.iter().map(&mut run).collect();
    let tokens: usize = outcomes.iter().map(|o| o.token_ids.len() + o.eos_token.is_some() as usize).sum();
    let decode_s: f64 = outcomes.iter().map(|o| (o.stats.total_time - o.stats.time_to_first_token).as_secs_f64()).sum();
    let total_s: f64 = outcomes.iter().map(|o| o.stats.total_time.as_secs_f64()).sum();
    let (judged, accepted) =
        outcomes.iter().filter_map(|o| o.stats.speculative).fold((0, 0), |(d, a), s| (d + s.evaluated_tokens, a + s.accepted_tokens));
    let acceptance = if judged == 0 { 0.0 } else { accepted as f64 / judged as f64 };
    let draft_ms: f64 = outcomes.iter().filter_map(|o| o.stats.speculative).map(|s| s.draft_time.as_secs_f64() * 1000.0).sum();
    let verify_ms: f64 = outcomes.iter().filter_map(|o| o.stats.speculative).map(|s| s.verify_time.as_secs_f64() * 1000.0).sum();
    let near_ties: usize = outcomes.iter().filter_map(|o| o.stats.speculative).map(|s| s.near_tie_recomputes).sum();
    let near_ties_inside: usize = outcomes.iter().filter_map(|o| o.stats.speculative).map(|s| s.near_ties_inside).sum();
    let tie_margin = outcomes.iter().filter_map(|o| o.stats.speculative).map(|s| s.tie_margin).last().unwrap_or(0.0);
    let per_forward = tokens as f64 / outcomes.iter().map(|o| o.stats.target_forwards).sum::<usize>() as f64;
    // Multi-token models: KV entries stored per generated token, and the base's own loss on the
    // generated text (nats per token).
    let kv_generated: usize =
        outcomes.iter().zip(&prompts).filter_map(|(o, p)| o.stats.multitoken.map(|m| m.kv_entries.saturating_sub(p.len()))).sum();
    let micro_ms: f64 = outcomes.iter().filter_map(|o| o.stats.multitoken).map(|m| m.micro_time.as_secs_f64() * 1000.0).sum();
    let base_ms: f64 = outcomes.iter().filter_map(|o| o.stats.multitoken).map(|m| m.base_time.as_secs_f64() * 1000.0).sum();
    let nll = if arg(args, "--nll").is_some() {
        let mut sum = 0.0;
        for (o, p) in outcomes.iter().zip(&prompts) {
            let mut ids = o.token_ids.clone();
            ids.extend(o.eos_token);
            sum += engine.continuation_nll(p, &ids).expect("nll") * ids.len() as f64;
        }
        sum / tokens as f64
    } else {
        0.0
    };
    let report = json!({
        "engine": "edgellm",
        "load_s": load_s,
        "rss_load_mib": rss_load_mib,
        // After every run: the load's peak or the runs', whichever is higher (KV, activations).
        "rss_peak_mib": (rss_kib("VmHWM") - rss_before) as f64 / 1024.0,
        "ttft_ms": 1000.0 * outcomes.iter().map(|o| o.stats.time_to_first_token.as_secs_f64()).sum::<f64>() / outcomes.len() as f64,
        "decode_tps": outcomes.iter().map(|o| (o.token_ids.len() + o.eos_token.is_some() as usize).saturating_sub(1)).sum::<usize>() as f64 / decode_s,
        "e2e_tps": tokens as f64 / total_s,
        "tokens": tokens,
        "outputs": outcomes.iter().map(output_ids).collect::<Vec<_>>(),
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
    });
    println!("{report}");
}

/// Runs every measuring child of a table `REPEATS` times, in rounds (each round runs all of them
/// once, so a change of load on this shared machine hits every row alike), and keeps each one's
/// run with the median decode speed: single runs vary by 10-30%.
const REPEATS: usize = 3;

fn run_interleaved(mut cmds: Vec<Command>) -> Vec<Value> {
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); cmds.len()];
    // Each round starts at another row, so that no row always runs first (or right after the
    // same neighbour) on this shared machine.
    let n = cmds.len();
    for round in 0..REPEATS {
        for i in (0..n).map(|i| (i + round) % n) {
            runs[i].push(run_once(&mut cmds[i]));
        }
    }
    runs.into_iter()
        .map(|mut r| {
            r.sort_by(|a, b| a["decode_tps"].as_f64().unwrap().total_cmp(&b["decode_tps"].as_f64().unwrap()));
            r.swap_remove(REPEATS / 2)
        })
        .collect()
}

fn run_once(cmd: &mut Command) -> Value {
    let out = cmd.output().expect("spawn");
    if !out.status.success() {
        panic!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// What a measured child of either engine runs on: model, provider, new tokens, intra-op threads
/// and prompts, the same for both.
struct Workload<'a> {
    model: &'a Path,
    provider: &'a str,
    new_tokens: &'a str,
    threads: &'a str,
    prompts: &'a Path,
}

impl<'a> Workload<'a> {
    fn on_cpu(model: &'a Path, new_tokens: &'a str, threads: &'a str, prompts: &'a Path) -> Workload<'a> {
        Workload { model, provider: "cpu", new_tokens, threads, prompts }
    }

    /// edgellm: this bench's `--child` mode, with `launcher` (this binary, or valgrind before it).
    fn edgellm(&self, mut launcher: Command, weights: &str) -> Command {
        launcher.args(["--child", "--model"]).arg(self.model);
        launcher.args(["--provider", self.provider, "--new-tokens", self.new_tokens, "--threads", self.threads, "--weights", weights]);
        launcher.arg("--prompts").arg(self.prompts);
        launcher
    }

    /// onnxruntime-genai: benches/genai_bench.py, with `launcher` (the venv's Python, or valgrind
    /// before it).
    fn genai(&self, mut launcher: Command) -> Command {
        launcher.arg(root().join("benches/genai_bench.py")).arg("--model").arg(self.model);
        launcher.args(["--provider", self.provider, "--new-tokens", self.new_tokens, "--threads", self.threads, "--plugin"]);
        launcher.arg(root().join(".edgellm/runtime/libonnxruntime_providers_openvino_plugin.so"));
        launcher.arg("--prompts").arg(self.prompts);
        launcher
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--child") {
        return child(&args);
    }
    let model = arg(&args, "--model").map(PathBuf::from).unwrap_or_else(|| root().join("models/kjv-target"));
    let new_tokens = arg(&args, "--new-tokens").unwrap_or_else(|| "128".into());
    let providers = arg(&args, "--providers").unwrap_or_else(|| "cpu,openvino".into());
    // The same intra-op threads for both engines. Default 0: ONNX Runtime's own default pool in
    // both (onnxruntime-genai would otherwise pick half the cores, edgellm ONNX Runtime's default).
    let threads = arg(&args, "--threads").unwrap_or_else(|| "0".into());
    let pair_rounds: usize = arg(&args, "--pair-rounds").map(|r| r.parse().expect("--pair-rounds N")).unwrap_or(20);
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/reference_outputs.json")).unwrap()).unwrap();
    let name = model.file_name().unwrap().to_string_lossy().to_string();
    let prompts: Vec<Value> = refs["models"][&name]
        .as_array()
        .or(refs["models"]["kjv-target"].as_array())
        .unwrap()
        .iter()
        .map(|c| c["prompt_ids"].clone())
        .collect();
    let prompts_file = std::env::temp_dir().join(format!("edgellm-bench-prompts-{}.json", std::process::id()));
    std::fs::write(&prompts_file, serde_json::to_string(&prompts).unwrap()).unwrap();
    let python = root().join(".edgellm/venv/bin/python");
    let me = std::env::current_exe().unwrap();
    println!(
        "model {} | {} prompts | {new_tokens} new tokens, greedy | intra-op threads {threads} in both (0 = ONNX Runtime's default) | {} cores",
        model.display(),
        prompts.len(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    // The weights on disk, against which resident memory is told.
    let weight_bytes: u64 = std::fs::read_dir(&model)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".onnx.data"))
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0);
    let weight_mib = weight_bytes as f64 / (1024.0 * 1024.0);
    println!(
        "{:<10} {:<18} {:>8} {:>12} {:>9} {:>11} {:>9} {:>13} {:>10}",
        "provider", "engine", "load s", "load RSS MiB", "TTFT ms", "decode t/s", "e2e t/s", "peak RSS MiB", "x weights"
    );
    for provider in providers.split(',').filter(|p| !p.is_empty() && *p != "none") {
        if provider == "openvino" {
            let runtime = Runtime::load(None).expect("runtime");
            if !runtime.openvino_device_types().iter().any(|t| t == "CPU") {
                println!(
                    "{provider:<10} skipped: the OpenVINO plugin offers no CPU device here (CPU vendor {:?}); --work-per-token openvino counts its work under valgrind",
                    runtime.cpu_vendor()
                );
                continue;
            }
        }
        let work = Workload { model: &model, provider, new_tokens: &new_tokens, threads: &threads, prompts: &prompts_file };
        let mut cmds = vec![work.genai(Command::new(&python)), work.edgellm(Command::new(&me), "default")];
        if provider == "cpu" {
            cmds.push(work.edgellm(Command::new(&me), "file"));
        }
        let mut results = run_interleaved(cmds).into_iter();
        let (genai, edgellm, ort_file) = (results.next().unwrap(), results.next().unwrap(), results.next());
        let row = |label: &str, r: &Value| {
            println!(
                "{:<10} {:<18} {:>8.3} {:>12.1} {:>9.2} {:>11.1} {:>9.1} {:>13.1} {:>10}",
                provider,
                label,
                r["load_s"].as_f64().unwrap(),
                r["rss_load_mib"].as_f64().unwrap(),
                r["ttft_ms"].as_f64().unwrap(),
                r["decode_tps"].as_f64().unwrap(),
                r["e2e_tps"].as_f64().unwrap(),
                r["rss_peak_mib"].as_f64().unwrap(),
                // Load RSS against the weight files (model.onnx.data) on disk.
                if weight_mib > 0.0 { format!("{:.3}", r["rss_load_mib"].as_f64().unwrap() / weight_mib) } else { "-".into() }
            );
        };
        row("onnxruntime-genai", &genai);
        row("edgellm", &edgellm);
        if let Some(m) = &ort_file {
            row("edgellm (ORT file)", m);
        }
        let ratio = |k: &str| edgellm[k].as_f64().unwrap() / genai[k].as_f64().unwrap();
        println!(
            "{:<10} {:<18} {:>8.2} {:>12.2} {:>9.2} {:>11.2} {:>9.2}   (edgellm / genai; want decode >= 1, TTFT <= 1)",
            provider,
            "ratio",
            ratio("load_s"),
            ratio("rss_load_mib"),
            ratio("ttft_ms"),
            ratio("decode_tps"),
            ratio("e2e_tps")
        );
        let same = edgellm["outputs"] == genai["outputs"];
        println!("{:<10} greedy outputs identical to onnxruntime-genai: {same}", provider);
        if pair_rounds > 0 {
            paired_rows(&work, &me, &python, prompts.len(), pair_rounds);
        }
    }
    if !args.iter().any(|a| a == "--no-speculative") {
        speculative_table(&me, &python, &model, &prompts_file, &new_tokens, &threads);
    }
    if !args.iter().any(|a| a == "--no-prompt-lookup") {
        prompt_lookup_rows(&me, &model, &prompts, &new_tokens, &threads, pair_rounds.max(1));
    }
    if let Some(models) = arg(&args, "--forward-cost") {
        let acceptance: f64 = arg(&args, "--acceptance").map(|a| a.parse().expect("--acceptance A")).unwrap_or(0.79);
        let models: Vec<PathBuf> = models.split(',').map(PathBuf::from).collect();
        forward_cost_table(&python, &models, threads.parse().expect("--threads N"), acceptance);
    }
    if let Some(providers) = arg(&args, "--work-per-token") {
        let first_prompt = std::env::temp_dir().join(format!("edgellm-bench-prompt-{}.json", std::process::id()));
        std::fs::write(&first_prompt, serde_json::to_string(&prompts[..1]).unwrap()).unwrap();
        work_per_token_table(&me, &python, &model, &providers, &first_prompt);
        let _ = std::fs::remove_file(&first_prompt);
    }
    if !args.iter().any(|a| a == "--no-multitoken") {
        let thresholds = arg(&args, "--thresholds").unwrap_or_else(|| "0.7,0.5".into());
        let hamburger = arg(&args, "--hamburger").map(PathBuf::from).unwrap_or_else(|| root().join("models/kjv-hamburger"));
        multitoken_table(&me, &model, &hamburger, &prompts_file, &new_tokens, &threads, &thresholds);
    }
    if let Some(rounds) = arg(&args, "--load-rounds") {
        load_table(&me, &python, &model, &threads, &prompts_file, rounds.parse().expect("--load-rounds N"));
    }
    if let Some(calls) = arg(&args, "--streaming") {
        let variants = arg(&args, "--streaming-variants").unwrap_or_else(|| "0:runs:0,0:runs,0:on,1:on".into());
        streaming_table(&model, new_tokens.parse().expect("--new-tokens N"), calls.parse().expect("--streaming CALLS"), &variants);
    }
    if args.iter().any(|a| a == "--bandwidth") {
        bandwidth_table(&me, &python, &model, &new_tokens, &threads, &prompts_file, prompts.len(), pair_rounds.max(2));
    }
    if let Some(rounds) = arg(&args, "--priority") {
        priority_table(&model, rounds.parse().expect("--priority ROUNDS"));
    }
    if let Some(rounds) = arg(&args, "--chat-reuse") {
        chat_reuse_table(&model, rounds.parse().expect("--chat-reuse ROUNDS"));
    }
    let _ = std::fs::remove_file(Path::new(&prompts_file));
}

/// One engine's measuring child in `--serve` mode: loaded once, it runs the prompt it is told to.
struct Server {
    cmd: Command,
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Server {
    fn start(mut cmd: Command) -> Server {
        use std::process::Stdio;
        let mut child = cmd.arg("--serve").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn");
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut server = Server { cmd, child, stdin, stdout };
        assert_eq!(server.reply()["ready"], true);
        server
    }
    fn reply(&mut self) -> Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{:?}: {e}: {line:?}", self.cmd))
    }
    fn run(&mut self, prompt: usize) -> Value {
        use std::io::Write;
        writeln!(self.stdin, "{prompt}").expect("write");
        self.reply()
    }
}

/// Decode speed and time to first token measured in pairs: both engines load once, then run the
/// same prompt one right after the other, alternating which goes first. Load on this shared
/// machine moves single runs by 10-30% over seconds; within a pair it hits both engines alike.
/// The pause before each half of a pair (see paired_rows).
const PAIR_GAP: std::time::Duration = std::time::Duration::from_millis(150);

/// Returns each engine's decode speed over all its tokens: [onnxruntime-genai, edgellm].
fn paired_rows(work: &Workload, me: &Path, python: &Path, prompts: usize, rounds: usize) -> [f64; 2] {
    paired_rows_probed(work, me, python, prompts, rounds, &mut || {}).0
}

/// `paired_rows`, calling `before_pair` before each pair; also gives each pair's decode speeds
/// (genai, edgellm).
fn paired_rows_probed(
    work: &Workload,
    me: &Path,
    python: &Path,
    prompts: usize,
    rounds: usize,
    before_pair: &mut dyn FnMut(),
) -> ([f64; 2], Vec<[f64; 2]>) {
    let mut per_pair = Vec::new();
    let mut servers = [work.genai(Command::new(python)), work.edgellm(Command::new(me), "default")].map(Server::start);
    let (mut decode, mut ttft, mut identical) = (Vec::new(), Vec::new(), 0usize);
    let (mut decode_s, mut decoded) = ([0.0f64; 2], [0u64; 2]);
    for round in 0..rounds {
        for prompt in 0..prompts {
            let mut replies = [Value::Null, Value::Null];
            before_pair();
            let first = (round + prompt) % 2;
            for engine in [first, 1 - first] {
                // Let the other engine's ONNX Runtime pool stop spinning before this one starts.
                // onnxruntime-genai's spins on after its run: with 10 ms here, edgellm's TTFT
                // on the memory-bound twin measured 1.25x genai's in pairs, with 150 ms 0.95x.
                std::thread::sleep(PAIR_GAP);
                replies[engine] = servers[engine].run(prompt);
            }
            let f = |r: &Value, k: &str| r[k].as_f64().unwrap();
            for (i, r) in replies.iter().enumerate() {
                decode_s[i] += f(r, "decode_s");
                decoded[i] += r["decoded"].as_u64().unwrap();
            }
            let tps = |r: &Value| f(r, "decoded") / f(r, "decode_s");
            per_pair.push([tps(&replies[0]), tps(&replies[1])]);
            decode.push(tps(&replies[1]) / tps(&replies[0]));
            ttft.push(f(&replies[1], "ttft_s") / f(&replies[0], "ttft_s"));
            identical += usize::from(replies[0]["output"] == replies[1]["output"]);
        }
    }
    for mut server in servers {
        drop(server.stdin);
        server.child.wait().expect("wait");
    }
    let quartiles = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        (v[n / 4], v[n / 2], v[(3 * n) / 4])
    };
    let faster = decode.iter().filter(|&&r| r > 1.0).count() as f64 / decode.len() as f64;
    let (d25, d50, d75) = quartiles(&mut decode);
    let (t25, t50, t75) = quartiles(&mut ttft);
    let total = (decoded[1] as f64 / decode_s[1]) / (decoded[0] as f64 / decode_s[0]);
    println!(
        "{:<10} paired, {} prompts each run by both engines in turn: decode edgellm / genai median {d50:.3} (quartiles {d25:.3}-{d75:.3}; edgellm faster in {:.0}%), all tokens {total:.3}; TTFT median {t50:.2} ({t25:.2}-{t75:.2}); outputs identical in {identical} of {} pairs (where edgellm's int4 kernel runs, it sums in another order than onnxruntime-genai's: the tests check that the rest part at a near tie)",
        work.provider,
        decode.len(),
        100.0 * faster,
        decode.len()
    );
    ([decoded[0] as f64 / decode_s[0], decoded[1] as f64 / decode_s[1]], per_pair)
}

/// Prompt lookup against plain decoding of the same model, in paired alternating rounds (both
/// load once; each prompt runs on one, then the other, the order alternating), on the reference
/// prompts and on prompts that quote themselves (tests/quoting_prompts.json), where its drafts
/// are accepted. Per prompt group: the decode speed ratio's median and quartiles over rounds x
/// prompts, acceptance and tokens per target forward; per quoting prompt, its own.
fn prompt_lookup_rows(me: &Path, model: &Path, reference: &[Value], new_tokens: &str, threads: &str, rounds: usize) {
    let folder = edgellm::model::ModelFolder::open(model).expect("model folder");
    let quoting: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/quoting_prompts.json")).unwrap()).unwrap();
    let quoting: Vec<Value> = quoting["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!(folder.tokenizer.encode_prompt(p.as_str().unwrap()).expect("tokenize")))
        .collect();
    let mut all: Vec<Value> = reference.to_vec();
    all.extend(quoting.iter().cloned());
    let prompts_file = std::env::temp_dir().join(format!("edgellm-bench-lookup-{}.json", std::process::id()));
    std::fs::write(&prompts_file, serde_json::to_string(&all).unwrap()).unwrap();
    let work = Workload::on_cpu(model, new_tokens, threads, &prompts_file);
    let mut lookup = work.edgellm(Command::new(me), "default");
    lookup.arg("--prompt-lookup");
    let mut servers = [work.edgellm(Command::new(me), "default"), lookup].map(Server::start);
    // Per prompt: speed ratios over rounds, and the lookup run's drafts, accepted, tokens, forwards.
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
    let mut counts = vec![[0u64; 4]; all.len()];
    let mut same = vec![true; all.len()];
    for round in 0..rounds {
        for prompt in 0..all.len() {
            let mut replies = [Value::Null, Value::Null];
            let first = (round + prompt) % 2;
            for engine in [first, 1 - first] {
                std::thread::sleep(std::time::Duration::from_millis(10));
                replies[engine] = servers[engine].run(prompt);
            }
            let tps = |r: &Value| r["decoded"].as_f64().unwrap() / r["decode_s"].as_f64().unwrap();
            ratios[prompt].push(tps(&replies[1]) / tps(&replies[0]));
            same[prompt] &= replies[0]["output"] == replies[1]["output"];
            for (c, k) in counts[prompt].iter_mut().zip(["draft_tokens", "accepted_tokens", "tokens", "target_forwards"]) {
                *c += replies[1][k].as_u64().unwrap();
            }
        }
    }
    for mut server in servers {
        drop(server.stdin);
        server.child.wait().expect("wait");
    }
    let _ = std::fs::remove_file(&prompts_file);
    let quartiles = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        (v[n / 4], v[n / 2], v[(3 * n) / 4])
    };
    println!();
    println!(
        "prompt lookup (ngram 3, max draft 8) vs plain, {}, cpu, greedy, {rounds} paired rounds per prompt (order alternating)",
        model.file_name().unwrap().to_string_lossy()
    );
    println!(
        "{:<34} {:>8} {:>10} {:>14} {:>10} {:>18} {:>14}",
        "prompts", "accept", "drafted", "tok/target fwd", "x plain", "x plain quartiles", "lowest prompt"
    );
    let row = |label: &str, range: std::ops::Range<usize>| {
        let c = range.clone().fold([0u64; 4], |mut t, p| {
            for (t, c) in t.iter_mut().zip(counts[p]) {
                *t += c;
            }
            t
        });
        let (q1, median, q3) = quartiles(range.clone().flat_map(|p| ratios[p].clone()).collect());
        // The goal is per prompt: the slowest prompt's median over its rounds (the mean of the
        // middle two for an even count, so that two rounds give their mean, not the faster).
        let median_of = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 0 {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            } else {
                v[n / 2]
            }
        };
        let lowest = range.map(|p| median_of(ratios[p].clone())).fold(f64::INFINITY, f64::min);
        println!(
            "{label:<34} {:>8.3} {:>10} {:>14.2} {median:>10.3} {:>18} {lowest:>14.3}",
            if c[0] == 0 { 0.0 } else { c[1] as f64 / c[0] as f64 },
            c[0] / rounds as u64,
            c[2] as f64 / c[3] as f64,
            format!("{q1:.3}-{q3:.3}")
        );
    };
    row(&format!("reference ({})", reference.len()), 0..reference.len());
    for (i, p) in (reference.len()..all.len()).enumerate() {
        row(&format!("quoting #{}", i + 1), p..p + 1);
    }
    println!(
        "greedy outputs identical to plain on {} of {} prompts (the tests check that the others part at a near tie); drafted = draft tokens per run",
        same.iter().filter(|&&s| s).count(),
        same.len()
    );
}

/// Instructions per decoded token of each engine, counted by callgrind: repeatable where wall time
/// on these shared machines is not, and valgrind's CPUID says GenuineIntel, so the OpenVINO plugin
/// offers its CPU device under it even on an AMD CPU. Each engine generates for one prompt (after
/// a warm-up run of it) at two lengths; the difference in instructions over the difference in
/// tokens is the cost of one decode step, with loading and prefill cancelled out. One intra-op
/// thread in both (valgrind runs threads one at a time, and idle pools spin).
fn work_per_token_table(me: &Path, python: &Path, model: &Path, providers: &str, prompt_file: &Path) {
    const LENGTHS: [usize; 2] = [16, 64];
    const WORK_REPEATS: usize = 3;
    let callgrind = |program: &Path| {
        let mut cmd = Command::new("valgrind");
        cmd.args(["--tool=callgrind", "--callgrind-out-file=/dev/null"]).arg(program);
        cmd
    };
    // The instructions callgrind collected, and the tokens the measured (second) run generated.
    let count = |mut cmd: Command| -> std::thread::JoinHandle<(u64, u64)> {
        std::thread::spawn(move || {
            let out = cmd.output().expect("valgrind (Debian's valgrind package)");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{cmd:?}: {stderr}");
            let collected = stderr
                .lines()
                .find_map(|l| l.split_once("Collected :").map(|(_, n)| n.trim().parse::<u64>().unwrap()))
                .unwrap_or_else(|| panic!("no callgrind total in: {stderr}"));
            let report: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
            (collected, report["tokens"].as_u64().unwrap())
        })
    };
    println!();
    println!(
        "work per decoded token (callgrind instructions, 1 thread, first prompt, {} vs {} new tokens, median of {WORK_REPEATS})",
        LENGTHS[0], LENGTHS[1]
    );
    println!("{:<10} {:<18} {:>16} {:>10}", "provider", "engine", "instr/token", "x genai");
    for provider in providers.split(',') {
        let per_token: Vec<f64> = ["genai", "edgellm"]
            .iter()
            .map(|engine| {
                let command = |n: usize| {
                    let n = n.to_string();
                    let work = Workload { model, provider, new_tokens: &n, threads: "1", prompts: prompt_file };
                    if *engine == "genai" {
                        let mut python = callgrind(python);
                        python.env("OPENBLAS_NUM_THREADS", "1"); // numpy's BLAS pool would spin under valgrind
                        work.genai(python)
                    } else {
                        work.edgellm(callgrind(me), "default")
                    }
                };
                // Both lengths at once (valgrind keeps to one core), WORK_REPEATS times; the
                // median count of each length (a rare run of onnxruntime-genai counts 5% more).
                let mut counts: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
                for _ in 0..WORK_REPEATS {
                    let handles = LENGTHS.map(|n| count(command(n)));
                    for (runs, handle) in counts.iter_mut().zip(handles) {
                        runs.push(handle.join().unwrap());
                    }
                }
                let [(short_instr, short_tokens), (long_instr, long_tokens)] = counts.map(|mut runs| {
                    runs.sort();
                    runs[runs.len() / 2]
                });
                assert!(long_tokens > short_tokens, "{engine}: the prompt ended before {} tokens", LENGTHS[0]);
                // Each run generates the prompt twice (the warm-up and the measured run).
                (long_instr as f64 - short_instr as f64) / (2 * (long_tokens - short_tokens)) as f64
            })
            .collect();
        println!("{:<10} {:<18} {:>16.0} {:>10}", provider, "onnxruntime-genai", per_token[0], "1.00");
        println!("{:<10} {:<18} {:>16.0} {:>10.3}", provider, "edgellm", per_token[1], per_token[1] / per_token[0]);
    }
}

/// The HAMburger-style model (`--hamburger`: kjv-hamburger, or its memory-bound twin) in both
/// modes at two thresholds, against plain decoding of its own base (one token per step) and of
/// `--model`.
fn multitoken_table(me: &Path, target: &Path, hamburger: &Path, prompts_file: &Path, new_tokens: &str, threads: &str, thresholds: &str) {
    let ours = |model: &Path, multitoken: Option<&str>| {
        let mut cmd = Workload::on_cpu(model, new_tokens, threads, prompts_file).edgellm(Command::new(me), "default");
        cmd.args(["--nll", "1"]);
        if let Some(m) = multitoken {
            cmd.args(["--multitoken", m]);
        }
        cmd
    };
    let target_name = target.file_name().unwrap().to_string_lossy().to_string();
    let mut labels = vec![format!("{target_name} plain"), "base alone (1 token/step)".to_string()];
    let mut cmds = vec![ours(target, None), ours(hamburger, Some("trust:1"))];
    for threshold in thresholds.split(',') {
        for mode in ["trust", "verify"] {
            labels.push(format!("{mode} @ {threshold}"));
            cmds.push(ours(hamburger, Some(&format!("{mode}:{threshold}"))));
        }
    }
    // Verify mode's default: lengths by what the micro tokens are worth (decode::cost).
    labels.push("verify by cost (default)".to_string());
    cmds.push(ours(hamburger, Some("verify")));
    let rows: Vec<(String, Value)> = labels.into_iter().zip(run_interleaved(cmds)).collect();
    let (target_plain, base_plain) = (rows[0].1.clone(), rows[1].1.clone());
    println!();
    println!(
        "multi-token steps, {} (base = its own base, one token per step), cpu, greedy",
        hamburger.file_name().unwrap().to_string_lossy()
    );
    println!(
        "{:<26} {:>11} {:>13} {:>12} {:>10} {:>11} {:>13} {:>10} {:>7}",
        "decoding", "decode t/s", "tok/base fwd", "KV/token", "x base", "x target", "base nll", "same text", "micro%"
    );
    let base_tps = base_plain["decode_tps"].as_f64().unwrap();
    let target_tps = target_plain["decode_tps"].as_f64().unwrap();
    for (label, r) in &rows {
        let tps = r["decode_tps"].as_f64().unwrap();
        let total = r["total_ms"].as_f64().unwrap();
        println!(
            "{:<26} {:>11.1} {:>13.2} {:>12.2} {:>10.2} {:>11.2} {:>13.3} {:>10} {:>6.0}%",
            label,
            tps,
            r["tokens_per_target_forward"].as_f64().unwrap_or(0.0),
            r["kv_per_token"].as_f64().unwrap_or(0.0),
            tps / base_tps,
            tps / target_tps,
            r["nll"].as_f64().unwrap_or(0.0),
            r["outputs"] == base_plain["outputs"],
            100.0 * r["micro_ms"].as_f64().unwrap_or(0.0) / total
        );
    }
    println!("base nll: the model's own loss (nats/token) on the text it generated; {target_name}'s row is under {target_name}");
}

/// Plain and speculative decoding of the committed pair, ours and onnxruntime-genai's.
/// `target` with kjv-draft: kjv-target, or its memory-bound twin (`models/build.sh --xl` writes
/// the twin and onnxruntime-genai's folder of the pair, kjv-speculative-xl, beside it).
fn speculative_table(me: &Path, python: &Path, target: &Path, prompts_file: &Path, new_tokens: &str, threads: &str) {
    let target = target.to_path_buf();
    let draft = root().join("models/kjv-draft");
    let pair =
        if target.ends_with("kjv-target-xl") { target.with_file_name("kjv-speculative-xl") } else { root().join("models/kjv-speculative") };
    // k: the most drafts a round holds; "acceptance": lengths by acceptance alone (AdaptiveK)
    // instead of edgellm's default, by what drafts are worth here (decode::cost::CostModel).
    let ours = |draft: Option<&Path>, k: &str| {
        let mut cmd = Workload::on_cpu(&target, new_tokens, threads, prompts_file).edgellm(Command::new(me), "default");
        cmd.args(["--k", k.trim_end_matches("acceptance")]);
        if k.ends_with("acceptance") {
            cmd.arg("--by-acceptance");
        }
        if let Some(d) = draft {
            cmd.arg("--draft").arg(d);
        }
        cmd
    };
    let genai = |model: &Path, spec: bool| {
        let mut cmd = Workload::on_cpu(model, new_tokens, threads, prompts_file).genai(Command::new(python));
        if spec {
            cmd.arg("--speculative");
        }
        cmd
    };
    let labels = [
        "edgellm plain",
        "edgellm spec k<=8",
        "edgellm k<=16",
        "by acceptance k<=8",
        "by acceptance k<=4",
        "genai plain",
        "genai spec k=4",
    ];
    let cmds = vec![
        ours(None, "8"),
        ours(Some(&draft), "8"),
        ours(Some(&draft), "16"),
        ours(Some(&draft), "8acceptance"),
        ours(Some(&draft), "4acceptance"),
        genai(&target, false),
        genai(&pair, true),
    ];
    let rows: Vec<(&str, Value)> = labels.into_iter().zip(run_interleaved(cmds)).collect();
    let plain = rows[0].1.clone();
    println!();
    println!("speculative decoding, {} with kjv-draft, cpu, greedy", target.file_name().unwrap().to_string_lossy());
    println!(
        "{:<20} {:>11} {:>10} {:>14} {:>12} {:>12} {:>10}",
        "engine", "decode t/s", "accept", "tok/target fwd", "x our plain", "x genai spec", "same as plain"
    );
    let genai_spec = rows[6].1["decode_tps"].as_f64().unwrap();
    // Prompts whose greedy output equals our plain decoding's (the tests check that the others
    // part at a near tie).
    let same = |r: &Value| -> String {
        let (a, b) = (r["outputs"].as_array(), plain["outputs"].as_array());
        match (a, b) {
            (Some(a), Some(b)) => format!("{}/{}", a.iter().zip(b).filter(|(x, y)| x == y).count(), b.len()),
            _ => "-".into(),
        }
    };
    for (label, r) in &rows {
        let tps = r["decode_tps"].as_f64().unwrap();
        println!(
            "{:<20} {:>11.1} {:>10.3} {:>14.2} {:>12.2} {:>12.2} {:>10}",
            label,
            tps,
            r["acceptance_rate"].as_f64().unwrap_or(0.0),
            r["tokens_per_target_forward"].as_f64().unwrap_or(0.0),
            tps / plain["decode_tps"].as_f64().unwrap(),
            tps / genai_spec,
            same(r)
        );
    }
    println!("where the time of our speculative runs goes (share of total generation time):");
    for (label, r) in rows.iter().filter(|(l, _)| !l.starts_with("genai") && *l != "edgellm plain") {
        let total = r["total_ms"].as_f64().unwrap();
        let (draft, verify) = (r["draft_ms"].as_f64().unwrap(), r["verify_ms"].as_f64().unwrap());
        println!(
            "{label:<20} draft forwards {:.0}%, target verify {:.0}%, prefill, sampling and bookkeeping {:.0}%; near-tie re-decisions {} of {} target forwards ({} inside a round, its rows after kept; margin at the end {:.3})",
            100.0 * draft / total,
            100.0 * verify / total,
            100.0 * (total - draft - verify) / total,
            r["near_tie_recomputes"],
            r["target_forwards"],
            r["near_ties_inside"],
            r["tie_margin"].as_f64().unwrap_or(0.0)
        );
    }
}

/// How the time of one forward grows with the positions it runs after a 64-token past: a
/// speculative verify runs k+1 of them where plain decoding runs one. From it, the speed-up that
/// speculative decoding with a fixed k can reach over plain decoding, if each draft token is
/// accepted with probability `acceptance` (tokens per verify (1 - a^(k+1)) / (1 - a)). The draft
/// costs kjv-draft's measured one-token forward beside kjv-target, and an eighth of the model's
/// own one-token forward beside any other model (as in real pairs).
fn forward_cost_table(python: &Path, models: &[PathBuf], threads: usize, acceptance: f64) {
    let runtime = Runtime::load(None).expect("runtime");
    let session = SessionOptions { providers: vec![Provider::Cpu], strict: true, threads, int4: int4_choice(), ..Default::default() };
    let positions = [1usize, 2, 3, 5, 9];
    let draft_dir = root().join("models/kjv-draft");
    let draft_one = forward_costs(&runtime, &draft_dir, &session, &[1])[0];
    println!();
    println!("forward cost by positions (cpu, after a 64-token past; median of 40 rounds); speculative ceiling at acceptance {acceptance}");
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11}",
        "model", "1 pos ms", "x2 pos", "x3 pos", "x5 pos", "x9 pos", "k=4 ceil", "k=8 ceil"
    );
    let tokens_per_verify = |k: i32| (1.0 - acceptance.powi(k + 1)) / (1.0 - acceptance);
    let mut slopes = Vec::new();
    for model in models {
        let costs = forward_costs(&runtime, model, &session, &positions);
        slopes.push((costs[4] - costs[3]) / 4.0);
        let one = costs[0];
        // kjv-draft drafts for kjv-target and its memory-bound twin.
        let draft = if model.to_string_lossy().contains("kjv-target") { draft_one } else { one / 8.0 };
        let ceiling = |k: i32, verify: f64| tokens_per_verify(k) * one / (verify + k as f64 * draft);
        println!(
            "{:<28} {:>9.3} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>11.2} {:>11.2}",
            model.file_name().unwrap().to_string_lossy(),
            one,
            costs[1] / one,
            costs[2] / one,
            costs[3] / one,
            costs[4] / one,
            ceiling(4, costs[3]),
            ceiling(8, costs[4])
        );
    }
    println!("kjv-draft one-token forward: {draft_one:.3} ms; ceiling = tokens per verify x one-token ms / (verify ms + k x draft ms)");
    if let Some(rates) = vnni_rates() {
        let cores = if threads > 0 { threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
        arithmetic_floor_rows(python, models, &slopes, rates, cores);
    }
}

/// What one more position of a forward costs at least in edgellm's int4 kernel, from this core's
/// measured instruction rates, beside the slope measured above. Per block of 32 weights in each
/// of 16 rows (512 weights) and position the kernel issues 8 VNNI dot products, a multiply of the
/// two blocks' scales and a fused multiply-add (and a convert, which `vnni_rates` finds on other
/// pipes or not).
fn arithmetic_floor_rows(python: &Path, models: &[PathBuf], slopes: &[f64], (vnni_ns, vnni_fma_ns): (f64, f64), cores: usize) {
    println!(
        "this core: a 512-bit VNNI dot product every {vnni_ns:.3} ns (12 independent sums), a VNNI and an FMA every {vnni_fma_ns:.3} ns (so they {} pipes)",
        if vnni_fma_ns > 1.5 * vnni_ns { "share" } else { "do not share" }
    );
    for (model, slope) in models.iter().zip(slopes) {
        let weights = weight_counts(python, model)["int4_weights"].as_f64().unwrap();
        // The multiply and the FMA take a VNNI's slot where they share its pipes.
        let slot = vnni_fma_ns / 2.0;
        let floor = weights / 512.0 * 10.0 * slot / cores as f64 / 1e6;
        println!(
            "{:<28} {:.0} M int4 weights: one more position >= {floor:.2} ms on {cores} cores at 10 such slots per 512 weights; measured (9-position minus 5-position forward) / 4: {slope:.2} ms",
            model.file_name().unwrap().to_string_lossy(),
            weights / 1e6
        );
    }
}

/// What `benches/weight_bytes.py` counts in a model folder: bytes a token reads, MLAS's packed
/// bytes, the file's bytes and the int4 weights.
fn weight_counts(python: &Path, model: &Path) -> Value {
    let out = Command::new(python).arg(root().join("benches/weight_bytes.py")).arg(model).output().expect("python");
    assert!(out.status.success(), "weight_bytes.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Nanoseconds per 512-bit VNNI (`vpdpbusd`) and per VNNI + FMA pair on one core, over twelve
/// independent accumulators (throughput, not latency); None without AVX-512 VNNI.
fn vnni_rates() -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512vnni") || !std::arch::is_x86_feature_detected!("avx512bw") {
            return None;
        }
        const STEPS: usize = 20_000_000;
        let time = |f: &dyn Fn() -> i64, ops: usize| {
            let started = Instant::now();
            std::hint::black_box(f());
            started.elapsed().as_secs_f64() * 1e9 / ops as f64
        };
        // SAFETY: the features were detected above.
        let vnni = time(&|| unsafe { vnni_loop(STEPS, false) }, STEPS * 12);
        // SAFETY: as above.
        let pair = time(&|| unsafe { vnni_loop(STEPS, true) }, STEPS * 12);
        Some((vnni, pair))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_loop(steps: usize, with_fma: bool) -> i64 {
    use std::arch::x86_64::*;
    let a = std::hint::black_box(_mm512_set1_epi8(3));
    let b = std::hint::black_box(_mm512_set1_epi8(5));
    let (x, y) = (std::hint::black_box(_mm512_set1_ps(0.999)), std::hint::black_box(_mm512_set1_ps(1e-3)));
    let mut sums = [_mm512_setzero_si512(); 12];
    let mut floats = [_mm512_setzero_ps(); 12];
    for _ in 0..steps {
        for sum in sums.iter_mut() {
            *sum = _mm512_dpbusd_epi32(*sum, a, b);
        }
        if with_fma {
            for f in floats.iter_mut() {
                *f = _mm512_fmadd_ps(*f, x, y);
            }
        }
    }
    let total = sums.iter().fold(_mm512_setzero_si512(), |t, s| _mm512_add_epi32(t, *s));
    let float = floats.iter().fold(_mm512_setzero_ps(), |t, f| _mm512_add_ps(t, *f));
    i64::from(_mm512_reduce_add_epi32(total)) + _mm512_reduce_add_ps(float) as i64
}

/// Median milliseconds of a forward over each number of `positions`, in rounds over all of them.
fn forward_costs(runtime: &Runtime, dir: &Path, session: &SessionOptions, positions: &[usize]) -> Vec<f64> {
    use edgellm::engine::{Decoder, KvLayout};
    const PAST: usize = 64;
    const ROUNDS: usize = 40;
    let folder = edgellm::model::ModelFolder::open(dir).expect("model folder");
    let decoder = Decoder::load(runtime, dir, &folder.config, session).expect("load");
    let layout = if folder.config.search.past_present_share_buffer { KvLayout::Shared } else { KvLayout::Growing };
    let mut cache = decoder.new_cache(layout, PAST + 16).expect("cache");
    // Any ids will do: only the time is measured.
    let ids: Vec<u32> = (0..PAST).map(|i| (i * 37 % decoder.vocab()) as u32).collect();
    decoder.forward(&mut cache, &ids, 1).expect("prefill");
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); positions.len()];
    for round in 0..ROUNDS + 3 {
        for (i, &n) in positions.iter().enumerate() {
            let started = Instant::now();
            decoder.forward(&mut cache, &ids[..n], n).expect("forward");
            if round >= 3 {
                times[i].push(started.elapsed().as_secs_f64() * 1000.0);
            }
            cache.truncate(PAST).expect("roll back");
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// A private dbus-daemon and an edgellmd on it, serving `model` as "kjv" with these intra-op
/// threads and spinning; both killed on drop.
struct BenchDaemon {
    _dir: tempfile::TempDir,
    address: String,
    bus: std::process::Child,
    daemon: std::process::Child,
}

impl BenchDaemon {
    /// `spin`: "on", "runs" (only during a run) or "off"; None leaves the daemon's defaults.
    fn start(model: &Path, threads: u32, spin: Option<&str>) -> BenchDaemon {
        Self::start_with(model, threads, spin, None)
    }

    /// `token_interval_ms`: the daemon's `[daemon]` key; None leaves its default.
    fn start_with(model: &Path, threads: u32, spin: Option<&str>, token_interval_ms: Option<u64>) -> BenchDaemon {
        use std::process::Stdio;
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:path={}", dir.path().join("bus").display());
        let conf = dir.path().join("bus.conf");
        std::fs::write(&conf, format!(r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>{address}</listen>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>"#)).unwrap();
        let bus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon");
        while !dir.path().join("bus").exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let config = dir.path().join("edgellm.toml");
        // The daemon reads a relative path against its config's folder.
        let model = &std::path::absolute(model).expect("model path");
        let spinning = spin.map(|s| format!("spinning = {}\nspin_between_runs = {}\n", s != "off", s == "on")).unwrap_or_default();
        let interval = token_interval_ms.map(|ms| format!("token_interval_ms = {ms}\n")).unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "[daemon]\naddress = \"{address}\"\n{interval}\n[[model]]\nname = \"kjv\"\npath = \"{}\"\nthreads = {threads}\n{spinning}",
                model.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("edgellmd.log");
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_edgellmd"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("edgellmd");
        // Ready when the model answers as loaded.
        loop {
            if let Some(status) = daemon.try_wait().unwrap() {
                panic!("edgellmd exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            let out = Command::new("busctl")
                .arg(format!("--address={address}"))
                .args(["call", "org.edgellm.Daemon1", "/org/edgellm/Daemon1", "org.edgellm.Daemon1", "ListModels"])
                .output()
                .unwrap();
            let listed = String::from_utf8_lossy(&out.stdout);
            if listed.contains("ready") {
                break;
            }
            assert!(
                !listed.contains("failed"),
                "edgellmd could not load {}: {}",
                model.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        BenchDaemon { _dir: dir, address, bus, daemon }
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        for child in [&mut self.daemon, &mut self.bus] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn quartiles(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 4], values[values.len() * 3 / 4])
}

/// Streamed `Generate` (a client reading every `Token`) against `Complete` for the same greedy
/// request, over D-Bus, in alternating pairs: the daemon's own `total_time_ms` of each.
/// Loading alone, each engine in a new process per load: edgellm (its default, edgellm's own map
/// of the weights), edgellm with ONNX Runtime reading the file, and onnxruntime-genai, in
/// `rounds` rounds whose order rotates. Medians of the time to a loaded model and of the peak
/// resident memory the load added (VmHWM), against the weight files on disk.
fn load_table(me: &Path, python: &Path, model: &Path, threads: &str, prompts: &Path, rounds: usize) {
    let work = Workload::on_cpu(model, "1", threads, prompts);
    let mut cmds = [work.edgellm(Command::new(me), "default"), work.edgellm(Command::new(me), "file"), work.genai(Command::new(python))];
    for cmd in &mut cmds {
        cmd.arg("--load-only");
    }
    let labels = ["edgellm", "edgellm (ORT file)", "onnxruntime-genai"];
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); cmds.len()];
    let n = cmds.len();
    for round in 0..rounds {
        for i in (0..n).map(|i| (i + round) % n) {
            runs[i].push(run_once(&mut cmds[i]));
        }
    }
    let weight_mib: f64 = std::fs::read_dir(model)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".onnx.data"))
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum::<u64>()
        })
        .unwrap_or(0) as f64
        / (1024.0 * 1024.0);
    let column = |runs: &[Value], key: &str| -> Vec<f64> { runs.iter().map(|r| r[key].as_f64().unwrap()).collect() };
    println!(
        "\nloading | {} | {rounds} rounds, order rotating, a new process per load | weight files {weight_mib:.1} MiB",
        model.display()
    );
    println!(
        "{:<20} {:>8} {:>13} {:>13} {:>10} {:>15} {:>14} {:>13} {:>10}",
        "engine", "load s", "load RSS MiB", "ready s", "ready IQR", "x genai ready", "peak RSS MiB", "x weights", "x genai"
    );
    println!("{:<20} (ready: the load and the first token of the first prompt; peak RSS: by then)", "");
    let genai_ready = median(&mut column(&runs[2], "ready_s"));
    let genai_peak = median(&mut column(&runs[2], "rss_ready_mib"));
    for (label, runs) in labels.iter().zip(&runs) {
        let load = median(&mut column(runs, "load_s"));
        let load_rss = median(&mut column(runs, "rss_load_mib"));
        let mut ready = column(runs, "ready_s");
        let (q1, q3) = quartiles(&mut ready.clone());
        let ready = median(&mut ready);
        let peak = median(&mut column(runs, "rss_ready_mib"));
        println!(
            "{label:<20} {load:>8.3} {load_rss:>13.1} {ready:>13.3} {:>10} {:>15.3} {peak:>14.1} {:>13.3} {:>10.3}",
            format!("{q1:.3}-{q3:.3}"),
            ready / genai_ready,
            peak / weight_mib,
            peak / genai_peak
        );
    }
}

fn streaming_table(model: &Path, new_tokens: u32, calls: usize, variants: &str) {
    use edgellm::service::client::Daemon1Proxy;
    use futures_util::StreamExt;
    use std::collections::HashMap;
    use zbus::zvariant::Value as V;
    println!("\nstreamed Generate vs Complete over D-Bus | {} | {new_tokens} tokens, greedy | {calls} pairs per variant, order alternating | the daemon's total_time_ms", model.display());
    println!(
        "{:<8} {:<9} {:>11} {:>12} {:>13} {:>15} {:>18} {:>12} {:>8}",
        "threads", "spinning", "interval ms", "stream ms", "complete ms", "ratio (median)", "pair ratio IQR", "client ms", "signals"
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    for variant in variants.split(',') {
        let mut parts = variant.split(':');
        let (threads, spin, interval) = (parts.next().unwrap(), parts.next().expect("THREADS:on|runs|off[:MS]"), parts.next());
        let threads: u32 = threads.parse().expect("threads");
        assert!(["on", "runs", "off"].contains(&spin), "--streaming-variants: spinning on, runs or off");
        let interval: Option<u64> = interval.map(|ms| ms.parse().expect("token_interval_ms"));
        let daemon = BenchDaemon::start_with(model, threads, Some(spin), interval);
        let (mut streamed, mut completed, mut ratios, mut client, mut signals) = rt.block_on(async {
            let conn = zbus::connection::Builder::address(daemon.address.as_str()).unwrap().build().await.unwrap();
            let proxy = Daemon1Proxy::new(&conn).await.unwrap();
            let options = || HashMap::from([("max_new_tokens", V::U32(new_tokens)), ("temperature", V::F64(0.0))]);
            let total = |stats: &HashMap<String, zbus::zvariant::OwnedValue>| f64::try_from(&stats["total_time_ms"]).unwrap();
            let mut tokens = proxy.receive_token().await.unwrap();
            let mut finished = proxy.receive_finished().await.unwrap();
            let prompt = "And it came to pass in those days";
            let (mut streamed, mut completed, mut ratios, mut client, mut signals) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..calls + 4 {
                let mut pair = [0.0f64; 2];
                for half in 0..2 {
                    // Alternate which comes first, so that drift hits both halves alike.
                    let stream_now = (half == 0) == (i % 2 == 0);
                    if stream_now {
                        let called = Instant::now();
                        let id = proxy.generate("kjv", prompt, options()).await.unwrap();
                        let mut pieces = 0usize;
                        let stats = loop {
                            tokio::select! {
                                biased;
                                Some(t) = tokens.next() => { if t.args().unwrap().request_id == id { pieces += 1; } }
                                Some(f) = finished.next() => {
                                    let a = f.args().unwrap();
                                    if a.request_id == id { break a.stats.clone(); }
                                }
                            }
                        };
                        assert!(pieces > 0);
                        pair[0] = total(&stats);
                        if i >= 4 {
                            client.push(called.elapsed().as_secs_f64() * 1000.0);
                            signals.push(pieces as f64);
                        }
                    } else {
                        let (_, stats) = proxy.complete("kjv", prompt, options()).await.unwrap();
                        pair[1] = total(&stats);
                    }
                }
                // The first four pairs warm up.
                if i >= 4 {
                    streamed.push(pair[0]);
                    completed.push(pair[1]);
                    ratios.push(pair[0] / pair[1]);
                }
            }
            (streamed, completed, ratios, client, signals)
        });
        let (s, c) = (median(&mut streamed), median(&mut completed));
        let (q1, q3) = quartiles(&mut ratios);
        let interval = interval.map_or(format!("{} (default)", edgellm::config::DEFAULT_TOKEN_INTERVAL.as_millis()), |ms| ms.to_string());
        println!(
            "{threads:<8} {:<9} {interval:>11} {s:>12.1} {c:>13.1} {:>15.3} {:>18} {:>12.1} {:>8.0}",
            spin,
            s / c,
            format!("{q1:.3}-{q3:.3}"),
            median(&mut client),
            median(&mut signals)
        );
        drop(daemon);
    }
}

/// One streamed request as its client sees it: (time to the first `Token`, time to `Finished`,
/// generated tokens), from the call.
async fn timed_stream(
    proxy: &edgellm::service::client::Daemon1Proxy<'_>,
    prompt: &str,
    options: std::collections::HashMap<&str, zbus::zvariant::Value<'_>>,
) -> (f64, f64, u32) {
    use futures_util::StreamExt;
    let mut tokens = proxy.receive_token().await.unwrap();
    let mut finished = proxy.receive_finished().await.unwrap();
    let called = Instant::now();
    let id = proxy.generate("kjv", prompt, options).await.unwrap();
    let mut first = None;
    loop {
        tokio::select! {
            biased;
            Some(t) = tokens.next() => {
                if t.args().unwrap().request_id == id && first.is_none() {
                    first = Some(called.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Some(f) = finished.next() => {
                let a = f.args().unwrap();
                if a.request_id == id {
                    let generated = u32::try_from(&a.stats["generated_tokens"]).unwrap();
                    let total = called.elapsed().as_secs_f64() * 1000.0;
                    return (first.unwrap_or(total), total, generated);
                }
            }
            // The connection closed (the daemon stopped at the end of the bench).
            else => return (0.0, 0.0, 0),
        }
    }
}

/// An interactive streamed `Generate` of 32 tokens, timed by its client, on an idle daemon and
/// beside four background clients that stream 256-token generations without pause; rounds
/// alternate the two, so that the machine's drift hits both alike.
fn priority_table(model: &Path, rounds: usize) {
    use edgellm::service::client::Daemon1Proxy;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use zbus::zvariant::Value as V;
    let daemon = BenchDaemon::start(model, 0, None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (idle, loaded, background_tps) = rt.block_on(async {
        let connect = || async { zbus::connection::Builder::address(daemon.address.as_str()).unwrap().build().await.unwrap() };
        let conn = connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let interactive =
            || HashMap::from([("max_new_tokens", V::U32(32)), ("temperature", V::F64(0.0)), ("priority", V::from("interactive"))]);
        let running = Arc::new(AtomicBool::new(false));
        let (tokens, busy_ms) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for client in 0..4u64 {
            let (running, tokens, conn) = (running.clone(), tokens.clone(), connect().await);
            tokio::spawn(async move {
                let proxy = Daemon1Proxy::new(&conn).await.unwrap();
                let mut seed = client * 1000;
                loop {
                    if !running.load(Ordering::SeqCst) {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        continue;
                    }
                    seed += 1;
                    let options = HashMap::from([
                        ("max_new_tokens", V::U32(256)),
                        ("temperature", V::F64(1.0)),
                        ("seed", V::U64(seed)),
                        ("priority", V::from("background")),
                    ]);
                    let (_, _, generated) = timed_stream(&proxy, "And it came to pass", options).await;
                    tokens.fetch_add(generated as u64, Ordering::SeqCst);
                }
            });
        }
        let (mut idle, mut loaded) = (Vec::new(), Vec::new());
        for round in 0..rounds + 1 {
            // Idle: no background request left in the daemon.
            running.store(false, Ordering::SeqCst);
            loop {
                let status = proxy.status().await.unwrap();
                if u32::try_from(&status["requests_in_flight"]).unwrap() + u32::try_from(&status["requests_queued"]).unwrap() == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let quiet = timed_stream(&proxy, "In the beginning God created", interactive()).await;
            running.store(true, Ordering::SeqCst);
            let loaded_from = Instant::now();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let busy = timed_stream(&proxy, "In the beginning God created", interactive()).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            busy_ms.fetch_add(loaded_from.elapsed().as_millis() as u64, Ordering::SeqCst);
            // The first round warms up.
            if round > 0 {
                idle.push(quiet);
                loaded.push(busy);
            }
        }
        running.store(false, Ordering::SeqCst);
        let tps = tokens.load(Ordering::SeqCst) as f64 / (busy_ms.load(Ordering::SeqCst) as f64 / 1000.0);
        (idle, loaded, tps)
    });
    rt.shutdown_background();
    let column = |rows: &[(f64, f64, u32)], f: fn(&(f64, f64, u32)) -> f64| -> Vec<f64> { rows.iter().map(f).collect() };
    println!(
        "\ninteractive streamed Generate (32 tokens, greedy), timed by its client | {} | {rounds} rounds, idle and loaded alternating",
        model.display()
    );
    println!("{:<40} {:>12} {:>16} {:>12} {:>16}", "", "TTFT ms", "TTFT IQR", "total ms", "total IQR");
    let mut medians = Vec::new();
    for (label, rows) in [("idle daemon", &idle), ("beside 4 background clients (256 tok)", &loaded)] {
        let (mut ttft, mut total) = (column(rows, |r| r.0), column(rows, |r| r.1));
        let (m1, m2) = (median(&mut ttft), median(&mut total));
        let ((a, b), (c, d)) = (quartiles(&mut ttft), quartiles(&mut total));
        println!("{label:<40} {m1:>12.1} {:>16} {m2:>12.1} {:>16}", format!("{a:.1}-{b:.1}"), format!("{c:.1}-{d:.1}"));
        medians.push((m1, m2));
    }
    println!("ratio loaded / idle: TTFT {:.2}x, total {:.2}x (goal <= 2x each) | background throughput while loaded: about {background_tps:.0} tokens/s (their tokens over the loaded windows)", medians[1].0 / medians[0].0, medians[1].1 / medians[0].1);
    drop(daemon);
}

/// A streamed `Chat` as its client sees it: (ms to the first `Token`, the `Finished` stats, text).
async fn timed_chat(
    proxy: &edgellm::service::client::Daemon1Proxy<'_>,
    messages: &[(String, String)],
    new_tokens: u32,
) -> (f64, std::collections::HashMap<String, zbus::zvariant::OwnedValue>, String) {
    use futures_util::StreamExt;
    use zbus::zvariant::Value as V;
    let mut tokens = proxy.receive_token().await.unwrap();
    let mut finished = proxy.receive_finished().await.unwrap();
    let options = std::collections::HashMap::from([("max_new_tokens", V::U32(new_tokens)), ("temperature", V::F64(0.0))]);
    let messages: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
    let called = Instant::now();
    let id = proxy.chat("kjv", &messages, options).await.unwrap();
    let (mut first, mut text) = (None, String::new());
    loop {
        tokio::select! {
            biased;
            Some(t) = tokens.next() => {
                let a = t.args().unwrap();
                if a.request_id == id {
                    first.get_or_insert_with(|| called.elapsed().as_secs_f64() * 1000.0);
                    text.push_str(&a.text);
                }
            }
            Some(f) = finished.next() => {
                let a = f.args().unwrap();
                if a.request_id == id {
                    let total = called.elapsed().as_secs_f64() * 1000.0;
                    return (first.unwrap_or(total), a.stats.clone(), text);
                }
            }
        }
    }
}

/// The last turn of a 4-turn chat, its client's time to the first `Token`: on the connection
/// that ran turns 1-3 (their KV kept) against a fresh connection sending the same messages, in
/// pairs whose order alternates.
fn chat_reuse_table(model: &Path, rounds: usize) {
    use edgellm::service::client::Daemon1Proxy;
    let daemon = BenchDaemon::start(model, 0, None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    // Each user turn quotes a few verses: about 800 tokens of history before the last turn.
    let verses = [
        "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.",
        "And God said, Let there be light: and there was light. And God saw the light, that it was good: and God divided the light from the darkness. And God called the light Day, and the darkness he called Night.",
        "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: he leadeth me beside the still waters. He restoreth my soul: he leadeth me in the paths of righteousness for his name's sake.",
        "Blessed are the poor in spirit: for theirs is the kingdom of heaven. Blessed are they that mourn: for they shall be comforted. Blessed are the meek: for they shall inherit the earth.",
    ];
    let user = |turn: usize| format!("Read this and go on: {} {} {}", verses[turn % 4], verses[(turn + 1) % 4], verses[(turn + 2) % 4]);
    let connect = || async { zbus::connection::Builder::address(daemon.address.as_str()).unwrap().build().await.unwrap() };
    let (mut reused, mut fresh, cached, prompt_tokens, mut ratios) = rt.block_on(async {
        // The conversation, once: greedy, so every round replays the same turns.
        let conn = connect().await;
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
                let conn = connect().await;
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
    let (r, f) = (median(&mut reused.clone()), median(&mut fresh.clone()));
    let ((a, b), (c, d), (q1, q3)) = (quartiles(&mut reused), quartiles(&mut fresh), quartiles(&mut ratios));
    println!(
        "\nlast turn of a 4-turn chat (Chat, streamed, greedy), client's time to the first Token | {} | {rounds} pairs, order alternating",
        model.display()
    );
    println!("prompt {prompt_tokens} tokens, {cached} of them reused from the connection's kept KV");
    println!("{:<34} {:>10} {:>14}", "", "TTFT ms", "IQR");
    println!("{:<34} {r:>10.1} {:>14}", "KV kept (same connection)", format!("{a:.1}-{b:.1}"));
    println!("{:<34} {f:>10.1} {:>14}", "no reuse (fresh connection)", format!("{c:.1}-{d:.1}"));
    println!("ratio kept / fresh: {:.3}x median of pairs (IQR {q1:.3}-{q3:.3}; goal <= 0.25x)", median(&mut ratios));
    drop(daemon);
}

/// The machine's read bandwidth in bytes/s: every core sums its share of `buffer` (1 GiB, far
/// larger than the caches); the best of `passes` passes.
fn read_bandwidth(buffer: &[u64], passes: usize) -> (f64, usize) {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = buffer.len().div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..passes {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> =
                buffer.chunks(chunk).map(|part| s.spawn(move || part.iter().fold(0u64, |a, &b| a.wrapping_add(b)))).collect();
            parts.into_iter().map(|p| p.join().unwrap()).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(started.elapsed().as_secs_f64());
    }
    (std::mem::size_of_val(buffer) as f64 / best, threads)
}

/// Plain decoding against the memory bound: weight bytes per token x tokens/s / bandwidth, for
/// edgellm and onnxruntime-genai on the same folder. The bandwidth moves with the load on this
/// shared host (2x within minutes), so it is measured again before each pair of the paired
/// rounds, and each pair's fraction is taken against the bandwidth measured just before it.
#[allow(clippy::too_many_arguments)]
fn bandwidth_table(
    me: &Path,
    python: &Path,
    model: &Path,
    new_tokens: &str,
    threads: &str,
    prompts: &Path,
    prompt_count: usize,
    rounds: usize,
) {
    let buffer: Vec<u64> = (0..(1u64 << 30) / 8).collect();
    let bytes = weight_counts(python, model);
    let per_token = bytes["per_token_bytes"].as_f64().unwrap();
    let mlas = bytes["mlas_bytes"].as_f64().unwrap();
    let work = Workload::on_cpu(model, new_tokens, threads, prompts);
    let mut bandwidths = Vec::new();
    let mut cores = 0;
    let (overall, pairs) = paired_rows_probed(&work, me, python, prompt_count, rounds, &mut || {
        let (bandwidth, threads) = read_bandwidth(&buffer, 3);
        bandwidths.push(bandwidth);
        cores = threads;
    });
    let (lo, hi) = bandwidths.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    println!(
        "\nphysical limit | {} | read bandwidth before each pair ({cores} threads over 1 GiB, best of 3): median {:.1} GB/s, {:.1}-{:.1} | weights read per token {:.1} MB (model.onnx.data {:.1} MB); MLAS's packed int8-compute layout reads {:.1} MB",
        model.display(),
        median(&mut bandwidths.clone()) / 1e9,
        lo / 1e9,
        hi / 1e9,
        per_token / 1e6,
        bytes["file_bytes"].as_f64().unwrap() / 1e6,
        mlas / 1e6
    );
    println!(
        "{:<18} {:>11} {:>14} {:>26} {:>26}   ({rounds} paired rounds of {prompt_count} prompts; fractions: median of pairs (IQR))",
        "engine", "decode t/s", "weight GB/s", "fraction of bound", "of what it reads"
    );
    // What each engine's int4 kernel reads per token: MLAS its packed layout, edgellm's own kernel
    // its packed copy, as many bytes as the model's (src/runtime/int4.rs).
    // (the bound's model is memory-bound: `auto` runs edgellm's kernel on it)
    let edgellm_kernel = edgellm::runtime::int4_supported() && int4_choice() != Int4Choice::OnnxRuntime;
    let reads = [mlas, if edgellm_kernel { per_token } else { mlas }];
    for (i, label) in ["onnxruntime-genai", "edgellm"].into_iter().enumerate() {
        let fractions = |bytes: f64| -> Vec<f64> { pairs.iter().zip(&bandwidths).map(|(tps, bw)| bytes * tps[i] / bw).collect() };
        let cell = |mut f: Vec<f64>| {
            let (q1, q3) = quartiles(&mut f.clone());
            format!("{:.3} ({q1:.3}-{q3:.3})", median(&mut f))
        };
        println!(
            "{label:<18} {:>11.1} {:>14.2} {:>26} {:>26}",
            overall[i],
            per_token * overall[i] / 1e9,
            cell(fractions(per_token)),
            cell(fractions(reads[i]))
        );
    }
}
