//! The network's edges, over real HTTP against an in-process testnet of scripted miners:
//! deadline misses and replacement, a panicking engine, late and duplicate reports, a wrong
//! reveal, cancellation with refund, insufficient balance, overload, restart with tasks in
//! flight, and bad input.

mod common;

use common::{faults, scripted, scripts, Net};
use cortensor::actors::messages::{MinerReport, ReportKind};
use cortensor::actors::miner::MinerFaults;
use cortensor::actors::session_queue::task_seed;
use cortensor::models::engine::FinishReason;
use cortensor::task::{TaskKey, TaskResult};
use cortensor::testkit::scripted_engine::{scripted_word, Script};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Short deadlines so misses show quickly.
const FAST: &str = r#"
queue.ack_timeout_ms = 300
queue.precommit_timeout_ms = 3000
queue.commit_timeout_ms = 300
queue.tick_ms = 10
nodes.heartbeat_interval_ms = 100
nodes.offline_after_ms = 600
"#;

fn with(extra: &str) -> String {
    format!("{FAST}\n{extra}")
}

fn net(
    extra: &str,
    scripts: HashMap<String, Script>,
    faults: HashMap<String, MinerFaults>,
) -> (Net, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (scripted(&with(extra), scripts, faults, dir.path()), dir)
}

fn complete(net: &Net, sid: u64, prompt: &str, max_tokens: usize) -> Value {
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": prompt, "max_tokens": max_tokens}),
    );
    assert_eq!(status, 200, "completion: {v}");
    v
}

/// Submits tasks until one had `miner` among its assigned miners; returns that task's view.
fn until_assigned(net: &Net, sid: u64, miner: &str, body: Value) -> Value {
    for i in 0..8 {
        let mut b = body.clone();
        b["session_id"] = json!(sid);
        b["prompt"] = json!(format!("attempt {i}"));
        let (status, v) = net.post("/api/v1/completions", &b);
        assert_eq!(status, 200, "{v}");
        let task = net.task(sid, v["task_id"].as_u64().unwrap());
        if task["assigned_miners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == miner)
        {
            return task;
        }
    }
    panic!("{miner} was never selected in 8 tasks (selection seed 1)");
}

fn assignment<'a>(task: &'a Value, miner: &str) -> &'a Value {
    task["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["miner"] == miner)
        .unwrap_or_else(|| panic!("{miner} not in {task}"))
}

#[test]
fn three_miners_agree_and_the_session_pays_for_what_was_used() {
    let (net, _dir) = net("nodes.miners = 3", HashMap::new(), HashMap::new());
    let sid = net.session(3, 10_000);
    let v = complete(&net, sid, "Tell me a story", 5);
    let tid = v["task_id"].as_u64().unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap();
    // Every miner sampled with the seed derived from (session, task).
    let seed = task_seed(TaskKey {
        session_id: sid,
        task_id: tid,
    });
    let expected: String = (0..5)
        .map(|i| scripted_word("Tell me a story", seed, i))
        .collect();
    assert_eq!(text, expected);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["object"], "text_completion");

    let task = net.task(sid, tid);
    assert_eq!(task["status"], "Completed");
    assert_eq!(task["results"]["data"].as_array().unwrap().len(), 3);
    assert!(task["results"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d == text));
    assert_eq!(task["assigned_miners"].as_array().unwrap().len(), 3);
    assert!(task["finished_at"].as_u64().unwrap() >= task["created_at"].as_u64().unwrap());
    for a in task["assignments"].as_array().unwrap() {
        assert_eq!(a["state"], "Committed", "{a}");
        assert!(a["precommit_hash"].as_str().unwrap().starts_with("0x"));
    }
    // Charged 5 tokens × 3 miners × price 1; the rest of the hold (128... no: 5 × 3) returned.
    assert_eq!(task["charged"], 15);
    let s = net.session_view(sid);
    assert_eq!(s["balance"], 10_000 - 15);
    assert_eq!(s["held"], 0);
    assert_eq!(s["spent"], 15);
    // The agreeing miners were paid.
    let (_, miners) = net.get("/api/v1/miners");
    let paid: u64 = miners["nodes"]
        .as_object()
        .unwrap()
        .values()
        .map(|m| m["pending_payment"].as_u64().unwrap())
        .sum();
    assert_eq!(paid, 15);

    // Different tasks get different seeds, so the same prompt gives a different text.
    let again = complete(&net, sid, "Tell me a story", 5);
    assert_ne!(again["choices"][0]["text"], v["choices"][0]["text"]);
}

