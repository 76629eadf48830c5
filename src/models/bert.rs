//! A BERT encoder in burn and the sentence embedder built on it (all-MiniLM-L6-v2 as
//! sentence-transformers runs it): token, position and segment embeddings with LayerNorm; post-
//! norm layers of multi-head self-attention and a GELU feed-forward; the mean of the last
//! hidden states over the tokens, L2-normalised. Loaded from a Hugging Face directory
//! (config.json, model.safetensors, tokenizer.json). Validators use it to compare miners'
//! results (PoI).

use super::safetensors::{HfModelDir, SafetensorsError};
use super::wordpiece::{WordPieceError, WordPieceTokenizer};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use std::path::Path;

/// Tokens one text is cut to (sentence-transformers' limit for this model).
pub const EMBED_MAX_TOKENS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(transparent)]
    Weights(#[from] SafetensorsError),
    #[error(transparent)]
    Tokenizer(#[from] WordPieceError),
    #[error("{dir}: {message}")]
    Config { dir: String, message: String },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("reading a tensor back from the device failed: {0}")]
    Readback(String),
}

/// The encoder's dimensions, from config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BertConfig {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub vocab: usize,
}

struct Linear {
    w: Tensor<2>, // [in, out]
    b: Tensor<2>, // [1, out]
}

impl Linear {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.w.clone()) + self.b.clone()
    }
}

