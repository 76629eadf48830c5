//! Tasks: the record the session queue keeps for each prompt, its states, and the result a miner
//! commits to. The state machine itself lives in `actors/session_queue.rs`; this file holds the
//! data and the pure rules (hashing, majority) that are easy to test alone.

use crate::chain::{MinerTrace, TaskTrace};
use crate::models::engine::{FinishReason, GenerateRequest, Prompt};
use crate::session::SessionMode;
use crate::validation::consensus::{
    Consensus, Decision, DisagreementPolicy, Levels, ValidationPlan,
};
use serde::{Deserialize, Serialize};

/// A task's address: (session, task). Task ids count from 1 within a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskKey {
    pub session_id: u64,
    pub task_id: u64,
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.session_id, self.task_id)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskState {
    Queued,
    Assigned,
    Acked,
    Precommitted,
    Committed,
    Validated,
    Completed,
    Failed,
    Cancelled,
    /// Ended by force (its deadline passed).
    Ended,
}

impl TaskState {
    pub const ALL: [TaskState; 10] = [
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Acked,
        TaskState::Precommitted,
        TaskState::Committed,
        TaskState::Validated,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Ended,
    ];
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled | TaskState::Ended
        )
    }
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Queued => "Queued",
            TaskState::Assigned => "Assigned",
            TaskState::Acked => "Acked",
            TaskState::Precommitted => "Precommitted",
            TaskState::Committed => "Committed",
            TaskState::Validated => "Validated",
            TaskState::Completed => "Completed",
            TaskState::Failed => "Failed",
            TaskState::Cancelled => "Cancelled",
            TaskState::Ended => "Ended",
        }
    }
}

/// Where one miner is with one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssignmentState {
    Assigned,
    Acked,
    Precommitted,
    Committed,
    /// Missed a deadline or failed; another miner took its place.
    Replaced,
    /// Its reveal did not match its precommit.
    Rejected,
    /// Its task ended before it finished (cancelled, restarted, or the others were enough).
    Dropped,
}

impl AssignmentState {
    /// Still expected to deliver.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            AssignmentState::Assigned | AssignmentState::Acked | AssignmentState::Precommitted
        )
    }
}

/// What a miner commits to: the result of its inference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
}

impl TaskResult {
    pub fn completion_tokens(&self) -> usize {
        self.token_ids.len()
    }
    /// The canonical encoding (JSON of text, token ids, finish reason, prompt tokens): what a
    /// miner commits on chain.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&(
            &self.text,
            &self.token_ids,
            self.finish_reason,
            self.prompt_tokens,
        ))
        .expect("a result always serializes")
    }
    /// keccak256 of the canonical encoding: equal results have equal hashes.
    pub fn hash(&self) -> [u8; 32] {
        ethers::utils::keccak256(self.canonical_bytes())
    }
    /// What `miner` commits on chain: the canonical encoding bound to the miner's id (JSON of
    /// miner, text, token ids, finish reason, prompt tokens).
    pub fn commitment_bytes(&self, miner: &str) -> Vec<u8> {
        serde_json::to_vec(&(
            miner,
            &self.text,
            &self.token_ids,
            self.finish_reason,
            self.prompt_tokens,
        ))
        .expect("a result always serializes")
    }
    /// keccak256 of [`TaskResult::commitment_bytes`]: what a miner precommits and the queue
    /// verifies at the reveal. Because it names the miner, copying another miner's precommit
    /// gains nothing: the only reveal that matches it is the other miner's, under its name.
    pub fn commitment(&self, miner: &str) -> [u8; 32] {
        ethers::utils::keccak256(self.commitment_bytes(miner))
    }
    pub fn commitment_hex(&self, miner: &str) -> String {
        format!("0x{}", hex::encode(self.commitment(miner)))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub miner: String,
    pub state: AssignmentState,
    pub assigned_at_ms: u64,
    pub acked_at_ms: Option<u64>,
    pub precommitted_at_ms: Option<u64>,
    pub committed_at_ms: Option<u64>,
    /// `0x`-prefixed keccak256 of the result.
    pub precommit_hash: Option<String>,
    pub result: Option<TaskResult>,
    /// Why it was replaced, rejected or dropped.
    pub note: Option<String>,
    /// Names this assignment in the miner's signed reports, so a report made for another
    /// assignment (an earlier one, another task) cannot be replayed into it.
    #[serde(default)]
    pub nonce: u64,
    /// Which chunk of the generation it was for (0 for a task that is not chunked).
    #[serde(default)]
    pub chunk: u32,
}

