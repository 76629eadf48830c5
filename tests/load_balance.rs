//! Load balance: with miners of unequal speed, selection by observed speed gives the fast
//! miner most of the work (and the router shows each miner's measured tokens/s), where round
//! robin gives each the same share. (Throughput and latency figures: `cortensor bench balance`.)

use cortensor::actors::miner::EngineFactory;
use cortensor::models::engine::InferenceEngine;
use cortensor::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use cortensor::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// miner-1 takes 2 ms a token, miner-2 8 ms.
fn network(policy: &str) -> TestNetwork {
    let factory: EngineFactory = Arc::new(|id: &str| {
        let ms = if id == "miner-2" { 8 } else { 2 };
        Ok(Box::new(ScriptedEngine::new(Script {
            length: 16,
            ..Script::slow(Duration::from_millis(ms))
        })) as Box<dyn InferenceEngine>)
    });
    TestnetBuilder::new()
        .miners(2)
        .validators(1)
        .engines(Engines::Custom {
            factory,
            model: SCRIPTED_MODEL.into(),
        })
        .config(&format!(
            "nodes.selection = \"{policy}\"\nqueue.precommit_timeout_ms = 30000\n"
        ))
        .start()
        .unwrap()
}

/// Runs `tasks` tasks, two at a time; returns each miner's tasks and the miners' view.
fn run(net: &TestNetwork, tasks: usize) -> (Vec<u64>, Value) {
    let sid = net.create_session(1, 10_000_000).unwrap();
    let (url, key) = (net.url(), net.api_key());
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (url, key) = (url.clone(), key.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                for i in 0..tasks / 2 {
                    let r = http
                        .post(format!("{url}/api/v1/completions"))
                        .bearer_auth(&key)
                        .json(&json!({"session_id": sid, "prompt": format!("w{w} t{i}"), "max_tokens": 16}))
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let nodes = net.get("/api/v1/miners").1["nodes"].clone();
    let done = (1..=2)
        .map(|i| nodes[format!("miner-{i}")]["tasks_done"].as_u64().unwrap())
        .collect();
    (done, nodes)
}

#[test]
fn selection_by_speed_favours_the_fast_miner_where_round_robin_does_not() {
    let fast_first = network("speed");
    let (done, nodes) = run(&fast_first, 40);
    let (fast, slow) = (done[0], done[1]);
    assert!(
        fast > 2 * slow,
        "by speed: the 4× faster miner did {fast} tasks, the slow one {slow}"
    );
    let speed = |m: &str| nodes[m]["tokens_per_second"].as_f64().unwrap_or(0.0);
    assert!(
        speed("miner-1") > 2.0 * speed("miner-2"),
        "observed speeds: {nodes}"
    );
    drop(fast_first);

    let turns = network("round_robin");
    let (done, _) = run(&turns, 40);
    assert!(
        done[0].abs_diff(done[1]) <= 2,
        "round robin: {done:?} tasks"
    );
}
