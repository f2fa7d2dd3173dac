//! The leader's placement controller: one loop, ticking every heartbeat interval, that
//! - turns silence into node statuses (`suspect`, `down`, `up` again) from the heartbeat
//!   times in `lease::Liveness`; `down` fails the node's agents over inside `apply`;
//! - moves the agents of draining nodes, at most `placement.drain_concurrency` at a time;
//! - copies the nodes' reported loads into the registry every `placement.load_report_ms`;
//! - rebalances by itself when enabled, the imbalance crosses the threshold and the cool-down
//!   has passed.
//!
//! It only proposes commands; every decision about where agents go is made by the registry's
//! pure placement code when the command is applied.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::Node;
use crate::registry::{AgentStatus, LoadReport, NodeStatus, RegistryCmd};

/// Runs on every node; acts only while this node leads.
pub async fn run(node: Arc<Node>, stopped: impl Future<Output = ()>) {
    let every = Duration::from_millis(node.cfg.failure.heartbeat_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading: Option<(u64, Instant)> = None;
    let mut last_loads = Instant::now();
    let mut last_rebalance: Option<Instant> = None;
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let (state, term) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_term)
        };
        if state != ServerState::Leader {
            leading = None;
            continue;
        }
        let since = match leading {
            Some((t, at)) if t == term => at,
            _ => {
                // A new term: whatever an earlier leader heard does not count here.
                node.liveness.reset();
                let now = Instant::now();
                leading = Some((term, now));
                now
            }
        };
        detect(&node, since).await;
        drain(&node).await;
        let load_every = Duration::from_millis(node.cfg.placement.load_report_ms);
        if last_loads.elapsed() >= load_every {
            last_loads = Instant::now();
            report_loads(&node).await;
        }
        if node.cfg.placement.auto_rebalance {
            let cooldown = Duration::from_millis(node.cfg.placement.rebalance_cooldown_ms);
            if last_rebalance.is_none_or(|t| t.elapsed() >= cooldown) && auto_rebalance(&node).await
            {
                last_rebalance = Some(Instant::now());
            }
        }
    }
}

/// What the failure detector decided for one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Suspect,
    Down,
    Up,
}

/// Pure: the status change for a node in `status`, whose latest heartbeat came `silent_ms`
/// ago and which was last known to hear its grants `deaf_ms` ago (`>= silent_ms`; see
/// `lease::Liveness::heard`); `heard` says whether it was heard at all in this term. A node
/// that sends but hears nothing back is `down` on the same clock as a silent one, and does
/// not come back `up` before it hears again; it is not made `suspect` for it, since a slow
/// round trip looks the same for a while.
fn verdict(
    status: NodeStatus,
    silent_ms: u64,
    deaf_ms: u64,
    heard: bool,
    suspect_after_ms: u64,
    down_after_ms: u64,
) -> Option<Verdict> {
    let deaf_ms = deaf_ms.max(silent_ms);
    match status {
        NodeStatus::Up | NodeStatus::Suspect | NodeStatus::Draining if deaf_ms >= down_after_ms => {
            Some(Verdict::Down)
        }
        NodeStatus::Up if silent_ms >= suspect_after_ms => Some(Verdict::Suspect),
        NodeStatus::Suspect | NodeStatus::Down if heard && deaf_ms < suspect_after_ms => {
            Some(Verdict::Up)
        }
        _ => None,
    }
}

/// Pure: whether node `id` was heard since `since` (this leader's term) and how long it has
/// been silent, from when its last heartbeat came (`last`). The leader `me` hears itself: a
/// node that an earlier leader marked suspect or down while it was cut off, and that leads
/// now, is up again.
fn silence(me: u64, id: u64, last: Option<Instant>, since: Instant, now: Instant) -> (bool, u64) {
    if id == me {
        return (true, 0);
    }
    let from = last.map_or(since, |t| t.max(since));
    let silent = now.saturating_duration_since(from).as_millis() as u64;
    (last.is_some_and(|t| t >= since), silent)
}

/// How long after a grant a node's heartbeats must acknowledge it before the failure detector
/// counts the node as deaf from that grant on (`lease::Liveness::heard`). A heartbeat may be
/// sent up to a lease before it arrives (it is retried while the leader is busy), so only one
/// that arrives more than a lease after the grant surely left after it did; `suspect_after_ms`
/// more leave room for the grant's own way back and a few heartbeat intervals.
fn deaf_after(f: &crate::config::FailureConfig) -> Duration {
    Duration::from_millis(f.lease_ms + f.suspect_after_ms)
}

