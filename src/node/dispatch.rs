//! Serving commands: decode, validate, run locally or on the leader, and reply in the
//! request's encoding. Every node answers `warden.<cluster>.cmd.*` in one queue group and its
//! own `warden.<cluster>.node.<id>.cmd.*`. A node that does not lead forwards the request,
//! unparsed, to the leader: writes in batches (`forward`), reads and membership changes one by
//! one to the leader's own subject. The leader validates everything, so bad input gets the
//! same clear error wherever it lands; a follower parses a request itself only when it cannot
//! reach a leader, to still tell bad input apart from an unavailable cluster.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;

use super::forward::{remaining, ForwardBatch, ForwardReplies, Forwarded, Request};
use super::Node;
use crate::bus::{self, RequestFailure};
use crate::command::{route_of, Command, Route};
use crate::limits;
use crate::protocol::{self, Encoding, Envelope, ErrorCode, WireError};
use crate::subjects::Subjects;

/// What the messages of a subscription are.
#[derive(Clone, Copy)]
pub enum Feed {
    /// Client commands, one per message.
    Commands,
    /// Batches of writes forwarded by followers.
    Forwarded,
}

/// Serves `sub` until `stopped` resolves.
pub async fn serve(
    node: Arc<Node>,
    mut sub: async_nats::Subscriber,
    feed: Feed,
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            msg = sub.next() => {
                let Some(msg) = msg else { break };
                match node.inflight.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let node = node.clone();
                        tasks.spawn(async move {
                            match feed {
                                Feed::Commands => handle(&node, msg).await,
                                Feed::Forwarded => handle_batch(&node, msg).await,
                            }
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        // A forwarded batch gets no answer: its sender times out ("unknown").
                        if let Feed::Commands = feed {
                            let err = WireError::new(
                                ErrorCode::Unavailable,
                                "the node is handling too many commands; retry with backoff",
                            );
                            let req = request_of(&msg);
                            let enc = Encoding::detect(req.content_type.as_deref(), &req.payload)
                                .unwrap_or(Encoding::Json);
                            send(&node, &msg, enc, encode(enc, Err(err))).await;
                        }
                    }
                }
            }
        }
    }
    // Take no new commands, give those in flight a moment to finish (a forwarded `leave` of
    // this very node is answered after the node has learned it left), then abandon the rest:
    // their clients time out, which they must treat as "unknown", as after a crash.
    let _ = sub.unsubscribe().await; // the connection may already be closing
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(limits::DRAIN_GRACE_MS), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

fn request_of(msg: &async_nats::Message) -> Request {
    let header = |name| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.to_string())
    };
    Request {
        command: Subjects::last_token(&msg.subject).to_string(),
        content_type: header(protocol::CONTENT_TYPE),
        hops: header(protocol::FORWARD_HOPS)
            .and_then(|h| h.parse().ok())
            .unwrap_or(0),
        payload: msg.payload.clone(),
    }
}

fn encode(enc: Encoding, result: Result<serde_json::Value, WireError>) -> Bytes {
    enc.encode(&Envelope::from_result(result)).into()
}

async fn send(node: &Node, msg: &async_nats::Message, enc: Encoding, mut body: Bytes) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let max = node.client.server_info().max_payload;
    if body.len() + 1024 > max {
        let err = WireError::new(
            ErrorCode::TooLarge,
            format!(
                "the reply is {} bytes, over NATS max_payload; narrow the query",
                body.len()
            ),
        );
        body = encode(enc, Err(err));
    }
    let mut headers = HeaderMap::new();
    headers.insert(protocol::CONTENT_TYPE, enc.content_type());
    if let Some(leader) = node.leader() {
        headers.insert(protocol::LEADER_HINT, leader.to_string().as_str());
    }
    if let Err(e) = node.client.publish_with_headers(reply, headers, body).await {
        tracing::debug!(error = %e, "could not send a reply");
    }
}

async fn handle(node: &Node, msg: async_nats::Message) {
    if msg.reply.is_none() {
        tracing::debug!(subject = %msg.subject, "ignoring a command sent without a reply subject");
        return;
    }
    let req = request_of(&msg);
    let (enc, body) = answer(node, req).await;
    send(node, &msg, enc, body).await;
}

