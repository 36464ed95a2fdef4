//! `edgellm serve`: the OpenAI HTTP API (`/v1/models[/{id}]`, `/v1/chat/completions`,
//! `/v1/completions`) as a D-Bus client of edgellmd, so the daemon stays the one place that runs
//! models and its access rules still apply. axum serves HTTP/1.1 on a Unix socket (the default)
//! or loopback TCP.
//!
//! Each HTTP request is its own D-Bus connection: the daemon's per-client limits apply per
//! request, and a request whose HTTP client goes away is cancelled (explicitly, and by the
//! daemon when the connection leaves the bus).

pub mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value as JsonValue};
use tokio::sync::mpsc;
use zbus::zvariant::OwnedValue;

use crate::service::client::{Bus, Daemon1Proxy};
use crate::service::{BUS_NAME, INTERFACE, OBJECT_PATH};
use wire::{ChatRequest, CompletionRequest, Usage};

/// An error in OpenAI's JSON shape, with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    message: String,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_string),
            message: message.into(),
        }
    }

    fn daemon_away(detail: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "service_unavailable",
            code: Some("daemon_unavailable"),
            param: None,
            message: format!("edgellmd is not reachable on D-Bus ({detail}); start it (systemctl start edgellm, or edgellmd)"),
        }
    }

    /// A failed D-Bus call, by the error name the daemon (or the bus) gave.
    fn from_dbus(e: zbus::Error) -> ApiError {
        use zbus::DBusError as _;
        let (name, message) = match &e {
            zbus::Error::MethodError(name, message, _) => (name.to_string(), message.clone().unwrap_or_default()),
            zbus::Error::FDO(fdo) => (fdo.name().to_string(), fdo.description().unwrap_or_default().to_string()),
            other => (String::new(), other.to_string()),
        };
        let short = name.rsplit('.').next().unwrap_or_default();
        let (status, kind, code) = match (name.starts_with("org.edgellm.Error."), short) {
            (true, "ModelNotFound") => (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found")),
            (true, "InvalidArgument") => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            (true, "PromptTooLong") => (StatusCode::BAD_REQUEST, "invalid_request_error", Some("context_length_exceeded")),
            (true, "Busy") => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded")),
            (true, "AccessDenied") => (StatusCode::FORBIDDEN, "permission_error", None),
            (true, "Timeout") => (StatusCode::GATEWAY_TIMEOUT, "timeout", None),
            (true, "ModelLoadFailed") => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("model_load_failed")),
            (false, "ServiceUnknown" | "NameHasNoOwner" | "Disconnected" | "NoReply") => return ApiError::daemon_away(message),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        ApiError { status, kind, code, param: None, message: if message.is_empty() { e.to_string() } else { message } }
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "server_error", code: None, param: None, message: message.into() }
    }

    fn body(&self) -> JsonValue {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Where `edgellm serve` listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    /// `$XDG_RUNTIME_DIR/edgellm/openai.sock`.
    pub fn default_socket() -> Result<PathBuf, String> {
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !dir.is_empty() => Ok(Path::new(&dir).join("edgellm/openai.sock")),
            _ => Err("XDG_RUNTIME_DIR is not set, so there is no default socket; give --socket PATH or --listen 127.0.0.1:PORT".into()),
        }
    }
}

#[derive(Clone)]
struct Api {
    bus: Bus,
    limits: ServeLimits,
}

/// The routes, answering through the daemon on `bus`.
pub fn router(bus: Bus, limits: ServeLimits) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                code: None,
                param: None,
                message: "no such route; edgellm serves /v1/models, /v1/models/{id}, /v1/chat/completions and /v1/completions".into(),
            }
        })
        .with_state(Api { bus, limits })
}

