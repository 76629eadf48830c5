//! An in-process network: router, session queue, node pool, miners, validators and the
//! embedded ledger, served over HTTP. `cortensor testnet` runs it until Ctrl-C; tests start it
//! on port 0 and shut it down. It runs in a thread of its own with its own actix system, so the
//! caller (a test, the CLI) stays synchronous.

use crate::actors::chain_bridge::{ChainBridge, CreateSession, ListSessions};
use crate::actors::messages::{MinerReport, ToMiner, Wrap};
use crate::actors::miner::{EngineFactory, Miner, MinerFaults, MinerSpec, NodeUplink};
use crate::actors::node_pool::{AdmitValidators, NodePool, SetProber};
use crate::actors::peer_routers::PeerRouters;
use crate::actors::router::{Router, RouterSettings};
use crate::actors::session_queue::{SessionQueue, Shutdown};
use crate::actors::validator::Validator;
use crate::api::{self, ApiState};
use crate::chain::evm::EvmChain;
use crate::chain::local_ledger::LocalLedger;
use crate::chain::node_key::NodeKey;
use crate::chain::Chain;
use crate::config::TestnetConfig;
use crate::history::History;
use crate::nodes::gateway::{self, GatewaySettings, NodeGateway};
use crate::session::SessionParams;
use crate::store::{Store, StoreError, WriteFaults};
use crate::validation::consensus::{Level, Levels};
use crate::validation::embedding_service::EmbeddingService;
use crate::validation::engine_service::EngineService;
use actix::prelude::*;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot serve HTTP: {0}")]
    Http(std::io::Error),
    #[error("the testnet failed to start: {0}")]
    Start(String),
    #[error(transparent)]
    Chain(#[from] crate::chain::ChainError),
}

/// Where the testnet keeps its data.
#[derive(Clone, Debug)]
pub enum Storage {
    Dir(PathBuf),
    /// In memory, gone at shutdown (benchmarks).
    Temporary,
}

pub struct TestnetOptions {
    pub config: TestnetConfig,
    /// Builds each miner's engine (given the miner's id).
    pub engine: EngineFactory,
    /// The network's name for the model the miners serve.
    pub model: String,
    pub storage: Storage,
    /// Misbehaviour per miner id (fault-injection tests).
    pub faults: HashMap<String, MinerFaults>,
    /// HTTP worker threads.
    pub http_workers: usize,
    /// Where sessions, balances and payments live.
    pub chain: ChainChoice,
    /// A BERT sentence-embedding model (all-MiniLM-L6-v2) for validators, which sessions with
    /// `validation: embedding` need.
    pub embedding_model: Option<PathBuf>,
    /// Fault-injection seams (see [`crate::testkit`]); all absent in a real network.
    pub wiring: Wiring,
    /// Where remote miners and validators connect (the node WebSocket); none: local nodes only.
    pub node_listener: Option<TcpListener>,
    /// Serve the API and the node socket over TLS with this.
    pub tls: Option<rustls::ServerConfig>,
}

/// Wraps the chain a testnet talks to.
pub type ChainWrap = std::sync::Arc<dyn Fn(Box<dyn Chain>) -> Box<dyn Chain> + Send + Sync>;

/// Seams where a test puts faults between the actors and records what they do. Each is
/// absent in a real network, which then pays nothing for it.
#[derive(Clone, Default)]
pub struct Wiring {
    /// Between each miner and the queue (the miners' reports).
    pub to_queue: Option<Wrap<MinerReport>>,
    /// Between the queue and each miner (assignments, reveals, cancellations).
    pub to_miner: Option<Wrap<ToMiner>>,
    /// Around the chain (its RPC cut for a while); the bridge then keeps an outbox, as it
    /// does on an EVM, so holds and settlements wait for the chain to come back.
    pub chain: Option<ChainWrap>,
    /// Makes the store's task writes fail while switched on.
    pub store_faults: Option<WriteFaults>,
    /// Where the session queue records its operations.
    pub history: Option<History>,
}

/// The chain a testnet uses.
#[derive(Clone, Debug, Default)]
pub enum ChainChoice {
    /// The embedded ledger in the data directory.
    #[default]
    Embedded,
    /// Cortensor's contracts on an EVM node: deployed fresh from `private_key`'s account, or
    /// attached at `deployment`.
    Evm {
        rpc_url: String,
        private_key: String,
        deployment: Option<crate::chain::deploy::Deployment>,
        /// Send each node wallet some ether for its gas (a local chain's convenience).
        fund_nodes: bool,
    },
}

