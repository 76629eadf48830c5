//! `cortensor router`: the network's router (API, session queue, node pool, validators, the
//! chain) serving remote miners and validators on the node WebSocket, until Ctrl-C. It runs
//! no miners of its own unless `--miners` asks for some.

use super::testnet::{self, NetworkArgs};
use crate::nodes::protocol::DEFAULT_NODE_PORT;
use anyhow::Context;
use std::net::{SocketAddr, TcpListener};

#[derive(Debug, clap::Args)]
pub struct RouterArgs {
    #[command(flatten)]
    pub network: NetworkArgs,
    /// Where remote miners and validators connect (Cortensor's node port is 9001). Default:
    /// every address when the router serves TLS, else loopback only (a plain node socket
    /// beyond this host is asked for by naming it, e.g. 0.0.0.0:9001).
    #[arg(long)]
    pub node_listen: Option<SocketAddr>,
}

/// Where the node socket listens unless told: beyond loopback only behind TLS.
pub fn default_node_listen(tls: bool) -> SocketAddr {
    let host = if tls { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
    SocketAddr::from((host, DEFAULT_NODE_PORT))
}

pub fn run(mut args: RouterArgs) -> anyhow::Result<()> {
    args.network.miners = Some(args.network.miners.unwrap_or(0));
    let resolved = testnet::resolve(args.network, true)?;
    let tls = resolved.config.tls.self_signed || !resolved.config.tls.cert.is_empty();
    let node_listen = args.node_listen.unwrap_or_else(|| default_node_listen(tls));
    let node_listener = TcpListener::bind(node_listen).with_context(|| {
        format!("cannot listen for nodes on {node_listen} (try --node-listen 127.0.0.1:0)")
    })?;
    let model = resolved.model.clone();
    let running = testnet::start(resolved, Some(node_listener))?;
    let t = &running.testnet;
    let nodes = t.node_addr.expect("started with a node listener");
    println!("router:  {}", t.url);
    let ws = if t.url.starts_with("https") {
        "wss"
    } else {
        "ws"
    };
    println!("nodes:   {ws}://{nodes}");
    if let Some(ca) = &running.ca {
        println!(
            "tls:     self-signed; clients and nodes trust {}",
            ca.display()
        );
    }
    println!("api key: {}", t.api_key);
    println!("model:   {model}");
    println!(
        "join:    cortensor miner --router {ws}://{nodes} --key <key file>   (a new key is made there)"
    );
    testnet::wait_for_ctrl_c()?;
    eprintln!("router: shutting down");
    running.testnet.shutdown();
    Ok(())
}
