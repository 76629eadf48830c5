//! The measurement behind the likelihood thresholds: honest outputs and several kinds of
//! dishonest ones, each replayed as a validator would. `cortensor bench likelihood` prints the
//! distributions; tests assert the decisions on a few seeded prompts.

use super::likelihood::{evidence, judge, LikelihoodEvidence, LikelihoodThresholds};
use crate::models::chat::ChatMessage;
use crate::models::engine::{
    CancelToken, EngineError, FinishReason, GenerateRequest, Generation, InferenceEngine, Prompt,
};
use crate::models::sampling::SamplingParams;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// What an output claims to be, and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub enum OutputKind {
    /// The task's own generation.
    Honest,
    /// Token ids drawn uniformly from the vocabulary.
    RandomTokens,
    /// Generated with another seed (sampled tasks only: greedy ignores the seed).
    OtherSeed,
    /// Generated with other sampling settings (greedy for a sampled task, temperature 1 for a
    /// greedy one).
    OtherSetting,
    /// The honest output cut in half, claimed to have stopped there.
    Truncated,
    /// The honest answer to a different prompt.
    OtherPrompt,
}

impl OutputKind {
    pub const ALL: [OutputKind; 6] = [
        OutputKind::Honest,
        OutputKind::RandomTokens,
        OutputKind::OtherSeed,
        OutputKind::OtherSetting,
        OutputKind::Truncated,
        OutputKind::OtherPrompt,
    ];
    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Honest => "honest",
            OutputKind::RandomTokens => "random tokens",
            OutputKind::OtherSeed => "another seed",
            OutputKind::OtherSetting => "another sampling setting",
            OutputKind::Truncated => "truncated",
            OutputKind::OtherPrompt => "another prompt's answer",
        }
    }
}

/// One replayed output.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub kind: OutputKind,
    pub setting: &'static str,
    pub evidence: LikelihoodEvidence,
    /// Rejected with the seed known (task validation).
    pub rejected_seeded: bool,
    /// Rejected without the seed (`/api/v1/validate`).
    pub rejected_unseeded: bool,
}

/// The sampling settings studied: (name, params without the seed).
pub fn settings() -> Vec<(&'static str, SamplingParams)> {
    vec![
        ("greedy", SamplingParams::greedy()),
        (
            "t0.7 top_p0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ),
        (
            "t1.0 top_k40",
            SamplingParams {
                temperature: 1.0,
                top_k: 40,
                ..SamplingParams::default()
            },
        ),
    ]
}

/// Prompts unlike one another, for the study.
pub const PROMPTS: [&str; 12] = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "Explain what a hash function is to a child.",
    "List three uses of copper.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a name for a pet turtle and explain why.",
    "What is 12 times 7? Show your work.",
    "Describe the smell of rain in two sentences.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What should I pack for a weekend hiking trip?",
];

fn request(prompt: &str, params: SamplingParams, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![ChatMessage::user(prompt)]),
        params,
        max_tokens,
        stop: vec![],
        prefix: vec![],
    }
}

fn generate(
    engine: &mut dyn InferenceEngine,
    r: &GenerateRequest,
) -> Result<Generation, EngineError> {
    engine.generate(r, &CancelToken::new(), &mut |_| {})
}

/// Generates, for each prompt and setting, the honest output and the dishonest kinds, and
/// replays each as the task's validator would. `seed` seeds the sampling and the random
/// tokens.
pub fn run(
    engine: &mut dyn InferenceEngine,
    prompts: &[&str],
    max_tokens: usize,
    seed: u64,
    thresholds: &LikelihoodThresholds,
) -> Result<Vec<Sample>, EngineError> {
    let vocab = engine.info().vocab_size as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut samples = Vec::new();
    for (setting, base) in settings() {
        let greedy = base.temperature <= 0.0;
        // Honest outputs of every prompt first: another prompt's answer borrows them.
        let mut honest = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let params = SamplingParams {
                seed: seed.wrapping_add(i as u64),
                ..base.clone()
            };
            let r = request(prompt, params, max_tokens);
            let g = generate(engine, &r)?;
            honest.push((r, g));
        }
        for i in 0..prompts.len() {
            let (r, g) = &honest[i];
            let mut claims: Vec<(OutputKind, Vec<u32>, FinishReason)> =
                vec![(OutputKind::Honest, g.token_ids.clone(), g.finish_reason)];
            let random: Vec<u32> = (0..g.token_ids.len().max(4))
                .map(|_| rng.gen_range(0..vocab))
                .collect();
            claims.push((OutputKind::RandomTokens, random, FinishReason::Length));
            if !greedy {
                let other = GenerateRequest {
                    params: SamplingParams {
                        seed: r.params.seed ^ 0x5eed,
                        ..r.params.clone()
                    },
                    ..r.clone()
                };
                let o = generate(engine, &other)?;
                claims.push((OutputKind::OtherSeed, o.token_ids, o.finish_reason));
            }
            let other_setting = GenerateRequest {
                params: if greedy {
                    SamplingParams {
                        temperature: 1.0,
                        seed: r.params.seed,
                        ..SamplingParams::default()
                    }
                } else {
                    SamplingParams::greedy()
                },
                ..r.clone()
            };
            let o = generate(engine, &other_setting)?;
            if o.token_ids != g.token_ids {
                claims.push((OutputKind::OtherSetting, o.token_ids, o.finish_reason));
            }
            if g.token_ids.len() >= 4 {
                let half = g.token_ids[..g.token_ids.len() / 2].to_vec();
                claims.push((OutputKind::Truncated, half, FinishReason::Stop));
            }
            let (_, next) = &honest[(i + 1) % prompts.len()];
            if prompts.len() > 1 {
                claims.push((
                    OutputKind::OtherPrompt,
                    next.token_ids.clone(),
                    next.finish_reason,
                ));
            }
            for (kind, ids, finish) in claims {
                let replay = engine.replay(r, &ids)?;
                let e = evidence(&replay, r, &ids, finish);
                samples.push(Sample {
                    kind,
                    setting,
                    rejected_seeded: !judge(&e, r, true, thresholds).is_empty(),
                    rejected_unseeded: !judge(&e, r, false, thresholds).is_empty(),
                    evidence: e,
                });
            }
        }
    }
    Ok(samples)
}
