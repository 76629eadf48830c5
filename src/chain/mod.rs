//! The chain: sessions, balances and node payments. [`Chain`] is the interface; the embedded
//! [`local_ledger::LocalLedger`] implements it on the store, and the EVM client will implement
//! the same semantics. **Invariant:** only this module knows how (and where) the chain keeps
//! its state; callers see `Session` values and typed errors.

pub mod anvil;
pub mod contracts;
pub mod deploy;
pub mod evm;
pub mod local_ledger;
pub mod node_key;

use crate::session::{Session, SessionParams};
use crate::store::StoreError;
use crate::task::TaskKey;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("session {0} does not exist")]
    NoSuchSession(u64),
    #[error("session {session_id} has a balance of {available}; this task needs {needed}")]
    InsufficientBalance {
        session_id: u64,
        needed: u64,
        available: u64,
    },
    #[error("invalid session parameters: {0}")]
    InvalidParams(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("EVM: {0}")]
    Evm(String),
    #[error("node {0} has no wallet here (its key is not known to this process)")]
    NoWallet(String),
    #[error("node {0} has nothing to withdraw")]
    NothingToWithdraw(String),
    #[error("the chain does not answer: {0}")]
    Unreachable(String),
}

/// The text a panic carried (`panic!`'s message), for the error that reports it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// How a settled charge is split among the nodes that earned it: equal shares, the remainder
/// one unit each to the first ones. Both implementations use it, so they agree to the unit.
pub fn split_payment(amount: u64, payees: usize) -> Vec<u64> {
    if payees == 0 {
        return Vec::new();
    }
    let share = amount / payees as u64;
    let rest = (amount % payees as u64) as usize;
    (0..payees).map(|i| share + u64::from(i < rest)).collect()
}

/// One task's settlement: its hold ends, `charge` of it is spent and split among `payees`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settlement {
    pub task: TaskKey,
    pub hold: u64,
    pub charge: u64,
    pub payees: Vec<String>,
    /// The task's stages, recorded before the settlement when its session asks for every
    /// stage on chain (`task_record: per_stage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TaskTrace>,
}

/// A chain write as the outbox carries it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum ChainWrite {
    Settle(Settlement),
    Hold(HoldRequest),
    Create(CreatedSession),
}

/// A session the chain created (directly: the chain numbers sessions), kept so that a chain
/// that loses it (a rollback) is given it again under the same number.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CreatedSession {
    pub session_id: u64,
    pub owner: String,
    pub params: SessionParams,
    pub deposit: u64,
}

/// A task's hold, as the outbox carries it.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HoldRequest {
    pub task: TaskKey,
    pub amount: u64,
}

/// Prompts longer than this are recorded by their keccak256 (`keccak256:` and 64 hex digits).
pub const TRACE_DATA_LIMIT: usize = 4096;

/// A finished task's stages, the full-fidelity record: on an EVM, the queue contract's
/// enqueue, assign, ack, precommit, commit and end, each miner's stages sent from that miner's
/// own wallet. Recording it twice changes nothing.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskTrace {
    /// What was asked: the prompt's text, or its hash past [`TRACE_DATA_LIMIT`].
    pub data: Vec<u8>,
    /// In assignment order.
    pub miners: Vec<MinerTrace>,
    /// Ended by force (its deadline passed) rather than by the router's verdict.
    pub force_ended: bool,
}

/// One miner's stages of one task.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MinerTrace {
    pub node: String,
    pub acked: bool,
    /// keccak256 of the result it precommitted to.
    pub precommit: Option<[u8; 32]>,
    /// The revealed result (its commitment bytes, naming the miner), only when it matched the precommit.
    pub commit: Option<Vec<u8>>,
}

impl TaskTrace {
    /// The record's `data` for a prompt.
    pub fn data_for(prompt: &str) -> Vec<u8> {
        if prompt.len() <= TRACE_DATA_LIMIT {
            prompt.as_bytes().to_vec()
        } else {
            let hash = ethers::utils::keccak256(prompt.as_bytes());
            format!("keccak256:{}", hex::encode(hash)).into_bytes()
        }
    }
}

/// One node's outcome of one task, for its record on chain (Cortensor's
/// `reportTaskCompletion`), with the level the node pool's rules gave it after it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeOutcome {
    pub node: String,
    pub success: bool,
    /// Tokens it served (its accepted result's).
    pub tokens: u64,
    /// 0..=10.
    pub level: u8,
}

