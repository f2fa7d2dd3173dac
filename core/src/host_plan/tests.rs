//! Every case of the host planner on plain data. Agents are small numbers; a plan is rendered
//! as `fence 1; stop 2 (moved or removed); hand off 3 @4; start 5 restarted`.

use std::time::Duration;

use super::*;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn desired(n: u128, epoch: u64, status: AgentStatus) -> (Uuid, Desired) {
    let d = Desired {
        id: id(n),
        epoch,
        status,
        restart_requested: 0,
    };
    (id(n), d)
}

fn local(epoch: u64, lease_term: u64) -> Local {
    Local {
        epoch,
        lease_term,
        restart_requested: 0,
    }
}

const HELD: LeaseView = LeaseView {
    term: 1,
    valid: true,
    may_start: true,
};

/// A node whose registry wants `desired` and which runs `instances`; nothing stops, waits or
/// has ended.
struct World {
    desired: BTreeMap<Uuid, Desired>,
    instances: BTreeMap<Uuid, Local>,
    stopping: BTreeMap<Uuid, ()>,
    scheduled: BTreeMap<Uuid, Scheduled>,
    ended: BTreeMap<Uuid, (u64, u64)>,
    handed_off: BTreeMap<Uuid, u64>,
    lease: LeaseView,
    within: (Bound<Uuid>, Bound<Uuid>),
}

impl World {
    fn new(desired: &[(Uuid, Desired)], instances: &[(u128, Local)]) -> World {
        World {
            desired: desired.iter().copied().collect(),
            instances: instances.iter().map(|(n, l)| (id(*n), *l)).collect(),
            stopping: BTreeMap::new(),
            scheduled: BTreeMap::new(),
            ended: BTreeMap::new(),
            handed_off: BTreeMap::new(),
            lease: HELD,
            within: (Bound::Unbounded, Bound::Unbounded),
        }
    }

    fn plan(&self) -> String {
        let v = View {
            within: self.within,
            desired: &self.desired,
            instances: &self.instances,
            stopping: &self.stopping,
            scheduled: &self.scheduled,
            ended: &self.ended,
            handed_off: &self.handed_off,
            lease: self.lease,
        };
        render(&reconcile(&v))
    }
}

fn render(actions: &[HostAction]) -> String {
    let n = |id: &Uuid| id.as_u128();
    let parts: Vec<String> = actions
        .iter()
        .map(|a| match a {
            HostAction::Fence(i) => format!("fence {}", n(i)),
            HostAction::Stop { id, why } => format!("stop {} ({})", n(id), why.as_str()),
            HostAction::HandOff { id, epoch } => format!("hand off {} @{epoch}", n(id)),
            HostAction::Start { id, restarted } => {
                format!(
                    "start {}{}",
                    n(id),
                    if *restarted { " restarted" } else { "" }
                )
            }
        })
        .collect();
    parts.join("; ")
}

#[test]
fn an_agent_placed_here_and_not_running_starts() {
    let w = World::new(&[desired(1, 1, AgentStatus::Pending)], &[]);
    assert_eq!(w.plan(), "start 1");
    // One that ran here before (the node restarted) or crashed counts as a restart.
    let w = World::new(
        &[
            desired(1, 1, AgentStatus::Running),
            desired(2, 1, AgentStatus::Failed),
        ],
        &[],
    );
    assert_eq!(w.plan(), "start 1 restarted; start 2 restarted");
}

#[test]
fn a_running_agent_placed_here_is_left_alone_and_a_stopped_one_stays_stopped() {
    let w = World::new(
        &[
            desired(1, 1, AgentStatus::Running),
            desired(2, 1, AgentStatus::Stopped),
        ],
        &[(1, local(1, 1))],
    );
    assert_eq!(w.plan(), "");
}

#[test]
fn an_agent_running_here_but_moved_or_removed_stops_last_first() {
    // 1 was removed, 3 was placed elsewhere (no longer among this node's agents).
    let w = World::new(
        &[desired(2, 1, AgentStatus::Running)],
        &[(1, local(1, 1)), (2, local(1, 1)), (3, local(1, 1))],
    );
    assert_eq!(
        w.plan(),
        "stop 3 (moved or removed); stop 1 (moved or removed)"
    );
}

#[test]
fn a_plan_over_a_range_of_ids_leaves_the_instances_outside_it_alone() {
    // A host with many agents plans a range of ids at a time, from the registry's agents in
    // that range: 1 and 4 are not among them, but only 3 is in the range (2..=3).
    let mut w = World::new(
        &[desired(2, 1, AgentStatus::Pending)],
        &[(1, local(1, 1)), (3, local(1, 1)), (4, local(1, 7))],
    );
    w.within = (Bound::Excluded(id(1)), Bound::Included(id(3)));
    assert_eq!(w.plan(), "stop 3 (moved or removed); start 2");
    // The whole range plans them all: 4 ran in another lease term.
    w.within = (Bound::Unbounded, Bound::Unbounded);
    assert_eq!(
        w.plan(),
        "fence 4; stop 3 (moved or removed); stop 1 (moved or removed); start 2"
    );
}