impl Assignment {
    pub fn new(miner: String, now_ms: u64, nonce: u64, chunk: u32) -> Self {
        Self {
            nonce,
            chunk,
            miner,
            state: AssignmentState::Assigned,
            assigned_at_ms: now_ms,
            acked_at_ms: None,
            precommitted_at_ms: None,
            committed_at_ms: None,
            precommit_hash: None,
            result: None,
            note: None,
        }
    }
}

/// How prompts are presented to the model (Cortensor's `prompt_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PromptType {
    /// The model's chat template around one user message.
    #[default]
    Default,
    /// The text as it is.
    Raw,
    /// `prompt_template` as the system message, the prompt as the user message.
    SystemTemplate,
}

/// How a session's tasks find miners: ephemeral sessions share the pool; hybrid sessions reserve
/// up to `max_nodes` miners for `reserve_period_s` and prefer them; dedicated sessions reserve
/// them exclusively and use nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub session_id: u64,
    pub mode: SessionMode,
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub reserve_period_s: u64,
    /// A network task for this one node, whatever its pool state (probing a new or released
    /// node).
    #[serde(default)]
    pub only: Option<String>,
}

/// The accepted outcome of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub result: TaskResult,
    /// Miners whose results were accepted (and are paid).
    pub agreeing: Vec<String>,
    /// Miners whose results were not.
    pub disagreeing: Vec<String>,
    /// Under `disagreement_policy: return_all` without consensus: every result, by miner.
    #[serde(default)]
    pub alternatives: Vec<(String, TaskResult)>,
}

/// An ended task's settlement, written with its end before it is made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementDue {
    pub hold: u64,
    pub charge: u64,
    pub payees: Vec<String>,
}

/// One accepted chunk of a chunked generation: output tokens `from..to` (indexes into the
/// whole output), produced by `miners` (whose results agreed) and validated by `validators`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub chunk: u32,
    pub from: usize,
    pub to: usize,
    pub miners: Vec<String>,
    pub validators: Vec<String>,
}

/// Why a task failed, where the miners are not to blame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// No miner could take it: none serves its model, or every one is busy or reserved by
    /// other sessions. A capacity problem: the client may retry.
    NoMiners,
    /// The miners refused the request itself (its prompt does not fit the model's context):
    /// the client's error.
    InvalidRequest,
}

