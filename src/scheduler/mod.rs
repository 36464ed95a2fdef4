//! Admission, queues and the engine threads: the scheduler's handle and the models' lifecycle
//! (start, reload, load and unload, preload, shutdown). Its parts each own their state:
//! `admission` the per-client and queue counts and the drain, `worker` each model's engine
//! thread and queue, `events` what a request's caller is told, `model_status` what a model is
//! doing, `error` why a request or a model operation failed.
//!
//! Each configured model has one engine thread that owns its ONNX Runtime session and runs one
//! request at a time. Requests wait in a per-model queue that takes clients in turn (one
//! client's burst cannot push another's request behind all of its own). Everything is bounded:
//! the queue by `max_queue` and `max_per_client`, each request's token stream by a channel.
//! Nothing here knows who a client is beyond an opaque id (the service passes the D-Bus unique
//! name).

mod admission;
mod error;
mod events;
mod kv_store;
mod model_status;
mod queue;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::{broadcast, oneshot};

pub use admission::DrainGuard;
pub use error::SchedulerError;
pub use events::{Event, EventSender, EventStream, Finished};
pub use kv_store::CacheKey;
pub use model_status::{ModelInfo, ModelState};

use crate::config::{Config, Limits, ModelConfig};
use crate::engine::{CancelToken, FinishReason, GenerateOptions, Prompt};
use crate::error::Error;
use crate::model::ModelFolder;
use crate::runtime::Runtime;
use admission::Admission;
use queue::FairQueue;
pub use queue::Priority;
pub use worker::trim_heap;
use worker::{engine_thread, finish_unrun, open_folder, Control, Counters, GenerateJob, Inner, ModelSlot};

/// A client, as the service names it (its D-Bus unique name).
pub type ClientId = String;
/// A request, unique for the daemon's lifetime.
pub type RequestId = u64;

pub struct Submitted {
    pub id: RequestId,
    pub events: EventStream,
    pub cancel: CancelToken,
    /// Held by whoever relays the events, until the caller has them all.
    pub drain: DrainGuard,
}

