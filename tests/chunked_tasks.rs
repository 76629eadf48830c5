//! Chunked generation in the running network (scripted engines): a long generation runs in
//! chunks of `queue.chunk_tokens`, each precommitted, revealed and validated before the next
//! starts; the record shows which miners produced which span; a dishonest miner is caught
//! within its chunk and the chunk runs again on another miner; a miner lost mid-generation
//! is replaced by one that continues from the accepted output, and the client's stream goes
//! on without a repeated or lost token.

mod common;

use common::{faults, scripts};
use cortensor::actors::miner::{Byzantine, MinerFaults};
use cortensor::models::chat::ChatMessage;
use cortensor::models::engine::{CancelToken, GenerateRequest, InferenceEngine, Prompt};
use cortensor::models::sampling::SamplingParams;
use cortensor::testkit::network::{Engines, TestnetBuilder};
use cortensor::testkit::remote::RemoteMiner;
use cortensor::testkit::scripted_engine::{Script, ScriptedEngine};
use cortensor::testkit::sse::SseEvents;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const LENGTH: usize = 40;
const CHUNK: usize = 8;

fn long_script() -> Script {
    Script {
        length: LENGTH,
        ..Script::default()
    }
}

/// What an honest engine generates for this prompt and seed, computed here without the
/// network: the test double's own generation, unchunked.
fn honest_output(script: Script, prompt: &str, seed: u64, max_tokens: usize) -> (String, Vec<u32>) {
    let request = GenerateRequest {
        prompt: Prompt::Chat(vec![ChatMessage::user(prompt)]),
        params: SamplingParams {
            temperature: 0.7,
            seed,
            ..SamplingParams::default()
        },
        max_tokens,
        stop: vec![],
        prefix: vec![],
    };
    let g = ScriptedEngine::new(script)
        .generate(&request, &CancelToken::new(), &mut |_| {})
        .unwrap();
    (g.text, g.token_ids)
}

fn spans(task: &Value) -> Vec<(u64, u64, Vec<String>)> {
    task["spans"]
        .as_array()
        .unwrap_or_else(|| panic!("no spans: {task}"))
        .iter()
        .map(|s| {
            let miners = s["miners"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_string())
                .collect();
            (
                s["from"].as_u64().unwrap(),
                s["to"].as_u64().unwrap(),
                miners,
            )
        })
        .collect()
}

/// The spans cover the output from its first token to its last, each at most a chunk long.
fn assert_spans_cover(task: &Value, tokens: u64, chunk: u64) {
    let spans = spans(task);
    let mut next = 0;
    for (from, to, miners) in &spans {
        assert_eq!(*from, next, "spans are not contiguous: {task}");
        assert!(
            to > from && to - from <= chunk,
            "a span of {from}..{to}: {task}"
        );
        assert!(!miners.is_empty(), "a span nobody made: {task}");
        next = *to;
    }
    assert_eq!(next, tokens, "the spans do not cover the output: {task}");
}

