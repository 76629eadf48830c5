//! The session queue: owns every task's state machine, from Queued to Completed (or Failed,
//! Cancelled, Ended). It picks miners through the node pool, follows their acks, precommits
//! and reveals against stage deadlines, replaces miners that miss one (a bounded number of
//! times, lowering their reputation), checks each reveal against its precommitted hash, asks
//! the validators for a verdict, settles payment through the chain bridge, and tells
//! subscribers. Every transition is written to the store; the store is flushed before a task is
//! acknowledged to its client and before its end is reported.
//!
//! Writes are coalesced: a transition marks its task dirty, and dirty tasks are written at every
//! tick and before every flush, which is what a crash could observe either way. Flushes go to the
//! store's flusher thread (group commit), so the queue never blocks on the disk.

use super::chain_bridge::{ChainBridge, Settle};
use super::messages::{MinerReport, Probe, ReportKind, TaskEvent, ToMiner, NETWORK_SESSION};
use super::node_pool::{
    ListNodes, NodePool, ObservedSpeed, ProbeFinished, RecordOutcome, Release, SelectMiners,
    Selection,
};
use super::peer_routers::PeerEvent;
use super::report_signing;
use super::validator::{gather_evidence, Validate, Validator};
use crate::config::QueueConfig;
use crate::history::{History, Operation, Recorder};
use crate::models::engine::GenerateRequest;
use crate::reputation::{Outcome, Stage};
use crate::store::{Store, StoreError};
use crate::task::{
    now_ms, Assignment, AssignmentState, FailureCause, SettlementDue, TaskKey, TaskOutcome,
    TaskRecord, TaskResult, TaskState,
};
use crate::validation::consensus::{
    decide, Consensus, DisagreementPolicy, Evidence, Levels, ValidationPlan,
};
use actix::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Capacity of each subscriber's channel; token events beyond it are dropped for that
/// subscriber (the final record, which carries the whole text, always arrives).
pub const SUBSCRIBER_CAPACITY: usize = 1024;

/// The longest error text a miner's failure or refusal keeps; a longer one is cut to this
/// (on a character boundary) and marked as cut.
pub const MAX_REPORT_ERROR_BYTES: usize = 1024;

/// The latest a deadline may lie: a duration from a stored or a peer's record that would
/// overflow the clock counts as this long.
const FAR_FUTURE: Duration = Duration::from_secs(365 * 24 * 3600);

/// The instant `after` from now, or [`FAR_FUTURE`] from now when that overflows the clock.
fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + FAR_FUTURE.min(after))
}

/// Why a report's content is out of bounds (a token index or a result past the task's
/// `max_tokens`, a precommit that is no keccak256 hash), if it is. Reports are bounded before any
/// arithmetic on them: whatever a miner sends, nothing here overflows.
fn out_of_bounds(kind: &ReportKind, max_tokens: usize) -> Option<String> {
    match kind {
        ReportKind::Token { index, .. } if *index >= max_tokens => Some(format!(
            "token index {index} is past the task's max_tokens {max_tokens}"
        )),
        ReportKind::Precommit { hash } if !is_commitment_hex(hash) => Some(format!(
            "a precommit of {} bytes is not 0x and 64 hex digits",
            hash.len()
        )),
        ReportKind::Commit { result } if result.token_ids.len() > max_tokens => Some(format!(
            "a result of {} tokens is over the task's max_tokens {max_tokens}",
            result.token_ids.len()
        )),
        _ => None,
    }
}

/// `0x` and 64 hex digits: a keccak256 hash as `TaskResult::commitment_hex` writes it.
fn is_commitment_hex(hash: &str) -> bool {
    hash.len() == 66 && hash.starts_with("0x") && hash[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Cuts a miner's error text to [`MAX_REPORT_ERROR_BYTES`].
fn bounded_error(mut error: String) -> String {
    if error.len() > MAX_REPORT_ERROR_BYTES {
        let mut end = MAX_REPORT_ERROR_BYTES;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
        error.push_str("… (cut)");
    }
    error
}

/// Someone following a task: gets its end, and with `live` also its states and tokens.
#[derive(Clone, Debug)]
pub struct Subscriber {
    pub events: mpsc::Sender<TaskEvent>,
    pub live: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue holds {0} tasks, its limit; try again shortly")]
    Full(usize),
    #[error("task {0} does not exist")]
    NoSuchTask(TaskKey),
    #[error("the router is shutting down; try again once it is back")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything a new task needs; the router fills it from the session and the request.
pub struct NewTask {
    pub session_id: u64,
    /// From `ReserveTaskId`: the key its hold was made under.
    pub task_id: u64,
    pub owner: String,
    pub model: String,
    pub placement: crate::task::Placement,
    pub request: GenerateRequest,
    pub redundancy: u32,
    pub validators: u32,
    pub max_replacements: u32,
    pub timeout: Duration,
    pub precommit_timeout: Duration,
    pub client_reference: Option<String>,
    pub hold: u64,
    /// Derive the sampling seed from (session, task), so honest miners agree exactly.
    pub derive_seed: bool,
    /// Record every stage on chain (the session's `task_record: per_stage`).
    pub record_stages: bool,
    pub validation: ValidationPlan,
}

/// The next task id of a session, for a task about to be held for and enqueued. An id
/// reserved and never enqueued stays unused.
#[derive(Message)]
#[rtype(result = "Result<TaskKey, QueueError>")]
pub struct ReserveTaskId(pub u64);

#[derive(Message)]
#[rtype(result = "Result<TaskKey, QueueError>")]
pub struct Enqueue {
    pub task: NewTask,
    pub subscriber: Option<Subscriber>,
}

#[derive(Message)]
#[rtype(result = "Result<TaskRecord, QueueError>")]
pub struct CancelTask(pub TaskKey);

#[derive(Message)]
#[rtype(result = "Result<Option<TaskRecord>, QueueError>")]
pub struct GetTask(pub TaskKey);

/// Follow a task: its events from now on (a finished task answers with its record at once).
#[derive(Message)]
#[rtype(result = "Result<(), QueueError>")]
pub struct Subscribe {
    pub key: TaskKey,
    pub subscriber: Subscriber,
}

#[derive(Message)]
#[rtype(result = "QueueStats")]
pub struct GetStats;

/// Stop: flush the store and make no transition after this (live tasks stay as they are
/// written and resume on the next start).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// A task a peer router accepted and did not end before it died: run it here.
#[derive(Message)]
#[rtype(result = "Result<(), QueueError>")]
pub struct Adopt(pub Box<TaskRecord>);

/// A remote validator is ready: it is asked like the local ones from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JoinValidator {
    pub id: String,
    pub validator: Recipient<Validate>,
}

/// A remote validator's connection is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaveValidator {
    pub id: String,
}

/// Where validators are asked now (`/api/v1/validate` asks them too).
#[derive(Message)]
#[rtype(result = "Vec<Recipient<Validate>>")]
pub struct GetValidators;

/// A remote miner's connection is gone: its tasks go to other miners now rather than at their
/// next deadline.
#[derive(Message)]
#[rtype(result = "()")]
pub struct NodeLost {
    pub miner: String,
}

/// Counters for /metrics and /status.
#[derive(Clone, Debug, Default)]
pub struct QueueStats {
    /// Validators asked now (local and remote).
    pub validators: usize,
    /// Live tasks by state.
    pub live: BTreeMap<&'static str, u64>,
    /// Tasks that ended, by final state.
    pub ended: BTreeMap<&'static str, u64>,
    /// Per stage: (count, sum of seconds, histogram counts for STAGE_BUCKETS_S).
    pub stages: BTreeMap<&'static str, StageStats>,
    pub tokens_generated: u64,
    pub decode_tokens_per_second: f64,
    pub replacements: u64,
    pub rejected_reveals: u64,
    /// Reports refused for their signature (unsigned, forged, replayed) or their content
    /// (out of bounds).
    pub rejected_reports: u64,
    /// Network tasks (probes of nodes) that ended, passed or not; they count nowhere else.
    pub network_tasks: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Default)]
