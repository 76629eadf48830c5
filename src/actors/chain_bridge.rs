//! The bridge to the chain: one actor owns the [`Chain`] implementation, so every session and
//! balance change is serialized through it. The embedded ledger answers in microseconds (its
//! only flushes are for session creation and deposits); a chain that blocks on RPC round trips
//! must run this actor on an arbiter of its own.

use crate::chain::{Chain, ChainError, Settlement, TaskTrace};
use crate::session::{Session, SessionParams};
use crate::store::Store;
use crate::task::{now_ms, TaskKey};
use actix::prelude::*;
use std::time::{Duration, Instant};

/// Settlements sent in one batch at most.
pub const OUTBOX_BATCH: usize = 64;
/// How often the outbox is drained.
pub const OUTBOX_DRAIN_EVERY: Duration = Duration::from_millis(50);
/// Longest pause between delivery attempts after failures (doubling from the drain period).
pub const OUTBOX_MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct ChainBridge {
    chain: Box<dyn Chain>,
    /// With an outbox, settlements are persisted first and delivered in batches by the drain
    /// loop (retried with back-off until the chain takes them; each task settles once there).
    outbox: Option<Store>,
    /// How long a delivered settlement waits before it is checked against the chain.
    confirm_after: Duration,
    resent: u64,
    failures: u32,
    next_attempt: Instant,
}

impl ChainBridge {
    pub fn new(chain: Box<dyn Chain>) -> Self {
        Self {
            chain,
            outbox: None,
            confirm_after: Duration::ZERO,
            resent: 0,
            failures: 0,
            next_attempt: Instant::now(),
        }
    }

    /// A bridge whose settlements go through a persisted outbox in `store`. A delivered
    /// settlement stays there until, `confirm_after` later, the chain is found to still have it;
    /// one the chain lost (a rollback) is sent again.
    pub fn with_outbox(chain: Box<dyn Chain>, store: Store, confirm_after: Duration) -> Self {
        Self {
            outbox: Some(store),
            confirm_after,
            ..Self::new(chain)
        }
    }

    /// Checks delivered settlements old enough: forgets those the chain has, puts those it
    /// lost back into the outbox (each is keyed, so sending one again cannot pay twice).
    fn confirm(&mut self) -> Result<(), ChainError> {
        let Some(store) = &self.outbox else {
            return Ok(());
        };
        let due_before = now_ms().saturating_sub(self.confirm_after.as_millis() as u64);
        let due: Vec<(u64, Settlement)> = store.delivered_due(due_before, OUTBOX_BATCH)?;
        let (mut kept, mut lost) = (Vec::new(), Vec::new());
        for (seq, s) in due {
            if self.chain.settled(s.task)? {
                kept.push(seq);
            } else {
                lost.push(seq);
            }
        }
        store.delivered_remove(&kept)?;
        if !lost.is_empty() {
            tracing::warn!(
                lost = lost.len(),
                "the chain lost settlements it had taken (a rollback); sending them again"
            );
            store.delivered_requeue(&lost)?;
            self.resent += lost.len() as u64;
        }
        Ok(())
    }

    fn failed(&mut self, e: ChainError) {
        self.failures += 1;
        let backoff = (OUTBOX_DRAIN_EVERY * 2u32.saturating_pow(self.failures.min(10)))
            .min(OUTBOX_MAX_BACKOFF);
        let pending = self.outbox.as_ref().map_or(0, Store::outbox_len);
        tracing::warn!(error = %e, pending, ?backoff, "the chain does not answer; retrying");
        self.next_attempt = Instant::now() + backoff;
    }

