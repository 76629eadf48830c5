//! `POST /api/v1/validate`: Cortensor's validation endpoint. A client sends an input and one or
//! more outputs (`task_request_input`, `task_result_output`, `task_domain`, `task_type`,
//! `evaluation_mode`); the network's validators gather evidence as they do for tasks and the
//! same decision (`validation::consensus::decide`) returns VALID, INVALID, RETRY or NEEDS_SPEC
//! with reasons and per-output evidence.

use super::auth::Caller;
use super::body::JsonObject;
use super::error::ApiError;
use super::ApiState;
use crate::actors::validator::{gather_evidence, Validate};
use crate::models::chat::ChatMessage;
use crate::models::engine::{FinishReason, GenerateRequest, Prompt};
use crate::models::sampling::SamplingParams;
use crate::session::{default_judge_threshold, default_poi_threshold};
use crate::task::{TaskKey, TaskResult};
use crate::validation::consensus::{
    decide, Consensus, Decision, DisagreementPolicy, Level, Levels, ValidationPlan, VerdictLabel,
};
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// Outputs one request may carry at most.
pub const MAX_OUTPUTS: usize = 16;
/// How long the validators may take.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(120);

/// An output as given: its text, or `{"miner": ..., "output": ...}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Output {
    Text(String),
    Named { miner: String, output: String },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Outputs {
    One(String),
    Many(Vec<Output>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateBody {
    task_request_input: Option<String>,
    task_result_output: Option<Outputs>,
    /// Free text ("general", "math", "code"...): echoed in the verdict.
    #[serde(default)]
    task_domain: Option<String>,
    /// "chat" (default: the input is a user message) or "completion" (raw text).
    #[serde(default)]
    task_type: Option<String>,
    /// Levels: a name or a list (default `likelihood`).
    #[serde(default)]
    evaluation_mode: Option<Levels>,
    #[serde(default)]
    consensus: Consensus,
    #[serde(default)]
    disagreement_policy: DisagreementPolicy,
    // Floats are read as f64 and checked before they become f32, so a value just past a bound
    // cannot round onto it.
    #[serde(default = "default_poi_threshold_f64")]
    poi_threshold: f64,
    #[serde(default = "default_judge_threshold_f64")]
    judge_threshold: f64,
    /// The sampling the outputs were made with; with `seed`, the replay checks that the
    /// sampler itself draws them.
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    seed: Option<u64>,
    /// How many validators to ask (default 1; at most the network's).
    #[serde(default)]
    num_of_validator_nodes: Option<u32>,
}

fn default_poi_threshold_f64() -> f64 {
    default_poi_threshold() as f64
}

fn default_judge_threshold_f64() -> f64 {
    default_judge_threshold() as f64
}

/// The engine's temperature range (`SamplingParams::validate`).
const TEMPERATURE_MAX: f64 = 100.0;

fn needs_spec(reason: String) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "verdict": VerdictLabel::NeedsSpec,
        "consensus": false,
        "reasons": [reason],
        "results": [],
    }))
}

