//! The D-Bus edge: `org.edgellm.Daemon1`. Validates calls, hands them to the scheduler, and
//! sends each request's `Token`/`Finished` signals to its caller only (destination set).
//! Core errors become `org.edgellm.Error.*` here and nowhere else.

pub mod bus_text;
pub mod client;
pub mod options;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::{ResponseDispatchNotifier, SignalEmitter};
use zbus::zvariant::OwnedValue;
use zbus::Connection;

pub use bus_text::{BusDict, BusText};

use crate::engine::{CancelToken, FinishReason, GenerationStats, Prompt};
use crate::error::Error;
use crate::model::ChatMessage;
use crate::scheduler::{CacheKey, Event, Finished, Priority, RequestId, Scheduler, SchedulerError, Submission};

pub const BUS_NAME: &str = "org.edgellm.Daemon1";
pub const OBJECT_PATH: &str = "/org/edgellm/Daemon1";
pub const INTERFACE: &str = "org.edgellm.Daemon1";
/// Sessions are object paths under this one.
pub const SESSION_PATH: &str = "/org/edgellm/Daemon1/session";
/// What a chat message costs against `limits.max_prompt_bytes` besides its role and content.
pub const MESSAGE_OVERHEAD_BYTES: usize = 16;
/// Open sessions one connection may hold.
pub const MAX_SESSIONS_PER_CLIENT: usize = 64;

/// The errors callers get. Messages are `BusText`s: an error that quotes a caller's schema or a
/// file name must not carry a NUL onto the bus.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.edgellm.Error")]
pub enum DaemonError {
    ModelNotFound(BusText),
    InvalidArgument(BusText),
    PromptTooLong(BusText),
    Busy(BusText),
    Cancelled(BusText),
    Timeout(BusText),
    AccessDenied(BusText),
    RequestNotFound(BusText),
    ModelLoadFailed(BusText),
    Internal(BusText),
}

/// A failed call to the bus itself (credentials of a caller): the daemon's fault, not the caller's.
impl From<zbus::Error> for DaemonError {
    fn from(e: zbus::Error) -> Self {
        DaemonError::Internal(BusText::new(format!("D-Bus: {e}")))
    }
}

impl From<zbus::fdo::Error> for DaemonError {
    fn from(e: zbus::fdo::Error) -> Self {
        DaemonError::Internal(BusText::new(format!("D-Bus: {e}")))
    }
}

impl From<Error> for DaemonError {
    fn from(e: Error) -> Self {
        let message = BusText::new(e.to_string());
        match e {
            Error::InvalidArgument { .. } | Error::NoChatTemplate(_) | Error::ChatTemplate(_) | Error::Tokenizer(_) => {
                DaemonError::InvalidArgument(message)
            }
            Error::PromptTooLong { .. } => DaemonError::PromptTooLong(message),
            Error::Cancelled => DaemonError::Cancelled(message),
            Error::RuntimeLibrary { .. } | Error::ModelFile { .. } | Error::ModelConfig { .. } | Error::ProviderUnavailable { .. } => {
                DaemonError::ModelLoadFailed(message)
            }
            Error::Inference(_) => DaemonError::Internal(message),
        }
    }
}

impl From<SchedulerError> for DaemonError {
    fn from(e: SchedulerError) -> Self {
        let message = BusText::new(e.to_string());
        match e {
            SchedulerError::ModelNotFound(_) => DaemonError::ModelNotFound(message),
            SchedulerError::Busy(_) | SchedulerError::ShuttingDown => DaemonError::Busy(message),
            SchedulerError::LoadFailed { .. } => DaemonError::ModelLoadFailed(message),
            SchedulerError::Request(e) => e.into(),
        }
    }
}

struct RequestEntry {
    owner: String,
    cancel: CancelToken,
}

/// A session a caller opened: its KV is kept apart from the caller's other requests.
struct SessionEntry {
    owner: String,
    model: String,
}