/// Answers a batch of forwarded writes, each as if it had arrived here itself.
async fn handle_batch(node: &Node, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let batch: ForwardBatch = match rmp_serde::from_slice(&msg.payload) {
        Ok(b) => b,
        Err(e) => {
            // From an incompatible peer; it times out and reports "unknown".
            tracing::warn!(error = %e, "undecodable forward batch");
            return;
        }
    };
    let answers = batch
        .items
        .into_iter()
        .map(|req| async move { answer(node, req).await.1 });
    let items = futures::future::join_all(answers).await;
    match rmp_serde::to_vec_named(&ForwardReplies { v: batch.v, items }) {
        Ok(body) => {
            if let Err(e) = node.client.publish(reply, body.into()).await {
                tracing::debug!(error = %e, "could not answer a forward batch");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode forward replies"),
    }
}

/// Answers one request: the reply's encoding and its encoded envelope.
pub async fn answer(node: &Node, req: Request) -> (Encoding, Bytes) {
    // An unusable Content-Type still gets an answer, in JSON.
    let enc = match Encoding::detect(req.content_type.as_deref(), &req.payload) {
        Ok(enc) => enc,
        Err(e) => return (Encoding::Json, encode(Encoding::Json, Err(e))),
    };
    match process(node, &req, enc).await {
        Answer::Local(result) => (enc, encode(enc, result)),
        Answer::Forwarded(body) => (enc, body),
    }
}

enum Answer {
    Local(Result<serde_json::Value, WireError>),
    /// The leader's reply, already encoded in the request's encoding.
    Forwarded(Bytes),
}

fn parse(req: &Request, enc: Encoding) -> Result<Command, WireError> {
    Command::parse(&req.command, enc, &req.payload)
}

async fn process(node: &Node, req: &Request, enc: Encoding) -> Answer {
    if req.payload.len() > limits::MAX_REQUEST_BYTES {
        return Answer::Local(Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "request is {} bytes; the limit is {} bytes",
                req.payload.len(),
                limits::MAX_REQUEST_BYTES
            ),
        )));
    }
    if route_of(&req.command) == Some(Route::Local) {
        return Answer::Local(parse(req, enc).map(|_| node.health()));
    }
    let deadline = Instant::now() + Duration::from_millis(limits::FORWARD_TIMEOUT_MS);
    loop {
        if node.is_leader() {
            let cmd = match parse(req, enc) {
                Ok(cmd) => cmd,
                Err(e) => return Answer::Local(Err(e)),
            };
            if let Some(out) = node.execute_on_leader(cmd, req.payload.len()).await {
                return Answer::Local(out);
            }
        }
        match forward(node, req, deadline).await {
            Forward::Done(answer) => return answer,
            Forward::SelfIsLeader => continue,
            // Tell bad input apart from an unavailable cluster.
            Forward::Failed(err) => return Answer::Local(parse(req, enc).and(Err(err))),
        }
    }
}

enum Forward {
    Done(Answer),
    SelfIsLeader,
    /// Nothing reached a leader; nothing changed.
    Failed(WireError),
}

async fn forward(node: &Node, req: &Request, deadline: Instant) -> Forward {
    if req.hops >= limits::MAX_FORWARD_HOPS {
        return Forward::Failed(WireError::new(
            ErrorCode::Unavailable,
            "leadership is moving; retry shortly",
        ));
    }
    let unknown = || {
        Forward::Done(Answer::Local(Err(WireError::new(
            ErrorCode::Timeout,
            "the leader did not answer in time; the command may or may not have taken effect: \
             retry with the same request_id",
        ))))
    };
    loop {
        let leader = match wait_for_leader(node, deadline).await {
            Some(l) if l == node.cfg.id => return Forward::SelfIsLeader,
            Some(l) => l,
            None => {
                return Forward::Failed(WireError::new(
                    ErrorCode::Unavailable,
                    "no leader: the cluster has no quorum right now; nothing changed",
                ))
            }
        };
        let onward = Request {
            hops: req.hops + 1,
            ..req.clone()
        };
        let result = if route_of(&req.command) == Some(Route::Write) {
            node.forwarder
                .forward(leader, onward, remaining(deadline))
                .await
        } else {
            forward_one(node, leader, onward, deadline).await
        };
        match result {
            Forwarded::Reply(body) => return Forward::Done(Answer::Forwarded(body)),
            // The leader we knew is gone and nothing reached it: safe to look again.
            Forwarded::Unreachable if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(limits::LEADER_RETRY_MS)).await;
            }
            Forwarded::Unreachable => {
                return Forward::Failed(WireError::new(
                    ErrorCode::Unavailable,
                    "could not reach the leader; nothing changed",
                ))
            }
            Forwarded::NoAnswer => return unknown(),
        }
    }
}

/// Forwards one command to the leader's own command subject.
async fn forward_one(node: &Node, leader: u64, req: Request, deadline: Instant) -> Forwarded {
    let mut headers = HeaderMap::new();
    if let Some(ct) = &req.content_type {
        headers.insert(protocol::CONTENT_TYPE, ct.as_str());
    }
    headers.insert(protocol::FORWARD_HOPS, req.hops.to_string().as_str());
    let subject = node.subjects.node_cmd(leader, &req.command);
    match bus::request(
        &node.client,
        subject,
        Some(headers),
        req.payload,
        remaining(deadline),
    )
    .await
    {
        Ok(reply) => Forwarded::Reply(reply.payload),
        Err(RequestFailure::NoResponders) => Forwarded::Unreachable,
        Err(_) => Forwarded::NoAnswer,
    }
}

/// Waits until some leader is known, or the deadline passes.
async fn wait_for_leader(node: &Node, deadline: Instant) -> Option<u64> {
    let mut metrics = node.raft.metrics();
    let leader_wait = Instant::now() + Duration::from_millis(limits::LEADER_WAIT_MS);
    let until = deadline.min(leader_wait);
    loop {
        let leader = metrics.borrow().current_leader;
        if leader.is_some() {
            return leader;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if tokio::time::timeout(left, metrics.changed()).await.is_err() {
            return None;
        }
    }
}
