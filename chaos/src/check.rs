//! Checkers: one per guarantee, each over the recorded history and the final state read back
//! after healing. Each returns its counterexamples; none means the guarantee held.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;
use warden::agent::journal::JournalEntry;

use crate::history::{Op, OpKind, Outcome};

/// A guarantee's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub guarantee: &'static str,
    pub what: &'static str,
    pub checked: usize,
    pub violations: Vec<String>,
}

impl Verdict {
    /// A verdict with nothing checked yet.
    pub fn new(guarantee: &'static str, what: &'static str) -> Verdict {
        Verdict {
            guarantee,
            what,
            checked: 0,
            violations: Vec::new(),
        }
    }

    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The two things clients create and stop by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Supervisor,
    Agent,
}

impl Entity {
    fn noun(self) -> &'static str {
        match self {
            Entity::Supervisor => "supervisor",
            Entity::Agent => "agent",
        }
    }
}

/// The final registry, read back after healing: names to ids.
#[derive(Debug, Clone, Default)]
pub struct FinalState {
    pub supervisors: BTreeMap<String, String>,
    pub agents: BTreeMap<String, String>,
}

impl FinalState {
    fn of(&self, entity: Entity) -> &BTreeMap<String, String> {
        match entity {
            Entity::Supervisor => &self.supervisors,
            Entity::Agent => &self.agents,
        }
    }
}

/// A create or a stop by name, as an operation asked for it.
struct Write<'a> {
    entity: Entity,
    name: &'a str,
    /// The supervisor a create puts it under; none for a stop.
    scope: Option<&'a str>,
    create: bool,
}

fn write_of(o: &Op) -> Option<Write<'_>> {
    let (entity, name, scope, create) = match &o.kind {
        OpKind::Create { name, parent, .. } => (Entity::Supervisor, name, Some(parent), true),
        OpKind::Stop { name } => (Entity::Supervisor, name, None, false),
        OpKind::SpawnAgent {
            name, supervisor, ..
        } => (Entity::Agent, name, Some(supervisor), true),
        OpKind::StopAgent { name, .. } => (Entity::Agent, name, None, false),
        _ => return None,
    };
    Some(Write {
        entity,
        name,
        scope: scope.map(String::as_str),
        create,
    })
}

/// A read of one supervisor's children: what it lists, under which supervisor, and the reply
/// field that holds them.
fn read_of(o: &Op) -> Option<(Entity, &str, &'static str)> {
    match &o.kind {
        OpKind::Read { parent } => Some((Entity::Supervisor, parent, "supervisors")),
        OpKind::ReadAgents { supervisor } => Some((Entity::Agent, supervisor, "agents")),
        _ => None,
    }
}

/// The request id an operation carried, for the kinds that are retried with one.
fn request_of(o: &Op) -> Option<&str> {
    match &o.kind {
        OpKind::Create { request_id, .. }
        | OpKind::SpawnAgent { request_id, .. }
        | OpKind::StopAgent { request_id, .. } => Some(request_id),
        _ => None,
    }
}

fn stops_invoked_before(ops: &[Op], entity: Entity, name: &str, t_ms: u64) -> bool {
    ops.iter().any(|o| {
        write_of(o).is_some_and(|w| !w.create && w.entity == entity && w.name == name)
            && o.invoke_ms <= t_ms
            && !matches!(o.outcome, Outcome::Failed { .. })
    })
}

/// G2: every acknowledged create (of a supervisor or an agent) is present, unless a stop of it
/// may have run, with the id it was acknowledged with; every acknowledged stop's supervisor or
/// agent is gone.
pub fn g2_acknowledged_writes(ops: &[Op], fin: &FinalState) -> Verdict {
    let mut v = Verdict::new("G2", "no lost acknowledged command");
    for o in ops {
        let (Some(w), Outcome::Ok { value }) = (write_of(o), &o.outcome) else {
            continue;
        };
        v.checked += 1;
        let (held, noun, name) = (fin.of(w.entity), w.entity.noun(), w.name);
        if !w.create {
            if held.contains_key(name) {
                v.violations.push(format!(
                    "acknowledged stop of {noun} {name} at {} ms did not stick",
                    o.complete_ms
                ));
            }
            continue;
        }
        if stops_invoked_before(ops, w.entity, name, u64::MAX) {
            continue;
        }
        match held.get(name) {
            None => v.violations.push(format!(
                "acknowledged create of {noun} {name} at {} ms is lost",
                o.complete_ms
            )),
            Some(id) if Some(id.as_str()) != value["id"].as_str() => v.violations.push(format!(
                "{noun} {name} was acknowledged with id {} but the registry holds {id}",
                value["id"]
            )),
            _ => {}
        }
    }
    v
}

