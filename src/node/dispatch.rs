//! Serving commands: decode, validate, run locally or on the leader, and reply in the
//! request's encoding. Every node answers `warden.<cluster>.cmd.*` in one queue group and its
//! own `warden.<cluster>.node.<id>.cmd.*`. A node that does not lead forwards a client's
//! request, unparsed, to the leader: writes in batches (`forward`), reads and membership
//! changes one by one (`internal.<me>.<leader>.relay.<command>`). The leader validates
//! everything, so bad input gets the same clear error wherever it lands; a follower parses a
//! request itself only when it cannot reach a leader, to still tell bad input apart from an
//! unavailable cluster.
//!
//! Who sent a command is read from the subject it arrived on (`Origin`), never from its body.
//! Node commands (heartbeats, reports, checkpoints, handoffs, a node's own join) come only
//! from the node they speak for, on `internal.<node>.<leader>.own.<command>` or in its own
//! forward batches, and are answered only by the leader: a node never relays another node's
//! command, so no node can speak for another (`docs/security.md`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::task::JoinSet;

use super::forward::{remaining, ForwardBatch, ForwardReplies, Forwarded, Request};
use super::Node;
use crate::bus::RequestFailure;
use crate::command::{route_of, spec, Command, Role, Route};
use crate::limits;
use crate::protocol::{self, Encoding, Envelope, ErrorCode, WireError};
use crate::subjects::Subjects;
use crate::traces::Span;
use opentelemetry::trace::SpanKind;

/// What the messages of a subscription are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Client commands, one per message.
    Commands,
    /// A client's command relayed by another node, one per message.
    Relayed,
    /// A node's own command, one per message, from the node the subject names.
    Own,
    /// Batches of writes forwarded by followers: clients' writes and the sender's own.
    Forwarded,
}

/// Who sent a command, as the subject it arrived on says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client, whose role NATS checked on the command's subject (or a node relaying it).
    Client,
    /// Node `n` itself, on a subject that only its identity may publish on.
    Node(u64),
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
                take(&node, &mut tasks, msg, feed).await;
            }
        }
    }
    // What NATS delivered before the unsubscribe is still handled (or refused), not dropped:
    // the subscription's buffer is bounded, and nothing is added to it once it is closed.
    let _ = sub.unsubscribe().await; // the connection may already be closing
    while let Some(Some(msg)) = sub.next().now_or_never() {
        take(&node, &mut tasks, msg, feed).await;
    }
    // Take no new commands, give those in flight a moment to finish (a forwarded `leave` of
    // this very node is answered after the node has learned it left), then abandon the rest:
    // their clients time out, which they must treat as "unknown", as after a crash.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(limits::DRAIN_GRACE_MS), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

/// Hands one message of `feed` to a task of its own, or refuses it at once when the node has
/// no room for it.
async fn take(node: &Arc<Node>, tasks: &mut JoinSet<()>, msg: async_nats::Message, feed: Feed) {
    if !may_answer(node, &msg, feed) {
        tracing::debug!(subject = %msg.subject, "ignoring a request without a reply subject this node may answer on");
        return;
    }
    // Nodes' traffic has its own permits: a flood of client commands must not starve
    // heartbeats and hand-offs.
    let permits = match feed {
        Feed::Commands => &node.inflight,
        _ => &node.inflight_internal,
    };
    match permits.clone().try_acquire_owned() {
        Ok(permit) => {
            let node = node.clone();
            tasks.spawn(async move {
                match feed {
                    Feed::Forwarded => handle_batch(&node, msg).await,
                    _ => handle(&node, msg, feed).await,
                }
                drop(permit);
            });
        }
        Err(_) => {
            // A forwarded batch gets no answer: its sender times out ("unknown").
            if !matches!(feed, Feed::Forwarded) {
                let err = WireError::new(
                    ErrorCode::Unavailable,
                    "the node is handling too many commands; retry with backoff",
                );
                let req = request_of(&msg, feed, false);
                let enc = Encoding::detect(req.content_type.as_deref(), &req.payload)
                    .unwrap_or(Encoding::Json);
                if feed == Feed::Commands && node.metrics.enabled() {
                    node.metrics
                        .command(&req.command, Err(&err), Duration::ZERO);
                }
                send(node, &msg, enc, encode(enc, Err(err))).await;
            }
        }
    }
}

