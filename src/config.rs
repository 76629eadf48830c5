//! The testnet's configuration: parsed once, at the edge, into typed structs that are passed
//! explicitly. `config/testnet.toml` is embedded as the defaults; a file given with `--config`
//! is laid over it key by key, so it only needs the keys it changes.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The embedded defaults.
pub const DEFAULT_TESTNET_TOML: &str = include_str!("../config/testnet.toml");

/// Cortensor's development key, accepted when no keys are configured.
pub const DEV_API_KEY: &str = "default-dev-token";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestnetConfig {
    pub router: RouterConfig,
    pub queue: QueueConfig,
    pub pricing: PricingConfig,
    pub nodes: NodesConfig,
    pub storage: StorageConfig,
    pub chain: ChainConfig,
    pub tls: TlsConfig,
}

/// TLS for the client API and the node socket.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain and private key; both empty: no TLS (unless `self_signed`).
    pub cert: String,
    pub key: String,
    /// Make (once) a CA and a certificate it signs in `<data_dir>/tls/` and serve with them.
    pub self_signed: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    pub kind: ChainKind,
    pub rpc_url: String,
    pub private_key: String,
    pub confirm_after_ms: u64,
    /// Contracts already deployed (all five addresses), to attach to instead of deploying.
    #[serde(default)]
    pub contracts: Option<crate::chain::deploy::Deployment>,
}

impl ChainConfig {
    pub fn confirm_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.confirm_after_ms)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChainKind {
    Embedded,
    Anvil,
    Rpc,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub listen: SocketAddr,
    pub api_keys: Vec<String>,
    pub max_inflight_per_key: usize,
    pub max_inflight_total: usize,
    pub retry_after_s: u64,
    pub max_body_bytes: usize,
    /// This router's number among the routers sharing a chain (0..=255): its task ids start
    /// at `instance << 40`, so routers never give out the same id in a session.
    pub instance: u8,
    /// The other routers sharing the chain.
    pub peers: Vec<PeerConfig>,
    /// The key this router presents to its peers when it tells them of its tasks (each peer
    /// lists it as this router's `key`); never an operator's key.
    pub peer_key: String,
    /// Peers' tasks kept here at most (what a dead peer leaves for this router to run).
    pub max_standby_tasks: usize,
    /// A peer that does not answer for this long is taken as dead: its tasks run here.
    pub peer_dead_after_ms: u64,
    /// The longest `reserve_period` a session may ask for, in seconds.
    pub max_reserve_period_s: u64,
    /// The most nodes one client key's session may reserve or hold dedicated
    /// (`max_num_of_nodes` of a hybrid or dedicated session); operators' keys are not limited.
    pub max_reserved_nodes: u32,
    /// Sessions one client key may open; operators' keys are not limited.
    pub max_sessions_per_key: usize,
}

/// Another router on the same chain and sessions.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its HTTP API, e.g. `http://10.0.0.2:5010`.
    pub url: String,
    pub instance: u8,
    /// Its chain account: the router that deployed the contracts grants it the router's
    /// roles at start.
    #[serde(default)]
    pub address: Option<String>,
    /// The key it presents when it tells this router of its tasks (its `router.peer_key`).
    /// A peer authenticates as that peer, and is trusted only with its own tasks.
    #[serde(default)]
    pub key: String,
}

