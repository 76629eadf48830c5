//! A router's own clients as attackers, through the real HTTP and WebSocket API: each test is
//! an attack a client key can try (conjure a deposit, capture the pool, keep a revoked key's
//! socket open, spend a quota on refused work) and what the router must answer instead. The
//! fault kit's invariant checker runs after each: nothing accepted lost, money conserved,
//! nothing paid twice or to nobody.

use cortensor::testkit::{TestNetwork, TestnetBuilder};
use serde_json::{json, Value};
use std::time::Duration;
use tungstenite::Message;

fn call(
    net: &TestNetwork,
    method: &str,
    key: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let http = reqwest::blocking::Client::new();
    let url = format!("{}{path}", net.url());
    let request = match method {
        "GET" => http.get(url),
        "DELETE" => http.delete(url),
        _ => http.post(url).json(&body.unwrap_or(json!({}))),
    };
    let r = request
        .bearer_auth(key)
        .send()
        .expect("the request is sent");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Issues a client key (as the operator) and returns it.
fn issue(net: &TestNetwork, body: Value) -> String {
    let (status, v) = call(net, "POST", &net.api_key(), "/api/v1/keys", Some(body));
    assert_eq!(status, 201, "{v}");
    v["key"].as_str().expect("the key is shown").to_string()
}

fn create_session(net: &TestNetwork, key: &str, body: Value) -> (u16, Value) {
    call(net, "POST", key, "/api/v1/sessions", Some(body))
}

fn finish_clean(net: TestNetwork) {
    let report = net.finish(Duration::from_secs(30));
    assert!(report.violations.is_empty(), "{report}");
}

#[test]
fn a_clients_deposits_come_from_its_credit_alone() {
    let net = TestnetBuilder::new().start().unwrap();
    let operator = net.api_key();
    // A key issued without credit has its default session's deposit, and nothing more.
    let (status, alice) = call(
        &net,
        "POST",
        &operator,
        "/api/v1/keys",
        Some(json!({"name": "alice", "deposit": 1000})),
    );
    assert_eq!(status, 201, "{alice}");
    assert_eq!(
        (alice["credit"].as_u64(), alice["credit_left"].as_u64()),
        (Some(1000), Some(0))
    );
    let a = alice["key"].as_str().unwrap().to_string();

    // The attack: a session whose deposit comes from nowhere (named, or the default one).
    for body in [
        json!({"name": "free money", "deposit": 1_000_000_000u64}),
        json!({"name": "default deposit"}),
        json!({"name": "one unit", "deposit": 1}),
    ] {
        let (status, v) = create_session(&net, &a, body.clone());
        assert_eq!(status, 402, "{body}: {v}");
        assert_eq!(v["error"]["code"], "insufficient_balance", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("credit"),
            "{v}"
        );
    }
    // Nor can a client grant itself credit.
    let (status, v) = call(
        &net,
        "POST",
        &a,
        "/api/v1/keys/alice/credit",
        Some(json!({"amount": 1})),
    );
    assert_eq!(status, 403, "{v}");

    // An operator grants credit; the client deposits up to it and not a unit more.
    let (status, v) = call(
        &net,
        "POST",
        &operator,
        "/api/v1/keys/alice/credit",
        Some(json!({"amount": 5000})),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["credit_left"], 5000, "{v}");
    let (status, v) = create_session(&net, &a, json!({"name": "paid", "deposit": 3000}));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["session"]["deposit"], 3000, "{v}");
    let (status, v) = create_session(&net, &a, json!({"name": "over", "deposit": 2001}));
    assert_eq!(status, 402, "{v}");
    let (status, v) = create_session(&net, &a, json!({"name": "rest", "deposit": 2000}));
    assert_eq!(status, 201, "{v}");

    // Many requests at once cannot spend the last of the credit twice.
    let (status, _) = call(
        &net,
        "POST",
        &operator,
        "/api/v1/keys/alice/credit",
        Some(json!({"amount": 3})),
    );
    assert_eq!(status, 200);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let (net, a) = (&net, &a);
                s.spawn(move || {
                    create_session(net, a, json!({"name": format!("race {i}"), "deposit": 1})).0
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 402).count(),
        5,
        "{statuses:?}"
    );

    // The operator's listing shows the grant and what was spent of it.
    let (_, keys) = call(&net, "GET", &operator, "/api/v1/keys", None);
    let listed = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "alice")
        .cloned()
        .unwrap();
    assert_eq!(
        (listed["credit"].as_u64(), listed["credit_spent"].as_u64()),
        (Some(6003), Some(6003)),
        "{listed}"
    );

    // The development key of a loopback testnet keeps an unlimited testnet credit.
    let (status, v) = create_session(
        &net,
        &operator,
        json!({"name": "ops", "deposit": 1_000_000_000_000u64}),
    );
    assert_eq!(status, 201, "{v}");
    finish_clean(net);
}

