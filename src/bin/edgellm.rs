//! edgellm: the command-line client of edgellmd (talks D-Bus only).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use zbus::zvariant::{OwnedValue, Value};

use edgellm::service::client::{Bus, Daemon1Proxy};

#[derive(Parser, Debug)]
#[command(name = "edgellm", version, about = "Talk to edgellmd over D-Bus")]
struct Cli {
    /// Use the system bus.
    #[arg(long, global = true, conflicts_with_all = ["session", "address"])]
    system: bool,
    /// Use the session bus (the default).
    #[arg(long, global = true)]
    session: bool,
    /// Use this D-Bus address (e.g. unix:path=/run/edgellm/bus).
    #[arg(long, global = true)]
    address: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Default)]
struct GenArgs {
    /// Model name (see `edgellm models`).
    #[arg(short, long, default_value = "kjv")]
    model: String,
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// 0 is greedy.
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    repetition_penalty: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Turn speculative decoding on or off for this request.
    #[arg(long)]
    speculative: Option<bool>,
    /// Multi-token models: "trust" (merged steps) or "verify" (the base's own output).
    #[arg(long)]
    multitoken_mode: Option<String>,
    /// Multi-token models: go on with a step while the stop head's continue probability is at
    /// least this (1: one token per step).
    #[arg(long)]
    multitoken_threshold: Option<f64>,
    /// Multi-token models: at most this many tokens per step.
    #[arg(long)]
    multitoken_max_tokens: Option<u32>,
    /// "interactive" (the default) or "background": background work waits for interactive work.
    #[arg(long)]
    priority: Option<String>,
    /// The output matches this JSON Schema (the document itself, or @FILE).
    #[arg(long, conflicts_with = "grammar")]
    json_schema: Option<String>,
    /// The output matches this Lark grammar (llguidance's dialect; the text, or @FILE).
    #[arg(long)]
    grammar: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream a continuation of PROMPT.
    Generate {
        #[command(flatten)]
        args: GenArgs,
        prompt: String,
    },
    /// Stream a chat answer to MESSAGE (with an optional --system-prompt), or hold a conversation.
    Chat {
        #[command(flatten)]
        args: GenArgs,
        #[arg(long = "system-prompt")]
        system_prompt: Option<String>,
        /// Without one: a conversation, a line of stdin a turn (Ctrl-D ends).
        message: Option<String>,
    },
    /// Print the whole continuation of PROMPT at once.
    Complete {
        #[command(flatten)]
        args: GenArgs,
        prompt: String,
    },
    /// List the configured models: state, provider, draft, requests and tokens served.
    Models {
        /// JSON for scripts, in place of the table.
        #[arg(long)]
        json: bool,
    },
    /// Load a model and wait until it is ready.
    Load { name: String },
    /// Unload a model.
    Unload { name: String },
    /// Show the daemon's status.
    Status {
        /// JSON for scripts, in place of the table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the OpenAI HTTP API (/v1/models, /v1/chat/completions, /v1/completions) through the
    /// daemon, for tools that speak it.
    Serve {
        /// Listen on loopback TCP (e.g. 127.0.0.1:8080) in place of the Unix socket. Every local
        /// user can reach a TCP port.
        #[arg(long, conflicts_with = "socket")]
        listen: Option<std::net::SocketAddr>,
        /// The Unix socket to listen on (default $XDG_RUNTIME_DIR/edgellm/openai.sock, mode 0600).
        #[arg(long)]
        socket: Option<std::path::PathBuf>,
        /// Connections served at once; more wait to be accepted.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
        max_connections: u32,
        /// Seconds a request's head may take to arrive, and a kept-alive connection may sit idle.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        header_timeout_s: u64,
        /// Seconds a request's body may take to arrive.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        body_timeout_s: u64,
    },
    /// Print the token ids TEXT is fed to the model as (BOS included where the tokenizer adds one).
    Tokenize {
        /// Model name (see `edgellm models`).
        #[arg(short, long, default_value = "kjv")]
        model: String,
        text: String,
    },
    /// Print the text of token IDS (special tokens skipped).
    Detokenize {
        /// Model name (see `edgellm models`).
        #[arg(short, long, default_value = "kjv")]
        model: String,
        #[arg(required = true, num_args = 1..)]
        ids: Vec<u32>,
    },
}

impl GenArgs {
    fn options(&self) -> HashMap<&'static str, Value<'static>> {
        let mut o = HashMap::new();
        if let Some(v) = self.max_new_tokens {
            o.insert("max_new_tokens", Value::U32(v));
        }
        if let Some(v) = self.temperature {
            o.insert("temperature", Value::F64(v));
        }
        if let Some(v) = self.top_k {
            o.insert("top_k", Value::U32(v));
        }
        if let Some(v) = self.top_p {
            o.insert("top_p", Value::F64(v));
        }
        if let Some(v) = self.repetition_penalty {
            o.insert("repetition_penalty", Value::F64(v));
        }
        if let Some(v) = self.seed {
            o.insert("seed", Value::U64(v));
        }
        if !self.stop.is_empty() {
            o.insert("stop", Value::from(self.stop.clone()));
        }
        if let Some(v) = self.speculative {
            o.insert("speculative", Value::Bool(v));
        }
        if let Some(v) = &self.multitoken_mode {
            o.insert("multitoken_mode", Value::from(v.clone()));
        }
        if let Some(v) = self.multitoken_threshold {
            o.insert("multitoken_threshold", Value::F64(v));
        }
        if let Some(v) = self.multitoken_max_tokens {
            o.insert("multitoken_max_tokens", Value::U32(v));
        }
        for (name, text) in [("json_schema", &self.json_schema), ("grammar", &self.grammar), ("priority", &self.priority)] {
            if let Some(text) = text {
                o.insert(name, Value::from(text.clone()));
            }
        }
        o
    }