#[test]
fn a_miner_that_never_acks_is_replaced_and_loses_reputation() {
    let ignore = MinerFaults {
        ignore_assignments: true,
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 4",
        HashMap::new(),
        faults(&[("miner-1", ignore)]),
    );
    let sid = net.session(3, 100_000);
    let task = until_assigned(&net, sid, "miner-1", json!({"max_tokens": 4}));
    assert_eq!(task["status"], "Completed", "{task}");
    let a = assignment(&task, "miner-1");
    assert_eq!(a["state"], "Replaced");
    assert!(a["note"].as_str().unwrap().contains("ack deadline"), "{a}");
    assert_eq!(task["replacements"], 1);
    let miners = task["results"]["miners"].as_array().unwrap();
    assert_eq!(miners.len(), 3);
    assert!(!miners.iter().any(|m| m == "miner-1"));
    let (_, pool) = net.get("/api/v1/miners");
    assert!(
        pool["nodes"]["miner-1"]["reputation"].as_i64().unwrap() < 500,
        "{pool}"
    );
    assert!(net.metric("cortensor_replacements_total") >= 1.0);
}

#[test]
fn a_miner_that_misses_the_precommit_deadline_is_replaced() {
    // 8 tokens at 400 ms: 3.2 s, past the 1 s precommit deadline (the shortest a request may set).
    let slow = Script::slow(Duration::from_millis(400));
    let (net, _dir) = net(
        "nodes.miners = 2",
        scripts(&[("miner-1", slow)]),
        HashMap::new(),
    );
    let sid = net.session(1, 100_000);
    let task = until_assigned(
        &net,
        sid,
        "miner-1",
        json!({"max_tokens": 8, "precommit_timeout": 1}),
    );
    assert_eq!(task["status"], "Completed", "{task}");
    let a = assignment(&task, "miner-1");
    assert_eq!(a["state"], "Replaced");
    assert!(
        a["note"].as_str().unwrap().contains("precommit deadline"),
        "{a}"
    );
    assert_eq!(task["results"]["miners"], json!(["miner-2"]));
}

#[test]
fn a_panicking_engine_is_restarted_and_its_task_goes_to_another_miner() {
    // One shared counter: whichever miner runs the first task panics, once.
    let panicking = Script::panicking(1);
    let (net, _dir) = net(
        "nodes.miners = 2",
        scripts(&[("miner-1", panicking.clone()), ("miner-2", panicking)]),
        HashMap::new(),
    );
    let sid = net.session(1, 100_000);
    let v = complete(&net, sid, "hello", 4);
    let task = net.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(task["status"], "Completed");
    let assignments = task["assignments"].as_array().unwrap();
    assert_eq!(assignments.len(), 2, "{task}");
    assert_eq!(assignments[0]["state"], "Replaced");
    assert!(
        assignments[0]["note"]
            .as_str()
            .unwrap()
            .contains("engine crashed"),
        "{task}"
    );
    assert_eq!(assignments[1]["state"], "Committed");
    // The crashed miner comes back (supervisor restart after a back-off) and works again.
    net.wait_for(
        Duration::from_secs(20),
        "the crashed miner is back online",
        |n| n.online_miners() == 2,
    );
    for i in 0..4 {
        complete(&net, sid, &format!("after restart {i}"), 2);
    }
    let (_, pool) = net.get("/api/v1/miners");
    let crashed = assignments[0]["miner"].as_str().unwrap();
    assert!(
        pool["nodes"][crashed]["tasks_done"].as_u64().unwrap() >= 1,
        "{pool}"
    );
}