/// G3: a durable counter never loses an acknowledged value: every answer a client got after
/// an acknowledged value `v` (invoked after `v` was acknowledged) is at least `v`, and so is
/// the value read back after healing. Each counter has one sequential client, so its values
/// may only grow.
pub fn g3_counters(ops: &[Op], finals: &BTreeMap<String, Option<i64>>) -> Verdict {
    let mut v = Verdict::new("G3", "no lost acknowledged checkpoint (durable counters)");
    let mut acked: BTreeMap<&str, Vec<(u64, u64, i64)>> = BTreeMap::new();
    for o in ops {
        let counter = match &o.kind {
            OpKind::Increment { counter } | OpKind::CounterRead { counter } => counter,
            _ => continue,
        };
        if let Outcome::Ok { value } = &o.outcome {
            if let Some(n) = value["value"].as_i64() {
                acked
                    .entry(counter.as_str())
                    .or_default()
                    .push((o.invoke_ms, o.complete_ms, n));
            }
        }
    }
    for (counter, values) in &acked {
        v.checked += values.len();
        for (_, done, n) in values {
            let earlier_after: Vec<_> = values
                .iter()
                .filter(|(inv, _, m)| inv > done && m < n)
                .collect();
            if let Some((inv, _, m)) = earlier_after.first() {
                v.violations.push(format!(
                    "{counter}: {n} acknowledged at {done} ms, then {m} answered to a call made at {inv} ms"
                ));
            }
        }
        let max = values.iter().map(|(_, _, n)| *n).max().unwrap_or(0);
        match finals.get(*counter) {
            Some(Some(f)) if *f >= max => {}
            Some(Some(f)) => v.violations.push(format!(
                "{counter}: final value {f} is below the acknowledged {max}"
            )),
            _ => v
                .violations
                .push(format!("{counter}: could not be read after healing")),
        }
    }
    v
}

/// G6: a read of a supervisor's children (supervisors or agents) sees every create under it
/// acknowledged before the read began, and no stop acknowledged before it.
pub fn g6_linearizable_reads(ops: &[Op]) -> Verdict {
    let mut v = Verdict::new("G6", "reads never miss an acknowledged write");
    for r in ops {
        let (Some((entity, scope, field)), Outcome::Ok { value }) = (read_of(r), &r.outcome) else {
            continue;
        };
        v.checked += 1;
        let seen: BTreeSet<&str> = value[field]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
            .unwrap_or_default();
        let noun = entity.noun();
        for o in ops.iter().filter(|o| o.complete_ms < r.invoke_ms) {
            let (Some(w), Outcome::Ok { .. }) = (write_of(o), &o.outcome) else {
                continue;
            };
            if w.entity != entity {
                continue;
            }
            let name = w.name;
            if w.create
                && w.scope == Some(scope)
                && !seen.contains(name)
                && !stops_invoked_before(ops, entity, name, r.complete_ms)
            {
                v.violations.push(format!(
                    "read of {scope} at {}..{} ms misses {noun} {name}, acknowledged at {} ms",
                    r.invoke_ms, r.complete_ms, o.complete_ms
                ));
            }
            if !w.create && seen.contains(name) {
                v.violations.push(format!(
                    "read of {scope} at {}..{} ms still sees {noun} {name}, stopped at {} ms",
                    r.invoke_ms, r.complete_ms, o.complete_ms
                ));
            }
        }
    }
    v
}

/// G6 (leaders): no node's leadership goes back in time, from `leader_changed` events
/// (`(term, leader)` in the order they arrived; one node's events arrive in the order it
/// published them).
///
/// Not "one leader per term": openraft 0.9 (without its `single-term-leader` feature) elects
/// by leader id, `(term, node id)`, so two nodes may lead the same term one after the other,
/// each elected by a quorum that granted its greater vote (chaos seed 101 saw `T153-N1`, then
/// `T153-N3`). Election safety holds per leader id, which no two nodes share. What a lost or
/// reverted vote would show is a node leading an older term after a newer one: its vote is
/// persisted before it is used, so even across restarts its terms never decrease (a restarted
/// leader may resume its term and announce it again).
pub fn g6_leadership_never_goes_back(observations: &[(u64, u64)]) -> Verdict {
    let mut v = Verdict::new("G6", "no node leads an older term after a newer one");
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for (term, leader) in observations {
        v.checked += 1;
        let latest = last.entry(*leader).or_insert(*term);
        if *term < *latest {
            v.violations.push(format!(
                "node {leader} led term {term} after term {latest}: its vote went back"
            ));
        }
        *latest = (*latest).max(*term);
    }
    v
}

/// G7: every acknowledged reply for one request id (a create, a spawn or an agent stop) is
/// the same: the command took effect once.
pub fn g7_idempotent_retries(ops: &[Op]) -> Verdict {
    let mut v = Verdict::new("G7", "no duplicate from a retried command");
    let mut replies: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for o in ops {
        if let (Some(rid), Outcome::Ok { value }) = (request_of(o), &o.outcome) {
            replies.entry(rid).or_default().push(value);
        }
    }
    for (rid, values) in replies {
        v.checked += 1;
        if values.windows(2).any(|w| w[0] != w[1]) {
            let ids: Vec<_> = values.iter().map(|x| x["id"].clone()).collect();
            v.violations
                .push(format!("request {rid} got different replies: ids {ids:?}"));
        }
    }
    v
}

