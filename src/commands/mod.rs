//! The command-line edge: each subcommand parses nothing (clap did), calls the library, and
//! prints. `anyhow` is allowed here and in `main.rs` only.

pub mod bench;
pub mod bench_balance;
pub mod bench_byzantine;
pub mod bench_chain;
pub mod bench_chunks;
pub mod bench_likelihood;
pub mod bench_load;
pub mod bench_orchestrate;
pub mod bench_remote;
pub mod bench_tokenize;
pub mod client;
pub mod generate;
pub mod models;
pub mod node;
pub mod processes;
pub mod remote_node;
pub mod router;
pub mod testnet;
