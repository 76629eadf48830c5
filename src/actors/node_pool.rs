//! The node pool: which miners exist, what they serve, whether they are alive, how loaded and
//! how reputable they are (`crate::reputation`), and which sessions hold them. Selection takes
//! online, unsuspended miners of the right model, least loaded first; among equally loaded ones
//! the order is drawn at random with weights proportional to reputation (seeded).
//!
//! Node states: **validating** (new, or released: it must pass `probes_required` network
//! tasks, run by the queue, before it joins the pool), **ephemeral** (in the shared pool),
//! **reserved** (held by a hybrid session for its reserve period, still shared), **dedicated**
//! (held exclusively by a dedicated session; a node pinned to a session skips validation and
//! the pool), **released** (its reservation ended; it revalidates and rejoins after a
//! cool-down), **suspended** (its reputation fell too low), **offline** (silent past its
//! heartbeat deadline, or restarting).

use super::chain_bridge::ReportOutcomes;
use super::messages::{Probe, ToMiner};
use crate::chain::NodeOutcome;
use crate::reputation::{Change, Counters, NodeReputation, Outcome, ReputationRules};
use crate::session::SessionMode;
use crate::task::Placement;
use actix::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// In the shared pool, available to any session.
    Ephemeral,
    /// Held by a hybrid session, which prefers it; still shared.
    Reserved,
    /// Held exclusively by a dedicated session.
    Dedicated,
    /// Its reservation ended; back in the pool after a cool-down.
    Released,
    /// Silent past its heartbeat deadline, or restarting.
    Offline,
    /// Its reputation fell too low: not selected for a while.
    Suspended,
    /// New or released: passing network tasks before it joins the pool.
    Validating,
}

/// Longest wait before a failed probe is tried again (doubling from a second).
pub const MAX_PROBE_BACKOFF: Duration = Duration::from_secs(30);
/// A probe not answered in this long is given up and tried again.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(120);

impl Node {
    /// Past its network tasks and not suspended: a member of the pool.
    fn in_pool(&self, now_ms: u64) -> bool {
        self.validated && !self.reputation.suspended(now_ms)
    }
}

struct Node {
    addr: Recipient<ToMiner>,
    /// Its key's address; an id stays bound to the key it first registered with.
    address: ethers::types::Address,
    model: String,
    backend: String,
    load: usize,
    max_load: usize,
    reputation: NodeReputation,
    online: bool,
    dedicated: bool,
    reserved_for: Option<u64>,
    reserved_until: Option<Instant>,
    released_until: Option<Instant>,
    last_heartbeat: Instant,
    registered_at_ms: u64,
    tasks_done: u64,
    /// Passed its network tasks since it registered or was released.
    validated: bool,
    /// A probe is running since then.
    probing: Option<Instant>,
    probes_passed: u32,
    probes_failed: u32,
    next_probe_at: Instant,
    /// Pinned to a dedicated session: never in the pool.
    pinned: Option<u64>,
    /// Decode speed the router observed (tokens/s of its accepted results, a moving average);
    /// none until its first accepted result.
    speed: Option<f64>,
}

/// How miners are picked for a task among those free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectionPolicy {
    /// The soonest expected to finish: (load + 1) / observed speed (a miner not measured yet
    /// counts as the median of those measured); ties drawn at random weighted by reputation.
    #[default]
    Speed,
    /// Least loaded first, ties drawn at random weighted by reputation (speed ignored).
    LeastLoad,
    /// In turn, whatever their load or speed (the baseline `bench balance` compares with).
    RoundRobin,
}

/// The router saw a miner produce an accepted result at this speed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ObservedSpeed {
    pub miner: String,
    pub tokens_per_second: f64,
}

