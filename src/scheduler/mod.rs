//! Admission, queues and the engine threads.
//!
//! Each configured model has one engine thread that owns its ONNX Runtime session and runs one
//! request at a time. Requests wait in a per-model queue that takes clients in turn (one
//! client's burst cannot push another's request behind all of its own). Everything is bounded:
//! the queue by `max_queue` and `max_per_client`, each request's token stream by a channel.
//! Nothing here knows who a client is beyond an opaque id (the service passes the D-Bus unique
//! name).

mod queue;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::{Config, Limits, ModelConfig};
use crate::engine::{CancelToken, Engine, FinishReason, GenerateOptions, GenerationStats, Prompt};
use crate::error::Error;
use crate::model::ModelFolder;
use crate::runtime::Runtime;
use queue::FairQueue;

pub type ClientId = String;
pub type RequestId = u64;

/// How many text pieces may wait between the engine and the caller's connection.
const EVENT_BUFFER: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Unloaded,
    Loading,
    Ready,
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub state: ModelState,
    pub provider: Option<String>,
    /// The execution provider the draft runs on (it may differ from the target's).
    pub draft_provider: Option<String>,
    pub draft: Option<String>,
    pub error: Option<String>,
    pub generated_tokens: u64,
    pub requests: u64,
    /// Running totals of speculative decoding.
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
}

/// Why admission or a model operation failed; the service maps these to D-Bus errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchedulerError {
    #[error("no model named `{0}` is configured (ListModels shows the names)")]
    ModelNotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("model `{model}` failed to load: {reason}")]
    LoadFailed { model: String, reason: String },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Request(#[from] Error),
}

/// What the caller receives for one request, in order: text pieces, then one `Finished`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Finished(Finished),
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    /// Set when the request failed (`reason` is then `Error`); typed, so that the D-Bus edge
    /// names it as it names the same error from a method call.
    pub error: Option<SchedulerError>,
    pub text: String,
    /// The generated ids, eos excluded (the caller may ask for them with `return_token_ids`).
    pub token_ids: Vec<u32>,
    pub stats: GenerationStats,
}

pub struct Submitted {
    pub id: RequestId,
    pub events: mpsc::Receiver<Event>,
    pub cancel: CancelToken,
    /// Held by whoever relays the events, until the caller has them all.
    pub drain: DrainGuard,
}

