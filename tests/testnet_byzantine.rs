//! Byzantine miners in the running network (scripted engines): likelihood re-scoring catches
//! random text, another seed's output and truncated output even when only two miners ran the
//! task (exact comparison can then only fail the task), and commit-reveal makes copying
//! another miner's result impossible.

mod common;

use common::{faults, scripted, Net};
use cortensor::actors::messages::{MinerReport, ReportKind};
use cortensor::actors::miner::{Byzantine, MinerFaults};
use cortensor::actors::report_signing;
use cortensor::actors::session_queue::GetTask;
use cortensor::chain::node_key::NodeKey;
use cortensor::task::TaskKey;
use cortensor::testkit::scripted_engine::Script;
use cortensor::testnet::node_keys_dir;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

fn session(net: &Net, body: Value) -> u64 {
    let (status, v) = net.post("/api/v1/sessions", &body);
    assert_eq!(status, 201, "{v}");
    v["session_id"].as_u64().unwrap()
}

fn complete(net: &Net, sid: u64, prompt: &str) -> (u16, Value) {
    net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": prompt, "max_tokens": 12, "temperature": 0.8}),
    )
}

#[test]
fn likelihood_catches_each_byzantine_kind_where_exact_can_only_fail() {
    let prompts = ["What is rust?", "Name three rivers.", "Why do cats purr?"];
    let mut table = Vec::new();
    for kind in [
        Byzantine::RandomText,
        Byzantine::OtherSeed,
        Byzantine::Truncated,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let net = scripted(
            "nodes.miners = 2\nqueue.tick_ms = 10",
            HashMap::new(),
            faults(&[(
                "miner-2",
                MinerFaults {
                    byzantine: Some(kind),
                    ..MinerFaults::default()
                },
            )]),
            dir.path(),
        );
        let likely = session(
            &net,
            json!({"redundant": 2, "deposit": 1_000_000, "validation": "likelihood",
                   "disagreement_policy": "best_effort", "num_of_validator_nodes": 1}),
        );
        let exact = session(&net, json!({"redundant": 2, "deposit": 1_000_000}));
        let (mut caught, mut honest_accepted) = (0, 0);
        for prompt in prompts {
            let (status, v) = complete(&net, likely, prompt);
            assert_eq!(status, 200, "{}: {v}", kind.name());
            let task = net.task(likely, v["task_id"].as_u64().unwrap());
            assert_eq!(task["status"], "Completed", "{task}");
            let accepted: Vec<String> =
                serde_json::from_value(task["accepted"]["agreeing"].clone()).unwrap();
            let verdicts = task["validation"]["miners"].as_array().unwrap();
            let byz = verdicts.iter().find(|m| m["miner"] == "miner-2").unwrap();
            if byz["valid"] == false && !accepted.contains(&"miner-2".to_string()) {
                caught += 1;
            }
            if accepted == vec!["miner-1".to_string()] {
                honest_accepted += 1;
            }
            assert!(
                byz["reasons"][0]
                    .as_str()
                    .unwrap()
                    .starts_with("likelihood"),
                "{}: {byz}",
                kind.name()
            );
            // Exact comparison of two disagreeing results cannot tell which is honest.
            let (status, v) = complete(&net, exact, prompt);
            assert_ne!(status, 200, "{}: exact should fail: {v}", kind.name());
        }
        let (_, miners) = net.get("/api/v1/miners");
        assert_eq!(miners["nodes"]["miner-2"]["pending_payment"], 0, "{miners}");
        assert!(
            miners["nodes"]["miner-1"]["pending_payment"]
                .as_u64()
                .unwrap()
                > 0
        );
        table.push((kind.name(), caught, honest_accepted));
    }
    for (kind, caught, honest) in &table {
        println!("{kind}: caught {caught}/3, honest accepted {honest}/3");
        assert_eq!((*caught, *honest), (3, 3), "{kind}");
    }
}

