//! Cortensor's router API, `/api/v1/...`: info, status, miners, sessions, tasks, ping,
//! completions (JSON or SSE) and, our addition for the embedded ledger, session creation.

use super::auth::Caller;
use super::body::JsonObject;
use super::completion::{self, SamplingFields, StopField, StreamEvent, TaskSpec};
use super::error::ApiError;
use super::routes::Routes;
use super::{views, ApiState};
use crate::actors::chain_bridge::{
    GetNodeStats, GetSession, GetTaskTrace, ListSessions, NodePendingPayment,
};
use crate::actors::node_pool::{ListNodes, PinDedicated, PinError, Unpin};
use crate::actors::router::OpenSession;
use crate::actors::session_queue::{CancelTask, GetStats, GetTask};
use crate::models::chat::ChatMessage;
use crate::models::engine::{GenerateRequest, Prompt};
use crate::session::{Session, SessionMode, SessionParams};
use crate::task::{now_ms, TaskKey, TaskRecord};
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

pub fn routes(r: &mut Routes) {
    r.get("/api/v1/info", info)
        .get("/api/v1/ping", ping)
        .get("/api/v1/status", status)
        .get("/api/v1/miners", miners)
        .get("/api/v1/sessions", sessions)
        .post("/api/v1/sessions", create_session)
        .get("/api/v1/sessions/{id}", session)
        .post("/api/v1/sessions/{id}/nodes", pin_node)
        .delete("/api/v1/sessions/{id}/nodes/{node}", unpin_node)
        .get("/api/v1/tasks/{sid}", tasks)
        .get("/api/v1/tasks/{sid}/{tid}", task)
        .post("/api/v1/tasks/{sid}/{tid}/cancel", cancel)
        .get("/api/v1/tasks/{sid}/{tid}/chain", task_on_chain)
        .post("/api/v1/completions", completions)
        .post("/api/v1/validate", super::validate::validate)
        .post("/api/v1/completions/{sid}", completions_in_session)
        .get("/api/v1/ws", super::ws::websocket);
}

/// Accepts ids as numbers or as strings of digits.
pub fn id_from_any<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("an id must be a non-negative integer")),
        Some(Value::String(s)) => parse_digits(&s)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not an id"))),
        Some(other) => Err(serde::de::Error::custom(format!("{other} is not an id"))),
    }
}

async fn info(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "name": "cortensor",
        "role": "router",
        "version": env!("CARGO_PKG_VERSION"),
        "chain": state.chain,
        "models": state.settings.models,
        "max_context": state.settings.max_context,
        "price_per_token": state.settings.price_per_token,
        "uptime_s": state.started.elapsed().as_secs(),
    }))
}

async fn ping() -> HttpResponse {
    HttpResponse::Ok().json(json!({"pong": true, "time": now_ms() / 1000}))
}

async fn status(state: web::Data<ApiState>, _: Caller) -> Result<HttpResponse, ApiError> {
    let stats = state.actors.queue.send(GetStats).await?;
    let nodes = state.actors.pool.send(ListNodes).await?;
    let online = nodes
        .iter()
        .filter(|n| n.state != crate::actors::node_pool::NodeState::Offline)
        .count();
    Ok(HttpResponse::Ok().json(json!({
        "status": if online > 0 { "ok" } else { "degraded" },
        "miners": {"total": nodes.len(), "online": online},
        "tasks": {"live": stats.live, "ended": stats.ended},
        "in_flight": state.admission.in_flight(),
        "uptime_s": state.started.elapsed().as_secs(),
    })))
}