/// What one HTTP client may hold of `edgellm serve`: without bounds, a thousand clients that send
/// most of a body and stop held 2 GiB, and idle connections ran it out of descriptors.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Connections served at once; more wait to be accepted until one closes.
    pub max_connections: usize,
    /// How long a request's head may take to arrive, and a kept-alive connection may sit idle.
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive.
    pub body_timeout: Duration,
    /// The largest request body.
    pub max_body_bytes: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 64,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_body_bytes: 2 << 20,
        }
    }
}

/// Serves until `shutdown` resolves. A Unix socket is made mode 0600 in a 0700 directory, and
/// removed at the end.
pub async fn serve(
    listen: Listen,
    bus: Bus,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let app = router(bus, limits);
    match listen {
        Listen::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                return Err(format!("--listen {addr}: edgellm serve listens on loopback only (127.0.0.1 or ::1)"));
            }
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--listen {addr}: {e}"))?;
            accept_loop(|| listener.accept(), app, limits, shutdown).await
        }
        Listen::Unix(path) => {
            let listener = bind_unix(&path)?;
            let served = accept_loop(|| listener.accept(), app, limits, shutdown).await;
            let _ = std::fs::remove_file(&path);
            served
        }
    }
}

/// Accepts connections while fewer than `limits.max_connections` are open, each served as
/// HTTP/1.1 with the header timeout; on shutdown, each finishes the request it is serving.
async fn accept_loop<Io, Addr, A, F>(
    mut accept: F,
    app: Router,
    limits: ServeLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> A,
    A: std::future::Future<Output = std::io::Result<(Io, Addr)>>,
{
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (stopping, stop) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.map_err(|e| e.to_string())?,
            _ = &mut shutdown => break,
        };
        let io = tokio::select! {
            accepted = accept() => match accepted {
                Ok((io, _)) => io,
                // Out of descriptors, or a client that left before it was accepted: go on.
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (service, mut stop) = (hyper_util::service::TowerToHyperService::new(app.clone()), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.wait_for(|&s| s) => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
    }
    let _ = stopping.send(true);
    // Every connection's permit back: each has finished its request (bounded, as axum's was not).
    let _ = tokio::time::timeout(Duration::from_secs(30), open.acquire_many(limits.max_connections as u32)).await;
    Ok(())
}

fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if path.exists() {
        // A socket nobody answers on is left over from an earlier run; one that answers is in use.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("{shown}: another edgellm serve is listening there"));
        }
        std::fs::remove_file(path).map_err(|e| format!("{shown}: cannot remove the stale socket: {e}"))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| format!("{shown}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("{shown}: {e}"))?;
    Ok(listener)
}

/// The request body, read within `limits.body_timeout` and up to `limits.max_body_bytes`; a
/// client that sends part of a body and stops is answered 408 and its bytes are dropped.
async fn read_body(limits: &ServeLimits, body: axum::body::Body) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let refused = |status: StatusCode, code: &'static str, message: String| ApiError {
        status,
        kind: "invalid_request_error",
        code: Some(code),
        param: None,
        message,
    };
    let limited = http_body_util::Limited::new(body, limits.max_body_bytes);
    match tokio::time::timeout(limits.body_timeout, limited.collect()).await {
        Err(_) => Err(refused(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {} s", limits.body_timeout.as_secs()),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is over {} bytes", limits.max_body_bytes),
        )),
        Ok(Err(e)) => Err(ApiError::invalid(format!("the request body could not be read: {e}"), None)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: JsonValue =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the request body is not valid for this route: {e}"), None))?;
    // JSON may escape a NUL (`\u0000`); D-Bus strings cannot hold one, and the bus would drop
    // this server's connection for sending it.
    if let Some(path) = nul_path(&value) {
        return Err(ApiError::invalid(format!("`{path}` holds a NUL character (\\u0000), which edgellm cannot take"), Some(&path)));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid(format!("the request body is not valid for this route: {e}"), None))
}

/// Where in `value` a string or key holds a NUL, as a path like `messages[0].content`.
fn nul_path(value: &JsonValue) -> Option<String> {
    /// The path with a leading `.` before each key.
    fn find(value: &JsonValue) -> Option<String> {
        match value {
            JsonValue::String(s) => s.contains('\0').then(String::new),
            JsonValue::Array(items) => items.iter().enumerate().find_map(|(i, v)| find(v).map(|p| format!("[{i}]{p}"))),
            JsonValue::Object(fields) => fields.iter().find_map(|(k, v)| {
                if k.contains('\0') {
                    return Some(format!(".{}", k.replace('\0', "\\u0000")));
                }
                find(v).map(|p| format!(".{k}{p}"))
            }),
            _ => None,
        }
    }
    find(value).map(|p| p.trim_start_matches('.').to_string())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The daemon's models as OpenAI model objects (with edgellm's `state`).
async fn models(api: &Api) -> Result<Vec<JsonValue>, ApiError> {
    let conn = api.bus.connect().await.map_err(ApiError::daemon_away)?;
    let proxy = Daemon1Proxy::new(&conn).await.map_err(ApiError::from_dbus)?;
    let models = proxy.list_models().await.map_err(ApiError::from_dbus)?;
    Ok(models
        .iter()
        .map(|(name, d)| {
            let state = d.get("state").and_then(|s| <&str>::try_from(s).ok()).unwrap_or("unknown");
            json!({"id": name, "object": "model", "created": 0, "owned_by": "edgellm", "state": state})
        })
        .collect())
}

async fn list_models(State(api): State<Api>) -> Result<Json<JsonValue>, ApiError> {
    Ok(Json(json!({"object": "list", "data": models(&api).await?})))
}

async fn model(State(api): State<Api>, axum::extract::Path(id): axum::extract::Path<String>) -> Result<Json<JsonValue>, ApiError> {
    models(&api).await?.into_iter().find(|m| m["id"] == id.as_str()).map(Json).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("model_not_found"),
        param: Some("model".into()),
        message: format!("the model `{id}` does not exist; GET /v1/models lists them"),
    })
}