pub struct StageStats {
    pub count: u64,
    pub sum_s: f64,
    pub buckets: Vec<u64>,
}

/// Histogram buckets for stage latencies, in seconds.
pub const STAGE_BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// How long the validators may take before the task fails (Cortensor's embedding batches
/// time out after 60 s).
pub const VALIDATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What an ended task's settlement carries, kept for its retries.
struct PendingSettlement {
    hold: u64,
    charge: u64,
    payees: Vec<String>,
    trace: Option<crate::chain::TaskTrace>,
}

struct LiveTask {
    record: TaskRecord,
    subscribers: Vec<Subscriber>,
    miners: HashMap<String, Recipient<ToMiner>>,
    /// The registered key address of each miner assigned: its reports must be signed by it.
    addresses: HashMap<String, ethers::types::Address>,
    /// Per active miner: when its next step (ack, precommit, reveal) is due.
    deadlines: HashMap<String, Instant>,
    /// Miners still wanted at once: the redundancy, less those lost with no replacement left.
    wanted: u32,
    stage_started: Instant,
    created: Instant,
    /// When the whole task must have ended.
    deadline: Instant,
    /// A pool selection is in flight.
    selecting: bool,
    /// No miner could be found since this moment.
    starved_since: Option<Instant>,
    revealed: bool,
    validating: bool,
    finishing: bool,
    /// The miner whose tokens are streamed, and how many tokens went out.
    stream_source: Option<String>,
    streamed_tokens: usize,
    /// Validators whose evidence decided the task: paid alongside the accepted miners.
    paid_validators: Vec<String>,
}

impl LiveTask {
    fn new(record: TaskRecord, timeout: Duration) -> Self {
        let wanted = record.redundancy;
        Self {
            record,
            subscribers: Vec::new(),
            miners: HashMap::new(),
            addresses: HashMap::new(),
            deadlines: HashMap::new(),
            wanted,
            stage_started: Instant::now(),
            created: Instant::now(),
            deadline: deadline_after(timeout),
            selecting: false,
            starved_since: None,
            revealed: false,
            validating: false,
            finishing: false,
            stream_source: None,
            streamed_tokens: 0,
            paid_validators: Vec::new(),
        }
    }

    /// Tells every active miner to stop (marking its assignment Dropped with `note`, when
    /// given); the miners, for the pool to release.
    fn stop_active(&mut self, note: Option<String>) -> Vec<String> {
        let key = self.record.key;
        let mut stopped = Vec::new();
        for a in self
            .record
            .assignments
            .iter_mut()
            .filter(|a| a.state.is_active())
        {
            if let Some(note) = &note {
                a.state = AssignmentState::Dropped;
                a.note = Some(note.clone());
            }
            if let Some(addr) = self.miners.get(&a.miner) {
                addr.do_send(ToMiner::Cancel { key });
            }
            stopped.push(a.miner.clone());
        }
        stopped
    }

    fn active_count(&self) -> u32 {
        self.record.active().count() as u32
    }

    fn publish(&mut self, event: TaskEvent) {
        self.subscribers.retain(|s| !s.events.is_closed());
        for s in self.subscribers.iter().filter(|s| s.live) {
            let _ = s.events.try_send(event.clone());
        }
    }
}

pub struct SessionQueue {
    config: QueueConfig,
    price_per_token: u64,
    store: Store,
    pool: Addr<NodePool>,
    chain: Addr<ChainBridge>,
    /// Local validators, then remote ones as they join: (id, where to ask).
    validators: Vec<(String, Recipient<Validate>)>,
    next_validator: usize,
    live: HashMap<TaskKey, LiveTask>,
    /// Live tasks changed since they were last written.
    dirty: std::collections::HashSet<TaskKey>,
    /// Keys of miners whose signatures checked before (their later reports cost half).
    signer_keys: report_signing::SignerKeys,
    stats: QueueStats,
    /// How network tasks (probes of new and released nodes) are validated.
    probe_validation: Levels,
    probes_started: u64,
    /// Ended tasks whose final record could not be written yet: retried every tick, and read
    /// from here meanwhile (an end is never forgotten because a write failed).
    unwritten_ends: HashMap<TaskKey, (TaskRecord, Vec<Subscriber>)>,
    /// Ended tasks whose end (with its settlement due) is not written yet: no settlement
    /// before it is.
    ends_to_write: std::collections::HashSet<TaskKey>,
    history: Recorder,
    /// The last assignment nonce given; starts from the clock, so nonces stay unique across
    /// restarts.
    nonces: u64,
    /// Where this router's task ids start (`config::task_id_base` of its instance).
    task_id_base: u64,
    /// The peer routers, told of each task accepted and ended (they run it if we die).
    peers: Option<Recipient<PeerEvent>>,
    /// Shutting down: no new task, no transition; tasks waiting for their acknowledgment get
    /// it before the queue stops.
    stopping: bool,
}

/// Longest pause between attempts to settle a task whose settlement failed (the task stays
/// live meanwhile, so the queue's capacity bounds how many wait).
pub const MAX_SETTLE_BACKOFF: Duration = Duration::from_secs(5);

/// What network tasks ask (short, factual, answered greedily): a node that runs the model it
/// claims reproduces the validators' replay.
pub const COGNITIVE_PROMPTS: [&str; 4] = [
    "What is the capital of France?",
    "Name the largest planet in the solar system.",
    "What is 7 times 8?",
    "Which gas do plants absorb from the air?",
];
/// Tokens a network task generates.
pub const PROBE_MAX_TOKENS: usize = 8;

/// Whether a live task's generation goes on after `result` was accepted for its chunk.
fn task_continues(task: Option<&LiveTask>, result: &TaskResult) -> bool {
    task.is_some_and(|t| !t.finishing && t.record.continues_after(result))
}

/// The sampling seed of a task: the same for every miner, different for every task.
pub fn task_seed(key: TaskKey) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.session_id.to_be_bytes());
    bytes[8..].copy_from_slice(&key.task_id.to_be_bytes());
    let hash = ethers::utils::keccak256(bytes);
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// What the signature check found out about a report.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Authenticated {
    /// Its signature was checked, or it needs none (see `SessionQueue::check_signature`).
    Checked,
    /// A reveal that matches its assignment's precommitted hash (authenticated by it).
    RevealMatchingPrecommit,
}

