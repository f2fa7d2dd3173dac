//! A node's life: start-up, serving, and a stop that always ends.
//!
//! A stop has one deadline, `stop_timeout_ms` after it was asked for, whatever state Raft or
//! NATS is in: start-up is abandoned, agents stop gracefully until `STOP_TAIL_MS` before it,
//! and each later step (tasks, Raft, sled, the last NATS flush) gets its share of the tail.
//! A fatal error (Raft stopped, storage failed) skips the graceful part: the node stops
//! heartbeating at once, drops its agents, and exits non-zero within `FATAL_STOP_MS`, so that
//! its agents fail over and its service manager restarts it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::{controller, dispatch, flag, forward, host, join_then_serve, lease, proposer, Node};
use crate::agent::Kinds;
use crate::bus::{self, Violation};
use crate::config::NodeConfig;
use crate::limits;
use crate::raft::network::{Contacts, Network};
use crate::raft::store::Store;
use crate::raft::typ::Raft;
use crate::registry::NodeStatus;
use crate::subjects::Subjects;

/// Runs a node with the built-in kinds until `shutdown` resolves (or the node is removed from
/// the cluster). A stop is a restart: the node stays in the membership.
pub async fn run(cfg: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let kinds = Kinds::builtin(cfg.exec.clone());
    run_with_kinds(cfg, kinds, shutdown).await
}

/// Runs a node with the given kinds: how a Rust program embeds a node with its own kinds
/// (start from `Kinds::builtin` and `register` more).
pub async fn run_with_kinds(
    cfg: NodeConfig,
    kinds: Kinds,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    // Start-up may wait for NATS forever (a server that is not there yet): a stop asked for
    // meanwhile abandons it. What was started goes with it: the tasks end with their stop
    // flag's sender, Raft with its last handle, and nothing was acknowledged to anyone yet.
    let running = tokio::select! {
        biased;
        _ = &mut shutdown => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
        running = start(cfg, kinds) => running?,
    };
    running.serve(shutdown).await
}

/// A started node: everything its stop must end, in order.
struct Running {
    node: Arc<Node>,
    client: async_nats::Client,
    /// Raft's own connection, on `plane`.
    raft_client: async_nats::Client,
    plane: RaftPlane,
    refusals: tokio::sync::broadcast::Receiver<Violation>,
    /// The same for Raft's connection, which holds this node's Raft and reply subscriptions.
    raft_refusals: tokio::sync::broadcast::Receiver<Violation>,
    store: Store,
    raft: Raft,
    /// The tasks that take commands in: they stop first, and drain what is in flight while
    /// everything they need (peers, the proposer, Raft, heartbeats) still runs.
    intake: JoinSet<()>,
    intake_tx: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Tasks that end with the stop flag, joined after `tasks`.
    helpers: Vec<JoinHandle<()>>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    host_stop_tx: watch::Sender<bool>,
    host_task: JoinHandle<()>,
}