/// A node as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub id: String,
    pub model: String,
    pub backend: String,
    pub state: NodeState,
    /// The session holding it (reserved or dedicated).
    pub reserved_for: Option<u64>,
    pub load: usize,
    /// The decayed score, 0..=1000.
    pub reputation: i64,
    /// Cognitive level, 0..=10.
    pub level: u8,
    /// Successes among its last task outcomes (0..=1).
    pub success_rate: f64,
    pub counters: Counters,
    /// Not selected until then (ms since the epoch).
    pub suspended_until_ms: Option<u64>,
    pub registered_at_ms: u64,
    pub tasks_done: u64,
    /// Network tasks passed since it registered or was released, and failed in all.
    pub probes_passed: u32,
    pub probes_failed: u32,
    /// The dedicated session it is pinned to.
    pub pinned_to: Option<u64>,
    /// Decode speed observed by the router (tokens/s), once it has an accepted result.
    pub tokens_per_second: Option<f64>,
}

pub struct NodePool {
    nodes: BTreeMap<String, Node>,
    offline_after: Duration,
    /// An offline node whose last heartbeat is older than this is forgotten.
    forget_offline_after: Duration,
    rng: ChaCha8Rng,
    rules: ReputationRules,
    probes_required: u32,
    prober: Option<Recipient<Probe>>,
    /// Where outcomes go on chain, and those waiting (sent every tick, or at once when
    /// [`MAX_PENDING_REPORTS`] are waiting).
    chain: Option<Recipient<ReportOutcomes>>,
    reports: Vec<NodeOutcome>,
    policy: SelectionPolicy,
    /// The round robin's position.
    turn: usize,
    /// Keys that may log in as validators (`AdmitValidators`).
    validators_allowed: std::collections::HashSet<ethers::types::Address>,
}

pub const MAX_PENDING_REPORTS: usize = 10_000;
/// How long an offline node is remembered unless configured (`nodes.forget_offline_after_ms`).
pub const DEFAULT_FORGET_OFFLINE_AFTER: Duration = Duration::from_secs(24 * 3600);

impl NodePool {
    pub fn new(
        offline_after: Duration,
        selection_seed: u64,
        rules: ReputationRules,
        probes_required: u32,
    ) -> Self {
        Self {
            nodes: BTreeMap::new(),
            offline_after,
            forget_offline_after: DEFAULT_FORGET_OFFLINE_AFTER,
            rng: ChaCha8Rng::seed_from_u64(selection_seed),
            rules,
            probes_required,
            prober: None,
            chain: None,
            reports: Vec::new(),
            policy: SelectionPolicy::default(),
            turn: 0,
            validators_allowed: Default::default(),
        }
    }

    /// Offline nodes are forgotten once their last heartbeat is this old.
    pub fn with_forget_offline_after(mut self, after: Duration) -> Self {
        self.forget_offline_after = after;
        self
    }

    /// Forgets nodes offline for longer than `forget_offline_after` (since their last
    /// heartbeat), so ids that come and go do not pile up. A node still held by a session
    /// (pinned or reserved) or still suspended is kept: forgetting must not free it early.
    fn forget_offline(&mut self, now: Instant) {
        let (after, now_ms) = (self.forget_offline_after, crate::task::now_ms());
        self.nodes.retain(|id, n| {
            let forget = !n.online
                && n.pinned.is_none()
                && n.reserved_for.is_none()
                && !n.reputation.suspended(now_ms)
                && now.saturating_duration_since(n.last_heartbeat) > after;
            if forget {
                tracing::info!(miner = %id, "offline too long: forgotten");
            }
            !forget
        });
    }