impl SessionQueue {
    pub fn new(
        config: QueueConfig,
        price_per_token: u64,
        store: Store,
        pool: Addr<NodePool>,
        chain: Addr<ChainBridge>,
        validators: Vec<Addr<Validator>>,
    ) -> Self {
        Self {
            config,
            price_per_token,
            store,
            pool,
            chain,
            validators: validators
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("validator-{}", i + 1), v.recipient()))
                .collect(),
            next_validator: 0,
            live: HashMap::new(),
            dirty: Default::default(),
            signer_keys: report_signing::SignerKeys::default(),
            stats: QueueStats::default(),
            probe_validation: Levels::default(),
            probes_started: 0,
            unwritten_ends: HashMap::new(),
            ends_to_write: Default::default(),
            history: Recorder::default(),
            nonces: now_ms() << 20,
            task_id_base: 0,
            peers: None,
            stopping: false,
        }
    }

    /// Records what the queue does into `history` (fault-injection tests check invariants
    /// over it).
    /// Shares the chain with other routers: task ids from `base`, and the peers told of
    /// every task accepted and ended.
    pub fn with_peers(mut self, base: u64, peers: Option<Recipient<PeerEvent>>) -> Self {
        self.task_id_base = base;
        self.peers = peers;
        self
    }

    pub fn with_history(mut self, history: Option<History>) -> Self {
        self.history = Recorder::new(history);
        self
    }

    /// Network tasks are validated with `levels` (the testnet asks for `likelihood` when its
    /// validators run the model; the default, `exact`, accepts any answer of the node).
    pub fn with_probe_validation(mut self, levels: Levels) -> Self {
        self.probe_validation = levels;
        self
    }

    /// Writes a task's record; false (and logged) when the store refused it.
    fn write(&self, record: &TaskRecord) -> bool {
        match self.store.put_task(record) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(task = %record.key, error = %e, "cannot write the task; retrying at the next tick");
                false
            }
        }
    }

    /// Writes every live task changed since its last write, and every end not yet written;
    /// what the store refuses stays due for the next tick.
    fn write_dirty(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            if let Some(task) = self.live.get(&key) {
                if !self.write(&task.record) {
                    self.dirty.insert(key);
                }
            }
        }
        let ends: Vec<TaskKey> = self.unwritten_ends.keys().copied().collect();
        for key in ends {
            if self.write(&self.unwritten_ends[&key].0) {
                let (record, subscribers) = self.unwritten_ends.remove(&key).expect("listed");
                self.announce_end(record, subscribers);
            }
        }
    }

    fn record_stage(&mut self, stage: &'static str, elapsed: Duration) {
        let s = self
            .stats
            .stages
            .entry(stage)
            .or_insert_with(|| StageStats {
                buckets: vec![0; STAGE_BUCKETS_S.len()],
                ..Default::default()
            });
        let secs = elapsed.as_secs_f64();
        s.count += 1;
        s.sum_s += secs;
        for (i, b) in STAGE_BUCKETS_S.iter().enumerate() {
            if secs <= *b {
                s.buckets[i] += 1;
            }
        }
    }

    /// Moves a live task to `state`: persisted, timed per stage, told to subscribers.
    fn transition(&mut self, key: TaskKey, state: TaskState) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        let previous = task.record.state;
        // An ending task's state is its end's (set by `finish`): nothing late moves it.
        if previous == state || task.finishing {
            return;
        }
        let elapsed = task.stage_started.elapsed();
        task.record.state = state;
        task.stage_started = Instant::now();
        task.publish(TaskEvent::State(state));
        self.dirty.insert(key);
        self.history.record(|| Operation::Transition {
            key,
            from: previous,
            to: state,
        });
        self.record_stage(previous.name(), elapsed);
    }

    /// Asks the pool for as many miners as the task lacks.
    fn fill(&mut self, key: TaskKey, ctx: &mut Context<Self>) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        if task.selecting || task.revealed || task.finishing {
            return;
        }
        let active = task.active_count();
        if active >= task.wanted {
            return;
        }
        task.selecting = true;
        let exclude = task
            .record
            .round()
            .filter(|a| a.state != AssignmentState::Dropped)
            .map(|a| a.miner.clone())
            .collect();
        let select = SelectMiners {
            model: task.record.model.clone(),
            placement: task.record.placement.clone(),
            count: (task.wanted - active) as usize,
            exclude,
        };
        ctx.spawn(
            self.pool.send(select).into_actor(self).map(
                move |selection, queue, ctx| match selection {
                    Ok(selection) => queue.assign(key, selection, ctx),
                    Err(e) => {
                        tracing::error!(task = %key, error = %e, "the node pool did not answer");
                        if let Some(t) = queue.live.get_mut(&key) {
                            t.selecting = false;
                        }
                    }
                },
            ),
        );
    }

    fn assign(&mut self, key: TaskKey, selection: Selection, ctx: &mut Context<Self>) {
        let ack_timeout = self.config.ack_timeout();
        let usable = self
            .live
            .get(&key)
            .is_some_and(|t| !t.finishing && !t.revealed);
        if !usable {
            // The task ended or moved on while we waited: give the miners back.
            let miners = selection.miners.into_iter().map(|m| m.0).collect();
            self.pool.do_send(Release { miners });
            return;
        }
        let task = self.live.get_mut(&key).expect("checked above");
        task.selecting = false;
        if selection.miners.is_empty() {
            let since = *task.starved_since.get_or_insert_with(Instant::now);
            let active = task.active_count();
            if selection.eligible == 0 && active > 0 {
                // Nobody else could take the place: go on with the miners it has.
                task.wanted = active;
                self.advance(key, ctx);
            } else if selection.eligible == 0
                && since.elapsed() >= ack_timeout
                && task.record.resumed == 0
                && task.record.spans.is_empty()
            {
                // A new task nobody can take is refused quickly (503). A task accepted before
                // a restart (or taken over from a dead router), or one with chunks accepted
                // already, waits for miners to come back, up to its own deadline: the network
                // owes it an answer.
                let model = task.record.model.clone();
                task.record.cause = Some(FailureCause::NoMiners);
                let error = format!("no miner serving model {model} is available");
                self.finish(key, TaskState::Failed, None, Some(error), ctx);
            }
            return;
        }
        task.starved_since = None;
        let now = now_ms();
        // Miners send their tokens only when somebody follows the task live.
        let stream_tokens = task.subscribers.iter().any(|s| s.live);
        // A chunked task's miners continue from the output accepted so far.
        let request = task.record.chunk_request();
        let chunk = task.record.chunk();
        for (miner, addr, address) in selection.miners {
            self.nonces += 1;
            let nonce = self.nonces;
            task.record
                .assignments
                .push(Assignment::new(miner.clone(), now, nonce, chunk));
            task.deadlines
                .insert(miner.clone(), Instant::now() + ack_timeout);
            addr.do_send(ToMiner::Assign {
                key,
                nonce,
                request: request.clone(),
                stream_tokens,
            });
            task.addresses.insert(miner.clone(), address);
            task.miners.insert(miner, addr);
        }
        if task.record.state == TaskState::Queued {
            self.transition(key, TaskState::Assigned);
        } else {
            self.dirty.insert(key);
        }
        self.advance(key, ctx);
    }

    /// Moves the task forward as far as its assignments allow.
    fn advance(&mut self, key: TaskKey, ctx: &mut Context<Self>) {
        let Some(task) = self.live.get(&key) else {
            return;
        };
        if task.finishing || task.validating || task.selecting {
            return;
        }
        let active: Vec<&Assignment> = task.record.active().collect();
        if task.revealed {
            if !active.is_empty() {
                return;
            }
            if task.record.round_committed() {
                self.transition(key, TaskState::Committed);
                self.validate(key, ctx);
            } else {
                let error = "no miner revealed a result matching its precommit".to_string();
                self.finish(key, TaskState::Failed, None, Some(error), ctx);
            }
            return;
        }
        if task.wanted == 0 {
            let error = format!(
                "every assigned miner failed or missed a deadline ({} replacements)",
                task.record.replacements
            );
            self.finish(key, TaskState::Failed, None, Some(error), ctx);
            return;
        }
        if (active.len() as u32) < task.wanted {
            return; // waiting for the pool
        }
        let all_precommitted = active
            .iter()
            .all(|a| a.state == AssignmentState::Precommitted);
        let all_acked = active.iter().all(|a| a.state != AssignmentState::Assigned);
        let state = task.record.state;
        if all_precommitted {
            if state == TaskState::Assigned {
                self.transition(key, TaskState::Acked);
            }
            self.transition(key, TaskState::Precommitted);
            self.reveal(key);
        } else if all_acked && state == TaskState::Assigned {
            self.transition(key, TaskState::Acked);
        }
    }

    /// Asks every precommitted miner to reveal.
    fn reveal(&mut self, key: TaskKey) {
        let commit_deadline = deadline_after(self.config.commit_timeout());
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        task.revealed = true;
        let miners: Vec<String> = task.record.active().map(|a| a.miner.clone()).collect();
        for miner in miners {
            task.deadlines.insert(miner.clone(), commit_deadline);
            if let Some(addr) = task.miners.get(&miner) {
                addr.do_send(ToMiner::Reveal { key });
            }
        }
    }

    /// Takes a miner off a task (a missed deadline, a failure, a wrong reveal) and, while the
    /// replacement budget lasts and the precommit stage is open, asks for another.
    fn remove_miner(
        &mut self,
        key: TaskKey,
        miner: &str,
        state: AssignmentState,
        note: String,
        outcome: Outcome,
        ctx: &mut Context<Self>,
    ) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        let Some(a) = task.record.assignment_mut(miner) else {
            return;
        };
        if !a.state.is_active() {
            return;
        }
        tracing::info!(task = %key, %miner, %note, "miner taken off the task");
        a.state = state;
        a.note = Some(note);
        task.deadlines.remove(miner);
        if let Some(addr) = task.miners.get(miner) {
            addr.do_send(ToMiner::Cancel { key });
        }
        if task.stream_source.as_deref() == Some(miner) {
            task.stream_source = None;
        }
        let replaceable = !task.revealed && task.record.replacements < task.record.max_replacements;
        if replaceable {
            task.record.replacements += 1;
            self.stats.replacements += 1;
        } else {
            task.wanted = task.wanted.saturating_sub(1);
        }
        self.dirty.insert(key);
        self.pool.do_send(Release {
            miners: vec![miner.to_string()],
        });
        self.pool.do_send(RecordOutcome {
            miner: miner.to_string(),
            outcome,
            tokens: 0,
        });
        self.fill(key, ctx);
        self.advance(key, ctx);
    }

    fn validate(&mut self, key: TaskKey, ctx: &mut Context<Self>) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        task.validating = true;
        let results: Vec<(String, TaskResult)> = task
            .record
            .round()
            .filter(|a| a.state == AssignmentState::Committed)
            .filter_map(|a| a.result.clone().map(|r| (a.miner.clone(), r)))
            .collect();
        let plan = task.record.validation_plan();
        let ask = Validate {
            key,
            // A chunk is checked as what it is: a continuation of the accepted output.
            request: task.record.chunk_request(),
            results: results.clone(),
            plan: plan.clone(),
            seeded: true,
        };
        let validators: Vec<Recipient<Validate>> =
            self.validators.iter().map(|(_, v)| v.clone()).collect();
        let evidence = gather_evidence(
            &validators,
            task.record.validators as usize,
            &mut self.next_validator,
            ask,
            VALIDATION_TIMEOUT,
        );
        let reputations =
            (plan.consensus == Consensus::ReputationWeighted).then(|| self.pool.send(ListNodes));
        let gather = async move {
            let evidence: Vec<Evidence> = evidence.await;
            let reputation: HashMap<String, i64> = match reputations {
                Some(nodes) => nodes
                    .await
                    .map(|nodes| nodes.into_iter().map(|n| (n.id, n.reputation)).collect())
                    .unwrap_or_default(),
                None => HashMap::new(),
            };
            (results, evidence, reputation)
        };
        ctx.spawn(gather.into_actor(self).map(
            move |(results, evidence, reputation), queue, ctx| {
                queue.on_evidence(key, results, evidence, reputation, ctx);
            },
        ));
    }

    /// Decides on a task's results from the validators' evidence (`validation::consensus`),
    /// moves reputations, and ends the task.
    fn on_evidence(
        &mut self,
        key: TaskKey,
        results: Vec<(String, TaskResult)>,
        evidence: Vec<Evidence>,
        reputation: HashMap<String, i64>,
        ctx: &mut Context<Self>,
    ) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        if task.finishing {
            // It ended while its validators worked (cancelled, timed out): the verdict is moot.
            return;
        }
        let plan = task.record.validation_plan();
        let decision = decide(&results, &evidence, &plan, &reputation);
        // Tokens before this chunk were accepted (and counted) with the chunks before.
        let earlier = task.record.accepted_tokens().len();
        // One verdict per result, in the results' order.
        for (m, (_, result)) in decision.miners.iter().zip(&results) {
            let (outcome, tokens) = if m.accepted {
                (
                    Outcome::Accepted,
                    result.completion_tokens().saturating_sub(earlier) as u64,
                )
            } else if m.valid && !decision.consensus {
                continue; // valid, in a split vote: nothing shows it was wrong
            } else {
                (Outcome::Rejected, 0)
            };
            self.pool.do_send(RecordOutcome {
                miner: m.miner.clone(),
                outcome,
                tokens,
            });
            // Its speed as the router saw it: tokens from its ack to its precommit.
            let span = task
                .record
                .round()
                .find(|a| a.miner == m.miner)
                .and_then(|a| Some(a.precommitted_at_ms?.saturating_sub(a.acked_at_ms?)));
            if let (Some(ms), true) = (span, m.accepted && tokens > 0) {
                self.pool.do_send(ObservedSpeed {
                    miner: m.miner.clone(),
                    tokens_per_second: tokens as f64 * 1000.0 / ms.max(1) as f64,
                });
            }
        }
        let validators: Vec<String> = evidence
            .iter()
            .filter(|e| e.errors.is_empty())
            .map(|e| e.validator.clone())
            .collect();
        let chosen = decision.chosen;
        let alternatives = if !decision.consensus && plan.policy == DisagreementPolicy::ReturnAll {
            results.clone()
        } else {
            vec![]
        };
        let (agreeing, disagreeing) = (decision.accepted_miners(), decision.rejected_miners());
        let reasons = decision.reasons.join("; ");
        task.record.decision = Some(decision);
        task.paid_validators = validators;
        let Some(chosen) = chosen else {
            if self.retry_chunk(key, &disagreeing, ctx) {
                return;
            }
            let error = format!("validation failed: {reasons}");
            self.finish(key, TaskState::Failed, None, Some(error), ctx);
            return;
        };
        let result = results[chosen].1.clone();
        self.transition(key, TaskState::Validated);
        if task_continues(self.live.get(&key), &result) {
            self.next_chunk(key, result, agreeing, ctx);
            return;
        }
        if let Some(task) = self.live.get_mut(&key) {
            // The record shows who made which part of the output (one span unless chunked).
            let validators = task.paid_validators.clone();
            task.record
                .push_span(result.token_ids.len(), agreeing.clone(), validators);
        }
        let outcome = TaskOutcome {
            result,
            agreeing,
            disagreeing,
            alternatives,
        };
        self.finish(key, TaskState::Completed, Some(outcome), None, ctx);
    }

    /// A chunk was accepted and the generation goes on: the chunk becomes a span of the
    /// record, and a new round asks miners to continue from the output accepted so far.
    fn next_chunk(
        &mut self,
        key: TaskKey,
        result: TaskResult,
        miners: Vec<String>,
        ctx: &mut Context<Self>,
    ) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        let record = &mut task.record;
        // The accepted output is kept once; the round's own results are superseded by the
        // next chunk's (which hold every token before it). Precommits stay.
        for a in record.round_mut() {
            a.result = None;
        }
        let validators = std::mem::take(&mut task.paid_validators);
        record.push_span(result.token_ids.len(), miners, validators);
        tracing::debug!(task = %key, chunk = record.chunk(), tokens = result.token_ids.len(), "chunk accepted; continuing");
        record.accepted = Some(result);
        self.begin_round(key, ctx);
    }

    /// A chunk of a chunked generation had no accepted result: while the replacement budget
    /// lasts, the chunk runs again on other miners (those rejected are not asked again),
    /// from the same accepted output. False when the task cannot go on that way.
    fn retry_chunk(&mut self, key: TaskKey, rejected: &[String], ctx: &mut Context<Self>) -> bool {
        let Some(task) = self.live.get_mut(&key) else {
            return false;
        };
        let record = &mut task.record;
        let cost = rejected.len().max(1) as u32;
        if !record.is_chunked() || record.replacements + cost > record.max_replacements {
            return false;
        }
        record.replacements += cost;
        self.stats.replacements += cost as u64;
        for a in record
            .round_mut()
            .filter(|a| a.state == AssignmentState::Committed)
        {
            if rejected.contains(&a.miner) {
                a.state = AssignmentState::Rejected;
                a.note = Some("validation rejected its result".into());
            } else {
                a.state = AssignmentState::Dropped;
                a.note = Some("its chunk had no accepted result; run again".into());
            }
        }
        tracing::info!(task = %key, chunk = record.chunk(), "no result accepted for the chunk; running it again");
        task.paid_validators.clear();
        self.begin_round(key, ctx);
        true
    }

    /// Starts a round of the task's current chunk: back to Queued, asking the pool for
    /// miners afresh.
    fn begin_round(&mut self, key: TaskKey, ctx: &mut Context<Self>) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        task.revealed = false;
        task.validating = false;
        task.stream_source = None;
        task.deadlines.clear();
        task.starved_since = None;
        task.wanted = task.record.redundancy;
        self.dirty.insert(key);
        self.transition(key, TaskState::Queued);
        self.fill(key, ctx);
    }

    /// Ends a task: stops its miners, settles its hold, persists and flushes the final record,
    /// then tells its subscribers.
    fn finish(
        &mut self,
        key: TaskKey,
        state: TaskState,
        outcome: Option<TaskOutcome>,
        error: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let price = self.price_per_token;
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        if task.finishing {
            return;
        }
        task.finishing = true;
        let released = task.stop_active(Some(format!("the task ended ({})", state.name())));
        let tokens = match (&outcome, state) {
            (Some(o), TaskState::Completed) => o.result.completion_tokens(),
            (_, TaskState::Cancelled) => task.streamed_tokens,
            _ => 0,
        };
        let charge = (tokens as u64)
            .saturating_mul(task.record.redundancy as u64)
            .saturating_mul(price)
            .min(task.record.hold);
        // The accepted miners, and the validators whose evidence decided it; for a task
        // cancelled mid-stream, the miners that were working on it (they made the tokens the
        // client is charged for).
        let mut payees = match (&outcome, state) {
            (Some(o), _) => o.agreeing.clone(),
            (None, TaskState::Cancelled) => released.clone(),
            (None, _) => Vec::new(),
        };
        if outcome.is_some() && !payees.is_empty() {
            payees.extend(task.paid_validators.iter().cloned());
        }
        // A chunked generation's earlier chunks were made and checked by others too.
        if !payees.is_empty() {
            for p in task.record.span_payees() {
                if !payees.contains(&p) {
                    payees.push(p);
                }
            }
        }
        // Money spent is money earned: with nobody to pay, nothing is charged.
        let charge = if payees.is_empty() { 0 } else { charge };
        task.record.outcome = outcome;
        task.record.error = error;
        task.record.state = state;
        // Readers see the end at once; `finished` confirms the charge once it is settled.
        task.record.charged = charge;
        task.record.finished_at_ms = Some(now_ms());
        if !released.is_empty() {
            self.pool.do_send(Release { miners: released });
        }
        if key.session_id == NETWORK_SESSION {
            // Nothing is held or paid for network tasks.
            self.finished(key, 0);
            return;
        }
        if let Some(peers) = &self.peers {
            peers.do_send(PeerEvent::Ended(key));
        }
        // The end is written before the settlement is made: a restart then settles it (once:
        // settlements are keyed by task) and never runs the task again.
        task.record.settlement_due = Some(SettlementDue {
            hold: task.record.hold,
            charge,
            payees,
        });
        self.settle_when_written(key, ctx);
    }

    /// Settles an ended task once its end (with the settlement due) is written; while the
    /// store refuses the write, tried again at every tick.
    fn settle_when_written(&mut self, key: TaskKey, ctx: &mut Context<Self>) {
        let Some(task) = self.live.get(&key) else {
            return;
        };
        if !self.write(&task.record) {
            self.ends_to_write.insert(key);
            return;
        }
        self.ends_to_write.remove(&key);
        let Some(due) = task.record.settlement_due.clone() else {
            return;
        };
        let settlement = PendingSettlement {
            hold: due.hold,
            charge: due.charge,
            payees: due.payees,
            trace: task.record.record_stages.then(|| task.record.trace()),
        };
        self.settle(key, settlement, 0, ctx);
    }

    /// Settles an ended task's hold through the chain bridge, then lets it go. A settlement
    /// that fails is tried again after a back-off (doubling up to [`MAX_SETTLE_BACKOFF`]):
    /// giving up would leave the session's money held for ever.
    fn settle(
        &mut self,
        key: TaskKey,
        settlement: PendingSettlement,
        failures: u32,
        ctx: &mut Context<Self>,
    ) {
        let settle = Settle {
            task: key,
            hold: settlement.hold,
            charge: settlement.charge,
            payees: settlement.payees.clone(),
            trace: settlement.trace.clone(),
        };
        ctx.spawn(
            self.chain
                .send(settle)
                .into_actor(self)
                .map(move |settled, queue, ctx| {
                    let error = match settled {
                        Ok(Ok(_)) => return queue.finished(key, settlement.charge),
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => format!("the chain bridge did not answer: {e}"),
                    };
                    let backoff = (Duration::from_millis(50)
                        * 2u32.saturating_pow(failures.min(10)))
                    .min(MAX_SETTLE_BACKOFF);
                    tracing::warn!(task = %key, %error, ?backoff, "settlement failed; retrying");
                    ctx.run_later(backoff, move |queue, ctx| {
                        queue.settle(key, settlement, failures + 1, ctx)
                    });
                }),
        );
    }

    fn finished(&mut self, key: TaskKey, charged: u64) {
        let Some(mut task) = self.live.remove(&key) else {
            return;
        };
        self.dirty.remove(&key);
        task.record.charged = charged;
        task.record.settlement_due = None;
        let state = task.record.state;
        let written = self.write(&task.record);
        let network = key.session_id == NETWORK_SESSION;
        if network {
            *self.stats.network_tasks.entry(state.name()).or_default() += 1;
        } else {
            self.record_stage("total", task.created.elapsed());
            *self.stats.ended.entry(state.name()).or_default() += 1;
        }
        if let (NETWORK_SESSION, Some(miner)) = (key.session_id, &task.record.placement.only) {
            let passed = state == TaskState::Completed
                && task
                    .record
                    .outcome
                    .as_ref()
                    .is_some_and(|o| o.agreeing.contains(miner));
            self.pool.do_send(ProbeFinished {
                miner: miner.clone(),
                passed,
            });
        }
        if let Some(outcome) = task.record.outcome.as_ref().filter(|_| !network) {
            let tokens = outcome.result.completion_tokens();
            self.stats.tokens_generated += tokens as u64;
            // The last chunk's miners' pace (the whole task's when it is not chunked).
            let tokens = tokens.saturating_sub(task.record.accepted_tokens().len());
            let decode_ms: Vec<u64> = task
                .record
                .last_round()
                .filter(|a| outcome.agreeing.contains(&a.miner))
                .filter_map(|a| Some(a.precommitted_at_ms?.saturating_sub(a.acked_at_ms?)))
                .collect();
            if let Some(ms) = decode_ms.iter().min() {
                let rate = tokens as f64 / (*ms).max(1) as f64 * 1000.0;
                let prev = self.stats.decode_tokens_per_second;
                self.stats.decode_tokens_per_second = if prev == 0.0 {
                    rate
                } else {
                    0.8 * prev + 0.2 * rate
                };
            }
        }
        if written {
            self.announce_end(task.record, task.subscribers);
        } else {
            // Nobody hears of the end before it is written (a restart meanwhile runs the task
            // again; its settlement, already made, is not made twice).
            self.unwritten_ends
                .insert(key, (task.record, task.subscribers));
        }
    }

    /// Tells the subscribers of an end that is written, once it (and the settlement before
    /// it) is on disk.
    fn announce_end(&mut self, record: TaskRecord, subscribers: Vec<Subscriber>) {
        let key = record.key;
        self.history.record(|| Operation::Ended {
            key,
            state: record.state,
            charged: record.charged,
        });
        let durable = self.store.durable();
        let record = Box::new(record);
        actix::spawn(async move {
            if let Err(e) = durable.await {
                tracing::error!(task = %key, error = %e, "cannot flush the store");
            }
            for s in subscribers {
                // The final record must arrive even when a slow reader filled the channel.
                let _ = s.events.send(TaskEvent::Finished(record.clone())).await;
            }
        });
    }

    /// Whether a report about an active assignment carries its miner's signature over that
    /// assignment's nonce. Reports about nothing active pass here and are ignored later.
    fn check_signature(&mut self, report: &MinerReport) -> Result<Authenticated, String> {
        let Some(task) = self.live.get(&report.key) else {
            return Ok(Authenticated::Checked);
        };
        let Some(a) = task
            .record
            .assignments
            .iter()
            .rev()
            .find(|a| a.miner == report.miner && a.state.is_active())
        else {
            return Ok(Authenticated::Checked);
        };
        let address = *task
            .addresses
            .get(&report.miner)
            .ok_or_else(|| "no registered key for this miner".to_string())?;
        if report.nonce != a.nonce {
            return Err(format!(
                "made for another assignment (nonce {}, not {})",
                report.nonce, a.nonce
            ));
        }
        if !report_signing::needs_signature(&report.kind) {
            return Ok(Authenticated::Checked);
        }
        if report_signing::authenticated_by_precommit(report, a.precommit_hash.as_deref()) {
            return Ok(Authenticated::RevealMatchingPrecommit);
        }
        self.signer_keys
            .verify(report, address)
            .map(|()| Authenticated::Checked)
            .map_err(|e| e.to_string())
    }

    fn on_report(&mut self, report: MinerReport, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        let authenticated = match self.check_signature(&report) {
            Ok(authenticated) => authenticated,
            Err(why) => {
                self.stats.rejected_reports += 1;
                tracing::warn!(task = %report.key, miner = %report.miner, %why, "a report refused");
                return;
            }
        };
        let MinerReport {
            key, miner, kind, ..
        } = report;
        let Some(task) = self.live.get_mut(&key) else {
            tracing::debug!(task = %key, %miner, "report for a task that is not live: ignored");
            return;
        };
        if let Some(why) = out_of_bounds(&kind, task.record.request.max_tokens) {
            self.stats.rejected_reports += 1;
            tracing::warn!(task = %key, %miner, %why, "a report refused");
            return;
        }
        let kind = match kind {
            ReportKind::Failed { error } => ReportKind::Failed {
                error: bounded_error(error),
            },
            ReportKind::Refused { error } => ReportKind::Refused {
                error: bounded_error(error),
            },
            kind => kind,
        };
        let precommit_timeout = Duration::from_millis(task.record.precommit_timeout_ms);
        if task.finishing {
            return;
        }
        let revealed = task.revealed;
        // A chunk's result must hold the output accepted before it, token for token.
        let continues_accepted = match &kind {
            ReportKind::Commit { result } => {
                result.token_ids.starts_with(task.record.accepted_tokens())
            }
            _ => true,
        };
        let Some(a) = task
            .record
            .assignment_mut(&miner)
            .filter(|a| a.state.is_active())
        else {
            tracing::debug!(task = %key, %miner, "report from a miner not active on the task: ignored");
            return;
        };
        let now = now_ms();
        match kind {
            ReportKind::Ack => {
                if a.state != AssignmentState::Assigned {
                    return; // a duplicate
                }
                a.state = AssignmentState::Acked;
                a.acked_at_ms = Some(now);
                task.deadlines
                    .insert(miner, deadline_after(precommit_timeout));
            }
            ReportKind::Token { index, text } => {
                if task.stream_source.is_none() {
                    task.stream_source = Some(miner.clone());
                }
                // Honest miners produce the same tokens, so after a switch of source the
                // new one continues where the stream stopped.
                // `index` is below the task's max_tokens (checked above): no overflow.
                if task.stream_source.as_deref() == Some(&miner) && index >= task.streamed_tokens {
                    task.streamed_tokens = index + 1;
                    task.publish(TaskEvent::Token { text });
                }
                return;
            }
            ReportKind::Precommit { hash } => {
                if revealed || a.state == AssignmentState::Precommitted {
                    return; // late or duplicate
                }
                if a.acked_at_ms.is_none() {
                    a.acked_at_ms = Some(now);
                }
                a.state = AssignmentState::Precommitted;
                self.history.record(|| Operation::Precommitted {
                    key,
                    miner: miner.clone(),
                    hash: hash.clone(),
                });
                a.precommit_hash = Some(hash);
                a.precommitted_at_ms = Some(now);
                task.deadlines.remove(&miner);
            }
            ReportKind::Commit { result } => {
                if !revealed || a.state != AssignmentState::Precommitted {
                    return; // a commit before the reveal is a protocol error: ignored
                }
                // The signature check may have found the match already (and hashed the result).
                if authenticated != Authenticated::RevealMatchingPrecommit
                    && a.precommit_hash.as_deref() != Some(result.commitment_hex(&miner).as_str())
                {
                    self.stats.rejected_reveals += 1;
                    self.history.record(|| Operation::RevealRejected {
                        key,
                        miner: miner.clone(),
                    });
                    let note = "its reveal does not match its precommitted hash".to_string();
                    self.remove_miner(
                        key,
                        &miner,
                        AssignmentState::Rejected,
                        note,
                        Outcome::WrongReveal,
                        ctx,
                    );
                    return;
                }
                if !continues_accepted {
                    let note = "its result does not continue the accepted output".to_string();
                    self.remove_miner(
                        key,
                        &miner,
                        AssignmentState::Rejected,
                        note,
                        Outcome::Rejected,
                        ctx,
                    );
                    return;
                }
                a.state = AssignmentState::Committed;
                a.committed_at_ms = Some(now);
                self.history.record(|| Operation::RevealAccepted {
                    key,
                    miner: miner.clone(),
                    result: result.clone(),
                });
                a.result = Some(result);
                task.deadlines.remove(&miner);
                self.pool.do_send(Release {
                    miners: vec![miner],
                });
            }
            ReportKind::Refused { error } => {
                self.refused(key, &miner, error, ctx);
                return;
            }
            ReportKind::Failed { error } => {
                let note = format!("failed: {error}");
                self.remove_miner(
                    key,
                    &miner,
                    AssignmentState::Replaced,
                    note,
                    Outcome::Failed,
                    ctx,
                );
                return;
            }
        }
        self.dirty.insert(key);
        self.advance(key, ctx);
    }

    /// A miner refused the request itself. It is taken off the task without blame and not
    /// replaced (another honest miner would refuse too); once no assigned miner is left
    /// working and none committed, the task fails as the client's error.
    fn refused(&mut self, key: TaskKey, miner: &str, error: String, ctx: &mut Context<Self>) {
        let Some(task) = self.live.get_mut(&key) else {
            return;
        };
        let Some(a) = task
            .record
            .assignment_mut(miner)
            .filter(|a| a.state.is_active())
        else {
            return;
        };
        a.state = AssignmentState::Dropped;
        a.note = Some(format!("refused the request: {error}"));
        task.deadlines.remove(miner);
        task.wanted = task.wanted.saturating_sub(1);
        self.dirty.insert(key);
        self.pool.do_send(Release {
            miners: vec![miner.to_string()],
        });
        let task = self.live.get_mut(&key).expect("checked above");
        let working = task.active_count();
        let committed = task.record.round_committed();
        if working == 0 && !committed && task.record.accepted.is_some() {
            // A chunk after the first no longer fits the context: the generation ends with
            // what was accepted, as an unchunked one ends at the context's limit.
            let outcome = TaskOutcome {
                result: task.record.accepted.clone().expect("checked"),
                agreeing: task
                    .record
                    .spans
                    .last()
                    .map_or(vec![], |s| s.miners.clone()),
                disagreeing: vec![],
                alternatives: vec![],
            };
            self.finish(key, TaskState::Completed, Some(outcome), None, ctx);
        } else if working == 0 && !committed {
            task.record.cause = Some(FailureCause::InvalidRequest);
            let error = format!("the miners refused the request: {error}");
            self.finish(key, TaskState::Failed, None, Some(error), ctx);
        } else {
            self.advance(key, ctx);
        }
    }

    /// Checks every deadline: the task's own, and each active miner's next step.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        let now = Instant::now();
        let mut ended = Vec::new();
        let mut missed = Vec::new();
        let mut starving = Vec::new();
        for (key, task) in &self.live {
            if task.finishing {
                continue;
            }
            if now >= task.deadline {
                ended.push(*key);
                continue;
            }
            for (miner, due) in &task.deadlines {
                if now >= *due {
                    let stage = task
                        .record
                        .assignments
                        .iter()
                        .rev()
                        .find(|a| &a.miner == miner)
                        .map(|a| match a.state {
                            AssignmentState::Assigned => Stage::Ack,
                            AssignmentState::Acked => Stage::Precommit,
                            _ => Stage::Commit,
                        })
                        .unwrap_or(Stage::Ack);
                    missed.push((*key, miner.clone(), stage));
                }
            }
            if !task.selecting && !task.revealed && task.active_count() < task.wanted {
                starving.push(*key);
            }
        }
        for key in ended {
            let error = "the task's deadline passed".to_string();
            self.finish(key, TaskState::Ended, None, Some(error), ctx);
        }
        for (key, miner, stage) in missed {
            let note = format!("missed the {} deadline", stage.name());
            self.remove_miner(
                key,
                &miner,
                AssignmentState::Replaced,
                note,
                Outcome::Missed(stage),
                ctx,
            );
        }
        // Oldest first: the pool answers in order, so a task waiting longest gets the next
        // free miner (no task starves behind newer ones).
        starving.sort_by_key(|key| {
            let created = self.live.get(key).map_or(0, |t| t.record.created_at_ms);
            (created, *key)
        });
        for key in starving {
            self.fill(key, ctx);
        }
    }

    /// Tasks that were live when the process stopped start again from Queued.
    /// Returns the ended tasks whose settlement is still due (the caller settles them).
    fn resume(&mut self) -> Result<Vec<TaskKey>, StoreError> {
        let mut due = Vec::new();
        for record in self.store.unfinished_tasks()? {
            if record.state.is_terminal() {
                // It ended before the restart: settle it, never run it again.
                tracing::info!(task = %record.key, "settling a task that ended before a restart");
                let key = record.key;
                let mut task = LiveTask::new(record, Duration::ZERO);
                task.finishing = true;
                self.live.insert(key, task);
                due.push(key);
                continue;
            }
            tracing::info!(task = %record.key, "resuming a task after a restart");
            self.run_again(record, "the router restarted");
        }
        self.store.flush()?;
        Ok(due)
    }

    /// Runs a stored task again from Queued: after a restart, or a peer's task after that
    /// router died. Its old assignments are dropped (their miners are not waited for).
    fn run_again(&mut self, mut record: TaskRecord, why: &str) {
        // Chunks accepted before stay accepted: it goes on from the output they hold.
        for a in record
            .round_mut()
            .filter(|a| a.state.is_active() || a.state == AssignmentState::Committed)
        {
            a.state = AssignmentState::Dropped;
            a.note = Some(why.to_string());
        }
        record.state = TaskState::Queued;
        record.resumed += 1;
        let timeout =
            Duration::from_millis(record.deadline_ms.saturating_sub(record.created_at_ms))
                .max(self.config.ack_timeout());
        self.history
            .record(|| Operation::Resumed { key: record.key });
        if !self.write(&record) {
            self.dirty.insert(record.key);
        }
        self.live.insert(record.key, LiveTask::new(record, timeout));
    }
}

