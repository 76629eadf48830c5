//! Choosing the next token from logits: penalties, then greedy or temperature with top-k and
//! top-p, from a seeded generator. Same seed and same logits give the same tokens.
//!
//! The order follows llama.cpp's default chain: repetition / presence / frequency penalties,
//! top-k, top-p, temperature, then a draw from the softmax.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Sampling settings of one request. `temperature <= 0` means greedy (argmax).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 1.0 disables the multiplicative repetition penalty (llama.cpp's `repeat_penalty`).
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token already seen (OpenAI's definition).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of every token already seen.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("{name} must be {rule}, got {value}")]
    OutOfRange {
        name: &'static str,
        rule: &'static str,
        value: f32,
    },
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Rejects NaN, infinities and values outside the meaningful ranges, so a bad request gets
    /// a clear error instead of NaN logits.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |name, value: f32, ok: bool, rule| {
            if value.is_finite() && ok {
                Ok(())
            } else {
                Err(SamplingError::OutOfRange { name, rule, value })
            }
        };
        check(
            "temperature",
            self.temperature,
            (0.0..=100.0).contains(&self.temperature),
            "between 0 and 100",
        )?;
        check(
            "top_p",
            self.top_p,
            self.top_p > 0.0 && self.top_p <= 1.0,
            "in (0, 1]",
        )?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            self.repeat_penalty > 0.0 && self.repeat_penalty <= 10.0,
            "in (0, 10]",
        )?;
        check(
            "presence_penalty",
            self.presence_penalty,
            (-2.0..=2.0).contains(&self.presence_penalty),
            "between -2 and 2",
        )?;
        check(
            "frequency_penalty",
            self.frequency_penalty,
            (-2.0..=2.0).contains(&self.frequency_penalty),
            "between -2 and 2",
        )?;
        Ok(())
    }
}

/// One claimed token, checked by [`Sampler::check`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenCheck {
    /// 0 = the most likely token (after the penalties).
    pub rank: u32,
    /// Log-probability under the sampler's temperature (temperature 1 for greedy), before
    /// top-k and top-p.
    pub logprob: f32,
    /// Top-k and top-p keep it (greedy: it is the argmax).
    pub in_support: bool,
    /// What the sampler draws here itself.
    pub drawn: u32,
}

/// A seeded sampler; one per generation.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            candidates: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Positions the random stream after `tokens` sampled tokens, as if they had been drawn
    /// here: each sampled (temperature > 0) token takes exactly one 32-bit draw, so a
    /// generation continued after an accepted prefix draws what the whole one would have.
    pub fn skip(&mut self, tokens: usize) {
        if self.params.temperature > 0.0 {
            self.rng.set_word_pos(tokens as u128);
        }
    }

    /// Picks the next token. `history` is every token so far (prompt and generated); the
    /// penalties look at its last `repeat_last_n`. `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_penalties(logits, history);
        self.draw(logits)
    }

    /// Checks a claimed `token` at one position: where it ranks, its log-probability, whether
    /// this sampler could have drawn it at all, and what this sampler draws itself there. The
    /// random stream advances exactly as in [`Sampler::sample`], so replaying a whole output
    /// position by position with the generation's seed draws the generation's tokens.
    pub fn check(&mut self, logits: &mut [f32], history: &[u32], token: u32) -> TokenCheck {
        self.apply_penalties(logits, history);
        let t = if self.params.temperature > 0.0 {
            self.params.temperature
        } else {
            1.0
        };
        let target = logits
            .get(token as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY);
        let rank = logits.iter().filter(|&&l| l > target).count() as u32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max / t
            + logits
                .iter()
                .map(|l| ((l - max) / t).exp())
                .sum::<f32>()
                .ln();
        let logprob = target / t - lse;
        let drawn = self.draw(logits);
        let in_support = if self.params.temperature <= 0.0 {
            token == drawn
        } else {
            self.candidates.iter().any(|c| c.0 == token)
        };
        TokenCheck {
            rank,
            logprob,
            in_support,
            drawn,
        }
    }

    /// Draws from logits the penalties were already applied to. For sampling, leaves the
    /// tokens it could have drawn (after top-k and top-p) in `self.candidates`.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        // Sort by logit (descending), ties by id so the order is total and reproducible.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = if self.params.top_k == 0 {
            c.len()
        } else {
            self.params.top_k.min(c.len())
        };
        if k < c.len() {
            c.select_nth_unstable_by(k - 1, by_logit);
            c.truncate(k);
        }
        c.sort_unstable_by(by_logit);
        // Softmax at temperature 1 for top-p (as llama.cpp's chain applies temp last).
        let max = c[0].1;
        let mut probs: Vec<f32> = c.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p / total;
                if cum >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        let t = self.params.temperature;
        probs.clear();
        probs.extend(c.iter().map(|(_, l)| ((l - max) / t).exp()));
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.gen::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return c[i].0;
            }
        }
        c[c.len() - 1].0
    }

    fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in recent {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            if p.repeat_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repeat_penalty
                } else {
                    *l * p.repeat_penalty
                };
            }
            *l -= p.presence_penalty + p.frequency_penalty * n as f32;
        }
    }
}

/// Index of the largest logit (the first on ties, as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one row and the rank of `token` in it (0 = the most likely token).
pub fn logprob_and_rank(logits: &[f32], token: u32) -> (f32, u32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let target = logits
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    let rank = logits.iter().filter(|&&l| l > target).count() as u32;
    (target - lse, rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.5, 0.0]
    }

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&mut logits(), &[]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_seeds_differ() {
        let params = SamplingParams {
            temperature: 1.5,
            seed: 42,
            ..Default::default()
        };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            (0..64)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params.clone()), draw(params.clone()));
        assert_ne!(
            draw(params.clone()),
            draw(SamplingParams { seed: 43, ..params })
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits(), &[]), 1);
        }
        // top_p 0.5: token 1 alone holds ~43% of the mass, token 4 ~26%; both needed.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..200 {
            let t = s.sample(&mut logits(), &[]);
            assert!(t == 1 || t == 4, "token {t} is outside the top-p set");
        }
    }

    #[test]
    fn penalties_push_seen_tokens_down() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        // Token 1 (3.0 -> 1.5) falls below token 4 (2.5).
        assert_eq!(s.sample(&mut logits(), &[1]), 4);
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.4,
            ..Default::default()
        })
        .unwrap();
        // Token 1 seen twice: 3.0 - 0.8 = 2.2 < 2.5.
        assert_eq!(s.sample(&mut logits(), &[1, 1]), 4);
    }

    #[test]
    fn invalid_values_are_errors() {
        for p in [
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 5.0,
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }

    #[test]
    fn logprob_rank() {
        let (lp, rank) = logprob_and_rank(&logits(), 4);
        assert_eq!(rank, 1);
        let expected = 2.5 - logits().iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((lp - expected).abs() < 1e-5);
    }
}
