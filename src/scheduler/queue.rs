//! A model's queue: control work first (load, unload), then interactive requests, then background
//! ones; within a priority, clients take turns.

use std::collections::VecDeque;

use crate::engine::CancelToken;

pub enum Work<J, C> {
    Job(J),
    Control(C),
}

/// A request's place in the queue: the Language-portal design's `interactive` (a person waits
/// for it) or `background` (an indexer, a batch job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Interactive,
    Background,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "interactive" => Some(Priority::Interactive),
            "background" => Some(Priority::Background),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Background => "background",
        }
    }
}

/// Clients in the order they get their next turn, each with its waiting requests.
type Turns<J> = VecDeque<(String, VecDeque<J>)>;

pub struct FairQueue<J, C> {
    control: VecDeque<C>,
    interactive: Turns<J>,
    background: Turns<J>,
    /// The requests running, innermost last: interactive requests run inside a paused
    /// background one.
    running: Vec<CancelToken>,
    /// Interactive requests started by `pop` while background ones waited, since a background
    /// one last started.
    passed_background: usize,
}

impl<J, C> Default for FairQueue<J, C> {
    fn default() -> Self {
        FairQueue {
            control: VecDeque::new(),
            interactive: VecDeque::new(),
            background: VecDeque::new(),
            running: Vec::new(),
            passed_background: 0,
        }
    }
}

/// How many interactive requests may start ahead of a waiting background one before it gets its
/// turn: a background request keeps `min_share` of the engine once it runs (it pauses between
/// steps), so it gets the same share of the starts while it waits (0.1: every tenth start).
pub fn interactive_starts_per_background(min_share: f64) -> usize {
    ((1.0 / min_share.clamp(1e-3, 1.0)).ceil() as usize).saturating_sub(1)
}

fn push_turn<J>(turns: &mut Turns<J>, client: &str, job: J) {
    match turns.iter_mut().find(|(c, _)| c == client) {
        Some((_, jobs)) => jobs.push_back(job),
        None => turns.push_back((client.to_string(), VecDeque::from([job]))),
    }
}

fn pop_turn<J>(turns: &mut Turns<J>) -> Option<J> {
    let (client, mut jobs) = turns.pop_front()?;
    let job = jobs.pop_front().expect("clients in the queue have jobs");
    if !jobs.is_empty() {
        turns.push_back((client, jobs));
    }
    Some(job)
}

impl<J, C> FairQueue<J, C> {
    pub fn push(&mut self, client: &str, priority: Priority, job: J) {
        match priority {
            Priority::Interactive => push_turn(&mut self.interactive, client, job),
            Priority::Background => push_turn(&mut self.background, client, job),
        }
    }

    pub fn push_control(&mut self, control: C) {
        self.control.push_back(control);
    }

    /// The next work: a control item, else the first request of the interactive client whose
    /// turn it is, else of the background one; but after `interactive_starts_per_background(
    /// background_min_share)` interactive starts while background requests wait, a background
    /// one (without it, continuous interactive work kept background requests queued forever).
    pub fn pop(&mut self, background_min_share: f64) -> Option<Work<J, C>> {
        if let Some(c) = self.control.pop_front() {
            return Some(Work::Control(c));
        }
        let background_due = self.passed_background >= interactive_starts_per_background(background_min_share);
        if self.background.is_empty() || (!background_due && !self.interactive.is_empty()) {
            let job = pop_turn(&mut self.interactive)?;
            if !self.background.is_empty() {
                self.passed_background += 1;
            }
            return Some(Work::Job(job));
        }
        self.passed_background = 0;
        pop_turn(&mut self.background).map(Work::Job)
    }

    /// The next interactive request, for a running background request to pause for.
    pub fn pop_interactive(&mut self) -> Option<J> {
        pop_turn(&mut self.interactive)
    }

    pub fn has_interactive(&self) -> bool {
        !self.interactive.is_empty()
    }

