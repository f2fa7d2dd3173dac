//! A small Rust client for the NATS command interface, used by `warden ctl`, `warden up`,
//! `warden bench` and the tests. It retries what is safe to retry until its deadline:
//! `unavailable` and "no responders" always (nothing changed), and `timeout` only for
//! commands that carry a `request_id` (the registry deduplicates them).
//!
//! Following the leader: every reply names the leader as the answering node knows it
//! (`Warden-Leader`), and the client sends its next writes and reads to that node's own
//! subject, which saves the hop from whichever node the shared queue picks to the leader. A
//! node that no longer leads forwards as any node does; when the named node does not answer at
//! all, the client forgets it and goes back to the shared queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use serde_json::{json, Value};

use crate::bus::{self, RequestFailure};
use crate::protocol::{self, Encoding, Envelope, ErrorCode, WireError};
use crate::registry::{ImportPage, SubtreeDocument};
use crate::retry::Backoff;
use crate::subjects::Subjects;

use crate::limits::{
    CALL_ATTEMPT_FIRST_MS, CALL_ATTEMPT_MAX_MS, CALL_RETRY_MAX_MS, READ_ATTEMPT_MS,
};

/// A command client for one cluster.
#[derive(Clone)]
pub struct Client {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub encoding: Encoding,
    /// Total time one call may take, retries included.
    pub deadline: Duration,
    /// Send to this node's own subject instead of the shared queue.
    pub node: Option<u64>,
    /// Send writes and reads to the leader named by the last reply (when `node` is `None`).
    pub follow_leader: bool,
    /// The leader named by the last reply, plus one; 0 when unknown. Shared by clones.
    pub leader: Arc<AtomicU64>,
    /// The connection's permission violations (`bus::connect_watched`), when watched: a
    /// request that NATS refuses then fails at once with `forbidden`, instead of timing out.
    pub violations: Option<bus::Violations>,
    /// The tracer of the global OpenTelemetry provider as it was when the client was made:
    /// every call is a span of the caller's current context, sent on as `traceparent`. With
    /// no provider set it records nothing, and only a current span of the caller travels.
    pub tracer: Arc<opentelemetry::global::BoxedTracer>,
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The cluster answered with an error.
    Reply(WireError),
    /// No answer before the deadline: the outcome is unknown.
    NoAnswer(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Reply(e) => write!(f, "{e}"),
            CallError::NoAnswer(why) => write!(f, "no answer: {why}"),
        }
    }
}

impl std::error::Error for CallError {}

impl Client {
    /// A client with JSON encoding and a 10 s deadline.
    pub fn new(nats: async_nats::Client, cluster: &str) -> Client {
        Client {
            nats,
            subjects: Subjects::new(cluster),
            encoding: Encoding::Json,
            deadline: Duration::from_secs(10),
            node: None,
            follow_leader: true,
            leader: Arc::default(),
            violations: None,
            tracer: Arc::new(opentelemetry::global::tracer("warden-client")),
        }
    }

    /// The span of one call, a child of the caller's current context, and its `traceparent`
    /// in `headers` when it is part of a trace.
    fn span(&self, name: &str, headers: &mut HeaderMap) -> opentelemetry::Context {
        use opentelemetry::trace::{SpanBuilder, SpanKind, TraceContextExt, Tracer};
        let parent = opentelemetry::Context::current();
        let builder = SpanBuilder::from_name(name.to_string()).with_kind(SpanKind::Client);
        let cx = parent.with_span(self.tracer.build_with_context(builder, &parent));
        if cx.span().span_context().is_valid() {
            crate::traces::inject_into(&cx, headers);
        }
        cx
    }

    /// A client that turns NATS's refusals into `forbidden` errors.
    pub fn watched(nats: async_nats::Client, violations: bus::Violations, cluster: &str) -> Client {
        Client {
            violations: Some(violations),
            ..Client::new(nats, cluster)
        }
    }

    /// One request, failed at once with `forbidden` if NATS refuses it (its publish, or the
    /// subscription to this identity's inbox).
    pub async fn request(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: bytes::Bytes,
        wait: Duration,
    ) -> Result<Result<bus::Reply, RequestFailure>, CallError> {
        let mut rx = self.violations.as_ref().map(|v| v.subscribe());
        let refused = bus::refused(rx.as_mut(), &subject);
        let sent = bus::request(&self.nats, subject.clone(), Some(headers), payload, wait);
        tokio::select! {
            r = sent => Ok(r),
            v = refused => Err(CallError::Reply(WireError::new(
                ErrorCode::Forbidden,
                format!(
                    "NATS refused this identity: {} (docs/security.md says what each role may do)",
                    v.message
                ),
            ))),
        }
    }