/// Whether this node may answer `msg` on its reply subject: a client's anywhere outside the
/// Warden subject space, a peer's only on the reply subject that names this node and the
/// sender (`peers`). Anything else would let the sender make this node publish somewhere it
/// chose: an event, a cast, or another node's subjects.
fn may_answer(node: &Node, msg: &async_nats::Message, feed: Feed) -> bool {
    let Some(reply) = msg.reply.as_deref() else {
        return false;
    };
    match feed {
        Feed::Commands => Subjects::is_client_reply(reply),
        _ => sender(node, msg)
            .is_some_and(|from| node.subjects.is_reply_for(reply, Some(node.cfg.id), from)),
    }
}

/// A command as received. Only a relaying node's count of hops is believed: a client's
/// `Warden-Forward-Hops` could otherwise stop its command from ever reaching the leader.
/// Its `traceparent` is read only when `traced` (this node records traces).
fn request_of(msg: &async_nats::Message, feed: Feed, traced: bool) -> Request {
    let header = |name| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.to_string())
    };
    let hops = match feed {
        Feed::Relayed => header(protocol::FORWARD_HOPS).and_then(|h| h.parse().ok()),
        _ => None,
    };
    Request {
        command: Subjects::last_token(&msg.subject).to_string(),
        content_type: header(protocol::CONTENT_TYPE),
        hops: hops.unwrap_or(0),
        payload: msg.payload.clone(),
        own: false,
        trace: traced.then(|| header(crate::traces::TRACEPARENT)).flatten(),
    }
}

fn encode(enc: Encoding, result: Result<serde_json::Value, WireError>) -> Bytes {
    enc.encode(&Envelope::from_result(result)).into()
}

/// Sends `body` (or a `too_large` refusal in its place) as the reply to `msg`, and returns
/// what was sent.
async fn send(node: &Node, msg: &async_nats::Message, enc: Encoding, body: Bytes) -> Bytes {
    let body = fit(node, enc, body);
    publish(node, msg, enc, body).await
}

/// `body`, or a `too_large` refusal in its place if it would not fit in a NATS message.
fn fit(node: &Node, enc: Encoding, body: Bytes) -> Bytes {
    let max = node.client.server_info().max_payload;
    if body.len() + 1024 <= max {
        return body;
    }
    let err = WireError::new(
        ErrorCode::TooLarge,
        format!(
            "the reply is {} bytes, over NATS max_payload; narrow the query",
            body.len()
        ),
    );
    encode(enc, Err(err))
}

/// Sends `body` as the reply to `msg`, and returns it.
async fn publish(node: &Node, msg: &async_nats::Message, enc: Encoding, body: Bytes) -> Bytes {
    let Some(reply) = msg.reply.clone() else {
        return body;
    };
    let mut headers = HeaderMap::new();
    headers.insert(protocol::CONTENT_TYPE, enc.content_type());
    if let Some(leader) = node.leader() {
        headers.insert(protocol::LEADER_HINT, leader.to_string().as_str());
    }
    if let Err(e) = node
        .client
        .publish_with_headers(reply, headers, body.clone())
        .await
    {
        tracing::debug!(error = %e, "could not send a reply");
    }
    body
}

/// The node that sent an internal message, as its subject says.
fn sender(node: &Node, msg: &async_nats::Message) -> Option<u64> {
    node.subjects.parse_internal(&msg.subject).map(|s| s.from)
}

