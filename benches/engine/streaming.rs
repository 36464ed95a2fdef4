//! Streamed `Generate` (a client reading every `Token`) against `Complete` for the same greedy
//! request, over D-Bus, in alternating pairs: the daemon's own `total_time_ms` of each, for each
//! daemon variant (intra-op threads, spinning, token interval).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use edgellm::service::client::Daemon1Proxy;
use futures_util::StreamExt;
use serde::Serialize;

use crate::cli::{Spin, Variant};
use crate::dbus;
use crate::harness::shown;
use crate::kit::bus::greedy_options;
use crate::stats::{median, Spread};

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    pub new_tokens: u32,
    /// Pairs per variant (after four warm-up pairs).
    pub calls: usize,
    pub rows: Vec<Row>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub threads: u32,
    pub spinning: Spin,
    /// The daemon's token_interval_ms; None: its default, `default_interval_ms`.
    pub interval_ms: Option<u64>,
    pub default_interval_ms: u64,
    /// Medians of the daemon's total_time_ms.
    pub stream_ms: f64,
    pub complete_ms: f64,
    /// Median stream / complete over all calls.
    pub ratio: f64,
    /// Per pair stream / complete.
    pub pair_ratio: Spread,
    /// The streaming client's own time to `Finished`, median.
    pub client_ms: f64,
    /// Token signals per streamed call, median.
    pub signals: f64,
    pub int4_kernel: Option<String>,
}

pub fn measure(model: &Path, new_tokens: u32, calls: usize, variants: &[Variant]) -> Record {
    let rt = dbus::rt1();
    let rows = variants
        .iter()
        .map(|variant| {
            eprintln!("streaming: threads {} spinning {}", variant.threads, variant.spin.name());
            let (daemon, int4_kernel) = dbus::start(model, variant.threads, Some(variant.spin), variant.token_interval_ms);
            let (mut streamed, mut completed, mut ratios, mut client, mut signals) = rt.block_on(async {
                let conn = daemon.connect().await;
                let proxy = Daemon1Proxy::new(&conn).await.unwrap();
                pairs(&proxy, new_tokens, calls).await
            });
            drop(daemon);
            let (s, c) = (median(&mut streamed), median(&mut completed));
            Row {
                threads: variant.threads,
                spinning: variant.spin,
                interval_ms: variant.token_interval_ms,
                default_interval_ms: edgellm::config::DEFAULT_TOKEN_INTERVAL.as_millis() as u64,
                stream_ms: s,
                complete_ms: c,
                ratio: s / c,
                pair_ratio: Spread::of(&mut ratios),
                client_ms: median(&mut client),
                signals: median(&mut signals),
                int4_kernel,
            }
        })
        .collect();
    Record { model: shown(model), new_tokens, calls, rows }
}

/// `calls` pairs (after 4 warm-up pairs) of a streamed and a completed request: (streamed ms,
/// completed ms, pair ratios, client ms, signals).
async fn pairs(proxy: &Daemon1Proxy<'_>, new_tokens: u32, calls: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let total = |stats: &HashMap<String, zbus::zvariant::OwnedValue>| f64::try_from(&stats["total_time_ms"]).unwrap();
    let mut tokens = proxy.receive_token().await.unwrap();
    let mut finished = proxy.receive_finished().await.unwrap();
    let prompt = "And it came to pass in those days";
    let (mut streamed, mut completed, mut ratios, mut client, mut signals) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..calls + 4 {
        let mut pair = [0.0f64; 2];
        for half in 0..2 {
            // Alternate which comes first, so that drift hits both halves alike.
            let stream_now = (half == 0) == (i % 2 == 0);
            if stream_now {
                let called = Instant::now();
                let id = proxy.generate("kjv", prompt, greedy_options(new_tokens)).await.unwrap();
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
                let (_, stats) = proxy.complete("kjv", prompt, greedy_options(new_tokens)).await.unwrap();
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
}
