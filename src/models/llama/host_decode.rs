//! The CPU backend's decoding step, in plain Rust over host memory.
//!
//! One token at a time, a layer is a 576-wide row: each of the ~50 burn tensor operations a
//! layer takes costs more in dispatch and allocation than its arithmetic. Here the same layer
//! is a few loops over reused buffers around the quantized products of `qmatmul.rs`, which
//! read the weights (what decoding is bound by). Prefill (many rows through dequantized
//! weights, burn's matmul) shares the session's host KV cache with this path.
//!
//! Rows are processed exactly as one token at a time would be, however many are given (each
//! row attends to the positions before it and itself; every product is per row), so a
//! validator replaying an output in one pass computes the logits generation computed, bit for
//! bit.

use super::{ForwardError, Linear, Llama};
use crate::models::config::RopeLayout;
use crate::models::qmatmul::{dot_f32, Activations};

/// Keys and values of one layer, position-major: position `p` holds every key/value head's
/// `head_dim` values at `[p * width .. (p + 1) * width]`. Allocated to the session's capacity.
#[derive(Clone)]
pub(super) struct HostCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl HostCache {
    pub fn new(positions: usize, width: usize) -> Self {
        Self {
            k: vec![0.0; positions * width],
            v: vec![0.0; positions * width],
        }
    }

    /// Room for `positions` (the filled ones stay where they are).
    pub fn grow(&mut self, positions: usize, width: usize) {
        self.k.resize(positions * width, 0.0);
        self.v.resize(positions * width, 0.0);
    }
}

/// `out = x / rms(x) * w`.
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = dot_f32(x, x) / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

fn quant_product(layer: &Linear, x: &Activations, out: &mut [f32]) -> Result<(), ForwardError> {
    match layer {
        Linear::Quant(q) => Ok(q.matmul_activations(x, out)?),
        // `host_decode` is set only when every layer is quantized.
        Linear::Dense(_) => Err(ForwardError::NotQuantized),
    }
}

/// One query row's attention over the cached positions `0..seen`.
struct Attention<'a> {
    /// Every query head of the row (`heads * head_dim`).
    q: &'a [f32],
    cache: &'a HostCache,
    seen: usize,
    head_dim: usize,
    /// Query heads per key/value head (consecutive query heads share one).
    group: usize,
    /// Values per cached position (`kv_heads * head_dim`).
    width: usize,
    scale: f32,
}

