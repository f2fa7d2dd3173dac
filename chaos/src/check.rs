//! Checkers: one per guarantee, each over the recorded history and the final state read back
//! after healing. Each returns its counterexamples; none means the guarantee held.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

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
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// The final registry: supervisor name to id.
pub type FinalState = BTreeMap<String, String>;

fn stops_invoked_before(ops: &[Op], name: &str, t_ms: u64) -> bool {
    ops.iter().any(|o| {
        matches!(&o.kind, OpKind::Stop { name: n } if n == name)
            && o.invoke_ms <= t_ms
            && !matches!(o.outcome, Outcome::Failed { .. })
    })
}

/// G2: every acknowledged create is present (unless a stop of it may have run), with the id it
/// was acknowledged with; every acknowledged stop's supervisor is gone.
pub fn g2_acknowledged_writes(ops: &[Op], fin: &FinalState) -> Verdict {
    let mut v = Verdict {
        guarantee: "G2",
        what: "no lost acknowledged command",
        checked: 0,
        violations: vec![],
    };
    for o in ops {
        match (&o.kind, &o.outcome) {
            (OpKind::Create { name, .. }, Outcome::Ok { value }) => {
                v.checked += 1;
                if stops_invoked_before(ops, name, u64::MAX) {
                    continue;
                }
                match fin.get(name) {
                    None => v.violations.push(format!(
                        "acknowledged create of {name} at {} ms is lost",
                        o.complete_ms
                    )),
                    Some(id) if Some(id.as_str()) != value["id"].as_str() => {
                        v.violations.push(format!(
                            "{name} was acknowledged with id {} but the registry holds {id}",
                            value["id"]
                        ))
                    }
                    _ => {}
                }
            }
            (OpKind::Stop { name }, Outcome::Ok { .. }) => {
                v.checked += 1;
                if fin.contains_key(name) {
                    v.violations.push(format!(
                        "acknowledged stop of {name} at {} ms did not stick",
                        o.complete_ms
                    ));
                }
            }
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
    let mut v = Verdict {
        guarantee: "G3",
        what: "no lost acknowledged checkpoint (durable counters)",
        checked: 0,
        violations: vec![],
    };
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

/// G6: a read sees every write acknowledged before it began (and no acknowledged stop).
pub fn g6_linearizable_reads(ops: &[Op]) -> Verdict {
    let mut v = Verdict {
        guarantee: "G6",
        what: "reads never miss an acknowledged write",
        checked: 0,
        violations: vec![],
    };
    for r in ops {
        let (OpKind::Read { parent }, Outcome::Ok { value }) = (&r.kind, &r.outcome) else {
            continue;
        };
        v.checked += 1;
        let seen: BTreeSet<&str> = value["supervisors"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
            .unwrap_or_default();
        for w in ops {
            if w.complete_ms >= r.invoke_ms {
                continue;
            }
            match (&w.kind, &w.outcome) {
                (
                    OpKind::Create {
                        name, parent: p, ..
                    },
                    Outcome::Ok { .. },
                ) if p == parent
                    && !seen.contains(name.as_str())
                    && !stops_invoked_before(ops, name, r.complete_ms) =>
                {
                    v.violations.push(format!(
                        "read of {parent} at {}..{} ms misses {name}, acknowledged at {} ms",
                        r.invoke_ms, r.complete_ms, w.complete_ms
                    ));
                }
                (OpKind::Stop { name }, Outcome::Ok { .. }) if seen.contains(name.as_str()) => {
                    v.violations.push(format!(
                        "read at {}..{} ms still sees {name}, stopped at {} ms",
                        r.invoke_ms, r.complete_ms, w.complete_ms
                    ));
                }
                _ => {}
            }
        }
    }
    v
}

/// G6 (leaders): at most one leader per term, from `leader_changed` events and status samples.
pub fn g6_one_leader_per_term(observations: &[(u64, u64)]) -> Verdict {
    let mut v = Verdict {
        guarantee: "G6",
        what: "one leader per term",
        checked: 0,
        violations: vec![],
    };
    let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (term, leader) in observations {
        by_term.entry(*term).or_default().insert(*leader);
    }
    for (term, leaders) in by_term {
        v.checked += 1;
        if leaders.len() > 1 {
            v.violations
                .push(format!("term {term} had leaders {leaders:?}"));
        }
    }
    v
}

/// G7: every acknowledged reply for one request id is the same (one creation).
pub fn g7_idempotent_retries(ops: &[Op]) -> Verdict {
    let mut v = Verdict {
        guarantee: "G7",
        what: "no duplicate from a retried create",
        checked: 0,
        violations: vec![],
    };
    let mut replies: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for o in ops {
        if let (OpKind::Create { request_id, .. }, Outcome::Ok { value }) = (&o.kind, &o.outcome) {
            replies.entry(request_id.as_str()).or_default().push(value);
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
    let mut v = Verdict {
        guarantee: "G5",
        what: "bad input gets a clear error and changes nothing",
        checked: 0,
        violations: vec![],
    };
    let clear = ["bad_request", "too_large"];
    for o in ops {
        let OpKind::BadInput { what } = &o.kind else {
            continue;
        };
        v.checked += 1;
        match &o.outcome {
            Outcome::Failed { code, .. } if clear.contains(&code.as_str()) => {}
            // No answer at all happens under faults and is not a wrong answer.
            Outcome::Unknown { .. } => {}
            // Accepted, `unavailable` (which would hide the real problem) or anything else.
            other => v
                .violations
                .push(format!("{what} at {} ms got {other:?}", o.invoke_ms)),
        }
    }
    for name in fin.keys().filter(|n| n.starts_with("bad")) {
        v.violations.push(format!("bad input created {name}"));
    }
    v.violations.extend(crashes.iter().cloned());
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

    fn fin(pairs: &[(&str, &str)]) -> FinalState {
        pairs
            .iter()
            .map(|(n, i)| (n.to_string(), i.to_string()))
            .collect()
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
    fn g6_catches_two_leaders_in_one_term() {
        assert!(g6_one_leader_per_term(&[(1, 1), (2, 3), (2, 3)]).ok());
        assert!(!g6_one_leader_per_term(&[(1, 1), (2, 3), (2, 1)]).ok());
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
    }
}