struct LayerNorm {
    w: Tensor<2>,
    b: Tensor<2>,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mean = x.clone().mean_dim(1);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(1);
        centered / (var + self.eps).sqrt() * self.w.clone() + self.b.clone()
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

pub struct Embedder {
    tokenizer: WordPieceTokenizer,
    config: BertConfig,
    device: Device,
    words: Tensor<2>,
    positions: Tensor<2>,
    segment: Tensor<2>,
    norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Embedder {
    /// Loads a BERT sentence-embedding model from a Hugging Face directory onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EmbedError> {
        let tokenizer = WordPieceTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let hf = HfModelDir::open(dir)?;
        let config = bert_config(hf.config(), dir)?;
        let eps = hf.config()["layer_norm_eps"].as_f64().unwrap_or(1e-12);
        let h = config.hidden;
        let tensor = |name: &str, expected: &[usize]| -> Result<Vec<f32>, EmbedError> {
            let (shape, values) = hf.tensor_f32(name)?;
            if shape != expected {
                return Err(EmbedError::Shape {
                    name: name.into(),
                    found: shape,
                    expected: expected.to_vec(),
                });
            }
            Ok(values)
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Tensor<2>, EmbedError> {
            let v = tensor(name, &[rows, cols])?;
            Ok(Tensor::from_data(TensorData::new(v, [rows, cols]), device))
        };
        let row = |name: &str, n: usize| -> Result<Tensor<2>, EmbedError> {
            let v = tensor(name, &[n])?;
            Ok(Tensor::from_data(TensorData::new(v, [1, n]), device))
        };
        // PyTorch keeps linear weights as [out, in]; stored transposed here for x · W.
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear, EmbedError> {
            Ok(Linear {
                w: matrix(&format!("{name}.weight"), out, inp)?.transpose(),
                b: row(&format!("{name}.bias"), out)?,
            })
        };
        let norm = |name: &str| -> Result<LayerNorm, EmbedError> {
            Ok(LayerNorm {
                w: row(&format!("{name}.weight"), h)?,
                b: row(&format!("{name}.bias"), h)?,
                eps,
            })
        };
        let prefix = if hf.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let layers = (0..config.layers)
            .map(|l| {
                let p = format!("{prefix}encoder.layer.{l}");
                Ok(Layer {
                    query: linear(&format!("{p}.attention.self.query"), h, h)?,
                    key: linear(&format!("{p}.attention.self.key"), h, h)?,
                    value: linear(&format!("{p}.attention.self.value"), h, h)?,
                    attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    up: linear(&format!("{p}.intermediate.dense"), config.intermediate, h)?,
                    down: linear(&format!("{p}.output.dense"), h, config.intermediate)?,
                    out_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, EmbedError>>()?;
        let e = format!("{prefix}embeddings");
        let segments = hf
            .shape(&format!("{e}.token_type_embeddings.weight"))
            .and_then(|s| s.first().copied())
            .unwrap_or(2);
        Ok(Self {
            words: matrix(&format!("{e}.word_embeddings.weight"), config.vocab, h)?,
            positions: matrix(
                &format!("{e}.position_embeddings.weight"),
                config.max_positions,
                h,
            )?,
            segment: matrix(&format!("{e}.token_type_embeddings.weight"), segments, h)?
                .narrow(0, 0, 1),
            norm: norm(&format!("{e}.LayerNorm"))?,
            layers,
            tokenizer,
            config,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> BertConfig {
        self.config
    }

    /// The token ids a text is embedded from (`[CLS] … [SEP]`, cut to [`EMBED_MAX_TOKENS`]).
    pub fn token_ids(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode(text, EMBED_MAX_TOKENS.min(self.config.max_positions))
    }

    /// The text's embedding: unit length, `hidden` values.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let ids = self.token_ids(text);
        let n = ids.len();
        let h = self.config.hidden;
        let index: Tensor<1, Int> = Tensor::from_data(
            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]),
            &self.device,
        );
        let x = self.words.clone().select(0, index)
            + self.positions.clone().narrow(0, 0, n)
            + self.segment.clone();
        let mut x = self.norm.forward(x);
        let (heads, hd) = (self.config.heads, h / self.config.heads);
        for layer in &self.layers {
            let split = |t: Tensor<2>| t.reshape([n, heads, hd]).swap_dims(0, 1); // [heads, n, hd]
            let q = split(layer.query.forward(x.clone()));
            let k = split(layer.key.forward(x.clone()));
            let v = split(layer.value.forward(x.clone()));
            let scores = q.matmul(k.swap_dims(1, 2)) * (1.0 / (hd as f64).sqrt());
            let context = softmax(scores, 2).matmul(v).swap_dims(0, 1).reshape([n, h]);
            x = layer.attn_norm.forward(x + layer.attn_out.forward(context));
            let ff = layer.down.forward(gelu(layer.up.forward(x.clone())));
            x = layer.out_norm.forward(x + ff);
        }
        let pooled = x.mean_dim(0); // [1, h]
        let norm = pooled.clone().powi_scalar(2).sum().sqrt().clamp_min(1e-12);
        let unit = pooled / norm.reshape([1, 1]);
        unit.into_data()
            .try_into_vec::<f32>()
            .map_err(|e| EmbedError::Readback(format!("{e:?}")))
    }
}

fn bert_config(c: &serde_json::Value, dir: &Path) -> Result<BertConfig, EmbedError> {
    let fail = |message: String| EmbedError::Config {
        dir: dir.display().to_string(),
        message,
    };
    if c["model_type"] != "bert" {
        return Err(fail(format!(
            "model_type is {}, not bert: only BERT encoders embed",
            c["model_type"]
        )));
    }
    let get = |key: &str| -> Result<usize, EmbedError> {
        c[key]
            .as_u64()
            .map(|v| v as usize)
            .filter(|v| *v > 0)
            .ok_or_else(|| fail(format!("config.json lacks a positive {key}")))
    };
    let config = BertConfig {
        hidden: get("hidden_size")?,
        heads: get("num_attention_heads")?,
        layers: get("num_hidden_layers")?,
        intermediate: get("intermediate_size")?,
        max_positions: get("max_position_embeddings")?,
        vocab: get("vocab_size")?,
    };
    if !config.hidden.is_multiple_of(config.heads) {
        return Err(fail(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            config.hidden, config.heads
        )));
    }
    if c["hidden_act"].as_str().is_some_and(|a| a != "gelu") {
        return Err(fail(format!(
            "hidden_act {} is not supported (gelu is)",
            c["hidden_act"]
        )));
    }
    Ok(config)
}

/// Cosine similarity of two embeddings (their dot product when both are unit length).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na * nb)
}
