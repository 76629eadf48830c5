//! `cortensor generate` as a user runs it: the real binary, the real default model (fetched
//! into the cache by scripts/setup), text and JSON output, seeds, and bad input.

use std::process::Command;

fn cortensor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cortensor"))
        .args(args)
        .output()
        .expect("running the cortensor binary")
}

fn json_run(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["generate", "--format", "json", "--backend", "cpu"];
    all.extend_from_slice(args);
    let out = cortensor(&all);
    assert!(
        out.status.success(),
        "cortensor {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"))
}

#[test]
fn json_output_has_the_documented_fields() {
    let v = json_run(&[
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "12",
    ]);
    let ids = v["token_ids"].as_array().expect("token_ids");
    assert!(!ids.is_empty() && ids.len() <= 12);
    assert!(v["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tok_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["backend"], "cpu");
    assert!(!v["text"].as_str().unwrap().is_empty());
    let reason = v["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
}

#[test]
fn same_seed_same_tokens_and_different_seed_differs() {
    let args = [
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "24",
        "--temperature",
        "1.0",
        "--top-k",
        "40",
    ];
    let run = |seed: &str| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--seed", seed]);
        json_run(&a)["token_ids"].clone()
    };
    let first = run("7");
    assert_eq!(first, run("7"), "same seed must give the same tokens");
    let others: Vec<_> = ["8", "9", "10"].iter().map(|s| run(s)).collect();
    assert!(
        others.iter().any(|o| *o != first),
        "three other seeds all gave identical samples"
    );
}

#[test]
fn text_output_streams_the_same_text_as_json() {
    let json = json_run(&[
        "--prompt",
        "The three primary colors are",
        "--max-tokens",
        "16",
    ]);
    let out = cortensor(&[
        "generate",
        "--backend",
        "cpu",
        "--prompt",
        "The three primary colors are",
        "--max-tokens",
        "16",
    ]);
    assert!(out.status.success());
    let streamed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        streamed.trim_end_matches('\n'),
        json["text"].as_str().unwrap()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("backend: cpu"),
        "start-up must report the backend: {stderr}"
    );
}

#[test]
fn stop_strings_end_generation_before_the_stop_text() {
    let v = json_run(&[
        "--prompt",
        "Count: 1, 2, 3, 4,",
        "--max-tokens",
        "32",
        "--stop",
        "7",
    ]);
    let text = v["text"].as_str().unwrap();
    assert!(!text.contains('7'), "stop text leaked: {text:?}");
    assert_eq!(v["finish_reason"], "stop", "{v}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = cortensor(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a gguf file").unwrap();
    let out = cortensor(&[
        "generate",
        "--model",
        junk.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a GGUF file"),
        "error should say what is wrong: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = cortensor(&[
        "generate",
        "--backend",
        "cpu",
        "--prompt",
        "hi",
        "--temperature",
        "NaN",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature"));

    let out = cortensor(&["generate", "--backend", "quantum", "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("quantum"));
}