#[test]
fn late_and_duplicate_reports_change_nothing() {
    let dup = MinerFaults {
        duplicate_reports: true,
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 3",
        HashMap::new(),
        faults(&[
            ("miner-1", dup.clone()),
            ("miner-2", dup.clone()),
            ("miner-3", dup),
        ]),
    );
    let sid = net.session(3, 100_000);
    let v = complete(&net, sid, "duplicates", 4);
    let tid = v["task_id"].as_u64().unwrap();
    let before = net.task(sid, tid);
    assert_eq!(before["status"], "Completed");
    assert_eq!(before["results"]["data"].as_array().unwrap().len(), 3);

    // Late reports for the finished task, straight to the queue.
    let key = TaskKey {
        session_id: sid,
        task_id: tid,
    };
    let forged = TaskResult {
        text: "forged".into(),
        token_ids: vec![1],
        finish_reason: FinishReason::Stop,
        prompt_tokens: 1,
    };
    let queue = &net.testnet.actors.queue;
    for kind in [
        ReportKind::Ack,
        ReportKind::Precommit {
            hash: forged.commitment_hex("miner-1"),
        },
        ReportKind::Commit {
            result: forged.clone(),
        },
        ReportKind::Failed {
            error: "late".into(),
        },
    ] {
        queue.do_send(MinerReport {
            key,
            miner: "miner-1".into(),
            nonce: 0,
            kind,
            signature: None,
        });
    }
    // And reports from a miner that was never assigned, for a task that does not exist.
    let nowhere = TaskKey {
        session_id: sid,
        task_id: 999,
    };
    queue.do_send(MinerReport {
        key: nowhere,
        miner: "miner-9".into(),
        nonce: 0,
        kind: ReportKind::Commit { result: forged },
        signature: None,
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(net.task(sid, tid), before);
    let (status, _) = net.get(&format!("/api/v1/tasks/{sid}/999"));
    assert_eq!(status, 404);
}

#[test]
fn a_reveal_that_does_not_match_its_precommit_is_rejected() {
    let liar = MinerFaults {
        wrong_reveal: true,
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 3",
        HashMap::new(),
        faults(&[("miner-2", liar)]),
    );
    let sid = net.session(3, 100_000);
    let v = complete(&net, sid, "commit reveal", 4);
    let task = net.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(task["status"], "Completed", "{task}");
    let a = assignment(&task, "miner-2");
    assert_eq!(a["state"], "Rejected");
    assert!(
        a["note"].as_str().unwrap().contains("does not match"),
        "{a}"
    );
    assert_eq!(task["results"]["miners"].as_array().unwrap().len(), 2);
    assert!(!v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .contains("altered"));
    assert_eq!(net.metric("cortensor_rejected_reveals_total"), 1.0);
}

#[test]
fn a_dishonest_minority_is_outvoted() {
    let liar = Script {
        dishonest: true,
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 3",
        scripts(&[("miner-3", liar)]),
        HashMap::new(),
    );
    let sid = net.session(3, 100_000);
    let v = complete(&net, sid, "majority", 4);
    let task = net.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(task["status"], "Completed");
    assert_eq!(task["accepted"]["disagreeing"], json!(["miner-3"]));
    assert_eq!(task["accepted"]["agreeing"].as_array().unwrap().len(), 2);
    // Only the agreeing miners are paid.
    let (_, pool) = net.get("/api/v1/miners");
    assert_eq!(pool["nodes"]["miner-3"]["pending_payment"], 0);
}

#[test]
fn a_client_that_disconnects_cancels_its_task_and_is_refunded() {
    let slow = Script {
        length: 200,
        token_delay: Duration::from_millis(30),
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 1",
        scripts(&[("miner-1", slow)]),
        HashMap::new(),
    );
    let sid = net.session(1, 1_000);
    let response = net
        .http
        .post(net.url("/api/v1/completions"))
        .bearer_auth(&net.testnet.api_key)
        .json(
            &json!({"session_id": sid, "prompt": "a long one", "max_tokens": 200, "stream": true}),
        )
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut lines = BufReader::new(response).lines();
    let mut tokens = 0;
    let mut task_id = 0;
    while tokens < 3 {
        let line = lines.next().unwrap().unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let chunk: Value = serde_json::from_str(data).unwrap();
            task_id = chunk["task_id"].as_u64().unwrap();
            tokens += 1;
        }
    }
    drop(lines); // the client goes away mid-stream
    let task = net.wait_task(sid, task_id, "Cancelled");
    let charged = task["charged"].as_u64().unwrap();
    assert!((3..200).contains(&charged), "charged {charged}");
    // The state shows at once; the settlement follows it.
    net.wait_for(Duration::from_secs(5), "the hold is settled", |n| {
        n.session_view(sid)["held"] == 0
    });
    let s = net.session_view(sid);
    assert_eq!(s["held"], 0);
    assert_eq!(s["balance"].as_u64().unwrap(), 1_000 - charged);
    // The miner stopped: a new task is served at once, not after the 200-token one.
    let started = Instant::now();
    complete(&net, sid, "next", 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the cancelled generation kept the miner busy"
    );
}

#[test]
fn an_explicit_cancel_ends_the_task_and_answers_the_waiting_client() {
    let slow = Script {
        length: 200,
        token_delay: Duration::from_millis(30),
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 1",
        scripts(&[("miner-1", slow)]),
        HashMap::new(),
    );
    let net = Arc::new(net);
    let sid = net.session(1, 1_000);
    let waiting = {
        let net = net.clone();
        std::thread::spawn(move || {
            net.post(
                "/api/v1/completions",
                &json!({"session_id": sid, "prompt": "x", "max_tokens": 200}),
            )
        })
    };
    net.wait_task(sid, 1, "Acked");
    let (status, v) = net.post(&format!("/api/v1/tasks/{sid}/1/cancel"), &json!({}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "Cancelled");
    let (status, body) = waiting.join().unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "task_cancelled");
    net.wait_for(Duration::from_secs(5), "the hold is released", |n| {
        n.session_view(sid)["held"] == 0
    });
}

#[test]
fn a_task_the_balance_cannot_cover_is_refused() {
    let (net, _dir) = net("nodes.miners = 1", HashMap::new(), HashMap::new());
    let sid = net.session(1, 50);
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "hi", "max_tokens": 100}),
    );
    assert_eq!(status, 402, "{v}");
    assert_eq!(v["error"]["code"], "insufficient_balance");
    assert!(v["error"]["message"].as_str().unwrap().contains("50"));
    let s = net.session_view(sid);
    assert_eq!(
        (s["balance"].as_u64(), s["held"].as_u64()),
        (Some(50), Some(0))
    );
    let v = complete(&net, sid, "hi", 40);
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(net.session_view(sid)["balance"], 42);
}

