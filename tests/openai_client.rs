//! The OpenAI-compatible API driven by the official `openai` Python client (installed, pinned,
//! by scripts/setup), against a testnet of real SmolLM2 miners.

mod common;

use common::client_python;

use cortensor::commands::testnet::{llama_factory, model_name};
use cortensor::config::TestnetConfig;
use cortensor::models::backend::BackendChoice;
use cortensor::models::fetch;
use serde_json::Value;
use std::process::Command;

/// "chatcmpl-3-7" → (3, 7)
fn task_of(id: &str) -> (u64, u64) {
    let parts: Vec<&str> = id.rsplitn(3, '-').collect();
    (parts[1].parse().unwrap(), parts[0].parse().unwrap())
}

#[test]
fn the_official_openai_client_works_unchanged() {
    let model = fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &fetch::cache_dir(), &mut |_| {}).unwrap();
    let name = model_name(&model);
    let mut config = TestnetConfig::default();
    config.nodes.miners = 3;
    let dir = tempfile::tempdir().unwrap();
    let engine = llama_factory(model, BackendChoice::Cpu, 1, 1024);
    let net = common::start(config, engine, &name, Default::default(), dir.path());

    let out = Command::new(client_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client_check.py"
        ))
        .arg(net.url("/v1"))
        .arg(&net.testnet.api_key)
        .arg(&name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(v["models"], serde_json::json!([name]));
    let chat = &v["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["role"], "assistant");
    assert!(
        !chat["content"].as_str().unwrap().trim().is_empty(),
        "{chat}"
    );
    assert!(["stop", "length"].contains(&chat["finish_reason"].as_str().unwrap()));
    let usage = &chat["usage"];
    assert!(
        usage["prompt_tokens"].as_u64().unwrap() > 10,
        "system + user messages: {usage}"
    );
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion_tokens));
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    // The answer is the network's validated result.
    let (sid, tid) = task_of(chat["id"].as_str().unwrap());
    let task = net.task(sid, tid);
    assert_eq!(task["status"], "Completed");
    assert_eq!(task["accepted"]["text"], chat["content"]);

    let stream = &v["stream"];
    assert_eq!(
        stream["ids"].as_array().unwrap().len(),
        1,
        "one id across chunks: {stream}"
    );
    assert_eq!(stream["roles"], serde_json::json!(["assistant"]));
    assert!(
        stream["chunks"].as_u64().unwrap() >= 2,
        "tokens arrive in several chunks: {stream}"
    );
    let (sid, tid) = task_of(stream["ids"][0].as_str().unwrap());
    let streamed_task = net.task(sid, tid);
    assert_eq!(streamed_task["accepted"]["text"], stream["content"]);
    assert_eq!(
        stream["usage"]["completion_tokens"],
        streamed_task["usage"]["completion_tokens"]
    );
    assert!(["stop", "length"].contains(&stream["finish_reason"].as_str().unwrap()));

    assert!(!v["completion"]["text"].as_str().unwrap().is_empty());
    assert!(
        v["completion"]["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(!v["completion_stream"].as_str().unwrap().is_empty());
    // n = 2: two subtasks; streamed, each piece tagged with its choice; the same texts.
    let choices = &v["choices"];
    let answered = choices["answered"].as_array().unwrap();
    assert_eq!(answered.len(), 2, "{choices}");
    assert!(
        answered.iter().all(|c| !c.as_str().unwrap().is_empty()),
        "{choices}"
    );
    assert_eq!(choices["streamed"], choices["answered"], "{choices}");
    assert_eq!(v["unknown_model"]["status"], 404);
    assert_eq!(v["unknown_model"]["code"], "model_not_found");
    assert_eq!(v["bad_key"]["status"], 401);
}
