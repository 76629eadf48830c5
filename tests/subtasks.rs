//! Several choices (`n`) and batched prompts: each runs as a task of its own, on miners of its
//! own, in parallel, and the answer puts the choices back in order (prompt by prompt, then
//! choice by choice). With a seed, choice j samples with seed + j, so each choice is exactly
//! what a single request with that seed returns.

use cortensor::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use cortensor::testkit::scripted_engine::Script;
use cortensor::testkit::sse::SseEvents;
use cortensor::testkit::Fault;
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

/// One prompt, one choice, with `seed`: the text a choice of a larger request must equal.
fn single(net: &TestNetwork, prompt: &str, seed: u64) -> String {
    let v = completion(
        net,
        json!({"model": "scripted-echo", "prompt": prompt, "max_tokens": 6, "seed": seed}),
    );
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[test]
fn choices_and_batches_run_as_parallel_subtasks_in_order() {
    let net = network();
    let single = |prompt: &str, seed: u64| single(&net, prompt, seed);
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
    let overlapping = spans.iter().enumerate().any(|(i, a)| {
        spans
            .iter()
            .enumerate()
            .any(|(j, b)| i != j && a.0 < b.1 && b.0 < a.1)
    });
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

    // Too many: refused with the reason.
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
}

/// The `data:` events of a streamed request, as JSON, up to `[DONE]`.
fn stream_events(net: &TestNetwork, path: &str, body: Value) -> Vec<Value> {
    let response = reqwest::blocking::Client::new()
        .post(format!("{}{path}", net.url()))
        .bearer_auth(net.api_key())
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = SseEvents::new(response);
    let events: Vec<Value> = stream.by_ref().collect();
    assert!(stream.done(), "the stream ended without [DONE]: {events:?}");
    for v in &events {
        assert!(v.get("error").is_none(), "{v}");
    }
    events
}

#[test]
fn several_choices_stream_together_each_tagged_with_its_index() {
    let mut net = network();
    // On a slow disk (each acceptance's flush answers 400 ms late, longer than a choice takes
    // to generate) the choices still start together: one flush accepts them all.
    net.apply(&Fault::SlowStore {
        delay: Duration::from_millis(400),
        for_: Duration::from_secs(120),
    })
    .unwrap();
    let single = |prompt: &str, seed: u64| single(&net, prompt, seed);
    // Two prompts × two choices, streamed: the pieces of each index join into that choice.
    let events = stream_events(
        &net,
        "/v1/completions",
        json!({"model": "scripted-echo", "prompt": ["east", "west"], "n": 2, "max_tokens": 6,
               "seed": 7, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let mut texts = vec![String::new(); 4];
    let mut finished = [false; 4];
    let mut order = Vec::new();
    for e in &events {
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            assert!(
                !finished[i],
                "choice {i} went on after it finished: {events:?}"
            );
            texts[i].push_str(c["text"].as_str().unwrap());
            finished[i] = !c["finish_reason"].is_null();
            order.push(i);
        }
    }
    assert!(finished.iter().all(|f| *f), "{events:?}");
    let expected = [
        single("east", 7),
        single("east", 8),
        single("west", 7),
        single("west", 8),
    ];
    assert_eq!(texts, expected, "{events:?}");
    // They ran at once: the pieces of different choices interleave.
    let first_of_last = order.iter().position(|i| *i == 3).unwrap();
    let last_of_first = order.iter().rposition(|i| *i == 0).unwrap();
    assert!(
        first_of_last < last_of_first,
        "one after another: {order:?}"
    );
    let usage = events.last().unwrap();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    let words: u64 = expected
        .iter()
        .map(|t| t.split_whitespace().count() as u64)
        .sum();
    assert_eq!(usage["usage"]["completion_tokens"], words, "{usage}");

    // Chat: n choices, each opening with its role.
    let events = stream_events(
        &net,
        "/v1/chat/completions",
        json!({"model": "scripted-echo", "n": 3, "max_tokens": 4, "stream": true,
               "messages": [{"role": "user", "content": "three ways"}]}),
    );
    let mut contents = vec![String::new(); 3];
    for e in &events {
        assert_eq!(e["object"], "chat.completion.chunk");
        let c = &e["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        if c["delta"]["role"] == "assistant" {
            assert!(contents[i].is_empty(), "{events:?}");
        }
        contents[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(contents.iter().all(|c| !c.is_empty()), "{events:?}");
    assert_ne!(contents[0], contents[1], "choices differ");
}
