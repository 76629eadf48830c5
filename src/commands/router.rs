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
    /// Where remote miners and validators connect (Cortensor's node port is 9001).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_NODE_PORT)))]
    pub node_listen: SocketAddr,
}

pub fn run(mut args: RouterArgs) -> anyhow::Result<()> {
    args.network.miners = Some(args.network.miners.unwrap_or(0));
    let node_listener = TcpListener::bind(args.node_listen).with_context(|| {
        format!(
            "cannot listen for nodes on {} (try --node-listen 127.0.0.1:0)",
            args.node_listen
        )
    })?;
    let resolved = testnet::resolve(args.network, true)?;
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
