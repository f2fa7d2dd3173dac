//! The supervision planner: what a supervisor does when one of its children exits, with
//! Erlang/OTP's semantics, as pure code. It does no I/O and reads no clock: the time, the
//! restart history and a random number for jitter arrive as arguments, and the answer is a
//! list of actions for the runtime to carry out in order. `docs/runtime-semantics.md` states
//! the rules in prose; the tests below pin each of them.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, WireError};

/// OTP restart strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    OneForOne,
    OneForAll,
    RestForOne,
    SimpleOneForOne,
}

/// Restart backoff, applied on top of restart intensity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Delay before the first restart, in milliseconds.
    pub initial_ms: u64,
    /// Largest delay, in milliseconds.
    pub max_ms: u64,
    /// Factor between consecutive delays.
    pub multiplier: f64,
    /// Random spread of each delay, as a fraction of it (0 to 1).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 10,
            max_ms: 10_000,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl Backoff {
    pub(crate) fn validate(&self) -> Result<(), WireError> {
        let bad = |m: &str| {
            Err(WireError::new(
                ErrorCode::BadRequest,
                format!("backoff: {m}"),
            ))
        };
        if self.max_ms < self.initial_ms {
            return bad("max_ms must be at least initial_ms");
        }
        if self.max_ms > 3_600_000 {
            return bad("max_ms is at most 3600000 (one hour)");
        }
        if !(1.0..=100.0).contains(&self.multiplier) {
            return bad("multiplier must be between 1 and 100");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad("jitter must be between 0 and 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// OTP restart types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RestartType {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit.
    Transient,
    /// Never restarted, not even by a sibling's strategy; forgotten once it ends.
    Temporary,
}

/// Why a child ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum ExitReason {
    /// It finished its work.
    Normal,
    /// It was asked to stop.
    Shutdown,
    /// It failed: a crash, a non-zero exit, a kill, or a child supervisor giving up.
    Crash(String),
}

impl ExitReason {
    /// Abnormal exits are the ones a transient child is restarted after.
    pub fn is_abnormal(&self) -> bool {
        matches!(self, ExitReason::Crash(_))
    }
}

/// A child as its supervisor sees it, in start order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildState {
    pub id: String,
    pub restart: RestartType,
    pub running: bool,
}

/// A supervisor's restart policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub strategy: Strategy,
    /// Intensity: at most this many restarts ...
    pub max_restarts: u32,
    /// ... within this many seconds, or the supervisor gives up.
    pub max_seconds: u32,
    pub backoff: Backoff,
    /// `root`: never gives up; past its intensity it waits `backoff.max_ms` instead.
    pub never_gives_up: bool,
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop a running child, honouring its shutdown setting (brutal kill or timeout).
    Stop { child: String },
    /// Drop a child from the supervisor: a temporary child that ended or was stopped.
    Forget { child: String },
    /// Start a child again after `delay_ms`. Starts come in start order.
    Start { child: String, delay_ms: u64 },
    /// The supervisor exceeded its intensity: after the stops before this action, it ends
    /// with a crash and its parent applies its own strategy to it.
    Escalate,
}

/// The actions, and the restart history to keep for next time.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Times (ms) of the restarts still inside the intensity window, oldest first; at most
    /// `max_restarts + 1` of them (more cannot change a decision).
    pub restarts_ms: VecDeque<i64>,
}