    /// The leader named by the last reply, if any.
    pub fn known_leader(&self) -> Option<u64> {
        self.leader.load(Ordering::Relaxed).checked_sub(1)
    }

    fn learn_leader(&self, reply: &bus::Reply) {
        let named = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(protocol::LEADER_HINT))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        if let Some(id) = named {
            self.leader.store(id.saturating_add(1), Ordering::Relaxed);
        }
    }

    fn forget_leader(&self, id: u64) {
        // Only if no later reply named another meanwhile.
        let _ = self.leader.compare_exchange(
            id.saturating_add(1),
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Where `command` goes: the node asked for, else the known leader for what runs on the
    /// leader, else the shared queue. Returns the leader it targets, if it does.
    fn target(&self, command: &str) -> (String, Option<u64>) {
        if let Some(n) = self.node {
            return (self.subjects.node_cmd(n, command), None);
        }
        let on_leader = matches!(
            crate::command::route_of(command),
            Some(crate::command::Route::Read | crate::command::Route::Write)
        );
        match self
            .known_leader()
            .filter(|_| self.follow_leader && on_leader)
        {
            Some(l) => (self.subjects.node_cmd(l, command), Some(l)),
            None => (self.subjects.cmd(command), None),
        }
    }

    /// Sends `command` with `body` (an object), retrying what is safe until the deadline.
    pub async fn call(&self, command: &str, body: &Value) -> Result<Value, CallError> {
        // A read changes nothing, so a read that got no answer (it may have reached a paused
        // node of the queue group) is tried again, with a shorter wait per attempt.
        let read = matches!(
            crate::command::route_of(command),
            Some(
                crate::command::Route::Read
                    | crate::command::Route::Local
                    | crate::command::Route::History
            )
        );
        // Figures gather from other nodes for up to the node's forward timeout: one attempt
        // waits for that (a partial answer names the nodes that did not answer), and a
        // timeout is retried, since it changed nothing.
        let figures = crate::command::route_of(command) == Some(crate::command::Route::Figures);
        let retry_timeouts = read || figures || body.get("request_id").is_some();
        // A command that waits on the cluster (`wait_agent`, a spawn that waits for its first
        // start) gets its own wait and a little more.
        let waits = crate::command::route_of(command) == Some(crate::command::Route::Wait)
            || body.get("wait").and_then(Value::as_str) == Some("running");
        let deadline = match body.get("timeout_ms").and_then(Value::as_u64) {
            Some(ms) if waits => self
                .deadline
                .max(Duration::from_millis(ms) + Duration::from_secs(2)),
            _ => self.deadline,
        };
        let payload: bytes::Bytes = self.encoding.encode(body).into();
        let sent = Sent {
            encoding: self.encoding,
            read,
            retry_timeouts,
            // A history read is `unavailable` while JetStream is: say so now, not at the
            // deadline.
            retry_unavailable: crate::command::route_of(command)
                != Some(crate::command::Route::History),
            deadline,
        };
        self.send(command, payload, sent).await
    }

    /// Sends `command` with a typed `body` in MessagePack (bytes go as `bin`, not base64);
    /// `idempotent` says a retry after a timeout is safe.
    pub async fn call_msgpack(
        &self,
        command: &str,
        body: &impl serde::Serialize,
        idempotent: bool,
    ) -> Result<Value, CallError> {
        let payload = rmp_serde::to_vec_named(body)
            .map_err(|e| CallError::Reply(WireError::bad_request(e.to_string())))?;
        let sent = Sent {
            encoding: Encoding::Msgpack,
            read: false,
            retry_timeouts: idempotent,
            retry_unavailable: true,
            deadline: self.deadline,
        };
        self.send(command, payload.into(), sent).await
    }

    async fn send(
        &self,
        command: &str,
        payload: bytes::Bytes,
        sent: Sent,
    ) -> Result<Value, CallError> {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::CONTENT_TYPE, sent.encoding.content_type());
        let cx = self.span(command, &mut headers);
        let out = self.send_with(command, payload, sent, headers).await;
        ended(&cx, &out);
        out
    }

    async fn send_with(
        &self,
        command: &str,
        payload: bytes::Bytes,
        sent: Sent,
        headers: HeaderMap,
    ) -> Result<Value, CallError> {
        let Sent {
            encoding: _, // in `headers` already
            read,
            retry_timeouts,
            retry_unavailable,
            deadline,
        } = sent;
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(CallError::NoAnswer("deadline passed".into()));
            }
            let wait = if read {
                left.min(Duration::from_millis(READ_ATTEMPT_MS))
            } else {
                left
            };
            let (subject, leader) = self.target(command);
            let attempt = self
                .request(subject, headers.clone(), payload.clone(), wait)
                .await?;
            if let Ok(reply) = &attempt {
                self.learn_leader(reply);
            }
            let retryable = match attempt {
                Ok(reply) => match answer(&reply.payload, retry_timeouts, retry_unavailable)? {
                    Ok(v) => return Ok(v),
                    Err(why) => why,
                },
                Err(RequestFailure::NoResponders) => match leader {
                    // The leader we knew is gone and nothing reached it: ask the queue now.
                    Some(l) => {
                        self.forget_leader(l);
                        continue;
                    }
                    None => "no node answers".to_string(),
                },
                Err(RequestFailure::TimedOut) => {
                    // Paused or cut off: the next command tries the shared queue.
                    if let Some(l) = leader {
                        self.forget_leader(l);
                    }
                    if !read {
                        return Err(CallError::NoAnswer(
                            "timed out; the outcome is unknown".into(),
                        ));
                    }
                    "a node did not answer in time".into()
                }
                Err(e) => return Err(CallError::NoAnswer(e.to_string())),
            };
            if start.elapsed() + backoff.peek() >= deadline {
                return Err(CallError::NoAnswer(retryable));
            }
            backoff.wait().await;
        }
    }

    /// Every item of a paged listing (`list_agents`, `find_agents`, `list_supervisors`):
    /// sends `query` and follows each reply's `next` as `after`, collecting the `items` field.
    pub async fn all_pages(
        &self,
        command: &str,
        query: &Value,
        items: &str,
    ) -> Result<Vec<Value>, CallError> {
        let mut out = Vec::new();
        let mut q = query.clone();
        loop {
            let page = self.call(command, &q).await?;
            out.extend(page[items].as_array().into_iter().flatten().cloned());
            match page["next"].as_str() {
                Some(next) => q["after"] = Value::String(next.to_string()),
                None => return Ok(out),
            }
        }
    }

    /// Calls agent `agent` (id or name) with `body` until the deadline, retrying while it is
    /// not running or is moving (`unavailable`) and when an attempt gets no answer. Every
    /// attempt carries the same `Warden-Call-Id`, so the agent handles the call once even when
    /// a retry reaches it after the first attempt did.
    pub async fn call_agent(&self, agent: &str, body: &Value) -> Result<Value, CallError> {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::CONTENT_TYPE, self.encoding.content_type());
        let call_id = uuid::Uuid::new_v4().to_string();
        headers.insert(protocol::CALL_ID_HEADER, call_id.as_str());
        let cx = self.span("call_agent", &mut headers);
        let out = self.call_agent_with(agent, body, headers).await;
        ended(&cx, &out);
        out
    }

    async fn call_agent_with(
        &self,
        agent: &str,
        body: &Value,
        headers: HeaderMap,
    ) -> Result<Value, CallError> {
        let start = Instant::now();
        let payload: bytes::Bytes = self.encoding.encode(body).into();
        let subject = self.subjects.agent(agent, "call");
        // Short, flat retries: a migrating agent is back within milliseconds.
        let mut backoff = Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(CALL_RETRY_MAX_MS),
        );
        // An attempt lost while the agent moved is retried soon; a slow agent gets more time
        // per attempt, and its retries are answered from its memory of the call id.
        let mut attempt_wait = Duration::from_millis(CALL_ATTEMPT_FIRST_MS);
        loop {
            let left = self.deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(CallError::NoAnswer("deadline passed".into()));
            }
            let attempt = self
                .request(
                    subject.clone(),
                    headers.clone(),
                    payload.clone(),
                    left.min(attempt_wait),
                )
                .await?;
            let retryable = match attempt {
                Ok(reply) => match answer(&reply.payload, false, true)? {
                    Ok(v) => return Ok(v),
                    Err(why) => why,
                },
                Err(RequestFailure::NoResponders) => "no node answers".to_string(),
                // Lost while the agent moved, or the agent is slow: the call id makes the
                // retry safe.
                Err(RequestFailure::TimedOut) => {
                    attempt_wait =
                        (attempt_wait * 2).min(Duration::from_millis(CALL_ATTEMPT_MAX_MS));
                    "no answer yet".to_string()
                }
                Err(e) => return Err(CallError::NoAnswer(e.to_string())),
            };
            if start.elapsed() + backoff.peek() >= self.deadline {
                return Err(CallError::NoAnswer(retryable));
            }
            backoff.wait().await;
        }
    }
}

