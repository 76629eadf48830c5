//! A validator: gathers the evidence a task's session asks for about its committed results
//! (see `validation::consensus`): `embedding`, each result's cosine similarity to the medoid of
//! all results (Proof of Inference); `likelihood`, each result replayed through the
//! validator's own model under the task's sampling and seed; `judge`, each result graded by
//! the validator's model (Proof of Useful Work). `none` and `exact` need no evidence: the
//! queue decides them from the results alone.

use crate::models::engine::{GenerateRequest, InferenceEngine, Prompt};
use crate::task::{TaskKey, TaskResult};
use crate::validation::consensus::{
    check_evidence, Evidence, Level, MinerEvidence, ValidationPlan,
};
use crate::validation::embedding_service::EmbeddingService;
use crate::validation::engine_service::EngineService;
use crate::validation::poi::poi;
use crate::validation::{judge, likelihood};
use actix::prelude::*;

pub struct Validator {
    pub id: String,
    pub requests: u64,
    /// The embedder, when the network has one (needed for `embedding`).
    embeddings: Option<EmbeddingService>,
    /// The model, when the network gives validators one (needed for `likelihood`, `judge`).
    engine: Option<EngineService>,
}

impl Validator {
    pub fn new(
        id: String,
        embeddings: Option<EmbeddingService>,
        engine: Option<EngineService>,
    ) -> Self {
        Self {
            id,
            requests: 0,
            embeddings,
            engine,
        }
    }
}

impl Actor for Validator {
    type Context = Context<Self>;
}

impl Supervised for Validator {}

/// Gather evidence about the committed results of one task: (miner, result) pairs.
#[derive(Message, Clone)]
#[rtype(result = "Evidence")]
pub struct Validate {
    pub key: TaskKey,
    pub request: GenerateRequest,
    pub results: Vec<(String, TaskResult)>,
    pub plan: ValidationPlan,
    /// The replay may use the request's seed (a task's own; not a client's output checked
    /// through `/api/v1/validate`, whose seed is unknown).
    pub seeded: bool,
}

impl Handler<Validate> for Validator {
    type Result = ResponseFuture<Evidence>;
    fn handle(&mut self, m: Validate, _: &mut Context<Self>) -> Self::Result {
        self.requests += 1;
        let embeddings = self.embeddings.clone();
        let engine = self.engine.clone();
        let validator = self.id.clone();
        Box::pin(async move {
            let mut evidence = Evidence {
                validator,
                miners: m
                    .results
                    .iter()
                    .map(|(miner, _)| MinerEvidence {
                        miner: miner.clone(),
                        ..MinerEvidence::default()
                    })
                    .collect(),
                errors: vec![],
            };
            if m.plan.levels.has(Level::Embedding) {
                embedding_evidence(&m, embeddings.as_ref(), &mut evidence).await;
            }
            if m.plan.levels.has(Level::Likelihood) || m.plan.levels.has(Level::Judge) {
                match engine.as_ref() {
                    Some(engine) => model_evidence(&m, engine, &mut evidence).await,
                    None => evidence
                        .errors
                        .push("this network gives validators no model".into()),
                }
            }
            evidence
        })
    }
}

/// Asks `count` of `validators` (all of them when there are no more), drawn at random for
/// the task: the draw is seeded by the task's key and `*next` (a counter the caller keeps), so
/// a validator cannot tell in advance which tasks it will judge, and the same seed draws the
/// same validators. Returns the evidence of those that answered within `timeout`, each
/// bounded by `consensus::check_evidence` (evidence out of range or about other miners comes
/// back as a validator that could not check, so it is not paid). Asks nobody when the plan
/// needs no validator.
pub fn gather_evidence(
    validators: &[Recipient<Validate>],
    count: usize,
    next: &mut usize,
    m: Validate,
    timeout: std::time::Duration,
) -> impl std::future::Future<Output = Vec<Evidence>> {
    let mut asks = Vec::new();
    if m.plan.levels.needs_validators() && !validators.is_empty() {
        let seed = validator_draw_seed(m.key, *next);
        *next = next.wrapping_add(1);
        for i in draw_validators(validators.len(), count, seed) {
            asks.push(validators[i].send(m.clone()).timeout(timeout));
        }
    }
    let miners: Vec<String> = m.results.iter().map(|(miner, _)| miner.clone()).collect();
    async move {
        let names: Vec<&str> = miners.iter().map(String::as_str).collect();
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .map(|e| check_evidence(e, &names))
            .collect()
    }
}

