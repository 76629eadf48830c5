//! The client WebSocket, `/api/v1/ws`: submit prompts, receive each task's states, tokens and
//! end as JSON events, cancel tasks. Closing the socket cancels the tasks still running.
//!
//! In: `{"type":"submit","id":..,"session_id":..,"prompt":..,<completion fields>}`,
//! `{"type":"cancel","session_id":..,"task_id":..}`, `{"type":"ping"}`.
//! Out: `accepted`, `state`, `token`, `completed`, `failed`, `error`, `pong` (each with the
//! request's `id` when it had one); a binary frame gets an `error`.

use super::auth::Caller;
use super::completion::{self, task_error};
use super::error::ApiError;
use super::router_v1::CompletionBody;
use super::{views, ApiState};
use crate::actors::messages::TaskEvent;
use crate::actors::session_queue::{CancelTask, GetTask};
use crate::task::TaskKey;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::Message;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Tasks one connection may run at once (admission still applies per key).
pub const MAX_TASKS_PER_CONNECTION: usize = 64;
/// Largest message accepted from a client.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

pub async fn websocket(
    state: web::Data<ApiState>,
    caller: Caller,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    // Not an upgrade (or a malformed one): the JSON error every route answers with, not
    // actix's empty 400.
    let (response, session, stream) = actix_ws::handle(&req, body)
        .map_err(|e| ApiError::Invalid(format!("a WebSocket upgrade is required here: {e}")))?;
    let stream = stream.max_frame_size(MAX_MESSAGE_BYTES);
    actix_rt::spawn(connection(state, caller, session, stream));
    Ok(response)
}

async fn send(session: &mut actix_ws::Session, value: Value) -> bool {
    session.text(value.to_string()).await.is_ok()
}

async fn connection(
    state: web::Data<ApiState>,
    caller: Caller,
    mut session: actix_ws::Session,
    mut stream: actix_ws::MessageStream,
) {
    let mut tasks: Vec<actix_rt::task::JoinHandle<()>> = Vec::new();
    let mut revocations = state.keys.revocations();
    loop {
        let message = tokio::select! {
            message = stream.next() => match message {
                Some(message) => message,
                None => break,
            },
            changed = revocations.changed() => {
                // A revoked key keeps no connection open (its running tasks are cancelled
                // below, as when the client leaves).
                if changed.is_err() || !state.keys.is_live(&caller.key_hash) {
                    let err = ApiError::Unauthorized;
                    send(&mut session, with_type(err.body(), "error", None)).await;
                    break;
                }
                continue;
            }
        };
        tasks.retain(|t| !t.is_finished());
        let text = match message {
            Ok(Message::Text(t)) => t.to_string(),
            Ok(Message::Ping(p)) => {
                let _ = session.pong(&p).await;
                continue;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(Message::Binary(_)) => {
                let err = ApiError::Invalid("messages are JSON text frames, not binary".into());
                send(&mut session, with_type(err.body(), "error", None)).await;
                continue;
            }
            Ok(_) => continue,
        };
        let request: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                let err = ApiError::Invalid(format!("a message must be a JSON object: {e}"));
                send(&mut session, with_type(err.body(), "error", None)).await;
                continue;
            }
        };
        let id = request.get("id").cloned();
        match request.get("type").and_then(Value::as_str) {
            Some("ping") => {
                send(&mut session, with_type(json!({}), "pong", id)).await;
            }
            Some("submit") => {
                if tasks.len() >= MAX_TASKS_PER_CONNECTION {
                    let err = ApiError::RateLimited(
                        format!("{MAX_TASKS_PER_CONNECTION} on one connection"),
                        1,
                    );
                    send(&mut session, with_type(err.body(), "error", id)).await;
                    continue;
                }
                match submit(&state, &caller, request).await {
                    Ok(running) => {
                        let key = running.submitted.key;
                        let accepted = json!({"type": "accepted", "id": id, "session_id": key.session_id, "task_id": key.task_id, "model": running.submitted.model});
                        send(&mut session, accepted).await;
                        tasks.push(actix_rt::spawn(follow(running, session.clone())));
                    }
                    Err(e) => {
                        send(&mut session, with_type(e.body(), "error", id)).await;
                    }
                }
            }
            Some("cancel") => {
                let result = cancel(&state, &caller, &request).await;
                let reply = match result {
                    Ok(status) => json!({"type": "cancelled", "id": id, "status": status}),
                    Err(e) => with_type(e.body(), "error", id),
                };
                send(&mut session, reply).await;
            }
            other => {
                let err = ApiError::Invalid(format!(
                    "unknown message type {other:?}; use submit, cancel or ping"
                ));
                send(&mut session, with_type(err.body(), "error", id)).await;
            }
        }
    }
    // The client left: stop following; dropping the guards cancels unfinished tasks.
    for t in tasks {
        t.abort();
    }
    let _ = session.close(None).await;
}

