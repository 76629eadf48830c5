//! A miner node: wraps an [`InferenceEngine`] that runs on a thread of its own (inference is
//! CPU/GPU-bound and must never block an arbiter), and speaks the task protocol: ack at once,
//! precommit the keccak256 of its result, reveal the result when asked.
//!
//! Supervision: an engine that panics takes its thread down; the thread reports it, the actor
//! fails its in-flight tasks (the queue gives them to other miners), stops, and its
//! `Supervisor` restarts it with a fresh engine after a bounded back-off.

use super::messages::{MinerReport, ReportKind, ToMiner, Wrap};
use super::node_pool::{GoOffline, Heartbeat, NodePool, Register};
use super::report_signing;
use super::router_link::RouterLink;
use crate::chain::node_key::NodeKey;
use crate::models::engine::{
    CancelToken, EngineError, FinishReason, GenerateRequest, Generation, InferenceEngine,
    TokenEvent,
};
use crate::models::sampling::SamplingParams;
use crate::task::{TaskKey, TaskResult};
use actix::prelude::*;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

/// Builds a miner's engine (called on the engine thread, again after every restart).
pub type EngineFactory =
    Arc<dyn Fn(&str) -> Result<Box<dyn InferenceEngine>, EngineError> + Send + Sync>;

/// Longest wait before an engine is restarted (the back-off doubles from 100 ms up to this).
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);
/// Engine failures in a row (without it becoming ready in between) after which the miner stops
/// trying: a model that cannot load will not load on the ninth attempt either.
pub const MAX_FAILURES_IN_A_ROW: u32 = 8;

/// Protocol-level misbehaviour, for fault-injection tests. All off for a real miner.
#[derive(Clone, Debug, Default)]
pub struct MinerFaults {
    /// Never answer assignments (misses the ack deadline).
    pub ignore_assignments: bool,
    /// Reveal a result other than the one precommitted.
    pub wrong_reveal: bool,
    /// Never reveal (misses the commit deadline).
    pub withhold_reveal: bool,
    /// Send every report twice.
    pub duplicate_reports: bool,
    /// Send no heartbeats (the pool should mark it offline).
    pub no_heartbeats: bool,
    /// Acknowledge assignments, then do nothing (a stalled or copying miner).
    pub stall_after_ack: bool,
    /// Produce a dishonest result (validation tests).
    pub byzantine: Option<Byzantine>,
    /// Sign reports with a key other than the registered one (a forger).
    pub forge_signatures: bool,
}

/// Ways a miner's result can be dishonest while looking like a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Byzantine {
    /// Token ids drawn at random (seeded by the task's seed), with their text.
    RandomText,
    /// A real generation with another seed.
    OtherSeed,
    /// A real generation with other sampling (greedy for a sampled task, temperature 1 for a
    /// greedy one).
    OtherSetting,
    /// The honest output cut in half, claimed to have stopped there.
    Truncated,
}

impl Byzantine {
    pub const ALL: [Byzantine; 4] = [
        Byzantine::RandomText,
        Byzantine::OtherSeed,
        Byzantine::OtherSetting,
        Byzantine::Truncated,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Byzantine::RandomText => "random text",
            Byzantine::OtherSeed => "another seed",
            Byzantine::OtherSetting => "another sampling setting",
            Byzantine::Truncated => "truncated",
        }
    }
}

/// Runs `request` as a miner with `fault` would: the generation it reports.
fn dishonest_generate(
    engine: &mut dyn InferenceEngine,
    fault: Byzantine,
    request: &GenerateRequest,
    cancel: &CancelToken,
    on_token: &mut dyn FnMut(&TokenEvent),
) -> Result<Generation, EngineError> {
    use rand::{Rng, SeedableRng};
    let mut request = request.clone();
    match fault {
        Byzantine::OtherSeed => request.params.seed ^= 0x5eed,
        Byzantine::OtherSetting => {
            request.params = if request.params.temperature > 0.0 {
                SamplingParams::greedy()
            } else {
                SamplingParams {
                    temperature: 1.0,
                    seed: request.params.seed,
                    ..SamplingParams::default()
                }
            }
        }
        Byzantine::RandomText => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(request.params.seed);
            let vocab = engine.info().vocab_size as u32;
            let n = request.max_tokens.clamp(1, 16);
            let token_ids: Vec<u32> = (0..n).map(|_| rng.gen_range(0..vocab)).collect();
            let text = engine.detokenize(&token_ids);
            on_token(&TokenEvent {
                index: 0,
                id: token_ids[0],
                text: &text,
            });
            return Ok(Generation {
                token_ids,
                text,
                finish_reason: FinishReason::Length,
                prompt_tokens: engine.tokenize(&request.prompt)?.len(),
                prefill_ms: 0.0,
                decode_ms: 0.0,
                prefill_tok_s: 0.0,
                decode_tok_s: 0.0,
            });
        }
        Byzantine::Truncated => {
            let mut g = engine.generate(&request, cancel, on_token)?;
            g.token_ids.truncate(g.token_ids.len() / 2);
            g.text = engine.detokenize(&g.token_ids);
            g.finish_reason = FinishReason::Stop;
            return Ok(g);
        }
    }
    engine.generate(&request, cancel, on_token)
}