/// G5: bad input is refused with a clear error, never accepted, never crashes a node, and
/// leaves no trace in the registry.
pub fn g5_bad_input(ops: &[Op], fin: &FinalState, crashes: &[String]) -> Verdict {
    let mut v = Verdict::new("G5", "bad input gets a clear error and changes nothing");
    // `forbidden`: NATS itself refused it (an unknown command is no identity's to send).
    let clear = ["bad_request", "too_large", "forbidden"];
    for o in ops {
        let OpKind::BadInput { what } = &o.kind else {
            continue;
        };
        v.checked += 1;
        match &o.outcome {
            Outcome::Failed { code, .. } if clear.contains(&code.as_str()) => {}
            // A poison call to an agent that is not running here now never reached it.
            Outcome::Failed { code, .. }
                if code == "unavailable" && what.ends_with(crate::hostile::AGENT_CALL) => {}
            // No answer at all happens under faults and is not a wrong answer.
            Outcome::Unknown { .. } => {}
            // Accepted, `unavailable` (which would hide the real problem) or anything else.
            other => v
                .violations
                .push(format!("{what} at {} ms got {other:?}", o.invoke_ms)),
        }
    }
    // Forged internal messages: NATS refuses them at once, so some of them must come back
    // `forbidden` (a fault may swallow any one of them).
    let forged = ops.iter().filter(|o| {
        matches!(&o.kind, OpKind::BadInput { what } if what.starts_with(crate::hostile::FORGED))
    });
    let (sent, refused) = forged.fold((0, 0), |(n, r), o| {
        let forbidden = matches!(&o.outcome, Outcome::Failed { code, .. } if code == "forbidden");
        (n + 1, r + usize::from(forbidden))
    });
    if sent >= 5 && refused == 0 {
        v.violations.push(format!(
            "NATS refused none of {sent} forged internal messages"
        ));
    }
    let names = fin.supervisors.keys().chain(fin.agents.keys());
    for name in names.filter(|n| n.starts_with("bad")) {
        v.violations.push(format!("bad input created {name}"));
    }
    v.violations.extend(crashes.iter().cloned());
    v
}

/// A node process that ended (SIGKILL, a stop, a crash) by `at_us`, wall clock (UTC,
/// microseconds since the Unix epoch), as the harness read it once the process was gone: an
/// agent the node left running in its journal ran there no later than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Kill {
    pub node: u64,
    pub at_us: i64,
}

/// A SIGSTOP of a node process (wall clock, µs, read just after the signal was sent) and its
/// SIGCONT (`to_us`; none if it was never continued).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pause {
    pub node: u64,
    pub from_us: i64,
    pub to_us: Option<i64>,
}

/// What the harness did to node processes, as the G1 checker needs it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessFaults {
    /// Every node process that ended (killed, stopped, crashed).
    pub kills: Vec<Kill>,
    /// Every pause of a node process.
    pub pauses: Vec<Pause>,
    /// The nodes' `failure.lease_ms`, in µs.
    pub lease_us: i64,
}

impl ProcessFaults {
    /// The first kill of `node` at or after `from`.
    fn killed_after(&self, node: u64, from: i64) -> Option<i64> {
        self.kills
            .iter()
            .filter(|k| k.node == node && k.at_us >= from)
            .map(|k| k.at_us)
            .min()
    }

    /// When a run of `node` from `from` that wrote no stop line had to end because of a pause
    /// longer than the lease, begun after `from`: the node's last lease was granted for a
    /// heartbeat sent before the pause, so it ended within `lease_us` of the pause's start;
    /// once continued, the node could only get a lease of a new term, and an agent never runs
    /// into a term after the one it started in (`node::lease`).
    fn lease_ended_in_pause(&self, node: u64, from: i64) -> Option<i64> {
        self.pauses
            .iter()
            .filter(|p| p.node == node && p.from_us >= from)
            .filter(|p| p.to_us.is_none_or(|to| to - p.from_us > self.lease_us))
            .map(|p| p.from_us + self.lease_us)
            .min()
    }
}

/// One node's agent journal, read after the run, and when it was read (wall clock, µs): a run
/// still open in it was running then, and nothing is known after.
#[derive(Debug, Clone)]
pub struct NodeJournal {
    pub node: u64,
    pub entries: Vec<JournalEntry>,
    pub read_at_us: i64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// A `stop` line, with its reason.
    Stopped(String),
    /// A `stop` forced by a lost lease: the run ends when the lease ran out (`until`).
    LeaseLost,
    /// No stop line: the node process ended (the harness's kill record).
    Killed,
    /// No stop line: the node was paused for longer than its lease, which ran out.
    LeaseRanOutPaused,
    /// No stop line: the node started the agent again (after a restart of the node).
    StartedAgain,
    /// Still running when the journal was read.
    Open,
}

/// One running interval of an agent on one node, `[from_us, to_us)` in wall-clock µs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub node: u64,
    pub epoch: u64,
    pub from_us: i64,
    pub to_us: i64,
    pub end: RunEnd,
    /// The start line's `t` as the journal holds it, to find the line.
    pub started: String,
}