fn with_type(mut body: Value, kind: &str, id: Option<Value>) -> Value {
    body["type"] = json!(kind);
    if let Some(id) = id {
        body["id"] = id;
    }
    body
}

async fn submit(
    state: &ApiState,
    caller: &Caller,
    request: Value,
) -> Result<completion::Running, ApiError> {
    let body: CompletionBody = serde_json::from_value(request)
        .map_err(|e| ApiError::Invalid(format!("invalid submit message: {e}")))?;
    let sid = match body.session_id {
        Some(id) => id,
        None => caller.default_session()?,
    };
    completion::start(state, caller, body.spec(sid)?, true).await
}

async fn cancel(state: &ApiState, caller: &Caller, request: &Value) -> Result<String, ApiError> {
    let field = |name: &str| {
        request
            .get(name)
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .ok_or_else(|| ApiError::Invalid(format!("cancel needs {name}")))
    };
    let key = TaskKey {
        session_id: field("session_id")?,
        task_id: field("task_id")?,
    };
    let task = state
        .actors
        .queue
        .send(GetTask(key))
        .await?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match task {
        Some(t) if t.owner == caller.owner => {}
        Some(_) => {
            return Err(ApiError::Forbidden(format!(
                "task {key} belongs to another key"
            )))
        }
        None => {
            return Err(ApiError::NotFound(
                "task_not_found",
                format!("task {key} does not exist"),
            ))
        }
    }
    let t = state
        .actors
        .queue
        .send(CancelTask(key))
        .await?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(t.state.name().to_string())
}

async fn follow(mut running: completion::Running, mut session: actix_ws::Session) {
    let key = running.submitted.key;
    let base = json!({"session_id": key.session_id, "task_id": key.task_id});
    let event = |kind: &str, extra: Value| {
        let mut v = base.clone();
        v["type"] = json!(kind);
        if let Value::Object(m) = extra {
            for (k, val) in m {
                v[k] = val;
            }
        }
        v
    };
    while let Some(e) = running.events.recv().await {
        let message = match e {
            TaskEvent::State(s) => event("state", json!({"state": s.name()})),
            TaskEvent::Token { text } => event("token", json!({"text": text})),
            TaskEvent::Finished(record) => {
                running.guard.disarm();
                let message = match task_error(&record) {
                    Some(err) => event(
                        "failed",
                        json!({"status": record.state.name(), "error": err.body()["error"]}),
                    ),
                    None => {
                        let o = record.outcome.as_ref().expect("completed");
                        event(
                            "completed",
                            json!({
                                "text": o.result.text, "finish_reason": o.result.finish_reason,
                                "usage": views::usage(&record), "miners": o.agreeing, "status": record.state.name(),
                            }),
                        )
                    }
                };
                send(&mut session, message).await;
                return;
            }
        };
        if !send(&mut session, message).await {
            return; // the socket is gone; the guard cancels the task
        }
    }
}