async fn detect(node: &Arc<Node>, since: Instant) {
    let me = node.cfg.id;
    let f = &node.cfg.failure;
    let statuses: Vec<(u64, NodeStatus)> = {
        let st = node.state_read();
        st.registry
            .data()
            .nodes
            .values()
            .map(|n| (n.id, n.status))
            .collect()
    };
    let mut changes = Vec::new();
    for (id, status) in statuses {
        if status == NodeStatus::Down {
            // Its verdict is applied here, even if the proposal that carried it timed out.
            node.liveness.pardon(id);
        }
        let now = Instant::now();
        let (heard, silent_ms) = silence(me, id, node.liveness.last(id), since, now);
        let (_, deaf_ms) = silence(me, id, node.liveness.heard(id, deaf_after(f)), since, now);
        if let Some(v) = verdict(
            status,
            silent_ms,
            deaf_ms,
            heard,
            f.suspect_after_ms,
            f.down_after_ms,
        ) {
            changes.push((id, v));
        }
    }
    let proposals = changes.into_iter().map(|(id, v)| {
        let node = node.clone();
        async move {
            let status = match v {
                Verdict::Suspect => NodeStatus::Suspect,
                Verdict::Down => NodeStatus::Down,
                Verdict::Up => NodeStatus::Up,
            };
            if v == Verdict::Down {
                // No grant for it until the verdict is applied (see `lease`); and only if no
                // heartbeat came in since it was judged.
                let f = &node.cfg.failure;
                let down_after = Duration::from_millis(f.down_after_ms);
                let lease_and_margin =
                    Duration::from_millis(f.lease_ms + crate::limits::LEASE_MARGIN_MS);
                if !node.liveness.condemn_if_silent(
                    id,
                    since,
                    down_after,
                    deaf_after(f),
                    lease_and_margin,
                ) {
                    return;
                }
                tracing::warn!(node = id, "node is down; placing its agents elsewhere");
            }
            let cmd = RegistryCmd::SetNodeStatus {
                node_id: id,
                status,
            };
            match node.propose(cmd, None, 64).await {
                // Applied here: every later grant's read index covers it.
                Ok(_) => node.liveness.pardon(id),
                // The verdict may still commit (a timeout is "unknown"): the node stays
                // refused; the next tick proposes it again, or a new term starts afresh.
                Err(e) => tracing::debug!(node = id, error = %e, "could not record a node status"),
            }
        }
    });
    futures::future::join_all(proposals).await;
}

/// Starts migrations away from draining nodes, within the concurrency budget.
async fn drain(node: &Arc<Node>) {
    let budget = node.cfg.placement.drain_concurrency;
    let picks: Vec<String> = {
        let st = node.state_read();
        let reg = &st.registry;
        let mut picks = Vec::new();
        for n in reg.data().nodes.values() {
            if n.status != NodeStatus::Draining {
                continue;
            }
            let on: Vec<_> = reg.agents_on(n.id).collect();
            let moving = on
                .iter()
                .filter(|a| a.status == AgentStatus::Migrating)
                .count();
            let room = budget.saturating_sub(moving);
            picks.extend(
                on.iter()
                    .filter(|a| a.status != AgentStatus::Migrating)
                    .filter(|a| reg.can_migrate(a))
                    .take(room)
                    .map(|a| a.id.to_string()),
            );
        }
        picks
    };
    let proposals = picks.into_iter().map(|agent| {
        let node = node.clone();
        async move {
            let cmd = RegistryCmd::MigrateAgent { agent, to: None };
            // Refusals (no room elsewhere, a subtree already moving) are retried next tick.
            if let Err(e) = node.propose(cmd, None, 128).await {
                tracing::debug!(error = %e, "a drain move was refused");
            }
        }
    });
    futures::future::join_all(proposals).await;
}

async fn report_loads(node: &Node) {
    let loads: Vec<LoadReport> = node
        .liveness
        .loads()
        .into_iter()
        .map(|(node_id, load)| LoadReport { node_id, load })
        .collect();
    if loads.is_empty() {
        return;
    }
    if let Err(e) = node
        .propose(RegistryCmd::NodeLoads { loads }, None, 1024)
        .await
    {
        tracing::debug!(error = %e, "could not record node loads");
    }
}

