//! `cortensor bench load`: a bounded load test on loopback. A network of scripted miners (the
//! test kit's) takes `requests` completions from `concurrency` clients at once, streaming (SSE)
//! or not; overload must be refused with 429 and nothing else. Prints what came back, p50/p99
//! latency and the process's memory before, at its peak and after.
//!
//! The test suite runs the same function with smaller numbers and asserts that every answer
//! was a completion or a 429.

use crate::testkit::scripted_engine::Script;
use crate::testkit::{Engines, TestnetBuilder};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Requests in all (429s count: each is an answer).
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Clients at once.
    #[arg(long, default_value_t = 1_000)]
    pub concurrency: usize,
    /// Share of requests that stream (SSE), 0..=1.
    #[arg(long, default_value_t = 1.0)]
    pub stream_share: f64,
    /// Tokens each task generates, and the scripted miners' delay per token.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub token_delay_ms: u64,
    #[arg(long, default_value_t = 4)]
    pub miners: usize,
    /// Configuration laid over the defaults (TOML), e.g. admission limits.
    #[arg(long, default_value = "")]
    pub config: String,
}

/// What a load run saw.
#[derive(Debug, Clone, Default)]
pub struct LoadFigures {
    pub requests: usize,
    pub completed: usize,
    /// 429 answers (a request is tried again after each).
    pub rate_limited: usize,
    /// From a request's first try to its completion, 429s and back-offs included.
    pub end_to_end_p50_ms: f64,
    pub end_to_end_p99_ms: f64,
    /// Anything else, by kind (the goal is none).
    pub errors: BTreeMap<String, usize>,
    pub seconds: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rate_limited_p99_ms: f64,
    pub rss_before_mb: f64,
    pub rss_peak_mb: f64,
    pub rss_after_mb: f64,
    pub max_concurrent_streams: usize,
}

impl std::fmt::Display for LoadFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} requests in {:.1} s ({:.0} completions/s): {} completed, {} answers 429 (each retried), errors {:?}",
            self.requests,
            self.seconds,
            self.completed as f64 / self.seconds,
            self.completed,
            self.rate_limited,
            self.errors
        )?;
        writeln!(
            f,
            "end to end (429s and back-offs included) p50 {:.1} ms, p99 {:.1} ms",
            self.end_to_end_p50_ms, self.end_to_end_p99_ms
        )?;
        writeln!(
            f,
            "latency of the try served p50 {:.1} ms, p99 {:.1} ms; of 429s p99 {:.1} ms; {} streams open at once at most",
            self.p50_ms, self.p99_ms, self.rate_limited_p99_ms, self.max_concurrent_streams
        )?;
        write!(
            f,
            "memory (RSS, clients and network in one process): {:.0} MB before, {:.0} MB at peak, {:.0} MB after",
            self.rss_before_mb, self.rss_peak_mb, self.rss_after_mb
        )
    }
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |pages| pages * 4096.0 / 1e6)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Tries of one request at most (each 429 is one).
pub const MAX_TRIES: usize = 10_000;

#[derive(Default)]
struct Tally {
    end_to_end: Vec<f64>,
    completed: Vec<f64>,
    limited: Vec<f64>,
    errors: BTreeMap<String, usize>,
}

