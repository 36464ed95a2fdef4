//! What the scheduler tells the caller of one request: its events (text pieces, then its end)
//! and the stream that carries them from the engine thread.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake};

use super::error::SchedulerError;
use crate::engine::{FinishReason, GenerationStats};

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

/// One request's way from its engine thread to whoever relays its events: text pieces append to
/// one buffer, then the end is set. Writing never blocks the engine (a slow reader costs memory
/// for its text, not engine time) and wakes the reader only when the buffer turns non-empty, so
/// a reader that is behind gets every piece made meanwhile as one, for no wake-up per piece.
pub fn event_stream() -> (EventSender, EventStream) {
    let shared = Arc::new(Shared::default());
    (EventSender(Arc::new(SenderGuard(shared.clone()))), EventStream(shared))
}

#[derive(Default)]
struct Shared {
    state: Mutex<StreamState>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct StreamState {
    text: String,
    finished: Option<Finished>,
    /// The reader takes only the end (`Complete`): pieces are not kept, nor is it woken for them.
    end_only: bool,
    /// The reader waits for the end only (`EventStream::ended`): a piece does not wake it.
    end_awaited: bool,
    reader_gone: bool,
    writers_gone: bool,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, StreamState> {
        // A panic while the lock was held left a consistent buffer: text is only appended.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct SenderGuard(Arc<Shared>);

impl Drop for SenderGuard {
    fn drop(&mut self) {
        self.0.state().writers_gone = true;
        self.0.ready.notify_one();
    }
}

/// The engine's end of an `event_stream` (clones share it; the stream ends when all are gone).
#[derive(Clone)]
pub struct EventSender(Arc<SenderGuard>);

impl EventSender {
    /// Appends a piece of text; false once the reader is gone (the request may stop).
    pub fn text(&self, piece: &str) -> bool {
        let shared = &self.0 .0;
        let mut state = shared.state();
        if state.reader_gone {
            return false;
        }
        if state.end_only {
            return true;
        }
        let wake = state.text.is_empty() && !state.end_awaited;
        state.text.push_str(piece);
        drop(state);
        if wake {
            shared.ready.notify_one();
        }
        true
    }

    /// Sets the end; an end already set stays (the first one is the request's).
    pub fn finish(&self, finished: Finished) {
        let shared = &self.0 .0;
        let mut state = shared.state();
        if state.finished.is_none() {
            state.finished = Some(finished);
        }
        drop(state);
        shared.ready.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.0 .0.state().reader_gone
    }
}

/// The reader's end: text (every piece made since the last read, as one), then `Finished`.
pub struct EventStream(Arc<Shared>);

impl EventStream {
    /// The next event, waiting for it; `None` when the engine's side is gone without an end.
    pub async fn recv(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.take() {
                return event;
            }
            // A notification between `take` and here is kept as a permit: nothing is missed.
            self.0.ready.notified().await;
        }
    }

    /// `recv` for a thread outside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        block_on(self.recv())
    }

    /// Returns once the end is set or the engine's side is gone; text made meanwhile stays for
    /// `take_text`.
    pub async fn ended(&mut self) {
        loop {
            {
                let mut state = self.0.state();
                if state.finished.is_some() || state.writers_gone {
                    return;
                }
                state.end_awaited = true;
            }
            self.0.ready.notified().await;
        }
    }

    /// The next event if there is one now.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.take().flatten()
    }

    /// The text made since the last read, if any, leaving the end for `recv`.
    pub fn take_text(&mut self) -> Option<String> {
        let mut state = self.0.state();
        (!state.text.is_empty()).then(|| std::mem::take(&mut state.text))
    }

    /// From now on only the end is kept: pieces are dropped without waking this reader.
    pub fn end_only(&mut self) {
        let mut state = self.0.state();
        state.end_only = true;
        state.text.clear();
    }

    /// `Some(event)`, `Some(None)` for the end of the stream, `None` for nothing yet.
    fn take(&mut self) -> Option<Option<Event>> {
        let mut state = self.0.state();
        state.end_awaited = false;
        if !state.text.is_empty() {
            return Some(Some(Event::Text(std::mem::take(&mut state.text))));
        }
        if let Some(finished) = state.finished.take() {
            return Some(Some(Event::Finished(finished)));
        }
        state.writers_gone.then_some(None)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.0.state().reader_gone = true;
    }
}

/// Runs `future` on this thread, parking it between polls.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut future = std::pin::pin!(future);
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn end(text: &str) -> Finished {
        Finished { reason: FinishReason::Length, error: None, text: text.into(), token_ids: Vec::new(), stats: GenerationStats::default() }
    }

    #[test]
    fn pieces_made_while_the_reader_is_away_come_as_one_then_the_end() {
        let (sender, mut stream) = event_stream();
        assert!(stream.try_recv().is_none());
        for piece in ["In ", "the ", "beginning"] {
            assert!(sender.text(piece));
        }
        sender.finish(end("In the beginning"));
        sender.finish(end("a second end is not the request's"));
        assert!(matches!(stream.try_recv(), Some(Event::Text(t)) if t == "In the beginning"));
        assert!(matches!(stream.try_recv(), Some(Event::Finished(f)) if f.text == "In the beginning"));
        assert!(stream.try_recv().is_none(), "the end comes once");
        drop(sender);
        assert!(stream.blocking_recv().is_none(), "the stream ends with its senders");
    }

    #[test]
    fn end_only_keeps_no_text_and_a_gone_reader_stops_the_writer() {
        let (sender, mut stream) = event_stream();
        stream.end_only();
        assert!(sender.text("dropped"));
        sender.finish(end("whole"));
        assert!(matches!(stream.blocking_recv(), Some(Event::Finished(f)) if f.text == "whole"));
        drop(stream);
        assert!(sender.is_closed());
        assert!(!sender.text("nobody reads this"), "the request may stop");
    }

    #[test]
    fn ended_waits_for_the_end_not_for_text_and_the_text_stays() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let (sender, mut stream) = event_stream();
            let writer = sender.clone();
            let waiting = tokio::spawn(async move {
                stream.ended().await;
                stream
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.text("a piece");
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!waiting.is_finished(), "a piece does not end the wait");
            sender.finish(end("a piece"));
            let mut stream = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("the end ends the wait").unwrap();
            assert_eq!(stream.take_text().as_deref(), Some("a piece"));
            assert!(matches!(stream.recv().await, Some(Event::Finished(_))));
        });
    }
}
