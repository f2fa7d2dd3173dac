//! Partial partitions: the NATS route between the leader's server and a follower's is cut while
//! both still reach the third server (`warden::bench::route_cut`: OS-process nodes, three
//! nats-servers whose routes run through proxies that hold the bytes, a client on each server
//! sending on the shared subjects without retrying).
//!
//! nats-server 2.9 spreads a queue group's messages over the whole NATS cluster, with no
//! preference for a subscriber on the publisher's own server, and it keeps routing into a
//! silently cut route it keeps writing to (its pings skip busy routes): a request published on
//! either side of the cut and routed across it is lost in NATS, and its client times out
//! whatever the nodes do. What the nodes decide is asserted here: none of them holds a request
//! (every answer comes at once), a client whose server reaches every node is never left
//! waiting, the majority keeps writing, and the heal forces no election.

use std::time::Duration;

use warden::bench::route_cut::{self, Outcome, Setup};
use warden::netfault::RouteCut;

/// How long after the cut the cut-off node may take to know it is cut off: its lease lapses
/// (`failure.lease_ms`, 1 s), the leader has answered nothing for as long, and it leaves the
/// shared queue group.
const SETTLE_MS: u64 = 2_500;

/// The longest an answer may take: well under the clients' 2 s timeout. Debug-build nodes on
/// two cores answer at p99 about 100 ms before the cut, and the majority's writes pause up to
/// a few hundred ms when the leader declares the cut-off node down.
const AT_ONCE_US: u64 = 1_000_000;

