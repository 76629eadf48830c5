//! Bearer keys: a request names its key in `Authorization: Bearer <key>` (a WebSocket upgrade,
//! which browsers cannot give headers, may use `?token=<key>`; no other request may, so a key
//! does not end up in the access logs and histories of ordinary URLs). The caller is known by
//! the key's owner identity from then on. Keys are looked up by their SHA-256 (`keys.rs`).

use super::error::ApiError;
use super::ApiState;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use std::future::{ready, Ready};

pub struct Caller {
    pub owner: String,
    /// SHA-256 of the key (hex): what its quota is counted under.
    pub key_hash: String,
    pub key: super::keys::KeyEntry,
}

impl Caller {
    pub fn is_operator(&self) -> bool {
        self.key.role == super::keys::Role::Operator
    }
    /// The session its requests use when they name none.
    pub fn default_session(&self) -> Result<u64, ApiError> {
        self.key.default_session.ok_or_else(|| {
            ApiError::Invalid("this key has no default session; name a session".into())
        })
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Caller, ApiError> {
    let state = req
        .app_data::<web::Data<ApiState>>()
        .ok_or_else(|| ApiError::Internal("no API state".into()))?;
    let from_header = bearer_token(req).map(str::to_string);
    let from_query = || {
        if !is_websocket_upgrade(req) {
            return None;
        }
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("token").cloned())
    };
    let key = from_header
        .or_else(from_query)
        .ok_or(ApiError::Unauthorized)?;
    let (key_hash, key) = state
        .keys
        .authenticate(&key)
        .ok_or(ApiError::Unauthorized)?;
    Ok(Caller {
        owner: key.owner.clone(),
        key_hash,
        key,
    })
}

/// A request asking to become a WebSocket (`Upgrade: websocket`).
fn is_websocket_upgrade(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The key in an `Authorization: Bearer <key>` header, if there is one.
pub fn bearer_token(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}
