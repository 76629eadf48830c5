//! Shared helpers for the network tests: start a testnet on port 0 (scripted or real engines),
//! talk to it over real HTTP, poll until a condition holds.
#![allow(dead_code)]

use cortensor::actors::miner::{EngineFactory, MinerFaults};
use cortensor::config::TestnetConfig;
use cortensor::models::engine::InferenceEngine;
use cortensor::testkit::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use cortensor::testnet::{ChainChoice, Storage, Testnet, TestnetOptions};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Net {
    pub testnet: Testnet,
    pub http: reqwest::blocking::Client,
}

/// A testnet of scripted miners: `scripts` by miner id (others get the default script),
/// configuration overlay in TOML.
pub fn scripted(
    overlay: &str,
    scripts: HashMap<String, Script>,
    faults: HashMap<String, MinerFaults>,
    data: &Path,
) -> Net {
    // Miners scripted to misbehave would fail their network tasks and never join the pool:
    // such tests admit them at once unless the overlay says otherwise.
    let overlay =
        if (scripts.is_empty() && faults.is_empty()) || overlay.contains("probes_required") {
            overlay.to_string()
        } else {
            format!("nodes.probes_required = 0\n{overlay}")
        };
    let config =
        TestnetConfig::from_toml_str(&overlay, "test overlay").expect("the overlay parses");
    let scripts = Arc::new(scripts);
    let engine: EngineFactory = Arc::new(move |miner: &str| {
        let script = scripts.get(miner).cloned().unwrap_or_default();
        Ok(Box::new(ScriptedEngine::new(script)) as Box<dyn InferenceEngine>)
    });
    start(config, engine, SCRIPTED_MODEL, faults, data)
}

pub fn start(
    config: TestnetConfig,
    engine: EngineFactory,
    model: &str,
    faults: HashMap<String, MinerFaults>,
    data: &Path,
) -> Net {
    start_on(config, engine, model, faults, data, ChainChoice::Embedded)
}

pub fn start_on(
    config: TestnetConfig,
    engine: EngineFactory,
    model: &str,
    faults: HashMap<String, MinerFaults>,
    data: &Path,
    chain: ChainChoice,
) -> Net {
    let options = TestnetOptions {
        config,
        engine,
        model: model.to_string(),
        storage: Storage::Dir(data.to_path_buf()),
        faults,
        http_workers: 2,
        chain,
        embedding_model: None,
        wiring: Default::default(),
        node_listener: None,
        tls: None,
    };
    start_with(options)
}

/// A testnet from options as given; returns once every miner is online.
pub fn start_with(options: TestnetOptions) -> Net {
    let miners = options.config.nodes.miners;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let testnet = Testnet::start(options, listener).expect("the testnet starts");
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let net = Net { testnet, http };
    net.wait_for(
        Duration::from_secs(300),
        "all miners in the pool (or failing their network tasks)",
        |n| n.settled_miners() >= miners,
    );
    net
}

impl Net {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.testnet.url)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.testnet.api_key)
            .send()
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.testnet.api_key)
            .json(body)
            .send()
            .expect("POST");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// Miners in the pool (online and past their network tasks) or pinned.
    pub fn online_miners(&self) -> usize {
        cortensor::commands::client::ready_miners(&self.get("/api/v1/miners").1)
    }

    /// Miners that have joined the pool or failed a network task at least once: settled.
    pub fn settled_miners(&self) -> usize {
        let (_, v) = self.get("/api/v1/miners");
        let joined = self.online_miners();
        let failing = v["nodes"].as_object().map_or(0, |n| {
            n.values()
                .filter(|m| m["state"] != "offline" && m["probes_failed"].as_u64().unwrap_or(0) > 0)
                .filter(|m| {
                    ["validating", "suspended"].contains(&m["state"].as_str().unwrap_or(""))
                })
                .count()
        });
        joined + failing
    }

    /// Creates a session; returns its id.
    pub fn session(&self, redundant: u32, deposit: u64) -> u64 {
        let body = json!({"name": "test", "redundant": redundant, "max_num_of_nodes": redundant.max(3), "deposit": deposit});
        let (status, v) = self.post("/api/v1/sessions", &body);
        assert_eq!(status, 201, "session create: {v}");
        v["session_id"].as_u64().expect("session_id")
    }

    pub fn session_view(&self, id: u64) -> Value {
        let (status, v) = self.get(&format!("/api/v1/sessions/{id}"));
        assert_eq!(status, 200, "{v}");
        v
    }

    pub fn task(&self, sid: u64, tid: u64) -> Value {
        let (status, v) = self.get(&format!("/api/v1/tasks/{sid}/{tid}"));
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Posts a completion on a thread of its own and does not wait for it: a task left in
    /// flight (its answer, or the error of a network that stopped, is dropped).
    pub fn submit_in_flight(&self, body: Value) {
        let url = self.url("/api/v1/completions");
        let key = self.testnet.api_key.clone();
        std::thread::spawn(move || {
            let _ = reqwest::blocking::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send();
        });
    }

    pub fn wait_for(&self, limit: Duration, what: &str, mut ok: impl FnMut(&Net) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for: {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_task(&self, sid: u64, tid: u64, state: &str) -> Value {
        let start = Instant::now();
        loop {
            let (status, v) = self.get(&format!("/api/v1/tasks/{sid}/{tid}"));
            if status == 200 && v["status"] == state {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "task {sid}/{tid} never reached {state}: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// The value of one metric line, e.g. `cortensor_rejected_reveals_total`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

pub fn faults(entries: &[(&str, MinerFaults)]) -> HashMap<String, MinerFaults> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

pub fn scripts(entries: &[(&str, Script)]) -> HashMap<String, Script> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Runs the `cortensor` binary (warnings only in its log).
pub fn cortensor(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cortensor"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running the cortensor binary")
}

/// `cortensor args` fails, naming `needle` in its error, without a panic.
pub fn fails_naming(args: &[&str], needle: &str) {
    let out = cortensor(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "{args:?}: stderr does not name {needle:?}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The Python with the official `openai` client (installed, pinned, by scripts/setup).
pub fn client_python() -> std::path::PathBuf {
    let home = std::env::var_os("CORTENSOR_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cortensor")
        });
    let python = home.join("venv-clients/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup (it installs the openai client)",
        python.display()
    );
    python
}