/// The running intervals of every agent (by id) from every node's journal. A `stop` ends a run
/// at its `until` when it has one (a lost lease: the agent could not act past it), else at its
/// `t`. A run with no stop ends at the first kill of its node at or after its start, or at a
/// later start of the same agent on the node (whichever is first), or, still open, when the
/// journal was read; and, killed or started again, no later than its lease could last through
/// a pause longer than the lease (`ProcessFaults::lease_ended_in_pause`).
pub fn agent_runs(journals: &[NodeJournal], procs: &ProcessFaults) -> BTreeMap<String, Vec<Run>> {
    let mut out: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for j in journals {
        let killed_after = |from: i64| procs.killed_after(j.node, from);
        // Agent id to its open run: (epoch, start, start line's t).
        let mut open: BTreeMap<String, (u64, i64, String)> = BTreeMap::new();
        let mut close = |agent: &str, (epoch, from, started): (u64, i64, String), to, end| {
            let (to, end) = match procs.lease_ended_in_pause(j.node, from) {
                Some(paused)
                    if paused < to && matches!(end, RunEnd::Killed | RunEnd::StartedAgain) =>
                {
                    (paused, RunEnd::LeaseRanOutPaused)
                }
                _ => (to, end),
            };
            out.entry(agent.to_string()).or_default().push(Run {
                node: j.node,
                epoch,
                from_us: from,
                // A lease that ran out before the start leaves an empty run, not a negative one.
                to_us: std::cmp::max(from, to),
                end,
                started,
            });
        };
        for e in &j.entries {
            let agent = e.agent.to_string();
            let t = e.t.timestamp_micros();
            if let Some(run) = open.remove(&agent) {
                match e.ev.as_str() {
                    "start" => match killed_after(run.1) {
                        Some(k) if k < t => close(&agent, run, k, RunEnd::Killed),
                        _ => close(&agent, run, t, RunEnd::StartedAgain),
                    },
                    _ => match e.until {
                        Some(u) => close(&agent, run, u.timestamp_micros(), RunEnd::LeaseLost),
                        None => {
                            let why = e.reason.clone().unwrap_or_default();
                            close(&agent, run, t, RunEnd::Stopped(why))
                        }
                    },
                }
            }
            if e.ev == "start" {
                let started = serde_json::to_value(e.t)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                open.insert(agent, (e.epoch, t, started));
            }
        }
        for (agent, run) in open {
            match killed_after(run.1) {
                Some(k) => close(&agent, run, k, RunEnd::Killed),
                None => close(&agent, run, j.read_at_us, RunEnd::Open),
            }
        }
    }
    out
}

fn describe_run(r: &Run, origin_us: i64) -> String {
    let ms = |us: i64| (us - origin_us) as f64 / 1000.0;
    let end = match &r.end {
        RunEnd::Stopped(why) => format!("stopped: {why}"),
        RunEnd::LeaseLost => "lease ran out".into(),
        RunEnd::Killed => "node killed".into(),
        RunEnd::LeaseRanOutPaused => "lease ran out while paused".into(),
        RunEnd::StartedAgain => "started again".into(),
        RunEnd::Open => "still running when read".into(),
    };
    format!(
        "node {} (epoch {}, {:.3}..{:.3} ms, {end}; started {})",
        r.node,
        r.epoch,
        ms(r.from_us),
        ms(r.to_us),
        r.started
    )
}

/// G1: no agent ever ran on two nodes at once, by the nodes' journals and the harness's kill
/// and pause records (one clock: every process reads the same machine's wall clock, so no tolerance; a
/// run that ends exactly when another starts does not overlap it). `names` maps agent ids to
/// names for the report; `origin_us` is the run's start (wall clock), so that times read as
/// milliseconds of the run like the history's.
pub fn g1_at_most_one(
    journals: &[NodeJournal],
    procs: &ProcessFaults,
    names: &BTreeMap<String, String>,
    origin_us: i64,
) -> Verdict {
    let mut v = Verdict::new("G1", "no agent ran on two nodes at once (node journals)");
    for (agent, mut runs) in agent_runs(journals, procs) {
        v.checked += runs.len();
        runs.sort_by_key(|r| (r.from_us, r.to_us));
        let name = names
            .get(&agent)
            .map_or(agent.clone(), |n| format!("{n} ({agent})"));
        for (i, a) in runs.iter().enumerate() {
            for b in runs[i + 1..].iter().take_while(|b| b.from_us < a.to_us) {
                // `b` starts before `a` ends; an empty run overlaps nothing.
                if b.node != a.node && b.from_us < b.to_us {
                    v.violations.push(format!(
                        "agent {name} ran on {} and {} at once",
                        describe_run(a, origin_us),
                        describe_run(b, origin_us)
                    ));
                }
            }
        }
    }
    v
}

