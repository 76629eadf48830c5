//! Issuing clients' keys (operators only): `POST /api/v1/keys` issues a key with its quotas and
//! a default session (the key is in the answer, once), `GET /api/v1/keys` lists them (names,
//! quotas, use; never keys), `POST /api/v1/keys/{name}/revoke` revokes one, `POST
//! /api/v1/keys/{name}/credit` grants a client more credit. A client's deposits come from its
//! credit alone: a router's money is given out by its operators, not taken by its clients.

use super::auth::Caller;
use super::body::JsonObject;
use super::error::ApiError;
use super::routes::Routes;
use super::ApiState;
use crate::actors::router::OpenSession;
use crate::session::SessionParams;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

/// Longest key name.
pub const MAX_KEY_NAME: usize = 64;
/// Highest per-key limit on tasks in flight a key may be given.
pub const MAX_KEY_INFLIGHT: usize = 10_000;

pub fn routes(r: &mut Routes) {
    r.get("/api/v1/keys", list)
        .post("/api/v1/keys", issue)
        .post("/api/v1/keys/{name}/revoke", revoke)
        .post("/api/v1/keys/{name}/credit", top_up);
}

fn operator(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_operator() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "only an operator's key may manage keys".into(),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueBody {
    name: String,
    max_inflight: Option<usize>,
    max_tasks: Option<u64>,
    /// The deposit of the key's default session, taken from its credit (default: the
    /// router's default deposit, or all the credit when that is less).
    deposit: Option<u64>,
    /// What the key may deposit in all, its default session's deposit included (default:
    /// that deposit alone).
    credit: Option<u64>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_KEY_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

async fn issue(
    state: web::Data<ApiState>,
    caller: Caller,
    body: JsonObject<IssueBody>,
) -> Result<HttpResponse, ApiError> {
    operator(&caller)?;
    let body = body.into_inner();
    if !valid_name(&body.name) {
        return Err(ApiError::Invalid(format!(
            "name must be 1 to {MAX_KEY_NAME} letters, digits, '-', '_' or '.'"
        )));
    }
    if body
        .max_inflight
        .is_some_and(|n| n == 0 || n > MAX_KEY_INFLIGHT)
    {
        return Err(ApiError::Invalid(format!(
            "max_inflight must be between 1 and {MAX_KEY_INFLIGHT}"
        )));
    }
    if body.max_tasks == Some(0) {
        return Err(ApiError::Invalid("max_tasks must be at least 1".into()));
    }
    let (deposit, credit) = match (body.deposit, body.credit) {
        (Some(d), Some(c)) if d > c => {
            return Err(ApiError::Invalid(format!(
                "deposit {d} is more than the credit {c} it comes from"
            )))
        }
        (Some(d), Some(c)) => (d, c),
        (Some(d), None) => (d, d),
        (None, Some(c)) => (state.default_deposit.min(c), c),
        (None, None) => (state.default_deposit, state.default_deposit),
    };
    let (key, entry) = state
        .keys
        .issue(&body.name, body.max_inflight, body.max_tasks, credit)
        .await?;
    let hash = super::keys::key_hash(&key);
    // The default session is the key's first, out of its credit like any other.
    state
        .keys
        .take_session(&hash, &entry, state.max_sessions_per_key)
        .await?;
    state.keys.spend_credit(&hash, &entry, deposit).await?;
    let open = OpenSession {
        owner: entry.owner.clone(),
        params: SessionParams {
            name: "default".into(),
            metadata: format!("the default session of key {}", entry.name),
            ..SessionParams::default()
        },
        deposit,
    };
    let session = state.actors.router.send(open).await??;
    state.keys.set_default_session(&hash, session.id).await?;
    Ok(HttpResponse::Created().json(json!({
        "key": key,
        "name": entry.name,
        "owner": entry.owner,
        "max_inflight": entry.max_inflight,
        "max_tasks": entry.max_tasks,
        "credit": entry.credit,
        "credit_left": credit - deposit,
        "default_session": session.id,
    })))
}

async fn list(state: web::Data<ApiState>, caller: Caller) -> Result<HttpResponse, ApiError> {
    operator(&caller)?;
    let keys: Vec<_> = state
        .keys
        .list()
        .await?
        .into_iter()
        .map(|(hash_prefix, e, used)| {
            let credit = (e.role == super::keys::Role::Client).then_some(e.credit);
            json!({
                "name": e.name,
                "role": e.role,
                "owner": e.owner,
                "hash_prefix": hash_prefix,
                "max_inflight": e.max_inflight,
                "max_tasks": e.max_tasks,
                "tasks_used": used.tasks,
                "credit": credit,
                "credit_spent": used.credit_spent,
                "default_session": e.default_session,
                "created_at_ms": e.created_at_ms,
                "revoked": e.revoked,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "keys": keys })))
}

async fn revoke(
    state: web::Data<ApiState>,
    caller: Caller,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    operator(&caller)?;
    let entry = state.keys.revoke(&name).await?;
    Ok(HttpResponse::Ok().json(json!({"name": entry.name, "revoked": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpBody {
    amount: u64,
}

/// Grants a client's key more credit for its deposits.
async fn top_up(
    state: web::Data<ApiState>,
    caller: Caller,
    name: web::Path<String>,
    body: JsonObject<TopUpBody>,
) -> Result<HttpResponse, ApiError> {
    operator(&caller)?;
    let amount = body.into_inner().amount;
    if amount == 0 {
        return Err(ApiError::Invalid("amount must be at least 1".into()));
    }
    let (hash, entry) = state.keys.grant_credit(&name, amount).await?;
    let spent = state.keys.credit_spent(&hash).await?;
    Ok(HttpResponse::Ok().json(json!({
        "name": entry.name,
        "credit": entry.credit,
        "credit_spent": spent,
        "credit_left": entry.credit.saturating_sub(spent),
    })))
}