#[test]
fn overload_is_refused_with_429_and_retry_after() {
    let slow = Script::slow(Duration::from_millis(100));
    let extra = "nodes.miners = 1\n[router]\nmax_inflight_per_key = 2\nretry_after_s = 3";
    let (net, _dir) = net(extra, scripts(&[("miner-1", slow)]), HashMap::new());
    let net = Arc::new(net);
    let sid = net.session(1, 100_000);
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let net = net.clone();
            std::thread::spawn(move || {
                let r = net
                    .http
                    .post(net.url("/api/v1/completions"))
                    .bearer_auth(&net.testnet.api_key)
                    .json(&json!({"session_id": sid, "prompt": format!("p{i}"), "max_tokens": 8}))
                    .send()
                    .unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|h| h.to_str().unwrap().to_string());
                (r.status().as_u16(), retry, r.json::<Value>().unwrap())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let limited: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(ok >= 2, "{results:?}");
    assert!(!limited.is_empty(), "{results:?}");
    for (_, retry, body) in &limited {
        assert_eq!(retry.as_deref(), Some("3"));
        assert_eq!(body["error"]["code"], "rate_limited");
    }
    // Once the burst is over, the key is admitted again.
    complete(&net, sid, "after", 2);
}

#[test]
fn tasks_in_flight_resume_after_a_restart_and_finished_ones_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Script {
        length: 100,
        token_delay: Duration::from_millis(100),
        ..Default::default()
    };
    let (sid, done_text) = {
        let net = scripted(
            &with("nodes.miners = 1"),
            scripts(&[("miner-1", slow)]),
            HashMap::new(),
            dir.path(),
        );
        let sid = net.session(1, 100_000);
        let done = complete(&net, sid, "finished before", 2);
        // A long task, left in flight.
        net.submit_in_flight(json!({"session_id": sid, "prompt": "in flight", "max_tokens": 100}));
        net.wait_task(sid, 2, "Acked");
        net.testnet.shutdown();
        (sid, done["choices"][0]["text"].clone())
    };
    // The same data directory, fresh (fast) miners.
    let net = scripted(
        &with("nodes.miners = 1"),
        HashMap::new(),
        HashMap::new(),
        dir.path(),
    );
    let first = net.task(sid, 1);
    assert_eq!(first["status"], "Completed");
    assert_eq!(first["results"]["data"][0], done_text);
    let resumed = net.wait_task(sid, 2, "Completed");
    assert_eq!(resumed["resumed"], 1);
    let seed = task_seed(TaskKey {
        session_id: sid,
        task_id: 2,
    });
    let expected: String = (0..8)
        .map(|i| scripted_word("in flight", seed, i))
        .collect();
    assert_eq!(resumed["results"]["data"][0], expected.as_str());
    assert_eq!(resumed["assignments"][0]["state"], "Dropped");
    // Its hold was settled once: the session holds nothing and paid for 8 tokens plus the 2.
    let s = net.session_view(sid);
    assert_eq!(s["held"], 0);
    assert_eq!(s["spent"], 10);
}

