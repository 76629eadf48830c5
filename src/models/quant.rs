//! GGML tensor types and their reference (de)quantization.
//!
//! The dequantizers follow ggml's `ggml-quants.c` (`dequantize_row_q4_0`, `_q4_1`, `_q8_0`,
//! `_q4_K`, `_q5_K`, `_q6_K`) operation for operation, so results are bit-identical to ggml's
//! scalar reference: every product is a single rounded `f32` multiply in the same order, and Rust
//! never contracts `a * b + c` into an FMA. The quantizers mirror `quantize_row_*_ref`, which is
//! what test fixture generators need to write small quantized models.

use half::{bf16, f16};
use rayon::prelude::*;
use thiserror::Error;

/// Elements per block of the K-quants (`QK_K` in ggml).
pub const QK_K: usize = 256;
/// Elements per block of Q4_0, Q4_1 and Q8_0 (`QK4_0`, `QK4_1`, `QK8_0` in ggml).
pub const QK32: usize = 32;

/// A tensor element type this crate can read, with ggml's numeric type id.
// Variant names follow ggml's type names (Q4_K, ...), which everyone searches for.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// 32-element blocks: f16 scale + 4-bit values offset by 8.
    Q4_0,
    /// 32-element blocks: f16 scale and minimum + 4-bit values.
    Q4_1,
    /// 32-element blocks: f16 scale + signed 8-bit values.
    Q8_0,
    /// 256-element super-blocks of eight 32-element sub-blocks, 6-bit scales/mins, 4-bit values.
    Q4_K,
    /// Like Q4_K with a fifth high bit per value.
    Q5_K,
    /// 256-element super-blocks of sixteen 16-element sub-blocks, 8-bit scales, 6-bit values.
    Q6_K,
    /// bfloat16: the upper half of an f32.
    BF16,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 9] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// The type for a ggml type id, or `None` if the id is unknown or unsupported here.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's numeric type id (as stored in GGUF tensor infos).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name for the type, e.g. `"Q4_K"`.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Elements per block: 1 for float types, 32 for Q4_0/Q4_1/Q8_0, 256 for K-quants.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block (`sizeof(block_*)` in ggml).
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// Whether the type is a plain float format (block of one element).
    pub fn is_float(self) -> bool {
        self.block_elems() == 1
    }

    /// Bytes taken by `n_elems` elements; an error if `n_elems` is not a whole number of blocks.
    pub fn row_bytes(self, n_elems: usize) -> Result<usize, QuantError> {
        let be = self.block_elems();
        if !n_elems.is_multiple_of(be) {
            return Err(QuantError::NotBlockMultiple {
                ty: self.name(),
                n_elems,
                block_elems: be,
            });
        }
        (n_elems / be)
            .checked_mul(self.block_bytes())
            .ok_or(QuantError::Overflow {
                ty: self.name(),
                n_elems,
            })
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// ggml's name for any type id, supported here or not, so error messages can say e.g.
/// "type 6 (Q5_0)". `None` for ids ggml never assigned or has since removed.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Errors from (de)quantization size checks.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QuantError {
    /// The element count is not a whole number of blocks.
    #[error("{ty}: {n_elems} elements is not a multiple of the block size {block_elems}")]
    NotBlockMultiple {
        ty: &'static str,
        n_elems: usize,
        block_elems: usize,
    },
    /// The byte buffer does not hold exactly the requested number of elements.
    #[error("{ty}: {n_elems} elements need {expected} bytes, got {actual}")]
    ByteLength {
        ty: &'static str,
        n_elems: usize,
        expected: usize,
        actual: usize,
    },
    /// The byte size of the tensor does not fit in `usize`.
    #[error("{ty}: byte size of {n_elems} elements overflows")]
    Overflow { ty: &'static str, n_elems: usize },
}

/// Dequantize `bytes` of type `ty` into `out` (`out.len()` elements), exactly as ggml's reference
/// `dequantize_row_*` does. Errors if `out.len()` is not a whole number of blocks or `bytes` is not
/// exactly the size of `out.len()` elements.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let expected = ty.row_bytes(out.len())?;
    if bytes.len() != expected {
        return Err(QuantError::ByteLength {
            ty: ty.name(),
            n_elems: out.len(),
            expected,
            actual: bytes.len(),
        });
    }
    let be = ty.block_elems();
    let bb = ty.block_bytes();
    // Blocks are independent, so big tensors are split over threads in whole-block chunks; the
    // result is identical to the sequential loop.
    const PAR_MIN_ELEMS: usize = 1 << 20;
    const CHUNK_BLOCKS: usize = 4096;
    if out.len() >= PAR_MIN_ELEMS {
        let chunk_elems = CHUNK_BLOCKS * be;
        let chunk_bytes = CHUNK_BLOCKS * bb;
        out.par_chunks_mut(chunk_elems)
            .zip(bytes.par_chunks(chunk_bytes))
            .for_each(|(o, b)| dequantize_blocks(ty, b, o));
    } else {
        dequantize_blocks(ty, bytes, out);
    }
    Ok(())
}

