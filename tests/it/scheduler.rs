//! The scheduler's defects from the review, each driven through the library API.

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use edgellm::config::Config;
use edgellm::engine::{GenerateOptions, Prompt};
use edgellm::scheduler::{Event, Scheduler};

use crate::kit::fixtures::{model_dir, runtime};
use crate::kit::generate::{greedy, sampled};

fn config(dir: &std::path::Path, threads: u32) -> Config {
    let file = dir.join("edgellm.toml");
    let text =
        format!("[[model]]\nname = \"kjv\"\npath = \"{}\"\npreload = false\nthreads = {threads}\n", model_dir("kjv-target").display());
    Config::parse(&file, &text).unwrap_or_else(|e| panic!("{e}"))
}

/// A reload that replaces a model while a request for it is being validated (the slot looked up,
/// the prompt not yet queued) must not orphan the request: it runs on the replacement, and ends
/// with `Finished` as every request does. The replaced slot's engine thread exits at once when it
/// has nothing queued, which is what orphaned the job.
#[test]
fn a_reload_during_submit_orphans_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = Scheduler::start(runtime(), &config(dir.path(), 1));
    let options = greedy(1);
    for round in 0..8u32 {
        // Each reload changes the model, so that its slot is replaced and the next submit opens
        // the new slot's folder (milliseconds, in which the reload below lands).
        let start = Arc::new(Barrier::new(2));
        let reloader = {
            let (scheduler, start, next) = (scheduler.clone(), start.clone(), config(dir.path(), 1 + (round + 1) % 2));
            std::thread::spawn(move || {
                start.wait();
                scheduler.reload(&next);
            })
        };
        start.wait();
        let submitted = scheduler.submit("client", "kjv", &Prompt::Text("And God said".into()), options.clone());
        reloader.join().unwrap();
        let mut submitted = submitted.unwrap_or_else(|e| panic!("round {round}: {e}"));
        let finished = crate::kit::bus::rt().block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(event) = submitted.events.recv().await {
                    if let Event::Finished(f) = event {
                        return Some(f);
                    }
                }
                None
            })
            .await
        });
        match finished {
            Ok(Some(f)) => assert!(f.error.is_none(), "round {round}: {:?}", f.error),
            Ok(None) => panic!("round {round}: the request's events ended without Finished (an orphaned job)"),
            Err(_) => panic!("round {round}: no Finished within 30 s (an orphaned job)"),
        }
    }
    scheduler.shutdown();
}

/// A submit that comes while a reload is halfway (the slots swapped, the replaced one not yet
/// retired, held there by a failpoint) lands on the replacement and runs. The reload used to
/// retire the old slot before it published the new one: every retry of the submit then found the
/// retired slot again, and the request was refused as Busy (a CI run saw it in the test above).
#[test]
fn a_submit_while_a_reload_is_halfway_lands_on_the_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let named = |threads: u32| {
        let text = format!(
            "[[model]]\nname = \"kjv-halfway-reload\"\npath = \"{}\"\npreload = false\nthreads = {threads}\n",
            model_dir("kjv-target").display()
        );
        Config::parse(&dir.path().join("edgellm.toml"), &text).unwrap_or_else(|e| panic!("{e}"))
    };
    let scheduler = Scheduler::start(runtime(), &named(1));
    let scenario = fail::FailScenario::setup();
    let (halfway, reached) = std::sync::mpsc::channel::<()>();
    let (go_on, resume) = std::sync::mpsc::channel::<()>();
    let resume = std::sync::Mutex::new(resume);
    fail::cfg_callback("scheduler::reload_halfway", move || {
        halfway.send(()).ok();
        resume.lock().unwrap().recv_timeout(Duration::from_secs(30)).ok();
    })
    .unwrap();
    let reloader = {
        let (scheduler, next) = (scheduler.clone(), named(2));
        std::thread::spawn(move || scheduler.reload(&next))
    };
    reached.recv_timeout(Duration::from_secs(30)).expect("the reload reached its halfway point");
    let options = greedy(1);
    let submitted = scheduler.submit("client", "kjv-halfway-reload", &Prompt::Text("And God said".into()), options);
    go_on.send(()).unwrap();
    assert_eq!(reloader.join().unwrap(), vec!["kjv-halfway-reload changed".to_string()]);
    scenario.teardown();
    let finished = run_to_end(&mut submitted.unwrap_or_else(|e| panic!("submitted while the reload was halfway: {e}")));
    assert!(finished.error.is_none(), "{:?}", finished.error);
    assert_eq!(finished.token_ids.len(), 1);
    scheduler.shutdown();
}

