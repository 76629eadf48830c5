//! The Llama transformer in burn: RMSNorm, rotary embeddings (interleaved or half-split pairs),
//! grouped-query attention with a bounded KV cache, SwiGLU feed-forward, tied or separate output
//! embedding. A prompt is processed as one batch (prefill), then one token per step.
//!
//! Linear layers keep quantized GGML blocks on the CPU backend and multiply them without
//! dequantizing (see `qmatmul.rs`) when few rows are multiplied (decode); for many rows
//! (prefill) they dequantize the matrix for the duration of one product and use burn's matmul.
//! On wgpu the weights are dequantized to f32 once, at load.

use super::backend::BackendKind;
use super::config::{LlamaConfig, RopeLayout};
use super::qmatmul::{QMatmulError, QuantMatrix};
use super::weights::{LlamaWeights, Matrix};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Tensor, TensorData};
use std::sync::Arc;

mod host_decode;
use host_decode::HostCache;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the context is full: {used} tokens used, {asked} more asked, limit {limit}")]
    ContextFull {
        used: usize,
        asked: usize,
        limit: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("nothing to process: no tokens given")]
    Empty,
    #[error("quantized product failed: {0}")]
    Quant(#[from] QMatmulError),
    #[error("reading a tensor back from the device failed: {0}")]
    Readback(String),
    #[error("this session's KV cache was lost by an earlier failed step; start a new session")]
    CacheLost,
    #[error("this session belongs to a model whose cache lives elsewhere (host vs device)")]
    ForeignSession,
    #[error("host decoding met a layer without quantized weights")]
    NotQuantized,
}

/// From how many activation rows on a linear layer the CPU path dequantizes the weights and
/// uses a dense matmul instead of the row-by-row integer kernels: dense gemm wins once its
/// dequantization cost is spread over enough rows.
const DENSE_FROM_ROWS: usize = 8;

/// A linear layer `y = x · Wᵀ` with `W` of shape `[out, in]`. A model has a few hundred, so
/// the dense variant's size is not worth a box.
#[allow(clippy::large_enum_variant)]
enum Linear {
    /// `W` as a dense `[out, in]` tensor on the device.
    Dense(Tensor<2>),
    /// Packed GGML blocks, multiplied on the host (CPU backend only).
    Quant(Arc<QuantMatrix>),
}

impl Linear {
    /// Output features.
    fn rows(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims()[0],
            Linear::Quant(q) => q.rows(),
        }
    }

    fn new(m: Matrix, device: &Device, keep_quantized: bool) -> Result<Self, ForwardError> {
        Ok(match m {
            Matrix::Quant(q) if keep_quantized => Linear::Quant(Arc::new(q)),
            other => {
                let data = other.to_dense()?;
                Linear::Dense(Tensor::from_data(
                    TensorData::new(data, [other.rows(), other.cols()]),
                    device,
                ))
            }
        })
    }

    /// `dense_ok`: many rows may go through the dequantised weights (see
    /// [`Session::decode_numerics`]).
    fn forward(&self, x: Tensor<2>, dense_ok: bool) -> Result<Tensor<2>, ForwardError> {
        match self {
            Linear::Dense(w) => Ok(x.matmul(w.clone().transpose())),
            Linear::Quant(q) => {
                let [n, cols] = x.dims();
                let device = x.device();
                if dense_ok && n >= DENSE_FROM_ROWS {
                    let w = Tensor::<2>::from_data(
                        TensorData::new(
                            q.dequantize().map_err(QMatmulError::from)?,
                            [q.rows(), cols],
                        ),
                        &device,
                    );
                    return Ok(x.matmul(w.transpose()));
                }
                let xs = to_vec(x)?;
                let mut out = vec![0f32; n * q.rows()];
                q.matmul(&xs, &mut out)?;
                Ok(Tensor::from_data(
                    TensorData::new(out, [n, q.rows()]),
                    &device,
                ))
            }
        }
    }
}

