//! The per-model workers: one engine thread per configured model, which owns its engine, takes
//! jobs and controls from its slot's queue, loads the model on first use, runs one request at a
//! time, and survives a panic of the engine. The state that the workers and the scheduler's
//! handle share (`Inner`, `ModelSlot`) is defined here, below the handle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::{broadcast, oneshot};

use super::admission::{Admission, ClientPermit, QueueSeat};
use super::error::SchedulerError;
use super::events::{EventSender, Finished};
use super::model_status::{ModelInfo, ModelState};
use super::queue::{self, FairQueue};
use super::RequestId;
use crate::config::{Limits, ModelConfig};
use crate::engine::{CancelToken, Engine, FinishReason, GenerateOptions, GenerationStats, Prompt};
use crate::error::Error;
use crate::model::ModelFolder;
use crate::runtime::Runtime;

pub(super) struct GenerateJob {
    pub(super) id: RequestId,
    pub(super) permit: ClientPermit,
    pub(super) seat: Option<QueueSeat>,
    pub(super) prompt_ids: Vec<u32>,
    pub(super) options: GenerateOptions,
    pub(super) cancel: CancelToken,
    pub(super) events: EventSender,
    pub(super) queued_at: Instant,
    pub(super) priority: super::queue::Priority,
    /// Where its KV is kept for the next request (and what it reuses).
    pub(super) cache: super::kv_store::CacheKey,
}

pub(super) enum Control {
    Load(oneshot::Sender<Result<(), String>>),
    Unload(oneshot::Sender<()>),
}

pub(super) struct ModelSlot {
    /// Removed from the config: take no new work, exit when the queue is empty.
    pub(super) retired: AtomicBool,
    /// Milliseconds since the scheduler started, when the engine thread last showed progress;
    /// `busy` while it runs a request. The watchdog pings only while every busy thread moves.
    pub(super) heartbeat: AtomicU64,
    pub(super) busy: AtomicBool,
    pub(super) config: ModelConfig,
    pub(super) folder: Mutex<Option<Arc<ModelFolder>>>,
    pub(super) status: Mutex<ModelInfo>,
    pub(super) queue: Mutex<FairQueue<GenerateJob, Control>>,
    pub(super) wake: Condvar,
}

pub(super) struct Counters {
    pub(super) in_flight: AtomicU64,
    pub(super) total: AtomicU64,
    pub(super) generated_tokens: AtomicU64,
}

pub(super) struct Inner {
    pub(super) started: Instant,
    pub(super) runtime: Arc<Runtime>,
    pub(super) limits: std::sync::RwLock<Limits>,
    /// The configured models, in config order. A model removed by a reload leaves this list at
    /// once; its thread finishes what it was given and then exits.
    pub(super) models: std::sync::RwLock<Vec<Arc<ModelSlot>>>,
    /// Every slot with a thread, removed ones included (for counts and shutdown).
    pub(super) all: Mutex<Vec<Arc<ModelSlot>>>,
    pub(super) next_id: AtomicU64,
    pub(super) stopping: AtomicBool,
    pub(super) counters: Counters,
    pub(super) admission: Admission,
    pub(super) states: broadcast::Sender<(String, ModelState)>,
    /// KV kept between requests, for all models.
    pub(super) kv: super::kv_store::KvStore,
}

impl Inner {
    pub(super) fn active(&self, name: &str) -> Option<Arc<ModelSlot>> {
        self.models.read().expect("models").iter().find(|s| s.config.name == name).cloned()
    }

    pub(super) fn every(&self) -> Vec<Arc<ModelSlot>> {
        self.all.lock().expect("all").clone()
    }
}

pub(super) fn open_folder(slot: &ModelSlot) -> crate::Result<Arc<ModelFolder>> {
    let mut folder = slot.folder.lock().expect("folder");
    if let Some(f) = folder.as_ref() {
        return Ok(f.clone());
    }
    let opened = Arc::new(ModelFolder::open(&slot.config.path)?);
    *folder = Some(opened.clone());
    Ok(opened)
}

pub(super) fn set_state(inner: &Inner, slot: &ModelSlot, state: ModelState, provider: Option<String>, error: Option<String>) {
    {
        let mut status = slot.status.lock().expect("status");
        status.state = state;
        if provider.is_none() {
            status.draft_provider = None;
            status.int4_kernel = None;
        }
        status.provider = provider;
        status.error = error;
    }
    let _ = inner.states.send((slot.config.name.clone(), state));
}