/// G4 (agents): after healing, every permanent agent the workload created (`wanted`, by name)
/// that is still in the registry (`records`: `list_agents` records, read at the deadline or
/// once all ran) is `running`.
pub fn g4_agents_run(wanted: &[String], records: &[Value], within_s: u64) -> Verdict {
    let mut v = Verdict::new("G4", "every permanent agent runs again after healing");
    for name in wanted {
        let Some(a) = records.iter().find(|a| a["name"] == name.as_str()) else {
            continue;
        };
        if a["restart"] != "permanent" {
            continue;
        }
        v.checked += 1;
        if a["status"] != "running" {
            let node = a["node"]
                .as_u64()
                .map_or("no node".into(), |n| format!("node {n}"));
            let why = a["pending_reason"]
                .as_str()
                .map_or(String::new(), |r| format!(" ({r})"));
            v.violations.push(format!(
                "{name} (epoch {}) is {} on {node}{why} {within_s} s after healing: it never ran again",
                a["epoch"], a["status"]
            ));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    //! Each checker must catch the violation it exists for: synthetic histories with a known
    //! flaw, and their clean twins.

    use super::*;
    use serde_json::json;

    fn create(name: &str, id: &str, t: (u64, u64), ok: bool) -> Op {
        Op {
            client: 0,
            kind: OpKind::Create {
                name: name.into(),
                parent: "p".into(),
                request_id: format!("r-{name}"),
                retry: false,
            },
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome: if ok {
                Outcome::Ok {
                    value: json!({"id": id, "name": name}),
                }
            } else {
                Outcome::Unknown {
                    why: "timeout".into(),
                }
            },
        }
    }

    fn read(names: &[&str], t: (u64, u64)) -> Op {
        let sups: Vec<_> = names.iter().map(|n| json!({"name": n})).collect();
        Op {
            client: 0,
            kind: OpKind::Read { parent: "p".into() },
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome: Outcome::Ok {
                value: json!({"supervisors": sups}),
            },
        }
    }

    fn names(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, i)| (n.to_string(), i.to_string()))
            .collect()
    }

    /// A final registry holding these supervisors (name, id) and no agents.
    fn fin(pairs: &[(&str, &str)]) -> FinalState {
        FinalState {
            supervisors: names(pairs),
            agents: BTreeMap::new(),
        }
    }

    /// An operation on agent `name` under supervisor `p`: a spawn or a stop (with request id
    /// `rid`) answered `reply`, or unknown when `reply` is `None`.
    fn on_agent(spawn: bool, name: &str, rid: &str, t: (u64, u64), reply: Option<Value>) -> Op {
        let kind = if spawn {
            OpKind::SpawnAgent {
                name: name.into(),
                supervisor: "p".into(),
                restart: "permanent".into(),
                request_id: rid.into(),
                retry: false,
            }
        } else {
            OpKind::StopAgent {
                name: name.into(),
                request_id: rid.into(),
                retry: false,
            }
        };
        Op {
            client: 0,
            kind,
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome: match reply {
                Some(value) => Outcome::Ok { value },
                None => Outcome::Unknown {
                    why: "timeout".into(),
                },
            },
        }
    }

    fn read_agents(names: &[&str], t: (u64, u64)) -> Op {
        let agents: Vec<_> = names.iter().map(|n| json!({"name": n})).collect();
        Op {
            client: 0,
            kind: OpKind::ReadAgents {
                supervisor: "p".into(),
            },
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome: Outcome::Ok {
                value: json!({"agents": agents}),
            },
        }
    }

    #[test]
    fn agent_checks_catch_lost_spawns_stops_that_did_not_stick_and_stale_reads() {
        let spawned =
            |name: &str, id: &str, t| on_agent(true, name, name, t, Some(json!({"id": id})));
        let stopped =
            |name: &str, t| on_agent(false, name, "s", t, Some(json!({"status": "stopped"})));
        let agents = |pairs: &[(&str, &str)]| FinalState {
            supervisors: BTreeMap::new(),
            agents: names(pairs),
        };
        // G2: a spawned agent that is gone is lost; a stopped one that is still there did not
        // stick; an agent of the same name among the supervisors does not count.
        let ops = vec![
            spawned("a", "1", (0, 5)),
            spawned("b", "2", (0, 5)),
            stopped("b", (6, 9)),
        ];
        assert!(g2_acknowledged_writes(&ops, &agents(&[("a", "1")])).ok());
        let v = g2_acknowledged_writes(&ops, &agents(&[("a", "1"), ("b", "2")]));
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(
            v.violations[0].contains("stop of agent b"),
            "{:?}",
            v.violations
        );
        let v = g2_acknowledged_writes(&ops, &fin(&[("a", "1")]));
        assert!(
            v.violations[0].contains("create of agent a"),
            "{:?}",
            v.violations
        );
        // An unknown stop may have run: the agent may be gone.
        let maybe = vec![
            spawned("a", "1", (0, 5)),
            on_agent(false, "a", "s", (6, 9), None),
        ];
        assert!(g2_acknowledged_writes(&maybe, &agents(&[])).ok());

        // G6: a read after the spawn must list it; after the stop it must not.
        let read_ops = |seen: &[&str], t| vec![spawned("a", "1", (0, 5)), read_agents(seen, t)];
        assert!(g6_linearizable_reads(&read_ops(&["a"], (6, 8))).ok());
        assert!(!g6_linearizable_reads(&read_ops(&[], (6, 8))).ok());
        assert!(
            g6_linearizable_reads(&read_ops(&[], (4, 8))).ok(),
            "concurrent"
        );
        let mut after_stop = read_ops(&["a"], (12, 14));
        after_stop.push(stopped("a", (6, 9)));
        let v = g6_linearizable_reads(&after_stop);
        assert!(
            v.violations[0].contains("still sees agent a"),
            "{:?}",
            v.violations
        );
        // A supervisor read does not see agents.
        let sup_read = vec![spawned("a", "1", (0, 5)), read(&[], (6, 8))];
        assert!(g6_linearizable_reads(&sup_read).ok());

        // G7: a retried spawn or stop answers what the first attempt did.
        let again = |reply| on_agent(true, "a", "a", (6, 9), Some(reply));
        assert!(
            g7_idempotent_retries(&[spawned("a", "1", (0, 5)), again(json!({"id": "1"}))]).ok()
        );
        assert!(
            !g7_idempotent_retries(&[spawned("a", "1", (0, 5)), again(json!({"id": "2"}))]).ok()
        );
        let stop_twice = [
            on_agent(false, "a", "s", (0, 5), Some(json!({"status": "stopped"}))),
            on_agent(false, "a", "s", (6, 9), Some(json!({"status": "running"}))),
        ];
        assert!(!g7_idempotent_retries(&stop_twice).ok());
    }

    #[test]
    fn g2_catches_a_lost_acknowledged_create_but_not_an_unknown_one() {
        let ops = vec![
            create("a", "1", (0, 5), true),
            create("b", "2", (0, 5), false),
        ];
        assert!(g2_acknowledged_writes(&ops, &fin(&[("a", "1")])).ok());
        let v = g2_acknowledged_writes(&ops, &fin(&[]));
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(
            !g2_acknowledged_writes(&ops, &fin(&[("a", "9")])).ok(),
            "a different id is a lost write"
        );
    }

    #[test]
    fn g6_catches_a_stale_read_but_allows_a_concurrent_one() {
        let ops = vec![create("a", "1", (0, 5), true), read(&[], (6, 8))];
        assert!(!g6_linearizable_reads(&ops).ok());
        let concurrent = vec![create("a", "1", (0, 5), true), read(&[], (4, 8))];
        assert!(g6_linearizable_reads(&concurrent).ok());
        assert!(
            g6_linearizable_reads(&[create("a", "1", (0, 5), true), read(&["a"], (6, 8))]).ok()
        );
    }

    #[test]
    fn g3_catches_a_counter_going_backwards_or_losing_its_value() {
        let op = |kind_incr: bool, t: (u64, u64), n: i64| Op {
            client: 0,
            kind: if kind_incr {
                OpKind::Increment {
                    counter: "c".into(),
                }
            } else {
                OpKind::CounterRead {
                    counter: "c".into(),
                }
            },
            invoke_ms: t.0,
            complete_ms: t.1,
            outcome: Outcome::Ok {
                value: json!({"value": n}),
            },
        };
        let finals = |n: i64| BTreeMap::from([("c".to_string(), Some(n))]);
        let good = vec![
            op(true, (0, 1), 1),
            op(true, (2, 3), 2),
            op(false, (4, 5), 2),
        ];
        assert!(g3_counters(&good, &finals(2)).ok());
        let back = vec![
            op(true, (0, 1), 1),
            op(true, (2, 3), 2),
            op(false, (4, 5), 1),
        ];
        assert!(
            !g3_counters(&back, &finals(2)).ok(),
            "a value went backwards"
        );
        assert!(
            !g3_counters(&good, &finals(1)).ok(),
            "the final value lost an acknowledged one"
        );
    }

    #[test]
    fn g6_catches_a_node_leading_an_older_term_after_a_newer_one() {
        // Two leaders of term 2 one after the other (openraft's leader ids), and a restarted
        // leader resuming its term: all fine.
        assert!(g6_leadership_never_goes_back(&[(1, 1), (2, 1), (2, 3), (2, 3), (3, 1)]).ok());
        assert!(!g6_leadership_never_goes_back(&[(1, 1), (3, 1), (2, 1)]).ok());
    }

    #[test]
    fn g7_catches_a_retry_that_created_again() {
        let same = vec![
            create("a", "1", (0, 5), true),
            create("a", "1", (6, 9), true),
        ];
        assert!(g7_idempotent_retries(&same).ok());
        let twice = vec![
            create("a", "1", (0, 5), true),
            create("a", "2", (6, 9), true),
        ];
        assert!(!g7_idempotent_retries(&twice).ok());
    }

    #[test]
    fn g5_catches_accepted_bad_input_and_crashes() {
        let bad = |outcome| Op {
            client: 0,
            kind: OpKind::BadInput { what: "x".into() },
            invoke_ms: 0,
            complete_ms: 1,
            outcome,
        };
        let refused = bad(Outcome::Failed {
            code: "bad_request".into(),
            message: String::new(),
        });
        assert!(g5_bad_input(std::slice::from_ref(&refused), &fin(&[]), &[]).ok());
        assert!(!g5_bad_input(&[bad(Outcome::Ok { value: json!({}) })], &fin(&[]), &[]).ok());
        assert!(!g5_bad_input(std::slice::from_ref(&refused), &fin(&[("bad-1", "1")]), &[]).ok());
        assert!(!g5_bad_input(&[refused], &fin(&[]), &["node 2 exited".into()]).ok());
        // Forged internal messages that NATS never refused: its permissions are not enforced.
        let forged = |outcome| Op {
            kind: OpKind::BadInput {
                what: format!("{} heartbeat", crate::hostile::FORGED),
            },
            ..bad(outcome)
        };
        let unanswered = vec![
            forged(Outcome::Unknown {
                why: "timeout".into()
            });
            5
        ];
        assert!(!g5_bad_input(&unanswered, &fin(&[]), &[]).ok());
        let mut some_refused = unanswered;
        some_refused[2] = forged(Outcome::Failed {
            code: "forbidden".into(),
            message: String::new(),
        });
        assert!(g5_bad_input(&some_refused, &fin(&[]), &[]).ok());
    }

    /// Wall-clock µs of second `s` of the test's day.
    fn us(s: f64) -> i64 {
        1_735_689_600_000_000 + (s * 1e6) as i64
    }

    /// A journal line as a node writes it: agent `a`, at second `t`.
    fn line(
        a: u128,
        epoch: u64,
        ev: &str,
        t: f64,
        reason: Option<&str>,
        until: Option<f64>,
    ) -> JournalEntry {
        let ts = |s: f64| format!("2025-01-01T00:00:{s:09.6}Z");
        let mut v = json!({
            "t": ts(t), "node": 0, "agent": format!("00000000-0000-0000-0000-{a:012x}"),
            "epoch": epoch, "ev": ev,
        });
        if let Some(r) = reason {
            v["reason"] = json!(r);
        }
        if let Some(u) = until {
            v["until"] = json!(ts(u));
        }
        serde_json::from_value(v).expect("a journal line")
    }

    fn journal(node: u64, entries: Vec<JournalEntry>) -> NodeJournal {
        NodeJournal {
            node,
            entries,
            read_at_us: us(50.0),
        }
    }

    /// Kills and pauses, with a lease of one second.
    fn procs(kills: &[Kill], pauses: &[Pause]) -> ProcessFaults {
        ProcessFaults {
            kills: kills.to_vec(),
            pauses: pauses.to_vec(),
            lease_us: 1_000_000,
        }
    }

    fn g1(journals: &[NodeJournal], kills: &[Kill]) -> Verdict {
        g1_paused(journals, kills, &[])
    }

    fn g1_paused(journals: &[NodeJournal], kills: &[Kill], pauses: &[Pause]) -> Verdict {
        g1_at_most_one(journals, &procs(kills, pauses), &BTreeMap::new(), us(0.0))
    }

    #[test]
    fn g1_catches_an_agent_running_on_two_nodes_and_allows_a_clean_handoff() {
        let source = journal(
            1,
            vec![
                line(7, 1, "start", 1.0, None, None),
                line(7, 1, "stop", 5.0, Some("migrating"), None),
            ],
        );
        // The target started before the source had stopped.
        let early = journal(2, vec![line(7, 2, "start", 4.0, None, None)]);
        let v = g1(&[source.clone(), early], &[]);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        let x = &v.violations[0];
        assert!(
            x.contains("node 1 (epoch 1, 1000.000..5000.000 ms")
                && x.contains("node 2 (epoch 2, 4000.000..50000.000 ms"),
            "{x}"
        );
        // The target started when the source had stopped: an end equal to a start is fine.
        let handoff = journal(2, vec![line(7, 2, "start", 5.0, None, None)]);
        let v = g1(&[source.clone(), handoff], &[]);
        assert!(v.ok() && v.checked == 2, "{v:?}");
        // Two agents on two nodes at once are no violation.
        let other = journal(2, vec![line(8, 1, "start", 2.0, None, None)]);
        assert!(g1(&[source, other], &[]).ok());
    }

    #[test]
    fn g1_ends_a_killed_node_s_runs_at_the_kill() {
        // Node 1 is killed at 3 s with the agent running (no stop line); it fails over to node
        // 2 at 5 s, which stops it at 7 s; node 1 restarts and runs it again from 8 s.
        let victim = journal(
            1,
            vec![
                line(7, 1, "start", 1.0, None, None),
                line(7, 3, "start", 8.0, None, None),
            ],
        );
        let other = journal(
            2,
            vec![
                line(7, 2, "start", 5.0, None, None),
                line(7, 2, "stop", 7.0, Some("migrating"), None),
            ],
        );
        let kill = Kill {
            node: 1,
            at_us: us(3.0),
        };
        let v = g1(&[victim.clone(), other.clone()], &[kill]);
        assert!(v.ok() && v.checked == 3, "{v:?}");
        let runs = agent_runs(std::slice::from_ref(&victim), &procs(&[kill], &[]));
        let first = &runs.values().next().unwrap()[0];
        assert_eq!((first.to_us, &first.end), (us(3.0), &RunEnd::Killed));
        // Without the kill, the first run lasts until node 1 starts the agent again, across
        // node 2's run.
        let v = g1(&[victim.clone(), other.clone()], &[]);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        // A kill of node 2, or a kill of node 1 after node 2 started, does not end it in time.
        let late = |node, at| Kill {
            node,
            at_us: us(at),
        };
        assert!(!g1(&[victim.clone(), other.clone()], &[late(2, 3.0)]).ok());
        assert!(!g1(&[victim.clone(), other.clone()], &[late(1, 6.0)]).ok());
        // A kill before the run began ends nothing.
        assert!(!g1(&[victim, other], &[late(1, 0.5)]).ok());
    }

    #[test]
    fn g1_ends_a_lease_lost_run_when_the_lease_ran_out() {
        // Node 1 was paused from 2 s to 9 s; its lease ran out at 4 s, and it wrote the stop at
        // 9 s when it resumed. Node 2 started the agent at 5 s.
        let paused = |until: Option<f64>| {
            journal(
                1,
                vec![
                    line(7, 1, "start", 1.0, None, None),
                    line(7, 1, "stop", 9.0, Some("lease lost"), until),
                ],
            )
        };
        let other = journal(2, vec![line(7, 2, "start", 5.0, None, None)]);
        assert!(g1(&[paused(Some(4.0)), other.clone()], &[]).ok());
        // Without `until`, the run lasts until the stop line: an overlap.
        assert!(!g1(&[paused(None), other.clone()], &[]).ok());
        // A lease that ran out after the other node's start: an overlap.
        let v = g1(&[paused(Some(6.0)), other], &[]);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(
            v.violations[0].contains("lease ran out"),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn g1_ends_a_killed_node_s_runs_when_its_lease_ran_out_in_a_long_pause() {
        // Node 1 runs the agent from 1 s, is paused from 2 s to 5 s (longer than its one-second
        // lease), continued and killed at 5 s before writing anything; node 2 took the agent
        // over at 4 s.
        let victim = journal(1, vec![line(7, 1, "start", 1.0, None, None)]);
        let other = journal(2, vec![line(7, 2, "start", 4.0, None, None)]);
        let kill = Kill {
            node: 1,
            at_us: us(5.0),
        };
        let pause = |from: f64, to: f64| Pause {
            node: 1,
            from_us: us(from),
            to_us: Some(us(to)),
        };
        let both = [victim.clone(), other.clone()];
        assert!(
            !g1(&both, &[kill]).ok(),
            "without the pause the run lasts until the kill"
        );
        let v = g1_paused(&both, &[kill], &[pause(2.0, 5.0)]);
        assert!(v.ok(), "{v:?}");
        let runs = agent_runs(&both, &procs(&[kill], &[pause(2.0, 5.0)]));
        let first = runs
            .values()
            .next()
            .unwrap()
            .iter()
            .find(|r| r.node == 1)
            .unwrap();
        assert_eq!(
            (first.to_us, &first.end),
            (us(3.0), &RunEnd::LeaseRanOutPaused)
        );
        // A pause shorter than the lease leaves the lease (and the run) going.
        assert!(!g1_paused(&both, &[kill], &[pause(2.0, 2.5)]).ok());
        // A pause that began before the run does not end it; nor one on another node.
        assert!(!g1_paused(&both, &[kill], &[pause(0.2, 0.9 + 2.0)]).ok());
        let elsewhere = Pause {
            node: 2,
            ..pause(2.0, 5.0)
        };
        assert!(!g1_paused(&both, &[kill], &[elsewhere]).ok());
        // A lease that ran out in the pause after node 2 had started: an overlap.
        let late = [
            victim,
            journal(2, vec![line(7, 2, "start", 2.5, None, None)]),
        ];
        assert!(!g1_paused(&late, &[kill], &[pause(2.0, 5.0)]).ok());
    }

    #[test]
    fn g1_reads_runs_still_open_as_running_when_read() {
        // Both nodes still run the agent when their journals are read: an overlap.
        let a = journal(1, vec![line(7, 1, "start", 1.0, None, None)]);
        let b = journal(2, vec![line(7, 2, "start", 5.0, None, None)]);
        let v = g1(&[a.clone(), b.clone()], &[]);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(v.violations[0].contains("still running when read"));
        // Node 1's journal was read before node 2 started it: no evidence of an overlap.
        let a = NodeJournal {
            read_at_us: us(4.0),
            ..a
        };
        assert!(g1(&[a, b], &[]).ok());
    }

    #[test]
    fn g4_catches_a_permanent_agent_that_never_ran_again() {
        let rec = |name: &str, restart: &str, status: &str| {
            json!({"name": name, "restart": restart, "status": status, "epoch": 3, "node": null,
                   "pending_reason": "no node can take it"})
        };
        let wanted = vec!["c0".to_string(), "c1".to_string(), "c2".to_string()];
        let good = [
            rec("c0", "permanent", "running"),
            rec("c1", "permanent", "running"),
        ];
        let v = g4_agents_run(&wanted, &good, 60);
        assert!(
            v.ok() && v.checked == 2,
            "an agent not in the registry is not counted: {v:?}"
        );
        let stuck = [
            rec("c0", "permanent", "running"),
            rec("c1", "permanent", "pending"),
        ];
        let v = g4_agents_run(&wanted, &stuck, 60);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(v.violations[0]
            .starts_with("c1 (epoch 3) is \"pending\" on no node (no node can take it)"));
        let temporary = [rec("c1", "temporary", "pending")];
        assert!(
            g4_agents_run(&wanted, &temporary, 60).ok(),
            "only permanent agents"
        );
    }
}
