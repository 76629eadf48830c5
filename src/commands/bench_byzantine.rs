//! `cortensor bench byzantine`: detection and false-positive rates of each validation
//! strategy against byzantine miners running the real model. Per kind of dishonesty, a
//! network of three SmolLM2 miners where the third is byzantine; per strategy, a session of
//! redundancy 3; per seed, one completion (a different prompt and sampling seed). Detection:
//! the byzantine result is not accepted; false positive: an honest result is not accepted.

use super::client::Client;
use super::generate::resolve_model;
use super::testnet::{llama_factory, model_name, wait_for_miners};
use crate::actors::miner::{Byzantine, MinerFaults};
use crate::config::TestnetConfig;
use crate::models::backend::BackendChoice;
use crate::models::fetch;
use crate::testnet::{Storage, Testnet, TestnetOptions};
use anyhow::Context;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ByzantineArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Completions per strategy and kind (each with its own prompt and seed).
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
}

const PROMPTS: [&str; 8] = [
    "Name a large city in Japan and say one thing about it.",
    "What do bees make?",
    "Give one tip for sleeping better.",
    "What is the boiling point of water at sea level?",
    "Suggest a name for a bakery.",
    "Why do leaves change color in autumn?",
    "What is a prime number?",
    "Describe the moon in one sentence.",
];

/// The strategies compared: (name, the session's `validation`).
fn strategies() -> Vec<(&'static str, Value)> {
    vec![
        ("exact", json!("exact")),
        ("embedding (PoI)", json!("embedding")),
        ("likelihood", json!("likelihood")),
        ("judge (PoUW)", json!("judge")),
        ("embedding + likelihood", json!(["embedding", "likelihood"])),
    ]
}

struct Tally {
    tasks: usize,
    caught: usize,
    honest: usize,
    honest_rejected: usize,
}

pub fn run(args: ByzantineArgs) -> anyhow::Result<()> {
    let model = resolve_model(args.model.clone())?;
    let embedding = fetch::embedding_model_dir(&fetch::cache_dir()).ok();
    let mut rows: Vec<(String, &'static str, Tally)> = Vec::new();
    let seed_base = 1000u64;
    eprintln!(
        "3 SmolLM2 miners (the third byzantine), redundancy 3, majority, fail_hard; {} seeds from {seed_base}, temperature {}, max_tokens {}",
        args.seeds, args.temperature, args.max_tokens
    );
    for kind in Byzantine::ALL {
        for (name, validation) in strategies() {
            if embedding.is_none() && name.contains("embedding") {
                continue;
            }
            // A fresh network per kind and strategy: reputation (and suspension) earned under
            // one strategy must not decide another's tasks.
            let t = run_one(
                &model,
                embedding.clone(),
                kind,
                validation,
                &args,
                seed_base,
            )?;
            rows.push((kind.name().to_string(), name, t));
        }
    }
    println!("| byzantine miner | strategy | tasks | detected | false positives (honest results rejected) |");
    println!("|---|---|---|---|---|");
    for (kind, name, t) in &rows {
        println!(
            "| {kind} | {name} | {} | {}/{} ({:.0}%) | {}/{} ({:.0}%) |",
            t.tasks,
            t.caught,
            t.tasks,
            100.0 * t.caught as f64 / t.tasks.max(1) as f64,
            t.honest_rejected,
            t.honest,
            100.0 * t.honest_rejected as f64 / t.honest.max(1) as f64
        );
    }
    Ok(())
}

/// One network (three miners, the third byzantine), one session of `validation`, `seeds`
/// completions.
fn run_one(
    model: &std::path::Path,
    embedding: Option<PathBuf>,
    kind: Byzantine,
    validation: Value,
    args: &ByzantineArgs,
    seed_base: u64,
) -> anyhow::Result<Tally> {
    let dir = std::env::temp_dir().join(format!(
        "cortensor-bench-byzantine-{}-{:?}",
        std::process::id(),
        kind
    ));
    let _ = std::fs::remove_dir_all(&dir);
    // The byzantine miner is admitted without network tasks (which it would fail): what is
    // measured is how validation treats its results.
    let config = TestnetConfig::from_toml_str(
        "nodes.miners = 3\nnodes.validators = 1\nnodes.probes_required = 0",
        "bench",
    )?;
    let mut faults = HashMap::new();
    faults.insert(
        "miner-3".to_string(),
        MinerFaults {
            byzantine: Some(kind),
            ..MinerFaults::default()
        },
    );
    let testnet = Testnet::start(
        TestnetOptions {
            config,
            engine: llama_factory(model.to_path_buf(), BackendChoice::Cpu, 1, 1024),
            model: model_name(model),
            storage: Storage::Dir(dir.clone()),
            faults,
            http_workers: 2,
            chain: Default::default(),
            embedding_model: embedding,
            wiring: Default::default(),
            node_listener: None,
            tls: None,
        },
        TcpListener::bind("127.0.0.1:0")?,
    )?;
    let client = Client::new(&testnet.url, &testnet.api_key);
    wait_for_miners(&client, 3, Duration::from_secs(120))?;
    let s: Value = client
        .post(
            "/api/v1/sessions",
            &json!({"redundant": 3, "deposit": 1u64 << 40, "validation": validation}),
        )?
        .json()?;
    let sid = s["session_id"]
        .as_u64()
        .with_context(|| format!("creating a session: {s}"))?;
    let mut t = Tally {
        tasks: 0,
        caught: 0,
        honest: 0,
        honest_rejected: 0,
    };
    for i in 0..args.seeds {
        let answered = client.post(
            &format!("/api/v1/completions/{sid}"),
            &json!({"prompt": PROMPTS[i % PROMPTS.len()], "max_tokens": args.max_tokens,
                    "temperature": args.temperature, "seed": seed_base + i as u64}),
        );
        let tid = match answered {
            Ok(r) => r.json::<Value>()?["task_id"].as_u64().unwrap_or(0),
            // A failed task answers with an error; it is the session's newest.
            Err(_) => {
                let list = client.get(&format!("/api/v1/tasks/{sid}"))?;
                match list["tasks"].as_array().and_then(|l| l.last()) {
                    Some(last) => last["task_id"].as_u64().unwrap_or(0),
                    None => continue,
                }
            }
        };
        tally(&mut t, &client.get(&format!("/api/v1/tasks/{sid}/{tid}"))?);
    }
    drop(testnet);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(t)
}

/// Counts a task in which the byzantine miner took part.
fn tally(t: &mut Tally, task: &Value) {
    let assigned = task["assigned_miners"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !assigned.iter().any(|m| m == "miner-3") {
        return;
    }
    t.tasks += 1;
    let accepted: Vec<String> =
        serde_json::from_value(task["accepted"]["agreeing"].clone()).unwrap_or_default();
    if !accepted.iter().any(|m| m == "miner-3") {
        t.caught += 1;
    }
    for m in task["assigned_miners"].as_array().into_iter().flatten() {
        let m = m.as_str().unwrap_or_default();
        if m != "miner-3" {
            t.honest += 1;
            if !accepted.iter().any(|a| a == m) {
                t.honest_rejected += 1;
            }
        }
    }
}