async fn handle(node: &Node, msg: async_nats::Message, feed: Feed) {
    let origin = match feed {
        Feed::Own => match sender(node, &msg) {
            Some(from) => Origin::Node(from),
            None => return,
        },
        _ => Origin::Client,
    };
    let req = request_of(&msg, feed, node.traces.is_some());
    // Only the node a client asked waits for a first start: never a leader answering a
    // forwarded or relayed write, whose sender's deadline is short.
    let wait = match feed {
        Feed::Commands => first_start_wait(&req),
        _ => None,
    };
    let began = Instant::now();
    // Counted where the client asked (a command forwarded to the leader is not counted
    // twice), from what the client got.
    let counted = (feed == Feed::Commands && node.metrics.enabled()).then(|| req.command.clone());
    // A client's command may start a trace; a relayed one only continues its sender's.
    let name = || span_name(&req.command);
    let span = match (&node.traces, feed) {
        (Some(t), Feed::Commands) => t.take(name, req.trace.as_deref()),
        (Some(t), Feed::Relayed) => {
            let span = t.continued(name, req.trace.as_deref());
            if let Some(from) = sender(node, &msg) {
                span.set("warden.forwarded_by", from as i64);
            }
            span
        }
        _ => Span::none(),
    };
    let (enc, mut body) = answer(node, req, origin, &span).await;
    if let Some(within) = wait {
        body = wait_first_start(node, enc, body, within).await;
    }
    let body = fit(node, enc, body);
    // Ended before the reply goes: the sender's span of the command ends after this one.
    answered(span, enc, &body);
    let sent = publish(node, &msg, enc, body).await;
    if let Some(command) = counted {
        let outcome = peek_outcome(enc, &sent);
        node.metrics
            .command(&command, outcome.as_ref().map(|_| ()), began.elapsed());
    }
}

/// The name of the span of a command as a node takes it: one per command of the table (any
/// other name a client sends would make span names unbounded).
fn span_name(command: &str) -> String {
    match spec(command) {
        Some(s) => format!("received {}", s.name),
        None => "received an unknown command".into(),
    }
}

/// Ends a command's span as its reply goes, with the reply's outcome.
fn answered(span: Span, enc: Encoding, sent: &[u8]) {
    if !span.is_recording() {
        return;
    }
    if let Err(e) = peek_outcome(enc, sent) {
        span.fail(e.code.as_str(), e.message);
    }
    span.event("answered");
    span.end();
}

/// Whether an encoded reply says ok, or which error. A reply whose envelope begins with
/// `ok: true` (as every envelope this node or the leader encodes does, `v` first) is not
/// decoded: only refusals, which are small, are.
fn peek_outcome(enc: Encoding, body: &[u8]) -> Result<(), WireError> {
    let head = &body[..body.len().min(32)];
    let ok_first = match enc {
        Encoding::Json => head.windows(9).any(|w| w == br#""ok":true"#),
        // "ok" as a fixstr, then `true`.
        Encoding::Msgpack => head.windows(4).any(|w| w == [0xa2, b'o', b'k', 0xc3]),
    };
    if ok_first {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    struct Peek {
        ok: bool,
        #[serde(default)]
        error: Option<WireError>,
    }
    let peek: Result<Peek, String> = match enc {
        Encoding::Json => serde_json::from_slice(body).map_err(|e| e.to_string()),
        Encoding::Msgpack => rmp_serde::from_slice(body).map_err(|e| e.to_string()),
    };
    match peek {
        Ok(Peek { ok: true, .. }) => Ok(()),
        Ok(Peek { error: Some(e), .. }) => Err(e),
        Ok(Peek { error: None, .. }) | Err(_) => {
            Err(WireError::new(ErrorCode::Internal, "undecodable reply"))
        }
    }
}

/// How long a client's `spawn_agent` asks to wait for its agent's first start, if it does
/// (`wait: "running"`). Parsed again here only for spawns that may ask it.
fn first_start_wait(req: &Request) -> Option<Duration> {
    if !matches!(
        req.command.as_str(),
        "spawn_agent" | "add_child_to_supervisor"
    ) {
        return None;
    }
    let enc = Encoding::detect(req.content_type.as_deref(), &req.payload).ok()?;
    match parse(req, enc).ok()? {
        Command::SpawnAgent(s) if s.wait == crate::registry::SpawnWait::Running => {
            let ms = s.timeout_ms.unwrap_or(limits::SPAWN_WAIT_DEFAULT_MS);
            Some(Duration::from_millis(ms.min(limits::SPAWN_WAIT_MAX_MS)))
        }
        _ => None,
    }
}

/// Turns a spawn's reply into the answer of its first start: the agent once it runs; the
/// start's error (`start_failed`) if its first start failed and it was removed; `not_found`
/// if it was stopped before it ran; `timeout` if it has not started `within` (it is kept and
/// may still start). Read from this node's own registry, which follows the leader's: no
/// request to the leader while waiting. A refused spawn's reply is passed on as it is.
async fn wait_first_start(node: &Node, enc: Encoding, body: Bytes, within: Duration) -> Bytes {
    let spawned = Envelope::decode(&body).and_then(Envelope::into_result);
    let Some(id) = spawned.ok().and_then(|v| {
        v.get("id")
            .and_then(|id| id.as_str())
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
    }) else {
        return body;
    };
    let Ok(_waiting) = node.spawn_waiters.clone().try_acquire_owned() else {
        let err = WireError::new(
            ErrorCode::Timeout,
            format!(
                "agent {id} was placed; this node already waits on {} first starts, so it \
                 does not wait on this one (get_agent shows how it goes)",
                limits::SPAWN_WAITERS
            ),
        );
        return encode(enc, Err(err));
    };
    let deadline = tokio::time::Instant::now() + within;
    let mut metrics = node.raft.metrics();
    let mut applied = None;
    let mut seen = false;
    loop {
        let now = {
            let st = node.state_read();
            match st.registry.agent(&id.to_string()) {
                Some(a) if a.started => Some(crate::command::reply::agent(a)),
                Some(_) => {
                    seen = true;
                    None
                }
                None => match st.registry.start_failure(id) {
                    Some(f) => Some(Err(WireError::new(
                        ErrorCode::StartFailed,
                        format!(
                            "agent {id} failed its first start on node {} and was not kept: {}",
                            f.node, f.error
                        ),
                    ))),
                    // Removed by someone else before it ran.
                    None if seen => Some(Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("agent {id} was stopped before it started"),
                    ))),
                    // Not applied here yet.
                    None => None,
                },
            }
        };
        if let Some(result) = now {
            return encode(enc, result);
        }
        if !applied_more(&mut metrics, &mut applied, deadline).await {
            let err = WireError::new(
                ErrorCode::Timeout,
                format!(
                    "agent {id} has not started within {} ms; unless it was stopped meanwhile \
                     it is kept and may still start (get_agent shows it)",
                    within.as_millis()
                ),
            );
            return encode(enc, Err(err));
        }
    }
}

