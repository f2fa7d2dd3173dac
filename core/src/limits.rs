//! Every limit of the system in one place, each with the reason for its value.
//!
//! Relations between limits are checked at compile time with `const` assertions, so that a
//! change to one value cannot silently break another.

/// NATS's default `max_payload`. The node reads the server's real value at connect time and
/// refuses to start when it is below [`MIN_SERVER_MAX_PAYLOAD_BYTES`].
pub const NATS_DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The smallest server `max_payload` we run against: a full Raft batch must fit in one message.
pub const MIN_SERVER_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Longest pause between two tries of a node's own write that a leader did not take: with
/// doubling from `LEADER_RETRY_MS`, about a dozen tries within `FORWARD_TIMEOUT_MS`.
pub const OWN_WRITE_RETRY_MAX_MS: u64 = 1_000;

/// How long a stopping node waits for its last NATS flush (its last replies and events) before
/// it exits anyway: the server may be unreachable.
pub const FINAL_FLUSH_MS: u64 = 2_000;

/// How long the leader waits, holding the membership lock, for a joining learner to catch up
/// before it says `unavailable`: below the joining node's own wait for the answer
/// (`FORWARD_TIMEOUT_MS` + 2 s), so that its retry finds the lock free.
pub const JOIN_CATCH_UP_MS: u64 = 6_000;
const _: () = assert!(JOIN_CATCH_UP_MS < FORWARD_TIMEOUT_MS);

/// Requests a node may have in flight to its peers (`peers::Peers`) at once; more fail at
/// once, as if the peer were unreachable.
pub const MAX_PEER_REQUESTS: usize = 8_192;

/// Of `MAX_PEER_REQUESTS`, the places that relayed client commands may not take: the node's
/// own heartbeats, votes and writes always have room.
pub const PEER_RESERVE: usize = 1_024;

/// Permission violations a connection keeps for whoever watches them (`bus::Violations`);
/// a watcher that falls further behind skips the oldest.
pub const VIOLATION_QUEUE: usize = 64;

/// Largest command body a client may send. Big enough for a 256 KiB checkpoint with a 64 KiB
/// config and their envelope (one agent of an imported subtree, in MessagePack), small
/// enough that a batch of commands plus Raft framing stays under `max_payload`. Larger
/// requests get `too_large` before anything is proposed.
pub const MAX_REQUEST_BYTES: usize = 400 * 1024;

/// Largest encoded proposal (one Raft log entry holding a batch of commands). One request
/// always fits; the batcher starts a new entry before this is crossed.
pub const MAX_PROPOSAL_BYTES: usize = 512 * 1024;

/// Most commands batched into one Raft entry: bounds the work of one `apply` call and the
/// latency added to the first command of a batch.
pub const MAX_PROPOSAL_COMMANDS: usize = 512;

/// Raft entries a leader sends in one AppendEntries message. With entries up to
/// [`MAX_PROPOSAL_BYTES`] the network layer still splits a message that is too large for NATS
/// (see `raft::network`), so this only bounds the common case.
pub const MAX_APPEND_ENTRIES: u64 = 64;

/// A snapshot is built once the log entries appended since the last one take this many bytes
/// (`raft.snapshot_after_bytes`), if `snapshot_after_entries` has not come first: a restart
/// replays at most about this much, and the log on disk stays about this size.
pub const DEFAULT_SNAPSHOT_AFTER_BYTES: u64 = 64 * 1024 * 1024;
pub const MIN_SNAPSHOT_AFTER_BYTES: u64 = 1024 * 1024;

/// The log kept behind a snapshot takes at most this many bytes (`raft.keep_bytes_after_
/// snapshot`): a lagging follower replays at most this much rather than install the snapshot.
/// A replay of groups runs at about 4 MB a second on this machine; a million agents' snapshot
/// (178 MB) is sent and installed at about 20 (`warden bench --scale`), so a large log behind
/// a snapshot costs a follower more than the snapshot does.
pub const DEFAULT_KEEP_BYTES_AFTER_SNAPSHOT: u64 = 8 * 1024 * 1024;

/// How often a node looks whether its log has grown enough for a snapshot, and how long it
/// waits for one it asked for before it may ask again.
pub const SNAPSHOT_CHECK_MS: u64 = 250;
pub const SNAPSHOT_RETRIGGER_MS: u64 = 30_000;

