//! `cortensor bench orchestrate`: what the network adds to a request. A testnet of zero-latency
//! scripted miners answers completions over HTTP on loopback, at redundancy 1 and 3; in the same
//! run a bare actix-web handler returning the same JSON gives the ceiling. Prints completions
//! per second and p50/p99 latency for each, the throughput ratio and the added p99.

use crate::config::TestnetConfig;
use crate::models::engine::InferenceEngine;
use crate::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use crate::testnet::{Storage, Testnet, TestnetOptions};
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct OrchestrateArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Seconds of load per configuration.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// HTTP worker threads of both servers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Tokens each scripted miner produces.
    #[arg(long, default_value_t = 8)]
    pub tokens: usize,
    /// Keep the store in memory instead of on disk (shows what the flushes cost).
    #[arg(long)]
    pub memory_store: bool,
}

pub(crate) struct Figures {
    pub name: String,
    pub completed: usize,
    pub errors: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `clients` threads post `body` to `url` for `seconds`, each with a keep-alive connection.
pub(crate) fn load(
    name: &str,
    url: &str,
    key: &str,
    body: &Value,
    clients: usize,
    seconds: f64,
) -> Figures {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, key, body) = (url.to_string(), key.to_string(), body.to_string());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .expect("client");
                let (mut latencies, mut errors) = (Vec::new(), 0usize);
                while Instant::now() < until {
                    let started = Instant::now();
                    let ok = http
                        .post(&url)
                        .bearer_auth(&key)
                        .header("Content-Type", "application/json")
                        .body(body.clone())
                        .send()
                        .and_then(|r| r.error_for_status())
                        .and_then(|r| r.bytes())
                        .is_ok();
                    if ok {
                        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        errors += 1;
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in threads {
        let (l, e) = t.join().expect("a load thread");
        all.extend(l);
        errors += e;
    }
    all.sort_by(|a, b| a.partial_cmp(b).expect("latencies are numbers"));
    Figures {
        name: name.to_string(),
        completed: all.len(),
        errors,
        per_second: all.len() as f64 / seconds,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
    }
}

/// The ceiling: a bare handler returning a completion-shaped JSON body.
fn bare_server(
    workers: usize,
    response: Value,
) -> anyhow::Result<(
    String,
    actix_web::dev::ServerHandle,
    std::thread::JoinHandle<()>,
)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/api/v1/completions", listener.local_addr()?);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let system = actix_rt::System::new();
        system.block_on(async move {
            let body = web::Data::new(response.to_string());
            let server = HttpServer::new(move || {
                App::new().app_data(body.clone()).route(
                    "/api/v1/completions",
                    web::post().to(|b: web::Data<String>, _req: web::Json<Value>| async move {
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body(b.get_ref().clone())
                    }),
                )
            })
            .workers(workers)
            .disable_signals()
            .listen(listener)
            .expect("listen")
            .run();
            let _ = tx.send(server.handle());
            let _ = server.await;
        });
    });
    let handle = rx.recv()?;
    Ok((url, handle, thread))
}

pub fn run(args: OrchestrateArgs) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let overlay = format!(
        "router.max_inflight_per_key = {n}\nrouter.max_inflight_total = {n}\nnodes.miners = 3\nnodes.max_tasks_per_miner = {n}\n",
        n = args.clients * 4
    );
    let config = TestnetConfig::from_toml_str(&overlay, "bench")?;
    let tokens = args.tokens;
    let engine: crate::actors::miner::EngineFactory = Arc::new(move |_: &str| {
        Ok(Box::new(ScriptedEngine::new(Script {
            length: tokens,
            ..Script::default()
        })) as Box<dyn InferenceEngine>)
    });
    let storage = if args.memory_store {
        Storage::Temporary
    } else {
        Storage::Dir(dir.clone())
    };
    let testnet = Testnet::start(
        TestnetOptions {
            config,
            engine,
            model: SCRIPTED_MODEL.into(),
            storage,
            faults: Default::default(),
            http_workers: args.workers,
            chain: Default::default(),
            embedding_model: None,
            wiring: Default::default(),
            node_listener: None,
            tls: None,
        },
        TcpListener::bind("127.0.0.1:0")?,
    )?;
    let http = reqwest::blocking::Client::new();
    let wait_until = Instant::now() + Duration::from_secs(30);
    loop {
        let miners: Value = http
            .get(format!("{}/api/v1/miners", testnet.url))
            .bearer_auth(&testnet.api_key)
            .send()?
            .json()?;
        let ready = miners["nodes"].as_object().map_or(0, |n| {
            n.values().filter(|m| m["state"] == "ephemeral").count()
        });
        if ready == 3 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < wait_until,
            "the scripted miners did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut sessions = Vec::new();
    for redundant in [1u32, 3] {
        let created: Value = http
            .post(format!("{}/api/v1/sessions", testnet.url))
            .bearer_auth(&testnet.api_key)
            .json(&json!({"name": format!("bench r{redundant}"), "redundant": redundant, "deposit": u64::MAX / 4}))
            .send()?
            .json()?;
        sessions.push((redundant, created["session_id"].as_u64().unwrap_or(0)));
    }
    // One real answer, so the ceiling returns the same bytes.
    let sample: Value = http
        .post(format!("{}/api/v1/completions", testnet.url))
        .bearer_auth(&testnet.api_key)
        .json(&json!({"session_id": sessions[0].1, "prompt": "warm up", "max_tokens": tokens}))
        .send()?
        .json()?;
    let (bare_url, bare_handle, bare_thread) = bare_server(args.workers, sample)?;

    eprintln!(
        "bench orchestrate: {} clients, {:.1} s each, {} HTTP workers, {} scripted tokens, store {}",
        args.clients, args.seconds, args.workers, tokens, if args.memory_store { "in memory" } else { "on disk" }
    );
    let url = format!("{}/api/v1/completions", testnet.url);
    let mut results = Vec::new();
    for &(redundant, sid) in &sessions {
        let body = json!({"session_id": sid, "prompt": "benchmark prompt", "max_tokens": tokens});
        // Warm-up, then the measured run; the ceiling is measured right before each.
        let _ = load("warm-up", &url, &testnet.api_key, &body, args.clients, 0.5);
        let ceiling = load(
            "bare actix-web handler",
            &bare_url,
            &testnet.api_key,
            &body,
            args.clients,
            args.seconds,
        );
        let ours = load(
            &format!("testnet, redundancy {redundant}"),
            &url,
            &testnet.api_key,
            &body,
            args.clients,
            args.seconds,
        );
        results.push((ceiling, ours));
    }
    println!(
        "{:<28} {:>10} {:>8} {:>9} {:>9} {:>8} {:>12}",
        "configuration", "completed", "errors", "per s", "p50 ms", "p99 ms", "vs ceiling"
    );
    for (ceiling, ours) in &results {
        for f in [ceiling, ours] {
            let ratio = f.per_second / ceiling.per_second * 100.0;
            println!(
                "{:<28} {:>10} {:>8} {:>9.0} {:>9.2} {:>8.2} {:>11.1}%",
                f.name, f.completed, f.errors, f.per_second, f.p50_ms, f.p99_ms, ratio
            );
        }
        println!("{:<28} added p99 {:.2} ms (goal < 2 ms), throughput {:.1}% of the ceiling (goal >= 50% at redundancy 1)",
            "", ours.p99_ms - ceiling.p99_ms, ours.per_second / ceiling.per_second * 100.0);
    }
    drop(bare_handle.stop(false));
    let _ = bare_thread;
    testnet.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("cortensor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