    pub fn with_policy(mut self, policy: SelectionPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Outcomes also go on chain, through `chain`, in batches.
    pub fn with_chain_reports(mut self, chain: Recipient<ReportOutcomes>) -> Self {
        self.chain = Some(chain);
        self
    }

    fn send_reports(&mut self) {
        if let (Some(chain), false) = (&self.chain, self.reports.is_empty()) {
            chain.do_send(ReportOutcomes(std::mem::take(&mut self.reports)));
        }
    }

    /// Starts the network tasks that are due.
    fn probe_due(&mut self) {
        let Some(prober) = self.prober.clone() else {
            return;
        };
        let now = Instant::now();
        for (id, n) in self.nodes.iter_mut() {
            if n.probing
                .is_some_and(|t| now.duration_since(t) > PROBE_TIMEOUT)
            {
                tracing::warn!(miner = %id, "a network task went unanswered: trying again");
                n.probing = None;
            }
            if n.online
                && !n.validated
                && n.pinned.is_none()
                && n.probing.is_none()
                && now >= n.next_probe_at
            {
                n.probing = Some(now);
                prober.do_send(Probe {
                    miner: id.clone(),
                    model: n.model.clone(),
                });
            }
        }
    }

    /// `ids` in the order they should be picked, by the pool's policy. Ties (and the
    /// least-load order) are drawn at random with weights proportional to reputation
    /// (Efraimidis-Spirakis keys, u^(1/w)).
    fn order(&mut self, ids: Vec<String>) -> Vec<String> {
        if self.policy == SelectionPolicy::RoundRobin {
            if ids.is_empty() {
                return ids;
            }
            self.turn = self.turn.wrapping_add(1);
            let start = self.turn % ids.len();
            return ids[start..].iter().chain(&ids[..start]).cloned().collect();
        }
        let mut measured: Vec<f64> = self.nodes.values().filter_map(|n| n.speed).collect();
        measured.sort_by(f64::total_cmp);
        let typical = measured.get(measured.len() / 2).copied().unwrap_or(1.0);
        let mut keyed: Vec<(f64, f64, String)> = ids
            .into_iter()
            .map(|id| {
                let n = &self.nodes[&id];
                let weight = (n.reputation.score).max(0.001);
                let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
                let cost = match self.policy {
                    SelectionPolicy::Speed => {
                        (n.load + 1) as f64 / n.speed.unwrap_or(typical).max(1e-3)
                    }
                    _ => n.load as f64,
                };
                (cost, u.powf(1.0 / weight), id)
            })
            .collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        keyed.into_iter().map(|(_, _, id)| id).collect()
    }

    fn state_of(node: &Node) -> NodeState {
        if !node.online {
            NodeState::Offline
        } else if node.pinned.is_some() {
            NodeState::Dedicated
        } else if node.reputation.suspended(crate::task::now_ms()) {
            NodeState::Suspended
        } else if !node.validated {
            NodeState::Validating
        } else if node.released_until.is_some_and(|t| t > Instant::now()) {
            NodeState::Released
        } else if node.reserved_for.is_some() && node.dedicated {
            NodeState::Dedicated
        } else if node.reserved_for.is_some() {
            NodeState::Reserved
        } else {
            NodeState::Ephemeral
        }
    }

    /// A hybrid or dedicated session without miners reserves up to `max_nodes` free ones.
    fn ensure_reservation(&mut self, placement: &Placement, model: &str) {
        if placement.mode == SessionMode::Ephemeral
            || self
                .nodes
                .values()
                .any(|n| n.reserved_for == Some(placement.session_id))
        {
            return;
        }
        let now = Instant::now();
        let now_ms = crate::task::now_ms();
        let free: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                n.online && n.in_pool(now_ms) && n.model == model && n.reserved_for.is_none()
            })
            .filter(|(_, n)| n.released_until.is_none_or(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        let free = self.order(free);
        // Sessions bound the period (`MAX_RESERVE_PERIOD_S`); a session stored before that
        // bound existed must still not overflow the clock: far enough is forever.
        let until = now
            .checked_add(Duration::from_secs(placement.reserve_period_s))
            .unwrap_or(now + Duration::from_secs(crate::session::MAX_RESERVE_PERIOD_S));
        let dedicated = placement.mode == SessionMode::Dedicated;
        for id in free.into_iter().take(placement.max_nodes as usize) {
            tracing::info!(miner = %id, session = placement.session_id, dedicated, "miner reserved");
            let node = self.nodes.get_mut(&id).expect("listed above");
            node.reserved_for = Some(placement.session_id);
            node.reserved_until = Some(until);
            node.dedicated = dedicated;
        }
    }
}

impl Actor for NodePool {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = (self.offline_after / 4).max(Duration::from_millis(10));
        ctx.run_interval(every, |pool, _| {
            let now = Instant::now();
            let cooldown = pool.offline_after;
            for (id, node) in pool.nodes.iter_mut() {
                if node.online && now.duration_since(node.last_heartbeat) > pool.offline_after {
                    tracing::warn!(miner = %id, "no heartbeat: marked offline");
                    node.online = false;
                }
                if node.reserved_until.is_some_and(|t| t <= now) {
                    tracing::info!(miner = %id, session = ?node.reserved_for, "reservation ended: miner released; it revalidates");
                    node.reserved_for = None;
                    node.reserved_until = None;
                    node.pinned = None;
                    node.dedicated = false;
                    node.released_until = Some(now + cooldown);
                    if pool.probes_required > 0 {
                        node.validated = false;
                        node.probes_passed = 0;
                    }
                }
            }
            pool.forget_offline(now);
            pool.probe_due();
            pool.send_reports();
        });
    }
}