fn take_cache(slot: &mut Option<Tensor<3>>) -> Result<Tensor<3>, ForwardError> {
    // Only empty if an earlier step failed between take and put back; the session is then
    // unusable, which the caller learns here instead of through a panic.
    slot.take().ok_or(ForwardError::CacheLost)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, ForwardError> {
    t.into_data()
        .try_into_vec::<f32>()
        .map_err(|e| ForwardError::Readback(format!("{e:?}")))
}

/// The token-embedding table, read on the host (a lookup is a row copy).
enum EmbeddingTable {
    Host(Matrix),
    /// The same packed matrix the tied output layer multiplies by.
    Shared(Arc<QuantMatrix>),
}

impl EmbeddingTable {
    fn rows(&self) -> usize {
        match self {
            EmbeddingTable::Host(m) => m.rows(),
            EmbeddingTable::Shared(q) => q.rows(),
        }
    }

    fn row_into(&self, row: usize, out: &mut [f32]) -> Result<(), QMatmulError> {
        match self {
            EmbeddingTable::Host(m) => m.row_into(row, out),
            EmbeddingTable::Shared(q) => Ok(q.dequantize_row(row, out)?),
        }
    }
}

struct RmsNorm {
    weight: Tensor<2>, // [1, dim]
    /// The same weights on the host, for host decoding.
    host: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn new(w: &[f32], eps: f32, device: &Device) -> Self {
        Self {
            weight: Tensor::from_data(TensorData::new(w.to_vec(), [1, w.len()]), device),
            host: w.to_vec(),
            eps,
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let ms = x.clone().powi_scalar(2).mean_dim(1); // [n, 1]
        let inv = (ms + self.eps as f64).sqrt().recip();
        x * inv * self.weight.clone()
    }
}

/// The keys and values of one layer for every position so far, preallocated to the session's
/// capacity so memory is bounded and known at start.
#[derive(Clone)]
// One per layer of a session: the variants' sizes do not matter, a box would only add a step.
#[allow(clippy::large_enum_variant)]
enum LayerCache {
    /// On the device. Held in `Option`s so each step can take sole ownership before
    /// `slice_assign`: with no other handle on the buffer the backend writes the new rows in
    /// place instead of copying the whole cache every token.
    Device {
        k: Option<Tensor<3>>, // [n_kv_heads, max_ctx, head_dim]
        v: Option<Tensor<3>>,
    },
    /// On the host, for models decoded by `host_decode` (the CPU backend, quantized weights).
    Host(HostCache),
}

struct Layer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: RmsNorm,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// The model's parameters on a device. Immutable once built; generation state lives in
/// [`Session`], so one model can serve many sequential sessions.
pub struct Llama {
    config: LlamaConfig,
    device: Device,
    backend: BackendKind,
    /// Token embeddings on the host: lookup is a row copy (dequantized on the fly).
    token_embd: EmbeddingTable,
    layers: Vec<Layer>,
    output_norm: RmsNorm,
    output: Linear,
    cos: Tensor<2>, // [max_ctx, head_dim / 2]
    sin: Tensor<2>,
    /// The same tables on the host, for host decoding.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    max_context: usize,
    /// Whether decoding runs on the host (`host_decode`): the CPU backend with every linear
    /// layer quantized. Its sessions keep their caches on the host.
    host_decode: bool,
}

/// A sequence being generated: its KV cache and how many positions are filled. A clone
/// shares the cache until one of the two writes to it (burn then copies).
#[derive(Clone)]
pub struct Session {
    caches: Vec<LayerCache>,
    pos: usize,
    max_context: usize,
    /// Multi-token passes keep the quantised kernels (activations quantised per row, as one
    /// token at a time does) instead of multiplying by dequantised weights, so each row's
    /// logits are what generation computed for it: replaying an output then draws the same
    /// tokens. Slower for long prompts; only validators' replays ask for it.
    pub decode_numerics: bool,
}

impl Session {
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn max_context(&self) -> usize {
        self.max_context
    }
}

impl Llama {
    /// Builds the model on `device`. `max_context` bounds the KV cache (and so memory); it is
    /// capped at the context the model was trained for.
    pub fn new(
        weights: LlamaWeights,
        device: &Device,
        backend: BackendKind,
        max_context: usize,
    ) -> Result<Self, ForwardError> {
        Self::build(
            weights,
            device,
            backend,
            max_context,
            backend == BackendKind::Cpu,
        )
    }

    /// Like [`Llama::new`] but with every matrix dequantized to f32 at load, whatever the
    /// backend: the reference the packed CPU path is tested against.
    pub fn new_dequantized(
        weights: LlamaWeights,
        device: &Device,
        backend: BackendKind,
        max_context: usize,
    ) -> Result<Self, ForwardError> {
        Self::build(weights, device, backend, max_context, false)
    }

    fn build(
        weights: LlamaWeights,
        device: &Device,
        backend: BackendKind,
        max_context: usize,
        keep_q: bool,
    ) -> Result<Self, ForwardError> {
        // Weights are consumed: each matrix moves into its layer, so loading never holds two
        // copies of the model.
        let LlamaWeights {
            config: cfg,
            token_embd,
            output_norm,
            output,
            layers,
        } = weights;
        let max_context = max_context.clamp(1, cfg.trained_context.max(1));
        let layers = layers
            .into_iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: RmsNorm::new(&l.attn_norm, cfg.rms_eps, device),
                    wq: Linear::new(l.wq, device, keep_q)?,
                    wk: Linear::new(l.wk, device, keep_q)?,
                    wv: Linear::new(l.wv, device, keep_q)?,
                    wo: Linear::new(l.wo, device, keep_q)?,
                    ffn_norm: RmsNorm::new(&l.ffn_norm, cfg.rms_eps, device),
                    w_gate: Linear::new(l.w_gate, device, keep_q)?,
                    w_up: Linear::new(l.w_up, device, keep_q)?,
                    w_down: Linear::new(l.w_down, device, keep_q)?,
                })
            })
            .collect::<Result<Vec<_>, ForwardError>>()?;
        // Tied, packed embeddings are shared by the lookup and the output layer (one copy in
        // memory); otherwise the output layer gets its own (dense on wgpu).
        let (token_embd, output) = match (output, token_embd) {
            (None, Matrix::Quant(q)) if keep_q => {
                let shared = Arc::new(q);
                (
                    EmbeddingTable::Shared(shared.clone()),
                    Linear::Quant(shared),
                )
            }
            (None, table) => {
                let output = Linear::new(table.clone(), device, keep_q)?;
                (EmbeddingTable::Host(table), output)
            }
            (Some(out), table) => (
                EmbeddingTable::Host(table),
                Linear::new(out, device, keep_q)?,
            ),
        };
        let half = cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(max_context * half);
        let mut sin = Vec::with_capacity(max_context * half);
        for p in 0..max_context {
            for f in &cfg.rope_inv_freq {
                let angle = p as f64 * *f as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let host_decode = backend == BackendKind::Cpu
            && matches!(output, Linear::Quant(_))
            && layers.iter().all(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .all(|w| matches!(w, Linear::Quant(_)))
            });
        Ok(Self {
            output_norm: RmsNorm::new(&output_norm, cfg.rms_eps, device),
            token_embd,
            layers,
            output,
            cos: Tensor::from_data(TensorData::new(cos.clone(), [max_context, half]), device),
            sin: Tensor::from_data(TensorData::new(sin.clone(), [max_context, half]), device),
            rope_cos: cos,
            rope_sin: sin,
            host_decode,
            device: device.clone(),
            backend,
            config: cfg,
            max_context,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    pub fn backend(&self) -> BackendKind {
        self.backend
    }
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// A fresh sequence with an empty cache of `max_context` positions (or fewer).
    pub fn new_session(&self, max_context: usize) -> Session {
        let c = &self.config;
        let max_context = max_context.clamp(1, self.max_context);
        let shape = [c.n_kv_heads, max_context, c.head_dim];
        let caches = (0..c.n_layers)
            .map(|_| {
                if self.host_decode {
                    LayerCache::Host(HostCache::new(max_context, c.n_kv_heads * c.head_dim))
                } else {
                    LayerCache::Device {
                        k: Some(Tensor::zeros(shape, &self.device)),
                        v: Some(Tensor::zeros(shape, &self.device)),
                    }
                }
            })
            .collect();
        Session {
            caches,
            pos: 0,
            max_context,
            decode_numerics: false,
        }
    }

    /// Makes room in `session` for `capacity` positions (at most the model's context): a
    /// larger cache holding the same filled positions. Attention reads only the filled
    /// positions, so a grown session computes exactly what the original would have.
    pub fn grow_session(&self, session: &mut Session, capacity: usize) -> Result<(), ForwardError> {
        let capacity = capacity.min(self.max_context);
        if capacity <= session.max_context {
            return Ok(());
        }
        let c = &self.config;
        let (nkv, hd, pos) = (c.n_kv_heads, c.head_dim, session.pos);
        for cache in &mut session.caches {
            match cache {
                LayerCache::Host(h) => h.grow(capacity, nkv * hd),
                LayerCache::Device { k, v } => {
                    for slot in [k, v] {
                        let old = take_cache(slot)?;
                        let grown = Tensor::zeros([nkv, capacity, hd], &self.device);
                        *slot = Some(if pos == 0 {
                            grown
                        } else {
                            grown.slice_assign(
                                [0..nkv, 0..pos, 0..hd],
                                old.slice([0..nkv, 0..pos, 0..hd]),
                            )
                        });
                    }
                }
            }
        }
        session.max_context = capacity;
        Ok(())
    }

    /// Runs `tokens` at the session's next positions and returns the logits of the last one
    /// (`[vocab]`), or of every one when `all_logits` (`[n * vocab]`, row-major).
    pub fn forward(
        &self,
        session: &mut Session,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>, ForwardError> {
        let n = tokens.len();
        if n == 0 {
            return Err(ForwardError::Empty);
        }
        if session.pos + n > session.max_context {
            return Err(ForwardError::ContextFull {
                used: session.pos,
                asked: n,
                limit: session.max_context,
            });
        }
        let c = &self.config;
        let dim = c.hidden_size;
        let mut emb = vec![0f32; n * dim];
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= c.vocab_size || t as usize >= self.token_embd.rows() {
                return Err(ForwardError::BadToken {
                    id: t,
                    vocab: c.vocab_size,
                });
            }
            self.token_embd
                .row_into(t as usize, &mut emb[i * dim..(i + 1) * dim])?;
        }
        let pos0 = session.pos;
        let dense_ok = !session.decode_numerics;
        if self.host_decode && (!dense_ok || n < DENSE_FROM_ROWS) {
            let caches: Result<Vec<&mut HostCache>, ForwardError> = session
                .caches
                .iter_mut()
                .map(|c| match c {
                    LayerCache::Host(h) => Ok(h),
                    LayerCache::Device { .. } => Err(ForwardError::ForeignSession),
                })
                .collect();
            let logits = self.forward_host(caches?, pos0, emb, all_logits)?;
            session.pos += n;
            return Ok(logits);
        }
        let mut x = Tensor::<2>::from_data(TensorData::new(emb, [n, dim]), &self.device);
        let mask = (n > 1).then(|| self.causal_mask(pos0, n));
        for (layer, cache) in self.layers.iter().zip(session.caches.iter_mut()) {
            let h = self.attention(
                layer,
                cache,
                layer.attn_norm.forward(x.clone()),
                pos0,
                mask.clone(),
                dense_ok,
            )?;
            x = x + h;
            let h = layer.ffn_norm.forward(x.clone());
            let gate = silu(layer.w_gate.forward(h.clone(), dense_ok)?);
            let up = layer.w_up.forward(h, dense_ok)?;
            x = x + layer.w_down.forward(gate * up, dense_ok)?;
        }
        session.pos += n;
        let x = if all_logits {
            x
        } else {
            x.slice([n - 1..n, 0..dim])
        };
        let logits = self.output.forward(self.output_norm.forward(x), dense_ok)?;
        to_vec(logits)
    }

    /// `[g * n, pos0 + n]` mask, true where a query may NOT look (a later position). Query row
    /// `j * n + i` is query token `i` of head `j` within its group.
    fn causal_mask(&self, pos0: usize, n: usize) -> Tensor<2, Bool> {
        let g = self.config.group_size();
        let total = pos0 + n;
        let mut m = Vec::with_capacity(g * n * total);
        for _ in 0..g {
            for i in 0..n {
                m.extend((0..total).map(|k| k > pos0 + i));
            }
        }
        Tensor::<2, Bool>::from_data(TensorData::new(m, [g * n, total]), &self.device)
    }

    fn attention(
        &self,
        layer: &Layer,
        cache: &mut LayerCache,
        x: Tensor<2>,
        pos0: usize,
        mask: Option<Tensor<2, Bool>>,
        dense_ok: bool,
    ) -> Result<Tensor<2>, ForwardError> {
        let c = &self.config;
        let (n, hd, nh, nkv) = (x.dims()[0], c.head_dim, c.n_heads, c.n_kv_heads);
        let q = layer
            .wq
            .forward(x.clone(), dense_ok)?
            .reshape([n, nh, hd])
            .swap_dims(0, 1); // [nh, n, hd]
        let k = layer
            .wk
            .forward(x.clone(), dense_ok)?
            .reshape([n, nkv, hd])
            .swap_dims(0, 1);
        let v = layer
            .wv
            .forward(x, dense_ok)?
            .reshape([n, nkv, hd])
            .swap_dims(0, 1);
        let q = self.rope(q, pos0);
        let k = self.rope(k, pos0);
        let end = pos0 + n;
        // Every key and value so far, `[nkv, end, hd]`.
        let (keys, values) = match cache {
            LayerCache::Device { k: ck, v: cv } => {
                let k_all = take_cache(ck)?.slice_assign([0..nkv, pos0..end, 0..hd], k);
                let v_all = take_cache(cv)?.slice_assign([0..nkv, pos0..end, 0..hd], v);
                let keys = k_all.clone().slice([0..nkv, 0..end, 0..hd]);
                let values = v_all.clone().slice([0..nkv, 0..end, 0..hd]);
                *ck = Some(k_all);
                *cv = Some(v_all);
                (keys, values)
            }
            LayerCache::Host(h) => {
                let width = nkv * hd;
                h.k[pos0 * width..end * width].copy_from_slice(&to_vec(k.swap_dims(0, 1))?);
                h.v[pos0 * width..end * width].copy_from_slice(&to_vec(v.swap_dims(0, 1))?);
                let upload = |rows: &[f32]| {
                    Tensor::<3>::from_data(
                        TensorData::new(rows.to_vec(), [end, nkv, hd]),
                        &self.device,
                    )
                    .swap_dims(0, 1)
                };
                (upload(&h.k[..end * width]), upload(&h.v[..end * width]))
            }
        };
        let g = c.group_size();
        if !dense_ok && n > 1 {
            // One query at a time with the shapes decoding uses, so every row is bit for bit
            // what generation computed (quantised activations turn the smallest difference
            // in summation order into a different token a few layers on).
            let rows: Vec<Tensor<2>> = (0..n)
                .map(|i| {
                    let qi = q
                        .clone()
                        .slice([0..nh, i..i + 1, 0..hd])
                        .reshape([nkv, g, hd]);
                    let end_i = pos0 + i + 1;
                    let keys = keys.clone().slice([0..nkv, 0..end_i, 0..hd]);
                    let values = values.clone().slice([0..nkv, 0..end_i, 0..hd]);
                    let scores = qi.matmul(keys.swap_dims(1, 2)) * (1.0 / (hd as f64).sqrt());
                    softmax(scores, 2)
                        .matmul(values)
                        .reshape([nh, 1, hd])
                        .swap_dims(0, 1)
                        .reshape([1, nh * hd])
                })
                .collect();
            return layer.wo.forward(Tensor::cat(rows, 0), dense_ok);
        }
        // Heads sharing a key/value head are contiguous: [nh, n, hd] -> [nkv, g * n, hd].
        let q = q.reshape([nkv, g * n, hd]);
        let scores = q.matmul(keys.swap_dims(1, 2)) * (1.0 / (hd as f64).sqrt()); // [nkv, g*n, end]
        let scores = match mask {
            Some(m) => scores.mask_fill(
                m.unsqueeze_dim::<3>(0).expand([nkv, g * n, end]),
                f32::NEG_INFINITY,
            ),
            None => scores,
        };
        let out = softmax(scores, 2).matmul(values); // [nkv, g*n, hd]
        let out = out
            .reshape([nh, n, hd])
            .swap_dims(0, 1)
            .reshape([n, nh * hd]);
        layer.wo.forward(out, dense_ok)
    }

    /// Rotates `x` (`[heads, n, head_dim]`) for positions `pos0..pos0 + n`.
    fn rope(&self, x: Tensor<3>, pos0: usize) -> Tensor<3> {
        let [h, n, hd] = x.dims();
        let half = hd / 2;
        let cos = self
            .cos
            .clone()
            .slice([pos0..pos0 + n, 0..half])
            .unsqueeze_dim::<3>(0);
        let sin = self
            .sin
            .clone()
            .slice([pos0..pos0 + n, 0..half])
            .unsqueeze_dim::<3>(0);
        match self.config.rope_layout {
            RopeLayout::HalfSplit => {
                let a = x.clone().slice([0..h, 0..n, 0..half]);
                let b = x.slice([0..h, 0..n, half..hd]);
                let ra = a.clone() * cos.clone() - b.clone() * sin.clone();
                let rb = a * sin + b * cos;
                Tensor::cat(vec![ra, rb], 2)
            }
            RopeLayout::Interleaved => {
                let pairs = x.reshape([h, n, half, 2]);
                let a = pairs
                    .clone()
                    .slice([0..h, 0..n, 0..half, 0..1])
                    .reshape([h, n, half]);
                let b = pairs
                    .slice([0..h, 0..n, 0..half, 1..2])
                    .reshape([h, n, half]);
                let ra = a.clone() * cos.clone() - b.clone() * sin.clone();
                let rb = a * sin + b * cos;
                Tensor::cat(vec![ra.unsqueeze_dim::<4>(3), rb.unsqueeze_dim::<4>(3)], 3)
                    .reshape([h, n, hd])
            }
        }
    }
}
