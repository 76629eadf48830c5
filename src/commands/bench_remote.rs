//! `cortensor bench remote`: what the wire costs. In one run:
//! - tasks per second and p50/p99 through one router with 1, 4 and 16 scripted miners, each
//!   joined over the node WebSocket (real TCP on loopback, the `cortensor miner` actors), and
//!   the same miners in process;
//! - tokens per second of one real-model miner joined remotely, and of the same miner in
//!   process (the same model, prompts and greedy sampling, one task at a time).

use super::bench_orchestrate::{load, Figures};
use super::testnet::{llama_factory, model_name};
use crate::models::backend::BackendChoice;
use crate::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use crate::testkit::remote::RemoteMiner;
use crate::testkit::scripted_engine::Script;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RemoteArgs {
    /// Concurrent clients for the scripted runs.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds of load per scripted configuration.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Tokens each scripted miner produces.
    #[arg(long, default_value_t = 8)]
    pub tokens: usize,
    /// Tasks of the real model, each way.
    #[arg(long, default_value_t = 4)]
    pub model_tasks: usize,
    /// Tokens each real-model task generates.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Scripted runs only.
    #[arg(long)]
    pub no_model: bool,
}

/// Starts a network whose `miners` are in process, or remote (joined over the node socket).
fn network(
    engines: Engines,
    miners: usize,
    remote: bool,
    overlay: &str,
) -> anyhow::Result<(TestNetwork, Vec<RemoteMiner>)> {
    let net = TestnetBuilder::new()
        .miners(if remote { 0 } else { miners })
        .validators(1)
        .engines(engines)
        .config(overlay)
        .node_gateway()
        .start()?;
    let mut joined = Vec::new();
    if remote {
        let (engine, model) = net.engine();
        let url = net.node_url().expect("a node socket");
        joined = (0..miners)
            .map(|_| RemoteMiner::start(&url, engine.clone(), &model, 64))
            .collect();
    }
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if net.ready_miners() == miners {
            break;
        }
        anyhow::ensure!(Instant::now() < until, "{miners} miners did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((net, joined))
}

fn session(net: &TestNetwork) -> anyhow::Result<u64> {
    net.create_session(1, u64::MAX / 4)
        .map_err(|e| anyhow::anyhow!(e))
}

pub fn run(args: RemoteArgs) -> anyhow::Result<()> {
    let overlay = format!(
        "router.max_inflight_per_key = {n}\nrouter.max_inflight_total = {n}\nnodes.max_tasks_per_miner = 64\nqueue.precommit_timeout_ms = 120000\nqueue.ack_timeout_ms = 10000\n",
        n = args.clients * 4
    );
    let script = Script {
        length: args.tokens,
        ..Script::default()
    };
    eprintln!(
        "bench remote: {} clients, {:.1} s per configuration, {} scripted tokens",
        args.clients, args.seconds, args.tokens
    );
    let mut rows: Vec<(usize, Figures, Figures)> = Vec::new();
    for miners in [1usize, 4, 16] {
        let mut pair = Vec::new();
        for remote in [false, true] {
            let (net, joined) =
                network(Engines::Scripted(script.clone()), miners, remote, &overlay)?;
            let sid = session(&net)?;
            let url = format!("{}/api/v1/completions", net.url());
            let body =
                json!({"session_id": sid, "prompt": "benchmark prompt", "max_tokens": args.tokens});
            let _ = load("warm-up", &url, &net.api_key(), &body, args.clients, 0.5);
            let name = format!(
                "{miners:>2} {} miner(s)",
                if remote { "remote" } else { "in-process" }
            );
            pair.push(load(
                &name,
                &url,
                &net.api_key(),
                &body,
                args.clients,
                args.seconds,
            ));
            drop(joined);
            drop(net);
        }
        let remote = pair.pop().expect("two runs");
        let local = pair.pop().expect("two runs");
        rows.push((miners, local, remote));
    }
    println!(
        "{:<26} {:>10} {:>7} {:>9} {:>9} {:>9} {:>14}",
        "scripted miners", "completed", "errors", "tasks/s", "p50 ms", "p99 ms", "vs in-process"
    );
    for (_, local, remote) in &rows {
        for f in [local, remote] {
            println!(
                "{:<26} {:>10} {:>7} {:>9.0} {:>9.2} {:>9.2} {:>13.1}%",
                f.name,
                f.completed,
                f.errors,
                f.per_second,
                f.p50_ms,
                f.p99_ms,
                f.per_second / local.per_second * 100.0
            );
        }
    }
    if args.no_model {
        return Ok(());
    }

    let model_path = super::generate::resolve_model(None)?;
    let model = model_name(&model_path);
    let factory = llama_factory(model_path, BackendChoice::Cpu, 1, 2048);
    let mut speeds = Vec::new();
    for remote in [false, true] {
        let engines = Engines::Custom {
            factory: factory.clone(),
            model: model.clone(),
        };
        let (net, joined) = network(engines, 1, remote, &overlay)?;
        let sid = session(&net)?;
        let (mut tokens, mut seconds) = (0u64, 0f64);
        for i in 0..args.model_tasks {
            let started = Instant::now();
            let (status, v): (u16, Value) = net.post(
                "/api/v1/completions",
                &json!({"session_id": sid, "prompt": format!("Write a short story about a lighthouse keeper, part {i}."),
                        "max_tokens": args.max_tokens, "temperature": 0}),
            );
            anyhow::ensure!(status == 200, "a real-model task failed: {v}");
            seconds += started.elapsed().as_secs_f64();
            tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        }
        speeds.push((tokens, seconds));
        drop(joined);
        drop(net);
    }
    println!(
        "\n{:<26} {:>8} {:>9} {:>9} {:>14}",
        format!("{model} (cpu, 1 thread)"),
        "tokens",
        "seconds",
        "tok/s",
        "vs in-process"
    );
    let base = speeds[0].0 as f64 / speeds[0].1;
    for ((tokens, seconds), name) in speeds.iter().zip(["in-process miner", "remote miner"]) {
        let rate = *tokens as f64 / seconds;
        println!(
            "{:<26} {:>8} {:>9.2} {:>9.2} {:>13.1}%",
            name,
            tokens,
            seconds,
            rate,
            rate / base * 100.0
        );
    }
    println!(
        "(end to end through the router: submit, generate, precommit, reveal, validate, settle)"
    );
    Ok(())
}
