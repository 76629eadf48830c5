//! One conformance suite for both chains: the embedded `LocalLedger` and `EvmChain` on the
//! pinned anvil run the same scenario, then the same seeded random operations in lockstep,
//! agreeing on every balance and error, and conserving money throughout.

use cortensor::chain::anvil::AnvilNode;
use cortensor::chain::evm::{EvmChain, ANVIL_DEV_KEY};
use cortensor::chain::local_ledger::LocalLedger;
use cortensor::chain::node_key::NodeKey;
use cortensor::chain::{
    Chain, ChainError, HoldRequest, MinerTrace, NodeOutcome, NodeStats, Settlement, TaskTrace,
};
use cortensor::session::{SessionMode, SessionParams};
use cortensor::store::Store;
use cortensor::task::TaskKey;
use ethers::types::U256;
use rand::{Rng, SeedableRng};

fn local() -> (Box<dyn Chain>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        Box::new(LocalLedger::new(Store::open(dir.path()).unwrap())),
        dir,
    )
}

/// The nodes of the scenarios; on the EVM each has a funded wallet.
const NODES: [&str; 3] = ["m1", "m2", "m3"];

fn evm() -> (Box<dyn Chain>, AnvilNode) {
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let keys: Vec<NodeKey> = NODES.iter().map(|n| NodeKey::random(n)).collect();
    let chain = EvmChain::deploy(&anvil.url, ANVIL_DEV_KEY, 1)
        .expect("the contracts deploy")
        .with_node_keys(&keys);
    chain
        .fund_nodes(U256::exp10(18))
        .expect("node wallets funded");
    (Box::new(chain), anvil)
}

fn key(session_id: u64, task_id: u64) -> TaskKey {
    TaskKey {
        session_id,
        task_id,
    }
}