/// Ends a call's span, failed if the call did.
fn ended(cx: &opentelemetry::Context, out: &Result<Value, CallError>) {
    use opentelemetry::trace::{Status, TraceContextExt};
    let span = cx.span();
    if let Err(e) = out {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}

/// How a request is sent and retried.
struct Sent {
    encoding: Encoding,
    /// A read: tried again after no answer, with a shorter wait per attempt.
    read: bool,
    /// A timeout may be retried (a read, or a write the registry deduplicates).
    retry_timeouts: bool,
    /// `unavailable` is retried (no leader yet), until the deadline.
    retry_unavailable: bool,
    deadline: Duration,
}

/// Reads a reply: its result, a reason to retry (`unavailable` when `retry_unavailable`, and
/// `timeout` when `retry_timeouts`: nothing changed, or the retry is deduplicated), or a final
/// error.
fn answer(
    payload: &[u8],
    retry_timeouts: bool,
    retry_unavailable: bool,
) -> Result<Result<Value, String>, CallError> {
    let env = Envelope::decode(payload).map_err(CallError::Reply)?;
    match env.into_result() {
        Ok(v) => Ok(Ok(v)),
        Err(e) if e.code == ErrorCode::Unavailable && retry_unavailable => Ok(Err(e.to_string())),
        Err(e) if e.code == ErrorCode::Timeout && retry_timeouts => Ok(Err(e.to_string())),
        Err(e) => Err(CallError::Reply(e)),
    }
}

/// Times `import_subtree` asks again for a commit whose outcome it does not know, and sends a
/// page again that got no answer.
const COMMIT_TRIES: usize = 30;
const PAGE_TRIES: usize = 5;

impl Client {
    /// The document of supervisor `name`'s subtree (`export_subtree`), every page of one export
    /// gathered: the subtree as of one moment on the leader.
    pub async fn export_subtree(&self, name: &str) -> Result<SubtreeDocument, CallError> {
        let bad = |what: &str| CallError::Reply(WireError::new(ErrorCode::Internal, what));
        // The export is named here, so that a retry of the first page finds the copy the first
        // attempt made instead of taking another.
        let mut query = json!({ "name": name, "export": uuid::Uuid::new_v4() });
        let mut doc: Option<SubtreeDocument> = None;
        loop {
            let page = self.call("export_subtree", &query).await?;
            let mut head: SubtreeDocument = serde_json::from_value(page["document"].clone())
                .map_err(|e| bad(&format!("an export page's document: {e}")))?;
            let items = |field: &str| page[field].as_array().cloned().unwrap_or_default();
            for s in items("supervisors") {
                head.supervisors.push(
                    serde_json::from_value(s).map_err(|e| bad(&format!("a supervisor: {e}")))?,
                );
            }
            for a in items("agents") {
                head.agents
                    .push(serde_json::from_value(a).map_err(|e| bad(&format!("an agent: {e}")))?);
            }
            let whole = match &mut doc {
                Some(d) => {
                    d.supervisors.append(&mut head.supervisors);
                    d.agents.append(&mut head.agents);
                    d
                }
                None => doc.insert(head),
            };
            if let Some(cursor) = page["next"].as_u64() {
                query = json!({ "name": name, "export": page["export"], "cursor": cursor });
                continue;
            }
            let count = &page["count"];
            if count["supervisors"].as_u64() != Some(whole.supervisors.len() as u64)
                || count["agents"].as_u64() != Some(whole.agents.len() as u64)
            {
                return Err(bad("the export's pages do not add up to its count"));
            }
            return doc.ok_or_else(|| bad("an export without pages"));
        }
    }

    /// Imports `doc` under `parent` (default `root`) with `prefix` on every name: staged page
    /// by page (`import_begin`, `import_page`, `import_commit`), so a document of any size
    /// up to the import limits goes. A refused page or commit aborts the import (the cluster
    /// is as it was); a commit whose answer was lost is asked again, never aborted. Answers
    /// the commit's reply.
    pub async fn import_subtree(
        &self,
        doc: &SubtreeDocument,
        parent: Option<&str>,
        prefix: &str,
    ) -> Result<Value, CallError> {
        doc.header().check().map_err(CallError::Reply)?;
        let begin = json!({
            "parent": parent,
            "prefix": prefix,
            "header": doc.header(),
            "request_id": uuid::Uuid::new_v4().to_string(),
        });
        let begun = self.call("import_begin", &begin).await?;
        let import = begun["import"].clone();
        if let Err(e) = self.stage(doc, &import).await {
            // Best effort: an import left staged is dropped after `IMPORT_TTL_SECS` anyway.
            let _ = self
                .call("import_abort", &json!({ "import": import }))
                .await;
            return Err(e);
        }
        let commit = json!({
            "import": import,
            "supervisors": doc.supervisors.len(),
            "agents": doc.agents.len(),
            "request_id": uuid::Uuid::new_v4().to_string(),
        });
        // A large commit may outlast a call's deadline. Its outcome is then unknown, not failed:
        // it is asked again with the same request_id (answered as it was decided), a bounded
        // number of times, and never aborted.
        let mut tries = 0;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            match self.call("import_commit", &commit).await {
                Err(CallError::NoAnswer(why)) if tries < COMMIT_TRIES => {
                    tries += 1;
                    tracing::debug!("import_commit: no answer yet ({why}); asking again");
                    backoff.wait().await;
                }
                // Asked again after an unknown outcome and the stage is gone: committed (its
                // request_id forgotten since) or dropped; the tree says which.
                Err(CallError::Reply(e)) if tries > 0 && e.code == ErrorCode::NotFound => {
                    let top = format!("{prefix}{}", doc.root);
                    let tree = json!({ "name": top });
                    return match self.call("get_supervision_tree", &tree).await {
                        Ok(_) => Ok(json!({
                            "supervisor": top,
                            "supervisors": doc.supervisors.len(),
                            "agents": doc.agents.len(),
                        })),
                        Err(_) => Err(CallError::Reply(e)),
                    };
                }
                Err(CallError::Reply(e)) if e.code != ErrorCode::Timeout => {
                    let _ = self
                        .call("import_abort", &json!({ "import": import }))
                        .await;
                    return Err(CallError::Reply(e));
                }
                other => return other,
            }
        }
    }

    /// Sends one page of a staged import, again after no answer (a page is staged once by
    /// its number), a bounded number of times.
    async fn send_page(&self, page: &ImportPage) -> Result<Value, CallError> {
        let mut tries = 0;
        loop {
            match self.call_msgpack("import_page", page, true).await {
                Err(CallError::NoAnswer(_)) if tries < PAGE_TRIES => tries += 1,
                other => return other,
            }
        }
    }

    async fn stage(&self, doc: &SubtreeDocument, import: &Value) -> Result<(), CallError> {
        let id: uuid::Uuid = serde_json::from_value(import.clone()).map_err(|e| {
            CallError::Reply(WireError::new(
                ErrorCode::Internal,
                format!("import id: {e}"),
            ))
        })?;
        let mut page = ImportPage {
            import: id,
            page: 0,
            supervisors: Vec::new(),
            agents: Vec::new(),
            request_id: None,
        };
        let mut used = 0;
        // Each item weighs what it encodes to, plus a little for the page's framing.
        let weigh = |x: Result<Vec<u8>, rmp_serde::encode::Error>| x.map_or(0, |v| v.len()) + 16;
        let items = doc
            .supervisors
            .iter()
            .map(|s| (Some(s), None))
            .chain(doc.agents.iter().map(|a| (None, Some(a))));
        for (sup, agent) in items {
            let weight = match (sup, agent) {
                (Some(s), _) => weigh(rmp_serde::to_vec_named(s)),
                (_, Some(a)) => weigh(rmp_serde::to_vec_named(a)),
                _ => 0,
            };
            if used > 0 && used + weight > crate::limits::IMPORT_PAGE_BYTES {
                self.send_page(&page).await?;
                page.page += 1;
                page.supervisors.clear();
                page.agents.clear();
                used = 0;
            }
            used += weight;
            page.supervisors.extend(sup.cloned());
            page.agents.extend(agent.cloned());
        }
        if used > 0 {
            self.send_page(&page).await?;
        }
        Ok(())
    }
}
