//! Reading a history back: `agent_history` and `supervisor_history`.
//!
//! A query is an ephemeral pull consumer on the stream with one filter subject (nats-server
//! 2.9 takes one), deleted when done. Without `since` it answers the latest `limit` events:
//! it starts a window of sequences back from the stream's end, widened until the filter finds
//! that many (or the window covers the stream) and narrowed while it finds more than a query
//! reads, so a long history is not read from its beginning. With `since` it answers the first
//! `limit` events at or after that time. Either way oldest first, at most
//! `limits::HISTORY_SCAN` messages read, with the `gap` events of the same span (a second
//! consumer: gaps are the cluster's, filed under no supervisor).

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
    let first = state.first_sequence.max(1);
    let config = |filter: &str, deliver_policy| consumer::pull::Config {
        filter_subject: filter.to_string(),
        deliver_policy,
        ack_policy: consumer::AckPolicy::None,
        inactive_threshold: Duration::from_secs(30),
        memory_storage: true,
        ..Default::default()
    };
    let deliver = match q.since {
        // The stream stores a message after its event happened, by the NATS server's clock:
        // start a margin earlier for clocks apart, and keep what is at or after `since` by the
        // events' own time.
        Some(since) => consumer::DeliverPolicy::ByStartTime {
            start_time: since - chrono::Duration::seconds(SINCE_MARGIN_S),
        },
        None => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: latest_start(&stream, q, state.last_sequence, first, &config).await?,
        },
    };
    let consumer = create(&stream, config(&q.filter, deliver)).await?;
    let pending = consumer.cached_info().num_pending;
    let name = consumer.cached_info().name.clone();
    let answer = drain(&consumer, pending, q).await;
    let _ = stream.delete_consumer(&name).await;
    let (mut events, partial) = answer?;
    // Gaps are the cluster's, not one entity's: read those in the same range too, and put
    // them among the events by position.
    let gaps_filter = subjects.history(None, "history", "*", "gap");
    let gaps = create(&stream, config(&gaps_filter, deliver)).await?;
    let pending = gaps.cached_info().num_pending;
    let name = gaps.cached_info().name.clone();
    let all_gaps = Query {
        filter: gaps_filter,
        limit: limits::HISTORY_MAX_LIMIT,
        since: q.since,
    };
    let found = drain(&gaps, pending, &all_gaps).await;
    let _ = stream.delete_consumer(&name).await;
    let (gaps, _) = found?;
    let position = |e: &Value| {
        (
            e["index"].as_u64().unwrap_or(0),
            e["pos"].as_u64().unwrap_or(0),
        )
    };
    // A gap may hide events of the entity anywhere in the span read: all of them when the
    // answer holds everything found there, else those from its first event on.
    let lo = match events.len() >= q.limit {
        true => events.first().map(position),
        false => None,
    };
    events.extend(
        gaps.into_iter()
            .filter(|g| lo.is_none_or(|lo| position(g) >= lo)),
    );
    events.sort_by_key(position);
    Ok(json!({ "events": events, "partial": partial }))
}

/// The events' time may be this far before the NATS server's clock when it stores them.
const SINCE_MARGIN_S: i64 = 60;

/// Probes (consumers made and deleted) a `latest` query spends finding its window.
const WINDOW_PROBES: usize = 24;

/// Where a `latest limit` query starts: a window of sequences back from the stream's end
/// that holds at least `limit` of the filter's events (or the whole stream), and at most
/// `limits::HISTORY_SCAN` (narrowed by halves between the last window too small and the
/// first large enough), so the query reads the latest events and not older ones.
async fn latest_start(
    stream: &jetstream::stream::Stream,
    q: &Query,
    last: u64,
    first: u64,
    config: &impl Fn(&str, consumer::DeliverPolicy) -> consumer::pull::Config,
) -> Result<u64, WireError> {
    let start_of = |window: u64| last.saturating_sub(window).saturating_add(1).max(first);
    let count = |window: u64| {
        let cfg = config(
            &q.filter,
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_of(window),
            },
        );
        async move {
            let c = create(stream, cfg).await?;
            let found = c.cached_info().num_pending;
            let _ = stream.delete_consumer(&c.cached_info().name).await;
            Ok::<u64, WireError>(found)
        }
    };
    let (want, scan) = (q.limit as u64, limits::HISTORY_SCAN as u64);
    let mut probes = 0;
    let (mut small, mut window) = (0u64, want.saturating_mul(4).max(64));
    // Widen until the window holds `limit`, or covers the stream.
    let mut found = count(window).await?;
    probes += 1;
    while found < want && start_of(window) > first && probes < WINDOW_PROBES {
        small = window;
        window = window.saturating_mul(8);
        found = count(window).await?;
        probes += 1;
    }
    // Narrow while it holds more than one query reads.
    let mut large = window;
    while found > scan && large - small > 1 && probes < WINDOW_PROBES {
        let mid = small + (large - small) / 2;
        let f = count(mid).await?;
        probes += 1;
        if f >= want {
            (large, found) = (mid, f);
        } else {
            small = mid;
        }
    }
    Ok(start_of(large))
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

/// Reads the consumer's `pending` messages (at most `limits::HISTORY_SCAN`), keeping what
/// the query answers: with `since`, the first `limit` at or after it; without, the last
/// `limit`. Also whether the scan bound may have cut the answer short.
async fn drain(
    consumer: &consumer::Consumer<consumer::pull::Config>,
    pending: u64,
    q: &Query,
) -> Result<(Vec<Value>, bool), WireError> {
    let want = pending.min(limits::HISTORY_SCAN as u64);
    let mut kept: VecDeque<Value> = VecDeque::new();
    let mut got = 0u64;
    let full = |kept: &VecDeque<Value>| q.since.is_some() && kept.len() >= q.limit;
    while got < want && !full(&kept) {
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
                if time.is_some_and(|t| t < since) || kept.len() >= q.limit {
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
    let partial = pending > want && !full(&kept);
    Ok((Vec::from(kept), partial))
}