    /// Reads `@FILE` arguments.
    fn read_files(&mut self) -> Result<(), String> {
        for (flag, text) in [("--json-schema", &mut self.json_schema), ("--grammar", &mut self.grammar)] {
            if let Some(path) = text.as_deref().and_then(|t| t.strip_prefix('@')) {
                *text = Some(std::fs::read_to_string(path).map_err(|e| format!("{flag} @{path}: {e}"))?);
            }
        }
        Ok(())
    }
}

fn show(v: &OwnedValue) -> String {
    match &**v {
        Value::Str(s) => s.to_string(),
        Value::F64(f) => format!("{f:.2}"),
        // Numbers as numbers (zvariant's own text says `uint64 4`).
        other => match value_json(other) {
            serde_json::Value::Number(n) => n.to_string(),
            _ => other.to_string(),
        },
    }
}

fn show_dict(d: &HashMap<String, OwnedValue>) -> String {
    let mut keys: Vec<&String> = d.keys().collect();
    keys.sort();
    keys.iter().map(|k| format!("{k}={}", show(&d[*k]))).collect::<Vec<_>>().join(" ")
}

/// A D-Bus value as JSON: numbers, strings and booleans as they are, arrays and structures as
/// arrays, dictionaries as objects.
fn value_json(v: &Value<'_>) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Bool(b) => J::from(*b),
        Value::U8(n) => J::from(*n),
        Value::I16(n) => J::from(*n),
        Value::U16(n) => J::from(*n),
        Value::I32(n) => J::from(*n),
        Value::U32(n) => J::from(*n),
        Value::I64(n) => J::from(*n),
        Value::U64(n) => J::from(*n),
        Value::F64(f) => J::from(*f),
        Value::Str(s) => J::from(s.as_str()),
        Value::Value(inner) => value_json(inner),
        Value::Array(a) => J::Array(a.iter().map(value_json).collect()),
        Value::Structure(s) => J::Array(s.fields().iter().map(value_json).collect()),
        Value::Dict(d) => J::Object(
            d.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::Str(s) => s.to_string(),
                        other => other.to_string(),
                    };
                    (key, value_json(v))
                })
                .collect(),
        ),
        other => J::from(other.to_string()),
    }
}

fn dict_json(d: &HashMap<String, OwnedValue>) -> serde_json::Map<String, serde_json::Value> {
    d.iter().map(|(k, v)| (k.clone(), value_json(v))).collect()
}

