//! Load on one daemon: 8 clients stream at once, with random cancels and random disconnects
//! mid-stream. Every request that is not cancelled ends with `Finished`; no client gets a
//! signal of a request it did not make; afterwards nothing is in flight or queued and the
//! daemon's RSS is within 10% of its value after warm-up.
//! EDGELLM_LOAD_SECONDS sets the length (CI: 15 s; `EDGELLM_LOAD_SECONDS=120` for the full run).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use edgellm::service::client::Daemon1Proxy;
use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use zbus::zvariant::Value;

use crate::kit::bus::Daemon;

const CLIENTS: usize = 8;

#[derive(Default)]
struct ClientReport {
    finished: usize,
    cancelled: usize,
    disconnected: usize,
    tokens: usize,
    ttft: Vec<Duration>,
}

async fn client(address: String, until: Instant, seed: u64) -> ClientReport {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut report = ClientReport::default();
    'connections: while Instant::now() < until {
        let conn = zbus::connection::Builder::address(address.as_str()).unwrap().build().await.unwrap();
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let mut tokens = proxy.receive_token().await.unwrap();
        let mut finished = proxy.receive_finished().await.unwrap();
        let mut mine = HashSet::new();
        while Instant::now() < until {
            let options = HashMap::from([
                ("max_new_tokens", Value::U32(rng.random_range(8..96))),
                ("temperature", Value::F64(rng.random_range(0.0..1.2))),
                ("seed", Value::U64(rng.random())),
            ]);
            let started = Instant::now();
            let id = match proxy.generate("kjv", "And it came to pass", options).await {
                Ok(id) => id,
                Err(e) => panic!("generate failed under load: {e}"),
            };
            mine.insert(id);
            let action = rng.random_range(0..100);
            let mut first = true;
            loop {
                tokio::select! {
                    biased;
                    Some(t) = tokens.next() => {
                        let a = t.args().unwrap();
                        assert!(mine.contains(&a.request_id), "a client received a token of a request it did not make");
                        report.tokens += 1;
                        if first {
                            report.ttft.push(started.elapsed());
                            first = false;
                            if action < 10 {
                                // The request may have ended meanwhile (its Finished not read
                                // yet): then there is nothing to cancel.
                                if let Err(e) = proxy.cancel(id).await {
                                    assert!(e.to_string().contains("RequestNotFound"), "cancel: {e}");
                                }
                            } else if action < 15 {
                                // Leave mid-stream: the daemon must cancel and clean up.
                                report.disconnected += 1;
                                drop(tokens);
                                drop(finished);
                                conn.close().await.unwrap();
                                continue 'connections;
                            }
                        }
                    }
                    Some(f) = finished.next() => {
                        let a = f.args().unwrap();
                        assert!(mine.contains(&a.request_id), "a client received a Finished of a request it did not make");
                        if a.request_id == id {
                            match a.reason.as_str() {
                                "cancelled" => report.cancelled += 1,
                                "stop" | "length" => report.finished += 1,
                                other => panic!("request ended with {other}: {:?}", a.stats),
                            }
                            break;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_secs(30)) => panic!("request {id} got no Finished within 30 s"),
                }
            }
        }
    }
    report
}

fn run_clients(rt: &tokio::runtime::Runtime, address: &str, until: Instant, seed: u64) -> Vec<ClientReport> {
    rt.block_on(async {
        let tasks: Vec<_> = (0..CLIENTS as u64).map(|i| tokio::spawn(client(address.to_string(), until, seed + i))).collect();
        let mut reports = Vec::new();
        for t in tasks {
            reports.push(t.await.expect("client task"));
        }
        reports
    })
}

