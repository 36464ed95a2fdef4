//! Admission: whether a request may wait for an engine now. It owns the per-client counts, the
//! daemon-wide count of waiting requests and the drain channel of shutdown; what it hands out
//! gives its share back when dropped, on every path (run, refused after admission, cancelled,
//! dropped by a panicking engine thread).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::events::{ClientId, SchedulerError};
use crate::config::Limits;

/// Held by every admitted request, by its job and by its caller's `Submitted`: the drain at
/// shutdown completes when the last one drops (mini-redis's `shutdown_complete` channel). No
/// message is ever sent on it; the channel closing is the signal.
#[derive(Clone)]
pub struct DrainGuard(#[allow(dead_code)] mpsc::Sender<()>);

/// A client's admitted request, counted against `limits.max_per_client` until it is dropped:
/// whichever way the request ends (run, unrun, refused after admission, or dropped by a panicking
/// engine thread), the count is freed.
pub(super) struct ClientPermit {
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
pub(super) struct QueueSeat(Arc<AtomicUsize>);

impl Drop for QueueSeat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) struct Admission {
    per_client: Arc<Mutex<HashMap<ClientId, usize>>>,
    /// Requests admitted and not yet taken by an engine thread, daemon-wide (`limits.max_queue`).
    waiting: Arc<AtomicUsize>,
    /// What each request's `DrainGuard` is cloned from; taken away when shutdown begins, which
    /// is also what refuses new requests from then on.
    drain: Mutex<Option<mpsc::Sender<()>>>,
    /// Closes when shutdown has begun and every `DrainGuard` has dropped.
    drained: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

impl Admission {
    pub(super) fn new() -> Admission {
        let (drain, drained) = mpsc::channel(1);
        Admission {
            per_client: Arc::new(Mutex::new(HashMap::new())),
            waiting: Arc::new(AtomicUsize::new(0)),
            drain: Mutex::new(Some(drain)),
            drained: tokio::sync::Mutex::new(drained),
        }
    }

    /// A request's drain guard, while the daemon takes requests.
    pub(super) fn guard(&self) -> Result<DrainGuard, SchedulerError> {
        self.drain.lock().expect("drain").clone().map(DrainGuard).ok_or(SchedulerError::ShuttingDown)
    }

    /// Counts a request of `client` against `limits.max_queue` and `limits.max_per_client`,
    /// checked and counted under one lock.
    pub(super) fn admit(&self, client: &str, limits: &Limits, drain: DrainGuard) -> Result<(ClientPermit, QueueSeat), SchedulerError> {
        {
            let mut per_client = self.per_client.lock().expect("per_client");
            let queued = self.waiting.load(Ordering::SeqCst);
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
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        // Both counted under the lock above; from here on, dropping these gives them back.
        let permit = ClientPermit { counts: self.per_client.clone(), client: client.to_string(), _drain: drain };
        Ok((permit, QueueSeat(self.waiting.clone())))
    }

    /// Requests admitted and not yet taken by an engine thread.
    pub(super) fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// No new requests from now on.
    pub(super) fn close(&self) {
        self.drain.lock().expect("drain").take();
    }

    /// Closes, then returns once every `DrainGuard` has dropped.
    pub(super) async fn drained(&self) {
        self.close();
        let _ = self.drained.lock().await.recv().await;
    }
}
