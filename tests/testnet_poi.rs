//! Embedding validation (PoI) in the running network: a session with `validation: embedding`
//! accepts miners whose answers are worded differently but mean the same, flags the one that
//! does not, and pays only the agreeing miners; the same answers under exact validation fail.

mod common;

use cortensor::actors::miner::EngineFactory;
use cortensor::config::TestnetConfig;
use cortensor::models::engine::InferenceEngine;
use cortensor::models::fetch;
use cortensor::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use cortensor::testnet::{Storage, TestnetOptions};
use serde_json::json;
use std::sync::Arc;

const ANSWERS: [(&str, &str); 3] = [
    ("miner-1", "The capital of France is Paris."),
    ("miner-2", "Paris is the capital of France."),
    ("miner-3", "I like turtles, and the weather is nice today."),
];

fn network(dir: &std::path::Path, embedding: bool) -> common::Net {
    let engine: EngineFactory = Arc::new(|miner: &str| {
        let answer = ANSWERS
            .iter()
            .find(|(m, _)| *m == miner)
            .map(|(_, a)| a.to_string());
        let script = Script {
            answer,
            ..Script::default()
        };
        Ok(Box::new(ScriptedEngine::new(script)) as Box<dyn InferenceEngine>)
    });
    let embedding_model = embedding.then(|| {
        fetch::embedding_model_dir(&fetch::cache_dir())
            .expect("all-MiniLM-L6-v2 in the cache (scripts/setup fetches it)")
    });
    common::start_with(TestnetOptions {
        config: TestnetConfig::from_toml_str(
            "nodes.miners = 3\nnodes.probes_required = 0\nqueue.tick_ms = 10",
            "test",
        )
        .unwrap(),
        engine,
        model: SCRIPTED_MODEL.into(),
        storage: Storage::Dir(dir.to_path_buf()),
        faults: Default::default(),
        http_workers: 2,
        chain: Default::default(),
        embedding_model,
        wiring: Default::default(),
        node_listener: None,
        tls: None,
    })
}

fn session(net: &common::Net, validation: &str) -> u64 {
    let body =
        json!({"name": validation, "redundant": 3, "deposit": 100_000, "validation": validation});
    let (status, v) = net.post("/api/v1/sessions", &body);
    assert_eq!(status, 201, "{v}");
    v["session_id"].as_u64().unwrap()
}

#[test]
fn answers_that_mean_the_same_agree_and_a_different_one_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path(), true);
    let sid = session(&net, "embedding");
    assert_eq!(net.session_view(sid)["validation"], "embedding");
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "What is the capital of France?", "max_tokens": 16}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().trim().to_string();
    assert!(
        [ANSWERS[0].1, ANSWERS[1].1].contains(&text.as_str()),
        "accepted {text:?}"
    );
    let task = net.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(task["status"], "Completed");
    let mut agreeing: Vec<String> =
        serde_json::from_value(task["accepted"]["agreeing"].clone()).unwrap();
    agreeing.sort();
    assert_eq!(agreeing, vec!["miner-1", "miner-2"], "{task}");
    assert_eq!(task["accepted"]["disagreeing"], json!(["miner-3"]));
    // Only the agreeing miners are paid.
    let (_, miners) = net.get("/api/v1/miners");
    assert_eq!(miners["nodes"]["miner-3"]["pending_payment"], 0, "{miners}");
    assert!(
        miners["nodes"]["miner-1"]["pending_payment"]
            .as_u64()
            .unwrap()
            > 0
    );

    // The same answers, compared exactly: three different texts, no majority.
    let exact = session(&net, "exact");
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": exact, "prompt": "What is the capital of France?", "max_tokens": 16}),
    );
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "task_failed");
}

#[test]
fn embedding_validation_is_refused_without_the_model_and_thresholds_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let net = network(dir.path(), false);
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"name": "x", "deposit": 10, "validation": "embedding"}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("embedding model"),
        "{v}"
    );
    for bad in [json!(0.0), json!(1.5), json!(-0.2)] {
        let (status, v) = net.post(
            "/api/v1/sessions",
            &json!({"name": "x", "deposit": 10, "poi_threshold": bad}),
        );
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("poi_threshold"),
            "{v}"
        );
    }
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"name": "x", "deposit": 10, "validation": "vibes"}),
    );
    assert_eq!(status, 400, "{v}");
}
