//! Validation of miners' results beyond exact equality. `poi`: Proof of Inference, the
//! agreement of redundant results measured by the cosine similarity of their embeddings.
//! **Invariant:** pure functions of their inputs (embeddings come from `models::bert`), so the
//! validator actor and `POST /api/v1/validate` share them and tests need no actors.

pub mod poi;
