//! [`TestnetBuilder`]: an in-process network for tests, with scripted or real engines, the
//! embedded ledger or an EVM, and a [`FaultPlan`] wired between its actors; and
//! [`TestNetwork`], the running network: HTTP helpers, faults applied on demand, restarts on
//! the same data, and the invariant check at the end.
//!
//! ```no_run
//! use cortensor::testkit::{FaultPlan, TestnetBuilder};
//! let mut net = TestnetBuilder::new().miners(3).faults(FaultPlan::random(7, 3)).start().unwrap();
//! let sid = net.create_session(2, 1_000_000).unwrap();
//! let (status, body) = net.post(&format!("/api/v1/completions/{sid}"),
//!     &serde_json::json!({"prompt": "hello", "max_tokens": 8}));
//! let report = net.finish(std::time::Duration::from_secs(30));
//! assert!(report.violations.is_empty(), "{report}");
//! ```

use super::chain_cut::{ChainCut, CuttableChain};
use super::fault_plan::{Fault, FaultPlan, LinkFaults};
use super::invariants::{check, Checked, Ledger};
use super::link::{Corruptor, FaultyLink, LinkControl, LinkCounters};
use super::scripted_engine::{Script, ScriptedEngine, SCRIPTED_MODEL};
use crate::actors::chain_bridge::GetOutboxCounts;
use crate::actors::messages::{MinerReport, ReportKind, ToMiner, Wrap};
use crate::actors::miner::{Crash, EngineFactory};
use crate::config::TestnetConfig;
use crate::history::{History, Operation};
use crate::models::engine::InferenceEngine;
use crate::store::{Store, WriteFaults};
use crate::task::TaskKey;
use crate::testnet::{ChainChoice, Storage, Testnet, TestnetError, TestnetOptions, Wiring};
use actix::prelude::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The engines a test network's miners run.
#[derive(Clone)]
pub enum Engines {
    /// Scripted engines (instant, deterministic; a test double): one script for every miner.
    Scripted(Script),
    /// Any engines, e.g. the real model: a factory and the model name miners register.
    Custom {
        factory: EngineFactory,
        model: String,
    },
}

pub struct TestnetBuilder {
    miners: usize,
    validators: usize,
    engines: Engines,
    chain: ChainChoice,
    overlay: String,
    plan: FaultPlan,
    data_dir: Option<PathBuf>,
    history: History,
    node_gateway: bool,
    tls: Option<(rustls::ServerConfig, PathBuf)>,
}

impl Default for TestnetBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TestnetBuilder {
    /// Three scripted miners, one validator, the embedded ledger, no faults.
    pub fn new() -> Self {
        Self {
            miners: 3,
            validators: 1,
            engines: Engines::Scripted(Script::default()),
            chain: ChainChoice::Embedded,
            overlay: String::new(),
            plan: FaultPlan::calm(0),
            data_dir: None,
            history: History::new(),
            node_gateway: false,
            tls: None,
        }
    }
    /// Serve the API and the node socket over TLS with this pair (the test kit's own HTTP
    /// helpers trust its CA).
    pub fn tls(mut self, pair: &crate::tls::SelfSigned) -> Result<Self, crate::tls::TlsError> {
        self.tls = Some((crate::tls::server_config(&pair.files)?, pair.ca.clone()));
        Ok(self)
    }
    /// Serve the node WebSocket too (on a free loopback port), for remote miners.
    pub fn node_gateway(mut self) -> Self {
        self.node_gateway = true;
        self
    }
    pub fn miners(mut self, n: usize) -> Self {
        self.miners = n;
        self
    }
    pub fn validators(mut self, n: usize) -> Self {
        self.validators = n;
        self
    }
    pub fn engines(mut self, engines: Engines) -> Self {
        self.engines = engines;
        self
    }
    /// The chain: the embedded ledger (default) or an EVM node such as anvil.
    pub fn chain(mut self, chain: ChainChoice) -> Self {
        self.chain = chain;
        self
    }
    /// Configuration in TOML, laid over the test defaults (short deadlines, fast ticks).
    pub fn config(mut self, overlay: &str) -> Self {
        self.overlay = overlay.to_string();
        self
    }
    pub fn faults(mut self, plan: FaultPlan) -> Self {
        self.plan = plan;
        self
    }
    /// Where the network keeps its data (default: a fresh directory removed at the end).
    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    pub fn start(self) -> Result<TestNetwork, TestnetError> {
        let (data_dir, owned_dir) = match self.data_dir {
            Some(d) => (d, false),
            None => (fresh_dir(), true),
        };
        let config = test_config(self.miners, self.validators, &self.plan, &self.overlay)?;
        let panics: HashMap<String, Arc<AtomicUsize>> = (0..self.miners)
            .map(|i| (crate::testnet::miner_id(i), Arc::new(AtomicUsize::new(0))))
            .collect();
        let (engine, model) = match &self.engines {
            Engines::Scripted(script) => {
                let (script, panics) = (script.clone(), panics.clone());
                let factory: EngineFactory = Arc::new(move |id: &str| {
                    let mut script = script.clone();
                    if let Some(p) = panics.get(id) {
                        script.panics_left = p.clone();
                    }
                    Ok(Box::new(ScriptedEngine::new(script)) as Box<dyn InferenceEngine>)
                });
                (factory, SCRIPTED_MODEL.to_string())
            }
            Engines::Custom { factory, model } => (factory.clone(), model.clone()),
        };
        let faults = Faults {
            controls: Arc::new(Mutex::new(HashMap::new())),
            counters: Arc::new(LinkCounters::default()),
            chain_cut: ChainCut::default(),
            store: WriteFaults::default(),
            panics,
            injected: Arc::new(AtomicUsize::new(0)),
        };
        let wiring = wiring(&self.plan, &faults, self.history.clone());
        let mut net = TestNetwork {
            testnet: None,
            config,
            engine,
            model,
            chain: self.chain,
            wiring,
            data_dir,
            owned_dir,
            history: self.history,
            plan: self.plan,
            faults,
            http: test_client(self.tls.as_ref().map(|(_, ca)| ca.as_path()))?,
            restarts: 0,
            node_gateway: self.node_gateway,
            tls: self.tls,
        };
        net.boot()?;
        Ok(net)
    }
}

