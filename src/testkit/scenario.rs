//! A seeded scenario: a network of scripted miners under [`FaultPlan::random`], a workload of
//! clients (waiting, streaming, and streaming then hanging up) submitting over real HTTP while
//! the plan's faults fire, then the invariant check. Everything random comes from the seed:
//! replaying a seed replays the plan and the workload (thread timing aside).

use super::fault_plan::FaultPlan;
use super::network::{Engines, Report, TestnetBuilder};
use super::scripted_engine::Script;
use crate::testnet::TestnetError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Miners in a scenario's network.
pub const SCENARIO_MINERS: usize = 3;
/// Tasks a scenario submits at most.
pub const MAX_SCENARIO_TASKS: usize = 10;
/// How long a scenario waits for its tasks to end after the workload.
pub const SCENARIO_DRAIN: Duration = Duration::from_secs(30);

/// The command that replays one seed exactly.
pub fn replay_command(seed: u64) -> String {
    format!("CORTENSOR_FAULT_SEED={seed} cargo test --test fault_scenarios -- --nocapture replay_one_seed")
}

pub fn run(seed: u64) -> Result<Report, TestnetError> {
    let plan = FaultPlan::random(seed, SCENARIO_MINERS);
    // The workload draws from its own generator, so changing it leaves the plans alone.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x3017_1c0a_d5ee_d5ee);
    let script = Script {
        length: 8,
        token_delay: Duration::from_millis(rng.gen_range(0..4)),
        ..Script::default()
    };
    // Even seeds run their tasks in chunks of 3 tokens (8 tokens: three validated rounds
    // each), so faults land between chunks and mid-chunk too.
    let chunk_tokens = if seed.is_multiple_of(2) { 3 } else { 0 };
    let mut net = TestnetBuilder::new()
        .config(&format!("[queue]\nchunk_tokens = {chunk_tokens}\n"))
        .miners(SCENARIO_MINERS)
        .validators(1)
        .engines(Engines::Scripted(script))
        .faults(plan.clone())
        .start()?;
    let redundancy = rng.gen_range(1..=3u32);
    let session = net
        .create_session(redundancy, 10_000_000)
        .map_err(TestnetError::Start)?;
    let target = Arc::new(Mutex::new((net.url(), net.api_key())));
    let started = Instant::now();
    let tasks = rng.gen_range(4..=MAX_SCENARIO_TASKS);
    let clients: Vec<_> = (0..tasks)
        .map(|i| {
            let at = Duration::from_millis(rng.gen_range(0..1500));
            let stream = rng.gen_bool(0.4);
            let hang_up = stream && rng.gen_bool(0.4);
            let target = target.clone();
            std::thread::spawn(move || {
                sleep_until(started + at);
                let (url, key) = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let body = json!({"prompt": format!("task {i} of seed {seed}"),
                    "max_tokens": 8, "stream": stream});
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .expect("an HTTP client");
                let Ok(mut response) = client
                    .post(format!("{url}/api/v1/completions/{session}"))
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                else {
                    return; // the network was restarting: not accepted
                };
                let mut buf = [0u8; 64];
                if hang_up {
                    let _ = response.read(&mut buf); // then the connection drops
                } else {
                    let mut all = Vec::new();
                    let _ = response.read_to_end(&mut all);
                }
            })
        })
        .collect();
    for scheduled in &plan.schedule {
        sleep_until(started + scheduled.at);
        net.apply(&scheduled.fault)?;
        *target.lock().unwrap_or_else(|e| e.into_inner()) = (net.url(), net.api_key());
    }
    for c in clients {
        let _ = c.join();
    }
    Ok(net.finish(SCENARIO_DRAIN))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}
