//! Nothing a client sends, a model says or a config holds takes edgellmd off the bus: a NUL in a
//! reply, signal or error; a grammar deep enough to overflow a stack; a bus that goes away; an
//! emptied config on SIGHUP. Each test ends by checking that the daemon still owns its name and
//! answers another client.

use std::time::{Duration, Instant};

use edgellm::service::client::Daemon1Proxy;
use zbus::zvariant::Value;

use crate::kit::bus::{greedy_options, rt, sampled_options, stream_request, Daemon};

/// The id whose text is the byte 0x00 in the bundled models' byte-level tokenizer.
const NUL_TOKEN: &str = "191";

/// The daemon still owns `org.edgellm.Daemon1` and answers a fresh client.
fn still_serving(daemon: &Daemon) {
    let models = daemon.call("ListModels", "", &[]).unwrap_or_else(|e| panic!("the daemon left the bus: {e}\n{}", daemon.log_text()));
    assert!(models.to_string().contains("kjv"), "{models}");
}

#[test]
fn a_nul_in_a_reply_a_signal_or_an_error_keeps_the_daemon_on_the_bus() {
    let daemon = Daemon::start("");
    // Detokenize of the NUL byte's token: U+FFFD in its place.
    let reply = daemon.call("Detokenize", "sau", &["kjv", "3", "72", NUL_TOKEN, "72"]).unwrap();
    let text = reply["data"][0].as_str().unwrap();
    assert!(text.contains('\u{FFFD}') && !text.contains('\0'), "{text:?}");
    still_serving(&daemon);

    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        // A grammar that forces the model to say NUL, through Complete and through Token signals.
        let mut options = greedy_options(4);
        options.insert("grammar", Value::from(r#"start: /\x00+/"#));
        options.insert("return_token_ids", Value::Bool(true));
        let (text, stats) = proxy.complete("kjv", "In the beginning", options.clone()).await.unwrap();
        assert!(!text.is_empty() && text.chars().all(|c| c == '\u{FFFD}'), "{text:?}");
        let ids: Vec<u32> = stats["token_ids"].clone().try_into().unwrap();
        assert!(ids.iter().all(|&id| id.to_string() == NUL_TOKEN), "the exact ids stay available: {ids:?}");
        options.remove("return_token_ids");
        let (streamed, reason, _) = stream_request(&proxy, proxy.generate("kjv", "In the beginning", options)).await;
        assert_eq!(streamed, text, "{reason}");
        // A caller's schema quoted in an error message: JSON's escape of NUL (a client cannot send
        // the byte itself: the bus would drop the client).
        let mut options = greedy_options(4);
        options.insert("json_schema", Value::from(r#"{"type":"foo\u0000"}"#));
        let e = proxy.complete("kjv", "In the beginning", options).await.unwrap_err().to_string();
        assert!(e.contains("InvalidArgument") && !e.contains('\0'), "{e}");
    });
    still_serving(&daemon);
}

#[test]
fn grammars_deep_enough_to_overflow_a_stack_are_answered_and_sizes_are_bounded_first() {
    let daemon = Daemon::start("");
    // 1,000 chained rules (about 17 KB) and 1,000 chained `$ref`s (about 31 KB) aborted the daemon
    // with a stack overflow; so, at the 64 KiB limit, 3,000 rules.
    let chain = |n: usize| {
        let mut g = String::from("start: r0\n");
        for i in 0..n {
            g.push_str(&format!("r{i}: r{} | \"x\"\n", i + 1));
        }
        g + &format!("r{n}: \"y\"\n")
    };
    let refs = {
        let defs: Vec<String> =
            (0..1000).map(|i| format!("\"d{i}\": {{\"$ref\": \"#/$defs/d{}\"}}", i + 1)).chain(["\"d1000\": {\"type\": \"integer\"}".into()]).collect();
        format!("{{\"$defs\": {{{}}}, \"$ref\": \"#/$defs/d0\"}}", defs.join(", "))
    };
    // Nesting as deep as 64 KiB allows: parentheses in a rule, groups in a regex, arrays in a schema.
    let parens = format!("start: {}\"x\"{}", "(".repeat(32_000), ")".repeat(32_000));
    let groups = format!("start: /{}x{}/", "(".repeat(32_000), ")".repeat(32_000));
    let arrays = format!("{}{{\"type\": \"integer\"}}{}", "{\"type\": \"array\", \"items\": ".repeat(1500), "}".repeat(1500));
    let cases = [
        ("grammar", chain(1000)),
        ("grammar", chain(3000)),
        ("json_schema", refs),
        ("grammar", parens),
        ("grammar", groups),
        ("json_schema", arrays),
    ];
    for (option, text) in cases {
        assert!(text.len() <= 64 * 1024, "{}", text.len());
        let started = Instant::now();
        let result = daemon.call("Complete", "ssa{sv}", &["kjv", "Say", "2", "max_new_tokens", "u", "3", option, "s", &text]);
        if let Err(e) = &result {
            assert!(e.contains("InvalidArgument") || e.contains("nvalid"), "{option} of {} bytes: {e}", text.len());
        }
        eprintln!("{option} of {} bytes: {:?} in {:.1?}", text.len(), result.as_ref().map(|_| "answered"), started.elapsed());
        still_serving(&daemon);
    }
    // One byte over the limit is refused before llguidance sees it.
    let over = format!("start: \"{}\"", "a".repeat(64 * 1024));
    let started = Instant::now();
    let e = daemon.call("Complete", "ssa{sv}", &["kjv", "Say", "2", "max_new_tokens", "u", "3", "grammar", "s", &over]).unwrap_err();
    assert!(e.contains("grammar") && e.contains("at most 65536"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    still_serving(&daemon);
}

#[test]
fn a_lost_bus_ends_the_daemon_with_a_failure() {
    let mut daemon = Daemon::start("");
    still_serving(&daemon);
    daemon.bus.kill();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "edgellmd runs on without its bus:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("edgellmd exited {status} {:.1?} after its bus", started.elapsed());
    assert!(!status.success(), "a restart needs a failure status: {status}");
    assert!(daemon.log_text().contains("lost the D-Bus bus"), "{}", daemon.log_text());
}

#[test]
fn a_config_emptied_before_sighup_is_refused_and_the_models_stay() {
    let daemon = Daemon::start("");
    let config = daemon.bus.dir.path().join("edgellm.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let without_models = original.split("[[model]]").next().unwrap().to_string();
    for (reloads, text) in [String::new(), without_models].into_iter().enumerate() {
        std::fs::write(&config, &text).unwrap();
        let check = crate::kit::fixtures::command(env!("CARGO_BIN_EXE_edgellmd")).arg("--check-config").arg("--config").arg(&config).output().unwrap();
        let said = String::from_utf8_lossy(&check.stderr);
        assert!(!check.status.success() && said.contains("no [[model]]"), "--check-config on {text:?}: {said}");
        let _ = std::process::Command::new("kill").arg("-HUP").arg(daemon.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while daemon.log_text().matches("config rejected").count() <= reloads {
            assert!(Instant::now() < deadline, "no word of the reload: {}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        let reply = daemon.call("Complete", "ssa{sv}", &["kjv", "In the beginning", "1", "max_new_tokens", "u", "2"]);
        assert!(reply.is_ok(), "{reply:?}");
    }
    still_serving(&daemon);
}

/// Detokenize is the tokenizer's inverse: on onnxruntime-genai's tiny GPT-2 (a tokenizer of
/// 50,257 ids, a model of 1,000 logits) every text's ids decode as Hugging Face `tokenizers`
/// decodes them, and only ids past the tokenizer's are refused.
#[test]
fn detokenize_takes_the_tokenizers_ids_as_hugging_face_tokenizers_does() {
    let gpt2 = crate::kit::fixtures::shared_reference("genai-test-models/tiny-random-gpt2-fp32");
    let daemon = Daemon::start(&format!("\n[[model]]\nname = \"gpt2\"\npath = \"{}\"\npreload = false\n", gpt2.display()));
    let texts = ["In the beginning God created", "naïve café — “quoted”", "日本語 and emoji 🎉", "line one\nline two\t!"];
    let reference = crate::kit::fixtures::python_reference(
        "tokenizer_reference.py",
        &serde_json::json!({ "tokenizer": gpt2.join("tokenizer.json"), "texts": texts, "sequences": [] }),
    );
    let mut beyond_the_model = 0;
    for (i, text) in texts.iter().enumerate() {
        let ids: Vec<String> = reference["encoded"][i].as_array().unwrap().iter().map(|id| id.to_string()).collect();
        beyond_the_model += ids.iter().filter(|id| id.parse::<u32>().unwrap() >= 1000).count();
        let mut args = vec!["gpt2".to_string(), ids.len().to_string()];
        args.extend(ids.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = daemon.call("Detokenize", "sau", &args).unwrap_or_else(|e| panic!("Detokenize of {text:?}: {e}"));
        assert_eq!(reply["data"][0].as_str().unwrap(), reference["decoded"][i].as_str().unwrap(), "{text:?}");
    }
    assert!(beyond_the_model > 0, "the texts use ids past the model's 1,000 logits");
    let bound = reference["id_bound"].as_u64().unwrap().to_string();
    let last = (reference["id_bound"].as_u64().unwrap() - 1).to_string();
    let reply = daemon.call("Detokenize", "sau", &["gpt2", "1", &last]).unwrap();
    assert_eq!(reply["data"][0], reference["last_id_decoded"], "the tokenizer's last id");
    let e = daemon.call("Detokenize", "sau", &["gpt2", "1", &bound]).unwrap_err();
    assert!(e.contains("ids") && e.contains(&format!("0..{bound}")), "{e}");
    still_serving(&daemon);
}

/// One user's connections together hold at most `limits.max_per_user` requests: nine
/// connections of one uid could fill the whole queue and every other client got `Busy`.
#[test]
fn a_users_connections_share_one_limit() {
    let daemon = Daemon::start("\n[limits]\nmax_per_user = 2\nmax_per_client = 8\n");
    rt().block_on(async {
        let long = || sampled_options(1000, 3);
        let mut held = Vec::new();
        for _ in 0..2 {
            let conn = daemon.connect().await;
            let proxy = Daemon1Proxy::new(&conn).await.unwrap();
            proxy.generate("kjv", "In the beginning", long()).await.unwrap();
            held.push(conn);
        }
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let e = proxy.generate("kjv", "In the beginning", long()).await.unwrap_err().to_string();
        assert!(e.contains("Busy") && e.contains("max_per_user"), "{e}");
        // A user's connection that leaves gives its places back.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match proxy.generate("kjv", "In the beginning", long()).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline && e.to_string().contains("max_per_user") => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    still_serving(&daemon);
}

/// Schemas llguidance cannot take are the caller's error, through Complete and streamed Generate:
/// a self-referential one and one of 1,500 optional properties came back as `Internal`.
#[test]
fn schemas_llguidance_cannot_take_are_invalid_arguments() {
    let daemon = Daemon::start("");
    let properties: Vec<String> = (0..1500).map(|i| format!("\"p{i}\": {{\"type\": \"integer\"}}")).collect();
    let many = format!("{{\"type\": \"object\", \"properties\": {{{}}}}}", properties.join(", "));
    let looping = r##"{"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}"##.to_string();
    let mutual = r##"{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}"##.to_string();
    for (what, schema) in [("1,500 optional properties", many), ("a $ref to itself", looping), ("two $refs in a loop", mutual)] {
        let result = daemon.call("Complete", "ssa{sv}", &["kjv", "Say", "2", "max_new_tokens", "u", "8", "json_schema", "s", &schema]);
        match result {
            Ok(reply) => eprintln!("{what}: answered {}", reply["data"][0]),
            Err(e) => assert!(e.contains("json_schema") && !e.contains("Internal"), "{what}: {e}"),
        }
        rt().block_on(async {
            let conn = daemon.connect().await;
            let proxy = Daemon1Proxy::new(&conn).await.unwrap();
            let mut options = greedy_options(8);
            options.insert("json_schema", Value::from(schema.clone()));
            let mut finished = futures_util::StreamExt::boxed(proxy.receive_finished().await.unwrap());
            match proxy.generate("kjv", "Say", options).await {
                Err(e) => assert!(e.to_string().contains("InvalidArgument"), "{what}: {e}"),
                Ok(id) => {
                    let f = futures_util::StreamExt::next(&mut finished).await.unwrap();
                    let args = f.args().unwrap();
                    assert_eq!(args.request_id, id);
                    if args.reason == "error" {
                        let error: String = args.stats["error"].clone().try_into().unwrap();
                        assert!(error.contains("json_schema"), "{what}: {error}");
                    }
                }
            }
        });
    }
    still_serving(&daemon);
}

/// A model whose tokenizer has byte-fallback tokens (`<0x00>` .. `<0xFF>`, as SentencePiece
/// models ship them) and random weights: the builder's tiny-qwen2 (random weights, 4,096 logits)
/// with the SentencePiece-style kjv-metaspace tokenizer (1,280 ids, the byte tokens at 3..=258),
/// as a scratch folder. Random weights emit any token, NUL and lone UTF-8 bytes among them.
fn byte_fallback_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let qwen = crate::kit::fixtures::model_dir("tiny-qwen2");
    for file in ["model.onnx", "model.onnx.data"] {
        std::os::unix::fs::symlink(qwen.join(file), dir.path().join(file)).unwrap();
    }
    let tokenizer = crate::kit::fixtures::root().join("models/tokenizers/kjv-metaspace/tokenizer.json");
    std::fs::copy(tokenizer, dir.path().join("tokenizer.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(qwen.join("genai_config.json")).unwrap()).unwrap();
    // <s> and </s> of the SentencePiece tokenizer.
    config["model"]["bos_token_id"] = 1.into();
    config["model"]["eos_token_id"] = 2.into();
    config["model"]["pad_token_id"] = 2.into();
    std::fs::write(dir.path().join("genai_config.json"), config.to_string()).unwrap();
    dir
}

/// The bytes model sampled hot over many seeds, through Complete and streamed Generate, several
/// clients at once; every byte token through Detokenize; random ids (some past the tokenizer
/// or the model) through Detokenize and `prompt_ids`. Every call is answered and the daemon keeps
/// its name.
#[test]
fn random_ids_and_a_byte_fallback_model_sampled_hot_never_take_the_daemon_off_the_bus() {
    use rand::{Rng, SeedableRng};
    let model = byte_fallback_model();
    let daemon = Daemon::start(&format!("\n[[model]]\nname = \"bytes\"\npath = \"{}\"\n", model.path().display()));
    let (mut nul_tokens, mut calls) = (0usize, 0usize);
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        // Every byte token alone, then all of them in one call.
        let mut all = Vec::new();
        for id in 3u32..=258 {
            let text = proxy.detokenize("bytes", &[id]).await.unwrap_or_else(|e| panic!("Detokenize [{id}]: {e}"));
            assert!(!text.contains('\0'));
            all.push(id);
        }
        assert_eq!(proxy.detokenize("bytes", &[3]).await.unwrap(), "\u{FFFD}", "<0x00> is sent as U+FFFD");
        proxy.detokenize("bytes", &all).await.unwrap();
        // Sampled at temperature 2 over many seeds: four clients at a time, half streamed.
        for round in 0..10u64 {
            let mut tasks = Vec::new();
            for client in 0..4u64 {
                let conn = daemon.connect().await;
                tasks.push(tokio::spawn(async move {
                    let proxy = Daemon1Proxy::new(&conn).await.unwrap();
                    let seed = round * 4 + client;
                    let options = std::collections::HashMap::from([
                        ("max_new_tokens", Value::U32(48)),
                        ("temperature", Value::F64(2.0)),
                        ("seed", Value::U64(seed)),
                        ("return_token_ids", Value::Bool(true)),
                    ]);
                    if client % 2 == 0 {
                        let (_, stats) = proxy.complete("bytes", "In the beginning", options).await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                        let ids: Vec<u32> = stats["token_ids"].clone().try_into().unwrap();
                        ids.iter().filter(|&&id| id == 3).count()
                    } else {
                        let (_, reason, _) = stream_request(&proxy, proxy.generate("bytes", "In the beginning", options)).await;
                        assert!(reason == "length" || reason == "stop", "seed {seed}: {reason}");
                        0
                    }
                }));
            }
            for task in tasks {
                nul_tokens += task.await.unwrap();
                calls += 1;
            }
        }
        // Random ids, some past the tokenizer's 1,280 or the model's 4,096.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let ids: Vec<u32> = (0..rng.random_range(1..64)).map(|_| rng.random_range(0..1400)).collect();
            match proxy.detokenize("bytes", &ids).await {
                Ok(text) => assert!(ids.iter().all(|&id| id < 1280) && !text.contains('\0')),
                Err(e) => assert!(ids.iter().any(|&id| id >= 1280) && e.to_string().contains("InvalidArgument"), "{ids:?}: {e}"),
            }
        }
        for _ in 0..30 {
            let ids: Vec<Value> = (0..rng.random_range(1..40)).map(|_| Value::U32(rng.random_range(0..4200))).collect();
            let beyond = ids.iter().any(|id| matches!(id, Value::U32(id) if *id >= 4096));
            let options = std::collections::HashMap::from([
                ("max_new_tokens", Value::U32(8)),
                ("temperature", Value::F64(2.0)),
                ("prompt_ids", Value::from(ids.iter().map(|v| u32::try_from(v).unwrap()).collect::<Vec<u32>>())),
            ]);
            match proxy.complete("bytes", "", options).await {
                Ok(_) => assert!(!beyond),
                Err(e) => assert!(beyond && e.to_string().contains("InvalidArgument"), "{e}"),
            }
        }
    });
    eprintln!("{calls} sampled requests, {nul_tokens} NUL tokens among the Complete ones");
    still_serving(&daemon);
}

/// Threads of a process, from /proc.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// A client that floods blocking calls (Tokenize of 64 KiB texts, 100 at once) holds one of the
/// daemon's blocking threads, not a thread per call, and another client is still answered.
#[test]
fn a_flood_of_tokenize_calls_holds_one_thread_and_others_are_answered() {
    let daemon = Daemon::start("");
    let before = threads(daemon.pid());
    let text = "And God said, Let there be light: and there was light. ".repeat(1200);
    let text = &text[..64 * 1024];
    let done = std::sync::atomic::AtomicBool::new(false);
    let pid = daemon.pid();
    let (most, answered_in) = std::thread::scope(|scope| {
        // The daemon's threads, sampled while the flood lasts.
        let sampler = scope.spawn(|| {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(threads(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        });
        let answered_in = rt().block_on(async {
            let flood_conn = daemon.connect().await;
            let flood = Daemon1Proxy::new(&flood_conn).await.unwrap();
            let calls: Vec<_> = (0..100).map(|_| flood.tokenize("kjv", text)).collect();
            let flooding = futures_util::future::join_all(calls);
            let other = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let conn = daemon.connect().await;
                let proxy = Daemon1Proxy::new(&conn).await.unwrap();
                let started = Instant::now();
                proxy.complete("kjv", "In the beginning", greedy_options(4)).await.unwrap();
                started.elapsed()
            };
            let (results, answered_in) = tokio::join!(flooding, other);
            assert!(results.iter().all(|r| r.is_ok()), "every Tokenize is answered");
            answered_in
        });
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (sampler.join().unwrap(), answered_in)
    });
    eprintln!("threads: {before} before, at most {most} during the flood; another client answered in {answered_in:.1?}");
    assert!(most <= before + 8, "the flood took {} threads more", most - before);
    assert!(answered_in < Duration::from_secs(20), "{answered_in:?}");
    still_serving(&daemon);
}

/// `UnloadModel` returns the model's memory, its kept KV included: a connection that stays on
/// the bus kept the KV of its last request on the unloaded model until it went idle.
#[test]
fn unload_frees_the_kept_kv_of_the_model() {
    let daemon = Daemon::start("");
    let kept = || {
        let status = daemon.call("Status", "", &[]).unwrap();
        status["data"][0]["kv_caches"]["data"].as_u64().unwrap()
    };
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        proxy.complete("kjv", "In the beginning God created the heaven and the earth.", greedy_options(8)).await.unwrap();
        assert_eq!(kept(), 1, "the connection's KV is kept");
        proxy.unload_model("kjv").await.unwrap();
        assert_eq!(kept(), 0, "UnloadModel freed it");
        // The connection is still there, and its next request loads the model again.
        proxy.complete("kjv", "In the beginning", greedy_options(4)).await.unwrap();
    });
    still_serving(&daemon);
}

/// A chat of a great many empty messages is bounded like text: each message counts its framing
/// against `limits.max_prompt_bytes`, so a client cannot make the template render millions.
#[test]
fn a_chat_of_many_empty_messages_is_bounded() {
    let daemon = Daemon::start("");
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let messages: Vec<(&str, &str)> = vec![("", ""); 200_000];
        let started = Instant::now();
        let e = proxy.chat("kjv", &messages, greedy_options(2)).await.unwrap_err().to_string();
        assert!(e.contains("PromptTooLong") && e.contains("messages"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    });
    still_serving(&daemon);
}

/// The CPU time `pid` has used, in clock ticks (utime + stime of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Grammar work a client queued and left behind is not done: 24 calls sent at once from one
/// connection, each with a 59 KB grammar (6,000 literals) that llguidance compiles when the call
/// is validated, then the connection closes. The daemon spends the CPU time of a few such calls,
/// not of 24 (before, every queued validation compiled its grammar after the client had gone).
#[test]
fn grammar_work_of_a_client_that_left_is_dropped() {
    let daemon = Daemon::start("");
    let grammar = format!("start: {}", (0..6000).map(|i| format!("\"w{i}\"")).collect::<Vec<_>>().join(" | "));
    let options = || {
        let mut options = greedy_options(1);
        options.insert("grammar", Value::from(grammar.clone()));
        options
    };
    let idle = || {
        // Until two half-second windows pass with at most one tick used.
        let mut last = cpu_ticks(daemon.pid());
        let mut quiet = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while quiet < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let now = cpu_ticks(daemon.pid());
            quiet = if now - last <= 1 { quiet + 1 } else { 0 };
            last = now;
        }
        last
    };
    // What one such call costs, answered (llguidance refuses its first token: a row of 6,001
    // items; the compiles are what count here).
    let before = idle();
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let answer = proxy.complete("kjv", "Say", options()).await;
        assert!(answer.as_ref().is_ok_and(|(text, _)| !text.is_empty()) || answer.as_ref().is_err_and(|e| e.to_string().contains("grammar")), "{answer:?}");
    });
    let one = idle() - before;
    let before = idle();
    rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let calls: Vec<_> = (0..24)
            .map(|_| {
                let (proxy, options) = (proxy.clone(), options());
                tokio::spawn(async move { proxy.complete("kjv", "Say", options).await })
            })
            .collect();
        // Every call on the bus, the first in validation, then away.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for call in calls {
            call.abort();
        }
        drop(proxy);
        conn.close().await.unwrap();
    });
    let spent = idle() - before;
    eprintln!("one call: {one} ticks; 24 calls and the client gone: {spent} ticks");
    assert!(spent <= 4 * one.max(1), "24 calls of a client that left cost {spent} ticks, one call {one}");
    still_serving(&daemon);
}