/// Snapshot chunk size: openraft's default (3 MiB) is above NATS's `max_payload`; half of the
/// smallest `max_payload` leaves room for the chunk's framing. Every chunk is a round trip
/// (and openraft pauses 1 ms before each), so fewer, larger chunks send a snapshot faster.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 512 * 1024;

/// Proposals in flight to Raft at once from the batcher: the next batch gathers while one is
/// being committed. openraft 0.9 flushes and replicates entries one after another anyway, so
/// more entries in flight only split the same writes into more entries, each with its own
/// flush (and sled's thread wake-ups), RPCs and commit round. Measured with
/// `warden bench --local`, interleaved runs, writes/s against 4 in flight: 1 gave 1.1x-1.3x
/// with 16 to 256 writers and the same with one; 2 gave 1.05x-1.35x, 8 gave 0.9x-1.05x.
pub const MAX_PROPOSALS_IN_FLIGHT: usize = 1;

/// Commands waiting for the batcher; beyond this a write is refused with `unavailable`
/// rather than queued without bound.
pub const PROPOSAL_QUEUE_CAPACITY: usize = 16 * 1024;

/// Command requests a node handles at once; beyond this it answers `unavailable` at once.
pub const MAX_COMMANDS_IN_FLIGHT: usize = 8 * 1024;

/// How many times a command may be forwarded between nodes looking for the leader before
/// the node gives up with `unavailable` (leadership is moving).
pub const MAX_FORWARD_HOPS: u32 = 3;

/// How long a command waits for a leader to be known before answering `unavailable`.
pub const LEADER_WAIT_MS: u64 = 3_000;

/// Deadline of a forwarded command: long enough for an election plus a commit.
pub const FORWARD_TIMEOUT_MS: u64 = 8_000;

/// How long the leader's batcher waits for a proposal's outcome before answering "outcome
/// unknown" and proposing the next batch. openraft 0.9 keeps the reply pending while a cut-off
/// leader cannot commit, and never sends it when the entry disappears under an installed
/// snapshot; with one proposal in flight, an unbounded wait would stop every later write on the
/// node. Below [`FORWARD_TIMEOUT_MS`], so a forwarding follower hears the leader's answer.
pub const PROPOSAL_TIMEOUT_MS: u64 = 6_000;

/// How long an exec agent's stop waits, once its time is up and the shim's lifeline closed,
/// for the shim to kill the process tree and exit, before it SIGKILLs the process group.
/// Within the host's grace for a stop, so the host never drops the agent first.
pub const EXEC_SHIM_EXIT_MS: u64 = 500;
const _: () = assert!(EXEC_SHIM_EXIT_MS < AGENT_STOP_GRACE_MS);

/// How long a stopping node lets commands in flight finish before abandoning them, at most;
/// the node's stop deadline (`stop_timeout_ms`) may cut it shorter.
pub const DRAIN_GRACE_MS: u64 = 3_000;

/// A node's `stop_timeout_ms` by default: from SIGTERM to exit, whatever state Raft or NATS is
/// in. Agents get all of it but [`STOP_TAIL_MS`]; past that the rest are dropped (an `exec`
/// process group is killed). A node running agents whose stops take longer raises it, as one
/// raises a container's stop grace period.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 5_000;

/// The least and most `stop_timeout_ms` a node accepts. The most stays below the 90 s a
/// service manager such as systemd waits by default before it kills.
pub const MIN_STOP_TIMEOUT_MS: u64 = 2_000;
pub const MAX_STOP_TIMEOUT_MS: u64 = 85_000;

/// Of a node's stop timeout, what it keeps after its agents: to end its tasks, shut Raft down,
/// flush sled and NATS. Split by `node::run` into fixed shares.
pub const STOP_TAIL_MS: u64 = 1_000;
const _: () = assert!(STOP_TAIL_MS * 2 <= MIN_STOP_TIMEOUT_MS);

/// How far past its stop timeout the `warden` process exits anyway (status 1), should some
/// step of the stop ignore its own bound: the last line of defence, not the plan.
pub const STOP_BACKSTOP_MS: u64 = 2_000;

