//! `cargo bench --bench engine`: edgellm's engine against onnxruntime-genai on the same model,
//! prompts, greedy decoding and thread count, each in its own process, and the tables the flags
//! add (`cargo bench --bench engine -- --help`; docs/performance.md shows how to run them and
//! what they measured).
//!
//! Each table is a module that measures and returns a record; `print` writes the records as
//! markdown (the default) or JSON (`--format json`), each with the command, commit, date and
//! machine. `--child ...` is the measuring child of edgellm's side (`child`), which this harness
//! and benches/ab.py run.

use std::path::PathBuf;

use clap::Parser;

#[path = "../../tests/kit/mod.rs"]
mod kit;

mod bandwidth;
mod chat_reuse;
mod child;
mod cli;
mod dbus;
mod engines;
mod forward_cost;
mod harness;
mod load;
mod multitoken;
mod paired;
mod print;
mod priority;
mod prompt_lookup;
mod record;
mod speculative;
mod stats;
mod streaming;
mod work_per_token;

use cli::{ChildArgs, Cli, EngineProvider};
use harness::Bench;
use kit::fixtures::{model_dir, references};
use record::{Context, Measurement};

fn main() {
    if std::env::args().any(|a| a == "--child") {
        return child::run(&ChildArgs::parse());
    }
    let cli = Cli::parse();
    let model = cli.model.clone().unwrap_or_else(|| model_dir("kjv-target"));
    let name = model.file_name().expect("--model DIR").to_string_lossy().to_string();
    let refs = references();
    let cases = refs.models.get(&name).or(refs.models.get("kjv-target")).expect("reference prompts");
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
    let prompts_file = harness::temp_file("prompts");
    std::fs::write(&prompts_file, serde_json::to_string(&prompts).unwrap()).unwrap();
    let bench = Bench {
        model,
        new_tokens: cli.new_tokens,
        threads: cli.threads,
        prompts,
        prompts_file,
        me: std::env::current_exe().unwrap(),
        python: kit::fixtures::root().join(".edgellm/venv/bin/python"),
    };
    let printer = print::Printer::new(cli.format, Context::here());
    let emit = |m: Measurement| printer.emit(m);

    let providers: Vec<EngineProvider> = cli.providers.iter().filter_map(|p| p.provider()).collect();
    if !providers.is_empty() {
        emit(Measurement::Engines(engines::measure(&bench, &providers, cli.pair_rounds)));
    }
    if !cli.no_speculative {
        emit(Measurement::Speculative(speculative::measure(&bench)));
    }
    if !cli.no_prompt_lookup {
        emit(Measurement::PromptLookup(prompt_lookup::measure(&bench, cli.pair_rounds.max(1))));
    }
    if !cli.forward_cost.is_empty() {
        emit(Measurement::ForwardCost(forward_cost::measure(&bench.python, &cli.forward_cost, cli.threads, cli.acceptance)));
    }
    if !cli.work_per_token.is_empty() {
        emit(Measurement::WorkPerToken(work_per_token::measure(&bench, &cli.work_per_token)));
    }
    if !cli.no_multitoken {
        let hamburger: PathBuf = cli.hamburger.clone().unwrap_or_else(|| model_dir("kjv-hamburger"));
        emit(Measurement::Multitoken(multitoken::measure(&bench, &hamburger, &cli.thresholds)));
    }
    if let Some(rounds) = cli.load_rounds {
        emit(Measurement::Load(load::measure(&bench, rounds)));
    }
    if let Some(calls) = cli.streaming {
        let new_tokens = u32::try_from(cli.new_tokens).expect("--new-tokens N");
        emit(Measurement::Streaming(streaming::measure(&bench.model, new_tokens, calls, &cli.streaming_variants)));
    }
    if cli.bandwidth {
        emit(Measurement::Bandwidth(bandwidth::measure(&bench, cli.pair_rounds.max(2))));
    }
    if let Some(rounds) = cli.priority {
        emit(Measurement::Priority(priority::measure(&bench.model, rounds)));
    }
    if let Some(rounds) = cli.chat_reuse {
        emit(Measurement::ChatReuse(chat_reuse::measure(&bench.model, rounds)));
    }
    let _ = std::fs::remove_file(&bench.prompts_file);
}
