//! The embedded ledger: the chain's semantics on the local store, with zero set-up.
//!
//! Durability: sessions and deposits are flushed before they return. Holds and settlements are
//! written without a flush: they share the store with the session queue, whose flush before it
//! acknowledges the task (or its end) makes them durable too (sled's log is ordered). A crash
//! before that flush loses the task and its hold together, or the end and its settlement
//! together, and the task is resumed and settled once.

use super::{split_payment, Chain, ChainError, HoldRequest, NodeOutcome, NodeStats, TaskTrace};
use crate::session::{Session, SessionParams};
use crate::store::Store;
use crate::task::{now_ms, TaskKey};
use std::collections::HashMap;

pub struct LocalLedger {
    store: Store,
    /// Sessions read so far; every change is written through to the store.
    cache: HashMap<u64, Session>,
}

impl LocalLedger {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cache: HashMap::new(),
        }
    }

    fn existing(&mut self, id: u64) -> Result<Session, ChainError> {
        if let Some(s) = self.cache.get(&id) {
            return Ok(s.clone());
        }
        let session = self
            .store
            .session(id)?
            .ok_or(ChainError::NoSuchSession(id))?;
        self.cache.insert(id, session.clone());
        Ok(session)
    }

    fn write(&mut self, session: &Session) -> Result<(), ChainError> {
        self.store.put_session(session)?;
        self.cache.insert(session.id, session.clone());
        Ok(())
    }

    fn save_durably(&mut self, session: &Session) -> Result<(), ChainError> {
        self.write(session)?;
        self.store.flush()?;
        Ok(())
    }
}

impl Chain for LocalLedger {
    fn create_session(
        &mut self,
        owner: &str,
        params: SessionParams,
        deposit: u64,
    ) -> Result<Session, ChainError> {
        params.validate().map_err(ChainError::InvalidParams)?;
        let session = Session {
            id: self.store.next_id("session_id")?,
            owner: owner.to_string(),
            params,
            created_at_ms: now_ms(),
            deposit,
            balance: deposit,
            held: 0,
            spent: 0,
            tasks_submitted: 0,
        };
        self.save_durably(&session)?;
        Ok(session)
    }