impl Actor for SessionQueue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        match self.resume() {
            Ok(due) => {
                for key in due {
                    self.settle_when_written(key, ctx);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot resume the stored tasks"),
        }
        ctx.run_interval(Duration::from_millis(self.config.tick_ms), |queue, ctx| {
            queue.tick(ctx);
            queue.write_dirty();
            let ends: Vec<TaskKey> = queue.ends_to_write.iter().copied().collect();
            for key in ends {
                queue.settle_when_written(key, ctx);
            }
        });
    }
}

impl Handler<Enqueue> for SessionQueue {
    type Result = ResponseActFuture<Self, Result<TaskKey, QueueError>>;
    fn handle(&mut self, m: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        if self.stopping {
            return Box::pin(actix::fut::ready(Err(QueueError::ShuttingDown)));
        }
        // A client that only waits for the end hears nothing before it, and the end is flushed
        // (with this write before it): only a live follower is acknowledged now.
        let acknowledged_now = m.subscriber.as_ref().is_none_or(|s| s.live);
        let hold = m.task.hold;
        match self.enqueue(m, ctx) {
            Ok(key) if !acknowledged_now => {
                self.history.record(|| Operation::Accepted { key, hold });
                Box::pin(actix::fut::ready(Ok(key)))
            }
            // Acknowledged only once the task is on disk.
            Ok(key) => {
                let durable = self.store.durable();
                Box::pin(
                    durable
                        .into_actor(self)
                        .map(move |durable, queue, _| match durable {
                            Ok(()) => {
                                queue.history.record(|| Operation::Accepted { key, hold });
                                Ok(key)
                            }
                            Err(e) => {
                                queue.refuse(key, &e);
                                Err(QueueError::from(e))
                            }
                        }),
                )
            }
            Err(e) => Box::pin(actix::fut::ready(Err(e))),
        }
    }
}

