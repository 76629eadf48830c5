//! Between routers that share a chain: `POST /api/v1/peers/tasks` carries a peer's news about
//! its own tasks (`{"accepted": <task record>}` or `{"ended": {"session_id", "task_id"}}`),
//! kept here so this router can run them if that peer dies (`actors::peer_routers`).
//!
//! A peer authenticates as that peer: with the key it presents (`router.peers[].key`, its own
//! `router.peer_key`), never an operator's or a client's. It may tell only of its own tasks
//! (ids from its instance's base), of sessions on the chain whose owner the record names, with
//! deadlines and a hold this router would give such a task (`check_peer_event`).

use super::error::ApiError;
use super::routes::Routes;
use super::ApiState;
use super::{body::JsonObject, keys::key_hash};
use crate::actors::chain_bridge::GetSession;
use crate::actors::peer_routers::{check_peer_event, FromPeer, PeerError, PeerEvent};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

pub fn routes(r: &mut Routes) {
    r.post("/api/v1/peers/tasks", tell);
}

/// The instance of the peer whose key the request carries, or 401.
fn peer_of(state: &ApiState, req: &HttpRequest) -> Result<u8, ApiError> {
    let key = super::auth::bearer_token(req).ok_or(ApiError::Unauthorized)?;
    state
        .peer_keys
        .get(&key_hash(key))
        .copied()
        .ok_or(ApiError::Unauthorized)
}

async fn tell(
    state: web::Data<ApiState>,
    req: HttpRequest,
    body: JsonObject<PeerEvent>,
) -> Result<HttpResponse, ApiError> {
    let instance = peer_of(&state, &req)?;
    let Some(peers) = &state.actors.peers else {
        return Err(ApiError::Conflict(
            "this router has no peer routers (router.peers)".into(),
        ));
    };
    let event = body.into_inner();
    check_peer_event(&event, instance, crate::task::now_ms(), &state.peer_limits)
        .map_err(ApiError::Forbidden)?;
    if let PeerEvent::Accepted(task) = &event {
        let session = state
            .actors
            .chain
            .send(GetSession(task.key.session_id))
            .await?
            .map_err(|e| ApiError::ChainUnavailable(e.to_string(), 5))?;
        if session.is_none_or(|s| s.owner != task.owner) {
            return Err(ApiError::Forbidden(format!(
                "task {}: no session {} of that owner on the chain",
                task.key, task.key.session_id
            )));
        }
    }
    peers
        .send(FromPeer(event))
        .await
        .map_err(|e| ApiError::StorageUnavailable(e.to_string(), 1))?
        .map_err(|e| match e {
            PeerError::Full(_) => ApiError::Busy(e.to_string(), 5),
            PeerError::Store(e) => ApiError::StorageUnavailable(e.to_string(), 1),
        })?;
    Ok(HttpResponse::Ok().json(json!({"kept": true})))
}
