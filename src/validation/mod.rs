//! Validation of miners' results. `consensus`: the session's levels, consensus strategy and
//! disagreement policy, and the pure decision over the validators' evidence; `poi`: Proof of
//! Inference, the agreement of redundant results by the cosine similarity of their
//! embeddings; `likelihood`: a claimed output replayed through the model under the task's
//! sampling and seed; `judge`: Proof of Useful Work, the model grading an answer through a
//! rubric; `embedding_service` and `engine_service`: the embedder and the validators' model on
//! threads of their own; `likelihood_study`: the measurement behind the likelihood thresholds.
//! **Invariant:** the decisions are pure functions of their inputs, so validators, the
//! `/api/v1/validate` endpoint and tests share them without actors.

pub mod consensus;
pub mod embedding_service;
pub mod engine_service;
pub mod judge;
pub mod likelihood;
pub mod likelihood_study;
pub mod poi;
