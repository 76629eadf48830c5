//! Matrix products on quantized GGML weights, without dequantizing the whole matrix.
//!
//! Decode multiplies each weight matrix by one activation row, so it is bound by how many bytes
//! of weights it reads: keeping Q4/Q8 blocks packed reads 4-8x fewer bytes than f32. As
//! llama.cpp does, the activation row is quantized to 8-bit blocks of 32 and the block dot
//! products run in integers (AVX2 where the CPU has it, portable code elsewhere). Types without
//! an integer kernel (the K-quants) dequantize one weight row at a time and take an f32 dot.
//!
//! Architecture invariant: nothing here knows burn; `llama.rs` decides when to call this (few
//! activation rows) and when to dequantize and use burn's matmul (prefill).

use super::quant::{self, GgmlType, QuantError};

/// Errors of the quantized products: a shape that does not fit, or a bad block.
#[derive(Debug, thiserror::Error)]
pub enum QMatmulError {
    #[error("{what}: expected {expected} elements or bytes, got {actual}")]
    Shape {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error(transparent)]
    Quant(#[from] QuantError),
}
use half::f16;
use rayon::prelude::*;

/// Elements per block of the 8-bit activation format (equal to Q4_0/Q4_1/Q8_0's block).
const QK: usize = 32;

/// A weight matrix in row-major `[rows, cols]` order (`rows` = output features), each row a
/// whole number of GGML blocks.
#[derive(Clone)]
pub struct QuantMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    storage: Storage,
}

/// How the blocks are held. Q4_0, Q4_1 and Q8_0 are repacked at load (as llama.cpp's CPU
/// "repack" does): scales and mins as f32 arrays beside the packed quants, so the hot loop
/// converts no f16 and reads quants contiguously. The values are bit-identical to GGML's.
#[derive(Clone)]
enum Storage {
    Packed {
        /// Per block (row-major over rows, then blocks). f32 rather than GGML's f16: measured,
        /// converting in the hot loop costs more than the 20% more bytes read.
        scale: Vec<f32>,
        /// Q4_1's per-block minimum; empty for Q4_0 and Q8_0.
        min: Vec<f32>,
        /// Per block: 16 bytes of nibbles (Q4_0/Q4_1: low nibbles are elements 0..15, high
        /// nibbles 16..31) or 32 signed bytes (Q8_0).
        qs: Vec<u8>,
    },
    /// Other types, as GGML blocks.
    Raw { row_bytes: usize, data: Vec<u8> },
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix({} [{}x{}])",
            self.ty.name(),
            self.rows,
            self.cols
        )
    }
}

/// One activation block quantized to 8 bits: `x ≈ d * qs`, with `s = d * Σ qs` kept for the
/// offset terms of Q4_0 and Q4_1.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct ActBlock {
    qs: [i8; QK],
    d: f32,
    s: f32,
}

fn quant_bytes(ty: GgmlType) -> usize {
    if ty == GgmlType::Q8_0 {
        32
    } else {
        16
    }
}