/// Who may call the admin methods (LoadModel, UnloadModel), from the caller's credentials as
/// the bus reports them: root, the user the daemon runs as (the owner of a session daemon), and
/// members of `admin_group`.
#[derive(Debug, Clone)]
pub struct AdminPolicy {
    pub daemon_uid: u32,
    pub admin_gid: Option<u32>,
}

pub struct Daemon {
    scheduler: Scheduler,
    requests: Arc<Mutex<HashMap<RequestId, RequestEntry>>>,
    /// By object path.
    sessions: Mutex<HashMap<String, SessionEntry>>,
    /// Session numbers, from a random offset so that paths are not guessable between runs.
    next_session: std::sync::atomic::AtomicU64,
    started: Instant,
    admin: AdminPolicy,
    log_text: bool,
    /// The shortest time between two Token signals of one request (`[daemon] token_interval_ms`).
    token_interval: std::time::Duration,
    /// Each connection's Unix user as the bus reported it, asked once per connection.
    users: Mutex<HashMap<String, Option<u32>>>,
    blocking: BlockingWork,
}

/// Work done for a caller that blocks (validation tokenizes up to `limits.max_prompt_bytes` and
/// may compile a grammar; Tokenize; Detokenize) runs off the bus's threads, at most
/// `BLOCKING_AT_ONCE` jobs daemon-wide and one at a time per connection: a client that floods
/// such calls waits for its own turn and holds one thread, not all of tokio's blocking pool.
struct BlockingWork {
    global: Arc<tokio::sync::Semaphore>,
    per_client: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

const BLOCKING_AT_ONCE: usize = 4;

impl BlockingWork {
    fn new() -> BlockingWork {
        BlockingWork { global: Arc::new(tokio::sync::Semaphore::new(BLOCKING_AT_ONCE)), per_client: Mutex::default() }
    }

    async fn run<T: Send + 'static>(&self, client: &str, what: &str, work: impl FnOnce() -> T + Send + 'static) -> Result<T, DaemonError> {
        let mine = self.per_client.lock().expect("per_client").entry(client.to_string()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1))).clone();
        let left = |_| DaemonError::Cancelled(BusText::new(format!("{what}: the caller left the bus before its turn")));
        let _turn = mine.acquire_owned().await.map_err(left)?;
        let _thread = self.global.clone().acquire_owned().await.map_err(|e| DaemonError::Internal(e.to_string().into()))?;
        tokio::task::spawn_blocking(work).await.map_err(|e| DaemonError::Internal(format!("{what} failed: {e}").into()))
    }

    /// The client's work still waiting for its turn is dropped (closing the semaphore fails the
    /// waiters): a client that sends a flood of grammars and leaves costs one compile, not all.
    fn client_gone(&self, client: &str) {
        if let Some(turns) = self.per_client.lock().expect("per_client").remove(client) {
            turns.close();
        }
    }
}

fn stats_dict(stats: &GenerationStats) -> BusDict {
    let mut d = BusDict::new();
    d.u32("prompt_tokens", stats.prompt_tokens as u32);
    d.u32("generated_tokens", stats.generated_tokens as u32);
    d.f64("time_to_first_token_ms", stats.time_to_first_token.as_secs_f64() * 1000.0);
    d.f64("total_time_ms", stats.total_time.as_secs_f64() * 1000.0);
    d.f64("decode_tokens_per_s", stats.decode_tokens_per_s);
    d.text("provider", stats.provider.as_str());
    d.u32("target_forwards", stats.target_forwards as u32);
    d.f64("queued_ms", stats.queued.as_secs_f64() * 1000.0);
    d.f64("paused_ms", stats.paused.as_secs_f64() * 1000.0);
    d.u32("cached_prompt_tokens", stats.cached_prompt_tokens as u32);
    if let Some(spec) = &stats.speculative {
        d.u32("draft_tokens", spec.draft_tokens as u32);
        d.u32("accepted_tokens", spec.accepted_tokens as u32);
        d.f64("acceptance_rate", spec.acceptance_rate());
    }
    if let Some(m) = &stats.multitoken {
        d.text("multitoken_mode", m.mode.as_str());
        d.f64("tokens_per_step", m.tokens_per_step(stats.generated_tokens));
        d.u32("kv_entries", m.kv_entries as u32);
    }
    d
}

