//! A validator: decides which committed results a task accepts, as the task's session asks:
//! `exact`, the majority of equal results (by their keccak256); `embedding`, Proof of
//! Inference: the results' embeddings, and the cluster within `poi_threshold` of the medoid
//! if it holds more than half (its medoid's result is the one accepted).

use super::messages::Verdict;
use crate::session::ValidationLevel;
use crate::task::{majority, TaskKey, TaskOutcome, TaskResult};
use crate::validation::embedding_service::EmbeddingService;
use crate::validation::poi::poi;
use actix::prelude::*;

pub struct Validator {
    pub id: String,
    pub verdicts: u64,
    /// The embedder, when the network has one (needed for `embedding`).
    embeddings: Option<EmbeddingService>,
}

impl Validator {
    pub fn new(id: String, embeddings: Option<EmbeddingService>) -> Self {
        Self {
            id,
            verdicts: 0,
            embeddings,
        }
    }
}

impl Actor for Validator {
    type Context = Context<Self>;
}

impl Supervised for Validator {}

/// Decide on the committed results of one task: (miner, result) pairs.
#[derive(Message, Clone)]
#[rtype(result = "Verdict")]
pub struct Validate {
    pub key: TaskKey,
    pub results: Vec<(String, TaskResult)>,
    pub level: ValidationLevel,
    pub poi_threshold: f32,
}

impl Handler<Validate> for Validator {
    type Result = ResponseFuture<Verdict>;
    fn handle(&mut self, m: Validate, _: &mut Context<Self>) -> Self::Result {
        self.verdicts += 1;
        match m.level {
            ValidationLevel::Exact => {
                let pairs: Vec<(&str, &TaskResult)> = m
                    .results
                    .iter()
                    .map(|(miner, r)| (miner.as_str(), r))
                    .collect();
                let verdict = majority(&pairs);
                Box::pin(async move { verdict })
            }
            ValidationLevel::Embedding => {
                let service = self.embeddings.clone();
                Box::pin(async move {
                    let Some(service) = service else {
                        tracing::error!(task = %m.key, "embedding validation asked, but this network has no embedder");
                        return None;
                    };
                    let texts = m.results.iter().map(|(_, r)| r.text.clone()).collect();
                    let vectors = match service.embed(texts).await {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::error!(task = %m.key, error = %e, "embedding failed");
                            return None;
                        }
                    };
                    let out = poi(&vectors, m.poi_threshold)?;
                    if !out.has_majority() {
                        return None;
                    }
                    let miners =
                        |ix: &[usize]| ix.iter().map(|&i| m.results[i].0.clone()).collect();
                    Some(TaskOutcome {
                        result: m.results[out.medoid].1.clone(),
                        agreeing: miners(&out.cluster),
                        disagreeing: miners(&out.outliers),
                    })
                })
            }
        }
    }
}