/// The scenario every implementation must pass.
fn scenario(chain: &mut dyn Chain) {
    let params = SessionParams {
        name: "s".into(),
        metadata: "m".into(),
        redundant: 2,
        mode: SessionMode::Hybrid,
        ..SessionParams::default()
    };
    let s = chain
        .create_session("owner-1", params.clone(), 1_000)
        .unwrap();
    assert_eq!(
        (s.owner.as_str(), s.balance, s.held, s.spent, s.deposit),
        ("owner-1", 1_000, 0, 0, 1_000)
    );
    assert_eq!(s.params, params);
    let id = s.id;
    assert!(matches!(
        chain.create_session(
            "o",
            SessionParams {
                redundant: 0,
                ..params.clone()
            },
            0
        ),
        Err(ChainError::InvalidParams(_))
    ));

    let s = chain.hold(key(id, 1), 300).unwrap();
    assert_eq!((s.balance, s.held), (700, 300));
    // A repeat for the same task changes nothing.
    let s = chain.hold(key(id, 1), 300).unwrap();
    assert_eq!((s.balance, s.held), (700, 300));
    match chain.hold(key(id, 9), 800) {
        Err(ChainError::InsufficientBalance {
            session_id,
            needed,
            available,
        }) => assert_eq!((session_id, needed, available), (id, 800, 700)),
        other => panic!("expected InsufficientBalance, got {other:?}"),
    }
    assert!(!chain.hold_recorded(key(id, 9)).unwrap());
    assert!(chain.hold_recorded(key(id, 1)).unwrap());
    let s = chain
        .settle(key(id, 1), 300, 121, &["m1".into(), "m2".into()])
        .unwrap();
    assert_eq!((s.balance, s.held, s.spent), (879, 0, 121));
    assert_eq!(chain.node_pending_payment("m1").unwrap(), 61);
    assert_eq!(chain.node_pending_payment("m2").unwrap(), 60);
    // Settling the same task again changes nothing.
    chain.hold(key(id, 2), 100).unwrap();
    let s = chain.settle(key(id, 1), 100, 100, &["m1".into()]).unwrap();
    assert_eq!((s.balance, s.held, s.spent), (779, 100, 121));
    assert_eq!(chain.node_pending_payment("m1").unwrap(), 61);
    // A hold given back: its task settled with no charge.
    let s = chain.settle(key(id, 2), 100, 0, &[]).unwrap();
    assert_eq!((s.balance, s.held), (879, 0));
    // A keyed hold releases no more than itself.
    chain.hold(key(id, 3), 50).unwrap();
    let s = chain.settle(key(id, 3), 500, 500, &["m2".into()]).unwrap();
    assert_eq!((s.balance, s.held, s.spent), (829, 0, 171));
    assert_eq!(chain.node_pending_payment("m2").unwrap(), 110);
    // Holds in a batch: one covered, one refused, one repeated.
    let batch = |task_id, amount| HoldRequest {
        task: key(id, task_id),
        amount,
    };
    chain
        .hold_batch(&[batch(4, 100), batch(5, 10_000), batch(4, 100)])
        .unwrap();
    let s = chain.session(id).unwrap().unwrap();
    assert_eq!((s.balance, s.held), (729, 100));
    assert!(chain.hold_recorded(key(id, 5)).unwrap());
    // A refused hold's settlement releases and charges nothing.
    let s = chain
        .settle(key(id, 5), 10_000, 10_000, &["m1".into()])
        .unwrap();
    assert_eq!((s.balance, s.held, s.spent), (729, 100, 171));
    let s = chain.settle(key(id, 4), 100, 0, &[]).unwrap();
    assert_eq!((s.balance, s.held), (829, 0));
    let s = chain.deposit(id, 21).unwrap();
    assert_eq!((s.balance, s.deposit), (850, 1_021));
    assert!(chain.session(9_999).unwrap().is_none());
    assert!(matches!(
        chain.hold(key(9_999, 1), 1),
        Err(ChainError::NoSuchSession(9_999))
    ));
    assert!(chain.sessions().unwrap().iter().any(|s| s.id == id));

    // Only what a node earned, once.
    assert_eq!(chain.withdraw_node_payment("m1").unwrap(), 61);
    assert_eq!(chain.node_pending_payment("m1").unwrap(), 0);
    assert!(matches!(
        chain.withdraw_node_payment("m1"),
        Err(ChainError::NothingToWithdraw(n)) if n == "m1"
    ));
    assert!(matches!(
        chain.withdraw_node_payment("m3"),
        Err(ChainError::NothingToWithdraw(_))
    ));
    assert_eq!(chain.total_withdrawn().unwrap(), 61);
    assert_eq!(chain.node_pending_payment("m2").unwrap(), 110);

    // The per-stage record: what went in comes out, and a repeat changes nothing.
    let result = br#"["four",[19],"stop",7]"#.to_vec();
    let trace = TaskTrace {
        data: b"What is 2 + 2?".to_vec(),
        miners: vec![
            MinerTrace {
                node: "m1".into(),
                acked: true,
                precommit: Some(ethers::utils::keccak256(&result)),
                commit: Some(result.clone()),
            },
            MinerTrace {
                // Replaced after its ack.
                node: "m2".into(),
                acked: true,
                precommit: None,
                commit: None,
            },
            MinerTrace {
                // Its reveal did not match: precommitted, never committed.
                node: "m3".into(),
                acked: true,
                precommit: Some([7; 32]),
                commit: None,
            },
        ],
        force_ended: false,
    };
    let task = key(id, 10);
    assert_eq!(chain.task_trace(task).unwrap(), None);
    chain.record_trace(task, &trace).unwrap();
    assert_eq!(chain.task_trace(task).unwrap().as_ref(), Some(&trace));
    let mut other = trace.clone();
    other.force_ended = true;
    chain.record_trace(task, &other).unwrap();
    assert_eq!(chain.task_trace(task).unwrap().as_ref(), Some(&trace));
    let ended = TaskTrace {
        data: TaskTrace::data_for(&"long prompt ".repeat(1_000)),
        miners: vec![],
        force_ended: true,
    };
    assert!(ended.data.starts_with(b"keccak256:"));
    chain.record_trace(key(id, 11), &ended).unwrap();
    assert_eq!(chain.task_trace(key(id, 11)).unwrap(), Some(ended));

    // Nodes' records: counters, streaks, tokens and the level the pool reported, in batches.
    assert_eq!(chain.node_stats("m3").unwrap(), NodeStats::default());
    let report = |node: &str, success: bool, tokens: u64, level: u8| NodeOutcome {
        node: node.into(),
        success,
        tokens,
        level,
    };
    let mut batch: Vec<NodeOutcome> = [0, 0, 1, 1, 2]
        .iter()
        .map(|&level| report("m1", true, 10, level))
        .collect();
    batch.push(report("m2", false, 0, 0));
    chain.report_node_outcomes(&batch).unwrap();
    chain.report_node_outcomes(&[]).unwrap();
    let m1 = chain.node_stats("m1").unwrap();
    assert_eq!(
        (m1.successes, m1.failures, m1.tokens, m1.level),
        (5, 0, 50, 2)
    );
    chain
        .report_node_outcomes(&[report("m1", false, 0, 2), report("m1", false, 0, 1)])
        .unwrap();
    let m1 = chain.node_stats("m1").unwrap();
    assert_eq!(
        (m1.successes, m1.failures, m1.consecutive_failures, m1.level),
        (5, 2, 0, 1)
    );
    let m2 = chain.node_stats("m2").unwrap();
    assert_eq!((m2.failures, m2.consecutive_failures, m2.level), (1, 1, 0));
}

