//! Requests from this node to other nodes, answered on a subject that names the responder.
//!
//! async-nats's request/reply sends the reply to the requester's inbox, and nats-server lets a
//! responder publish there only with `allow_responses`, which grants the reply subject of any
//! message delivered to it, whoever chose that subject: a node could then publish as another
//! node by sending itself a message whose reply subject is one of the other node's subjects.
//! So nodes reply to each other only on subjects that name the responder: a request from K to
//! J carries the reply subject `internal.J.K.reply.<n>`, on which only J may publish and only K
//! may subscribe; K matches each reply to its request by `<n>` and by the responder. A request
//! to any member (`internal.K.any.leader`) is answered on `internal.any.K.reply.<n>`, which
//! any node may publish on: such an answer carries no authority (it names a leader to ask).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::bus::{Reply, RequestFailure};
use crate::limits;
use crate::subjects::Subjects;

/// Requests waiting for their replies.
struct Waiting {
    /// Who must answer: a node, or any member (`None`).
    from: Option<u64>,
    tx: oneshot::Sender<async_nats::Message>,
}

/// This node's requests to its peers.
pub struct Peers {
    client: async_nats::Client,
    subjects: Subjects,
    me: u64,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
    /// When each node this node asked last answered (one entry per peer asked).
    answered: Mutex<HashMap<u64, Instant>>,
}

/// Removes a request from the waiting table however its caller ends.
struct Forget<'a> {
    peers: &'a Peers,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.peers.table().remove(&self.id);
    }
}

impl Peers {
    /// Subscribes to this node's replies and routes them until `stopped` resolves.
    pub async fn start(
        client: async_nats::Client,
        subjects: Subjects,
        me: u64,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<(Arc<Peers>, tokio::task::JoinHandle<()>)> {
        let mut sub = client.subscribe(subjects.replies_to(me)).await?;
        let peers = Arc::new(Peers {
            client,
            subjects,
            me,
            // Not from 1: a late reply to a request of this node's previous process must not
            // match a request of this one.
            next: AtomicU64::new(rand::random::<u64>() >> 1),
            waiting: Mutex::new(HashMap::new()),
            answered: Mutex::new(HashMap::new()),
        });
        let router = peers.clone();
        let task = tokio::spawn(async move {
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    msg = sub.next() => match msg {
                        Some(msg) => router.route(msg),
                        None => break,
                    },
                }
            }
        });
        Ok((peers, task))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a reply to its request, if it is from the node that request asked.
    fn route(&self, msg: async_nats::Message) {
        let Some((from, me, id)) = self.subjects.parse_reply(&msg.subject) else {
            return;
        };
        if me != self.me {
            return;
        }
        if let Some(node) = from {
            // Only node `from` may publish on its reply subjects: even a reply that comes too
            // late for its request shows that `from` hears this node and answers.
            let mut answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            answered.insert(node, Instant::now());
        }
        let mut table = self.table();
        match table.get(&id) {
            Some(w) if w.from == from => {
                if let Some(w) = table.remove(&id) {
                    let _ = w.tx.send(msg); // the caller may have given up
                }
            }
            // Late, or not from the node asked: not an answer to anything.
            _ => {}
        }
    }

    /// When node `id` last answered a request of this node, if it ever did.
    pub fn answered(&self, id: u64) -> Option<Instant> {
        let answered = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        answered.get(&id).copied()
    }

    /// Sends this node's own request (Raft, its own writes, forward batches, joins) on
    /// `subject` to node `to` (any member when `None`) and waits up to `timeout` for its reply.
    pub async fn request(
        &self,
        to: Option<u64>,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply, RequestFailure> {
        self.send(
            to,
            subject,
            headers,
            payload,
            timeout,
            limits::MAX_PEER_REQUESTS,
        )
        .await
    }

    /// Relays a client's command: like `request`, but only while `PEER_RESERVE` places stay
    /// free for the node's own requests, so that no client flood starves its heartbeats and
    /// votes.
    pub async fn relay(
        &self,
        to: u64,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Reply, RequestFailure> {
        let cap = limits::MAX_PEER_REQUESTS - limits::PEER_RESERVE;
        self.send(Some(to), subject, headers, payload, timeout, cap)
            .await
    }

    async fn send(
        &self,
        to: Option<u64>,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
        timeout: Duration,
        cap: usize,
    ) -> Result<Reply, RequestFailure> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut table = self.table();
            if table.len() >= cap {
                // Nothing sent: as safe to retry as an unreachable peer.
                return Err(RequestFailure::NoResponders);
            }
            table.insert(id, Waiting { from: to, tx });
        }
        let _forget = Forget { peers: self, id };
        // One deadline for sending and answering: a publish can wait while NATS reconnects.
        match tokio::time::timeout(
            timeout,
            self.exchange(to, id, subject, headers, payload, rx),
        )
        .await
        {
            Ok(out) => out,
            Err(_) => Err(RequestFailure::TimedOut),
        }
    }

    async fn exchange(
        &self,
        to: Option<u64>,
        id: u64,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
        rx: oneshot::Receiver<async_nats::Message>,
    ) -> Result<Reply, RequestFailure> {
        let reply = self.subjects.reply(to, self.me, id);
        let sent = match headers {
            Some(h) => {
                self.client
                    .publish_with_reply_and_headers(subject, reply, h, payload)
                    .await
            }
            None => {
                self.client
                    .publish_with_reply(subject, reply, payload)
                    .await
            }
        };
        if sent.is_err() {
            // Nothing left this node (the connection is closing).
            return Err(RequestFailure::NoResponders);
        }
        match rx.await {
            Ok(msg) if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) => {
                Err(RequestFailure::NoResponders)
            }
            Ok(msg) => Ok(Reply {
                headers: msg.headers,
                payload: msg.payload,
            }),
            Err(_) => Err(RequestFailure::Other("the reply router stopped".into())),
        }
    }
}
