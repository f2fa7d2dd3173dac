//! Agents by the fields `find_agents` and `list_agents` filter on: tag, capability, kind,
//! status and supervisor (by node is `Registry::by_node`). Derived state: kept by `apply`
//! through `insert`, `remove` and `status_changed`, rebuilt from a snapshot by
//! `Registry::from_data`. Each maps a value to the ids of the agents that have it, in id order,
//! so a query pages through the smallest matching set from its `after` id, and counts by one
//! field in O(log n), instead of scanning every agent.

use std::collections::{BTreeMap, BTreeSet};

use uuid::Uuid;

use super::{Agent, AgentStatus};

/// Ids by value of one field.
pub(super) type ByValue<K> = BTreeMap<K, BTreeSet<Uuid>>;

#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct AgentIndex {
    pub(super) by_tag: ByValue<String>,
    pub(super) by_capability: ByValue<String>,
    pub(super) by_kind: ByValue<String>,
    pub(super) by_status: ByValue<AgentStatus>,
    pub(super) by_supervisor: ByValue<String>,
}

fn add<K: Ord + Clone>(map: &mut ByValue<K>, key: &K, id: Uuid) {
    match map.get_mut(key) {
        Some(ids) => {
            ids.insert(id);
        }
        None => {
            map.insert(key.clone(), BTreeSet::from([id]));
        }
    }
}

/// Removes `id` under `key`, and the key once no agent has that value: a value no agent has
/// costs nothing.
fn drop_id<K: Ord>(map: &mut ByValue<K>, key: &K, id: Uuid) {
    if let Some(ids) = map.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            map.remove(key);
        }
    }
}

/// Ids gathered by value, in the order they came; `into_index` sorts nothing when that order
/// was already the ids' order.
pub(super) struct Gathered<K>(BTreeMap<K, Vec<Uuid>>);

impl<K: Ord + Clone> Gathered<K> {
    pub(super) fn add<Q: Ord + ?Sized + ToOwned<Owned = K>>(&mut self, key: &Q, id: Uuid)
    where
        K: std::borrow::Borrow<Q>,
    {
        match self.0.get_mut(key) {
            Some(ids) => ids.push(id),
            None => {
                self.0.insert(key.to_owned(), vec![id]);
            }
        }
    }

    /// Sets built in one pass each (a sorted run is bulk-loaded): a restart or an installed
    /// snapshot indexes every agent, and inserting a million ids one by one, five times over,
    /// took seconds.
    pub(super) fn into_index(self) -> ByValue<K> {
        self.0
            .into_iter()
            .map(|(k, ids)| (k, ids.into_iter().collect()))
            .collect()
    }
}

impl<K> Default for Gathered<K> {
    fn default() -> Self {
        Gathered(BTreeMap::new())
    }
}

impl AgentIndex {
    /// The index of `agents`, built in bulk.
    pub(super) fn build<'a>(agents: impl Iterator<Item = &'a Agent>) -> AgentIndex {
        let (mut tags, mut caps, mut kinds) = (
            Gathered::default(),
            Gathered::default(),
            Gathered::default(),
        );
        let (mut statuses, mut sups) = (Gathered::default(), Gathered::default());
        for a in agents {
            for t in a.tags.iter() {
                tags.add(t.as_str(), a.id);
            }
            for c in a.capabilities.iter() {
                caps.add(c.as_str(), a.id);
            }
            kinds.add(a.kind.as_str(), a.id);
            statuses.add(&a.status, a.id);
            sups.add(a.supervisor.as_str(), a.id);
        }
        AgentIndex {
            by_tag: tags.into_index(),
            by_capability: caps.into_index(),
            by_kind: kinds.into_index(),
            by_status: statuses.into_index(),
            by_supervisor: sups.into_index(),
        }
    }

    /// Indexes a new agent record.
    pub(super) fn insert(&mut self, a: &Agent) {
        for t in a.tags.iter() {
            add(&mut self.by_tag, t, a.id);
        }
        for c in a.capabilities.iter() {
            add(&mut self.by_capability, c, a.id);
        }
        add(&mut self.by_kind, &a.kind, a.id);
        add(&mut self.by_status, &a.status, a.id);
        add(&mut self.by_supervisor, &a.supervisor, a.id);
    }

    /// Forgets a removed agent record.
    pub(super) fn remove(&mut self, a: &Agent) {
        for t in a.tags.iter() {
            drop_id(&mut self.by_tag, t, a.id);
        }
        for c in a.capabilities.iter() {
            drop_id(&mut self.by_capability, c, a.id);
        }
        drop_id(&mut self.by_kind, &a.kind, a.id);
        drop_id(&mut self.by_status, &a.status, a.id);
        drop_id(&mut self.by_supervisor, &a.supervisor, a.id);
    }

    /// An agent's status changed from `from` to `to`.
    pub(super) fn status_changed(&mut self, id: Uuid, from: AgentStatus, to: AgentStatus) {
        if from != to {
            drop_id(&mut self.by_status, &from, id);
            add(&mut self.by_status, &to, id);
        }
    }
}
