//! A scripted [`InferenceEngine`]: deterministic words derived from the prompt and the seed,
//! produced instantly or with a delay per token, that can fail, panic or lie on demand. It lets
//! orchestration tests run fast and exercise the edges; the shipped testnet uses the real model.

use crate::models::backend::BackendKind;
use crate::models::engine::{
    CancelToken, EngineError, EngineInfo, FinishReason, GenerateRequest, Generation,
    InferenceEngine, Prompt, Replay, Score, TokenEvent,
};
use crate::models::sampling::TokenCheck;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The model name scripted miners register with.
pub const SCRIPTED_MODEL: &str = "scripted-echo";

#[derive(Clone, Debug, Default)]
pub struct Script {
    /// Words generated at most (also bounded by max_tokens). 0 means 8.
    pub length: usize,
    pub token_delay: Duration,
    /// Panics inside `generate` while this counter is above zero (shared, so the count
    /// survives the engine being rebuilt after the panic).
    pub panics_left: Arc<AtomicUsize>,
    /// Every generation returns an error.
    pub fail: bool,
    /// Produces different text from honest engines (a dishonest or broken miner).
    pub dishonest: bool,
    /// Answers with these words, whatever the prompt (miners whose texts differ in wording,
    /// for embedding validation).
    pub answer: Option<String>,
}

impl Script {
    pub fn panicking(times: usize) -> Self {
        Self {
            panics_left: Arc::new(AtomicUsize::new(times)),
            ..Self::default()
        }
    }
    pub fn slow(token_delay: Duration) -> Self {
        Self {
            token_delay,
            ..Self::default()
        }
    }
}

pub struct ScriptedEngine {
    script: Script,
}

impl ScriptedEngine {
    pub fn new(script: Script) -> Self {
        Self { script }
    }
}

fn prompt_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(messages) => messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Prompt::Tokens(ids) => ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The `i`-th word for a prompt and seed: a stable function anyone can recompute.
pub fn scripted_word(prompt: &str, seed: u64, i: usize) -> String {
    let mut bytes = prompt.as_bytes().to_vec();
    bytes.extend_from_slice(&seed.to_be_bytes());
    bytes.extend_from_slice(&(i as u64).to_be_bytes());
    let h = ethers::utils::keccak256(bytes);
    format!(" w{}", u16::from_be_bytes([h[0], h[1]]) % 1000)
}

impl InferenceEngine for ScriptedEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model: SCRIPTED_MODEL.to_string(),
            backend: BackendKind::Cpu,
            backend_description: "scripted".into(),
            max_context: 4096,
            vocab_size: 1000,
            weight_bytes: 0,
        }
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = prompt_text(prompt);
        if text.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        Ok(text
            .split_whitespace()
            .enumerate()
            .map(|(i, _)| i as u32)
            .collect())
    }

    fn detokenize(&self, ids: &[u32]) -> String {
        ids.iter().map(|i| format!(" w{i}")).collect()
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        cancel: &CancelToken,
        on_token: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Generation, EngineError> {
        let started = Instant::now();
        if self
            .script
            .panics_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("scripted engine panic");
        }
        if self.script.fail {
            return Err(EngineError::ThreadPool("a scripted failure".into()));
        }
        let prompt_tokens = self.tokenize(&request.prompt)?.len();
        let limit = self.info().max_context;
        if prompt_tokens + request.max_tokens > limit {
            return Err(EngineError::PromptTooLong {
                prompt: prompt_tokens,
                max_tokens: request.max_tokens,
                limit,
            });
        }
        let mut prompt = prompt_text(&request.prompt);
        if self.script.dishonest {
            prompt.push_str("\u{0}dishonest");
        }
        let answer: Option<Vec<&str>> = self
            .script
            .answer
            .as_deref()
            .map(|a| a.split_whitespace().collect());
        let length = match (&answer, self.script.length) {
            (Some(words), _) => words.len(),
            (None, 0) => 8,
            (None, n) => n,
        };
        // A continuation (`prefix`) goes on from word `prefix.len()`; `max_tokens` counts
        // the new words, and the result holds the whole output.
        let from = request.prefix.len().min(length);
        let n = length.min(from + request.max_tokens);
        let mut finish_reason = if n < from + request.max_tokens {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let word_at = |i: usize| -> (String, u32) {
            match &answer {
                Some(words) => (format!(" {}", words[i]), i as u32),
                None => {
                    let word = scripted_word(&prompt, request.params.seed, i);
                    let id = word[2..].parse().unwrap_or(0);
                    (word, id)
                }
            }
        };
        let mut text: String = (0..from).map(|i| word_at(i).0).collect();
        let mut token_ids: Vec<u32> = request.prefix[..from].to_vec();
        for i in from..n {
            if cancel.is_cancelled() {
                finish_reason = FinishReason::Cancelled;
                break;
            }
            if !self.script.token_delay.is_zero() {
                std::thread::sleep(self.script.token_delay);
            }
            let (word, id) = word_at(i);
            on_token(&TokenEvent {
                index: i,
                id,
                text: &word,
            });
            text.push_str(&word);
            token_ids.push(id);
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(Generation {
            token_ids,
            text,
            finish_reason,
            prompt_tokens,
            prefill_ms: 0.0,
            decode_ms: ms,
            prefill_tok_s: 0.0,
            decode_tok_s: 0.0,
        })
    }

    fn score(&mut self, _prompt: &Prompt, continuation: &[u32]) -> Result<Score, EngineError> {
        Ok(Score {
            token_ids: continuation.to_vec(),
            logprobs: vec![0.0; continuation.len()],
            ranks: vec![0; continuation.len()],
        })
    }

    /// Favours one candidate, chosen by a hash of the prompt (a judge's grade that is stable
    /// but says nothing about quality).
    fn next_logprobs(
        &mut self,
        prompt: &Prompt,
        candidates: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let h = ethers::utils::keccak256(prompt_text(prompt).as_bytes());
        let favoured = h[0] as usize % candidates.len().max(1);
        Ok((0..candidates.len())
            .map(|i| if i == favoured { -0.1 } else { -5.0 })
            .collect())
    }

    /// What an honest scripted engine with this script's length and answer would generate,
    /// compared token by token: a claimed token that differs ranks 1 with log-probability -20.
    fn replay(
        &mut self,
        request: &GenerateRequest,
        continuation: &[u32],
    ) -> Result<Replay, EngineError> {
        let mut honest = ScriptedEngine::new(Script {
            length: self.script.length,
            answer: self.script.answer.clone(),
            ..Script::default()
        });
        if !continuation.starts_with(&request.prefix) {
            return Err(EngineError::NotAContinuation);
        }
        let expected = honest.generate(request, &CancelToken::new(), &mut |_| {})?;
        let from = request.prefix.len();
        let checks = continuation
            .iter()
            .enumerate()
            .skip(from)
            .map(|(i, &token)| {
                let drawn = expected.token_ids.get(i).copied().unwrap_or(u32::MAX);
                let same = drawn == token;
                TokenCheck {
                    rank: u32::from(!same),
                    logprob: if same { 0.0 } else { -20.0 },
                    in_support: same,
                    drawn,
                }
            })
            .collect();
        Ok(Replay {
            checks,
            prompt_tokens: expected.prompt_tokens,
            next_is_end: Some(continuation.len() >= expected.token_ids.len()),
            budget: request.max_tokens,
        })
    }
}
