//! Lifecycle events on `warden.<cluster>.evt.<entity>.<id>.<event>`.
//!
//! Every node applies every committed entry, but only the node that is leader when it applies
//! one publishes its events, so each event is normally published once. Around a leader change
//! an event can be published twice or not at all: events carry a per-entity `seq` so that
//! consumers can drop duplicates and notice gaps, and the registry stays the source of truth.
//! Events are JSON, the most widely readable encoding.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::raft::typ::ServerMetrics;
use crate::registry::RegistryEvent;
use crate::subjects::Subjects;

/// Version of the event format, carried as `v`.
pub const EVENT_VERSION: u32 = 1;

/// An event as published.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    pub v: u32,
    pub event: &'a str,
    pub entity: &'a str,
    pub id: &'a str,
    pub time: DateTime<Utc>,
    /// The publishing node.
    pub node: u64,
    pub epoch: u64,
    pub seq: u64,
    pub data: &'a Value,
}

/// Publishes registry events while this node leads, and `leader_changed` when it becomes
/// leader; every batch applied, led or not, is shown to `applied` first. Runs until
/// `stopped` resolves.
pub async fn publish_loop(
    client: async_nats::Client,
    subjects: Subjects,
    node: u64,
    mut metrics: watch::Receiver<ServerMetrics>,
    mut events: mpsc::Receiver<Vec<RegistryEvent>>,
    applied: impl Fn(&[RegistryEvent]),
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut announced_term = None;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            batch = events.recv() => {
                let Some(batch) = batch else { break };
                applied(&batch);
                // Read what we need and drop the borrow at once: holding it blocks Raft.
                let leading = metrics.borrow().state == openraft::ServerState::Leader;
                if !leading {
                    continue;
                }
                for e in &batch {
                    let ev = Event {
                        v: EVENT_VERSION,
                        event: e.event,
                        entity: e.entity,
                        id: &e.id,
                        time: e.time,
                        node,
                        epoch: e.epoch,
                        seq: e.seq,
                        data: &e.data,
                    };
                    publish(&client, &subjects, &ev).await;
                }
            }
            changed = metrics.changed() => {
                if changed.is_err() {
                    break;
                }
                let (state, term) = {
                    let m = metrics.borrow();
                    (m.state, m.vote.leader_id().term)
                };
                if state == openraft::ServerState::Leader && announced_term != Some(term) {
                    announced_term = Some(term);
                    let data = json!({ "leader": node, "term": term });
                    let ev = Event {
                        v: EVENT_VERSION,
                        event: "leader_changed",
                        entity: "node",
                        id: &node.to_string(),
                        time: Utc::now(),
                        node,
                        epoch: term,
                        seq: term,
                        data: &data,
                    };
                    publish(&client, &subjects, &ev).await;
                }
            }
        }
    }
}

/// Publishes one event on its subject (`evt.<entity>.<id>.<event>`). The one way any part of a
/// node publishes an event.
pub async fn publish(client: &async_nats::Client, subjects: &Subjects, ev: &Event<'_>) {
    let subject = subjects.event(ev.entity, ev.id, ev.event);
    // Events are best effort by design (see the module doc): a failed publish is logged.
    match serde_json::to_vec(ev) {
        Ok(body) => {
            if let Err(e) = client.publish(subject, body.into()).await {
                tracing::warn!(error = %e, "could not publish an event");
            }
        }
        Err(e) => tracing::error!(error = %e, "could not encode an event"),
    }
}
