//! What every completion endpoint shares: validating sampling fields, admitting and submitting
//! a task, following its events to the end or streaming them as server-sent events, and
//! cancelling the task when the client goes away before it finished.

use super::admission::Permit;
use super::auth::Caller;
use super::error::ApiError;
use super::ApiState;
use crate::actors::messages::TaskEvent;
use crate::actors::router::{SubmitTask, Submitted};
use crate::actors::session_queue::{CancelTask, SessionQueue, Subscriber, SUBSCRIBER_CAPACITY};
use crate::models::engine::GenerateRequest;
use crate::models::sampling::SamplingParams;
use crate::task::{FailureCause, TaskKey, TaskRecord, TaskState};
use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use serde::Deserialize;
use serde_json::Value;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;

/// Stop strings a request may give at most.
pub const MAX_STOP_STRINGS: usize = 4;

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Result<Vec<String>, ApiError> {
        let v = match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        };
        if v.len() > MAX_STOP_STRINGS {
            return Err(ApiError::Invalid(format!(
                "stop may hold at most {MAX_STOP_STRINGS} strings"
            )));
        }
        Ok(v.into_iter().filter(|s| !s.is_empty()).collect())
    }
}

/// Sampling fields as clients send them, before validation. Read as f64 so a value just past
/// a bound (2.0000000000000004) is refused instead of rounding onto it as an f32.
#[derive(Default, Debug, Clone, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub seed: Option<u64>,
}

/// The API's ranges (OpenAI's); the engine's own (`SamplingParams::validate`) are wider.
pub const TEMPERATURE_MAX: f64 = 2.0;
pub const PENALTY_RANGE: (f64, f64) = (-2.0, 2.0);
pub const REPEAT_PENALTY_MAX: f64 = 10.0;

impl SamplingFields {
    /// Validated parameters, with `default_temperature` when none is given.
    pub fn params(&self, default_temperature: f32) -> Result<SamplingParams, ApiError> {
        // `lo_open`: the lower bound itself is refused. NaN fails every comparison.
        let check = |name: &str, v: Option<f64>, lo: f64, lo_open: bool, hi: f64| match v {
            Some(x) if !(x.is_finite() && (x > lo || (!lo_open && x == lo)) && x <= hi) => {
                let open = if lo_open { "above" } else { "at least" };
                Err(ApiError::Invalid(format!(
                    "{name} must be {open} {lo} and at most {hi}, not {x}"
                )))
            }
            _ => Ok(()),
        };
        check("temperature", self.temperature, 0.0, false, TEMPERATURE_MAX)?;
        check("top_p", self.top_p, 0.0, true, 1.0)?;
        check(
            "presence_penalty",
            self.presence_penalty,
            PENALTY_RANGE.0,
            false,
            PENALTY_RANGE.1,
        )?;
        check(
            "frequency_penalty",
            self.frequency_penalty,
            PENALTY_RANGE.0,
            false,
            PENALTY_RANGE.1,
        )?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            0.0,
            true,
            REPEAT_PENALTY_MAX,
        )?;
        let f = |v: Option<f64>, default: f32| v.map_or(default, |x| x as f32);
        let params = SamplingParams {
            temperature: f(self.temperature, default_temperature),
            top_k: self.top_k.unwrap_or(0),
            top_p: f(self.top_p, 1.0),
            repeat_penalty: f(self.repeat_penalty, 1.0),
            presence_penalty: f(self.presence_penalty, 0.0),
            frequency_penalty: f(self.frequency_penalty, 0.0),
            seed: self.seed.unwrap_or(0),
            ..SamplingParams::default()
        };
        // What the engines would refuse must be refused here, as a 400, not fail on every
        // miner (a 502 and lost reputation for honest miners).
        params
            .validate()
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        Ok(params)
    }
}

/// The range of a client's `timeout` and `precommit_timeout`, in seconds. Cortensor gives them
/// in whole seconds; below one second no miner can be expected to answer, and the task would
/// end as a server-side failure for what is the request's own mistake.
pub const SECONDS_RANGE: (f64, f64) = (1.0, 86_400.0);

/// Seconds as clients give them (Cortensor's `timeout`, `precommit_timeout`).
pub fn seconds_field(name: &str, value: Option<f64>) -> Result<Option<Duration>, ApiError> {
    let (lo, hi) = SECONDS_RANGE;
    match value {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= lo && s <= hi => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(ApiError::Invalid(format!(
            "{name} must be a number of seconds in [{lo}, {hi}], not {s}"
        ))),
    }
}