/// The stats of a finished request, with its generated ids when the caller asked for them.
fn finished_stats(f: &Finished, with_token_ids: bool) -> BusDict {
    let mut stats = stats_dict(&f.stats);
    if with_token_ids {
        stats.ids("token_ids", &f.token_ids);
    }
    stats
}

/// A queued request and what its caller asked to get back.
struct Started {
    submitted: crate::scheduler::Submitted,
    return_token_ids: bool,
    priority: Priority,
}

/// The id of `name` in an account database with /etc/passwd's and /etc/group's layout
/// (`name:password:id:...`).
pub fn account_id(database: &str, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(database).ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok()).flatten()
    })
}

impl Daemon {
    pub fn new(scheduler: Scheduler, admin: AdminPolicy, log_text: bool, token_interval: std::time::Duration) -> Daemon {
        Daemon {
            scheduler,
            requests: Arc::new(Mutex::new(HashMap::new())),
            sessions: Mutex::new(HashMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(rand::random::<u32>() as u64),
            started: Instant::now(),
            admin,
            log_text,
            token_interval,
            users: Mutex::new(HashMap::new()),
            blocking: BlockingWork::new(),
        }
    }

    /// The Unix user of the connection `sender`, asked of the bus once per connection.
    async fn user_of(&self, conn: &Connection, sender: &str) -> Option<u32> {
        if let Some(&user) = self.users.lock().expect("users").get(sender) {
            return user;
        }
        let user = match (zbus::fdo::DBusProxy::new(conn).await, BusName::try_from(sender)) {
            (Ok(dbus), Ok(name)) => dbus.get_connection_unix_user(name).await.ok(),
            _ => None,
        };
        let mut users = self.users.lock().expect("users");
        // A cache: a connection that left while its call was being answered may be put back
        // after `client_gone` took it out, so it is bounded.
        if users.len() >= 4096 {
            users.clear();
        }
        users.insert(sender.to_string(), user);
        user
    }

    fn sender(header: &Header<'_>) -> Result<UniqueName<'static>, DaemonError> {
        header.sender().map(|s| s.to_owned()).ok_or_else(|| DaemonError::AccessDenied("the call has no sender".into()))
    }

    /// The request's text, or more than the daemon takes, named.
    fn check_text_size(&self, what: &str, bytes: usize) -> Result<(), DaemonError> {
        let limit = self.scheduler.limits().max_prompt_bytes;
        if bytes > limit {
            return Err(DaemonError::PromptTooLong(format!(
                "the {what} has {bytes} bytes, over the daemon's limit of {limit} (`limits.max_prompt_bytes`)"
            ).into()));
        }
        Ok(())
    }

    /// Validates and queues; returns the request id and its event stream.
    async fn start(
        &self,
        conn: &Connection,
        sender: &str,
        model: &str,
        prompt: Prompt,
        options: &HashMap<String, OwnedValue>,
    ) -> Result<Started, DaemonError> {
        let parsed = options::parse(options)?;
        let prompt = match (parsed.prompt_ids, prompt) {
            (None, prompt) => prompt,
            (Some(ids), Prompt::Text(text)) if text.is_empty() => Prompt::Tokens(ids),
            (Some(_), Prompt::Text(_)) => {
                return Err(Error::InvalidArgument {
                    argument: "prompt_ids".into(),
                    reason: "give either a prompt string or prompt_ids, not both (pass \"\" as the prompt)".into(),
                }
                .into())
            }
            (Some(_), _) => {
                return Err(Error::InvalidArgument {
                    argument: "prompt_ids".into(),
                    reason: "is for Generate and Complete; Chat takes messages".into(),
                }
                .into())
            }
        };
        if parsed.speculative == Some(true) && self.scheduler.model_config(model).is_some_and(|m| m.draft.is_none()) {
            return Err(Error::InvalidArgument {
                argument: "speculative".into(),
                reason: format!("model `{model}` has no draft model configured"),
            }
            .into());
        }
        if let Prompt::Text(text) = &prompt {
            self.check_text_size("prompt", text.len())?;
        }
        let mut generate = parsed.generate;
        generate.speculative = parsed.speculative;
        let user = self.user_of(conn, sender).await;
        let priority = match parsed.priority {
            Some(p) => p,
            None => self.default_priority(user),
        };
        let cache = match &parsed.session {
            None => CacheKey::connection(sender),
            Some(path) => self.session_key(sender, path, Some(model))?,
        };
        // Validation tokenizes up to `limits.max_prompt_bytes`, renders chat templates and may open
        // the model's folder: blocking work, kept off the async threads that serve every caller.
        let submitted = {
            let (scheduler, client, model, prompt) = (self.scheduler.clone(), sender.to_string(), model.to_string(), prompt.clone());
            self.blocking
                .run(sender, "request validation", move || {
                    scheduler.submit_keyed(&Submission {
                        client: &client,
                        user,
                        model: &model,
                        prompt: &prompt,
                        options: generate,
                        priority,
                        cache,
                    })
                })
                .await??
        };
        if self.log_text {
            tracing::debug!(request = submitted.id, ?prompt, "request text");
        }
        tracing::info!(request = submitted.id, model, client = sender, "request queued");
        self.requests
            .lock()
            .expect("requests")
            .insert(submitted.id, RequestEntry { owner: sender.to_string(), cancel: submitted.cancel.clone() });
        Ok(Started { submitted, return_token_ids: parsed.return_token_ids, priority })
    }

    /// The cache key of the session at `path`, if it is `sender`'s (and for `model`, if given).
    fn session_key(&self, sender: &str, path: &str, model: Option<&str>) -> Result<CacheKey, DaemonError> {
        let sessions = self.sessions.lock().expect("sessions");
        match sessions.get(path) {
            None => Err(Error::InvalidArgument {
                argument: "session".into(),
                reason: format!("{path} is not an open session (CreateSession opens one)"),
            }
            .into()),
            Some(s) if s.owner != sender => Err(DaemonError::AccessDenied(format!("session {path} belongs to another connection").into())),
            Some(s) if model.is_some_and(|m| m != s.model) => Err(Error::InvalidArgument {
                argument: "session".into(),
                reason: format!("{path} is a session of model `{}`, not `{}`", s.model, model.unwrap_or_default()),
            }
            .into()),
            Some(_) => Ok(CacheKey { owner: sender.to_string(), name: path.to_string() }),
        }
    }

    /// Background for callers whose uid is one of `limits.background_users`, else interactive.
    fn default_priority(&self, user: Option<u32>) -> Priority {
        let users = self.scheduler.limits().background_users;
        match user {
            Some(uid) if users.iter().any(|name| account_id("/etc/passwd", name) == Some(uid)) => Priority::Background,
            _ => Priority::Interactive,
        }
    }

    /// Sends a request's events to its caller only, as `Token` then `Finished` signals.
    fn forward(&self, conn: &Connection, dest: UniqueName<'static>, started: Started, reply_sent: event_listener::EventListener) {
        let Started { submitted, return_token_ids, priority } = started;
        let conn = conn.clone();
        let requests = self.requests.clone();
        let id = submitted.id;
        let mut events = submitted.events;
        let cancel = submitted.cancel;
        let token_interval = self.token_interval;
        // Shutdown's drain waits for this task: it ends after the caller's last signal.
        let drain = submitted.drain;
        tokio::spawn(async move {
            let _drain = drain;
            // No signal before the method's reply: zbus tells when the reply has been sent.
            // (Bounded, in case the reply never goes out: the engine must not wait on us.)
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), reply_sent).await;
            let emitter = match SignalEmitter::new(&conn, OBJECT_PATH) {
                Ok(e) => e.set_destination(BusName::Unique(dest)),
                Err(_) => return cancel.cancel(),
            };
            // No Token signal before this: what the engine makes meanwhile joins the next one.
            // Each signal costs dbus-daemon and the client about as much CPU as a token of a
            // small model takes to make (docs/performance.md, "Streaming over D-Bus"); the end never waits.
            let mut quiet_until: Option<Instant> = None;
            loop {
                if let Some(due) = quiet_until.take().filter(|&due| due > Instant::now()) {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = events.ended() => {}
                    }
                }
                let Some(event) = events.recv().await else { break };
                let sent = match event {
                    Event::Text(text) => {
                        quiet_until = Some(Instant::now() + token_interval);
                        Daemon::token(&emitter, id, &BusText::new(text)).await
                    }
                    Event::Finished(f) => {
                        let mut stats = finished_stats(&f, return_token_ids);
                        stats.text("priority", priority.as_str());
                        if let Some(error) = &f.error {
                            stats.text("error", error.to_string());
                        }
                        let sent = Daemon::finished(&emitter, id, f.reason.as_str(), stats).await;
                        tracing::info!(request = id, reason = f.reason.as_str(), tokens = f.stats.generated_tokens, "request finished");
                        requests.lock().expect("requests").remove(&id);
                        sent
                    }
                };
                if sent.is_err() {
                    cancel.cancel();
                }
            }
            requests.lock().expect("requests").remove(&id);
        });
    }

    /// Cancels everything a client that left the bus had started.
    pub fn client_gone(&self, client: &str) {
        let mut requests = self.requests.lock().expect("requests");
        for entry in requests.values().filter(|e| e.owner == client) {
            entry.cancel.cancel();
        }
        requests.retain(|_, e| e.owner != client);
        drop(requests);
        self.users.lock().expect("users").remove(client);
        self.blocking.client_gone(client);
        self.sessions.lock().expect("sessions").retain(|_, s| s.owner != client);
        self.scheduler.cancel_client(client);
    }

    async fn check_admin(&self, conn: &Connection, sender: &UniqueName<'_>) -> Result<(), DaemonError> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let creds =
            dbus.get_connection_credentials(BusName::Unique(sender.clone())).await.map_err(|e| DaemonError::Internal(e.to_string().into()))?;
        let uid = creds.unix_user_id();
        let in_group = match (self.admin.admin_gid, creds.unix_group_ids()) {
            (Some(gid), Some(groups)) => groups.contains(&gid),
            _ => false,
        };
        if uid == Some(0) || uid == Some(self.admin.daemon_uid) || in_group {
            Ok(())
        } else {
            Err(DaemonError::AccessDenied(format!(
                "loading and unloading models needs root, the daemon's user or the configured admin group (caller uid {})",
                uid.map(|u| u.to_string()).unwrap_or_else(|| "unknown".into())
            ).into()))
        }
    }

    async fn complete_inner(
        &self,
        conn: &Connection,
        sender: &str,
        model: &str,
        prompt: Prompt,
        options: &HashMap<String, OwnedValue>,
    ) -> Result<(BusText, BusDict), DaemonError> {
        let Started { mut submitted, return_token_ids, priority } = self.start(conn, sender, model, prompt, options).await?;
        let id = submitted.id;
        // The text comes whole in the end: the engine need not wake this task for its pieces.
        submitted.events.end_only();
        let mut finished = None;
        while let Some(event) = submitted.events.recv().await {
            if let Event::Finished(f) = event {
                finished = Some(f);
                break;
            }
        }
        self.requests.lock().expect("requests").remove(&id);
        let f = finished.ok_or_else(|| DaemonError::Internal("the request ended without a result".into()))?;
        match f.reason {
            FinishReason::Error => {
                Err(f.error.map(DaemonError::from).unwrap_or_else(|| DaemonError::Internal(format!("request {id} failed").into())))
            }
            FinishReason::Cancelled => Err(DaemonError::Cancelled(format!("request {id} was cancelled").into())),
            FinishReason::Timeout => Err(DaemonError::Timeout(format!("request {id} ran past `limits.request_timeout_s`").into())),
            FinishReason::Stop | FinishReason::Length => {
                let mut stats = finished_stats(&f, return_token_ids);
                stats.text("priority", priority.as_str());
                stats.text("finish_reason", f.reason.as_str());
                Ok((BusText::new(f.text), stats))
            }
        }
    }
}