/// Plans the reaction to child `exited` ending with `reason` at `now_ms`. `restarts_ms` is the
/// supervisor's restart history, oldest first, as the last plan returned it (it is taken, not
/// copied: a crash loop under a generous intensity keeps thousands of entries); `random` is
/// uniform in [0, 1) and only spreads delays (jitter), so a seeded caller gets a reproducible
/// plan.
pub fn on_exit(
    policy: &Policy,
    children: &[ChildState],
    exited: &str,
    reason: &ExitReason,
    now_ms: i64,
    mut restarts_ms: VecDeque<i64>,
    random: f64,
) -> Plan {
    let unchanged = |restarts_ms| Plan {
        actions: Vec::new(),
        restarts_ms,
    };
    let Some(index) = children.iter().position(|c| c.id == exited) else {
        return unchanged(restarts_ms);
    };
    let child = &children[index];
    let restart_wanted = match child.restart {
        RestartType::Permanent => true,
        RestartType::Transient => reason.is_abnormal(),
        RestartType::Temporary => false,
    };
    if !restart_wanted {
        // No restart means no strategy either: siblings are left alone.
        let mut plan = unchanged(restarts_ms);
        if child.restart == RestartType::Temporary {
            plan.actions.push(Action::Forget {
                child: child.id.clone(),
            });
        }
        return plan;
    }

    // Intensity: this restart plus those still inside the window. OTP gives up when more
    // than `max_restarts` restarts fall within `max_seconds`.
    let window_ms = i64::from(policy.max_seconds) * 1000;
    while restarts_ms.front().is_some_and(|t| now_ms - t >= window_ms) {
        restarts_ms.pop_front();
    }
    restarts_ms.push_back(now_ms);
    while restarts_ms.len() > policy.max_restarts as usize + 1 {
        restarts_ms.pop_front();
    }
    let history = restarts_ms;
    let exceeded = history.len() > policy.max_restarts as usize;
    if exceeded && !policy.never_gives_up {
        // Stop every running child in reverse start order, then fail to the parent.
        let mut actions: Vec<Action> = children
            .iter()
            .rev()
            .filter(|c| c.running && c.id != exited)
            .map(|c| Action::Stop {
                child: c.id.clone(),
            })
            .collect();
        actions.push(Action::Escalate);
        return Plan {
            actions,
            restarts_ms: history,
        };
    }

    let delay_ms = if exceeded {
        // `root` never dies: it cools down for the longest backoff instead.
        policy.backoff.max_ms
    } else {
        backoff_delay(&policy.backoff, history.len() as u32, random)
    };
    let group: &[ChildState] = match policy.strategy {
        Strategy::OneForOne | Strategy::SimpleOneForOne => &children[index..=index],
        Strategy::OneForAll => children,
        Strategy::RestForOne => &children[index..],
    };
    let mut actions = Vec::new();
    // Stop the rest of the group, last started first.
    for c in group.iter().rev().filter(|c| c.id != exited && c.running) {
        actions.push(Action::Stop {
            child: c.id.clone(),
        });
    }
    // A temporary sibling is never restarted, not even by a sibling's strategy.
    for c in group
        .iter()
        .filter(|c| c.id != exited && c.restart == RestartType::Temporary)
    {
        actions.push(Action::Forget {
            child: c.id.clone(),
        });
    }
    // Start the group again in start order, as OTP does: every non-temporary child of the
    // group, including a transient one that had already ended normally.
    for c in group
        .iter()
        .filter(|c| c.id == exited || c.restart != RestartType::Temporary)
    {
        actions.push(Action::Start {
            child: c.id.clone(),
            delay_ms,
        });
    }
    Plan {
        actions,
        restarts_ms: history,
    }
}

/// The delay before the `n`-th restart inside the intensity window (n >= 1): `initial_ms`
/// times `multiplier^(n-1)`, capped at `max_ms`, then spread by +-`jitter` (a fraction).
pub fn backoff_delay(b: &Backoff, n: u32, random: f64) -> u64 {
    let exp = b.multiplier.powi(n.saturating_sub(1).min(64) as i32);
    let base = (b.initial_ms as f64 * exp).min(b.max_ms as f64);
    let spread = 1.0 + b.jitter * (2.0 * random.clamp(0.0, 1.0) - 1.0);
    (base * spread).round().clamp(0.0, b.max_ms as f64) as u64
}

/// Stopping a whole supervisor: every running child, last started first.
pub fn shutdown(children: &[ChildState]) -> Vec<Action> {
    children
        .iter()
        .rev()
        .filter(|c| c.running)
        .map(|c| Action::Stop {
            child: c.id.clone(),
        })
        .collect()
}
