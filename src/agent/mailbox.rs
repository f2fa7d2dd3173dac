//! One agent's mailbox: a bounded queue of messages plus a stop request that jumps the queue.
//!
//! Why not a tokio `mpsc` channel and a `oneshot` for the stop: an idle agent should cost
//! little, and a bounded tokio channel allocates its cache-padded shared state and a first
//! block of slots up front (several hundred bytes each), where this is one small allocation
//! whose queue grows only while messages wait.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<T> {
    /// The queue holds its bound: the sender should answer "retry".
    Full(T),
    /// The agent has stopped taking messages.
    Closed(T),
}

/// What the agent's task takes next.
pub enum Next<M, S> {
    Stop(S),
    Message(M),
}

pub struct Mailbox<M, S> {
    state: Mutex<State<M, S>>,
    ready: Notify,
    bound: usize,
}

struct State<M, S> {
    queue: VecDeque<M>,
    stop: Option<S>,
    closed: bool,
}

impl<M, S> Mailbox<M, S> {
    pub fn new(bound: usize) -> Mailbox<M, S> {
        Mailbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                stop: None,
                closed: false,
            }),
            ready: Notify::new(),
            bound,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<M, S>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message, unless the queue is full or closed.
    pub fn push(&self, m: M) -> Result<(), Refused<M>> {
        let mut st = self.lock();
        if st.closed {
            return Err(Refused::Closed(m));
        }
        if st.queue.len() >= self.bound {
            return Err(Refused::Full(m));
        }
        st.queue.push_back(m);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Asks the agent to stop: served before anything queued. Refused (and handed back) once
    /// the mailbox is closed, or when a stop is already waiting.
    pub fn stop(&self, s: S) -> Result<(), S> {
        let mut st = self.lock();
        if st.closed || st.stop.is_some() {
            return Err(s);
        }
        st.stop = Some(s);
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for the next stop request or message. Only the agent's task calls it.
    pub async fn next(&self) -> Next<M, S> {
        loop {
            {
                let mut st = self.lock();
                if let Some(s) = st.stop.take() {
                    return Next::Stop(s);
                }
                if let Some(m) = st.queue.pop_front() {
                    if st.queue.is_empty() && st.queue.capacity() > 4 {
                        // A burst is over: give its memory back.
                        st.queue.shrink_to(4);
                    }
                    return Next::Message(m);
                }
            }
            // A notification sent while nobody waited is kept, so none is lost between the
            // look above and this wait.
            self.ready.notified().await;
        }
    }

    /// Closes the mailbox and returns what was still queued, for the task to answer.
    pub fn close(&self) -> VecDeque<M> {
        let mut st = self.lock();
        st.closed = true;
        st.stop = None;
        std::mem::take(&mut st.queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_jumps_the_queue_and_a_closed_mailbox_refuses() {
        let mb: Mailbox<u32, &str> = Mailbox::new(2);
        mb.push(1).unwrap();
        mb.push(2).unwrap();
        assert_eq!(mb.push(3), Err(Refused::Full(3)), "bounded");
        assert!(mb.stop("stop").is_ok());
        assert_eq!(mb.stop("again"), Err("again"), "one stop at a time");
        assert!(matches!(mb.next().await, Next::Stop("stop")));
        assert!(matches!(mb.next().await, Next::Message(1)));
        let rest = mb.close();
        assert_eq!(rest, VecDeque::from([2]));
        assert_eq!(mb.push(4), Err(Refused::Closed(4)));
        assert_eq!(mb.stop("late"), Err("late"));
    }

    #[tokio::test]
    async fn a_waiting_task_wakes_for_a_message() {
        let mb = std::sync::Arc::new(Mailbox::<u32, ()>::new(8));
        let waiter = tokio::spawn({
            let mb = mb.clone();
            async move {
                match mb.next().await {
                    Next::Message(m) => m,
                    Next::Stop(()) => 0,
                }
            }
        });
        tokio::task::yield_now().await;
        mb.push(7).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, 7);
    }
}
