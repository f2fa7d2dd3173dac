//! Every rule of the planner on plain data. Children are written `name:type` (p permanent,
//! t transient, tmp temporary), with `:down` for a child that is not running; a plan is
//! rendered as `stop x; forget y; start z +10; escalate`.

use super::*;

fn policy(strategy: Strategy, max_restarts: u32, max_seconds: u32) -> Policy {
    Policy {
        strategy,
        max_restarts,
        max_seconds,
        backoff: Backoff {
            initial_ms: 10,
            max_ms: 1_000,
            multiplier: 2.0,
            jitter: 0.2,
        },
        never_gives_up: false,
    }
}

fn children(spec: &str) -> Vec<ChildState> {
    spec.split_whitespace()
        .map(|tok| {
            let mut parts = tok.split(':');
            let id = parts.next().unwrap().to_string();
            let restart = match parts.next().unwrap() {
                "p" => RestartType::Permanent,
                "t" => RestartType::Transient,
                "tmp" => RestartType::Temporary,
                other => panic!("bad restart type {other}"),
            };
            ChildState {
                id,
                restart,
                running: parts.next() != Some("down"),
            }
        })
        .collect()
}

fn render(plan: &Plan) -> String {
    let parts: Vec<String> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Stop { child } => format!("stop {child}"),
            Action::Forget { child } => format!("forget {child}"),
            Action::Start { child, delay_ms } => format!("start {child} +{delay_ms}"),
            Action::Escalate => "escalate".to_string(),
        })
        .collect();
    parts.join("; ")
}

fn crash() -> ExitReason {
    ExitReason::Crash("boom".into())
}

/// The plan when `exited` ends with `reason` at `now_ms` after the restarts in `history`
/// (jitter drawn mid-range).
fn plan_at(
    p: &Policy,
    kids: &str,
    exited: &str,
    reason: &ExitReason,
    now_ms: i64,
    history: &[i64],
) -> Plan {
    let history = history.iter().copied().collect();
    on_exit(p, &children(kids), exited, reason, now_ms, history, 0.5)
}

/// One case: the policy, the children, who exits and why, the restart history; then the plan.
#[track_caller]
fn check(
    p: &Policy,
    kids: &str,
    exited: &str,
    reason: ExitReason,
    history: &[i64],
    expected: &str,
) {
    let plan = plan_at(p, kids, exited, &reason, 100_000, history);
    assert_eq!(render(&plan), expected);
}

#[test]
fn one_for_one_restarts_only_the_failed_child() {
    let p = policy(Strategy::OneForOne, 3, 5);
    check(&p, "a:p b:p c:p", "b", crash(), &[], "start b +10");
}

#[test]
fn one_for_all_stops_the_others_in_reverse_and_restarts_all_in_order() {
    let p = policy(Strategy::OneForAll, 3, 5);
    check(
        &p,
        "a:p b:p c:p d:p",
        "b",
        crash(),
        &[],
        "stop d; stop c; stop a; start a +10; start b +10; start c +10; start d +10",
    );
}

#[test]
fn rest_for_one_restarts_the_failed_child_and_those_started_after_it() {
    let p = policy(Strategy::RestForOne, 3, 5);
    check(
        &p,
        "a:p b:p c:p d:p",
        "b",
        crash(),
        &[],
        "stop d; stop c; start b +10; start c +10; start d +10",
    );
    check(&p, "a:p b:p c:p d:p", "d", crash(), &[], "start d +10");
}

#[test]
fn simple_one_for_one_behaves_like_one_for_one() {
    let p = policy(Strategy::SimpleOneForOne, 3, 5);
    check(&p, "w1:p w2:p w3:p", "w2", crash(), &[], "start w2 +10");
}

#[test]
fn permanent_children_restart_even_after_a_normal_exit() {
    let p = policy(Strategy::OneForOne, 3, 5);
    check(&p, "a:p", "a", ExitReason::Normal, &[], "start a +10");
    check(&p, "a:p", "a", ExitReason::Shutdown, &[], "start a +10");
}

#[test]
fn transient_children_restart_only_after_an_abnormal_exit() {
    let p = policy(Strategy::OneForAll, 3, 5);
    check(&p, "a:p b:t c:p", "b", ExitReason::Normal, &[], "");
    check(&p, "a:p b:t c:p", "b", ExitReason::Shutdown, &[], "");
    check(
        &p,
        "a:p b:t c:p",
        "b",
        crash(),
        &[],
        "stop c; stop a; start a +10; start b +10; start c +10",
    );
}

#[test]
fn temporary_children_are_never_restarted_and_are_forgotten() {
    let p = policy(Strategy::OneForAll, 3, 5);
    check(&p, "a:p b:tmp c:p", "b", crash(), &[], "forget b");
    check(
        &p,
        "a:p b:tmp c:p",
        "b",
        ExitReason::Normal,
        &[],
        "forget b",
    );
}

#[test]
fn a_temporary_sibling_is_not_restarted_by_the_strategy() {
    let p = policy(Strategy::OneForAll, 3, 5);
    check(
        &p,
        "a:p b:tmp c:p",
        "a",
        crash(),
        &[],
        "stop c; stop b; forget b; start a +10; start c +10",
    );
    let r = policy(Strategy::RestForOne, 3, 5);
    check(
        &r,
        "a:p b:tmp c:p",
        "a",
        crash(),
        &[],
        "stop c; stop b; forget b; start a +10; start c +10",
    );
}