pub async fn validate(
    state: web::Data<ApiState>,
    caller: Caller,
    body: JsonObject<ValidateBody>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let levels = b
        .evaluation_mode
        .clone()
        .unwrap_or_else(|| Levels::new([Level::Likelihood]));
    if !(b.poi_threshold > 0.0 && b.poi_threshold <= 1.0) {
        return Err(ApiError::Invalid(
            "poi_threshold must be above 0 and at most 1".into(),
        ));
    }
    if !(1.0..=10.0).contains(&b.judge_threshold) {
        return Err(ApiError::Invalid(
            "judge_threshold must be between 1 and 10".into(),
        ));
    }
    if b.temperature
        .is_some_and(|t| !(0.0..=TEMPERATURE_MAX).contains(&t))
    {
        return Err(ApiError::Invalid(format!(
            "temperature must be between 0 and {TEMPERATURE_MAX}"
        )));
    }
    if b.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(ApiError::Invalid(
            "top_p must be above 0 and at most 1".into(),
        ));
    }
    let params = SamplingParams {
        temperature: b.temperature.unwrap_or(0.0) as f32,
        top_p: b.top_p.unwrap_or(1.0) as f32,
        top_k: b.top_k.unwrap_or(0),
        seed: b.seed.unwrap_or(0),
        ..SamplingParams::default()
    };
    params
        .validate()
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    state
        .settings
        .check_levels(&levels, "evaluation_mode")
        .map_err(ApiError::Invalid)?;
    let task_type = b.task_type.as_deref().unwrap_or("chat");
    if !matches!(task_type, "chat" | "completion") {
        return Err(ApiError::Invalid(format!(
            "task_type must be \"chat\" or \"completion\", got {task_type:?}"
        )));
    }

    // What the request does not say is a verdict of its own, not an error.
    let input = b.task_request_input.unwrap_or_default();
    if input.trim().is_empty() {
        return Ok(needs_spec("task_request_input is missing or empty".into()));
    }
    let outputs: Vec<(String, String)> = match b.task_result_output {
        None => vec![],
        Some(Outputs::One(text)) => vec![("output-0".into(), text)],
        Some(Outputs::Many(list)) => list
            .into_iter()
            .enumerate()
            .map(|(i, o)| match o {
                Output::Text(text) => (format!("output-{i}"), text),
                Output::Named { miner, output } => (miner, output),
            })
            .collect(),
    };
    if outputs.is_empty() {
        return Ok(needs_spec("task_result_output is missing or empty".into()));
    }
    if outputs.len() > MAX_OUTPUTS {
        return Err(ApiError::Invalid(format!(
            "task_result_output may hold at most {MAX_OUTPUTS} outputs, got {}",
            outputs.len()
        )));
    }
    if let Some((name, _)) = outputs.iter().find(|(_, text)| text.is_empty()) {
        return Ok(needs_spec(format!("the output of {name} is empty")));
    }
    let mut names: Vec<&String> = outputs.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    if names.len() != outputs.len() {
        return Err(ApiError::Invalid(
            "output names (miner) must be unique".into(),
        ));
    }
    for level in [Level::Exact, Level::Embedding] {
        if levels.has(level) && outputs.len() < 2 {
            return Ok(needs_spec(format!(
                "evaluation_mode \"{}\" compares outputs with each other: send at least two",
                level.name()
            )));
        }
    }

    let prompt = match task_type {
        "completion" => Prompt::Text(input.clone()),
        // The input exactly as the outputs' generation saw it (a user message): anything added
        // here would change what the replay expects.
        _ => Prompt::Chat(vec![ChatMessage::user(input.clone())]),
    };
    let request = GenerateRequest {
        prompt,
        params,
        max_tokens: state.settings.max_context,
        stop: vec![],
        prefix: vec![],
    };
    // Token ids are left to the validators' model (`token_ids` empty: tokenize the text);
    // the end of a client's output is not checked (its finish is unknown).
    let results: Vec<(String, TaskResult)> = outputs
        .into_iter()
        .map(|(miner, text)| {
            (
                miner,
                TaskResult {
                    text,
                    token_ids: vec![],
                    finish_reason: FinishReason::Cancelled,
                    prompt_tokens: 0,
                },
            )
        })
        .collect();
    let plan = ValidationPlan::new(
        levels,
        b.consensus,
        b.disagreement_policy,
        b.poi_threshold as f32,
        b.judge_threshold as f32,
    );
    let ask = Validate {
        key: TaskKey {
            session_id: 0,
            task_id: 0,
        },
        request,
        results: results.clone(),
        plan: plan.clone(),
        seeded: b.seed.is_some(),
    };
    // The validators' work is the network's as a task's is: admitted within the key's
    // in-flight bound and counted against its task quota (a well-formed request only).
    let _permit = state
        .admission
        .try_admit(&caller.owner, caller.key.max_inflight)?;
    state.keys.take_task(&caller.key_hash, &caller.key).await?;
    let count = b.num_of_validator_nodes.unwrap_or(1) as usize;
    let validators = state
        .actors
        .queue
        .send(crate::actors::session_queue::GetValidators)
        .await
        .unwrap_or_default();
    let evidence = gather_evidence(&validators, count, &mut 0, ask, VALIDATE_TIMEOUT).await;
    for e in &evidence {
        if let Some(err) = e.errors.iter().find(|e| e.contains("exceeds the context")) {
            return Err(ApiError::Invalid(err.clone()));
        }
    }
    let reputation: HashMap<String, i64> = HashMap::new();
    let decision = decide(&results, &evidence, &plan, &reputation);
    let mut out = view(&decision, &plan, &evidence);
    out["task_domain"] = json!(b.task_domain);
    out["task_type"] = json!(task_type);
    Ok(HttpResponse::Ok().json(out))
}

fn view(
    d: &Decision,
    plan: &ValidationPlan,
    evidence: &[crate::validation::consensus::Evidence],
) -> serde_json::Value {
    json!({
        "verdict": d.verdict,
        "consensus": d.consensus,
        "reasons": d.reasons,
        "evaluation_mode": plan.levels,
        "consensus_strategy": plan.consensus,
        "disagreement_policy": plan.policy,
        "accepted_output": d.chosen,
        "results": d.miners,
        "validators": evidence.iter().map(|e| &e.validator).collect::<Vec<_>>(),
        "evidence": evidence,
    })
}