/// A node's record on chain (Cortensor's NodeStats / NodeReputation): counters, streaks and
/// the level the node pool reported with its last outcome (`crate::reputation`'s per-level
/// rules). The contract's own `reportTaskCompletion` moves the level by streaks instead
/// ([`deploy::UPGRADE_STREAK`] successes up, [`deploy::DOWNGRADE_STREAK`] failures down).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeStats {
    pub successes: u64,
    pub failures: u64,
    pub consecutive_successes: u64,
    pub consecutive_failures: u64,
    pub tokens: u64,
    pub level: u8,
}

impl NodeStats {
    /// `reportBatch`'s effect, for the embedded ledger.
    pub fn apply(&mut self, o: &NodeOutcome) {
        if o.success {
            self.successes = self.successes.saturating_add(1);
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
            self.tokens = self.tokens.saturating_add(o.tokens);
            if self.consecutive_successes >= deploy::UPGRADE_STREAK && self.level < 10 {
                self.level += 1;
                self.consecutive_successes = 0;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
            if self.consecutive_failures >= deploy::DOWNGRADE_STREAK && self.level > 0 {
                self.level -= 1;
                self.consecutive_failures = 0;
            }
        }
        self.level = o.level;
    }
}

/// What the network's contracts do for us, in one interface. Amounts are `u64`; a chain that
/// holds more (anyone can deposit to a session on an EVM) reports them saturated, never wrapped
/// and never by a panic (see [`evm::session_funds`]).
pub trait Chain: Send {
    fn create_session(
        &mut self,
        owner: &str,
        params: SessionParams,
        deposit: u64,
    ) -> Result<Session, ChainError>;
    fn session(&mut self, id: u64) -> Result<Option<Session>, ChainError>;
    fn sessions(&self) -> Result<Vec<Session>, ChainError>;
    fn deposit(&mut self, session_id: u64, amount: u64) -> Result<Session, ChainError>;
    /// Moves `amount` from the task's session's balance to its held funds, under the task's
    /// key, or refuses (and records nothing). A repeat for the same task changes nothing.
    /// A hold that never became a task is given back by settling the task with no charge.
    fn hold(&mut self, task: TaskKey, amount: u64) -> Result<Session, ChainError>;
    /// Holds for many tasks; on a chain, in one transaction. A hold the balance cannot cover
    /// is recorded as refused (its settlement then releases nothing); each task's hold is
    /// recorded once.
    fn hold_batch(&mut self, holds: &[HoldRequest]) -> Result<(), ChainError>;
    /// Whether a hold (made or refused) is recorded for the task.
    fn hold_recorded(&self, task: TaskKey) -> Result<bool, ChainError>;
    /// Ends a task's hold: `charge` (at most `hold`) is spent and split among `payees`, the rest
    /// goes back to the balance. Happens at most once per task; a repeat changes nothing.
    fn settle(
        &mut self,
        task: TaskKey,
        hold: u64,
        charge: u64,
        payees: &[String],
    ) -> Result<Session, ChainError>;
    /// Settles many tasks; on a chain, in one transaction. Each task still settles once.
    fn settle_batch(&mut self, batch: &[Settlement]) -> Result<(), ChainError> {
        for s in batch {
            self.settle(s.task, s.hold, s.charge, &s.payees)?;
        }
        Ok(())
    }
    /// Whether the task's settlement is on the chain.
    fn settled(&self, task: TaskKey) -> Result<bool, ChainError>;
    /// What a node has earned and not withdrawn.
    fn node_pending_payment(&self, node: &str) -> Result<u64, ChainError>;
    /// Pays a node everything it has earned, from its own wallet's request; the amount paid.
    fn withdraw_node_payment(&mut self, node: &str) -> Result<u64, ChainError>;
    /// What nodes have withdrawn, in all.
    fn total_withdrawn(&self) -> Result<u64, ChainError>;
    /// Records a finished task's stages (see [`TaskTrace`]); a repeat changes nothing.
    fn record_trace(&mut self, task: TaskKey, trace: &TaskTrace) -> Result<(), ChainError>;
    /// The stages recorded for a task, if any were.
    fn task_trace(&self, task: TaskKey) -> Result<Option<TaskTrace>, ChainError>;
    /// Adds task outcomes to the nodes' records, in order (one transaction on an EVM).
    fn report_node_outcomes(&mut self, outcomes: &[NodeOutcome]) -> Result<(), ChainError>;
    /// A node's record (zeros for a node never reported).
    fn node_stats(&self, node: &str) -> Result<NodeStats, ChainError>;
    /// Starts over after one of its calls panicked (the chain bridge calls it): drops what it
    /// keeps in memory, so the chain's own state is read afresh. Nothing to drop by default.
    fn restart(&mut self) {}
}
