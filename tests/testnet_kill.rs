//! Durability, proven the hard way: the real `cortensor testnet` binary (real model) is killed
//! with SIGKILL at random moments while tasks run; after every restart on the same data
//! directory, every task the router had acknowledged is still there and completes, and the
//! session's money adds up. The seed of the kill moments is printed.

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    child: Child,
    url: String,
}

fn start(data: &std::path::Path) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cortensor"))
        .args([
            "testnet",
            "--listen",
            "127.0.0.1:0",
            "--miners",
            "1",
            "--backend",
            "cpu",
            "--data-dir",
        ])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines.next().expect("the testnet printed its URL").unwrap();
        if let Some(url) = line.strip_prefix("router:") {
            break url.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Node { child, url }
}

fn get(url: &str) -> Value {
    reqwest::blocking::Client::new()
        .get(url)
        .bearer_auth("default-dev-token")
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// Submits over the WebSocket; returns the task ids the router acknowledged.
fn submit(node: &Node, sid: u64, prompts: &[&str]) -> Vec<u64> {
    let ws_url = format!(
        "{}/api/v1/ws?token=default-dev-token",
        node.url.replace("http://", "ws://")
    );
    let (mut ws, _) = tungstenite::connect(ws_url).unwrap();
    let mut ids = Vec::new();
    for p in prompts {
        let m = json!({"type": "submit", "session_id": sid, "prompt": p, "max_tokens": 48, "temperature": 0.9});
        ws.send(tungstenite::Message::Text(m.to_string())).unwrap();
        loop {
            let tungstenite::Message::Text(t) = ws.read().unwrap() else {
                continue;
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "accepted" {
                ids.push(v["task_id"].as_u64().unwrap());
                break;
            }
            assert_ne!(v["type"], "error", "{v}");
        }
    }
    // Leave the socket open: closing it would cancel the tasks. The kill cuts it.
    std::mem::forget(ws);
    ids
}

#[test]
fn acknowledged_tasks_survive_sigkill_and_complete() {
    let seed: u64 = std::env::var("CORTENSOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill test seed: {seed} (set CORTENSOR_TEST_SEED to repeat)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let created: Value = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/sessions", node.url))
        .bearer_auth("default-dev-token")
        .json(&json!({"name": "kill", "redundant": 1, "deposit": 1_000_000}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let sid = created["session_id"].as_u64().unwrap();
    let mut acknowledged = Vec::new();
    let mut node = node;
    for round in 0..3 {
        acknowledged.extend(submit(
            &node,
            sid,
            &[
                "Tell me about rivers.",
                "Describe a city at night.",
                "Why is the sky blue?",
            ],
        ));
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        node.child.kill().unwrap(); // SIGKILL
        node.child.wait().unwrap();
        eprintln!(
            "round {round}: killed with {} tasks acknowledged",
            acknowledged.len()
        );
        node = start(dir.path());
    }
    // Every acknowledged task is there and completes.
    let deadline = Instant::now() + Duration::from_secs(300);
    for &tid in &acknowledged {
        loop {
            let task = get(&format!("{}/api/v1/tasks/{sid}/{tid}", node.url));
            assert!(
                task.get("error").is_none() || task["status"].is_string(),
                "task {tid} lost (seed {seed}): {task}"
            );
            if task["status"] == "Completed" {
                assert!(!task["results"]["data"][0].as_str().unwrap().is_empty());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "task {tid} did not complete (seed {seed}): {task}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A task shows Completed as soon as it ends; its settlement follows.
    let session = loop {
        let session = get(&format!("{}/api/v1/sessions/{sid}", node.url));
        if session["held"] == 0 || Instant::now() > deadline {
            break session;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(session["held"], 0, "seed {seed}: {session}");
    assert_eq!(
        session["balance"].as_u64().unwrap() + session["spent"].as_u64().unwrap(),
        1_000_000,
        "seed {seed}: {session}"
    );
    node.child.kill().unwrap();
    node.child.wait().unwrap();
}