impl Handler<Probe> for SessionQueue {
    type Result = ();
    fn handle(&mut self, m: Probe, ctx: &mut Context<Self>) {
        self.probes_started += 1;
        let n = self.probes_started;
        let prompt = COGNITIVE_PROMPTS[(n as usize) % COGNITIVE_PROMPTS.len()];
        let task = NewTask {
            session_id: NETWORK_SESSION,
            // Unique across restarts: the clock, then a counter.
            task_id: now_ms() * 1000 + n % 1000,
            owner: "network".into(),
            model: m.model,
            placement: crate::task::Placement {
                session_id: NETWORK_SESSION,
                mode: crate::session::SessionMode::Ephemeral,
                min_nodes: 1,
                max_nodes: 1,
                reserve_period_s: 0,
                only: Some(m.miner.clone()),
            },
            request: GenerateRequest {
                prompt: crate::models::engine::Prompt::Chat(vec![
                    crate::models::chat::ChatMessage::user(prompt),
                ]),
                params: crate::models::sampling::SamplingParams::greedy(),
                max_tokens: PROBE_MAX_TOKENS,
                stop: vec![],
                prefix: vec![],
            },
            redundancy: 1,
            validators: 1,
            max_replacements: 0,
            timeout: self.config.task_timeout(),
            precommit_timeout: self.config.precommit_timeout(),
            client_reference: None,
            hold: 0,
            derive_seed: true,
            record_stages: false,
            validation: ValidationPlan::new(
                self.probe_validation.clone(),
                Consensus::Majority,
                DisagreementPolicy::FailHard,
                crate::session::default_poi_threshold(),
                crate::session::default_judge_threshold(),
            ),
        };
        if let Err(e) = self.enqueue(
            Enqueue {
                task,
                subscriber: None,
            },
            ctx,
        ) {
            tracing::warn!(miner = %m.miner, error = %e, "cannot start a network task");
            self.pool.do_send(ProbeFinished {
                miner: m.miner,
                passed: false,
            });
        }
    }
}