impl QuantMatrix {
    /// Wraps `data` (exactly `rows` rows of `cols` elements of `ty`, GGML block layout).
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, QMatmulError> {
        let row_bytes = ty.row_bytes(cols)?;
        let expected = row_bytes.checked_mul(rows).ok_or(QMatmulError::Shape {
            what: "matrix size overflows",
            expected: usize::MAX,
            actual: rows,
        })?;
        if data.len() != expected {
            return Err(QMatmulError::Shape {
                what: "packed weight bytes",
                expected,
                actual: data.len(),
            });
        }
        let storage = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                let bb = ty.block_bytes();
                let nq = quant_bytes(ty);
                let blocks = data.len() / bb;
                let mut scale = Vec::with_capacity(blocks);
                let mut min = Vec::with_capacity(if ty == GgmlType::Q4_1 { blocks } else { 0 });
                let mut qs = Vec::with_capacity(blocks * nq);
                for blk in data.chunks_exact(bb) {
                    scale.push(f16_at(blk, 0));
                    let at = if ty == GgmlType::Q4_1 {
                        min.push(f16_at(blk, 2));
                        4
                    } else {
                        2
                    };
                    qs.extend_from_slice(&blk[at..at + nq]);
                }
                Storage::Packed { scale, min, qs }
            }
            _ => Storage::Raw { row_bytes, data },
        };
        Ok(Self {
            ty,
            rows,
            cols,
            storage,
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes held in memory (what one matrix-vector product reads).
    pub fn byte_len(&self) -> usize {
        match &self.storage {
            Storage::Packed { scale, min, qs } => (scale.len() + min.len()) * 4 + qs.len(),
            Storage::Raw { data, .. } => data.len(),
        }
    }

    /// Dequantizes one row into `out` (`cols` elements), exactly as GGML does.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), QuantError> {
        match &self.storage {
            Storage::Raw { row_bytes, data } => {
                quant::dequantize(self.ty, &data[row * row_bytes..(row + 1) * row_bytes], out)
            }
            Storage::Packed { scale, min, qs } => {
                let bpr = self.cols / QK;
                let nq = quant_bytes(self.ty);
                for (b, dst) in out.chunks_exact_mut(QK).enumerate() {
                    let i = row * bpr + b;
                    let d = scale[i];
                    let q = &qs[i * nq..(i + 1) * nq];
                    match self.ty {
                        GgmlType::Q8_0 => dst
                            .iter_mut()
                            .zip(q)
                            .for_each(|(o, &v)| *o = (v as i8) as f32 * d),
                        ty => {
                            for j in 0..16 {
                                let (lo, hi) = ((q[j] & 0x0F) as f32, (q[j] >> 4) as f32);
                                // Exactly GGML's expressions: q * d + m, and (q - 8) * d.
                                if ty == GgmlType::Q4_1 {
                                    dst[j] = lo * d + min[i];
                                    dst[j + 16] = hi * d + min[i];
                                } else {
                                    dst[j] = (lo - 8.0) * d;
                                    dst[j + 16] = (hi - 8.0) * d;
                                }
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Dequantizes the whole matrix, row-major `[rows, cols]`, rows in parallel.
    pub fn dequantize(&self) -> Result<Vec<f32>, QuantError> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .try_for_each(|(r, dst)| self.dequantize_row(r, dst))?;
        Ok(out)
    }

    /// `out[t * rows + r] = Σ_c x[t * cols + c] * W[r, c]` for `n = x.len() / cols` activation
    /// rows: `x · Wᵀ`, the shape of a linear layer.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) -> Result<(), QMatmulError> {
        let n = x.len() / self.cols.max(1);
        if x.len() != n * self.cols || out.len() != n * self.rows {
            return Err(QMatmulError::Shape {
                what: "activation rows × output rows",
                expected: n * self.rows,
                actual: out.len(),
            });
        }
        match &self.storage {
            Storage::Packed { scale, min, qs } => {
                let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_act_block).collect();
                let bpr = self.cols / QK;
                let nq = quant_bytes(self.ty);
                let ty = self.ty;
                let dot = dot_kernel();
                self.for_each_row(n, out, |r, row_out, _| {
                    let blocks = r * bpr..(r + 1) * bpr;
                    let row = PackedRow {
                        scale: &scale[blocks.clone()],
                        min: if min.is_empty() {
                            &[]
                        } else {
                            &min[blocks.clone()]
                        },
                        qs: &qs[blocks.start * nq..blocks.end * nq],
                    };
                    for (t, o) in row_out.iter_mut().enumerate() {
                        *o = dot(ty, &row, &acts[t * bpr..(t + 1) * bpr]);
                    }
                    Ok(())
                })
            }
            Storage::Raw { .. } => {
                let cols = self.cols;
                self.for_each_row(n, out, |r, row_out, row| {
                    row.resize(cols, 0.0);
                    self.dequantize_row(r, row)?;
                    for (t, o) in row_out.iter_mut().enumerate() {
                        *o = dot_f32(row, &x[t * cols..(t + 1) * cols]);
                    }
                    Ok(())
                })
            }
        }
    }

    /// Runs `f(row, outputs_of_that_row_for_each_activation_row, scratch)` over all rows in
    /// parallel and lays the results out `[n, rows]`. `scratch` is one buffer per task, reused
    /// across its rows. With one activation row (decode) the results are written in place;
    /// otherwise through a `[rows, n]` buffer and one transpose.
    fn for_each_row(
        &self,
        n: usize,
        out: &mut [f32],
        f: impl Fn(usize, &mut [f32], &mut Vec<f32>) -> Result<(), QuantError> + Sync,
    ) -> Result<(), QMatmulError> {
        let threads = rayon::current_num_threads().max(1);
        // Enough tasks to balance the threads, each long enough to amortise scheduling.
        let rows_per_task = (self.rows / (threads * 4)).clamp(8, 256);
        let run = |dst: &mut [f32]| -> Result<(), QuantError> {
            dst.par_chunks_mut(rows_per_task * n)
                .enumerate()
                .try_for_each(|(task, chunk)| {
                    let mut scratch = Vec::new();
                    for (k, row_out) in chunk.chunks_mut(n).enumerate() {
                        f(task * rows_per_task + k, row_out, &mut scratch)?;
                    }
                    Ok(())
                })
        };
        if n == 1 {
            run(out)?;
        } else {
            let mut by_row = vec![0f32; self.rows * n];
            run(&mut by_row)?;
            for (r, vals) in by_row.chunks_exact(n).enumerate() {
                for (t, v) in vals.iter().enumerate() {
                    out[t * self.rows + r] = *v;
                }
            }
        }
        Ok(())
    }
}

/// One row of a repacked matrix.
struct PackedRow<'a> {
    scale: &'a [f32],
    min: &'a [f32],
    qs: &'a [u8],
}

fn quantize_act_block(x: &[f32]) -> ActBlock {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        let r = (v * inv).round() as i32;
        *q = r.clamp(-127, 127) as i8;
        sum += *q as i32;
    }
    ActBlock {
        qs,
        d,
        s: d * sum as f32,
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// A dot product of one repacked weight row with its quantized activation blocks.
type DotKernel = fn(GgmlType, &PackedRow, &[ActBlock]) -> f32;

/// The fastest kernel this CPU runs; chosen once per product, not per row.
fn dot_kernel() -> DotKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY (both closures): the CPU supports AVX2 and FMA, and AVX-VNNI for the
            // first, checked just here; the kernels index only blocks 0..a.len(), which the
            // row holds.
            if std::is_x86_feature_detected!("avxvnni") {
                return |ty, w, a| unsafe { avx2::dot_packed_vnni(ty, w, a) };
            }
            return |ty, w, a| unsafe { avx2::dot_packed(ty, w, a) };
        }
    }
    dot_packed_portable
}

/// The reference integer kernels: also what the AVX2 ones are tested against.
fn dot_packed_portable(ty: GgmlType, w: &PackedRow, a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (i, act) in a.iter().enumerate() {
        let d = w.scale[i];
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let qs = &w.qs[i * 16..(i + 1) * 16];
                let mut sumi = 0i32;
                for j in 0..16 {
                    sumi += (qs[j] & 0x0F) as i32 * act.qs[j] as i32;
                    sumi += (qs[j] >> 4) as i32 * act.qs[j + 16] as i32;
                }
                acc += d * act.d * sumi as f32;
                acc += if ty == GgmlType::Q4_1 {
                    w.min[i] * act.s
                } else {
                    -8.0 * d * act.s
                };
            }
            GgmlType::Q8_0 => {
                let qs = &w.qs[i * 32..(i + 1) * 32];
                let sumi: i32 = qs
                    .iter()
                    .zip(&act.qs)
                    .map(|(&q, &x)| (q as i8) as i32 * x as i32)
                    .sum();
                acc += d * act.d * sumi as f32;
            }
            _ => unreachable!("packed storage exists only for Q4_0, Q4_1 and Q8_0"),
        }
    }
    acc
}