/// A miner whose engine is loaded joins (or rejoins) the pool.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub id: String,
    /// The node key's address: its reports must be signed by it.
    pub address: ethers::types::Address,
    pub model: String,
    pub backend: String,
    pub max_load: usize,
    pub addr: Recipient<ToMiner>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    pub id: String,
}

/// A miner goes away for now (its engine crashed and it is restarting, or it shuts down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct GoOffline {
    pub id: String,
}

/// Picks up to `count` miners for `model` and the session's placement, none of `exclude`, and
/// counts them as loaded.
#[derive(Message)]
#[rtype(result = "Selection")]
pub struct SelectMiners {
    pub model: String,
    pub placement: Placement,
    pub count: usize,
    pub exclude: Vec<String>,
}

pub struct Selection {
    /// Each chosen miner's id, recipient and registered address.
    pub miners: Vec<(String, Recipient<ToMiner>, ethers::types::Address)>,
    /// Online miners of the model outside `exclude`, busy or not: 0 means waiting is pointless.
    pub eligible: usize,
}

/// These miners are done with a task (however it ended).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    pub miners: Vec<String>,
}

/// What a miner did, for its reputation (and, in batches, its record on chain).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordOutcome {
    pub miner: String,
    pub outcome: Outcome,
    /// Tokens of its accepted result.
    pub tokens: u64,
}

#[derive(Message)]
#[rtype(result = "Vec<NodeView>")]
pub struct ListNodes;

/// The fastest decode speed observed among the nodes (tokens/s), if any was measured.
#[derive(Message)]
#[rtype(result = "Option<f64>")]
pub struct FastestSpeed;

impl Handler<FastestSpeed> for NodePool {
    type Result = Option<f64>;
    fn handle(&mut self, _: FastestSpeed, _: &mut Context<Self>) -> Option<f64> {
        self.nodes
            .values()
            .filter_map(|n| n.speed)
            .filter(|s| s.is_finite() && *s > 0.0)
            .reduce(f64::max)
    }
}

impl Handler<Register> for NodePool {
    type Result = ();
    fn handle(&mut self, m: Register, _: &mut Context<Self>) {
        tracing::info!(miner = %m.id, model = %m.model, backend = %m.backend, "miner registered");
        let now = Instant::now();
        match self.nodes.get_mut(&m.id) {
            Some(node) if node.address != m.address => {
                tracing::warn!(miner = %m.id, registered = ?node.address, claimed = ?m.address,
                    "a registration under a known id with another key: refused");
            }
            Some(node) => {
                // A restart: keep reputation and counters, take the new address.
                node.addr = m.addr;
                node.model = m.model;
                node.backend = m.backend;
                node.max_load = m.max_load;
                node.load = 0;
                node.online = true;
                node.last_heartbeat = now;
            }
            None => {
                self.nodes.insert(
                    m.id,
                    Node {
                        addr: m.addr,
                        address: m.address,
                        model: m.model,
                        backend: m.backend,
                        load: 0,
                        max_load: m.max_load,
                        reputation: NodeReputation::new(&self.rules),
                        online: true,
                        dedicated: false,
                        reserved_for: None,
                        reserved_until: None,
                        released_until: None,
                        last_heartbeat: now,
                        registered_at_ms: crate::task::now_ms(),
                        tasks_done: 0,
                        validated: self.probes_required == 0,
                        probing: None,
                        probes_passed: 0,
                        probes_failed: 0,
                        next_probe_at: now,
                        pinned: None,
                        speed: None,
                    },
                );
            }
        }
    }
}