/// Writes each head's attention output into `out` (`heads * head_dim`). `scores` is scratch
/// of at least `seen` values.
fn attend(a: &Attention, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just here. Plain arithmetic compiled for
        // wider registers: no fused operations, so the same bits as the portable build.
        return unsafe { attend_avx2(a, scores, out) };
    }
    attend_portable(a, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(a: &Attention, scores: &mut [f32], out: &mut [f32]) {
    attend_portable(a, scores, out)
}

#[inline(always)]
fn attend_portable(a: &Attention, scores: &mut [f32], out: &mut [f32]) {
    let hd = a.head_dim;
    let scores = &mut scores[..a.seen];
    for (head, out) in out.chunks_exact_mut(hd).enumerate() {
        let kv = (head / a.group) * hd;
        let q = &a.q[head * hd..(head + 1) * hd];
        for (p, s) in scores.iter_mut().enumerate() {
            let key = &a.cache.k[p * a.width + kv..p * a.width + kv + hd];
            *s = dot8(q, key) * a.scale;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out.fill(0.0);
        for (p, &s) in scores.iter().enumerate() {
            let w = s / sum;
            let value = &a.cache.v[p * a.width + kv..p * a.width + kv + hd];
            for (o, &v) in out.iter_mut().zip(value) {
                *o += w * v;
            }
        }
    }
}

/// A dot product in eight independent lanes (inlined, so it takes the caller's registers).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

impl Llama {
    /// Rotates every head of `x` (`heads * head_dim` values) for position `pos`.
    fn rope_host(&self, x: &mut [f32], pos: usize) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        let cos = &self.rope_cos[pos * half..(pos + 1) * half];
        let sin = &self.rope_sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(hd) {
            for i in 0..half {
                let (ia, ib) = match self.config.rope_layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::HalfSplit => (i, i + half),
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * cos[i] - b * sin[i];
                head[ib] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Runs the rows of `x` (`n * hidden` embeddings) at positions `pos0..pos0 + n` through
    /// every layer, with the caches of `caches`, and returns the logits of the last row (or of
    /// every row when `all_logits`).
    pub(super) fn forward_host(
        &self,
        caches: Vec<&mut HostCache>,
        pos0: usize,
        mut x: Vec<f32>,
        all_logits: bool,
    ) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let (dim, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.n_heads, c.n_kv_heads);
        let n = x.len() / dim;
        let (qw, kvw, g) = (nh * hd, nkv * hd, c.group_size());
        let ffn = self.layers.first().map_or(0, |l| l.w_gate.rows());
        let scale = 1.0 / (hd as f32).sqrt();
        let mut h = vec![0f32; n * dim];
        let (mut q, mut k, mut v) = (vec![0f32; n * qw], vec![0f32; n * kvw], vec![0f32; n * kvw]);
        let mut attn = vec![0f32; n * qw];
        let mut proj = vec![0f32; n * dim];
        let (mut gate, mut up) = (vec![0f32; n * ffn], vec![0f32; n * ffn]);
        let mut scores = vec![0f32; pos0 + n];
        for (layer, cache) in self.layers.iter().zip(caches) {
            for (xr, hr) in x.chunks_exact(dim).zip(h.chunks_exact_mut(dim)) {
                rms_norm(xr, &layer.attn_norm.host, layer.attn_norm.eps, hr);
            }
            // One parallel region for the three products (each is too short to keep two
            // threads busy alone, and every region ends with the threads waiting for each other),
            // on activations quantized once.
            let hq = Activations::new(&h);
            let (rq, (rk, rv)) = rayon::join(
                || quant_product(&layer.wq, &hq, &mut q),
                || {
                    rayon::join(
                        || quant_product(&layer.wk, &hq, &mut k),
                        || quant_product(&layer.wv, &hq, &mut v),
                    )
                },
            );
            rq.and(rk).and(rv)?;
            for i in 0..n {
                let pos = pos0 + i;
                self.rope_host(&mut q[i * qw..(i + 1) * qw], pos);
                self.rope_host(&mut k[i * kvw..(i + 1) * kvw], pos);
                cache.k[pos * kvw..(pos + 1) * kvw].copy_from_slice(&k[i * kvw..(i + 1) * kvw]);
                cache.v[pos * kvw..(pos + 1) * kvw].copy_from_slice(&v[i * kvw..(i + 1) * kvw]);
            }
            for i in 0..n {
                attend(
                    &Attention {
                        q: &q[i * qw..(i + 1) * qw],
                        cache,
                        seen: pos0 + i + 1,
                        head_dim: hd,
                        group: g,
                        width: kvw,
                        scale,
                    },
                    &mut scores,
                    &mut attn[i * qw..(i + 1) * qw],
                );
            }
            quant_product(&layer.wo, &Activations::new(&attn), &mut proj)?;
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
            for (xr, hr) in x.chunks_exact(dim).zip(h.chunks_exact_mut(dim)) {
                rms_norm(xr, &layer.ffn_norm.host, layer.ffn_norm.eps, hr);
            }
            let hq = Activations::new(&h);
            let (rg, ru) = rayon::join(
                || quant_product(&layer.w_gate, &hq, &mut gate),
                || quant_product(&layer.w_up, &hq, &mut up),
            );
            rg.and(ru)?;
            for (gv, &uv) in gate.iter_mut().zip(&up) {
                *gv = *gv / (1.0 + (-*gv).exp()) * uv;
            }
            quant_product(&layer.w_down, &Activations::new(&gate), &mut proj)?;
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        let rows = if all_logits { 0..n } else { n - 1..n };
        let mut normed = vec![0f32; rows.len() * dim];
        for (r, out) in rows.zip(normed.chunks_exact_mut(dim)) {
            rms_norm(
                &x[r * dim..(r + 1) * dim],
                &self.output_norm.host,
                self.output_norm.eps,
                out,
            );
        }
        let mut logits = vec![0f32; (normed.len() / dim) * self.output.rows()];
        quant_product(&self.output, &Activations::new(&normed), &mut logits)?;
        Ok(logits)
    }
}
