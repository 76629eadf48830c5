//! The same network on Cortensor's contracts: the testnet with `ChainChoice::Evm` on the pinned
//! anvil. Sessions, holds, settlements and node payments are on the chain; the HTTP flow is the
//! embedded default's.

mod common;

use cortensor::actors::chain_bridge::{GetOutboxCounts, GetTaskTrace};
use cortensor::actors::chain_outbox::OutboxCounts;
use cortensor::actors::miner::EngineFactory;
use cortensor::chain::anvil::AnvilNode;
use cortensor::chain::evm::{EvmChain, ANVIL_DEV_KEY};
use cortensor::chain::node_key::NodeKey;
use cortensor::chain::Chain;
use cortensor::config::TestnetConfig;
use cortensor::models::engine::InferenceEngine;
use cortensor::task::TaskKey;
use cortensor::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use cortensor::testnet::node_keys_dir;
use cortensor::testnet::ChainChoice;
use serde_json::json;
use std::sync::Arc;

#[test]
fn the_testnet_runs_on_the_contracts() {
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let dir = tempfile::tempdir().unwrap();
    let net = on_anvil(
        &anvil.url,
        "nodes.miners = 3\nqueue.tick_ms = 10",
        Script::default(),
        dir.path(),
    );
    assert!(net.testnet.deployment.is_some());
    let (_, info) = net.get("/api/v1/info");
    assert_eq!(info["chain"], "evm");

    let sid = net.session(3, 10_000);
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "on chain", "max_tokens": 6}),
    );
    assert_eq!(status, 200, "{v}");
    let task = net.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(task["status"], "Completed");
    assert_eq!(task["results"]["data"].as_array().unwrap().len(), 3);
    // 6 tokens × 3 miners × price 1, settled on the chain; the rest of the hold came back.
    assert_eq!(task["charged"], 18);
    // The router's view at once; the chain's once the outbox delivered the hold and the
    // settlement, in batches.
    let s = net.session_view(sid);
    assert_eq!(
        (
            s["balance"].as_u64(),
            s["held"].as_u64(),
            s["spent"].as_u64()
        ),
        (Some(10_000 - 18), Some(0), Some(18))
    );
    net.wait_for(
        std::time::Duration::from_secs(20),
        "the outbox delivered",
        |n| outbox_counts(n).pending == 0,
    );
    let on_chain = chain_session(&anvil.url, &net, sid);
    assert_eq!(
        (on_chain.balance, on_chain.held, on_chain.spent),
        (10_000 - 18, 0, 18)
    );
    let paid = paid_to_miners(&net);
    assert_eq!(paid, 18);

    // A session that records every stage: the chain has the prompt, each miner's ack,
    // precommit and matching commit (sent from the miner's own wallet), and the end.
    let body = json!({"name": "full record", "redundant": 2, "deposit": 10_000, "task_record": "per_stage"});
    let (status, v) = net.post("/api/v1/sessions", &body);
    assert_eq!(status, 201, "{v}");
    let full = v["session_id"].as_u64().unwrap();
    assert_eq!(net.session_view(full)["task_record"], "per_stage");
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": full, "prompt": "every stage", "max_tokens": 5}),
    );
    assert_eq!(status, 200, "{v}");
    let tid = v["task_id"].as_u64().unwrap();
    let key = TaskKey {
        session_id: full,
        task_id: tid,
    };
    let trace =
        |net: &common::Net| block_on(net.testnet.actors.chain.send(GetTaskTrace(key))).unwrap();
    net.wait_for(
        std::time::Duration::from_secs(30),
        "the task's stages on chain",
        |n| matches!(trace(n), Ok(Some(t)) if !t.miners.is_empty() && n.session_view(full)["held"] == 0),
    );
    let recorded = trace(&net).unwrap().unwrap();
    // The completions API sends the prompt as one user message.
    let asked: serde_json::Value = serde_json::from_slice(&recorded.data).unwrap();
    assert_eq!(asked, json!([{"role": "user", "content": "every stage"}]));
    assert!(!recorded.force_ended);
    let task = net.task(full, tid);
    let miners: Vec<&str> = task["results"]["miners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(recorded.miners.len(), 2, "{recorded:?}");
    for m in &recorded.miners {
        assert!(
            miners.contains(&m.node.as_str()),
            "{} not in {miners:?}",
            m.node
        );
        assert!(m.acked);
        let commit = m.commit.as_ref().expect("a commit");
        assert_eq!(m.precommit, Some(ethers::utils::keccak256(commit)));
        // The commitment names its miner, so no other miner can claim it.
        let (miner, text, ..): (String, String, Vec<u32>, String, usize) =
            serde_json::from_slice(commit).unwrap();
        assert_eq!(miner, m.node);
        assert_eq!(text, task["results"]["data"][0].as_str().unwrap());
    }

    // Clients read the same record over the API.
    let (status, v) = net.get(&format!("/api/v1/tasks/{full}/{tid}/chain"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["recorded"], true, "{v}");
    assert_eq!(v["miners"].as_array().unwrap().len(), 2, "{v}");
    for m in v["miners"].as_array().unwrap() {
        let commit = m["commit"].as_str().unwrap();
        let hash = format!(
            "0x{}",
            hex::encode(ethers::utils::keccak256(commit.as_bytes()))
        );
        assert_eq!(m["precommit_hash"], hash.as_str());
    }
    let (status, v) = net.get(&format!("/api/v1/tasks/{sid}/1/chain"));
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["per_stage"].as_bool(), v["recorded"].as_bool()),
        (Some(false), Some(false))
    );

    // A miner collects its earnings with its own key, into its own wallet.
    let miner = &net.testnet.miner_ids[0];
    let keys = node_keys_dir(dir.path());
    let own = NodeKey::load(&keys, miner).unwrap();
    assert_eq!(
        format!("{:?}", own.address()),
        net.testnet.miner_addresses[0]
    );
    let deployment = net.testnet.deployment.unwrap();
    let mut wallet = EvmChain::attach(&anvil.url, &own.private_key_hex(), deployment)
        .unwrap()
        .with_node_keys(&[own]);
    let pending = wallet.node_pending_payment(miner).unwrap();
    assert!(pending > 0, "{miner} earned nothing");
    let before = wallet.node_wallet_balance(miner).unwrap();
    assert_eq!(wallet.withdraw_node_payment(miner).unwrap(), pending);
    assert_eq!(wallet.node_pending_payment(miner).unwrap(), 0);
    let after = wallet.node_wallet_balance(miner).unwrap();
    // The payment arrived, less the gas the withdrawal cost.
    assert!(
        after + ethers::types::U256::exp10(16) > before + pending
            && after > before - ethers::types::U256::exp10(16)
    );
    assert_eq!(wallet.total_withdrawn().unwrap(), pending);

    // Insufficient balance is the chain's refusal, reported the same way.
    let poor = net.session(1, 5);
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": poor, "prompt": "x", "max_tokens": 10}),
    );
    assert_eq!(status, 402, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_balance");
}