impl Handler<Heartbeat> for NodePool {
    type Result = ();
    fn handle(&mut self, m: Heartbeat, _: &mut Context<Self>) {
        if let Some(node) = self.nodes.get_mut(&m.id) {
            node.last_heartbeat = Instant::now();
            if !node.online {
                tracing::info!(miner = %m.id, "heartbeat again: back online");
                node.online = true;
            }
        }
    }
}

impl Handler<GoOffline> for NodePool {
    type Result = ();
    fn handle(&mut self, m: GoOffline, _: &mut Context<Self>) {
        if let Some(node) = self.nodes.get_mut(&m.id) {
            node.online = false;
            node.load = 0;
        }
    }
}

impl Handler<SelectMiners> for NodePool {
    type Result = MessageResult<SelectMiners>;
    fn handle(&mut self, m: SelectMiners, _: &mut Context<Self>) -> Self::Result {
        self.ensure_reservation(&m.placement, &m.model);
        let now = Instant::now();
        let session = m.placement.session_id;
        if let Some(only) = &m.placement.only {
            // A network task: that node alone, whatever its pool state.
            let node = self.nodes.get_mut(only);
            let miners = match node {
                Some(n) if n.online && n.load < n.max_load && !m.exclude.contains(only) => {
                    n.load += 1;
                    vec![(only.clone(), n.addr.clone(), n.address)]
                }
                _ => vec![],
            };
            let eligible = miners.len();
            return MessageResult(Selection { miners, eligible });
        }
        let now_ms = crate::task::now_ms();
        let usable = |id: &String, n: &Node| {
            n.online
                && n.model == m.model
                && !m.exclude.contains(id)
                && (n.pinned == Some(session) || n.in_pool(now_ms))
        };
        // The session's own reservation first, then (unless dedicated) the shared pool.
        let mut groups: Vec<Vec<String>> = vec![self
            .nodes
            .iter()
            .filter(|(id, n)| usable(id, n) && n.reserved_for == Some(session))
            .map(|(id, _)| id.clone())
            .collect()];
        if m.placement.mode != SessionMode::Dedicated {
            groups.push(
                self.nodes
                    .iter()
                    .filter(|(id, n)| usable(id, n) && n.reserved_for != Some(session))
                    .filter(|(_, n)| !(n.dedicated && n.reserved_for.is_some()))
                    .filter(|(_, n)| n.released_until.is_none_or(|t| t <= now))
                    .map(|(id, _)| id.clone())
                    .collect(),
            );
        }
        let eligible = groups.iter().map(Vec::len).sum();
        let mut chosen = Vec::new();
        for mut group in groups {
            group.retain(|id| self.nodes[id].load < self.nodes[id].max_load);
            let group = self.order(group);
            chosen.extend(group.into_iter().take(m.count - chosen.len().min(m.count)));
        }
        chosen.truncate(m.count);
        let miners = chosen
            .into_iter()
            .map(|id| {
                let node = self.nodes.get_mut(&id).expect("chosen from the map");
                node.load += 1;
                (id, node.addr.clone(), node.address)
            })
            .collect();
        MessageResult(Selection { miners, eligible })
    }
}

