//! Prompt lookup against plain decoding of the same model, in paired alternating rounds (both
//! load once; each prompt runs on one, then the other, the order alternating), on the reference
//! prompts and on prompts that quote themselves (tests/quoting_prompts.json), where its drafts
//! are accepted. Per prompt group: the decode speed ratio's median and quartiles over rounds x
//! prompts, acceptance and tokens per target forward; per quoting prompt, its own.

use std::process::Command;

use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::{folder_name, temp_file, Bench, Server};
use crate::kit::fixtures::root;
use crate::stats::Spread;

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    pub rounds: usize,
    pub rows: Vec<Row>,
    /// Prompts whose greedy output equals plain decoding's (the tests check that the others
    /// part at a near tie).
    pub identical: usize,
    pub prompts: usize,
    pub int4_kernel: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub prompts: String,
    pub acceptance: f64,
    /// Draft tokens per run.
    pub drafted: u64,
    pub tokens_per_target_forward: f64,
    /// Decode speed x plain over rounds x prompts.
    pub x_plain: Spread,
    /// The slowest prompt's median over its rounds.
    pub lowest_prompt: f64,
}

pub fn measure(bench: &Bench, rounds: usize) -> Record {
    let model = &bench.model;
    let reference = &bench.prompts;
    let folder = edgellm::model::ModelFolder::open(model).expect("model folder");
    let quoting: Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/quoting_prompts.json")).unwrap()).unwrap();
    let quoting: Vec<Value> = quoting["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!(folder.tokenizer.encode_prompt(p.as_str().unwrap()).expect("tokenize")))
        .collect();
    let mut all: Vec<Value> = reference.iter().map(|p| json!(p)).collect();
    all.extend(quoting.iter().cloned());
    let prompts_file = temp_file("lookup");
    std::fs::write(&prompts_file, serde_json::to_string(&all).unwrap()).unwrap();
    let work = bench.work("cpu");
    let work = crate::harness::Workload { prompts: &prompts_file, ..work };
    let mut lookup = work.edgellm(Command::new(&bench.me), "default");
    lookup.arg("--prompt-lookup");
    eprintln!("prompt lookup: {rounds} rounds of {} prompts", all.len());
    let mut servers = [work.edgellm(Command::new(&bench.me), "default"), lookup].map(Server::start);
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
    let int4_kernel = servers[1].int4_kernel.clone();
    servers.into_iter().for_each(Server::finish);
    let _ = std::fs::remove_file(&prompts_file);
    let row = |label: String, range: std::ops::Range<usize>| {
        let c = range.clone().fold([0u64; 4], |mut t, p| {
            for (t, c) in t.iter_mut().zip(counts[p]) {
                *t += c;
            }
            t
        });
        // The goal is per prompt: the slowest prompt's median over its rounds (the mean of the
        // middle two for an even count, so that two rounds give their mean, not the faster).
        let median_of = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n.is_multiple_of(2) {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            } else {
                v[n / 2]
            }
        };
        Row {
            prompts: label,
            acceptance: if c[0] == 0 { 0.0 } else { c[1] as f64 / c[0] as f64 },
            drafted: c[0] / rounds as u64,
            tokens_per_target_forward: c[2] as f64 / c[3] as f64,
            x_plain: Spread::of(&mut range.clone().flat_map(|p| ratios[p].clone()).collect::<Vec<_>>()),
            lowest_prompt: range.map(|p| median_of(ratios[p].clone())).fold(f64::INFINITY, f64::min),
        }
    };
    let mut rows = vec![row(format!("reference ({})", reference.len()), 0..reference.len())];
    for (i, p) in (reference.len()..all.len()).enumerate() {
        rows.push(row(format!("quoting #{}", i + 1), p..p + 1));
    }
    Record { model: folder_name(model), rounds, rows, identical: same.iter().filter(|&&s| s).count(), prompts: same.len(), int4_kernel }
}