    fn session(&mut self, id: u64) -> Result<Option<Session>, ChainError> {
        match self.existing(id) {
            Ok(s) => Ok(Some(s)),
            Err(ChainError::NoSuchSession(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn sessions(&self) -> Result<Vec<Session>, ChainError> {
        Ok(self.store.sessions()?)
    }

    /// Takes the deposit up to a session total of `u64::MAX` (the rest is not counted), so
    /// `deposit = balance + held + spent` holds without overflow.
    fn deposit(&mut self, session_id: u64, amount: u64) -> Result<Session, ChainError> {
        let mut session = self.existing(session_id)?;
        let taken = amount.min(u64::MAX - session.deposit);
        session.deposit += taken;
        session.balance = session.balance.saturating_add(taken);
        self.save_durably(&session)?;
        Ok(session)
    }

    fn hold(&mut self, task: TaskKey, amount: u64) -> Result<Session, ChainError> {
        let session_id = task.session_id;
        let before = self.existing(session_id)?;
        let mut session = before.clone();
        if session.balance < amount {
            if self.store.task_mark(task, HOLD)?.is_some() {
                return Ok(before); // held before: nothing changes
            }
            return Err(ChainError::InsufficientBalance {
                session_id,
                needed: amount,
                available: session.balance,
            });
        }
        session.balance -= amount;
        session.held += amount;
        session.tasks_submitted += 1;
        let first_time =
            self.store
                .put_session_with_mark_once(&session, task, HOLD, &amount.to_be_bytes())?;
        if !first_time {
            return Ok(before); // held before: nothing changes
        }
        self.cache.insert(session_id, session.clone());
        Ok(session)
    }

    fn hold_batch(&mut self, holds: &[HoldRequest]) -> Result<(), ChainError> {
        for h in holds {
            match self.hold(h.task, h.amount) {
                Ok(_) => {}
                Err(ChainError::InsufficientBalance { .. }) => {
                    self.store.put_task_mark_once(h.task, HOLD, REFUSED)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn hold_recorded(&self, task: TaskKey) -> Result<bool, ChainError> {
        Ok(self.store.task_mark(task, HOLD)?.is_some())
    }

    fn settle(
        &mut self,
        task: TaskKey,
        hold: u64,
        charge: u64,
        payees: &[String],
    ) -> Result<Session, ChainError> {
        let before = self.existing(task.session_id)?;
        let mut session = before.clone();
        // A keyed hold releases no more than itself; a refused one releases nothing.
        let hold = match self.store.task_mark(task, HOLD)? {
            Some(v) if v == REFUSED => 0,
            Some(v) => hold.min(u64::from_be_bytes(
                <[u8; 8]>::try_from(&v[..]).unwrap_or([0xff; 8]),
            )),
            None => hold,
        };
        let hold = hold.min(session.held);
        let charged = charge.min(hold);
        session.held -= hold;
        session.balance += hold - charged;
        session.spent += charged;
        let payments: Vec<(String, u64)> = payees
            .iter()
            .zip(split_payment(charged, payees.len()))
            .map(|(payee, amount)| (format!("pay/{payee}"), amount))
            .collect();
        if !self
            .store
            .put_settlement_once(&session, task, SETTLED, &[1], &payments)?
        {
            return Ok(before); // settled before: nothing changes
        }
        self.cache.insert(task.session_id, session.clone());
        Ok(session)
    }

    fn settled(&self, task: TaskKey) -> Result<bool, ChainError> {
        Ok(self.store.task_mark(task, SETTLED)?.is_some())
    }

    fn node_pending_payment(&self, node: &str) -> Result<u64, ChainError> {
        Ok(self.store.amount(&format!("pay/{node}"))?)
    }

    /// The embedded ledger holds no coins: a withdrawal moves the node's earnings to its
    /// withdrawn total (durably), which is what a wallet would have received.
    fn withdraw_node_payment(&mut self, node: &str) -> Result<u64, ChainError> {
        if self.node_pending_payment(node)? == 0 {
            return Err(ChainError::NothingToWithdraw(node.to_string()));
        }
        let own = format!("withdrawn/{node}");
        let amount = self
            .store
            .move_amount(&format!("pay/{node}"), &[&own, WITHDRAWN_TOTAL])?;
        self.store.flush()?;
        Ok(amount)
    }

    fn total_withdrawn(&self) -> Result<u64, ChainError> {
        Ok(self.store.amount(WITHDRAWN_TOTAL)?)
    }

    fn record_trace(&mut self, task: TaskKey, trace: &TaskTrace) -> Result<(), ChainError> {
        let name = trace_name(task);
        if self.store.chain_record::<TaskTrace>(&name)?.is_none() {
            self.store.put_chain_record(&name, trace)?;
        }
        Ok(())
    }

    fn task_trace(&self, task: TaskKey) -> Result<Option<TaskTrace>, ChainError> {
        Ok(self.store.chain_record(&trace_name(task))?)
    }

    fn report_node_outcomes(&mut self, outcomes: &[NodeOutcome]) -> Result<(), ChainError> {
        if let Some(o) = outcomes.iter().find(|o| o.level > 10) {
            return Err(ChainError::InvalidParams(format!(
                "level {} of {} is above 10",
                o.level, o.node
            )));
        }
        let mut touched: Vec<(String, NodeStats)> = Vec::new();
        for o in outcomes {
            let i = match touched.iter().position(|(n, _)| *n == o.node) {
                Some(i) => i,
                None => {
                    touched.push((o.node.clone(), self.node_stats(&o.node)?));
                    touched.len() - 1
                }
            };
            touched[i].1.apply(o);
        }
        for (node, stats) in touched {
            self.store
                .put_chain_record(&format!("nodestats/{node}"), &stats)?;
        }
        Ok(())
    }

    fn node_stats(&self, node: &str) -> Result<NodeStats, ChainError> {
        Ok(self
            .store
            .chain_record(&format!("nodestats/{node}"))?
            .unwrap_or_default())
    }

    /// The sessions cached here are read from the store again.
    fn restart(&mut self) {
        self.cache.clear();
    }
}

const WITHDRAWN_TOTAL: &str = "withdrawn-total";

/// A refused hold's marker value (a made hold's is its amount, 8 bytes).
const REFUSED: &[u8] = b"refused";

/// The kinds of the tasks' marks in the store.
const HOLD: &str = "hold";
const SETTLED: &str = "settled";

fn trace_name(task: TaskKey) -> String {
    format!("trace/{}/{}", task.session_id, task.task_id)
}