impl Handler<ObservedSpeed> for NodePool {
    type Result = ();
    fn handle(&mut self, m: ObservedSpeed, _: &mut Context<Self>) {
        if !(m.tokens_per_second.is_finite() && m.tokens_per_second > 0.0) {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&m.miner) {
            node.speed = Some(match node.speed {
                Some(s) => 0.7 * s + 0.3 * m.tokens_per_second,
                None => m.tokens_per_second,
            });
        }
    }
}

impl Handler<Release> for NodePool {
    type Result = ();
    fn handle(&mut self, m: Release, _: &mut Context<Self>) {
        for id in m.miners {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.load = node.load.saturating_sub(1);
                node.tasks_done += 1;
            }
        }
    }
}

impl Handler<RecordOutcome> for NodePool {
    type Result = ();
    fn handle(&mut self, m: RecordOutcome, _: &mut Context<Self>) {
        let rules = self.rules;
        if let Some(node) = self.nodes.get_mut(&m.miner) {
            let changes = node
                .reputation
                .record(m.outcome, crate::task::now_ms(), &rules);
            if self.chain.is_some() {
                self.reports.push(NodeOutcome {
                    node: m.miner.clone(),
                    success: m.outcome.success(),
                    tokens: m.tokens,
                    level: node.reputation.level,
                });
            }
            for change in changes {
                match change {
                    Change::Level { from, to } => {
                        tracing::info!(miner = %m.miner, from, to, "level changed")
                    }
                    Change::Suspended { until_ms } => {
                        tracing::warn!(miner = %m.miner, until_ms, "reputation too low: suspended")
                    }
                }
            }
            if !m.outcome.success() {
                tracing::info!(miner = %m.miner, outcome = ?m.outcome, reputation = node.reputation.points(), "reputation lowered");
            }
        }
        if self.reports.len() >= MAX_PENDING_REPORTS {
            self.send_reports();
        }
    }
}

/// Where the pool sends its network tasks (the session queue).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetProber(pub Recipient<Probe>);

impl Handler<SetProber> for NodePool {
    type Result = ();
    fn handle(&mut self, m: SetProber, _: &mut Context<Self>) {
        self.prober = Some(m.0);
        self.probe_due();
    }
}

/// How a node's network task ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProbeFinished {
    pub miner: String,
    pub passed: bool,
}

impl Handler<ProbeFinished> for NodePool {
    type Result = ();
    fn handle(&mut self, m: ProbeFinished, _: &mut Context<Self>) {
        let required = self.probes_required;
        let Some(n) = self.nodes.get_mut(&m.miner) else {
            return;
        };
        n.probing = None;
        if m.passed {
            n.probes_passed += 1;
            n.next_probe_at = Instant::now();
            if !n.validated && n.probes_passed >= required {
                tracing::info!(miner = %m.miner, passed = n.probes_passed, "network tasks passed: joined the pool");
                n.validated = true;
            }
        } else {
            n.probes_failed += 1;
            n.probes_passed = 0;
            let backoff = (Duration::from_secs(1) * 2u32.saturating_pow(n.probes_failed.min(10)))
                .min(MAX_PROBE_BACKOFF);
            tracing::warn!(miner = %m.miner, failed = n.probes_failed, ?backoff, "network task failed: the miner stays out of the pool");
            n.next_probe_at = Instant::now() + backoff;
        }
    }
}