async fn start(cfg: NodeConfig, kinds: Kinds) -> anyhow::Result<Running> {
    let subjects = Subjects::new(&cfg.cluster);
    // First: an address in use stops the node before it joins anything.
    let metrics_listener = crate::metrics::bind(cfg.metrics.listen.as_deref()).await?;
    tracing::info!(id = cfg.id, nats = %cfg.nats.url, "starting; connecting to NATS");
    let (client, violations) =
        bus::connect_watched(&cfg.nats, &format!("warden-node-{}", cfg.id), true).await?;
    // Watched from the start: a subscription refused while starting up counts too.
    let refusals = violations.subscribe();
    // With retry_on_initial_connect the client may not be connected yet: a flush waits for
    // the connection, after which the server's INFO (and its max_payload) is known.
    client
        .flush()
        .await
        .context("wait for the NATS connection")?;
    if !cfg.nats.has_credentials() {
        tracing::warn!(
            "no NATS identity (--auth): this cluster is open to anyone on its NATS server, who \
             can stop, impersonate or outvote its nodes; see docs/security.md"
        );
    } else if !client.server_info().auth_required {
        tracing::warn!(
            "the NATS server does not require authentication: anyone on it can act as any \
             node; run it with the config `warden auth init` writes (docs/security.md)"
        );
    }
    let max_payload = client.server_info().max_payload;
    anyhow::ensure!(
        max_payload >= limits::MIN_SERVER_MAX_PAYLOAD_BYTES,
        "the NATS server's max_payload is {max_payload} bytes; Warden needs at least {}",
        limits::MIN_SERVER_MAX_PAYLOAD_BYTES
    );
    let metrics = Arc::new(crate::metrics::Metrics::new(
        &kinds.names(),
        metrics_listener.is_some(),
    ));
    metrics.watch_slow_consumers(violations.slow_consumers());
    let store = Store::open(&cfg.data_dir)?;
    let (events_tx, events_rx) = mpsc::channel(limits::EVENT_QUEUE);
    let timings = metrics.enabled().then(|| metrics.log_timings());
    let outbox = match cfg.history.enabled {
        true => Some(Arc::new(crate::history::outbox::Outbox::open(
            &cfg.data_dir.join("history"),
            cfg.history.outbox_max_bytes,
        )?)),
        false => None,
    };
    let (log, mut sm, state) = store.raft_parts_timed(Some(events_tx), timings, outbox.clone())?;
    if metrics.enabled() {
        sm.count_snapshots(metrics.snapshot_counts());
    }
    let traces = crate::traces::Traces::start(&cfg.traces, &cfg.cluster, cfg.id)?.map(Arc::new);
    let traced = traces.clone().map(|t| {
        let times = Arc::new(crate::raft::store::ApplyTimes::default());
        sm.time_applies(times.clone());
        (t, times)
    });
    let contacts = Arc::new(Contacts::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    // Raft runs on its own runtime with its own NATS connection: its core, its state
    // machine and its RPCs both ways wait for no agent's task however busy the agents keep
    // the node's runtime. Every request of this node to another (`peers`: heartbeats,
    // reports, forwarded writes and relays) goes over that connection too; the heartbeat
    // loop and the leader's grants still run on the node's runtime.
    let plane = RaftPlane::new(cfg.id)?;
    let (nats, name) = (cfg.nats.clone(), format!("warden-node-{}-raft", cfg.id));
    let connect = async move { bus::connect_watched(&nats, &name, true).await };
    let (raft_client, raft_violations) = plane.run(connect).await??;
    let raft_refusals = raft_violations.subscribe();
    metrics.watch_slow_consumers(raft_violations.slow_consumers());
    let raft_flush = raft_client.clone();
    plane
        .run(async move { raft_flush.flush().await })
        .await?
        .context("wait for Raft's NATS connection")?;
    let start_peers = crate::peers::Peers::start(
        raft_client.clone(),
        subjects.clone(),
        cfg.id,
        flag(&stop_rx),
    );
    let (peers, peers_task) = plane.run(start_peers).await??;
    let network = Network {
        me: cfg.id,
        peers: peers.clone(),
        subjects: subjects.clone(),
        contacts: contacts.clone(),
        max_payload,
        commit: metrics.commit_index(),
    };
    let raft_cfg = Arc::new(cfg.raft.to_openraft(&cfg.cluster)?);
    let log_reader = log.clone();
    let raft = plane
        .run(Raft::new(cfg.id, raft_cfg, network, log, sm))
        .await?
        .context("start raft")?;
    // openraft's own elections are off (`RaftConfig::to_openraft`): this decides, after a
    // pre-vote.
    let election = Arc::new(crate::raft::election::Election::new(
        raft.clone(),
        peers.clone(),
        subjects.clone(),
        cfg.id,
        log_reader,
    ));

    let mut tasks = JoinSet::new();
    let mut intake = JoinSet::new();
    let (intake_tx, intake_rx) = watch::channel(false);
    let serve_rpcs = crate::raft::server::start(
        raft_client.clone(),
        subjects.clone(),
        cfg.id,
        raft.clone(),
        election.clone(),
        metrics.commit_index(),
        flag(&stop_rx),
    );
    let rpc = plane.run(serve_rpcs).await??;
    let elections = plane.spawn(election.clone().run(flag(&stop_rx)))?;

    if cfg.bootstrap {
        if raft.is_initialized().await? {
            tracing::info!("data dir already initialized; --bootstrap has nothing to do");
        } else {
            let members = BTreeMap::from([(cfg.id, openraft::EmptyNode {})]);
            raft.initialize(members)
                .await
                .context("bootstrap the cluster")?;
            tracing::info!(id = cfg.id, "bootstrapped a new cluster");
        }
    }

    let (proposer, batcher) = proposer::Proposer::start(
        raft.clone(),
        Duration::from_millis(limits::PROPOSAL_TIMEOUT_MS),
        traced,
        flag(&stop_rx),
    );
    let (forwarder, forward_batcher) =
        forward::Forwarder::start(peers.clone(), subjects.clone(), cfg.id, flag(&stop_rx));
    let (host_asks, host_queries) = mpsc::channel(limits::HOST_QUERY_QUEUE);
    let node = Arc::new(Node {
        host_asks,
        cfg: cfg.clone(),
        client: client.clone(),
        subjects: subjects.clone(),
        raft: raft.clone(),
        state,
        contacts,
        election,
        cut: watch::channel(None).0,
        leading_since: Default::default(),
        proposer,
        forwarder,
        peers,
        kinds,
        membership_lock: tokio::sync::Mutex::new(()),
        inflight: Arc::new(Semaphore::new(limits::MAX_COMMANDS_IN_FLIGHT)),
        inflight_internal: Arc::new(Semaphore::new(limits::MAX_COMMANDS_IN_FLIGHT)),
        spawn_waiters: Arc::new(Semaphore::new(limits::SPAWN_WAITERS)),
        history_readers: Arc::new(Semaphore::new(limits::HISTORY_READERS)),
        figure_walks: Arc::new(Semaphore::new(limits::FIGURE_WALKS)),
        figure_asks: Arc::new(Semaphore::new(limits::FIGURE_ASKS)),
        figure_fanouts: Arc::new(Semaphore::new(limits::FIGURE_FANOUTS)),
        proc_scan: Default::default(),
        exports: Default::default(),
        started: std::time::Instant::now(),
        lease: lease::Lease::default(),
        liveness: lease::Liveness::default(),
        quorum: lease::QuorumGate::default(),
        read_floor: Default::default(),
        running: Default::default(),
        stopping: Default::default(),
        metrics,
        traces,
    });

    // What is addressed to this node: clients' commands, and from other nodes their relayed
    // commands, their own commands and their forward batches.
    let feeds = [
        (subjects.node_cmd_all(cfg.id), dispatch::Feed::Commands),
        (subjects.relay_to(cfg.id), dispatch::Feed::Relayed),
        (subjects.own_to(cfg.id), dispatch::Feed::Own),
        (subjects.forward_to(cfg.id), dispatch::Feed::Forwarded),
    ];
    for (subject, feed) in feeds {
        let sub = client.subscribe(subject).await?;
        intake.spawn(dispatch::serve(node.clone(), sub, feed, flag(&intake_rx)));
    }
    tasks.spawn(events_loop(node.clone(), events_rx, flag(&stop_rx)));
    if let Some(outbox) = outbox {
        let (leading_tx, leading) = watch::channel(false);
        let mut server = raft.server_metrics();
        let stopped = flag(&stop_rx);
        tasks.spawn(async move {
            let follow = async {
                loop {
                    let now = server.borrow_and_update().state == openraft::ServerState::Leader;
                    leading_tx.send_if_modified(|was| std::mem::replace(was, now) != now);
                    if server.changed().await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = stopped => {}
                _ = follow => {}
            }
        });
        tasks.spawn(crate::history::publish::run(
            client.clone(),
            subjects.clone(),
            cfg.history.clone(),
            outbox,
            leading,
            flag(&stop_rx),
        ));
    }
    // The host stops first, on its own signal, while heartbeats, Raft and the command path
    // still run: its agents' graceful stops keep their lease (see `Running::stop`).
    let (host_stop_tx, host_stop_rx) = watch::channel(false);
    let host_task = tokio::spawn(host::run(node.clone(), host_queries, flag(&host_stop_rx)));
    let gate = node.clone();
    let round = Duration::from_millis(cfg.failure.lease_ms);
    let stopped = flag(&stop_rx);
    tasks.spawn(async move {
        gate.quorum
            .run(gate.raft.clone(), &gate.read_floor, round, stopped)
            .await
    });
    tasks.spawn(lease::heartbeat_loop(node.clone(), flag(&stop_rx)));
    tasks.spawn(super::watch_cut_off(node.clone(), flag(&stop_rx)));
    let fencer = node.clone();
    let stopped = flag(&stop_rx);
    tasks.spawn(async move { fencer.lease.watch_expiry(stopped).await });
    tasks.spawn(controller::run(node.clone(), flag(&stop_rx)));
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "serving metrics at /metrics");
        tasks.spawn(crate::metrics::serve(
            node.clone(),
            listener,
            flag(&stop_rx),
        ));
    }
    tasks.spawn(crate::raft::snapshots::trigger_loop(
        raft.clone(),
        store.log_bytes(),
        crate::raft::snapshots::Policy {
            after_entries: cfg.raft.snapshot_after_entries,
            after_bytes: cfg.raft.snapshot_after_bytes,
            keep_entries: cfg.raft.keep_entries_after_snapshot,
            keep_bytes: cfg.raft.keep_bytes_after_snapshot,
        },
        flag(&stop_rx),
    ));
    intake.spawn(join_then_serve(
        node.clone(),
        flag(&intake_rx),
        stop_tx.clone(),
    ));
    client.flush().await?;
    tracing::info!(id = cfg.id, name = %cfg.name, cluster = %cfg.cluster, "node started");
    let helpers = vec![batcher, forward_batcher, rpc, peers_task, elections];
    Ok(Running {
        node,
        client,
        raft_client,
        plane,
        refusals,
        raft_refusals,
        store,
        raft,
        intake,
        intake_tx,
        tasks,
        helpers,
        stop_tx,
        stop_rx,
        host_stop_tx,
        host_task,
    })
}

