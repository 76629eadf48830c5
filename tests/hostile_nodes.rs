//! Hostile nodes on the node WebSocket: raw clients that log in for real (a challenge signed
//! with their node key, as `RouterLink` does) and then send hand-made frames. Nothing they
//! send may crash an actor: reports out of bounds (a token index past `max_tokens`, up to
//! `usize::MAX`; a precommit that is no hash; a huge error text) are refused or cut, the
//! queue goes on running tasks for honest miners, and the invariant checker stays clean. A
//! seeded property run sends random frames in random order from a hostile miner and a
//! hostile validator beside honest miners. Connections waiting for their login are capped
//! (per address and in all) and dropped after the login timeout; offline nodes are forgotten.

use cortensor::actors::messages::{MinerReport, ReportKind};
use cortensor::actors::report_signing;
use cortensor::chain::node_key::NodeKey;
use cortensor::models::engine::FinishReason;
use cortensor::nodes::protocol::{self, NodeFrame, NodeRole, RouterFrame};
use cortensor::task::{TaskKey, TaskResult};
use cortensor::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use cortensor::testkit::scripted_engine::Script;
use cortensor::validation::consensus::{Evidence, MinerEvidence};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

type Socket = tungstenite::WebSocket<MaybeTlsStream<TcpStream>>;

fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A network of honest scripted miners with the node socket open. Tasks are asked of every
/// miner (the hostile one too) and a miner taken off one is not replaced.
fn network(miners: usize, overlay: &str) -> TestNetwork {
    TestnetBuilder::new()
        .config(&format!("[queue]\nmax_replacements = 0\n{overlay}"))
        .miners(miners)
        .validators(1)
        .engines(Engines::Scripted(Script::default()))
        .node_gateway()
        .start()
        .expect("the network starts")
}

fn set_read_timeout(socket: &Socket, timeout: Duration) {
    if let MaybeTlsStream::Plain(s) = socket.get_ref() {
        s.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// Opens a WebSocket to the node port from `from` (any 127.x address reaches the router's
/// loopback listener), or says why it could not.
fn open_from(url: &str, from: IpAddr) -> Result<Socket, String> {
    let target: std::net::SocketAddr = url.trim_start_matches("ws://").parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((from, 0).into())?;
            socket.connect(target).await
        })
        .map_err(|e| format!("tcp: {e}"))?
        .into_std()
        .map_err(|e| e.to_string())?;
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (socket, _) = tungstenite::client(url, MaybeTlsStream::Plain(stream))
        .map_err(|e| format!("handshake: {e}"))?;
    Ok(socket)
}

/// Reads the router's challenge.
fn challenge_of(socket: &mut Socket) -> Result<String, String> {
    loop {
        match socket.read().map_err(|e| e.to_string())? {
            Message::Text(text) => {
                return match protocol::decode::<RouterFrame>(&text) {
                    Ok(RouterFrame::Challenge { challenge, .. }) => Ok(challenge),
                    other => Err(format!("expected a challenge, got {other:?}")),
                }
            }
            Message::Close(frame) => return Err(format!("closed: {frame:?}")),
            _ => {}
        }
    }
}

/// A task assigned to a hostile miner, as its `assign` frame said.
#[derive(Clone, Copy, Debug)]
struct Assigned {
    key: TaskKey,
    nonce: u64,
    max_tokens: usize,
}

/// A node that logged in for real and then says whatever it likes.
struct Hostile {
    socket: Socket,
    key: NodeKey,
    id: String,
    challenge: String,
}

