//! Placement: which node an agent runs on, and which agents a rebalance moves. Pure code: the
//! registry calls it inside `apply` with its own records, so every replica decides the same
//! thing from the same log, and the tests below pin each rule with plain data.
//!
//! Rules, in order (`docs/runtime-semantics.md` has them in prose):
//! 1. Only nodes that are `up` (not suspect, down, draining or left), run the agent's kind,
//!    carry every label of the agent's `constraints`, are below their capacity and are not
//!    excluded (the source of a migration, a node that just went down) are candidates.
//! 2. `pinned` takes its node or nothing.
//! 3. `spread` picks the value of the `spread_by` label (a zone) holding the fewest of the
//!    agent's siblings, then the least loaded node in it.
//! 4. `least_loaded` (the default) picks the node with the fewest placed agents relative to
//!    its capacity, then the lowest CPU, then the lowest id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, WireError};

/// How an agent picks its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    LeastLoaded,
    /// Across the values of a label (`spread_by`, default `zone`).
    Spread,
    /// On `node` only.
    Pinned,
}

/// An agent's placement request, as clients send it and the registry stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Placement {
    /// Defaults to `pinned` when `node` is given, else `least_loaded`.
    pub strategy: Option<Strategy>,
    /// The node of a pinned agent.
    pub node: Option<u64>,
    /// The label spread over; `zone` by default.
    pub spread_by: Option<String>,
    /// Labels a node must carry, with these values.
    pub constraints: BTreeMap<String, String>,
}

impl Placement {
    pub fn strategy(&self) -> Strategy {
        match (self.strategy, self.node) {
            (Some(s), _) => s,
            (None, Some(_)) => Strategy::Pinned,
            (None, None) => Strategy::LeastLoaded,
        }
    }

    pub fn pinned(&self) -> Option<u64> {
        (self.strategy() == Strategy::Pinned)
            .then_some(self.node)
            .flatten()
    }

    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |m: &str| {
            Err(WireError::new(
                ErrorCode::BadRequest,
                format!("placement: {m}"),
            ))
        };
        match (self.strategy(), self.node) {
            (Strategy::Pinned, None) => return bad("pinned needs `node`"),
            (Strategy::Pinned, Some(0)) => return bad("node ids are positive"),
            (Strategy::LeastLoaded | Strategy::Spread, Some(_)) => {
                return bad("`node` goes with the pinned strategy only")
            }
            _ => {}
        }
        if let Some(k) = &self.spread_by {
            crate::names::validate_name("placement.spread_by", k)?;
        }
        crate::names::validate_labels(&self.constraints)
    }

    fn spread_key(&self) -> &str {
        self.spread_by.as_deref().unwrap_or("zone")
    }
}

/// An agent's placement, as its record keeps it: boxed only when it is not the default. Most
/// agents have the default, and a `Placement` inline took 72 of the record's 392 bytes, on
/// every node for every agent (the record then falls into a smaller allocation class: 384
/// bytes instead of 448 with its `Arc`). Reads, encodes and decodes as the `Placement` it
/// holds, so records and answers look the same.
#[derive(Debug, Clone, Default)]
pub struct AgentPlacement(Option<Box<Placement>>);

static DEFAULT_PLACEMENT: Placement = Placement {
    strategy: None,
    node: None,
    spread_by: None,
    constraints: BTreeMap::new(),
};

impl std::ops::Deref for AgentPlacement {
    type Target = Placement;

    fn deref(&self) -> &Placement {
        self.0.as_deref().unwrap_or(&DEFAULT_PLACEMENT)
    }
}

impl From<Placement> for AgentPlacement {
    fn from(p: Placement) -> Self {
        AgentPlacement((p != DEFAULT_PLACEMENT).then(|| Box::new(p)))
    }
}