/// The first task id of a router instance (ids count on from there).
pub fn task_id_base(instance: u8) -> u64 {
    (instance as u64) << 40
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub ack_timeout_ms: u64,
    pub precommit_timeout_ms: u64,
    pub commit_timeout_ms: u64,
    pub task_timeout_ms: u64,
    pub max_replacements: u32,
    pub max_live_tasks: usize,
    pub tick_ms: u64,
    /// A longer generation runs in chunks of this many tokens, each precommitted, revealed
    /// and validated before the next starts (0: one round, however long).
    pub chunk_tokens: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    pub price_per_token: u64,
    pub default_deposit: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesConfig {
    pub miners: usize,
    pub validators: usize,
    pub backend: String,
    pub threads_per_miner: usize,
    pub max_context: usize,
    pub model: String,
    pub heartbeat_interval_ms: u64,
    pub offline_after_ms: u64,
    pub max_tasks_per_miner: usize,
    pub selection_seed: u64,
    pub probes_required: u32,
    /// How miners are picked among those free: speed, least_load or round_robin.
    pub selection: crate::actors::node_pool::SelectionPolicy,
    /// A node offline this long is forgotten (its reputation with it).
    pub forget_offline_after_ms: u64,
    /// A node-socket connection not logged in this long after it opened is closed.
    pub login_timeout_ms: u64,
    /// Node-socket connections waiting for their login at once: in all, and from one address.
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_address: usize,
    /// Addresses (0x and 40 hex digits) of the remote validators this router admits on its
    /// node socket; a node logging in as a validator with any other key is refused. The
    /// validators a testnet starts itself are added to it.
    pub validators_allowed: Vec<String>,
}

impl NodesConfig {
    /// The validator allow-list as addresses (checked by [`TestnetConfig::validate`]; an
    /// entry that does not parse admits nobody).
    pub fn validators_allowed(&self) -> Vec<ethers::types::Address> {
        self.validators_allowed
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
}

impl QueueConfig {
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
    pub fn precommit_timeout(&self) -> Duration {
        Duration::from_millis(self.precommit_timeout_ms)
    }
    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }
    pub fn task_timeout(&self) -> Duration {
        Duration::from_millis(self.task_timeout_ms)
    }
}

impl RouterConfig {
    /// The keys clients may use: the configured ones, or the development key.
    pub fn effective_api_keys(&self) -> Vec<String> {
        if self.api_keys.is_empty() {
            vec![DEV_API_KEY.to_string()]
        } else {
            self.api_keys.clone()
        }
    }

    /// Settles the operator keys of a router that others can reach (`exposed`: it is
    /// `cortensor router`, or it listens beyond loopback). The public development key is
    /// refused there; with no key configured, a random one is made and returned, to be printed
    /// once. A loopback testnet keeps the development key.
    pub fn settle_operator_keys(&mut self, exposed: bool) -> Result<Option<String>, ConfigError> {
        if !exposed {
            return Ok(None);
        }
        if self.api_keys.iter().any(|k| k == DEV_API_KEY) {
            return Err(ConfigError::Invalid(format!(
                "router.api_keys holds the public development key {DEV_API_KEY:?}, which anyone \
                 can use: a router reachable from other hosts needs keys of its own (or none \
                 configured, and it makes a random one)"
            )));
        }
        if !self.api_keys.is_empty() {
            return Ok(None);
        }
        let secret: [u8; 32] = rand::random();
        let key = format!("ctsr_op_{}", hex::encode(secret));
        self.api_keys = vec![key.clone()];
        Ok(Some(key))
    }
}

impl Default for TestnetConfig {
    fn default() -> Self {
        Self::from_toml_str(DEFAULT_TESTNET_TOML, "embedded config/testnet.toml")
            .expect("the embedded configuration parses")
    }
}

impl TestnetConfig {
    /// The defaults with `overlay` (TOML text) laid over them.
    pub fn from_toml_str(overlay: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::from_toml_layers(&[(overlay, origin)])
    }

    /// The defaults with each `(text, origin)` laid over them in turn (later layers win).
    pub fn from_toml_layers(layers: &[(&str, &str)]) -> Result<Self, ConfigError> {
        let parse = |text: &str, origin: &str| {
            text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })
        };
        let mut base = parse(DEFAULT_TESTNET_TOML, "embedded config/testnet.toml")?;
        for (text, origin) in layers {
            merge(&mut base, parse(text, origin)?);
        }
        let origin = layers
            .last()
            .map_or("embedded config/testnet.toml", |l| l.1);
        let config: TestnetConfig =
            toml::Value::Table(base)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.to_string(),
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Ok(Self::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::from_toml_str(&text, &path.display().to_string())
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.router.max_inflight_per_key == 0 || self.router.max_inflight_total == 0 {
            return fail(
                "router.max_inflight_per_key and router.max_inflight_total must be at least 1",
            );
        }
        if self.router.api_keys.iter().any(|k| k.trim().is_empty()) {
            return fail("router.api_keys may not contain an empty key");
        }
        if self.queue.tick_ms == 0 || self.queue.max_live_tasks == 0 {
            return fail("queue.tick_ms and queue.max_live_tasks must be at least 1");
        }
        if self.nodes.max_tasks_per_miner == 0 {
            return fail("nodes.max_tasks_per_miner must be at least 1");
        }
        if self.nodes.heartbeat_interval_ms == 0
            || self.nodes.offline_after_ms <= self.nodes.heartbeat_interval_ms
        {
            return fail("nodes.offline_after_ms must exceed nodes.heartbeat_interval_ms (> 0)");
        }
        if self.nodes.login_timeout_ms == 0
            || self.nodes.max_unauthenticated == 0
            || self.nodes.max_unauthenticated_per_address == 0
        {
            return fail("nodes.login_timeout_ms and nodes.max_unauthenticated(_per_address) must be at least 1");
        }
        if self.nodes.forget_offline_after_ms < self.nodes.offline_after_ms {
            return fail("nodes.forget_offline_after_ms must be at least nodes.offline_after_ms");
        }
        if self.chain.kind == ChainKind::Rpc
            && (self.chain.rpc_url.is_empty() || self.chain.private_key.is_empty())
        {
            return fail("chain.kind = \"rpc\" needs chain.rpc_url and chain.private_key");
        }
        let mut instances = vec![self.router.instance];
        for p in &self.router.peers {
            if instances.contains(&p.instance) {
                return fail("router.peers: every router needs its own instance number");
            }
            instances.push(p.instance);
            if !(p.url.starts_with("http://") || p.url.starts_with("https://")) {
                return fail("router.peers: url must be http://host:port");
            }
            if let Some(a) = &p.address {
                if a.parse::<ethers::types::Address>().is_err() {
                    return fail("router.peers: address must be 0x and 40 hex digits");
                }
            }
        }
        if !self.router.peers.is_empty() {
            let operator =
                |k: &str| k == DEV_API_KEY || self.router.api_keys.iter().any(|o| o == k);
            if self.router.peer_key.trim().is_empty() || operator(&self.router.peer_key) {
                return fail(
                    "router.peer_key: a router with peers needs a key of its own to present to them (not an operator's key)",
                );
            }
            let mut keys: Vec<&str> = vec![&self.router.peer_key];
            for p in &self.router.peers {
                if p.key.trim().is_empty() || operator(&p.key) || keys.contains(&p.key.as_str()) {
                    return fail(
                        "router.peers: each peer needs its own key (its router.peer_key), distinct from every other key here",
                    );
                }
                keys.push(&p.key);
            }
        }
        if self.router.max_standby_tasks == 0 {
            return fail("router.max_standby_tasks must be at least 1");
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return fail("tls.cert and tls.key go together");
        }
        if self.tls.self_signed && !self.tls.cert.is_empty() {
            return fail(
                "tls.self_signed makes its own certificate: leave tls.cert and tls.key empty",
            );
        }
        if self.router.max_reserve_period_s == 0
            || self.router.max_reserve_period_s > crate::session::MAX_RESERVE_PERIOD_S
        {
            return fail("router.max_reserve_period_s must be between 1 and a year (31536000)");
        }
        if self.router.max_sessions_per_key == 0 {
            return fail("router.max_sessions_per_key must be at least 1");
        }
        for a in &self.nodes.validators_allowed {
            if !is_address(a) {
                return Err(ConfigError::Invalid(format!(
                    "nodes.validators_allowed: {a:?} is not an address (0x and 40 hex digits)"
                )));
            }
        }
        if self.router.peer_dead_after_ms == 0 {
            return fail("router.peer_dead_after_ms must be above 0");
        }
        Ok(())
    }

    /// A network whose nodes are all in process needs a validator of its own (a router
    /// serving remote validators may have none).
    pub fn validate_local(&self) -> Result<(), ConfigError> {
        self.validate()?;
        if self.nodes.validators == 0 {
            return Err(ConfigError::Invalid(
                "nodes.validators must be at least 1 (the queue needs a verdict)".into(),
            ));
        }
        Ok(())
    }
}

/// `0x` and 40 hex digits.
fn is_address(a: &str) -> bool {
    a.strip_prefix("0x")
        .is_some_and(|h| h.len() == 40 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Lays `overlay` over `base`, table by table.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}