#[test]
fn an_instance_of_a_stale_epoch_stops_and_the_new_one_waits_for_it() {
    // The registry moved the agent away and back: epoch 3 here now, the instance runs 2.
    let mut w = World::new(&[desired(1, 3, AgentStatus::Pending)], &[(1, local(2, 1))]);
    assert_eq!(w.plan(), "stop 1 (moved or removed)");
    // While the old instance stops, the new one does not start: at most one instance.
    w.instances.clear();
    w.stopping.insert(id(1), ());
    assert_eq!(w.plan(), "");
    w.stopping.clear();
    assert_eq!(w.plan(), "start 1");
}

#[test]
fn a_lost_lease_fences_every_instance_and_starts_nothing() {
    let mut w = World::new(
        &[
            desired(1, 1, AgentStatus::Running),
            desired(2, 1, AgentStatus::Pending),
        ],
        &[(1, local(1, 1))],
    );
    w.lease = LeaseView {
        term: 1,
        valid: false,
        may_start: false,
    };
    assert_eq!(w.plan(), "fence 1");
}

#[test]
fn a_new_lease_term_fences_what_ran_in_the_old_one_then_starts_it_again() {
    // The lease lapsed (a long pause) and was granted again: term 2. The instance of term 1
    // may not carry on; the registry still places the agent here, so it starts anew.
    let mut w = World::new(&[desired(1, 1, AgentStatus::Running)], &[(1, local(1, 1))]);
    w.lease = LeaseView {
        term: 2,
        valid: true,
        may_start: true,
    };
    assert_eq!(w.plan(), "fence 1; start 1 restarted");
    // Until the log is applied up to the new grant's read index, only the fence.
    w.lease.may_start = false;
    assert_eq!(w.plan(), "fence 1");
}

#[test]
fn a_migrating_agent_is_handed_off_once_and_never_started_here() {
    let mut w = World::new(
        &[
            desired(1, 4, AgentStatus::Migrating),
            desired(2, 2, AgentStatus::Migrating),
        ],
        &[(1, local(4, 1))],
    );
    assert_eq!(w.plan(), "hand off 2 @2; hand off 1 @4");
    w.handed_off.insert(id(1), 4);
    w.handed_off.insert(id(2), 2);
    w.instances.clear();
    assert_eq!(w.plan(), "");
}

#[test]
fn a_migrating_agent_still_stopping_is_handed_off_only_once_stopped() {
    let mut w = World::new(&[desired(1, 4, AgentStatus::Migrating)], &[]);
    w.stopping.insert(id(1), ());
    assert_eq!(w.plan(), "");
    w.stopping.clear();
    assert_eq!(w.plan(), "hand off 1 @4");
}

#[test]
fn a_handed_off_agent_does_not_start_again_even_if_its_record_still_says_running() {
    let mut w = World::new(&[desired(1, 4, AgentStatus::Running)], &[]);
    w.handed_off.insert(id(1), 4);
    assert_eq!(w.plan(), "");
}

#[test]
fn a_restart_request_stops_the_running_instance() {
    let mut w = World::new(&[desired(1, 1, AgentStatus::Running)], &[(1, local(1, 1))]);
    w.desired.get_mut(&id(1)).unwrap().restart_requested = 1;
    assert_eq!(w.plan(), "stop 1 (restart requested)");
    // Without a valid lease to start again, the instance is left alone.
    w.lease.may_start = false;
    assert_eq!(w.plan(), "");
}

#[test]
fn an_agent_that_ended_for_good_or_waits_for_its_backoff_is_not_started() {
    let mut w = World::new(
        &[
            desired(1, 1, AgentStatus::Stopped),
            desired(2, 1, AgentStatus::Failed),
            desired(3, 1, AgentStatus::Failed),
        ],
        &[],
    );
    w.ended.insert(id(2), (1, 0));
    w.scheduled.insert(
        id(3),
        Scheduled {
            at: Instant::now(),
            restart: true,
        },
    );
    assert_eq!(w.plan(), "");
}

#[test]
fn a_pending_restart_goes_when_its_backoff_is_over_and_its_old_instance_has_stopped() {
    let now = Instant::now();
    let later = now + Duration::from_millis(40);
    let scheduled: BTreeMap<Uuid, Scheduled> = [
        (
            id(1),
            Scheduled {
                at: now,
                restart: true,
            },
        ),
        (
            id(2),
            Scheduled {
                at: later,
                restart: true,
            },
        ),
        (
            id(3),
            Scheduled {
                at: now,
                restart: false,
            },
        ),
        (
            id(4),
            Scheduled {
                at: now,
                restart: true,
            },
        ),
    ]
    .into_iter()
    .collect();
    // 3 still stops; 4 runs already (the start is moot).
    let stopping: BTreeMap<Uuid, ()> = [(id(3), ())].into_iter().collect();
    let instances: BTreeMap<Uuid, Local> = [(id(4), local(1, 1))].into_iter().collect();
    let busy = |id: &Uuid| stopping.contains_key(id);
    let d = due(&scheduled, &instances, busy, HELD, now);
    assert_eq!(d.start, vec![(id(1), true)]);
    assert_eq!(d.drop, vec![id(4)]);
    let d = due(&scheduled, &instances, |_: &Uuid| false, HELD, later);
    assert_eq!(d.start, vec![(id(1), true), (id(2), true), (id(3), false)]);
    // Nothing starts without a lease, however late.
    let lapsed = LeaseView {
        may_start: false,
        ..HELD
    };
    assert_eq!(
        due(&scheduled, &instances, busy, lapsed, later),
        Due::default()
    );
}