/// Raft's own runtime (`limits::RAFT_THREADS` threads): what is spawned from a future it
/// runs (openraft's core and state machine tasks, the NATS connection's tasks, the RPC
/// server) lives there.
struct RaftPlane(Option<tokio::runtime::Runtime>);

impl RaftPlane {
    fn new(id: u64) -> anyhow::Result<RaftPlane> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(limits::RAFT_THREADS)
            .thread_name(format!("warden-raft-{id}"))
            .enable_all()
            .build()
            .context("start Raft's runtime")?;
        Ok(RaftPlane(Some(rt)))
    }

    /// Runs `fut` on Raft's runtime and answers its output.
    async fn run<F>(&self, fut: F) -> anyhow::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.0.as_ref().context("Raft's runtime is gone")?;
        rt.spawn(fut)
            .await
            .context("a task on Raft's runtime failed")
    }
}

impl RaftPlane {
    /// Spawns `fut` on Raft's runtime.
    fn spawn<F>(&self, fut: F) -> anyhow::Result<tokio::task::JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.0.as_ref().context("Raft's runtime is gone")?;
        Ok(rt.spawn(fut))
    }
}

impl Drop for RaftPlane {
    fn drop(&mut self) {
        // Not a blocking shutdown: this may run inside the node's own runtime. What is left
        // there (nothing, after an orderly stop) is dropped as its threads end.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Why a node stopped.
enum Why {
    /// Asked to (a signal, the embedding program), or it left the cluster: a graceful stop.
    Asked,
    /// It cannot do its part but nothing is broken (NATS refuses its subscriptions): a
    /// graceful stop, then an error for its service manager.
    Refused(String),
    /// Raft stopped with a fatal error: stop at once, then an error.
    Fatal(String),
}

impl Running {
    async fn serve(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let why = tokio::select! {
            _ = shutdown => {
                tracing::info!("shutting down");
                Why::Asked
            }
            v = refused(&mut self.refusals, &mut self.raft_refusals) => {
                let why = format!(
                    "NATS refused this node's subscription to {:?}: its identity is not \
                     node-{}'s, or the server's users are out of date (docs/security.md)",
                    v.subject, self.node.cfg.id
                );
                tracing::error!("{why}; stopping the node");
                Why::Refused(why)
            }
            _ = flag(&self.stop_rx) => {
                tracing::warn!("stopping: this node cannot be part of the cluster");
                Why::Asked
            }
            why = watchdog(&self.node) => match why {
                Some(why) => {
                    tracing::error!(
                        error = %why,
                        "Raft stopped with a fatal error; stopping the node at once"
                    );
                    Why::Fatal(format!("Raft stopped with a fatal error: {why}"))
                }
                None => {
                    tracing::warn!("this node left the cluster; stopping");
                    Why::Asked
                }
            }
        };
        let result = match &why {
            Why::Asked => Ok(()),
            Why::Refused(why) | Why::Fatal(why) => Err(anyhow::anyhow!("{why}")),
        };
        self.stop(matches!(why, Why::Fatal(_))).await;
        result
    }

    /// Stops everything within the node's stop timeout (or `FATAL_STOP_MS` after a fatal
    /// error), in order: agents; then the intake of commands, whose in-flight commands finish
    /// (a relayed `leave` of this very node is answered after it learned it left); then the
    /// other tasks (heartbeats, peers, the proposer); then Raft, sled and NATS.
    async fn stop(mut self, fatal: bool) {
        let now = Instant::now();
        let tail = Duration::from_millis(if fatal {
            limits::FATAL_STOP_MS
        } else {
            limits::STOP_TAIL_MS
        });
        let deadline = if fatal {
            now + tail
        } else {
            now + Duration::from_millis(self.node.cfg.stop_timeout_ms)
        };
        // Shares of the tail: intake until 60% of it is left, the other tasks until 40%, Raft
        // until 20%, sled until 5%.
        let share = |left_pct: u32| deadline - tail * left_pct / 100;
        if fatal {
            // No graceful stop: this node's log may be unwritable and its applied state
            // stale, so it stops heartbeating now and drops its agents (an exec process
            // group is killed); the registry places them elsewhere once its lease is out.
            let _ = self.stop_tx.send(true);
            let _ = self.intake_tx.send(true);
            self.host_task.abort();
            let _ = tokio::time::timeout_at(share(60), &mut self.host_task).await;
        } else {
            // Agents first, each by its shutdown setting, last started first, while the node
            // still renews its lease; past their share the rest are dropped.
            let _ = self.host_stop_tx.send(true);
            if tokio::time::timeout_at(deadline - tail, &mut self.host_task)
                .await
                .is_err()
            {
                tracing::warn!(
                    stop_timeout_ms = self.node.cfg.stop_timeout_ms,
                    "agents did not all stop in time; dropping the rest"
                );
                self.host_task.abort();
                let _ = tokio::time::timeout_at(share(60), &mut self.host_task).await;
            }
            // Receivers may all be gone already; that is fine.
            let _ = self.intake_tx.send(true);
            let mut intake = self.intake;
            let drain = async move { while intake.join_next().await.is_some() {} };
            if tokio::time::timeout_at(share(60), drain).await.is_err() {
                tracing::warn!("commands in flight did not finish in time; abandoning them");
            }
            let _ = self.stop_tx.send(true);
        }
        let mut tasks = self.tasks;
        let helpers = self.helpers;
        let drain = async move {
            while tasks.join_next().await.is_some() {}
            for h in helpers {
                let _ = h.await; // a panicked helper has nothing left to drain
            }
        };
        if tokio::time::timeout_at(share(40), drain).await.is_err() {
            tracing::warn!("some tasks did not stop in time; abandoning them");
        }
        match tokio::time::timeout_at(share(20), self.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "raft did not shut down cleanly"),
            Err(_) => tracing::warn!("raft did not shut down in time"),
        }
        // Everything acknowledged is on disk already (the log is flushed before a write is
        // acknowledged); this flush only spares the next start some work.
        match tokio::time::timeout_at(share(5), self.store.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "closing the store failed"),
            Err(_) => tracing::warn!("the store did not close in time"),
        }
        // Raft's connection has nothing left to say; its runtime's threads end by themselves.
        drop(self.raft_client);
        drop(self.plane);
        // The last replies and events: a flush waits for the server's answer, which never
        // comes while NATS is unreachable, so it is skipped then and bounded otherwise.
        if self.client.connection_state() == async_nats::connection::State::Connected {
            let until =
                deadline.min(Instant::now() + Duration::from_millis(limits::FINAL_FLUSH_MS));
            match tokio::time::timeout_at(until, self.client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "final NATS flush failed"),
                Err(_) => tracing::info!("NATS did not answer; stopping without a final flush"),
            }
        } else {
            tracing::info!("NATS unreachable; stopping without a final flush");
        }
        // The last spans, sent within what is left of the stop (at most FINAL_FLUSH_MS).
        if let Some(traces) = self.node.traces.clone() {
            let within = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(limits::FINAL_FLUSH_MS));
            let closing = tokio::task::spawn_blocking(move || traces.shutdown(within));
            let _ = tokio::time::timeout(within + Duration::from_millis(100), closing).await;
        }
        tracing::info!("node stopped");
    }
}