/// A request whose model is still loading is running: counted in flight (the SIGTERM grace
/// period waits for it) and cancelled by `shutdown`. It used to be neither queued nor in flight
/// while the model loaded, so the grace period ended at once and shutdown could not cancel it.
#[test]
fn a_request_waiting_for_its_models_load_is_in_flight_and_shutdown_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = Scheduler::start(runtime(), &config(dir.path(), 1));
    let options = sampled(900, 1);
    let mut submitted = scheduler.submit("client", "kjv", &Prompt::Text("And God said".into()), options).unwrap();
    // The engine thread takes the job and loads the model (a few hundred milliseconds).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scheduler.models()[0].state != edgellm::scheduler::ModelState::Loading {
        assert!(std::time::Instant::now() < deadline, "the model never started loading");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!((scheduler.queued(), scheduler.in_flight()), (0, 1), "while its model loads, the request is in flight");
    scheduler.shutdown();
    let mut finished = None;
    while let Some(event) = submitted.events.blocking_recv() {
        if let Event::Finished(f) = event {
            finished = Some(f);
        }
    }
    let f = finished.expect("a Finished");
    assert_eq!(f.reason, edgellm::engine::FinishReason::Cancelled, "shutdown cancels it: {} tokens generated", f.token_ids.len());
    assert_eq!(scheduler.in_flight(), 0);
}

fn run_to_end(submitted: &mut edgellm::scheduler::Submitted) -> edgellm::scheduler::Finished {
    let mut finished = None;
    while let Some(event) = submitted.events.blocking_recv() {
        if let Event::Finished(f) = event {
            finished = Some(f);
        }
    }
    finished.expect("every request ends with Finished")
}

/// A panic in an engine thread (injected with fail-rs at the point where a request starts to
/// generate) ends that request with an error and leaves the model serving: it shows as failed in
/// the model list, loads again on the next request, and the client's count was freed (with
/// `max_per_client = 1` a leaked count would refuse the second request as Busy).
#[test]
fn a_panicking_engine_ends_its_request_with_an_error_and_the_model_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[limits]\nmax_per_client = 1\n\n[[model]]\nname = \"kjv-failpoint\"\npath = \"{}\"\npreload = false\n",
        model_dir("kjv-target").display()
    );
    let scheduler = Scheduler::start(runtime(), &Config::parse(&dir.path().join("edgellm.toml"), &text).unwrap());
    let scenario = fail::FailScenario::setup();
    fail::cfg("scheduler::generate", "1*panic(injected by the test)").unwrap();
    let options = greedy(4);
    let prompt = Prompt::Text("And God said".into());

    let first = run_to_end(&mut scheduler.submit("client", "kjv-failpoint", &prompt, options.clone()).unwrap());
    assert_eq!(first.reason, edgellm::engine::FinishReason::Error);
    let error = first.error.expect("the panicking request ends with an error").to_string();
    assert!(error.contains("panicked") && error.contains("injected by the test"), "{error}");
    let model = &scheduler.models()[0];
    assert_eq!(model.state, edgellm::scheduler::ModelState::Failed);
    assert!(model.error.as_deref().unwrap_or("").contains("panicked"), "{:?}", model.error);

    let second = run_to_end(&mut scheduler.submit("client", "kjv-failpoint", &prompt, options).expect("the client's count was freed"));
    assert!(second.error.is_none() && !second.token_ids.is_empty(), "{:?}", second.error);
    assert_eq!(scheduler.models()[0].state, edgellm::scheduler::ModelState::Ready);
    scenario.teardown();
    scheduler.shutdown();
}

