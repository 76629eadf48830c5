//! Seeded fault scenarios (`cortensor::testkit::scenario`): at least 100 seeds a run, each a
//! network of scripted miners under a random fault plan, with the invariants checked at the
//! end. A failure prints each failing seed and the command that replays it. The seeds start at
//! a random base (printed) unless CORTENSOR_FAULT_SEEDS sets it.
//!
//! Also: the invariant checker itself catches what it claims to catch.

use cortensor::history::Operation;
use cortensor::models::engine::FinishReason;
use cortensor::store::Store;
use cortensor::task::{TaskKey, TaskResult, TaskState};
use cortensor::testkit::invariants::{check, Ledger};
use cortensor::testkit::scenario::{replay_command, run};
use cortensor::testkit::{Fault, FaultPlan, TestnetBuilder};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SEEDS: u64 = 100;
const THREADS: u64 = 2;

#[test]
fn a_hundred_seeded_fault_scenarios_keep_every_invariant() {
    let base: u64 = std::env::var("CORTENSOR_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u32>() as u64 * 1000);
    eprintln!(
        "fault scenarios: seeds {base}..{} (set CORTENSOR_FAULT_SEEDS={base} to repeat them)",
        base + SEEDS
    );
    let started = Instant::now();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let reports = reports.clone();
            std::thread::spawn(move || {
                for seed in (base + t..base + SEEDS).step_by(THREADS as usize) {
                    let report = run(seed).map_err(|e| e.to_string());
                    reports.lock().unwrap().push((seed, report));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a scenario thread");
    }
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len() as u64, SEEDS);
    let mut failures = Vec::new();
    let (mut accepted, mut scheduled, mut link, mut refused, mut restarts) = (0, 0, 0u64, 0u64, 0);
    let (mut lost, mut double_paid, mut resumed) = (0, 0, 0);
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (seed, report) in reports.iter() {
        for f in &FaultPlan::random(*seed, 3).schedule {
            *kinds.entry(fault_kind(&f.fault)).or_default() += 1;
        }
        match report {
            Err(e) => failures.push(format!(
                "seed {seed}: the scenario did not run: {e}\n  replay: {}",
                replay_command(*seed)
            )),
            Ok(r) => {
                accepted += r.checked.accepted;
                scheduled += r.scheduled_faults;
                link += r.link_faults;
                refused += r.chain_calls_refused;
                restarts += r.restarts;
                lost += r.checked.lost;
                double_paid += r.checked.double_paid;
                resumed += r.checked.resumed;
                for (state, n) in &r.checked.ended_by_state {
                    *ends.entry(state.clone()).or_default() += n;
                }
                if !r.violations.is_empty() {
                    failures.push(format!(
                        "{r}{}  replay: {}",
                        FaultPlan::random(*seed, 3),
                        replay_command(*seed)
                    ));
                }
            }
        }
    }
    eprintln!(
        "fault scenarios: {SEEDS} seeds in {:.0} s; {accepted} tasks accepted, ends {ends:?}; \
         {scheduled} scheduled faults {kinds:?}; {link} link faults (drops, duplicates, delays, \
         corruptions); {refused} chain calls refused; {restarts} network restarts, {resumed} tasks \
         resumed; lost {lost}, double-paid {double_paid}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {SEEDS} seeds broke an invariant:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        accepted > 0 && scheduled > 0 && link > 0,
        "the scenarios exercised nothing"
    );
}

fn fault_kind(f: &Fault) -> &'static str {
    match f {
        Fault::CrashMiner { .. } => "crash miner",
        Fault::PanicEngine { .. } => "panic engine",
        Fault::StallMiner { .. } => "stall miner",
        Fault::CorruptResults { .. } => "corrupt results",
        Fault::CutChain { .. } => "cut chain",
        Fault::FailStoreWrites { .. } => "fail store writes",
        Fault::SlowStore { .. } => "slow store",
        Fault::RestartNetwork => "restart network",
    }
}

/// Replays one seed (CORTENSOR_FAULT_SEED, else seed 1) and shows its plan and report.
#[test]
fn replay_one_seed() {
    let seed: u64 = std::env::var("CORTENSOR_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    eprint!("{}", FaultPlan::random(seed, 3));
    let report = run(seed).expect("the scenario runs");
    eprint!("{report}");
    assert!(report.violations.is_empty(), "{report}");
}

/// Every kind of scheduled fault, one after another, on one network with real clients: the
/// invariants still hold and every accepted task ends.
#[test]
fn every_fault_kind_in_one_run() {
    let plan = FaultPlan {
        schedule: vec![],
        ..FaultPlan::calm(42)
    };
    let mut net = TestnetBuilder::new().faults(plan).start().unwrap();
    let sid = net.create_session(2, 1_000_000).unwrap();
    let faults = [
        Fault::CrashMiner { miner: 0 },
        Fault::PanicEngine { miner: 1, times: 1 },
        Fault::StallMiner {
            miner: 2,
            for_: Duration::from_millis(500),
        },
        Fault::CorruptResults {
            miner: 0,
            for_: Duration::from_millis(300),
        },
        Fault::FailStoreWrites {
            for_: Duration::from_millis(100),
        },
        Fault::SlowStore {
            delay: Duration::from_millis(150),
            for_: Duration::from_millis(2_000),
        },
        Fault::RestartNetwork,
    ];
    for fault in &faults {
        net.apply(fault).unwrap();
        let (status, v) = net.post(
            &format!("/api/v1/completions/{sid}"),
            &serde_json::json!({"prompt": format!("after {fault:?}"), "max_tokens": 8}),
        );
        if let Fault::FailStoreWrites { for_ } = fault {
            // Refused, retryably, while the store refuses writes: nothing half-accepted.
            assert_eq!(status, 503, "{v}");
            assert_eq!(v["error"]["code"], "storage_unavailable", "{v}");
            std::thread::sleep(*for_ + Duration::from_millis(50));
        } else {
            assert_eq!(status, 200, "after {fault:?}: {v}");
            assert_eq!(v["usage"]["completion_tokens"], 8, "after {fault:?}: {v}");
        }
    }
    let report = net.finish(Duration::from_secs(30));
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.restarts, 1);
    assert_eq!(report.scheduled_faults, faults.len());
}

/// On a slow disk a streamed task can end before the flush that acknowledges it (a live
/// follower is acknowledged once its task is on disk): the history then holds its end before
/// its acceptance, and the task still counts as ended.
#[test]
fn a_task_that_ends_before_its_acknowledgment_counts_as_ended() {
    let mut net = TestnetBuilder::new().start().unwrap();
    let sid = net.create_session(1, 1_000_000).unwrap();
    net.apply(&Fault::SlowStore {
        delay: Duration::from_millis(300),
        for_: Duration::from_secs(120),
    })
    .unwrap();
    let body = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/completions/{sid}", net.url()))
        .bearer_auth(net.api_key())
        .json(&serde_json::json!({"prompt": "quick", "max_tokens": 4, "stream": true}))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .unwrap();
    assert!(body.contains("[DONE]"), "{body}");
    let operations = net.history.operations();
    let position = |wanted: fn(&Operation) -> bool| operations.iter().position(wanted);
    let ended = position(|op| matches!(op, Operation::Ended { .. }));
    let accepted = position(|op| matches!(op, Operation::Accepted { .. }));
    assert!(
        ended.is_some() && accepted.is_some() && ended < accepted,
        "the task was not over before its acknowledgment: {operations:?}"
    );
    assert_eq!(net.unfinished(), vec![], "{operations:?}");
    let report = net.finish(Duration::from_secs(30));
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.checked.accepted, 1, "{report}");
}

