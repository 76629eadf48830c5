//! The invariants a network keeps whatever goes wrong, checked over a recorded [`History`] and
//! the store the network left behind (read after it stopped, so the check sees what a restart
//! would see):
//!
//! 1. Every accepted task reaches exactly one end, and the store holds that end.
//! 2. No result is paid twice: each session's spending equals what its ended tasks were
//!    charged, and the nodes' earnings add up to the spending.
//! 3. Balances are conserved: per session, deposit = balance + held + spent, and nothing stays
//!    held once every task has ended.
//! 4. No reveal is accepted without an earlier precommit of the same miner whose hash it
//!    matches (recomputed here from the revealed result).
//! 5. Nothing acknowledged is lost across restarts: each accepted task is in the store.
//!
//! [`History`]: crate::history::History

use crate::chain::{Chain, ChainError};
use crate::history::Operation;
use crate::session::Session;
use crate::store::{Store, StoreError};
use crate::task::TaskKey;
use std::collections::{BTreeMap, HashMap};

/// What the checker saw, for the figures.
#[derive(Debug, Default, Clone)]
pub struct Checked {
    pub accepted: usize,
    pub refused: usize,
    pub ended_by_state: BTreeMap<String, usize>,
    pub reveals_accepted: usize,
    pub reveals_rejected: usize,
    pub resumed: usize,
    /// Tasks paid more than once or charged without payment (the goal is zero).
    pub double_paid: usize,
    /// Accepted tasks missing from the store or never ended (the goal is zero).
    pub lost: usize,
}

/// The money side of the network once it stopped: its sessions, and what its nodes earned
/// (pending and withdrawn), read from the embedded ledger's store or from the chain.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub sessions: Vec<Session>,
    pub earned: u64,
}

impl Ledger {
    /// The embedded ledger, from its store. `payees` names every node that could have been
    /// paid (miners and validators).
    pub fn from_store(store: &Store, payees: &[String]) -> Result<Self, StoreError> {
        let mut earned = 0;
        for node in payees {
            earned += store.amount(&format!("pay/{node}"))?;
            earned += store.amount(&format!("withdrawn/{node}"))?;
        }
        Ok(Self {
            sessions: store.sessions()?,
            earned,
        })
    }

    /// Any chain (an EVM's contracts): its sessions and its nodes' payments.
    pub fn from_chain(chain: &dyn Chain, payees: &[String]) -> Result<Self, ChainError> {
        let mut earned = chain.total_withdrawn()?;
        for node in payees {
            earned += chain.node_pending_payment(node)?;
        }
        Ok(Self {
            sessions: chain.sessions()?,
            earned,
        })
    }
}