/// One task to submit.
pub struct TaskSpec {
    pub session_id: u64,
    pub request: GenerateRequest,
    pub explicit_seed: bool,
    pub timeout: Option<Duration>,
    pub precommit_timeout: Option<Duration>,
    pub client_reference: Option<String>,
}

/// Cancels its task when dropped before the task finished: a client that disconnects (the
/// handler or the response stream is dropped) stops the miners and gets its unused budget back.
pub struct TaskGuard {
    queue: Addr<SessionQueue>,
    key: TaskKey,
    armed: bool,
}

impl TaskGuard {
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(task = %self.key, "client went away: cancelling the task");
            self.queue.do_send(CancelTask(self.key));
        }
    }
}

/// A submitted task and what keeps it alive.
pub struct Running {
    pub submitted: Submitted,
    pub events: mpsc::Receiver<TaskEvent>,
    pub guard: TaskGuard,
    _permit: Permit,
}

/// How much longer than the fastest miner's measured time a precommit deadline must allow.
pub const PRECOMMIT_MARGIN: f64 = 2.0;

/// The shortest precommit deadline, in seconds, for `max_tokens` on miners whose fastest
/// measured speed is `best_tokens_per_s`: a deadline no miner can meet would cost honest miners
/// their standing for the client's choice.
pub fn precommit_floor_s(max_tokens: usize, best_tokens_per_s: f64) -> f64 {
    (max_tokens as f64 / best_tokens_per_s * PRECOMMIT_MARGIN).ceil()
}

/// Refuses a precommit deadline shorter than the network's miners can meet (by the speed the
/// router measured; none measured yet: any deadline in range goes).
async fn check_precommit_timeout(
    state: &ApiState,
    asked: Duration,
    max_tokens: usize,
) -> Result<(), ApiError> {
    let fastest = crate::actors::node_pool::FastestSpeed;
    let Some(best) = state.actors.pool.send(fastest).await? else {
        return Ok(());
    };
    let floor = precommit_floor_s(max_tokens, best);
    if asked.as_secs_f64() < floor {
        return Err(ApiError::Invalid(format!(
            "precommit_timeout {} s is shorter than this network's miners can meet for \
             max_tokens {max_tokens}: at least {floor} s (the fastest runs {best:.1} tokens/s)",
            asked.as_secs_f64()
        )));
    }
    Ok(())
}

/// Submits a task; with `live`, its states and tokens arrive as they happen, else only its end.
pub async fn start(
    state: &ApiState,
    caller: &Caller,
    spec: TaskSpec,
    live: bool,
) -> Result<Running, ApiError> {
    if spec.request.stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::Invalid(format!(
            "stop may hold at most {MAX_STOP_STRINGS} strings"
        )));
    }
    if let Some(asked) = spec.precommit_timeout {
        check_precommit_timeout(state, asked, spec.request.max_tokens).await?;
    }
    let permit = state
        .admission
        .try_admit(&caller.owner, caller.key.max_inflight)?;
    state.keys.take_task(&caller.key_hash, &caller.key).await?;
    let (tx, rx) = mpsc::channel(SUBSCRIBER_CAPACITY);
    let submit = SubmitTask {
        owner: caller.owner.clone(),
        session_id: spec.session_id,
        request: spec.request,
        explicit_seed: spec.explicit_seed,
        timeout: spec.timeout,
        precommit_timeout: spec.precommit_timeout,
        client_reference: spec.client_reference,
        subscriber: Some(Subscriber { events: tx, live }),
    };
    let submitted = match state.actors.router.send(submit).await {
        Ok(Ok(submitted)) => submitted,
        refused => {
            // The quota counts accepted tasks only.
            state
                .keys
                .give_back_task(&caller.key_hash, &caller.key)
                .await?;
            refused??
        }
    };
    let guard = TaskGuard {
        queue: state.actors.queue.clone(),
        key: submitted.key,
        armed: true,
    };
    Ok(Running {
        submitted,
        events: rx,
        guard,
        _permit: permit,
    })
}

/// Seconds a client whose task found no free miner is asked to wait (miners' reservations
/// last `reserve_period`; tasks end within seconds).
pub const NO_MINERS_RETRY_AFTER_S: u64 = 5;

