//! `cortensor bench chunks`: what chunked generation costs. One real SmolLM2 miner (CPU, one
//! thread) answers the same long prompts end to end through the router with `chunk_tokens`
//! 0 (one round: the baseline, measured in the same run), then in chunks of several sizes,
//! under `exact` validation and under `likelihood` (each chunk replayed by the validator).
//! Each extra round costs a reveal, a validation and the miner's prefill of the prompt and the
//! accepted output again.

use super::testnet::{llama_factory, model_name};
use crate::models::backend::BackendChoice;
use crate::testkit::network::{Engines, TestnetBuilder};
use serde_json::{json, Value};
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct ChunksArgs {
    /// Tasks per configuration.
    #[arg(long, default_value_t = 2)]
    pub tasks: usize,
    /// Tokens each task asks for.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Chunk sizes to measure against one round (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [32usize, 64, 128])]
    pub chunks: Vec<usize>,
}

/// A prompt the model answers at length.
const PROMPT: &str = "Write a very long story about a dragon who learns to fly, with many details.";

pub fn run(args: ChunksArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tasks > 0, "--tasks must be at least 1");
    anyhow::ensure!(
        args.chunks.iter().all(|c| *c > 0),
        "--chunks takes sizes of at least 1 token"
    );
    let model_path = super::generate::resolve_model(None)?;
    let model = model_name(&model_path);
    let factory = llama_factory(model_path, BackendChoice::Cpu, 1, 2048);
    eprintln!(
        "bench chunks: {model}, 1 miner (cpu, 1 thread), {} task(s) of {} tokens per row",
        args.tasks, args.max_tokens
    );
    for validation in ["exact", "likelihood"] {
        println!("\nvalidation: {validation}");
        println!(
            "{:<14} {:>8} {:>8} {:>9} {:>9} {:>16}",
            "chunk_tokens", "tokens", "rounds", "seconds", "tok/s", "vs one round"
        );
        let mut base = None;
        for chunk in std::iter::once(0).chain(args.chunks.iter().copied()) {
            let overlay = format!(
                "[queue]\nchunk_tokens = {chunk}\nprecommit_timeout_ms = 300000\ntask_timeout_ms = 600000\n[nodes]\nprobes_required = 0\n"
            );
            let net = TestnetBuilder::new()
                .miners(1)
                .validators(1)
                .engines(Engines::Custom {
                    factory: factory.clone(),
                    model: model.clone(),
                })
                .config(&overlay)
                .start()?;
            let (status, v) = net.post(
                "/api/v1/sessions",
                &json!({"redundant": 1, "deposit": 1_000_000_000u64, "validation": validation,
                        "num_of_validator_nodes": 1}),
            );
            anyhow::ensure!(status == 201, "cannot create a session: {v}");
            let sid = v["session_id"].as_u64().unwrap_or(0);
            let (mut tokens, mut rounds, mut seconds) = (0u64, 0u64, 0f64);
            for _ in 0..args.tasks {
                let started = Instant::now();
                let (status, v): (u16, Value) = net.post(
                    "/api/v1/completions",
                    &json!({"session_id": sid, "prompt": PROMPT, "max_tokens": args.max_tokens,
                            "temperature": 0}),
                );
                anyhow::ensure!(status == 200, "a task failed: {v}");
                seconds += started.elapsed().as_secs_f64();
                tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                let task = net.get(&format!("/api/v1/tasks/{sid}/{}", v["task_id"])).1;
                rounds += task["spans"].as_array().map_or(0, |s| s.len() as u64);
            }
            let rate = tokens as f64 / seconds.max(1e-9);
            let base_rate = *base.get_or_insert(rate);
            println!(
                "{:<14} {:>8} {:>8} {:>9.2} {:>9.2} {:>15.1}%",
                if chunk == 0 {
                    "0 (one round)".to_string()
                } else {
                    chunk.to_string()
                },
                tokens,
                rounds,
                seconds,
                rate,
                rate / base_rate * 100.0
            );
        }
    }
    println!("(end to end through the router: submit, generate, precommit, reveal, validate, settle; per chunk)");
    Ok(())
}
