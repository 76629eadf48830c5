//! The same network on Cortensor's contracts: the testnet with `ChainChoice::Evm` on the pinned
//! anvil. Sessions, holds, settlements and node payments are on the chain; the HTTP flow is the
//! embedded default's.

mod common;

use cortensor::actors::miner::EngineFactory;
use cortensor::chain::anvil::AnvilNode;
use cortensor::chain::evm::ANVIL_DEV_KEY;
use cortensor::config::TestnetConfig;
use cortensor::models::engine::InferenceEngine;
use cortensor::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use cortensor::testnet::ChainChoice;
use serde_json::json;
use std::sync::Arc;

#[test]
fn the_testnet_runs_on_the_contracts() {
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let config =
        TestnetConfig::from_toml_str("nodes.miners = 3\nqueue.tick_ms = 10", "test").unwrap();
    let engine: EngineFactory = Arc::new(|_: &str| {
        Ok(Box::new(ScriptedEngine::new(Script::default())) as Box<dyn InferenceEngine>)
    });
    let dir = tempfile::tempdir().unwrap();
    let chain = ChainChoice::Evm {
        rpc_url: anvil.url.clone(),
        private_key: ANVIL_DEV_KEY.into(),
        deployment: None,
    };
    let net = common::start_on(
        config,
        engine,
        SCRIPTED_MODEL,
        Default::default(),
        dir.path(),
        chain,
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
    let s = net.session_view(sid);
    assert_eq!(
        (
            s["balance"].as_u64(),
            s["held"].as_u64(),
            s["spent"].as_u64()
        ),
        (Some(10_000 - 18), Some(0), Some(18))
    );
    let (_, miners) = net.get("/api/v1/miners");
    let paid: u64 = miners["nodes"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| m["pending_payment"].as_u64().unwrap())
        .sum();
    assert_eq!(paid, 18);

    // Insufficient balance is the chain's refusal, reported the same way.
    let poor = net.session(1, 5);
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": poor, "prompt": "x", "max_tokens": 10}),
    );
    assert_eq!(status, 402, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_balance");
}