pub(super) fn finish_unrun(job: GenerateJob, reason: FinishReason, error: Option<SchedulerError>) {
    // The count is freed before the caller hears of the end, so that it may submit again at once.
    drop(job.permit);
    job.events.finish(Finished { reason, error, text: String::new(), token_ids: Vec::new(), stats: GenerationStats::default() });
}

/// ONNX Runtime frees a session's memory to malloc; this hands it back to the system so that
/// unloading shows in RSS (glibc keeps freed heap otherwise). Also run every 30 s by the daemon:
/// under load, glibc's arenas kept growing while the bytes in use stayed flat (the soak).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops the engine and gives its memory back to the system.
fn unload(inner: &Inner, slot: &ModelSlot, engine: &mut Option<Engine>, why: &str) {
    if let Some(unloaded) = engine.take() {
        drop(unloaded);
        let caches = inner.kv.forget_model(&slot.config.name);
        if caches > 0 {
            tracing::debug!(model = %slot.config.name, caches, "kept KV of the unloaded model freed");
        }
        trim_heap();
        {
            let mut status = slot.status.lock().expect("status");
            status.unloads_at = None;
            status.memory_mib = None;
        }
        set_state(inner, slot, ModelState::Unloaded, None, None);
        tracing::info!(model = %slot.config.name, "model unloaded ({why})");
    }
}

pub(super) fn engine_thread(inner: Arc<Inner>, slot: Arc<ModelSlot>) {
    let mut engine: Option<Engine> = None;
    loop {
        // An idle loaded model with a keep-alive unloads when it runs out; `ListModels` shows when.
        let mut unloads_at = engine.as_ref().and(slot.config.keep_alive).map(|keep| Instant::now() + keep);
        slot.status.lock().expect("status").unloads_at = unloads_at;
        let work = {
            let mut queue = slot.queue.lock().expect("queue");
            loop {
                if inner.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let background_min_share = inner.limits.read().expect("limits").background_min_share;
                if let Some(mut work) = queue.pop(background_min_share) {
                    if unloads_at.is_some() {
                        slot.status.lock().expect("status").unloads_at = None;
                    }
                    // A job counts as running from here, under the lock it was taken with, its
                    // model's load included: shutdown waits for it and can cancel it.
                    if let queue::Work::Job(job) = &mut work {
                        job.seat = None;
                        queue.push_running(job.cancel.clone());
                        inner.counters.in_flight.fetch_add(1, Ordering::SeqCst);
                    }
                    break work;
                }
                if slot.retired.load(Ordering::SeqCst) {
                    // Removed or replaced by a reload, and nothing left to do: unload and end.
                    drop(queue);
                    if engine.take().is_some() {
                        inner.kv.forget_model(&slot.config.name);
                        trim_heap();
                        tracing::info!(model = %slot.config.name, "model unloaded (removed from the config)");
                    }
                    return;
                }
                match unloads_at {
                    Some(at) if Instant::now() >= at => {
                        drop(queue);
                        unload(&inner, &slot, &mut engine, "idle for its keep_alive_s");
                        unloads_at = None;
                        queue = slot.queue.lock().expect("queue");
                    }
                    Some(at) => queue = slot.wake.wait_timeout(queue, at - Instant::now()).expect("queue wait").0,
                    None => queue = slot.wake.wait(queue).expect("queue wait"),
                }
            }
        };
        match work {
            queue::Work::Control(Control::Load(reply)) => {
                let _ = reply.send(ensure_loaded(&inner, &slot, &mut engine).map(|_| ()));
            }
            queue::Work::Control(Control::Unload(reply)) => {
                unload(&inner, &slot, &mut engine, "UnloadModel");
                let _ = reply.send(());
            }
            queue::Work::Job(job) => run_job_surviving_panics(&inner, &slot, &mut engine, job),
        }
    }
}

/// `run_job`, surviving a panic of the engine. A panic must not take the model's thread with it:
/// later requests would wait forever. Its request ends with an error, the engine (whose state is
/// unknown now) is dropped, and the model loads again on its next request.
fn run_job_surviving_panics(inner: &Inner, slot: &ModelSlot, engine: &mut Option<Engine>, job: GenerateJob) {
    let (id, events) = (job.id, job.events.clone());
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(inner, slot, engine, job)));
    if let Err(panic) = run {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        tracing::error!(model = %slot.config.name, request = id, %message, "the engine panicked; the model loads again on its next request");
        *engine = None;
        slot.busy.store(false, Ordering::SeqCst);
        let error = format!("the engine panicked: {message}");
        set_state(inner, slot, ModelState::Failed, None, Some(format!("{error} (it loads again on the next request)")));
        events.finish(Finished {
            reason: FinishReason::Error,
            error: Some(SchedulerError::Request(Error::Inference(error))),
            text: String::new(),
            token_ids: Vec::new(),
            stats: GenerationStats::default(),
        });
    }
}

