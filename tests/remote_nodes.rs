//! Miners on other hosts: remote miners join a router over its node WebSocket (real TCP,
//! the same link and miner actors `cortensor miner` runs), log in with a signed challenge,
//! and serve tasks like local ones; a connection lost mid-task hands the task to another
//! miner and takes the lost one offline. The login refuses bad keys, other versions,
//! malformed and oversized frames, each with a reason. A remote validator's evidence counts
//! only when its own key signed it.

use cortensor::chain::node_key::NodeKey;
use cortensor::nodes::protocol::{
    self, NodeFrame, NodeRole, RouterFrame, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use cortensor::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use cortensor::testkit::remote::RemoteMiner;
use cortensor::testkit::scripted_engine::Script;
use cortensor::testkit::sse::SseEvents;
use cortensor::validation::consensus::Evidence;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tungstenite::Message;

fn network(script: Script) -> TestNetwork {
    TestnetBuilder::new()
        // Scripted generations take seconds here (slow scripts): room for them.
        .config("[queue]\nprecommit_timeout_ms = 20000\n")
        .miners(0)
        .validators(1)
        .engines(Engines::Scripted(script))
        .node_gateway()
        .start()
        .expect("the network starts")
}

fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn miner_states(net: &TestNetwork) -> Value {
    net.get("/api/v1/miners").1["nodes"].clone()
}

fn ready(net: &TestNetwork) -> usize {
    net.ready_miners()
}

fn join(net: &TestNetwork, n: usize) -> Vec<RemoteMiner> {
    let (engine, model) = net.engine();
    let url = net.node_url().expect("the network serves nodes");
    let miners: Vec<RemoteMiner> = (0..n)
        .map(|_| RemoteMiner::start(&url, engine.clone(), &model, 4))
        .collect();
    wait_for(Duration::from_secs(20), "the remote miners to join", || {
        ready(net) == n
    });
    miners
}

#[test]
fn remote_miners_serve_tasks_as_local_ones_do() {
    let net = network(Script::default());
    let miners = join(&net, 3);
    let sid = net.create_session(3, 1_000_000).unwrap();
    for i in 0..5 {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": format!("remote {i}"), "max_tokens": 8}),
        );
        assert_eq!(status, 200, "{v}");
        let task = net.get(&format!("/api/v1/tasks/{sid}/{}", v["task_id"])).1;
        assert_eq!(task["status"], "Completed", "{task}");
        let mut served: Vec<String> = task["results"]["miners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect();
        served.sort();
        let mut ids: Vec<String> = miners.iter().map(|m| m.id.clone()).collect();
        ids.sort();
        assert_eq!(
            served, ids,
            "all three remote miners committed, by their addresses"
        );
    }
    // Their claims were signed with the keys they logged in with: none refused.
    let metrics = net.get_text("/metrics");
    assert!(
        metrics.contains("cortensor_rejected_reports_total 0"),
        "{metrics}"
    );
}

#[test]
fn a_lost_connection_mid_task_hands_the_task_to_another_miner() {
    // 40 tokens at 50 ms: two seconds of generation, plenty of time to cut one miner off.
    let script = Script {
        length: 40,
        ..Script::slow(Duration::from_millis(50))
    };
    let net = network(script);
    let mut miners = join(&net, 2);
    let sid = net.create_session(1, 1_000_000).unwrap();
    let url = net.url();
    let key = net.api_key();
    let client = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .post(format!("{url}/api/v1/completions"))
            .bearer_auth(key)
            .json(&json!({"session_id": sid, "prompt": "a long answer", "max_tokens": 40}))
            .send()
            .and_then(|r| r.json::<Value>())
    });
    let task_path = format!("/api/v1/tasks/{sid}/1");
    let mut first = String::new();
    wait_for(Duration::from_secs(10), "the task to be acked", || {
        let (_, t) = net.get(&task_path);
        match t["assignments"][0]["acked_at"].as_u64() {
            Some(_) => {
                first = t["assignments"][0]["miner"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    std::thread::sleep(Duration::from_millis(300)); // mid-generation
    let index = miners.iter().position(|m| m.id == first).unwrap();
    miners.remove(index).stop();

    let answer = client.join().unwrap().expect("the client gets an answer");
    let (_, task) = net.get(&task_path);
    assert!(
        answer["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{answer}\n{task}\n{}",
        miner_states(&net)
    );
    let (_, task) = net.get(&task_path);
    assert_eq!(task["status"], "Completed", "{task}");
    let lost = &task["assignments"][0];
    assert_eq!(lost["miner"], first.as_str());
    assert_eq!(lost["state"], "Replaced", "{task}");
    assert!(
        lost["note"].as_str().unwrap().contains("connection"),
        "{task}"
    );
    assert_eq!(task["results"]["miners"], json!([miners[0].id]), "{task}");
    // The lost miner is offline in the pool.
    let states = miner_states(&net);
    assert_eq!(states[&first]["state"], "offline", "{states}");
}

/// A raw WebSocket client at the node port: reads the challenge.
fn dial(
    net: &TestNetwork,
) -> (
    tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    String,
) {
    let (mut socket, _) = tungstenite::connect(net.node_url().unwrap()).expect("connects");
    let Message::Text(text) = socket.read().unwrap() else {
        panic!("the router speaks first, in text");
    };
    let RouterFrame::Challenge {
        versions,
        challenge,
    } = protocol::decode(&text).unwrap()
    else {
        panic!("the first frame is a challenge: {text}");
    };
    assert_eq!(versions, [protocol::MIN_VERSION, PROTOCOL_VERSION]);
    (socket, challenge)
}

/// Reads until the router's `rejected` frame and returns its reason (or the close reason).
fn refusal(
    socket: &mut tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
) -> String {
    loop {
        match socket.read() {
            Ok(Message::Text(text)) => {
                if let Ok(RouterFrame::Rejected { reason, .. }) = protocol::decode(&text) {
                    return reason;
                }
            }
            Ok(Message::Close(frame)) => {
                return frame.map(|f| f.reason.to_string()).unwrap_or_default()
            }
            Ok(_) => {}
            Err(e) => return format!("connection ended: {e}"),
        }
    }
}

#[test]
fn the_login_refuses_wrong_keys_versions_and_frames() {
    let net = network(Script::default());
    let key = NodeKey::random("n");

    // Signed by another key than the address it claims.
    let (mut s, challenge) = dial(&net);
    let NodeFrame::Hello { signature, .. } =
        protocol::hello(&challenge, NodeRole::Miner, &NodeKey::random("x")).unwrap()
    else {
        unreachable!()
    };
    let forged = NodeFrame::Hello {
        version: PROTOCOL_VERSION,
        role: NodeRole::Miner,
        address: key.address(),
        signature,
    };
    s.send(Message::Text(protocol::encode(&forged))).unwrap();
    let reason = refusal(&mut s);
    assert!(reason.contains("signed by"), "{reason}");

    // A login replayed from another connection's challenge.
    let (_, old_challenge) = dial(&net);
    let (mut s, _) = dial(&net);
    let replay = protocol::hello(&old_challenge, NodeRole::Miner, &key).unwrap();
    s.send(Message::Text(protocol::encode(&replay))).unwrap();
    let reason = refusal(&mut s);
    assert!(reason.contains("signed by"), "{reason}");

    // Another protocol version.
    let (mut s, challenge) = dial(&net);
    let NodeFrame::Hello {
        role,
        address,
        signature,
        ..
    } = protocol::hello(&challenge, NodeRole::Miner, &key).unwrap()
    else {
        unreachable!()
    };
    let future = NodeFrame::Hello {
        version: PROTOCOL_VERSION + 1,
        role,
        address,
        signature,
    };
    s.send(Message::Text(protocol::encode(&future))).unwrap();
    let reason = refusal(&mut s);
    assert!(reason.contains("version"), "{reason}");

    // Not a frame at all; a report before logging in; binary.
    for bad in [
        Message::Text("{\"type\":\"launch\"}".into()),
        Message::Text(protocol::encode(&NodeFrame::Heartbeat)),
        Message::Binary(vec![1, 2, 3]),
    ] {
        let (mut s, _) = dial(&net);
        s.send(bad.clone()).unwrap();
        let reason = refusal(&mut s);
        assert!(!reason.is_empty(), "{bad:?} was refused with a reason");
    }

    // A frame over the limit ends the connection.
    let (mut s, _) = dial(&net);
    let huge = format!(
        "{{\"type\":\"heartbeat\",\"pad\":\"{}\"}}",
        "x".repeat(MAX_FRAME_BYTES)
    );
    let _ = s.send(Message::Text(huge));
    let reason = refusal(&mut s);
    assert!(!reason.is_empty());

    // A model the router does not serve.
    let (mut s, challenge) = dial(&net);
    let hello = protocol::hello(&challenge, NodeRole::Miner, &key).unwrap();
    s.send(Message::Text(protocol::encode(&hello))).unwrap();
    let Message::Text(welcome) = s.read().unwrap() else {
        panic!("welcome")
    };
    assert!(welcome.contains("welcome"), "{welcome}");
    let register = NodeFrame::Register {
        model: "not-served".into(),
        backend: "cpu".into(),
        max_tasks: 1,
    };
    s.send(Message::Text(protocol::encode(&register))).unwrap();
    let reason = refusal(&mut s);
    assert!(reason.contains("not-served"), "{reason}");

    // After all that, a good node still joins and works.
    let _miners = join(&net, 1);
    let sid = net.create_session(1, 1_000_000).unwrap();
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "still fine", "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{v}");
}

#[test]
fn a_stream_goes_on_without_a_repeated_or_lost_token_when_its_miner_dies() {
    // 60 tokens at 40 ms: the stream is well under way when its miner goes.
    let script = Script {
        length: 60,
        ..Script::slow(Duration::from_millis(40))
    };
    let net = network(script);
    let mut miners = join(&net, 2);
    let sid = net.create_session(1, 1_000_000).unwrap();
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/completions", net.url()))
        .bearer_auth(net.api_key())
        .json(&json!({"session_id": sid, "prompt": "a streamed answer", "max_tokens": 60, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let (mut streamed, mut pieces, mut task_id) = (String::new(), 0, 0);
    let mut cut = false;
    for chunk in SseEvents::new(response) {
        assert!(chunk.get("error").is_none(), "{chunk}");
        task_id = chunk["task_id"].as_u64().unwrap_or(task_id);
        streamed.push_str(chunk["choices"][0]["text"].as_str().unwrap_or(""));
        pieces += 1;
        if pieces == 10 && !cut {
            // The miner streaming this answer goes away mid-generation.
            let (_, t) = net.get(&format!("/api/v1/tasks/{sid}/{task_id}"));
            let serving = t["assignments"][0]["miner"].as_str().unwrap().to_string();
            let i = miners.iter().position(|m| m.id == serving).unwrap();
            miners.remove(i).stop();
            cut = true;
        }
    }
    assert!(cut, "the stream ended before the cut ({pieces} pieces)");
    let (_, task) = net.get(&format!("/api/v1/tasks/{sid}/{task_id}"));
    assert_eq!(task["status"], "Completed", "{task}");
    assert_eq!(task["assignments"][0]["state"], "Replaced", "{task}");
    assert_eq!(task["results"]["miners"], json!([miners[0].id]), "{task}");
    // What the client read is exactly the accepted answer: nothing twice, nothing missing.
    assert_eq!(
        streamed,
        task["accepted"]["text"].as_str().unwrap(),
        "{task}"
    );
    assert_eq!(task["usage"]["completion_tokens"], 60);
}

/// A raw validator at the node port that answers every `validate` with evidence naming
/// `marker` in its errors, signed by `signer`; ends when the router closes the socket.
fn raw_validator(net: &TestNetwork, key: NodeKey, signer: NodeKey, marker: &'static str) {
    let (mut s, challenge) = dial(net);
    let hello = protocol::hello(&challenge, NodeRole::Validator, &key).unwrap();
    s.send(Message::Text(protocol::encode(&hello))).unwrap();
    s.send(Message::Text(protocol::encode(&NodeFrame::ValidatorReady)))
        .unwrap();
    std::thread::spawn(move || loop {
        let Ok(Message::Text(text)) = s.read() else {
            return;
        };
        if let Ok(RouterFrame::Validate { id, validate }) = protocol::decode(&text) {
            let evidence = Evidence {
                errors: vec![marker.to_string()],
                ..Evidence::default()
            };
            let frame = protocol::signed_evidence(&challenge, id, validate.key, &evidence, &signer)
                .unwrap();
            s.send(Message::Text(protocol::encode(&frame))).unwrap();
        }
    });
}

fn validators_connected(net: &TestNetwork) -> f64 {
    net.get_text("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("cortensor_validators "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A remote validator's evidence counts only when the key its login proved signed it:
/// evidence signed by another key is refused (its content never reaches the decision); signed
/// by the validator's own key, it reaches the decision under the validator's id.
#[test]
fn a_remote_validators_evidence_counts_only_under_its_own_signature() {
    let validator = NodeKey::random("validator");
    let net = TestnetBuilder::new()
        .config(&format!(
            "[nodes]\nprobes_required = 0\nvalidators_allowed = [\"{:?}\"]\n\
             [queue]\nmax_replacements = 0\n",
            validator.address()
        ))
        .miners(1)
        .validators(0)
        .engines(Engines::Scripted(Script::default()))
        .node_gateway()
        .start()
        .expect("the network starts");
    wait_for(Duration::from_secs(20), "the local miner", || {
        ready(&net) == 1
    });
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 1, "deposit": 1_000_000, "validation": "likelihood",
                "num_of_validator_nodes": 1}),
    );
    assert_eq!(status, 201, "{v}");
    let sid = v["session_id"].as_u64().unwrap();
    let ask = |prompt: &str| {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": prompt, "max_tokens": 4}),
        );
        assert_eq!(
            status, 502,
            "a validator that checks nothing fails the task: {v}"
        );
        v["error"]["message"].as_str().unwrap().to_string()
    };

    // Logged in with its key, the validator's evidence signed with another key.
    raw_validator(
        &net,
        validator.clone(),
        NodeKey::random("other"),
        "forged-marker",
    );
    wait_for(Duration::from_secs(20), "the validator to join", || {
        validators_connected(&net) == 1.0
    });
    let message = ask("judged under a forged signature");
    assert!(message.contains("evidence refused"), "{message}");
    assert!(message.contains("signed by"), "{message}");
    assert!(!message.contains("forged-marker"), "{message}");

    // The same node logs in again (its new connection replaces the old one) and signs its
    // evidence with its own key: the evidence reaches the decision, under its id.
    raw_validator(&net, validator.clone(), validator.clone(), "honest-marker");
    let own = format!("{}: honest-marker", protocol::node_id(validator.address()));
    let mut seen_honest = false;
    for i in 0..20 {
        let message = ask(&format!("judged again {i}"));
        if message.contains("honest-marker") {
            assert!(message.contains(&own), "{message}");
            assert!(!message.contains("evidence refused"), "{message}");
            seen_honest = true;
            break;
        }
        // The old connection may answer until the new one has replaced it.
        assert!(message.contains("evidence refused"), "{message}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen_honest, "the honest validator was never asked");
}
