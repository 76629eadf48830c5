//! `cortensor bench generate`: decode and prefill speed and peak memory per backend and thread
//! count, with llama.cpp measured in the same run (through llama-cpp-python, where the
//! reference environment from `scripts/setup-reference.sh` is installed) as the baseline.
//!
//! Each configuration runs in a child process so its peak RSS is its own.

use super::generate::resolve_model;
use crate::models::backend::{self, BackendChoice};
use crate::models::engine::{EngineOptions, InferenceEngine, LlamaEngine};
use crate::models::sampling::argmax;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Tokens per second (decode after a 16-token prompt, prefill of a long prompt) and peak
    /// RSS, per backend and thread count, against llama.cpp.
    Generate(BenchArgs),
    /// Completions per second and p50/p99 latency through the whole network (scripted
    /// zero-latency miners, redundancy 1 and 3) against a bare actix-web handler.
    Orchestrate(super::bench_orchestrate::OrchestrateArgs),
    /// Settlements per second and gas per task on anvil (batched and one per transaction),
    /// and the embedded ledger's operations per second.
    Chain(super::bench_chain::ChainBenchArgs),
    /// The distributions behind the validators' likelihood thresholds: honest and dishonest
    /// outputs of the real model, replayed as validators do.
    Likelihood(super::bench_likelihood::LikelihoodArgs),
    /// Detection and false-positive rates of each validation strategy against byzantine
    /// miners running the real model.
    Byzantine(super::bench_byzantine::ByzantineArgs),
    /// A bounded load test on loopback (10,000 requests, 1,000 clients at once, scripted
    /// miners): what came back (completions and 429s only), p50/p99, memory.
    Load(super::bench_load::LoadArgs),
    /// What the wire costs: tasks/s with 1, 4 and 16 scripted miners remote vs in process,
    /// and a real-model miner's tokens/s remote vs in process.
    Remote(super::bench_remote::RemoteArgs),
    /// Miners of unequal speed: tasks/s and p99 with selection by speed, by least load and
    /// round robin.
    Balance(super::bench_balance::BalanceArgs),
    /// What chunked generation costs: a real-model miner's tokens/s end to end in chunks of
    /// several sizes against one round, under exact and likelihood validation.
    Chunks(super::bench_chunks::ChunksArgs),
    /// How encoding cost grows with the prompt: each shipped tokenizer on 1, 16 and 150
    /// paragraphs, cost per token against the one-paragraph cost.
    Tokenize(super::bench_tokenize::TokenizeArgs),
    /// One configuration, printed as one JSON line (what `generate` runs in each child).
    #[command(hide = true)]
    GenerateOne(OneArgs),
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Comma-separated backends to measure (cpu, wgpu).
    #[arg(long, default_value = "cpu", value_delimiter = ',')]
    pub backends: Vec<BackendChoice>,
    /// Comma-separated CPU thread counts.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub threads: Vec<usize>,
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// The llama.cpp benchmark script (run with the reference venv's python).
    #[arg(long, default_value = "scripts/llamacpp_bench.py")]
    pub reference_script: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct OneArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub backend: BackendChoice,
    #[arg(long)]
    pub threads: usize,
    #[arg(long)]
    pub prompt_tokens: usize,
    #[arg(long)]
    pub decode_tokens: usize,
}

/// Tokens of the prompt used for decode measurements (llama.cpp's is the same length).
const DECODE_PROMPT_TOKENS: usize = 16;

#[derive(Debug, Serialize, Deserialize)]
struct Figures {
    backend: String,
    threads: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    peak_rss_mb: f64,
}

