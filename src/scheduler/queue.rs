//! A model's queue: control work first (load, unload), then requests taken from clients in turn.

use std::collections::VecDeque;

use crate::engine::CancelToken;

pub enum Work<J, C> {
    Job(J),
    Control(C),
}

pub struct FairQueue<J, C> {
    control: VecDeque<C>,
    /// Clients in the order they get their next turn, each with its waiting requests.
    clients: VecDeque<(String, VecDeque<J>)>,
    running: Option<CancelToken>,
}

impl<J, C> Default for FairQueue<J, C> {
    fn default() -> Self {
        FairQueue { control: VecDeque::new(), clients: VecDeque::new(), running: None }
    }
}

impl<J, C> FairQueue<J, C> {
    pub fn push(&mut self, client: &str, job: J) {
        match self.clients.iter_mut().find(|(c, _)| c == client) {
            Some((_, jobs)) => jobs.push_back(job),
            None => self.clients.push_back((client.to_string(), VecDeque::from([job]))),
        }
    }

    pub fn push_control(&mut self, control: C) {
        self.control.push_back(control);
    }

    /// The next work: a control item, else the first request of the client whose turn it is.
    pub fn pop(&mut self) -> Option<Work<J, C>> {
        if let Some(c) = self.control.pop_front() {
            return Some(Work::Control(c));
        }
        let (client, mut jobs) = self.clients.pop_front()?;
        let job = jobs.pop_front().expect("clients in the queue have jobs");
        if !jobs.is_empty() {
            self.clients.push_back((client, jobs));
        }
        Some(Work::Job(job))
    }

    /// The requests waiting (the scheduler counts them daemon-wide itself, at admission).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.clients.iter().map(|(_, j)| j.len()).sum()
    }

    pub fn remove_client(&mut self, client: &str) -> Vec<J> {
        let mut removed = Vec::new();
        self.clients.retain_mut(|(c, jobs)| {
            if c == client {
                removed.extend(jobs.drain(..));
                false
            } else {
                true
            }
        });
        removed
    }

    pub fn drain(&mut self) -> Vec<J> {
        self.clients.drain(..).flat_map(|(_, jobs)| jobs).collect()
    }

    pub fn set_running(&mut self, cancel: Option<CancelToken>) {
        self.running = cancel;
    }

    pub fn running_cancel(&self) -> Option<CancelToken> {
        self.running.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct J(&'static str, u32);

    #[test]
    fn clients_take_turns() {
        let mut q: FairQueue<J, ()> = FairQueue::default();
        for i in 0..4 {
            q.push("a", J("a", i));
        }
        q.push("b", J("b", 0));
        q.push("c", J("c", 0));
        let order: Vec<String> = std::iter::from_fn(|| match q.pop() {
            Some(Work::Job(j)) => Some(format!("{}{}", j.0, j.1)),
            _ => None,
        })
        .collect();
        assert_eq!(order, ["a0", "b0", "c0", "a1", "a2", "a3"]);
    }

    #[test]
    fn control_goes_first_and_clients_can_be_removed() {
        let mut q: FairQueue<J, u8> = FairQueue::default();
        q.push("a", J("a", 0));
        q.push("b", J("b", 0));
        q.push_control(7);
        assert!(matches!(q.pop(), Some(Work::Control(7))));
        assert_eq!(q.remove_client("a").len(), 1);
        assert_eq!(q.len(), 1);
        assert!(matches!(q.pop(), Some(Work::Job(J("b", 0)))));
        assert!(q.pop().is_none());
    }
}
