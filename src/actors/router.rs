//! The router: the API's one entry into the network. It checks a task against its session
//! (owner, model, limits), holds the task's budget on the chain, and hands it to the session
//! queue. Sessions are created through it too.

use super::chain_bridge::{ChainBridge, CreateSession, GetSession, Hold, Settle};
use super::session_queue::{Enqueue, NewTask, QueueError, ReserveTaskId, SessionQueue, Subscriber};
use crate::chain::ChainError;
use crate::models::engine::GenerateRequest;
use crate::session::{Session, SessionParams, TaskRecordMode};
use crate::task::TaskKey;
use crate::validation::consensus::{Level, Levels};
use actix::prelude::*;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("session {0} does not exist")]
    NoSuchSession(u64),
    #[error("session {0} belongs to another key")]
    NotOwner(u64),
    #[error("{0}")]
    InsufficientBalance(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("the chain is unreachable: {0}")]
    ChainUnavailable(String),
    #[error("the task could not be stored, so it was not accepted: {0}")]
    StorageUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ChainError> for SubmitError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::NoSuchSession(id) => SubmitError::NoSuchSession(id),
            ChainError::InsufficientBalance { .. } => {
                SubmitError::InsufficientBalance(e.to_string())
            }
            ChainError::InvalidParams(m) => SubmitError::Invalid(m),
            ChainError::Store(_) => SubmitError::Internal(e.to_string()),
            ChainError::Evm(m) | ChainError::Unreachable(m) => SubmitError::ChainUnavailable(m),
            ChainError::NoWallet(_) | ChainError::NothingToWithdraw(_) => {
                SubmitError::Internal(e.to_string())
            }
        }
    }
}

impl From<MailboxError> for SubmitError {
    fn from(e: MailboxError) -> Self {
        SubmitError::Internal(format!("an actor did not answer: {e}"))
    }
}

/// Fixed facts the router checks tasks against.
#[derive(Clone, Debug)]
pub struct RouterSettings {
    /// The models the network serves; a session's `model_identifier` indexes this list.
    pub models: Vec<String>,
    pub max_context: usize,
    pub price_per_token: u64,
    pub max_replacements: u32,
    pub default_timeout: Duration,
    pub default_precommit_timeout: Duration,
    /// Whether validators can embed results (sessions may ask for `embedding` validation).
    pub embedding_validation: bool,
    /// Whether validators run the model (sessions may ask for `likelihood` and `judge`).
    pub model_validation: bool,
}

impl RouterSettings {
    /// Whether this network's validators can check `levels`; the error names `field`.
    pub fn check_levels(&self, levels: &Levels, field: &str) -> Result<(), String> {
        if levels.has(Level::Embedding) && !self.embedding_validation {
            return Err(format!(
                "{field} \"embedding\" needs the embedding model, which this network has not loaded (run `cortensor models fetch --all` and restart it)"
            ));
        }
        for level in [Level::Likelihood, Level::Judge] {
            if levels.has(level) && !self.model_validation {
                return Err(format!(
                    "{field} \"{}\" needs validators that run the model, which this network does not give them",
                    level.name()
                ));
            }
        }
        Ok(())
    }
}

pub struct Router {
    settings: RouterSettings,
    chain: Addr<ChainBridge>,
    queue: Addr<SessionQueue>,
}

