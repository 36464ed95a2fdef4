//! edgellmd end to end on a private dbus-daemon: busctl, the CLI and zbus clients.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgellm::service::client::Daemon1Proxy;
use futures_util::StreamExt;
use zbus::zvariant::Value;

use crate::kit::bus::{greedy_options, rt, sampled_options, stream_request, test_config, Daemon, PrivateBus};
use crate::kit::fixtures::{genai_greedy_texts, model_dir, proc_status_kib, references, root};

/// Streams one Generate through a zbus client; returns (text, reason, tokens received).
async fn stream(proxy: &Daemon1Proxy<'_>, prompt: &str, options: HashMap<&str, Value<'_>>) -> (String, String, usize) {
    stream_request(proxy, proxy.generate("kjv", prompt, options)).await
}

/// The first reference prompt of kjv-target, and onnxruntime-genai's greedy text of 64 tokens
/// for it, run now.
fn first_prompt_and_genai_text() -> (&'static str, String) {
    let cases = &references().models["kjv-target"][..1];
    (&cases[0].prompt, genai_greedy_texts("kjv-target", cases, 64).remove(0))
}

#[test]
fn streamed_text_equals_complete_and_cli_and_reference() {
    let daemon = Daemon::start("");
    let (prompt, reference) = first_prompt_and_genai_text();
    // busctl, non-streaming.
    let reply = daemon.call("Complete", "ssa{sv}", &["kjv", prompt, "2", "max_new_tokens", "u", "64", "temperature", "d", "0"]).unwrap();
    let complete_text = reply["data"][0].as_str().unwrap().to_string();
    assert_eq!(complete_text, reference, "Complete equals onnxruntime-genai's greedy text");
    // zbus client, streaming.
    let (streamed, reason, _) = rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        stream(&proxy, prompt, greedy_options(64)).await
    });
    assert_eq!(streamed, complete_text);
    assert!(reason == "length" || reason == "stop", "{reason}");
    // The CLI streams the same text to stdout.
    let out = daemon.cli(&["generate", "--max-new-tokens", "64", "--temperature", "0", prompt]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), complete_text);
    // Status counts what was served.
    let status = daemon.call("Status", "", &[]).unwrap();
    assert!(status["data"][0]["requests_total"]["data"].as_u64().unwrap() >= 3, "{status}");
    assert_eq!(daemon.stop().code(), Some(0), "SIGTERM exits 0");
}

/// `token_interval_ms`: one Token signal per interval at most, the text made meanwhile in the
/// next, and the end sent as soon as it is there. With 10 s between signals, a 64-token stream
/// of the fast bundled model comes as its first piece and the rest with the end, and it does
/// not wait out the interval.
#[test]
fn token_signals_keep_their_interval_and_the_end_does_not_wait() {
    let daemon = Daemon::start_with("token_interval_ms = 10000\n", "");
    let (prompt, reference) = first_prompt_and_genai_text();
    let (streamed, reason, signals, took) = rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let started = Instant::now();
        let (text, reason, count) = stream(&proxy, prompt, greedy_options(64)).await;
        (text, reason, count, started.elapsed())
    });
    assert_eq!(streamed, reference, "the streamed text equals onnxruntime-genai's greedy text");
    assert!(reason == "length" || reason == "stop", "{reason}");
    // One signal when the request ended before the relay's first read, else two.
    assert!((1..=2).contains(&signals), "{signals} Token signals for 64 tokens with 10 s between signals");
    assert!(took < Duration::from_secs(5), "the end waited for the interval: {took:?}");
}

#[test]
fn other_clients_see_no_tokens_and_cannot_cancel() {
    let daemon = Daemon::start("");
    rt().block_on(async {
        let owner = daemon.connect().await;
        let other = daemon.connect().await;
        // The other app subscribes to the whole interface with an ordinary match rule.
        let rule = zbus::MatchRule::builder().msg_type(zbus::message::Type::Signal).interface("org.edgellm.Daemon1").unwrap().build();
        let mut spy = zbus::MessageStream::for_match_rule(rule, &other, Some(64)).await.unwrap();
        let owner_proxy = Daemon1Proxy::new(&owner).await.unwrap();
        let other_proxy = Daemon1Proxy::new(&other).await.unwrap();
        let mut tokens = owner_proxy.receive_token().await.unwrap();
        let id = owner_proxy.generate("kjv", "And God said", sampled_options(200, 3)).await.unwrap();
        tokens.next().await.expect("owner gets tokens");
        let err = other_proxy.cancel(id).await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.RequestNotFound"), "{err}");
        let unknown = other_proxy.cancel(id ^ 0xffff).await.unwrap_err().to_string();
        assert_eq!(
            err.replace(&id.to_string(), "N"),
            unknown.replace(&(id ^ 0xffff).to_string(), "N"),
            "someone else's id and an unknown id look the same"
        );
        owner_proxy.cancel(id).await.unwrap();
        // Whatever the spy got in the meantime: no Token or Finished of the owner's request.
        let deadline = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                Some(Ok(msg)) = spy.next() => {
                    let member = msg.header().member().map(|m| m.to_string()).unwrap_or_default();
                    assert!(member != "Token" && member != "Finished", "another client received {member}");
                }
                _ = &mut deadline => break,
            }
        }
    });
}

