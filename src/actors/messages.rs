//! The typed messages actors exchange. Each actor's own requests (the queries it answers) sit
//! beside it; this file holds the ones that cross between roles: what the queue tells miners,
//! what miners report, and what subscribers (API clients) receive.

use crate::models::engine::GenerateRequest;
use crate::task::{TaskKey, TaskRecord, TaskResult, TaskState};
use actix::prelude::*;

/// Puts something between a node and the messages sent to it, given the node's id: a
/// fault-injecting link in tests (`testkit`), the identity otherwise.
pub type Wrap<M> = std::sync::Arc<dyn Fn(&str, Recipient<M>) -> Recipient<M> + Send + Sync>;

/// The queue's instructions to a miner. A miner is addressed as a `Recipient<ToMiner>`, so a
/// local actor and a proxy for a remote node look the same to the queue.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub enum ToMiner {
    /// Run this request. The miner answers `Ack` at once, later `Precommit`.
    Assign {
        key: TaskKey,
        /// The assignment's nonce: the miner signs it into every report about the task.
        nonce: u64,
        request: GenerateRequest,
        /// Report tokens as they are made (somebody follows the task live).
        stream_tokens: bool,
    },
    /// All precommits are in (or their deadline passed): reveal the result.
    Reveal { key: TaskKey },
    /// Stop working on the task and forget it.
    Cancel { key: TaskKey },
}

/// A miner's reports to the queue about one task, signed with the miner's node key over the
/// task, the miner, the assignment's nonce and the content (see `report_signing`).
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct MinerReport {
    pub key: TaskKey,
    pub miner: String,
    pub nonce: u64,
    pub kind: ReportKind,
    pub signature: Option<ethers::types::Signature>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReportKind {
    Ack,
    /// A piece of generated text, in order (`index` counts tokens from 0).
    Token {
        index: usize,
        text: String,
    },
    /// `0x`-prefixed keccak256 of the result it will reveal.
    Precommit {
        hash: String,
    },
    Commit {
        result: TaskResult,
    },
    /// It cannot do the task (its engine failed, it is busy, it is restarting).
    Failed {
        error: String,
    },
    /// The request cannot be run by any honest engine of the model (the prompt does not fit
    /// the context, it is empty): the client's fault, not the miner's.
    Refused {
        error: String,
    },
}

/// What a client following a task receives, in order; the last one is `Finished`.
#[derive(Clone, Debug)]
pub enum TaskEvent {
    State(TaskState),
    /// Text from the miner whose output is streamed (the first one to produce tokens).
    Token {
        text: String,
    },
    Finished(Box<TaskRecord>),
}

/// The session network (cognitive) tasks belong to: no client owns it and nothing is paid.
pub const NETWORK_SESSION: u64 = u64::MAX;

/// The node pool asks the queue to test a node with a network task.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Probe {
    pub miner: String,
    pub model: String,
}