/// Held by every admitted request, by its job and by its caller's `Submitted`: the drain at
/// shutdown completes when the last one drops (mini-redis's `shutdown_complete` channel). No
/// message is ever sent on it; the channel closing is the signal.
#[derive(Clone)]
pub struct DrainGuard(#[allow(dead_code)] mpsc::Sender<()>);

/// A client's admitted request, counted against `limits.max_per_client` until it is dropped:
/// whichever way the request ends (run, unrun, refused after admission, or dropped by a panicking
/// engine thread), the count is freed.
struct ClientPermit {
    counts: Arc<Mutex<HashMap<ClientId, usize>>>,
    client: ClientId,
    _drain: DrainGuard,
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = counts.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// A place in the daemon-wide queue, reserved at admission under the lock that checks
/// `limits.max_queue`, and given back when the job leaves the queue (taken by its engine thread,
/// cancelled, drained or dropped).
struct QueueSeat(Arc<AtomicUsize>);

impl Drop for QueueSeat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct GenerateJob {
    id: RequestId,
    permit: ClientPermit,
    seat: Option<QueueSeat>,
    prompt_ids: Vec<u32>,
    options: GenerateOptions,
    cancel: CancelToken,
    events: mpsc::Sender<Event>,
}

enum Control {
    Load(oneshot::Sender<Result<(), String>>),
    Unload(oneshot::Sender<()>),
}

struct ModelSlot {
    /// Removed from the config: take no new work, exit when the queue is empty.
    retired: AtomicBool,
    /// Milliseconds since the scheduler started, when the engine thread last showed progress;
    /// `busy` while it runs a request. The watchdog pings only while every busy thread moves.
    heartbeat: AtomicU64,
    busy: AtomicBool,
    config: ModelConfig,
    folder: Mutex<Option<Arc<ModelFolder>>>,
    status: Mutex<ModelInfo>,
    queue: Mutex<FairQueue<GenerateJob, Control>>,
    wake: Condvar,
}

struct Counters {
    in_flight: AtomicU64,
    total: AtomicU64,
    generated_tokens: AtomicU64,
}

struct Inner {
    started: Instant,
    runtime: Arc<Runtime>,
    limits: std::sync::RwLock<Limits>,
    /// The configured models, in config order. A model removed by a reload leaves this list at
    /// once; its thread finishes what it was given and then exits.
    models: std::sync::RwLock<Vec<Arc<ModelSlot>>>,
    /// Every slot with a thread, removed ones included (for counts and shutdown).
    all: Mutex<Vec<Arc<ModelSlot>>>,
    next_id: AtomicU64,
    /// What admission clones into each request's `DrainGuard`; taken away when shutdown begins,
    /// which is also what refuses new requests from then on.
    drain: Mutex<Option<mpsc::Sender<()>>>,
    stopping: AtomicBool,
    counters: Counters,
    per_client: Arc<Mutex<HashMap<ClientId, usize>>>,
    /// Requests admitted and not yet taken by an engine thread, daemon-wide (`limits.max_queue`).
    waiting: Arc<AtomicUsize>,
    states: broadcast::Sender<(String, ModelState)>,
}

impl Inner {
    fn active(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.models.read().expect("models").iter().find(|s| s.config.name == name).cloned()
    }

    fn every(&self) -> Vec<Arc<ModelSlot>> {
        self.all.lock().expect("all").clone()
    }
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
    /// Closes when shutdown has begun and every `DrainGuard` has dropped.
    drained: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl Scheduler {
    /// Starts one engine thread per configured model. Models are not loaded yet: see `preload`.
    pub fn start(runtime: Arc<Runtime>, config: &Config) -> Scheduler {
        let (states, _) = broadcast::channel(64);
        let (drain, drained) = mpsc::channel(1);
        let inner = Arc::new(Inner {
            started: Instant::now(),
            runtime,
            limits: std::sync::RwLock::new(config.limits.clone()),
            models: std::sync::RwLock::new(Vec::new()),
            all: Mutex::new(Vec::new()),
            // Ids unique for the daemon's lifetime, from a random offset so that they are not
            // guessable from one run to the next.
            next_id: AtomicU64::new((rand::random::<u32>() as u64) << 16),
            drain: Mutex::new(Some(drain)),
            stopping: AtomicBool::new(false),
            counters: Counters { in_flight: AtomicU64::new(0), total: AtomicU64::new(0), generated_tokens: AtomicU64::new(0) },
            per_client: Arc::new(Mutex::new(HashMap::new())),
            waiting: Arc::new(AtomicUsize::new(0)),
            states,
        });
        let scheduler = Scheduler { inner, drained: Arc::new(tokio::sync::Mutex::new(drained)), threads: Arc::new(Mutex::new(Vec::new())) };
        let slots: Vec<Arc<ModelSlot>> = config.models.iter().map(|m| scheduler.spawn_slot(m)).collect();
        *scheduler.inner.models.write().expect("models") = slots;
        scheduler
    }

    /// A slot for `config` with its engine thread.
    fn spawn_slot(&self, config: &ModelConfig) -> Arc<ModelSlot> {
        let slot = Arc::new(ModelSlot {
            retired: AtomicBool::new(false),
            heartbeat: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            config: config.clone(),
            folder: Mutex::new(None),
            status: Mutex::new(ModelInfo {
                name: config.name.clone(),
                state: ModelState::Unloaded,
                provider: None,
                draft_provider: None,
                draft: config.draft.clone(),
                error: None,
                generated_tokens: 0,
                requests: 0,
                draft_tokens: 0,
                accepted_tokens: 0,
            }),
            queue: Mutex::new(FairQueue::default()),
            wake: Condvar::new(),
        });
        self.inner.all.lock().expect("all").push(slot.clone());
        let (inner, thread_slot) = (self.inner.clone(), slot.clone());
        let handle = std::thread::Builder::new()
            .name(format!("engine-{}", config.name))
            .spawn(move || engine_thread(inner, thread_slot))
            .expect("spawn engine thread");
        self.threads.lock().expect("threads").push(handle);
        slot
    }

    /// Applies a new, already validated config: limits change at once; added models appear;
    /// removed ones leave the list and unload once their requests are done; changed ones are
    /// replaced (the old engine finishes its requests, the new one loads). Returns what changed.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let mut changes = Vec::new();
        *self.inner.limits.write().expect("limits") = config.limits.clone();
        let old: Vec<Arc<ModelSlot>> = self.inner.models.read().expect("models").clone();
        let mut next = Vec::new();
        for m in &config.models {
            match old.iter().find(|s| s.config.name == m.name) {
                Some(slot) if slot.config == *m => next.push(slot.clone()),
                Some(_) => {
                    changes.push(format!("{} changed", m.name));
                    next.push(self.spawn_slot(m));
                }
                None => {
                    changes.push(format!("{} added", m.name));
                    next.push(self.spawn_slot(m));
                }
            }
        }
        for slot in &old {
            let kept = next.iter().any(|n| Arc::ptr_eq(n, slot));
            if !kept {
                if !config.models.iter().any(|m| m.name == slot.config.name) {
                    changes.push(format!("{} removed", slot.config.name));
                    let _ = self.inner.states.send((slot.config.name.clone(), ModelState::Unloaded));
                }
                // Under the queue's lock: `submit` checks `retired` under it before pushing, so a
                // job is either in the queue before the worker sees `retired`, or not pushed here.
                let queue = slot.queue.lock().expect("queue");
                slot.retired.store(true, Ordering::SeqCst);
                drop(queue);
                slot.wake.notify_all();
            }
        }
        *self.inner.models.write().expect("models") = next;
        changes
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits.read().expect("limits").clone()
    }

    pub fn subscribe_states(&self) -> broadcast::Receiver<(String, ModelState)> {
        self.inner.states.subscribe()
    }

    fn slot(&self, model: &str) -> Result<Arc<ModelSlot>, SchedulerError> {
        self.inner.active(model).ok_or_else(|| SchedulerError::ModelNotFound(model.to_string()))
    }

    pub fn model_config(&self, model: &str) -> Option<ModelConfig> {
        self.inner.active(model).map(|s| s.config.clone())
    }

    /// The folder (tokenizer, config, template) of a model, opened on first use.
    fn folder(&self, slot: &ModelSlot) -> Result<Arc<ModelFolder>, SchedulerError> {
        open_folder(slot).map_err(|e| SchedulerError::LoadFailed { model: slot.config.name.clone(), reason: e.to_string() })
    }

    /// The ids a plain prompt is fed to `model` as (its tokenizer's BOS included, where it adds one).
    pub fn tokenize(&self, model: &str, text: &str) -> Result<Vec<u32>, SchedulerError> {
        let folder = self.folder(&*self.slot(model)?)?;
        Ok(folder.tokenizer.encode_prompt(text)?)
    }

    /// The text of `ids` under `model`'s tokenizer, special tokens skipped.
    pub fn detokenize(&self, model: &str, ids: &[u32]) -> Result<String, SchedulerError> {
        let folder = self.folder(&*self.slot(model)?)?;
        folder.check_vocabulary("ids", ids)?;
        Ok(folder.tokenizer.decode(ids)?)
    }

    /// Validates and queues a request. Tokenizing here means a prompt that is too long, or a
    /// chat request to a model without a template, is refused before it waits in any queue.
    pub fn submit(&self, client: &str, model: &str, prompt: &Prompt, options: GenerateOptions) -> Result<Submitted, SchedulerError> {
        // A reload may retire the model's slot while the request is validated; it is then
        // validated again against the slot that replaced it (its folder may differ). Reloads come
        // from SIGHUP, so a few tries always suffice; past them the request is refused as Busy.
        for _ in 0..4 {
            match self.try_submit(client, model, prompt, options.clone())? {
                Some(submitted) => return Ok(submitted),
                None => continue,
            }
        }
        Err(SchedulerError::Busy(format!("model `{model}` was reloaded while the request was queued; try again")))
    }

    /// `submit` against the model's current slot; `None` when a reload retired that slot before
    /// the request could be queued on it (nothing is left counted then).
    fn try_submit(
        &self,
        client: &str,
        model: &str,
        prompt: &Prompt,
        mut options: GenerateOptions,
    ) -> Result<Option<Submitted>, SchedulerError> {
        let drain = self.inner.drain.lock().expect("drain").clone().map(DrainGuard).ok_or(SchedulerError::ShuttingDown)?;
        let slot = self.slot(model)?;
        let folder = self.folder(&slot)?;
        let prompt_ids = folder.prompt_ids(model, prompt)?;
        let limits = self.limits();
        let limit = limits.max_new_tokens;
        match options.max_new_tokens {
            Some(n) if n > limit => {
                return Err(Error::InvalidArgument {
                    argument: "max_new_tokens".into(),
                    reason: format!("{n} is over the daemon's limit of {limit} (`limits.max_new_tokens`)"),
                }
                .into());
            }
            Some(0) => {
                return Err(Error::InvalidArgument { argument: "max_new_tokens".into(), reason: "must be at least 1".into() }.into());
            }
            None => options.max_new_tokens = Some(limit),
            Some(_) => {}
        }
        if options.prompt_lookup == Some(true) && (folder.multitoken.is_some() || slot.config.draft.is_some()) {
            return Err(Error::InvalidArgument {
                argument: "prompt_lookup".into(),
                reason: format!(
                    "model `{model}` drafts with {}; prompt lookup is for models without one",
                    if folder.multitoken.is_some() { "its multi-token steps" } else { "its draft model" }
                ),
            }
            .into());
        }
        let multitoken_asked =
            options.multitoken_mode.is_some() || options.multitoken_threshold.is_some() || options.multitoken_max_tokens.is_some();
        match &folder.multitoken {
            None if multitoken_asked => {
                return Err(Error::InvalidArgument {
                    argument: "multitoken_*".into(),
                    reason: format!("model `{model}` is not a multi-token model (no multitoken_config.json)"),
                }
                .into())
            }
            Some(contract) => {
                if let Some(n) = options.multitoken_max_tokens.filter(|&n| n > contract.max_tokens_per_step) {
                    return Err(Error::InvalidArgument {
                        argument: "multitoken_max_tokens".into(),
                        reason: format!("{n} is over the model's max_tokens_per_step of {}", contract.max_tokens_per_step),
                    }
                    .into());
                }
            }
            None => {}
        }
        if options.deadline.is_none() {
            options.deadline = Some(Instant::now() + limits.request_timeout);
        }
        // Admission: per-client and global bounds, checked and counted under one lock.
        {
            let mut per_client = self.inner.per_client.lock().expect("per_client");
            let queued = self.inner.waiting.load(Ordering::SeqCst);
            if queued >= limits.max_queue {
                return Err(SchedulerError::Busy(format!(
                    "the queue is full ({queued} requests waiting, `limits.max_queue`); try again later"
                )));
            }
            let mine = per_client.entry(client.to_string()).or_insert(0);
            if *mine >= limits.max_per_client {
                return Err(SchedulerError::Busy(format!(
                    "this client already has {} requests in flight or waiting (`limits.max_per_client`)",
                    *mine
                )));
            }
            *mine += 1;
            self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        }
        // Both counted under the lock above; from here on, dropping these gives them back.
        let permit = ClientPermit { counts: self.inner.per_client.clone(), client: client.to_string(), _drain: drain.clone() };
        let seat = Some(QueueSeat(self.inner.waiting.clone()));
        // Where a submitting thread may be preempted between admission and the push (tests widen it).
        fail::fail_point!("scheduler::admitted", model.contains("failpoint"), |_| Err(SchedulerError::ShuttingDown));
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        // The watchdog's heartbeat, at every engine step (not only when text is released).
        let (heart, started) = (Arc::downgrade(&slot), self.inner.started);
        let cancel = CancelToken::with_progress(Arc::new(move || {
            if let Some(slot) = heart.upgrade() {
                slot.heartbeat.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
            }
        }));
        let job = GenerateJob { id, permit, seat, prompt_ids, options, cancel: cancel.clone(), events: tx };
        {
            let mut queue = slot.queue.lock().expect("queue");
            if slot.retired.load(Ordering::SeqCst) {
                // Its engine thread may have ended already: a job pushed now would never run.
                // Dropping the job frees the client's count.
                return Ok(None);
            }
            queue.push(client, job);
        }
        slot.wake.notify_one();
        self.inner.counters.total.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Submitted { id, events: rx, cancel, drain }))
    }

    /// Cancels every request of a client that went away, queued or running.
    pub fn cancel_client(&self, client: &str) {
        for slot in self.inner.every() {
            let removed = slot.queue.lock().expect("queue").remove_client(client);
            for job in removed {
                finish_unrun(job, FinishReason::Cancelled, None);
            }
        }
    }

    /// Loads a model (if it is not loaded) and waits for it.
    pub async fn load(&self, model: &str) -> Result<(), SchedulerError> {
        let slot = self.slot(model)?;
        let (tx, rx) = oneshot::channel();
        slot.queue.lock().expect("queue").push_control(Control::Load(tx));
        slot.wake.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(SchedulerError::LoadFailed { model: model.into(), reason }),
            Err(_) => Err(SchedulerError::ShuttingDown),
        }
    }

    pub async fn unload(&self, model: &str) -> Result<(), SchedulerError> {
        let slot = self.slot(model)?;
        let (tx, rx) = oneshot::channel();
        slot.queue.lock().expect("queue").push_control(Control::Unload(tx));
        slot.wake.notify_one();
        rx.await.map_err(|_| SchedulerError::ShuttingDown)
    }

    /// Loads every model with `preload = true`, in config order; failures are logged and shown
    /// in `models()`, they do not stop the daemon.
    pub async fn preload(&self) {
        let names: Vec<String> = self
            .inner
            .models
            .read()
            .expect("models")
            .iter()
            .filter(|s| s.config.preload && s.status.lock().expect("status").state == ModelState::Unloaded)
            .map(|s| s.config.name.clone())
            .collect();
        for name in names {
            if let Err(e) = self.load(&name).await {
                tracing::error!(model = %name, error = %e, "preload failed");
            }
        }
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner.models.read().expect("models").iter().map(|s| s.status.lock().expect("status").clone()).collect()
    }

    pub fn queued(&self) -> usize {
        self.inner.waiting.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> u64 {
        self.inner.counters.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests_total(&self) -> u64 {
        self.inner.counters.total.load(Ordering::Relaxed)
    }

    pub fn generated_tokens_total(&self) -> u64 {
        self.inner.counters.generated_tokens.load(Ordering::Relaxed)
    }

    /// True while no engine thread is stuck: each is idle or showed progress within `stall`.
    /// The daemon's watchdog pings systemd only then, so a hung engine gets the service restarted.
    pub fn engines_alive(&self, stall: std::time::Duration) -> bool {
        let now = self.inner.started.elapsed().as_millis() as u64;
        self.inner
            .every()
            .iter()
            .all(|s| !s.busy.load(Ordering::SeqCst) || now.saturating_sub(s.heartbeat.load(Ordering::SeqCst)) < stall.as_millis() as u64)
    }

    /// Refuse new requests from now on (shutdown has begun).
    pub fn stop_accepting(&self) {
        self.inner.drain.lock().expect("drain").take();
    }

    /// Stops accepting, then returns once every admitted request has ended and its caller has
    /// been given all of its events (every `DrainGuard` dropped). No polling: the drain channel
    /// closes.
    pub async fn drained(&self) {
        self.stop_accepting();
        let _ = self.drained.lock().await.recv().await;
    }

    /// Cancels everything still queued or running and stops the engine threads.
    pub fn shutdown(&self) {
        self.stop_accepting();
        self.inner.stopping.store(true, Ordering::SeqCst);
        for slot in self.inner.every() {
            let jobs = slot.queue.lock().expect("queue").drain();
            for job in jobs {
                finish_unrun(job, FinishReason::Cancelled, None);
            }
            if let Some(running) = slot.queue.lock().expect("queue").running_cancel() {
                running.cancel();
            }
            slot.wake.notify_all();
        }
        for t in self.threads.lock().expect("threads").drain(..) {
            let _ = t.join();
        }
    }
}

fn open_folder(slot: &ModelSlot) -> crate::Result<Arc<ModelFolder>> {
    let mut folder = slot.folder.lock().expect("folder");
    if let Some(f) = folder.as_ref() {
        return Ok(f.clone());
    }
    let opened = Arc::new(ModelFolder::open(&slot.config.path)?);
    *folder = Some(opened.clone());
    Ok(opened)
}

fn set_state(inner: &Inner, slot: &ModelSlot, state: ModelState, provider: Option<String>, error: Option<String>) {
    {
        let mut status = slot.status.lock().expect("status");
        status.state = state;
        if provider.is_none() {
            status.draft_provider = None;
        }
        status.provider = provider;
        status.error = error;
    }
    let _ = inner.states.send((slot.config.name.clone(), state));
}

fn finish_unrun(job: GenerateJob, reason: FinishReason, error: Option<SchedulerError>) {
    // The count is freed before the caller hears of the end, so that it may submit again at once.
    drop(job.permit);
    let _ = job.events.try_send(Event::Finished(Finished {
        reason,
        error,
        text: String::new(),
        token_ids: Vec::new(),
        stats: GenerationStats::default(),
    }));
}

fn engine_thread(inner: Arc<Inner>, slot: Arc<ModelSlot>) {
    let mut engine: Option<Engine> = None;
    loop {
        let work = {
            let mut queue = slot.queue.lock().expect("queue");
            loop {
                if inner.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(mut work) = queue.pop() {
                    // A job counts as running from here, under the lock it was taken with, its
                    // model's load included: shutdown waits for it and can cancel it.
                    if let queue::Work::Job(job) = &mut work {
                        job.seat = None;
                        queue.set_running(Some(job.cancel.clone()));
                        inner.counters.in_flight.fetch_add(1, Ordering::SeqCst);
                    }
                    break work;
                }
                if slot.retired.load(Ordering::SeqCst) {
                    // Removed or replaced by a reload, and nothing left to do: unload and end.
                    drop(queue);
                    if engine.take().is_some() {
                        tracing::info!(model = %slot.config.name, "model unloaded (removed from the config)");
                    }
                    return;
                }
                queue = slot.wake.wait(queue).expect("queue wait");
            }
        };
        match work {
            queue::Work::Control(Control::Load(reply)) => {
                let _ = reply.send(ensure_loaded(&inner, &slot, &mut engine).map(|_| ()));
            }
            queue::Work::Control(Control::Unload(reply)) => {
                if let Some(unloaded) = engine.take() {
                    drop(unloaded);
                    // ONNX Runtime frees the session's memory to malloc; hand it back to the
                    // system so that unloading shows in RSS (glibc keeps freed heap otherwise).
                    #[cfg(target_env = "gnu")]
                    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                    set_state(&inner, &slot, ModelState::Unloaded, None, None);
                    tracing::info!(model = %slot.config.name, "model unloaded");
                }
                let _ = reply.send(());
            }
            queue::Work::Job(job) => {
                let (id, events) = (job.id, job.events.clone());
                // A panic in the engine must not take the model's thread with it: later requests
                // would wait forever. Its request ends with an error, the engine (whose state is
                // unknown now) is dropped, and the model loads again on its next request.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(&inner, &slot, &mut engine, job)));
                if let Err(panic) = run {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".into());
                    tracing::error!(model = %slot.config.name, request = id, %message, "the engine panicked; the model loads again on its next request");
                    engine = None;
                    slot.busy.store(false, Ordering::SeqCst);
                    let error = format!("the engine panicked: {message}");
                    set_state(&inner, &slot, ModelState::Failed, None, Some(format!("{error} (it loads again on the next request)")));
                    let _ = events.try_send(Event::Finished(Finished {
                        reason: FinishReason::Error,
                        error: Some(SchedulerError::Request(Error::Inference(error))),
                        text: String::new(),
                        token_ids: Vec::new(),
                        stats: GenerationStats::default(),
                    }));
                }
            }
        }
    }
}

/// Bytes of RSS a load costs per byte of weights on disk: ONNX Runtime reading the file itself
/// (measured by the benchmark: 21.9 MiB for 13.5 MB of int4 weights) plus room for prepacking.
const LOAD_OVERHEAD: f64 = 2.0;

fn mem_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Refuses a load that would not fit in available memory, saying how much it needs.
fn check_memory(inner: &Inner, slot: &ModelSlot) -> Result<(), String> {
    let mut weights = 0u64;
    let mut dirs = vec![slot.config.path.clone()];
    if let Some(draft) = slot.config.draft.as_ref().and_then(|d| inner.active(d)) {
        dirs.push(draft.config.path.clone());
    }
    for dir in dirs {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".onnx.data") || entry.file_name().to_string_lossy().ends_with(".onnx") {
                weights += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    let need_mib = (weights as f64 * LOAD_OVERHEAD / (1024.0 * 1024.0)).ceil() as u64;
    if let Some(available) = mem_available_mib() {
        let reserve = inner.limits.read().expect("limits").memory_reserve_mib;
        if need_mib + reserve > available {
            return Err(format!(
                "not enough memory: loading needs about {need_mib} MiB and {reserve} MiB must stay free (`limits.memory_reserve_mib`), but only {available} MiB are available"
            ));
        }
    }
    Ok(())
}

fn ensure_loaded<'e>(inner: &Inner, slot: &ModelSlot, engine: &'e mut Option<Engine>) -> Result<&'e mut Engine, String> {
    if engine.is_none() {
        if let Err(message) = check_memory(inner, slot) {
            tracing::error!(model = %slot.config.name, error = %message, "model not loaded");
            set_state(inner, slot, ModelState::Failed, None, Some(message.clone()));
            return Err(message);
        }
        // Loading a large model may outlast a watchdog period: it does not count as a stall.
        let was_busy = slot.busy.swap(false, Ordering::SeqCst);
        let _restore = RestoreBusy(slot, was_busy, inner);
        set_state(inner, slot, ModelState::Loading, None, None);
        let loaded = open_folder(slot)
            .and_then(|folder| Engine::load_folder(&inner.runtime, &slot.config.name, folder, &slot.config.load))
            .and_then(|mut engine| {
                // The draft runs in this thread beside the target, on its own [[model]]'s
                // providers (which may differ from the target's).
                if let Some(draft) = slot.config.draft.as_ref().and_then(|d| inner.active(d)) {
                    let folder = open_folder(&draft)?;
                    let s = &slot.config.speculative;
                    let settings = crate::speculative::Settings {
                        min_tokens: s.min_tokens,
                        max_tokens: s.max_tokens,
                        min_confidence: s.min_confidence,
                    };
                    engine.attach_draft(&inner.runtime, &folder, &draft.config.load, settings)?;
                }
                if let Some(lookup) = slot.config.prompt_lookup {
                    engine.enable_prompt_lookup(lookup)?;
                }
                let overrides = &slot.config.multitoken;
                match engine.multitoken_settings() {
                    Some(defaults) => engine.set_multitoken_settings(crate::multitoken::Settings {
                        mode: overrides.mode.unwrap_or(defaults.mode),
                        threshold: overrides.threshold.unwrap_or(defaults.threshold),
                        max_tokens: overrides.max_tokens.unwrap_or(defaults.max_tokens),
                    })?,
                    None if overrides.is_set() => {
                        return Err(crate::error::Error::ModelConfig {
                            path: slot.config.path.join("genai_config.json"),
                            field: "multitoken_*".into(),
                            reason: format!(
                                "[[model]] `{}` sets multitoken keys, but its folder has no multitoken_config.json",
                                slot.config.name
                            ),
                        })
                    }
                    None => {}
                }
                Ok(engine)
            });
        match loaded {
            Ok(e) => {
                set_state(inner, slot, ModelState::Ready, Some(e.provider().provider.name().into()), None);
                slot.status.lock().expect("status").draft_provider = e.draft_provider().map(|p| p.provider.name().to_string());
                *engine = Some(e);
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(model = %slot.config.name, error = %message, "model failed to load");
                set_state(inner, slot, ModelState::Failed, None, Some(message.clone()));
                return Err(message);
            }
        }
    }
    Ok(engine.as_mut().expect("loaded above"))
}