/// Pins a node to a dedicated session (Cortensor's `addDedicatedNode`): it skips validation
/// and the pool and serves that session alone.
#[derive(Message)]
#[rtype(result = "Result<(), PinError>")]
pub struct PinDedicated {
    pub miner: String,
    pub session: u64,
    /// How long the pin lasts (the session's reservation period), in seconds.
    pub for_s: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PinError {
    #[error("no node {0}")]
    UnknownNode(String),
    #[error("node {node} is already pinned to session {session}")]
    Taken { node: String, session: u64 },
}

impl Handler<PinDedicated> for NodePool {
    type Result = Result<(), PinError>;
    fn handle(&mut self, m: PinDedicated, _: &mut Context<Self>) -> Self::Result {
        let n = self
            .nodes
            .get_mut(&m.miner)
            .ok_or_else(|| PinError::UnknownNode(m.miner.clone()))?;
        match n.pinned {
            Some(s) if s != m.session => Err(PinError::Taken {
                node: m.miner,
                session: s,
            }),
            _ => {
                tracing::info!(miner = %m.miner, session = m.session, "node pinned to a dedicated session");
                n.pinned = Some(m.session);
                n.reserved_for = Some(m.session);
                // Pins end with the session's reservation (far enough is forever).
                let now = Instant::now();
                n.reserved_until = Some(
                    now.checked_add(Duration::from_secs(m.for_s))
                        .unwrap_or(now + Duration::from_secs(crate::session::MAX_RESERVE_PERIOD_S)),
                );
                n.released_until = None;
                n.dedicated = true;
                Ok(())
            }
        }
    }
}

/// Undoes a pin: the node leaves the session at once and revalidates before it rejoins.
#[derive(Message)]
#[rtype(result = "Result<(), UnpinError>")]
pub struct Unpin {
    pub miner: String,
    pub session: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("node {node} is not pinned to session {session}")]
pub struct UnpinError {
    pub node: String,
    pub session: u64,
}

impl Handler<Unpin> for NodePool {
    type Result = Result<(), UnpinError>;
    fn handle(&mut self, m: Unpin, _: &mut Context<Self>) -> Self::Result {
        let cooldown = self.offline_after;
        let probes = self.probes_required;
        match self.nodes.get_mut(&m.miner) {
            Some(n) if n.pinned == Some(m.session) => {
                tracing::info!(miner = %m.miner, session = m.session, "node unpinned; it revalidates");
                n.pinned = None;
                n.reserved_for = None;
                n.reserved_until = None;
                n.dedicated = false;
                n.released_until = Some(Instant::now() + cooldown);
                if probes > 0 {
                    n.validated = false;
                    n.probes_passed = 0;
                }
                Ok(())
            }
            _ => Err(UnpinError {
                node: m.miner,
                session: m.session,
            }),
        }
    }
}

impl Handler<ListNodes> for NodePool {
    type Result = MessageResult<ListNodes>;
    fn handle(&mut self, _: ListNodes, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.nodes
                .iter()
                .map(|(id, n)| NodeView {
                    id: id.clone(),
                    model: n.model.clone(),
                    backend: n.backend.clone(),
                    state: Self::state_of(n),
                    reserved_for: n.reserved_for,
                    load: n.load,
                    reputation: n.reputation.points(),
                    level: n.reputation.level,
                    success_rate: n.reputation.success_rate(),
                    counters: n.reputation.counters.clone(),
                    suspended_until_ms: n
                        .reputation
                        .suspended_until_ms
                        .filter(|t| *t > crate::task::now_ms()),
                    registered_at_ms: n.registered_at_ms,
                    tasks_done: n.tasks_done,
                    probes_passed: n.probes_passed,
                    probes_failed: n.probes_failed,
                    pinned_to: n.pinned,
                    tokens_per_second: n.speed.map(|s| (s * 10.0).round() / 10.0),
                })
                .collect(),
        )
    }
}

/// Admits validators: these keys may log in as validators from now on (the operator's
/// allow-list, and the validators a testnet starts itself).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AdmitValidators(pub Vec<ethers::types::Address>);

impl Handler<AdmitValidators> for NodePool {
    type Result = ();
    fn handle(&mut self, m: AdmitValidators, _: &mut Context<Self>) {
        self.validators_allowed.extend(m.0);
    }
}

/// Whether a key may log in as a validator.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ValidatorAdmitted(pub ethers::types::Address);

impl Handler<ValidatorAdmitted> for NodePool {
    type Result = bool;
    fn handle(&mut self, m: ValidatorAdmitted, _: &mut Context<Self>) -> bool {
        self.validators_allowed.contains(&m.0)
    }
}
