//! Reading a history back: `agent_history` and `supervisor_history`.
//!
//! A query is an ephemeral pull consumer on the stream with one filter subject (nats-server
//! 2.9 takes one), deleted when done. Without `since` it answers the latest `limit` events:
//! it starts `limit` times a widening window of sequences before the stream's end until the
//! filter finds that many (or the window reaches the stream's start), so a long history is not
//! read from its beginning. With `since` it answers the first `limit` events at or after that
//! time. Either way oldest first, and at most `limits::HISTORY_SCAN` messages read.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::limits;
use crate::protocol::{ErrorCode, WireError};
use crate::subjects::Subjects;

/// How long a query may take in all.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What to read.
pub struct Query {
    /// The consumer's filter subject (`Subjects::history_of_agent` or `history_of_supervisor`).
    pub filter: String,
    pub limit: usize,
    pub since: Option<DateTime<Utc>>,
}

fn unavailable(why: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Unavailable, why.to_string())
}

/// The error for a failed JetStream request: unavailable, saying what to do.
fn js_error(what: &str, e: impl std::fmt::Display) -> WireError {
    let text = e.to_string();
    // nats-server 2.9 without JetStream answers its API with "requested JetStream resource
    // does not exist" (or nobody answers it).
    if text.contains("no responders")
        || text.contains("not enabled")
        || text.contains("resource does not exist")
    {
        unavailable(format!(
            "the history needs JetStream, which this NATS server does not offer: start \
             nats-server with JetStream (-js); everything else works without it ({what}: {text})"
        ))
    } else {
        unavailable(format!("{what}: {text}"))
    }
}

/// Answers `{events: [...], partial}`: `partial` when the scan bound cut the answer short.
pub async fn read(
    js: &jetstream::Context,
    subjects: &Subjects,
    q: Query,
) -> Result<Value, WireError> {
    match tokio::time::timeout(QUERY_TIMEOUT, read_inner(js, subjects, &q)).await {
        Ok(answer) => answer,
        Err(_) => Err(WireError::new(
            ErrorCode::Timeout,
            format!(
                "reading the history took over {} s",
                QUERY_TIMEOUT.as_secs()
            ),
        )),
    }
}

async fn read_inner(
    js: &jetstream::Context,
    subjects: &Subjects,
    q: &Query,
) -> Result<Value, WireError> {
    let mut stream = js
        .get_stream(subjects.history_stream())
        .await
        .map_err(|e| {
            if e.to_string().contains("stream not found") {
                unavailable(
                    "the history stream does not exist yet: the leader creates it once it runs \
                 with JetStream",
                )
            } else {
                js_error("read the history stream", e)
            }
        })?;
    let state = stream
        .info()
        .await
        .map_err(|e| js_error("read the history stream", e))?
        .state
        .clone();
    let mut config = consumer::pull::Config {
        filter_subject: q.filter.clone(),
        ack_policy: consumer::AckPolicy::None,
        inactive_threshold: Duration::from_secs(30),
        memory_storage: true,
        ..Default::default()
    };
    let mut consumer;
    if let Some(since) = q.since {
        config.deliver_policy = consumer::DeliverPolicy::ByStartTime { start_time: since };
        consumer = create(&stream, config).await?;
    } else {
        // The latest `limit`: widen a window back from the stream's end until it holds them.
        let mut window = (q.limit as u64).saturating_mul(4).max(64);
        loop {
            let start = state
                .last_sequence
                .saturating_sub(window)
                .max(state.first_sequence)
                .max(1);
            config.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
            consumer = create(&stream, config.clone()).await?;
            let found = consumer.cached_info().num_pending;
            if found >= q.limit as u64 || start <= state.first_sequence.max(1) {
                break;
            }
            let name = consumer.cached_info().name.clone();
            let _ = stream.delete_consumer(&name).await;
            window = window.saturating_mul(8);
        }
    }
    let pending = consumer.cached_info().num_pending;
    let name = consumer.cached_info().name.clone();
    let answer = drain(&consumer, pending, q).await;
    // Best effort: it goes by itself once inactive anyway.
    let _ = stream.delete_consumer(&name).await;
    answer
}

async fn create(
    stream: &jetstream::stream::Stream,
    config: consumer::pull::Config,
) -> Result<consumer::Consumer<consumer::pull::Config>, WireError> {
    stream
        .create_consumer(config)
        .await
        .map_err(|e| js_error("read the history", e))
}

/// Reads the consumer's `pending` messages, keeping what the query answers.
async fn drain(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    pending: u64,
    q: &Query,
) -> Result<Value, WireError> {
    let want = pending.min(limits::HISTORY_SCAN as u64);
    let mut kept: VecDeque<Value> = VecDeque::new();
    let mut got = 0u64;
    // With `since`, the first `limit` (by the events' own time: a message is stored after its
    // event happened, so the stream's start time finds them all, and some before); without,
    // the last `limit` of what the window holds.
    while got < want && !(q.since.is_some() && kept.len() >= q.limit) {
        let batch = (want - got).min(256) as usize;
        let mut messages = consumer
            .fetch()
            .max_messages(batch)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .map_err(|e| js_error("read the history", e))?;
        let mut this_batch = 0;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| js_error("read the history", e))?;
            this_batch += 1;
            got += 1;
            let event: Value = serde_json::from_slice(&m.payload).unwrap_or_else(
                |_| json!({ "event": "unreadable", "subject": m.subject.to_string() }),
            );
            if let Some(since) = q.since {
                let time = event["time"]
                    .as_str()
                    .and_then(|t| t.parse::<DateTime<Utc>>().ok());
                if time.is_some_and(|t| t < since) {
                    continue;
                }
                if kept.len() >= q.limit {
                    continue;
                }
            }
            kept.push_back(event);
            if kept.len() > q.limit {
                kept.pop_front();
            }
        }
        if this_batch == 0 {
            // Pruned meanwhile (max_age, max_msgs): what is left is read.
            break;
        }
    }
    Ok(json!({
        "events": Vec::from(kept),
        "partial": pending > want,
    }))
}