/// Runs the load; errors only when the network cannot start.
pub fn measure(args: &LoadArgs) -> anyhow::Result<LoadFigures> {
    let rss_before = rss_mb();
    let script = Script {
        length: args.tokens,
        token_delay: Duration::from_millis(args.token_delay_ms),
        ..Script::default()
    };
    // Deadlines for a loaded machine: the test kit's defaults are tuned for quick scenarios.
    let overlay = format!(
        "queue.ack_timeout_ms = 10000\nqueue.precommit_timeout_ms = 30000\nqueue.commit_timeout_ms = 10000\n\
         queue.task_timeout_ms = 60000\nnodes.offline_after_ms = 10000\nnodes.max_tasks_per_miner = 256\n{}",
        args.config
    );
    let net = TestnetBuilder::new()
        .miners(args.miners)
        .engines(Engines::Scripted(script))
        .config(&overlay)
        .start()?;
    let session = net
        .create_session(1, u64::MAX / 4)
        .map_err(|e| anyhow::anyhow!(e))?;
    let url = format!("{}/api/v1/completions/{session}", net.url());
    let key = net.api_key();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let open_streams = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(rss_mb()));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let now = rss_mb();
                let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                *p = p.max(now);
                drop(p);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started = Instant::now();
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            // Below the server's keep-alive (5 s), so no request races the server closing an
            // idle connection (a POST is not retried on such a race).
            .pool_idle_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(120))
            .build()
            .expect("an HTTP client");
        let workers: Vec<_> = (0..args.concurrency)
            .map(|w| {
                let (client, url, key) = (client.clone(), url.clone(), key.clone());
                let (next, tally) = (next.clone(), tally.clone());
                let (open_streams, max_open) = (open_streams.clone(), max_open.clone());
                let (requests, share) = (args.requests, args.stream_share);
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= requests {
                            break;
                        }
                        // Deterministic mix: request n streams when its slot falls under the share.
                        let stream = ((n * 7919 + w) % 1000) as f64 / 1000.0 < share;
                        let body = json!({"prompt": format!("load request {n}"), "max_tokens": 16, "stream": stream});
                        // Each request is tried until it is served (or fails otherwise), at
                        // most MAX_TRIES times.
                        let first = Instant::now();
                        for attempt in 0..MAX_TRIES {
                            let t0 = Instant::now();
                            let outcome = one_request(&client, &url, &key, &body, stream, &open_streams, &max_open).await;
                            let ms = t0.elapsed().as_secs_f64() * 1000.0;
                            let limited = outcome.as_ref().err().is_some_and(|k| k == "429");
                            {
                                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                                match outcome {
                                    Ok(()) => {
                                        t.completed.push(ms);
                                        t.end_to_end.push(first.elapsed().as_secs_f64() * 1000.0);
                                    }
                                    Err(_) if limited && attempt + 1 < MAX_TRIES => t.limited.push(ms),
                                    Err(kind) => *t.errors.entry(kind).or_default() += 1,
                                }
                            }
                            if !limited {
                                break;
                            }
                            // Back off with jitter (shorter than Retry-After, to keep the pressure on).
                            tokio::time::sleep(Duration::from_millis(50 + ((n + attempt) % 50) as u64)).await;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.await;
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    drop(net);
    drop(runtime);
    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    t.completed.sort_by(|a, b| a.total_cmp(b));
    t.end_to_end.sort_by(|a, b| a.total_cmp(b));
    t.limited.sort_by(|a, b| a.total_cmp(b));
    let rss_peak = *peak.lock().unwrap_or_else(|e| e.into_inner());
    Ok(LoadFigures {
        requests: args.requests,
        completed: t.completed.len(),
        rate_limited: t.limited.len(),
        end_to_end_p50_ms: percentile(&t.end_to_end, 0.5),
        end_to_end_p99_ms: percentile(&t.end_to_end, 0.99),
        errors: t.errors,
        seconds,
        p50_ms: percentile(&t.completed, 0.5),
        p99_ms: percentile(&t.completed, 0.99),
        rate_limited_p99_ms: percentile(&t.limited, 0.99),
        rss_before_mb: rss_before,
        rss_peak_mb: rss_peak,
        rss_after_mb: rss_mb(),
        max_concurrent_streams: max_open.load(Ordering::Relaxed),
    })
}

/// One request to its end: Ok for a whole completion, else the kind of failure ("429", a
/// status, "stream ended early", a transport error).
async fn one_request(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
    stream: bool,
    open_streams: &AtomicUsize,
    max_open: &AtomicUsize,
) -> Result<(), String> {
    let response = client
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("transport: {}", e.without_url()))?;
    let status = response.status().as_u16();
    if status == 429 {
        if response.headers().get("retry-after").is_none() {
            return Err("429 without Retry-After".into());
        }
        return Err("429".into());
    }
    if status != 200 {
        let text = response.text().await.unwrap_or_default();
        let code = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default();
        return Err(format!("{status} {code}"));
    }
    if !stream {
        let v: serde_json::Value = response
            .json()
            .await
            .map_err(|e| format!("body: {}", e.without_url()))?;
        return match v["choices"][0]["text"].as_str() {
            Some(t) if !t.is_empty() => Ok(()),
            _ => Err("200 without a completion".into()),
        };
    }
    let now = open_streams.fetch_add(1, Ordering::Relaxed) + 1;
    max_open.fetch_max(now, Ordering::Relaxed);
    let mut response = response;
    let mut tail = Vec::new();
    let mut result = Err("stream ended early".to_string());
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                tail.extend_from_slice(&chunk);
                if tail.len() > 8192 {
                    tail.drain(..tail.len() - 1024);
                }
                if tail.windows(12).any(|w| w == b"data: [DONE]") {
                    result = Ok(());
                }
            }
            Ok(None) => break,
            Err(e) => {
                result = Err(format!("stream: {}", e.without_url()));
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&tail);
    if let Some(at) = text.find("\"code\":\"") {
        let code: String = text[at + 8..].chars().take_while(|c| *c != '"').collect();
        result = Err(format!("stream ended with error {code}"));
    }
    open_streams.fetch_sub(1, Ordering::Relaxed);
    result
}

/// Runs the load twice: with the configured admission limits (overload answered with 429),
/// then with the limits raised to the concurrency (every client served at once).
pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    println!(
        "load: {} requests, {} clients at once, {:.0}% streaming, scripted miners ({} tokens, {} ms a token), loopback",
        args.requests,
        args.concurrency,
        args.stream_share * 100.0,
        args.tokens,
        args.token_delay_ms
    );
    println!("-- admission limits as configured");
    println!("{}", measure(&args)?);
    let raised = LoadArgs {
        config: format!(
            "router.max_inflight_per_key = {n}\nrouter.max_inflight_total = {n}\nqueue.max_live_tasks = {}\n{}",
            args.concurrency * 2,
            args.config,
            n = args.concurrency
        ),
        ..args.clone()
    };
    println!(
        "-- admission limits raised to {} in flight",
        args.concurrency
    );
    println!("{}", measure(&raised)?);
    Ok(())
}