impl SessionQueue {
    /// Takes back a task whose client is told it was not accepted (its write did not become
    /// durable): its miners stop, and it ends Failed without a settlement (the router gives
    /// the hold back), so it can neither run nor be charged.
    fn refuse(&mut self, key: TaskKey, error: &StoreError) {
        let Some(mut task) = self.live.remove(&key) else {
            return;
        };
        self.dirty.remove(&key);
        let released = task.stop_active(None);
        if !released.is_empty() {
            self.pool.do_send(Release { miners: released });
        }
        task.record.state = TaskState::Failed;
        task.record.error = Some(format!("not accepted: {error}"));
        task.record.finished_at_ms = Some(now_ms());
        self.history.record(|| Operation::Refused { key });
        if !self.write(&task.record) {
            let subscribers = std::mem::take(&mut task.subscribers);
            self.unwritten_ends.insert(key, (task.record, subscribers));
        }
    }

    fn enqueue(&mut self, m: Enqueue, ctx: &mut Context<Self>) -> Result<TaskKey, QueueError> {
        if self.live.len() >= self.config.max_live_tasks {
            return Err(QueueError::Full(self.config.max_live_tasks));
        }
        let t = m.task;
        let key = TaskKey {
            session_id: t.session_id,
            task_id: t.task_id,
        };
        let mut request = t.request;
        if t.derive_seed {
            request.params.seed = task_seed(key);
        }
        let now = now_ms();
        let timeout = t.timeout.min(self.config.task_timeout());
        let record = TaskRecord {
            key,
            state: TaskState::Queued,
            owner: t.owner,
            model: t.model,
            placement: t.placement,
            request,
            redundancy: t.redundancy,
            validators: t.validators,
            max_replacements: t.max_replacements,
            replacements: 0,
            assignments: Vec::new(),
            created_at_ms: now,
            finished_at_ms: None,
            deadline_ms: now + timeout.as_millis() as u64,
            precommit_timeout_ms: t.precommit_timeout.as_millis() as u64,
            client_reference: t.client_reference,
            hold: t.hold,
            charged: 0,
            outcome: None,
            error: None,
            cause: None,
            settlement_due: None,
            resumed: 0,
            record_stages: t.record_stages,
            validation: t.validation.levels,
            consensus: t.validation.consensus,
            disagreement_policy: t.validation.policy,
            poi_threshold: t.validation.poi_threshold,
            judge_threshold: t.validation.judge_threshold,
            decision: None,
            // Network tasks are short and probe one node: never chunked.
            chunk_tokens: if key.session_id == NETWORK_SESSION {
                0
            } else {
                self.config.chunk_tokens
            },
            spans: Vec::new(),
            accepted: None,
        };
        self.store.put_task(&record)?;
        if let (Some(peers), false) = (&self.peers, key.session_id == NETWORK_SESSION) {
            peers.do_send(PeerEvent::Accepted(Box::new(record.clone())));
        }
        let mut live = LiveTask::new(record, timeout);
        if let Some(s) = m.subscriber {
            live.subscribers.push(s);
        }
        live.publish(TaskEvent::State(TaskState::Queued));
        self.live.insert(key, live);
        self.fill(key, ctx);
        Ok(key)
    }
}

