//! `cortensor node withdraw`: a node collects what it has earned, with its own key. On an EVM
//! the payment goes to the node's wallet; on the embedded ledger it moves to the node's
//! withdrawn total.

use super::testnet::{ANVIL_STATE_FILE, DEPLOYMENT_FILE, RPC_URL_FILE};
use crate::chain::anvil::AnvilNode;
use crate::chain::deploy::Deployment;
use crate::chain::evm::EvmChain;
use crate::chain::local_ledger::LocalLedger;
use crate::chain::node_key::NodeKey;
use crate::chain::Chain;
use crate::config::TestnetConfig;
use crate::store::Store;
use crate::testnet::node_keys_dir;
use anyhow::Context;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Collect a node's earnings: on an EVM into its wallet, from its own key.
    Withdraw(WithdrawArgs),
}

#[derive(Debug, clap::Args)]
pub struct WithdrawArgs {
    /// The node's id (as `GET /api/v1/miners` lists it), e.g. miner-1.
    #[arg(long)]
    pub node: String,
    /// The testnet's data directory: the node's key, the contracts and the chain's URL are
    /// found there (default: the embedded configuration's).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The node's private key (hex) in a file, instead of <data-dir>/node-keys/<node>.key.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The chain's RPC URL, instead of the one the testnet wrote into its data directory.
    #[arg(long)]
    pub rpc_url: Option<String>,
    /// The contracts' addresses (the testnet's deployment.json), instead of the data
    /// directory's.
    #[arg(long)]
    pub deployment: Option<PathBuf>,
}

pub fn run(cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Withdraw(args) => withdraw(args),
    }
}

fn withdraw(args: WithdrawArgs) -> anyhow::Result<()> {
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => TestnetConfig::load(None)?.storage.data_dir,
    };
    let deployment_file = args
        .deployment
        .clone()
        .unwrap_or_else(|| data_dir.join(DEPLOYMENT_FILE));
    if !deployment_file.exists() && args.rpc_url.is_none() {
        return withdraw_embedded(&args.node, &data_dir);
    }
    let key = match &args.key_file {
        Some(f) => NodeKey::load_file(f, &args.node)?,
        None => NodeKey::load(&node_keys_dir(&data_dir), &args.node).with_context(|| {
            format!(
                "no key for node {:?} in {} (give --key-file, or the testnet's --data-dir)",
                args.node,
                node_keys_dir(&data_dir).display()
            )
        })?,
    };
    let deployment: Deployment =
        serde_json::from_str(&std::fs::read_to_string(&deployment_file).with_context(|| {
            format!(
                "reading the contracts' addresses {}",
                deployment_file.display()
            )
        })?)
        .with_context(|| format!("{} is not a deployment", deployment_file.display()))?;
    let url = match &args.rpc_url {
        Some(u) => u.clone(),
        None => std::fs::read_to_string(data_dir.join(RPC_URL_FILE))
            .with_context(|| {
                format!(
                    "no RPC URL recorded in {}: give --rpc-url",
                    data_dir.display()
                )
            })?
            .trim()
            .to_string(),
    };
    // The testnet's own anvil is gone when the testnet stopped: start it from its saved state
    // for the withdrawal (it saves the state again when it stops).
    let state = data_dir.join(ANVIL_STATE_FILE);
    let attached = EvmChain::attach(&url, &key.private_key_hex(), deployment);
    let (mut chain, _anvil) = match attached {
        Ok(c) => (c, None),
        Err(e) if args.rpc_url.is_none() && state.exists() => {
            eprintln!("node: the chain at {url} does not answer ({e}); starting the testnet's anvil from {}", state.display());
            let anvil = AnvilNode::start(Some(&state))?;
            let c = EvmChain::attach(&anvil.url, &key.private_key_hex(), deployment)?;
            (c, Some(anvil))
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach the chain at {url}")),
    };
    chain = chain.with_node_keys(std::slice::from_ref(&key));
    let amount = chain.withdraw_node_payment(&args.node)?;
    let balance = chain.node_wallet_balance(&args.node)?;
    println!(
        "{} withdrew {amount} wei to {:?}; the wallet now holds {balance} wei",
        args.node,
        key.address()
    );
    Ok(())
}

fn withdraw_embedded(node: &str, data_dir: &Path) -> anyhow::Result<()> {
    if !data_dir.is_dir() {
        anyhow::bail!(
            "no testnet data in {} (give the testnet's --data-dir)",
            data_dir.display()
        );
    }
    let store = Store::open(data_dir).with_context(|| {
        format!(
            "cannot open the embedded ledger in {} (a running testnet holds it: stop it first)",
            data_dir.display()
        )
    })?;
    let amount = LocalLedger::new(store).withdraw_node_payment(node)?;
    println!("{node} withdrew {amount} (the embedded ledger's units; it holds no coins)");
    Ok(())
}