async fn miners(state: web::Data<ApiState>, _: Caller) -> Result<HttpResponse, ApiError> {
    let nodes = state.actors.pool.send(ListNodes).await?;
    let mut by_id = serde_json::Map::new();
    let mut by_state = serde_json::Map::new();
    for n in &nodes {
        let pending = state
            .actors
            .chain
            .send(NodePendingPayment(n.id.clone()))
            .await?
            .unwrap_or(0);
        let on_chain = state
            .actors
            .chain
            .send(GetNodeStats(n.id.clone()))
            .await?
            .ok();
        let mut view = serde_json::to_value(n).expect("node views serialize");
        view["pending_payment"] = json!(pending);
        // The node's record on chain (NodeReputation): counters and the contract's level.
        view["chain_record"] = json!(on_chain);
        by_id.insert(n.id.clone(), view);
        let key = serde_json::to_value(n.state).expect("states serialize");
        let entry = by_state
            .entry(key.as_str().unwrap_or("unknown").to_string())
            .or_insert(json!(0));
        *entry = json!(entry.as_u64().unwrap_or(0) + 1);
    }
    let stats = if nodes.is_empty() {
        json!({})
    } else {
        json!({"total": nodes.len(), "by_state": by_state})
    };
    Ok(HttpResponse::Ok().json(json!({"nodes": by_id, "stats": stats})))
}

#[derive(Deserialize)]
struct SessionsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// Most sessions one listing returns.
const MAX_SESSIONS_LISTED: usize = 1000;

/// The caller's sessions.
async fn owned_sessions(state: &ApiState, caller: &Caller) -> Result<Vec<Session>, ApiError> {
    let all = state
        .actors
        .chain
        .send(ListSessions)
        .await?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(all
        .into_iter()
        .filter(|s| s.owner == caller.owner)
        .collect())
}

/// The caller's sessions in id order, a page at a time: `after` (an id) and `limit` (100,
/// at most 1,000); `count` is how many it has in all, `next_after` where the next page starts.
async fn sessions(
    state: web::Data<ApiState>,
    caller: Caller,
    query: web::Query<SessionsQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_SESSIONS_LISTED);
    let mut mine = owned_sessions(&state, &caller).await?;
    mine.sort_by_key(|s| s.id);
    let count = mine.len();
    let page: Vec<&Session> = mine
        .iter()
        .filter(|s| query.after.is_none_or(|after| s.id > after))
        .take(limit)
        .collect();
    let next_after = (page.len() == limit)
        .then(|| page.last().map(|s| s.id))
        .flatten()
        .filter(|last| mine.last().is_some_and(|s| s.id > *last));
    let sessions: Vec<Value> = page.into_iter().map(views::session).collect();
    Ok(HttpResponse::Ok().json(json!({
        "count": count,
        "sessions": sessions,
        "next_after": next_after,
    })))
}

/// The caller's session, or 404 / 403.
pub async fn owned_session(
    state: &ApiState,
    caller: &Caller,
    id: u64,
) -> Result<Session, ApiError> {
    let session = any_session(state, id).await?;
    if session.owner != caller.owner {
        return Err(ApiError::Forbidden(format!(
            "session {id} belongs to another key"
        )));
    }
    Ok(session)
}

