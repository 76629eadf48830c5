//! The engine interface miners and validators call, and the Llama engine behind it.
//!
//! Engines are synchronous and CPU/GPU-bound: callers run them on a thread of their own, never
//! on an async executor. Generation streams tokens through a callback and stops on EOS/EOT,
//! stop strings, `max_tokens`, the context limit, or cancellation.

use super::backend::{self, BackendChoice, BackendError, BackendKind};
use super::chat::{ChatError, ChatMessage, ChatTemplate};
use super::gguf::GgufFile;
use super::llama::{ForwardError, Llama, Session};
use super::sampling::{logprob_and_rank, Sampler, SamplingError, SamplingParams, TokenCheck};
use super::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
use super::weights::{self, LoadError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What to run the model on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Prompt {
    /// Raw text, tokenized as is (special tokens in it are honoured).
    Text(String),
    /// A conversation, rendered with the model's chat template plus the assistant prefix.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// Generation ends before the first occurrence of any of these; the stop text is not
    /// returned.
    pub stop: Vec<String>,
    /// Output tokens already generated (an accepted earlier chunk): the generation goes on
    /// after them, sampling exactly as the whole generation would have, and `max_tokens`
    /// counts the new tokens. The result holds the whole output, prefix included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context limit.
    Length,
    Cancelled,
}

/// One generated token as it is produced. `text` is the newly completed text (it may be empty
/// while a multi-byte character or a possible stop string is still incomplete).
#[derive(Clone, Debug)]
pub struct TokenEvent<'a> {
    pub index: usize,
    pub id: u32,
    pub text: &'a str,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// Per-token log-probabilities and ranks of a continuation under teacher forcing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// 0 = the model's most likely token at that position.
    pub ranks: Vec<u32>,
}

impl Score {
    /// Fraction of tokens that were the model's argmax (what greedy decoding would produce).
    pub fn argmax_fraction(&self) -> f64 {
        if self.ranks.is_empty() {
            return 1.0;
        }
        self.ranks.iter().filter(|&&r| r == 0).count() as f64 / self.ranks.len() as f64
    }
    pub fn mean_logprob(&self) -> f64 {
        if self.logprobs.is_empty() {
            return 0.0;
        }
        self.logprobs.iter().map(|&l| l as f64).sum::<f64>() / self.logprobs.len() as f64
    }
}

/// A claimed output replayed under its request's own sampling settings and seed, in one
/// teacher-forced pass: what a validator needs to tell whether this model produced it.
#[derive(Clone, Debug, PartialEq)]
pub struct Replay {
    /// One per claimed token after the request's `prefix` (the prefix was accepted before).
    pub checks: Vec<TokenCheck>,
    /// Tokens in the prompt, as the validator's engine renders it.
    pub prompt_tokens: usize,
    /// What the seeded sampler draws after the last claimed token ends the generation (an
    /// end-of-turn token); `None` when the context is full.
    pub next_is_end: Option<bool>,
    /// How many tokens (after the prefix) the generation could have made at most
    /// (`max_tokens`, or what the context leaves).
    pub budget: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct EngineInfo {
    pub model: String,
    pub backend: BackendKind,
    pub backend_description: String,
    pub max_context: usize,
    pub vocab_size: usize,
    pub weight_bytes: usize,
}

/// Cooperative cancellation: generation checks it between tokens.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("the prompt has {prompt} tokens; with max_tokens {max_tokens} that exceeds the context of {limit}")]
    PromptTooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("no tokenizer for {0}: a GGUF file carries one; a Hugging Face directory needs tokenizer.model (tiktoken) or --tokenizer")]
    NoTokenizer(String),
    #[error("could not start the thread pool: {0}")]
    ThreadPool(String),
    #[error(
        "the claimed output does not begin with the request's prefix (the output accepted before)"
    )]
    NotAContinuation,
}

impl EngineError {
    /// The request itself cannot be run (by any honest engine of this model): not the
    /// engine's fault.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            EngineError::PromptTooLong { .. } | EngineError::EmptyPrompt
        )
    }
}

