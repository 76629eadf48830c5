//! The testnet with real SmolLM2 miners, over real HTTP, SSE and WebSocket: three miners run
//! the same prompt with the seed derived from (session, task), agree bit for bit, and the task
//! shows three results; the text is what the model itself produces for that seed.

mod common;

use common::Net;
use cortensor::actors::session_queue::task_seed;
use cortensor::commands::testnet::{llama_factory, model_name};
use cortensor::config::TestnetConfig;
use cortensor::models::backend::BackendChoice;
use cortensor::models::chat::ChatMessage;
use cortensor::models::engine::{
    CancelToken, EngineOptions, GenerateRequest, InferenceEngine, LlamaEngine, Prompt,
};
use cortensor::models::fetch;
use cortensor::models::sampling::SamplingParams;
use cortensor::task::TaskKey;
use cortensor::testkit::sse::SseEvents;
use serde_json::{json, Value};

fn real_net(miners: usize) -> (Net, tempfile::TempDir, std::path::PathBuf) {
    real_net_chunked(miners, TestnetConfig::default().queue.chunk_tokens)
}

fn real_net_chunked(
    miners: usize,
    chunk_tokens: usize,
) -> (Net, tempfile::TempDir, std::path::PathBuf) {
    let model = fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &fetch::cache_dir(), &mut |_| {}).unwrap();
    let mut config = TestnetConfig::default();
    config.nodes.miners = miners;
    config.queue.chunk_tokens = chunk_tokens;
    let dir = tempfile::tempdir().unwrap();
    let engine = llama_factory(model.clone(), BackendChoice::Cpu, 1, 1024);
    let net = common::start(
        config,
        engine,
        &model_name(&model),
        Default::default(),
        dir.path(),
    );
    (net, dir, model)
}

/// The model run here, not through the network: one user message with `params` and the
/// seed of task (session, task).
fn run_directly(
    model: &std::path::Path,
    prompt: &str,
    params: SamplingParams,
    (session_id, task_id): (u64, u64),
    max_tokens: usize,
) -> cortensor::models::engine::Generation {
    let mut engine = LlamaEngine::load(&EngineOptions {
        backend: BackendChoice::Cpu,
        threads: 1,
        max_context: 1024,
        ..EngineOptions::new(model)
    })
    .unwrap();
    let request = GenerateRequest {
        prompt: Prompt::Chat(vec![ChatMessage::new("user", prompt)]),
        params: SamplingParams {
            seed: task_seed(TaskKey {
                session_id,
                task_id,
            }),
            ..params
        },
        max_tokens,
        stop: vec![],
        prefix: vec![],
    };
    engine
        .generate(&request, &CancelToken::new(), &mut |_| {})
        .unwrap()
}

#[test]
fn three_real_miners_agree_and_the_task_shows_three_results() {
    let (net, _dir, model) = real_net(3);
    let sid = net.session(3, 1_000_000);
    let prompt = "What is the capital of France?";
    let (status, v) = net.post(
        &format!("/api/v1/completions/{sid}"),
        &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "client_reference": "ref-1"}),
    );
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(!text.trim().is_empty());
    let tid = v["task_id"].as_u64().unwrap();

    let task = net.task(sid, tid);
    assert_eq!(task["status"], "Completed");
    assert_eq!(task["client_reference"], "ref-1");
    let data = task["results"]["data"].as_array().unwrap();
    assert_eq!(data.len(), 3, "{task}");
    assert!(
        data.iter().all(|d| d == text),
        "the miners disagree: {data:?}"
    );
    assert_eq!(task["results"]["miners"].as_array().unwrap().len(), 3);

    // The same model, run here with the task's seed, says the same thing.
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        ..SamplingParams::default()
    };
    let local = run_directly(&model, prompt, params, (sid, tid), 24);
    assert_eq!(local.text, text);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        local.prompt_tokens
    );
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        local.token_ids.len()
    );
    assert!(net.metric("cortensor_decode_tokens_per_second") > 0.0);
}

