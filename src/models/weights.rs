//! Model weights on the host, in one shape whatever file they came from: GGUF (quantized or
//! float) or a Hugging Face directory (safetensors in f32/f16/bf16).
//!
//! Canonical tensor names are GGUF's (`blk.N.attn_q.weight`, ...); the Hugging Face loader maps
//! its names onto them. Matrices are row-major `[out, in]` in both formats.

use super::config::{base_inv_freq, ConfigError, LlamaConfig, RopeLayout};
use super::gguf::{GgufError, GgufFile};
use super::qmatmul::{QMatmulError, QuantMatrix};
use super::quant::{self, GgmlType, QuantError};
use super::safetensors::{HfModelDir, SafetensorsError};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    QMatmul(#[from] QMatmulError),
    #[error("tensor {name} is missing from the model file")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{0} is neither a GGUF file nor a directory with config.json and *.safetensors")]
    UnknownFormat(String),
}

/// A weight matrix `[rows, cols]`: dense f32 or packed GGML blocks.
#[derive(Clone, Debug)]
pub enum Matrix {
    Dense {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    Quant(QuantMatrix),
}

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense { rows, .. } => *rows,
            Matrix::Quant(q) => q.rows(),
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense { cols, .. } => *cols,
            Matrix::Quant(q) => q.cols(),
        }
    }
    /// Row-major f32 copy of the whole matrix.
    pub fn to_dense(&self) -> Result<Vec<f32>, QMatmulError> {
        match self {
            Matrix::Dense { data, .. } => Ok(data.clone()),
            Matrix::Quant(q) => Ok(q.dequantize()?),
        }
    }
    /// Copies (dequantizing) one row into `out`.
    pub fn row_into(&self, row: usize, out: &mut [f32]) -> Result<(), QMatmulError> {
        match self {
            Matrix::Dense { cols, data, .. } => {
                out.copy_from_slice(&data[row * cols..(row + 1) * cols]);
                Ok(())
            }
            Matrix::Quant(q) => Ok(q.dequantize_row(row, out)?),
        }
    }
    /// Bytes this matrix occupies in memory.
    pub fn byte_len(&self) -> usize {
        match self {
            Matrix::Dense { data, .. } => data.len() * 4,
            Matrix::Quant(q) => q.byte_len(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
}

#[derive(Clone, Debug)]
pub struct LlamaWeights {
    pub config: LlamaConfig,
    pub token_embd: Matrix,
    pub output_norm: Vec<f32>,
    /// `None` when the output projection is tied to the token embeddings.
    pub output: Option<Matrix>,
    pub layers: Vec<LayerWeights>,
}

impl LlamaWeights {
    /// Bytes of all matrices and vectors as held in memory.
    pub fn byte_len(&self) -> usize {
        let v = |x: &Vec<f32>| x.len() * 4;
        self.token_embd.byte_len()
            + v(&self.output_norm)
            + self.output.as_ref().map_or(0, Matrix::byte_len)
            + self
                .layers
                .iter()
                .map(|l| {
                    v(&l.attn_norm)
                        + v(&l.ffn_norm)
                        + [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                            .iter()
                            .map(|m| m.byte_len())
                            .sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// Where tensors come from; both formats implement it, the assembly below is shared.
trait TensorSource {
    /// `(shape row-major, outermost first)` of a tensor, if present.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn matrix(&self, name: &str) -> Result<Matrix, LoadError>;
    fn vector(&self, name: &str) -> Result<Vec<f32>, LoadError>;
}

fn check_shape(name: &str, actual: Vec<usize>, expected: &[usize]) -> Result<(), LoadError> {
    if actual != expected {
        return Err(LoadError::BadShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual,
        });
    }
    Ok(())
}

fn assemble(cfg: LlamaConfig, src: &dyn TensorSource) -> Result<LlamaWeights, LoadError> {
    let d = cfg.hidden_size;
    let q_dim = cfg.n_heads * cfg.head_dim;
    let kv_dim = cfg.n_kv_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    let matrix = |name: String, rows: usize, cols: usize| -> Result<Matrix, LoadError> {
        let m = src.matrix(&name)?;
        check_shape(&name, vec![m.rows(), m.cols()], &[rows, cols])?;
        Ok(m)
    };
    let vector = |name: String, len: usize| -> Result<Vec<f32>, LoadError> {
        let v = src.vector(&name)?;
        check_shape(&name, vec![v.len()], &[len])?;
        Ok(v)
    };
    let layers = (0..cfg.n_layers)
        .map(|i| {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            Ok(LayerWeights {
                attn_norm: vector(p("attn_norm"), d)?,
                wq: matrix(p("attn_q"), q_dim, d)?,
                wk: matrix(p("attn_k"), kv_dim, d)?,
                wv: matrix(p("attn_v"), kv_dim, d)?,
                wo: matrix(p("attn_output"), d, q_dim)?,
                ffn_norm: vector(p("ffn_norm"), d)?,
                w_gate: matrix(p("ffn_gate"), ff, d)?,
                w_up: matrix(p("ffn_up"), ff, d)?,
                w_down: matrix(p("ffn_down"), d, ff)?,
            })
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    let token_embd = matrix("token_embd.weight".into(), cfg.vocab_size, d)?;
    let output = if cfg.tied_embeddings || src.shape("output.weight").is_none() {
        None
    } else {
        Some(matrix("output.weight".into(), cfg.vocab_size, d)?)
    };
    let mut cfg = cfg;
    cfg.tied_embeddings = output.is_none();
    Ok(LlamaWeights {
        output_norm: vector("output_norm.weight".into(), d)?,
        token_embd,
        output,
        layers,
        config: cfg,
    })
}

/// Loads a model from a GGUF file or a Hugging Face directory, whichever `path` is.
pub fn load(path: &Path) -> Result<LlamaWeights, LoadError> {
    if path.is_dir() {
        load_hf_dir(path)
    } else {
        load_gguf(&GgufFile::open(path)?)
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

struct GgufSource<'a>(&'a GgufFile);

impl TensorSource for GgufSource<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0
            .tensor(name)
            .map(|t| t.dims.iter().rev().map(|&d| d as usize).collect())
    }
    fn matrix(&self, name: &str) -> Result<Matrix, LoadError> {
        let info = self
            .0
            .tensor(name)
            .ok_or_else(|| LoadError::MissingTensor { name: name.into() })?;
        let (cols, rows) = match info.dims.as_slice() {
            [c] => (*c as usize, 1),
            [c, r] => (*c as usize, *r as usize),
            other => {
                return Err(LoadError::BadShape {
                    name: name.into(),
                    expected: vec![0, 0],
                    actual: other.iter().rev().map(|&d| d as usize).collect(),
                })
            }
        };
        let bytes = self.0.tensor_data(info);
        let matrix = match info.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let mut data = vec![0f32; rows * cols];
                quant::dequantize(info.ty, bytes, &mut data)?;
                Matrix::Dense { rows, cols, data }
            }
            ty => Matrix::Quant(QuantMatrix::new(ty, rows, cols, bytes)?),
        };
        // Copied into the model's layout: the file's pages need not stay resident beside it
        // (the peak memory of loading is then about one copy of the weights, not two).
        self.0.release_tensor(info);
        Ok(matrix)
    }
    fn vector(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        if self.0.tensor(name).is_none() {
            return Err(LoadError::MissingTensor { name: name.into() });
        }
        Ok(self.0.tensor_f32(name)?)
    }
}

/// Reads the model shape from GGUF metadata (`{arch}.*` keys, as llama.cpp writes them).
pub fn config_from_gguf(g: &GgufFile) -> Result<LlamaConfig, LoadError> {
    let arch = g
        .get_str("general.architecture")
        .ok_or_else(|| ConfigError::Missing("general.architecture".into()))?
        .to_string();
    if arch != "llama" {
        return Err(ConfigError::UnsupportedArchitecture(arch).into());
    }
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<usize, LoadError> {
        g.get_u64(&key(k))
            .map(|v| v as usize)
            .ok_or_else(|| ConfigError::Missing(key(k)).into())
    };
    let hidden_size = need("embedding_length")?;
    let n_heads = need("attention.head_count")?;
    let n_kv_heads = need("attention.head_count_kv").unwrap_or(n_heads);
    let head_dim = g
        .get_u64(&key("attention.key_length"))
        .map(|v| v as usize)
        .unwrap_or(hidden_size / n_heads.max(1));
    if let Some(rot) = g.get_u64(&key("rope.dimension_count")) {
        if rot as usize != head_dim {
            return Err(ConfigError::Invalid {
                key: key("rope.dimension_count"),
                why: format!("partial rotary ({rot} of {head_dim} dimensions) is not supported"),
            }
            .into());
        }
    }
    let rope_theta = g.get_f32(&key("rope.freq_base")).unwrap_or(10000.0);
    let mut inv_freq = base_inv_freq(rope_theta, head_dim);
    // Llama 3.1+ GGUFs carry the frequency scaling as per-pair divisors (`rope_freqs.weight`).
    if g.tensor("rope_freqs.weight").is_some() {
        let factors = g.tensor_f32("rope_freqs.weight")?;
        check_shape("rope_freqs.weight", vec![factors.len()], &[head_dim / 2])?;
        for (f, div) in inv_freq.iter_mut().zip(&factors) {
            *f /= div;
        }
    }
    if g.get_str(&key("rope.scaling.type")) == Some("linear") {
        let factor = g.get_f32(&key("rope.scaling.factor")).unwrap_or(1.0);
        if factor > 0.0 {
            inv_freq.iter_mut().for_each(|f| *f /= factor);
        }
    }
    let vocab_size = match g.get_u64(&key("vocab_size")) {
        Some(v) => v as usize,
        None => g
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .map(|v| v as usize)
            .ok_or_else(|| ConfigError::Missing(key("vocab_size")))?,
    };
    let cfg = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        n_layers: need("block_count")?,
        n_heads,
        n_kv_heads,
        head_dim,
        rms_eps: g
            .get_f32(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta,
        rope_layout: RopeLayout::Interleaved,
        rope_inv_freq: inv_freq,
        trained_context: need("context_length").unwrap_or(2048),
        tied_embeddings: g.tensor("output.weight").is_none(),
    };
    cfg.validate()?;
    Ok(cfg)
}

pub fn load_gguf(g: &GgufFile) -> Result<LlamaWeights, LoadError> {
    let cfg = config_from_gguf(g)?;
    assemble(cfg, &GgufSource(g))
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directory

struct HfSource<'a>(&'a HfModelDir);

/// GGUF's canonical name → Hugging Face's.
fn hf_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("blk.") {
        if let Some((i, tail)) = rest.split_once('.') {
            let part = match tail {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                other => other,
            };
            return format!("model.layers.{i}.{part}");
        }
    }
    match name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        other => other.into(),
    }
}

impl TensorSource for HfSource<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.shape(&hf_name(name)).map(<[usize]>::to_vec)
    }
    fn matrix(&self, name: &str) -> Result<Matrix, LoadError> {
        let hf = hf_name(name);
        if self.0.shape(&hf).is_none() {
            return Err(LoadError::MissingTensor { name: hf });
        }
        let (shape, data) = self.0.tensor_f32(&hf)?;
        match shape.as_slice() {
            [rows, cols] => Ok(Matrix::Dense {
                rows: *rows,
                cols: *cols,
                data,
            }),
            _ => Err(LoadError::BadShape {
                name: hf,
                expected: vec![0, 0],
                actual: shape,
            }),
        }
    }
    fn vector(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        let hf = hf_name(name);
        if self.0.shape(&hf).is_none() {
            return Err(LoadError::MissingTensor { name: hf });
        }
        Ok(self.0.tensor_f32(&hf)?.1)
    }
}

pub fn load_hf_dir(dir: &Path) -> Result<LlamaWeights, LoadError> {
    let hf = HfModelDir::open(dir)?;
    let cfg = LlamaConfig::from_hf_json(hf.config())?;
    assemble(cfg, &HfSource(&hf))
}
