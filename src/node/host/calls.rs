//! Calls and casts to the agents of this node (`agent.<id-or-name>.call|cast`), and the
//! answers and events the host sends. Routing never waits on an agent: a message is queued in
//! the agent's mailbox (waking it if it is parked) or refused at once.

use async_nats::HeaderMap;
use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use super::task::Msg;
use super::Host;
use crate::agent::mailbox::Refused;
use crate::events::{self, Event, EVENT_VERSION};
use crate::metrics::Refusal;
use crate::node::Node;
use crate::protocol::{
    self, Encoding, Envelope, ErrorCode, WireError, CALL_ID_HEADER, EPOCH_HEADER,
};
use crate::registry::AgentStatus;
use crate::traces::Span;

impl Host {
    /// Routes a call or cast to the local instance, or answers for agents nobody runs.
    pub(super) async fn route(&mut self, msg: async_nats::Message) {
        let Some((target, op)) = self.node.subjects.parse_agent(&msg.subject) else {
            return;
        };
        let placed = {
            let st = self.node.state_read();
            st.registry.agent(target).map(|a| (a.id, a.node, a.status))
        };
        let ct = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(protocol::CONTENT_TYPE))
            .map(|v| v.to_string());
        let enc = Encoding::detect(ct.as_deref(), &msg.payload).unwrap_or(Encoding::Json);
        // A reply subject inside the Warden space would make this node publish where the
        // caller chose (an event, a cast): such a call is dropped.
        let reply = msg
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .filter(|r| crate::subjects::Subjects::is_client_reply(r));
        let answer = |why: Refusal, err: WireError| {
            let node = self.node.clone();
            let reply = reply.clone();
            async move {
                // Counted when a caller is told: a cast, or a call nobody may be answered on,
                // is dropped.
                if let Some(r) = reply {
                    node.metrics.call_refused(why);
                    send_envelope(&node, r, enc, None, Err(err)).await;
                }
            }
        };
        let (id, status) = match placed {
            // Cut off from the leader, this node cannot know whether the agent still runs
            // here: it was fenced when the lease ran out, and the leader may have placed it
            // elsewhere, whose node answers. A refusal from here would race that answer.
            Some((_, Some(n), _)) if n == self.me && self.node.cut_off().is_some() => return,
            Some((id, Some(n), status)) if n == self.me => (id, status),
            Some(_) => return, // the node it is placed on answers
            None => {
                // Unknown everywhere: the leader says so, the others stay quiet (and so does
                // a leader cut off from its majority, whose registry may be behind).
                if self.node.is_leader() && self.node.cut_off().is_none() {
                    let why = format!("no agent {target:?}");
                    answer(Refusal::NotFound, WireError::new(ErrorCode::NotFound, why)).await;
                }
                return;
            }
        };
        let body = match enc.decode(&msg.payload) {
            Ok(b) => b,
            Err(e) => return answer(Refusal::BadRequest, e).await,
        };
        if status == AgentStatus::Migrating {
            let why = format!("agent {target:?} is moving to another node; retry");
            return answer(Refusal::Moving, WireError::new(ErrorCode::Unavailable, why)).await;
        }
        let Some(inst) = self.instances.get(&id) else {
            let why = format!("agent {target:?} is not running (status {status:?}); retry shortly");
            return answer(
                Refusal::NotRunning,
                WireError::new(ErrorCode::Unavailable, why),
            )
            .await;
        };
        if !self.node.lease.valid_in(inst.lease_term) {
            let why = format!(
                "node {} lost its lease; the agent may be moving; retry",
                self.me
            );
            return answer(
                Refusal::LeaseLost,
                WireError::new(ErrorCode::Unavailable, why),
            )
            .await;
        }
        let asked_epoch = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(EPOCH_HEADER))
            .and_then(|v| v.as_str().parse::<u64>().ok());
        if let Some(e) = asked_epoch.filter(|e| *e != inst.epoch) {
            let why = format!(
                "stale epoch: the call is for epoch {e}, the agent runs at epoch {}",
                inst.epoch
            );
            return answer(
                Refusal::StaleEpoch,
                WireError::new(ErrorCode::Conflict, why),
            )
            .await;
        }
        let m = match (op, reply.clone()) {
            ("call", Some(reply)) => {
                let call_id = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(CALL_ID_HEADER))
                    .map(|v| v.as_str().to_string())
                    .filter(|v| !v.is_empty() && v.len() <= crate::limits::MAX_REQUEST_ID_LEN);
                let span = match &self.node.traces {
                    Some(t) => {
                        let parent = msg
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(crate::traces::TRACEPARENT))
                            .map(|v| v.as_str());
                        t.take(|| "agent call".into(), parent)
                    }
                    None => Span::none(),
                };
                if span.is_recording() {
                    span.set("warden.agent", id.to_string());
                    span.set("warden.epoch", inst.epoch as i64);
                }
                Msg::Call {
                    body,
                    reply,
                    enc,
                    call_id,
                    span,
                }
            }
            ("cast", _) => Msg::Cast { body },
            ("call", None) => return,
            _ => {
                let err = WireError::new(ErrorCode::BadRequest, "use .call or .cast");
                return answer(Refusal::BadRequest, err).await;
            }
        };
        match inst.mailbox.push(Box::new(m)) {
            Ok(None) => {}
            Ok(Some(parked)) => self.wake(id, parked),
            Err(Refused::Full(_)) => {
                let why = "the agent's mailbox is full; retry";
                answer(
                    Refusal::MailboxFull,
                    WireError::new(ErrorCode::Unavailable, why),
                )
                .await
            }
            Err(Refused::Closed(_)) => {
                let why = format!("agent {target:?} is restarting or stopping; retry shortly");
                answer(
                    Refusal::Stopping,
                    WireError::new(ErrorCode::Unavailable, why),
                )
                .await
            }
        }
    }

    /// Publishes a line an agent logged as a `log` event.
    pub(super) async fn publish_log(&mut self, id: Uuid, line: String) {
        let seq = self.log_seq.entry(id).or_default();
        *seq += 1;
        let epoch = self.instances.get(&id).map_or(0, |i| i.epoch);
        let data = json!({ "line": line });
        let ids = id.to_string();
        let ev = Event {
            v: EVENT_VERSION,
            event: "log",
            entity: "agent",
            id: &ids,
            time: Utc::now(),
            node: self.me,
            epoch,
            seq: *seq,
            data: &data,
        };
        events::publish(&self.node.client, &self.node.subjects, &ev).await;
    }

    /// Says that supervisor `sup` gave up and escalated to `parent`.
    pub(super) async fn publish_escalated(&self, sup: &str, parent: &str) {
        let data = json!({ "supervisor": sup, "parent": parent });
        let ev = Event {
            v: EVENT_VERSION,
            event: "escalated",
            entity: "supervisor",
            id: sup,
            time: Utc::now(),
            node: self.me,
            epoch: 0,
            seq: 0,
            data: &data,
        };
        events::publish(&self.node.client, &self.node.subjects, &ev).await;
    }
}

/// Answers a call with the envelope of `result`, naming the agent's epoch when known.
/// Returns the body's size, which is what remembering the answer costs.
pub(super) async fn send_envelope(
    node: &Node,
    reply: String,
    enc: Encoding,
    epoch: Option<u64>,
    result: Result<Value, WireError>,
) -> usize {
    let mut headers = HeaderMap::new();
    headers.insert(protocol::CONTENT_TYPE, enc.content_type());
    if let Some(e) = epoch {
        headers.insert(EPOCH_HEADER, e.to_string().as_str());
    }
    let body = enc.encode(&Envelope::from_result(result));
    let size = body.len();
    if let Err(e) = node
        .client
        .publish_with_headers(reply, headers, body.into())
        .await
    {
        tracing::debug!(error = %e, "could not answer an agent call");
    }
    size
}
