//! The scheduler's defects from the review, each driven through the library API.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use edgellm::config::Config;
use edgellm::engine::{GenerateOptions, Prompt};
use edgellm::scheduler::{Event, Scheduler};

use crate::fixtures::{model_dir, runtime};

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
    let options = GenerateOptions { max_new_tokens: Some(1), temperature: Some(0.0), ..Default::default() };
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
        let finished = crate::daemon::rt().block_on(async {
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