#[test]
fn a_long_generation_runs_in_chunks_each_validated_before_the_next() {
    let overlay = format!("nodes.miners = 3\nqueue.tick_ms = 10\nqueue.chunk_tokens = {CHUNK}");
    let all = scripts(&[
        ("miner-1", long_script()),
        ("miner-2", long_script()),
        ("miner-3", long_script()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let net = common::scripted(&overlay, all, Default::default(), dir.path());
    let sid = net.session(3, 1_000_000);
    let prompt = "tell me a long story";
    let seed = 4242;

    // Submitted over the WebSocket: every state the task passes through, and its tokens.
    let url = format!(
        "{}/api/v1/ws?token={}",
        net.testnet.url.replacen("http://", "ws://", 1),
        net.testnet.api_key
    );
    let (mut ws, _) = tungstenite::connect(url).expect("the WebSocket opens");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    ws.send(tungstenite::Message::Text(
        json!({"type": "submit", "id": "long", "session_id": sid, "prompt": prompt,
               "max_tokens": LENGTH, "temperature": 0.7, "seed": seed})
        .to_string(),
    ))
    .unwrap();
    let (mut states, mut streamed, mut completed, mut task_id) =
        (Vec::new(), String::new(), Value::Null, 0);
    while completed.is_null() {
        let tungstenite::Message::Text(text) = ws.read().unwrap() else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        match v["type"].as_str().unwrap() {
            "accepted" => task_id = v["task_id"].as_u64().unwrap(),
            "state" => states.push(v["state"].as_str().unwrap().to_string()),
            "token" => streamed.push_str(v["text"].as_str().unwrap()),
            "completed" => completed = v,
            other => panic!("unexpected {other}: {v}"),
        }
    }

    // The answer is what an honest engine makes in one go: the chunks join seamlessly.
    let (expected_text, expected_ids) = honest_output(long_script(), prompt, seed, LENGTH);
    assert_eq!(completed["text"], expected_text.as_str(), "{completed}");
    assert_eq!(
        streamed, expected_text,
        "the stream repeated or lost something"
    );
    assert_eq!(completed["usage"]["completion_tokens"], LENGTH);

    // Five chunks: each went through its stages, validated before the next was queued.
    let rounds = LENGTH / CHUNK;
    let validated_then_queued = states
        .windows(2)
        .filter(|w| w[0] == "Validated" && w[1] == "Queued")
        .count();
    assert_eq!(validated_then_queued, rounds - 1, "states: {states:?}");
    for stage in ["Assigned", "Precommitted", "Committed", "Validated"] {
        let seen = states.iter().filter(|s| *s == stage).count();
        assert_eq!(seen, rounds, "{stage} in {states:?}");
    }

    let task = net.task(sid, task_id);
    assert_eq!(task["status"], "Completed", "{task}");
    assert_eq!(task["chunk_tokens"], CHUNK);
    assert_spans_cover(&task, LENGTH as u64, CHUNK as u64);
    assert_eq!(spans(&task).len(), rounds);
    for (_, _, miners) in spans(&task) {
        assert_eq!(miners.len(), 3, "{task}");
    }
    // Every chunk's reveals came in before the next chunk's miners were asked.
    let assignments = task["assignments"].as_array().unwrap();
    for chunk in 0..rounds as u64 - 1 {
        let of = |c: u64| assignments.iter().filter(move |a| a["chunk"] == c);
        let last_commit = of(chunk)
            .map(|a| a["committed_at"].as_u64().expect("committed"))
            .max()
            .unwrap();
        let first_next = of(chunk + 1)
            .map(|a| a["assigned_at"].as_u64().unwrap())
            .min()
            .unwrap();
        assert!(
            last_commit <= first_next,
            "chunk {chunk} was still open when the next began: {task}"
        );
    }
    // Charged for the whole output on each of the three miners, and all three were paid.
    assert_eq!(task["charged"], LENGTH as u64 * 3, "{task}");
    let (_, miners) = net.get("/api/v1/miners");
    for m in ["miner-1", "miner-2", "miner-3"] {
        assert!(
            miners["nodes"][m]["pending_payment"].as_u64().unwrap() > 0,
            "{m} unpaid: {miners}"
        );
    }

    // The same request on a network that does not chunk gives the same answer.
    let dir = tempfile::tempdir().unwrap();
    let unchunked = common::scripted(
        "nodes.miners = 3\nqueue.tick_ms = 10\nqueue.chunk_tokens = 0",
        scripts(&[
            ("miner-1", long_script()),
            ("miner-2", long_script()),
            ("miner-3", long_script()),
        ]),
        Default::default(),
        dir.path(),
    );
    let sid = unchunked.session(3, 1_000_000);
    let (status, v) = unchunked.post(
        "/api/v1/completions",
        &json!({"session_id": sid, "prompt": prompt, "max_tokens": LENGTH, "temperature": 0.7, "seed": seed}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], completed["text"]);
    let one = unchunked.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(spans(&one).len(), 1, "{one}");
    assert_eq!(expected_ids.len(), LENGTH);
}

#[test]
fn a_dishonest_miner_is_caught_within_its_chunk_and_the_chunk_runs_again() {
    // miner-2 continues every chunk with another seed; likelihood replay catches it.
    let seed = 17;
    let overlay = format!(
        "nodes.miners = 2\nqueue.tick_ms = 10\nqueue.chunk_tokens = {CHUNK}\n\
         queue.max_replacements = 12\nnodes.selection = \"least_load\"\nnodes.selection_seed = {seed}"
    );
    let dir = tempfile::tempdir().unwrap();
    let net = common::scripted(
        &overlay,
        // The validators' engine replays with the miners' script.
        scripts(&[
            ("miner-1", long_script()),
            ("miner-2", long_script()),
            ("validators", long_script()),
        ]),
        faults(&[(
            "miner-2",
            MinerFaults {
                byzantine: Some(Byzantine::OtherSeed),
                ..MinerFaults::default()
            },
        )]),
        dir.path(),
    );
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 1, "deposit": 1_000_000, "validation": "likelihood",
                "num_of_validator_nodes": 1}),
    );
    assert_eq!(status, 201, "{v}");
    let sid = v["session_id"].as_u64().unwrap();
    let mut caught = 0;
    for (i, prompt) in [
        "first long answer",
        "second long answer",
        "third long answer",
    ]
    .iter()
    .enumerate()
    {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": prompt, "max_tokens": LENGTH,
                    "temperature": 0.7, "seed": 100 + i}),
        );
        assert_eq!(status, 200, "selection seed {seed}: {v}");
        let task = net.task(sid, v["task_id"].as_u64().unwrap());
        let (expected, _) = honest_output(long_script(), prompt, 100 + i as u64, LENGTH);
        assert_eq!(v["choices"][0]["text"], expected.as_str(), "{task}");
        assert_spans_cover(&task, LENGTH as u64, CHUNK as u64);
        for (from, to, miners) in spans(&task) {
            assert_eq!(
                miners,
                vec!["miner-1"],
                "{from}..{to} accepted from: {task}"
            );
        }
        for a in task["assignments"].as_array().unwrap() {
            if a["miner"] != "miner-2" {
                continue;
            }
            // Caught in the chunk it lied in, and that chunk ran again on the honest miner.
            assert_eq!(a["state"], "Rejected", "{task}");
            let chunk = a["chunk"].as_u64().unwrap();
            let redone = task["assignments"].as_array().unwrap().iter().any(|b| {
                b["miner"] == "miner-1" && b["chunk"] == chunk && b["state"] == "Committed"
            });
            assert!(redone, "chunk {chunk} was not run again: {task}");
            caught += 1;
        }
    }
    assert!(
        caught > 0,
        "miner-2 was never chosen (selection seed {seed}): the test proves nothing"
    );
    let (_, miners) = net.get("/api/v1/miners");
    assert_eq!(miners["nodes"]["miner-2"]["pending_payment"], 0, "{miners}");
    println!("miner-2 caught {caught} times");
}

