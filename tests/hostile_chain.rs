//! A hostile chain: values no router made, and a chain implementation that panics. The router
//! must keep serving: amounts beyond `u64` saturate, a panicking call is an error and a
//! restart of the chain bridge, and the outbox keeps delivering. Each test ends with the test
//! kit's invariant check (nothing accepted lost, money conserved, nothing paid twice).

mod common;

use cortensor::actors::chain_bridge::GetOutboxCounts;
use cortensor::actors::chain_outbox::OutboxCounts;
use cortensor::chain::anvil::AnvilNode;
use cortensor::chain::contracts::session_payment::DepositToSessionCall;
use cortensor::chain::evm::ANVIL_DEV_KEY;
use cortensor::chain::Chain;
use cortensor::config::TestnetConfig;
use cortensor::history::History;
use cortensor::models::engine::InferenceEngine;
use cortensor::store::Store;
use cortensor::testkit::chain_cut::{ChainCut, CuttableChain};
use cortensor::testkit::invariants::{check, Ledger};
use cortensor::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use cortensor::testkit::TestnetBuilder;
use cortensor::testnet::{ChainChoice, ChainWrap, Storage, TestnetOptions, Wiring};
use ethers::abi::AbiEncode;
use ethers::types::U256;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Anvil's second development account (funded with 10 000 ether, unlocked on anvil): not the
/// router, just anyone with money.
const STRANGER: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

fn rpc(url: &str, method: &str, params: Value) -> Value {
    let v: Value = reqwest::blocking::Client::new()
        .post(url)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(v.get("error").is_none(), "{method}: {v}");
    v["result"].clone()
}

/// Polls `f` until it answers `Some`, at most `limit`.
fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_deposit_beyond_u64_on_chain_saturates_and_the_router_keeps_serving() {
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let net = TestnetBuilder::new()
        .miners(3)
        .chain(ChainChoice::Evm {
            rpc_url: anvil.url.clone(),
            private_key: ANVIL_DEV_KEY.into(),
            deployment: None,
            fund_nodes: true,
        })
        // Delivered writes are confirmed soon, so the outbox goes idle and the router reads
        // the session from the chain again (where the stranger's deposit is).
        .config("chain.confirm_after_ms = 200")
        .start()
        .unwrap();
    let sid = net.create_session(2, 1_000_000).unwrap();
    let prompt = |i: usize| {
        let (status, v) = net.post(
            &format!("/api/v1/completions/{sid}"),
            &json!({"prompt": format!("prompt {i}"), "max_tokens": 6}),
        );
        assert_eq!(status, 200, "{v}");
        let tid = v["task_id"].as_u64().expect("a task id");
        let (status, task) = net.get(&format!("/api/v1/tasks/{sid}/{tid}"));
        assert_eq!(status, 200, "{task}");
        assert_eq!(task["status"], "Completed", "{task}");
        task["charged"].as_u64().expect("a charge")
    };
    let first = prompt(1);
    assert!(first > 0);

    // Anyone may deposit to any session: 19 ether is more wei than a u64 holds.
    let nineteen_ether = U256::exp10(18) * 19;
    assert!(nineteen_ether > U256::from(u64::MAX));
    let payment = net.testnet().deployment.expect("deployed").payment;
    let data = DepositToSessionCall {
        session_id: U256::from(sid),
    }
    .encode();
    let tx = rpc(
        &anvil.url,
        "eth_sendTransaction",
        json!([{"from": STRANGER, "to": format!("{payment:?}"),
                "value": format!("0x{nineteen_ether:x}"), "data": format!("0x{}", hex::encode(data))}]),
    );
    let receipt = poll(Duration::from_secs(20), "the deposit's receipt", || {
        let r = rpc(&anvil.url, "eth_getTransactionReceipt", json!([tx]));
        (!r.is_null()).then_some(r)
    });
    assert_eq!(
        receipt["status"], "0x1",
        "the deposit went through: {receipt}"
    );

    // The router reads the session from the chain (once its outbox is idle): every read
    // answers 200, and the session's total saturates at u64::MAX instead of crashing the
    // chain's thread.
    let view = poll(
        Duration::from_secs(30),
        "the deposit in the session",
        || {
            let (status, v) = net.get(&format!("/api/v1/sessions/{sid}"));
            assert_eq!(status, 200, "reading the session: {v}");
            (v["deposit"].as_u64() == Some(u64::MAX)).then_some(v)
        },
    );
    assert_eq!(view["spent"].as_u64(), Some(first), "{view}");
    assert_eq!(view["held"].as_u64(), Some(0), "{view}");
    assert_eq!(view["balance"].as_u64(), Some(u64::MAX - first), "{view}");
    let (status, all) = net.get("/api/v1/sessions");
    assert_eq!(status, 200, "listing sessions: {all}");

    // A prompt is still served, and settled on the chain.
    let second = prompt(2);
    let view = poll(Duration::from_secs(30), "the second settlement", || {
        let (status, v) = net.get(&format!("/api/v1/sessions/{sid}"));
        assert_eq!(status, 200, "reading the session: {v}");
        (v["spent"].as_u64() == Some(first + second) && v["held"].as_u64() == Some(0)).then_some(v)
    });
    assert_eq!(view["deposit"].as_u64(), Some(u64::MAX), "{view}");

    let report = net.finish(Duration::from_secs(60));
    eprint!("{report}");
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.checked.accepted, 2, "{report}");
}