/// Ether sent to each node wallet when the testnet funds them.
pub const NODE_FUNDING_WEI: u64 = 1_000_000_000_000_000_000;

/// Where a testnet keeps its nodes' keys, in its data directory.
pub fn node_keys_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("node-keys")
}

/// Addresses of the running actors, for tests that talk to them directly.
#[derive(Clone)]
pub struct Actors {
    pub router: Addr<Router>,
    pub queue: Addr<SessionQueue>,
    pub pool: Addr<NodePool>,
    pub chain: Addr<ChainBridge>,
    pub validators: Vec<Addr<Validator>>,
    /// In `miner_ids` order.
    pub miners: Vec<Addr<Miner>>,
    /// The routers sharing this one's chain, when it has peers.
    pub peers: Option<Addr<PeerRouters>>,
}

/// A running testnet. Dropping it shuts it down.
pub struct Testnet {
    pub addr: SocketAddr,
    pub url: String,
    /// A key clients may use (the first configured one, or the development key).
    pub api_key: String,
    /// The session the API key's OpenAI-compatible requests use.
    pub default_session: u64,
    pub actors: Actors,
    pub miner_ids: Vec<String>,
    /// Each miner's wallet address (hex), in `miner_ids` order: where it is paid on an EVM.
    pub miner_addresses: Vec<String>,
    /// Where the contracts are, when the chain is an EVM.
    pub deployment: Option<crate::chain::deploy::Deployment>,
    /// The node WebSocket's address and its gateway, when remote nodes may connect.
    pub node_addr: Option<SocketAddr>,
    pub gateway: Option<Addr<NodeGateway>>,
    system: Option<actix_rt::System>,
    server: Option<actix_web::dev::ServerHandle>,
    node_server: Option<actix_web::dev::ServerHandle>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn miner_id(index: usize) -> String {
    format!("miner-{}", index + 1)
}

/// An owner identity for an API key: a hash, so the key itself is never stored.
pub fn owner_of_key(key: &str) -> String {
    let h = ethers::utils::keccak256(key.as_bytes());
    format!("key-{}", hex::encode(&h[..8]))
}

struct Started {
    api_key: String,
    default_session: u64,
    actors: Actors,
    system: actix_rt::System,
    server: actix_web::dev::ServerHandle,
    nodes: Option<(Addr<NodeGateway>, actix_web::dev::ServerHandle)>,
}

impl Testnet {
    /// Starts everything and returns once the HTTP server accepts requests (miners may still
    /// be loading their engines: they join the pool when ready).
    pub fn start(options: TestnetOptions, listener: TcpListener) -> Result<Testnet, TestnetError> {
        let addr = listener.local_addr().map_err(TestnetError::Http)?;
        let tls = options.tls.is_some();
        let node_addr = match &options.node_listener {
            Some(l) => Some(l.local_addr().map_err(TestnetError::Http)?),
            None => None,
        };
        // Store and chain are built here, outside the actor system: the EVM client runs its
        // own runtime and must not start inside another.
        let mut store = match &options.storage {
            Storage::Dir(dir) => Store::open(dir)?,
            Storage::Temporary => Store::temporary()?,
        };
        if let Some(faults) = &options.wiring.store_faults {
            store = store.with_write_faults(faults.clone());
        }
        let miner_ids: Vec<String> = (0..options.config.nodes.miners).map(miner_id).collect();
        let node_keys = miner_ids
            .iter()
            .map(|id| match &options.storage {
                Storage::Dir(dir) => NodeKey::load_or_create(&node_keys_dir(dir), id),
                Storage::Temporary => Ok(NodeKey::random(id)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut deployed = None;
        let (mut chain, chain_name): (Box<dyn Chain>, &'static str) = match &options.chain {
            ChainChoice::Embedded => (Box::new(LocalLedger::new(store.clone())), "embedded-ledger"),
            ChainChoice::Evm {
                rpc_url,
                private_key,
                deployment,
                fund_nodes,
            } => {
                let price = options.config.pricing.price_per_token;
                let evm = match deployment {
                    Some(d) => EvmChain::attach(rpc_url, private_key, *d)?,
                    None => EvmChain::deploy(rpc_url, private_key, price)?,
                }
                .with_node_keys(&node_keys);
                if *fund_nodes {
                    evm.fund_nodes(NODE_FUNDING_WEI.into())?;
                }
                // Peer routers on this chain act as routers too (granted by the admin: the
                // router that deployed the contracts; others' grants are refused, harmlessly).
                for peer in &options.config.router.peers {
                    let Some(address) = peer.address.as_ref().and_then(|a| a.parse().ok()) else {
                        continue;
                    };
                    match evm.grant_router(address) {
                        Ok(()) => {
                            tracing::info!(peer = %peer.url, ?address, "peer router granted the router's roles")
                        }
                        Err(e) => {
                            tracing::warn!(peer = %peer.url, error = %e, "cannot grant a peer router its roles (only the deploying router can)")
                        }
                    }
                }
                tracing::info!(deployment = ?evm.deployment, "the chain: Cortensor's contracts on {rpc_url}");
                deployed = Some(evm.deployment);
                (Box::new(evm), "evm")
            }
        };
        if let Some(wrap) = &options.wiring.chain {
            chain = wrap(chain);
        }
        let (tx, rx) = std::sync::mpsc::channel::<Result<Started, TestnetError>>();
        let thread_keys = node_keys.clone();
        let thread = std::thread::Builder::new()
            .name("testnet".into())
            .spawn(move || {
                let system = actix_rt::System::new();
                // A chain that blocks on RPC gets an arbiter (thread) of its own.
                let chain_arbiter = (chain_name == "evm").then(Arbiter::new);
                // The miners' actors get a thread of their own, as a miner is a process of
                // its own outside the testnet: their signing runs beside the router's work.
                let miners_arbiter = Arbiter::new();
                let started = system.block_on(start_actors(
                    options,
                    listener,
                    store,
                    chain,
                    Arbiters {
                        chain: chain_arbiter.as_ref(),
                        miners: &miners_arbiter,
                    },
                    chain_name,
                    thread_keys,
                ));
                let failed = started.is_err();
                let _ = tx.send(started);
                if !failed {
                    let _ = system.run();
                }
                for arbiter in chain_arbiter.into_iter().chain([miners_arbiter]) {
                    arbiter.stop();
                    let _ = arbiter.join();
                }
            })
            .map_err(|e| TestnetError::Start(e.to_string()))?;
        let started = rx
            .recv()
            .map_err(|_| TestnetError::Start("the testnet thread died".into()))??;
        Ok(Testnet {
            addr,
            url: format!("{}://{addr}", if tls { "https" } else { "http" }),
            api_key: started.api_key,
            default_session: started.default_session,
            actors: started.actors,
            miner_ids,
            miner_addresses: node_keys
                .iter()
                .map(|k| format!("{:?}", k.address()))
                .collect(),
            deployment: deployed,
            node_addr,
            gateway: started.nodes.as_ref().map(|(g, _)| g.clone()),
            node_server: started.nodes.map(|(_, s)| s),
            system: Some(started.system),
            server: Some(started.server),
            thread: Some(thread),
        })
    }

    /// Stops the network: first the session queue (no transition after that: tasks in
    /// flight stay as written and resume on the next start, so clients cut off here lose
    /// nothing but the connection), then the HTTP server, the actors and the store.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let (Some(server), Some(system)) = (self.server.take(), self.system.take()) {
            let queue = self.actors.queue.clone();
            let system2 = system.clone();
            let node_server = self.node_server.take();
            system.arbiter().spawn(async move {
                let _ = queue.send(Shutdown).await;
                if let Some(nodes) = node_server {
                    nodes.stop(false).await;
                }
                server.stop(false).await;
                system2.stop();
            });
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Attempts at a chain call while the network starts, and the pause between them: a chain
/// that does not answer for a while (a node restarting) delays the start, up to ~10 s.
pub const START_CHAIN_ATTEMPTS: u32 = 50;
pub const START_CHAIN_PAUSE: Duration = Duration::from_millis(200);

/// A chain call made at start-up, retried while the chain is unreachable.
async fn chain_call<T, F, Fut>(mut call: F) -> Result<T, TestnetError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, crate::chain::ChainError>, MailboxError>>,
{
    use crate::chain::ChainError;
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(ChainError::Unreachable(m) | ChainError::Evm(m)))
                if attempt < START_CHAIN_ATTEMPTS =>
            {
                tracing::warn!(attempt, error = %m, "the chain does not answer yet; retrying");
                attempt += 1;
                actix_rt::time::sleep(START_CHAIN_PAUSE).await;
            }
            Ok(Err(e)) => return Err(TestnetError::Chain(e)),
            Err(e) => return Err(TestnetError::Start(e.to_string())),
        }
    }
}

/// The threads some actors run on, beside the system's own (where the router, the queue,
/// the pool, the validators and the embedded ledger run).
struct Arbiters<'a> {
    /// A chain that blocks on RPC (the EVM); none for the embedded ledger.
    chain: Option<&'a Arbiter>,
    /// The in-process miners.
    miners: &'a Arbiter,
}

async fn start_actors(
    options: TestnetOptions,
    listener: TcpListener,
    store: Store,
    chain: Box<dyn Chain>,
    arbiters: Arbiters<'_>,
    chain_name: &'static str,
    node_keys: Vec<NodeKey>,
) -> Result<Started, TestnetError> {
    let config = options.config;

    // Router, queue, pool, validators and ledger share this arbiter: none of them blocks (the
    // store flushes on its own thread), and messages between them cost no thread hand-off.
    // The miners run on their own arbiter, their engines on threads of their own.
    let outbox = store.clone();
    let confirm_after = config.chain.confirm_after();
    let chain = match arbiters.chain {
        Some(arbiter) => ChainBridge::start_in_arbiter(&arbiter.handle(), move |_| {
            ChainBridge::with_outbox(chain, outbox, confirm_after)
        }),
        // A chain that may fail (a wrapped one) gets the outbox an EVM gets.
        None if options.wiring.chain.is_some() => {
            ChainBridge::with_outbox(chain, outbox, confirm_after).start()
        }
        None => ChainBridge::new(chain).start(),
    };

    let pool = NodePool::new(
        Duration::from_millis(config.nodes.offline_after_ms),
        config.nodes.selection_seed,
        crate::reputation::ReputationRules::default(),
        config.nodes.probes_required,
    )
    .with_policy(config.nodes.selection)
    .with_forget_offline_after(Duration::from_millis(config.nodes.forget_offline_after_ms))
    .with_chain_reports(chain.clone().recipient())
    .start();

    let embeddings = match &options.embedding_model {
        Some(dir) => Some(
            EmbeddingService::start(dir, burn::tensor::Device::flex())
                .map_err(|e| TestnetError::Start(format!("the embedding model: {e}")))?,
        ),
        None => None,
    };
    // The validators share one copy of the miners' model (likelihood re-scoring and judging).
    let validator_engine = match (options.engine)("validators") {
        Ok(engine) => Some(
            EngineService::start(engine)
                .map_err(|e| TestnetError::Start(format!("the validators' engine: {e}")))?,
        ),
        Err(e) => {
            tracing::warn!(error = %e, "validators get no model: likelihood and judge validation are off");
            None
        }
    };
    let validators: Vec<Addr<Validator>> = (0..config.nodes.validators)
        .map(|i| {
            let (embeddings, engine) = (embeddings.clone(), validator_engine.clone());
            Supervisor::start(move |_| {
                Validator::new(
                    format!("validator-{}", i + 1),
                    embeddings.clone(),
                    engine.clone(),
                )
            })
        })
        .collect();

    // The queue's context comes first: peer routers (when there are any) and the queue know
    // each other.
    let queue_context = Context::<SessionQueue>::new();
    let queue_addr = queue_context.address();
    // Routers sharing the chain: task ids from this router's base, and every task told to
    // the peers (which run it if this router dies; theirs run here if they die).
    let peers = (!config.router.peers.is_empty()).then(|| {
        PeerRouters::new(
            config.router.peers.clone(),
            config.router.peer_key.clone(),
            config.router.max_standby_tasks,
            store.clone(),
            queue_addr.clone(),
            chain.clone(),
            Duration::from_millis(config.router.peer_dead_after_ms),
        )
        .start()
    });
    let queue = SessionQueue::new(
        config.queue.clone(),
        config.pricing.price_per_token,
        store.clone(),
        pool.clone(),
        chain.clone(),
        validators.clone(),
    )
    // A node joins the pool once its answers replay under the validators' model.
    .with_probe_validation(if validator_engine.is_some() {
        Levels::new([Level::Likelihood])
    } else {
        Levels::default()
    })
    .with_history(options.wiring.history.clone())
    .with_peers(
        crate::config::task_id_base(config.router.instance),
        peers.clone().map(Addr::recipient),
    );
    let queue = queue_context.run(queue);
    pool.do_send(SetProber(queue.clone().recipient()));
    // Remote validators log in only with a key on the operator's allow-list.
    pool.do_send(AdmitValidators(config.nodes.validators_allowed()));

    let mut miners = Vec::new();
    for (index, key) in node_keys.iter().enumerate().take(config.nodes.miners) {
        let id = miner_id(index);
        let upstream: Recipient<MinerReport> = match &options.wiring.to_queue {
            Some(wrap) => wrap(&id, queue.clone().recipient()),
            None => queue.clone().recipient(),
        };
        let spec = MinerSpec {
            faults: options.faults.get(&id).cloned().unwrap_or_default(),
            id,
            model: options.model.clone(),
            max_tasks: config.nodes.max_tasks_per_miner,
            heartbeat_interval: Duration::from_millis(config.nodes.heartbeat_interval_ms),
            inbound: options.wiring.to_miner.clone(),
            key: key.clone(),
        };
        let (factory, pool) = (options.engine.clone(), pool.clone());
        miners.push(Supervisor::start_in_arbiter(
            &arbiters.miners.handle(),
            move |_| Miner::new(spec, factory, upstream, NodeUplink::pool(&pool)),
        ));
    }

    let settings = RouterSettings {
        models: vec![options.model.clone()],
        max_context: config.nodes.max_context,
        price_per_token: config.pricing.price_per_token,
        max_replacements: config.queue.max_replacements,
        default_timeout: config.queue.task_timeout(),
        default_precommit_timeout: config.queue.precommit_timeout(),
        embedding_validation: embeddings.is_some(),
        model_validation: validator_engine.is_some(),
    };
    let router = Router::new(settings.clone(), chain.clone(), queue.clone()).start();

    // Every key gets a default session (the OpenAI-compatible API has no session field).
    let keys = config.router.effective_api_keys();
    let existing = chain_call(|| chain.send(ListSessions)).await?;
    let mut default_sessions = HashMap::new();
    for key in &keys {
        let owner = owner_of_key(key);
        let found = existing
            .iter()
            .find(|s| s.owner == owner && s.params.name == "default");
        let id = match found {
            Some(s) => s.id,
            None => {
                let params = SessionParams {
                    name: "default".into(),
                    metadata: "created by the testnet for the OpenAI-compatible API".into(),
                    ..SessionParams::default()
                };
                chain_call(|| {
                    chain.send(CreateSession {
                        owner: owner.clone(),
                        params: params.clone(),
                        deposit: config.pricing.default_deposit,
                    })
                })
                .await?
                .id
            }
        };
        default_sessions.insert(owner, id);
    }
    let api_key = keys[0].clone();
    let default_session = default_sessions[&owner_of_key(&api_key)];

    let actors = Actors {
        router,
        queue,
        pool,
        chain,
        validators,
        miners,
        peers,
    };
    let state = ApiState::new(
        &config,
        settings,
        actors.clone(),
        &keys,
        default_sessions,
        chain_name,
        store.clone(),
    )?;
    let nodes = match options.node_listener {
        Some(listener) => {
            let limits = gateway::LoginLimits {
                total: config.nodes.max_unauthenticated,
                per_address: config.nodes.max_unauthenticated_per_address,
            };
            let gateway =
                NodeGateway::new(actors.queue.clone(), actors.pool.clone(), limits).start();
            let settings = GatewaySettings {
                models: vec![options.model.clone()],
                max_tasks: config.nodes.max_tasks_per_miner,
                heartbeat: Duration::from_millis(config.nodes.heartbeat_interval_ms),
                offline_after: Duration::from_millis(config.nodes.offline_after_ms),
                login_timeout: Duration::from_millis(config.nodes.login_timeout_ms),
            };
            let server = gateway::serve(
                gateway.clone(),
                actors.queue.clone().recipient(),
                actors.pool.clone(),
                settings,
                listener,
                options.tls.clone(),
            )
            .map_err(TestnetError::Http)?;
            let handle = server.handle();
            actix_rt::spawn(server);
            Some((gateway, handle))
        }
        None => None,
    };
    let server = api::serve(state, listener, options.http_workers, options.tls)
        .map_err(TestnetError::Http)?;
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(Started {
        api_key,
        default_session,
        actors,
        system: actix_rt::System::current(),
        server: handle,
        nodes,
    })
}