impl Hostile {
    /// Logs in with `key` as `role` (from 127.0.0.1); a miner also registers for `model`.
    fn login(
        url: &str,
        key: &NodeKey,
        role: NodeRole,
        model: Option<&str>,
    ) -> Result<Self, String> {
        let mut socket = open_from(url, IpAddr::from([127, 0, 0, 1]))?;
        let challenge = challenge_of(&mut socket)?;
        let hello = protocol::hello(&challenge, role, key).map_err(|e| e.to_string())?;
        socket
            .send(Message::Text(protocol::encode(&hello)))
            .map_err(|e| e.to_string())?;
        loop {
            let Message::Text(text) = socket.read().map_err(|e| e.to_string())? else {
                continue;
            };
            match protocol::decode::<RouterFrame>(&text) {
                Ok(RouterFrame::Welcome { .. }) => break,
                Ok(RouterFrame::Ping) => {}
                other => return Err(format!("expected a welcome, got {other:?}")),
            }
        }
        let mut node = Hostile {
            socket,
            key: key.clone(),
            id: protocol::node_id(key.address()),
            challenge,
        };
        match (role, model) {
            (NodeRole::Miner, Some(model)) => node.send(&NodeFrame::Register {
                model: model.to_string(),
                backend: "cpu".into(),
                max_tasks: 4,
            })?,
            (NodeRole::Validator, _) => node.send(&NodeFrame::ValidatorReady)?,
            _ => {}
        }
        Ok(node)
    }

    fn send(&mut self, frame: &NodeFrame) -> Result<(), String> {
        self.send_text(protocol::encode(frame))
    }

    fn send_text(&mut self, text: String) -> Result<(), String> {
        self.socket
            .send(Message::Text(text))
            .map_err(|e| e.to_string())
    }

    /// A report about `task`, signed with this node's key (or `signer`'s).
    fn report(&self, task: &Assigned, kind: ReportKind, signer: Option<&NodeKey>) -> NodeFrame {
        let mut report = MinerReport {
            key: task.key,
            miner: self.id.clone(),
            nonce: task.nonce,
            kind,
            signature: None,
        };
        report_signing::sign(&mut report, signer.unwrap_or(&self.key));
        NodeFrame::Report {
            key: report.key,
            nonce: report.nonce,
            kind: report.kind,
            signature: report.signature,
        }
    }

