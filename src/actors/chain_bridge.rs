//! The bridge to the chain: one actor owns the [`Chain`] implementation, so every session and
//! balance change is serialized through it. The embedded ledger answers in microseconds (its
//! only flushes are for session creation and deposits). On an EVM the bridge runs on an
//! arbiter of its own and has an [`Outbox`]: holds and settlements are persisted first and
//! delivered by a drain loop, retried with back-off while the chain does not answer.
//!
//! **The bridge survives its chain.** Every call into the [`Chain`] is guarded: a panic inside
//! it (a bug, or a value from the chain it cannot handle) answers that call with an error and
//! restarts the bridge's state (the chain's and the outbox's caches), and the actor, its
//! mailbox and the outbox's drain loop carry on. Without the guard a panic would end the actor
//! and every later hold, settlement and session read would fail.

use super::chain_outbox::{Outbox, OutboxCounts};
use crate::chain::{
    panic_message, Chain, ChainError, NodeOutcome, NodeStats, Settlement, TaskTrace,
};
use crate::session::{Session, SessionParams};
use crate::store::Store;
use crate::task::TaskKey;
use actix::prelude::*;
use std::time::{Duration, Instant};

/// How often the outbox is drained.
pub const OUTBOX_DRAIN_EVERY: Duration = Duration::from_millis(50);
/// Longest pause between delivery attempts after failures (doubling from the drain period).
pub const OUTBOX_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often nodes' task outcomes go on chain (one transaction each time on an EVM).
pub const REPORT_OUTCOMES_EVERY: Duration = Duration::from_millis(500);
/// Outcomes waiting at most; the oldest are dropped past it (the pool's own reputation, which
/// selection uses, is unaffected: the chain's record is a summary).
pub const MAX_PENDING_OUTCOMES: usize = 10_000;

pub struct ChainBridge {
    chain: Box<dyn Chain>,
    outbox: Option<Outbox>,
    failures: u32,
    next_attempt: Instant,
    outcomes: std::collections::VecDeque<NodeOutcome>,
    /// Panics caught in chain calls (each one restarted the bridge's state).
    restarts: u64,
}

impl ChainBridge {
    pub fn new(chain: Box<dyn Chain>) -> Self {
        Self {
            chain,
            outbox: None,
            failures: 0,
            next_attempt: Instant::now(),
            outcomes: std::collections::VecDeque::new(),
            restarts: 0,
        }
    }

    /// Runs one call into the chain. A panic inside it is caught here and answered as an
    /// error; the chain and the outbox drop what they keep in memory (they read the chain
    /// afresh), so the next call starts clean.
    fn guarded<T>(
        &mut self,
        what: &'static str,
        call: impl FnOnce(&mut Self) -> Result<T, ChainError>,
    ) -> Result<T, ChainError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(self))) {
            Ok(answer) => answer,
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                self.restarts += 1;
                tracing::error!(what, panic = %message, restarts = self.restarts, "the chain panicked; the chain bridge restarts");
                self.chain.restart();
                if let Some(outbox) = self.outbox.as_mut() {
                    outbox.restart();
                }
                Err(ChainError::Evm(format!(
                    "the chain panicked in {what}: {message}"
                )))
            }
        }
    }

    /// Sends the waiting task outcomes in one report; on failure they wait for the next.
    fn report_outcomes(&mut self) {
        if self.outcomes.is_empty() {
            return;
        }
        let batch: Vec<NodeOutcome> = self.outcomes.iter().cloned().collect();
        match self.guarded("report_node_outcomes", |b| {
            b.chain.report_node_outcomes(&batch)
        }) {
            Ok(()) => self.outcomes.clear(),
            Err(e) => {
                tracing::warn!(error = %e, pending = batch.len(), "nodes' outcomes not recorded on chain; retrying")
            }
        }
    }

    /// A bridge whose holds and settlements go through a persisted outbox in `store`,
    /// confirmed `confirm_after` after delivery (see [`Outbox`]).
    pub fn with_outbox(chain: Box<dyn Chain>, store: Store, confirm_after: Duration) -> Self {
        Self {
            outbox: Some(Outbox::new(store, confirm_after)),
            ..Self::new(chain)
        }
    }

    /// One drain step, if it is time to try.
    fn drain(&mut self) {
        if self.outbox.is_none() || Instant::now() < self.next_attempt {
            return;
        }
        let delivered = self.guarded("the outbox's delivery", |b| match b.outbox.as_mut() {
            Some(outbox) => outbox.deliver(b.chain.as_mut()),
            None => Ok(()),
        });
        let Some(outbox) = self.outbox.as_ref() else {
            return;
        };
        match delivered {
            Ok(()) => {
                if self.failures > 0 {
                    tracing::info!(failures = self.failures, "the chain answers again");
                }
                self.failures = 0;
            }
            Err(e) => {
                self.failures += 1;
                let backoff = (OUTBOX_DRAIN_EVERY * 2u32.saturating_pow(self.failures.min(10)))
                    .min(OUTBOX_MAX_BACKOFF);
                let pending = outbox.counts().pending;
                tracing::warn!(error = %e, pending, ?backoff, "the chain does not take the outbox; retrying");
                self.next_attempt = Instant::now() + backoff;
            }
        }
    }
}

