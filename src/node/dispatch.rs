//! Serving commands: decode, validate, run locally or on the leader, and reply in the
//! request's encoding. Every node answers `warden.<cluster>.cmd.*` in one queue group and its
//! own `warden.<cluster>.node.<id>.cmd.*`; a node that does not lead forwards the request,
//! unchanged, to the leader's own subject.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;

use super::Node;
use crate::bus::{self, RequestFailure};
use crate::command::{Command, Route};
use crate::limits;
use crate::protocol::{self, Encoding, Envelope, ErrorCode, WireError};
use crate::subjects::Subjects;

/// Serves commands from `sub` until `stopped` resolves.
pub async fn serve(
    node: Arc<Node>,
    mut sub: async_nats::Subscriber,
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
                            handle(&node, msg).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        let err = WireError::new(
                            ErrorCode::Unavailable,
                            "the node is handling too many commands; retry with backoff",
                        );
                        reply_error(&node, &msg, err).await;
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

fn content_type(msg: &async_nats::Message) -> Option<&str> {
    msg.headers
        .as_ref()?
        .get(protocol::CONTENT_TYPE)
        .map(|v| v.as_str())
}

fn hops(msg: &async_nats::Message) -> u32 {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(protocol::FORWARD_HOPS))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

async fn reply_error(node: &Node, msg: &async_nats::Message, err: WireError) {
    let enc = Encoding::detect(content_type(msg), &msg.payload).unwrap_or(Encoding::Json);
    send(
        node,
        msg,
        enc,
        enc.encode(&Envelope::from_result(Err(err))).into(),
    )
    .await;
}

async fn send(node: &Node, msg: &async_nats::Message, enc: Encoding, body: Bytes) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(protocol::CONTENT_TYPE, enc.content_type());
    if let Err(e) = node.client.publish_with_headers(reply, headers, body).await {
        tracing::debug!(error = %e, "could not send a reply");
    }
}

async fn handle(node: &Node, msg: async_nats::Message) {
    if msg.reply.is_none() {
        tracing::debug!(subject = %msg.subject, "ignoring a command sent without a reply subject");
        return;
    }
    // An unusable Content-Type still gets an answer, in JSON.
    let enc = match Encoding::detect(content_type(&msg), &msg.payload) {
        Ok(enc) => enc,
        Err(e) => return reply_error(node, &msg, e).await,
    };
    let body = match process(node, &msg, enc).await {
        Answer::Local(result) => enc.encode(&Envelope::from_result(result)).into(),
        Answer::Forwarded(body) => body,
    };
    send(node, &msg, enc, body).await;
}

enum Answer {
    Local(Result<serde_json::Value, WireError>),
    /// The leader's reply, already encoded in the request's encoding.
    Forwarded(Bytes),
}

async fn process(node: &Node, msg: &async_nats::Message, enc: Encoding) -> Answer {
    let name = Subjects::last_token(&msg.subject);
    if msg.payload.len() > limits::MAX_REQUEST_BYTES {
        return Answer::Local(Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "request is {} bytes; the limit is {} bytes",
                msg.payload.len(),
                limits::MAX_REQUEST_BYTES
            ),
        )));
    }
    let cmd = match enc
        .decode(&msg.payload)
        .and_then(|body| Command::parse(name, body))
    {
        Ok(cmd) => cmd,
        Err(e) => return Answer::Local(Err(e)),
    };
    if cmd.route() == Route::Local {
        return Answer::Local(Ok(node.health()));
    }
    let deadline = Instant::now() + Duration::from_millis(limits::FORWARD_TIMEOUT_MS);
    loop {
        if let Some(out) = node.execute_on_leader(cmd.clone(), msg.payload.len()).await {
            return Answer::Local(out);
        }
        match forward(node, msg, name, deadline).await {
            Forward::Done(answer) => return answer,
            // Leadership moved to this node meanwhile: run it here.
            Forward::SelfIsLeader => continue,
        }
    }
}

enum Forward {
    Done(Answer),
    SelfIsLeader,
}

async fn forward(node: &Node, msg: &async_nats::Message, name: &str, deadline: Instant) -> Forward {
    let hops = hops(msg);
    if hops >= limits::MAX_FORWARD_HOPS {
        return Forward::Done(Answer::Local(Err(WireError::new(
            ErrorCode::Unavailable,
            "leadership is moving; retry shortly",
        ))));
    }
    loop {
        let leader = match wait_for_leader(node, deadline).await {
            Some(l) if l == node.cfg.id => return Forward::SelfIsLeader,
            Some(l) => l,
            None => {
                return Forward::Done(Answer::Local(Err(WireError::new(
                    ErrorCode::Unavailable,
                    "no leader: the cluster has no quorum right now; nothing changed",
                ))))
            }
        };
        let mut headers = msg.headers.clone().unwrap_or_default();
        headers.insert(protocol::FORWARD_HOPS, (hops + 1).to_string().as_str());
        let left = deadline.saturating_duration_since(Instant::now());
        let subject = node.subjects.node_cmd(leader, name);
        match bus::request(
            &node.client,
            subject,
            Some(headers),
            msg.payload.clone(),
            left,
        )
        .await
        {
            Ok(reply) => return Forward::Done(Answer::Forwarded(reply.payload)),
            // The leader we knew is gone and nothing reached it: safe to look again.
            Err(RequestFailure::NoResponders) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(RequestFailure::TimedOut) => {
                return Forward::Done(Answer::Local(Err(WireError::new(
                    ErrorCode::Timeout,
                    "the leader did not answer in time; the command may or may not have taken \
                     effect: retry with the same request_id",
                ))))
            }
            Err(e) => {
                return Forward::Done(Answer::Local(Err(WireError::new(
                    ErrorCode::Unavailable,
                    format!("could not reach the leader: {e}"),
                ))))
            }
        }
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
