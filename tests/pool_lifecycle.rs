//! The pool's lifecycle as Cortensor describes it: a new node passes network (cognitive) tasks
//! before it joins the pool, a released node revalidates before it is reserved again, and a
//! node pinned to a dedicated session skips validation and the pool.

mod common;

use common::{scripted, scripts, Net};
use cortensor::testkit::scripted_engine::Script;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

fn node(net: &Net, id: &str) -> Value {
    net.get("/api/v1/miners").1["nodes"][id].clone()
}

fn dishonest() -> Script {
    Script {
        dishonest: true,
        ..Script::default()
    }
}

#[test]
fn new_nodes_join_after_network_tasks_and_a_dishonest_one_never_does() {
    let dir = tempfile::tempdir().unwrap();
    let net = scripted(
        "nodes.miners = 3\nnodes.probes_required = 2\nqueue.tick_ms = 10",
        scripts(&[("miner-3", dishonest())]),
        HashMap::new(),
        dir.path(),
    );
    net.wait_for(Duration::from_secs(20), "honest miners in the pool", |n| {
        node(n, "miner-1")["state"] == "ephemeral" && node(n, "miner-2")["state"] == "ephemeral"
    });
    for id in ["miner-1", "miner-2"] {
        let m = node(&net, id);
        assert!(m["probes_passed"].as_u64().unwrap() >= 2, "{m}");
        assert_eq!(m["probes_failed"], 0, "{m}");
        assert!(m["counters"]["accepted"].as_u64().unwrap() >= 2, "{m}");
    }
    net.wait_for(Duration::from_secs(20), "miner-3 failing its tasks", |n| {
        node(n, "miner-3")["probes_failed"].as_u64().unwrap_or(0) >= 1
    });
    // Out of the pool: still validating, or suspended by its failures.
    let m3 = node(&net, "miner-3");
    assert!(
        ["validating", "suspended"].contains(&m3["state"].as_str().unwrap()),
        "{m3}"
    );
    assert_eq!(m3["probes_passed"], 0, "{m3}");
    // Clients' tasks go to the pool's members only.
    let sid = net.session(2, 1_000_000);
    for i in 0..5 {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": format!("p{i}"), "max_tokens": 4}),
        );
        assert_eq!(status, 200, "{v}");
        let task = net.task(sid, v["task_id"].as_u64().unwrap());
        assert!(
            !task["assigned_miners"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m == "miner-3"),
            "{task}"
        );
    }
    // Network tasks are no client's: their session is not visible.
    let (status, _) = net.get(&format!("/api/v1/tasks/{}", u64::MAX));
    assert_eq!(status, 404);
}

#[test]
fn a_released_node_revalidates_before_it_is_reserved_again() {
    let dir = tempfile::tempdir().unwrap();
    let net = scripted(
        "nodes.miners = 2\nnodes.probes_required = 1\nnodes.heartbeat_interval_ms = 100\nnodes.offline_after_ms = 800\nqueue.tick_ms = 10",
        HashMap::new(),
        HashMap::new(),
        dir.path(),
    );
    assert_eq!(net.online_miners(), 2);
    // A hybrid session reserves both miners for a second.
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 1, "mode": 1, "reserve_period": 1, "deposit": 100_000}),
    );
    assert_eq!(status, 201, "{v}");
    let sid = v["session_id"].as_u64().unwrap();
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "hello", "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{v}");
    let passed_before = node(&net, "miner-1")["counters"]["accepted"]
        .as_u64()
        .unwrap();
    // The reservation ends: the miners are released and must pass a network task again.
    assert_eq!(node(&net, "miner-1")["state"], "reserved");
    let mut left_pool = false;
    net.wait_for(
        Duration::from_secs(20),
        "released and back in the pool",
        |n| {
            let s = node(n, "miner-1")["state"]
                .as_str()
                .unwrap_or("")
                .to_string();
            left_pool |= s == "released" || s == "validating";
            left_pool && s == "ephemeral"
        },
    );
    let m = node(&net, "miner-1");
    assert!(
        m["counters"]["accepted"].as_u64().unwrap() > passed_before,
        "a network task ran after the release: {m}"
    );
}

#[test]
fn a_pinned_dedicated_node_skips_validation_and_serves_its_session_alone() {
    let dir = tempfile::tempdir().unwrap();
    let net = scripted(
        "nodes.miners = 3\nnodes.probes_required = 2\nqueue.tick_ms = 10",
        scripts(&[("miner-3", dishonest())]),
        HashMap::new(),
        dir.path(),
    );
    net.wait_for(Duration::from_secs(20), "honest miners in the pool", |n| {
        node(n, "miner-1")["state"] == "ephemeral" && node(n, "miner-2")["state"] == "ephemeral"
    });
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 1, "mode": 2, "min_num_of_nodes": 1, "max_num_of_nodes": 1, "deposit": 100_000}),
    );
    assert_eq!(status, 201, "{v}");
    let dedicated = v["session_id"].as_u64().unwrap();
    let (status, v) = net.post(
        &format!("/api/v1/sessions/{dedicated}/nodes"),
        &json!({"node": "miner-3"}),
    );
    assert_eq!(status, 200, "{v}");
    let m3 = node(&net, "miner-3");
    assert_eq!(
        (m3["state"].as_str(), m3["pinned_to"].as_u64()),
        (Some("dedicated"), Some(dedicated))
    );
    for i in 0..3 {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": dedicated, "prompt": format!("d{i}"), "max_tokens": 4}),
        );
        assert_eq!(status, 200, "{v}");
        let task = net.task(dedicated, v["task_id"].as_u64().unwrap());
        assert_eq!(task["assigned_miners"], json!(["miner-3"]), "{task}");
    }
    // Other sessions never get it.
    let shared = net.session(2, 100_000);
    for i in 0..3 {
        let (_, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": shared, "prompt": format!("s{i}"), "max_tokens": 4}),
        );
        let task = net.task(shared, v["task_id"].as_u64().unwrap());
        assert!(!task["assigned_miners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "miner-3"));
    }
    // Wrong requests get clear errors.
    let (status, v) = net.post(
        &format!("/api/v1/sessions/{shared}/nodes"),
        &json!({"node": "miner-1"}),
    );
    assert_eq!(status, 400, "{v}");
    let (status, v) = net.post(
        &format!("/api/v1/sessions/{dedicated}/nodes"),
        &json!({"node": "miner-9"}),
    );
    assert_eq!(status, 404, "{v}");
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 1, "mode": 2, "min_num_of_nodes": 1, "max_num_of_nodes": 1, "deposit": 1}),
    );
    assert_eq!(status, 201, "{v}");
    let other = v["session_id"].as_u64().unwrap();
    let (status, v) = net.post(
        &format!("/api/v1/sessions/{other}/nodes"),
        &json!({"node": "miner-3"}),
    );
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "conflict");
}