/// How a node stops after a fatal error (its Raft stopped, storage failed): it stops
/// heartbeating at once, drops its agents without a graceful stop (they are placed elsewhere
/// once its lease runs out) and exits within this, non-zero, for its service manager.
pub const FATAL_STOP_MS: u64 = 500;

/// How long the `warden` binary lets its runtime's tasks end after the node returned (a task
/// blocked on a hanging disk must not hold the exit).
pub const RUNTIME_SHUTDOWN_MS: u64 = 200;

/// Threads of Raft's own runtime (`node::run`): one can apply a slice of the log while the
/// other answers RPCs and sends heartbeats.
pub const RAFT_THREADS: usize = 2;

/// How much lower the priority (nice) of the thread that encodes and stores a snapshot is
/// than the node's (`raft::store`): 10 steps, so under contention it gets about a tenth of
/// the CPU of the node's other threads.
pub const SNAPSHOT_NICE: i32 = 10;

/// How often a node looks whether its Raft stopped with a fatal error. With
/// [`FATAL_STOP_MS`] and [`RUNTIME_SHUTDOWN_MS`], the process is gone within a second of the
/// error.
pub const FATAL_CHECK_MS: u64 = 100;
const _: () = assert!(FATAL_CHECK_MS + FATAL_STOP_MS + RUNTIME_SHUTDOWN_MS < 1_000);

/// Pause before a follower looks for the leader again when the one it knew was unreachable
/// (nothing reached it, so looking again is safe).
pub const LEADER_RETRY_MS: u64 = 20;

/// Pause before Raft retries an unreachable peer. openraft's default, 500 ms, delays a
/// restarted node's catch-up; an unreachable peer answers at once (no responders), so sooner
/// costs little.
pub const RAFT_UNREACHABLE_RETRY_MS: u64 = 100;

/// Writes a follower forwards to the leader in one NATS message. Forwarding one by one costs
/// four message routings per write; batching makes that a fraction of one.
pub const MAX_FORWARD_BATCH: usize = 256;

/// Forward batches in flight from one follower at once.
pub const MAX_FORWARDS_IN_FLIGHT: usize = 8;

/// Records in one `list_supervisors` page; at a few hundred bytes each a page stays far
/// below NATS `max_payload`.
pub const MAX_PAGE: usize = 1_000;

/// Supervisors drawn in one `get_supervision_tree` reply; deeper or wider parts are cut and
/// marked `truncated`.
pub const MAX_TREE_NODES: usize = 2_000;

/// Names of supervisors, agents and clusters: `[A-Za-z0-9_-]{1,128}`.
pub const MAX_NAME_LEN: usize = 128;

/// Labels and tags per entity, and the length of each key and value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 256;

/// Length of a client's `request_id`.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Remembered `request_id`s. The oldest is forgotten first; at a few hundred bytes each this
/// bounds the table to tens of MiB while covering any realistic retry window.
pub const MAX_REMEMBERED_REQUESTS: usize = 100_000;

/// Bytes the remembered `request_id`s may hold in all (`registry::request_weight`: the typed
/// outcome's encoded length, the id, a fixed overhead), on every replica. The oldest is
/// forgotten first, so a flood of large outcomes (agents with 64 KiB configs, groups of 10,000
/// ids) shortens the retry window instead of growing memory: about 1,000 of the largest
/// spawns, 100,000 typical ones.
pub const MAX_REMEMBERED_REQUEST_BYTES: usize = 64 * 1024 * 1024;

/// What one remembered `request_id` costs beyond its outcome and id: the record's fields, its
/// map entry and its entry in the expiry order.
pub const REQUEST_RECORD_OVERHEAD_BYTES: usize = 160;
const _: () = assert!(
    MAX_REMEMBERED_REQUEST_BYTES >= 512 * (MAX_CONFIG_BYTES + REQUEST_RECORD_OVERHEAD_BYTES)
);

/// A remembered `request_id` is forgotten after this long even when the table is not full.
pub const REQUEST_ID_TTL_SECS: i64 = 24 * 3600;

/// Supervisor nesting depth: deep enough for any real tree, shallow enough that recursive
/// walks over it cannot exhaust a stack.
pub const MAX_SUPERVISOR_DEPTH: usize = 64;