#[test]
fn cancel_and_disconnect_stop_generation_within_a_step() {
    let daemon = Daemon::start("");
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let mut tokens = proxy.receive_token().await.unwrap();
        let mut finished = proxy.receive_finished().await.unwrap();
        let options = sampled_options(1000, 5);
        let id = proxy.generate("kjv", "And it came to pass", options.clone()).await.unwrap();
        tokens.next().await.unwrap();
        proxy.cancel(id).await.unwrap();
        let f = finished.next().await.unwrap();
        let args = f.args().unwrap();
        assert_eq!((args.request_id, args.reason.as_str()), (id, "cancelled"));
        let generated = args.stats.get("generated_tokens").map(|v| u32::try_from(v).unwrap()).unwrap();
        assert!(generated < 100, "cancel took effect late: {generated} tokens");

        // A client that disconnects mid-stream has its request cancelled.
        let leaver = daemon.connect().await;
        let leaver_proxy = Daemon1Proxy::new(&leaver).await.unwrap();
        let mut leaver_tokens = leaver_proxy.receive_token().await.unwrap();
        leaver_proxy.generate("kjv", "And it came to pass", options).await.unwrap();
        leaver_tokens.next().await.unwrap();
        drop(leaver_tokens);
        drop(leaver_proxy);
        leaver.close().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = proxy.status().await.unwrap();
            let in_flight = u32::try_from(&status["requests_in_flight"]).unwrap();
            let queued = u32::try_from(&status["requests_queued"]).unwrap();
            if in_flight == 0 && queued == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the leaver's request still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(daemon.log_text().contains("reason=\"cancelled\"") || daemon.log_text().contains("cancelled"), "{}", daemon.log_text());
}

#[test]
fn bad_requests_get_typed_errors_and_the_daemon_keeps_serving() {
    let daemon = Daemon::start("");
    let e = daemon.call("Complete", "ssa{sv}", &["nope", "x", "0"]).unwrap_err();
    assert!(e.contains("no model named `nope`"), "{e}");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "x", "1", "max_new_tokens", "i", "5"]).unwrap_err();
    assert!(e.contains("max_new_tokens") && e.contains("`u`"), "{e}");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "x", "1", "temprature", "d", "1"]).unwrap_err();
    assert!(e.contains("unknown option"), "{e}");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "x", "1", "speculative", "b", "true"]).unwrap_err();
    assert!(e.contains("no draft"), "{e}");
    let long = "And God said ".repeat(400); // ~1200 tokens, past the 1024 context
    let e = daemon.call("Generate", "ssa{sv}", &["kjv", &long, "0"]).unwrap_err();
    assert!(e.contains("context"), "{e}");
    // Typed error names, as a D-Bus client sees them.
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let err = proxy.generate("nope", "x", HashMap::new()).await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.ModelNotFound"), "{err}");
        let err = proxy.generate("kjv", &long, HashMap::new()).await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.PromptTooLong"), "{err}");
        let err = proxy.generate("kjv", "x", HashMap::from([("top_p", Value::F64(1.5))])).await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.InvalidArgument"), "{err}");
        let err = proxy.load_model("/etc/passwd").await.unwrap_err().to_string();
        assert!(err.contains("org.edgellm.Error.ModelNotFound"), "{err}");
    });
    // Still serving.
    let ok = daemon.call("Complete", "ssa{sv}", &["kjv", "In the beginning", "1", "max_new_tokens", "u", "4"]).unwrap();
    assert!(ok["data"][0].is_string());
    // A model loaded on first use.
    let ok = daemon.call("Complete", "ssa{sv}", &["kjv-draft", "In the beginning", "1", "max_new_tokens", "u", "4"]).unwrap();
    assert!(ok["data"][0].is_string());
}

#[test]
fn bad_config_exits_nonzero_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[daemon]\nbus = \"session\"\n\n[[model]]\nname = \"kjv\"\npath = \"x\"\nprovider = [\"cpu\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgellmd")).arg("--config").arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:7", config.display())) && err.contains("provider"), "{err}");
}

