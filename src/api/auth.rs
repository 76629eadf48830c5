//! Bearer keys: a request names its key in `Authorization: Bearer <key>` (WebSocket clients,
//! which cannot always set headers, may use `?token=<key>`). The caller is known by the key's
//! owner identity from then on.

use super::error::ApiError;
use super::ApiState;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};
use std::future::{ready, Ready};

pub struct Caller {
    pub owner: String,
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
    let from_header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|v| v.trim().to_string());
    let from_query = || {
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("token").cloned())
    };
    let key = from_header
        .or_else(from_query)
        .ok_or(ApiError::Unauthorized)?;
    let owner = state.keys.get(&key).ok_or(ApiError::Unauthorized)?;
    Ok(Caller {
        owner: owner.clone(),
    })
}