/// Rows under a header, each column as wide as its widest cell, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// `edgellm models`: one aligned row per model, as `ollama ps` prints them.
fn models_table(models: &[(String, HashMap<String, OwnedValue>)]) -> String {
    let text = |d: &HashMap<String, OwnedValue>, k: &str| d.get(k).map(show).filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into());
    let count = |d: &HashMap<String, OwnedValue>, k: &str| d.get(k).and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|(name, d)| {
            let draft = match (d.get("draft"), d.get("draft_provider")) {
                (Some(draft), Some(p)) => format!("{} ({})", show(draft), show(p)),
                (Some(draft), None) => show(draft),
                _ => "-".into(),
            };
            let (drafted, accepted) = (count(d, "draft_tokens"), count(d, "accepted_tokens"));
            let acceptance = if drafted > 0 { format!("{:.0}%", 100.0 * accepted as f64 / drafted as f64) } else { "-".into() };
            vec![
                name.clone(),
                text(d, "state"),
                text(d, "provider"),
                draft,
                d.get("memory_mib").map(|m| format!("{} MiB", show(m))).unwrap_or_else(|| "-".into()),
                count(d, "requests").to_string(),
                count(d, "generated_tokens").to_string(),
                d.get("tokens_per_s").map(|t| format!("{:.0}", f64::try_from(t).unwrap_or(0.0))).unwrap_or_else(|| "-".into()),
                acceptance,
                d.get("unloads_in_s").map(|t| format!("in {:.0} s", f64::try_from(t).unwrap_or(0.0))).unwrap_or_else(|| "-".into()),
                text(d, "error"),
            ]
        })
        .collect();
    table(&["NAME", "STATE", "PROVIDER", "DRAFT", "MEMORY", "REQUESTS", "TOKENS", "TOK/S", "ACCEPTED", "UNLOADS", "ERROR"], &rows)
}

/// `edgellm status`: one aligned line per figure.
fn status_table(status: &HashMap<String, OwnedValue>) -> String {
    let order = ["version", "uptime_s", "requests_in_flight", "requests_queued", "requests_total", "generated_tokens_total"];
    let mut rows: Vec<Vec<String>> = order.iter().filter_map(|k| status.get(*k).map(|v| vec![k.replace('_', " "), show(v)])).collect();
    let mut rest: Vec<&String> = status.keys().filter(|k| !order.contains(&k.as_str()) && *k != "speculative").collect();
    rest.sort();
    rows.extend(rest.into_iter().map(|k| vec![k.replace('_', " "), show(&status[k])]));
    if let Some(serde_json::Value::Object(models)) = status.get("speculative").map(|v| value_json(v)) {
        for (model, pair) in models {
            let (drafted, accepted) = (pair[0].as_u64().unwrap_or(0), pair[1].as_u64().unwrap_or(0));
            let rate = if drafted > 0 { format!(" ({:.0}%)", 100.0 * accepted as f64 / drafted as f64) } else { String::new() };
            rows.push(vec![format!("speculative {model}"), format!("{accepted} of {drafted} drafts accepted{rate}")]);
        }
    }
    table(&["FIELD", "VALUE"], &rows)
}

/// Shows "loading MODEL... Ns" on stderr until `done` resolves.
async fn with_progress<T>(what: &str, done: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let ticker = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            eprint!("\r{what}... {:.0}s", started.elapsed().as_secs_f64());
        }
    };
    tokio::pin!(done);
    let out = tokio::select! { out = &mut done => out, _ = ticker => unreachable!() };
    if started.elapsed() >= Duration::from_millis(500) {
        eprintln!("\r{what}: done in {:.1}s", started.elapsed().as_secs_f64());
    }
    out
}

fn bus(cli: &Cli) -> Bus {
    match (&cli.address, cli.system) {
        (Some(address), _) => Bus::Address(address.clone()),
        (None, true) => Bus::System,
        (None, false) => Bus::Session,
    }
}

async fn model_ready(proxy: &Daemon1Proxy<'_>, model: &str) -> bool {
    proxy
        .list_models()
        .await
        .ok()
        .and_then(|ms| ms.into_iter().find(|(n, _)| n == model))
        .and_then(|(_, d)| d.get("state").map(show))
        .as_deref()
        == Some("ready")
}

