//! Clients' API keys: issued by an operator with quotas, stored only as hashes, each seeing and
//! using only its own sessions and tasks, revocable, and all of it surviving a restart.

mod common;

use common::scripted;
use cortensor::testkit::scripted_engine::Script;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

fn call(
    net: &common::Net,
    method: &str,
    key: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = net.url(path);
    let request = match method {
        "GET" => net.http.get(url),
        _ => net.http.post(url).json(&body.unwrap_or(json!({}))),
    };
    let r = request
        .bearer_auth(key)
        .send()
        .expect("the request is sent");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn files_contain(dir: &std::path::Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
    }
    false
}

#[test]
fn issued_keys_have_quotas_see_only_their_own_and_are_stored_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Script::slow(Duration::from_millis(40));
    let net = scripted(
        "nodes.miners = 2",
        common::scripts(&[("miner-1", slow.clone()), ("miner-2", slow.clone())]),
        HashMap::new(),
        dir.path(),
    );
    let operator = net.testnet.api_key.clone();
    let (status, alice) = call(
        &net,
        "POST",
        &operator,
        "/api/v1/keys",
        Some(
            json!({"name": "alice", "max_inflight": 1, "max_tasks": 3, "deposit": 100000, "credit": 110000}),
        ),
    );
    assert_eq!(status, 201, "{alice}");
    let (status, bob) = call(
        &net,
        "POST",
        &operator,
        "/api/v1/keys",
        Some(json!({"name": "bob"})),
    );
    assert_eq!(status, 201, "{bob}");
    let (a, b) = (
        alice["key"].as_str().unwrap().to_string(),
        bob["key"].as_str().unwrap().to_string(),
    );
    assert!(a.starts_with("ctsr_") && a.len() > 60 && a != b);
    // The same name twice, bad names and quotas: refused.
    for (body, code) in [
        (json!({"name": "alice"}), 409),
        (json!({"name": ""}), 400),
        (json!({"name": "a b"}), 400),
        (json!({"name": "c", "max_inflight": 0}), 400),
        (json!({"name": "c", "max_tasks": 0}), 400),
        (json!({"name": "c", "other": 1}), 400),
    ] {
        let (status, v) = call(&net, "POST", &operator, "/api/v1/keys", Some(body.clone()));
        assert_eq!(status, code, "{body}: {v}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }

    // Alice works in her default session, through both APIs.
    let (status, v) = call(
        &net,
        "POST",
        &a,
        "/v1/completions",
        Some(json!({"model": "scripted-echo", "prompt": "hi", "max_tokens": 4})),
    );
    assert_eq!(status, 200, "{v}");
    let (status, created) = call(
        &net,
        "POST",
        &a,
        "/api/v1/sessions",
        Some(json!({"name": "alice's", "redundant": 1, "deposit": 10000})),
    );
    assert_eq!(status, 201, "{created}");
    let alice_session = created["session_id"].as_u64().unwrap();
    let (status, v) = call(
        &net,
        "POST",
        &a,
        &format!("/api/v1/completions/{alice_session}"),
        Some(json!({"prompt": "mine", "max_tokens": 4})),
    );
    assert_eq!(status, 200, "{v}");
    let tid = v["task_id"].as_u64().unwrap();

    // Bob sees none of it and can use none of it.
    let (_, list) = call(&net, "GET", &b, "/api/v1/sessions", None);
    let ids: Vec<u64> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_u64().or(s["session_id"].as_u64()).unwrap())
        .collect();
    assert!(
        !ids.contains(&alice_session),
        "bob lists alice's session: {list}"
    );
    for path in [
        format!("/api/v1/sessions/{alice_session}"),
        format!("/api/v1/tasks/{alice_session}"),
        format!("/api/v1/tasks/{alice_session}/{tid}"),
    ] {
        let (status, v) = call(&net, "GET", &b, &path, None);
        assert_eq!(status, 403, "{path}: {v}");
    }
    let (status, v) = call(
        &net,
        "POST",
        &b,
        &format!("/api/v1/completions/{alice_session}"),
        Some(json!({"prompt": "hers", "max_tokens": 4})),
    );
    assert_eq!(status, 403, "{v}");
    let (status, _) = call(
        &net,
        "POST",
        &b,
        &format!("/api/v1/tasks/{alice_session}/{tid}/cancel"),
        None,
    );
    assert_eq!(status, 403);

    // Clients manage no keys.
    let (status, _) = call(
        &net,
        "POST",
        &b,
        "/api/v1/keys",
        Some(json!({"name": "mallory"})),
    );
    assert_eq!(status, 403);
    let (status, _) = call(&net, "GET", &a, "/api/v1/keys", None);
    assert_eq!(status, 403);

    // Alice's quota: one task in flight, three in all (two used).
    let slow_one = {
        let (http, url, key) = (net.http.clone(), net.url("/api/v1/completions"), a.clone());
        std::thread::spawn(move || {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"prompt": "slow", "max_tokens": 8}))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let (status, v) = call(
        &net,
        "POST",
        &a,
        "/api/v1/completions",
        Some(json!({"prompt": "second", "max_tokens": 2})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{v}"
    );
    assert_eq!(slow_one.join().unwrap(), 200);
    let (status, v) = call(
        &net,
        "POST",
        &a,
        "/api/v1/completions",
        Some(json!({"prompt": "fourth", "max_tokens": 2})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{v}"
    );

    // The listing shows names and use, never keys.
    let (status, keys) = call(&net, "GET", &operator, "/api/v1/keys", None);
    assert_eq!(status, 200);
    let text = keys.to_string();
    assert!(
        !text.contains(&a) && !text.contains(&b),
        "a key is listed: {text}"
    );
    let alice_row = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "alice")
        .unwrap()
        .clone();
    assert_eq!(alice_row["tasks_used"], 3, "{alice_row}");

    // Revoked: Bob is turned away.
    let (status, _) = call(&net, "POST", &operator, "/api/v1/keys/bob/revoke", None);
    assert_eq!(status, 200);
    let (status, _) = call(&net, "GET", &b, "/api/v1/sessions", None);
    assert_eq!(status, 401);
    let (status, _) = call(&net, "POST", &operator, "/api/v1/keys/nobody/revoke", None);
    assert_eq!(status, 404);

    // After a restart: alice still works (and is still out of tasks), bob still revoked, and
    // no file of the router holds either key.
    net.testnet.shutdown();
    assert!(
        !files_contain(dir.path(), a.as_bytes()),
        "alice's key is stored in clear"
    );
    assert!(
        !files_contain(dir.path(), b.as_bytes()),
        "bob's key is stored in clear"
    );
    let net = scripted(
        "nodes.miners = 2",
        HashMap::new(),
        HashMap::new(),
        dir.path(),
    );
    let (status, v) = call(
        &net,
        "GET",
        &a,
        &format!("/api/v1/sessions/{alice_session}"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(
        &net,
        "POST",
        &a,
        "/api/v1/completions",
        Some(json!({"prompt": "again", "max_tokens": 2})),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("quota_exceeded")),
        "{v}"
    );
    let (status, _) = call(&net, "GET", &b, "/api/v1/sessions", None);
    assert_eq!(status, 401);
}
