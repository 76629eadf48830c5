//! The chain outbox: on an EVM, holds and settlements are written to the store first and
//! answered at once, then delivered in order, in batches, by the chain bridge's drain loop.
//!
//! - **Admission without a round trip.** The outbox keeps a view of each session it has
//!   touched: the chain's state plus the effects of writes not yet delivered. A hold is
//!   admitted against that view, so prompts are accepted while the chain is unreachable.
//!   The view is read afresh from the chain whenever nothing is in flight.
//! - **Exactly once.** Each write is keyed by its task: the store appends it once (a marker in
//!   the same transaction), and the contracts apply a key once (`holdBatch`, `settleBatch`).
//! - **Rollbacks.** A delivered write moves to the store's delivered tree; `confirm_after`
//!   later the chain is asked whether it still has it. If not (anvil killed between two state
//!   saves, a reorganisation), it goes back into the outbox under its old sequence number,
//!   ahead of everything newer. Sessions are created on the chain directly (it numbers them)
//!   and recorded as delivered, so a lost one is created again, under the same number when
//!   nothing else took it (otherwise the error log says so).

use crate::chain::{Chain, ChainError, ChainWrite, CreatedSession, HoldRequest, Settlement};
use crate::session::Session;
use crate::store::Store;
use crate::task::{now_ms, TaskKey};
use std::collections::HashMap;
use std::time::Duration;

/// Writes delivered in one drain step at most.
pub const OUTBOX_BATCH: usize = 64;

/// Where the outbox stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, actix::MessageResponse)]
pub struct OutboxCounts {
    /// Writes waiting to be delivered.
    pub pending: usize,
    /// Delivered, not yet confirmed.
    pub unconfirmed: usize,
    /// Delivered, then lost by the chain and put back (since this process started).
    pub resent: u64,
}

pub struct Outbox {
    store: Store,
    confirm_after: Duration,
    /// Sessions as the chain will have them once the outbox is delivered.
    views: HashMap<u64, Session>,
    resent: u64,
}

impl Outbox {
    pub fn new(store: Store, confirm_after: Duration) -> Self {
        Self {
            store,
            confirm_after,
            views: HashMap::new(),
            resent: 0,
        }
    }

    pub fn counts(&self) -> OutboxCounts {
        OutboxCounts {
            pending: self.store.outbox_len(),
            unconfirmed: self.store.delivered_len(),
            resent: self.resent,
        }
    }

    fn idle(&self) -> bool {
        self.store.outbox_idle()
    }

    /// The session as it will be: read from the chain when nothing is in flight (so deposits
    /// made on the chain directly show), else the view kept here.
    pub fn session(
        &mut self,
        chain: &mut dyn Chain,
        id: u64,
    ) -> Result<Option<Session>, ChainError> {
        if let Some(view) = self.views.get(&id) {
            if !self.idle() {
                return Ok(Some(view.clone()));
            }
        }
        let Some(mut view) = chain.session(id)? else {
            return Ok(None);
        };
        // Writes still waiting (from before a restart, or while the chain is away) are not on
        // the chain yet: the view includes them.
        for (_, write) in self.store.outbox_peek::<ChainWrite>(usize::MAX)? {
            match write {
                ChainWrite::Hold(h) if h.task.session_id == id => apply_hold(&mut view, h.amount),
                ChainWrite::Settle(s) if s.task.session_id == id => {
                    apply_settlement(&mut view, s.hold, s.charge)
                }
                _ => {}
            }
        }
        self.views.insert(id, view.clone());
        Ok(Some(view))
    }

    /// Every session, with the views kept here in place of the chain's.
    pub fn sessions(&self, chain: &dyn Chain) -> Result<Vec<Session>, ChainError> {
        let mut all = chain.sessions()?;
        for s in all.iter_mut() {
            if let Some(view) = self.views.get(&s.id) {
                *s = view.clone();
            }
        }
        Ok(all)
    }

    /// Starts over after the chain panicked in one of the bridge's calls: the views are
    /// dropped and read from the chain (plus the writes still waiting) on next use. The
    /// persisted writes stay as they are: each is keyed by its task, so one that reached the
    /// chain before the panic is taken once however often it is sent.
    pub fn restart(&mut self) {
        self.views.clear();
    }

    /// A session the chain has just created: viewed from now on, and confirmed later.
    pub fn created(&mut self, session: &Session) -> Result<(), ChainError> {
        self.views.insert(session.id, session.clone());
        let write = ChainWrite::Create(CreatedSession {
            session_id: session.id,
            owner: session.owner.clone(),
            params: session.params.clone(),
            deposit: session.deposit,
        });
        // Flushed before the client hears of the session: the record must outlive a crash of
        // this process that coincides with a rollback of the chain.
        self.store.record_delivered(&write, now_ms())?;
        self.store.flush()?;
        Ok(())
    }

    /// Admits a hold against the view and appends it; a repeat for the task changes nothing.
    pub fn hold(
        &mut self,
        chain: &mut dyn Chain,
        task: TaskKey,
        amount: u64,
    ) -> Result<Session, ChainError> {
        let sid = task.session_id;
        let mut view = self
            .session(chain, sid)?
            .ok_or(ChainError::NoSuchSession(sid))?;
        if view.balance < amount {
            return Err(ChainError::InsufficientBalance {
                session_id: sid,
                needed: amount,
                available: view.balance,
            });
        }
        let write = ChainWrite::Hold(HoldRequest { task, amount });
        if self.store.outbox_push_once(&marker("hold", task), &write)? {
            apply_hold(&mut view, amount);
            self.views.insert(sid, view.clone());
        }
        Ok(view)
    }