/// Starts a request and streams its tokens to stdout; Ctrl-C cancels it.
/// Streams a request's text to stdout; returns the exit code its end gives and the text.
async fn stream(
    proxy: &Daemon1Proxy<'_>,
    model: &str,
    start: impl std::future::Future<Output = zbus::Result<u64>>,
) -> Result<(ExitCode, String), String> {
    // Subscribe before calling: the first token may follow the reply at once.
    let mut tokens = proxy.receive_token().await.map_err(|e| e.to_string())?;
    let mut finished = proxy.receive_finished().await.map_err(|e| e.to_string())?;
    let loading = !model_ready(proxy, model).await;
    let id = start.await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut first = true;
    let mut cancelled = false;
    let mut text = String::new();
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    loop {
        // Biased: the connection dispatches signals in order, so every Token before Finished is
        // already queued when Finished is; take tokens first.
        tokio::select! {
            biased;
            Some(t) = tokens.next() => {
                if let Ok(args) = t.args() {
                    if args.request_id == id {
                        if first && loading { eprintln!("\r(model loaded in {:.1}s)", started.elapsed().as_secs_f64()); }
                        first = false;
                        print!("{}", args.text);
                        text.push_str(&args.text);
                        let _ = std::io::stdout().flush();
                    }
                }
            }
            Some(f) = finished.next() => {
                if let Ok(args) = f.args() {
                    if args.request_id == id {
                        println!();
                        eprintln!("[{}] {}", args.reason, show_dict(&args.stats));
                        let code = match args.reason.as_str() {
                            "stop" | "length" => ExitCode::SUCCESS,
                            "cancelled" => ExitCode::from(130),
                            _ => ExitCode::FAILURE,
                        };
                        return Ok((code, text));
                    }
                }
            }
            _ = &mut ctrl_c, if !cancelled => {
                cancelled = true;
                eprintln!("\n(cancelling request {id})");
                proxy.cancel(id).await.map_err(|e| e.to_string())?;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)), if first && loading => {
                eprint!("\rloading model {model}... {:.0}s", started.elapsed().as_secs_f64());
            }
        }
    }
}

/// `edgellm chat` without a message: a conversation, a line of stdin a turn, each answer
/// streamed; the history goes with every turn. Ctrl-C cancels an answer (the turn is dropped),
/// Ctrl-C at the prompt or Ctrl-D ends.
async fn conversation(proxy: &Daemon1Proxy<'_>, args: &GenArgs, mut history: Vec<(&'static str, String)>) -> Result<ExitCode, String> {
    use tokio::io::AsyncBufReadExt;
    eprintln!("chat with {}: a line is a turn; Ctrl-C cancels an answer, Ctrl-D ends", args.model);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!("> ");
        let line = tokio::select! {
            line = lines.next_line() => line.map_err(|e| format!("stdin: {e}"))?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else {
            eprintln!();
            return Ok(ExitCode::SUCCESS);
        };
        if line.trim().is_empty() {
            continue;
        }
        history.push(("user", line));
        let messages: Vec<(&str, &str)> = history.iter().map(|(r, c)| (*r, c.as_str())).collect();
        let (code, answer) = stream(proxy, &args.model, proxy.chat(&args.model, &messages, args.options())).await?;
        if code == ExitCode::SUCCESS {
            history.push(("assistant", answer));
        } else {
            // A cancelled or failed answer is not part of the conversation, nor is its question.
            history.pop();
        }
    }
}

