//! Between routers that share a chain (operators' keys only): `POST /api/v1/peers/tasks`
//! carries a peer's news about its own tasks (`{"accepted": <task record>}` or `{"ended":
//! {"session_id", "task_id"}}`), kept here so this router can run them if that peer dies
//! (`actors::peer_routers`).

use super::auth::Caller;
use super::body::JsonObject;
use super::error::ApiError;
use super::routes::Routes;
use super::ApiState;
use crate::actors::peer_routers::{FromPeer, PeerEvent};
use actix_web::{web, HttpResponse};
use serde_json::json;

pub fn routes(r: &mut Routes) {
    r.post("/api/v1/peers/tasks", tell);
}

async fn tell(
    state: web::Data<ApiState>,
    caller: Caller,
    body: JsonObject<PeerEvent>,
) -> Result<HttpResponse, ApiError> {
    if !caller.is_operator() {
        return Err(ApiError::Forbidden(
            "only a peer router (an operator's key) may tell of its tasks".into(),
        ));
    }
    let Some(peers) = &state.actors.peers else {
        return Err(ApiError::Conflict(
            "this router has no peer routers (router.peers)".into(),
        ));
    };
    peers
        .send(FromPeer(body.into_inner()))
        .await
        .map_err(|e| ApiError::StorageUnavailable(e.to_string(), 1))?
        .map_err(|e| ApiError::StorageUnavailable(e.to_string(), 1))?;
    Ok(HttpResponse::Ok().json(json!({"kept": true})))
}