/// What miners and validators need from a model.
pub trait InferenceEngine: Send {
    fn info(&self) -> EngineInfo;
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError>;
    fn detokenize(&self, ids: &[u32]) -> String;
    /// Generates, calling `on_token` for each token as it is made.
    fn generate(
        &mut self,
        request: &GenerateRequest,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Generation, EngineError>;
    /// Scores `continuation` after `prompt` in one teacher-forced forward pass.
    fn score(&mut self, prompt: &Prompt, continuation: &[u32]) -> Result<Score, EngineError>;
    /// Replays `continuation` as the output of `request` (its sampling settings and seed) in
    /// one teacher-forced forward pass.
    fn replay(
        &mut self,
        request: &GenerateRequest,
        continuation: &[u32],
    ) -> Result<Replay, EngineError>;
    /// The log-probabilities (temperature 1) of `candidates` as the token after `prompt`.
    fn next_logprobs(
        &mut self,
        prompt: &Prompt,
        candidates: &[u32],
    ) -> Result<Vec<f32>, EngineError>;
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub model: PathBuf,
    pub backend: BackendChoice,
    /// CPU threads for the matrix products; 0 = all cores.
    pub threads: usize,
    /// KV-cache positions per sequence (bounded by the model's trained context).
    pub max_context: usize,
    /// A tiktoken `tokenizer.model` for models that carry no tokenizer.
    pub tokenizer: Option<PathBuf>,
}

impl EngineOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            backend: BackendChoice::Auto,
            threads: 0,
            max_context: 4096,
            tokenizer: None,
        }
    }
}

/// A Llama model with its tokenizer and chat template, on a burn device.
pub struct LlamaEngine {
    model: Llama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    name: String,
    backend_description: String,
    weight_bytes: usize,
    pool: rayon::ThreadPool,
    /// A session kept for the next request over the same tokens (one at most): a generation
    /// that used its whole budget keeps its own (the next chunk of that output continues
    /// it), a replay keeps its session at the end of its prefix (the chunk's other results
    /// and the next chunk start there).
    parked: Option<ParkedSession>,
}

/// A kept session that has run `tokens` (the prompt and part of an output).
struct ParkedSession {
    tokens: Vec<u32>,
    session: Session,
    /// The logits of its last position, when kept by a replay (a generation keeps its
    /// session before running its last token, so a continuation runs that one first).
    last_logits: Option<Vec<f32>>,
}