impl Actor for ChainBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.outbox.is_some() {
            ctx.run_interval(OUTBOX_DRAIN_EVERY, |bridge, _| bridge.drain());
        }
        ctx.run_interval(REPORT_OUTCOMES_EVERY, |bridge, _| bridge.report_outcomes());
    }

    fn stopping(&mut self, _: &mut Context<Self>) -> Running {
        self.report_outcomes();
        Running::Stop
    }
}

/// Nodes' task outcomes for their records on chain (from the node pool, in batches).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReportOutcomes(pub Vec<NodeOutcome>);

impl Handler<ReportOutcomes> for ChainBridge {
    type Result = ();
    fn handle(&mut self, m: ReportOutcomes, _: &mut Context<Self>) {
        self.outcomes.extend(m.0);
        while self.outcomes.len() > MAX_PENDING_OUTCOMES {
            self.outcomes.pop_front();
        }
    }
}

/// A node's record on chain.
#[derive(Message)]
#[rtype(result = "Result<NodeStats, ChainError>")]
pub struct GetNodeStats(pub String);

impl Handler<GetNodeStats> for ChainBridge {
    type Result = Result<NodeStats, ChainError>;
    fn handle(&mut self, m: GetNodeStats, _: &mut Context<Self>) -> Self::Result {
        self.guarded("node_stats", |b| b.chain.node_stats(&m.0))
    }
}

#[derive(Message)]
#[rtype(result = "OutboxCounts")]
pub struct GetOutboxCounts;

impl Handler<GetOutboxCounts> for ChainBridge {
    type Result = OutboxCounts;
    fn handle(&mut self, _: GetOutboxCounts, _: &mut Context<Self>) -> OutboxCounts {
        self.outbox.as_ref().map(Outbox::counts).unwrap_or_default()
    }
}

