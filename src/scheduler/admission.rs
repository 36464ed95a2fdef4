//! Admission: whether a request may wait for an engine now. It owns the per-client counts, the
//! daemon-wide count of waiting requests and the drain channel of shutdown; what it hands out
//! gives its share back when dropped, on every path (run, refused after admission, cancelled,
//! dropped by a panicking engine thread).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::error::SchedulerError;
use super::ClientId;
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
    counts: Arc<Mutex<Counts>>,
    client: ClientId,
    user: Option<u32>,
    _drain: DrainGuard,
}

/// Admitted requests by connection and by Unix user.
#[derive(Default)]
struct Counts {
    clients: HashMap<ClientId, usize>,
    users: HashMap<u32, usize>,
}

fn give_back<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(key);
        }
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        give_back(&mut counts.clients, &self.client);
        if let Some(user) = self.user {
            give_back(&mut counts.users, &user);
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
    counts: Arc<Mutex<Counts>>,
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
            counts: Arc::new(Mutex::new(Counts::default())),
            waiting: Arc::new(AtomicUsize::new(0)),
            drain: Mutex::new(Some(drain)),
            drained: tokio::sync::Mutex::new(drained),
        }
    }

    /// A request's drain guard, while the daemon takes requests.
    pub(super) fn guard(&self) -> Result<DrainGuard, SchedulerError> {
        self.drain.lock().expect("drain").clone().map(DrainGuard).ok_or(SchedulerError::ShuttingDown)
    }

    /// Counts a request of `client` (run by Unix user `user`, where the bus told) against
    /// `limits.max_queue`, `limits.max_per_client` and `limits.max_per_user`, checked and
    /// counted under one lock. Per user too: one user with many connections must not fill the
    /// queue that every other user shares.
    pub(super) fn admit(
        &self,
        client: &str,
        user: Option<u32>,
        limits: &Limits,
        drain: DrainGuard,
    ) -> Result<(ClientPermit, QueueSeat), SchedulerError> {
        {
            let mut counts = self.counts.lock().expect("counts");
            let queued = self.waiting.load(Ordering::SeqCst);
            if queued >= limits.max_queue {
                return Err(SchedulerError::Busy(format!(
                    "the queue is full ({queued} requests waiting, `limits.max_queue`); try again later"
                )));
            }
            let mine = counts.clients.get(client).copied().unwrap_or(0);
            if mine >= limits.max_per_client {
                return Err(SchedulerError::Busy(format!(
                    "this client already has {mine} requests in flight or waiting (`limits.max_per_client`)"
                )));
            }
            if let Some(user) = user {
                let users = counts.users.get(&user).copied().unwrap_or(0);
                if users >= limits.max_per_user {
                    return Err(SchedulerError::Busy(format!(
                        "user {user} already has {users} requests in flight or waiting over all its connections (`limits.max_per_user`)"
                    )));
                }
                *counts.users.entry(user).or_insert(0) += 1;
            }
            *counts.clients.entry(client.to_string()).or_insert(0) += 1;
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        // All counted under the lock above; from here on, dropping these gives them back.
        let permit = ClientPermit { counts: self.counts.clone(), client: client.to_string(), user, _drain: drain };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_user_cannot_fill_the_queue_over_many_connections() {
        let admission = Admission::new();
        let limits = Limits { max_queue: 64, max_per_client: 8, max_per_user: 16, ..Limits::default() };
        let mut held = Vec::new();
        // Nine connections of user 1000, eight requests each: the 17th is refused.
        let mut refused = None;
        'clients: for c in 0..9 {
            for _ in 0..8 {
                match admission.admit(&format!(":1.{c}"), Some(1000), &limits, admission.guard().unwrap()) {
                    Ok(permit) => held.push(permit),
                    Err(e) => {
                        refused = Some(e.to_string());
                        break 'clients;
                    }
                }
            }
        }
        assert_eq!(held.len(), 16);
        let refused = refused.expect("a refusal");
        assert!(refused.contains("max_per_user") && refused.contains("1000"), "{refused}");
        // Another user, and a connection whose user the bus did not tell, still get in.
        assert!(admission.admit(":1.99", Some(1001), &limits, admission.guard().unwrap()).is_ok());
        assert!(admission.admit(":1.98", None, &limits, admission.guard().unwrap()).is_ok());
        // What ends gives its place back.
        held.pop();
        assert!(admission.admit(":1.97", Some(1000), &limits, admission.guard().unwrap()).is_ok());
    }
}
