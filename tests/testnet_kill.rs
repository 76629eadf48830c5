//! Durability, proven the hard way: the real `cortensor testnet` binary (real model) is killed
//! with SIGKILL at random moments while tasks run, 50 times, restarting it on the same data
//! directory each time. Afterwards every session the router acknowledged is there with its
//! deposit, every acknowledged task is there and completes, every result once read is read
//! the same, and every session's money adds up. The seed of the kill moments is printed.

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;
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
        let m = json!({"type": "submit", "session_id": sid, "prompt": p, "max_tokens": 24, "temperature": 0.9});
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

/// Kills (CORTENSOR_KILL_ROUNDS overrides; at least 50 in CI).
const ROUNDS: usize = 50;
const DEPOSIT: u64 = 1_000_000;

fn create_session(node: &Node, name: &str) -> Option<u64> {
    let created: Value = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/sessions", node.url))
        .bearer_auth("default-dev-token")
        .json(&json!({"name": name, "redundant": 1, "deposit": DEPOSIT}))
        .send()
        .ok()?
        .json()
        .ok()?;
    created["session_id"].as_u64()
}

#[test]
fn acknowledged_work_survives_fifty_sigkills() {
    let seed: u64 = std::env::var("CORTENSOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let rounds: usize = std::env::var("CORTENSOR_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS);
    eprintln!("kill test seed: {seed} (set CORTENSOR_TEST_SEED to repeat)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut node = start(dir.path());
    let mut sessions: Vec<u64> = Vec::new();
    let mut acknowledged: Vec<(u64, u64)> = Vec::new();
    // Results read while the network ran: after every later kill they must read the same.
    let mut seen_results: HashMap<(u64, u64), String> = HashMap::new();
    let prompts = [
        "Tell me about rivers.",
        "Describe a city at night.",
        "Why is the sky blue?",
        "Name three colours.",
    ];
    let started = Instant::now();
    for round in 0..rounds {
        if sessions.is_empty() || rng.gen_bool(0.2) {
            if let Some(sid) = create_session(&node, &format!("kill-{round}")) {
                sessions.push(sid);
            }
        }
        let sid = sessions[rng.gen_range(0..sessions.len())];
        let n = rng.gen_range(1..=2);
        let chosen: Vec<&str> = (0..n)
            .map(|_| prompts[rng.gen_range(0..prompts.len())])
            .collect();
        acknowledged.extend(submit(&node, sid, &chosen).into_iter().map(|t| (sid, t)));
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..800)));
        // Read a few results before the kill.
        for _ in 0..3 {
            let (sid, tid) = acknowledged[rng.gen_range(0..acknowledged.len())];
            let task = get(&format!("{}/api/v1/tasks/{sid}/{tid}", node.url));
            if task["status"] == "Completed" {
                let text = task["results"]["data"][0]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                seen_results.insert((sid, tid), text);
            }
        }
        node.child.kill().unwrap(); // SIGKILL
        node.child.wait().unwrap();
        node = start(dir.path());
    }
    eprintln!(
        "{rounds} kills in {:.0} s: {} sessions, {} tasks acknowledged, {} results read before a kill",
        started.elapsed().as_secs_f64(),
        sessions.len(),
        acknowledged.len(),
        seen_results.len()
    );
    // Every acknowledged task is there and completes; results read before read the same.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut charged: HashMap<u64, u64> = HashMap::new();
    for &(sid, tid) in &acknowledged {
        loop {
            let task = get(&format!("{}/api/v1/tasks/{sid}/{tid}", node.url));
            assert!(
                task["status"].is_string(),
                "task {sid}/{tid} lost (seed {seed}): {task}"
            );
            if task["status"] == "Completed" {
                let text = task["results"]["data"][0].as_str().unwrap().to_string();
                assert!(!text.is_empty());
                if let Some(before) = seen_results.get(&(sid, tid)) {
                    assert_eq!(
                        &text, before,
                        "task {sid}/{tid}'s result changed (seed {seed})"
                    );
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "task {sid}/{tid} did not complete (seed {seed}): {task}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for &(sid, tid) in &acknowledged {
        let task = get(&format!("{}/api/v1/tasks/{sid}/{tid}", node.url));
        *charged.entry(sid).or_default() += task["charged"].as_u64().unwrap_or(0);
    }
    // Every session is there, its deposit intact and its money adding up once settled.
    for &sid in &sessions {
        let session = loop {
            let session = get(&format!("{}/api/v1/sessions/{sid}", node.url));
            if session["held"] == 0 || Instant::now() > deadline {
                break session;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            session["deposit"], DEPOSIT,
            "session {sid} (seed {seed}): {session}"
        );
        assert_eq!(session["held"], 0, "seed {seed}: {session}");
        let (balance, spent) = (
            session["balance"].as_u64().unwrap(),
            session["spent"].as_u64().unwrap(),
        );
        assert_eq!(balance + spent, DEPOSIT, "seed {seed}: {session}");
        assert_eq!(
            spent,
            charged.get(&sid).copied().unwrap_or(0),
            "session {sid}: spent differs from its tasks' charges (seed {seed}): {session}"
        );
    }
    node.child.kill().unwrap();
    node.child.wait().unwrap();
}