#[test]
fn a_chunked_generation_on_real_miners_is_the_unchunked_generation() {
    // Chunks of 12 tokens, each validated by replay (which checks a chunk as the
    // continuation of the output accepted before it) before the next starts.
    let (net, _dir, model) = real_net_chunked(2, 12);
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 2, "deposit": 1_000_000, "validation": "likelihood",
                "num_of_validator_nodes": 1}),
    );
    assert_eq!(status, 201, "{v}");
    let sid = v["session_id"].as_u64().unwrap();
    let prompt = "Write a short story about a lighthouse keeper and a storm.";
    let (status, v) = net.post(
        &format!("/api/v1/completions/{sid}"),
        &json!({"prompt": prompt, "max_tokens": 40, "temperature": 0.8, "top_p": 0.95,
                "repeat_penalty": 1.1}),
    );
    assert_eq!(status, 200, "{v}");
    let tid = v["task_id"].as_u64().unwrap();
    let task = net.task(sid, tid);
    assert_eq!(task["status"], "Completed", "{task}");
    let spans = task["spans"].as_array().unwrap();
    assert!(spans.len() >= 2, "the generation was not chunked: {task}");
    let mut next = 0;
    for s in spans {
        assert_eq!(s["from"], next, "{task}");
        assert_eq!(s["miners"].as_array().unwrap().len(), 2, "{task}");
        next = s["to"].as_u64().unwrap();
    }
    assert_eq!(v["usage"]["completion_tokens"], next);
    // The last chunk's replay: both results are exactly what the task's seed draws.
    for m in task["validation"]["miners"].as_array().unwrap() {
        assert_eq!(m["valid"], true, "{task}");
    }

    // The same model run here in one go, with the task's seed, says the same thing.
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        repeat_penalty: 1.1,
        ..SamplingParams::default()
    };
    let whole = run_directly(&model, prompt, params, (sid, tid), 40);
    assert_eq!(v["choices"][0]["text"], whole.text.as_str(), "{task}");
    assert_eq!(next as usize, whole.token_ids.len());
}

