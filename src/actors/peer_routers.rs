//! Routers that share a chain and its sessions. Each router tells its peers of every task it
//! accepts and ends (`POST /api/v1/peers/tasks`), and keeps what its peers tell it in the
//! store's `standby` tree. It asks each peer `/api/v1/ping` every 500 ms; a peer silent for
//! `peer_dead_after_ms` is taken as dead, and its accepted, unended tasks run here: for each,
//! the chain says whether it was settled (then it ended: nothing to do) and whether its hold
//! is there (else it is held here first), and the queue runs it again from Queued under its
//! own key, so its settlement releases the dead router's hold. Task ids never collide: each
//! router's start at `instance << 40`.

use super::chain_bridge::{ChainBridge, Hold, TaskOnChain};
use super::session_queue::{Adopt, SessionQueue};
use crate::config::PeerConfig;
use crate::store::Store;
use crate::task::{TaskKey, TaskRecord};
use actix::prelude::*;
use std::time::{Duration, Instant};

/// How often peers are asked whether they live.
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// Tell-peer requests in flight at once; beyond that the oldest news is dropped (a peer that
/// misses an `accepted` cannot run that task if this router dies: logged).
pub const MAX_IN_FLIGHT: usize = 1024;

/// What a router tells its peers about its own tasks.
#[derive(Message, Clone, Debug, serde::Serialize, serde::Deserialize)]
#[rtype(result = "()")]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerEvent {
    Accepted(Box<TaskRecord>),
    Ended(TaskKey),
}

/// What a peer told this router (from the API, which checked who it is and what it may say).
#[derive(Message)]
#[rtype(result = "Result<(), PeerError>")]
pub struct FromPeer(pub PeerEvent);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("this router keeps {0} peers' tasks, its limit (router.max_standby_tasks)")]
    Full(usize),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What a peer may tell of a task: only its own (ids from its instance's base), unended, with
/// deadlines and a hold this router would give such a task itself. A peer is trusted with its
/// own tasks and nothing else; what it sends is bounded before this router runs it.
pub fn check_peer_event(
    event: &PeerEvent,
    instance: u8,
    now_ms: u64,
    limits: &PeerLimits,
) -> Result<(), String> {
    let base = crate::config::task_id_base(instance);
    let own = |key: TaskKey| (base..base + crate::config::task_id_base(1)).contains(&key.task_id);
    let key = match event {
        PeerEvent::Ended(key) => *key,
        PeerEvent::Accepted(task) => task.key,
    };
    if !own(key) {
        return Err(format!(
            "task {key} is not this peer's (instance {instance}'s ids start at {base})"
        ));
    }
    let PeerEvent::Accepted(task) = event else {
        return Ok(());
    };
    if task.state.is_terminal() {
        return Err(format!("task {} has ended already", task.key));
    }
    const DAY_MS: u64 = 86_400_000;
    if task.deadline_ms > now_ms.saturating_add(DAY_MS) || task.precommit_timeout_ms > DAY_MS {
        return Err(format!(
            "task {}'s deadlines lie more than a day ahead",
            task.key
        ));
    }
    let nodes = 1..=crate::session::MAX_NODES_PER_SESSION;
    if !nodes.contains(&task.redundancy) || task.validators > *nodes.end() {
        return Err(format!(
            "task {} asks for {} miners and {} validators (1 to {} each)",
            task.key,
            task.redundancy,
            task.validators,
            nodes.end()
        ));
    }
    let max_tokens = task.request.max_tokens;
    if max_tokens == 0 || max_tokens > limits.max_context {
        return Err(format!(
            "task {}'s max_tokens {max_tokens} is not within 1 to {}",
            task.key, limits.max_context
        ));
    }
    let hold = (max_tokens as u64)
        .saturating_mul(task.redundancy as u64)
        .saturating_mul(limits.price_per_token);
    if task.hold > hold {
        return Err(format!(
            "task {} holds {}, more than such a task's {hold}",
            task.key, task.hold
        ));
    }
    Ok(())
}

/// What this router would give a task of its own (see [`check_peer_event`]).
#[derive(Clone, Copy, Debug)]
pub struct PeerLimits {
    pub max_context: usize,
    pub price_per_token: u64,
}

struct Peer {
    config: PeerConfig,
    last_heard: Instant,
    /// Its tasks were taken over (until it answers again).
    adopted: bool,
}

pub struct PeerRouters {
    peers: Vec<Peer>,
    /// The key this router presents to its peers (`router.peer_key`).
    key: String,
    /// Peers' tasks kept in the store, and the most it keeps.
    standby: usize,
    max_standby: usize,
    http: reqwest::Client,
    store: Store,
    queue: Addr<SessionQueue>,
    chain: Addr<ChainBridge>,
    dead_after: Duration,
    in_flight: usize,
}

impl PeerRouters {
    pub fn new(
        peers: Vec<PeerConfig>,
        key: String,
        max_standby: usize,
        store: Store,
        queue: Addr<SessionQueue>,
        chain: Addr<ChainBridge>,
        dead_after: Duration,
    ) -> Self {
        Self {
            standby: store.standby_count(),
            max_standby,
            peers: peers
                .into_iter()
                .map(|config| Peer {
                    config,
                    last_heard: Instant::now(),
                    adopted: false,
                })
                .collect(),
            key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("a default HTTP client builds"),
            store,
            queue,
            chain,
            dead_after,
            in_flight: 0,
        }
    }

    /// Takes over a dead peer's accepted, unended tasks.
    fn adopt(&mut self, instance: u8, ctx: &mut Context<Self>) {
        let base = crate::config::task_id_base(instance);
        let next = base + crate::config::task_id_base(1);
        let tasks = match self.store.standby_tasks() {
            Ok(tasks) => tasks,
            Err(e) => return tracing::error!(error = %e, "cannot read the peers' tasks"),
        };
        let theirs: Vec<TaskRecord> = tasks
            .into_iter()
            .filter(|t| (base..next).contains(&t.key.task_id))
            .collect();
        tracing::warn!(
            instance,
            tasks = theirs.len(),
            "a peer router is gone: taking over its tasks"
        );
        for task in theirs {
            let (queue, chain, store) =
                (self.queue.clone(), self.chain.clone(), self.store.clone());
            ctx.spawn(
                async move {
                    let key = task.key;
                    let on_chain = chain.send(TaskOnChain(key)).await;
                    match on_chain {
                        Ok(Ok((_, true))) => {
                            tracing::info!(task = %key, "the dead router's task was settled: it ended");
                            let _ = store.remove_standby(key);
                            return;
                        }
                        Ok(Ok((false, false))) => {
                            // Its hold never reached the chain: hold it here.
                            if let Ok(Err(e)) = chain.send(Hold { task: key, amount: task.hold }).await {
                                tracing::error!(task = %key, error = %e, "cannot hold for a dead router's task");
                                return;
                            }
                        }
                        Ok(Ok((true, false))) => {}
                        Ok(Err(e)) => {
                            tracing::error!(task = %key, error = %e, "the chain does not say where the dead router's task stands; it waits");
                            return;
                        }
                        Err(_) => return,
                    }
                    match queue.send(Adopt(Box::new(task))).await {
                        Ok(Ok(())) => {
                            let _ = store.remove_standby(key);
                        }
                        Ok(Err(e)) => tracing::error!(task = %key, error = %e, "cannot take over a task"),
                        Err(_) => {}
                    }
                }
                .into_actor(self),
            );
        }
    }
}

impl Actor for PeerRouters {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(PING_INTERVAL, |routers, ctx| {
            for (i, peer) in routers.peers.iter().enumerate() {
                let ping = routers
                    .http
                    .get(format!("{}/api/v1/ping", peer.config.url))
                    .bearer_auth(&routers.key)
                    .send();
                ctx.spawn(ping.into_actor(routers).map(move |answer, routers, _| {
                    if answer.is_ok_and(|r| r.status().is_success()) {
                        let peer = &mut routers.peers[i];
                        if peer.adopted {
                            tracing::info!(url = %peer.config.url, "a peer router answers again");
                        }
                        peer.last_heard = Instant::now();
                        peer.adopted = false;
                    }
                }));
            }
            let dead: Vec<u8> = routers
                .peers
                .iter_mut()
                .filter(|p| !p.adopted && p.last_heard.elapsed() > routers.dead_after)
                .map(|p| {
                    p.adopted = true;
                    p.config.instance
                })
                .collect();
            for instance in dead {
                routers.adopt(instance, ctx);
            }
        });
    }
}