fn result(text: &str) -> TaskResult {
    TaskResult {
        text: text.into(),
        token_ids: vec![1, 2],
        finish_reason: FinishReason::Length,
        prompt_tokens: 3,
    }
}

/// The checker is not a rubber stamp: histories that break each invariant are caught.
#[test]
fn the_checker_catches_broken_histories() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = TaskKey {
        session_id: 1,
        task_id: 1,
    };
    let r = result("hello");
    let cases: Vec<(&str, Vec<Operation>, &str)> = vec![
        (
            "accepted, never ended",
            vec![Operation::Accepted { key, hold: 10 }],
            "never ended",
        ),
        (
            "ended twice",
            vec![
                Operation::Accepted { key, hold: 10 },
                Operation::Ended {
                    key,
                    state: TaskState::Completed,
                    charged: 0,
                },
                Operation::Ended {
                    key,
                    state: TaskState::Failed,
                    charged: 0,
                },
            ],
            "ended 2 times",
        ),
        (
            "reveal without precommit",
            vec![Operation::RevealAccepted {
                key,
                miner: "m".into(),
                result: r.clone(),
            }],
            "without a precommit",
        ),
        (
            "reveal not matching its precommit",
            vec![
                Operation::Precommitted {
                    key,
                    miner: "m".into(),
                    hash: result("other").commitment_hex("m"),
                },
                Operation::RevealAccepted {
                    key,
                    miner: "m".into(),
                    result: r.clone(),
                },
            ],
            "not its precommitted",
        ),
        (
            "accepted, ended, but not in the store",
            vec![
                Operation::Accepted { key, hold: 10 },
                Operation::Ended {
                    key,
                    state: TaskState::Completed,
                    charged: 0,
                },
            ],
            "not in the store",
        ),
        (
            "a move after the end",
            vec![
                Operation::Ended {
                    key,
                    state: TaskState::Cancelled,
                    charged: 0,
                },
                Operation::Transition {
                    key,
                    from: TaskState::Queued,
                    to: TaskState::Assigned,
                },
            ],
            "moved after it ended",
        ),
    ];
    for (name, ops, expected) in cases {
        let (_, violations) = check(&ops, &store, &Ledger::default());
        assert!(
            violations.iter().any(|v| v.contains(expected)),
            "{name}: expected a violation containing {expected:?}, got {violations:?}"
        );
    }
    // A consistent history passes.
    let ok = vec![
        Operation::Precommitted {
            key,
            miner: "m".into(),
            hash: r.commitment_hex("m"),
        },
        Operation::RevealAccepted {
            key,
            miner: "m".into(),
            result: r,
        },
    ];
    let (_, violations) = check(&ok, &store, &Ledger::default());
    assert!(violations.is_empty(), "{violations:?}");
}

