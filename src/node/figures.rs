//! Per-agent figures (seed 002): `get_agent_metrics`, answered by the node running the agent;
//! `get_supervisor_metrics`, the sums over a supervisor's subtree from every node; and
//! `node_metrics`, a node's own figures and its busiest agents (`warden ctl top`).
//!
//! The figures of an instance (calls, errors, busy time, mailbox depth) are counted by its task
//! in its mailbox (`agent::mailbox::Stats`) since it started on its node: a restart or a move
//! starts them again, and the registry's `restarts` and `last_error` say what came before.
//! The host answers questions about its instances from its loop (`host::HostQuery`), a chunk
//! of `limits::RECONCILE_CHUNK` instances per question, so a walk over many agents never holds
//! the loop long.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use super::host::{Figures, HostQuery};
use super::Node;
use crate::limits;
use crate::protocol::{ErrorCode, WireError};

/// How long the host may take to answer one question.
const HOST_ANSWER: Duration = Duration::from_secs(2);

fn unavailable(why: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::Unavailable, why.into())
}

/// Asks the host: `None` for an instance that does not run here.
async fn ask_one(node: &Node, id: Uuid) -> Result<Option<Figures>, WireError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    node.host_asks
        .try_send(HostQuery::One(id, tx))
        .map_err(|_| unavailable("this node's host is busy; retry shortly"))?;
    match tokio::time::timeout(HOST_ANSWER, rx).await {
        Ok(Ok(f)) => Ok(f),
        _ => Err(unavailable(
            "this node's host did not answer; retry shortly",
        )),
    }
}

/// Calls `each` for every instance of this node, a host chunk at a time.
async fn walk(node: &Node, mut each: impl FnMut(&[(Uuid, Figures)])) -> Result<(), WireError> {
    let mut after = None;
    loop {
        let (tx, rx) = tokio::sync::oneshot::channel();
        node.host_asks
            .try_send(HostQuery::After(after, tx))
            .map_err(|_| unavailable("this node's host is busy; retry shortly"))?;
        let chunk = match tokio::time::timeout(HOST_ANSWER, rx).await {
            Ok(Ok(c)) => c,
            _ => {
                return Err(unavailable(
                    "this node's host did not answer; retry shortly",
                ))
            }
        };
        let Some((last, _)) = chunk.last() else {
            return Ok(());
        };
        after = Some(*last);
        each(&chunk);
        if chunk.len() < limits::RECONCILE_CHUNK {
            return Ok(());
        }
    }
}

/// The share of calls that succeeded (none before the first).
fn success_rate(calls: u64, errors: u64) -> Option<f64> {
    (calls > 0).then(|| calls.saturating_sub(errors) as f64 / calls as f64)
}

/// A scan of `/proc` kept for a second: every question about processes within it shares
/// it, and one scan runs at a time (`Node::proc_scan`).
pub type ProcScan = tokio::sync::Mutex<Option<(std::time::Instant, ProcGroups)>>;
type ProcGroups = std::sync::Arc<std::collections::HashMap<u32, (u64, f64)>>;

/// The process groups' usage, from a scan at most a second old.
async fn proc_groups(node: &Node) -> Option<ProcGroups> {
    let mut cached = tokio::time::timeout(HOST_ANSWER, node.proc_scan.lock())
        .await
        .ok()?;
    if let Some((at, groups)) = cached.as_ref() {
        if at.elapsed() < Duration::from_secs(1) {
            return Some(groups.clone());
        }
    }
    let groups = tokio::task::spawn_blocking(crate::procfs::groups_usage)
        .await
        .ok()?;
    let groups = std::sync::Arc::new(groups);
    *cached = Some((std::time::Instant::now(), groups.clone()));
    Some(groups)
}

