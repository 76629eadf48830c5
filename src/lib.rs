//! cortensor: a working implementation of the Cortensor decentralized AI-inference network.
//!
//! - [`models`]: Llama 3 in burn (wgpu or CPU), GGUF/safetensors loaders, tokenizers, chat
//!   templates, sampling, and the [`models::engine::InferenceEngine`] that miners and validators use.
//!
//! See ARCHITECTURE.md for the code map, the message flow and the invariants.
pub mod actors;
pub mod api;
pub mod chain;
pub mod commands;
pub mod config;
pub mod history;
pub mod models;
pub mod nodes;
pub mod reputation;
pub mod session;
pub mod store;
pub mod task;
pub mod testkit;
pub mod testnet;
pub mod tls;
pub mod validation;
