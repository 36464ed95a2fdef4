//! A private dbus-daemon and an edgellmd on it, for the tests and the benchmark: the daemon is
//! killed, then the bus, when they drop; a daemon that exits while starting fails at once with its
//! log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use edgellm::service::client::Daemon1Proxy;
use futures_util::StreamExt;
use zbus::zvariant::{OwnedValue, Value};

use super::fixtures::{command, emulated, model_dir};

/// A private bus with the session bus's usual policy, in a temporary directory.
pub struct PrivateBus {
    pub dir: tempfile::TempDir,
    pub address: String,
    child: Child,
}

impl PrivateBus {
    pub fn start() -> PrivateBus {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("bus");
        let address = format!("unix:path={}", socket.display());
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>{address}</listen>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>"#
            ),
        )
        .unwrap();
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "dbus-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        PrivateBus { dir, address, child }
    }
}

impl PrivateBus {
    /// Stops the bus under whoever is connected to it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Daemon {
    pub bus: PrivateBus,
    child: Child,
    pub log: PathBuf,
}

/// The config the tests run: the bundled models, with `extra` appended.
pub fn test_config(bus: &PrivateBus, extra: &str) -> PathBuf {
    test_config_with(bus, "", extra)
}

/// `test_config` with `daemon_keys` in its `[daemon]` table.
pub fn test_config_with(bus: &PrivateBus, daemon_keys: &str, extra: &str) -> PathBuf {
    let path = bus.dir.path().join("edgellm.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\naddress = \"{}\"\nshutdown_grace_s = 2\n{daemon_keys}\n[[model]]\nname = \"kjv\"\npath = \"{}\"\n\n[[model]]\nname = \"kjv-draft\"\npath = \"{}\"\npreload = false\n{extra}",
            bus.address,
            model_dir("kjv-target").display(),
            model_dir("kjv-draft").display()
        ),
    )
    .unwrap();
    path
}

impl Daemon {
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_with("", extra)
    }

    /// `start` with `daemon_keys` in the config's `[daemon]` table.
    pub fn start_with(daemon_keys: &str, extra: &str) -> Daemon {
        let bus = PrivateBus::start();
        let config = test_config_with(&bus, daemon_keys, extra);
        Daemon::start_on(bus, &config)
    }

    /// edgellmd on `bus` with the config file `config`, once every preloaded model is ready or
    /// failed; fails at once, with the daemon's log, if edgellmd exits first.
    pub fn start_on(bus: PrivateBus, config: &Path) -> Daemon {
        let log = bus.dir.path().join("edgellmd.log");
        let child = command(env!("CARGO_BIN_EXE_edgellmd"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("edgellmd");
        let mut daemon = Daemon { bus, child, log };
        // Under the emulator, loading takes many times longer.
        let deadline = Instant::now() + Duration::from_secs(if emulated() { 600 } else { 60 });
        loop {
            if let Some(status) = daemon.try_wait() {
                panic!("edgellmd exited while starting ({status}): {}", daemon.log_text());
            }
            let out = daemon.busctl(&["call", "org.edgellm.Daemon1", "/org/edgellm/Daemon1", "org.edgellm.Daemon1", "ListModels"]);
            let text = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && (text.contains("ready") || text.contains("failed")) {
                break;
            }
            assert!(Instant::now() < deadline, "edgellmd did not get ready: {}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn busctl(&self, args: &[&str]) -> Output {
        let mut busctl = Command::new("busctl");
        busctl.arg(format!("--address={}", self.bus.address));
        if super::fixtures::emulated() {
            busctl.arg("--timeout=600"); // the default 25 s is short for an emulated daemon
        }
        busctl.args(args).output().expect("busctl")
    }

    /// `busctl call` with JSON output.
    pub fn call(&self, method: &str, signature: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut all = vec!["--json=short", "call", "org.edgellm.Daemon1", "/org/edgellm/Daemon1", "org.edgellm.Daemon1", method, signature];
        all.extend_from_slice(args);
        let out = self.busctl(&all);
        if out.status.success() {
            // Methods without out arguments print nothing.
            Ok(if out.stdout.iter().all(u8::is_ascii_whitespace) {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&out.stdout).expect("busctl json")
            })
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_edgellm")).arg("--address").arg(&self.bus.address).args(args).output().expect("edgellm")
    }

    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.bus.address.as_str()).unwrap().build().await.unwrap()
    }

    /// Kills the daemon and leaves its bus running, for clients that must see it gone.
    pub fn kill_keeping_bus(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "edgellmd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request's options for greedy decoding of at most `n` tokens.
pub fn greedy_options(n: u32) -> HashMap<&'static str, Value<'static>> {
    HashMap::from([("max_new_tokens", Value::U32(n)), ("temperature", Value::F64(0.0))])
}

/// A request's options for sampling at temperature 1 from `seed`, at most `n` tokens.
pub fn sampled_options(n: u32, seed: u64) -> HashMap<&'static str, Value<'static>> {
    HashMap::from([("max_new_tokens", Value::U32(n)), ("temperature", Value::F64(1.0)), ("seed", Value::U64(seed))])
}

/// What `Complete` returned.
#[derive(Debug)]
pub struct Completed {
    pub text: String,
    pub stats: HashMap<String, OwnedValue>,
}

impl Completed {
    pub fn finish_reason(&self) -> &str {
        self.stats.get("finish_reason").and_then(|r| <&str>::try_from(r).ok()).unwrap_or_default()
    }

    pub fn cached_prompt_tokens(&self) -> u32 {
        u32::try_from(&self.stats["cached_prompt_tokens"]).expect("cached_prompt_tokens is a u32")
    }
}

/// `Complete` through a zbus client, or the D-Bus error as text (its name and message, for the
/// tests to look into).
pub async fn complete(proxy: &Daemon1Proxy<'_>, model: &str, prompt: &str, options: HashMap<&str, Value<'_>>) -> Result<Completed, String> {
    let (text, stats) = proxy.complete(model, prompt, options).await.map_err(|e| e.to_string())?;
    Ok(Completed { text, stats })
}

/// Streams the request that `start` makes (Generate or Chat), subscribed before it is made.
pub async fn stream_request(
    proxy: &Daemon1Proxy<'_>,
    start: impl std::future::Future<Output = zbus::Result<u64>>,
) -> (String, String, usize) {
    let mut tokens = proxy.receive_token().await.unwrap();
    let mut finished = proxy.receive_finished().await.unwrap();
    let id = start.await.unwrap();
    let mut text = String::new();
    let mut count = 0;
    loop {
        tokio::select! {
            biased;
            Some(t) = tokens.next() => {
                let a = t.args().unwrap();
                assert_eq!(a.request_id, id, "a token of another request reached this client");
                text.push_str(&a.text);
                count += 1;
            }
            Some(f) = finished.next() => {
                let a = f.args().unwrap();
                assert_eq!(a.request_id, id);
                // Tokens sent before Finished may still be in the other stream.
                while let Ok(Some(t)) = tokio::time::timeout(Duration::from_millis(50), tokens.next()).await {
                    text.push_str(&t.args().unwrap().text);
                    count += 1;
                }
                return (text, a.reason.clone(), count);
            }
        }
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

