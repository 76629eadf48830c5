//! Likelihood re-scoring: a validator replays a miner's claimed output through its own copy of
//! the model (one teacher-forced pass, far cheaper than generating) under the task's sampling
//! settings, and accepts only outputs the model itself would plausibly have produced.
//!
//! The figures come from [`Replay`] (`InferenceEngine::replay`); the decision is a pure
//! function of them, so `cortensor bench likelihood` measures exactly what validators decide.
//! The thresholds are justified by the distributions that bench measured (see
//! ARCHITECTURE.md, "Likelihood thresholds").

use crate::models::engine::{FinishReason, GenerateRequest, Replay};
use serde::{Deserialize, Serialize};

/// What one replay shows about one claimed output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LikelihoodEvidence {
    pub tokens: usize,
    /// Tokens that are the model's most likely token there.
    pub argmax_fraction: f32,
    /// Tokens the task's seeded sampler draws itself when replayed over the claimed output.
    pub seed_match_fraction: f32,
    /// Tokens the task's sampler could never draw (outside top-k / top-p; greedy: not the
    /// argmax).
    pub outside_support_fraction: f32,
    /// Tokens ranked beyond [`RARE_RANK`].
    pub rare_fraction: f32,
    /// Mean per-token log-probability under the task's temperature (1 for greedy).
    pub mean_logprob: f32,
    /// Whether the claimed end agrees with the model: a `stop` must be followed by an
    /// end-of-turn draw (unless the request has stop strings), a `length` must fill the
    /// budget.
    pub end_consistent: bool,
}

/// A token ranked beyond this is one the model all but rules out.
pub const RARE_RANK: u32 = 1000;

/// Where the line is drawn; [`LikelihoodThresholds::default`] holds the values the measured
/// distributions justify.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LikelihoodThresholds {
    /// Seeded replays (the validator knows the task's seed): at least this fraction of the
    /// tokens must be the sampler's own draws.
    pub min_seed_match: f32,
    /// At most this fraction of tokens outside the sampler's support.
    pub max_outside_support: f32,
    /// Greedy tasks: at least this fraction of tokens must be the argmax.
    pub min_argmax_greedy: f32,
    /// At most this fraction of tokens ranked beyond [`RARE_RANK`].
    pub max_rare: f32,
    /// The mean log-probability must be at least this.
    pub min_mean_logprob: f32,
}

impl Default for LikelihoodThresholds {
    fn default() -> Self {
        Self {
            min_seed_match: 0.95,
            max_outside_support: 0.05,
            min_argmax_greedy: 0.9,
            max_rare: 0.05,
            min_mean_logprob: -6.0,
        }
    }
}

/// The figures of one replay.
pub fn evidence(
    replay: &Replay,
    request: &GenerateRequest,
    token_ids: &[u32],
    finish: FinishReason,
) -> LikelihoodEvidence {
    let n = replay.checks.len();
    let fraction = |count: usize| {
        if n == 0 {
            0.0
        } else {
            count as f32 / n as f32
        }
    };
    let count = |f: &dyn Fn(usize) -> bool| (0..n).filter(|&i| f(i)).count();
    let c = &replay.checks;
    let end_consistent = match finish {
        FinishReason::Length => token_ids.len() >= replay.budget,
        FinishReason::Stop => {
            token_ids.len() < replay.budget
                && (!request.stop.is_empty() || replay.next_is_end != Some(false))
        }
        FinishReason::Cancelled => true,
    };
    LikelihoodEvidence {
        tokens: n,
        argmax_fraction: if n == 0 {
            1.0
        } else {
            fraction(count(&|i| c[i].rank == 0))
        },
        seed_match_fraction: if n == 0 {
            1.0
        } else {
            fraction(count(&|i| c[i].drawn == token_ids[i]))
        },
        outside_support_fraction: fraction(count(&|i| !c[i].in_support)),
        rare_fraction: fraction(count(&|i| c[i].rank > RARE_RANK)),
        mean_logprob: if n == 0 {
            0.0
        } else {
            c.iter().map(|t| t.logprob).sum::<f32>() / n as f32
        },
        end_consistent,
    }
}

/// Why an output fails; empty when it passes. `seeded`: the replay used the generation's own
/// seed (task validation), so the seed match decides (an honest output matches token for
/// token; ranks and log-probabilities add nothing and would only reject short, unlikely but
/// honest draws). Without the seed (a client's output checked through `/api/v1/validate`)
/// ranks and log-probabilities decide.
pub fn judge(
    e: &LikelihoodEvidence,
    request: &GenerateRequest,
    seeded: bool,
    t: &LikelihoodThresholds,
) -> Vec<String> {
    let mut reasons = Vec::new();
    let greedy = request.params.temperature <= 0.0;
    if !e.end_consistent {
        reasons.push("where it ends does not match its finish reason (truncated or padded)".into());
    }
    if seeded {
        if e.seed_match_fraction < t.min_seed_match {
            reasons.insert(
                0,
                format!(
                    "only {:.0}% of its tokens are what the task's seeded sampler draws (at least {:.0}% needed)",
                    e.seed_match_fraction * 100.0,
                    t.min_seed_match * 100.0
                ),
            );
        }
        return reasons;
    }
    if greedy && e.argmax_fraction < t.min_argmax_greedy {
        reasons.push(format!(
            "only {:.0}% of its tokens are the model's most likely token, on a greedy task (at least {:.0}% needed)",
            e.argmax_fraction * 100.0,
            t.min_argmax_greedy * 100.0
        ));
    }
    if !greedy && e.outside_support_fraction > t.max_outside_support {
        reasons.push(format!(
            "{:.0}% of its tokens lie outside the task's top-k/top-p (at most {:.0}% allowed)",
            e.outside_support_fraction * 100.0,
            t.max_outside_support * 100.0
        ));
    }
    if e.rare_fraction > t.max_rare {
        reasons.push(format!(
            "{:.0}% of its tokens rank beyond {RARE_RANK} (at most {:.0}% allowed)",
            e.rare_fraction * 100.0,
            t.max_rare * 100.0
        ));
    }
    if e.tokens > 0 && e.mean_logprob < t.min_mean_logprob {
        reasons.push(format!(
            "mean log-probability {:.2} is below {:.2}",
            e.mean_logprob, t.min_mean_logprob
        ));
    }
    reasons
}
