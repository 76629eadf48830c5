//! `cortensor testnet`: a router, miners and validators in one process on the embedded
//! defaults, serving until Ctrl-C (or, with `--prompt`, answering one prompt through the HTTP
//! API as a client would, then stopping).

use super::client;
use crate::actors::miner::EngineFactory;
use crate::chain::anvil::AnvilNode;
use crate::chain::deploy::Deployment;
use crate::chain::evm::ANVIL_DEV_KEY;
use crate::config::{ChainKind, TestnetConfig};
use crate::models::backend::BackendChoice;
use crate::models::engine::{EngineOptions, InferenceEngine, LlamaEngine};
use crate::models::fetch;
use crate::testnet::{ChainChoice, Storage, Testnet, TestnetOptions};
use anyhow::Context;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What starts a network (`testnet` and `router` share it).
#[derive(Debug, clap::Args)]
pub struct NetworkArgs {
    /// A TOML file laid over the embedded defaults (config/testnet.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub miners: Option<usize>,
    #[arg(long)]
    pub validators: Option<usize>,
    /// Address of the HTTP API (default 127.0.0.1:5010; port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, wgpu or cpu.
    #[arg(long)]
    pub backend: Option<String>,
    /// Where sessions and payments live: embedded (default), anvil (a local EVM node with
    /// Cortensor's contracts), rpc (any EVM node: --rpc-url and --private-key).
    #[arg(long, value_enum)]
    pub chain: Option<ChainKind>,
    #[arg(long)]
    pub rpc_url: Option<String>,
    /// The router's account on the chain (hex); also read from CORTENSOR_PRIVATE_KEY.
    #[arg(long, env = "CORTENSOR_PRIVATE_KEY", hide_env_values = true)]
    pub private_key: Option<String>,
    /// The operator's API key (replaces router.api_keys); also read from
    /// CORTENSOR_OPERATOR_KEY. A router reachable from other hosts refuses the public
    /// development key and, given none, makes a random one and prints it once.
    #[arg(long, env = "CORTENSOR_OPERATOR_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve the API and the node socket over TLS with this PEM certificate chain (and
    /// --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve TLS with a CA and certificate made (once) in <data-dir>/tls/; clients and nodes
    /// trust <data-dir>/tls/ca.pem.
    #[arg(long, conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,
    /// Admit a remote validator with this address (0x and 40 hex digits) on the node socket,
    /// besides those in nodes.validators_allowed; repeatable.
    #[arg(long = "allow-validator", value_name = "ADDRESS")]
    pub allow_validators: Vec<String>,
}

impl NetworkArgs {
    /// The configuration file (or the embedded defaults) with the command line laid over it;
    /// not yet validated.
    pub fn configuration(&self) -> anyhow::Result<TestnetConfig> {
        let mut config = TestnetConfig::load(self.config.as_deref())?;
        let nodes = &mut config.nodes;
        nodes.miners = self.miners.unwrap_or(nodes.miners);
        nodes.validators = self.validators.unwrap_or(nodes.validators);
        nodes
            .validators_allowed
            .extend(self.allow_validators.iter().cloned());
        if let Some(b) = &self.backend {
            nodes.backend = b.clone();
        }
        config.router.listen = self.listen.unwrap_or(config.router.listen);
        if let Some(d) = &self.data_dir {
            config.storage.data_dir = d.clone();
        }
        let chain = &mut config.chain;
        chain.kind = self.chain.unwrap_or(chain.kind);
        if let Some(url) = &self.rpc_url {
            chain.rpc_url = url.clone();
        }
        if let Some(key) = &self.private_key {
            chain.private_key = key.clone();
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config.tls.cert = cert.display().to_string();
            config.tls.key = key.display().to_string();
            config.tls.self_signed = false;
        }
        if self.tls_self_signed {
            config.tls.self_signed = true;
        }
        if let Some(key) = &self.api_key {
            config.router.api_keys = vec![key.clone()];
        }
        Ok(config)
    }
}

#[derive(Debug, clap::Args)]
pub struct TestnetArgs {
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Answer this prompt through the API once the miners are ready, print the task, and stop.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Miners per task for --prompt.
    #[arg(long, default_value_t = 3)]
    pub redundant: u32,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Run the router, each miner and each validator as a process of its own (`cortensor
    /// router`, `cortensor miner`, `cortensor validator`) joined over the node WebSocket, on
    /// anvil unless --chain says otherwise.
    #[arg(long)]
    pub processes: bool,
}