/// Admission checks `limits.max_queue` and takes the place in one step: sixteen clients that
/// submit at the same instant get at most `max_queue` places in the queue plus the one request
/// its engine thread has taken; the others are Busy. The check used to be made under a lock and
/// the job pushed after it was released; a failpoint that sleeps between admission and the push
/// (a preempted thread) makes that window wide.
#[test]
fn concurrent_submits_never_overfill_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[limits]\nmax_queue = 2\n\n[[model]]\nname = \"kjv-failpoint\"\npath = \"{}\"\npreload = false\n",
        model_dir("kjv-target").display()
    );
    let scheduler = Scheduler::start(runtime(), &Config::parse(&dir.path().join("edgellm.toml"), &text).unwrap());
    let scenario = fail::FailScenario::setup();
    fail::cfg("scheduler::admitted", "sleep(20)").unwrap();
    let start = Arc::new(Barrier::new(16));
    let submitters: Vec<_> = (0..16)
        .map(|i| {
            let (scheduler, start) = (scheduler.clone(), start.clone());
            std::thread::spawn(move || {
                let options = greedy(2);
                start.wait();
                scheduler.submit(&format!("client-{i}"), "kjv-failpoint", &Prompt::Text("And God said unto Moses".into()), options)
            })
        })
        .collect();
    let results: Vec<_> = submitters.into_iter().map(|t| t.join().unwrap()).collect();
    scenario.teardown();
    let (mut accepted, mut busy) = (Vec::new(), 0);
    for r in results {
        match r {
            Ok(s) => accepted.push(s),
            Err(edgellm::scheduler::SchedulerError::Busy(_)) => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(accepted.len() <= 3, "{} accepted with max_queue = 2 (and one running)", accepted.len());
    assert_eq!(accepted.len() + busy, 16);
    for mut s in accepted {
        assert!(run_to_end(&mut s).error.is_none());
    }
    assert_eq!(scheduler.queued(), 0);
    scheduler.shutdown();
}

/// Validating a request (tokenizing up to `limits.max_prompt_bytes`, rendering a chat template,
/// opening a model folder) is blocking work: it runs off the async threads, so other callers are
/// answered meanwhile. The daemon's own service, on a runtime of two async threads as edgellmd's,
/// gets two requests whose validation a failpoint makes take 1.5 s; ListModels still answers at
/// once. When validation ran on the async threads, both were blocked and ListModels waited.
#[test]
fn slow_validation_does_not_hold_up_other_callers() {
    use edgellm::service::client::Daemon1Proxy;
    use edgellm::service::{AdminPolicy, Daemon, BUS_NAME, OBJECT_PATH};
    let bus = crate::kit::bus::PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let text = format!("[[model]]\nname = \"kjv-failpoint\"\npath = \"{}\"\npreload = false\n", model_dir("kjv-target").display());
    let scheduler = Scheduler::start(runtime(), &Config::parse(&dir.path().join("edgellm.toml"), &text).unwrap());
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _server = server_rt.block_on(async {
        let daemon =
            Daemon::new(scheduler.clone(), AdminPolicy { daemon_uid: 0, admin_gid: None }, false, edgellm::config::DEFAULT_TOKEN_INTERVAL);
        zbus::connection::Builder::address(bus.address.as_str())
            .unwrap()
            .serve_at(OBJECT_PATH, daemon)
            .unwrap()
            .name(BUS_NAME)
            .unwrap()
            .build()
            .await
            .unwrap()
    });
    let scenario = fail::FailScenario::setup();
    fail::cfg("scheduler::admitted", "sleep(1500)").unwrap();
    let waited = crate::kit::bus::rt().block_on(async {
        let client = zbus::connection::Builder::address(bus.address.as_str()).unwrap().build().await.unwrap();
        let proxy = Daemon1Proxy::new(&client).await.unwrap();
        let slow: Vec<_> = (0..2)
            .map(|_| {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    let options = HashMap::from([("max_new_tokens", zbus::zvariant::Value::U32(1))]);
                    proxy.complete("kjv-failpoint", "And God said", options).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let asked = std::time::Instant::now();
        let models = proxy.list_models().await.unwrap();
        let waited = asked.elapsed();
        assert_eq!(models.len(), 1);
        for call in slow {
            call.await.unwrap().unwrap();
        }
        waited
    });
    scenario.teardown();
    assert!(waited < Duration::from_millis(500), "ListModels waited {waited:?} behind two validations");
    scheduler.shutdown();
}

/// The watchdog's heartbeat counts engine steps, not released text: a request whose text is all
/// held back (here every token continues a possible stop string, so nothing is released until the
/// end) still shows progress. It used to beat only when text was sent, so such a request (or a
/// stretch of unfinished UTF-8) looked like a stalled engine.
#[test]
fn an_engine_holding_back_text_is_not_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = Scheduler::start(runtime(), &config(dir.path(), 1));
    let case = &crate::kit::fixtures::references().models["kjv-target"][0];
    // Loads the model (so that the run below is decoding only) and gives its greedy text.
    let plain = run_to_end(&mut scheduler.submit("client", "kjv", &Prompt::Text(case.prompt.clone()), greedy(800)).unwrap());

    // A stop string that the whole greedy output is a prefix of, and that never completes.
    let stop = format!("{}\u{1}", plain.text);
    let mut submitted =
        scheduler.submit("client", "kjv", &Prompt::Text(case.prompt.clone()), GenerateOptions { stop: vec![stop], ..greedy(800) }).unwrap();
    let stall = Duration::from_millis(60);
    let started = std::time::Instant::now();
    let (mut readings, mut stalled, mut texts) = (0, 0, 0);
    let finished = loop {
        match submitted.events.try_recv() {
            Some(Event::Finished(f)) => break f,
            Some(Event::Text(_)) => texts += 1,
            None => {
                readings += 1;
                stalled += !scheduler.engines_alive(stall) as usize;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let elapsed = started.elapsed();
    eprintln!(
        "{} tokens in {elapsed:?}; {texts} text events before the end; {stalled} of {readings} watchdog readings said stalled",
        finished.token_ids.len()
    );
    assert!(elapsed > stall * 2, "the run must outlast the stall period to tell anything: {elapsed:?}");
    assert!(finished.token_ids.len() > 8 && texts <= 1, "the text is held back: {texts} text events");
    assert_eq!(stalled, 0, "the watchdog saw a stall in {stalled} of {readings} readings");
    scheduler.shutdown();
}

/// Shutdown's drain, as mini-redis drains: `drained()` refuses new requests at once and returns
/// when every admitted request has ended and its caller has dropped what it was given (the
/// relay's guard), not before, and without polling.
#[test]
fn the_drain_waits_for_every_request_and_its_caller() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = Scheduler::start(runtime(), &config(dir.path(), 1));
    let options = greedy(64);
    let mut submitted = scheduler.submit("client", "kjv", &Prompt::Text("And God said".into()), options.clone()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let drain = {
        let scheduler = scheduler.clone();
        rt.spawn(async move { scheduler.drained().await })
    };
    // Let the drain start: from then on nothing new is admitted.
    std::thread::sleep(Duration::from_millis(50));
    let refused = scheduler.submit("other", "kjv", &Prompt::Text("And".into()), options).err().expect("refused while draining");
    assert!(matches!(refused, edgellm::scheduler::SchedulerError::ShuttingDown), "{refused:?}");
    let finished = run_to_end(&mut submitted);
    assert!(!finished.token_ids.is_empty());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!drain.is_finished(), "the request's caller still holds its events: the drain waits");
    drop(submitted);
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), drain).await })
        .expect("the drain completes once the caller lets go")
        .unwrap();
    scheduler.shutdown();
}

