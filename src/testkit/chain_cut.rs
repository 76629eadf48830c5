//! A chain whose RPC a test can cut: while the switch is on, every call fails as an
//! unreachable node's would, and nothing reaches the chain behind it.

use crate::chain::{Chain, ChainError, HoldRequest, NodeOutcome, NodeStats, Settlement, TaskTrace};
use crate::session::{Session, SessionParams};
use crate::task::TaskKey;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The switch, shared between the test and the chain it cuts.
#[derive(Clone, Debug, Default)]
pub struct ChainCut {
    cut: Arc<AtomicBool>,
    /// Calls refused while cut.
    pub refused: Arc<AtomicU64>,
}

impl ChainCut {
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
    fn reachable(&self) -> Result<(), ChainError> {
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
        self.reachable()?;
        self.inner.create_session(owner, params, deposit)
    }
    fn session(&mut self, id: u64) -> Result<Option<Session>, ChainError> {
        self.reachable()?;
        self.inner.session(id)
    }
    fn sessions(&self) -> Result<Vec<Session>, ChainError> {
        self.reachable()?;
        self.inner.sessions()
    }
    fn deposit(&mut self, session_id: u64, amount: u64) -> Result<Session, ChainError> {
        self.reachable()?;
        self.inner.deposit(session_id, amount)
    }
    fn hold(&mut self, task: TaskKey, amount: u64) -> Result<Session, ChainError> {
        self.reachable()?;
        self.inner.hold(task, amount)
    }
    fn hold_batch(&mut self, holds: &[HoldRequest]) -> Result<(), ChainError> {
        self.reachable()?;
        self.inner.hold_batch(holds)
    }
    fn hold_recorded(&self, task: TaskKey) -> Result<bool, ChainError> {
        self.reachable()?;
        self.inner.hold_recorded(task)
    }
    fn settle(
        &mut self,
        task: TaskKey,
        hold: u64,
        charge: u64,
        payees: &[String],
    ) -> Result<Session, ChainError> {
        self.reachable()?;
        self.inner.settle(task, hold, charge, payees)
    }
    fn settle_batch(&mut self, batch: &[Settlement]) -> Result<(), ChainError> {
        self.reachable()?;
        self.inner.settle_batch(batch)
    }
    fn settled(&self, task: TaskKey) -> Result<bool, ChainError> {
        self.reachable()?;
        self.inner.settled(task)
    }
    fn node_pending_payment(&self, node: &str) -> Result<u64, ChainError> {
        self.reachable()?;
        self.inner.node_pending_payment(node)
    }
    fn withdraw_node_payment(&mut self, node: &str) -> Result<u64, ChainError> {
        self.reachable()?;
        self.inner.withdraw_node_payment(node)
    }
    fn total_withdrawn(&self) -> Result<u64, ChainError> {
        self.reachable()?;
        self.inner.total_withdrawn()
    }
    fn record_trace(&mut self, task: TaskKey, trace: &TaskTrace) -> Result<(), ChainError> {
        self.reachable()?;
        self.inner.record_trace(task, trace)
    }
    fn task_trace(&self, task: TaskKey) -> Result<Option<TaskTrace>, ChainError> {
        self.reachable()?;
        self.inner.task_trace(task)
    }
    fn report_node_outcomes(&mut self, outcomes: &[NodeOutcome]) -> Result<(), ChainError> {
        self.reachable()?;
        self.inner.report_node_outcomes(outcomes)
    }
    fn node_stats(&self, node: &str) -> Result<NodeStats, ChainError> {
        self.reachable()?;
        self.inner.node_stats(node)
    }
}