#[test]
fn anvil_killed_mid_run_loses_no_settlement_and_repeats_none() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("anvil-state.json");
    let mut anvil = AnvilNode::start(Some(&state)).expect("anvil starts");
    let port = anvil.port;
    let slow = Script {
        length: 20,
        token_delay: Duration::from_millis(150),
        ..Script::default()
    };
    let net = Arc::new(on_anvil(
        &anvil.url,
        "nodes.miners = 3\nqueue.tick_ms = 10\nchain.confirm_after_ms = 1500",
        slow,
        &dir.path().join("data"),
    ));
    let sid = net.session(1, 100_000);
    let outbox = |net: &common::Net| outbox_counts(net).pending;
    let unconfirmed = |net: &common::Net| outbox_counts(net).unconfirmed;

    // Three tasks in flight when the chain goes away.
    let running: Vec<_> = (0..3)
        .map(|i| {
            let net = net.clone();
            std::thread::spawn(move || {
                net.post(
                    "/api/v1/completions",
                    &json!({"session_id": sid, "prompt": format!("t{i}"), "max_tokens": 20}),
                )
            })
        })
        .collect();
    for tid in 1..=3 {
        net.wait_task(sid, tid, "Acked");
    }
    // Past anvil's state interval, so the holds are in its saved state; then a crash.
    std::thread::sleep(Duration::from_millis(1_200));
    anvil.kill();

    // Meanwhile the testnet keeps serving: tasks finish and are answered, their settlements
    // wait in the outbox, reads work, and a new task is admitted against the router's view of
    // the session (its hold waits in the outbox too).
    for r in running {
        let (status, v) = r.join().unwrap();
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(outbox(&net), 3);
    assert_eq!(net.task(sid, 2)["status"], "Completed");
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "during the outage", "max_tokens": 5}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["task_id"], 4);
    assert_eq!(outbox(&net), 5, "its hold and its settlement");

    // The node comes back (same port, its saved state) and takes the settlements; it crashes
    // again at once, before it saves them, and comes back without them. Everything lands, once.
    let mut anvil = AnvilNode::start_on(port, Some(&state)).expect("anvil restarts");
    net.wait_for(Duration::from_secs(30), "the outbox drains", |n| {
        outbox(n) == 0
    });
    anvil.kill();
    let _anvil = AnvilNode::start_on(port, Some(&state)).expect("anvil restarts again");
    net.wait_for(Duration::from_secs(60), "every write confirmed", |n| {
        outbox(n) == 0 && unconfirmed(n) == 0
    });
    // Whether the second crash came before anvil saved them (usually) or after.
    eprintln!(
        "writes the crash took back and the bridge sent again: {}",
        outbox_counts(&net).resent
    );
    let charged: u64 = (1..=4)
        .map(|tid| net.task(sid, tid)["charged"].as_u64().unwrap())
        .sum();
    assert_eq!(charged, 3 * 20 + 5);
    let on_chain = chain_session(&format!("http://127.0.0.1:{port}"), &net, sid);
    assert_eq!(
        (on_chain.held, on_chain.spent, on_chain.balance),
        (0, charged, 100_000 - charged)
    );
    let paid = paid_to_miners(&net);
    assert_eq!(paid, charged);
}