/// An instance's figures as JSON, with its OS process's (from `groups`) when it has one.
fn render(f: &Figures, groups: Option<&ProcGroups>) -> Value {
    let mut v = json!({
        "calls": f.calls,
        "errors": f.errors,
        "success_rate": success_rate(f.calls, f.errors),
        "busy_ms": f.busy_us as f64 / 1000.0,
        "avg_call_ms": (f.calls > 0).then(|| f.busy_us as f64 / 1000.0 / f.calls as f64),
        "mailbox_depth": f.depth,
    });
    if f.pid != 0 {
        v["process"] = match groups.map(|g| g.get(&f.pid)) {
            Some(Some((rss, cpu))) => {
                json!({ "pid": f.pid, "rss_bytes": rss, "cpu_seconds": cpu })
            }
            Some(None) => json!({ "pid": f.pid, "running": false }),
            None => json!({ "pid": f.pid, "unknown": "the node is busy reading /proc" }),
        };
    }
    v
}

/// `get_agent_metrics` on the node the agent is placed on (`None`: the registry says it runs
/// here, or nowhere).
pub async fn agent(node: &Node, id: Uuid) -> Result<Value, WireError> {
    let record = {
        let st = node.state_read();
        st.registry.agent(&id.to_string()).map(|a| {
            json!({
                "agent": a.id,
                "name": a.name,
                "kind": a.kind,
                "supervisor": a.supervisor,
                "status": a.status,
                "node": a.node,
                "epoch": a.epoch,
                "restarts": a.restarts,
                "last_exit": a.last_error,
            })
        })
    };
    let Some(mut answer) = record else {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("no agent {id}"),
        ));
    };
    let Ok(_asking) = node.figure_asks.clone().try_acquire_owned() else {
        return Err(unavailable(format!(
            "this node already answers {} agent figure queries; retry shortly",
            limits::FIGURE_ASKS
        )));
    };
    let figures = ask_one(node, id).await?;
    let groups = match figures {
        Some(f) if f.pid != 0 => proc_groups(node).await,
        _ => None,
    };
    answer["running_here"] = figures.is_some().into();
    answer["figures"] = match &figures {
        Some(f) => render(f, groups.as_ref()),
        None => Value::Null,
    };
    Ok(answer)
}

/// The supervisors of `name`'s subtree, `name` included; `None` if it does not exist.
fn subtree(node: &Node, name: &str) -> Option<BTreeSet<String>> {
    let st = node.state_read();
    let reg = &st.registry;
    reg.supervisor(name)?;
    let mut found = BTreeSet::from([name.to_string()]);
    let mut todo = vec![name.to_string()];
    // Bounded by the registry's supervisors, each visited once.
    while let Some(s) = todo.pop() {
        for c in reg.children(&s) {
            if let crate::registry::Child::Supervisor { name } = c {
                if found.insert(name.clone()) {
                    todo.push(name.clone());
                }
            }
        }
    }
    Some(found)
}

/// Sums of figures over some instances.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sums {
    pub agents: u64,
    pub calls: u64,
    pub errors: u64,
    pub busy_us: u64,
    pub depth: u64,
}

impl Sums {
    fn add(&mut self, f: &Figures) {
        self.merge(&Sums {
            agents: 1,
            calls: f.calls,
            errors: f.errors,
            busy_us: f.busy_us,
            depth: f.depth as u64,
        });
    }

    fn merge(&mut self, o: &Sums) {
        self.agents = self.agents.saturating_add(o.agents);
        self.calls = self.calls.saturating_add(o.calls);
        self.errors = self.errors.saturating_add(o.errors);
        self.busy_us = self.busy_us.saturating_add(o.busy_us);
        self.depth = self.depth.saturating_add(o.depth);
    }

    pub fn from_json(v: &Value) -> Sums {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Sums {
            agents: n("agents_running"),
            calls: n("calls"),
            errors: n("errors"),
            busy_us: (v["busy_ms"].as_f64().unwrap_or(0.0) * 1000.0).round() as u64,
            depth: n("mailbox_depth"),
        }
    }

    pub fn to_json(self) -> Value {
        json!({
            "agents_running": self.agents,
            "calls": self.calls,
            "errors": self.errors,
            "success_rate": success_rate(self.calls, self.errors),
            "busy_ms": self.busy_us as f64 / 1000.0,
            "avg_call_ms": (self.calls > 0)
                .then(|| self.busy_us as f64 / 1000.0 / self.calls as f64),
            "mailbox_depth": self.depth,
        })
    }
}