impl PartialEq for AgentPlacement {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Serialize for AgentPlacement {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for AgentPlacement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Placement::deserialize(d).map(AgentPlacement::from)
    }
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    pub id: u64,
    /// Up, and not draining: it may take new agents.
    pub open: bool,
    pub labels: &'a BTreeMap<String, String>,
    pub kinds: &'a [String],
    /// Agents it may hold; 0 is unlimited.
    pub capacity: u32,
    /// Agents placed on it now.
    pub load: usize,
    /// CPU use the node last reported, in thousandths of one core.
    pub cpu_permille: u32,
}

impl Candidate<'_> {
    fn runs(&self, kind: &str) -> bool {
        self.kinds.iter().any(|k| k == kind)
    }

    fn has_room(&self, n: usize) -> bool {
        self.capacity == 0 || self.load + n <= self.capacity as usize
    }

    fn meets(&self, constraints: &BTreeMap<String, String>) -> bool {
        constraints
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }

    /// Load relative to capacity, scaled so that it compares as an integer.
    fn fill(&self) -> u64 {
        let cap = if self.capacity == 0 {
            1_000_000
        } else {
            self.capacity as u64
        };
        (self.load as u64 * 1_000_000_000) / cap
    }
}

/// What one placement needs.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Kinds of every agent placed together (one for a lone agent, several for a colocated
    /// subtree); an empty list fits any node.
    pub kinds: Vec<&'a str>,
    pub placement: &'a Placement,
    /// How many agents need room on the node.
    pub count: usize,
    /// A node that must not be chosen.
    pub exclude: Option<u64>,
    /// For `spread`: the agent's siblings already placed, per node.
    pub siblings: &'a BTreeMap<u64, usize>,
}

/// Why no node was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// No node that is up runs one of the kinds (a kind only a suspect, down, draining or
    /// departed node runs counts as unknown: nothing could start it now).
    UnknownKind(String),
    /// The pinned node is not up, or cannot take the agent.
    PinnedUnavailable(u64),
    /// Nodes run the kind, but none is open, meets the constraints and has room.
    NoRoom,
}

impl Refusal {
    /// The reason, as a client or an operator reads it.
    pub fn describe(&self) -> String {
        match self {
            Refusal::UnknownKind(k) => format!("no node that is up runs kind {k:?}"),
            Refusal::PinnedUnavailable(n) => {
                format!("pinned to node {n}, which is not up or cannot take it")
            }
            Refusal::NoRoom => {
                "no node that is up, runs the kind, meets the constraints and has room".into()
            }
        }
    }

    /// The reply envelope's error code for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::UnknownKind(_) => ErrorCode::BadRequest,
            _ => ErrorCode::Capacity,
        }
    }
}

/// Chooses a node for `req`.
pub fn choose(req: &Request<'_>, nodes: &[Candidate<'_>]) -> Result<u64, Refusal> {
    if let Some(k) = req
        .kinds
        .iter()
        .find(|k| !nodes.iter().any(|n| n.open && n.runs(k)))
    {
        return Err(Refusal::UnknownKind(k.to_string()));
    }
    let fits = |n: &&Candidate<'_>| {
        n.open
            && Some(n.id) != req.exclude
            && req.kinds.iter().all(|k| n.runs(k))
            && n.meets(&req.placement.constraints)
            && n.has_room(req.count)
    };
    let load_order = |n: &&Candidate<'_>| (n.fill(), n.cpu_permille, n.id);
    match req.placement.strategy() {
        Strategy::Pinned => {
            let pin = req.placement.node.unwrap_or(0);
            nodes
                .iter()
                .filter(fits)
                .find(|n| n.id == pin)
                .map(|n| n.id)
                .ok_or(Refusal::PinnedUnavailable(pin))
        }
        Strategy::LeastLoaded => nodes
            .iter()
            .filter(fits)
            .min_by_key(load_order)
            .map(|n| n.id)
            .ok_or(Refusal::NoRoom),
        Strategy::Spread => {
            let key = req.placement.spread_key();
            // Siblings per label value, counted over every node carrying the label.
            let mut per_value: BTreeMap<&str, usize> = BTreeMap::new();
            for n in nodes {
                if let Some(v) = n.labels.get(key) {
                    *per_value.entry(v).or_default() +=
                        req.siblings.get(&n.id).copied().unwrap_or(0);
                }
            }
            nodes
                .iter()
                .filter(fits)
                .min_by_key(|n| {
                    let value = n.labels.get(key).map(String::as_str);
                    // Nodes without the label come last.
                    let crowd = value.map_or(usize::MAX, |v| per_value[v]);
                    (crowd, load_order(n))
                })
                .map(|n| n.id)
                .ok_or(Refusal::NoRoom)
        }
    }
}