/// Waits until this node has applied more of the log than `applied` (the metrics also change
/// with every heartbeat on a leader, which is no reason to look again); false once `deadline`
/// passes or Raft stops.
async fn applied_more(
    metrics: &mut tokio::sync::watch::Receiver<crate::raft::typ::RaftMetrics>,
    applied: &mut Option<crate::raft::typ::LogId>,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            _ => return false,
        }
        let now = metrics.borrow_and_update().last_applied;
        if now != *applied {
            *applied = now;
            return true;
        }
    }
}

/// Answers a batch of forwarded writes, each as if it had arrived here itself: the sender's
/// own commands as its own, the rest as the clients' it relays.
async fn handle_batch(node: &Node, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else {
        return;
    };
    let Some(from) = sender(node, &msg) else {
        return;
    };
    let batch: ForwardBatch = match crate::protocol::from_msgpack(&msg.payload) {
        Ok(b) => b,
        Err(e) => {
            // From an incompatible peer; it times out and reports "unknown".
            tracing::warn!(error = %e, "undecodable forward batch");
            return;
        }
    };
    let answers = batch.items.into_iter().map(|req| async move {
        let origin = if req.own {
            Origin::Node(from)
        } else {
            Origin::Client
        };
        let span = match &node.traces {
            Some(t) => t.continued(|| span_name(&req.command), req.trace.as_deref()),
            None => Span::none(),
        };
        span.set("warden.forwarded_by", from as i64);
        let (enc, body) = answer(node, req, origin, &span).await;
        (body, (span, enc))
    });
    let (items, spans): (Vec<Bytes>, Vec<_>) =
        futures::future::join_all(answers).await.into_iter().unzip();
    // Ended before the replies go: the sender's spans of these commands end after these.
    for ((span, enc), item) in spans.into_iter().zip(&items) {
        answered(span, enc, item);
    }
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
async fn answer(node: &Node, req: Request, origin: Origin, span: &Span) -> (Encoding, Bytes) {
    // An unusable Content-Type still gets an answer, in JSON.
    let enc = match Encoding::detect(req.content_type.as_deref(), &req.payload) {
        Ok(enc) => enc,
        Err(e) => return (Encoding::Json, encode(Encoding::Json, Err(e))),
    };
    match process(node, &req, enc, origin, span).await {
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

async fn process(node: &Node, req: &Request, enc: Encoding, origin: Origin, span: &Span) -> Answer {
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
    if let Origin::Node(from) = origin {
        return Answer::Local(own_command(node, req, enc, from, span).await);
    }
    if spec(&req.command).is_some_and(|s| s.role == Role::Node) {
        return Answer::Local(Err(WireError::new(
            ErrorCode::Forbidden,
            format!(
                "{:?} is a node-to-node command; nodes send it on their internal subjects",
                req.command
            ),
        )));
    }
    if route_of(&req.command) == Some(Route::Local) {
        return Answer::Local(match parse(req, enc) {
            Ok(Command::NodeMetrics(m)) => super::figures::node(node, m.top()).await,
            Ok(_) => Ok(node.health()),
            Err(e) => Err(e),
        });
    }
    if route_of(&req.command) == Some(Route::Figures) {
        return match parse(req, enc) {
            Ok(cmd) => figures(node, req, cmd, span).await,
            Err(e) => Answer::Local(Err(e)),
        };
    }
    if route_of(&req.command) == Some(Route::History) {
        return Answer::Local(match parse(req, enc) {
            Ok(cmd) => history(node, cmd).await,
            Err(e) => Err(e),
        });
    }
    if route_of(&req.command) == Some(Route::Wait) {
        return Answer::Local(match parse(req, enc) {
            Ok(Command::WaitAgent(w)) => wait_agent(node, &w).await,
            Ok(_) => Err(WireError::new(ErrorCode::Internal, "not a wait")),
            Err(e) => Err(e),
        });
    }
    if let Some(leader) = node.cut_off() {
        // Forwarding would wait out the link that does not carry it: say so at once.
        return Answer::Local(parse(req, enc).and(Err(cut_off_error(node, leader))));
    }
    let deadline = Instant::now() + Duration::from_millis(limits::FORWARD_TIMEOUT_MS);
    loop {
        if node.is_leader() {
            let cmd = match parse(req, enc) {
                Ok(cmd) => cmd,
                Err(e) => return Answer::Local(Err(e)),
            };
            let asked = super::Asked::traced(req.payload.len(), span);
            if let Some(out) = node.execute_on_leader(cmd, asked).await {
                return Answer::Local(out);
            }
        }
        let forwarded = tokio::select! {
            f = forward(node, req, deadline, span) => f,
            leader = node.until_cut_off() => {
                // Lost on the way: the leader may have taken it, or not.
                let mut err = cut_off_error(node, leader);
                // Only a read certainly changed nothing: a write or a membership change
                // may have reached the leader.
                if route_of(&req.command) != Some(Route::Read) {
                    err.code = ErrorCode::Timeout;
                    err.message.push_str(
                        "; the command was on its way and may or may not have taken effect: \
                         retry with the same request_id",
                    );
                }
                return Answer::Local(Err(err));
            }
        };
        match forwarded {
            Forward::Done(answer) => return answer,
            Forward::SelfIsLeader => continue,
            // Tell bad input apart from an unavailable cluster.
            Forward::Failed(err) => return Answer::Local(parse(req, enc).and(Err(err))),
        }
    }
}

/// Why a node cut off from its leader (or a leader cut off from its majority) does not take
/// a command.
fn cut_off_error(node: &Node, leader: u64) -> WireError {
    if leader == node.cfg.id {
        return WireError::new(
            ErrorCode::Unavailable,
            format!(
                "node {leader} leads but has heard from no majority for {} ms, so it can \
                 commit nothing; nothing changed: retry, through another node's NATS server \
                 if this one stays cut off",
                node.cfg.failure.lease_ms
            ),
        );
    }
    WireError::new(
        ErrorCode::Unavailable,
        format!(
            "node {} cannot reach the leader (node {leader} as it last knew) and holds no \
             lease; nothing changed: retry, through another node's NATS server if this one \
             stays cut off",
            node.cfg.id
        ),
    )
}

/// A node's own command: answered here if this node leads and the command speaks only for its
/// sender; never relayed, so the leader always knows who really sent it.
async fn own_command(node: &Node, req: &Request, enc: Encoding, from: u64, span: &Span) -> Reply {
    let cmd = parse(req, enc)?;
    if let Some(other) = cmd.speaks_for().into_iter().find(|&n| n != from) {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            format!("node {from} may not speak for node {other}"),
        ));
    }
    let not_leader = || {
        WireError::new(
            ErrorCode::Unavailable,
            format!(
                "node {} does not lead (the leader is {:?}); nothing changed: send it to the \
                 leader",
                node.cfg.id,
                node.leader()
            ),
        )
    };
    if !node.is_leader() {
        return Err(not_leader());
    }
    let asked = super::Asked::traced(req.payload.len(), span);
    match node.execute_on_leader(cmd, asked).await {
        Some(out) => out,
        None => Err(not_leader()),
    }
}

type Reply = Result<serde_json::Value, WireError>;

enum Forward {
    Done(Answer),
    SelfIsLeader,
    /// Nothing reached a leader; nothing changed.
    Failed(WireError),
}

async fn forward(node: &Node, req: &Request, deadline: Instant, span: &Span) -> Forward {
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
        // Each attempt is a span of its own: which leader, and what became of it.
        let hop = match &node.traces {
            Some(t) => t.child(span, "forwarded", SpanKind::Client),
            None => Span::none(),
        };
        hop.set("warden.leader", leader as i64);
        let onward = Request {
            hops: req.hops + 1,
            own: false,
            trace: hop.traceparent(),
            ..req.clone()
        };
        let result = if route_of(&req.command) == Some(Route::Write) {
            hop.set("warden.forward", "batch");
            node.forwarder
                .forward(leader, onward, remaining(deadline))
                .await
        } else {
            hop.set("warden.forward", "relay");
            forward_one(node, leader, onward, deadline).await
        };
        match &result {
            Forwarded::Reply(_) => {}
            Forwarded::Unreachable => hop.fail("unreachable", "nothing reached the leader"),
            Forwarded::NoAnswer => hop.fail("timeout", "the leader did not answer in time"),
        }
        hop.end();
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

/// Relays one client command to the leader.
async fn forward_one(node: &Node, leader: u64, req: Request, deadline: Instant) -> Forwarded {
    let mut headers = HeaderMap::new();
    if let Some(ct) = &req.content_type {
        headers.insert(protocol::CONTENT_TYPE, ct.as_str());
    }
    headers.insert(protocol::FORWARD_HOPS, req.hops.to_string().as_str());
    if let Some(tp) = &req.trace {
        headers.insert(crate::traces::TRACEPARENT, tp.as_str());
    }
    let subject = node.subjects.relay(node.cfg.id, leader, &req.command);
    match node
        .peers
        .relay(
            leader,
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
pub(super) async fn wait_for_leader(node: &Node, deadline: Instant) -> Option<u64> {
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

/// `get_agent_metrics`: answered here when the agent is placed here (or nowhere), relayed to
/// its node otherwise. `get_supervisor_metrics`: this node's share, and every other live
/// node's asked for at once (`local: true`), summed.
async fn figures(node: &Node, req: &Request, cmd: Command, span: &Span) -> Answer {
    let deadline = Instant::now() + Duration::from_millis(limits::FORWARD_TIMEOUT_MS);
    match cmd {
        Command::AgentMetrics(a) => {
            let placed = {
                let st = node.state_read();
                st.registry.agent(&a.agent).map(|r| (r.id, r.node))
            };
            let Some((id, placed)) = placed else {
                return Answer::Local(Err(WireError::new(
                    ErrorCode::NotFound,
                    format!("no agent {:?}", a.agent),
                )));
            };
            match placed {
                Some(n) if n != node.cfg.id && req.hops >= limits::MAX_FORWARD_HOPS => {
                    Answer::Local(Err(WireError::new(
                        ErrorCode::Unavailable,
                        "the agent is moving between nodes; retry shortly",
                    )))
                }
                Some(n) if n != node.cfg.id => {
                    let onward = Request {
                        hops: req.hops + 1,
                        own: false,
                        trace: span.traceparent(),
                        ..req.clone()
                    };
                    match forward_one(node, n, onward, deadline).await {
                        Forwarded::Reply(body) => Answer::Forwarded(body),
                        _ => Answer::Local(Err(WireError::new(
                            ErrorCode::Unavailable,
                            format!("node {n}, which runs the agent, did not answer; retry"),
                        ))),
                    }
                }
                _ => Answer::Local(super::figures::agent(node, id).await),
            }
        }
        Command::SupervisorMetrics(s) if s.local => {
            let here = super::figures::supervisor_here(node, &s.name).await;
            Answer::Local(here.map(|sums| sums.to_json()))
        }
        Command::SupervisorMetrics(s) => {
            let Ok(_gathering) = node.figure_fanouts.clone().try_acquire_owned() else {
                return Answer::Local(Err(WireError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "this node already gathers {} supervisors' figures; retry shortly",
                        limits::FIGURE_FANOUTS
                    ),
                )));
            };
            let nodes: Vec<u64> = {
                let st = node.state_read();
                if st.registry.supervisor(&s.name).is_none() {
                    return Answer::Local(Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("no supervisor {:?}", s.name),
                    )));
                }
                st.registry
                    .data()
                    .nodes
                    .values()
                    .filter(|n| {
                        !matches!(
                            n.status,
                            crate::registry::NodeStatus::Left | crate::registry::NodeStatus::Down
                        )
                    })
                    .map(|n| n.id)
                    .collect()
            };
            let body = serde_json::json!({ "name": s.name, "local": true });
            let name = &s.name;
            let asks = nodes.iter().map(|&n| {
                let body = body.clone();
                async move {
                    if n == node.cfg.id {
                        let here = super::figures::supervisor_here(node, name).await;
                        return (n, here.map(|sums| sums.to_json()));
                    }
                    let onward = Request {
                        command: req.command.clone(),
                        content_type: Some(Encoding::Json.content_type().to_string()),
                        hops: req.hops + 1,
                        payload: serde_json::to_vec(&body).unwrap_or_default().into(),
                        own: false,
                        trace: span.traceparent(),
                    };
                    let share = match forward_one(node, n, onward, deadline).await {
                        Forwarded::Reply(bytes) => match Envelope::decode(&bytes) {
                            Ok(env) => env.into_result(),
                            Err(e) => Err(e),
                        },
                        _ => Err(WireError::new(ErrorCode::Unavailable, "no answer")),
                    };
                    (n, share)
                }
            });
            let shares = futures::future::join_all(asks).await;
            let mut answer = super::figures::sum_shares(&shares);
            answer["supervisor"] = s.name.clone().into();
            answer["nodes"] = nodes.into();
            Answer::Local(Ok(answer))
        }
        _ => Answer::Local(Err(WireError::new(
            ErrorCode::Internal,
            "not a figures query",
        ))),
    }
}

/// `agent_history` and `supervisor_history`: read from the history stream here, through at
/// most `limits::HISTORY_READERS` queries at once. An agent's name is resolved in this node's
/// copy of the registry (an agent that is gone is known by its id only).
async fn history(node: &Node, cmd: Command) -> Result<serde_json::Value, WireError> {
    use crate::command::history::limit_of;
    use crate::history::query::{read, Query};
    if !node.cfg.history.enabled {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            "the history is off on this node ([history] enabled = false)",
        ));
    }
    let Ok(_reading) = node.history_readers.clone().try_acquire_owned() else {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!(
                "this node already runs {} history queries; retry with backoff",
                limits::HISTORY_READERS
            ),
        ));
    };
    let query = match cmd {
        Command::AgentHistory(h) => {
            let id = match h.agent.parse::<uuid::Uuid>() {
                Ok(id) => id,
                Err(_) => match node.state_read().registry.agent(&h.agent) {
                    Some(a) => a.id,
                    None => {
                        return Err(WireError::new(
                            ErrorCode::NotFound,
                            format!(
                                "no agent named {:?}; an agent that is gone is known by its id",
                                h.agent
                            ),
                        ))
                    }
                },
            };
            Query {
                filter: node.subjects.history_of_agent(&id.to_string()),
                limit: limit_of(h.limit),
                since: h.since,
            }
        }
        Command::SupervisorHistory(h) => Query {
            filter: node.subjects.history_of_supervisor(&h.name),
            limit: limit_of(h.limit),
            since: h.since,
        },
        _ => return Err(WireError::new(ErrorCode::Internal, "not a history read")),
    };
    let js = crate::history::publish::context(node.client.clone());
    read(&js, &node.subjects, query).await
}