    /// The next frame from the router, if one comes within the socket's read timeout.
    fn read(&mut self) -> Result<Option<RouterFrame>, String> {
        match self.socket.read() {
            Ok(Message::Text(text)) => protocol::decode(&text)
                .map(Some)
                .map_err(|e| format!("{e}: {text}")),
            Ok(Message::Close(frame)) => Err(format!("closed: {frame:?}")),
            Ok(_) => Ok(None),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reads until the router assigns a task.
    fn next_assignment(&mut self) -> Assigned {
        loop {
            if let Some(RouterFrame::Assign {
                key,
                nonce,
                request,
                ..
            }) = self.read().expect("the connection stays up")
            {
                return Assigned {
                    key,
                    nonce,
                    max_tokens: request.max_tokens,
                };
            }
        }
    }
}

fn metric(net: &TestNetwork, name: &str) -> f64 {
    net.get_text("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

/// Posts a completion from a thread of its own (the hostile node answers meanwhile).
fn complete_in_background(
    net: &TestNetwork,
    sid: u64,
    prompt: &str,
) -> std::thread::JoinHandle<(u16, Value)> {
    let (url, key) = (net.url(), net.api_key());
    let body = json!({"session_id": sid, "prompt": prompt, "max_tokens": 8});
    std::thread::spawn(move || {
        let response = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .post(format!("{url}/api/v1/completions"))
            .bearer_auth(key)
            .json(&body)
            .send();
        match response {
            Ok(r) => (r.status().as_u16(), r.json().unwrap_or(Value::Null)),
            Err(e) => (0, Value::String(e.to_string())),
        }
    })
}

#[test]
fn reports_out_of_bounds_from_a_hostile_miner_crash_nothing() {
    let net = network(2, "");
    let (_, model) = net.engine();
    let url = net.node_url().unwrap();
    let key = NodeKey::random("hostile");
    let mut hostile = Hostile::login(&url, &key, NodeRole::Miner, Some(&model)).unwrap();
    set_read_timeout(&hostile.socket, Duration::from_secs(30));
    wait_for(Duration::from_secs(20), "the hostile miner to join", || {
        net.ready_miners() == 3
    });
    let sid = net.create_session(3, 1_000_000).unwrap();

    // A task for all three miners: the hostile one acks it, then streams tokens past the
    // task's max_tokens (up to usize::MAX, whose `index + 1` overflowed), precommits
    // something that is no hash, and fails with a 1 MiB error text.
    let client = complete_in_background(&net, sid, "first");
    let task = hostile.next_assignment();
    assert_eq!(task.max_tokens, 8);
    let huge_error = "e".repeat(1 << 20);
    let over_long_hash = format!("0x{}", "ab".repeat(4096));
    for frame in [
        hostile.report(&task, ReportKind::Ack, None),
        hostile.report(
            &task,
            ReportKind::Token {
                index: usize::MAX,
                text: "overflow".into(),
            },
            None,
        ),
        hostile.report(
            &task,
            ReportKind::Token {
                index: task.max_tokens,
                text: "past the end".into(),
            },
            None,
        ),
        hostile.report(
            &task,
            ReportKind::Precommit {
                hash: over_long_hash,
            },
            None,
        ),
        hostile.report(&task, ReportKind::Failed { error: huge_error }, None),
    ] {
        hostile.send(&frame).unwrap();
    }
    let (status, answer) = client.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    let record = net
        .get(&format!("/api/v1/tasks/{sid}/{}", task.key.task_id))
        .1;
    assert_eq!(record["status"], "Completed", "{record}");
    let theirs = record["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["miner"] == hostile.id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("the hostile miner was assigned: {record}"));
    assert_eq!(theirs["state"], "Replaced", "{theirs}");
    assert!(theirs["precommit_hash"].is_null(), "{theirs}");
    let note = theirs["note"].as_str().unwrap();
    assert!(
        note.len() < 1200,
        "the error text is cut: {} bytes",
        note.len()
    );
    assert!(note.ends_with("(cut)"), "{}", &note[..100]);

    // The next task: the hostile miner refuses it with a huge text and reveals a result far
    // longer than max_tokens; the honest miners' answer stands.
    let client = complete_in_background(&net, sid, "second");
    let task = hostile.next_assignment();
    let long = TaskResult {
        text: "x".repeat(1000),
        token_ids: vec![7; 10_000],
        finish_reason: FinishReason::Length,
        prompt_tokens: usize::MAX,
    };
    for frame in [
        hostile.report(&task, ReportKind::Ack, None),
        hostile.report(&task, ReportKind::Commit { result: long }, None),
        hostile.report(
            &task,
            ReportKind::Refused {
                error: "r".repeat(1 << 20),
            },
            None,
        ),
    ] {
        hostile.send(&frame).unwrap();
    }
    let (status, answer) = client.join().unwrap();
    assert_eq!(status, 200, "{answer}");

    // Four reports were refused for their content; the queue still runs tasks.
    assert!(metric(&net, "cortensor_rejected_reports_total") >= 4.0);
    drop(hostile);
    let (status, v) = net.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": "after", "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{v}");
    let report = net.finish(Duration::from_secs(20));
    assert!(report.violations.is_empty(), "{report}");
    assert!(report.checked.accepted >= 3, "{report}");
}

/// Picks one of `items`.
fn pick<T: Clone>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())].clone()
}

fn random_text(rng: &mut ChaCha8Rng) -> String {
    let len = pick(rng, &[0, 1, 10, 300, 5000, 200_000]);
    let c = pick(rng, &['a', 'é', '"', '\\', '\u{0}', '🦀']);
    std::iter::repeat_n(c, len).collect()
}

fn random_index(rng: &mut ChaCha8Rng, max_tokens: usize) -> usize {
    match rng.gen_range(0..6) {
        0 => rng.gen_range(0..max_tokens.max(1)),
        1 => max_tokens.saturating_sub(1),
        2 => max_tokens,
        3 => usize::MAX,
        4 => u32::MAX as usize,
        _ => rng.gen(),
    }
}

fn random_result(rng: &mut ChaCha8Rng, max_tokens: usize) -> TaskResult {
    let tokens = pick(rng, &[0, 1, max_tokens, max_tokens + 1, 5000]);
    TaskResult {
        text: random_text(rng),
        token_ids: (0..tokens).map(|_| rng.gen()).collect(),
        finish_reason: pick(
            rng,
            &[
                FinishReason::Stop,
                FinishReason::Length,
                FinishReason::Cancelled,
            ],
        ),
        prompt_tokens: pick(rng, &[0, 3, usize::MAX]),
    }
}

/// A random frame from a hostile miner: mostly reports about what it was assigned (signed,
/// or signed by another key, with right or wrong nonces), sometimes anything at all.
fn miner_frame(
    rng: &mut ChaCha8Rng,
    node: &Hostile,
    assigned: &[Assigned],
    precommitted: &mut Vec<(TaskKey, TaskResult)>,
    model: &str,
) -> Result<String, String> {
    let mut task = assigned.last().copied().unwrap_or(Assigned {
        key: TaskKey {
            session_id: rng.gen(),
            task_id: rng.gen(),
        },
        nonce: rng.gen(),
        max_tokens: 8,
    });
    if !assigned.is_empty() && rng.gen_bool(0.3) {
        task = pick(rng, assigned);
    }
    if rng.gen_bool(0.05) {
        task.nonce = rng.gen();
    }
    if rng.gen_bool(0.05) {
        let any = rng.gen();
        task.key.session_id = pick(rng, &[0, u64::MAX, any]);
    }
    let other = NodeKey::random("other");
    let signer = rng.gen_bool(0.1).then_some(&other);
    let kind = match rng.gen_range(0..100) {
        0..=14 => ReportKind::Ack,
        15..=39 => ReportKind::Token {
            index: random_index(rng, task.max_tokens),
            text: random_text(rng),
        },
        40..=54 => {
            let result = random_result(rng, task.max_tokens);
            let hash = match rng.gen_range(0..6) {
                0 => format!("0x{}", "zz".repeat(32)),
                1 => format!("0x{}", "ab".repeat(5000)),
                2 => String::new(),
                3 => result.commitment_hex(&node.id).to_uppercase(),
                _ => result.commitment_hex(&node.id),
            };
            precommitted.push((task.key, result));
            ReportKind::Precommit { hash }
        }
        55..=69 => {
            let revealed = precommitted
                .iter()
                .rev()
                .find(|(k, _)| *k == task.key)
                .map(|(_, r)| r.clone());
            let result = match revealed {
                Some(r) if rng.gen_bool(0.7) => r,
                _ => random_result(rng, task.max_tokens),
            };
            ReportKind::Commit { result }
        }
        70..=77 => ReportKind::Failed {
            error: random_text(rng),
        },
        78..=81 => ReportKind::Refused {
            error: random_text(rng),
        },
        82..=85 => return Ok(protocol::encode(&NodeFrame::Heartbeat)),
        86..=87 => return Ok(protocol::encode(&NodeFrame::Offline)),
        88..=91 => {
            let other_model = random_text(rng);
            let frame = NodeFrame::Register {
                model: pick(rng, &[model.to_string(), other_model]),
                backend: random_text(rng),
                max_tasks: pick(rng, &[0, 1, usize::MAX]),
            };
            return Ok(protocol::encode(&frame));
        }
        92..=93 => {
            // Anything at all: unknown types, numbers too large, broken JSON.
            let any = random_text(rng);
            let text = pick(
                rng,
                &[
                    r#"{"type":"report","key":{"session_id":1e400,"task_id":-1},"nonce":0,"kind":{"kind":"ack"},"signature":null}"#.to_string(),
                    r#"{"type":"launch"}"#.to_string(),
                    "{".to_string(),
                    any,
                ],
            );
            return Ok(text);
        }
        94..=95 => {
            // A validator's frames from a miner.
            let frame = NodeFrame::Evidence {
                id: rng.gen(),
                evidence: random_text(rng),
                signature: ethers::types::Signature {
                    r: rng.gen::<u64>().into(),
                    s: rng.gen::<u64>().into(),
                    v: rng.gen(),
                },
            };
            return Ok(protocol::encode(&frame));
        }
        96..=97 => {
            let hello = protocol::hello(&node.challenge, NodeRole::Miner, &node.key)
                .map_err(|e| e.to_string())?;
            return Ok(protocol::encode(&hello));
        }
        _ => {
            let mut report = node.report(&task, ReportKind::Ack, signer);
            if let NodeFrame::Report { signature, .. } = &mut report {
                *signature = None;
            }
            return Ok(protocol::encode(&report));
        }
    };
    Ok(protocol::encode(&node.report(&task, kind, signer)))
}

/// A random frame from a hostile validator: evidence for requests it was sent or never sent,
/// signed or not, with anything in it; sometimes a miner's frames.
fn validator_frame(
    rng: &mut ChaCha8Rng,
    node: &Hostile,
    asked: &[(u64, TaskKey)],
) -> Result<String, String> {
    let (id, key) = match asked.last() {
        Some(a) if rng.gen_bool(0.6) => *a,
        _ => (
            rng.gen(),
            TaskKey {
                session_id: rng.gen(),
                task_id: rng.gen(),
            },
        ),
    };
    let frame = match rng.gen_range(0..10) {
        0..=4 => {
            let evidence = Evidence {
                validator: random_text(rng),
                miners: vec![MinerEvidence {
                    miner: random_text(rng),
                    similarity: Some(pick(rng, &[f32::MAX, -1.0, 0.5])),
                    likelihood: None,
                    likelihood_failures: vec![],
                    grade: None,
                }],
                errors: vec![random_text(rng)],
            };
            let signer = NodeKey::random("other");
            let signer = if rng.gen_bool(0.8) {
                &node.key
            } else {
                &signer
            };
            protocol::signed_evidence(&node.challenge, id, key, &evidence, signer)
                .map_err(|e| e.to_string())?
        }
        5 => {
            let evidence = random_text(rng);
            let digest = protocol::evidence_digest(&node.challenge, id, key, &evidence)
                .map_err(|e| e.to_string())?;
            let signature = node
                .key
                .wallet
                .sign_hash(digest)
                .map_err(|e| e.to_string())?;
            NodeFrame::Evidence {
                id,
                evidence,
                signature,
            }
        }
        6 => NodeFrame::Heartbeat,
        7 => NodeFrame::ValidatorReady,
        8 => NodeFrame::Offline,
        _ => NodeFrame::Report {
            key,
            nonce: rng.gen(),
            kind: ReportKind::Ack,
            signature: None,
        },
    };
    Ok(protocol::encode(&frame))
}

/// Frames one hostile node sends in a run.
const FRAMES_PER_NODE: usize = 150;
/// Tasks a run posts at most while its hostile nodes send their frames.
const MAX_TASKS_PER_RUN: usize = 40;

/// Runs a hostile node until `stop`: it logs in (again, whenever the router closes it),
/// reads what the router sends and answers with random frames. Returns frames sent and
/// connections the router closed.
fn run_hostile(
    url: String,
    model: String,
    role: NodeRole,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (usize, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let key = NodeKey::random("hostile");
    let (mut sent, mut closed) = (0, 0);
    let mut node: Option<Hostile> = None;
    let mut assigned: Vec<Assigned> = Vec::new();
    let mut asked: Vec<(u64, TaskKey)> = Vec::new();
    let mut precommitted = Vec::new();
    while !stop.load(Ordering::Relaxed) && sent < FRAMES_PER_NODE {
        let Some(n) = node.as_mut() else {
            match Hostile::login(&url, &key, role, Some(&model)) {
                Ok(n) => {
                    set_read_timeout(&n.socket, Duration::from_millis(10));
                    node = Some(n);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
            continue;
        };
        let mut alive = true;
        for _ in 0..4 {
            match n.read() {
                Ok(Some(RouterFrame::Assign {
                    key,
                    nonce,
                    request,
                    ..
                })) => assigned.push(Assigned {
                    key,
                    nonce,
                    max_tokens: request.max_tokens,
                }),
                Ok(Some(RouterFrame::Validate { id, validate })) => asked.push((id, validate.key)),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    alive = false;
                    break;
                }
            }
        }
        let frame = match role {
            NodeRole::Miner => miner_frame(&mut rng, n, &assigned, &mut precommitted, &model),
            NodeRole::Validator => validator_frame(&mut rng, n, &asked),
        };
        let frame = frame.expect("a frame is made");
        if !alive || n.send_text(frame).is_err() {
            closed += 1;
            node = None;
            continue;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..10)));
    }
    (sent, closed)
}

/// How many seeded runs the property test makes (`HOSTILE_RUNS`), from which first seed
/// (`HOSTILE_SEED`).
fn seeds() -> std::ops::Range<u64> {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let first = var("HOSTILE_SEED", 1);
    first..first + var("HOSTILE_RUNS", 8)
}

#[test]
fn random_frames_from_a_hostile_miner_and_validator_break_no_invariant() {
    for seed in seeds() {
        println!("hostile run, seed {seed} (HOSTILE_SEED={seed} HOSTILE_RUNS=1 replays it)");
        let net = network(2, "");
        let (_, model) = net.engine();
        let url = net.node_url().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let nodes: Vec<_> = [(NodeRole::Miner, 0), (NodeRole::Validator, 1)]
            .into_iter()
            .map(|(role, salt)| {
                let (url, model, stop) = (url.clone(), model.clone(), stop.clone());
                std::thread::spawn(move || run_hostile(url, model, role, seed * 2 + salt, stop))
            })
            .collect();
        wait_for(Duration::from_secs(20), "the hostile miner to join", || {
            net.ready_miners() == 3
        });
        let sid = net.create_session(3, 1_000_000).unwrap();
        // Tasks for all three miners, one after another, while the hostile nodes send their
        // frames.
        let (mut tasks, mut completed) = (0, 0);
        while tasks < MAX_TASKS_PER_RUN && !nodes.iter().all(|n| n.is_finished()) {
            let (status, v) = net.post(
                "/api/v1/completions",
                &json!({"session_id": sid, "prompt": format!("task {tasks}"), "max_tokens": 8}),
            );
            assert!(
                status == 200 || (400..500).contains(&status),
                "seed {seed}: task {tasks} answered {status}: {v}"
            );
            tasks += 1;
            completed += usize::from(status == 200);
        }
        stop.store(true, Ordering::Relaxed);
        let sent: Vec<(usize, usize)> = nodes.into_iter().map(|n| n.join().unwrap()).collect();
        println!("seed {seed}: {completed} of {tasks} completed; (frames, closed) {sent:?}");
        assert!(completed > 0, "seed {seed}: no task completed");
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": "after", "max_tokens": 8}),
        );
        assert_eq!(status, 200, "seed {seed}: {v}");
        let (status, _) = net.get("/api/v1/miners");
        assert_eq!(status, 200, "seed {seed}");
        let report = net.finish(Duration::from_secs(20));
        assert!(report.violations.is_empty(), "seed {seed}: {report}");
    }
}

/// Keeps a connection that never logs in alive with WebSocket pings until the router ends
/// it; returns the router's reason.
fn keep_pinging(mut socket: Socket) -> std::thread::JoinHandle<String> {
    set_read_timeout(&socket, Duration::from_millis(200));
    std::thread::spawn(move || loop {
        if let Err(e) = socket.send(Message::Ping(vec![1])) {
            return format!("connection ended: {e}");
        }
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
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return format!("connection ended: {e}"),
        }
    })
}

