//! The shape of a Llama-architecture model, read from GGUF metadata or a Hugging Face
//! `config.json`, and the rotary-embedding frequencies (with Llama 3.x's frequency scaling).

use serde_json::Value;

/// How the two halves of each rotary pair are laid out in the Q and K projections.
///
/// Meta's checkpoints and GGUF files pair dimensions (2i, 2i+1); Hugging Face checkpoints
/// permute Q/K rows so the pairs are (i, i + head_dim/2). The loader knows which it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    Interleaved,
    HalfSplit,
}

/// Llama 3.x's rotary frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_context: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_layout: RopeLayout,
    /// One inverse frequency per rotary pair (`head_dim / 2`), scaling already applied.
    pub rope_inv_freq: Vec<f32>,
    /// The context the model was trained for.
    pub trained_context: usize,
    pub tied_embeddings: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unsupported architecture {0:?}: only Llama-architecture models (\"llama\") are supported"
    )]
    UnsupportedArchitecture(String),
    #[error("model metadata is missing {0}")]
    Missing(String),
    #[error("model metadata has an invalid {key}: {why}")]
    Invalid { key: String, why: String },
}

/// Plain base frequencies: `theta^(-2i/d)` for each pair i.
pub fn base_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64) as f32)
        .collect()
}

/// Llama 3.x scaling as Hugging Face's `_compute_llama3_parameters` and Meta's reference
/// `apply_scaling` define it: long wavelengths slowed by `factor`, short ones kept, a smooth
/// blend between.
pub fn llama3_scaled_inv_freq(inv_freq: &[f32], s: &Llama3RopeScaling) -> Vec<f32> {
    let old = s.original_context as f64;
    let low_wavelen = old / s.low_freq_factor as f64;
    let high_wavelen = old / s.high_freq_factor as f64;
    inv_freq
        .iter()
        .map(|&f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor as f64
            } else {
                let smooth = (old / wavelen - s.low_freq_factor as f64)
                    / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                (1.0 - smooth) * f / s.factor as f64 + smooth * f
            };
            scaled as f32
        })
        .collect()
}

/// The per-pair divisors llama.cpp's converter stores as the `rope_freqs.weight` tensor for the
/// same scaling (`freq / rope_freqs[i]` is the scaled frequency).
pub fn llama3_rope_freq_factors(inv_freq: &[f32], s: &Llama3RopeScaling) -> Vec<f32> {
    inv_freq
        .iter()
        .zip(llama3_scaled_inv_freq(inv_freq, s))
        .map(|(&f, scaled)| f / scaled)
        .collect()
}

impl LlamaConfig {
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Checks the invariants the model relies on, so a bad file fails at load, not mid-run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                why,
            })
        };
        const LIMIT: usize = 1 << 20;
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 || v > LIMIT {
                return bad(key, format!("{v} is outside 1..={LIMIT}"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                "n_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!(
                    "{} is odd; rotary embeddings pair dimensions",
                    self.head_dim
                ),
            );
        }
        if self.rope_inv_freq.len() != self.head_dim / 2 {
            return bad(
                "rope frequencies",
                format!(
                    "{} given for head_dim {}",
                    self.rope_inv_freq.len(),
                    self.head_dim
                ),
            );
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return bad(
                "rms_norm_eps",
                format!("{} is not a positive number", self.rms_eps),
            );
        }
        if !self.rope_inv_freq.iter().all(|f| f.is_finite() && *f > 0.0) {
            return bad("rope frequencies", "not all positive and finite".into());
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json` (LlamaForCausalLM and compatible).
    pub fn from_hf_json(cfg: &Value) -> Result<Self, ConfigError> {
        let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
        let archs: Vec<&str> = cfg
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if model_type != "llama" && !archs.contains(&"LlamaForCausalLM") {
            let name = if model_type.is_empty() {
                archs.join(",")
            } else {
                model_type.to_string()
            };
            return Err(ConfigError::UnsupportedArchitecture(name));
        }
        let uint = |key: &str| -> Result<usize, ConfigError> {
            cfg.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ConfigError::Missing(format!("config.json field {key:?}")))
        };
        let float = |key: &str, default: f64| -> f32 {
            cfg.get(key).and_then(Value::as_f64).unwrap_or(default) as f32
        };
        let hidden_size = uint("hidden_size")?;
        let n_heads = uint("num_attention_heads")?;
        let n_kv_heads = uint("num_key_value_heads").unwrap_or(n_heads);
        let head_dim = match cfg.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => hidden_size / n_heads.max(1),
        };
        let rope_theta = float("rope_theta", 10000.0);
        let mut inv_freq = base_inv_freq(rope_theta, head_dim);
        if let Some(scaling) = cfg.get("rope_scaling").filter(|v| !v.is_null()) {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let sf = |key: &str| -> Result<f32, ConfigError> {
                scaling
                    .get(key)
                    .and_then(Value::as_f64)
                    .map(|v| v as f32)
                    .ok_or_else(|| ConfigError::Missing(format!("rope_scaling.{key}")))
            };
            match kind {
                "llama3" => {
                    let s = Llama3RopeScaling {
                        factor: sf("factor")?,
                        low_freq_factor: sf("low_freq_factor")?,
                        high_freq_factor: sf("high_freq_factor")?,
                        original_context: sf("original_max_position_embeddings")? as usize,
                    };
                    if !(s.factor > 0.0
                        && s.high_freq_factor > s.low_freq_factor
                        && s.original_context > 0)
                    {
                        return Err(ConfigError::Invalid {
                            key: "rope_scaling".into(),
                            why: format!("{s:?} is not a valid llama3 scaling"),
                        });
                    }
                    inv_freq = llama3_scaled_inv_freq(&inv_freq, &s);
                }
                "linear" => {
                    let factor = sf("factor")?;
                    inv_freq.iter_mut().for_each(|f| *f /= factor);
                }
                "default" | "" => {}
                other => {
                    return Err(ConfigError::Invalid {
                        key: "rope_scaling".into(),
                        why: format!("rope type {other:?} is not supported (llama3, linear)"),
                    })
                }
            }
        }
        let config = Self {
            vocab_size: uint("vocab_size")?,
            hidden_size,
            intermediate_size: uint("intermediate_size")?,
            n_layers: uint("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_eps: float("rms_norm_eps", 1e-6),
            rope_theta,
            rope_layout: RopeLayout::HalfSplit,
            rope_inv_freq: inv_freq,
            trained_context: uint("max_position_embeddings").unwrap_or(2048),
            tied_embeddings: cfg
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Meta's reference implementation of the scaling (llama3.1 `apply_scaling`), written out
    /// independently with the published Llama 3.1 numbers.
    #[test]
    fn llama3_scaling_matches_reference_formula_at_the_edges() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192,
        };
        let base = base_inv_freq(500000.0, 128);
        let scaled = llama3_scaled_inv_freq(&base, &s);
        // Highest frequency (wavelength 2π < 2048): unchanged.
        assert_eq!(scaled[0], base[0]);
        // Lowest frequency (wavelength far above 8192): divided by the factor.
        assert!((scaled[63] - base[63] / 8.0).abs() <= base[63] * 1e-6);
        // Monotone: scaling never reorders frequencies.
        assert!(scaled.windows(2).all(|w| w[0] >= w[1]));
        let factors = llama3_rope_freq_factors(&base, &s);
        assert!((factors[0] - 1.0).abs() < 1e-6 && (factors[63] - 8.0).abs() < 1e-4);
    }
}