/// `wait_agent`: waits on this node's own copy of the registry until the agent is done, and
/// answers its final status and result; `timeout` if it is not done within the wait. An
/// agent this node does not know is looked for until this node has applied everything the
/// leader had committed when the wait began (its `commit_index`, from a linearizable
/// `cluster_status` on the leader; this node's own received index if no leader answers), then
/// answered `not_found`. An agent that goes without finishing (stopped, or with its
/// supervisor) answers `{status: "stopped", reason: "removed"}`.
async fn wait_agent(
    node: &Node,
    w: &crate::command::WaitAgent,
) -> Result<serde_json::Value, WireError> {
    use crate::command::agent::Waited;
    use crate::command::WaitAgent;
    let Ok(_waiting) = node.spawn_waiters.clone().try_acquire_owned() else {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!(
                "this node already runs {} waits; retry with backoff",
                limits::SPAWN_WAITERS
            ),
        ));
    };
    let deadline = tokio::time::Instant::now() + w.within();
    let mut metrics = node.raft.metrics();
    let mut applied = None;
    let mut id: Option<uuid::Uuid> = None;
    // The index past which an agent unknown here is unknown to the cluster.
    let mut mark: Option<u64> = None;
    loop {
        let (seen, here) = {
            let st = node.state_read();
            let name = id.map_or_else(|| w.agent.clone(), |id| id.to_string());
            let seen = WaitAgent::look(&st.registry, &name);
            (seen, st.last_applied.map_or(0, |l| l.index))
        };
        match seen {
            Waited::Done(v) => return Ok(v),
            Waited::Running(found) => id = Some(found),
            Waited::Unknown if id.is_some() => {
                return Ok(serde_json::json!({
                    "agent": id, "status": "stopped", "reason": "removed", "result": null,
                }))
            }
            Waited::Unknown => match mark {
                Some(m) if here >= m => {
                    return Err(WireError::new(
                        ErrorCode::NotFound,
                        format!("no agent {:?}", w.agent),
                    ))
                }
                Some(_) => {}
                None => {
                    mark = Some(
                        leader_commit(node)
                            .await
                            .unwrap_or_else(|| metrics.borrow().last_log_index.unwrap_or(0)),
                    );
                    continue;
                }
            },
        }
        if !applied_more(&mut metrics, &mut applied, deadline).await {
            return Err(WireError::new(
                ErrorCode::Timeout,
                format!(
                    "agent {:?} is not done after {} ms",
                    w.agent,
                    w.within().as_millis()
                ),
            ));
        }
    }
}

