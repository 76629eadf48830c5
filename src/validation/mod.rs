//! Validation of miners' results beyond exact equality. `poi`: Proof of Inference, the
//! agreement of redundant results measured by the cosine similarity of their embeddings;
//! `embedding_service`: the embedder on a thread of its own, for validators.
//! **Invariant:** the decisions are pure functions of their inputs (embeddings come from
//! `models::bert`), so validators and tests share them without actors.

pub mod embedding_service;
pub mod poi;