/// What the daemon is asked to run.
enum Call {
    Chat { model: String, messages: Vec<(String, String)> },
    Generate { model: String, prompt: String },
}

/// A generation's output as it arrives.
enum Piece {
    Text(String),
    End(Ending),
}

struct Ending {
    /// The daemon's reason: stop, length, cancelled, timeout, error.
    reason: String,
    usage: Usage,
    error: Option<String>,
}

impl Ending {
    /// OpenAI's `finish_reason`, or the error the request ended with.
    fn finish_reason(&self) -> Result<&'static str, ApiError> {
        match self.reason.as_str() {
            "stop" => Ok("stop"),
            "length" => Ok("length"),
            "timeout" => Err(ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                kind: "timeout",
                code: None,
                param: None,
                message: "the request ran past the daemon's limits.request_timeout_s".into(),
            }),
            "cancelled" => Err(ApiError::internal("the request was cancelled")),
            _ => Err(ApiError::internal(self.error.clone().unwrap_or_else(|| "the request failed".into()))),
        }
    }
}

fn stat_u32(stats: &std::collections::HashMap<String, OwnedValue>, key: &str) -> u32 {
    stats.get(key).and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

/// Starts `call` on its own D-Bus connection and returns its request id and pieces. Dropping the
/// receiver cancels the request.
async fn start(
    bus: &Bus,
    call: Call,
    options: std::collections::HashMap<&'static str, zbus::zvariant::Value<'static>>,
) -> Result<(u64, mpsc::Receiver<Piece>), ApiError> {
    let conn = bus.connect().await.map_err(ApiError::daemon_away)?;
    // One stream for both signals keeps them in the order the daemon sent them; it is open before
    // the call, since the first token may follow the reply at once.
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(INTERFACE)
        .and_then(|r| r.path(OBJECT_PATH))
        .map_err(|e| ApiError::internal(e.to_string()))?
        .build();
    let mut signals = zbus::MessageStream::for_match_rule(rule, &conn, Some(256)).await.map_err(ApiError::from_dbus)?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.map_err(ApiError::from_dbus)?;
    let mut owner_changes = dbus.receive_name_owner_changed_with_args(&[(0, BUS_NAME)]).await.map_err(ApiError::from_dbus)?;
    let proxy = Daemon1Proxy::new(&conn).await.map_err(ApiError::from_dbus)?;
    let id = match &call {
        Call::Chat { model, messages } => {
            let messages: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            proxy.chat(model, &messages, options).await
        }
        Call::Generate { model, prompt } => proxy.generate(model, prompt, options).await,
    }
    .map_err(ApiError::from_dbus)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _conn = conn;
        let ended = |reason: &str, error: String| {
            Piece::End(Ending { reason: reason.into(), usage: Usage { prompt_tokens: 0, completion_tokens: 0 }, error: Some(error) })
        };
        loop {
            tokio::select! {
                _ = tx.closed() => {
                    // The HTTP client went away.
                    let _ = proxy.cancel(id).await;
                    return;
                }
                Some(_) = owner_changes.next() => {
                    let _ = tx.send(ended("error", "edgellmd left the bus during the request".into())).await;
                    return;
                }
                message = signals.next() => {
                    let Some(Ok(message)) = message else {
                        let _ = tx.send(ended("error", "the D-Bus connection closed during the request".into())).await;
                        return;
                    };
                    let member = message.header().member().map(|m| m.to_string());
                    let piece = match member.as_deref() {
                        Some("Token") => match message.body().deserialize::<(u64, String)>() {
                            Ok((rid, text)) if rid == id => Piece::Text(text),
                            _ => continue,
                        },
                        Some("Finished") => match message.body().deserialize::<(u64, String, std::collections::HashMap<String, OwnedValue>)>() {
                            Ok((rid, reason, stats)) if rid == id => Piece::End(Ending {
                                reason,
                                usage: Usage { prompt_tokens: stat_u32(&stats, "prompt_tokens"), completion_tokens: stat_u32(&stats, "generated_tokens") },
                                error: stats.get("error").and_then(|e| <&str>::try_from(e).ok()).map(str::to_string),
                            }),
                            _ => continue,
                        },
                        _ => continue,
                    };
                    let last = matches!(piece, Piece::End(_));
                    if tx.send(piece).await.is_err() {
                        let _ = proxy.cancel(id).await;
                        return;
                    }
                    if last {
                        return;
                    }
                }
            }
        }
    });
    Ok((id, rx))
}

