//! Matrix products on quantized GGML weights, without dequantizing the whole matrix.
//!
//! Decode multiplies each weight matrix by one activation row, so it is bound by how many bytes
//! of weights it reads: keeping Q4/Q8 blocks packed reads 4-8x fewer bytes than f32. As
//! llama.cpp does, the activation row is quantized to 8-bit blocks of 32 and the block dot
//! products run in integers (AVX2 where the CPU has it, portable code elsewhere). Types without
//! an integer kernel (the K-quants) dequantize one weight row at a time and take an f32 dot.
//!
//! Q4_0, Q4_1 and Q8_0 are repacked at load in groups of eight rows, interleaved block by block
//! (as llama.cpp's CPU "repack" does): one 32-byte load holds four quants of each of the eight
//! rows, so a byte dot product against four broadcast activation bytes leaves each row's partial
//! sum in its own lane. No horizontal sums, one scale multiply for eight rows, and the same bytes
//! as GGML's blocks (f16 scales, converted eight at a time).
//!
//! Numerics: each output is accumulated block by block in one fixed order with fused
//! multiply-adds, in the SIMD and the portable kernels alike, so both give the same bits, on any
//! thread count and whether one activation row is multiplied or several.
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

/// Rows interleaved together in the repacked layout (one f32 lane each in a 256-bit register).
const GROUP: usize = 8;

/// A weight matrix in row-major `[rows, cols]` order (`rows` = output features), each row a
/// whole number of GGML blocks.
#[derive(Clone)]
pub struct QuantMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    storage: Storage,
}

/// How the blocks are held.
#[derive(Clone)]
enum Storage {
    /// Q4_0, Q4_1 and Q8_0: rows in groups of [`GROUP`] (the last padded with zero rows), each
    /// group stored block by block; see [`Interleaved`] for one group-block's bytes. The values
    /// are bit-identical to GGML's.
    Interleaved(Interleaved),
    /// Other types, as GGML blocks.
    Raw { row_bytes: usize, data: Vec<u8> },
}

/// One group-block (`GROUP` rows × 32 columns) is `[scales][mins][quants]`:
/// - scales: `GROUP` f16, row by row;
/// - mins (Q4_1 only): `GROUP` f16;
/// - quants, in 32-byte lanes-of-rows: chunk `k` holds bytes `4k..4k + 4` of each row's GGML
///   quants, row 0 first. Q4_0/Q4_1 have 4 chunks (16 bytes of nibbles a row: low nibbles are
///   elements 0..15, high nibbles 16..31), Q8_0 has 8 (32 signed bytes a row).
#[derive(Clone)]
struct Interleaved {
    /// Blocks per row.
    blocks: usize,
    /// Bytes of one group-block.
    stride: usize,
    data: Vec<u8>,
}

impl Interleaved {
    fn quant_chunks(ty: GgmlType) -> usize {
        if ty == GgmlType::Q8_0 {
            8
        } else {
            4
        }
    }

    /// Offset of the quants within a group-block.
    fn quants_at(ty: GgmlType) -> usize {
        if ty == GgmlType::Q4_1 {
            4 * GROUP
        } else {
            2 * GROUP
        }
    }

    fn stride(ty: GgmlType) -> usize {
        Self::quants_at(ty) + Self::quant_chunks(ty) * 4 * GROUP
    }

    /// Repacks GGML blocks (`rows` rows of `blocks` blocks each).
    fn pack(ty: GgmlType, rows: usize, blocks: usize, ggml: &[u8]) -> Self {
        let bb = ty.block_bytes();
        let stride = Self::stride(ty);
        let groups = rows.div_ceil(GROUP);
        let mut data = vec![0u8; groups * blocks * stride];
        let (quants_at, chunks) = (Self::quants_at(ty), Self::quant_chunks(ty));
        let ggml_quants_at = if ty == GgmlType::Q4_1 { 4 } else { 2 };
        for row in 0..rows {
            let (g, r) = (row / GROUP, row % GROUP);
            for b in 0..blocks {
                let src = &ggml[(row * blocks + b) * bb..][..bb];
                let dst = &mut data[(g * blocks + b) * stride..][..stride];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                if ty == GgmlType::Q4_1 {
                    dst[2 * GROUP + 2 * r..2 * GROUP + 2 * r + 2].copy_from_slice(&src[2..4]);
                }
                for k in 0..chunks {
                    let at = quants_at + k * 4 * GROUP + 4 * r;
                    dst[at..at + 4]
                        .copy_from_slice(&src[ggml_quants_at + 4 * k..ggml_quants_at + 4 * k + 4]);
                }
            }
        }
        Self {
            blocks,
            stride,
            data,
        }
    }