impl Handler<ReserveTaskId> for SessionQueue {
    type Result = Result<TaskKey, QueueError>;
    fn handle(&mut self, m: ReserveTaskId, _: &mut Context<Self>) -> Self::Result {
        Ok(TaskKey {
            session_id: m.0,
            task_id: self.task_id_base + self.store.next_id(&format!("task_id/{}", m.0))?,
        })
    }
}

impl Handler<MinerReport> for SessionQueue {
    type Result = ();
    fn handle(&mut self, m: MinerReport, ctx: &mut Context<Self>) {
        self.on_report(m, ctx);
    }
}

impl Handler<Adopt> for SessionQueue {
    type Result = Result<(), QueueError>;
    fn handle(&mut self, m: Adopt, ctx: &mut Context<Self>) -> Self::Result {
        let key = m.0.key;
        if self.live.contains_key(&key) || self.store.task(key)?.is_some() {
            return Ok(()); // adopted before (or ours all along)
        }
        tracing::warn!(task = %key, "running a task of a router that died");
        self.run_again(*m.0, "its router died");
        self.store.flush()?;
        self.fill(key, ctx);
        Ok(())
    }
}

impl Handler<JoinValidator> for SessionQueue {
    type Result = ();
    fn handle(&mut self, m: JoinValidator, _: &mut Context<Self>) {
        self.validators.retain(|(id, _)| *id != m.id);
        self.validators.push((m.id, m.validator));
    }
}