#[cfg(test)]
fn with_packed_row<R>(
    ty: GgmlType,
    w: &[u8],
    x: &[f32],
    f: impl Fn(&PackedRow, &[ActBlock]) -> R,
) -> R {
    let m = QuantMatrix::new(ty, 1, x.len(), w.to_vec()).unwrap();
    let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_act_block).collect();
    match &m.storage {
        Storage::Packed { scale, min, qs } => f(&PackedRow { scale, min, qs }, &acts),
        Storage::Raw { .. } => unreachable!(),
    }
}

#[cfg(test)]
fn dot_row_portable_f32(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    with_packed_row(ty, w, x, |row, acts| dot_packed_portable(ty, row, acts))
}

#[cfg(test)]
fn dot_row_fast_f32(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    with_packed_row(ty, w, x, |row, acts| dot_kernel()(ty, row, acts))
}

/// f32 dot product written so the compiler vectorises it (eight independent accumulators).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for k in 0..8 {
            acc[k] += a[i * 8 + k] * b[i * 8 + k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ActBlock, GgmlType, PackedRow};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_packed(ty: GgmlType, w: &PackedRow, a: &[ActBlock]) -> f32 {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => dot_q4::<false>(w, a, ty == GgmlType::Q4_1),
            GgmlType::Q8_0 => dot_q8_0::<false>(w, a),
            _ => unreachable!("packed storage exists only for Q4_0, Q4_1 and Q8_0"),
        }
    }

    /// The same kernels with AVX-VNNI's fused unsigned×signed byte dot product (one
    /// instruction where AVX2 needs two).
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn dot_packed_vnni(ty: GgmlType, w: &PackedRow, a: &[ActBlock]) -> f32 {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => dot_q4::<true>(w, a, ty == GgmlType::Q4_1),
            GgmlType::Q8_0 => dot_q8_0::<true>(w, a),
            _ => unreachable!("packed storage exists only for Q4_0, Q4_1 and Q8_0"),
        }
    }

    /// Σ u8 × i8 over 32 bytes, as 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8_i8<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Sum of products of one block: nibbles (unsigned 0..15) times signed activations.
    #[inline(always)]
    unsafe fn block_q4<const VNNI: bool>(qs: *const u8, act: &ActBlock) -> __m256 {
        let mask = _mm256_set1_epi8(0x0F);
        let packed = _mm_loadu_si128(qs as *const __m128i);
        // Low nibbles are elements 0..15, high nibbles 16..31: the activation's order.
        let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
        let x = _mm256_load_si256(act.qs.as_ptr() as *const __m256i);
        _mm256_cvtepi32_ps(dot_u8_i8::<VNNI>(q, x))
    }

    /// Q4_0 and Q4_1, two blocks per iteration into independent accumulators.
    #[inline(always)]
    unsafe fn dot_q4<const VNNI: bool>(w: &PackedRow, a: &[ActBlock], has_min: bool) -> f32 {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offset = 0f32;
        let qs = w.qs.as_ptr();
        let n = a.len();
        let mut i = 0;
        while i + 1 < n {
            let (a0, a1) = (a.get_unchecked(i), a.get_unchecked(i + 1));
            let (d0, d1) = (*w.scale.get_unchecked(i), *w.scale.get_unchecked(i + 1));
            acc0 = _mm256_fmadd_ps(
                _mm256_set1_ps(d0 * a0.d),
                block_q4::<VNNI>(qs.add(i * 16), a0),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_set1_ps(d1 * a1.d),
                block_q4::<VNNI>(qs.add(i * 16 + 16), a1),
                acc1,
            );
            i += 2;
        }
        if i < n {
            let a0 = a.get_unchecked(i);
            let d0 = *w.scale.get_unchecked(i);
            acc0 = _mm256_fmadd_ps(
                _mm256_set1_ps(d0 * a0.d),
                block_q4::<VNNI>(qs.add(i * 16), a0),
                acc0,
            );
        }
        for (j, act) in a.iter().enumerate() {
            offset += if has_min {
                *w.min.get_unchecked(j) * act.s
            } else {
                -8.0 * *w.scale.get_unchecked(j) * act.s
            };
        }
        hsum(_mm256_add_ps(acc0, acc1)) + offset
    }

    /// Q8_0: signed × signed, made unsigned × signed with the sign trick for `maddubs`.
    #[inline(always)]
    unsafe fn dot_q8_0<const VNNI: bool>(w: &PackedRow, a: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (i, act) in a.iter().enumerate() {
            let q = _mm256_loadu_si256(w.qs.as_ptr().add(i * 32) as *const __m256i);
            let x = _mm256_load_si256(act.qs.as_ptr() as *const __m256i);
            let prod = dot_u8_i8::<VNNI>(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(*w.scale.get_unchecked(i) * act.d),
                _mm256_cvtepi32_ps(prod),
                acc,
            );
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// The SIMD kernels must equal the portable ones up to f32 summation order.
    #[test]
    fn simd_kernels_match_portable_kernels() {
        let seed = 7;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (ty, quantize) in [
            (
                GgmlType::Q4_0,
                quant::quantize_q4_0 as fn(&[f32]) -> Vec<u8>,
            ),
            (GgmlType::Q4_1, quant::quantize_q4_1),
            (GgmlType::Q8_0, quant::quantize_q8_0),
        ] {
            for cols in [32usize, 64, 576, 1536] {
                let w = quantize(&random(&mut rng, cols));
                let x = random(&mut rng, cols);
                let slow = dot_row_portable_f32(ty, &w, &x);
                let fast = dot_row_fast_f32(ty, &w, &x);
                assert!(
                    (slow - fast).abs() <= 1e-4 * (1.0 + slow.abs()),
                    "{ty:?} cols={cols} seed={seed}: portable {slow} vs fast {fast}"
                );
            }
        }
    }

    /// Repacking changes the layout, never the values: bit-identical to GGML's dequantization.
    #[test]
    fn repacked_rows_dequantize_exactly_like_ggml() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (ty, quantize) in [
            (
                GgmlType::Q4_0,
                quant::quantize_q4_0 as fn(&[f32]) -> Vec<u8>,
            ),
            (GgmlType::Q4_1, quant::quantize_q4_1),
            (GgmlType::Q8_0, quant::quantize_q8_0),
        ] {
            let (rows, cols) = (3, 96);
            let raw = quantize(&random(&mut rng, rows * cols));
            let mut expected = vec![0f32; rows * cols];
            quant::dequantize(ty, &raw, &mut expected).unwrap();
            let m = QuantMatrix::new(ty, rows, cols, raw).unwrap();
            let got = m.dequantize().unwrap();
            assert!(
                got.iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty:?}"
            );
        }
    }

    /// The quantized product stays within the error of 8-bit activations of the exact product
    /// over dequantized weights.
    #[test]
    fn matmul_matches_dequantized_product() {
        let seed = 11;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (rows, cols, n) = (40, 96, 3);
        for (ty, quantize) in [
            (
                GgmlType::Q4_0,
                quant::quantize_q4_0 as fn(&[f32]) -> Vec<u8>,
            ),
            (GgmlType::Q4_1, quant::quantize_q4_1),
            (GgmlType::Q8_0, quant::quantize_q8_0),
        ] {
            let w = quantize(&random(&mut rng, rows * cols));
            let m = QuantMatrix::new(ty, rows, cols, w).unwrap();
            let dense = m.dequantize().unwrap();
            let x = random(&mut rng, n * cols);
            let mut out = vec![0f32; n * rows];
            m.matmul(&x, &mut out).unwrap();
            for t in 0..n {
                for r in 0..rows {
                    let exact = dot_f32(
                        &dense[r * cols..(r + 1) * cols],
                        &x[t * cols..(t + 1) * cols],
                    );
                    // 8-bit activations: each element is off by at most amax/254; summed over
                    // |w| <= 1 that bounds the error by cols/254 in the worst case; typical
                    // errors are far smaller, so check a tenth of that.
                    let bound = cols as f32 / 254.0 / 10.0;
                    let got = out[t * rows + r];
                    assert!(
                        (got - exact).abs() <= bound,
                        "{ty:?} seed={seed} t={t} r={r}: {got} vs {exact}"
                    );
                }
            }
        }
    }
}