/// A request as it is submitted: who asks (the client's connection and, where known, its Unix
/// user), for what (model, prompt, options), how urgently, and under which key its KV is kept.
pub struct Submission<'a> {
    pub client: &'a str,
    pub user: Option<u32>,
    pub model: &'a str,
    pub prompt: &'a Prompt,
    pub options: GenerateOptions,
    pub priority: Priority,
    pub cache: CacheKey,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl Scheduler {
    /// Starts one engine thread per configured model. Models are not loaded yet: see `preload`.
    pub fn start(runtime: Arc<Runtime>, config: &Config) -> Scheduler {
        let (states, _) = broadcast::channel(64);
        let inner = Arc::new(Inner {
            started: Instant::now(),
            runtime,
            limits: std::sync::RwLock::new(config.limits.clone()),
            models: std::sync::RwLock::new(Vec::new()),
            all: Mutex::new(Vec::new()),
            // Ids unique for the daemon's lifetime, from a random offset so that they are not
            // guessable from one run to the next.
            next_id: AtomicU64::new((rand::random::<u32>() as u64) << 16),
            stopping: AtomicBool::new(false),
            counters: Counters { in_flight: AtomicU64::new(0), total: AtomicU64::new(0), generated_tokens: AtomicU64::new(0) },
            admission: Admission::new(),
            states,
            kv: kv_store::KvStore::default(),
        });
        let scheduler = Scheduler { inner, threads: Arc::new(Mutex::new(Vec::new())) };
        let sweeper = scheduler.inner.clone();
        let handle = std::thread::Builder::new()
            .name("kv-sweeper".into())
            .spawn(move || sweeper.kv.sweep_until_stopped(|| sweeper.limits.read().expect("limits").kv_cache_idle))
            .expect("spawn the kv sweeper");
        scheduler.threads.lock().expect("threads").push(handle);
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
                int4_kernel: None,
                draft: config.draft.clone(),
                error: None,
                generated_tokens: 0,
                requests: 0,
                draft_tokens: 0,
                accepted_tokens: 0,
                unloads_at: None,
                memory_mib: None,
                tokens_per_s: None,
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
        self.inner.kv.limits_changed();
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
        // Published before the old slots are retired: a submit that finds its slot retired
        // then finds the replacement on its next try, never the retired slot again.
        let replaced: Vec<Arc<ModelSlot>> = old.into_iter().filter(|slot| !next.iter().any(|n| Arc::ptr_eq(n, slot))).collect();
        *self.inner.models.write().expect("models") = next;
        if replaced.iter().any(|slot| slot.config.name.contains("halfway-reload")) {
            fail::fail_point!("scheduler::reload_halfway");
        }
        for slot in &replaced {
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
        // The tokenizer's ids, not the model's logits: Detokenize is the tokenizer's inverse.
        let bound = folder.tokenizer.id_bound();
        if let Some(&bad) = ids.iter().find(|&&id| id >= bound) {
            return Err(Error::InvalidArgument {
                argument: "ids".into(),
                reason: format!("token id {bad} is outside the vocabulary of the tokenizer (0..{bound})"),
            }
            .into());
        }
        Ok(folder.tokenizer.decode(ids)?)
    }

    /// Validates and queues a request. Tokenizing here means a prompt that is too long, or a
    /// chat request to a model without a template, is refused before it waits in any queue.
    pub fn submit(&self, client: &str, model: &str, prompt: &Prompt, options: GenerateOptions) -> Result<Submitted, SchedulerError> {
        self.submit_as(client, model, prompt, options, Priority::Interactive)
    }

    /// `submit` with a priority: interactive requests go ahead of background ones in the queue.
    pub fn submit_as(
        &self,
        client: &str,
        model: &str,
        prompt: &Prompt,
        options: GenerateOptions,
        priority: Priority,
    ) -> Result<Submitted, SchedulerError> {
        self.submit_keyed(&Submission { client, user: None, model, prompt, options, priority, cache: CacheKey::connection(client) })
    }

    /// `submit_as`, keeping the request's KV under `request.cache` (the client's connection, or
    /// one of its sessions) for the next request with that key, and reusing what it holds.
    pub fn submit_keyed(&self, request: &Submission<'_>) -> Result<Submitted, SchedulerError> {
        // A reload may retire the model's slot while the request is validated; it is then
        // validated again against the slot that replaced it (its folder may differ). Reloads come
        // from SIGHUP, so a few tries always suffice; past them the request is refused as Busy.
        for _ in 0..4 {
            match self.try_submit(request)? {
                Some(submitted) => return Ok(submitted),
                None => continue,
            }
        }
        Err(SchedulerError::Busy(format!("model `{}` was reloaded while the request was queued; try again", request.model)))
    }

    /// `submit` against the model's current slot; `None` when a reload retired that slot before
    /// the request could be queued on it (nothing is left counted then).
    fn try_submit(&self, request: &Submission<'_>) -> Result<Option<Submitted>, SchedulerError> {
        let Submission { client, user, model, prompt, priority, .. } = *request;
        let drain = self.inner.admission.guard()?;
        let slot = self.slot(model)?;
        let folder = self.folder(&slot)?;
        let prompt_ids = folder.prompt_ids(model, prompt)?;
        let limits = self.limits();
        let options = checked_options(request.options.clone(), model, &slot.config, &folder, &limits)?;
        let (permit, seat) = self.inner.admission.admit(client, user, &limits, drain.clone())?;
        let seat = Some(seat);
        // Where a submitting thread may be preempted between admission and the push (tests widen it).
        fail::fail_point!("scheduler::admitted", model.contains("failpoint"), |_| Err(SchedulerError::ShuttingDown));
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = events::event_stream();
        let cancel = self.cancel_with_heartbeat(&slot);
        let job = GenerateJob {
            id,
            permit,
            seat,
            prompt_ids,
            options,
            cancel: cancel.clone(),
            events: tx,
            queued_at: Instant::now(),
            priority,
            cache: request.cache.clone(),
        };
        {
            let mut queue = slot.queue.lock().expect("queue");
            if slot.retired.load(Ordering::SeqCst) {
                // Its engine thread may have ended already: a job pushed now would never run.
                // Dropping the job frees the client's count.
                return Ok(None);
            }
            queue.push(client, priority, job);
        }
        slot.wake.notify_one();
        self.inner.counters.total.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Submitted { id, events: rx, cancel, drain }))
    }

    /// A request's cancel token, whose progress is the watchdog's heartbeat of `slot`: at every
    /// engine step (not only when text is released).
    fn cancel_with_heartbeat(&self, slot: &Arc<ModelSlot>) -> CancelToken {
        let (heart, started) = (Arc::downgrade(slot), self.inner.started);
        CancelToken::with_progress(Arc::new(move || {
            if let Some(slot) = heart.upgrade() {
                slot.heartbeat.store(started.elapsed().as_millis() as u64, Ordering::SeqCst);
            }
        }))
    }

    /// Frees the KV kept under `key` (a session closed).
    pub fn forget_cache(&self, key: &CacheKey) {
        self.inner.kv.forget(key);
    }

    /// Bytes of KV kept between requests, and how many caches hold it.
    pub fn kv_cache_usage(&self) -> (usize, usize) {
        self.inner.kv.usage()
    }

    /// Cancels every request of a client that went away, queued or running, and frees the KV
    /// kept for it.
    pub fn cancel_client(&self, client: &str) {
        self.inner.kv.forget_owner(client);
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
        self.inner.admission.queued()
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
        self.inner.admission.close();
    }

    /// Stops accepting, then returns once every admitted request has ended and its caller has
    /// been given all of its events (every `DrainGuard` dropped). No polling: the drain channel
    /// closes.
    pub async fn drained(&self) {
        self.inner.admission.drained().await;
    }

    /// Cancels everything still queued or running and stops the engine threads.
    pub fn shutdown(&self) {
        self.stop_accepting();
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.kv.stop();
        for slot in self.inner.every() {
            let jobs = slot.queue.lock().expect("queue").drain();
            for job in jobs {
                finish_unrun(job, FinishReason::Cancelled, None);
            }
            for running in slot.queue.lock().expect("queue").running_cancels() {
                running.cancel();
            }
            slot.wake.notify_all();
        }
        for t in self.threads.lock().expect("threads").drain(..) {
            let _ = t.join();
        }
    }
}