    /// One group's blocks, in order.
    fn group(&self, g: usize) -> &[u8] {
        &self.data[g * self.blocks * self.stride..(g + 1) * self.blocks * self.stride]
    }
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
    /// Copies `data` (exactly `rows` rows of `cols` elements of `ty`, GGML block layout) into
    /// this matrix's layout.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Result<Self, QMatmulError> {
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
                Storage::Interleaved(Interleaved::pack(ty, rows, cols / QK, data))
            }
            _ => Storage::Raw {
                row_bytes,
                data: data.to_vec(),
            },
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
            Storage::Interleaved(p) => p.data.len(),
            Storage::Raw { data, .. } => data.len(),
        }
    }

    /// Dequantizes one row into `out` (`cols` elements), exactly as GGML does.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), QuantError> {
        match &self.storage {
            Storage::Raw { row_bytes, data } => {
                quant::dequantize(self.ty, &data[row * row_bytes..(row + 1) * row_bytes], out)
            }
            Storage::Interleaved(p) => {
                let (g, r) = (row / GROUP, row % GROUP);
                let quants_at = Interleaved::quants_at(self.ty);
                for (blk, dst) in p
                    .group(g)
                    .chunks_exact(p.stride)
                    .zip(out.chunks_exact_mut(QK))
                {
                    let d = f16_at(blk, 2 * r);
                    let chunk = |k: usize| &blk[quants_at + k * 4 * GROUP + 4 * r..][..4];
                    match self.ty {
                        GgmlType::Q8_0 => {
                            for k in 0..8 {
                                for (j, &v) in chunk(k).iter().enumerate() {
                                    dst[4 * k + j] = (v as i8) as f32 * d;
                                }
                            }
                        }
                        ty => {
                            let m = if ty == GgmlType::Q4_1 {
                                f16_at(blk, 2 * GROUP + 2 * r)
                            } else {
                                0.0
                            };
                            for k in 0..4 {
                                for (j, &q) in chunk(k).iter().enumerate() {
                                    let (lo, hi) = ((q & 0x0F) as f32, (q >> 4) as f32);
                                    let (a, b) = (4 * k + j, 4 * k + j + 16);
                                    // Exactly GGML's expressions: q * d + m, and (q - 8) * d.
                                    if ty == GgmlType::Q4_1 {
                                        dst[a] = lo * d + m;
                                        dst[b] = hi * d + m;
                                    } else {
                                        dst[a] = (lo - 8.0) * d;
                                        dst[b] = (hi - 8.0) * d;
                                    }
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
        self.matmul_activations(&Activations::new(x), out)
    }

    /// [`QuantMatrix::matmul`] with activations quantized beforehand, so several matrices
    /// multiplying the same rows (a layer's q, k and v) quantize them once.
    pub fn matmul_activations(
        &self,
        activations: &Activations,
        out: &mut [f32],
    ) -> Result<(), QMatmulError> {
        let x = activations.x;
        let n = x.len() / self.cols.max(1);
        if x.len() != n * self.cols || out.len() != n * self.rows {
            return Err(QMatmulError::Shape {
                what: "activation rows × output rows",
                expected: n * self.rows,
                actual: out.len(),
            });
        }
        match &self.storage {
            Storage::Interleaved(p) => {
                let acts = &activations.blocks;
                let kernel = group_kernel();
                let ty = self.ty;
                self.for_each_group(n, out, |g, group_out, _| {
                    for (t, lanes) in group_out.chunks_exact_mut(GROUP).enumerate() {
                        let lanes: &mut [f32; GROUP] = lanes.try_into().expect("GROUP lanes");
                        kernel(
                            ty,
                            p.group(g),
                            &acts[t * p.blocks..(t + 1) * p.blocks],
                            lanes,
                        );
                    }
                    Ok(())
                })
            }
            Storage::Raw { .. } => {
                // K-quants: no packed kernel; each row dequantized, then f32 dot products.
                let cols = self.cols;
                self.for_each_group(n, out, |g, group_out, row| {
                    row.resize(cols, 0.0);
                    for i in 0..GROUP.min(self.rows - g * GROUP) {
                        self.dequantize_row(g * GROUP + i, row)?;
                        for t in 0..n {
                            group_out[t * GROUP + i] = dot_f32(row, &x[t * cols..(t + 1) * cols]);
                        }
                    }
                    Ok(())
                })
            }
        }
    }

    /// Runs `f(group, outputs, scratch)` over all row groups in parallel, where `outputs` is
    /// `[n][GROUP]` (the group's results for each activation row) and `scratch` a buffer per
    /// task, reused across its groups; lays the results out `[n, rows]`.
    fn for_each_group(
        &self,
        n: usize,
        out: &mut [f32],
        f: impl Fn(usize, &mut [f32], &mut Vec<f32>) -> Result<(), QuantError> + Sync,
    ) -> Result<(), QMatmulError> {
        let groups = self.rows.div_ceil(GROUP);
        let threads = rayon::current_num_threads().max(1);
        // Enough tasks to balance the threads, each long enough to amortise scheduling.
        let groups_per_task = (groups / (threads * 4)).clamp(1, 32);
        let mut by_group = vec![0f32; groups * n * GROUP];
        by_group
            .par_chunks_mut(groups_per_task * n * GROUP)
            .enumerate()
            .try_for_each(|(task, chunk)| {
                let mut scratch = Vec::new();
                for (k, group_out) in chunk.chunks_exact_mut(n * GROUP).enumerate() {
                    f(task * groups_per_task + k, group_out, &mut scratch)?;
                }
                Ok::<_, QuantError>(())
            })?;
        self.scatter(n, &by_group, out);
        Ok(())
    }

    /// Moves `[groups][n][GROUP]` results into `[n, rows]`, dropping the padding rows.
    fn scatter(&self, n: usize, by_group: &[f32], out: &mut [f32]) {
        for (g, group_out) in by_group.chunks_exact(n * GROUP).enumerate() {
            let live = GROUP.min(self.rows - g * GROUP);
            for t in 0..n {
                let dst = t * self.rows + g * GROUP;
                out[dst..dst + live].copy_from_slice(&group_out[t * GROUP..t * GROUP + live]);
            }
        }
    }
}

/// Activation rows (row-major, each a whole number of 32-element blocks) with their 8-bit
/// blocks, for the packed kernels.
pub struct Activations<'a> {
    x: &'a [f32],
    blocks: Vec<ActBlock>,
}

impl<'a> Activations<'a> {
    pub fn new(x: &'a [f32]) -> Self {
        Self {
            x,
            blocks: x.chunks_exact(QK).map(quantize_act_block).collect(),
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

/// The products of one row group (its blocks, in order) with one activation row, one output
/// per row of the group.
type GroupKernel = fn(GgmlType, &[u8], &[ActBlock], &mut [f32; GROUP]);

/// The fastest kernel this CPU runs; chosen once per product, not per group.
fn group_kernel() -> GroupKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY (both closures): the CPU supports AVX2, FMA and F16C, and AVX-VNNI for
            // the first, checked just here; the kernels read `a.len()` group-blocks, which the
            // group holds (checked by the assertion inside).
            if std::is_x86_feature_detected!("avxvnni") {
                return |ty, w, a, out| unsafe { avx2::group_dot_vnni(ty, w, a, out) };
            }
            return |ty, w, a, out| unsafe { avx2::group_dot(ty, w, a, out) };
        }
    }
    group_dot_portable
}

/// The reference kernel, in the same order of operations as the SIMD ones (so the same bits):
/// per block, `acc = sumi * (d * a.d) + acc`, then the offset term, both fused.
fn group_dot_portable(ty: GgmlType, w: &[u8], a: &[ActBlock], out: &mut [f32; GROUP]) {
    let stride = Interleaved::stride(ty);
    let quants_at = Interleaved::quants_at(ty);
    assert!(w.len() >= a.len() * stride, "a group holds every block");
    *out = [0.0; GROUP];
    for (blk, act) in w.chunks_exact(stride).zip(a) {
        for (r, acc) in out.iter_mut().enumerate() {
            let d = f16_at(blk, 2 * r);
            let chunk = |k: usize| &blk[quants_at + k * 4 * GROUP + 4 * r..][..4];
            let mut sumi = 0i32;
            if ty == GgmlType::Q8_0 {
                for k in 0..8 {
                    for (j, &q) in chunk(k).iter().enumerate() {
                        sumi += (q as i8) as i32 * act.qs[4 * k + j] as i32;
                    }
                }
            } else {
                for k in 0..4 {
                    for (j, &q) in chunk(k).iter().enumerate() {
                        sumi += (q & 0x0F) as i32 * act.qs[4 * k + j] as i32;
                        sumi += (q >> 4) as i32 * act.qs[4 * k + j + 16] as i32;
                    }
                }
            }
            *acc = (sumi as f32).mul_add(d * act.d, *acc);
            match ty {
                GgmlType::Q4_1 => *acc = f16_at(blk, 2 * GROUP + 2 * r).mul_add(act.s, *acc),
                GgmlType::Q4_0 => *acc = d.mul_add(-8.0 * act.s, *acc),
                _ => {}
            }
        }
    }
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
    use super::{ActBlock, GgmlType, Interleaved, GROUP};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group_dot(ty: GgmlType, w: &[u8], a: &[ActBlock], out: &mut [f32; GROUP]) {
        match ty {
            GgmlType::Q4_0 => group_q4::<false, false>(w, a, out),
            GgmlType::Q4_1 => group_q4::<false, true>(w, a, out),
            GgmlType::Q8_0 => group_q8_0::<false>(w, a, out),
            _ => unreachable!("interleaved storage exists only for Q4_0, Q4_1 and Q8_0"),
        }
    }

    /// The same kernels with AVX-VNNI's fused, accumulating unsigned×signed byte dot product
    /// (one instruction where AVX2 needs three).
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn group_dot_vnni(
        ty: GgmlType,
        w: &[u8],
        a: &[ActBlock],
        out: &mut [f32; GROUP],
    ) {
        match ty {
            GgmlType::Q4_0 => group_q4::<true, false>(w, a, out),
            GgmlType::Q4_1 => group_q4::<true, true>(w, a, out),
            GgmlType::Q8_0 => group_q8_0::<true>(w, a, out),
            _ => unreachable!("interleaved storage exists only for Q4_0, Q4_1 and Q8_0"),
        }
    }

    /// `acc + Σ u8 × i8` over each lane's 4 bytes.
    #[inline(always)]
    unsafe fn dot_acc<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_avx_epi32(acc, u, s)
        } else {
            _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
            )
        }
    }

    /// Four activation bytes starting at `at`, in every lane.
    #[inline(always)]
    unsafe fn act4(act: &ActBlock, at: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(
            act.qs.as_ptr().add(at) as *const i32
        ))
    }

    #[inline(always)]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// Q4_0 and Q4_1: nibbles (unsigned 0..15) times signed activations.
    #[inline(always)]
    unsafe fn group_q4<const VNNI: bool, const MIN: bool>(
        w: &[u8],
        a: &[ActBlock],
        out: &mut [f32; GROUP],
    ) {
        let ty = if MIN { GgmlType::Q4_1 } else { GgmlType::Q4_0 };
        let stride = Interleaved::stride(ty);
        let quants_at = Interleaved::quants_at(ty);
        assert!(w.len() >= a.len() * stride, "a group holds every block");
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut blk = w.as_ptr();
        for act in a {
            let q = blk.add(quants_at);
            let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k in 0..4 {
                let bytes = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                let low = _mm256_and_si256(bytes, mask);
                let high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
                lo = dot_acc::<VNNI>(lo, low, act4(act, 4 * k));
                hi = dot_acc::<VNNI>(hi, high, act4(act, 16 + 4 * k));
            }
            let sumi = _mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi));
            let d = f16x8(blk);
            acc = _mm256_fmadd_ps(sumi, _mm256_mul_ps(d, _mm256_set1_ps(act.d)), acc);
            acc = if MIN {
                _mm256_fmadd_ps(f16x8(blk.add(2 * GROUP)), _mm256_set1_ps(act.s), acc)
            } else {
                _mm256_fmadd_ps(d, _mm256_set1_ps(-8.0 * act.s), acc)
            };
            blk = blk.add(stride);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
    }

    /// Q8_0: signed × signed, made unsigned × signed with the sign trick.
    #[inline(always)]
    unsafe fn group_q8_0<const VNNI: bool>(w: &[u8], a: &[ActBlock], out: &mut [f32; GROUP]) {
        let stride = Interleaved::stride(GgmlType::Q8_0);
        let quants_at = Interleaved::quants_at(GgmlType::Q8_0);
        assert!(w.len() >= a.len() * stride, "a group holds every block");
        let mut acc = _mm256_setzero_ps();
        let mut blk = w.as_ptr();
        for act in a {
            let q = blk.add(quants_at);
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for k in (0..8).step_by(2) {
                let w0 = _mm256_loadu_si256(q.add(32 * k) as *const __m256i);
                let w1 = _mm256_loadu_si256(q.add(32 * k + 32) as *const __m256i);
                let (x0, x1) = (act4(act, 4 * k), act4(act, 4 * k + 4));
                s0 = dot_acc::<VNNI>(s0, _mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0));
                s1 = dot_acc::<VNNI>(s1, _mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1));
            }
            let sumi = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
            let d = f16x8(blk);
            acc = _mm256_fmadd_ps(sumi, _mm256_mul_ps(d, _mm256_set1_ps(act.d)), acc);
            blk = blk.add(stride);
        }
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
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

    type Quantizer = fn(&[f32]) -> Vec<u8>;
    const TYPES: [(GgmlType, Quantizer); 3] = [
        (GgmlType::Q4_0, quant::quantize_q4_0),
        (GgmlType::Q4_1, quant::quantize_q4_1),
        (GgmlType::Q8_0, quant::quantize_q8_0),
    ];

    /// The SIMD kernels run the portable kernel's operations in the same order: the same bits,
    /// so miners and validators on different CPUs agree.
    #[test]
    fn simd_kernels_equal_the_portable_kernel_bit_for_bit() {
        let seed = 7;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (ty, quantize) in TYPES {
            for (rows, cols) in [(1usize, 32usize), (8, 64), (13, 576), (16, 1536)] {
                let m = QuantMatrix::new(ty, rows, cols, &quantize(&random(&mut rng, rows * cols)))
                    .unwrap();
                let Storage::Interleaved(p) = &m.storage else {
                    unreachable!()
                };
                let x = random(&mut rng, cols);
                let acts: Vec<ActBlock> = x.chunks_exact(QK).map(quantize_act_block).collect();
                for g in 0..rows.div_ceil(GROUP) {
                    let (mut slow, mut fast) = ([0f32; GROUP], [0f32; GROUP]);
                    group_dot_portable(ty, p.group(g), &acts, &mut slow);
                    group_kernel()(ty, p.group(g), &acts, &mut fast);
                    assert_eq!(
                        slow.map(f32::to_bits),
                        fast.map(f32::to_bits),
                        "{ty:?} {rows}x{cols} group {g} seed={seed}: {slow:?} vs {fast:?}"
                    );
                }
            }
        }
    }

    /// Several activation rows at once give each row exactly what it gets alone (validators
    /// replay many tokens in one pass and must see what decoding computed), on any number of
    /// threads.
    #[test]
    fn many_rows_and_any_thread_count_give_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let (rows, cols, n) = (37, 128, 5);
        for (ty, quantize) in TYPES {
            let m = QuantMatrix::new(ty, rows, cols, &quantize(&random(&mut rng, rows * cols)))
                .unwrap();
            let x = random(&mut rng, n * cols);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut all = vec![0f32; n * rows];
                    m.matmul(&x, &mut all).unwrap();
                    all
                })
            };
            let together = run(1);
            for t in 0..n {
                let mut alone = vec![0f32; rows];
                m.matmul(&x[t * cols..(t + 1) * cols], &mut alone).unwrap();
                assert_eq!(
                    alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    together[t * rows..(t + 1) * rows]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{ty:?} row {t}"
                );
            }
            assert_eq!(together, run(3), "{ty:?}: 1 vs 3 threads");
        }
    }

    /// Repacking changes the layout, never the values: bit-identical to GGML's dequantization.
    #[test]
    fn repacked_rows_dequantize_exactly_like_ggml() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (ty, quantize) in TYPES {
            // 13 rows: a whole group and a padded one.
            let (rows, cols) = (13, 96);
            let raw = quantize(&random(&mut rng, rows * cols));
            let mut expected = vec![0f32; rows * cols];
            quant::dequantize(ty, &raw, &mut expected).unwrap();
            let m = QuantMatrix::new(ty, rows, cols, &raw).unwrap();
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
        for (ty, quantize) in TYPES {
            let w = quantize(&random(&mut rng, rows * cols));
            let m = QuantMatrix::new(ty, rows, cols, &w).unwrap();
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