/// The seed of the validators drawn for the `draw`-th validation of task `key`.
pub fn validator_draw_seed(key: TaskKey, draw: usize) -> u64 {
    let h = ethers::utils::keccak256(
        [
            key.session_id.to_be_bytes(),
            key.task_id.to_be_bytes(),
            (draw as u64).to_be_bytes(),
        ]
        .concat(),
    );
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

/// `count` (at least one, at most `n`) distinct indexes below `n`, drawn with `seed`.
pub fn draw_validators(n: usize, count: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    if n == 0 {
        return vec![];
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rand::seq::index::sample(&mut rng, n, count.clamp(1, n)).into_vec()
}

async fn embedding_evidence(
    m: &Validate,
    service: Option<&EmbeddingService>,
    evidence: &mut Evidence,
) {
    let Some(service) = service else {
        evidence
            .errors
            .push("embedding: this network has no embedder".into());
        return;
    };
    let texts = m.results.iter().map(|(_, r)| r.text.clone()).collect();
    match service.embed(texts).await {
        Ok(vectors) => {
            if let Some(out) = poi(&vectors, m.plan.poi_threshold) {
                for (e, s) in evidence.miners.iter_mut().zip(out.similarity_to_medoid) {
                    e.similarity = Some(s);
                }
            }
        }
        Err(e) => evidence.errors.push(format!("embedding: {e}")),
    }
}

/// The question a judge reads: the prompt's text, or its last user message.
fn question(engine: &dyn InferenceEngine, prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .or(messages.last())
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        Prompt::Tokens(ids) => engine.detokenize(ids),
    }
}

/// The token ids of an output given as text (`/api/v1/validate`): its tokenization without
/// the BOS the tokenizer may put first.
fn output_tokens(
    engine: &mut dyn InferenceEngine,
    text: &str,
) -> Result<Vec<u32>, crate::models::engine::EngineError> {
    let ids = engine.tokenize(&Prompt::Text(text.to_string()))?;
    let lead = engine
        .tokenize(&Prompt::Text(String::new()))
        .unwrap_or_default();
    Ok(match ids.strip_prefix(lead.as_slice()) {
        Some(rest) if !lead.is_empty() => rest.to_vec(),
        _ => ids,
    })
}

async fn model_evidence(m: &Validate, engine: &EngineService, evidence: &mut Evidence) {
    let likely = m.plan.levels.has(Level::Likelihood);
    let judged = m.plan.levels.has(Level::Judge);
    for (i, (_, result)) in m.results.iter().enumerate() {
        let (request, result, plan, seeded) =
            (m.request.clone(), result.clone(), m.plan.clone(), m.seeded);
        let found = engine
            .run(move |engine| {
                let mut out = MinerEvidence::default();
                if likely {
                    let ids = if result.token_ids.is_empty() {
                        output_tokens(engine, &result.text)?
                    } else {
                        result.token_ids.clone()
                    };
                    let replay = engine.replay(&request, &ids)?;
                    // A chunk's replay checks the tokens after the output accepted before.
                    let new = &ids[request.prefix.len().min(ids.len())..];
                    let e = likelihood::evidence(&replay, &request, new, result.finish_reason);
                    out.likelihood_failures =
                        likelihood::judge(&e, &request, seeded, &plan.likelihood);
                    out.likelihood = Some(e);
                }
                if judged {
                    let q = question(engine, &request.prompt);
                    out.grade = Some(judge::grade(engine, &q, &result.text)?);
                }
                Ok(out)
            })
            .await;
        match found {
            Ok(found) => {
                let e = &mut evidence.miners[i];
                e.likelihood = found.likelihood;
                e.likelihood_failures = found.likelihood_failures;
                e.grade = found.grade;
            }
            Err(err) => evidence
                .errors
                .push(format!("{}: {err}", evidence.miners[i].miner)),
        }
    }
}