#[zbus::interface(name = "org.edgellm.Daemon1")]
impl Daemon {
    /// Starts a generation; its text comes as `Token` signals to the caller, then `Finished`.
    #[zbus(out_args("request_id"))]
    async fn generate(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        model: String,
        prompt: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<ResponseDispatchNotifier<u64>, DaemonError> {
        let sender = Self::sender(&header)?;
        let started = self.start(conn, &sender, &model, Prompt::Text(prompt), &options).await?;
        let (reply, sent) = ResponseDispatchNotifier::new(started.submitted.id);
        self.forward(conn, sender, started, sent);
        Ok(reply)
    }

    /// Like `Generate`, with (role, content) messages through the model's chat template.
    #[zbus(out_args("request_id"))]
    async fn chat(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        model: String,
        messages: Vec<(String, String)>,
        options: HashMap<String, OwnedValue>,
    ) -> Result<ResponseDispatchNotifier<u64>, DaemonError> {
        let sender = Self::sender(&header)?;
        // Each message counts its framing too: a million empty messages are no text, yet the
        // template renders every one.
        self.check_text_size("messages", messages.iter().map(|(r, c)| MESSAGE_OVERHEAD_BYTES + r.len() + c.len()).sum())?;
        let messages = messages.into_iter().map(|(role, content)| ChatMessage { role, content }).collect();
        let started = self.start(conn, &sender, &model, Prompt::Chat(messages), &options).await?;
        let (reply, sent) = ResponseDispatchNotifier::new(started.submitted.id);
        self.forward(conn, sender, started, sent);
        Ok(reply)
    }

    /// Non-streaming generation for scripts: returns the whole text and the stats.
    #[zbus(out_args("text", "stats"))]
    async fn complete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        model: String,
        prompt: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<(BusText, BusDict), DaemonError> {
        let sender = Self::sender(&header)?;
        self.complete_inner(conn, &sender, &model, Prompt::Text(prompt), &options).await
    }

    /// The ids a plain prompt is fed to `model` as, its tokenizer's BOS included where it adds
    /// one (as Hugging Face tokenizers' `encode(text, add_special_tokens=True)`).
    #[zbus(out_args("ids"))]
    async fn tokenize(&self, #[zbus(header)] header: Header<'_>, model: String, text: String) -> Result<Vec<u32>, DaemonError> {
        let sender = Self::sender(&header)?;
        self.check_text_size("text", text.len())?;
        let scheduler = self.scheduler.clone();
        // Off the bus's threads: a large text or a first use that opens the model folder blocks.
        Ok(self.blocking.run(&sender, "Tokenize", move || scheduler.tokenize(&model, &text)).await??)
    }

    /// The text of `ids` under `model`'s tokenizer, special tokens skipped.
    #[zbus(out_args("text"))]
    async fn detokenize(&self, #[zbus(header)] header: Header<'_>, model: String, ids: Vec<u32>) -> Result<BusText, DaemonError> {
        let sender = Self::sender(&header)?;
        self.check_text_size("id list", ids.len() * 4)?;
        let scheduler = self.scheduler.clone();
        let text = self.blocking.run(&sender, "Detokenize", move || scheduler.detokenize(&model, &ids)).await??;
        Ok(BusText::new(text))
    }

    /// Cancels a request the caller started. Someone else's id and an unknown id get the same
    /// error, so ids reveal nothing.
    async fn cancel(&self, #[zbus(header)] header: Header<'_>, request_id: u64) -> Result<(), DaemonError> {
        let sender = Self::sender(&header)?;
        let requests = self.requests.lock().expect("requests");
        match requests.get(&request_id) {
            Some(entry) if entry.owner == sender.as_str() => {
                entry.cancel.cancel();
                Ok(())
            }
            _ => Err(DaemonError::RequestNotFound(format!("no request {request_id} of this caller is running").into())),
        }
    }

    /// Opens a session on `model`: requests that pass its path as the option `session` keep
    /// their KV apart from the caller's others, until `CloseSession` or the caller leaves.
    #[zbus(out_args("session"))]
    async fn create_session(
        &self,
        #[zbus(header)] header: Header<'_>,
        model: String,
    ) -> Result<zbus::zvariant::OwnedObjectPath, DaemonError> {
        let sender = Self::sender(&header)?;
        if self.scheduler.model_config(&model).is_none() {
            return Err(SchedulerError::ModelNotFound(model).into());
        }
        let mut sessions = self.sessions.lock().expect("sessions");
        if sessions.values().filter(|s| s.owner == sender.as_str()).count() >= MAX_SESSIONS_PER_CLIENT {
            return Err(DaemonError::Busy(format!(
                "this connection has {MAX_SESSIONS_PER_CLIENT} open sessions, the most it may hold: close one (CloseSession)"
            ).into()));
        }
        let n = self.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = format!("{SESSION_PATH}/s{n}");
        sessions.insert(path.clone(), SessionEntry { owner: sender.to_string(), model });
        zbus::zvariant::OwnedObjectPath::try_from(path).map_err(|e| DaemonError::Internal(e.to_string().into()))
    }

    /// Closes a session of the caller's and frees its KV.
    async fn close_session(&self, #[zbus(header)] header: Header<'_>, session: zbus::zvariant::ObjectPath<'_>) -> Result<(), DaemonError> {
        let sender = Self::sender(&header)?;
        let key = self.session_key(&sender, session.as_str(), None)?;
        self.sessions.lock().expect("sessions").remove(session.as_str());
        self.scheduler.forget_cache(&key);
        Ok(())
    }

    /// Every configured model with its state, provider, draft and error.
    #[zbus(out_args("models"))]
    async fn list_models(&self) -> Vec<(BusText, BusDict)> {
        self.scheduler
            .models()
            .into_iter()
            .map(|m| {
                let mut d = BusDict::new();
                d.text("state", m.state.as_str());
                d.text("provider", m.provider.clone().unwrap_or_default());
                if let Some(draft) = &m.draft {
                    d.text("draft", draft.as_str());
                }
                if let Some(p) = &m.draft_provider {
                    d.text("draft_provider", p.as_str());
                }
                if let Some(k) = &m.int4_kernel {
                    d.text("int4_kernel", k.as_str());
                }
                if let Some(error) = &m.error {
                    d.text("error", error.as_str());
                }
                d.u64("requests", m.requests);
                if m.draft.is_some() {
                    d.u64("draft_tokens", m.draft_tokens);
                    d.u64("accepted_tokens", m.accepted_tokens);
                }
                d.u64("generated_tokens", m.generated_tokens);
                if let Some(mib) = m.memory_mib {
                    d.u64("memory_mib", mib);
                }
                if let Some(tps) = m.tokens_per_s {
                    d.f64("tokens_per_s", tps);
                }
                if let Some(at) = m.unloads_at {
                    // Seconds until an idle model unloads (its keep_alive_s).
                    d.f64("unloads_in_s", at.saturating_duration_since(std::time::Instant::now()).as_secs_f64());
                }
                (BusText::new(m.name), d)
            })
            .collect()
    }

    /// Loads a configured model and returns when it is ready.
    async fn load_model(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), DaemonError> {
        let sender = Self::sender(&header)?;
        self.check_admin(conn, &sender).await?;
        Ok(self.scheduler.load(&name).await?)
    }

    /// Unloads a model; its memory is returned once running requests are done.
    async fn unload_model(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), DaemonError> {
        let sender = Self::sender(&header)?;
        self.check_admin(conn, &sender).await?;
        Ok(self.scheduler.unload(&name).await?)
    }

    /// Version, uptime and request counters.
    #[zbus(out_args("status"))]
    async fn status(&self) -> BusDict {
        let mut d = BusDict::new();
        d.text("version", env!("CARGO_PKG_VERSION"));
        d.u64("uptime_s", self.started.elapsed().as_secs());
        d.u32("requests_in_flight", self.scheduler.in_flight() as u32);
        d.u32("requests_queued", self.scheduler.queued() as u32);
        d.u64("requests_total", self.scheduler.requests_total());
        d.u64("generated_tokens_total", self.scheduler.generated_tokens_total());
        let (kv_bytes, kv_caches) = self.scheduler.kv_cache_usage();
        d.f64("kv_cache_mib", kv_bytes as f64 / (1024.0 * 1024.0));
        d.u32("kv_caches", kv_caches as u32);
        // Running totals of speculative decoding per model with a draft: name -> (drafted, accepted).
        d.counts(
            "speculative",
            self.scheduler.models().into_iter().filter(|m| m.draft.is_some()).map(|m| (BusText::new(m.name), (m.draft_tokens, m.accepted_tokens))),
        );
        d
    }

    #[zbus(signal)]
    async fn token(emitter: &SignalEmitter<'_>, request_id: u64, text: &BusText) -> zbus::Result<()>;

    // `reason` is one of `FinishReason::as_str`'s names (not a doc comment: it would change the
    // introspection XML that dbus/org.edgellm.Daemon1.xml ships).
    #[zbus(signal)]
    async fn finished(emitter: &SignalEmitter<'_>, request_id: u64, reason: &'static str, stats: BusDict) -> zbus::Result<()>;

    // `state` is one of `ModelState::as_str`'s names.
    #[zbus(signal)]
    pub async fn model_state_changed(emitter: &SignalEmitter<'_>, name: &BusText, state: &'static str) -> zbus::Result<()>;
}

/// Emits every model state change from `states` as the `ModelStateChanged` signal on `conn`
/// until the scheduler is gone. State changes carry nothing private, so they are broadcast.
pub async fn relay_model_states(states: tokio::sync::broadcast::Receiver<(String, crate::scheduler::ModelState)>, conn: Connection) {
    relay_states(states, |name, state| {
        let conn = conn.clone();
        async move {
            if let Ok(emitter) = SignalEmitter::new(&conn, OBJECT_PATH) {
                let _ = Daemon::model_state_changed(&emitter, &BusText::new(name), state.as_str()).await;
            }
        }
    })
    .await
}

/// The loop of `relay_model_states`: a receiver that fell behind (a burst of more changes than
/// the channel holds) skips what it missed and goes on; only a closed channel ends it.
async fn relay_states<F, Fut>(mut states: tokio::sync::broadcast::Receiver<(String, crate::scheduler::ModelState)>, mut emit: F)
where
    F: FnMut(String, crate::scheduler::ModelState) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match states.recv().await {
            Ok((name, state)) => emit(name, state).await,
            Err(RecvError::Lagged(missed)) => tracing::warn!(missed, "model state signals fell behind; the missed changes are not sent"),
            Err(RecvError::Closed) => break,
        }
    }
}

#[cfg(test)]
mod relay_tests {
    use super::*;
    use crate::scheduler::ModelState;

    #[tokio::test]
    async fn a_lagging_state_relay_goes_on() {
        let (tx, rx) = tokio::sync::broadcast::channel(2);
        // Five changes into a channel of two, before the relay reads any: it lags by three.
        for i in 0..5 {
            tx.send((format!("m{i}"), ModelState::Loading)).unwrap();
        }
        let sent = Arc::new(Mutex::new(Vec::new()));
        let relay = {
            let sent = sent.clone();
            tokio::spawn(relay_states(rx, move |name, _| {
                sent.lock().unwrap().push(name);
                std::future::ready(())
            }))
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tx.send(("after".into(), ModelState::Ready)).unwrap();
        drop(tx);
        relay.await.unwrap();
        assert_eq!(*sent.lock().unwrap(), ["m3", "m4", "after"]);
    }
}