#[test]
fn the_local_ledger_passes_the_scenario() {
    let (mut chain, _dir) = local();
    scenario(chain.as_mut());
}

#[test]
fn the_evm_chain_passes_the_scenario() {
    let (mut chain, _anvil) = evm();
    scenario(chain.as_mut());
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(u64, u64, u64, u64),
    NoSuchSession,
    Insufficient(u64, u64),
    Invalid,
}

fn outcome(r: Result<cortensor::session::Session, ChainError>) -> Outcome {
    match r {
        Ok(s) => Outcome::Ok(s.balance, s.held, s.spent, s.deposit),
        Err(ChainError::NoSuchSession(_)) => Outcome::NoSuchSession,
        Err(ChainError::InsufficientBalance {
            needed, available, ..
        }) => Outcome::Insufficient(needed, available),
        Err(ChainError::InvalidParams(_)) => Outcome::Invalid,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn both_chains_agree_on_random_operations_and_conserve_money() {
    let seed: u64 = std::env::var("CORTENSOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chain conformance seed: {seed} (set CORTENSOR_TEST_SEED to repeat)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut a, _dir) = local();
    let (mut b, _anvil) = evm();
    let nodes = NODES;
    let mut sessions: Vec<u64> = Vec::new();
    let mut holds: Vec<(TaskKey, u64)> = Vec::new(); // held (or refused) and not settled
    let mut next_task = 1;
    for step in 0..40 {
        let op = if sessions.is_empty() {
            0
        } else {
            rng.gen_range(0..9)
        };
        let sid = if sessions.is_empty() {
            0
        } else {
            sessions[rng.gen_range(0..sessions.len())]
        };
        let (ra, rb, what) = match op {
            0 => {
                let deposit = rng.gen_range(0..1_000);
                let p = SessionParams {
                    redundant: rng.gen_range(1..3),
                    ..SessionParams::default()
                };
                let (x, y) = (
                    a.create_session("o", p.clone(), deposit),
                    b.create_session("o", p, deposit),
                );
                if let (Ok(s), Ok(t)) = (&x, &y) {
                    assert_eq!(s.id, t.id, "seed {seed}");
                    sessions.push(s.id);
                }
                (outcome(x), outcome(y), format!("create with {deposit}"))
            }
            1 => {
                let amount = rng.gen_range(0..500);
                (
                    outcome(a.deposit(sid, amount)),
                    outcome(b.deposit(sid, amount)),
                    format!("deposit {amount} to {sid}"),
                )
            }
            2 | 3 => {
                let amount = rng.gen_range(0..600);
                let k = key(sid, next_task);
                next_task += 1;
                let (x, y) = (a.hold(k, amount), b.hold(k, amount));
                if x.is_ok() {
                    holds.push((k, amount));
                }
                (outcome(x), outcome(y), format!("hold {amount} for {k}"))
            }
            4 if !holds.is_empty() => {
                let (k, hold) = holds.remove(rng.gen_range(0..holds.len()));
                let charge = rng.gen_range(0..hold + 50);
                let payees: Vec<String> = nodes
                    .iter()
                    .filter(|_| rng.gen_bool(0.6))
                    .map(|n| n.to_string())
                    .collect();
                (
                    outcome(a.settle(k, hold, charge, &payees)),
                    outcome(b.settle(k, hold, charge, &payees)),
                    format!("settle {k} hold {hold} charge {charge} to {payees:?}"),
                )
            }
            5 if holds.len() >= 2 => {
                // Several settlements at once (one transaction on the EVM).
                let mut batch = Vec::new();
                for _ in 0..rng.gen_range(2..=holds.len().min(4)) {
                    let (k, hold) = holds.remove(rng.gen_range(0..holds.len()));
                    let payees: Vec<String> = nodes
                        .iter()
                        .filter(|_| rng.gen_bool(0.6))
                        .map(|n| n.to_string())
                        .collect();
                    batch.push(Settlement {
                        task: k,
                        hold,
                        charge: rng.gen_range(0..hold + 50),
                        payees,
                        trace: None,
                    });
                    next_task += 1;
                }
                // A repeat inside the batch is settled once.
                batch.push(batch[0].clone());
                let (x, y) = (a.settle_batch(&batch), b.settle_batch(&batch));
                assert_eq!(x.is_ok(), y.is_ok(), "seed {seed}: {x:?} vs {y:?}");
                let view = |c: &mut Box<dyn Chain>| {
                    outcome(
                        c.session(batch[0].task.session_id)
                            .unwrap()
                            .ok_or(ChainError::NoSuchSession(0)),
                    )
                };
                (
                    view(&mut a),
                    view(&mut b),
                    format!("settle a batch of {}", batch.len()),
                )
            }
            7 => {
                let node = nodes[rng.gen_range(0..nodes.len())];
                let paid = |r: Result<u64, ChainError>| match r {
                    Ok(n) => Outcome::Ok(n, 0, 0, 0),
                    Err(ChainError::NothingToWithdraw(_)) => Outcome::NoSuchSession,
                    Err(e) => panic!("unexpected error: {e}"),
                };
                (
                    paid(a.withdraw_node_payment(node)),
                    paid(b.withdraw_node_payment(node)),
                    format!("{node} withdraws"),
                )
            }
            6 => {
                // Holds in one batch, some the balance cannot cover (recorded as refused);
                // they are settled later like the others.
                let reqs: Vec<HoldRequest> = (0..rng.gen_range(1..=3))
                    .map(|_| {
                        let task = key(sid, next_task);
                        next_task += 1;
                        HoldRequest {
                            task,
                            amount: rng.gen_range(0..800),
                        }
                    })
                    .collect();
                let (x, y) = (a.hold_batch(&reqs), b.hold_batch(&reqs));
                assert_eq!(x.is_ok(), y.is_ok(), "seed {seed}: {x:?} vs {y:?}");
                holds.extend(reqs.iter().map(|r| (r.task, r.amount)));
                let view = |c: &mut Box<dyn Chain>| {
                    outcome(c.session(sid).unwrap().ok_or(ChainError::NoSuchSession(0)))
                };
                (view(&mut a), view(&mut b), format!("hold a batch {reqs:?}"))
            }
            _ if !holds.is_empty() => {
                // A hold given back (its task never ran): settled with no charge.
                let (k, hold) = holds.remove(rng.gen_range(0..holds.len()));
                (
                    outcome(a.settle(k, hold, 0, &[])),
                    outcome(b.settle(k, hold, 0, &[])),
                    format!("give back the hold of {k}"),
                )
            }
            _ => {
                let amount = rng.gen_range(0..500);
                (
                    outcome(a.deposit(sid, amount)),
                    outcome(b.deposit(sid, amount)),
                    format!("deposit {amount} to {sid}"),
                )
            }
        };
        assert_eq!(ra, rb, "step {step} ({what}) differs; seed {seed}");
        // Conservation on both: every unit deposited is in a balance, a hold, or was spent; what
        // was spent is at least what nodes are owed.
        for chain in [&a, &b] {
            let all = chain.sessions().unwrap();
            let owed: u64 = nodes
                .iter()
                .map(|n| chain.node_pending_payment(n).unwrap())
                .sum();
            let owed = owed + chain.total_withdrawn().unwrap();
            let spent: u64 = all.iter().map(|s| s.spent).sum();
            for s in &all {
                assert_eq!(
                    s.deposit,
                    s.balance + s.held + s.spent,
                    "step {step}, seed {seed}: {s:?}"
                );
            }
            assert!(
                owed <= spent,
                "step {step}, seed {seed}: owed {owed} > spent {spent}"
            );
        }
    }
    for n in nodes {
        assert_eq!(
            a.node_pending_payment(n).unwrap(),
            b.node_pending_payment(n).unwrap(),
            "payments to {n}; seed {seed}"
        );
    }
}