/// Rebalances if the imbalance crosses the threshold and nothing is moving. Returns whether it
/// started one.
async fn auto_rebalance(node: &Node) -> bool {
    let worth_it = {
        let st = node.state_read();
        let reg = &st.registry;
        let moving = reg
            .data()
            .agents
            .values()
            .any(|a| a.status == AgentStatus::Migrating);
        !moving
            && crate::placement::imbalance(&reg.candidates())
                > node.cfg.placement.rebalance_threshold
            && !reg
                .rebalance_plan(node.cfg.placement.rebalance_max_moves)
                .is_empty()
    };
    if !worth_it {
        return false;
    }
    let cmd = RegistryCmd::Rebalance {
        max_moves: node.cfg.placement.rebalance_max_moves,
    };
    match node.propose(cmd, None, 64).await {
        Ok(v) => {
            tracing::info!(moves = %v["moves"], "automatic rebalance");
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "automatic rebalance refused");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_makes_a_node_suspect_then_down_and_a_heartbeat_brings_it_up() {
        let v = |s, ms, heard| verdict(s, ms, ms, heard, 500, 1_400);
        assert_eq!(v(NodeStatus::Up, 100, true), None);
        assert_eq!(v(NodeStatus::Up, 600, true), Some(Verdict::Suspect));
        assert_eq!(v(NodeStatus::Suspect, 900, true), None);
        assert_eq!(v(NodeStatus::Suspect, 1_400, false), Some(Verdict::Down));
        assert_eq!(v(NodeStatus::Draining, 1_500, true), Some(Verdict::Down));
        assert_eq!(
            v(NodeStatus::Draining, 600, true),
            None,
            "draining is not suspect"
        );
        assert_eq!(v(NodeStatus::Down, 50, true), Some(Verdict::Up));
        assert_eq!(
            v(NodeStatus::Down, 50, false),
            None,
            "not heard in this term"
        );
        assert_eq!(v(NodeStatus::Down, 5_000, false), None, "down stays down");
        assert_eq!(v(NodeStatus::Left, 9_000, false), None);
        assert_eq!(v(NodeStatus::Joining, 9_000, false), None);
    }

    /// Goal: a node whose heartbeats arrive but which hears no grant goes down on the same
    /// clock as a silent one, is never made suspect by a slow round trip alone, and does not
    /// come back up before it hears again.
    #[test]
    fn a_node_that_hears_nothing_back_goes_down_but_not_suspect() {
        let v = |s, silent, deaf| verdict(s, silent, deaf, true, 500, 1_400);
        assert_eq!(v(NodeStatus::Up, 50, 900), None, "not suspect for it");
        assert_eq!(v(NodeStatus::Up, 50, 1_400), Some(Verdict::Down));
        assert_eq!(v(NodeStatus::Suspect, 50, 1_500), Some(Verdict::Down));
        assert_eq!(v(NodeStatus::Down, 50, 2_000), None, "heard, but deaf");
        assert_eq!(v(NodeStatus::Suspect, 50, 600), None);
        assert_eq!(v(NodeStatus::Down, 50, 50), Some(Verdict::Up));
    }

    #[test]
    fn a_leader_that_was_marked_suspect_or_down_marks_itself_up() {
        let since = Instant::now();
        let now = since + Duration::from_secs(3);
        // Never heard over the network (a leader sends itself no heartbeat): itself is heard.
        let (heard, silent) = silence(1, 1, None, since, now);
        assert_eq!((heard, silent), (true, 0));
        for status in [NodeStatus::Suspect, NodeStatus::Down] {
            assert_eq!(
                verdict(status, silent, silent, heard, 500, 1_400),
                Some(Verdict::Up)
            );
        }
        // Another node never heard in this term is silent since the term began.
        assert_eq!(silence(1, 2, None, since, now), (false, 3_000));
        let before_term = since - Duration::from_secs(1);
        assert_eq!(silence(1, 2, Some(before_term), since, now), (false, 3_000));
        let recent = now - Duration::from_millis(40);
        assert_eq!(silence(1, 2, Some(recent), since, now), (true, 40));
    }
}
