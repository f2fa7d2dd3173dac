//! The leader's publisher into the history stream, and every node's pruning of its outbox.
//!
//! A leader creates the stream if it is missing, reads where the stream ends (the position
//! in its last message's `Nats-Msg-Id`), and publishes its outbox from there, each message
//! with `Nats-Msg-Id` = its position and `Nats-Expected-Last-Sequence` = the sequence the
//! stream must end at, up to `WINDOW` acknowledgements outstanding. A deposed leader still
//! publishing, or a publish whose answer was lost, makes the next expectation fail: the
//! publisher then reads the stream's end again and resumes after it. Both leaders derive the
//! same events from the same log, so whichever published a position, it is there once.
//!
//! Why the expected sequence and not `Nats-Expected-Last-Msg-Id`: nats-server (2.9 up to
//! late 2026, nats-server#8564) restores a stream's last message id after a restart only if
//! that message is still within the duplicate window, after which every expectation of it
//! fails; the last sequence is durable.
//!
//! A node that does not lead reads the stream's end every `PRUNE_EVERY` and removes from its
//! outbox what the stream holds.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use tokio::sync::watch;

use super::outbox::{misses, Outbox, Pos, Record, Stored};
use super::{msg_id, parse_msg_id, HistoryConfig};
use crate::subjects::Subjects;

/// Acknowledgements the leader waits for at most at once.
const WINDOW: usize = 256;
/// How much of the outbox one read takes.
const READ_BYTES: usize = 1 << 20;
/// How often a node that does not lead prunes its outbox.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How long a JetStream request or acknowledgement may take.
pub const JS_TIMEOUT: Duration = Duration::from_secs(5);

/// The JetStream context of a node's connection, with its timeouts.
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(JS_TIMEOUT)
        .ack_timeout(JS_TIMEOUT)
        .max_ack_inflight(WINDOW * 2)
        .build(client)
}

/// Why a round of publishing ended.
#[derive(Debug)]
enum Ended {
    /// This node no longer leads.
    NotLeading,
    /// The stream ended elsewhere than expected: read it again at once.
    Moved(String),
    /// JetStream failed: wait, then try again.
    Failed(String),
}