#[derive(Message)]
#[rtype(result = "Result<Session, ChainError>")]
pub struct CreateSession {
    pub owner: String,
    pub params: SessionParams,
    pub deposit: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Option<Session>, ChainError>")]
pub struct GetSession(pub u64);

#[derive(Message)]
#[rtype(result = "Result<Vec<Session>, ChainError>")]
pub struct ListSessions;

#[derive(Message)]
#[rtype(result = "Result<Session, ChainError>")]
pub struct Hold {
    pub task: TaskKey,
    pub amount: u64,
}

/// Settles a task (through the outbox when there is one).
#[derive(Message)]
#[rtype(result = "Result<(), ChainError>")]
pub struct Settle {
    pub task: TaskKey,
    pub hold: u64,
    pub charge: u64,
    pub payees: Vec<String>,
    /// Its stages, when its session records them all.
    pub trace: Option<TaskTrace>,
}

#[derive(Message)]
#[rtype(result = "Result<u64, ChainError>")]
pub struct NodePendingPayment(pub String);

/// The stages the chain recorded for a task.
#[derive(Message)]
#[rtype(result = "Result<Option<TaskTrace>, ChainError>")]
pub struct GetTaskTrace(pub TaskKey);

/// Where a task stands on the chain: (its hold is recorded, it is settled).
#[derive(Message)]
#[rtype(result = "Result<(bool, bool), ChainError>")]
pub struct TaskOnChain(pub TaskKey);

impl Handler<TaskOnChain> for ChainBridge {
    type Result = Result<(bool, bool), ChainError>;
    fn handle(&mut self, m: TaskOnChain, _: &mut Context<Self>) -> Self::Result {
        self.guarded("the task's state", |b| {
            Ok((b.chain.hold_recorded(m.0)?, b.chain.settled(m.0)?))
        })
    }
}

impl Handler<CreateSession> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: CreateSession, _: &mut Context<Self>) -> Self::Result {
        self.guarded("create_session", |b| {
            let session = b.chain.create_session(&m.owner, m.params, m.deposit)?;
            if let Some(outbox) = b.outbox.as_mut() {
                outbox.created(&session)?;
            }
            Ok(session)
        })
    }
}

impl Handler<GetSession> for ChainBridge {
    type Result = Result<Option<Session>, ChainError>;
    fn handle(&mut self, m: GetSession, _: &mut Context<Self>) -> Self::Result {
        self.guarded("session", |b| match b.outbox.as_mut() {
            Some(outbox) => outbox.session(b.chain.as_mut(), m.0),
            None => b.chain.session(m.0),
        })
    }
}

impl Handler<ListSessions> for ChainBridge {
    type Result = Result<Vec<Session>, ChainError>;
    fn handle(&mut self, _: ListSessions, _: &mut Context<Self>) -> Self::Result {
        self.guarded("sessions", |b| match b.outbox.as_ref() {
            Some(outbox) => outbox.sessions(b.chain.as_ref()),
            None => b.chain.sessions(),
        })
    }
}

impl Handler<Hold> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: Hold, _: &mut Context<Self>) -> Self::Result {
        self.guarded("hold", |b| match b.outbox.as_mut() {
            // Durable with the queue's flush that acknowledges the task.
            Some(outbox) => outbox.hold(b.chain.as_mut(), m.task, m.amount),
            None => b.chain.hold(m.task, m.amount),
        })
    }
}

impl Handler<Settle> for ChainBridge {
    type Result = Result<(), ChainError>;
    fn handle(&mut self, m: Settle, _: &mut Context<Self>) -> Self::Result {
        let settlement = Settlement {
            task: m.task,
            hold: m.hold,
            charge: m.charge,
            payees: m.payees,
            trace: m.trace,
        };
        self.guarded("settle", |b| match b.outbox.as_mut() {
            // Durable with the queue's flush that follows this answer.
            Some(outbox) => outbox.settle(settlement),
            None => {
                if let Some(trace) = &settlement.trace {
                    b.chain.record_trace(settlement.task, trace)?;
                }
                b.chain
                    .settle(
                        settlement.task,
                        settlement.hold,
                        settlement.charge,
                        &settlement.payees,
                    )
                    .map(|_| ())
            }
        })
    }
}

impl Handler<NodePendingPayment> for ChainBridge {
    type Result = Result<u64, ChainError>;
    fn handle(&mut self, m: NodePendingPayment, _: &mut Context<Self>) -> Self::Result {
        self.guarded("node_pending_payment", |b| {
            b.chain.node_pending_payment(&m.0)
        })
    }
}

impl Handler<GetTaskTrace> for ChainBridge {
    type Result = Result<Option<TaskTrace>, ChainError>;
    fn handle(&mut self, m: GetTaskTrace, _: &mut Context<Self>) -> Self::Result {
        self.guarded("task_trace", |b| b.chain.task_trace(m.0))
    }
}