pub fn print_backends() -> anyhow::Result<()> {
    let adapters = backend::wgpu_adapters();
    if adapters.is_empty() {
        println!("no wgpu adapters");
    }
    for a in &adapters {
        println!(
            "{}\t{}\t{}\tgpu={}\t{}",
            a.name, a.api, a.device_type, a.is_gpu, a.driver
        );
    }
    let chosen = backend::select(BackendChoice::Auto, 0)?;
    println!("auto -> {}", chosen.description);
    Ok(())
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::GenerateOne(args) => {
            let f = measure(&args)?;
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        BenchCommand::Generate(args) => run_all(args),
        BenchCommand::Orchestrate(args) => super::bench_orchestrate::run(args),
        BenchCommand::Chain(args) => super::bench_chain::run(args),
        BenchCommand::Likelihood(args) => super::bench_likelihood::run(args),
        BenchCommand::Byzantine(args) => super::bench_byzantine::run(args),
        BenchCommand::Load(args) => super::bench_load::run(args),
        BenchCommand::Remote(args) => super::bench_remote::run(args),
        BenchCommand::Balance(args) => super::bench_balance::run(args),
        BenchCommand::Chunks(args) => super::bench_chunks::run(args),
        BenchCommand::Tokenize(args) => super::bench_tokenize::run(args),
    }
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A deterministic prompt of exactly `n` tokens of ordinary text.
fn prompt_ids(engine: &LlamaEngine, n: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog while the band plays a slow song. ";
    let mut ids = engine
        .tokenizer()
        .encode(&text.repeat(n / 8 + 2), false, false);
    ids.truncate(n);
    ids
}

fn measure(args: &OneArgs) -> anyhow::Result<Figures> {
    let mut opts = EngineOptions::new(&args.model);
    opts.backend = args.backend;
    opts.threads = args.threads;
    opts.max_context = (args.prompt_tokens + args.decode_tokens + DECODE_PROMPT_TOKENS + 8).max(64);
    let engine = LlamaEngine::load(&opts)?;
    let long = prompt_ids(&engine, args.prompt_tokens);
    let short = prompt_ids(&engine, DECODE_PROMPT_TOKENS);
    let steps = args.decode_tokens;
    let (prefill_s, decode_s) = engine.with_model(|model| -> anyhow::Result<(f64, f64)> {
        // Warm-up: first-use costs (allocations, shader compilation on wgpu) are not speed.
        let mut s = model.new_session(long.len() + 1);
        model.forward(&mut s, &long, false)?;
        let mut best_prefill = f64::MAX;
        for _ in 0..2 {
            let mut s = model.new_session(long.len() + 1);
            let t = Instant::now();
            model.forward(&mut s, &long, false)?;
            best_prefill = best_prefill.min(t.elapsed().as_secs_f64());
        }
        let mut s = model.new_session(short.len() + steps + 1);
        let mut logits = model.forward(&mut s, &short, false)?;
        let t = Instant::now();
        for _ in 0..steps {
            let next = argmax(&logits);
            logits = model.forward(&mut s, &[next], false)?;
        }
        Ok((best_prefill, t.elapsed().as_secs_f64()))
    })?;
    Ok(Figures {
        backend: engine.info().backend.to_string(),
        threads: args.threads,
        prefill_tok_s: long.len() as f64 / prefill_s,
        decode_tok_s: steps as f64 / decode_s,
        peak_rss_mb: peak_rss_mb(),
    })
}

fn reference_python() -> Option<PathBuf> {
    let home = std::env::var_os("CORTENSOR_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cortensor")))?;
    let py = home.join("venv-reference/bin/python");
    py.is_file().then_some(py)
}

fn run_all(args: BenchArgs) -> anyhow::Result<()> {
    let model = resolve_model(args.model.clone())?;
    let exe = std::env::current_exe().context("locating the cortensor binary")?;
    println!(
        "model {} | prefill: {}-token prompt | decode: {} tokens after a {}-token prompt",
        model.display(),
        args.prompt_tokens,
        args.decode_tokens,
        DECODE_PROMPT_TOKENS
    );
    let mut reference = Vec::new();
    match (reference_python(), args.reference_script.is_file()) {
        (Some(py), true) => {
            for &threads in &args.threads {
                let out = Command::new(&py)
                    .arg(&args.reference_script)
                    .args(["--model", &model.to_string_lossy()])
                    .args(["--threads", &threads.to_string()])
                    .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
                    .args(["--decode-tokens", &args.decode_tokens.to_string()])
                    .output()
                    .context("running the llama.cpp reference benchmark")?;
                let line = String::from_utf8_lossy(&out.stdout);
                match line.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
                    Some(v) => reference.push((threads, v)),
                    None => eprintln!("llama.cpp reference failed: {}", String::from_utf8_lossy(&out.stderr)),
                }
            }
        }
        _ => println!("llama.cpp reference: not installed (scripts/setup-reference.sh installs it); no ratios"),
    }
    println!(
        "{:<8} {:>7} {:>12} {:>12} {:>10} {:>10} {:>11}",
        "backend", "threads", "prefill t/s", "decode t/s", "peak MB", "prefill ×", "decode ×"
    );
    for (threads, v) in &reference {
        println!(
            "{:<8} {:>7} {:>12.1} {:>12.1} {:>10.0} {:>10} {:>11}",
            "llama.cpp",
            threads,
            v["prefill_tok_s"].as_f64().unwrap_or(0.0),
            v["decode_tok_s"].as_f64().unwrap_or(0.0),
            v["peak_rss_mb"].as_f64().unwrap_or(0.0),
            "1.00",
            "1.00"
        );
    }
    for &backend in &args.backends {
        for &threads in &args.threads {
            let out = Command::new(&exe)
                .args(["bench", "generate-one", "--model", &model.to_string_lossy()])
                .args(["--backend", &format!("{backend:?}").to_lowercase()])
                .args(["--threads", &threads.to_string()])
                .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
                .args(["--decode-tokens", &args.decode_tokens.to_string()])
                .output()
                .context("running a benchmark child")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let Some(f) = stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Figures>(l).ok())
            else {
                println!(
                    "{backend:?} x{threads}: failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                continue;
            };
            let ratio = |ours: f64, key: &str| {
                reference
                    .iter()
                    .find(|(t, _)| *t == threads)
                    .and_then(|(_, v)| v[key].as_f64())
                    .map_or("-".to_string(), |base| format!("{:.2}", ours / base))
            };
            println!(
                "{:<8} {:>7} {:>12.1} {:>12.1} {:>10.0} {:>10} {:>11}",
                f.backend,
                f.threads,
                f.prefill_tok_s,
                f.decode_tok_s,
                f.peak_rss_mb,
                ratio(f.prefill_tok_s, "prefill_tok_s"),
                ratio(f.decode_tok_s, "decode_tok_s")
            );
        }
    }
    Ok(())
}