/// Names listed in one reply (`stop_supervisor` of a huge subtree): 1,000 names of at most
/// 128 bytes stay well below NATS `max_payload`; the reply also carries the full count.
pub const MAX_NAMES_IN_REPLY: usize = 1_000;

/// Agents in the registry. Every node holds the whole registry in memory: at a million agents
/// a node grew by 1.3 to 2.3 KB per agent in the registry (`warden bench --scale`, its share
/// of running agents and a snapshot included), so this bounds a node to about 5 GB. Twice the
/// million the benchmark runs, so that it never runs at the cap.
pub const MAX_AGENTS: usize = 2_000_000;

/// Largest agent checkpoint. It travels in one Raft entry and one NATS message, so it stays
/// below `MAX_REQUEST_BYTES`.
pub const MAX_CHECKPOINT_BYTES: usize = 256 * 1024;

/// Longest shutdown timeout an agent may ask for (one hour). Fits a `u32`, which is how the
/// host keeps it per instance.
pub const MAX_SHUTDOWN_MS: u64 = 3_600_000;
const _: () = assert!(MAX_SHUTDOWN_MS <= u32::MAX as u64);

/// How long past its `shutdown_ms` an agent's stop may run before the host aborts its task
/// and drops it: room for the kind to finish what its timeout cut (an `exec` agent's SIGKILL
/// and wait), while a kind whose stop ignores its timeout cannot hold the agent forever.
pub const AGENT_STOP_GRACE_MS: u64 = 1_000;

/// Children of one `spawn_agent_group`: one Raft entry creates them all.
pub const MAX_GROUP: u32 = 10_000;

/// Records one step of an apply adds or removes at most (`Registry::apply_step`): a node
/// applies a large command in steps of this size and lets its other work (Raft's heartbeats
/// and votes, lease renewals, readers) run between two, so that no apply holds a thread or
/// the state's lock for long. About 2 ms of a release build's time.
pub const APPLY_STEP_AGENTS: u32 = 1_000;

/// How long a node applies log entries before it lets its other tasks run (ms). A step
/// (`APPLY_STEP_AGENTS`) is never cut, so a slice lasts at most this plus one step; far
/// below Raft's heartbeat interval.
pub const APPLY_SLICE_MS: u64 = 5;

/// An agent's `config`, encoded as JSON: every record of the agent carries it (the registry,
/// snapshots, exports), so it stays small; bigger data belongs in the agent's state.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// How deep a `config` may nest. Far below every decoder's bound (`MAX_DECODE_DEPTH`), so
/// that a config accepted from a client decodes wherever it is read again, wrapped in a log
/// entry, a Raft message or a snapshot.
pub const MAX_CONFIG_DEPTH: usize = 32;

/// A `spawn_agent_group`'s template config times its count: the records the group adds to
/// the registry at once.
pub const MAX_GROUP_CONFIG_BYTES: usize = 8 * 1024 * 1024;

/// Nesting a client's request body may have: serde_json's own recursion limit, applied to
/// MessagePack bodies too, so both encodings accept the same shapes.
pub const MAX_BODY_DEPTH: usize = 128;

/// Nesting every internal decoder allows (forward batches, log entries, Raft messages,
/// snapshots): rmp-serde's default, named so that one bound holds everywhere.
pub const MAX_DECODE_DEPTH: usize = 1024;

// What a client gets accepted is at most a config of `MAX_CONFIG_DEPTH` levels inside a
// command (typed, a few levels), inside a proposal, a log entry and a Raft message or a
// snapshot: all far within the internal decoders' bound.
const _: () = assert!(MAX_CONFIG_DEPTH + 64 <= MAX_DECODE_DEPTH);
const _: () = assert!(MAX_CONFIG_DEPTH < MAX_BODY_DEPTH);

/// sled's page cache. Its default (1 GiB) would let the cache, not the agents, decide a node's
/// memory. The hot data is the log's recent entries (appended and read back for replication
/// within moments) and the state machine's recently written records; everything else is read
/// at start-up or when a lagging follower catches up, where a disk read is fine. 32 MiB holds
/// the hot part and costs about 700 bytes less per agent than 128 MiB did with 100,000 agents
/// (`warden bench --agents 100000`).
pub const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Supervisors in the registry.
pub const MAX_SUPERVISORS: usize = 1_000_000;