/// Bytes of RSS a load costs per byte of weights on disk: ONNX Runtime reading the file itself
/// (the benchmark measures it) plus room for prepacking.
pub(super) const LOAD_OVERHEAD: f64 = 2.0;

/// The daemon's resident memory, from /proc/self/status.
fn rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

pub(super) fn mem_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Refuses a load that would not fit in available memory, saying how much it needs.
pub(super) fn check_memory(inner: &Inner, slot: &ModelSlot) -> Result<(), String> {
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
    let reserve = inner.limits.read().expect("limits").memory_reserve_mib;
    if mem_available_mib().is_some_and(|available| need_mib + reserve > available) {
        // Kept KV never stands in the way: it goes first.
        let freed = inner.kv.clear();
        if freed > 0 {
            trim_heap();
            tracing::info!(freed_mib = freed / (1024 * 1024), "kept KV freed to make room for a model load");
        }
    }
    if let Some(available) = mem_available_mib() {
        if need_mib + reserve > available {
            return Err(format!(
                "not enough memory: loading needs about {need_mib} MiB and {reserve} MiB must stay free (`limits.memory_reserve_mib`), but only {available} MiB are available"
            ));
        }
    }
    Ok(())
}

pub(super) fn ensure_loaded<'e>(inner: &Inner, slot: &ModelSlot, engine: &'e mut Option<Engine>) -> Result<&'e mut Engine, String> {
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
        let rss_before = rss_mib();
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
                        cost_aware: s.cost_aware,
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
                        verify_by_cost: defaults.verify_by_cost && overrides.threshold.is_none(),
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
                let mut status = slot.status.lock().expect("status");
                status.draft_provider = e.draft_provider().map(|p| p.provider.name().to_string());
                status.int4_kernel = Some(e.provider().int4.to_string());
                // What the load added to the daemon's resident memory (another model loading at
                // the same time would add to it too: approximate where loads overlap).
                status.memory_mib = rss_mib().zip(rss_before).map(|(after, before)| after.saturating_sub(before));
                drop(status);
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

pub(super) struct RestoreBusy<'a>(&'a ModelSlot, bool, &'a Inner);

impl Drop for RestoreBusy<'_> {
    fn drop(&mut self) {
        beat(self.2, self.0);
        self.0.busy.store(self.1, Ordering::SeqCst);
    }
}

pub(super) fn beat(inner: &Inner, slot: &ModelSlot) {
    slot.heartbeat.store(inner.started.elapsed().as_millis() as u64, Ordering::SeqCst);
}

pub(super) fn run_job(inner: &Inner, slot: &ModelSlot, engine: &mut Option<Engine>, job: GenerateJob) {
    beat(inner, slot);
    slot.busy.store(true, Ordering::SeqCst);
    run_job_inner(inner, slot, engine, job);
    slot.busy.store(false, Ordering::SeqCst);
}

/// Ends a job's running state (set when it was taken from the queue) on every path out of
/// `run_job_inner`, early returns and panics included.
pub(super) struct Running<'a>(&'a Inner, &'a ModelSlot);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.1.queue.lock().expect("queue").pop_running();
    }
}

pub(super) fn run_job_inner(inner: &Inner, slot: &ModelSlot, engine: &mut Option<Engine>, job: GenerateJob) {
    let running = Running(inner, slot);
    if job.cancel.is_cancelled() || job.events.is_closed() {
        return finish_unrun(job, FinishReason::Cancelled, None);
    }
    let engine = match ensure_loaded(inner, slot, engine) {
        Ok(e) => e,
        Err(message) => {
            let error = SchedulerError::LoadFailed { model: slot.config.name.clone(), reason: message };
            return finish_unrun(job, FinishReason::Error, Some(error));
        }
    };
    run_loaded(inner, slot, engine, job, running);
}