/// A testnet of scripted miners (all running `script`) on fresh contracts at `rpc_url`, with
/// funded node wallets.
fn on_anvil(rpc_url: &str, overlay: &str, script: Script, data: &std::path::Path) -> common::Net {
    let config = TestnetConfig::from_toml_str(overlay, "test").unwrap();
    let engine: EngineFactory = Arc::new(move |_: &str| {
        Ok(Box::new(ScriptedEngine::new(script.clone())) as Box<dyn InferenceEngine>)
    });
    let chain = ChainChoice::Evm {
        rpc_url: rpc_url.into(),
        private_key: ANVIL_DEV_KEY.into(),
        deployment: None,
        fund_nodes: true,
    };
    common::start_on(
        config,
        engine,
        SCRIPTED_MODEL,
        Default::default(),
        data,
        chain,
    )
}

/// What the miners are owed in all, as the router reports it (read from the chain).
fn paid_to_miners(net: &common::Net) -> u64 {
    let (_, miners) = net.get("/api/v1/miners");
    miners["nodes"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| m["pending_payment"].as_u64().unwrap())
        .sum()
}

/// A session as the chain itself has it (the API shows the router's view, which includes
/// writes still in the outbox).
fn chain_session(url: &str, net: &common::Net, sid: u64) -> cortensor::session::Session {
    let deployment = net.testnet.deployment.unwrap();
    let mut reader = EvmChain::attach(url, ANVIL_DEV_KEY, deployment).unwrap();
    reader
        .session(sid)
        .unwrap()
        .expect("the session is on chain")
}

fn outbox_counts(net: &common::Net) -> OutboxCounts {
    block_on(net.testnet.actors.chain.send(GetOutboxCounts)).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

/// One JSON-RPC call to anvil.
fn rpc(url: &str, method: &str, params: serde_json::Value) -> serde_json::Value {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let v: serde_json::Value = reqwest::blocking::Client::new()
        .post(url)
        .json(&body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(v.get("error").is_none(), "{method}: {v}");
    v["result"].clone()
}

#[test]
fn writes_a_rollback_took_back_are_sent_again() {
    use std::time::Duration;
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let slow = Script {
        length: 6,
        token_delay: Duration::from_millis(100),
        ..Script::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let net = Arc::new(on_anvil(
        &anvil.url,
        "nodes.miners = 2\nqueue.tick_ms = 10\nchain.confirm_after_ms = 4000",
        slow,
        dir.path(),
    ));
    // The chain as it is before the session; everything after will be taken back.
    let snapshot = rpc(&anvil.url, "evm_snapshot", json!([]));
    let sid = net.session(2, 100_000);
    let running: Vec<_> = (0..2)
        .map(|i| {
            let net = net.clone();
            std::thread::spawn(move || {
                net.post(
                    "/api/v1/completions",
                    &json!({"session_id": sid, "prompt": format!("r{i}"), "max_tokens": 10}),
                )
            })
        })
        .collect();
    for r in running {
        let (status, v) = r.join().unwrap();
        assert_eq!(status, 200, "{v}");
    }
    let outbox = |net: &common::Net| outbox_counts(net).pending;
    let unconfirmed = |net: &common::Net| outbox_counts(net).unconfirmed;
    net.wait_for(Duration::from_secs(20), "the settlements delivered", |n| {
        outbox(n) == 0 && chain_session(&anvil.url, n, sid).held == 0
    });
    // The session, its 2 holds and 2 settlements (and the default session, if young enough).
    assert!(unconfirmed(&net) >= 5, "{:?}", outbox_counts(&net));
    // The chain takes them all back.
    assert_eq!(
        rpc(&anvil.url, "evm_revert", json!([snapshot])),
        json!(true)
    );
    let mut reader =
        EvmChain::attach(&anvil.url, ANVIL_DEV_KEY, net.testnet.deployment.unwrap()).unwrap();
    assert_eq!(
        reader.session(sid).unwrap(),
        None,
        "the revert undid the session"
    );
    net.wait_for(
        Duration::from_secs(30),
        "the writes sent again and confirmed",
        |n| outbox(n) == 0 && unconfirmed(n) == 0,
    );
    assert_eq!(outbox_counts(&net).resent, 5);
    let charged: u64 = (1..=2)
        .map(|tid| net.task(sid, tid)["charged"].as_u64().unwrap())
        .sum();
    assert_eq!(charged, 2 * 2 * 6);
    let on_chain = chain_session(&anvil.url, &net, sid);
    assert_eq!(
        (on_chain.held, on_chain.spent, on_chain.balance),
        (0, charged, 100_000 - charged)
    );
    let paid = paid_to_miners(&net);
    assert_eq!(paid, charged);
}