/// What the leader had committed and applied, by a linearizable `cluster_status` (on this
/// node if it leads); `None` if no leader answers (within the forwarding's own deadline).
async fn leader_commit(node: &Node) -> Option<u64> {
    let req = Request {
        command: "cluster_status".into(),
        content_type: Some(protocol::JSON.to_string()),
        hops: 0,
        payload: Bytes::from_static(b"{}"),
        own: false,
        trace: None,
    };
    // Boxed: `process` is what called the wait.
    let status = match Box::pin(process(
        node,
        &req,
        Encoding::Json,
        Origin::Client,
        &Span::none(),
    ))
    .await
    {
        Answer::Local(result) => result.ok()?,
        Answer::Forwarded(body) => Envelope::decode(&body)
            .and_then(Envelope::into_result)
            .ok()?,
    };
    status.get("commit_index").and_then(|c| c.as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: the metrics count a command's outcome from the reply as sent, in either
    /// encoding, without decoding a large successful reply.
    #[test]
    fn a_reply_s_outcome_is_read_from_its_envelope() {
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let big = serde_json::json!({"agents": vec!["x"; 10_000]});
            assert!(peek_outcome(enc, &encode(enc, Ok(big))).is_ok(), "{enc:?}");
            let refused = WireError::new(ErrorCode::NotFound, "no agent \"ok\":true");
            let got = peek_outcome(enc, &encode(enc, Err(refused)));
            assert_eq!(got.map_err(|e| e.code), Err(ErrorCode::NotFound), "{enc:?}");
            let junk = peek_outcome(enc, b"\x00 not an envelope");
            assert_eq!(
                junk.map_err(|e| e.code),
                Err(ErrorCode::Internal),
                "{enc:?}"
            );
        }
    }
}