/// The network's name for a model file: its file name without `.gguf`.
pub fn model_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

/// Every miner loads its own copy of the model on its engine thread.
pub fn llama_factory(
    model: PathBuf,
    backend: BackendChoice,
    threads: usize,
    max_context: usize,
) -> EngineFactory {
    Arc::new(move |_miner: &str| {
        let mut opts = EngineOptions::new(&model);
        opts.backend = backend;
        opts.threads = threads;
        opts.max_context = max_context;
        Ok(Box::new(LlamaEngine::load(&opts)?) as Box<dyn InferenceEngine>)
    })
}

/// A network's settings resolved from its arguments: the configuration, the model file and
/// the backend (checked: the model loads).
pub struct Resolved {
    pub config: TestnetConfig,
    pub model_path: PathBuf,
    pub model: String,
    pub backend: BackendChoice,
}

/// Lays the command line over the configuration and checks that the model loads. A network
/// that serves remote nodes may have no validator of its own.
pub fn resolve(args: NetworkArgs, remote_nodes: bool) -> anyhow::Result<Resolved> {
    let mut config = args.configuration()?;
    // A router other hosts can reach never runs on the public development key.
    let exposed = remote_nodes || !config.router.listen.ip().is_loopback();
    if config.router.settle_operator_keys(exposed)?.is_some() {
        eprintln!("router: no operator key configured; made one for this run (printed below as `api key`, once)");
    }
    if remote_nodes {
        config.validate()?;
    } else {
        config.validate_local()?;
    }
    let backend = resolve_backend(&config.nodes.backend)?;
    let model_path = match (args.model, config.nodes.model.as_str()) {
        (Some(p), _) => super::generate::resolve_model(Some(p))?,
        (None, "") => super::generate::resolve_model(None)?,
        (None, p) => super::generate::resolve_model(Some(PathBuf::from(p)))?,
    };
    let model = model_name(&model_path);
    // Load it once here: a file that cannot load fails now, with its reason, instead of every
    // miner failing in the background.
    {
        let mut opts = EngineOptions::new(&model_path);
        opts.backend = backend;
        opts.threads = config.nodes.threads_per_miner;
        opts.max_context = config.nodes.max_context;
        LlamaEngine::load(&opts)
            .with_context(|| format!("loading the model {}", model_path.display()))?;
    }
    Ok(Resolved {
        config,
        model_path,
        model,
        backend,
    })
}

/// `auto` becomes wgpu when a GPU adapter is there, else the CPU (probed once, here).
pub fn resolve_backend(name: &str) -> anyhow::Result<BackendChoice> {
    let backend: BackendChoice = name
        .parse()
        .map_err(|e| anyhow::anyhow!("nodes.backend: {e}"))?;
    if backend != BackendChoice::Auto {
        return Ok(backend);
    }
    let gpu = crate::models::backend::wgpu_adapters()
        .into_iter()
        .find(|a| a.is_gpu);
    eprintln!(
        "backend auto → {}",
        match &gpu {
            Some(g) => format!("wgpu on {}", g.name),
            None => "cpu (no GPU adapter)".into(),
        }
    );
    Ok(if gpu.is_some() {
        BackendChoice::Wgpu
    } else {
        BackendChoice::Cpu
    })
}

/// A started network and the chain node it needs kept alive.
pub struct Running {
    pub testnet: Testnet,
    /// The CA clients trust, when it serves TLS with a self-signed pair.
    pub ca: Option<PathBuf>,
    _anvil: Option<AnvilNode>,
}

/// The TLS the configuration asks for: the server's configuration, and the CA to trust when
/// the pair is self-signed (made in `<data_dir>/tls/`).
pub fn tls_for(
    config: &TestnetConfig,
) -> anyhow::Result<(Option<rustls::ServerConfig>, Option<PathBuf>)> {
    let t = &config.tls;
    if t.self_signed {
        let host = config.router.listen.ip().to_string();
        let pair = crate::tls::self_signed(&config.storage.data_dir.join("tls"), &[host])?;
        return Ok((Some(crate::tls::server_config(&pair.files)?), Some(pair.ca)));
    }
    if t.cert.is_empty() {
        return Ok((None, None));
    }
    let files = crate::tls::TlsFiles {
        cert: PathBuf::from(&t.cert),
        key: PathBuf::from(&t.key),
    };
    Ok((Some(crate::tls::server_config(&files)?), None))
}

