//! `GET /openapi.json`: the OpenAPI 3.0 document of every route the server answers, kept by
//! hand in `openapi.json` beside this file and served as it is (no authentication).
//! `tests/api_openapi.rs` checks it against the route table (`routes.rs`) both ways, and
//! against the limits and error codes in the code; `tests/api_schemathesis.rs` runs
//! schemathesis against it.

use actix_web::HttpResponse;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT)
}