/// `options` checked against the model and the limits, and completed: the output grammar
/// compiles, `max_new_tokens` within the limit (the limit if unset), drafting options the model
/// can honour, and a deadline (the request timeout if unset).
fn checked_options(
    mut options: GenerateOptions,
    model: &str,
    config: &ModelConfig,
    folder: &ModelFolder,
    limits: &Limits,
) -> Result<GenerateOptions, SchedulerError> {
    if let Some(grammar) = &options.grammar {
        // Compiled here too, so that a schema llguidance rejects is the caller's error.
        folder.output_matcher(grammar)?;
    }
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
    check_drafting_options(&options, model, config, folder)?;
    if options.deadline.is_none() {
        options.deadline = Some(Instant::now() + limits.request_timeout);
    }
    Ok(options)
}

/// Prompt lookup only for a model that has no drafter of its own; multi-token options only for a
/// multi-token model, within its contract.
fn check_drafting_options(
    options: &GenerateOptions,
    model: &str,
    config: &ModelConfig,
    folder: &ModelFolder,
) -> Result<(), SchedulerError> {
    if options.prompt_lookup == Some(true) && (folder.multitoken.is_some() || config.draft.is_some()) {
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
        None if multitoken_asked => Err(Error::InvalidArgument {
            argument: "multitoken_*".into(),
            reason: format!("model `{model}` is not a multi-token model (no multitoken_config.json)"),
        }
        .into()),
        Some(contract) => match options.multitoken_max_tokens.filter(|&n| n > contract.max_tokens_per_step) {
            Some(n) => Err(Error::InvalidArgument {
                argument: "multitoken_max_tokens".into(),
                reason: format!("{n} is over the model's max_tokens_per_step of {}", contract.max_tokens_per_step),
            }
            .into()),
            None => Ok(()),
        },
        None => Ok(()),
    }
}