struct RestoreBusy<'a>(&'a ModelSlot, bool, &'a Inner);

impl Drop for RestoreBusy<'_> {
    fn drop(&mut self) {
        beat(self.2, self.0);
        self.0.busy.store(self.1, Ordering::SeqCst);
    }
}

fn beat(inner: &Inner, slot: &ModelSlot) {
    slot.heartbeat.store(inner.started.elapsed().as_millis() as u64, Ordering::SeqCst);
}

fn run_job(inner: &Inner, slot: &ModelSlot, engine: &mut Option<Engine>, job: GenerateJob) {
    beat(inner, slot);
    slot.busy.store(true, Ordering::SeqCst);
    run_job_inner(inner, slot, engine, job);
    slot.busy.store(false, Ordering::SeqCst);
}

/// Ends a job's running state (set when it was taken from the queue) on every path out of
/// `run_job_inner`, early returns and panics included.
struct Running<'a>(&'a Inner, &'a ModelSlot);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.1.queue.lock().expect("queue").set_running(None);
    }
}

fn run_job_inner(inner: &Inner, slot: &ModelSlot, engine: &mut Option<Engine>, job: GenerateJob) {
    let running = Running(inner, slot);
    if job.cancel.is_cancelled() || job.events.is_closed() {
        return finish_unrun(job, FinishReason::Cancelled, None);
    }
    if job.options.deadline.is_some_and(|d| Instant::now() >= d) {
        return finish_unrun(job, FinishReason::Timeout, None);
    }
    let engine = match ensure_loaded(inner, slot, engine) {
        Ok(e) => e,
        Err(message) => {
            let error = SchedulerError::LoadFailed { model: slot.config.name.clone(), reason: message };
            return finish_unrun(job, FinishReason::Error, Some(error));
        }
    };
    fail::fail_point!("scheduler::generate", slot.config.name.contains("failpoint"), |_| ());
    let events = job.events.clone();
    // The heartbeat comes from the job's cancel token at every engine step (see `submit`).
    let mut on_text = |text: &str| events.blocking_send(Event::Text(text.to_string())).is_ok();
    let result = engine.generate(&Prompt::Tokens(job.prompt_ids.clone()), &job.options, &job.cancel, &mut on_text);
    drop(running);
    drop(job.permit);
    let finished = match result {
        Ok(outcome) => {
            inner.counters.generated_tokens.fetch_add(outcome.token_ids.len() as u64, Ordering::Relaxed);
            let mut status = slot.status.lock().expect("status");
            status.generated_tokens += outcome.token_ids.len() as u64;
            status.requests += 1;
            if let Some(spec) = outcome.stats.speculative {
                status.draft_tokens += spec.draft_tokens as u64;
                status.accepted_tokens += spec.accepted_tokens as u64;
            }
            Finished { reason: outcome.reason, error: None, text: outcome.text, token_ids: outcome.token_ids, stats: outcome.stats }
        }
        Err(e) => {
            // An ONNX Runtime failure ends this request only; the model keeps serving.
            tracing::warn!(model = %slot.config.name, request = job.id, error = %e, "request failed");
            Finished {
                reason: FinishReason::Error,
                error: Some(SchedulerError::Request(e)),
                text: String::new(),
                token_ids: Vec::new(),
                stats: GenerationStats::default(),
            }
        }
    };
    let _ = job.events.blocking_send(Event::Finished(finished));
}
