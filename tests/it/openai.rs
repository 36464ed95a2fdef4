//! `edgellm serve` against the official `openai` Python client (tests/py/openai_client.py):
//! the same text as the D-Bus API, OpenAI's error shapes, and cancellation by disconnect.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use edgellm::service::client::Daemon1Proxy;
use serde_json::{json, Value as Json};
use zbus::zvariant::Value;

use crate::kit::bus::{greedy_options, rt, sampled_options, stream_request, Daemon};
use crate::kit::fixtures::python_reference;

/// `edgellm serve` on a Unix socket beside the daemon's private bus; killed on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    fn start(daemon: &Daemon) -> Serve {
        Serve::start_with(daemon, &[])
    }

    /// `start` with more arguments of `edgellm serve`.
    fn start_with(daemon: &Daemon, args: &[&str]) -> Serve {
        let socket = daemon.bus.dir.path().join("openai/openai.sock");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_edgellm"))
            .arg("--address")
            .arg(&daemon.bus.address)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("edgellm serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "edgellm serve did not listen on {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Serve { child, socket }
    }

    /// Runs `calls` through the openai client; one result each.
    fn calls(&self, calls: Json) -> Vec<Json> {
        let out = python_reference("openai_client.py", &json!({"socket": self.socket, "calls": calls}));
        out.as_array().expect("a list of results").clone()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MESSAGE: &str = "Who begat Jacob?";
const PROMPT: &str = "In the beginning God created";

#[test]
fn openai_client_gets_the_dbus_text_streamed_and_not() {
    let daemon = Daemon::start("");
    let serve = Serve::start(&daemon);
    let tokens = 24;
    let (chat_text, generate_text) = rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        let (chat, reason, _) = stream_request(&proxy, proxy.chat("kjv", &[("user", MESSAGE)], greedy_options(tokens))).await;
        assert_eq!(reason, "length");
        let (generated, reason, _) = stream_request(&proxy, proxy.generate("kjv", PROMPT, greedy_options(tokens))).await;
        assert_eq!(reason, "length");
        (chat, generated)
    });
    assert!(!chat_text.is_empty() && !generate_text.is_empty());
    let chat = json!({"model": "kjv", "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": tokens, "temperature": 0});
    let completion = json!({"model": "kjv", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0});
    let results = serve.calls(json!([
        {"kind": "models"},
        {"kind": "model", "args": {"id": "kjv"}},
        {"kind": "model", "args": {"id": "no-such-model"}},
        {"kind": "chat", "args": chat},
        {"kind": "chat", "args": chat, "stream": true},
        {"kind": "completion", "args": completion},
        {"kind": "completion", "args": completion, "stream": true},
        // Content as parts, and max_completion_tokens in place of max_tokens.
        {"kind": "chat", "args": {"model": "kjv", "messages": [{"role": "user", "content": [{"type": "text", "text": MESSAGE}]}], "max_completion_tokens": tokens, "temperature": 0}},
    ]));
    let ids: Vec<&str> = results[0]["ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(ids, ["kjv", "kjv-draft"]);
    assert_eq!(results[1]["id"], "kjv", "{}", results[1]);
    assert_eq!((&results[2]["status"], &results[2]["error"]["code"]), (&json!(404), &json!("model_not_found")), "{}", results[2]);
    let results: Vec<Json> = [&results[..1], &results[3..]].concat();
    for (i, want) in [(1, &chat_text), (2, &chat_text), (3, &generate_text), (4, &generate_text), (5, &chat_text)] {
        assert_eq!(results[i]["text"].as_str(), Some(want.as_str()), "call {i}: {}", results[i]);
        assert_eq!(results[i]["finish_reason"], "length", "call {i}");
    }
    for i in [1, 2, 3] {
        assert_eq!(results[i]["usage"]["completion_tokens"], tokens, "call {i}: {}", results[i]);
        let prompt = results[i]["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(prompt > 0 && results[i]["usage"]["total_tokens"] == prompt + tokens as u64, "call {i}: {}", results[i]);
    }
    assert!(results[2]["chunks"].as_u64().unwrap() > 3, "the chat was not streamed in pieces: {}", results[2]);

    // Text completions default to OpenAI's 16 tokens; a stop string ends with `stop`.
    let results = serve.calls(json!([
        {"kind": "completion", "args": {"model": "kjv", "prompt": PROMPT, "temperature": 0}},
        {"kind": "completion", "args": {"model": "kjv", "prompt": PROMPT, "temperature": 0, "max_tokens": tokens, "stop": [generate_text.split_whitespace().nth(2).unwrap()]}},
    ]));
    assert_eq!(results[0]["usage"]["completion_tokens"], 16, "{}", results[0]);
    assert_eq!(results[1]["finish_reason"], "stop", "{}", results[1]);
    assert!(generate_text.starts_with(results[1]["text"].as_str().unwrap()), "{}", results[1]);

    // response_format maps onto the daemon's json_schema option.
    let schema = json!({"type": "object", "properties": {"tribe": {"enum": ["Judah", "Levi"]}, "verse": {"type": "integer", "minimum": 1, "maximum": 50}},
                        "required": ["tribe", "verse"], "additionalProperties": false});
    let sampled = |format: Json| json!({"kind": "chat", "args": {"model": "kjv", "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 200, "temperature": 1, "seed": 7, "response_format": format}});
    let results = serve.calls(json!([
        sampled(json!({"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": true}})),
        sampled(json!({"type": "json_object"})),
    ]));
    let record: Json = serde_json::from_str(results[0]["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {}", results[0]));
    assert!(
        ["Judah", "Levi"].contains(&record["tribe"].as_str().unwrap()) && record["verse"].as_u64().is_some_and(|v| (1..=50).contains(&v)),
        "{record}"
    );
    assert_eq!(results[0]["finish_reason"], "stop");
    if results[1]["finish_reason"] == "stop" {
        let object: Json = serde_json::from_str(results[1]["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {}", results[1]));
        assert!(object.is_object(), "{object}");
    }
}

#[test]
fn openai_errors_have_openai_shapes_and_codes() {
    // One request runs and one waits: a third is Busy.
    let mut daemon = Daemon::start("\n[limits]\nmax_queue = 1\n");
    let serve = Serve::start(&daemon);
    let chat = |extra: Json| {
        let mut args = json!({"model": "kjv", "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 4});
        args.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"kind": "chat", "args": args})
    };
    let results = serve.calls(json!([
        chat(json!({"model": "no-such-model"})),
        chat(json!({"n": 2})),
        chat(json!({"temperature": -1})),
        chat(json!({"messages": [{"role": "tool", "content": "x"}]})),
        chat(json!({"response_format": {"type": "yaml"}})),
        {"kind": "completion", "args": {"model": "kjv", "prompt": ["a", "b"]}},
    ]));
    let expect = [
        (404, "model_not_found", None),
        (400, "", Some("n")),
        (400, "", None),
        (400, "", Some("messages[0].role")),
        (400, "", Some("response_format")),
        (400, "", Some("prompt")),
    ];
    for (i, (status, code, param)) in expect.iter().enumerate() {
        let r = &results[i];
        assert_eq!(r["status"], *status, "call {i}: {r}");
        assert!(r["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "call {i}: {r}");
        assert_eq!(r["error"]["type"], if *status == 404 || *status == 400 { "invalid_request_error" } else { "" }, "call {i}: {r}");
        if !code.is_empty() {
            assert_eq!(r["error"]["code"], *code, "call {i}: {r}");
        }
        if let Some(param) = param {
            assert_eq!(r["error"]["param"], *param, "call {i}: {r}");
        }
    }
    assert!(results[2]["error"]["message"].as_str().unwrap().contains("temperature"), "{}", results[2]);

    // Busy: two long requests hold the engine and the queue.
    let held = rt().block_on(async {
        let conn = daemon.connect().await;
        let proxy = Daemon1Proxy::new(&conn).await.unwrap();
        // No end of sequence before 900 characters: each holds the engine for most of its 1000
        // tokens, however fast the kernels.
        let long = || {
            let mut options = sampled_options(1000, 3);
            options.insert("grammar", Value::from("start: /(.|\\n){900,}/"));
            options
        };
        let a = proxy.generate("kjv", PROMPT, long()).await.unwrap();
        // The second waits in the queue once the first has left it for the engine: until then the
        // queue of one is full (a clean-clone run once saw Busy here).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let b = loop {
            match proxy.generate("kjv", PROMPT, long()).await {
                Ok(b) => break b,
                Err(e) if e.to_string().contains("Busy") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => panic!("the second long request: {e}"),
            }
        };
        (conn, a, b)
    });
    let results = serve.calls(json!([chat(json!({}))]));
    assert_eq!(results[0]["status"], 429, "{}", results[0]);
    assert_eq!(results[0]["error"]["type"], "rate_limit_error", "{}", results[0]);
    drop(held);

    // The daemon away: 503, and serve keeps running for when it is back.
    daemon.kill_keeping_bus();
    let results = serve.calls(json!([{"kind": "models"}, chat(json!({}))]));
    for r in &results {
        assert_eq!(r["status"], 503, "{r}");
        assert_eq!(r["error"]["code"], "daemon_unavailable", "{r}");
    }
}

#[test]
fn openai_client_that_hangs_up_cancels_its_request() {
    let daemon = Daemon::start("");
    let serve = Serve::start(&daemon);
    let long = json!({"model": "kjv", "prompt": PROMPT, "max_tokens": 1000, "temperature": 1, "seed": 5});
    let results = serve.calls(json!([{"kind": "disconnect", "args": long, "after_chunks": 3}]));
    assert_eq!(results[0]["chunks"], 3, "{}", results[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = without_colours(&daemon.log_text());
        if let Some(line) = log.lines().find(|l| l.contains("request finished")) {
            assert!(line.contains("cancelled"), "the request was not cancelled: {line}");
            let tokens: u32 = line.split("tokens=").nth(1).and_then(|t| t.split_whitespace().next()).and_then(|t| t.parse().ok()).unwrap();
            assert!(tokens < 200, "cancelled late: {line}");
            break;
        }
        assert!(Instant::now() < deadline, "the request still runs after its client hung up: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one client can hold of serve is bounded: a NUL in a request is a 400 that names where,
/// an oversized body a 413 in OpenAI's shape, a body that stops coming a 408, idle connections are
/// closed, and connections past the cap wait without harming the requests of others.
#[test]
fn serve_bounds_what_one_client_holds() {
    use std::io::{Read, Write};
    let daemon = Daemon::start("");
    let serve = Serve::start_with(&daemon, &["--header-timeout-s", "2", "--body-timeout-s", "2", "--max-connections", "4"]);
    let chat = |content: Json| json!({"kind": "chat", "args": {"model": "kjv", "messages": [{"role": "user", "content": content}], "max_tokens": 2}});
    let big = "x".repeat(3 << 20);
    let results = serve.calls(json!([chat(json!("a\u{0}b")), chat(json!(big)), chat(json!(MESSAGE))]));
    assert_eq!(results[0]["status"], 400, "{}", results[0]);
    assert_eq!(results[0]["error"]["param"], "messages[0].content", "{}", results[0]);
    assert_eq!(results[1]["status"], 413, "{}", results[1]);
    assert_eq!(results[1]["error"]["type"], "invalid_request_error", "413 in OpenAI's shape: {}", results[1]);
    assert!(results[2]["text"].is_string(), "{}", results[2]);

    // A body that stops coming: 408 within the body timeout, and the connection is closed.
    let mut slow = std::os::unix::net::UnixStream::connect(&serve.socket).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{\"model\"").unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // Four idle connections fill the cap: each is closed after the header timeout, and a request
    // made meanwhile is answered once they are.
    let mut idle: Vec<_> = (0..4).map(|_| std::os::unix::net::UnixStream::connect(&serve.socket).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let results = serve.calls(json!([chat(json!(MESSAGE))]));
    assert!(results[0]["text"].is_string(), "{}", results[0]);
    eprintln!("a request behind four idle connections took {:.1?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    for conn in &mut idle {
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(conn.read(&mut buf).unwrap_or(0), 0, "an idle connection is closed");
    }
}

/// The log without its ANSI colour codes (`ESC [ ... m`).
fn without_colours(log: &str) -> String {
    let mut parts = log.split('\x1b');
    let mut out = parts.next().unwrap_or_default().to_string();
    for part in parts {
        out.push_str(part.split_once('m').map_or(part, |(_, rest)| rest));
    }
    out
}