#[derive(Clone)]
pub struct MinerSpec {
    pub id: String,
    /// The network's name for the model it serves (what sessions ask for).
    pub model: String,
    pub max_tasks: usize,
    pub heartbeat_interval: Duration,
    pub faults: MinerFaults,
    /// What stands between the queue and this miner (fault-injection tests); none for a real
    /// miner.
    pub inbound: Option<Wrap<ToMiner>>,
    /// The node key its reports are signed with (and its address registered with).
    pub key: NodeKey,
}

struct Job {
    key: TaskKey,
    request: GenerateRequest,
    cancel: CancelToken,
    stream_tokens: bool,
}

struct Held {
    cancel: CancelToken,
    result: Option<TaskResult>,
    nonce: u64,
}

/// Where a miner announces itself and heartbeats: the node pool of a router in the same
/// process, or the link to a remote router (which carries the same messages over the wire).
#[derive(Clone)]
pub struct NodeUplink {
    pub register: Recipient<Register>,
    pub heartbeat: Recipient<Heartbeat>,
    pub offline: Recipient<GoOffline>,
}

impl NodeUplink {
    pub fn pool(pool: &Addr<NodePool>) -> Self {
        Self {
            register: pool.clone().recipient(),
            heartbeat: pool.clone().recipient(),
            offline: pool.clone().recipient(),
        }
    }

    pub fn link(link: &Addr<RouterLink>) -> Self {
        Self {
            register: link.clone().recipient(),
            heartbeat: link.clone().recipient(),
            offline: link.clone().recipient(),
        }
    }
}

pub struct Miner {
    spec: MinerSpec,
    factory: EngineFactory,
    queue: Recipient<MinerReport>,
    pool: NodeUplink,
    jobs: Option<SyncSender<Job>>,
    held: HashMap<TaskKey, Held>,
    /// Bumped on every restart, so events from an old engine thread are ignored.
    generation: u64,
    restarts: u32,
    /// Crashes since the engine was last ready; drives the back-off and the give-up.
    failures_in_a_row: u32,
    ready: bool,
}

impl Miner {
    pub fn new(
        spec: MinerSpec,
        factory: EngineFactory,
        queue: Recipient<MinerReport>,
        pool: NodeUplink,
    ) -> Self {
        Self {
            spec,
            factory,
            queue,
            pool,
            jobs: None,
            held: HashMap::new(),
            generation: 0,
            restarts: 0,
            failures_in_a_row: 0,
            ready: false,
        }
    }

    /// Sends a signed report about the assignment `(key, nonce)`.
    fn report(&self, key: TaskKey, nonce: u64, kind: ReportKind) {
        let times = if self.spec.faults.duplicate_reports {
            2
        } else {
            1
        };
        let mut report = MinerReport {
            key,
            miner: self.spec.id.clone(),
            nonce,
            kind,
            signature: None,
        };
        if !report_signing::needs_signature(&report.kind) {
            // Streamed tokens are a preview, not a claim: unsigned (see report_signing).
        } else if self.spec.faults.forge_signatures {
            report_signing::sign(&mut report, &NodeKey::random(&self.spec.id));
        } else {
            report_signing::sign(&mut report, &self.spec.key);
        }
        for _ in 0..times {
            self.queue.do_send(report.clone());
        }
    }

    /// Reports about a task it holds (nothing when it no longer does).
    fn report_held(&self, key: TaskKey, kind: ReportKind) {
        if let Some(held) = self.held.get(&key) {
            self.report(key, held.nonce, kind);
        }
    }

    fn spawn_engine(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = sync_channel::<Job>(self.spec.max_tasks);
        self.jobs = Some(tx);
        let addr = ctx.address();
        let factory = self.factory.clone();
        let id = self.spec.id.clone();
        let generation = self.generation;
        let byzantine = self.spec.faults.byzantine;
        let spawned = std::thread::Builder::new()
            .name(format!("engine-{id}"))
            .spawn(move || engine_thread(id, factory, rx, addr, generation, byzantine));
        if let Err(e) = spawned {
            tracing::error!(miner = %self.spec.id, error = %e, "cannot start the engine thread");
            ctx.stop();
        }
    }
}