/// Raft voters: 1, 3 or 5. More voters only slow commits down.
pub const VOTERS_MAX_ALLOWED: [usize; 3] = [1, 3, 5];

/// Buffer of each NATS subscription; a full buffer drops messages (SlowConsumer).
pub const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;

/// Join retries back off exponentially up to this interval.
pub const JOIN_BACKOFF_MS_MAX: u64 = 2_000;

/// Moves of one `rebalance` when the request names none: a small disruption budget.
pub const REBALANCE_MOVES_DEFAULT: usize = 16;

/// Most moves of one `rebalance`: they are marked in one Raft entry.
pub const REBALANCE_MOVES_MAX: usize = 1_000;

/// What `failure.down_after_ms` must exceed `failure.lease_ms` by at least. A node stops its
/// agents when its lease runs out, measured on its own clock from before it asked; the leader
/// declares it down `down_after_ms` after it last heard from it, on the leader's clock. The
/// margin covers the node's fencing timer firing late under load, the time to kill what its
/// agents run, and any difference in clock rate (ppm, far below it).
pub const LEASE_MARGIN_MS: u64 = 300;

/// Heartbeats a node has in flight at once (`node::lease::heartbeat_loop`): it sends one per
/// interval without waiting for the grant of the one before, and each waits at most the
/// lease, so the default timing has about 10 in flight when grants are slow.
pub const MAX_HEARTBEATS_IN_FLIGHT: usize = 16;

/// Bytes of agent state in one `handoff`: several small agents move in one entry, a large one
/// alone, and the request stays below `MAX_REQUEST_BYTES`.
pub const HANDOFF_BATCH_BYTES: usize = 280 * 1024;

/// Size at which a node's agent journal turns over (the previous file is kept as `.1`).
pub const JOURNAL_MAX_BYTES: u64 = 64 * 1024 * 1024;

const _: () = assert!(MAX_REQUEST_BYTES < MAX_PROPOSAL_BYTES);
const _: () = assert!(HANDOFF_BATCH_BYTES + 16 * 1024 < MAX_REQUEST_BYTES);
const _: () = assert!(MAX_CHECKPOINT_BYTES <= HANDOFF_BATCH_BYTES);
const _: () = assert!(MAX_CHECKPOINT_BYTES + 16 * 1024 < MAX_REQUEST_BYTES);
const _: () = assert!(MAX_CHECKPOINT_BYTES + MAX_CONFIG_BYTES + 16 * 1024 < MAX_REQUEST_BYTES);
const _: () = assert!(MAX_FORWARD_BATCH <= MAX_PROPOSAL_COMMANDS);
const _: () = assert!(PROPOSAL_TIMEOUT_MS < FORWARD_TIMEOUT_MS);
const _: () = assert!(MAX_PROPOSAL_BYTES < MIN_SERVER_MAX_PAYLOAD_BYTES);
const _: () = assert!(PEER_RESERVE < MAX_PEER_REQUESTS);
const _: () = assert!((SNAPSHOT_CHUNK_BYTES as usize) <= MIN_SERVER_MAX_PAYLOAD_BYTES / 2);
const _: () = assert!(NATS_DEFAULT_MAX_PAYLOAD_BYTES >= MIN_SERVER_MAX_PAYLOAD_BYTES);

// ---- A node's agent host (`node::host`) ----

/// Messages waiting for one agent; a call beyond this is refused with `unavailable` at once.
pub const AGENT_MAILBOX: usize = 256;

/// Answers an agent instance remembers by call id: as many as its mailbox holds, so a retry
/// queued behind a full mailbox still finds the first attempt's answer.
pub const REMEMBERED_CALLS: usize = AGENT_MAILBOX;

/// Longest output line of an `exec` process that is logged; the rest of a longer line is
/// dropped, so a process cannot make its node hold an unbounded line.
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;

/// Bytes of answers one agent instance remembers by call id (with `REMEMBERED_CALLS`), so
/// that the memory of a node's agents is bounded whatever their answers' size.
pub const REMEMBERED_CALLS_BYTES: usize = 256 * 1024;
const _: () = assert!(HANDED_OVER_CALLS_BYTES <= REMEMBERED_CALLS_BYTES);