/// Checks every invariant over the history, the task records in `store` and the `ledger`;
/// the violations found (empty when all hold).
pub fn check(operations: &[Operation], store: &Store, ledger: &Ledger) -> (Checked, Vec<String>) {
    let mut seen = Checked::default();
    let mut violations = Vec::new();
    let mut accepted: BTreeMap<TaskKey, u64> = BTreeMap::new();
    let mut refused: Vec<TaskKey> = Vec::new();
    let mut ends: HashMap<TaskKey, Vec<(String, u64)>> = HashMap::new();
    // Per (task, miner): the precommitted hash since the task last (re)started.
    let mut precommits: HashMap<(TaskKey, String), String> = HashMap::new();

    for op in operations {
        match op {
            Operation::Accepted { key, hold } => {
                if accepted.insert(*key, *hold).is_some() {
                    violations.push(format!("task {key} was accepted twice"));
                }
            }
            Operation::Refused { key } => refused.push(*key),
            Operation::Transition { key, .. } => {
                if ends.contains_key(key) {
                    violations.push(format!("task {key} moved after it ended: {op:?}"));
                }
            }
            Operation::Precommitted { key, miner, hash } => {
                precommits.insert((*key, miner.clone()), hash.clone());
            }
            Operation::RevealAccepted { key, miner, result } => {
                seen.reveals_accepted += 1;
                let recomputed = format!(
                    "0x{}",
                    hex::encode(ethers::utils::keccak256(result.commitment_bytes(miner)))
                );
                match precommits.get(&(*key, miner.clone())) {
                    None => violations.push(format!(
                        "task {key}: {miner}'s reveal was accepted without a precommit"
                    )),
                    Some(hash) if *hash != recomputed => violations.push(format!(
                        "task {key}: {miner}'s reveal was accepted but hashes to {recomputed}, not its precommitted {hash}"
                    )),
                    Some(_) => {}
                }
            }
            Operation::RevealRejected { .. } => seen.reveals_rejected += 1,
            Operation::Ended {
                key,
                state,
                charged,
            } => {
                if !state.is_terminal() {
                    violations.push(format!(
                        "task {key} ended in a state that is no end: {state:?}"
                    ));
                }
                ends.entry(*key)
                    .or_default()
                    .push((state.name().to_string(), *charged));
            }
            Operation::Resumed { key } => {
                seen.resumed += 1;
                precommits.retain(|(k, _), _| k != key);
            }
        }
    }
    seen.refused = refused.len();
    for key in &refused {
        accepted.remove(key);
    }
    seen.accepted = accepted.len();

    // 1 and 5: exactly one end, and the store holds it.
    let mut charged_by_session: BTreeMap<u64, u64> = BTreeMap::new();
    for key in accepted.keys() {
        let end = ends.get(key).map(Vec::as_slice).unwrap_or(&[]);
        match end {
            [] => {
                seen.lost += 1;
                violations.push(format!("task {key} was accepted and never ended"));
            }
            [(state, _)] => {
                *seen.ended_by_state.entry(state.clone()).or_default() += 1;
            }
            many => {
                seen.double_paid += 1;
                violations.push(format!("task {key} ended {} times: {many:?}", many.len()));
            }
        }
        match store.task(*key) {
            Ok(Some(record)) => {
                if let [(state, charged)] = end {
                    if record.state.name() != state || record.charged != *charged {
                        violations.push(format!(
                            "task {key}: the store says {} (charged {}), the history says {state} (charged {charged})",
                            record.state.name(),
                            record.charged
                        ));
                    }
                }
                if record.state.name() == "Completed"
                    && record
                        .outcome
                        .as_ref()
                        .is_none_or(|o| o.result.text.is_empty())
                {
                    violations.push(format!("task {key} completed without a result"));
                }
                if let Some(why) = spans_broken(&record) {
                    violations.push(format!("task {key}: {why}"));
                }
            }
            Ok(None) => {
                seen.lost += 1;
                violations.push(format!("task {key} was accepted but is not in the store"));
            }
            Err(e) => violations.push(format!("task {key} cannot be read: {e}")),
        }
    }

    // 2 and 3: money. Every task that ended counts, accepted or not: a task its client was
    // told was refused must not have been charged either.
    for (key, end) in &ends {
        if let Some((_, charged)) = end.last() {
            *charged_by_session.entry(key.session_id).or_default() += charged;
        }
    }
    let mut spent_total = 0u64;
    for s in &ledger.sessions {
        spent_total += s.spent;
        if s.deposit != s.balance + s.held + s.spent {
            violations.push(format!(
                "session {}: deposit {} != balance {} + held {} + spent {}",
                s.id, s.deposit, s.balance, s.held, s.spent
            ));
        }
        if s.held != 0 {
            violations.push(format!(
                "session {}: {} still held after every task ended",
                s.id, s.held
            ));
        }
        let charged = charged_by_session.get(&s.id).copied().unwrap_or(0);
        if s.spent != charged {
            seen.double_paid += 1;
            violations.push(format!(
                "session {}: spent {} but its tasks were charged {charged}",
                s.id, s.spent
            ));
        }
    }
    let earned = ledger.earned;
    if earned != spent_total {
        seen.double_paid += 1;
        violations.push(format!(
            "nodes earned {earned} but sessions spent {spent_total}"
        ));
    }
    (seen, violations)
}

/// A completed task's spans must cover its output from the first token to the last, in
/// order, each made by some miner and no longer than a chunk.
fn spans_broken(record: &crate::task::TaskRecord) -> Option<String> {
    let outcome = record.outcome.as_ref()?;
    if record.state != crate::task::TaskState::Completed {
        return None;
    }
    let mut next = 0;
    for s in &record.spans {
        let too_long = record.chunk_tokens > 0 && s.to - s.from > record.chunk_tokens;
        if s.from != next || s.to < s.from || too_long || s.miners.is_empty() {
            return Some(format!("a broken span {s:?} (expected one from {next})"));
        }
        next = s.to;
    }
    let tokens = outcome.result.token_ids.len();
    (next != tokens).then(|| format!("its spans end at {next}, its output at {tokens}"))
}