/// The same kit on Cortensor's contracts (the pinned anvil): link faults, a crashed miner, a
/// cut RPC and a restart, with the money invariants read back from the chain.
#[test]
fn faults_on_the_contracts_keep_the_invariants() {
    use cortensor::chain::anvil::AnvilNode;
    use cortensor::chain::evm::ANVIL_DEV_KEY;
    use cortensor::testkit::LinkFaults;
    use cortensor::testnet::ChainChoice;
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let plan = FaultPlan {
        to_queue: LinkFaults {
            drop: 0.02,
            duplicate: 0.1,
            delay: 0.3,
            delay_max: Duration::from_millis(20),
            corrupt: 0.0,
        },
        schedule: vec![cortensor::testkit::ScheduledFault {
            at: Duration::ZERO,
            fault: Fault::CutChain {
                for_: Duration::from_millis(300),
            },
        }],
        ..FaultPlan::calm(9)
    };
    let mut net = TestnetBuilder::new()
        .chain(ChainChoice::Evm {
            rpc_url: anvil.url.clone(),
            private_key: ANVIL_DEV_KEY.into(),
            deployment: None,
            fund_nodes: true,
        })
        .faults(plan)
        .start()
        .unwrap();
    let sid = net.create_session(2, 1_000_000).unwrap();
    let mut completed = 0;
    for (i, fault) in [
        Fault::CutChain {
            for_: Duration::from_millis(300),
        },
        Fault::CrashMiner { miner: 1 },
        Fault::RestartNetwork,
    ]
    .iter()
    .enumerate()
    {
        net.apply(fault).unwrap();
        let (status, v) = net.post(
            &format!("/api/v1/completions/{sid}"),
            &serde_json::json!({"prompt": format!("on chain {i}"), "max_tokens": 6}),
        );
        assert!(status == 200 || status == 503, "{status}: {v}");
        completed += (status == 200) as usize;
    }
    assert!(completed >= 2, "only {completed} of 3 completed");
    let report = net.finish(Duration::from_secs(60));
    eprint!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert!(report.checked.accepted >= 2, "{report}");
}