#[test]
fn a_miner_lost_mid_generation_is_replaced_by_one_that_continues_the_accepted_output() {
    // 60 tokens at 40 ms in chunks of 16: the stream is in its second chunk when its miner
    // goes.
    let script = Script {
        length: 60,
        ..Script::slow(Duration::from_millis(40))
    };
    let net = TestnetBuilder::new()
        .config("[queue]\nprecommit_timeout_ms = 20000\nchunk_tokens = 16\n")
        .miners(0)
        .validators(1)
        .engines(Engines::Scripted(script.clone()))
        .node_gateway()
        .start()
        .expect("the network starts");
    let (engine, model) = net.engine();
    let url = net.node_url().expect("the network serves nodes");
    let mut miners: Vec<RemoteMiner> = (0..2)
        .map(|_| RemoteMiner::start(&url, engine.clone(), &model, 4))
        .collect();
    let started = Instant::now();
    while net.ready_miners() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the miners never joined"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sid = net.create_session(1, 1_000_000).unwrap();
    let prompt = "a streamed answer";
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/completions", net.url()))
        .bearer_auth(net.api_key())
        .json(
            &json!({"session_id": sid, "prompt": prompt, "max_tokens": 60,
                      "temperature": 0.7, "seed": 9, "stream": true}),
        )
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let (mut streamed, mut pieces, mut task_id) = (String::new(), 0, 0);
    let mut lost: Option<(String, u64)> = None;
    for chunk in SseEvents::new(response) {
        assert!(chunk.get("error").is_none(), "{chunk}");
        task_id = chunk["task_id"].as_u64().unwrap_or(task_id);
        streamed.push_str(chunk["choices"][0]["text"].as_str().unwrap_or(""));
        pieces += 1;
        if pieces == 24 && lost.is_none() {
            // Whoever is generating now goes away, partway through its chunk.
            let (_, t) = net.get(&format!("/api/v1/tasks/{sid}/{task_id}"));
            let working = t["assignments"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find(|a| a["state"] == "Acked" || a["state"] == "Assigned")
                .unwrap_or_else(|| panic!("nobody is working: {t}"))
                .clone();
            let id = working["miner"].as_str().unwrap().to_string();
            let i = miners.iter().position(|m| m.id == id).unwrap();
            miners.remove(i).stop();
            lost = Some((id, working["chunk"].as_u64().unwrap()));
        }
    }
    let (lost, chunk) = lost.expect("the stream ended before a miner was lost");
    assert!(
        chunk >= 1,
        "the miner was lost in chunk {chunk}, before any was accepted"
    );
    let survivor = miners[0].id.clone();
    let (_, task) = net.get(&format!("/api/v1/tasks/{sid}/{task_id}"));
    assert_eq!(task["status"], "Completed", "{task}");

    // The client read exactly the accepted answer, which is the honest one-go answer.
    let (expected, _) = honest_output(script, prompt, 9, 60);
    assert_eq!(task["accepted"]["text"], expected.as_str(), "{task}");
    assert_eq!(streamed, expected, "the stream repeated or lost something");
    assert_eq!(task["usage"]["completion_tokens"], 60);

    // The record shows who made what: the lost miner's chunk was made by the survivor,
    // continuing from the output accepted before it.
    assert_spans_cover(&task, 60, 16);
    let spans = spans(&task);
    let (from, _, by) = &spans[chunk as usize];
    assert_eq!(by, &vec![survivor.clone()], "{task}");
    assert_eq!(*from, chunk * 16, "{task}");
    let assignments = task["assignments"].as_array().unwrap();
    let replaced = assignments
        .iter()
        .find(|a| a["miner"] == lost.as_str() && a["chunk"] == chunk)
        .unwrap();
    assert_eq!(replaced["state"], "Replaced", "{task}");
    let redone = assignments
        .iter()
        .find(|a| a["miner"] == survivor.as_str() && a["chunk"] == chunk)
        .unwrap();
    assert_eq!(redone["state"], "Committed", "{task}");
    // The chunks before the loss stay as they were accepted.
    for (from, to, by) in &spans[..chunk as usize] {
        assert_eq!(by.len(), 1, "{from}..{to}: {task}");
    }
}

#[test]
fn a_restart_keeps_the_accepted_chunks_and_goes_on_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let slow = Script {
        length: 32,
        token_delay: Duration::from_millis(60),
        ..Script::default()
    };
    let overlay = "nodes.miners = 1\nqueue.tick_ms = 10\nqueue.chunk_tokens = 8";
    let (sid, tid, before) = {
        let net = common::scripted(
            overlay,
            scripts(&[("miner-1", slow.clone())]),
            Default::default(),
            dir.path(),
        );
        let sid = net.session(1, 100_000);
        net.submit_in_flight(json!({"session_id": sid, "prompt": "through a restart",
                                    "max_tokens": 32, "temperature": 0.7, "seed": 3}));
        // Two chunks accepted, the third under way: then the router stops.
        net.wait_for(Duration::from_secs(30), "two accepted chunks", |n| {
            let (_, t) = n.get(&format!("/api/v1/tasks/{sid}/1"));
            t["spans"].as_array().is_some_and(|s| s.len() == 2)
        });
        let before = net.task(sid, 1);
        net.testnet.shutdown();
        (sid, 1, before)
    };
    let net = common::scripted(
        overlay,
        scripts(&[("miner-1", slow.clone())]),
        Default::default(),
        dir.path(),
    );
    let after = net.wait_task(sid, tid, "Completed");
    assert_eq!(after["resumed"], 1, "{after}");
    // The chunks accepted before the restart stand as they were; nothing of them ran again.
    assert_eq!(after["spans"][0], before["spans"][0], "{after}");
    assert_eq!(after["spans"][1], before["spans"][1], "{after}");
    let assignments = after["assignments"].as_array().unwrap();
    for chunk in [0, 1] {
        let of: Vec<&Value> = assignments.iter().filter(|a| a["chunk"] == chunk).collect();
        assert_eq!(of.len(), 1, "chunk {chunk} ran again: {after}");
        assert_eq!(of[0]["state"], "Committed", "{after}");
    }
    assert_spans_cover(&after, 32, 8);
    let (expected, _) = honest_output(slow, "through a restart", 3, 32);
    assert_eq!(after["accepted"]["text"], expected.as_str(), "{after}");
    // Charged once, for the whole output.
    let s = net.session_view(sid);
    assert_eq!(s["held"], 0);
    assert_eq!(s["spent"], 32);
}
