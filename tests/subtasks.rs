//! Several choices (`n`) and batched prompts: each runs as a task of its own, on miners of its
//! own, in parallel, and the answer puts the choices back in order (prompt by prompt, then
//! choice by choice). With a seed, choice j samples with seed + j, so each choice is exactly
//! what a single request with that seed returns.

use cortensor::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use cortensor::testkit::scripted_engine::Script;
use serde_json::{json, Value};
use std::time::Duration;

fn network() -> TestNetwork {
    // Each generation takes ~0.3 s, so parallel subtasks overlap and spread over the miners.
    let script = Script {
        length: 6,
        ..Script::slow(Duration::from_millis(50))
    };
    TestnetBuilder::new()
        .miners(4)
        .validators(1)
        .engines(Engines::Scripted(script))
        .start()
        .expect("the network starts")
}

fn completion(net: &TestNetwork, body: Value) -> Value {
    let (status, v) = net.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    v
}

#[test]
fn choices_and_batches_run_as_parallel_subtasks_in_order() {
    let net = network();
    let single = |prompt: &str, seed: u64| -> String {
        let v = completion(
            &net,
            json!({"model": "scripted-echo", "prompt": prompt, "max_tokens": 6, "seed": seed}),
        );
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let v = completion(
        &net,
        json!({"model": "scripted-echo", "prompt": ["north", "south"], "n": 2, "max_tokens": 6, "seed": 40}),
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{v}");
    let texts: Vec<&str> = choices
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    let expected = [
        single("north", 40),
        single("north", 41),
        single("south", 40),
        single("south", 41),
    ];
    assert_eq!(
        texts,
        expected.iter().map(String::as_str).collect::<Vec<_>>(),
        "{v}"
    );
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_ne!(texts[0], texts[1], "choices differ");

    // Each choice was a task of its own; together they ran on more than one miner, at once.
    let ids: Vec<u64> = v["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 4);
    let sid = v["session_id"].as_u64().unwrap();
    let mut miners = std::collections::HashSet::new();
    let mut spans = Vec::new();
    let mut completion_tokens = 0;
    for id in &ids {
        let (_, t) = net.get(&format!("/api/v1/tasks/{sid}/{id}"));
        assert_eq!(t["status"], "Completed", "{t}");
        for m in t["results"]["miners"].as_array().unwrap() {
            miners.insert(m.as_str().unwrap().to_string());
        }
        let a = &t["assignments"][0];
        spans.push((
            a["acked_at"].as_u64().unwrap(),
            a["committed_at"].as_u64().unwrap(),
        ));
        completion_tokens += t["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert!(miners.len() > 1, "the subtasks all ran on {miners:?}");
    let overlapping = spans
        .iter()
        .any(|a| spans.iter().any(|b| a != b && a.0 < b.1 && b.0 < a.1));
    assert!(overlapping, "the subtasks ran one after another: {spans:?}");
    assert_eq!(v["usage"]["completion_tokens"], completion_tokens, "{v}");

    // Chat: n choices.
    let (status, chat) = net.post(
        "/v1/chat/completions",
        &json!({"model": "scripted-echo", "n": 3, "max_tokens": 4,
                "messages": [{"role": "user", "content": "three ways"}]}),
    );
    assert_eq!(status, 200, "{chat}");
    let choices = chat["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{chat}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert!(!c["message"]["content"].as_str().unwrap().is_empty());
    }

    // Too many, and streamed several: refused with the reason.
    let (status, v) = net.post(
        "/v1/completions",
        &json!({"model": "scripted-echo", "prompt": ["a", "b", "c", "d", "e", "f"], "n": 3}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 16"),
        "{v}"
    );
    let (status, v) = net.post(
        "/v1/completions",
        &json!({"model": "scripted-echo", "prompt": "a", "n": 2, "stream": true}),
    );
    assert_eq!(status, 400, "{v}");
}