#[test]
fn a_panicking_chain_restarts_the_bridge_and_the_outbox_keeps_delivering() {
    let dir = tempfile::tempdir().unwrap();
    let config = TestnetConfig::from_toml_str(
        "nodes.miners = 3\nnodes.validators = 1\nnodes.probes_required = 0\nqueue.tick_ms = 10\n\
         chain.confirm_after_ms = 100",
        "the test's configuration",
    )
    .unwrap();
    let validators = config.nodes.validators;
    let engine: cortensor::actors::miner::EngineFactory = Arc::new(|_: &str| {
        Ok(Box::new(ScriptedEngine::new(Script::default())) as Box<dyn InferenceEngine>)
    });
    // The embedded ledger behind the test kit's switch; wrapped, the bridge keeps an outbox
    // as it does on an EVM.
    let cut = ChainCut::default();
    let wrap: ChainWrap = {
        let cut = cut.clone();
        Arc::new(move |inner: Box<dyn Chain>| {
            Box::new(CuttableChain::new(inner, cut.clone())) as Box<dyn Chain>
        })
    };
    let history = History::new();
    let net = common::start_with(TestnetOptions {
        config,
        engine,
        model: SCRIPTED_MODEL.to_string(),
        storage: Storage::Dir(dir.path().to_path_buf()),
        faults: HashMap::new(),
        http_workers: 2,
        chain: ChainChoice::Embedded,
        embedding_model: None,
        wiring: Wiring {
            chain: Some(wrap),
            history: Some(history.clone()),
            ..Wiring::default()
        },
        node_listener: None,
        tls: None,
    });
    let outbox = |net: &common::Net| -> OutboxCounts {
        block_on(net.testnet.actors.chain.send(GetOutboxCounts)).expect("the bridge answers")
    };
    let sid = net.session(2, 100_000);

    // The chain panics when the outbox delivers the next holds, and again at the next
    // settlements: both inside the bridge's drain loop.
    cut.panic_once_in("hold_batch");
    cut.panic_once_in("settle_batch");
    let mut charged = 0;
    for i in 0..4 {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": format!("p{i}"), "max_tokens": 5}),
        );
        assert_eq!(status, 200, "prompt {i}: {v}");
        let task = net.task(sid, v["task_id"].as_u64().unwrap());
        assert_eq!(task["status"], "Completed", "{task}");
        charged += task["charged"].as_u64().unwrap();
    }
    assert!(charged > 0);
    net.wait_for(
        Duration::from_secs(30),
        "both panics and the outbox drained",
        |n| {
            let c = outbox(n);
            cut.panicked.load(Ordering::SeqCst) == 2 && c.pending == 0 && c.unconfirmed == 0
        },
    );
    // Every hold and settlement reached the chain behind the switch.
    let view = net.session_view(sid);
    assert_eq!(
        (view["held"].as_u64(), view["spent"].as_u64()),
        (Some(0), Some(charged)),
        "{view}"
    );
    // And the bridge still answers after its restarts: one more prompt, settled.
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "after", "max_tokens": 5}),
    );
    assert_eq!(status, 200, "{v}");
    charged += net.task(sid, v["task_id"].as_u64().unwrap())["charged"]
        .as_u64()
        .unwrap();
    net.wait_for(Duration::from_secs(30), "the last settlement", |n| {
        outbox(n).pending == 0 && n.session_view(sid)["spent"].as_u64() == Some(charged)
    });

    // The invariants, over the history and the store the network left.
    let mut payees = net.testnet.miner_ids.clone();
    payees.extend((0..validators).map(|i| format!("validator-{}", i + 1)));
    net.testnet.shutdown();
    let store = Store::open(dir.path()).unwrap();
    let ledger = Ledger::from_store(&store, &payees).unwrap();
    let (checked, violations) = check(&history.operations(), &store, &ledger);
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(checked.accepted, 5, "{checked:?}");
}

#[test]
fn session_funds_beyond_u64_saturate_and_still_add_up() {
    use cortensor::chain::evm::{saturating_u64, session_funds};
    let max = U256::from(u64::MAX);
    let huge = U256::exp10(18) * 19;
    assert_eq!(saturating_u64(huge), u64::MAX);
    assert_eq!(saturating_u64(U256::MAX), u64::MAX);
    assert_eq!(saturating_u64(U256::from(7)), 7);
    // Within u64: exact.
    assert_eq!(
        session_funds(U256::from(5), U256::from(3), U256::from(2)),
        (5, 3, 2, 10)
    );
    // A balance beyond u64: the total saturates, held and spent stay exact.
    assert_eq!(
        session_funds(huge, U256::from(3), U256::from(2)),
        (u64::MAX - 5, 3, 2, u64::MAX)
    );
    // Everything beyond u64 at once: still no overflow, still deposit = the sum.
    let (balance, held, spent, deposit) = session_funds(U256::MAX, U256::MAX, max + 1);
    assert_eq!((balance, held, spent, deposit), (0, 0, u64::MAX, u64::MAX));
    let (balance, held, spent, deposit) = session_funds(huge, huge, U256::from(1));
    assert_eq!((balance, held, spent), (0, u64::MAX - 1, 1));
    assert_eq!(deposit, balance + held + spent);
}
