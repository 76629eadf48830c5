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

impl Common {
    fn spec(
        &self,
        session_id: u64,
        prompt: Prompt,
        default_max: usize,
        context: usize,
    ) -> Result<TaskSpec, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::Invalid(
                "n must be 1: each task returns one validated choice".into(),
            ));
        }
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
            },
            explicit_seed: self.sampling.seed.is_some(),
            timeout: None,
            precommit_timeout: None,
            client_reference: None,
        })
    }
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
    let spec = body.common.spec(
        session_id,
        prompt,
        CHAT_DEFAULT_MAX_TOKENS,
        state.settings.max_context,
    )?;
    let mut running = completion::start(&state, &caller, spec, body.common.stream).await?;
    let key = running.submitted.key;
    let id = format!("chatcmpl-{}-{}", key.session_id, key.task_id);
    let model = body.common.model.clone();
    let created = now_ms() / 1000;
    if !body.common.stream {
        let record = completion::finish(&mut running).await?;
        let outcome = record.outcome.as_ref().expect("completed");
        return Ok(HttpResponse::Ok().json(json!({
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
        })));
    }
    let include_usage = body
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let chunk = move |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
            "system_fingerprint": null,
        })
    };
    let first = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    Ok(completion::sse_response(
        running,
        first,
        move |event| match event {
            StreamEvent::Token(text) => vec![chunk(json!({"content": text}), Value::Null)],
            StreamEvent::Completed { record, rest } => {
                let finish = json!(record.outcome.as_ref().map(|o| o.result.finish_reason));
                let mut out = Vec::new();
                if !rest.is_empty() {
                    out.push(chunk(json!({"content": rest}), Value::Null));
                }
                out.push(chunk(json!({}), finish));
                if include_usage {
                    let mut u = chunk(json!({}), Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = views::usage(record);
                    out.push(u);
                }
                out
            }
        },
    ))
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
    let text = match body.prompt {
        PromptIn::One(s) => s,
        PromptIn::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptIn::Many(_) => {
            return Err(ApiError::Invalid(
                "prompt must be one string (batches are not supported)".into(),
            ))
        }
    };
    if text.is_empty() {
        return Err(ApiError::Invalid("prompt must not be empty".into()));
    }
    let spec = body.common.spec(
        session_id,
        Prompt::Text(text),
        COMPLETIONS_DEFAULT_MAX_TOKENS,
        state.settings.max_context,
    )?;
    let mut running = completion::start(&state, &caller, spec, body.common.stream).await?;
    let key = running.submitted.key;
    let id = format!("cmpl-{}-{}", key.session_id, key.task_id);
    let model = body.common.model.clone();
    let created = now_ms() / 1000;
    if !body.common.stream {
        let record = completion::finish(&mut running).await?;
        let outcome = record.outcome.as_ref().expect("completed");
        return Ok(HttpResponse::Ok().json(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": outcome.result.text, "index": 0, "finish_reason": outcome.result.finish_reason, "logprobs": null}],
            "usage": views::usage(&record),
            "session_id": key.session_id, "task_id": key.task_id,
        })));
    }
    let include_usage = body
        .common
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let chunk = move |text: &str, finish: Value| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": null}],
        })
    };
    Ok(completion::sse_response(
        running,
        vec![],
        move |event| match event {
            StreamEvent::Token(text) => vec![chunk(text, Value::Null)],
            StreamEvent::Completed { record, rest } => {
                let finish = json!(record.outcome.as_ref().map(|o| o.result.finish_reason));
                let mut out = vec![chunk(rest, finish)];
                if include_usage {
                    let mut u = chunk("", Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = views::usage(record);
                    out.push(u);
                }
                out
            }
        },
    ))
}