/// Waits for the whole text.
async fn collect(mut pieces: mpsc::Receiver<Piece>) -> Result<(String, &'static str, Usage), ApiError> {
    let mut text = String::new();
    while let Some(piece) = pieces.recv().await {
        match piece {
            Piece::Text(t) => text.push_str(&t),
            Piece::End(end) => return Ok((text, end.finish_reason()?, end.usage)),
        }
    }
    Err(ApiError::internal("the request ended without a result"))
}

/// How one streamed chunk of a route looks: its text delta or its end.
trait Chunks: Send + 'static {
    fn delta(&self, text: &str) -> JsonValue;
    fn end(&self, finish_reason: &str) -> JsonValue;
    fn usage(&self, usage: &Usage) -> JsonValue;
}

fn sse(data: &JsonValue) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(data.to_string()))
}

/// Server-sent events: each piece as a chunk, the end, the usage when asked, then `[DONE]`.
fn event_stream(
    pieces: mpsc::Receiver<Piece>,
    chunks: impl Chunks,
    first: Option<JsonValue>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let head = stream::iter(first.map(|f| sse(&f)));
    let body = stream::unfold((pieces, chunks, false), move |(mut pieces, chunks, done)| async move {
        if done {
            return None;
        }
        let events: Vec<Result<SseEvent, Infallible>> = match pieces.recv().await {
            Some(Piece::Text(t)) => vec![sse(&chunks.delta(&t))],
            Some(Piece::End(end)) => {
                let mut events = Vec::new();
                match end.finish_reason() {
                    Ok(reason) => {
                        events.push(sse(&chunks.end(reason)));
                        if include_usage {
                            events.push(sse(&chunks.usage(&end.usage)));
                        }
                    }
                    Err(e) => events.push(sse(&e.body())),
                }
                events.push(Ok(SseEvent::default().data("[DONE]")));
                return Some((stream::iter(events), (pieces, chunks, true)));
            }
            None => vec![sse(&ApiError::internal("the request ended without a result").body()), Ok(SseEvent::default().data("[DONE]"))],
        };
        let done = events.len() > 1;
        Some((stream::iter(events), (pieces, chunks, done)))
    })
    .flatten();
    head.chain(body)
}

