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
    row_bytes: usize,
    data: Vec<u8>,
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

impl QuantMatrix {
    /// Wraps `data` (exactly `rows` rows of `cols` elements of `ty`).
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
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes,
            data,
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
    /// Bytes of packed weights (what one matrix-vector product reads).
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// The packed bytes of one row.
    pub fn row_bytes(&self, row: usize) -> &[u8] {
        &self.data[row * self.row_bytes..(row + 1) * self.row_bytes]
    }

    /// Dequantizes one row into `out` (`cols` elements).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), QuantError> {
        quant::dequantize(self.ty, self.row_bytes(row), out)
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
        match self.ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => self.matmul_int8(x, n, out),
            _ => self.matmul_dequant(x, n, out),
        }
    }

    /// Rows per parallel work item: large enough to amortise scheduling, small enough to
    /// spread a 576-row matrix over the threads.
    fn rows_per_task(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        (self.rows / (threads * 8)).clamp(4, 64)
    }

    fn matmul_int8(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<(), QMatmulError> {
        let blocks = self.cols / QK;
        let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_act_block).collect();
        let chunk = self.rows_per_task();
        // Work is split over output rows; each task writes its rows for every activation row
        // into a local buffer, then scatters (out is [n, rows], so a task's rows are strided).
        let partials: Vec<(usize, Vec<f32>)> = (0..self.rows)
            .step_by(chunk)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|r0| {
                let r1 = (r0 + chunk).min(self.rows);
                let mut local = vec![0f32; (r1 - r0) * n];
                for r in r0..r1 {
                    let w = self.row_bytes(r);
                    for t in 0..n {
                        let a = &acts[t * blocks..(t + 1) * blocks];
                        local[(r - r0) * n + t] = dot_row(self.ty, w, a);
                    }
                }
                (r0, local)
            })
            .collect();
        scatter(partials, n, self.rows, out);
        Ok(())
    }

    fn matmul_dequant(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<(), QMatmulError> {
        let chunk = self.rows_per_task();
        let cols = self.cols;
        let partials: Result<Vec<(usize, Vec<f32>)>, QuantError> = (0..self.rows)
            .step_by(chunk)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|r0| {
                let r1 = (r0 + chunk).min(self.rows);
                let mut local = vec![0f32; (r1 - r0) * n];
                let mut row = vec![0f32; cols];
                for r in r0..r1 {
                    self.dequantize_row(r, &mut row)?;
                    for t in 0..n {
                        local[(r - r0) * n + t] = dot_f32(&row, &x[t * cols..(t + 1) * cols]);
                    }
                }
                Ok((r0, local))
            })
            .collect();
        scatter(partials?, n, self.rows, out);
        Ok(())
    }
}

/// Writes per-task `[rows_in_task, n]` blocks into `out` laid out `[n, rows]`.
fn scatter(partials: Vec<(usize, Vec<f32>)>, n: usize, rows: usize, out: &mut [f32]) {
    for (r0, local) in partials {
        let task_rows = local.len() / n.max(1);
        for i in 0..task_rows {
            for t in 0..n {
                out[t * rows + r0 + i] = local[i * n + t];
            }
        }
    }
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

/// Dot product of one packed weight row with its quantized activation blocks.
fn dot_row(ty: GgmlType, w: &[u8], a: &[ActBlock]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); the kernels only
            // read within `w` and `a`, whose lengths agree (one weight block per act block).
            return unsafe { avx2::dot_row(ty, w, a) };
        }
    }
    dot_row_portable(ty, w, a)
}

/// The reference integer kernels: also what the AVX2 ones are tested against.
#[cfg(test)]
fn dot_row_portable_f32(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_act_block).collect();
    dot_row_portable(ty, w, &acts)
}

/// The same dot product through whichever kernel this CPU runs (for tests).
#[cfg(test)]
fn dot_row_fast_f32(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_act_block).collect();
    dot_row(ty, w, &acts)
}

fn dot_row_portable(ty: GgmlType, w: &[u8], a: &[ActBlock]) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    for (blk, act) in w.chunks_exact(bb).zip(a) {
        match ty {
            GgmlType::Q4_0 => {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                let mut sumi = 0i32;
                for j in 0..16 {
                    sumi += (qs[j] & 0x0F) as i32 * act.qs[j] as i32;
                    sumi += (qs[j] >> 4) as i32 * act.qs[j + 16] as i32;
                }
                acc += d * (act.d * sumi as f32 - 8.0 * act.s);
            }
            GgmlType::Q4_1 => {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qs = &blk[4..20];
                let mut sumi = 0i32;
                for j in 0..16 {
                    sumi += (qs[j] & 0x0F) as i32 * act.qs[j] as i32;
                    sumi += (qs[j] >> 4) as i32 * act.qs[j + 16] as i32;
                }
                acc += d * act.d * sumi as f32 + m * act.s;
            }
            GgmlType::Q8_0 => {
                let d = f16_at(blk, 0);
                let mut sumi = 0i32;
                for j in 0..QK {
                    sumi += (blk[2 + j] as i8) as i32 * act.qs[j] as i32;
                }
                acc += d * act.d * sumi as f32;
            }
            _ => unreachable!("integer kernels exist only for Q4_0, Q4_1 and Q8_0"),
        }
    }
    acc
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
    use super::{f16_at, ActBlock, GgmlType};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_row(ty: GgmlType, w: &[u8], a: &[ActBlock]) -> f32 {
        match ty {
            GgmlType::Q4_0 => dot_q4(w, a, 18, 2, false),
            GgmlType::Q4_1 => dot_q4(w, a, 20, 4, true),
            GgmlType::Q8_0 => dot_q8_0(w, a),
            _ => unreachable!("integer kernels exist only for Q4_0, Q4_1 and Q8_0"),
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

    /// Q4_0 and Q4_1: nibbles (unsigned 0..15) times signed activations with `maddubs`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q4(w: &[u8], a: &[ActBlock], bb: usize, qs_at: usize, has_min: bool) -> f32 {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for (i, act) in a.iter().enumerate() {
            let blk = w.as_ptr().add(i * bb);
            let d = f16_at(w, i * bb);
            let packed = _mm_loadu_si128(blk.add(qs_at) as *const __m128i);
            // Low nibbles are elements 0..15, high nibbles 16..31: the activation's order.
            let hi = _mm_srli_epi16(packed, 4);
            let q = _mm256_and_si256(_mm256_set_m128i(hi, packed), mask);
            let x = _mm256_load_si256(act.qs.as_ptr() as *const __m256i);
            let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
            let scale = _mm256_set1_ps(d * act.d);
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(prod), acc);
            if has_min {
                offset += f16_at(w, i * bb + 2) * act.s;
            } else {
                offset -= 8.0 * d * act.s;
            }
        }
        hsum(acc) + offset
    }

    /// Q8_0: signed × signed, made unsigned × signed with the sign trick for `maddubs`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q8_0(w: &[u8], a: &[ActBlock]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (i, act) in a.iter().enumerate() {
            let blk = w.as_ptr().add(i * 34);
            let d = f16_at(w, i * 34);
            let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let x = _mm256_load_si256(act.qs.as_ptr() as *const __m256i);
            let ax = _mm256_sign_epi8(q, q);
            let sx = _mm256_sign_epi8(x, q);
            let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sx), ones);
            let scale = _mm256_set1_ps(d * act.d);
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(prod), acc);
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
