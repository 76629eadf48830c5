//! Everything about running a Llama-architecture model: loading weights (GGUF, Hugging Face
//! safetensors), tokenizers and chat templates, the transformer in burn, sampling, backend
//! selection, and the engine interface that miners and validators call.
//!
//! Architecture invariant: nothing here knows about actors, HTTP or the chain.

pub mod backend;
pub mod bert;
pub mod chat;
pub mod config;
pub mod engine;
pub mod fetch;
pub mod gguf;
pub mod gguf_write;
pub mod llama;
pub mod qmatmul;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod tokenizer;
pub mod weights;
pub mod wordpiece;