struct ChatChunks {
    id: String,
    created: u64,
    model: String,
}

impl ChatChunks {
    fn chunk(&self, delta: JsonValue, finish_reason: Option<&str>) -> JsonValue {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]})
    }
}

impl Chunks for ChatChunks {
    fn delta(&self, text: &str) -> JsonValue {
        self.chunk(json!({"content": text}), None)
    }
    fn end(&self, finish_reason: &str) -> JsonValue {
        self.chunk(json!({}), Some(finish_reason))
    }
    fn usage(&self, usage: &Usage) -> JsonValue {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model, "choices": [], "usage": usage.json()})
    }
}

struct TextChunks {
    id: String,
    created: u64,
    model: String,
}

impl TextChunks {
    fn chunk(&self, text: &str, finish_reason: Option<&str>) -> JsonValue {
        json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}]})
    }
}

impl Chunks for TextChunks {
    fn delta(&self, text: &str) -> JsonValue {
        self.chunk(text, None)
    }
    fn end(&self, finish_reason: &str) -> JsonValue {
        self.chunk("", Some(finish_reason))
    }
    fn usage(&self, usage: &Usage) -> JsonValue {
        json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": [], "usage": usage.json()})
    }
}

async fn chat_completions(State(api): State<Api>, body: axum::body::Body) -> Result<Response, ApiError> {
    let request: ChatRequest = parse(&read_body(&api.limits, body).await?)?;
    let options = request.sampling.options(None)?;
    let messages = request.messages()?;
    let model = request.sampling.model.clone();
    let (id, pieces) = start(&api.bus, Call::Chat { model: model.clone(), messages }, options).await?;
    let (id, created) = (format!("chatcmpl-{id}"), now());
    if request.sampling.stream {
        let chunks = ChatChunks { id, created, model };
        let first = chunks.chunk(json!({"role": "assistant", "content": ""}), None);
        return Ok(Sse::new(event_stream(pieces, chunks, Some(first), request.sampling.include_usage())).into_response());
    }
    let (text, finish_reason, usage) = collect(pieces).await?;
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish_reason}],
        "usage": usage.json(),
    }))
    .into_response())
}

/// OpenAI's default `max_tokens` for text completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

async fn completions(State(api): State<Api>, body: axum::body::Body) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse(&read_body(&api.limits, body).await?)?;
    let options = request.sampling.options(Some(COMPLETIONS_DEFAULT_MAX_TOKENS))?;
    let prompt = request.prompt()?;
    let model = request.sampling.model.clone();
    let (id, pieces) = start(&api.bus, Call::Generate { model: model.clone(), prompt }, options).await?;
    let (id, created) = (format!("cmpl-{id}"), now());
    if request.sampling.stream {
        let chunks = TextChunks { id, created, model };
        return Ok(Sse::new(event_stream(pieces, chunks, None, request.sampling.include_usage())).into_response());
    }
    let (text, finish_reason, usage) = collect(pieces).await?;
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
        "usage": usage.json(),
    }))
    .into_response())
}
