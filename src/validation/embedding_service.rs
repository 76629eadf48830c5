//! The embedder on a thread of its own: embedding takes tens of milliseconds a text on a CPU,
//! too long for an actor's thread. Clones of the handle share the one model; requests wait in
//! a bounded queue.

use crate::models::bert::{EmbedError, Embedder};
use burn::tensor::Device;
use std::path::Path;

/// Requests waiting for the embedding thread at most; beyond that, callers get an error.
pub const EMBED_QUEUE: usize = 64;

type Reply = tokio::sync::oneshot::Sender<Result<Vec<Vec<f32>>, String>>;

#[derive(Clone)]
pub struct EmbeddingService {
    requests: std::sync::mpsc::SyncSender<(Vec<String>, Reply)>,
}

impl EmbeddingService {
    /// Loads the model (a Hugging Face BERT directory) on a new thread; returns once it is
    /// loaded, or with the error that stopped it.
    pub fn start(dir: &Path, device: Device) -> Result<Self, EmbedError> {
        let (requests, queue) = std::sync::mpsc::sync_channel::<(Vec<String>, Reply)>(EMBED_QUEUE);
        let (loaded, ready) = std::sync::mpsc::channel();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("embedder".into())
            .spawn(move || {
                let embedder = match Embedder::load(&dir, &device) {
                    Ok(e) => {
                        let _ = loaded.send(Ok(()));
                        e
                    }
                    Err(e) => {
                        let _ = loaded.send(Err(e));
                        return;
                    }
                };
                while let Ok((texts, reply)) = queue.recv() {
                    let vectors: Result<Vec<Vec<f32>>, String> = texts
                        .iter()
                        .map(|t| embedder.embed(t).map_err(|e| e.to_string()))
                        .collect();
                    let _ = reply.send(vectors);
                }
            })
            .map_err(|e| EmbedError::Readback(format!("cannot start the embedding thread: {e}")))?;
        ready.recv().map_err(|_| {
            EmbedError::Readback("the embedding thread died while loading".into())
        })??;
        Ok(Self { requests })
    }

    /// The embeddings of `texts`, in order.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests
            .try_send((texts, reply))
            .map_err(|e| format!("the embedder cannot take the request: {e}"))?;
        answer
            .await
            .map_err(|_| "the embedding thread stopped".to_string())?
    }
}
