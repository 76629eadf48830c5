//! The OpenAI-compatible API, `/v1/...`: chat completions, completions and models, with SSE
//! streaming and usage, so OpenAI clients work unchanged. Requests run in the key's default
//! session (or the one named by the `X-Cortensor-Session` header).

use super::auth::Caller;
use super::body::JsonObject;
use super::completion::{self, SamplingFields, StopField, StreamEvent, TaskSpec};
use super::error::ApiError;
use super::routes::Routes;
use super::{views, ApiState};
use crate::models::chat::ChatMessage;
use crate::models::engine::{GenerateRequest, Prompt};
use crate::task::now_ms;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn routes(r: &mut Routes) {
    r.get("/v1/models", models)
        .get("/v1/models/{id}", model)
        .post("/v1/chat/completions", chat_completions)
        .post("/v1/completions", completions);
}

fn model_json(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "cortensor"})
}

async fn models(state: web::Data<ApiState>, _: Caller) -> HttpResponse {
    let data: Vec<Value> = state
        .settings
        .models
        .iter()
        .map(|m| model_json(m))
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

async fn model(
    state: web::Data<ApiState>,
    _: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    check_model(&state, &id)?;
    Ok(HttpResponse::Ok().json(model_json(&id)))
}

fn check_model(state: &ApiState, model: &str) -> Result<(), ApiError> {
    if state.settings.models.iter().any(|m| m == model) {
        return Ok(());
    }
    Err(ApiError::NotFound(
        "model_not_found",
        format!(
            "the model {model:?} does not exist; this network serves {:?}",
            state.settings.models
        ),
    ))
}

fn session_of(caller: &Caller, req: &HttpRequest) -> Result<u64, ApiError> {
    if let Some(v) = req.headers().get("x-cortensor-session") {
        let text = v.to_str().unwrap_or("");
        return super::router_v1::parse_digits(text).ok_or_else(|| {
            ApiError::Invalid(format!(
                "X-Cortensor-Session must be a session id, not {text:?}"
            ))
        });
    }
    caller.key.default_session.ok_or_else(|| {
        ApiError::Invalid("this key has no default session; send X-Cortensor-Session".into())
    })
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Message content: a string, or an array of parts of which text parts are used.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    sampling: SamplingFields,
    stop: Option<StopField>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<MessageIn>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: PromptIn,
    #[serde(flatten)]
    common: Common,
}

/// OpenAI's defaults: temperature 1; no token limit (bounded here by the context).
const OPENAI_DEFAULT_TEMPERATURE: f32 = 1.0;
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;
const CHAT_DEFAULT_MAX_TOKENS: usize = 512;

/// A request's choices (`n`) and prompts (a batch) each run as a task of their own, on
/// miners of their own, in parallel; at most this many per request.
pub const MAX_SUBTASKS: usize = 16;

impl Common {
    fn spec(
        &self,
        session_id: u64,
        prompt: Prompt,
        default_max: usize,
        context: usize,
    ) -> Result<TaskSpec, ApiError> {
        Ok(TaskSpec {
            session_id,
            request: GenerateRequest {
                prompt,
                params: self.sampling.params(OPENAI_DEFAULT_TEMPERATURE)?,
                max_tokens: self
                    .max_completion_tokens
                    .or(self.max_tokens)
                    .unwrap_or(default_max.min(context)),
                stop: self
                    .stop
                    .clone()
                    .map(StopField::into_vec)
                    .transpose()?
                    .unwrap_or_default(),
                prefix: vec![],
            },
            explicit_seed: self.sampling.seed.is_some(),
            timeout: None,
            precommit_timeout: None,
            client_reference: None,
        })
    }

    /// Whether a stream ends with the usage of every choice (`stream_options.include_usage`).
    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }

    /// One task per prompt and choice, prompt-major (OpenAI's choice order). Choice `j` of a
    /// request with a `seed` samples with `seed + j`, so choices differ and each replays.
    fn subtasks(
        &self,
        session_id: u64,
        prompts: Vec<Prompt>,
        default_max: usize,
        context: usize,
    ) -> Result<Vec<TaskSpec>, ApiError> {
        let n = self.n.unwrap_or(1) as usize;
        if n == 0 {
            return Err(ApiError::Invalid("n must be at least 1".into()));
        }
        let count = prompts.len().saturating_mul(n);
        if count > MAX_SUBTASKS {
            return Err(ApiError::Invalid(format!(
                "{} prompt(s) × n = {n} asks for {count} choices; at most {MAX_SUBTASKS} per request",
                prompts.len()
            )));
        }
        let mut specs = Vec::with_capacity(count);
        for prompt in prompts {
            for j in 0..n {
                let mut spec = self.spec(session_id, prompt.clone(), default_max, context)?;
                spec.request.params.seed = spec.request.params.seed.wrapping_add(j as u64);
                specs.push(spec);
            }
        }
        Ok(specs)
    }
}