impl Router {
    pub fn new(
        settings: RouterSettings,
        chain: Addr<ChainBridge>,
        queue: Addr<SessionQueue>,
    ) -> Self {
        Self {
            settings,
            chain,
            queue,
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;
}

/// One prompt for one session.
#[derive(Message)]
#[rtype(result = "Result<Submitted, SubmitError>")]
pub struct SubmitTask {
    pub owner: String,
    pub session_id: u64,
    pub request: GenerateRequest,
    /// Use `request.params.seed` as given instead of deriving it from (session, task).
    pub explicit_seed: bool,
    pub timeout: Option<Duration>,
    pub precommit_timeout: Option<Duration>,
    pub client_reference: Option<String>,
    pub subscriber: Option<Subscriber>,
}

#[derive(Debug, Clone)]
pub struct Submitted {
    pub key: TaskKey,
    pub model: String,
    pub hold: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Session, SubmitError>")]
pub struct OpenSession {
    pub owner: String,
    pub params: SessionParams,
    pub deposit: u64,
}

impl Handler<OpenSession> for Router {
    type Result = ResponseFuture<Result<Session, SubmitError>>;
    fn handle(&mut self, m: OpenSession, _: &mut Context<Self>) -> Self::Result {
        let models = self.settings.models.len();
        let levels_ok = self
            .settings
            .check_levels(&m.params.validation, "validation");
        let chain = self.chain.clone();
        Box::pin(async move {
            levels_ok.map_err(SubmitError::Invalid)?;
            if m.params.model_identifier as usize >= models {
                return Err(SubmitError::Invalid(format!(
                    "model_identifier {} does not exist; this network serves {} model(s), numbered from 0",
                    m.params.model_identifier, models
                )));
            }
            let create = CreateSession {
                owner: m.owner,
                params: m.params,
                deposit: m.deposit,
            };
            Ok(chain.send(create).await??)
        })
    }
}

impl Handler<SubmitTask> for Router {
    type Result = ResponseFuture<Result<Submitted, SubmitError>>;
    fn handle(&mut self, m: SubmitTask, _: &mut Context<Self>) -> Self::Result {
        let settings = self.settings.clone();
        let chain = self.chain.clone();
        let queue = self.queue.clone();
        Box::pin(async move {
            let max_tokens = m.request.max_tokens;
            if max_tokens == 0 || max_tokens > settings.max_context {
                return Err(SubmitError::Invalid(format!(
                    "max_tokens must be between 1 and {} (the miners' context)",
                    settings.max_context
                )));
            }
            let session = chain
                .send(GetSession(m.session_id))
                .await??
                .ok_or(SubmitError::NoSuchSession(m.session_id))?;
            if session.owner != m.owner {
                return Err(SubmitError::NotOwner(m.session_id));
            }
            let params = &session.params;
            let model = settings
                .models
                .get(params.model_identifier as usize)
                .cloned()
                .ok_or_else(|| SubmitError::Invalid("the session's model is not served".into()))?;
            let hold = (max_tokens as u64)
                .saturating_mul(params.redundant as u64)
                .saturating_mul(settings.price_per_token);
            let key = queue
                .send(ReserveTaskId(session.id))
                .await?
                .map_err(|e| SubmitError::Internal(e.to_string()))?;
            chain
                .send(Hold {
                    task: key,
                    amount: hold,
                })
                .await??;
            let task = NewTask {
                session_id: session.id,
                task_id: key.task_id,
                owner: m.owner,
                model: model.clone(),
                placement: crate::task::Placement {
                    session_id: session.id,
                    mode: params.mode,
                    min_nodes: params.min_num_of_nodes,
                    max_nodes: params.max_num_of_nodes,
                    reserve_period_s: params.reserve_period,
                    only: None,
                },
                request: m.request,
                redundancy: params.redundant,
                validators: params.num_of_validator_nodes,
                max_replacements: settings
                    .max_replacements
                    .min(params.max_task_execution_count.saturating_sub(1)),
                timeout: m.timeout.unwrap_or(settings.default_timeout),
                precommit_timeout: m
                    .precommit_timeout
                    .unwrap_or(settings.default_precommit_timeout),
                client_reference: m.client_reference,
                hold,
                derive_seed: !m.explicit_seed,
                record_stages: params.task_record == TaskRecordMode::PerStage,
                validation: params.validation_plan(),
            };
            let enqueued = queue
                .send(Enqueue {
                    task,
                    subscriber: m.subscriber,
                })
                .await;
            match enqueued {
                Ok(Ok(key)) => Ok(Submitted { key, model, hold }),
                other => {
                    // Not accepted: give the hold back (a settlement that charges nothing).
                    let _ = chain
                        .send(Settle {
                            task: key,
                            hold,
                            charge: 0,
                            payees: Vec::new(),
                            trace: None,
                        })
                        .await;
                    Err(match other {
                        Ok(Err(QueueError::Full(n))) => {
                            SubmitError::Busy(format!("the queue holds {n} tasks, its limit"))
                        }
                        Ok(Err(e @ QueueError::ShuttingDown)) => SubmitError::Busy(e.to_string()),
                        Ok(Err(QueueError::Store(e))) => {
                            SubmitError::StorageUnavailable(e.to_string())
                        }
                        Ok(Err(e)) => SubmitError::Internal(e.to_string()),
                        Ok(Ok(_)) => unreachable!("handled above"),
                        Err(e) => e.into(),
                    })
                }
            }
        })
    }
}