/// Everything the queue knows about one task; persisted on every transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub key: TaskKey,
    pub state: TaskState,
    /// The owner of the session, for authorization of reads and cancels.
    pub owner: String,
    pub model: String,
    /// Where its miners come from (the session's mode and node bounds).
    pub placement: Placement,
    pub request: GenerateRequest,
    /// Miners that must agree (the session's `redundant`).
    pub redundancy: u32,
    pub validators: u32,
    /// Executions allowed beyond the first `redundancy` (replacements).
    pub max_replacements: u32,
    pub replacements: u32,
    pub assignments: Vec<Assignment>,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// Absolute deadline of the whole task (ms since the epoch).
    pub deadline_ms: u64,
    pub precommit_timeout_ms: u64,
    pub client_reference: Option<String>,
    /// Held from the session's balance while the task runs.
    pub hold: u64,
    /// Charged when it ended (the rest of `hold` went back).
    pub charged: u64,
    pub outcome: Option<TaskOutcome>,
    pub error: Option<String>,
    /// Why it failed, when that is not the miners' doing (the API answers accordingly).
    #[serde(default)]
    pub cause: Option<FailureCause>,
    /// Its end is written and its settlement not yet confirmed: what a restart settles (and
    /// never runs again).
    #[serde(default)]
    pub settlement_due: Option<SettlementDue>,
    /// How often it was resumed after a restart.
    pub resumed: u32,
    /// Every stage goes on chain too (the session's `task_record: per_stage`).
    #[serde(default)]
    pub record_stages: bool,
    /// How its results are validated (the session's `validation`, `consensus`,
    /// `disagreement_policy`, `poi_threshold`, `judge_threshold`).
    #[serde(default)]
    pub validation: Levels,
    #[serde(default)]
    pub consensus: Consensus,
    #[serde(default)]
    pub disagreement_policy: DisagreementPolicy,
    #[serde(default = "crate::session::default_poi_threshold")]
    pub poi_threshold: f32,
    #[serde(default = "crate::session::default_judge_threshold")]
    pub judge_threshold: f32,
    /// How validation decided, miner by miner (absent before validation, and in records
    /// older than it).
    #[serde(default)]
    pub decision: Option<Decision>,
    /// Output tokens per chunk: the generation runs in rounds of at most this many tokens,
    /// each precommitted, revealed and validated before the next (0: one round).
    #[serde(default)]
    pub chunk_tokens: usize,
    /// The chunks accepted so far, in order (a completed task's last chunk included).
    #[serde(default)]
    pub spans: Vec<Span>,
    /// The output accepted so far (the last accepted chunk's result, which holds every
    /// token before it): what the next chunk continues from.
    #[serde(default)]
    pub accepted: Option<TaskResult>,
}

impl TaskRecord {
    /// What validating its results depends on.
    pub fn validation_plan(&self) -> ValidationPlan {
        ValidationPlan::new(
            self.validation.clone(),
            self.consensus,
            self.disagreement_policy,
            self.poi_threshold,
            self.judge_threshold,
        )
    }
    pub fn active(&self) -> impl Iterator<Item = &Assignment> {
        self.assignments.iter().filter(|a| a.state.is_active())
    }
    /// The chunk being generated now (the number of chunks accepted before it).
    pub fn chunk(&self) -> u32 {
        self.spans.len() as u32
    }
    /// The assignments of the chunk being generated now.
    pub fn round(&self) -> impl Iterator<Item = &Assignment> {
        let chunk = self.chunk();
        self.assignments.iter().filter(move |a| a.chunk == chunk)
    }
    /// The assignments of the last chunk that ran (the current one while the task runs).
    pub fn last_round(&self) -> impl Iterator<Item = &Assignment> {
        let last = self.assignments.iter().map(|a| a.chunk).max().unwrap_or(0);
        self.assignments.iter().filter(move |a| a.chunk == last)
    }
    pub fn round_mut(&mut self) -> impl Iterator<Item = &mut Assignment> {
        let chunk = self.chunk();
        self.assignments
            .iter_mut()
            .filter(move |a| a.chunk == chunk)
    }
    /// Whether this round has a revealed result that matched its precommit.
    pub fn round_committed(&self) -> bool {
        self.round().any(|a| a.state == AssignmentState::Committed)
    }
    pub fn assignment_mut(&mut self, miner: &str) -> Option<&mut Assignment> {
        // The newest assignment of that miner (a miner is never assigned the same task twice
        // while active, but it may appear again after a restart dropped its first one, or in
        // the next chunk).
        self.assignments.iter_mut().rev().find(|a| a.miner == miner)
    }
    /// The output tokens accepted so far (the prefix the current chunk continues).
    pub fn accepted_tokens(&self) -> &[u32] {
        self.accepted.as_ref().map_or(&[], |r| &r.token_ids)
    }
    /// What the miners of the current chunk are asked: the client's request, continued from
    /// the accepted output, for at most `chunk_tokens` new tokens.
    pub fn chunk_request(&self) -> GenerateRequest {
        let mut request = self.request.clone();
        if self.chunk_tokens > 0 {
            request.prefix = self.accepted_tokens().to_vec();
            request.max_tokens = self.chunk_budget();
        }
        request
    }
    /// New tokens the current chunk may make: what the client asked for beyond the
    /// accepted output, at most `chunk_tokens`.
    fn chunk_budget(&self) -> usize {
        let left = self
            .request
            .max_tokens
            .saturating_sub(self.accepted_tokens().len());
        left.min(self.chunk_tokens)
    }
    /// Whether generation goes on after `result` was accepted for the current chunk: it
    /// used the chunk's whole budget (it did not stop, and the context did not cut it
    /// short) and the client asked for more.
    pub fn continues_after(&self, result: &TaskResult) -> bool {
        self.chunk_tokens > 0
            && result.finish_reason == FinishReason::Length
            && result.token_ids.len() >= self.accepted_tokens().len() + self.chunk_budget()
            && result.token_ids.len() < self.request.max_tokens
    }
    /// Whether the generation runs in more than one chunk.
    pub fn is_chunked(&self) -> bool {
        self.chunk_tokens > 0 && self.request.max_tokens > self.chunk_tokens
    }
    /// Records the current chunk as accepted: its span runs from the output accepted before
    /// it to `to`, made by `miners` and decided by `validators`.
    pub fn push_span(&mut self, to: usize, miners: Vec<String>, validators: Vec<String>) {
        self.spans.push(Span {
            chunk: self.chunk(),
            from: self.accepted_tokens().len(),
            to,
            miners,
            validators,
        });
    }
    /// Every miner paid for an accepted chunk so far, and every validator that decided one.
    pub fn span_payees(&self) -> Vec<String> {
        let mut payees: Vec<String> = Vec::new();
        for s in &self.spans {
            for p in s.miners.iter().chain(&s.validators) {
                if !payees.contains(p) {
                    payees.push(p.clone());
                }
            }
        }
        payees
    }
    pub fn assigned_miners(&self) -> Vec<String> {
        self.assignments.iter().map(|a| a.miner.clone()).collect()
    }

