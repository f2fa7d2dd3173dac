//! Supervision on this node: when a local agent ends, the supervisor's strategy (the pure
//! planner in `crate::supervision`) decides which siblings stop and what starts again when,
//! and a supervisor past its intensity escalates to its parent.

use std::time::{Duration, Instant};

use rand::Rng;
use uuid::Uuid;

use super::{Host, HostWrite};
use crate::node::OwnWrite;
use crate::registry::{AgentStatus, Child, FinishAgent, ROOT};
use crate::supervision::{self, Action, ChildState, ExitReason, Policy, RestartType};
use warden_core::host_plan::Scheduled;

impl Host {
    /// Applies supervisor `sup`'s strategy to child `child` having ended with `reason`, and
    /// escalates to its parent when it gives up.
    pub(super) async fn supervise(&mut self, sup: &str, child: String, reason: ExitReason) {
        let mut sup = sup.to_string();
        // A temporary child that ended has its finish queued, which forgets it.
        let exited = child.clone();
        let mut child = child;
        let mut reason = reason;
        // Escalation climbs at most the tree's depth.
        for _ in 0..crate::limits::MAX_SUPERVISOR_DEPTH + 1 {
            let (policy, children, parent) = {
                let st = self.node.state_read();
                let Some(s) = st.registry.supervisor(&sup) else {
                    return;
                };
                let policy = Policy {
                    strategy: s.strategy,
                    max_restarts: s.max_restarts,
                    max_seconds: s.max_seconds,
                    backoff: s.backoff.clone(),
                    never_gives_up: sup == ROOT,
                };
                let children: Vec<ChildState> = st
                    .registry
                    .children(&sup)
                    .filter_map(|c| match c {
                        Child::Agent { id } => {
                            st.registry.agent(&id.to_string()).map(|a| ChildState {
                                id: format!("a:{id}"),
                                restart: a.restart,
                                // A sibling on another node (a spread supervisor) counts
                                // by its recorded status.
                                running: if a.node == Some(self.me) {
                                    self.instances.contains_key(id)
                                } else {
                                    a.status == AgentStatus::Running
                                },
                            })
                        }
                        Child::Supervisor { name } => Some(ChildState {
                            id: format!("s:{name}"),
                            restart: RestartType::Permanent,
                            running: true,
                        }),
                    })
                    .collect();
                (policy, children, s.parent.clone())
            };
            let history = self.histories.remove(&sup).unwrap_or_default();
            let now = self.now_ms();
            let plan = supervision::on_exit(
                &policy,
                &children,
                &child,
                &reason,
                now,
                history,
                self.rng.gen(),
            );
            self.histories.insert(sup.clone(), plan.restarts_ms);
            let mut escalate = false;
            let mut stops = Vec::new();
            let mut starts = Vec::new();
            for action in plan.actions {
                match action {
                    // The planner lists children last started first; a child supervisor's
                    // agents stop in the same order.
                    Action::Stop { child } => {
                        stops.extend(self.local_agents_of(&child).into_iter().rev())
                    }
                    Action::Forget { child } if child != exited => {
                        if let Some(id) = agent_id(&child) {
                            self.forget_temporary(id).await;
                        }
                    }
                    Action::Forget { .. } => {}
                    Action::Start { child, delay_ms } => starts.push((child, delay_ms)),
                    Action::Escalate => escalate = true,
                }
            }
            // Siblings stop one after the other, last started first, as OTP's do, and the
            // plan's starts are scheduled once they all have.
            self.stop_in_turn(stops, "stopped by its supervisor", starts)
                .await;
            if !escalate {
                return;
            }
            let Some(parent) = parent else { return };
            self.publish_escalated(&sup, &parent).await;
            reason = ExitReason::Crash(format!("supervisor {sup} reached its restart intensity"));
            child = format!("s:{sup}");
            sup = parent;
        }
    }

    /// Agents of a child (an agent, or every agent below a child supervisor), in start order.
    fn agents_of(&self, child: &str) -> Vec<Uuid> {
        if let Some(id) = agent_id(child) {
            return vec![id];
        }
        let Some(name) = child.strip_prefix("s:") else {
            return Vec::new();
        };
        let st = self.node.state_read();
        let mut found = Vec::new();
        let mut stack = vec![name.to_string()];
        while let Some(s) = stack.pop() {
            for c in st.registry.children(&s) {
                match c {
                    Child::Agent { id } => found.extend(
                        st.registry
                            .agent(&id.to_string())
                            .map(|a| (a.position, *id)),
                    ),
                    Child::Supervisor { name } => stack.push(name.clone()),
                }
            }
        }
        // Positions grow with every child added anywhere, so they are the start order.
        found.sort();
        found.into_iter().map(|(_, id)| id).collect()
    }

    /// The agents of a child placed on this node, in start order. Siblings on other nodes are
    /// restarted by their own node when their start comes (`schedule_child`), which stops
    /// them first.
    pub(super) fn local_agents_of(&self, child: &str) -> Vec<Uuid> {
        let mut ids = self.agents_of(child);
        ids.retain(|id| self.is_local(id));
        ids
    }

    /// Whether agent `id` is placed on this node.
    fn is_local(&self, id: &Uuid) -> bool {
        self.node
            .state_read()
            .registry
            .agent(&id.to_string())
            .is_some_and(|a| a.node == Some(self.me))
    }

    pub(super) fn schedule_child(&mut self, child: &str, delay_ms: u64) {
        let at = Instant::now() + Duration::from_millis(delay_ms);
        for id in self.agents_of(child) {
            if self.is_local(&id) {
                self.ended.remove(&id);
                self.scheduled.insert(id, Scheduled { at, restart: true });
            } else {
                // A spread supervisor's sibling elsewhere: its node restarts it.
                let node = self.node.clone();
                self.tasks.spawn(async move {
                    if let Err(e) = node.write_own(OwnWrite::RestartAgent(id)).await {
                        tracing::warn!(agent = %id, error = %e, "could not restart a remote sibling");
                    }
                });
            }
        }
    }
}

impl Host {
    /// Forgets a temporary sibling a strategy stopped: one placed here with a finish of its own
    /// (stopped by its supervisor), fenced by its epoch and run like every finish; one on
    /// another node by `stop_agent`.
    async fn forget_temporary(&mut self, id: Uuid) {
        let here = {
            let st = self.node.state_read();
            st.registry
                .agent(&id.to_string())
                .filter(|a| a.node == Some(self.me))
                .map(|a| (a.epoch, a.restart_requested))
        };
        match here {
            Some((epoch, restart_requested)) => self.pending.finish(FinishAgent {
                agent: id,
                node: self.me,
                epoch,
                restart_requested,
                status: AgentStatus::Stopped,
                result: None,
                error: Some("stopped by its supervisor".into()),
                forget: true,
            }),
            // The writer outlives the host loop, so the send succeeds.
            None => {
                let _ = self.forget.send(HostWrite::Forget(id)).await;
            }
        }
    }
}

/// The agent id of a planner child id (`a:<uuid>`).
fn agent_id(child: &str) -> Option<Uuid> {
    child
        .strip_prefix("a:")
        .and_then(|s| Uuid::parse_str(s).ok())
}