#[test]
fn a_client_cannot_capture_the_pool() {
    let net = TestnetBuilder::new()
        .miners(3)
        .config("router.max_sessions_per_key = 4\n")
        .start()
        .unwrap();
    let operator = net.api_key();
    let a = issue(
        &net,
        json!({"name": "alice", "deposit": 1000, "credit": 100_000}),
    );
    let b = issue(&net, json!({"name": "bob", "deposit": 1000}));
    let dedicated = json!({"name": "mine", "mode": 2, "redundant": 1, "min_num_of_nodes": 1,
                           "max_num_of_nodes": 1, "reserve_period": 60, "deposit": 1000});
    let (status, v) = create_session(&net, &a, dedicated);
    assert_eq!(status, 201, "{v}");
    let sid = v["session_id"].as_u64().unwrap();
    let (_, miners) = call(&net, "GET", &operator, "/api/v1/miners", None);
    let node = miners["nodes"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();

    // The attack: a client pins a node to its own session, taking it out of the pool.
    let (status, v) = call(
        &net,
        "POST",
        &a,
        &format!("/api/v1/sessions/{sid}/nodes"),
        Some(json!({"node": node})),
    );
    assert_eq!(status, 403, "{v}");
    // Reservations have ceilings: nodes per session, and the period.
    let (status, v) = create_session(
        &net,
        &a,
        json!({"name": "all of them", "mode": 2, "redundant": 3, "min_num_of_nodes": 3,
               "max_num_of_nodes": 3, "deposit": 1000}),
    );
    assert_eq!(status, 403, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 nodes"),
        "{v}"
    );
    let (status, v) = create_session(
        &net,
        &a,
        json!({"name": "forever", "mode": 1, "max_num_of_nodes": 1, "reserve_period": 86_400, "deposit": 1}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reserve_period"),
        "{v}"
    );

    // The operator pins; the pin shows, and the session's owner can undo it (another key
    // cannot).
    let (status, v) = call(
        &net,
        "POST",
        &operator,
        &format!("/api/v1/sessions/{sid}/nodes"),
        Some(json!({"node": node})),
    );
    assert_eq!(status, 200, "{v}");
    let pinned_to = |net: &TestNetwork| {
        let (_, miners) = call(net, "GET", &operator, "/api/v1/miners", None);
        miners["nodes"][&node]["pinned_to"].as_u64()
    };
    assert_eq!(pinned_to(&net), Some(sid));
    let unpin = format!("/api/v1/sessions/{sid}/nodes/{node}");
    let (status, v) = call(&net, "DELETE", &b, &unpin, None);
    assert_eq!(status, 403, "{v}");
    let (status, v) = call(&net, "DELETE", &a, &unpin, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["pinned"], false, "{v}");
    assert_eq!(pinned_to(&net), None);
    let (status, v) = call(&net, "DELETE", &a, &unpin, None);
    assert_eq!(status, 404, "{v}");

    // Sessions per key are capped (alice has her default one and `mine`)...
    for i in 0..2 {
        let (status, v) = create_session(&net, &a, json!({"name": format!("s{i}"), "deposit": 1}));
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = create_session(&net, &a, json!({"name": "one too many", "deposit": 1}));
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");
    // ... and listed a page at a time.
    let (status, first) = call(&net, "GET", &a, "/api/v1/sessions?limit=3", None);
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        (
            first["count"].as_u64(),
            first["sessions"].as_array().unwrap().len()
        ),
        (Some(4), 3)
    );
    let after = first["next_after"].as_u64().expect("a next page");
    let (_, rest) = call(
        &net,
        "GET",
        &a,
        &format!("/api/v1/sessions?limit=3&after={after}"),
        None,
    );
    assert_eq!(rest["sessions"].as_array().unwrap().len(), 1, "{rest}");
    assert!(rest["next_after"].is_null(), "{rest}");
    finish_clean(net);
}

#[test]
fn a_key_in_a_url_opens_only_websockets_and_a_revoked_key_keeps_none_open() {
    let net = TestnetBuilder::new().start().unwrap();
    let a = issue(&net, json!({"name": "alice", "deposit": 1000}));
    // A key in an ordinary URL is not taken (it would end up in logs and histories).
    let r = reqwest::blocking::get(format!("{}/api/v1/sessions?token={a}", net.url())).unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // A WebSocket upgrade takes it, as browsers cannot set headers on one.
    let ws_url = format!(
        "{}/api/v1/ws?token={a}",
        net.url().replacen("http", "ws", 1)
    );
    let (mut ws, _) = tungstenite::connect(ws_url).expect("the upgrade is accepted");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    ws.send(Message::Text(r#"{"type": "ping", "id": 1}"#.into()))
        .unwrap();
    let pong: Value = serde_json::from_str(&ws.read().unwrap().into_text().unwrap()).unwrap();
    assert_eq!(pong["type"], "pong", "{pong}");

    // Revoking the key closes its open socket, with the reason.
    let (status, v) = call(
        &net,
        "POST",
        &net.api_key(),
        "/api/v1/keys/alice/revoke",
        None,
    );
    assert_eq!(status, 200, "{v}");
    let mut told = None;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => told = Some(serde_json::from_str::<Value>(&t).unwrap()),
            Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => break,
            Ok(_) => {}
            Err(e) => panic!("the socket of a revoked key stayed open: {e} (told {told:?})"),
        }
    }
    let told = told.expect("an error before the close");
    assert_eq!(told["error"]["code"], "unauthorized", "{told}");
    finish_clean(net);
}

#[test]
fn a_quota_counts_accepted_tasks_and_validations() {
    let net = TestnetBuilder::new().start().unwrap();
    let a = issue(
        &net,
        json!({"name": "alice", "deposit": 1000, "max_tasks": 2}),
    );
    // A session with nothing in it: every task there is refused (402) before it runs.
    let (status, v) = create_session(
        &net,
        &a,
        json!({"name": "empty", "redundant": 1, "deposit": 0}),
    );
    assert_eq!(status, 201, "{v}");
    let empty = v["session_id"].as_u64().unwrap();
    for _ in 0..3 {
        let (status, v) = call(
            &net,
            "POST",
            &a,
            &format!("/api/v1/completions/{empty}"),
            Some(json!({"prompt": "x", "max_tokens": 4})),
        );
        assert_eq!(status, 402, "{v}");
    }
    // Refused tasks used none of the quota: two tasks run, the third is over it.
    for _ in 0..2 {
        let (status, v) = call(
            &net,
            "POST",
            &a,
            "/api/v1/completions",
            Some(json!({"prompt": "x", "max_tokens": 4})),
        );
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = call(
        &net,
        "POST",
        &a,
        "/api/v1/completions",
        Some(json!({"prompt": "x", "max_tokens": 4})),
    );
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");

    // The validators' work counts against the quota as a task does.
    let b = issue(
        &net,
        json!({"name": "bob", "deposit": 1000, "max_tasks": 1}),
    );
    let claim = json!({"task_request_input": "Say hi.", "task_result_output": ["hi", "hi"],
                       "evaluation_mode": "exact"});
    let (status, v) = call(&net, "POST", &b, "/api/v1/validate", Some(claim.clone()));
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(&net, "POST", &b, "/api/v1/validate", Some(claim));
    assert_eq!(status, 429, "{v}");
    finish_clean(net);
}

#[test]
fn results_nobody_paid_for_are_not_given_away() {
    use cortensor::actors::miner::EngineFactory;
    use cortensor::models::engine::InferenceEngine;
    use cortensor::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
    use cortensor::testkit::Engines;
    // Two miners that never agree: under exact validation and `fail_hard`, every task of a
    // redundancy-2 session fails, charged nothing.
    let factory: EngineFactory = std::sync::Arc::new(|miner: &str| {
        let script = Script {
            dishonest: miner == "miner-2",
            ..Script::default()
        };
        Ok(Box::new(ScriptedEngine::new(script)) as Box<dyn InferenceEngine>)
    });
    let net = TestnetBuilder::new()
        .miners(2)
        .engines(Engines::Custom {
            factory,
            model: SCRIPTED_MODEL.into(),
        })
        .start()
        .unwrap();
    // The attack: a redundancy-2 exact session whose miners disagree; the task fails and the
    // client reads both committed results from the record for nothing.
    let operator = net.api_key();
    let (status, v) = create_session(
        &net,
        &operator,
        json!({"name": "disagreeing", "redundant": 2, "deposit": 100_000}),
    );
    assert_eq!(status, 201, "{v}");
    let sid = v["session_id"].as_u64().unwrap();
    let (status, v) = call(
        &net,
        "POST",
        &operator,
        &format!("/api/v1/completions/{sid}"),
        Some(json!({"prompt": "x", "max_tokens": 4})),
    );
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], "task_failed", "{v}");
    let (_, tasks) = call(
        &net,
        "GET",
        &operator,
        &format!("/api/v1/tasks/{sid}"),
        None,
    );
    let task = tasks["tasks"][0].clone();
    assert_eq!(task["status"], "Failed", "{task}");
    assert_eq!(task["charged"], 0, "{task}");
    assert_eq!(
        task["results"]["miners"].as_array().unwrap().len(),
        2,
        "{task}"
    );
    assert_eq!(task["results"]["data"], json!([]), "{task}");
    finish_clean(net);
}

#[test]
fn a_precommit_deadline_no_miner_can_meet_is_refused() {
    use cortensor::testkit::scripted_engine::Script;
    use cortensor::testkit::Engines;
    let net = TestnetBuilder::new()
        .miners(2)
        .engines(Engines::Scripted(Script::slow(Duration::from_millis(20))))
        .start()
        .unwrap();
    let sid = net.create_session(1, 1_000_000).unwrap();
    let op = net.api_key();
    let complete = |body: Value| {
        call(
            &net,
            "POST",
            &op,
            &format!("/api/v1/completions/{sid}"),
            Some(body),
        )
    };
    // Before any speed is measured, any deadline in range goes.
    let (status, v) = complete(json!({"prompt": "warm", "max_tokens": 8, "precommit_timeout": 1}));
    assert_eq!(status, 200, "{v}");
    let (_, miners) = call(&net, "GET", &op, "/api/v1/miners", None);
    let speeds: Vec<f64> = miners["nodes"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|n| n["tokens_per_second"].as_f64())
        .collect();
    assert!(!speeds.is_empty(), "a speed was measured: {miners}");
    let reputations = |net: &TestNetwork| {
        let (_, m) = call(net, "GET", &op, "/api/v1/miners", None);
        m["nodes"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n["reputation"].clone())
            .collect::<Vec<_>>()
    };
    let before = reputations(&net);
    // The attack: a deadline far shorter than the fastest miner needs for max_tokens, which
    // would cost honest miners their standing for the client's choice.
    let (status, v) =
        complete(json!({"prompt": "rush", "max_tokens": 2000, "precommit_timeout": 1}));
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("precommit_timeout"),
        "{v}"
    );
    assert_eq!(reputations(&net), before);
    // A deadline the measured speed allows is taken.
    let (status, v) = complete(json!({"prompt": "calm", "max_tokens": 8, "precommit_timeout": 60}));
    assert_eq!(status, 200, "{v}");
    finish_clean(net);
}