/// The test defaults: deadlines short enough that a scenario ends in seconds, scaled by the
/// plan; miners admitted without probes (scripted answers are not the validators' model's).
fn test_config(
    miners: usize,
    validators: usize,
    plan: &FaultPlan,
    overlay: &str,
) -> Result<TestnetConfig, TestnetError> {
    let scale = |ms: f64| ((ms * plan.deadline_scale).round() as u64).max(1);
    let defaults = format!(
        "nodes.miners = {miners}\nnodes.validators = {validators}\nnodes.probes_required = 0\n\
         nodes.heartbeat_interval_ms = 100\nnodes.offline_after_ms = 1000\n\
         queue.ack_timeout_ms = {}\nqueue.precommit_timeout_ms = {}\nqueue.commit_timeout_ms = {}\n\
         queue.task_timeout_ms = 6000\nqueue.max_replacements = 4\nqueue.tick_ms = 10\n",
        scale(400.0),
        scale(1500.0),
        scale(400.0),
    );
    let config = TestnetConfig::from_toml_layers(&[
        (&defaults, "the test kit's defaults"),
        (overlay, "the test's configuration"),
    ])
    .map_err(|e| TestnetError::Start(e.to_string()))?;
    Ok(config)
}

fn fresh_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "cortensor-testkit-{}-{}-{n}",
        std::process::id(),
        crate::task::now_ms()
    ))
}

/// The switches and counters the faults act through.
#[derive(Clone)]
struct Faults {
    controls: Arc<Mutex<HashMap<String, Arc<LinkControl>>>>,
    counters: Arc<LinkCounters>,
    chain_cut: ChainCut,
    store: WriteFaults,
    panics: HashMap<String, Arc<AtomicUsize>>,
    /// Scheduled faults applied so far.
    injected: Arc<AtomicUsize>,
}

impl Faults {
    fn control(&self, miner: &str) -> Arc<LinkControl> {
        self.controls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(miner.to_string())
            .or_default()
            .clone()
    }
}

/// A miner's reveal with its text changed: no longer what it precommitted.
fn corrupt_reveal() -> Corruptor<MinerReport> {
    Arc::new(|m: &mut MinerReport| match &mut m.kind {
        ReportKind::Commit { result } => {
            result.text.push_str(" [corrupted]");
            true
        }
        _ => false,
    })
}