impl Handler<LeaveValidator> for SessionQueue {
    type Result = ();
    fn handle(&mut self, m: LeaveValidator, _: &mut Context<Self>) {
        self.validators.retain(|(id, _)| *id != m.id);
    }
}

impl Handler<GetValidators> for SessionQueue {
    type Result = MessageResult<GetValidators>;
    fn handle(&mut self, _: GetValidators, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.validators.iter().map(|(_, v)| v.clone()).collect())
    }
}

impl Handler<NodeLost> for SessionQueue {
    type Result = ();
    fn handle(&mut self, m: NodeLost, ctx: &mut Context<Self>) {
        let keys: Vec<TaskKey> = self
            .live
            .iter()
            .filter(|(_, t)| {
                t.record
                    .assignments
                    .iter()
                    .any(|a| a.miner == m.miner && a.state.is_active())
            })
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            self.remove_miner(
                key,
                &m.miner,
                AssignmentState::Replaced,
                "its connection to the router was lost".into(),
                Outcome::Failed,
                ctx,
            );
        }
    }
}

impl Handler<CancelTask> for SessionQueue {
    type Result = Result<TaskRecord, QueueError>;
    fn handle(&mut self, m: CancelTask, ctx: &mut Context<Self>) -> Self::Result {
        if self.live.contains_key(&m.0) {
            self.finish(
                m.0,
                TaskState::Cancelled,
                None,
                Some("cancelled by the client".into()),
                ctx,
            );
            return Ok(self.live[&m.0].record.clone());
        }
        self.store.task(m.0)?.ok_or(QueueError::NoSuchTask(m.0))
    }
}

impl Handler<GetTask> for SessionQueue {
    type Result = Result<Option<TaskRecord>, QueueError>;
    fn handle(&mut self, m: GetTask, _: &mut Context<Self>) -> Self::Result {
        if let Some(t) = self.live.get(&m.0) {
            return Ok(Some(t.record.clone()));
        }
        if let Some((r, _)) = self.unwritten_ends.get(&m.0) {
            return Ok(Some(r.clone()));
        }
        Ok(self.store.task(m.0)?)
    }
}

impl Handler<Subscribe> for SessionQueue {
    type Result = Result<(), QueueError>;
    fn handle(&mut self, m: Subscribe, _: &mut Context<Self>) -> Self::Result {
        if let Some(t) = self.live.get_mut(&m.key) {
            if m.subscriber.live {
                let _ = m
                    .subscriber
                    .events
                    .try_send(TaskEvent::State(t.record.state));
            }
            t.subscribers.push(m.subscriber);
            return Ok(());
        }
        if let Some((_, subscribers)) = self.unwritten_ends.get_mut(&m.key) {
            subscribers.push(m.subscriber);
            return Ok(());
        }
        let record = self
            .store
            .task(m.key)?
            .ok_or(QueueError::NoSuchTask(m.key))?;
        let _ = m
            .subscriber
            .events
            .try_send(TaskEvent::Finished(Box::new(record)));
        Ok(())
    }
}

impl Handler<Shutdown> for SessionQueue {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        self.write_dirty();
        if let Err(e) = self.store.flush() {
            tracing::error!(error = %e, "cannot flush the store at shutdown");
        }
        // Tasks stored and waiting for the flush that acknowledges them are durable now:
        // their flushes (asked before this one) answer first, so their clients hear they were
        // accepted (they resume on the next start) rather than a dropped reply, which the
        // router would take for a refusal and refund.
        Box::pin(self.store.durable().into_actor(self).map(|_, queue, ctx| {
            tracing::info!(
                live = queue.live.len(),
                "session queue stopped; live tasks resume on the next start"
            );
            ctx.stop();
        }))
    }
}

impl Handler<GetStats> for SessionQueue {
    type Result = MessageResult<GetStats>;
    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Self::Result {
        let mut stats = self.stats.clone();
        stats.validators = self.validators.len();
        for t in self.live.values() {
            *stats.live.entry(t.record.state.name()).or_default() += 1;
        }
        MessageResult(stats)
    }
}