/// Resolves with the reason when Raft stopped with a fatal error (storage, or a log entry of
/// a newer version), or with `None` when the registry this node applied says it left: told by
/// the committed state, never by a message anyone could publish. Looked at every
/// `FATAL_CHECK_MS`, not on every metrics change: those come with every write, and waking for
/// each would cost throughput.
async fn watchdog(node: &Node) -> Option<String> {
    let mut tick = tokio::time::interval(Duration::from_millis(limits::FATAL_CHECK_MS));
    loop {
        tick.tick().await;
        if let Err(e) = &node.raft.metrics().borrow().running_state {
            return Some(e.to_string());
        }
        if node.registry_node_status(node.cfg.id) == Some(NodeStatus::Left) {
            return None;
        }
    }
}

/// Resolves when NATS refuses one of this node's subscriptions: it holds another node's
/// identity, or the server's users are stale. It cannot do its part.
async fn refused(
    refusals: &mut tokio::sync::broadcast::Receiver<Violation>,
    raft_refusals: &mut tokio::sync::broadcast::Receiver<Violation>,
) -> Violation {
    tokio::select! {
        v = refused_on(refusals) => v,
        v = refused_on(raft_refusals) => v,
    }
}

/// `refused`, on one connection.
async fn refused_on(refusals: &mut tokio::sync::broadcast::Receiver<Violation>) -> Violation {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match refusals.recv().await {
            Ok(v) if !v.publish => return v,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

async fn events_loop(
    node: Arc<Node>,
    events: mpsc::Receiver<Vec<crate::registry::RegistryEvent>>,
    stopped: impl Future<Output = ()>,
) {
    let metrics = node.metrics.clone();
    crate::events::publish_loop(
        node.client.clone(),
        node.subjects.clone(),
        node.cfg.id,
        node.raft.server_metrics(),
        events,
        move |batch: &[crate::registry::RegistryEvent]| metrics.applied(batch),
        stopped,
    )
    .await
}