impl Handler<PeerEvent> for PeerRouters {
    type Result = ();
    fn handle(&mut self, event: PeerEvent, ctx: &mut Context<Self>) {
        for peer in &self.peers {
            if self.in_flight >= MAX_IN_FLIGHT {
                tracing::warn!(url = %peer.config.url, "too many messages to peer routers in flight: one dropped");
                continue;
            }
            self.in_flight += 1;
            let sent = self
                .http
                .post(format!("{}/api/v1/peers/tasks", peer.config.url))
                .bearer_auth(&self.key)
                .json(&event)
                .send();
            ctx.spawn(sent.into_actor(self).map(|_, routers, _| {
                routers.in_flight -= 1;
            }));
        }
    }
}

impl Handler<FromPeer> for PeerRouters {
    type Result = Result<(), PeerError>;
    fn handle(&mut self, m: FromPeer, _: &mut Context<Self>) -> Self::Result {
        match m.0 {
            PeerEvent::Accepted(task) => {
                if self.standby >= self.max_standby {
                    // Counted again: adopted tasks left the store meanwhile.
                    self.standby = self.store.standby_count();
                    if self.standby >= self.max_standby {
                        return Err(PeerError::Full(self.max_standby));
                    }
                }
                if self.store.put_standby(&task)? {
                    self.standby += 1;
                }
            }
            PeerEvent::Ended(key) => {
                if self.store.remove_standby(key)? {
                    self.standby = self.standby.saturating_sub(1);
                }
            }
        }
        Ok(())
    }
}