impl LlamaEngine {
    pub fn load(opts: &EngineOptions) -> Result<Self, EngineError> {
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cortensor-infer-{i}"))
            .build()
            .map_err(|e| EngineError::ThreadPool(e.to_string()))?;
        // The model file first: a bad file should fail fast, before any device is probed.
        let (weights, tokenizer, carried_template, name) = if opts.model.is_dir() {
            let weights = weights::load_hf_dir(&opts.model)?;
            let tok_path = opts
                .tokenizer
                .clone()
                .unwrap_or_else(|| opts.model.join("tokenizer.model"));
            if !tok_path.is_file() {
                return Err(EngineError::NoTokenizer(opts.model.display().to_string()));
            }
            let tokenizer = Tokenizer::from_tiktoken_file(&tok_path)?;
            (weights, tokenizer, None, dir_name(&opts.model))
        } else {
            let g = GgufFile::open(&opts.model).map_err(LoadError::from)?;
            let weights = weights::load_gguf(&g)?;
            let tokenizer = match &opts.tokenizer {
                Some(p) => Tokenizer::from_tiktoken_file(p)?,
                None => Tokenizer::from_gguf(&g)?,
            };
            let template = g.get_str("tokenizer.chat_template").map(str::to_string);
            let name = g
                .get_str("general.name")
                .map(str::to_string)
                .unwrap_or_else(|| dir_name(&opts.model));
            drop(g); // unmap the file before the model is built: peak memory is one copy
            (weights, tokenizer, template, name)
        };
        let template = ChatTemplate::for_model(carried_template.as_deref(), &tokenizer)?;
        let selected = backend::select(opts.backend, threads)?;
        let weight_bytes = weights.byte_len();
        let model = pool
            .install(|| Llama::new(weights, &selected.device, selected.kind, opts.max_context))?;
        Ok(Self {
            model,
            tokenizer,
            template,
            name,
            backend_description: selected.description,
            weight_bytes,
            pool,
            parked: None,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// A session that has run `input[..upto]` (whose first `prompt_len` tokens are the
    /// prompt), with room for `capacity` positions and the logits of its last position. It
    /// continues the kept session when that ran a part of this, the prompt at least;
    /// otherwise the prompt is prefilled. The rest runs with decoding's kernels, row by row,
    /// so where it continues from changes no logit.
    fn session_through(
        &mut self,
        input: &[u32],
        prompt_len: usize,
        upto: usize,
        capacity: usize,
    ) -> Result<(Session, Vec<f32>), ForwardError> {
        let parked = self.parked.take().filter(|p| {
            let n = p.tokens.len();
            n >= prompt_len
                && n <= upto
                && (n < upto || p.last_logits.is_some())
                && input.starts_with(&p.tokens)
                && p.session.position() == n
        });
        let model = &self.model;
        self.pool.install(|| {
            let (mut session, mut logits) = match parked {
                Some(p) => {
                    let mut session = p.session;
                    model.grow_session(&mut session, capacity)?;
                    (session, p.last_logits.unwrap_or_default())
                }
                None => {
                    let mut session = model.new_session(capacity);
                    let logits = model.forward(&mut session, &input[..prompt_len], false)?;
                    (session, logits)
                }
            };
            session.decode_numerics = true;
            let done = session.position();
            if upto > done {
                logits = model.forward(&mut session, &input[done..upto], false)?;
            }
            Ok((session, logits))
        })
    }

    /// Runs `f` on the model inside this engine's thread pool (benchmarks, tests).
    pub fn with_model<R: Send>(&self, f: impl FnOnce(&Llama) -> R + Send) -> R {
        self.pool.install(|| f(&self.model))
    }

    /// Logits of the last position after running `tokens` from an empty cache.
    /// The prompt's tokens, when it is not empty and `then` more tokens fit after it.
    fn prompt_fitting(&self, prompt: &Prompt, then: usize) -> Result<Vec<u32>, EngineError> {
        let tokens = self.tokenize(prompt)?;
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let limit = self.model.max_context();
        if tokens.len() + then > limit {
            return Err(EngineError::PromptTooLong {
                prompt: tokens.len(),
                max_tokens: then,
                limit,
            });
        }
        Ok(tokens)
    }

    pub fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let model = &self.model;
        self.pool.install(|| {
            let mut session = model.new_session(tokens.len());
            Ok(model.forward(&mut session, tokens, false)?)
        })
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Holds back text that might be the start of a stop string, so a stop string is never
/// streamed out and then retracted.
fn stop_hold_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for k in (1..s.len().min(text.len() + 1)).rev() {
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                hold = hold.max(k);
                break;
            }
        }
    }
    hold
}

impl InferenceEngine for LlamaEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model: self.name.clone(),
            backend: self.model.backend(),
            backend_description: self.backend_description.clone(),
            max_context: self.model.max_context(),
            vocab_size: self.model.config().vocab_size,
            weight_bytes: self.weight_bytes,
        }
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let t = &self.tokenizer;
        let mut ids = match prompt {
            Prompt::Tokens(ids) => return Ok(ids.clone()),
            Prompt::Text(text) => t.encode(text, false, true),
            Prompt::Chat(messages) => t.encode(&self.template.render(messages, true)?, false, true),
        };
        // Add BOS where the model expects it, once (templates often emit it themselves).
        if let Some(bos) = t.bos_id().filter(|_| t.add_bos_by_default()) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    fn detokenize(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids)
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Generation, EngineError> {
        let prompt = self.tokenize(&request.prompt)?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let prefix = &request.prefix;
        let limit = self.model.max_context();
        if prompt.len() + prefix.len() >= limit {
            return Err(EngineError::PromptTooLong {
                prompt: prompt.len() + prefix.len(),
                max_tokens: request.max_tokens,
                limit,
            });
        }
        // `budget` counts every output token, the prefix's too.
        let budget = prefix.len() + request.max_tokens.min(limit - prompt.len() - prefix.len());
        let mut history = prompt.clone();
        history.extend_from_slice(prefix);
        let started = Instant::now();
        // The prompt, then the prefix (an accepted earlier chunk) with the kernels decoding
        // used for it, so the logits after it are the ones the whole generation computed.
        let (mut session, mut logits) = self.session_through(
            &history,
            prompt.len(),
            history.len(),
            (prompt.len() + budget).max(1),
        )?;
        let mut sampler = Sampler::new(request.params.clone())?;
        sampler.skip(prefix.len());
        let stop_ids = self.tokenizer.stop_ids();
        let model = &self.model;
        let pool = &self.pool;
        let tokenizer = &self.tokenizer;
        // Only the forward passes run in the pool: the token callback stays on this thread
        // (it need not be Send), and between tokens the pool's threads are free.
        let forward = |session: &mut Session, tokens: &[u32]| {
            pool.install(|| model.forward(session, tokens, false))
        };
        let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
        let decode_started = Instant::now();
        let mut ids = prefix.clone();
        let mut decoder = StreamDecoder::new();
        let mut text = String::new();
        for &id in prefix {
            text.push_str(&decoder.push(tokenizer, id));
        }
        // What the whole generation had emitted by then (text that could still begin a stop
        // string was held back); the rest is emitted as it would have been.
        let mut emitted = text.len() - stop_hold_back(&text, &request.stop);
        let mut finish = FinishReason::Length;
        let mut stopped_by_string = false;
        while ids.len() < budget {
            if cancel.is_cancelled() {
                finish = FinishReason::Cancelled;
                break;
            }
            let next = sampler.sample(&mut logits, &history);
            if stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            ids.push(next);
            history.push(next);
            text.push_str(&decoder.push(tokenizer, next));
            // Only the unemitted tail can hold a new match: any stop string starting earlier
            // would have had its prefix held back (`stop_hold_back`), not emitted. Searching
            // the tail keeps this O(new text) per token instead of O(all text).
            if let Some(at) = request
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text[emitted..].find(s.as_str()).map(|i| emitted + i))
                .min()
            {
                text.truncate(at);
                let piece = &text[emitted.min(text.len())..];
                on_token(&TokenEvent {
                    index: ids.len() - 1,
                    id: next,
                    text: piece,
                });
                emitted = text.len();
                finish = FinishReason::Stop;
                stopped_by_string = true;
                break;
            }
            let safe = text.len() - stop_hold_back(&text, &request.stop);
            on_token(&TokenEvent {
                index: ids.len() - 1,
                id: next,
                text: &text[emitted..safe],
            });
            emitted = safe;
            if ids.len() < budget {
                logits = forward(&mut session, &[next])?;
            }
        }
        if !stopped_by_string {
            // Flush bytes of an unfinished character and text held back for a stop string
            // that never came.
            text.push_str(&decoder.flush());
            if emitted < text.len() {
                on_token(&TokenEvent {
                    index: ids.len().saturating_sub(1),
                    id: *ids.last().unwrap_or(&0),
                    text: &text[emitted..],
                });
            }
        }
        let decode_ms = decode_started.elapsed().as_secs_f64() * 1e3;
        // The first token comes from the prefill logits; decode speed counts the rest.
        let decoded_steps = (ids.len() - prefix.len()).saturating_sub(1) as f64;
        if finish == FinishReason::Length && ids.len() == budget && !ids.is_empty() {
            // Its budget ran out: a next chunk of this output may follow. The session has run
            // everything but the last token.
            history.pop();
            self.parked = Some(ParkedSession {
                tokens: history,
                session,
                last_logits: None,
            });
        }
        Ok(Generation {
            prompt_tokens: prompt.len(),
            prefill_tok_s: prompt.len() as f64 / (prefill_ms / 1e3).max(1e-9),
            decode_tok_s: if decoded_steps > 0.0 {
                decoded_steps / (decode_ms / 1e3).max(1e-9)
            } else {
                0.0
            },
            prefill_ms,
            decode_ms,
            token_ids: ids,
            text,
            finish_reason: finish,
        })
    }

    fn score(&mut self, prompt: &Prompt, continuation: &[u32]) -> Result<Score, EngineError> {
        let prompt = self.tokenize(prompt)?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if continuation.is_empty() {
            return Ok(Score {
                token_ids: vec![],
                logprobs: vec![],
                ranks: vec![],
            });
        }
        let total = prompt.len() + continuation.len();
        let limit = self.model.max_context();
        if total > limit {
            return Err(EngineError::PromptTooLong {
                prompt: prompt.len(),
                max_tokens: continuation.len(),
                limit,
            });
        }
        let vocab = self.model.config().vocab_size;
        let model = &self.model;
        self.pool.install(|| {
            let mut session = model.new_session(total);
            let mut input = prompt.clone();
            input.extend_from_slice(continuation);
            // Position p's logits predict token p + 1: run everything but the last token.
            let scored = &input[..total - 1];
            let logits = model.forward(&mut session, scored, true)?;
            let mut logprobs = Vec::with_capacity(continuation.len());
            let mut ranks = Vec::with_capacity(continuation.len());
            for (i, &tok) in continuation.iter().enumerate() {
                let row = prompt.len() - 1 + i;
                let (lp, rank) = logprob_and_rank(&logits[row * vocab..(row + 1) * vocab], tok);
                logprobs.push(lp);
                ranks.push(rank);
            }
            Ok(Score {
                token_ids: continuation.to_vec(),
                logprobs,
                ranks,
            })
        })
    }

    fn next_logprobs(
        &mut self,
        prompt: &Prompt,
        candidates: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let tokens = self.prompt_fitting(prompt, 0)?;
        let logits = self.last_logits(&tokens)?;
        Ok(candidates
            .iter()
            .map(|&t| logprob_and_rank(&logits, t).0)
            .collect())
    }

    fn replay(
        &mut self,
        request: &GenerateRequest,
        continuation: &[u32],
    ) -> Result<Replay, EngineError> {
        if !continuation.starts_with(&request.prefix) {
            return Err(EngineError::NotAContinuation);
        }
        let prompt = self.prompt_fitting(&request.prompt, continuation.len())?;
        let limit = self.model.max_context();
        let total = prompt.len() + continuation.len();
        // Tokens before `start` were accepted before: they are run (the cache needs them)
        // but not checked, and the sampler is positioned after them.
        let start = prompt.len() + request.prefix.len();
        let mut sampler = Sampler::new(request.params.clone())?;
        sampler.skip(request.prefix.len());
        let stop_ids = self.tokenizer.stop_ids();
        let vocab = self.model.config().vocab_size;
        let mut input = prompt.clone();
        input.extend_from_slice(continuation);
        // Row r of the logits predicts input[start + r]; the last row (when it fits)
        // predicts what follows the claimed output. The numerics are generation's: the
        // prompt in one pass as prefill does, then the claimed tokens with the kernels
        // decoding uses (row by row, so splitting them at the prefix changes nothing).
        let rows = if total < limit { total } else { total - 1 };
        // Kept at the prefix's end: the other results of this chunk, and the next chunk
        // (whose prefix extends this one), start there.
        let (mut session, mut logits) =
            self.session_through(&input, prompt.len(), start.min(rows), total)?;
        self.parked = Some(ParkedSession {
            tokens: input[..session.position()].to_vec(),
            session: session.clone(),
            last_logits: Some(logits.clone()),
        });
        if rows > start {
            let model = &self.model;
            let rest = self
                .pool
                .install(|| model.forward(&mut session, &input[start..rows], true))?;
            logits.extend(rest);
        }
        let new = &continuation[request.prefix.len()..];
        let mut checks = Vec::with_capacity(new.len());
        for (i, &token) in new.iter().enumerate() {
            let mut row_logits = logits[i * vocab..(i + 1) * vocab].to_vec();
            checks.push(sampler.check(&mut row_logits, &input[..start + i], token));
        }
        let next_is_end = (rows == total).then(|| {
            let row = new.len();
            let mut row_logits = logits[row * vocab..(row + 1) * vocab].to_vec();
            stop_ids.contains(&sampler.sample(&mut row_logits, &input))
        });
        Ok(Replay {
            checks,
            prompt_tokens: prompt.len(),
            next_is_end,
            budget: request.max_tokens.min(limit.saturating_sub(start)),
        })
    }
}