/// The error a finished task that produced no accepted result stands for.
pub fn task_error(record: &TaskRecord) -> Option<ApiError> {
    let message = format!(
        "task {} {}: {}",
        record.key,
        record.state.name(),
        record.error.as_deref().unwrap_or("no result")
    );
    let (code, status) = match record.state {
        TaskState::Completed => return None,
        // No miner was free: capacity, not a failure of the task; worth retrying.
        TaskState::Failed if record.cause == Some(FailureCause::NoMiners) => {
            return Some(ApiError::Busy(message, NO_MINERS_RETRY_AFTER_S))
        }
        // The miners refused the request itself: the client's error.
        TaskState::Failed if record.cause == Some(FailureCause::InvalidRequest) => {
            return Some(ApiError::Invalid(message))
        }
        TaskState::Ended => ("task_timeout", StatusCode::GATEWAY_TIMEOUT),
        TaskState::Cancelled => ("task_cancelled", StatusCode::CONFLICT),
        _ => ("task_failed", StatusCode::BAD_GATEWAY),
    };
    Some(ApiError::TaskFailed {
        code,
        message,
        status,
    })
}

/// Follows the task to its end; the accepted record, or the error it ended with.
pub async fn finish(running: &mut Running) -> Result<TaskRecord, ApiError> {
    while let Some(event) = running.events.recv().await {
        if let TaskEvent::Finished(record) = event {
            running.guard.disarm();
            return match task_error(&record) {
                Some(e) => Err(e),
                None => Ok(*record),
            };
        }
    }
    Err(ApiError::Internal(
        "the task's events stopped before it finished".into(),
    ))
}

/// What a streaming endpoint turns into `data:` lines.
pub enum StreamEvent<'a> {
    /// Text of choice `index`.
    Token { index: usize, text: &'a str },
    /// Choice `index` completed; `rest` is its accepted text not streamed yet.
    Completed {
        index: usize,
        record: &'a TaskRecord,
        rest: &'a str,
    },
    /// Every choice completed (totals such as usage go here).
    AllCompleted { records: &'a [TaskRecord] },
}

/// A server-sent-event response for one task or several (a request's choices, streamed
/// together: each event names its choice's `index`): `first` events, then whatever
/// `render` makes of each token and each end, an error event if a task failed (the others
/// are cancelled), and `data: [DONE]`.
pub fn sse_response(
    running: Vec<Running>,
    first: Vec<Value>,
    render: impl FnMut(StreamEvent) -> Vec<Value> + 'static,
) -> HttpResponse {
    struct State<R> {
        running: Vec<Running>,
        render: R,
        streamed: Vec<String>,
        records: Vec<Option<TaskRecord>>,
        pending: VecDeque<Bytes>,
        done: bool,
    }
    fn data(v: &Value) -> Bytes {
        Bytes::from(format!("data: {v}\n\n"))
    }
    let n = running.len();
    let state = State {
        running,
        render,
        streamed: vec![String::new(); n],
        records: vec![None; n],
        pending: first.iter().map(data).collect(),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(bytes) = s.pending.pop_front() {
                return Some((Ok::<_, actix_web::Error>(bytes), s));
            }
            if s.done {
                return None;
            }
            // The next event of any choice still running (receiving is cancel-safe).
            let waiting = s
                .running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| s.records[*i].is_none())
                .map(|(i, r)| Box::pin(async move { (i, r.events.recv().await) }));
            let ((index, event), _, _) = futures_util::future::select_all(waiting).await;
            match event {
                Some(TaskEvent::State(_)) => {}
                Some(TaskEvent::Token { text }) => {
                    s.streamed[index].push_str(&text);
                    let events = (s.render)(StreamEvent::Token { index, text: &text });
                    s.pending.extend(events.iter().map(data));
                }
                Some(TaskEvent::Finished(record)) => {
                    s.running[index].guard.disarm();
                    if let Some(e) = task_error(&record) {
                        // The other choices are cancelled as their guards drop.
                        s.done = true;
                        s.pending.push_back(data(&e.body()));
                        s.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                        continue;
                    }
                    let text = &record.outcome.as_ref().expect("completed").result.text;
                    let rest = text
                        .strip_prefix(s.streamed[index].as_str())
                        .unwrap_or_else(|| {
                            tracing::warn!(task = %record.key, "the accepted text differs from the streamed one");
                            ""
                        });
                    let events = (s.render)(StreamEvent::Completed {
                        index,
                        record: &record,
                        rest,
                    });
                    s.pending.extend(events.iter().map(data));
                    s.records[index] = Some(*record);
                    if s.records.iter().all(Option::is_some) {
                        s.done = true;
                        let records: Vec<TaskRecord> =
                            s.records.iter().flatten().cloned().collect();
                        let events = (s.render)(StreamEvent::AllCompleted { records: &records });
                        s.pending.extend(events.iter().map(data));
                        s.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    }
                }
                None => {
                    s.done = true;
                    let e =
                        ApiError::Internal("the task's events stopped before it finished".into());
                    s.pending.push_back(data(&e.body()));
                    s.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream)
}