/// Bytes of remembered answers an agent carries to its next node in a hand-off: the most
/// recent that fit, so a retry of a call answered just before a migration is not run twice.
pub const HANDED_OVER_CALLS_BYTES: usize = 8 * 1024;

/// What a hand-off item costs in MessagePack besides its state and answers: an id, a node,
/// an epoch and field names.
pub const HANDOFF_ITEM_OVERHEAD_BYTES: usize = 96;

// One agent's hand-off always fits a batch on its own: its state, its answers, its fields.
const _: () = assert!(
    MAX_CHECKPOINT_BYTES + HANDED_OVER_CALLS_BYTES + HANDOFF_ITEM_OVERHEAD_BYTES
        <= HANDOFF_BATCH_BYTES
);

/// The host reconciles at least this often even when nothing is applied (or, on a node whose
/// reconcile costs more than `RECONCILE_EVERY_MS / RECONCILE_GAP_FACTOR`, after the gap).
pub const RECONCILE_EVERY_MS: u64 = 500;

/// A reconcile waits after the previous one for this many times what that one cost, between
/// `RECONCILE_GAP_MIN_MS` and `RECONCILE_GAP_MAX_MS`: a node with few agents reacts at once (a
/// migrating agent is back in milliseconds), and one with many does not spend all its time
/// reconciling. With 330,000 agents a pass took 213 ms at best and 415 to 887 ms at the
/// median on this machine (the debug line "reconciled" logs it): with the gap capped at 50 ms,
/// as before, every node of a million-agent cluster reconciled 80 to 95% of the time, with
/// nothing to do.
pub const RECONCILE_GAP_FACTOR: u32 = 4;

/// A reconcile goes over the agents placed on its node this many ids at a time, one chunk
/// per turn of the host's loop: a turn (the state's read lock, the plan, the starts it asks
/// for) stays short however many agents the node runs, and calls, task events and lease
/// changes are served between two chunks.
pub const RECONCILE_CHUNK: usize = 256;
pub const RECONCILE_GAP_MIN_MS: u64 = 1;
/// A change reaches a node's instances within about this plus one pass, however many agents
/// it runs.
pub const RECONCILE_GAP_MAX_MS: u64 = 1_000;
const _: () = assert!(RECONCILE_GAP_MIN_MS <= RECONCILE_GAP_MAX_MS);

/// How long a scheduled start waits to be tried again while the node may not start agents
/// (no lease, or the log not yet applied up to its read index).
pub const START_RETRY_MS: u64 = 50;

/// How long the report writer lets a burst gather after the first new report (a restart's
/// `failed` and `running` become one report).
pub const REPORT_GATHER_MS: u64 = 2;

/// The least time between two report writes while fewer than a full batch wait: a crash loop
/// (or any trickle of changes) costs the cluster at most this many writes per second, each
/// fsynced on every voter, instead of one per restart. A lone change is still written after
/// `REPORT_GATHER_MS`; a full batch goes at once, so bulk starts are not slowed.
pub const REPORT_INTERVAL_MS: u64 = 25;

/// The longest error a node reports for one of its agents (an agent's crash message, a failed
/// start), in bytes; longer ones are cut. `get_agent` shows it as `last_error`.
pub const MAX_REPORT_ERROR_BYTES: usize = 200;

/// A supervisor's intensity: at most this many restarts (`max_restarts`) within at most this
/// many seconds (`max_seconds`). A node keeps at most `max_restarts + 1` restart times per
/// supervisor, so the first bounds that memory; the second is a day.
pub const MAX_RESTARTS: u32 = 1_000_000;
pub const MAX_INTENSITY_SECONDS: u32 = 86_400;

/// How long `spawn_agent {wait: "running"}` waits for the first start by default, and at
/// most, in milliseconds: a start within a lease, plus placement and a report's write, is
/// well under the default; the cap bounds how long a request holds its node's task.
pub const SPAWN_WAIT_DEFAULT_MS: u64 = 5_000;
pub const SPAWN_WAIT_MAX_MS: u64 = 60_000;

/// First starts that failed whose errors the registry keeps (`StartFailure`: about 300
/// bytes each, 3 MB in all), so that a `spawn_agent` waiting for `running` can answer the
/// error after the agent was removed for it. Only the most recent are needed, a waiter reads
/// its own within its `timeout_ms`; but a large group whose starts all fail must not push a
/// waiter's out first (a group is at most `MAX_GROUP`).
pub const MAX_START_FAILURES: usize = 10_000;