async fn session(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id("session id", &id)?;
    let s = owned_session(&state, &caller, id).await?;
    Ok(HttpResponse::Ok().json(views::session(&s)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    node: String,
}

/// Pins a node to a dedicated session (Cortensor's `addDedicatedNode`): it skips the pool and
/// its validation and serves this session alone, until the session's reservation period ends
/// or the pin is undone. An operator's act: a client pinning nodes could take the pool.
async fn pin_node(
    state: web::Data<ApiState>,
    caller: Caller,
    id: web::Path<String>,
    body: JsonObject<PinBody>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id("session id", &id)?;
    if !caller.is_operator() {
        return Err(ApiError::Forbidden(
            "pinning a node to a session is an operator's act".into(),
        ));
    }
    let s = any_session(&state, id).await?;
    if s.params.mode != SessionMode::Dedicated {
        return Err(ApiError::Invalid(format!(
            "session {id} is not dedicated (mode 2): only dedicated sessions take pinned nodes"
        )));
    }
    let node = body.into_inner().node;
    match state
        .actors
        .pool
        .send(PinDedicated {
            miner: node.clone(),
            session: id,
            for_s: s.params.reserve_period,
        })
        .await?
    {
        Ok(()) => {
            Ok(HttpResponse::Ok().json(json!({"session_id": id, "node": node, "pinned": true})))
        }
        Err(e @ PinError::UnknownNode(_)) => {
            Err(ApiError::NotFound("node_not_found", e.to_string()))
        }
        Err(e @ PinError::Taken { .. }) => Err(ApiError::Conflict(e.to_string())),
    }
}

/// Undoes a pin: the node leaves the session and revalidates before it rejoins the pool. The
/// session's owner or an operator.
async fn unpin_node(
    state: web::Data<ApiState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, node) = path.into_inner();
    let id = parse_id("session id", &id)?;
    if caller.is_operator() {
        any_session(&state, id).await?;
    } else {
        owned_session(&state, &caller, id).await?;
    }
    match state
        .actors
        .pool
        .send(Unpin {
            miner: node.clone(),
            session: id,
        })
        .await?
    {
        Ok(()) => {
            Ok(HttpResponse::Ok().json(json!({"session_id": id, "node": node, "pinned": false})))
        }
        Err(e) => Err(ApiError::NotFound("node_not_found", e.to_string())),
    }
}

/// Any session (an operator's view), or 404.
async fn any_session(state: &ApiState, id: u64) -> Result<Session, ApiError> {
    state
        .actors
        .chain
        .send(GetSession(id))
        .await?
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError::NotFound("session_not_found", format!("session {id} does not exist"))
        })
}

/// What a client key may not ask of the network (operators' keys are not limited but for
/// the reservation period).
async fn check_session_limits(
    state: &ApiState,
    caller: &Caller,
    params: &SessionParams,
) -> Result<(), ApiError> {
    if params.reserve_period > state.max_reserve_period_s {
        return Err(ApiError::Invalid(format!(
            "reserve_period may be at most {} seconds on this router",
            state.max_reserve_period_s
        )));
    }
    if caller.is_operator() {
        return Ok(());
    }
    if params.mode != SessionMode::Ephemeral && params.max_num_of_nodes > state.max_reserved_nodes {
        return Err(ApiError::Forbidden(format!(
            "a hybrid or dedicated session of this key may reserve at most {} nodes \
             (max_num_of_nodes)",
            state.max_reserved_nodes
        )));
    }
    Ok(())
}

/// A u64 written as ASCII digits only (no sign, no spaces): what the OpenAPI document says an
/// id in a string is (`^[0-9]{1,20}$`).
pub fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_id(what: &str, text: &str) -> Result<u64, ApiError> {
    parse_digits(text).ok_or_else(|| {
        ApiError::Invalid(format!(
            "{what} must be a non-negative integer, not {text:?}"
        ))
    })
}

#[derive(Deserialize)]
struct CreateSessionBody {
    #[serde(flatten)]
    params: Value,
    deposit: Option<u64>,
}

async fn create_session(
    state: web::Data<ApiState>,
    caller: Caller,
    body: JsonObject<CreateSessionBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let params: SessionParams = serde_json::from_value(body.params)
        .map_err(|e| ApiError::Invalid(format!("invalid session parameters: {e}")))?;
    params.validate().map_err(ApiError::Invalid)?;
    check_session_limits(&state, &caller, &params).await?;
    let deposit = body.deposit.unwrap_or(state.default_deposit);
    let (keys, hash, key) = (&state.keys, &caller.key_hash, &caller.key);
    keys.take_session(hash, key, state.max_sessions_per_key)
        .await?;
    // The deposit comes out of the key's credit (an operator's grant), never from nothing.
    if let Err(e) = keys.spend_credit(hash, key, deposit).await {
        keys.give_back_session(hash, key).await?;
        return Err(e.into());
    }
    let open = OpenSession {
        owner: caller.owner.clone(),
        params,
        deposit,
    };
    let session = match state.actors.router.send(open).await {
        Ok(Ok(session)) => session,
        failed => {
            keys.refund_credit(hash, key, deposit).await?;
            keys.give_back_session(hash, key).await?;
            failed??
        }
    };
    Ok(HttpResponse::Created()
        .json(json!({"session_id": session.id, "session": views::session(&session)})))
}