/// Runs until `stopped`: publishes while `leading`, prunes otherwise.
pub async fn run(
    client: async_nats::Client,
    subjects: Subjects,
    cfg: HistoryConfig,
    outbox: Arc<Outbox>,
    mut leading: watch::Receiver<bool>,
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let js = context(client);
    let mut backoff =
        crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    // Moved rounds in a row wait more and more: two publishers (a deposed leader) must not
    // spin against JetStream.
    let mut moved = crate::retry::Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
    let mut warned = false;
    loop {
        let round = async {
            if *leading.borrow_and_update() {
                lead(&js, &subjects, &cfg, &outbox, &leading).await
            } else {
                match stream_end(&js, &subjects).await {
                    Ok((_, Some(at))) => prune(&outbox, at).await,
                    Ok((_, None)) => {}
                    Err(e) => return Ended::Failed(e),
                }
                // Until this node leads, or it is time to prune again.
                let _ = tokio::time::timeout(PRUNE_EVERY, leading.changed()).await;
                Ended::NotLeading
            }
        };
        let ended = tokio::select! {
            _ = &mut stopped => return,
            ended = round => ended,
        };
        let pause = match ended {
            Ended::NotLeading => {
                backoff.reset();
                moved.reset();
                continue;
            }
            Ended::Moved(why) => {
                tracing::info!(%why, "the history stream moved on; reading its end again");
                moved.next_pause()
            }
            Ended::Failed(why) => {
                if !warned {
                    tracing::warn!(
                        %why,
                        "the history stream is unavailable (is nats-server running with \
                         JetStream, -js?); events wait in the outbox"
                    );
                    warned = true;
                }
                backoff.next_pause()
            }
        };
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The stream's configuration from the node's.
pub fn stream_config(subjects: &Subjects, cfg: &HistoryConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: subjects.history_stream(),
        subjects: vec![subjects.history_all()],
        max_messages: cfg.max_msgs,
        max_bytes: cfg.max_bytes,
        max_age: Duration::from_secs(cfg.max_age_s),
        num_replicas: cfg.replicas,
        storage: jetstream::stream::StorageType::File,
        discard: jetstream::stream::DiscardPolicy::Old,
        // Deduplication by message id within two minutes (nats-server's default), never longer
        // than messages are kept (the server refuses that).
        duplicate_window: match cfg.max_age_s {
            0 => Duration::from_secs(120),
            age => Duration::from_secs(age.min(120)),
        },
        ..Default::default()
    }
}

/// The stream's last sequence and the position of its last message (none if the stream is
/// empty, or its last message aged out).
async fn stream_end(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<(u64, Option<Pos>), String> {
    let mut stream = js
        .get_stream(subjects.history_stream())
        .await
        .map_err(|e| format!("read the history stream: {e}"))?;
    let last_seq = stream
        .info()
        .await
        .map_err(|e| format!("read the history stream's state: {e}"))?
        .state
        .last_sequence;
    if last_seq == 0 {
        return Ok((0, None));
    }
    match stream.get_raw_message(last_seq).await {
        Ok(m) => {
            let id = m
                .headers
                .get(crate::subjects::JS_MSG_ID)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            match parse_msg_id(&id) {
                Some(at) => Ok((last_seq, Some(at))),
                None => {
                    // Not ours: something else publishes on the stream's subjects. Resume
                    // where this node last saw the stream end.
                    tracing::warn!(
                        sequence = last_seq,
                        %id,
                        "the history stream's last message has no position as its id"
                    );
                    Ok((last_seq, None))
                }
            }
        }
        // Aged out or removed: the outbox was pruned up to it already.
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
            Ok((last_seq, None))
        }
        Err(e) => Err(format!("read the history stream's last message: {e}")),
    }
}

/// Publishes the outbox into the stream while this node leads.
async fn lead(
    js: &jetstream::Context,
    subjects: &Subjects,
    cfg: &HistoryConfig,
    outbox: &Arc<Outbox>,
    leading: &watch::Receiver<bool>,
) -> Ended {
    let config = stream_config(subjects, cfg);
    if let Err(e) = js.get_or_create_stream(config).await {
        return Ended::Failed(format!("create the history stream: {e}"));
    }
    let (mut last_seq, mut at) = match stream_end(js, subjects).await {
        Ok(end) => end,
        Err(e) => return Ended::Failed(e),
    };
    if last_seq == 0 {
        // A new stream: its first message is a marker at position 0.0, so that every later
        // publish expects a real sequence (nats-server ignores an expected last sequence of
        // 0), and two leaders that both found it empty collide on its message id.
        match publish_one(js, started_message(subjects), Pos::new(0, 0), 0).await {
            Ok(seq) => {
                last_seq = seq;
                at = Some(Pos::new(0, 0));
            }
            Err(e) => return e,
        }
    }
    if at.is_none() {
        // The stream's last message aged out (max_age): resume where this node last saw it
        // end, not from the start of its outbox.
        at = outbox.published();
    }
    let mut leading = leading.clone();
    let mut written = outbox.written();
    // A stream that ends before the outbox's floor misses what lies between.
    if let (Some(end), Some(floor)) = (at, outbox.floor()) {
        if misses(end, floor) {
            let gap = Gap {
                from: end.succ(),
                to: floor.pred(),
            };
            match publish_one(js, gap_message(subjects, &gap), gap.to, last_seq).await {
                Ok(seq) => {
                    last_seq = seq;
                    at = Some(gap.to);
                }
                Err(e) => return e,
            }
        }
    }
    let Some(mut cursor) = outbox.cursor_after(at) else {
        // The floor rose meanwhile (over the bound): look again, and say so.
        return Ended::Moved("the outbox dropped what the stream lacks".into());
    };
    let mut since_prune = tokio::time::Instant::now();
    loop {
        if !*leading.borrow_and_update() {
            return Ended::NotLeading;
        }
        // File reads, mostly from the page cache, off the runtime all the same.
        let reader = outbox.clone();
        let read = match tokio::task::spawn_blocking(move || reader.read(cursor, READ_BYTES)).await
        {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => return Ended::Failed(format!("read the history outbox: {e}")),
            Err(e) => return Ended::Failed(format!("read the history outbox: {e}")),
        };
        let Some(next) = read.next else {
            // The segment was removed (over the bound): start again from the stream's end.
            return Ended::Moved("the outbox dropped the segment being published".into());
        };
        if read.records.is_empty() {
            if next != cursor {
                cursor = next;
                continue;
            }
            // Caught up: note where the stream ends (a quiet stream may age out entirely).
            if let Some(p) = at.filter(|p| Some(*p) != outbox.published()) {
                prune(outbox, p).await;
                since_prune = tokio::time::Instant::now();
            }
            // Until something is written, or leadership changes (checked once a second too).
            tokio::select! {
                _ = written.changed() => {}
                _ = leading.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        cursor = next;
        let mut acks: VecDeque<(Pos, jetstream::context::PublishAckFuture)> = VecDeque::new();
        for record in read.records {
            let items: Vec<(Pos, Message)> = match record {
                Record::Events {
                    index,
                    first,
                    events,
                } => events
                    .into_iter()
                    .enumerate()
                    .map(|(k, e)| {
                        (
                            Pos::new(index, first.saturating_add(k as u32)),
                            Message::Event(e),
                        )
                    })
                    .collect(),
                Record::Gap { from, to } => {
                    // Only what the stream does not hold already is missing.
                    let from = Pos::new(from, 0).max(at.map_or(Pos::new(0, 0), Pos::succ));
                    let gap = Gap {
                        from,
                        to: Pos::new(to, u32::MAX),
                    };
                    vec![(gap.to, Message::Gap(gap))]
                }
            };
            for (p, message) in items {
                if at.is_some_and(|a| p <= a) {
                    continue;
                }
                let expected = last_seq + acks.len() as u64;
                let (subject, body) = message.render(subjects);
                let publish = PublishMessage::build()
                    .payload(body.into())
                    .message_id(msg_id(p))
                    .expected_last_sequence(expected);
                match js.send_publish(subject, publish).await {
                    Ok(ack) => acks.push_back((p, ack)),
                    Err(e) => return Ended::Failed(format!("publish history: {e}")),
                }
                if acks.len() >= WINDOW {
                    if let Err(e) = settle(&mut acks, 1, &mut last_seq, &mut at).await {
                        return e;
                    }
                }
            }
        }
        let all = acks.len();
        if let Err(e) = settle(&mut acks, all, &mut last_seq, &mut at).await {
            return e;
        }
        if let Some(p) = at {
            if since_prune.elapsed() >= Duration::from_secs(1) {
                prune(outbox, p).await;
                since_prune = tokio::time::Instant::now();
            }
        }
    }
}

/// Waits for the oldest `n` acknowledgements, in order.
async fn settle(
    acks: &mut VecDeque<(Pos, jetstream::context::PublishAckFuture)>,
    n: usize,
    last_seq: &mut u64,
    at: &mut Option<Pos>,
) -> Result<(), Ended> {
    for _ in 0..n {
        let Some((p, ack)) = acks.pop_front() else {
            break;
        };
        match ack.await {
            Ok(ack) if ack.sequence == *last_seq + 1 && !ack.duplicate => {
                *last_seq = ack.sequence;
                *at = Some(p);
            }
            Ok(ack) => {
                return Err(Ended::Moved(format!(
                    "position {p} was stored at {} (duplicate: {}), not after {last_seq}",
                    ack.sequence, ack.duplicate
                )))
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                return Err(Ended::Moved(format!("position {p}: {e}")))
            }
            Err(e) => return Err(Ended::Failed(format!("publish history: {e}"))),
        }
    }
    Ok(())
}

/// Positions whose events are lost: `from..=to`.
struct Gap {
    from: Pos,
    to: Pos,
}

enum Message {
    Event(Stored),
    Gap(Gap),
}

impl Message {
    fn render(self, subjects: &Subjects) -> (String, Vec<u8>) {
        match self {
            Message::Event(e) => {
                let s = &e.subject;
                let subject = subjects.history(s.supervisor.as_deref(), &s.entity, &s.id, &s.event);
                (subject, e.body)
            }
            Message::Gap(g) => gap_message(subjects, &g),
        }
    }
}

fn gap_message(subjects: &Subjects, g: &Gap) -> (String, Vec<u8>) {
    tracing::warn!(
        from = %g.from,
        to = %g.to,
        "the history stream misses events this node no longer holds: publishing a gap"
    );
    let id = g.to.index.to_string();
    let subject = subjects.history(None, "history", &id, "gap");
    let body = serde_json::json!({
        "v": super::HISTORY_VERSION,
        "index": g.to.index,
        "pos": g.to.pos,
        "event": "gap",
        "entity": "history",
        "id": id,
        "time": chrono::Utc::now(),
        "data": {
            "from_index": g.from.index.max(1),
            "to_index": g.to.index,
            "why": "the publishing node's outbox does not hold these entries' events: the \
                    history was off, the outbox went over its bound while the stream was \
                    unreachable, or the node skipped them through a snapshot",
        },
    });
    (subject, serde_json::to_vec(&body).unwrap_or_default())
}

/// Publishes one message at position `at`, expecting the stream to end at `last_seq`; the
/// stream's new last sequence.
async fn publish_one(
    js: &jetstream::Context,
    (subject, body): (String, Vec<u8>),
    at: Pos,
    last_seq: u64,
) -> Result<u64, Ended> {
    let publish = PublishMessage::build()
        .payload(body.into())
        .message_id(msg_id(at))
        .expected_last_sequence(last_seq);
    let ack = js
        .send_publish(subject, publish)
        .await
        .map_err(|e| Ended::Failed(format!("publish history: {e}")))?;
    let mut acks = VecDeque::from([(at, ack)]);
    let (mut seq, mut end) = (last_seq, None);
    settle(&mut acks, 1, &mut seq, &mut end).await?;
    Ok(seq)
}

/// Notes the stream's end in the outbox, which removes what it holds (file removals: off
/// the runtime).
async fn prune(outbox: &Arc<Outbox>, at: Pos) {
    let outbox = outbox.clone();
    let _ = tokio::task::spawn_blocking(move || outbox.prune(at)).await;
}

/// The new stream's first message.
fn started_message(subjects: &Subjects) -> (String, Vec<u8>) {
    let subject = subjects.history(None, "history", "0", "started");
    let body = serde_json::json!({
        "v": super::HISTORY_VERSION,
        "index": 0,
        "pos": 0,
        "event": "started",
        "entity": "history",
        "id": "0",
        "time": chrono::Utc::now(),
        "data": {},
    });
    (subject, serde_json::to_vec(&body).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a position and its message id round-trip, and gaps sort where they end.
    #[test]
    fn message_ids_carry_positions() {
        for p in [Pos::new(1, 0), Pos::new(77, 12), Pos::new(5, u32::MAX)] {
            assert_eq!(parse_msg_id(&msg_id(p)), Some(p));
        }
        assert_eq!(parse_msg_id("x.1"), None);
        assert_eq!(parse_msg_id("1"), None);
    }
}
