//! The HTTP edge (actix-web): Cortensor's router API (`/api/v1/...`), the OpenAI-compatible API
//! (`/v1/...`), SSE streaming, the WebSocket and Prometheus metrics.
//! **Invariant:** only this module knows HTTP and the JSON shapes clients see; it reaches the
//! network through actor messages only.

pub mod admission;
pub mod auth;
pub mod body;
pub mod completion;
pub mod error;
pub mod key_admin;
pub mod keys;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod peers;
pub mod router_v1;
pub mod routes;
pub mod validate;
pub mod views;
pub mod ws;

use crate::actors::router::RouterSettings;
use crate::config::TestnetConfig;
use crate::testnet::Actors;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use admission::Admission;
use error::ApiError;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Instant;

pub struct ApiState {
    pub actors: Actors,
    pub settings: RouterSettings,
    /// The keys accepted (by hash), with their owners, quotas and default sessions.
    pub keys: keys::KeyRing,
    pub admission: Arc<Admission>,
    pub default_deposit: u64,
    /// The longest reservation a session may ask for, in seconds.
    pub max_reserve_period_s: u64,
    /// The most nodes a client key's hybrid or dedicated session may reserve.
    pub max_reserved_nodes: u32,
    /// Sessions a client key may open.
    pub max_sessions_per_key: usize,
    pub max_body_bytes: usize,
    /// Peer routers by the SHA-256 of the key each presents, with its instance.
    pub peer_keys: HashMap<String, u8>,
    /// What a peer's task may ask (the bounds of this router's own tasks).
    pub peer_limits: crate::actors::peer_routers::PeerLimits,
    pub started: Instant,
    /// "embedded-ledger" or "evm".
    pub chain: &'static str,
}

impl ApiState {
    pub fn new(
        config: &TestnetConfig,
        settings: RouterSettings,
        actors: Actors,
        keys: &[String],
        default_sessions: HashMap<String, u64>,
        chain: &'static str,
        store: crate::store::Store,
    ) -> Result<Self, crate::store::StoreError> {
        let r = &config.router;
        Ok(Self {
            actors,
            settings,
            keys: keys::KeyRing::new(keys, &default_sessions, store)?,
            admission: Admission::new(
                r.max_inflight_per_key,
                r.max_inflight_total,
                r.retry_after_s,
            ),
            default_deposit: config.pricing.default_deposit,
            max_reserve_period_s: r.max_reserve_period_s,
            max_reserved_nodes: r.max_reserved_nodes,
            max_sessions_per_key: r.max_sessions_per_key,
            max_body_bytes: r.max_body_bytes,
            peer_keys: r
                .peers
                .iter()
                .map(|p| (keys::key_hash(&p.key), p.instance))
                .collect(),
            peer_limits: crate::actors::peer_routers::PeerLimits {
                max_context: config.nodes.max_context,
                price_per_token: config.pricing.price_per_token,
            },
            started: Instant::now(),
            chain,
        })
    }
}

/// Builds the server on a bound listener (port 0 in tests). Signals are left to the caller.
pub fn serve(
    state: ApiState,
    listener: TcpListener,
    workers: usize,
    tls: Option<rustls::ServerConfig>,
) -> std::io::Result<actix_web::dev::Server> {
    let max_body = state.max_body_bytes;
    let state = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(max_body)
                    .error_handler(|e, _| match e {
                        actix_web::error::JsonPayloadError::Overflow { limit }
                        | actix_web::error::JsonPayloadError::OverflowKnownLength {
                            limit, ..
                        } => ApiError::TooLarge(format!("the request body exceeds {limit} bytes"))
                            .into(),
                        e => json_error(e.to_string()).into(),
                    }),
            )
            .app_data(
                web::PathConfig::default().error_handler(|e, _| json_error(e.to_string()).into()),
            )
            .app_data(
                web::QueryConfig::default().error_handler(|e, _| json_error(e.to_string()).into()),
            )
            .configure(|cfg| {
                register_routes(cfg);
            })
            .default_service(web::to(not_found))
    })
    .workers(workers.max(1))
    .disable_signals()
    .shutdown_timeout(5);
    let server = match tls {
        Some(tls) => server.listen_rustls_0_21(listener, tls)?,
        None => server.listen(listener)?,
    };
    Ok(server.run())
}

/// Registers every route the server answers (through the one route table) and returns them:
/// what `GET /openapi.json` must describe.
pub fn register_routes(cfg: &mut web::ServiceConfig) -> Vec<routes::Route> {
    let mut r = routes::Routes::new();
    router_v1::routes(&mut r);
    key_admin::routes(&mut r);
    peers::routes(&mut r);
    openai::routes(&mut r);
    r.get("/metrics", metrics::metrics)
        .get("/openapi.json", openapi::document);
    r.register(cfg)
}

fn json_error(message: String) -> ApiError {
    ApiError::Invalid(format!("invalid request: {message}"))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    ApiError::NotFound(
        "not_found",
        format!("no route for {} {}", req.method(), req.path()),
    )
    .error_response()
}