#[test]
fn connections_waiting_for_a_login_are_capped_and_dropped() {
    let net = network(
        1,
        "[nodes]\nmax_unauthenticated = 6\nmax_unauthenticated_per_address = 3\n\
         login_timeout_ms = 5000\nforget_offline_after_ms = 1500\n",
    );
    let (_, model) = net.engine();
    let url = net.node_url().unwrap();
    let here = IpAddr::from([127, 0, 0, 1]);
    let dial = |from: IpAddr| {
        let mut s = open_from(&url, from).unwrap();
        challenge_of(&mut s).unwrap();
        s
    };

    // Three connections from one address that never log in (but ping, so they are not
    // silent); a fourth from it is refused before its WebSocket opens.
    let mut idle: Vec<_> = (0..3).map(|_| keep_pinging(dial(here))).collect();
    let refused = open_from(&url, here).err().unwrap_or_default();
    assert!(refused.contains("503"), "{refused}");

    // An honest node logs in from another address, and heartbeats.
    let honest = NodeKey::random("honest");
    let mut s = open_from(&url, IpAddr::from([127, 0, 0, 3])).unwrap();
    let challenge = challenge_of(&mut s).unwrap();
    let hello = protocol::hello(&challenge, NodeRole::Miner, &honest).unwrap();
    s.send(Message::Text(protocol::encode(&hello))).unwrap();
    let welcome = loop {
        if let Message::Text(t) = s.read().unwrap() {
            break t;
        }
    };
    assert!(welcome.contains("welcome"), "{welcome}");

    // Six wait in all (three from here, three from three other addresses): a seventh from
    // a fresh address is refused.
    for last in [2, 4, 5] {
        idle.push(keep_pinging(dial(IpAddr::from([127, 0, 0, last]))));
    }
    let refused = open_from(&url, IpAddr::from([127, 0, 0, 6]))
        .err()
        .unwrap_or_default();
    assert!(refused.contains("503"), "{refused}");

    // The honest node registers and works while the others wait.
    let register = NodeFrame::Register {
        model,
        backend: "cpu".into(),
        max_tasks: 1,
    };
    s.send(Message::Text(protocol::encode(&register))).unwrap();
    let leave = Arc::new(AtomicBool::new(false));
    let heartbeats = {
        let leave = leave.clone();
        std::thread::spawn(move || {
            while !leave.load(Ordering::Relaxed) {
                if s.send(Message::Text(protocol::encode(&NodeFrame::Heartbeat)))
                    .is_err()
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = s.close(None);
            let _ = s.flush();
        })
    };
    let id = protocol::node_id(honest.address());
    wait_for(Duration::from_secs(20), "the honest node to join", || {
        net.ready_miners() == 2
    });

    // The idle ones are dropped at the login timeout, with a reason; then there is room.
    for pinging in idle {
        let reason = pinging.join().unwrap();
        assert!(reason.contains("no login within"), "{reason}");
    }
    wait_for(Duration::from_secs(20), "room for a new connection", || {
        open_from(&url, here).is_ok()
    });

    // The honest node leaves: offline, then forgotten.
    leave.store(true, Ordering::Relaxed);
    heartbeats.join().unwrap();
    wait_for(Duration::from_secs(20), "the node to be forgotten", || {
        let (status, v) = net.get("/api/v1/miners");
        status == 200 && v["nodes"].get(&id).is_none()
    });
    let report = net.finish(Duration::from_secs(20));
    assert!(report.violations.is_empty(), "{report}");
}