#[test]
fn copying_another_miners_precommit_and_reveal_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Script::slow(Duration::from_millis(40));
    let net = scripted(
        "nodes.miners = 3\nqueue.tick_ms = 10",
        common::scripts(&[("miner-1", slow.clone()), ("miner-2", slow)]),
        faults(&[(
            "miner-3",
            MinerFaults {
                stall_after_ack: true,
                ..MinerFaults::default()
            },
        )]),
        dir.path(),
    );
    let sid = session(&net, json!({"redundant": 3, "deposit": 1_000_000}));
    let url = net.url("/api/v1/completions");
    let key_header = format!("Bearer {}", net.testnet.api_key);
    let client = net.http.clone();
    let request = std::thread::spawn(move || {
        let r = client
            .post(url)
            .header("Authorization", key_header)
            .json(&json!({"session_id": sid, "prompt": "copy me", "max_tokens": 8}))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    });
    // The copier watches the public task record for miner-1's precommit and copies it.
    let mut tid = 0;
    let mut copied = String::new();
    net.wait_for(Duration::from_secs(30), "miner-1's precommit", |n| {
        let (_, list) = n.get(&format!("/api/v1/tasks/{sid}"));
        let Some(t) = list["tasks"].as_array().and_then(|t| t.first()).cloned() else {
            return false;
        };
        tid = t["task_id"].as_u64().unwrap();
        let task = n.task(sid, tid);
        let hash = task["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["miner"] == "miner-1")
            .and_then(|a| a["precommit_hash"].as_str().map(str::to_string));
        match hash {
            Some(h) => {
                copied = h;
                true
            }
            None => false,
        }
    });
    let key = TaskKey {
        session_id: sid,
        task_id: tid,
    };
    let queue = net.testnet.actors.queue.clone();
    // The copier is a real node: it signs with its own key, for its own assignment.
    let system = actix_rt::System::new();
    let copier_key = NodeKey::load(&node_keys_dir(dir.path()), "miner-3").unwrap();
    let nonce = system
        .block_on(queue.send(GetTask(key)))
        .unwrap()
        .unwrap()
        .and_then(|r| {
            r.assignments
                .iter()
                .find(|a| a.miner == "miner-3")
                .map(|a| a.nonce)
        })
        .expect("miner-3 was assigned");
    let signed = |kind: ReportKind| {
        let mut report = MinerReport {
            key,
            miner: "miner-3".into(),
            nonce,
            kind,
            signature: None,
        };
        report_signing::sign(&mut report, &copier_key);
        report
    };
    queue.do_send(signed(ReportKind::Precommit {
        hash: copied.clone(),
    }));
    // Once miner-1 reveals, the copier reveals the same result under its own name.
    let mut revealed = None;
    for _ in 0..300 {
        let record = system.block_on(queue.send(GetTask(key))).unwrap().unwrap();
        match record {
            Some(r) => {
                revealed = r
                    .assignments
                    .iter()
                    .find(|a| a.miner == "miner-1")
                    .and_then(|a| a.result.clone());
                if revealed.is_some() || r.state.is_terminal() {
                    break;
                }
            }
            None => break,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let result = revealed.expect("miner-1 revealed");
    queue.do_send(signed(ReportKind::Commit { result }));
    let (status, v) = request.join().unwrap();
    assert_eq!(status, 200, "{v}");
    let task = net.task(sid, tid);
    assert_eq!(task["status"], "Completed", "{task}");
    let copier = task["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["miner"] == "miner-3")
        .unwrap()
        .clone();
    assert_eq!(copier["precommit_hash"], json!(copied), "{copier}");
    assert_eq!(copier["state"], "Rejected", "{copier}");
    assert!(
        copier["note"].as_str().unwrap().contains("does not match"),
        "{copier}"
    );
    let mut agreeing: Vec<String> =
        serde_json::from_value(task["accepted"]["agreeing"].clone()).unwrap();
    agreeing.sort();
    assert_eq!(agreeing, vec!["miner-1", "miner-2"]);
    let (_, miners) = net.get("/api/v1/miners");
    assert_eq!(miners["nodes"]["miner-3"]["pending_payment"], 0);
}