#[test]
fn tokens_stream_over_sse_and_websocket() {
    let (net, _dir, _) = real_net(2);
    let sid = net.session(2, 1_000_000);

    // SSE on the router API.
    let response = net
        .http
        .post(net.url("/api/v1/completions"))
        .bearer_auth(&net.testnet.api_key)
        .json(&json!({"session_id": sid, "prompt": "Write a haiku about the sea.", "max_tokens": 20, "stream": true}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut streamed = String::new();
    let mut chunks = 0;
    let mut last = Value::Null;
    let mut stream = SseEvents::new(response);
    for chunk in stream.by_ref() {
        streamed.push_str(chunk["choices"][0]["text"].as_str().unwrap());
        chunks += 1;
        last = chunk;
    }
    assert!(stream.done(), "the stream ends with data: [DONE]");
    assert!(chunks >= 3);
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    let tid = last["task_id"].as_u64().unwrap();
    let task = net.task(sid, tid);
    assert_eq!(task["accepted"]["text"], streamed.as_str());
    assert_eq!(
        last["usage"]["completion_tokens"],
        task["usage"]["completion_tokens"]
    );

    // The WebSocket: submit, then states, tokens and the end arrive as events.
    let url = format!(
        "ws://{}/api/v1/ws?token={}",
        net.testnet.addr, net.testnet.api_key
    );
    let (mut ws, _) = tungstenite::connect(url).unwrap();
    let send = |ws: &mut tungstenite::WebSocket<_>, v: Value| {
        ws.send(tungstenite::Message::Text(v.to_string())).unwrap()
    };
    send(&mut ws, json!({"type": "ping"}));
    send(&mut ws, json!({"type": "nonsense"}));
    send(
        &mut ws,
        json!({"type": "submit", "id": "q1", "session_id": sid, "prompt": "Say hello.", "max_tokens": 12}),
    );
    let mut events = Vec::new();
    loop {
        let message = ws.read().unwrap();
        let tungstenite::Message::Text(text) = message else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        let end = v["type"] == "completed" || v["type"] == "failed";
        events.push(v);
        if end {
            break;
        }
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "pong");
    assert_eq!(kinds[1], "error");
    assert_eq!(events[1]["error"]["code"], "invalid_request");
    assert_eq!(kinds[2], "accepted");
    assert_eq!(events[2]["id"], "q1");
    assert!(
        kinds.contains(&"state") && kinds.contains(&"token"),
        "{kinds:?}"
    );
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "completed", "{completed}");
    let tokens: String = events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(completed["text"], tokens.as_str());
    assert_eq!(completed["miners"].as_array().unwrap().len(), 2);
    let _ = ws.close(None);
}

/// Likelihood and judge validation with real miners, and `POST /api/v1/validate` over HTTP:
/// the model's own seeded output is VALID, random text is INVALID,
/// a missing input NEEDS_SPEC, and nonsense gets a 400 with a JSON error.
#[test]
fn model_validation_accepts_real_miners_and_the_validate_endpoint_judges_outputs() {
    let (net, _dir, model) = real_net(2);
    let (status, v) = net.post(
        "/api/v1/sessions",
        &json!({"redundant": 2, "deposit": 1_000_000, "validation": ["likelihood", "judge"],
                "judge_threshold": 1.0}),
    );
    assert_eq!(status, 201, "{v}");
    let sid = v["session_id"].as_u64().unwrap();
    let prompt = "Name a large city in Japan.";
    let (status, v) = net.post(
        &format!("/api/v1/completions/{sid}"),
        &json!({"prompt": prompt, "max_tokens": 16, "temperature": 0.9, "top_k": 40}),
    );
    assert_eq!(status, 200, "{v}");
    let task = net.task(sid, v["task_id"].as_u64().unwrap());
    assert_eq!(task["status"], "Completed", "{task}");
    let verdict = &task["validation"];
    assert_eq!(verdict["verdict"], "VALID", "{verdict}");
    for m in verdict["miners"].as_array().unwrap() {
        assert_eq!(m["valid"], true, "{m}");
        assert_eq!(m["likelihood"]["seed_match_fraction"], 1.0, "{m}");
        assert!(m["grade"].as_f64().unwrap() >= 1.0, "{m}");
    }

    // The endpoint: the model's own output for a seed, replayed with that seed.
    let question = "What is the capital of Italy?";
    let mut engine = LlamaEngine::load(&EngineOptions::new(&model)).unwrap();
    let request = GenerateRequest {
        prompt: Prompt::Chat(vec![ChatMessage::user(question)]),
        params: SamplingParams {
            temperature: 0.7,
            seed: 1234,
            ..SamplingParams::default()
        },
        max_tokens: 20,
        stop: vec![],
        prefix: vec![],
    };
    let honest = engine
        .generate(&request, &CancelToken::new(), &mut |_| {})
        .unwrap();
    let (status, v) = net.post(
        "/api/v1/validate",
        &json!({
            "task_request_input": question,
            "task_result_output": [
                {"miner": "honest", "output": honest.text},
                {"miner": "random", "output": "qua7 zzkq ;; }} lorem 1919 vvx"},
            ],
            "task_domain": "geography",
            "task_type": "chat",
            "evaluation_mode": "likelihood",
            "temperature": 0.7,
            "seed": 1234,
            "disagreement_policy": "best_effort",
        }),
    );
    assert_eq!(status, 200, "{v}");
    let results = v["results"].as_array().unwrap();
    let by = |name: &str| results.iter().find(|r| r["miner"] == name).unwrap().clone();
    assert_eq!(by("honest")["valid"], true, "{v}");
    assert_eq!(by("random")["valid"], false, "{v}");
    assert_eq!(v["verdict"], "VALID", "{v}");
    assert_eq!(v["accepted_output"], 0, "{v}");

    // One output alone, with the seed: random text is INVALID; without the seed the honest
    // output still passes on ranks and log-probabilities.
    let (_, v) = net.post(
        "/api/v1/validate",
        &json!({"task_request_input": question, "task_result_output": "zzkq vvx 1919 ;;",
                "temperature": 0.7, "seed": 1234}),
    );
    assert_eq!(v["verdict"], "INVALID", "{v}");
    let (_, v) = net.post(
        "/api/v1/validate",
        &json!({"task_request_input": question, "task_result_output": honest.text,
                "temperature": 0.7}),
    );
    assert_eq!(v["verdict"], "VALID", "{v}");

    // What the request leaves out is a verdict; what it gets wrong is a 400.
    let (status, v) = net.post(
        "/api/v1/validate",
        &json!({"task_request_input": "  ", "task_result_output": "x"}),
    );
    assert_eq!(
        (status, v["verdict"].as_str()),
        (200, Some("NEEDS_SPEC")),
        "{v}"
    );
    let (status, v) = net.post(
        "/api/v1/validate",
        &json!({"task_request_input": "q", "task_result_output": "one", "evaluation_mode": "exact"}),
    );
    assert_eq!(
        (status, v["verdict"].as_str()),
        (200, Some("NEEDS_SPEC")),
        "{v}"
    );
    for bad in [
        json!({"task_request_input": "q", "task_result_output": "a", "evaluation_mode": "fuzzy"}),
        json!({"task_request_input": "q", "task_result_output": "a", "temperature": -1.0}),
        json!({"task_request_input": "q", "task_result_output": "a", "task_type": "poem"}),
        json!({"task_request_input": "q", "task_result_output": "a", "unknown_field": 1}),
        json!({"task_request_input": "q", "task_result_output": "a", "evaluation_mode": "embedding"}),
    ] {
        let (status, v) = net.post("/api/v1/validate", &bad);
        assert_eq!(status, 400, "{bad} -> {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
}