#[test]
fn second_instance_exits_with_a_clear_message() {
    let daemon = Daemon::start("");
    let config = daemon.bus.dir.path().join("edgellm.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_edgellmd")).arg("--config").arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already owns org.edgellm.Daemon1"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn example_config_is_valid() {
    let example = root().join("config/edgellm.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_edgellmd")).arg("--config").arg(&example).arg("--check-config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn systemd_unit_verifies_in_a_scratch_install() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        panic!("systemd-analyze is needed (apt-get install systemd)");
    }
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(root().join("scripts/install.sh"))
        .env("DESTDIR", dest.path())
        .env("EDGELLM_SKIP_BUILD", "1")
        .env("EDGELLM_BIN_DIR", Path::new(env!("CARGO_BIN_EXE_edgellmd")).parent().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "install: {}", String::from_utf8_lossy(&out.stderr));
    let unit = dest.path().join("usr/lib/systemd/system/edgellm.service");
    // The scratch root needs what any system has: the system's own units (sysinit.target, ...)
    // for the dependencies, and /bin/kill for ExecReload.
    std::fs::create_dir_all(dest.path().join("bin")).unwrap();
    std::fs::copy(std::fs::canonicalize("/bin/kill").unwrap(), dest.path().join("bin/kill")).unwrap();
    let units = dest.path().join("usr/lib/systemd/system");
    for entry in std::fs::read_dir("/usr/lib/systemd/system").unwrap().flatten() {
        let to = units.join(entry.file_name());
        if entry.file_type().unwrap().is_file() && !to.exists() {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
    let out = Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", dest.path().display())).arg(&unit).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("edgellm.service:"), "systemd-analyze verify: {err}");
    // It does check: without the binary the same call fails.
    std::fs::remove_file(dest.path().join("usr/bin/edgellmd")).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", dest.path().display())).arg(&unit).output().unwrap();
    assert!(!out.status.success(), "verify must fail when ExecStart is missing");
}

#[test]
fn shipped_introspection_matches_the_daemon() {
    let daemon = Daemon::start("");
    let out = daemon.busctl(&["introspect", "--xml-interface", "org.edgellm.Daemon1", "/org/edgellm/Daemon1"]);
    assert!(out.status.success());
    let live = String::from_utf8_lossy(&out.stdout);
    let path = root().join("dbus/org.edgellm.Daemon1.xml");
    // EDGELLM_BLESS=1 rewrites the shipped file from the daemon; the diff is then reviewed in git.
    if std::env::var_os("EDGELLM_BLESS").is_some() {
        std::fs::write(&path, format!("{}\n", live.trim())).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        live.trim(),
        shipped.trim(),
        "regenerate dbus/org.edgellm.Daemon1.xml: EDGELLM_BLESS=1 cargo test --test it shipped_introspection"
    );
}

#[test]
fn cli_ctrl_c_cancels_the_request() {
    let daemon = Daemon::start("");
    let mut cli = Command::new(env!("CARGO_BIN_EXE_edgellm"))
        .arg("--address")
        .arg(&daemon.bus.address)
        .args(["generate", "--max-new-tokens", "1000", "--temperature", "1", "--seed", "4", "And it came to pass"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first streamed text, then press Ctrl-C.
    let mut stdout = cli.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    let _ = Command::new("kill").arg("-INT").arg(cli.id().to_string()).status();
    let status = cli.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(cli.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("[cancelled]"), "{err}");
}

#[test]
fn speculative_model_serves_with_stats_and_can_be_turned_off() {
    let daemon = Daemon::start(&format!(
        "\n[[model]]\nname = \"kjv-spec\"\npath = \"{}\"\ndraft = \"kjv-draft\"\nspeculative_max_tokens = 4\n",
        model_dir("kjv-target").display()
    ));
    let case = &references().models["kjv-target"][0];
    let plain =
        daemon.call("Complete", "ssa{sv}", &["kjv", &case.prompt, "2", "max_new_tokens", "u", "64", "temperature", "d", "0"]).unwrap();
    let spec =
        daemon.call("Complete", "ssa{sv}", &["kjv-spec", &case.prompt, "2", "max_new_tokens", "u", "64", "temperature", "d", "0"]).unwrap();
    assert_eq!(spec["data"][0], plain["data"][0], "greedy speculative text equals the target alone");
    let stats = &spec["data"][1];
    assert!(stats["draft_tokens"]["data"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["acceptance_rate"]["data"].as_f64().unwrap() > 0.0, "{stats}");
    let off = daemon
        .call(
            "Complete",
            "ssa{sv}",
            &["kjv-spec", &case.prompt, "3", "max_new_tokens", "u", "64", "temperature", "d", "0", "speculative", "b", "false"],
        )
        .unwrap();
    assert!(off["data"][1].get("draft_tokens").is_none(), "speculative=false decodes plainly: {}", off["data"][1]);
    assert_eq!(off["data"][0], plain["data"][0]);
    let status = daemon.call("Status", "", &[]).unwrap();
    let totals = &status["data"][0]["speculative"]["data"]["kjv-spec"];
    assert!(totals[0].as_u64().unwrap() > 0, "Status keeps per-model totals: {status}");
}

#[test]
fn multitoken_model_serves_with_step_stats() {
    let daemon = Daemon::start(&format!(
        "\n[[model]]\nname = \"kjv-hamburger\"\npath = \"{}\"\nmultitoken_mode = \"trust\"\n",
        model_dir("kjv-hamburger").display()
    ));
    let case = &references().models["kjv-target"][1];
    let complete = |extra: &[&str]| {
        let count = (2 + extra.len() / 3).to_string();
        let mut args = vec!["kjv-hamburger", case.prompt.as_str(), count.as_str(), "max_new_tokens", "u", "48", "temperature", "d", "0"];
        args.extend_from_slice(extra);
        daemon.call("Complete", "ssa{sv}", &args)
    };
    let trust = complete(&[]).unwrap();
    let stats = &trust["data"][1];
    let generated = stats["generated_tokens"]["data"].as_u64().unwrap();
    let kv = stats["kv_entries"]["data"].as_u64().unwrap();
    let per_step = stats["tokens_per_step"]["data"].as_f64().unwrap();
    let prompt_tokens = stats["prompt_tokens"]["data"].as_u64().unwrap();
    let forwards = stats["target_forwards"]["data"].as_u64().unwrap();
    // One KV entry per prompt token and per macro step after the prefill, and the bundled model
    // really merges at its default threshold (1.79 tokens per step on the reference prompts).
    assert_eq!(kv, prompt_tokens + forwards - 1, "{stats}");
    assert!(per_step > 1.3 && kv < prompt_tokens + generated - 10, "trust mode stores fewer KV entries than tokens: {stats}");
    // One token per step: the base alone; verify mode gives exactly its text.
    let alone = complete(&["multitoken_threshold", "d", "1"]).unwrap();
    assert_eq!(alone["data"][1]["tokens_per_step"]["data"].as_f64().unwrap(), 1.0, "{}", alone["data"][1]);
    let verify = complete(&["multitoken_mode", "s", "verify"]).unwrap();
    assert_eq!(verify["data"][0], alone["data"][0], "verify mode = the base's own greedy text");
    assert_eq!(verify["data"][1]["multitoken_mode"]["data"], "verify");
    // The CLI passes the step options and streams the same text.
    let out = daemon.cli(&[
        "generate",
        "--model",
        "kjv-hamburger",
        "--max-new-tokens",
        "48",
        "--temperature",
        "0",
        "--multitoken-mode",
        "verify",
        &case.prompt,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'), verify["data"][0].as_str().unwrap());
    // Step options are checked at the edge, by name.
    let e = complete(&["multitoken_max_tokens", "u", "9"]).unwrap_err();
    assert!(e.contains("multitoken_max_tokens"), "{e}");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", &case.prompt, "1", "multitoken_threshold", "d", "0.5"]).unwrap_err();
    assert!(e.contains("not a multi-token model"), "{e}");
    // ... and the daemon keeps serving.
    assert!(complete(&[]).is_ok());
}

#[test]
fn load_that_would_not_fit_is_refused_with_the_need() {
    let daemon = Daemon::start("\n[limits]\nmemory_reserve_mib = 100000000\n");
    let models = daemon.call("ListModels", "", &[]).unwrap().to_string();
    assert!(models.contains("failed") && models.contains("not enough memory"), "{models}");
    let e = daemon.call("LoadModel", "s", &["kjv-draft"]).unwrap_err();
    assert!(e.contains("loading needs about") && e.contains("memory_reserve_mib"), "{e}");
}

#[test]
fn unload_returns_the_memory() {
    let daemon = Daemon::start("");
    // Anonymous memory: the session, its arena, the KV. File-backed pages (the code a load runs
    // for the first time, of this binary and of ONNX Runtime) are shared and stay cached; they are
    // not the model's to give back.
    let rss = || proc_status_kib(daemon.pid(), "RssAnon").expect("RssAnon of edgellmd");
    let before = rss();
    daemon.call("LoadModel", "s", &["kjv-draft"]).unwrap();
    daemon.call("Complete", "ssa{sv}", &["kjv-draft", "And God said", "1", "max_new_tokens", "u", "32"]).unwrap();
    let loaded = rss();
    daemon.call("UnloadModel", "s", &["kjv-draft"]).unwrap();
    let after = rss();
    eprintln!("anonymous RSS: {before} KiB before LoadModel, {loaded} KiB loaded, {after} KiB after UnloadModel");
    assert!(loaded > before, "loading costs memory");
    // The session and its arena go back to the system; the tokenizer stays (requests are
    // validated with it), and so do pages of the runtime's code.
    assert!(loaded - after >= (loaded - before) / 4, "unloading returned too little: {before} -> {loaded} -> {after} KiB");
    let models = daemon.call("ListModels", "", &[]).unwrap().to_string();
    assert!(models.contains("unloaded"), "{models}");
}

#[test]
fn sighup_reloads_the_config_and_rejects_a_bad_one() {
    let daemon = Daemon::start("");
    let config = daemon.bus.dir.path().join("edgellm.toml");
    // Remove kjv-draft, add kjv-extra.
    std::fs::write(
        &config,
        format!(
            "[daemon]\naddress = \"{}\"\nshutdown_grace_s = 2\n\n[limits]\nmax_new_tokens = 16\n\n[[model]]\nname = \"kjv\"\npath = \"{}\"\n\n[[model]]\nname = \"kjv-extra\"\npath = \"{}\"\n",
            daemon.bus.address,
            model_dir("kjv-target").display(),
            model_dir("kjv-draft").display()
        ),
    )
    .unwrap();
    Command::new("kill").arg("-HUP").arg(daemon.pid().to_string()).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let models = daemon.call("ListModels", "", &[]).unwrap().to_string();
        if models.contains("kjv-extra") && models.contains("ready") && !models.contains("\"kjv-draft\"") {
            let extra = daemon.call("ListModels", "", &[]).unwrap();
            let states: Vec<String> =
                extra["data"][0].as_array().unwrap().iter().map(|m| format!("{}={}", m[0], m[1]["state"]["data"])).collect();
            if states.iter().any(|s| s.starts_with("\"kjv-extra\"=\"ready\"")) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "reload not applied: {models}\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The new limit applies at once.
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "x", "1", "max_new_tokens", "u", "64"]).unwrap_err();
    assert!(e.contains("limit of 16"), "{e}");
    // A bad file is rejected; the running config stays.
    std::fs::write(&config, "[daemon]\nbus = \"nope\"\n").unwrap();
    Command::new("kill").arg("-HUP").arg(daemon.pid().to_string()).status().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.log_text().contains("config rejected, keeping the running one"), "{}", daemon.log_text());
    assert!(daemon.call("Complete", "ssa{sv}", &["kjv-extra", "And", "1", "max_new_tokens", "u", "4"]).is_ok());
}

#[test]
fn an_onnx_runtime_error_ends_only_that_request() {
    // A model whose config claims a longer context than its rotary cache holds: ONNX Runtime
    // fails inside GroupQueryAttention on a long prompt.
    let broken = crate::kit::fixtures::copy_model("kjv-draft");
    let config_path = broken.path().join("genai_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["model"]["context_length"] = 2048.into();
    config["search"]["max_length"] = 2048.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let daemon = Daemon::start(&format!("\n[[model]]\nname = \"long\"\npath = \"{}\"\n", broken.path().display()));
    let long = "And God said ".repeat(400);
    let (reason, error) = rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let mut finished = proxy.receive_finished().await.unwrap();
        let id = proxy.generate("long", &long, HashMap::new()).await.unwrap();
        loop {
            let f = finished.next().await.unwrap();
            let a = f.args().unwrap();
            if a.request_id == id {
                let error = a.stats.get("error").map(|v| String::try_from(v.try_clone().unwrap()).unwrap()).unwrap_or_default();
                break (a.reason.clone(), error);
            }
        }
    });
    assert_eq!(reason, "error");
    assert!(error.contains("GroupQueryAttention"), "{error}");
    // The same model and the daemon keep serving.
    assert!(daemon.call("Complete", "ssa{sv}", &["long", "And God said", "1", "max_new_tokens", "u", "4"]).is_ok());
    assert!(daemon.call("Complete", "ssa{sv}", &["kjv", "And God said", "1", "max_new_tokens", "u", "4"]).is_ok());
}

#[test]
fn catalogue_of_bad_input_and_a_flood() {
    let missing = crate::kit::fixtures::copy_model("kjv-draft");
    std::fs::remove_file(missing.path().join("model.onnx.data")).unwrap();
    let daemon = Daemon::start(&format!(
        "\n[[model]]\nname = \"missing\"\npath = \"{}\"\npreload = false\n\n[limits]\nmax_per_client = 3\nmax_prompt_bytes = 200\n",
        missing.path().display()
    ));
    let err = |r: Result<serde_json::Value, String>| r.expect_err("must be refused");
    // Wrong signature: the bus library refuses the message before the daemon sees it.
    let e = err(daemon.call("Generate", "s", &["kjv"]));
    assert!(e.to_lowercase().contains("signature") || e.contains("Invalid"), "{e}");
    let e = err(daemon.call("Complete", "ssa{sv}", &["kjv", "x", "1", "top_k", "u", "0"]));
    assert!(e.contains("top_k"), "{e}");
    let e = err(daemon.call("Complete", "ssa{sv}", &["kjv", &"x".repeat(201), "0"]));
    assert!(e.contains("max_prompt_bytes"), "{e}");
    // A model whose weights are missing: a typed error naming the file; the others untouched.
    let e = err(daemon.call("LoadModel", "s", &["missing"]));
    assert!(e.contains("model.onnx.data"), "{e}");
    let models = daemon.call("ListModels", "", &[]).unwrap().to_string();
    assert!(models.contains("\"kjv\"") && models.contains("ready"), "{models}");

    // A flood from one client gets Busy past its share; another client is still served.
    rt().block_on(async {
        let flooder = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&flooder).await.unwrap();
        let options = || HashMap::from([("max_new_tokens", Value::U32(200)), ("temperature", Value::F64(1.0))]);
        let e = proxy.generate("kjv", "x", HashMap::from([("temperature", Value::F64(-0.5))])).await.unwrap_err().to_string();
        assert!(e.contains("InvalidArgument") && e.contains("temperature") && e.contains("out of range"), "{e}");
        let mut busy = 0;
        for _ in 0..12 {
            if let Err(e) = proxy.generate("kjv", "And it came to pass", options()).await {
                assert!(e.to_string().contains("org.edgellm.Error.Busy"), "{e}");
                busy += 1;
            }
        }
        assert!(busy >= 9, "past max_per_client = 3 the flood is refused ({busy} refused)");
        let other = daemon.connect().await;
        let other = Daemon1Proxy::new(&other).await.unwrap();
        let (text, _) = other.complete("kjv", "And God said", HashMap::from([("max_new_tokens", Value::U32(8))])).await.unwrap();
        assert!(!text.is_empty());
    });
    // Prompts and generated text stay out of the logs unless log_text is set.
    assert!(!daemon.log_text().contains("And it came to pass"), "{}", daemon.log_text());
}

/// A hand-made message whose prompt is not valid UTF-8 (no D-Bus library would send one): the
/// bus refuses it before the daemon sees it, and the daemon keeps serving.
#[test]
fn invalid_utf8_never_reaches_the_daemon() {
    use std::io::{BufRead, Read, Write};
    let daemon = Daemon::start("");
    let path = daemon.bus.address.trim_start_matches("unix:path=").to_string();
    let mut socket = std::os::unix::net::UnixStream::connect(&path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let uid: String = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
    socket.write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(socket.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK"), "{line}");
    socket.write_all(b"BEGIN\r\n").unwrap();
    let hello = zbus::message::Message::method_call("/org/freedesktop/DBus", "Hello")
        .unwrap()
        .destination("org.freedesktop.DBus")
        .unwrap()
        .interface("org.freedesktop.DBus")
        .unwrap()
        .build(&())
        .unwrap();
    socket.write_all(hello.data()).unwrap();
    let marker = "PROMPT-MARKER";
    let options: HashMap<&str, Value<'_>> = HashMap::new();
    let generate = zbus::message::Message::method_call("/org/edgellm/Daemon1", "Generate")
        .unwrap()
        .destination("org.edgellm.Daemon1")
        .unwrap()
        .interface("org.edgellm.Daemon1")
        .unwrap()
        .build(&("kjv", marker, options))
        .unwrap();
    let mut bytes = generate.data().to_vec();
    let at = bytes.windows(marker.len()).position(|w| w == marker.as_bytes()).expect("prompt bytes");
    bytes[at] = 0xff; // not UTF-8
    socket.write_all(&bytes).unwrap();
    // The bus answers Hello, then drops or refuses the invalid message; read what comes.
    let mut received = Vec::new();
    let _ = reader.read_to_end(&mut received);
    assert!(!daemon.log_text().contains("request queued"), "the invalid message reached the daemon: {}", daemon.log_text());
    // Everyone else is still served.
    assert!(daemon.call("Complete", "ssa{sv}", &["kjv", "And God said", "1", "max_new_tokens", "u", "4"]).is_ok());
}

/// edgellmd as systemd starts a `Type=notify` service with a watchdog: a notify socket, and
/// WATCHDOG_PID naming the daemon's own pid (exec keeps the shell's).
struct NotifiedDaemon {
    bus: PrivateBus,
    child: Child,
    socket: std::os::unix::net::UnixDatagram,
    log: PathBuf,
}

impl NotifiedDaemon {
    fn start(watchdog_usec: &str) -> NotifiedDaemon {
        let bus = PrivateBus::start();
        let config = test_config(&bus, "");
        let socket_path = bus.dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let log = bus.dir.path().join("edgellmd.log");
        let child = Command::new("sh")
            .arg("-c")
            .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
            .arg(env!("CARGO_BIN_EXE_edgellmd"))
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", watchdog_usec)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        NotifiedDaemon { bus, child, socket, log }
    }
}

/// systemd's notify protocol: READY=1 once the preloaded model is loaded, then WATCHDOG=1 pings
/// at half the watchdog period, STOPPING=1 on SIGTERM.
#[test]
fn notifies_ready_watchdog_and_stopping() {
    let NotifiedDaemon { bus, mut child, socket, log } = NotifiedDaemon::start("400000");
    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    let started = Instant::now();
    while messages.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 3 {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| {
            panic!("no notification within 30 s ({e}): {messages:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        messages.push(String::from_utf8_lossy(&buf[..n]).to_string());
        assert!(started.elapsed() < Duration::from_secs(30), "{messages:?}");
    }
    assert!(messages[0].contains("READY=1"), "READY=1 comes first: {messages:?}");
    // Ready means the preloaded model answers at once.
    let out = Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(["call", "org.edgellm.Daemon1", "/org/edgellm/Daemon1", "org.edgellm.Daemon1", "ListModels"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let n = socket.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") || messages.iter().any(|m| m.contains("STOPPING=1")));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// The watchdog pings come from the engines' progress: an engine that makes no progress for a
/// watchdog period (here a ~900-token prefill against a 20 ms period) stops them, and they resume
/// when it moves again. Under systemd a real hang would then end in a restart.
#[test]
fn a_stalled_engine_stops_the_watchdog_pings() {
    let NotifiedDaemon { bus, mut child, socket, log } = NotifiedDaemon::start("20000");
    let mut buf = [0u8; 512];
    let mut pings = 0;
    while pings < 3 {
        let n = socket.recv(&mut buf).expect("notifications");
        pings += String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") as usize;
    }
    // A long prefill: one engine step of a few hundred milliseconds, no token in between.
    let long = "And God said ".repeat(300);
    let busctl = Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(["call", "org.edgellm.Daemon1", "/org/edgellm/Daemon1", "org.edgellm.Daemon1", "Complete", "ssa{sv}", "kjv"])
        .arg(&long)
        .args(["1", "max_new_tokens", "u", "1"])
        .output()
        .unwrap();
    assert!(busctl.status.success(), "{}", String::from_utf8_lossy(&busctl.stderr));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("made no progress for a watchdog period"), "the stall was not noticed:\n{text}");
    // Pings resume once the engine moves again.
    // Drop what was queued before (non-blocking: pings keep coming every 10 ms).
    socket.set_nonblocking(true).unwrap();
    while socket.recv(&mut buf).is_ok() {}
    socket.set_nonblocking(false).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = socket.recv(&mut buf).expect("watchdog pings resume");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1"));
    // Nobody reads the pings from here: closed, they fail at once instead of filling the socket
    // until the daemon's notify call blocks (systemd always reads them).
    drop(socket);
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn draft_and_target_on_different_execution_providers() {
    if !crate::kit::fixtures::openvino_cpu_here("daemon::draft_and_target_on_different_execution_providers") {
        return;
    }
    let daemon = Daemon::start(&format!(
        "\n[[model]]\nname = \"draft-ov\"\npath = \"{}\"\nproviders = [\"openvino\"]\nstrict = true\npreload = false\n\n[[model]]\nname = \"kjv-spec\"\npath = \"{}\"\ndraft = \"draft-ov\"\n",
        model_dir("kjv-draft").display(),
        model_dir("kjv-target").display()
    ));
    let (prompt, reference) = first_prompt_and_genai_text();
    let spec =
        daemon.call("Complete", "ssa{sv}", &["kjv-spec", prompt, "2", "max_new_tokens", "u", "64", "temperature", "d", "0"]).unwrap();
    assert_eq!(spec["data"][0].as_str().unwrap(), reference, "target on CPU with its draft on OpenVINO: still the target's greedy text");
    assert!(spec["data"][1]["accepted_tokens"]["data"].as_u64().unwrap() > 0);
    let models = daemon.call("ListModels", "", &[]).unwrap();
    let entry = models["data"][0].as_array().unwrap().iter().find(|m| m[0] == "kjv-spec").unwrap().clone();
    assert_eq!(entry[1]["provider"]["data"], "cpu");
    assert_eq!(entry[1]["draft_provider"]["data"], "openvino", "{entry}");
}

/// `ListModels` says what runs each model's int4 products, as the config chose it: by default
/// (`auto`) and where asked for, edgellm's where the CPU has AVX-512 VNNI, small model or not;
/// ONNX Runtime's where asked for.
#[test]
fn list_models_reports_the_int4_kernel_the_config_chose() {
    let daemon = Daemon::start(&format!(
        "\n[[model]]\nname = \"kjv-default\"\npath = \"{0}\"\n\n[[model]]\nname = \"kjv-edgellm\"\npath = \"{0}\"\nint4_kernel = \"edgellm\"\n\n[[model]]\nname = \"kjv-mlas\"\npath = \"{0}\"\nint4_kernel = \"onnxruntime\"\n",
        model_dir("kjv-target").display()
    ));
    // Preloading runs in the background: wait until the three are ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    let models = loop {
        let models = daemon.call("ListModels", "", &[]).unwrap();
        let ours = |m: &&serde_json::Value| ["kjv-default", "kjv-edgellm", "kjv-mlas"].iter().any(|n| m[0] == *n);
        let ready = models["data"][0].as_array().unwrap().iter().filter(ours).filter(|m| m[1]["state"]["data"] == "ready").count();
        if ready == 3 || Instant::now() > deadline {
            break models;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let kernel = |name: &str| {
        let entry = models["data"][0].as_array().unwrap().iter().find(|m| m[0] == name).unwrap().clone();
        entry[1]["int4_kernel"]["data"].as_str().unwrap_or_else(|| panic!("no int4_kernel in {entry}")).to_string()
    };
    let supported = edgellm::runtime::int4_supported();
    for name in ["kjv-default", "kjv-edgellm"] {
        let chosen = kernel(name);
        assert!(
            if supported {
                chosen == "edgellm AVX-512 VNNI (31 MatMulNBits nodes), edgellm's GroupQueryAttention (a verify's rows are plain decoding's exactly)"
            } else {
                chosen.contains("no AVX-512 VNNI")
            },
            "{name}: {chosen}"
        );
    }
    assert!(kernel("kjv-mlas").contains("int4_kernel = \"onnxruntime\""), "{}", kernel("kjv-mlas"));
}

/// Prompt lookup over D-Bus: on by `prompt_lookup = true` in the config or by the request option,
/// with draft statistics, the greedy text unchanged; refused where a draft model drafts.
#[test]
fn prompt_lookup_serves_from_the_config_and_the_option() {
    let daemon = Daemon::start(&format!(
        "\n[[model]]\nname = \"kjv-lookup\"\npath = \"{}\"\nprompt_lookup = true\n\n[[model]]\nname = \"kjv-spec\"\npath = \"{}\"\ndraft = \"kjv-draft\"\npreload = false\n",
        model_dir("kjv-target").display(),
        model_dir("kjv-target").display()
    ));
    let prompt = crate::speculative::quoting_prompts().remove(0);
    let prompt = prompt.as_str();
    let complete = |model: &str, extra: &[&str]| {
        let mut args = vec![model, prompt];
        let n = (2 + extra.len() / 3).to_string();
        args.push(&n);
        args.extend(["max_new_tokens", "u", "64", "temperature", "d", "0"]);
        args.extend(extra);
        let args: Vec<&str> = args.to_vec();
        daemon.call("Complete", "ssa{sv}", &args)
    };
    let plain = complete("kjv", &[]).unwrap();
    assert!(plain["data"][1].get("draft_tokens").is_none(), "{plain}");
    for reply in [complete("kjv-lookup", &[]).unwrap(), complete("kjv", &["prompt_lookup", "b", "true"]).unwrap()] {
        assert_eq!(reply["data"][0], plain["data"][0], "greedy text with prompt lookup equals plain");
        let stats = &reply["data"][1];
        assert!(stats["draft_tokens"]["data"].as_u64().unwrap() > 0, "{stats}");
        assert!(stats.get("acceptance_rate").is_some(), "{stats}");
    }
    let off = complete("kjv-lookup", &["prompt_lookup", "b", "false"]).unwrap();
    assert!(off["data"][1].get("draft_tokens").is_none(), "{off}");
    let e = complete("kjv-spec", &["prompt_lookup", "b", "true"]).unwrap_err();
    assert!(e.contains("prompt_lookup") && e.contains("draft model"), "{e}");
}

/// `edgellm models` and `edgellm status` print aligned tables for people, and `--json` prints
/// what busctl's own call of ListModels and Status returns (the same values).
#[test]
fn cli_models_and_status_print_aligned_tables_and_json() {
    let daemon = Daemon::start("");
    daemon.call("Complete", "ssa{sv}", &["kjv", "And God said", "1", "max_new_tokens", "u", "4"]).unwrap();
    let out = daemon.cli(&["models"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("STATE") && lines[0].contains("PROVIDER"), "{text}");
    assert!(!text.contains("uint64") && !text.contains('='), "no zvariant debug text: {text}");
    // Every column starts where its header does.
    let starts = |line: &str| -> Vec<usize> {
        let b = line.as_bytes();
        (0..b.len()).filter(|&i| b[i] != b' ' && (i == 0 || (i >= 2 && b[i - 1] == b' ' && b[i - 2] == b' '))).collect()
    };
    let header = starts(lines[0]);
    let kjv = lines.iter().find(|l| l.starts_with("kjv ")).unwrap_or_else(|| panic!("a kjv row: {text}"));
    assert_eq!(&starts(kjv)[..3], &header[..3], "aligned:\n{text}");
    assert_eq!(kjv[header[1]..].split_whitespace().next(), Some("ready"), "{text}");
    assert_eq!(kjv[header[2]..].split_whitespace().next(), Some("cpu"), "{text}");
    let column = |name: &str| lines[0].find(name).unwrap_or_else(|| panic!("a {name} column: {text}"));
    let memory: u64 = kjv[column("MEMORY")..].split_whitespace().next().unwrap().parse().expect("MiB the load added");
    assert!(memory > 0, "{text}");
    let speed: f64 = kjv[column("TOK/S")..].split_whitespace().next().unwrap().parse().expect("the last request's tokens/s");
    assert!(speed > 0.0, "{text}");

    let out = daemon.cli(&["models", "--json"]);
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).expect("models --json is JSON");
    let busctl = daemon.call("ListModels", "", &[]).unwrap();
    for entry in busctl["data"][0].as_array().unwrap() {
        let (name, fields) = (entry[0].as_str().unwrap(), entry[1].as_object().unwrap());
        let mine = ours.as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} in {ours}"));
        for (key, value) in fields {
            match (mine[key].as_f64(), value["data"].as_f64()) {
                // busctl prints doubles to 17 digits, serde_json to the shortest that round-trips.
                (Some(a), Some(b)) => assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{name}.{key}: {a} against {b}"),
                _ => assert_eq!(&mine[key], &value["data"], "{name}.{key}"),
            }
        }
    }

    // `edgellm load` shows the state changes the daemon announces, with the time taken.
    let out = daemon.cli(&["load", "kjv-draft"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("kjv-draft: loading ("), "the Loading state from ModelStateChanged: {progress:?}");
    let done = String::from_utf8_lossy(&out.stdout);
    assert!(done.starts_with("kjv-draft: ready in ") && done.trim_end().ends_with(" s"), "{done:?}");

    let out = daemon.cli(&["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("uint"), "no zvariant debug text: {text}");
    assert!(text.lines().any(|l| l.starts_with("requests total") && l.trim_end().ends_with(" 1")), "{text}");
    let out = daemon.cli(&["status", "--json"]);
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let busctl = daemon.call("Status", "", &[]).unwrap();
    for key in ["version", "requests_total", "generated_tokens_total", "requests_in_flight"] {
        assert_eq!(ours[key], busctl["data"][0][key]["data"], "{key}");
    }
}

/// `keep_alive_s`: a model idle that long unloads, `ListModels` says when beforehand, and the
/// next request loads it again and is served.
#[test]
fn an_idle_model_unloads_after_its_keep_alive_and_loads_again_on_use() {
    let daemon =
        Daemon::start(&format!("\n[[model]]\nname = \"kjv-brief\"\npath = \"{}\"\nkeep_alive_s = 2\n", model_dir("kjv-target").display()));
    let state = |daemon: &Daemon| {
        let models = daemon.call("ListModels", "", &[]).unwrap();
        let kjv = models["data"][0].as_array().unwrap().iter().find(|m| m[0] == "kjv-brief").unwrap().clone();
        (kjv[1]["state"]["data"].as_str().unwrap().to_string(), kjv[1].get("unloads_in_s").map(|v| v["data"].as_f64().unwrap()))
    };
    let complete = |daemon: &Daemon| daemon.call("Complete", "ssa{sv}", &["kjv-brief", "And God said", "1", "max_new_tokens", "u", "4"]);
    complete(&daemon).unwrap();
    let (s, unloads_in) = state(&daemon);
    assert_eq!(s, "ready");
    let unloads_in = unloads_in.expect("an idle model with a keep-alive says when it unloads");
    assert!(unloads_in > 0.0 && unloads_in <= 2.0, "{unloads_in}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(&daemon).0 != "unloaded" {
        assert!(Instant::now() < deadline, "kjv-brief did not unload after 2 s idle: {:?}", state(&daemon));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state(&daemon).1, None, "unloaded: nothing left to say");
    let text = complete(&daemon).unwrap();
    assert!(!text["data"][0].as_str().unwrap().is_empty());
    assert_eq!(state(&daemon).0, "ready", "loaded again on use");
}

/// `edgellm chat` without a message holds a conversation: a line of stdin a turn, each answer
/// streamed, the history sent with every turn. Its output equals two Chat calls of a zbus client
/// with the same history; Ctrl-D (end of input) ends it.
#[test]
fn cli_chat_without_a_message_holds_a_conversation() {
    use std::io::Write;
    let daemon = Daemon::start("");
    let questions = ["Who created the heaven and the earth?", "And what did he say?"];
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgellm"))
        .arg("--address")
        .arg(&daemon.bus.address)
        .args(["chat", "--max-new-tokens", "12", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{}\n{}\n", questions[0], questions[1]).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (first, second) = rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let chat = |messages: Vec<(&'static str, String)>| {
            let proxy = &proxy;
            async move {
                let messages: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (*r, c.as_str())).collect();
                stream_request(proxy, proxy.chat("kjv", &messages, greedy_options(12))).await.0
            }
        };
        let first = chat(vec![("user", questions[0].to_string())]).await;
        let second = chat(vec![("user", questions[0].to_string()), ("assistant", first.clone()), ("user", questions[1].to_string())]).await;
        (first, second)
    });
    assert_ne!(first, second, "the second turn answers the second question");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{first}\n{second}\n"));
}

#[test]
fn priority_option_and_background_users() {
    let me = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap().trim().to_string();
    let daemon = Daemon::start(&format!("\n[limits]\nbackground_users = [\"{me}\"]\n"));
    // (priority, queued_ms): both must be in the stats.
    let priority = |options: &[&str]| -> (String, f64) {
        let mut args = vec!["kjv", "And God said"];
        let count = (options.len() / 3 + 1).to_string();
        args.push(&count);
        args.extend_from_slice(&["max_new_tokens", "u", "4"]);
        args.extend_from_slice(options);
        let out = daemon.call("Complete", "ssa{sv}", &args).unwrap();
        let stats = &out["data"][1];
        (stats["priority"]["data"].as_str().unwrap().to_string(), stats["queued_ms"]["data"].as_f64().unwrap())
    };
    // This test's user is a background user: its requests default to background.
    assert_eq!(priority(&[]).0, "background");
    assert_eq!(priority(&["priority", "s", "interactive"]).0, "interactive");
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "x", "1", "priority", "s", "urgent"]).unwrap_err();
    assert!(e.contains("priority") && e.contains("interactive"), "{e}");
    // The CLI's flag.
    let out = daemon.cli(&["complete", "--max-new-tokens", "2", "--priority", "interactive", "And God said"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("priority=interactive"), "{out:?}");
    // Without background_users, requests are interactive.
    let plain = Daemon::start("");
    let out = plain.call("Complete", "ssa{sv}", &["kjv", "And God said", "1", "max_new_tokens", "u", "2"]).unwrap();
    assert_eq!(out["data"][1]["priority"]["data"], "interactive");
}