/// Dequantize whole blocks; callers guarantee `bytes`/`out` hold the same number of blocks.
/// `chunks_exact` keeps every access in bounds even if they did not.
fn dequantize_blocks(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let be = ty.block_elems();
    let bb = ty.block_bytes();
    let blocks = bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `block_q4_0 { f16 d; u8 qs[16]; }`: low nibbles are elements 0..16, high nibbles 16..32.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for (j, &q) in qs.iter().enumerate() {
        let x0 = (q & 0x0F) as i32 - 8;
        let x1 = (q >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16]; }`: `y = q * d + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for (j, &q) in qs.iter().enumerate() {
        let x0 = (q & 0x0F) as f32;
        let x1 = (q >> 4) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// `block_q8_0 { f16 d; i8 qs[32]; }`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = (q as i8) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) packed in 12 bytes.
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }`.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Each 64-element group uses 32 bytes of qs: low nibbles, then high nibbles.
    for (g, (q, yg)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = get_scale_min_k4(2 * g, scales);
        let (sc2, m2) = get_scale_min_k4(2 * g + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = min * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = min * m2 as f32;
        let (lo, hi) = yg.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }`.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (g, (ql, yg)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = get_scale_min_k4(2 * g, scales);
        let (sc2, m2) = get_scale_min_k4(2 * g + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = min * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = min * m2 as f32;
        // Group g takes its high bits from bits 2g and 2g+1 of qh.
        let u1 = 1u8 << (2 * g);
        let u2 = 2u8 << (2 * g);
        let (lo, hi) = yg.split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            hi[l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    // Two 128-element halves, each with 64 bytes of ql, 32 of qh and 8 scales.
    for n in 0..2 {
        let ql = &ql_all[64 * n..64 * n + 64];
        let qh = &qh_all[32 * n..32 * n + 32];
        let sc = &sc_all[8 * n..8 * n + 8];
        let yh = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            // ggml evaluates `d * sc[is] * q` left to right: (d * sc) * q.
            yh[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            yh[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            yh[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            yh[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

fn assert_blocks(x: &[f32], ty: &str) {
    assert!(
        x.len().is_multiple_of(QK32),
        "{ty} quantization needs a multiple of {QK32} values, got {}",
        x.len()
    );
}

/// ggml's `quantize_row_q8_0_ref`: per block `d = amax / 127`, `q = round(x / d)`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 (a caller bug, not a data error).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert_blocks(x, "Q8_0");
    let mut out = Vec::with_capacity(x.len() / QK32 * GgmlType::Q8_0.block_bytes());
    for blk in x.chunks_exact(QK32) {
        let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        // `f32::round` rounds half away from zero, like C's `roundf`.
        out.extend(blk.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    out
}

/// ggml's `quantize_row_q4_0_ref`: `d = max / -8` where `max` is the value of largest magnitude,
/// `q = min(15, trunc(x / d + 8.5))`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    assert_blocks(x, "Q4_0");
    let mut out = Vec::with_capacity(x.len() / QK32 * GgmlType::Q4_0.block_bytes());
    for blk in x.chunks_exact(QK32) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in blk {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        // `as i8` truncates toward zero like ggml's `(int8_t)` cast (and saturates instead of UB).
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..QK32 / 2 {
            out.push(q(blk[j]) | (q(blk[j + QK32 / 2]) << 4));
        }
    }
    out
}

/// ggml's `quantize_row_q4_1_ref`: `d = (max - min) / 15`, `m = min`,
/// `q = min(15, trunc((x - min) / d + 0.5))`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32.
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    assert_blocks(x, "Q4_1");
    let mut out = Vec::with_capacity(x.len() / QK32 * GgmlType::Q4_1.block_bytes());
    for blk in x.chunks_exact(QK32) {
        let mut min = f32::MAX;
        let mut max = -f32::MAX;
        for &v in blk {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
        for j in 0..QK32 / 2 {
            out.push(q(blk[j]) | (q(blk[j + QK32 / 2]) << 4));
        }
    }
    out
}

/// Encode f32 values as little-endian bytes of a float type (F32, F16 or BF16, rounding to
/// nearest even); `None` for quantized types. Convenience for writers.
pub fn encode_float(ty: GgmlType, x: &[f32]) -> Option<Vec<u8>> {
    Some(match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => return None,
    })
}
