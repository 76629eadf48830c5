//! An operation log: what the session queue did, in the order it did it. Nothing in the network
//! reads it; tests hand one to a testnet (see [`crate::testkit`]) and check invariants over it
//! afterwards, across restarts (the log lives with the test, not in the process's actors).
//!
//! Recording is cheap (a mutex and a push) and bounded: past [`MAX_OPERATIONS`] the log stops
//! growing and says so, so a checker can refuse to judge a truncated history.

use crate::task::{TaskKey, TaskResult, TaskState};
use std::sync::{Arc, Mutex};

/// Operations kept at most.
pub const MAX_OPERATIONS: usize = 1_000_000;

/// One thing the queue did.
#[derive(Clone, Debug, PartialEq)]
pub enum Operation {
    /// The queue took a task and its client was (or is about to be) told so: from here on the
    /// task must reach exactly one end.
    Accepted { key: TaskKey, hold: u64 },
    /// The queue refused a task after taking it in (its write did not become durable); the
    /// client hears an error and its hold goes back.
    Refused { key: TaskKey },
    /// A task moved between two states that are not ends.
    Transition {
        key: TaskKey,
        from: TaskState,
        to: TaskState,
    },
    /// A miner's precommitted hash was recorded.
    Precommitted {
        key: TaskKey,
        miner: String,
        hash: String,
    },
    /// A miner's reveal was accepted, with the result it revealed.
    RevealAccepted {
        key: TaskKey,
        miner: String,
        result: TaskResult,
    },
    /// A miner's reveal was rejected (it did not match its precommit).
    RevealRejected { key: TaskKey, miner: String },
    /// A task ended; `charged` is what its session paid (after settlement).
    Ended {
        key: TaskKey,
        state: TaskState,
        charged: u64,
    },
    /// The queue resumed a task it found unfinished in the store (after a restart).
    Resumed { key: TaskKey },
}

#[derive(Default)]
struct Log {
    operations: Vec<Operation>,
    truncated: bool,
}

/// A shared, append-only log. Clones append to the same log.
#[derive(Clone, Default)]
pub struct History {
    log: Arc<Mutex<Log>>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&self, operation: Operation) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.operations.len() >= MAX_OPERATIONS {
            log.truncated = true;
            return;
        }
        log.operations.push(operation);
    }

    /// Everything recorded so far, in order.
    pub fn operations(&self) -> Vec<Operation> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .operations
            .clone()
    }

    /// Whether operations were dropped for want of room.
    pub fn truncated(&self) -> bool {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).truncated
    }
}

/// A history that may be absent: the queue records through this and pays nothing without one.
#[derive(Clone, Default)]
pub struct Recorder(Option<History>);

impl Recorder {
    pub fn new(history: Option<History>) -> Self {
        Self(history)
    }
    pub fn record(&self, operation: impl FnOnce() -> Operation) {
        if let Some(h) = &self.0 {
            h.record(operation());
        }
    }
}
