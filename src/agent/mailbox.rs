//! One agent's mailbox: a bounded queue of messages plus a stop request that jumps the queue,
//! and, while the agent is idle, the agent itself.
//!
//! Why not a tokio `mpsc` channel and a `oneshot` for the stop: an idle agent should cost
//! little, and a bounded tokio channel allocates its cache-padded shared state and a first
//! block of slots up front (several hundred bytes each), where this is one small allocation
//! whose queue grows only while messages wait.
//!
//! Parking: an agent with nothing to do and nothing running in the background needs no task.
//! Its task parks it here (`park`) and ends; the next message or stop hands it back
//! (`push`/`stop` return it) to whoever queued that, who runs a task for it again and says so
//! (`running`). Parking and waking take the same lock as queueing, so a message is never
//! queued for an agent that nobody will run.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::task::AbortHandle;

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

/// What became of an agent the task offered to park.
#[derive(Debug, PartialEq, Eq)]
pub enum Park<P> {
    /// Parked: the task ends; the next message or stop wakes the agent.
    Parked,
    /// Something arrived meanwhile: the task keeps the agent and goes on.
    Busy(P),
    /// The mailbox is closed (the agent is being killed): the task drops the agent and ends.
    Closed(P),
}

pub struct Mailbox<M, S, P> {
    state: Mutex<State<M, S, P>>,
    ready: Notify,
    bound: usize,
    /// What this instance did, for `get_agent_metrics`.
    pub stats: Stats,
}

/// An instance's figures since it started on this node: counted by its task, read by anyone.
#[derive(Debug, Default)]
pub struct Stats {
    /// Calls handled (answered, refused, failed or crashed).
    pub calls: AtomicU64,
    /// Calls that did not succeed.
    pub errors: AtomicU64,
    /// Time spent handling calls, in microseconds.
    pub busy_us: AtomicU64,
    /// The OS process an `exec` agent runs (its process group), 0 for none.
    pub pid: AtomicU32,
}

impl Stats {
    /// Counts one call that took `took`.
    pub fn call(&self, ok: bool, took: std::time::Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.busy_us.fetch_add(us, Ordering::Relaxed);
    }
}

struct State<M, S, P> {
    queue: VecDeque<M>,
    stop: Option<S>,
    closed: bool,
    /// The idle agent, while no task runs it.
    parked: Option<P>,
    /// The task running the agent, while one does.
    task: Option<AbortHandle>,
}