/// Starts several tasks at once (each admitted, held and queued like any other), returned in
/// the order of `specs`; `live` for streaming. They are submitted together, so one store flush
/// acknowledges them all and their miners start together (one after another, each would wait
/// for its own flush). A refusal drops the ones started: their guards cancel them.
async fn start_subtasks(
    state: &ApiState,
    caller: &Caller,
    specs: Vec<TaskSpec>,
    live: bool,
) -> Result<Vec<completion::Running>, ApiError> {
    let starts = specs
        .into_iter()
        .map(|spec| completion::start(state, caller, spec, live));
    futures_util::future::join_all(starts)
        .await
        .into_iter()
        .collect()
}

/// Runs several tasks at once and returns their records in order. One that fails fails the
/// request; the others run to their end.
async fn run_subtasks(
    state: &ApiState,
    caller: &Caller,
    specs: Vec<TaskSpec>,
) -> Result<Vec<crate::task::TaskRecord>, ApiError> {
    let mut running = start_subtasks(state, caller, specs, false).await?;
    futures_util::future::join_all(running.iter_mut().map(completion::finish))
        .await
        .into_iter()
        .collect()
}

/// The usage of several tasks together.
fn total_usage(records: &[crate::task::TaskRecord]) -> Value {
    let (mut prompt, mut completion) = (0u64, 0u64);
    for r in records {
        let u = views::usage(r);
        prompt += u["prompt_tokens"].as_u64().unwrap_or(0);
        completion += u["completion_tokens"].as_u64().unwrap_or(0);
    }
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A stream's last event (`stream_options.include_usage`): `event` with no choices and the
/// usage of every choice.
fn usage_event(mut event: Value, records: &[crate::task::TaskRecord]) -> Value {
    event["choices"] = json!([]);
    event["usage"] = total_usage(records);
    event
}

/// The answer to a request run as subtasks: their choices in order (`choice` shapes each),
/// the usage of them all, and the tasks (the first names the answer).
fn subtasks_answer(
    records: &[crate::task::TaskRecord],
    id_prefix: &str,
    object: &str,
    model: &str,
    choice: impl Fn(usize, &crate::task::TaskResult) -> Value,
) -> Value {
    let first = records[0].key;
    let choices: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(i, r)| choice(i, &r.outcome.as_ref().expect("completed").result))
        .collect();
    json!({
        "id": format!("{id_prefix}-{}-{}", first.session_id, first.task_id),
        "object": object, "created": now_ms() / 1000, "model": model,
        "choices": choices,
        "usage": total_usage(records),
        "session_id": first.session_id, "task_id": first.task_id,
        "task_ids": records.iter().map(|r| r.key.task_id).collect::<Vec<_>>(),
    })
}

fn chat_prompt(messages: Vec<MessageIn>) -> Result<Prompt, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::Invalid("messages must not be empty".into()));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => return Err(ApiError::Invalid(format!("messages[{i}].role {other:?} is not supported (system, developer, user, assistant)"))),
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::Invalid(format!(
                                "messages[{i}]: only text content parts are supported"
                            )))
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(Prompt::Chat(out))
}

async fn chat_completions(
    state: web::Data<ApiState>,
    caller: Caller,
    req: HttpRequest,
    body: JsonObject<ChatBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    check_model(&state, &body.common.model)?;
    let session_id = session_of(&caller, &req)?;
    let prompt = chat_prompt(body.messages)?;
    let mut specs = body.common.subtasks(
        session_id,
        vec![prompt],
        CHAT_DEFAULT_MAX_TOKENS,
        state.settings.max_context,
    )?;
    let model = body.common.model.clone();
    let created = now_ms() / 1000;
    if specs.len() > 1 && !body.common.stream {
        let records = run_subtasks(&state, &caller, specs).await?;
        let mut answer =
            subtasks_answer(&records, "chatcmpl", "chat.completion", &model, |i, r| {
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                    "logprobs": null,
                })
            });
        answer["system_fingerprint"] = Value::Null;
        return Ok(HttpResponse::Ok().json(answer));
    }
    if body.common.stream {
        let running = start_subtasks(&state, &caller, specs, true).await?;
        return Ok(stream_chat(running, &body.common, model, created));
    }
    let spec = specs.remove(0);
    let mut running = completion::start(&state, &caller, spec, false).await?;
    let key = running.submitted.key;
    let id = format!("chatcmpl-{}-{}", key.session_id, key.task_id);
    let record = completion::finish(&mut running).await?;
    let outcome = record.outcome.as_ref().expect("completed");
    Ok(HttpResponse::Ok().json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": outcome.result.text},
            "finish_reason": outcome.result.finish_reason,
            "logprobs": null,
        }],
        "usage": views::usage(&record),
        "system_fingerprint": null,
        "session_id": key.session_id, "task_id": key.task_id,
    })))
}

