//! The D-Bus tables' daemon, the test kit's (`PrivateBus`, `Daemon::start_on`) on a config this
//! bench writes, and requests as their client times them.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use edgellm::service::client::Daemon1Proxy;
use futures_util::StreamExt;
use zbus::zvariant::{OwnedValue, Value};

use crate::cli::Spin;
use crate::kit::bus::{greedy_options, Daemon, PrivateBus};

/// An edgellmd on a private bus serving `model` as "kjv" with these intra-op threads and
/// spinning (None: the daemon's defaults) and `token_interval_ms` (None: its default); killed,
/// then the bus, on drop. Also what its `ListModels` says of the int4 kernel.
pub fn start(model: &Path, threads: u32, spin: Option<Spin>, token_interval_ms: Option<u64>) -> (Daemon, Option<String>) {
    let bus = PrivateBus::start();
    let config = bus.dir.path().join("edgellm.toml");
    // The daemon reads a relative path against its config's folder.
    let model = std::path::absolute(model).expect("model path");
    let spinning = spin.map(|s| format!("spinning = {}\nspin_between_runs = {}\n", s != Spin::Off, s == Spin::On)).unwrap_or_default();
    let interval = token_interval_ms.map(|ms| format!("token_interval_ms = {ms}\n")).unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "[daemon]\naddress = \"{}\"\n{interval}\n[[model]]\nname = \"kjv\"\npath = \"{}\"\nthreads = {threads}\n{spinning}",
            bus.address,
            model.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start_on(bus, &config);
    // `start_on` returns once the model is ready or failed.
    let models = daemon.call("ListModels", "", &[]).unwrap_or_else(|e| panic!("ListModels: {e}"));
    let kjv = &models["data"][0][0][1];
    let text = |key: &str| kjv[key]["data"].as_str().map(str::to_string);
    assert_eq!(text("state").as_deref(), Some("ready"), "edgellmd could not load {}: {}", model.display(), daemon.log_text());
    let int4_kernel = text("int4_kernel");
    (daemon, int4_kernel)
}

/// A runtime of one worker thread, the clients' of the streaming and chat tables.
pub fn rt1() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// One streamed request as its client sees it: (time to the first `Token`, time to `Finished`,
/// generated tokens), from the call.
pub async fn timed_stream(proxy: &Daemon1Proxy<'_>, prompt: &str, options: HashMap<&str, Value<'_>>) -> (f64, f64, u32) {
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

/// A streamed `Chat` as its client sees it: (ms to the first `Token`, the `Finished` stats, text).
pub async fn timed_chat(
    proxy: &Daemon1Proxy<'_>,
    messages: &[(String, String)],
    new_tokens: u32,
) -> (f64, HashMap<String, OwnedValue>, String) {
    let mut tokens = proxy.receive_token().await.unwrap();
    let mut finished = proxy.receive_finished().await.unwrap();
    let messages: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
    let called = Instant::now();
    let id = proxy.chat("kjv", &messages, greedy_options(new_tokens)).await.unwrap();
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