fn link<M: Message<Result = ()> + Clone + Send + 'static>(
    plan: &FaultPlan,
    faults: &Faults,
    rates: LinkFaults,
    name: &'static str,
    corruptor: Option<Corruptor<M>>,
) -> Wrap<M> {
    let plan = plan.clone();
    let faults = faults.clone();
    let epochs = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    Arc::new(move |id: &str, target: Recipient<M>| {
        let epoch = {
            let mut e = epochs.lock().unwrap_or_else(|e| e.into_inner());
            let n = e.entry(id.to_string()).or_default();
            *n += 1;
            *n
        };
        let seed = plan.link_seed(&format!("{name}/{id}/{epoch}"));
        FaultyLink::new(
            target,
            rates.clone(),
            seed,
            faults.control(id),
            faults.counters.clone(),
            corruptor.clone(),
        )
        .start()
        .recipient()
    })
}

fn wiring(plan: &FaultPlan, faults: &Faults, history: History) -> Wiring {
    let cut = faults.chain_cut.clone();
    Wiring {
        to_queue: Some(link(
            plan,
            faults,
            plan.to_queue.clone(),
            "to-queue",
            Some(corrupt_reveal()),
        )),
        to_miner: Some(link::<ToMiner>(
            plan,
            faults,
            plan.to_miner.clone(),
            "to-miner",
            None,
        )),
        chain: plan.cuts_chain().then(|| {
            let wrap: crate::testnet::ChainWrap =
                Arc::new(move |inner: Box<dyn crate::chain::Chain>| {
                    Box::new(CuttableChain::new(inner, cut.clone())) as Box<dyn crate::chain::Chain>
                });
            wrap
        }),
        store_faults: Some(faults.store.clone()),
        history: Some(history),
    }
}

/// The test kit's HTTP client, trusting `ca` when the network serves TLS.
fn test_client(ca: Option<&std::path::Path>) -> Result<reqwest::blocking::Client, TestnetError> {
    let fail = |e: String| TestnetError::Start(e);
    let mut builder = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| fail(e.to_string()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| fail(e.to_string()))?;
        builder = builder
            .add_root_certificate(cert)
            .tls_built_in_root_certs(false);
    }
    builder.build().map_err(|e| fail(e.to_string()))
}

/// A running test network.
pub struct TestNetwork {
    testnet: Option<Testnet>,
    config: TestnetConfig,
    engine: EngineFactory,
    model: String,
    chain: ChainChoice,
    wiring: Wiring,
    data_dir: PathBuf,
    owned_dir: bool,
    pub history: History,
    pub plan: FaultPlan,
    faults: Faults,
    http: reqwest::blocking::Client,
    restarts: usize,
    node_gateway: bool,
    tls: Option<(rustls::ServerConfig, PathBuf)>,
}

/// What a finished scenario found.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub checked: Checked,
    pub violations: Vec<String>,
    /// Scheduled faults applied, and link faults (drops, duplicates, delays, corruptions).
    pub scheduled_faults: usize,
    pub link_faults: u64,
    pub chain_calls_refused: u64,
    pub restarts: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {}: {} accepted, ends {:?}, {} scheduled faults, {} link faults, {} chain calls refused, {} restarts",
            self.seed,
            self.checked.accepted,
            self.checked.ended_by_state,
            self.scheduled_faults,
            self.link_faults,
            self.chain_calls_refused,
            self.restarts
        )?;
        for v in &self.violations {
            writeln!(f, "  VIOLATION: {v}")?;
        }
        Ok(())
    }
}