impl<M, S, P> Mailbox<M, S, P> {
    pub fn new(bound: usize) -> Mailbox<M, S, P> {
        Mailbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                stop: None,
                closed: false,
                parked: None,
                task: None,
            }),
            ready: Notify::new(),
            bound,
            stats: Stats::default(),
        }
    }

    /// Messages waiting.
    pub fn depth(&self) -> usize {
        self.lock().queue.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<M, S, P>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message, unless the queue is full or closed. Returns the parked agent, if it
    /// was parked: the caller must run a task for it.
    pub fn push(&self, m: M) -> Result<Option<P>, Refused<M>> {
        let mut st = self.lock();
        if st.closed {
            return Err(Refused::Closed(m));
        }
        if st.queue.len() >= self.bound {
            return Err(Refused::Full(m));
        }
        st.queue.push_back(m);
        let woken = st.parked.take();
        drop(st);
        self.ready.notify_one();
        Ok(woken)
    }

    /// Asks the agent to stop: served before anything queued. Refused (and handed back) once
    /// the mailbox is closed, or when a stop is already waiting. Returns the parked agent, if
    /// it was parked: the caller must run a task for it, which stops it.
    pub fn stop(&self, s: S) -> Result<Option<P>, S> {
        let mut st = self.lock();
        if st.closed || st.stop.is_some() {
            return Err(s);
        }
        st.stop = Some(s);
        let woken = st.parked.take();
        drop(st);
        self.ready.notify_one();
        Ok(woken)
    }

    /// Records the task that runs the agent, for `kill`. Ignored when that task has parked
    /// the agent already (it ended) or the mailbox is closed. Sound because one caller (the
    /// host's loop) wakes agents and records their tasks: nothing can wake the agent again
    /// between the wake and this call.
    pub fn running(&self, task: AbortHandle) {
        let mut st = self.lock();
        if st.parked.is_none() && !st.closed {
            st.task = Some(task);
        }
    }

    /// The next stop request or message, if one waits. Only the agent's task calls it.
    pub fn try_next(&self) -> Option<Next<M, S>> {
        let mut st = self.lock();
        if let Some(s) = st.stop.take() {
            return Some(Next::Stop(s));
        }
        let m = st.queue.pop_front()?;
        if st.queue.is_empty() && st.queue.capacity() > 4 {
            // A burst is over: give its memory back.
            st.queue.shrink_to(4);
        }
        Some(Next::Message(m))
    }

    /// Waits for the next stop request or message. Only the agent's task calls it.
    pub async fn next(&self) -> Next<M, S> {
        loop {
            if let Some(n) = self.try_next() {
                return n;
            }
            // A notification sent while nobody waited is kept, so none is lost between the
            // look above and this wait.
            self.ready.notified().await;
        }
    }

    /// Parks the idle agent, unless something waits for it or the mailbox is closed. Only the
    /// agent's task calls it; on `Parked` the task ends.
    pub fn park(&self, p: P) -> Park<P> {
        let mut st = self.lock();
        if st.closed {
            return Park::Closed(p);
        }
        if st.stop.is_some() || !st.queue.is_empty() {
            return Park::Busy(p);
        }
        st.parked = Some(p);
        // The task is about to end; its handle would keep its memory.
        let task = st.task.take();
        drop(st);
        drop(task);
        Park::Parked
    }

    /// Closes the mailbox and returns what was still queued, for the task to answer.
    pub fn close(&self) -> VecDeque<M> {
        let mut st = self.lock();
        st.closed = true;
        st.stop = None;
        std::mem::take(&mut st.queue)
    }

    /// Closes the mailbox and ends the agent at once: its task is aborted (which drops the
    /// agent at its next await), a parked agent is dropped, queued messages are dropped
    /// unanswered (their callers time out and retry).
    pub fn kill(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.stop = None;
        let queued = std::mem::take(&mut st.queue);
        let parked = st.parked.take();
        let task = st.task.take();
        drop(st);
        if let Some(t) = task {
            t.abort();
        }
        drop((parked, queued));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_jumps_the_queue_and_a_closed_mailbox_refuses() {
        let mb: Mailbox<u32, &str, ()> = Mailbox::new(2);
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
    async fn an_idle_agent_parks_and_the_next_message_or_stop_wakes_it() {
        let mb: Mailbox<u32, &str, &str> = Mailbox::new(4);
        mb.push(1).unwrap();
        assert_eq!(mb.park("agent"), Park::Busy("agent"), "a message waits");
        assert!(matches!(mb.try_next(), Some(Next::Message(1))));
        assert!(mb.try_next().is_none());
        assert_eq!(mb.park("agent"), Park::Parked);
        assert_eq!(
            mb.push(2),
            Ok(Some("agent")),
            "the message hands the agent back"
        );
        assert_eq!(mb.push(3), Ok(None), "it is awake now");
        assert!(matches!(mb.try_next(), Some(Next::Message(2))));
        assert!(matches!(mb.try_next(), Some(Next::Message(3))));
        assert_eq!(mb.park("agent"), Park::Parked);
        assert_eq!(mb.stop("stop"), Ok(Some("agent")), "a stop wakes it too");
        assert_eq!(mb.park("agent"), Park::Busy("agent"), "the stop waits");
        assert!(matches!(mb.try_next(), Some(Next::Stop("stop"))));
        mb.close();
        assert_eq!(mb.park("agent"), Park::Closed("agent"));
    }

    #[tokio::test]
    async fn kill_aborts_the_running_task_and_drops_a_parked_agent() {
        let agent = std::sync::Arc::new(());
        let mb: Mailbox<u32, (), std::sync::Arc<()>> = Mailbox::new(4);
        assert_eq!(mb.park(agent.clone()), Park::Parked);
        assert_eq!(std::sync::Arc::strong_count(&agent), 2);
        mb.kill();
        assert_eq!(
            std::sync::Arc::strong_count(&agent),
            1,
            "the parked agent is dropped"
        );
        assert!(matches!(mb.push(1), Err(Refused::Closed(1))));

        let mb: Mailbox<u32, (), ()> = Mailbox::new(4);
        let task = tokio::spawn(std::future::pending::<()>());
        mb.running(task.abort_handle());
        mb.kill();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the task ends");
        assert!(ended.unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn a_task_that_parked_before_it_was_recorded_is_not_kept() {
        let mb: Mailbox<u32, (), ()> = Mailbox::new(4);
        let task = tokio::spawn(async {});
        assert_eq!(mb.park(()), Park::Parked);
        mb.running(task.abort_handle());
        assert!(
            mb.lock().task.is_none(),
            "no handle of an ended task is held"
        );
    }

    #[tokio::test]
    async fn a_waiting_task_wakes_for_a_message() {
        let mb = std::sync::Arc::new(Mailbox::<u32, (), ()>::new(8));
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
