//! Hostile validators at the router's node socket, each a raw WebSocket client doing the real
//! signed login: a key off the operator's allow-list is refused at login and never asked to
//! validate; an admitted validator's evidence with numbers out of range (a grade of 1e39,
//! NaN) or about a miner the task does not have decides nothing and is not paid; and one
//! liar among three validators cannot turn the verdict of the two others.

use cortensor::chain::node_key::NodeKey;
use cortensor::nodes::protocol::{self, NodeFrame, NodeRole, RouterFrame, WireValidate};
use cortensor::store::Store;
use cortensor::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use cortensor::testkit::scripted_engine::Script;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

/// One local scripted miner, no local validator: every verdict comes from remote validators
/// with the keys in `allowed`.
fn network(allowed: &[&NodeKey], data: &std::path::Path) -> TestNetwork {
    let list: Vec<String> = allowed
        .iter()
        .map(|k| format!("\"{:?}\"", k.address()))
        .collect();
    TestnetBuilder::new()
        .config(&format!(
            "[nodes]\nvalidators_allowed = [{}]\n[queue]\nmax_replacements = 0\n",
            list.join(", ")
        ))
        .miners(1)
        .validators(0)
        .engines(Engines::Scripted(Script::default()))
        .node_gateway()
        .data_dir(data.to_path_buf())
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

fn validators_connected(net: &TestNetwork) -> f64 {
    net.get_text("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("cortensor_validators "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn dial(net: &TestNetwork) -> (Socket, String) {
    let (mut socket, _) = tungstenite::connect(net.node_url().unwrap()).expect("connects");
    let Message::Text(text) = socket.read().unwrap() else {
        panic!("the router speaks first, in text");
    };
    let Ok(RouterFrame::Challenge { challenge, .. }) = protocol::decode(&text) else {
        panic!("the first frame is a challenge: {text}");
    };
    (socket, challenge)
}

/// A session judged by `validators` validators under `consensus`.
fn judged_session(net: &TestNetwork, validators: u32, consensus: &str) -> u64 {
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 1, "deposit": 1_000_000, "validation": "judge",
                "num_of_validator_nodes": validators, "consensus": consensus}),
    );
    assert_eq!(status, 201, "{v}");
    v["session_id"].as_u64().unwrap()
}

fn complete(net: &TestNetwork, sid: u64, prompt: &str) -> (u16, Value) {
    net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": prompt, "max_tokens": 4}),
    )
}

/// The task a failed completion names in its error (`task <session>/<task> failed: ...`).
fn failed_task(net: &TestNetwork, sid: u64, v: &Value) -> Value {
    let message = v["error"]["message"].as_str().unwrap_or_default();
    let task: String = message
        .strip_prefix(&format!("task {sid}/"))
        .unwrap_or_default()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(!task.is_empty(), "no task in {v}");
    net.get(&format!("/api/v1/tasks/{sid}/{task}")).1
}

