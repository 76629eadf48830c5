//! A model engine on a thread of its own, for validators: replaying a claimed output
//! (likelihood re-scoring) and asking the model to judge an answer (PoUW) take tens to
//! hundreds of milliseconds, too long for an actor's thread. Clones of the handle share the
//! one engine; requests wait in a bounded queue.

use crate::models::engine::{EngineError, InferenceEngine};

/// Requests waiting for the engine at most; beyond that, callers get an error at once.
pub const ENGINE_QUEUE: usize = 64;

type Job = Box<dyn FnOnce(&mut dyn InferenceEngine) + Send>;

#[derive(Clone)]
pub struct EngineService {
    jobs: std::sync::mpsc::SyncSender<Job>,
    model: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineServiceError {
    #[error("the validators' engine is busy ({ENGINE_QUEUE} requests waiting)")]
    Busy,
    #[error("the validators' engine stopped")]
    Stopped,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl EngineService {
    /// Starts the thread around an engine already loaded.
    pub fn start(engine: Box<dyn InferenceEngine>) -> Result<Self, EngineServiceError> {
        let model = engine.info().model;
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(ENGINE_QUEUE);
        std::thread::Builder::new()
            .name("validator-engine".into())
            .spawn(move || {
                let mut engine = engine;
                while let Ok(job) = queue.recv() {
                    // A panicking job must not take the thread (and every later request)
                    // down with it.
                    let run = std::panic::AssertUnwindSafe(|| job(engine.as_mut()));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!("a validator engine job panicked");
                    }
                }
            })
            .map_err(|_| EngineServiceError::Stopped)?;
        Ok(Self { jobs, model })
    }

    /// The model the engine runs.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Runs `f` on the engine's thread and returns what it returns.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn InferenceEngine) -> Result<R, EngineError> + Send + 'static,
    ) -> Result<R, EngineServiceError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |engine| {
            let _ = reply.send(f(engine));
        });
        self.jobs.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => EngineServiceError::Busy,
            std::sync::mpsc::TrySendError::Disconnected(_) => EngineServiceError::Stopped,
        })?;
        Ok(answer.await.map_err(|_| EngineServiceError::Stopped)??)
    }
}