/// Fault injection: the miner stops at once, silently, as if its process had died (the queue
/// finds out from missed deadlines and gives its tasks to other miners); its supervisor
/// restarts it with a fresh engine.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

impl Handler<Crash> for Miner {
    type Result = ();
    fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
        tracing::warn!(miner = %self.spec.id, "crashed on purpose (fault injection)");
        ctx.stop();
    }
}

impl Actor for Miner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.failures_in_a_row == 0 {
            self.spawn_engine(ctx);
        } else if self.failures_in_a_row > MAX_FAILURES_IN_A_ROW {
            tracing::error!(miner = %self.spec.id, failures = self.failures_in_a_row, "the engine keeps failing: this miner gives up and stays offline");
            return;
        } else {
            let backoff = Duration::from_millis(100u64 << self.failures_in_a_row.min(6))
                .min(MAX_RESTART_BACKOFF);
            tracing::warn!(miner = %self.spec.id, restarts = self.restarts, ?backoff, "restarting the engine");
            ctx.run_later(backoff, |miner, ctx| miner.spawn_engine(ctx));
        }
        ctx.run_interval(self.spec.heartbeat_interval, |miner, _| {
            if miner.ready && !miner.spec.faults.no_heartbeats {
                miner.pool.heartbeat.do_send(Heartbeat {
                    id: miner.spec.id.clone(),
                });
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.pool.offline.do_send(GoOffline {
            id: self.spec.id.clone(),
        });
    }
}

impl Supervised for Miner {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // Dropping the sender ends the old engine thread once its current job returns.
        self.jobs = None;
        for (_, held) in self.held.drain() {
            held.cancel.cancel();
        }
        self.ready = false;
        self.generation += 1;
        self.restarts += 1;
    }
}

impl Handler<ToMiner> for Miner {
    type Result = ();
    fn handle(&mut self, m: ToMiner, _: &mut Context<Self>) {
        match m {
            ToMiner::Assign {
                key,
                nonce,
                request,
                stream_tokens,
            } => {
                if self.spec.faults.ignore_assignments {
                    return;
                }
                if self.spec.faults.stall_after_ack {
                    self.report(key, nonce, ReportKind::Ack);
                    return;
                }
                if !self.ready || self.held.contains_key(&key) {
                    let why = if self.ready {
                        "already has this task"
                    } else {
                        "engine not ready"
                    };
                    self.report(key, nonce, ReportKind::Failed { error: why.into() });
                    return;
                }
                let cancel = CancelToken::new();
                let job = Job {
                    key,
                    request,
                    cancel: cancel.clone(),
                    stream_tokens,
                };
                let sent = match &self.jobs {
                    Some(jobs) => jobs.try_send(job),
                    None => Err(TrySendError::Disconnected(job)),
                };
                match sent {
                    Ok(()) => {
                        self.held.insert(
                            key,
                            Held {
                                cancel,
                                result: None,
                                nonce,
                            },
                        );
                        self.report(key, nonce, ReportKind::Ack);
                    }
                    Err(TrySendError::Full(_)) => self.report(
                        key,
                        nonce,
                        ReportKind::Failed {
                            error: "miner is at capacity".into(),
                        },
                    ),
                    Err(TrySendError::Disconnected(_)) => self.report(
                        key,
                        nonce,
                        ReportKind::Failed {
                            error: "engine is down".into(),
                        },
                    ),
                }
            }
            ToMiner::Reveal { key } => {
                if self.spec.faults.withhold_reveal {
                    return;
                }
                let Some((mut result, nonce)) = self
                    .held
                    .get(&key)
                    .and_then(|h| Some((h.result.clone()?, h.nonce)))
                else {
                    return;
                };
                self.held.remove(&key);
                if self.spec.faults.wrong_reveal {
                    result.text.push_str(" (altered)");
                }
                self.report(key, nonce, ReportKind::Commit { result });
            }
            ToMiner::Cancel { key } => {
                if let Some(held) = self.held.remove(&key) {
                    held.cancel.cancel();
                }
            }
        }
    }
}

/// What the engine thread tells its actor.
#[derive(Message)]
#[rtype(result = "()")]
enum EngineEvent {
    Ready {
        generation: u64,
        model: String,
        backend: String,
    },
    Token {
        generation: u64,
        key: TaskKey,
        index: usize,
        text: String,
    },
    Done {
        generation: u64,
        key: TaskKey,
        /// The error, and whether it is the request's fault (see `EngineError::is_request_error`).
        result: Result<TaskResult, (String, bool)>,
    },
    Crashed {
        generation: u64,
        message: String,
    },
}

impl EngineEvent {
    fn generation(&self) -> u64 {
        match self {
            EngineEvent::Ready { generation, .. }
            | EngineEvent::Token { generation, .. }
            | EngineEvent::Done { generation, .. }
            | EngineEvent::Crashed { generation, .. } => *generation,
        }
    }
}