/// `chat.completion.chunk` events for a request's choices as they are generated: a role
/// delta per choice first, content deltas tagged with their choice's index, each choice's
/// finish, and (with `stream_options.include_usage`) the usage of them all.
fn stream_chat(
    running: Vec<completion::Running>,
    common: &Common,
    model: String,
    created: u64,
) -> HttpResponse {
    let first = running[0].submitted.key;
    let id = format!("chatcmpl-{}-{}", first.session_id, first.task_id);
    let include_usage = common.include_usage();
    let chunk = move |index: usize, delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": null}],
            "system_fingerprint": null,
        })
    };
    let roles = (0..running.len())
        .map(|i| chunk(i, json!({"role": "assistant", "content": ""}), Value::Null))
        .collect();
    completion::sse_response(running, roles, move |event| match event {
        StreamEvent::Token { index, text } => {
            vec![chunk(index, json!({"content": text}), Value::Null)]
        }
        StreamEvent::Completed {
            index,
            record,
            rest,
        } => {
            let finish = json!(record.outcome.as_ref().map(|o| o.result.finish_reason));
            let mut out = Vec::new();
            if !rest.is_empty() {
                out.push(chunk(index, json!({"content": rest}), Value::Null));
            }
            out.push(chunk(index, json!({}), finish));
            out
        }
        StreamEvent::AllCompleted { records } if include_usage => {
            vec![usage_event(chunk(0, json!({}), Value::Null), records)]
        }
        StreamEvent::AllCompleted { .. } => vec![],
    })
}

async fn completions(
    state: web::Data<ApiState>,
    caller: Caller,
    req: HttpRequest,
    body: JsonObject<CompletionBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    check_model(&state, &body.common.model)?;
    let session_id = session_of(&caller, &req)?;
    let texts = match body.prompt {
        PromptIn::One(s) => vec![s],
        PromptIn::Many(v) if v.is_empty() => {
            return Err(ApiError::Invalid("prompt must not be an empty list".into()))
        }
        PromptIn::Many(v) => v,
    };
    if let Some(i) = texts.iter().position(String::is_empty) {
        return Err(ApiError::Invalid(if texts.len() == 1 {
            "prompt must not be empty".into()
        } else {
            format!("prompt[{i}] must not be empty")
        }));
    }
    let mut specs = body.common.subtasks(
        session_id,
        texts.into_iter().map(Prompt::Text).collect(),
        COMPLETIONS_DEFAULT_MAX_TOKENS,
        state.settings.max_context,
    )?;
    let model = body.common.model.clone();
    let created = now_ms() / 1000;
    if body.common.stream {
        let running = start_subtasks(&state, &caller, specs, true).await?;
        return Ok(stream_completions(running, &body.common, model, created));
    }
    if specs.len() > 1 {
        let records = run_subtasks(&state, &caller, specs).await?;
        let answer = subtasks_answer(
            &records,
            "cmpl",
            "text_completion",
            &model,
            |i, r| json!({"text": r.text, "index": i, "finish_reason": r.finish_reason, "logprobs": null}),
        );
        return Ok(HttpResponse::Ok().json(answer));
    }
    let spec = specs.remove(0);
    let mut running = completion::start(&state, &caller, spec, false).await?;
    let key = running.submitted.key;
    let id = format!("cmpl-{}-{}", key.session_id, key.task_id);
    let record = completion::finish(&mut running).await?;
    let outcome = record.outcome.as_ref().expect("completed");
    Ok(HttpResponse::Ok().json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": outcome.result.text, "index": 0, "finish_reason": outcome.result.finish_reason, "logprobs": null}],
        "usage": views::usage(&record),
        "session_id": key.session_id, "task_id": key.task_id,
    })))
}

/// `text_completion` events for a request's prompts and choices as they are generated,
/// each tagged with its index (prompt-major), each choice's finish, and (with
/// `stream_options.include_usage`) the usage of them all.
fn stream_completions(
    running: Vec<completion::Running>,
    common: &Common,
    model: String,
    created: u64,
) -> HttpResponse {
    let first = running[0].submitted.key;
    let id = format!("cmpl-{}-{}", first.session_id, first.task_id);
    let include_usage = common.include_usage();
    let chunk = move |index: usize, text: &str, finish: Value| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": index, "finish_reason": finish, "logprobs": null}],
        })
    };
    completion::sse_response(running, vec![], move |event| match event {
        StreamEvent::Token { index, text } => vec![chunk(index, text, Value::Null)],
        StreamEvent::Completed {
            index,
            record,
            rest,
        } => {
            let finish = json!(record.outcome.as_ref().map(|o| o.result.finish_reason));
            vec![chunk(index, rest, finish)]
        }
        StreamEvent::AllCompleted { records } if include_usage => {
            vec![usage_event(chunk(0, "", Value::Null), records)]
        }
        StreamEvent::AllCompleted { .. } => vec![],
    })
}