#[test]
fn a_stopped_transient_sibling_is_started_again_by_one_for_all_as_in_otp() {
    let p = policy(Strategy::OneForAll, 3, 5);
    check(
        &p,
        "a:p b:t:down c:p",
        "a",
        crash(),
        &[],
        "stop c; start a +10; start b +10; start c +10",
    );
}

#[test]
fn intensity_exceeded_stops_everything_in_reverse_and_escalates() {
    // OTP's default intensity: one restart in five seconds.
    let p = policy(Strategy::OneForOne, 1, 5);
    check(&p, "a:p b:p c:p", "b", crash(), &[], "start b +10");
    check(
        &p,
        "a:p b:p c:p",
        "b",
        crash(),
        &[99_000],
        "stop c; stop a; escalate",
    );
    // A restart older than the window no longer counts.
    check(&p, "a:p b:p c:p", "b", crash(), &[94_000], "start b +10");
    // Intensity zero: the first restart is already too many.
    let zero = policy(Strategy::OneForOne, 0, 5);
    check(&zero, "a:p b:p", "a", crash(), &[], "stop b; escalate");
}

#[test]
fn root_never_gives_up_but_cools_down() {
    let mut p = policy(Strategy::OneForOne, 1, 5);
    p.never_gives_up = true;
    check(&p, "a:p b:p", "a", crash(), &[99_500], "start a +1000");
}

#[test]
fn backoff_grows_with_restarts_in_the_window_up_to_its_cap() {
    let p = policy(Strategy::OneForOne, 100, 60);
    check(&p, "a:p", "a", crash(), &[99_000], "start a +20");
    check(
        &p,
        "a:p",
        "a",
        crash(),
        &[97_000, 98_000, 99_000],
        "start a +80",
    );
    let many: Vec<i64> = (0..20).map(|i| 99_000 - i).collect();
    check(&p, "a:p", "a", crash(), &many, "start a +1000");
}

#[test]
fn jitter_spreads_delays_within_its_fraction() {
    let b = Backoff {
        initial_ms: 100,
        max_ms: 10_000,
        multiplier: 2.0,
        jitter: 0.2,
    };
    assert_eq!(backoff_delay(&b, 1, 0.0), 80);
    assert_eq!(backoff_delay(&b, 1, 0.5), 100);
    assert_eq!(backoff_delay(&b, 1, 0.999_999), 120);
    assert_eq!(backoff_delay(&b, 3, 0.5), 400);
}

#[test]
fn the_restart_history_keeps_only_the_window() {
    let p = policy(Strategy::OneForOne, 5, 5);
    let plan = plan_at(&p, "a:p", "a", &crash(), 100_000, &[90_000, 96_000]);
    assert_eq!(plan.restarts_ms, [96_000, 100_000]);
}

/// Goal: a crash loop under a generous intensity does not grow the history without bound:
/// only the last `max_restarts + 1` restarts can change a decision, and the root (which never
/// gives up) keeps cooling down once past its intensity.
#[test]
fn the_restart_history_keeps_at_most_one_more_than_the_intensity() {
    let mut p = policy(Strategy::OneForOne, 2, 5);
    p.never_gives_up = true;
    let plan = plan_at(&p, "a:p", "a", &crash(), 100_000, &[99_000, 99_500, 99_800]);
    assert_eq!(plan.restarts_ms, [99_500, 99_800, 100_000]);
    assert_eq!(render(&plan), format!("start a +{}", p.backoff.max_ms));
    let plan = plan_at(
        &p,
        "a:p",
        "a",
        &crash(),
        100_001,
        &Vec::from(plan.restarts_ms),
    );
    assert_eq!(plan.restarts_ms, [99_800, 100_000, 100_001]);
}

#[test]
fn shutdown_stops_running_children_last_started_first() {
    let kids = children("a:p b:t:down c:tmp d:p");
    let order: Vec<_> = shutdown(&kids)
        .into_iter()
        .map(|a| match a {
            Action::Stop { child } => child,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(order, ["d", "c", "a"]);
}

#[test]
fn an_unknown_child_changes_nothing() {
    let p = policy(Strategy::OneForAll, 3, 5);
    check(&p, "a:p", "zz", crash(), &[], "");
}

/// Goal: escalation climbs the tree: a supervisor past its intensity fails to its parent,
/// which treats it as a crashed permanent child and applies its own strategy and intensity.
/// Method: three levels, the middle one with intensity 0, the top one one_for_all.
#[test]
fn escalation_climbs_two_levels_under_each_parents_own_strategy() {
    // Level 2 (`inner`, one_for_one, intensity 1/5 s): its worker crashed once already.
    let inner = policy(Strategy::OneForOne, 1, 5);
    let plan = plan_at(&inner, "w1:p w2:p", "w1", &crash(), 100_000, &[99_000]);
    assert_eq!(render(&plan), "stop w2; escalate");

    // Level 1 (`mid`, rest_for_one, intensity 0): `inner` failing is one restart too many.
    let mid = policy(Strategy::RestForOne, 0, 5);
    let reason = ExitReason::Crash("child supervisor inner reached its restart intensity".into());
    let plan = plan_at(&mid, "a:p inner:p b:p", "inner", &reason, 100_000, &[]);
    assert_eq!(render(&plan), "stop b; stop a; escalate");

    // Level 0 (`top`, one_for_all, room to restart): restarts the whole subtree, in order.
    let top = policy(Strategy::OneForAll, 3, 5);
    let plan = plan_at(&top, "x:p mid:p y:t", "mid", &reason, 100_000, &[]);
    assert_eq!(
        render(&plan),
        "stop y; stop x; start x +10; start mid +10; start y +10"
    );
}