/// Interactive requests go ahead of background ones that were queued before them (and of the
/// one running); each reports how long it waited in the queue.
#[test]
fn interactive_requests_overtake_queued_background_ones() {
    use edgellm::scheduler::Priority;
    let dir = tempfile::tempdir().unwrap();
    let scheduler = Scheduler::start(runtime(), &config(dir.path(), 1));
    let long = sampled(400, 2);
    let short = greedy(8);
    let prompt = Prompt::Text("And God said".into());
    // One running and two waiting background requests, then an interactive one. The first is
    // running (its first token is out) before the others queue: queued together, the per-client
    // turns would put indexer2's request before indexer's second, as a clean-clone run once did.
    let mut running = scheduler.submit_as("indexer", "kjv", &prompt, long.clone(), Priority::Background).unwrap();
    let first = crate::kit::bus::rt().block_on(async { tokio::time::timeout(Duration::from_secs(60), running.events.recv()).await });
    assert!(matches!(first, Ok(Some(Event::Text(_)))), "the first background request runs");
    let mut jobs = vec![
        ("background running", running),
        ("background 1", scheduler.submit_as("indexer", "kjv", &prompt, long.clone(), Priority::Background).unwrap()),
        ("background 2", scheduler.submit_as("indexer2", "kjv", &prompt, long, Priority::Background).unwrap()),
    ];
    std::thread::sleep(Duration::from_millis(20));
    jobs.push(("interactive", scheduler.submit("chat", "kjv", &prompt, short).unwrap()));
    // Completion order is run order: one engine thread.
    let order = crate::kit::bus::rt().block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (name, mut submitted) in jobs {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(event) = submitted.events.recv().await {
                    if let Event::Finished(f) = event {
                        let _ = tx.send((name, f.stats.queued));
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut order = Vec::new();
        while let Some(done) = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("all finish") {
            order.push(done);
        }
        order
    });
    let names: Vec<&str> = order.iter().map(|(n, _)| *n).collect();
    // The running background request pauses for the interactive one, which ends first.
    assert_eq!(names, ["interactive", "background running", "background 1", "background 2"], "{order:?}");
    let queued: HashMap<&str, Duration> = order.into_iter().collect();
    assert!(queued["background 2"] > queued["interactive"], "{queued:?}");
    assert!(queued["interactive"] > Duration::ZERO, "{queued:?}");
    scheduler.shutdown();
}

/// What a request sent, with the time of each text piece.
struct Seen {
    text: String,
    pieces: Vec<std::time::Instant>,
    finished: edgellm::scheduler::Finished,
    at: std::time::Instant,
}

async fn collect(mut submitted: edgellm::scheduler::Submitted) -> Seen {
    let (mut text, mut pieces) = (String::new(), Vec::new());
    while let Some(event) = submitted.events.recv().await {
        match event {
            Event::Text(t) => {
                text.push_str(&t);
                pieces.push(std::time::Instant::now());
            }
            Event::Finished(finished) => return Seen { text, pieces, finished, at: std::time::Instant::now() },
        }
    }
    panic!("no Finished")
}

fn scheduler_with(dir: &std::path::Path, limits: &str) -> Scheduler {
    let text = format!("[limits]\n{limits}\n[[model]]\nname = \"kjv\"\npath = \"{}\"\nthreads = 1\n", model_dir("kjv-target").display());
    Scheduler::start(runtime(), &Config::parse(&dir.join("edgellm.toml"), &text).unwrap_or_else(|e| panic!("{e}")))
}

/// A running background request pauses between engine steps for an interactive one, which
/// finishes first; the background request then goes on with its KV, and its greedy output is
/// the one it gives alone.
#[test]
fn a_running_background_request_pauses_for_an_interactive_one() {
    use edgellm::scheduler::Priority;
    let dir = tempfile::tempdir().unwrap();
    let scheduler = scheduler_with(dir.path(), "");
    let prompt = Prompt::Text("And God said".into());
    let long = greedy(300);
    let short = greedy(8);
    let rt = crate::kit::bus::rt();
    let alone = rt.block_on(collect(scheduler.submit_as("indexer", "kjv", &prompt, long.clone(), Priority::Background).unwrap()));
    assert_eq!(alone.finished.stats.paused, Duration::ZERO);
    let (background, interactive) = rt.block_on(async {
        let mut submitted = scheduler.submit_as("indexer", "kjv", &prompt, long, Priority::Background).unwrap();
        // Running: its first text is out.
        let first = match submitted.events.recv().await.unwrap() {
            Event::Text(t) => t,
            Event::Finished(f) => panic!("ended at once: {:?}", f.reason),
        };
        let background = tokio::spawn(async move {
            let mut rest = collect(submitted).await;
            rest.text.insert_str(0, &first);
            rest
        });
        let interactive = collect(scheduler.submit("chat", "kjv", &prompt, short).unwrap()).await;
        (background.await.unwrap(), interactive)
    });
    assert!(interactive.at < background.at, "the interactive request waited for the background one to end");
    assert!(background.finished.stats.paused > Duration::ZERO, "{:?}", background.finished.stats);
    assert_eq!(background.text, alone.text, "paused and resumed, the background output is its own");
    assert_eq!(background.finished.token_ids, alone.finished.token_ids);
    scheduler.shutdown();
}

/// Under continuous interactive work, a paused background request still gets steps: at least
/// `background_min_share` of the time.
#[test]
fn background_work_keeps_its_share_under_continuous_interactive_work() {
    use edgellm::scheduler::Priority;
    let dir = tempfile::tempdir().unwrap();
    let scheduler = scheduler_with(dir.path(), "background_min_share = 0.3\nmax_per_client = 16\n");
    let prompt = Prompt::Text("And God said".into());
    let long = greedy(600);
    let short = greedy(24);
    let rt = crate::kit::bus::rt();
    let (background, interactive) = rt.block_on(async {
        let mut submitted = scheduler.submit_as("indexer", "kjv", &prompt, long, Priority::Background).unwrap();
        assert!(matches!(submitted.events.recv().await, Some(Event::Text(_))));
        let background = tokio::spawn(collect(submitted));
        // Twelve interactive requests at once: interactive work for the whole stretch.
        let waiting: Vec<_> = (0..12).map(|_| scheduler.submit("chat", "kjv", &prompt, short.clone()).unwrap()).collect();
        let mut done = Vec::new();
        for s in waiting {
            done.push(collect(s).await);
        }
        (background.await.unwrap(), done)
    });
    let first = interactive.iter().map(|s| s.pieces[0]).min().unwrap();
    let last = interactive.iter().map(|s| s.at).max().unwrap();
    let during = background.pieces.iter().filter(|&&t| t > first && t < last).count();
    eprintln!("background pieces during the interactive stretch: {during}; paused {:?}", background.finished.stats.paused);
    assert!(during > 0, "the background request got no step while interactive work went on");
    assert!(background.finished.stats.paused > Duration::ZERO);
    scheduler.shutdown();
}