impl Handler<EngineEvent> for Miner {
    type Result = ();
    fn handle(&mut self, event: EngineEvent, ctx: &mut Context<Self>) {
        if event.generation() != self.generation {
            return;
        }
        match event {
            EngineEvent::Ready { model, backend, .. } => {
                tracing::info!(miner = %self.spec.id, engine = %model, %backend, "engine ready");
                self.ready = true;
                self.failures_in_a_row = 0;
                let own: Recipient<ToMiner> = ctx.address().recipient();
                let addr = match &self.spec.inbound {
                    Some(wrap) => wrap(&self.spec.id, own),
                    None => own,
                };
                self.pool.register.do_send(Register {
                    address: self.spec.key.address(),
                    id: self.spec.id.clone(),
                    model: self.spec.model.clone(),
                    backend,
                    max_load: self.spec.max_tasks,
                    addr,
                });
            }
            EngineEvent::Token {
                key, index, text, ..
            } => {
                self.report_held(key, ReportKind::Token { index, text });
            }
            EngineEvent::Done { key, result, .. } => {
                let Some(held) = self.held.get_mut(&key) else {
                    return; // cancelled meanwhile
                };
                let nonce = held.nonce;
                match result {
                    Ok(result) => {
                        let hash = result.commitment_hex(&self.spec.id);
                        held.result = Some(result);
                        self.report(key, nonce, ReportKind::Precommit { hash });
                    }
                    Err((error, request_error)) => {
                        self.held.remove(&key);
                        let kind = if request_error {
                            ReportKind::Refused { error }
                        } else {
                            ReportKind::Failed { error }
                        };
                        self.report(key, nonce, kind);
                    }
                }
            }
            EngineEvent::Crashed { message, .. } => {
                tracing::error!(miner = %self.spec.id, %message, "engine crashed");
                self.failures_in_a_row += 1;
                let held: Vec<(TaskKey, u64)> =
                    self.held.iter().map(|(k, h)| (*k, h.nonce)).collect();
                for (key, nonce) in held {
                    self.report(
                        key,
                        nonce,
                        ReportKind::Failed {
                            error: format!("engine crashed: {message}"),
                        },
                    );
                }
                self.pool.offline.do_send(GoOffline {
                    id: self.spec.id.clone(),
                });
                ctx.stop(); // the Supervisor restarts us
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

fn engine_thread(
    id: String,
    factory: EngineFactory,
    jobs: std::sync::mpsc::Receiver<Job>,
    addr: Addr<Miner>,
    generation: u64,
    byzantine: Option<Byzantine>,
) {
    let mut engine = match catch_unwind(AssertUnwindSafe(|| factory(&id))) {
        Ok(Ok(engine)) => engine,
        Ok(Err(e)) => {
            addr.do_send(EngineEvent::Crashed {
                generation,
                message: format!("cannot load the engine: {e}"),
            });
            return;
        }
        Err(p) => {
            addr.do_send(EngineEvent::Crashed {
                generation,
                message: panic_message(p),
            });
            return;
        }
    };
    let info = engine.info();
    addr.do_send(EngineEvent::Ready {
        generation,
        model: info.model,
        backend: format!("{:?}", info.backend).to_lowercase(),
    });
    while let Ok(job) = jobs.recv() {
        if job.cancel.is_cancelled() {
            continue;
        }
        let key = job.key;
        let stream = job.stream_tokens;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut on_token = |t: &TokenEvent| {
                if stream && !t.text.is_empty() {
                    addr.do_send(EngineEvent::Token {
                        generation,
                        key,
                        index: t.index,
                        text: t.text.to_string(),
                    });
                }
            };
            match byzantine {
                Some(fault) => dishonest_generate(
                    engine.as_mut(),
                    fault,
                    &job.request,
                    &job.cancel,
                    &mut on_token,
                ),
                None => engine.generate(&job.request, &job.cancel, &mut on_token),
            }
        }));
        match outcome {
            Ok(Ok(g)) => addr.do_send(EngineEvent::Done {
                generation,
                key,
                result: Ok(TaskResult {
                    text: g.text,
                    token_ids: g.token_ids,
                    finish_reason: g.finish_reason,
                    prompt_tokens: g.prompt_tokens,
                }),
            }),
            Ok(Err(e)) => addr.do_send(EngineEvent::Done {
                generation,
                key,
                result: Err((e.to_string(), e.is_request_error())),
            }),
            Err(p) => {
                // The engine may be half-updated: give it up and let the supervisor restart us.
                addr.do_send(EngineEvent::Crashed {
                    generation,
                    message: panic_message(p),
                });
                return;
            }
        }
    }
}