#[derive(Deserialize)]
struct TasksQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// Most tasks one listing returns.
const MAX_TASKS_LISTED: usize = 1000;

async fn tasks(
    state: web::Data<ApiState>,
    caller: Caller,
    sid: web::Path<String>,
    query: web::Query<TasksQuery>,
) -> Result<HttpResponse, ApiError> {
    let sid = parse_id("session id", &sid)?;
    owned_session(&state, &caller, sid).await?;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_TASKS_LISTED);
    let after = query.after.unwrap_or(0);
    // Read through the queue, which knows the live state of unfinished tasks. No task comes
    // after u64::MAX (and `after + 1` must not overflow).
    let mut out = Vec::new();
    let mut next = after.checked_add(1);
    while let (Some(task_id), true) = (next, out.len() < limit) {
        let key = TaskKey {
            session_id: sid,
            task_id,
        };
        match state
            .actors
            .queue
            .send(GetTask(key))
            .await?
            .map_err(|e| ApiError::Internal(e.to_string()))?
        {
            Some(t) => out.push(views::task(&t)),
            None => break,
        }
        next = task_id.checked_add(1);
    }
    Ok(HttpResponse::Ok().json(json!({"session_id": sid, "count": out.len(), "tasks": out})))
}

async fn owned_task(
    state: &ApiState,
    caller: &Caller,
    sid: &str,
    tid: &str,
) -> Result<TaskRecord, ApiError> {
    let key = TaskKey {
        session_id: parse_id("session id", sid)?,
        task_id: parse_id("task id", tid)?,
    };
    let task = state
        .actors
        .queue
        .send(GetTask(key))
        .await?
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError::NotFound("task_not_found", format!("task {key} does not exist"))
        })?;
    if task.owner != caller.owner {
        return Err(ApiError::Forbidden(format!(
            "task {key} belongs to another key"
        )));
    }
    Ok(task)
}

async fn task(
    state: web::Data<ApiState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let t = owned_task(&state, &caller, &path.0, &path.1).await?;
    Ok(HttpResponse::Ok().json(views::task(&t)))
}

/// What the chain recorded of a task's stages (sessions with `task_record: per_stage`; the
/// record arrives with the task's settlement, shortly after the task ends).
async fn task_on_chain(
    state: web::Data<ApiState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let t = owned_task(&state, &caller, &path.0, &path.1).await?;
    let trace = state
        .actors
        .chain
        .send(GetTaskTrace(t.key))
        .await?
        .map_err(|e| ApiError::ChainUnavailable(e.to_string(), 5))?;
    Ok(HttpResponse::Ok().json(views::task_on_chain(&t, trace.as_ref())))
}

async fn cancel(
    state: web::Data<ApiState>,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let t = owned_task(&state, &caller, &path.0, &path.1).await?;
    let t = state
        .actors
        .queue
        .send(CancelTask(t.key))
        .await?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(views::task(&t)))
}

/// Cortensor's completion request.
#[derive(Deserialize, Debug)]
pub struct CompletionBody {
    #[serde(default, deserialize_with = "id_from_any")]
    pub session_id: Option<u64>,
    pub prompt: String,
    /// 0 default (chat template), 1 raw, 2 `prompt_template` as system message + prompt.
    #[serde(default)]
    pub prompt_type: u8,
    #[serde(default)]
    pub prompt_template: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub timeout: Option<f64>,
    pub precommit_timeout: Option<f64>,
    pub client_reference: Option<String>,
    pub max_tokens: Option<usize>,
    pub stop: Option<StopField>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Defaults of the router API where a request is silent.
pub const DEFAULT_MAX_TOKENS: usize = 128;
pub const DEFAULT_TEMPERATURE: f32 = 0.7;

impl CompletionBody {
    pub fn prompt(&self) -> Result<Prompt, ApiError> {
        if self.prompt.trim().is_empty() {
            return Err(ApiError::Invalid("prompt must not be empty".into()));
        }
        Ok(match self.prompt_type {
            0 => Prompt::Chat(vec![ChatMessage::new("user", self.prompt.clone())]),
            1 => Prompt::Text(self.prompt.clone()),
            2 => {
                let system = self.prompt_template.clone().unwrap_or_default();
                Prompt::Chat(vec![
                    ChatMessage::new("system", system),
                    ChatMessage::new("user", self.prompt.clone()),
                ])
            }
            n => {
                return Err(ApiError::Invalid(format!(
                    "prompt_type must be 0, 1 or 2, not {n}"
                )))
            }
        })
    }