/// `edgellm serve`: runs until Ctrl-C or SIGTERM. It needs no daemon to start: requests made
/// while the daemon is away get 503.
async fn serve(
    bus: Bus,
    listen: Option<std::net::SocketAddr>,
    socket: Option<std::path::PathBuf>,
    limits: edgellm::openai::ServeLimits,
) -> Result<ExitCode, String> {
    use edgellm::openai::Listen;
    let listen = match (listen, socket) {
        (Some(addr), _) => {
            eprintln!("edgellm serve: warning: every local user can reach http://{addr}; the default Unix socket is yours only");
            Listen::Tcp(addr)
        }
        (None, Some(path)) => Listen::Unix(path),
        (None, None) => Listen::Unix(Listen::default_socket()?),
    };
    match &listen {
        Listen::Tcp(addr) => eprintln!("edgellm serve: OpenAI API at http://{addr}/v1"),
        Listen::Unix(path) => eprintln!("edgellm serve: OpenAI API on the Unix socket {} (base URL http://localhost/v1)", path.display()),
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    };
    edgellm::openai::serve(listen, bus, limits, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run(mut cli: Cli) -> Result<ExitCode, String> {
    if let Command::Generate { args, .. } | Command::Chat { args, .. } | Command::Complete { args, .. } = &mut cli.command {
        args.read_files()?;
    }
    if let Command::Serve { listen, socket, max_connections, header_timeout_s, body_timeout_s } = &cli.command {
        let limits = edgellm::openai::ServeLimits {
            max_connections: *max_connections as usize,
            header_timeout: Duration::from_secs(*header_timeout_s),
            body_timeout: Duration::from_secs(*body_timeout_s),
            ..Default::default()
        };
        return serve(bus(&cli), *listen, socket.clone(), limits).await;
    }
    let conn = tokio::time::timeout(Duration::from_secs(30), bus(&cli).connect())
        .await
        .map_err(|_| "the D-Bus bus did not answer within 30 s".to_string())?
        .map_err(|e| format!("cannot connect to D-Bus: {e}"))?;
    let proxy = Daemon1Proxy::new(&conn).await.map_err(|e| e.to_string())?;
    match &cli.command {
        Command::Generate { args, prompt } => Ok(stream(&proxy, &args.model, proxy.generate(&args.model, prompt, args.options())).await?.0),
        Command::Chat { args, system_prompt, message } => chat(&proxy, args, system_prompt.as_deref(), message.as_deref()).await,
        Command::Complete { args, prompt } => {
            let (text, stats) = proxy.complete(&args.model, prompt, args.options()).await.map_err(|e| e.to_string())?;
            println!("{text}");
            eprintln!("{}", show_dict(&stats));
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { json } => list_models(&proxy, *json).await,
        Command::Load { name } => load(&proxy, name).await,
        Command::Unload { name } => {
            proxy.unload_model(name).await.map_err(|e| e.to_string())?;
            println!("{name}: unloaded");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let status = proxy.status().await.map_err(|e| e.to_string())?;
            if *json {
                println!("{}", serde_json::Value::Object(dict_json(&status)));
            } else {
                print!("{}", status_table(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tokenize { model, text } => {
            let ids = proxy.tokenize(model, text).await.map_err(|e| e.to_string())?;
            println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Detokenize { model, ids } => {
            println!("{}", proxy.detokenize(model, ids).await.map_err(|e| e.to_string())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { .. } => unreachable!("served above, without a connection of its own"),
    }
}

/// `edgellm chat`: one answer to `message`, or without one a conversation on stdin.
async fn chat(proxy: &Daemon1Proxy<'_>, args: &GenArgs, system_prompt: Option<&str>, message: Option<&str>) -> Result<ExitCode, String> {
    let mut history: Vec<(&'static str, String)> = Vec::new();
    if let Some(s) = system_prompt {
        history.push(("system", s.to_string()));
    }
    match message {
        Some(message) => {
            history.push(("user", message.to_string()));
            let messages: Vec<(&str, &str)> = history.iter().map(|(r, c)| (*r, c.as_str())).collect();
            Ok(stream(proxy, &args.model, proxy.chat(&args.model, &messages, args.options())).await?.0)
        }
        None => conversation(proxy, args, history).await,
    }
}

/// `edgellm models`: a table, or JSON for scripts.
async fn list_models(proxy: &Daemon1Proxy<'_>, json: bool) -> Result<ExitCode, String> {
    let models = proxy.list_models().await.map_err(|e| e.to_string())?;
    if json {
        let list: Vec<serde_json::Value> = models
            .iter()
            .map(|(name, d)| {
                let mut object = dict_json(d);
                object.insert("name".into(), name.clone().into());
                serde_json::Value::Object(object)
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        print!("{}", models_table(&models));
    }
    Ok(ExitCode::SUCCESS)
}

/// `edgellm load`: loads the model and waits for it, showing its states meanwhile.
async fn load(proxy: &Daemon1Proxy<'_>, name: &str) -> Result<ExitCode, String> {
    let started = Instant::now();
    // The model's state changes as the daemon announces them (ModelStateChanged), with the time
    // since the call, while the load runs.
    let states = proxy.receive_model_state_changed().await.map_err(|e| e.to_string())?;
    let show_states = states.for_each(|signal| {
        if let Ok(args) = signal.args() {
            if args.name == name {
                eprintln!("\r{}: {} ({:.1} s)", args.name, args.state, started.elapsed().as_secs_f64());
            }
        }
        std::future::ready(())
    });
    let what = format!("loading {name}");
    let loaded = tokio::select! {
        loaded = with_progress(&what, proxy.load_model(name)) => loaded,
        _ = show_states => unreachable!("the signal stream ends only with the connection"),
    };
    loaded.map_err(|e| e.to_string())?;
    println!("{name}: ready in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgellm: {e}");
            ExitCode::FAILURE
        }
    }
}