/// The largest result an agent that finished may leave (`Agent::finish`), as JSON; a larger
/// one is replaced by an error saying so. Results of done agents kept in all: at most
/// `MAX_FINISHED` records and `MAX_FINISHED_BYTES`, the oldest dropped first.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;
pub const MAX_FINISHED: usize = 100_000;
pub const MAX_FINISHED_BYTES: usize = 32 * 1024 * 1024;
const _: () = assert!(MAX_RESULT_BYTES + 16 * 1024 < MAX_REQUEST_BYTES);

/// The results and errors of one `finish_agents` write, at most (one larger result, up to
/// `MAX_RESULT_BYTES`, goes alone).
pub const FINISH_BATCH_BYTES: usize = 192 * 1024;
const _: () = assert!(FINISH_BATCH_BYTES + 64 * 1024 < MAX_REQUEST_BYTES);

/// Templates the registry holds, their descriptions and their configs (as JSON): 1,000
/// templates of 16 KiB hold at most 16 MiB on every node. Seed 002 asks `find_templates`
/// over 1,000 to answer within 10 ms; it walks them all.
pub const MAX_TEMPLATES: usize = 1_000;
pub const MAX_TEMPLATE_DESCRIPTION: usize = 1_024;
pub const MAX_TEMPLATE_CONFIG_BYTES: usize = 16 * 1024;
/// A supervisor template's document, as JSON: 1,000 of them hold at most 64 MiB on every node.
pub const MAX_TEMPLATE_SUBTREE_BYTES: usize = 64 * 1024;

/// Imports staged at once (`registry::transfer`), and what they weigh in all (checkpoints and
/// configs, which every node holds in memory and in its snapshots until the commit): room for
/// a subtree of 1,000 agents with 256 KiB checkpoints and a large config each, twice.
pub const MAX_STAGED_IMPORTS: usize = 4;
pub const MAX_IMPORT_BYTES: usize = 768 * 1024 * 1024;
/// Items of one import, and so of one export (an export larger than an import takes is
/// refused). An import's commit creates them in steps of `APPLY_STEP_AGENTS`.
pub const MAX_IMPORT_AGENTS: usize = 100_000;
pub const MAX_IMPORT_SUPERVISORS: usize = 10_000;
/// A staged import with no page for this long is dropped.
pub const IMPORT_TTL_SECS: i64 = 600;
/// What an item of a subtree document weighs besides its config and checkpoint.
pub const IMPORT_ITEM_OVERHEAD_BYTES: usize = 256;
/// About the JSON bytes of one page of an export: with base64 a 256 KiB checkpoint takes
/// 342 KiB, so one always fits, and a page stays under NATS's 1 MiB `max_payload`.
pub const EXPORT_PAGE_BYTES: usize = 512 * 1024;
/// About the MessagePack bytes of one `import_page` the Rust client sends (checkpoints travel
/// as `bin`): a page always holds one item, and one item always fits a request.
pub const IMPORT_PAGE_BYTES: usize = 256 * 1024;
/// Exports a leader holds at once, each its copy of the subtree's records (shared, not
/// copied, until the registry changes them), for `EXPORT_TTL_MS` after its last page.
pub const EXPORT_SESSIONS: usize = 8;
pub const EXPORT_TTL_MS: u64 = 120_000;

/// Waits one node runs at once (`spawn_agent {wait: "running"}` and `wait_agent`); past it,
/// a spawn is answered `timeout` at once (it is kept), a `wait_agent` `unavailable`. A waiter holds a command permit too, so this
/// keeps most of them (`MAX_COMMANDS_IN_FLIGHT`) for other commands.
pub const SPAWN_WAITERS: usize = 1_024;
const _: () = assert!(SPAWN_WAITERS * 4 <= MAX_COMMANDS_IN_FLIGHT);