/// An agent a rebalance may move.
#[derive(Debug, Clone, PartialEq)]
pub struct Movable<'a> {
    pub id: uuid::Uuid,
    pub node: u64,
    pub kind: &'a str,
    pub placement: &'a Placement,
}

/// One planned move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub agent: uuid::Uuid,
    pub from: u64,
    pub to: u64,
}

/// How uneven the open nodes are: (most - fewest) / mean agents, 0 when balanced.
pub fn imbalance(nodes: &[Candidate<'_>]) -> f64 {
    let loads: Vec<usize> = nodes.iter().filter(|n| n.open).map(|n| n.load).collect();
    let (Some(max), Some(min)) = (loads.iter().max(), loads.iter().min()) else {
        return 0.0;
    };
    let mean = loads.iter().sum::<usize>() as f64 / loads.len() as f64;
    if mean == 0.0 {
        0.0
    } else {
        (max - min) as f64 / mean
    }
}

/// Moves, at most `max_moves`, each from the most loaded open node to the least loaded one
/// that can take the agent, while that narrows the gap by at least two agents.
pub fn rebalance(nodes: &[Candidate<'_>], agents: &[Movable<'_>], max_moves: usize) -> Vec<Move> {
    let mut load: BTreeMap<u64, usize> = nodes
        .iter()
        .filter(|n| n.open)
        .map(|n| (n.id, n.load))
        .collect();
    let mut moved = std::collections::BTreeSet::new();
    let mut moves = Vec::new();
    while moves.len() < max_moves {
        let Some((&from, &most)) = load
            .iter()
            .max_by_key(|(id, l)| (**l, std::cmp::Reverse(**id)))
        else {
            break;
        };
        let mut best: Option<(usize, u64, uuid::Uuid)> = None;
        for a in agents
            .iter()
            .filter(|a| a.node == from && !moved.contains(&a.id))
        {
            if a.placement.pinned().is_some() {
                continue;
            }
            for n in nodes.iter().filter(|n| n.open && n.id != from) {
                let l = load[&n.id];
                let room = n.capacity == 0 || l < n.capacity as usize;
                let fits =
                    l + 2 <= most && room && n.runs(a.kind) && n.meets(&a.placement.constraints);
                if fits && best.is_none_or(|(bl, bid, _)| (l, n.id) < (bl, bid)) {
                    best = Some((l, n.id, a.id));
                }
            }
            if best.is_some() {
                break; // agents are tried in id order: the first movable one goes
            }
        }
        let Some((_, to, agent)) = best else { break };
        *load.get_mut(&from).expect("from is a key of load") -= 1;
        *load.get_mut(&to).expect("to is a key of load") += 1;
        moved.insert(agent);
        moves.push(Move { agent, from, to });
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: an agent's placement costs a pointer when it is the default, and reads, encodes
    /// and decodes exactly as the `Placement` it holds, in JSON and in both MessagePack forms.
    #[test]
    fn an_agent_placement_is_boxed_only_off_the_default_and_encodes_as_a_placement() {
        assert!(std::mem::size_of::<AgentPlacement>() <= 8);
        let pinned = Placement {
            node: Some(3),
            constraints: BTreeMap::from([("zone".into(), "a".into())]),
            ..Default::default()
        };
        for p in [Placement::default(), pinned] {
            let boxed = AgentPlacement::from(p.clone());
            assert_eq!(boxed.0.is_none(), p == Placement::default());
            assert_eq!(*boxed, p);
            let json = serde_json::to_value(&boxed).unwrap();
            assert_eq!(json, serde_json::to_value(&p).unwrap());
            let back: AgentPlacement = serde_json::from_value(json).unwrap();
            assert_eq!(back, boxed);
            for bytes in [rmp_serde::to_vec(&boxed), rmp_serde::to_vec_named(&boxed)] {
                let bytes = bytes.unwrap();
                let back: AgentPlacement = rmp_serde::from_slice(&bytes).unwrap();
                assert_eq!((back.0.is_none(), &*back), (boxed.0.is_none(), &p));
            }
        }
    }

    struct N {
        id: u64,
        open: bool,
        labels: BTreeMap<String, String>,
        kinds: Vec<String>,
        capacity: u32,
        load: usize,
        cpu: u32,
    }

    fn node(id: u64, zone: &str, load: usize) -> N {
        N {
            id,
            open: true,
            labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
            kinds: vec!["counter".into(), "echo".into()],
            capacity: 0,
            load,
            cpu: 0,
        }
    }

    fn cands(ns: &[N]) -> Vec<Candidate<'_>> {
        ns.iter()
            .map(|n| Candidate {
                id: n.id,
                open: n.open,
                labels: &n.labels,
                kinds: &n.kinds,
                capacity: n.capacity,
                load: n.load,
                cpu_permille: n.cpu,
            })
            .collect()
    }

    fn req<'a>(p: &'a Placement, sib: &'a BTreeMap<u64, usize>) -> Request<'a> {
        Request {
            kinds: vec!["counter"],
            placement: p,
            count: 1,
            exclude: None,
            siblings: sib,
        }
    }

    #[test]
    fn least_loaded_takes_the_emptiest_then_the_coolest_then_the_lowest_id() {
        let none = BTreeMap::new();
        let p = Placement::default();
        let mut ns = vec![node(1, "a", 5), node(2, "a", 3), node(3, "b", 3)];
        assert_eq!(choose(&req(&p, &none), &cands(&ns)), Ok(2));
        ns[1].cpu = 500;
        assert_eq!(choose(&req(&p, &none), &cands(&ns)), Ok(3));
        // Capacity counts: 3 of 4 is fuller than 5 of unlimited.
        ns[1].capacity = 4;
        ns[2].capacity = 4;
        assert_eq!(choose(&req(&p, &none), &cands(&ns)), Ok(1));
    }

    #[test]
    fn closed_full_excluded_and_unfit_nodes_are_never_chosen() {
        let none = BTreeMap::new();
        let p = Placement::default();
        let mut ns = vec![
            node(1, "a", 0),
            node(2, "a", 1),
            node(3, "b", 2),
            node(4, "b", 3),
        ];
        ns[0].open = false; // draining, suspect or down
        ns[1].capacity = 1; // full
        ns[2].kinds = vec!["echo".into()]; // does not run counter
        let mut r = req(&p, &none);
        assert_eq!(choose(&r, &cands(&ns)), Ok(4));
        r.exclude = Some(4);
        assert_eq!(choose(&r, &cands(&ns)), Err(Refusal::NoRoom));
        r.kinds = vec!["nope"];
        assert_eq!(
            choose(&r, &cands(&ns)),
            Err(Refusal::UnknownKind("nope".into()))
        );
        // A kind only a node that is not up runs: nothing could start it now.
        ns[0].kinds.push("rare".into());
        r.kinds = vec!["rare"];
        assert_eq!(
            choose(&r, &cands(&ns)),
            Err(Refusal::UnknownKind("rare".into()))
        );
    }

    #[test]
    fn constraints_must_all_match() {
        let none = BTreeMap::new();
        let p = Placement {
            constraints: BTreeMap::from([("zone".into(), "b".into())]),
            ..Default::default()
        };
        let ns = vec![node(1, "a", 0), node(2, "b", 9), node(3, "b", 4)];
        assert_eq!(choose(&req(&p, &none), &cands(&ns)), Ok(3));
        let p = Placement {
            constraints: BTreeMap::from([("gpu".into(), "yes".into())]),
            ..Default::default()
        };
        assert_eq!(choose(&req(&p, &none), &cands(&ns)), Err(Refusal::NoRoom));
    }

    #[test]
    fn pinned_takes_its_node_or_nothing() {
        let none = BTreeMap::new();
        let p = Placement {
            node: Some(2),
            ..Default::default()
        };
        let mut ns = vec![node(1, "a", 0), node(2, "a", 50)];
        assert_eq!(choose(&req(&p, &none), &cands(&ns)), Ok(2));
        ns[1].open = false;
        assert_eq!(
            choose(&req(&p, &none), &cands(&ns)),
            Err(Refusal::PinnedUnavailable(2))
        );
    }

    #[test]
    fn spread_fills_the_zone_with_fewest_siblings_first() {
        let p = Placement {
            strategy: Some(Strategy::Spread),
            ..Default::default()
        };
        // Zone a holds two siblings (on nodes 1 and 2), zone b one (node 3), zone c none.
        let sib = BTreeMap::from([(1, 1), (2, 1), (3, 1)]);
        let ns = vec![
            node(1, "a", 0),
            node(2, "a", 0),
            node(3, "b", 0),
            node(4, "c", 10),
            node(5, "c", 7),
        ];
        assert_eq!(
            choose(&req(&p, &sib), &cands(&ns)),
            Ok(5),
            "zone c, less loaded"
        );
        let sib = BTreeMap::from([(1, 1), (3, 1), (4, 1)]);
        assert_eq!(
            choose(&req(&p, &sib), &cands(&ns)),
            Ok(1),
            "tie: least loaded"
        );
    }

    #[test]
    fn placements_are_even_when_repeated() {
        let none = BTreeMap::new();
        let p = Placement::default();
        let mut ns = vec![node(1, "a", 0), node(2, "b", 0), node(3, "c", 0)];
        for _ in 0..300 {
            let id = choose(&req(&p, &none), &cands(&ns)).unwrap();
            ns.iter_mut().find(|n| n.id == id).unwrap().load += 1;
        }
        assert!(ns.iter().all(|n| n.load == 100));
    }

    #[test]
    fn rebalance_moves_from_loaded_to_light_within_the_budget() {
        let ns = vec![node(1, "a", 6), node(2, "a", 0), node(3, "a", 0)];
        let p = Placement::default();
        let pin = Placement {
            node: Some(1),
            ..Default::default()
        };
        let ids: Vec<uuid::Uuid> = (1..=6).map(uuid::Uuid::from_u128).collect();
        let agents: Vec<Movable<'_>> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Movable {
                id: *id,
                node: 1,
                kind: "counter",
                placement: if i == 0 { &pin } else { &p },
            })
            .collect();
        let moves = rebalance(&cands(&ns), &agents, 10);
        assert_eq!(moves.len(), 4, "6/0/0 becomes 2/2/2: {moves:?}");
        assert!(moves.iter().all(|m| m.agent != ids[0]), "pinned stays");
        assert_eq!(rebalance(&cands(&ns), &agents, 1).len(), 1, "budget");
        let even = vec![node(1, "a", 2), node(2, "a", 1), node(3, "a", 2)];
        assert!(
            rebalance(&cands(&even), &agents, 10).is_empty(),
            "no flapping"
        );
        assert!(imbalance(&cands(&ns)) > 2.9);
        assert_eq!(imbalance(&cands(&[node(1, "a", 3), node(2, "a", 3)])), 0.0);
    }

    #[test]
    fn placement_requests_are_validated() {
        let bad = |p: Placement| p.validate().unwrap_err().message;
        assert!(bad(Placement {
            strategy: Some(Strategy::Pinned),
            ..Default::default()
        })
        .contains("node"));
        assert!(bad(Placement {
            strategy: Some(Strategy::Spread),
            node: Some(1),
            ..Default::default()
        })
        .contains("pinned"));
        assert_eq!(
            Placement {
                node: Some(3),
                ..Default::default()
            }
            .pinned(),
            Some(3)
        );
    }
}