    /// Appends a settlement (with the contract's caps applied to the view); a repeat for the
    /// task changes nothing.
    pub fn settle(&mut self, settlement: Settlement) -> Result<(), ChainError> {
        let (task, hold, charge) = (settlement.task, settlement.hold, settlement.charge);
        let write = ChainWrite::Settle(settlement);
        if self
            .store
            .outbox_push_once(&marker("settle", task), &write)?
        {
            if let Some(view) = self.views.get_mut(&task.session_id) {
                apply_settlement(view, hold, charge);
            }
        }
        Ok(())
    }

    /// One drain step: confirms delivered writes old enough, then delivers the oldest batch in
    /// order (runs of holds as one `hold_batch`, runs of settlements as the tasks' stage
    /// records and one `settle_batch`). Stops at the first failure; what was delivered before
    /// it stays delivered.
    pub fn deliver(&mut self, chain: &mut dyn Chain) -> Result<(), ChainError> {
        self.confirm(chain)?;
        let batch: Vec<(u64, ChainWrite)> = self.store.outbox_peek(OUTBOX_BATCH)?;
        let mut rest = &batch[..];
        while !rest.is_empty() {
            if let ChainWrite::Create(c) = &rest[0].1 {
                recreate(chain, c)?;
                self.store.outbox_delivered(&[rest[0].0], now_ms())?;
                rest = &rest[1..];
                continue;
            }
            let holds = matches!(rest[0].1, ChainWrite::Hold(_));
            let n = rest
                .iter()
                .take_while(|(_, w)| match w {
                    ChainWrite::Hold(_) => holds,
                    ChainWrite::Settle(_) => !holds,
                    ChainWrite::Create(_) => false,
                })
                .count();
            let (run, after) = rest.split_at(n);
            if holds {
                let reqs: Vec<HoldRequest> = run
                    .iter()
                    .filter_map(|(_, w)| match w {
                        ChainWrite::Hold(h) => Some(*h),
                        _ => None,
                    })
                    .collect();
                chain.hold_batch(&reqs)?;
            } else {
                let items: Vec<Settlement> = run
                    .iter()
                    .filter_map(|(_, w)| match w {
                        ChainWrite::Settle(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                // Stages first (a task's record ends before its settlement).
                for s in &items {
                    if let Some(trace) = &s.trace {
                        chain.record_trace(s.task, trace)?;
                    }
                }
                chain.settle_batch(&items)?;
            }
            let seqs: Vec<u64> = run.iter().map(|(seq, _)| *seq).collect();
            self.store.outbox_delivered(&seqs, now_ms())?;
            rest = after;
        }
        Ok(())
    }

    /// Checks delivered writes old enough: forgets those the chain has, puts those it lost
    /// back into the outbox.
    fn confirm(&mut self, chain: &mut dyn Chain) -> Result<(), ChainError> {
        let due_before = now_ms().saturating_sub(self.confirm_after.as_millis() as u64);
        let due: Vec<(u64, ChainWrite)> = self.store.delivered_due(due_before, OUTBOX_BATCH)?;
        let (mut kept, mut lost) = (Vec::new(), Vec::new());
        for (seq, w) in due {
            let there = match &w {
                ChainWrite::Hold(h) => chain.hold_recorded(h.task)?,
                ChainWrite::Settle(s) => chain.settled(s.task)?,
                ChainWrite::Create(c) => chain
                    .session(c.session_id)?
                    .is_some_and(|s| s.deposit >= c.deposit),
            };
            if there {
                kept.push(seq);
            } else {
                lost.push(seq);
            }
        }
        self.store.delivered_remove(&kept)?;
        if !lost.is_empty() {
            tracing::warn!(
                lost = lost.len(),
                "the chain lost writes it had taken (a rollback); sending them again"
            );
            self.store.delivered_requeue(&lost)?;
            self.resent += lost.len() as u64;
        }
        Ok(())
    }
}

/// Gives the chain a session it lost: its deposit when only that is missing, else the whole
/// session, which must come back under its old number.
fn recreate(chain: &mut dyn Chain, c: &CreatedSession) -> Result<(), ChainError> {
    match chain.session(c.session_id)? {
        Some(s) if s.deposit < c.deposit => {
            chain.deposit(c.session_id, c.deposit - s.deposit)?;
        }
        Some(_) => {}
        None => {
            let again = chain.create_session(&c.owner, c.params.clone(), c.deposit)?;
            if again.id != c.session_id {
                tracing::error!(
                    lost = c.session_id,
                    now = again.id,
                    "the chain lost a session and gave its number to another; it is session {} there now",
                    again.id
                );
            }
        }
    }
    Ok(())
}

/// A hold's effect on a session, as the chain will apply it. Saturating, as the view may
/// start from a chain's saturated amounts (a session holding more than `u64::MAX`).
fn apply_hold(view: &mut Session, amount: u64) {
    let amount = amount.min(view.balance);
    view.balance -= amount;
    view.held = view.held.saturating_add(amount);
    view.tasks_submitted = view.tasks_submitted.saturating_add(1);
}

/// A settlement's effect on a session, with the contract's caps (saturating, as above).
fn apply_settlement(view: &mut Session, hold: u64, charge: u64) {
    let released = hold.min(view.held);
    let charged = charge.min(released);
    view.held -= released;
    view.balance = view.balance.saturating_add(released - charged);
    view.spent = view.spent.saturating_add(charged);
}

fn marker(kind: &str, task: TaskKey) -> String {
    format!("outbox/{kind}/{}/{}", task.session_id, task.task_id)
}