/// Starts the network: the API on `router.listen`, remote nodes on `node_listener` if given.
pub fn start(resolved: Resolved, node_listener: Option<TcpListener>) -> anyhow::Result<Running> {
    let Resolved {
        config,
        model_path,
        model,
        backend,
    } = resolved;
    let listener = TcpListener::bind(config.router.listen).with_context(|| {
        format!(
            "cannot listen on {} (is another testnet running? try --listen 127.0.0.1:0)",
            config.router.listen
        )
    })?;
    let miners = config.nodes.miners;
    let data_dir = config.storage.data_dir.clone();
    let (tls, ca) = tls_for(&config)?;
    let (chain, anvil) = chain_choice(&config, &data_dir)?;
    eprintln!("testnet: {miners} miner(s) loading {model} ({}), {} validator(s), data in {}, selection seed {}",
        model_path.display(), config.nodes.validators, data_dir.display(), config.nodes.selection_seed);
    let options = TestnetOptions {
        engine: llama_factory(
            model_path,
            backend,
            config.nodes.threads_per_miner,
            config.nodes.max_context,
        ),
        model,
        storage: Storage::Dir(data_dir.clone()),
        faults: Default::default(),
        http_workers: 2,
        chain,
        embedding_model: embedding_model(),
        wiring: Default::default(),
        node_listener,
        tls,
        config,
    };
    let rpc_url = match &options.chain {
        ChainChoice::Evm { rpc_url, .. } => Some(rpc_url.clone()),
        ChainChoice::Embedded => None,
    };
    let testnet = Testnet::start(options, listener)?;
    if let (Some(d), Some(rpc_url)) = (&testnet.deployment, rpc_url) {
        // Remembered so that the next start on this data directory attaches to the same
        // contracts (anvil keeps its state in the data directory too), and so that
        // `cortensor node withdraw --data-dir` finds them.
        std::fs::write(
            data_dir.join(DEPLOYMENT_FILE),
            serde_json::to_string_pretty(d)?,
        )?;
        std::fs::write(data_dir.join(RPC_URL_FILE), &rpc_url)?;
        println!(
            "chain:   Cortensor's contracts, sessions at {:?}, payments at {:?}",
            d.sessions, d.payment
        );
        for (id, address) in testnet.miner_ids.iter().zip(&testnet.miner_addresses) {
            println!("node:    {id} is paid at {address}");
        }
    }
    Ok(Running {
        testnet,
        ca,
        _anvil: anvil,
    })
}

pub fn run(args: TestnetArgs) -> anyhow::Result<()> {
    if args.processes {
        return super::processes::run(args);
    }
    let resolved = resolve(args.network, false)?;
    if args.prompt.is_some() && args.redundant as usize > resolved.config.nodes.miners {
        anyhow::bail!(
            "--redundant {} needs at least that many miners (--miners {})",
            args.redundant,
            resolved.config.nodes.miners
        );
    }
    let miners = resolved.config.nodes.miners;
    let model = resolved.model.clone();
    let running = start(resolved, None)?;
    let testnet = &running.testnet;
    let client = client::Client::with_ca(&testnet.url, &testnet.api_key, running.ca.as_deref())?;
    if let Some(ca) = &running.ca {
        println!("tls:     self-signed; clients trust {}", ca.display());
    }
    wait_for_miners(&client, miners, Duration::from_secs(600))?;
    println!("router:  {}", testnet.url);
    println!("api key: {}", testnet.api_key);
    println!("model:   {model}");
    let cacert = running
        .ca
        .as_ref()
        .map(|ca| format!(" --cacert {}", ca.display()))
        .unwrap_or_default();
    println!("try:     curl -s{cacert} {}/api/v1/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"prompt\": \"Name three primary colours.\", \"max_tokens\": 48}}'", testnet.url, testnet.api_key);
    println!(
        "         (OpenAI-compatible: base_url {}/v1, model {model:?})",
        testnet.url
    );
    if let Some(prompt) = &args.prompt {
        let sizes = (args.redundant, args.max_tokens);
        answer_prompt(&client, prompt, sizes, "testnet --prompt")?;
        running.testnet.shutdown();
        return Ok(());
    }
    wait_for_ctrl_c()?;
    eprintln!("testnet: shutting down");
    running.testnet.shutdown();
    Ok(())
}

