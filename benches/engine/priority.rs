//! An interactive streamed `Generate` of 32 tokens, timed by its client, on an idle daemon and
//! beside four background clients that stream 256-token generations without pause; rounds
//! alternate the two, so that the machine's drift hits both alike.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgellm::service::client::Daemon1Proxy;
use serde::Serialize;
use zbus::zvariant::Value as V;

use crate::dbus::{self, timed_stream};
use crate::harness::shown;
use crate::kit::bus::rt;
use crate::stats::Spread;

#[derive(Serialize, Debug)]
pub struct Record {
    pub model: String,
    pub rounds: usize,
    /// The interactive request on an idle daemon, then beside the 4 background clients.
    pub rows: Vec<Row>,
    /// Loaded / idle medians.
    pub ttft_ratio: f64,
    pub total_ratio: f64,
    /// The background clients' tokens over the loaded windows.
    pub background_tps: f64,
    pub int4_kernel: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct Row {
    pub label: String,
    pub ttft_ms: Spread,
    pub total_ms: Spread,
}

pub fn measure(model: &Path, rounds: usize) -> Record {
    eprintln!("priority: {rounds} rounds");
    let (daemon, int4_kernel) = dbus::start(model, 0, None, None);
    let rt = rt();
    let (idle, loaded, background_tps) = rt.block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let interactive =
            || HashMap::from([("max_new_tokens", V::U32(32)), ("temperature", V::F64(0.0)), ("priority", V::from("interactive"))]);
        let running = Arc::new(AtomicBool::new(false));
        let (tokens, busy_ms) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for client in 0..4u64 {
            let (running, tokens, conn) = (running.clone(), tokens.clone(), daemon.connect().await);
            tokio::spawn(async move {
                let proxy = Daemon1Proxy::new(&conn).await.unwrap();
                let mut seed = client * 1000;
                loop {
                    if !running.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
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
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let quiet = timed_stream(&proxy, "In the beginning God created", interactive()).await;
            running.store(true, Ordering::SeqCst);
            let loaded_from = Instant::now();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let busy = timed_stream(&proxy, "In the beginning God created", interactive()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
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
    drop(daemon);
    let row = |label: &str, rows: &[(f64, f64, u32)]| Row {
        label: label.into(),
        ttft_ms: Spread::of(&mut rows.iter().map(|r| r.0).collect::<Vec<_>>()),
        total_ms: Spread::of(&mut rows.iter().map(|r| r.1).collect::<Vec<_>>()),
    };
    let rows = vec![row("idle daemon", &idle), row("beside 4 background clients (256 tok)", &loaded)];
    Record {
        model: shown(model),
        rounds,
        ttft_ratio: rows[1].ttft_ms.median / rows[0].ttft_ms.median,
        total_ratio: rows[1].total_ms.median / rows[0].total_ms.median,
        rows,
        background_tps,
        int4_kernel,
    }
}