    pub fn spec(self, session_id: u64) -> Result<TaskSpec, ApiError> {
        Ok(TaskSpec {
            session_id,
            request: GenerateRequest {
                prompt: self.prompt()?,
                params: self.sampling.params(DEFAULT_TEMPERATURE)?,
                max_tokens: self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
                stop: self
                    .stop
                    .map(StopField::into_vec)
                    .transpose()?
                    .unwrap_or_default(),
                prefix: vec![],
            },
            explicit_seed: self.sampling.seed.is_some(),
            timeout: completion::seconds_field("timeout", self.timeout)?,
            precommit_timeout: completion::seconds_field(
                "precommit_timeout",
                self.precommit_timeout,
            )?,
            client_reference: self.client_reference,
        })
    }
}

async fn completions(
    state: web::Data<ApiState>,
    caller: Caller,
    body: JsonObject<CompletionBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let sid = match body.session_id {
        Some(id) => id,
        None => caller.default_session()?,
    };
    run_completion(state, caller, sid, body).await
}

async fn completions_in_session(
    state: web::Data<ApiState>,
    caller: Caller,
    sid: web::Path<String>,
    body: JsonObject<CompletionBody>,
) -> Result<HttpResponse, ApiError> {
    let sid = parse_id("session id", &sid)?;
    let body = body.into_inner();
    if body.session_id.is_some_and(|b| b != sid) {
        return Err(ApiError::Invalid(
            "session_id in the body differs from the one in the path".into(),
        ));
    }
    run_completion(state, caller, sid, body).await
}

fn completion_json(record: &TaskRecord, model: &str) -> Value {
    let outcome = record
        .outcome
        .as_ref()
        .expect("a completed task has an outcome");
    json!({
        "id": format!("cmpl-{}-{}", record.key.session_id, record.key.task_id),
        "object": "text_completion",
        "created": views::seconds(record.created_at_ms),
        "model": model,
        "choices": [{"text": outcome.result.text, "index": 0, "finish_reason": outcome.result.finish_reason, "logprobs": null}],
        "usage": views::usage(record),
        "session_id": record.key.session_id,
        "task_id": record.key.task_id,
        "miners": outcome.agreeing,
    })
}

async fn run_completion(
    state: web::Data<ApiState>,
    caller: Caller,
    sid: u64,
    body: CompletionBody,
) -> Result<HttpResponse, ApiError> {
    let stream = body.stream;
    let spec = body.spec(sid)?;
    let mut running = completion::start(&state, &caller, spec, stream).await?;
    let key = running.submitted.key;
    let model = running.submitted.model.clone();
    if !stream {
        let record = completion::finish(&mut running).await?;
        return Ok(HttpResponse::Ok().json(completion_json(&record, &model)));
    }
    let created = now_ms() / 1000;
    let id = format!("cmpl-{}-{}", key.session_id, key.task_id);
    let chunk = move |text: &str, finish: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": null}],
            "session_id": key.session_id, "task_id": key.task_id,
        });
        if let Some(u) = usage {
            c["usage"] = u;
        }
        c
    };
    Ok(completion::sse_response(
        vec![running],
        vec![],
        move |event| match event {
            StreamEvent::Token { text, .. } => vec![chunk(text, Value::Null, None)],
            StreamEvent::Completed { record, rest, .. } => {
                let finish = json!(record.outcome.as_ref().map(|o| o.result.finish_reason));
                vec![chunk(rest, finish, Some(views::usage(record)))]
            }
            StreamEvent::AllCompleted { .. } => vec![],
        },
    ))
}
