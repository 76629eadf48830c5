//! `cortensor bench balance`: three miners of unequal speed (scripted engines at 1×, 2× and 4×
//! the latency per token) behind one router, loaded by concurrent clients; tasks per second and
//! p50/p99 latency with miners picked by observed speed, by least load, and in turn (round
//! robin), in the same run, with each miner's share of the tasks.

use super::bench_orchestrate::{load, Figures};
use crate::actors::miner::EngineFactory;
use crate::models::engine::InferenceEngine;
use crate::testkit::network::{Engines, TestnetBuilder};
use crate::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct BalanceArgs {
    /// Concurrent clients of the heavy load (the light load has 2).
    #[arg(long, default_value_t = 12)]
    pub clients: usize,
    /// Seconds of load per policy.
    #[arg(long, default_value_t = 6.0)]
    pub seconds: f64,
    /// Tokens per task.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Milliseconds per token of the fastest miner (the others take 2× and 4×).
    #[arg(long, default_value_t = 3)]
    pub token_ms: u64,
}

/// Latency multiple of each miner: miner-1 1×, miner-2 2×, miner-3 4×.
const SLOWDOWN: [u64; 3] = [1, 2, 4];

pub fn run(args: BalanceArgs) -> anyhow::Result<()> {
    let (tokens, token_ms) = (args.tokens, args.token_ms);
    let factory: EngineFactory = Arc::new(move |id: &str| {
        let slowdown = match id {
            "miner-2" => SLOWDOWN[1],
            "miner-3" => SLOWDOWN[2],
            _ => SLOWDOWN[0],
        };
        Ok(Box::new(ScriptedEngine::new(Script {
            length: tokens,
            ..Script::slow(Duration::from_millis(token_ms * slowdown))
        })) as Box<dyn InferenceEngine>)
    });
    eprintln!(
        "bench balance: 3 miners at {token_ms}/{}/{} ms per token, {tokens} tokens a task, {:.1} s per policy",
        token_ms * 2, token_ms * 4, args.seconds
    );
    for clients in [2, args.clients] {
        measure(&args, &factory, clients)?;
    }
    Ok(())
}

/// Each policy under `clients` concurrent clients, printed as a table.
fn measure(args: &BalanceArgs, factory: &EngineFactory, clients: usize) -> anyhow::Result<()> {
    let tokens = args.tokens;
    let mut rows: Vec<(Figures, Vec<u64>)> = Vec::new();
    for policy in ["round_robin", "least_load", "speed"] {
        let overlay = format!(
            "nodes.selection = \"{policy}\"\nnodes.max_tasks_per_miner = {n}\nrouter.max_inflight_per_key = {n}\nrouter.max_inflight_total = {n}\nqueue.precommit_timeout_ms = 60000\nqueue.ack_timeout_ms = 10000\n",
            n = clients * 4
        );
        let net = TestnetBuilder::new()
            .miners(3)
            .validators(1)
            .engines(Engines::Custom {
                factory: factory.clone(),
                model: SCRIPTED_MODEL.into(),
            })
            .config(&overlay)
            .start()?;
        let sid = net
            .create_session(1, u64::MAX / 4)
            .map_err(|e| anyhow::anyhow!(e))?;
        let url = format!("{}/api/v1/completions", net.url());
        let body = json!({"session_id": sid, "prompt": "balance", "max_tokens": tokens});
        // Warm-up: every policy starts with the speeds measured.
        let _ = load("warm-up", &url, &net.api_key(), &body, clients, 1.0);
        let before = tasks_done(&net);
        let figures = load(policy, &url, &net.api_key(), &body, clients, args.seconds);
        let after = tasks_done(&net);
        rows.push((
            figures,
            after.iter().zip(&before).map(|(a, b)| a - b).collect(),
        ));
    }
    println!("\n{clients} concurrent clients");
    println!(
        "{:<12} {:>10} {:>7} {:>9} {:>9} {:>9} {:>15} {:>20}",
        "selection",
        "completed",
        "errors",
        "tasks/s",
        "p50 ms",
        "p99 ms",
        "vs round robin",
        "share 1×/2×/4×"
    );
    let base = rows[0].0.per_second;
    for (f, share) in &rows {
        let total: u64 = share.iter().sum::<u64>().max(1);
        let shares: Vec<String> = share
            .iter()
            .map(|s| format!("{:.0}%", *s as f64 * 100.0 / total as f64))
            .collect();
        println!(
            "{:<12} {:>10} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>14.1}% {:>20}",
            f.name,
            f.completed,
            f.errors,
            f.per_second,
            f.p50_ms,
            f.p99_ms,
            f.per_second / base * 100.0,
            shares.join("/")
        );
    }
    Ok(())
}

/// Tasks each miner finished so far, miner-1..3.
fn tasks_done(net: &crate::testkit::network::TestNetwork) -> Vec<u64> {
    let nodes = net.get("/api/v1/miners").1["nodes"].clone();
    (1..=3)
        .map(|i| {
            nodes[format!("miner-{i}")]["tasks_done"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect()
}