#[test]
fn a_silent_miner_is_marked_offline_and_gets_no_tasks() {
    let silent = MinerFaults {
        no_heartbeats: true,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let net = scripted(
        &with("nodes.miners = 2"),
        HashMap::new(),
        faults(&[("miner-1", silent)]),
        dir.path(),
    );
    net.wait_for(Duration::from_secs(10), "miner-1 offline", |n| {
        n.get("/api/v1/miners").1["nodes"]["miner-1"]["state"] == "offline"
    });
    let sid = net.session(1, 100_000);
    for i in 0..4 {
        let v = complete(&net, sid, &format!("t{i}"), 2);
        assert_eq!(
            net.task(sid, v["task_id"].as_u64().unwrap())["assigned_miners"],
            json!(["miner-2"])
        );
    }
    assert!(net
        .metrics()
        .contains("cortensor_miners{state=\"offline\"} 1"));
}

/// One bad request and what must come back.
fn check(
    net: &Net,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
    status: u16,
    code: &str,
) {
    let mut r = match method {
        "GET" => net.http.get(net.url(path)),
        _ => net.http.post(net.url(path)),
    };
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let response = r.send().unwrap();
    let got = response.status().as_u16();
    let v: Value = response
        .json()
        .unwrap_or_else(|e| panic!("{method} {path}: the body is not JSON ({e})"));
    assert_eq!(
        (got, v["error"]["code"].as_str().unwrap_or("")),
        (status, code),
        "{method} {path} {body:?}: {v}"
    );
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
}

#[test]
fn bad_input_gets_a_json_error_with_a_stable_code() {
    let (net, _dir) = net(
        "nodes.miners = 1\nrouter.api_keys = [\"alice\", \"bob\"]\nrouter.max_body_bytes = 4096",
        HashMap::new(),
        HashMap::new(),
    );
    let sid = net.session(1, 1000); // alice's
    let (a, b) = (Some("alice"), Some("bob"));
    let s = sid.to_string();
    let body = |v: Value| v.to_string();
    // (method, path, key's owner, body, status, code)
    type Case<'a> = (
        &'a str,
        String,
        Option<&'a str>,
        Option<String>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/api/v1/sessions".into(),
            None,
            None,
            401,
            "unauthorized",
        ),
        (
            "GET",
            "/api/v1/sessions".into(),
            Some("mallory"),
            None,
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some("{not json".into()),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(json!({"session_id": sid}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(json!({"session_id": sid, "prompt": ""}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(
                json!({"session_id": sid, "prompt": "x", "prompt_type": 7}),
            )),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(
                json!({"session_id": sid, "prompt": "x", "temperature": 5}),
            )),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(
                json!({"session_id": sid, "prompt": "x", "max_tokens": 0}),
            )),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(
                json!({"session_id": sid, "prompt": "x", "timeout": -1}),
            )),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(json!({"session_id": "abc", "prompt": "x"}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(json!({"session_id": 424242, "prompt": "x"}))),
            404,
            "session_not_found",
        ),
        (
            "POST",
            format!("/api/v1/completions/{s}"),
            b,
            Some(body(json!({"prompt": "x"}))),
            403,
            "forbidden",
        ),
        (
            "GET",
            format!("/api/v1/sessions/{s}"),
            b,
            None,
            403,
            "forbidden",
        ),
        (
            "GET",
            "/api/v1/sessions/nope".into(),
            a,
            None,
            400,
            "invalid_request",
        ),
        (
            "GET",
            format!("/api/v1/tasks/{s}/77"),
            a,
            None,
            404,
            "task_not_found",
        ),
        (
            "GET",
            "/api/v1/nothing-here".into(),
            a,
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            "/api/v1/sessions".into(),
            a,
            Some(body(json!({"redundant": 0}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/sessions".into(),
            a,
            Some(body(json!({"redundant": 5, "max_num_of_nodes": 3}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/sessions".into(),
            a,
            Some(body(json!({"model_identifier": 3}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/sessions".into(),
            a,
            Some(body(json!({"mode": 9}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/sessions".into(),
            a,
            Some(body(json!({"unknown_field": 1}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/completions".into(),
            a,
            Some(body(json!({"session_id": sid, "prompt": "x".repeat(5000)}))),
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/chat/completions".into(),
            a,
            Some(body(
                json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
            )),
            404,
            "model_not_found",
        ),
        (
            "POST",
            "/v1/chat/completions".into(),
            a,
            Some(body(json!({"model": "scripted-echo", "messages": []}))),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/chat/completions".into(),
            a,
            Some(body(
                json!({"model": "scripted-echo", "messages": [{"role": "tool", "content": "x"}]}),
            )),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/chat/completions".into(),
            a,
            Some(body(
                json!({"model": "scripted-echo", "n": 0, "messages": [{"role": "user", "content": "x"}]}),
            )),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/completions".into(),
            a,
            Some(body(json!({"model": "scripted-echo", "prompt": ["a", ""]}))),
            400,
            "invalid_request",
        ),
    ];
    for (method, path, key, body, status, code) in &cases {
        check(&net, method, path, *key, body.as_deref(), *status, code);
    }
    // Nothing above touched the balance.
    let (_, v) = net
        .http
        .get(net.url(&format!("/api/v1/sessions/{sid}")))
        .bearer_auth("alice")
        .send()
        .map(|r| (0, r.json::<Value>().unwrap()))
        .unwrap();
    assert_eq!(v["balance"], 1000);
}

#[test]
fn the_router_endpoints_answer_in_cortensor_shapes() {
    let (net, _dir) = net("nodes.miners = 2", HashMap::new(), HashMap::new());
    let (status, info) = net.get("/api/v1/info");
    assert_eq!(status, 200);
    assert_eq!(info["models"], json!(["scripted-echo"]));
    let ping = net.http.get(net.url("/api/v1/ping")).send().unwrap();
    assert_eq!(ping.status(), 200);
    let (_, status) = net.get("/api/v1/status");
    assert_eq!(status["miners"]["online"], 2);
    let (_, miners) = net.get("/api/v1/miners");
    assert_eq!(miners["nodes"].as_object().unwrap().len(), 2);
    assert_eq!(miners["nodes"]["miner-1"]["model"], "scripted-echo");
    let (_, sessions) = net.get("/api/v1/sessions");
    assert_eq!(
        sessions["count"], 1,
        "the key's default session: {sessions}"
    );
    let sid = net.session(2, 1000);
    let (_, sessions) = net.get("/api/v1/sessions");
    assert_eq!(sessions["count"], 2);
    let v = net.session_view(sid);
    for field in [
        "name",
        "metadata",
        "min_num_of_nodes",
        "max_num_of_nodes",
        "redundant",
        "num_of_validator_nodes",
        "mode",
        "reserve_ephemeral_nodes",
        "sla",
        "model_identifier",
        "reserve_period",
        "max_task_execution_count",
        "deposit",
        "balance",
    ] {
        assert!(v.get(field).is_some(), "session view lacks {field}: {v}");
    }
    complete(&net, sid, "one", 2);
    complete(&net, sid, "two", 2);
    let (_, tasks) = net.get(&format!("/api/v1/tasks/{sid}"));
    assert_eq!(tasks["count"], 2);
    let (_, page) = net.get(&format!("/api/v1/tasks/{sid}?after=1&limit=5"));
    assert_eq!(page["tasks"][0]["task_id"], 2);
    // The default session serves requests that name none.
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"prompt": "default session", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["session_id"], net.testnet.default_session);
    let metrics = net.metrics();
    for needle in [
        "cortensor_tasks{state=\"Queued\"} 0",
        "cortensor_tasks_ended_total{state=\"Completed\"} 3",
        "cortensor_stage_seconds_bucket{stage=\"total\"",
        "cortensor_miners{state=\"ephemeral\"} 2",
        "cortensor_tokens_generated_total 6",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
}

#[test]
fn a_dedicated_session_holds_its_miners_until_its_reserve_period_ends() {
    let (net, _dir) = net("nodes.miners = 4", HashMap::new(), HashMap::new());
    let body = json!({"name": "dedicated", "mode": 2, "redundant": 2, "min_num_of_nodes": 2, "max_num_of_nodes": 2, "reserve_period": 2, "deposit": 100_000});
    let (status, v) = net.post("/api/v1/sessions", &body);
    assert_eq!(status, 201, "{v}");
    let dedicated = v["session_id"].as_u64().unwrap();
    let mut held = std::collections::BTreeSet::new();
    for i in 0..3 {
        let v = complete(&net, dedicated, &format!("d{i}"), 2);
        let task = net.task(dedicated, v["task_id"].as_u64().unwrap());
        held.extend(
            task["assigned_miners"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_string()),
        );
    }
    assert_eq!(
        held.len(),
        2,
        "a dedicated session uses only its reserved miners: {held:?}"
    );
    let (_, pool) = net.get("/api/v1/miners");
    for m in &held {
        assert_eq!(pool["nodes"][m]["state"], "dedicated", "{pool}");
        assert_eq!(pool["nodes"][m]["reserved_for"], dedicated);
    }
    // An ephemeral session never gets them.
    let shared = net.session(2, 100_000);
    for i in 0..4 {
        let v = complete(&net, shared, &format!("e{i}"), 2);
        let task = net.task(shared, v["task_id"].as_u64().unwrap());
        for m in task["assigned_miners"].as_array().unwrap() {
            assert!(
                !held.contains(m.as_str().unwrap()),
                "{m} is dedicated to another session"
            );
        }
    }
    // When the reserve period ends they are released, then rejoin the pool.
    let first = held.iter().next().unwrap().clone();
    net.wait_for(Duration::from_secs(10), "released", |n| {
        n.get("/api/v1/miners").1["nodes"][&first]["state"] == "released"
    });
    net.wait_for(Duration::from_secs(10), "back in the pool", |n| {
        n.get("/api/v1/miners").1["nodes"][&first]["state"] == "ephemeral"
    });
}

#[test]
fn a_task_past_its_timeout_is_ended_by_force_and_refunded() {
    let slow = Script {
        length: 100,
        token_delay: Duration::from_millis(50),
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 1",
        scripts(&[("miner-1", slow)]),
        HashMap::new(),
    );
    let sid = net.session(1, 1_000);
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "slow", "max_tokens": 100, "timeout": 1}),
    );
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["code"], "task_timeout");
    let task = net.task(sid, 1);
    assert_eq!(task["status"], "Ended");
    assert_eq!(task["charged"], 0);
    let s = net.session_view(sid);
    assert_eq!(
        (s["balance"].as_u64(), s["held"].as_u64()),
        (Some(1_000), Some(0))
    );
    assert!(net
        .metrics()
        .contains("cortensor_tasks_ended_total{state=\"Ended\"} 1"));
}

#[test]
fn several_validators_reach_one_verdict() {
    let liar = Script {
        dishonest: true,
        ..Default::default()
    };
    let (net, _dir) = net(
        "nodes.miners = 3\nnodes.validators = 3",
        scripts(&[("miner-1", liar)]),
        HashMap::new(),
    );
    let body = json!({"name": "validated", "redundant": 3, "num_of_validator_nodes": 3, "deposit": 100_000});
    let (_, v) = net.post("/api/v1/sessions", &body);
    let sid = v["session_id"].as_u64().unwrap();
    let v = complete(&net, sid, "three validators", 4);
    let task = net.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(task["status"], "Completed");
    assert_eq!(task["accepted"]["disagreeing"], json!(["miner-1"]));
}

#[test]
fn miners_that_all_disagree_fail_the_task_and_cost_nothing() {
    let liar = Script {
        dishonest: true,
        ..Default::default()
    };
    // Two miners, one honest and one not: no majority.
    let (net, _dir) = net(
        "nodes.miners = 2",
        scripts(&[("miner-2", liar)]),
        HashMap::new(),
    );
    let sid = net.session(2, 1_000);
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "split", "max_tokens": 4}),
    );
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "task_failed");
    assert!(v["error"]["message"].as_str().unwrap().contains("disagree"));
    assert_eq!(net.session_view(sid)["balance"], 1_000);
}

#[test]
fn a_prompt_too_long_for_the_model_is_the_clients_error_not_the_miners() {
    let (net, _dir) = net("nodes.miners = 3", HashMap::new(), HashMap::new());
    let sid = net.session(3, 1_000_000);
    let (_, before) = net.get("/api/v1/miners");
    let balance = net.session_view(sid)["balance"].clone();
    // The scripted model's context is 4096 tokens (one a word): every miner refuses this.
    let prompt = vec!["word"; 5000].join(" ");
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": prompt, "max_tokens": 8}),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "invalid_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exceeds the context"),
        "{v}"
    );
    // Nobody is blamed and nothing is charged.
    let (_, after) = net.get("/api/v1/miners");
    for m in ["miner-1", "miner-2", "miner-3"] {
        assert!(after["nodes"][m]["reputation"].is_number(), "{after}");
        assert_eq!(
            before["nodes"][m]["reputation"], after["nodes"][m]["reputation"],
            "{m}: {before} -> {after}"
        );
    }
    assert_eq!(net.session_view(sid)["balance"], balance);
    // And the network still answers prompts that fit.
    let ok = complete(&net, sid, "short", 4);
    assert_eq!(ok["usage"]["completion_tokens"], 4);
}