/// This node's share of `get_supervisor_metrics`: its instances under `name`'s subtree.
pub async fn supervisor_here(node: &Node, name: &str) -> Result<Sums, WireError> {
    let Ok(_walking) = node.figure_walks.clone().try_acquire_owned() else {
        return Err(unavailable(format!(
            "this node already walks its agents for {} queries; retry shortly",
            limits::FIGURE_WALKS
        )));
    };
    let Some(set) = subtree(node, name) else {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("no supervisor {name:?}"),
        ));
    };
    let mut sums = Sums::default();
    let me = node.cfg.id;
    walk(node, |chunk| {
        let st = node.state_read();
        for (id, f) in chunk {
            // Placed here at this epoch: an instance the registry moved away (its stop not
            // begun yet) counts on its new node only.
            let under = st.registry.agent(&id.to_string()).is_some_and(|a| {
                a.node == Some(me) && a.epoch == f.epoch && set.contains(&a.supervisor)
            });
            if under {
                sums.add(f);
            }
        }
    })
    .await?;
    Ok(sums)
}

/// Adds up the shares of `get_supervisor_metrics` the nodes answered.
pub fn sum_shares(shares: &[(u64, Result<Value, WireError>)]) -> Value {
    let mut total = Sums::default();
    let mut missing = Vec::new();
    for (id, share) in shares {
        match share {
            Ok(v) => total.merge(&Sums::from_json(v)),
            Err(e) => missing.push(json!({ "node": id, "error": e.message })),
        }
    }
    let mut v = total.to_json();
    v["nodes_missing"] = missing.into();
    v
}

/// `node_metrics`: this node's own figures and its `top` busiest agents (by time spent in
/// calls since each started here).
pub async fn node(node: &Node, top: usize) -> Result<Value, WireError> {
    let Ok(_walking) = node.figure_walks.clone().try_acquire_owned() else {
        return Err(unavailable(format!(
            "this node already walks its agents for {} queries; retry shortly",
            limits::FIGURE_WALKS
        )));
    };
    let mut sums = Sums::default();
    // The busiest, least busy first, at most `top`.
    let mut busiest: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64, Uuid)>> =
        Default::default();
    let mut figures = std::collections::BTreeMap::new();
    walk(node, |chunk| {
        for (id, f) in chunk {
            sums.add(f);
            if top == 0 {
                continue;
            }
            busiest.push(std::cmp::Reverse((f.busy_us, f.calls, *id)));
            figures.insert(*id, *f);
            if busiest.len() > top {
                if let Some(std::cmp::Reverse((_, _, gone))) = busiest.pop() {
                    figures.remove(&gone);
                }
            }
        }
    })
    .await?;
    let groups = match figures.values().any(|f| f.pid != 0) {
        true => proc_groups(node).await,
        false => None,
    };
    let mut agents = Vec::new();
    let ranked: Vec<Uuid> = {
        let mut v: Vec<_> = busiest.into_iter().map(|r| r.0).collect();
        v.sort_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, _, id)| id).collect()
    };
    for id in ranked {
        let Some(f) = figures.get(&id) else { continue };
        let (name, kind) = {
            let st = node.state_read();
            st.registry
                .agent(&id.to_string())
                .map(|a| (a.name.clone(), a.kind.clone()))
                .unwrap_or_default()
        };
        let mut v = render(f, groups.as_ref());
        v["agent"] = id.to_string().into();
        v["name"] = name.into();
        v["kind"] = kind.into();
        agents.push(v);
    }
    let m = node.raft.metrics().borrow().clone();
    let applied = m.last_applied.map_or(0, |l| l.index);
    let commit = node.metrics.commit_index().get(applied);
    let cpu = crate::procfs::cpu_ticks().map(|t| t as f64 / crate::procfs::TICKS_PER_S);
    Ok(json!({
        "node": node.cfg.id,
        "name": node.cfg.name,
        "role": format!("{:?}", m.state).to_lowercase(),
        "leader": m.current_leader,
        "term": m.current_term,
        "applied": applied,
        "commit_index": commit,
        "commit_lag": commit.saturating_sub(applied),
        "rss_bytes": crate::procfs::resident_bytes(),
        "cpu_seconds": cpu,
        "uptime_ms": node.started.elapsed().as_millis() as u64,
        "agents": sums.to_json(),
        "busiest": agents,
    }))
}