impl TestNetwork {
    fn boot(&mut self) -> Result<(), TestnetError> {
        let options = TestnetOptions {
            config: self.config.clone(),
            engine: self.engine.clone(),
            model: self.model.clone(),
            storage: Storage::Dir(self.data_dir.clone()),
            faults: HashMap::new(),
            http_workers: 2,
            chain: self.chain.clone(),
            embedding_model: None,
            wiring: self.wiring.clone(),
            node_listener: match self.node_gateway {
                true => Some(TcpListener::bind("127.0.0.1:0").map_err(TestnetError::Http)?),
                false => None,
            },
            tls: self.tls.as_ref().map(|(config, _)| config.clone()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").map_err(TestnetError::Http)?;
        let testnet = Testnet::start(options, listener)?;
        // Contracts deployed by the first start are where later starts attach.
        if let ChainChoice::Evm { deployment, .. } = &mut self.chain {
            if deployment.is_none() {
                *deployment = testnet.deployment;
            }
        }
        self.testnet = Some(testnet);
        self.wait_for_miners(Duration::from_secs(30));
        Ok(())
    }

    fn wait_for_miners(&self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.ready_miners() >= self.config.nodes.miners {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn testnet(&self) -> &Testnet {
        self.testnet.as_ref().expect("the network is running")
    }
    pub fn url(&self) -> String {
        self.testnet().url.clone()
    }
    /// Miners ready for tasks now.
    pub fn ready_miners(&self) -> usize {
        crate::commands::client::ready_miners(&self.get("/api/v1/miners").1)
    }
    /// The node WebSocket (`ws://…`), when the network serves one.
    pub fn node_url(&self) -> Option<String> {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        self.testnet().node_addr.map(|a| format!("{scheme}://{a}"))
    }
    /// Builds the engines its miners use, and the model name they register.
    pub fn engine(&self) -> (EngineFactory, String) {
        (self.engine.clone(), self.model.clone())
    }
    pub fn api_key(&self) -> String {
        self.testnet().api_key.clone()
    }
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let t = self.testnet();
        match self
            .http
            .get(format!("{}{path}", t.url))
            .bearer_auth(&t.api_key)
            .send()
        {
            Ok(r) => (r.status().as_u16(), r.json().unwrap_or(Value::Null)),
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    /// A text body (`/metrics`); empty when the request fails.
    pub fn get_text(&self, path: &str) -> String {
        let t = self.testnet();
        self.http
            .get(format!("{}{path}", t.url))
            .bearer_auth(&t.api_key)
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default()
    }

    /// POSTs JSON; status 0 when the request could not be made (the network restarting).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let t = self.testnet();
        match self
            .http
            .post(format!("{}{path}", t.url))
            .bearer_auth(&t.api_key)
            .json(body)
            .send()
        {
            Ok(r) => (r.status().as_u16(), r.json().unwrap_or(Value::Null)),
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    /// Creates a session with `redundant` miners a task and `deposit`; its id.
    pub fn create_session(&self, redundant: u32, deposit: u64) -> Result<u64, String> {
        let body = serde_json::json!({"name": "testkit", "redundant": redundant,
            "max_num_of_nodes": redundant.max(3), "deposit": deposit});
        let (status, v) = self.post("/api/v1/sessions", &body);
        match (status, v["session_id"].as_u64()) {
            (201, Some(id)) => Ok(id),
            _ => Err(format!("session create answered {status}: {v}")),
        }
    }

    /// Applies one fault now; faults that last end by themselves.
    pub fn apply(&mut self, fault: &Fault) -> Result<(), TestnetError> {
        self.faults.injected.fetch_add(1, Ordering::Relaxed);
        let miner_id = |i: usize| crate::testnet::miner_id(i % self.config.nodes.miners.max(1));
        let until = fault.duration();
        match fault {
            Fault::CrashMiner { miner } => {
                let miners = &self.testnet().actors.miners;
                if let Some(addr) = miners.get(miner % miners.len().max(1)) {
                    addr.do_send(Crash);
                }
            }
            Fault::PanicEngine { miner, times } => {
                if let Some(p) = self.faults.panics.get(&miner_id(*miner)) {
                    p.fetch_add(*times, Ordering::SeqCst);
                }
            }
            Fault::StallMiner { miner, .. } => self.faults.control(&miner_id(*miner)).stall(until),
            Fault::CorruptResults { miner, .. } => {
                let control = self.faults.control(&miner_id(*miner));
                control.set_corrupting(true);
                after(until, move || control.set_corrupting(false));
            }
            Fault::CutChain { .. } => {
                let cut = self.faults.chain_cut.clone();
                cut.set_cut(true);
                after(until, move || cut.set_cut(false));
            }
            Fault::FailStoreWrites { .. } => {
                let store = self.faults.store.clone();
                store.set_failing(true);
                after(until, move || store.set_failing(false));
            }
            Fault::SlowStore { delay, .. } => {
                let store = self.faults.store.clone();
                store.set_flush_delay(*delay);
                after(until, move || store.set_flush_delay(Duration::ZERO));
            }
            Fault::RestartNetwork => self.restart()?,
        }
        Ok(())
    }

    /// Stops the network and starts it again on the same data: every actor restarts, and
    /// what was live resumes from the store.
    pub fn restart(&mut self) -> Result<(), TestnetError> {
        if let Some(t) = self.testnet.take() {
            t.shutdown();
        }
        self.restarts += 1;
        self.boot()
    }

    /// Accepted tasks that have not ended yet (from the history). The order of the history
    /// does not matter: a live follower's task is acknowledged (and recorded as accepted) only
    /// once it is on disk, and on a slow disk a short task has ended by then.
    pub fn unfinished(&self) -> Vec<TaskKey> {
        let mut accepted: HashSet<TaskKey> = HashSet::new();
        let mut closed: HashSet<TaskKey> = HashSet::new();
        for op in self.history.operations() {
            match op {
                Operation::Accepted { key, .. } => {
                    accepted.insert(key);
                }
                Operation::Refused { key } | Operation::Ended { key, .. } => {
                    closed.insert(key);
                }
                _ => {}
            }
        }
        accepted.difference(&closed).copied().collect()
    }

    /// Waits (at most `limit`) for every accepted task to end and the chain's outbox to
    /// drain, lifts every fault, stops the network, and checks the invariants over the history
    /// and the store it left.
    pub fn finish(mut self, limit: Duration) -> Report {
        self.faults.chain_cut.set_cut(false);
        self.faults.store.set_failing(false);
        self.faults.store.set_flush_delay(Duration::ZERO);
        let start = Instant::now();
        while start.elapsed() < limit && !self.unfinished().is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let chain = self.testnet().actors.chain.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        while start.elapsed() < limit {
            let drained = runtime
                .block_on(chain.send(GetOutboxCounts))
                .is_ok_and(|c| c.pending == 0);
            if drained {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let testnet = self.testnet.take().expect("the network is running");
        let mut payees: Vec<String> = testnet.miner_ids.clone();
        payees.extend((0..self.config.nodes.validators).map(|i| format!("validator-{}", i + 1)));
        // Remote validators are paid under their id (their address).
        payees.extend(
            self.config
                .nodes
                .validators_allowed()
                .into_iter()
                .map(crate::nodes::protocol::node_id),
        );
        testnet.shutdown();
        let operations = self.history.operations();
        let (checked, mut violations) = match Store::open(&self.data_dir) {
            Ok(store) => match self.ledger(&store, &payees) {
                Ok(ledger) => check(&operations, &store, &ledger),
                Err(e) => (
                    Checked::default(),
                    vec![format!("the ledger cannot be read after the run: {e}")],
                ),
            },
            Err(e) => (
                Checked::default(),
                vec![format!("the store does not open after the run: {e}")],
            ),
        };
        if self.history.truncated() {
            violations.push("the history was truncated: the check is incomplete".into());
        }
        Report {
            seed: self.plan.seed,
            checked,
            violations,
            scheduled_faults: self.faults.injected.load(Ordering::Relaxed),
            link_faults: self.faults.counters.faults(),
            chain_calls_refused: self
                .faults
                .chain_cut
                .refused
                .load(std::sync::atomic::Ordering::Relaxed),
            restarts: self.restarts,
        }
    }
}

impl TestNetwork {
    /// The money side, from wherever it lives: the store, or the contracts on the EVM.
    fn ledger(&self, store: &Store, payees: &[String]) -> Result<Ledger, String> {
        match &self.chain {
            ChainChoice::Embedded => Ledger::from_store(store, payees).map_err(|e| e.to_string()),
            ChainChoice::Evm {
                rpc_url,
                private_key,
                deployment,
                ..
            } => {
                let deployment = (*deployment).ok_or("the contracts were never deployed")?;
                let keys = self
                    .testnet_miner_keys()
                    .map_err(|e| format!("the miners' keys: {e}"))?;
                let chain = crate::chain::evm::EvmChain::attach(rpc_url, private_key, deployment)
                    .map_err(|e| e.to_string())?
                    .with_node_keys(&keys);
                Ledger::from_chain(&chain, payees).map_err(|e| e.to_string())
            }
        }
    }

    fn testnet_miner_keys(
        &self,
    ) -> Result<Vec<crate::chain::node_key::NodeKey>, crate::chain::ChainError> {
        let dir = crate::testnet::node_keys_dir(&self.data_dir);
        (0..self.config.nodes.miners)
            .map(|i| crate::chain::node_key::NodeKey::load(&dir, &crate::testnet::miner_id(i)))
            .collect()
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        if let Some(t) = self.testnet.take() {
            t.shutdown();
        }
        if self.owned_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// Runs `f` after `wait`, on a thread of its own.
fn after(wait: Duration, f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        std::thread::sleep(wait);
        f();
    });
}
