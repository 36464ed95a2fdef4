//! Generates from a model folder with the engine alone: `cargo run --example generate -- DIR PROMPT [N]`.
//! Env: DRAFT=DIR (speculative), MULTITOKEN=MODE:THRESHOLD (multi-token models).
use std::io::Write;

use edgellm::engine::{CancelToken, Engine, GenerateOptions, LoadOptions, Prompt};
use edgellm::runtime::Runtime;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: generate DIR PROMPT [MAX_NEW_TOKENS]")?;
    let prompt = args.get(2).cloned().unwrap_or_else(|| "In the beginning".into());
    let max_new = args.get(3).map(|n| n.parse()).transpose()?.unwrap_or(64);
    let runtime = Runtime::load(None)?;
    let kv_layout = match args.get(4).map(String::as_str) {
        Some("growing") => Some(edgellm::engine::KvLayout::Growing),
        Some("shared") => Some(edgellm::engine::KvLayout::Shared),
        _ => None,
    };
    let load = LoadOptions { kv_layout, ..Default::default() };
    let mut engine = Engine::load(&runtime, "model", std::path::Path::new(dir), &load)?;
    if let Ok(draft) = std::env::var("DRAFT") {
        let folder = edgellm::model::ModelFolder::open(std::path::Path::new(&draft))?;
        engine.attach_draft(&runtime, &folder, &load, Default::default())?;
    }
    let mut options = GenerateOptions { max_new_tokens: Some(max_new), ..Default::default() };
    if let Ok(spec) = std::env::var("MULTITOKEN") {
        // MODE:THRESHOLD, for a multi-token model
        let (mode, threshold) = spec.split_once(':').ok_or("MULTITOKEN=MODE:THRESHOLD")?;
        options.multitoken_mode = Some(edgellm::multitoken::Mode::parse(mode).ok_or("trust or verify")?);
        options.multitoken_threshold = Some(threshold.parse()?);
    }
    let outcome = engine.generate(&Prompt::Text(prompt.clone()), &options, &CancelToken::new(), &mut |piece| {
        print!("{piece}");
        std::io::stdout().flush().is_ok()
    })?;
    println!("\n--- {:?} ids={:?} eos={:?} stats={:?}", outcome.reason, outcome.token_ids, outcome.eos_token, outcome.stats);
    Ok(())
}