    /// The requests waiting (the scheduler counts them daemon-wide itself, at admission).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.interactive.iter().chain(&self.background).map(|(_, j)| j.len()).sum()
    }

    pub fn remove_client(&mut self, client: &str) -> Vec<J> {
        let mut removed = Vec::new();
        for turns in [&mut self.interactive, &mut self.background] {
            turns.retain_mut(|(c, jobs)| {
                if c == client {
                    removed.extend(jobs.drain(..));
                    false
                } else {
                    true
                }
            });
        }
        removed
    }

    pub fn drain(&mut self) -> Vec<J> {
        let mut all: Vec<J> = self.interactive.drain(..).flat_map(|(_, jobs)| jobs).collect();
        all.extend(self.background.drain(..).flat_map(|(_, jobs)| jobs));
        all
    }

    pub fn push_running(&mut self, cancel: CancelToken) {
        self.running.push(cancel);
    }

    /// The innermost running request ended.
    pub fn pop_running(&mut self) {
        self.running.pop();
    }

    pub fn running_cancels(&self) -> Vec<CancelToken> {
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
            q.push("a", Priority::Interactive, J("a", i));
        }
        q.push("b", Priority::Interactive, J("b", 0));
        q.push("c", Priority::Interactive, J("c", 0));
        let order: Vec<String> = std::iter::from_fn(|| match q.pop(0.1) {
            Some(Work::Job(j)) => Some(format!("{}{}", j.0, j.1)),
            _ => None,
        })
        .collect();
        assert_eq!(order, ["a0", "b0", "c0", "a1", "a2", "a3"]);
    }

    #[test]
    fn control_goes_first_and_clients_can_be_removed() {
        let mut q: FairQueue<J, u8> = FairQueue::default();
        q.push("a", Priority::Interactive, J("a", 0));
        q.push("b", Priority::Interactive, J("b", 0));
        q.push_control(7);
        assert!(matches!(q.pop(0.1), Some(Work::Control(7))));
        assert_eq!(q.remove_client("a").len(), 1);
        assert_eq!(q.len(), 1);
        assert!(matches!(q.pop(0.1), Some(Work::Job(J("b", 0)))));
        assert!(q.pop(0.1).is_none());
    }

    #[test]
    fn interactive_requests_go_ahead_of_background_ones() {
        let mut q: FairQueue<J, ()> = FairQueue::default();
        q.push("indexer", Priority::Background, J("indexer", 0));
        q.push("indexer", Priority::Background, J("indexer", 1));
        q.push("chat", Priority::Interactive, J("chat", 0));
        q.push("other", Priority::Background, J("other", 0));
        q.push("chat", Priority::Interactive, J("chat", 1));
        let order: Vec<String> = std::iter::from_fn(|| match q.pop(0.1) {
            Some(Work::Job(j)) => Some(format!("{}{}", j.0, j.1)),
            _ => None,
        })
        .collect();
        assert_eq!(order, ["chat0", "chat1", "indexer0", "other0", "indexer1"]);
    }

    #[test]
    fn waiting_background_requests_get_their_share_of_the_starts() {
        let mut q: FairQueue<J, ()> = FairQueue::default();
        q.push("indexer", Priority::Background, J("indexer", 0));
        q.push("indexer", Priority::Background, J("indexer", 1));
        // Interactive work that never lets up: a new request for every one that starts.
        let mut started = Vec::new();
        for i in 0..30 {
            q.push("chat", Priority::Interactive, J("chat", i));
            match q.pop(0.25) {
                Some(Work::Job(j)) => started.push(j.0),
                _ => unreachable!(),
            }
        }
        let background: Vec<usize> = started.iter().enumerate().filter(|(_, c)| **c == "indexer").map(|(i, _)| i).collect();
        // A share of 0.25: three interactive starts, then a background one.
        assert_eq!(background, [3, 7], "{started:?}");
        assert_eq!(interactive_starts_per_background(0.1), 9);
        assert_eq!(interactive_starts_per_background(1.0), 0);
    }
}
