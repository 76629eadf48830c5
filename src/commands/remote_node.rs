//! `cortensor miner` and `cortensor validator`: one node on its own host, joined to a router
//! over the node WebSocket. The node's identity is its key (its address is its id on the
//! network, where it is paid and what its reports are signed with).

use super::testnet::{llama_factory, model_name, resolve_backend};
use crate::actors::miner::{Miner, MinerFaults, MinerSpec, NodeUplink};
use crate::actors::router_link::{Disconnect, LinkSettings, RouterLink};
use crate::actors::validator::Validator;
use crate::chain::node_key::NodeKey;
use crate::models::fetch;
use crate::nodes::protocol::NodeRole;
use crate::validation::embedding_service::EmbeddingService;
use crate::validation::engine_service::EngineService;
use actix::prelude::*;
use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The router's node WebSocket, e.g. ws://10.0.0.1:9001.
    #[arg(long)]
    pub router: String,
    /// The node key: a file holding a hex private key (made, mode 0600, when it does not
    /// exist yet), or the hex key itself.
    #[arg(long)]
    pub key: String,
    /// A GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, wgpu or cpu.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// CPU threads for the engine; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// KV-cache positions.
    #[arg(long, default_value_t = 2048)]
    pub max_context: usize,
    /// Failed connection attempts in a row before the node gives up.
    #[arg(long, default_value_t = 1000)]
    pub max_reconnects: u32,
    /// For a wss:// router: the CA (or the router's own certificate, pinned) to trust instead
    /// of the public web roots.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

fn link_tls(args: &NodeArgs) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    match &args.ca {
        Some(ca) if args.router.starts_with("wss://") => Ok(Some(crate::tls::client_config(ca)?)),
        Some(_) => anyhow::bail!(
            "--ca is for a wss:// router; --router {} is plain ws://",
            args.router
        ),
        None => Ok(None),
    }
}

#[derive(Debug, clap::Args)]
pub struct MinerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Tasks held at once.
    #[arg(long, default_value_t = 8)]
    pub max_tasks: usize,
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
}

/// Reads `--key`: a hex key, or a key file (made when missing).
pub fn load_key(spec: &str) -> anyhow::Result<NodeKey> {
    let hex_digits = spec.trim_start_matches("0x");
    if hex_digits.len() == 64 && hex_digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(NodeKey::from_hex("node", spec)?.named_by_address());
    }
    let path = Path::new(spec);
    let (dir, name) = match (path.parent(), path.file_stem()) {
        (Some(dir), Some(name)) if path.extension().is_some_and(|e| e == "key") => {
            (dir.to_path_buf(), name.to_string_lossy().into_owned())
        }
        _ => anyhow::bail!(
            "--key {spec}: give a key file ending in .key (made when missing) or a hex private key"
        ),
    };
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let existed = path.exists();
    let key = NodeKey::load_or_create(&dir, &name)?;
    if !existed {
        eprintln!(
            "node: made a new node key at {} (address {:?})",
            path.display(),
            key.address()
        );
    }
    Ok(key.named_by_address())
}

fn check_url(url: &str) -> anyhow::Result<()> {
    if !(url.starts_with("ws://") || url.starts_with("wss://")) {
        anyhow::bail!("--router {url}: expected ws://host:port (the router's node WebSocket)");
    }
    Ok(())
}

/// Runs an actor system with the link until Ctrl-C, or until the link gives up (its reason
/// becomes the command's error).
fn run_node(
    start: impl FnOnce(LinkSettings, std::sync::mpsc::Sender<String>) -> Addr<RouterLink>,
    settings: LinkSettings,
) -> anyhow::Result<()> {
    let (fatal_tx, fatal_rx) = std::sync::mpsc::channel::<String>();
    let system = actix_rt::System::new();
    let reason = system.block_on(async move {
        let link = start(settings, fatal_tx);
        let waiting = tokio::task::spawn_blocking(move || fatal_rx.recv().ok());
        let reason = tokio::select! {
            _ = tokio::signal::ctrl_c() => None,
            reason = waiting => reason.ok().flatten(),
        };
        if reason.is_none() {
            // Say goodbye properly, so the router takes the node offline at once.
            let _ = link.send(Disconnect).await;
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        reason
    });
    match reason {
        Some(reason) => anyhow::bail!("{reason}"),
        None => {
            eprintln!("node: shutting down");
            Ok(())
        }
    }
}

pub fn miner(args: MinerArgs) -> anyhow::Result<()> {
    check_url(&args.node.router)?;
    let key = load_key(&args.node.key)?;
    let backend = resolve_backend(&args.node.backend)?;
    let model_path = super::generate::resolve_model(args.node.model.clone())?;
    let model = model_name(&model_path);
    let id = key.node.clone();
    println!("miner:   {id} serving {model} to {}", args.node.router);
    let factory = llama_factory(
        model_path,
        backend,
        args.node.threads,
        args.node.max_context,
    );
    let settings = LinkSettings {
        url: args.node.router.clone(),
        key: key.clone(),
        role: NodeRole::Miner,
        max_reconnects: args.node.max_reconnects,
        tls: link_tls(&args.node)?,
    };
    let (max_tasks, heartbeat) = (args.max_tasks, Duration::from_millis(args.heartbeat_ms));
    run_node(
        move |settings, fatal| {
            let link = RouterLink::new(settings, fatal).start();
            let spec = MinerSpec {
                id,
                model,
                max_tasks,
                heartbeat_interval: heartbeat,
                faults: MinerFaults::default(),
                inbound: None,
                key,
            };
            let uplink = NodeUplink::link(&link);
            let reports = link.clone().recipient();
            Supervisor::start(move |_| Miner::new(spec, factory.clone(), reports, uplink));
            link
        },
        settings,
    )
}

#[derive(Debug, clap::Args)]
pub struct ValidatorArgs {
    #[command(flatten)]
    pub node: NodeArgs,
}

pub fn validator(args: ValidatorArgs) -> anyhow::Result<()> {
    check_url(&args.node.router)?;
    let key = load_key(&args.node.key)?;
    let backend = resolve_backend(&args.node.backend)?;
    let model_path = super::generate::resolve_model(args.node.model.clone())?;
    let id = key.node.clone();
    let factory = llama_factory(
        model_path,
        backend,
        args.node.threads,
        args.node.max_context,
    );
    let engine = EngineService::start(factory("validator").context("loading the model")?)
        .context("starting the validator's engine")?;
    let cache = fetch::cache_dir();
    let embeddings = if fetch::is_installed(&fetch::MINILM_L6_V2, &cache) {
        Some(
            EmbeddingService::start(
                &fetch::MINILM_L6_V2.dir(&cache),
                burn::tensor::Device::flex(),
            )
            .context("loading the embedding model")?,
        )
    } else {
        eprintln!("validator: no embedding model in the cache, so no `embedding` evidence (`cortensor models fetch --all` adds it)");
        None
    };
    println!("validator: {id} validating for {}", args.node.router);
    let settings = LinkSettings {
        url: args.node.router.clone(),
        key,
        role: NodeRole::Validator,
        max_reconnects: args.node.max_reconnects,
        tls: link_tls(&args.node)?,
    };
    run_node(
        move |settings, fatal| {
            let validator = Validator::new(id, embeddings, Some(engine)).start();
            RouterLink::new(settings, fatal)
                .with_validator(validator.recipient())
                .start()
        },
        settings,
    )
}