/// A background request's share of the engine while interactive work pauses it: within one
/// stretch of waiting interactive work it keeps at least `min_share` of the time.
struct Share {
    min_share: f64,
    ran: std::time::Duration,
    paused: std::time::Duration,
    /// Over the whole request, for its stats.
    paused_total: std::time::Duration,
    last: Instant,
}

impl Share {
    fn new(min_share: f64) -> Share {
        let z = std::time::Duration::ZERO;
        Share { min_share, ran: z, paused: z, paused_total: z, last: Instant::now() }
    }
}

/// Between two steps of a running background request: runs the interactive requests waiting for
/// this model, one at a time on this thread, while the background request keeps its share (its
/// run, KV included, waits on the stack above).
fn pause_for_interactive(inner: &Inner, slot: &ModelSlot, engine: &Engine, share: &mut Share) {
    let now = Instant::now();
    share.ran += now - share.last;
    loop {
        let job = {
            let mut queue = slot.queue.lock().expect("queue");
            if !queue.has_interactive() {
                // The stretch ended: the next one counts afresh.
                share.ran = std::time::Duration::ZERO;
                share.paused = std::time::Duration::ZERO;
                break;
            }
            let total = (share.ran + share.paused).as_secs_f64();
            if share.ran.as_secs_f64() < share.min_share * total {
                break;
            }
            let mut job = queue.pop_interactive().expect("checked above");
            job.seat = None;
            queue.push_running(job.cancel.clone());
            inner.counters.in_flight.fetch_add(1, Ordering::SeqCst);
            job
        };
        let started = Instant::now();
        let events = job.events.clone();
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loaded(inner, slot, engine, job, Running(inner, slot))));
        if let Err(panic) = run {
            // This request ends with the error; the paused one, and the engine, go the way of
            // an engine panic (the engine thread's handler).
            events.finish(Finished {
                reason: FinishReason::Error,
                error: Some(SchedulerError::Request(Error::Inference("the engine panicked".into()))),
                text: String::new(),
                token_ids: Vec::new(),
                stats: GenerationStats::default(),
            });
            std::panic::resume_unwind(panic);
        }
        share.paused += started.elapsed();
        share.paused_total += started.elapsed();
    }
    share.last = Instant::now();
}

/// Runs `job` on a loaded engine; a background job pauses for interactive ones between steps.
fn run_loaded(inner: &Inner, slot: &ModelSlot, engine: &Engine, job: GenerateJob, running: Running<'_>) {
    let queued = job.queued_at.elapsed();
    if job.cancel.is_cancelled() || job.events.is_closed() {
        drop(running);
        return finish_unrun(job, FinishReason::Cancelled, None);
    }
    if job.options.deadline.is_some_and(|d| Instant::now() >= d) {
        drop(running);
        return finish_unrun(job, FinishReason::Timeout, None);
    }
    fail::fail_point!("scheduler::generate", slot.config.name.contains("failpoint"), |_| ());
    let events = job.events.clone();
    let background = job.priority == super::queue::Priority::Background;
    let mut share = Share::new(inner.limits.read().expect("limits").background_min_share);
    // The heartbeat comes from the job's cancel token at every engine step (see `submit`). Text
    // is released between engine steps: that is where a background request pauses.
    let mut on_text = |text: &str| {
        let sent = events.text(text);
        if background {
            pause_for_interactive(inner, slot, engine, &mut share);
        }
        sent
    };
    let kv_bytes = inner.limits.read().expect("limits").kv_cache_mib as usize * 1024 * 1024;
    let kept = if kv_bytes > 0 { inner.kv.take(&job.cache, &slot.config.name) } else { None };
    let result = engine.generate_cached(&Prompt::Tokens(job.prompt_ids.clone()), &job.options, &job.cancel, &mut on_text, kept);
    let paused = share.paused_total;
    drop(running);
    drop(job.permit);
    let finished = match result {
        Ok((mut outcome, left)) => {
            if let Some(left) = left.filter(|_| kv_bytes > 0) {
                inner.kv.put(job.cache.clone(), &slot.config.name, left, kv_bytes);
            }
            outcome.stats.queued = queued;
            outcome.stats.paused = paused;
            inner.counters.generated_tokens.fetch_add(outcome.token_ids.len() as u64, Ordering::Relaxed);
            let mut status = slot.status.lock().expect("status");
            status.generated_tokens += outcome.token_ids.len() as u64;
            status.requests += 1;
            status.tokens_per_s = Some(outcome.stats.decode_tokens_per_s);
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
    job.events.finish(finished);
}
