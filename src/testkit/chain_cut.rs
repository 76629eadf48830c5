//! A chain whose RPC a test can cut: while the switch is on, every call fails as an
//! unreachable node's would, and nothing reaches the chain behind it. The same switch can make
//! a named call panic once (a chain implementation's bug, as the chain bridge sees it):
//! nothing reaches the chain behind it either.

use crate::chain::{Chain, ChainError, HoldRequest, NodeOutcome, NodeStats, Settlement, TaskTrace};
use crate::session::{Session, SessionParams};
use crate::task::TaskKey;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The switch, shared between the test and the chain it cuts.
#[derive(Clone, Debug, Default)]
pub struct ChainCut {
    cut: Arc<AtomicBool>,
    /// Calls refused while cut.
    pub refused: Arc<AtomicU64>,
    /// Calls that are to panic, by method name (`"settle_batch"`), each entry once.
    panics: Arc<Mutex<Vec<&'static str>>>,
    /// Panics injected so far.
    pub panicked: Arc<AtomicU64>,
}

impl ChainCut {
    /// The next call of `method` (a [`Chain`] method's name) panics instead of reaching
    /// the chain.
    pub fn panic_once_in(&self, method: &'static str) {
        self.panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(method);
    }
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

pub struct CuttableChain {
    inner: Box<dyn Chain>,
    cut: ChainCut,
}

impl CuttableChain {
    pub fn new(inner: Box<dyn Chain>, cut: ChainCut) -> Self {
        Self { inner, cut }
    }
    fn reachable(&self, method: &'static str) -> Result<(), ChainError> {
        let armed = {
            let mut panics = self.cut.panics.lock().unwrap_or_else(|e| e.into_inner());
            let at = panics.iter().position(|m| *m == method);
            at.map(|i| panics.remove(i)).is_some()
        };
        if armed {
            self.cut.panicked.fetch_add(1, Ordering::SeqCst);
            panic!("an injected panic in the chain's {method}");
        }
        if self.cut.is_cut() {
            self.cut.refused.fetch_add(1, Ordering::Relaxed);
            return Err(ChainError::Unreachable(
                "the RPC is cut (an injected fault)".into(),
            ));
        }
        Ok(())
    }
}

impl Chain for CuttableChain {
    fn create_session(
        &mut self,
        owner: &str,
        params: SessionParams,
        deposit: u64,
    ) -> Result<Session, ChainError> {
        self.reachable("create_session")?;
        self.inner.create_session(owner, params, deposit)
    }
    fn session(&mut self, id: u64) -> Result<Option<Session>, ChainError> {
        self.reachable("session")?;
        self.inner.session(id)
    }
    fn sessions(&self) -> Result<Vec<Session>, ChainError> {
        self.reachable("sessions")?;
        self.inner.sessions()
    }
    fn deposit(&mut self, session_id: u64, amount: u64) -> Result<Session, ChainError> {
        self.reachable("deposit")?;
        self.inner.deposit(session_id, amount)
    }
    fn hold(&mut self, task: TaskKey, amount: u64) -> Result<Session, ChainError> {
        self.reachable("hold")?;
        self.inner.hold(task, amount)
    }
    fn hold_batch(&mut self, holds: &[HoldRequest]) -> Result<(), ChainError> {
        self.reachable("hold_batch")?;
        self.inner.hold_batch(holds)
    }
    fn hold_recorded(&self, task: TaskKey) -> Result<bool, ChainError> {
        self.reachable("hold_recorded")?;
        self.inner.hold_recorded(task)
    }
    fn settle(
        &mut self,
        task: TaskKey,
        hold: u64,
        charge: u64,
        payees: &[String],
    ) -> Result<Session, ChainError> {
        self.reachable("settle")?;
        self.inner.settle(task, hold, charge, payees)
    }
    fn settle_batch(&mut self, batch: &[Settlement]) -> Result<(), ChainError> {
        self.reachable("settle_batch")?;
        self.inner.settle_batch(batch)
    }
    fn settled(&self, task: TaskKey) -> Result<bool, ChainError> {
        self.reachable("settled")?;
        self.inner.settled(task)
    }
    fn node_pending_payment(&self, node: &str) -> Result<u64, ChainError> {
        self.reachable("node_pending_payment")?;
        self.inner.node_pending_payment(node)
    }
    fn withdraw_node_payment(&mut self, node: &str) -> Result<u64, ChainError> {
        self.reachable("withdraw_node_payment")?;
        self.inner.withdraw_node_payment(node)
    }
    fn total_withdrawn(&self) -> Result<u64, ChainError> {
        self.reachable("total_withdrawn")?;
        self.inner.total_withdrawn()
    }
    fn record_trace(&mut self, task: TaskKey, trace: &TaskTrace) -> Result<(), ChainError> {
        self.reachable("record_trace")?;
        self.inner.record_trace(task, trace)
    }
    fn task_trace(&self, task: TaskKey) -> Result<Option<TaskTrace>, ChainError> {
        self.reachable("task_trace")?;
        self.inner.task_trace(task)
    }
    fn report_node_outcomes(&mut self, outcomes: &[NodeOutcome]) -> Result<(), ChainError> {
        self.reachable("report_node_outcomes")?;
        self.inner.report_node_outcomes(outcomes)
    }
    fn node_stats(&self, node: &str) -> Result<NodeStats, ChainError> {
        self.reachable("node_stats")?;
        self.inner.node_stats(node)
    }
    fn restart(&mut self) {
        self.inner.restart();
    }
}