async fn cut(how: RouteCut) {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        bin: env!("CARGO_BIN_EXE_warden").into(),
        dir: dir.path().to_path_buf(),
        cluster: "test".into(),
        how,
        before: Duration::from_secs(3),
        during: Duration::from_secs(10),
        after: Duration::from_secs(4),
        request_timeout: Duration::from_secs(2),
    };
    let r = route_cut::run(&setup).await.unwrap();
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&route_cut::summary(&r)).unwrap()
    );
    for (s, samples) in r.samples.iter().enumerate() {
        let slow: Vec<_> = samples
            .iter()
            .filter(|x| x.latency_us > AT_ONCE_US)
            .map(|x| (x.sent_ms, x.write, x.outcome, x.latency_us / 1000))
            .collect();
        eprintln!(
            "server {}: slow requests (sent ms, write, outcome, ms): {slow:?}",
            s + 1
        );
    }
    let (leader_server, cut_off_server) = r.cut;
    let third = 3 - leader_server - cut_off_server;
    let settled = r.cut_ms + SETTLE_MS;
    // No node holds a request once the cut-off one knows: every answer comes at once.
    for (s, samples) in r.samples.iter().enumerate() {
        let held: Vec<_> = samples
            .iter()
            .filter(|x| x.sent_ms >= settled && x.sent_ms < r.healed_ms)
            // Bytes the cut held are delivered when it heals: those answers are NATS's delay.
            .filter(|x| x.sent_ms + x.latency_us / 1000 < r.healed_ms)
            .filter(|x| matches!(x.outcome, Outcome::Ok | Outcome::Refused))
            .filter(|x| x.latency_us > AT_ONCE_US)
            .collect();
        assert!(
            held.is_empty(),
            "server {}'s answers came late: {held:?}",
            s + 1
        );
    }
    // The third server reaches every node: nothing its client sends is lost, and the
    // cut-off node, out of the queue group, no longer gets its requests.
    let w = r.window(third, settled, r.healed_ms);
    assert!(w.sent > 20, "the third server's client barely sent: {w:?}");
    assert_eq!(w.timed_out, 0, "the third server's client waited: {w:?}");
    assert!(
        w.ok * 10 >= w.sent * 9,
        "the third server's client was refused: {w:?}"
    );
    // The majority keeps writing. On the leader's own server, a client that sends to the
    // leader's subject (as one that follows the `Warden-Leader` hint does) is never routed
    // across the cut: nothing it sends is lost, and every write is taken. (One on the shared
    // subjects loses a third of its requests in NATS, whatever the nodes do.)
    let ok_writes = |samples: &[route_cut::Sample]| {
        samples
            .iter()
            .filter(|x| x.sent_ms >= settled && x.sent_ms < r.healed_ms)
            .filter(|x| x.write && x.outcome == Outcome::Ok)
            .count()
    };
    let direct: Vec<_> = r
        .to_leader
        .iter()
        .filter(|x| x.sent_ms >= settled && x.sent_ms < r.healed_ms)
        .collect();
    assert!(
        direct.len() > 20,
        "the leader's client barely sent: {}",
        direct.len()
    );
    let lost: Vec<_> = direct
        .iter()
        .filter(|x| x.outcome != Outcome::Ok || x.latency_us > AT_ONCE_US)
        .collect();
    assert!(
        lost.is_empty(),
        "the leader's own subject failed or waited: {lost:?}"
    );
    assert!(
        ok_writes(&r.to_leader) > 10,
        "few writes on the leader's subject"
    );
    assert!(
        ok_writes(&r.samples[third]) > 10,
        "few writes from the third server"
    );
    // The leader stopped counting on the cut-off node, whether it heard nothing from it or
    // heard it but could not answer: its agents may start elsewhere.
    let cut_off_id = cut_off_server as u64 + 1;
    let statuses = r.statuses_before_heal.clone().expect("a status read");
    assert!(
        statuses.contains(&(cut_off_id, "down".to_string())),
        "node {cut_off_id} is not down before the heal: {statuses:?}"
    );
    // The cut-off node never campaigned: the healed leader keeps its term.
    assert_eq!(
        (r.leader_after, r.term_after),
        (r.leader_before, r.term_before),
        "the heal forced an election"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_route_leaves_the_majority_serving_and_heals_without_an_election() {
    cut(RouteCut::Both).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_cut_one_way_leaves_the_majority_serving_and_heals_without_an_election() {
    cut(RouteCut::OneWay).await;
}

/// Goal: a leader whose NATS server is cut off from both others keeps its clients but loses
/// its majority: once its lease has lapsed it refuses at once what is sent to it (it can
/// commit nothing), instead of holding each request until the client gives up; the other two
/// elect a leader; after the heal the old leader follows the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_majority_refuses_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        bin: env!("CARGO_BIN_EXE_warden").into(),
        dir: dir.path().to_path_buf(),
        cluster: "test".into(),
        how: RouteCut::Both,
        before: Duration::from_secs(1),
        during: Duration::from_secs(8),
        after: Duration::from_secs(20),
        request_timeout: Duration::from_secs(2),
    };
    let r = route_cut::isolate_leader(&setup).await.unwrap();
    let settled: Vec<_> = r
        .to_old_leader
        .iter()
        .filter(|x| x.sent_ms >= SETTLE_MS && x.sent_ms < r.healed_ms)
        .collect();
    let first_refusal = r
        .to_old_leader
        .iter()
        .find(|x| x.outcome == Outcome::Refused)
        .map(|x| x.sent_ms);
    let timed_out = r
        .to_old_leader
        .iter()
        .filter(|x| x.outcome == Outcome::TimedOut)
        .count();
    eprintln!(
        "leader {} term {} -> leader during {:?}, after {} term {} (settled {}); the old leader: {} requests, {timed_out} timed out, first refused at {first_refusal:?} ms",
        r.leader_before, r.term_before, r.leader_during, r.leader_after, r.term_after, r.settled,
        r.to_old_leader.len()
    );
    assert!(settled.len() > 10, "few requests sent: {}", settled.len());
    let held: Vec<_> = settled
        .iter()
        .filter(|x| x.outcome != Outcome::Refused || x.latency_us > AT_ONCE_US)
        .collect();
    assert!(
        held.is_empty(),
        "the old leader held or took requests: {held:?}"
    );
    let elected = r.leader_during.expect("the majority answered");
    assert_ne!(
        elected, r.leader_before,
        "the majority elected a new leader"
    );
    assert!(
        r.settled,
        "the old leader does not follow after the heal: {r:?}"
    );
    assert_eq!(r.leader_after, elected, "the heal changed the leader again");
    assert!(r.term_after > r.term_before);
}