    /// The stages to record on chain: one entry per miner (a miner assigned again after a
    /// restart shows what its assignments did together), reveals only where they matched.
    pub fn trace(&self) -> TaskTrace {
        let mut miners: Vec<MinerTrace> = Vec::new();
        // The last chunk first: its result is the whole output, and only it keeps its result
        // (earlier chunks keep their precommits).
        let mut assignments: Vec<&Assignment> = self.assignments.iter().collect();
        assignments.sort_by_key(|a| std::cmp::Reverse(a.chunk));
        for a in assignments {
            let i = match miners.iter().position(|m| m.node == a.miner) {
                Some(i) => i,
                None => {
                    miners.push(MinerTrace {
                        node: a.miner.clone(),
                        acked: false,
                        precommit: None,
                        commit: None,
                    });
                    miners.len() - 1
                }
            };
            let m = &mut miners[i];
            m.acked |= a.acked_at_ms.is_some() || a.precommit_hash.is_some();
            if m.precommit.is_none() {
                m.precommit = a.precommit_hash.as_deref().and_then(parse_hash);
            }
            if let (None, Some(result), AssignmentState::Committed) =
                (&m.commit, &a.result, a.state)
            {
                if m.precommit == Some(result.commitment(&a.miner)) {
                    m.commit = Some(result.commitment_bytes(&a.miner));
                }
            }
        }
        // The text as given; a conversation as its messages' JSON; tokens as their ids' JSON.
        let prompt = match &self.request.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => serde_json::to_string(messages).unwrap_or_default(),
            Prompt::Tokens(ids) => serde_json::to_string(ids).unwrap_or_default(),
        };
        TaskTrace {
            data: TaskTrace::data_for(&prompt),
            miners,
            force_ended: self.state == TaskState::Ended,
        }
    }
}

fn parse_hash(hex_hash: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(hex_hash.trim_start_matches("0x")).ok()?;
    <[u8; 32]>::try_from(bytes).ok()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