    /// Delivers the oldest batch of the outbox, if it is time to try.
    fn drain(&mut self) {
        let Some(store) = self.outbox.clone() else {
            return;
        };
        if Instant::now() < self.next_attempt {
            return;
        }
        if let Err(e) = self.confirm() {
            return self.failed(e);
        }
        let batch: Vec<(u64, Settlement)> = match store.outbox_peek(OUTBOX_BATCH) {
            Ok(b) if b.is_empty() => return,
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the chain outbox");
                return;
            }
        };
        let items: Vec<Settlement> = batch.iter().map(|(_, s)| s.clone()).collect();
        // Stages first (a task's record ends before its settlement), then one batch.
        let delivered = items
            .iter()
            .filter_map(|s| Some((s.task, s.trace.as_ref()?)))
            .try_for_each(|(task, trace)| self.chain.record_trace(task, trace))
            .and_then(|()| self.chain.settle_batch(&items));
        match delivered {
            Ok(()) => {
                let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
                if let Err(e) = store.outbox_delivered(&seqs, now_ms()) {
                    tracing::error!(error = %e, "cannot mark settlements delivered (they will be re-sent and skipped)");
                }
                if self.failures > 0 {
                    tracing::info!(
                        failures = self.failures,
                        "the chain takes settlements again"
                    );
                }
                self.failures = 0;
            }
            Err(e) => self.failed(e),
        }
    }
}

impl Actor for ChainBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.outbox.is_some() {
            ctx.run_interval(OUTBOX_DRAIN_EVERY, |bridge, _| bridge.drain());
        }
    }
}

/// Where the outbox stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, MessageResponse)]
pub struct OutboxCounts {
    /// Settlements waiting to be delivered.
    pub pending: usize,
    /// Delivered, not yet confirmed.
    pub unconfirmed: usize,
    /// Delivered, then lost by the chain and put back (since this bridge started).
    pub resent: u64,
}

#[derive(Message)]
#[rtype(result = "OutboxCounts")]
pub struct GetOutboxCounts;

impl Handler<GetOutboxCounts> for ChainBridge {
    type Result = OutboxCounts;
    fn handle(&mut self, _: GetOutboxCounts, _: &mut Context<Self>) -> OutboxCounts {
        OutboxCounts {
            pending: self.outbox.as_ref().map_or(0, Store::outbox_len),
            unconfirmed: self.outbox.as_ref().map_or(0, Store::delivered_len),
            resent: self.resent,
        }
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
    pub session_id: u64,
    pub amount: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Session, ChainError>")]
pub struct ReleaseHold {
    pub session_id: u64,
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

impl Handler<CreateSession> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: CreateSession, _: &mut Context<Self>) -> Self::Result {
        self.chain.create_session(&m.owner, m.params, m.deposit)
    }
}

impl Handler<GetSession> for ChainBridge {
    type Result = Result<Option<Session>, ChainError>;
    fn handle(&mut self, m: GetSession, _: &mut Context<Self>) -> Self::Result {
        self.chain.session(m.0)
    }
}

impl Handler<ListSessions> for ChainBridge {
    type Result = Result<Vec<Session>, ChainError>;
    fn handle(&mut self, _: ListSessions, _: &mut Context<Self>) -> Self::Result {
        self.chain.sessions()
    }
}

impl Handler<Hold> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: Hold, _: &mut Context<Self>) -> Self::Result {
        self.chain.hold(m.session_id, m.amount)
    }
}

impl Handler<ReleaseHold> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: ReleaseHold, _: &mut Context<Self>) -> Self::Result {
        self.chain.release_hold(m.session_id, m.amount)
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
        match &self.outbox {
            // Durable with the queue's flush that follows this answer.
            Some(store) => store
                .outbox_push(&settlement)
                .map(|_| ())
                .map_err(ChainError::from),
            None => {
                if let Some(trace) = &settlement.trace {
                    self.chain.record_trace(settlement.task, trace)?;
                }
                self.chain
                    .settle(
                        settlement.task,
                        settlement.hold,
                        settlement.charge,
                        &settlement.payees,
                    )
                    .map(|_| ())
            }
        }
    }
}

impl Handler<NodePendingPayment> for ChainBridge {
    type Result = Result<u64, ChainError>;
    fn handle(&mut self, m: NodePendingPayment, _: &mut Context<Self>) -> Self::Result {
        self.chain.node_pending_payment(&m.0)
    }
}

impl Handler<GetTaskTrace> for ChainBridge {
    type Result = Result<Option<TaskTrace>, ChainError>;
    fn handle(&mut self, m: GetTaskTrace, _: &mut Context<Self>) -> Self::Result {
        self.chain.task_trace(m.0)
    }
}