/// Opens a session of `redundant` miners, streams the answer to `prompt` to stdout, and
/// prints the task: what `--prompt` does.
pub fn answer_prompt(
    client: &client::Client,
    prompt: &str,
    (redundant, max_tokens): (u32, usize),
    what: &str,
) -> anyhow::Result<()> {
    let session = client.create_session(redundant, &format!("{what} (redundant {redundant})"))?;
    println!("session: {session} (redundant {redundant})");
    let answer = client.complete(session, prompt, max_tokens, true, &mut std::io::stdout())?;
    println!();
    let task = client.task(session, answer.task_id)?;
    let miners = &task["results"]["miners"];
    println!(
        "task {}/{}: {} by {} miner(s): {}",
        session,
        answer.task_id,
        task["status"],
        miners.as_array().map(Vec::len).unwrap_or(0),
        miners
    );
    Ok(())
}

pub fn wait_for_ctrl_c() -> anyhow::Result<()> {
    println!("Ctrl-C stops it.");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(tokio::signal::ctrl_c())?;
    Ok(())
}

/// The embedding model for `validation: embedding` sessions, when it is in the cache.
fn embedding_model() -> Option<PathBuf> {
    let cache = fetch::cache_dir();
    if fetch::is_installed(&fetch::MINILM_L6_V2, &cache) {
        eprintln!("testnet: validators can embed results (all-MiniLM-L6-v2)");
        Some(fetch::MINILM_L6_V2.dir(&cache))
    } else {
        eprintln!("testnet: no embedding model in the cache, so sessions cannot ask for validation \"embedding\" (`cortensor models fetch --all` adds it)");
        None
    }
}

/// Where an EVM testnet remembers its contracts, in the data directory.
pub const DEPLOYMENT_FILE: &str = "deployment.json";
/// Where an EVM testnet writes its chain's RPC URL, in the data directory.
pub const RPC_URL_FILE: &str = "rpc-url";
/// Where `--chain anvil` keeps the chain, in the data directory.
pub const ANVIL_STATE_FILE: &str = "anvil-state.json";

/// The chain to use, and the anvil node to keep alive while the testnet runs.
fn chain_choice(
    config: &TestnetConfig,
    data_dir: &Path,
) -> anyhow::Result<(ChainChoice, Option<AnvilNode>)> {
    // The configuration's addresses first, else those this data directory deployed before.
    let remembered = || -> anyhow::Result<Option<Deployment>> {
        if let Some(d) = config.chain.contracts {
            return Ok(Some(d));
        }
        let path = data_dir.join(DEPLOYMENT_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)?;
        Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?,
        ))
    };
    match config.chain.kind {
        ChainKind::Embedded => Ok((ChainChoice::Embedded, None)),
        ChainKind::Anvil => {
            std::fs::create_dir_all(data_dir)?;
            let anvil = AnvilNode::start(Some(&data_dir.join(ANVIL_STATE_FILE)))?;
            eprintln!("testnet: anvil at {}", anvil.url);
            let key = if config.chain.private_key.is_empty() {
                ANVIL_DEV_KEY.to_string()
            } else {
                config.chain.private_key.clone()
            };
            let choice = ChainChoice::Evm {
                rpc_url: anvil.url.clone(),
                private_key: key,
                deployment: remembered()?,
                fund_nodes: true,
            };
            Ok((choice, Some(anvil)))
        }
        ChainKind::Rpc => Ok((
            ChainChoice::Evm {
                rpc_url: config.chain.rpc_url.clone(),
                private_key: config.chain.private_key.clone(),
                deployment: remembered()?,
                // On a real network the operator funds the node wallets (printed at start).
                fund_nodes: false,
            },
            None,
        )),
    }
}

pub fn wait_for_miners(
    client: &client::Client,
    miners: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = usize::MAX;
    loop {
        let online = client.online_miners().unwrap_or(0);
        if online != last {
            eprintln!("testnet: {online}/{miners} miners ready");
            last = online;
        }
        if online >= miners {
            return Ok(());
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "only {online} of {miners} miners became ready within {limit:?}; see the log above"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
