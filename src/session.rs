//! Sessions: what a user opens (Cortensor's SessionV2.create parameters), its owner and its
//! balance. The ledger (`chain/`) keeps them; everything else reads copies.

use crate::validation::consensus::{Consensus, DisagreementPolicy, Levels, ValidationPlan};
use serde::{Deserialize, Serialize};

/// Most miners one session may ask for; bounds fan-out per task.
pub const MAX_NODES_PER_SESSION: u32 = 16;
/// Longest `name` and `metadata`, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_METADATA_BYTES: usize = 4096;
/// The longest reservation a session may ask for, in seconds (a year): reservations are
/// deadlines on the monotonic clock, which a longer one would overflow.
pub const MAX_RESERVE_PERIOD_S: u64 = 365 * 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "u8", into = "u8")]
pub enum SessionMode {
    #[default]
    Ephemeral,
    Hybrid,
    Dedicated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "u8", into = "u8")]
pub enum Sla {
    #[default]
    Low,
    Medium,
    High,
}

macro_rules! numbered_enum {
    ($t:ty, $what:literal, [$($n:literal => $v:expr),*]) => {
        impl TryFrom<u8> for $t {
            type Error = String;
            fn try_from(n: u8) -> Result<Self, String> {
                match n {
                    $($n => Ok($v),)*
                    _ => Err(format!(concat!($what, " must be one of 0, 1, 2, not {}"), n)),
                }
            }
        }
        impl From<$t> for u8 {
            fn from(v: $t) -> u8 {
                [$($v),*].iter().position(|x| *x == v).unwrap_or(0) as u8
            }
        }
    };
}
numbered_enum!(SessionMode, "mode (0 ephemeral, 1 hybrid, 2 dedicated)", [0 => SessionMode::Ephemeral, 1 => SessionMode::Hybrid, 2 => SessionMode::Dedicated]);
numbered_enum!(Sla, "sla (0 low, 1 medium, 2 high)", [0 => Sla::Low, 1 => Sla::Medium, 2 => Sla::High]);

fn default_one() -> u32 {
    1
}
fn default_three() -> u32 {
    3
}
fn default_reserve_period() -> u64 {
    300
}
fn default_max_task_execution_count() -> u32 {
    5
}

/// Cortensor's session parameters, in snake_case, with the documentation's example values as
/// defaults (min 1, max 3, redundant 1, validators 0, ephemeral, sla low, model 0, 300 s, 5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionParams {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub metadata: String,
    #[serde(default = "default_one")]
    pub min_num_of_nodes: u32,
    #[serde(default = "default_three")]
    pub max_num_of_nodes: u32,
    /// Miners that run each task.
    #[serde(default = "default_one")]
    pub redundant: u32,
    #[serde(default)]
    pub num_of_validator_nodes: u32,
    #[serde(default)]
    pub mode: SessionMode,
    #[serde(default)]
    pub reserve_ephemeral_nodes: bool,
    #[serde(default)]
    pub sla: Sla,
    /// Index into the network's model list (0: the testnet's model).
    #[serde(default)]
    pub model_identifier: u32,
    /// Seconds.
    #[serde(default = "default_reserve_period")]
    pub reserve_period: u64,
    /// How many times one task may be executed (its first assignment plus replacements).
    #[serde(default = "default_max_task_execution_count")]
    pub max_task_execution_count: u32,
    /// What the chain records of each task (not one of Cortensor's parameters).
    #[serde(default)]
    pub task_record: TaskRecordMode,
    /// How results are checked: `none`, `exact`, `embedding`, `likelihood`, `judge`, or a
    /// list of them (all must pass).
    #[serde(default)]
    pub validation: Levels,
    /// How agreeing results are weighed: `majority`, `reputation_weighted`,
    /// `median_of_means`.
    #[serde(default)]
    pub consensus: Consensus,
    /// When no consensus forms: `fail_hard`, `return_all`, `best_effort`.
    #[serde(default)]
    pub disagreement_policy: DisagreementPolicy,
    /// PoI: the cosine similarity to the medoid a result needs to agree (`embedding`).
    #[serde(default = "default_poi_threshold")]
    pub poi_threshold: f32,
    /// PoUW: the pooled grade (1-10) a result needs (`judge`).
    #[serde(default = "default_judge_threshold")]
    pub judge_threshold: f32,
}

/// The pooled grade a result needs under `judge` validation.
pub const DEFAULT_JUDGE_THRESHOLD: f32 = 5.0;

pub fn default_judge_threshold() -> f32 {
    DEFAULT_JUDGE_THRESHOLD
}

pub fn default_poi_threshold() -> f32 {
    crate::validation::poi::DEFAULT_POI_THRESHOLD
}

/// What the chain records of a session's tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TaskRecordMode {
    /// Each task's settlement, many tasks per transaction.
    #[default]
    Batch,
    /// Also every stage of every task (enqueue, assign, each miner's ack, precommit and
    /// commit, end) as its own transaction: full fidelity, at a transaction per stage.
    PerStage,
}

impl Default for SessionParams {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl SessionParams {
    /// How its tasks' results are validated.
    pub fn validation_plan(&self) -> ValidationPlan {
        ValidationPlan::new(
            self.validation.clone(),
            self.consensus,
            self.disagreement_policy,
            self.poi_threshold,
            self.judge_threshold,
        )
    }

    /// Checks the parameters against each other; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.len() > MAX_NAME_BYTES || self.metadata.len() > MAX_METADATA_BYTES {
            return Err(format!(
                "name may have at most {MAX_NAME_BYTES} bytes and metadata {MAX_METADATA_BYTES}"
            ));
        }
        if self.min_num_of_nodes == 0 {
            return Err("min_num_of_nodes must be at least 1".into());
        }
        if self.max_num_of_nodes < self.min_num_of_nodes {
            return Err("max_num_of_nodes must be at least min_num_of_nodes".into());
        }
        if self.max_num_of_nodes > MAX_NODES_PER_SESSION {
            return Err(format!(
                "max_num_of_nodes may be at most {MAX_NODES_PER_SESSION}"
            ));
        }
        if self.redundant == 0 || self.redundant > self.max_num_of_nodes {
            return Err("redundant must be between 1 and max_num_of_nodes".into());
        }
        if self.num_of_validator_nodes > MAX_NODES_PER_SESSION {
            return Err(format!(
                "num_of_validator_nodes may be at most {MAX_NODES_PER_SESSION}"
            ));
        }
        if self.reserve_period > MAX_RESERVE_PERIOD_S {
            return Err(format!(
                "reserve_period may be at most {MAX_RESERVE_PERIOD_S} seconds"
            ));
        }
        if self.max_task_execution_count == 0 {
            return Err("max_task_execution_count must be at least 1".into());
        }
        if !(self.poi_threshold > 0.0 && self.poi_threshold <= 1.0) {
            return Err("poi_threshold must be above 0 and at most 1".into());
        }
        if !(1.0..=10.0).contains(&self.judge_threshold) {
            return Err("judge_threshold must be between 1 and 10".into());
        }
        Ok(())
    }
}

/// A session as the ledger keeps it. Amounts are in the ledger's base unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: u64,
    /// The owner's identity (for API keys: a hash of the key, never the key).
    pub owner: String,
    pub params: SessionParams,
    pub created_at_ms: u64,
    /// Total ever deposited.
    pub deposit: u64,
    /// Available to new tasks.
    pub balance: u64,
    /// Held by running tasks.
    pub held: u64,
    /// Charged for finished tasks.
    pub spent: u64,
    pub tasks_submitted: u64,
}