/// Questions about its instances waiting for a node's host (`get_agent_metrics`,
/// `get_supervisor_metrics`, `node_metrics`); past it, `unavailable`. Each is answered in one
/// turn of the host's loop, a walk over every instance one chunk per question.
pub const HOST_QUERY_QUEUE: usize = 64;
/// Figure queries (`get_supervisor_metrics`, `node_metrics`) one node walks its instances for
/// at once; past it, `unavailable`.
pub const FIGURE_WALKS: usize = 4;
/// `get_agent_metrics` one node answers at once, and `get_supervisor_metrics` it gathers
/// from every node at once; past them, `unavailable`.
pub const FIGURE_ASKS: usize = 16;
pub const FIGURE_FANOUTS: usize = 4;
/// `node_metrics` lists at most this many busiest agents.
pub const NODE_METRICS_TOP: usize = 100;

/// Applied entries whose apply times a traced node keeps, for the `committed` and `applied`
/// spans of the commands it proposed (`raft::store::ApplyTimes`); a proposal is looked up
/// right after its entry applied, so only the last few are ever asked for.
pub const APPLY_TIMES: usize = 256;

/// History queries (`agent_history`, `supervisor_history`) one node runs at once, each an
/// ephemeral consumer on the stream; past it, `unavailable`.
pub const HISTORY_READERS: usize = 16;
/// A history query answers at most this many events (`limit`; default
/// `HISTORY_DEFAULT_LIMIT`)...
pub const HISTORY_MAX_LIMIT: usize = 1_000;
pub const HISTORY_DEFAULT_LIMIT: usize = 100;
/// ...and reads at most this many from the stream (the answer is then `partial`).
pub const HISTORY_SCAN: usize = 20_000;
const _: () = assert!(HISTORY_SCAN >= 8 * HISTORY_MAX_LIMIT);
const _: () = assert!(MAX_START_FAILURES >= MAX_GROUP as usize);

/// What a report costs in MessagePack besides its error: an id, a node, an epoch, a status, a
/// count and field names.
pub const REPORT_OVERHEAD_BYTES: usize = 96;

/// Reports (or hand-offs) sent in one command: one Raft entry.
pub const REPORTS_PER_WRITE: usize = 1_000;
// A full batch of reports with the longest errors is still one request.
const _: () = assert!(
    REPORTS_PER_WRITE * (MAX_REPORT_ERROR_BYTES + REPORT_OVERHEAD_BYTES) <= MAX_REQUEST_BYTES
);

/// Log lines agents sent that wait to be published; past this a line is dropped, as logging
/// must never block an agent.
pub const AGENT_LOG_QUEUE: usize = 4 * 1024;

/// Forgets and hand-offs waiting for the report writer: the host waits when this is full (a
/// leaderless cluster), which bounds them without dropping any.
pub const HOST_WRITE_QUEUE: usize = 16 * 1024;

/// Tries of a hand-off while the cluster has no leader (with backoff up to 1 s: about five
/// minutes); past them the agent stays `migrating` and fails over from its last checkpoint if
/// its node is lost.
pub const HANDOFF_TRIES: usize = 300;

/// Tries to forget a temporary agent that ended, with backoff up to 2 s.
pub const FORGET_TRIES: usize = 10;

// ---- The rest of a node ----

/// Events waiting for the publisher; beyond this a batch is dropped with a warning rather
/// than slowing down `apply`.
pub const EVENT_QUEUE: usize = 4 * 1024;

/// Appends waiting for the log's group-commit flusher; `append` waits when it is full.
pub const FLUSH_QUEUE: usize = 1024;

/// How long a log purge waits for the snapshot that covers it to be stored (an install still
/// running in the state machine's task) before it gives up with a storage error.
pub const PURGE_WAITS_FOR_SNAPSHOT_MS: u64 = 60_000;

/// Room left in a NATS message for headers and framing around a Raft RPC body.
pub const RAFT_FRAMING_BYTES: usize = 4 * 1024;

// ---- The Rust client ----

/// First wait for one attempt of an agent call before it is tried again (same call id); it
/// doubles with every unanswered attempt up to `CALL_ATTEMPT_MAX_MS`.
pub const CALL_ATTEMPT_FIRST_MS: u64 = 10;
pub const CALL_ATTEMPT_MAX_MS: u64 = 1_000;

/// Longest pause between retries of an agent call that was refused as `unavailable`.
pub const CALL_RETRY_MAX_MS: u64 = 4;

/// Longest wait for one attempt of a read before it is tried again.
pub const READ_ATTEMPT_MS: u64 = 1_500;