#[test]
fn eight_clients_with_cancels_and_disconnects() {
    let seconds: u64 = std::env::var("EDGELLM_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    // Kept KV bound small, so that it fills and evicts during the run.
    let daemon = Daemon::start("\n[limits]\nmax_per_client = 4\nkv_cache_mib = 2\n");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let address = daemon.bus.address.clone();
    // Warm-up with the same shape of load, so that ONNX Runtime's arenas have grown.
    let warm_until = Instant::now() + Duration::from_secs(5);
    run_clients(&rt, &address, warm_until, 1000);
    let rss_warm = crate::kit::fixtures::rss_kib(daemon.pid());
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    // Kept KV over the run, as `Status` reports it: it fills its bound and stays within it.
    let kept_mib = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut most = 0.0f64;
            while Instant::now() < until {
                let status = daemon.call("Status", "", &[]).unwrap();
                most = most.max(status["data"][0]["kv_cache_mib"]["data"].as_f64().unwrap());
                std::thread::sleep(Duration::from_millis(100));
            }
            most
        });
        let reports = run_clients(&rt, &address, until, 0);
        (sampler.join().unwrap(), reports)
    });
    let (kept_mib, reports) = kept_mib;
    let elapsed = started.elapsed().as_secs_f64();
    // Nothing left behind.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.call("Status", "", &[]).unwrap();
        let busy = status["data"][0]["requests_in_flight"]["data"].as_u64().unwrap()
            + status["data"][0]["requests_queued"]["data"].as_u64().unwrap();
        if busy == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "requests left in flight or queued: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_after = crate::kit::fixtures::rss_kib(daemon.pid());
    let mut ttft: Vec<Duration> = reports.iter().flat_map(|r| r.ttft.iter().copied()).collect();
    ttft.sort();
    let pct = |p: f64| ttft[((ttft.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    let (finished, cancelled, disconnected, tokens) =
        reports.iter().fold((0, 0, 0, 0), |a, r| (a.0 + r.finished, a.1 + r.cancelled, a.2 + r.disconnected, a.3 + r.tokens));
    eprintln!(
        "load: {CLIENTS} clients, {elapsed:.0} s: {} requests ({finished} finished, {cancelled} cancelled, {disconnected} disconnected), {:.0} tokens/s overall, TTFT p50 {:.1} ms p99 {:.1} ms, RSS {} -> {} KiB",
        finished + cancelled + disconnected,
        tokens as f64 / elapsed,
        pct(0.5),
        pct(0.99),
        rss_warm,
        rss_after
    );
    assert!(finished > 0 && cancelled > 0, "the mix must include finished and cancelled requests");
    assert!((rss_after as f64) < rss_warm as f64 * 1.10, "RSS grew from {rss_warm} to {rss_after} KiB");
    eprintln!("kept KV: at most {kept_mib:.2} MiB of the 2 MiB bound");
    assert!(kept_mib <= 2.0, "kept KV over its bound: {kept_mib} MiB");
    assert!(kept_mib > 1.0, "the kept KV never came near its bound ({kept_mib} MiB): the run did not fill it");
}

/// A client that floods: requests as fast as the daemon takes them, each cancelled at once,
/// `Busy` refusals ignored, on one connection, until `until`. Returns how many were accepted.
async fn flooder(address: String, until: Instant) -> usize {
    let conn = zbus::connection::Builder::address(address.as_str()).unwrap().build().await.unwrap();
    let proxy = Daemon1Proxy::new(&conn).await.unwrap();
    let mut accepted = 0;
    while Instant::now() < until {
        let options = HashMap::from([("max_new_tokens", Value::U32(64))]);
        match proxy.generate("kjv", "Flood", options).await {
            Ok(id) => {
                accepted += 1;
                let _ = proxy.cancel(id).await;
            }
            Err(e) if e.to_string().contains("Busy") => tokio::time::sleep(Duration::from_millis(2)).await,
            Err(e) => panic!("flood: {e}"),
        }
    }
    accepted
}

/// The soak: the load above plus a flooding client for EDGELLM_SOAK_MINUTES (10), the daemon's
/// RSS printed every 30 s; after the first 2 minutes it may grow by 2% at most. Not in CI's run:
/// `cargo test --test it soak -- --ignored --nocapture`.
#[test]
#[ignore = "ten minutes: run it by name"]
fn soak_rss_stays_flat_under_load() {
    let minutes: f64 = std::env::var("EDGELLM_SOAK_MINUTES").ok().and_then(|s| s.parse().ok()).unwrap_or(10.0);
    let daemon = Daemon::start("\n[limits]\nmax_per_client = 4\nkv_cache_mib = 2\n");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let address = daemon.bus.address.clone();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(minutes * 60.0);
    let (samples, requests) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = Vec::new();
            while Instant::now() < until {
                let rss = crate::kit::fixtures::rss_kib(daemon.pid());
                // Anonymous memory is the heap and ONNX Runtime's arenas; file pages are code and
                // mapped weights, paged in as code paths are first taken (bounded by the files).
                let field =
                    |name: &str| crate::kit::fixtures::proc_status_kib(daemon.pid(), name).map_or("?".to_string(), |kib| kib.to_string());
                eprintln!(
                    "soak: {:>4.0} s  RSS {rss} KiB (anonymous {}, file {})",
                    started.elapsed().as_secs_f64(),
                    field("RssAnon"),
                    field("RssFile")
                );
                samples.push((started.elapsed(), rss));
                std::thread::sleep(Duration::from_secs(30).min(until.saturating_duration_since(Instant::now())));
            }
            samples.push((started.elapsed(), crate::kit::fixtures::rss_kib(daemon.pid())));
            samples
        });
        let flood = rt.spawn(flooder(address.clone(), until));
        let reports = run_clients(&rt, &address, until, 7);
        let flooded = rt.block_on(flood).unwrap();
        let requests: usize = reports.iter().map(|r| r.finished + r.cancelled + r.disconnected).sum::<usize>() + flooded;
        (sampler.join().unwrap(), requests)
    });
    let after_warmup = samples.iter().find(|(t, _)| *t >= Duration::from_secs(120)).map(|s| s.1).unwrap_or(samples[0].1);
    let last = samples.last().unwrap().1;
    let growth = last as f64 / after_warmup as f64 - 1.0;
    eprintln!("soak: {requests} requests in {minutes} min; RSS {} KiB at start, {after_warmup} at 2 min, {last} at the end ({:+.1}% after 2 min)", samples[0].1, growth * 100.0);
    assert!(growth <= 0.02, "RSS grew {:.1}% after the first 2 minutes", growth * 100.0);
}