/// Evidence as the JSON text a validator signs: per miner, its id and the grade as written
/// (`1e39` and `NaN` are not numbers an `f32` holds, so the text is written by hand).
fn evidence_text(grades: &[(String, &str)]) -> String {
    let miners: Vec<String> = grades
        .iter()
        .map(|(miner, grade)| {
            format!(
                r#"{{"miner":"{miner}","similarity":null,"likelihood":null,"likelihood_failures":[],"grade":{{"score":{grade},"p_yes":0.5,"answer_mass":0.9}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"validator":"","miners":[{}],"errors":[]}}"#,
        miners.join(",")
    )
}

/// Every miner of the task graded `grade`.
fn grade_all(v: &WireValidate, grade: &str) -> String {
    let grades: Vec<(String, &str)> = v.results.iter().map(|(m, _)| (m.clone(), grade)).collect();
    evidence_text(&grades)
}

/// A raw validator logged in with `key` that answers every `validate` with the evidence text
/// `answer` writes, signed with its key. Returns how many `validate` frames it got.
fn raw_validator(
    net: &TestNetwork,
    key: NodeKey,
    answer: impl Fn(&WireValidate) -> String + Send + 'static,
) -> Arc<AtomicUsize> {
    let asked = Arc::new(AtomicUsize::new(0));
    let (mut s, challenge) = dial(net);
    let hello = protocol::hello(&challenge, NodeRole::Validator, &key).unwrap();
    s.send(Message::Text(protocol::encode(&hello))).unwrap();
    s.send(Message::Text(protocol::encode(&NodeFrame::ValidatorReady)))
        .unwrap();
    let count = asked.clone();
    std::thread::spawn(move || loop {
        let Ok(Message::Text(text)) = s.read() else {
            return;
        };
        if let Ok(RouterFrame::Validate { id, validate }) = protocol::decode(&text) {
            count.fetch_add(1, Ordering::SeqCst);
            let evidence = answer(&validate);
            let digest = protocol::evidence_digest(&challenge, id, validate.key, &evidence)
                .expect("the challenge is well formed");
            let signature = key.wallet.sign_hash(digest).expect("signs");
            let frame = NodeFrame::Evidence {
                id,
                evidence,
                signature,
            };
            if s.send(Message::Text(protocol::encode(&frame))).is_err() {
                return;
            }
        }
    });
    asked
}

/// A grade all honest validators give, changed between tasks.
#[derive(Clone)]
struct Shared(Arc<AtomicU32>);

impl Shared {
    fn new(v: f32) -> Self {
        Self(Arc::new(AtomicU32::new(v.to_bits())))
    }
    fn set(&self, v: f32) {
        self.0.store(v.to_bits(), Ordering::SeqCst);
    }
    fn text(&self) -> String {
        format!("{:?}", f32::from_bits(self.0.load(Ordering::SeqCst)))
    }
}

/// What a node has been paid on the embedded ledger.
fn paid(data: &std::path::Path, node: &NodeKey) -> u64 {
    let store = Store::open(data).expect("the store opens");
    store
        .amount(&format!("pay/{}", protocol::node_id(node.address())))
        .unwrap()
}

#[test]
fn a_validator_off_the_allow_list_is_refused_at_login_and_never_asked() {
    let data = tempfile::tempdir().unwrap();
    let listed = NodeKey::random("listed");
    let net = network(&[&listed], data.path());
    wait_for(Duration::from_secs(20), "the miner", || {
        net.ready_miners() == 1
    });
    let sid = judged_session(&net, 1, "majority");

    // A validator with a key the operator never listed: refused at login, with the reason.
    let stranger = NodeKey::random("stranger");
    let (mut s, challenge) = dial(&net);
    let hello = protocol::hello(&challenge, NodeRole::Validator, &stranger).unwrap();
    s.send(Message::Text(protocol::encode(&hello))).unwrap();
    let _ = s.send(Message::Text(protocol::encode(&NodeFrame::ValidatorReady)));
    let reason = loop {
        match s.read() {
            Ok(Message::Text(text)) => match protocol::decode::<RouterFrame>(&text) {
                Ok(RouterFrame::Rejected { reason, retry }) => {
                    assert!(!retry, "{reason}");
                    break reason;
                }
                Ok(RouterFrame::Welcome { .. }) => {
                    panic!("a validator off the allow-list was welcomed")
                }
                Ok(RouterFrame::Validate { .. }) => {
                    panic!("a validator off the allow-list was asked to validate")
                }
                _ => {}
            },
            Ok(Message::Close(frame)) => {
                break frame.map(|f| f.reason.to_string()).unwrap_or_default()
            }
            Ok(_) => {}
            Err(e) => panic!("the connection ended without a reason: {e}"),
        }
    };
    let id = protocol::node_id(stranger.address());
    assert!(reason.contains(&id), "{reason}");
    assert!(reason.contains("allow-list"), "{reason}");
    assert_eq!(validators_connected(&net), 0.0);
    // With no admitted validator, nobody decides: the task fails rather than being judged
    // by the stranger.
    let (status, v) = complete(&net, sid, "judged by nobody");
    assert_eq!(status, 502, "{v}");
    assert!(v.to_string().contains("no validator answered"), "{v}");

    // The listed key logs in and decides.
    let asked = raw_validator(&net, listed.clone(), |v| grade_all(v, "9.0"));
    wait_for(Duration::from_secs(20), "the listed validator", || {
        validators_connected(&net) == 1.0
    });
    let (status, v) = complete(&net, sid, "judged by the listed validator");
    assert_eq!(status, 200, "{v}");
    assert_eq!(asked.load(Ordering::SeqCst), 1);

    let report = net.finish(Duration::from_secs(20));
    assert!(report.violations.is_empty(), "{report}");
    assert!(paid(data.path(), &listed) > 0);
    assert_eq!(paid(data.path(), &stranger), 0);
}

#[test]
fn evidence_out_of_range_or_about_no_miner_decides_nothing_and_is_not_paid() {
    let data = tempfile::tempdir().unwrap();
    let honest: Vec<NodeKey> = (0..2)
        .map(|i| NodeKey::random(&format!("honest-{i}")))
        .collect();
    let hostile = NodeKey::random("hostile");
    let net = network(&[&honest[0], &honest[1], &hostile], data.path());
    wait_for(Duration::from_secs(20), "the miner", || {
        net.ready_miners() == 1
    });
    let grade = Shared::new(2.0);
    for key in &honest {
        let grade = grade.clone();
        raw_validator(&net, key.clone(), move |v| grade_all(v, &grade.text()));
    }
    // What the hostile validator sends, by the number of the task.
    let lie = Arc::new(AtomicUsize::new(0));
    let which = lie.clone();
    let hostile_asked = raw_validator(&net, hostile.clone(), move |v| {
        match which.load(Ordering::SeqCst) {
            0 => grade_all(v, "1e39"),
            1 => grade_all(v, "-1e39"),
            2 => grade_all(v, "NaN"),
            3 => grade_all(v, "11"),
            // A perfect grade for a miner the task does not have, and nothing else.
            _ => evidence_text(&[("0x000000000000000000000000000000000000dead".into(), "10")]),
        }
    });
    wait_for(Duration::from_secs(20), "the three validators", || {
        validators_connected(&net) == 3.0
    });
    let sid = judged_session(&net, 3, "majority");
    let hostile_id = protocol::node_id(hostile.address());

    // The honest two reject the answer; a grade of 1e39 (an f32's infinity) does not pass it.
    let (status, v) = complete(&net, sid, "graded infinitely well");
    assert_eq!(status, 502, "the hostile grade decided: {v}");
    let task = failed_task(&net, sid, &v);
    assert_eq!(
        task["validation"]["miners"][0]["grade"],
        json!(2.0),
        "{task}"
    );
    let reasons = task["validation"]["reasons"].to_string();
    assert!(
        reasons.contains(&format!("{hostile_id}: evidence dropped")),
        "{task}"
    );

    // The honest two accept; whatever the hostile one sends, the answer stands, and its
    // evidence is dropped.
    grade.set(9.0);
    for (n, what) in ["1e39", "-1e39", "NaN", "11", "a miner that does not exist"]
        .iter()
        .enumerate()
    {
        lie.store(n, Ordering::SeqCst);
        let (status, v) = complete(&net, sid, &format!("graded {what}"));
        assert_eq!(status, 200, "{what}: {v}");
        let task = net.get(&format!("/api/v1/tasks/{sid}/{}", v["task_id"])).1;
        let reasons = task["validation"]["reasons"].to_string();
        assert!(
            reasons.contains(&format!("{hostile_id}: evidence")),
            "{what}: {task}"
        );
        assert_eq!(
            task["validation"]["miners"][0]["grade"],
            json!(9.0),
            "{task}"
        );
    }
    assert_eq!(hostile_asked.load(Ordering::SeqCst), 6);

    let report = net.finish(Duration::from_secs(20));
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(
        paid(data.path(), &hostile),
        0,
        "the hostile validator was paid"
    );
    for key in &honest {
        assert!(paid(data.path(), key) > 0);
    }
}

#[test]
fn one_lying_validator_among_three_does_not_turn_the_verdict() {
    let data = tempfile::tempdir().unwrap();
    let keys: Vec<NodeKey> = (0..3)
        .map(|i| NodeKey::random(&format!("validator-{i}")))
        .collect();
    let net = network(&[&keys[0], &keys[1], &keys[2]], data.path());
    wait_for(Duration::from_secs(20), "the miner", || {
        net.ready_miners() == 1
    });
    let (honest, liar) = (Shared::new(6.0), Shared::new(1.0));
    for (i, key) in keys.iter().enumerate() {
        let grade = if i == 1 { liar.clone() } else { honest.clone() };
        raw_validator(&net, key.clone(), move |v| grade_all(v, &grade.text()));
    }
    wait_for(Duration::from_secs(20), "the three validators", || {
        validators_connected(&net) == 3.0
    });
    for consensus in ["majority", "median_of_means", "reputation_weighted"] {
        let sid = judged_session(&net, 3, consensus);
        // The honest two pass it (6 against a threshold of 5); the liar fails everything.
        honest.set(6.0);
        liar.set(1.0);
        let (status, v) = complete(&net, sid, &format!("a fair answer ({consensus})"));
        assert_eq!(status, 200, "{consensus}: the liar rejected it: {v}");
        let task = net.get(&format!("/api/v1/tasks/{sid}/{}", v["task_id"])).1;
        assert_eq!(
            task["validation"]["miners"][0]["grade"],
            json!(6.0),
            "{task}"
        );
        // The honest two fail it (4); the liar passes everything with full marks.
        honest.set(4.0);
        liar.set(10.0);
        let (status, v) = complete(&net, sid, &format!("a poor answer ({consensus})"));
        assert_eq!(status, 502, "{consensus}: the liar passed it: {v}");
        let task = failed_task(&net, sid, &v);
        assert_eq!(
            task["validation"]["miners"][0]["grade"],
            json!(4.0),
            "{task}"
        );
    }
    let report = net.finish(Duration::from_secs(20));
    assert!(report.violations.is_empty(), "{report}");
}

/// When there are more validators than a session asks for, each task's are drawn at random,
/// from a seed of the task's key: a validator cannot place itself to judge chosen tasks (a
/// round robin hands consecutive tasks to consecutive validators), and the draw replays.
#[test]
fn validators_are_drawn_at_random_per_task_from_a_seed() {
    use cortensor::actors::validator::{draw_validators, validator_draw_seed};
    use cortensor::task::TaskKey;
    let mut sets = std::collections::HashSet::new();
    let mut asked = [0usize; 5];
    for task_id in 0..200 {
        let key = TaskKey {
            session_id: 1,
            task_id,
        };
        let seed = validator_draw_seed(key, task_id as usize);
        assert_eq!(seed, validator_draw_seed(key, task_id as usize));
        let mut drawn = draw_validators(5, 2, seed);
        assert_eq!(drawn, draw_validators(5, 2, seed), "seed {seed}");
        drawn.sort();
        assert!(
            drawn.len() == 2 && drawn[0] < drawn[1] && drawn[1] < 5,
            "seed {seed}"
        );
        for &i in &drawn {
            asked[i] += 1;
        }
        sets.insert(drawn);
    }
    // A round robin only ever draws the 5 pairs of neighbours; 10 pairs exist.
    assert!(sets.len() > 5, "{sets:?}");
    assert!(asked.iter().all(|&n| n > 0), "{asked:?}");
    // Asking for more than there are asks them all; asking for none asks one.
    assert_eq!(draw_validators(3, 5, 7).len(), 3);
    assert_eq!(draw_validators(3, 0, 7).len(), 1);
    assert!(draw_validators(0, 2, 7).is_empty());
}
