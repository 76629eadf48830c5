//! Dequantization checked against values computed independently by the Python `gguf` package
//! (see `scripts/make_quant_fixtures.py`), plus round-trip bounds for the reference quantizers.

use std::path::PathBuf;

use cortensor::models::quant::{
    dequantize, encode_float, quantize_q4_0, quantize_q4_1, quantize_q8_0, GgmlType, QuantError,
};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Fixture {
    ty: GgmlType,
    bytes: Vec<u8>,
    values: Vec<f32>,
    input: Option<Vec<f32>>,
}

fn fixture(name: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quant")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["type"], name);
    assert!(doc["generator"]
        .as_str()
        .unwrap()
        .starts_with("gguf==0.17.1"));
    let ty = GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap();
    // JSON numbers are the f32 values widened to f64, so narrowing back is exact.
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let values = floats(&doc["values"]);
    assert_eq!(values.len() as u64, doc["n_elems"].as_u64().unwrap());
    Fixture {
        ty,
        bytes: hex::decode(doc["bytes_hex"].as_str().unwrap()).unwrap(),
        values,
        input: doc.get("input").map(floats),
    }
}

fn dequant(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    dequantize(ty, bytes, &mut out).unwrap();
    out
}

#[test]
fn float_types_match_gguf_python_bit_exact() {
    for name in ["F32", "F16", "BF16"] {
        let f = fixture(name);
        let got = dequant(f.ty, &f.bytes, f.values.len());
        for (i, (g, e)) in got.iter().zip(&f.values).enumerate() {
            // Widening conversions are exact, so the bits must match (signed zero, subnormals).
            assert_eq!(g.to_bits(), e.to_bits(), "{name}[{i}]: {g} vs {e}");
        }
    }
}

#[test]
fn quant_types_match_gguf_python() {
    for name in ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"] {
        let f = fixture(name);
        assert_eq!(f.values.len() % f.ty.block_elems(), 0);
        let got = dequant(f.ty, &f.bytes, f.values.len());
        let mut max_rel = 0.0f64;
        for (i, (g, e)) in got.iter().zip(&f.values).enumerate() {
            // Both sides do the same single-rounded f32 operations in the same order (numpy keeps
            // f32 throughout, Rust never fuses into FMA), so we expect equality. The 1e-6 relative
            // slack only absorbs a possible different association in numpy's vectorised code; it
            // is orders of magnitude below one quantization step, so any real layout or
            // scale-unpacking bug still fails.
            let diff = (*g as f64 - *e as f64).abs();
            let tol = 1e-6 * (e.abs() as f64).max(f32::MIN_POSITIVE as f64);
            assert!(diff <= tol, "{name}[{i}]: got {g}, gguf-py {e}");
            max_rel = max_rel.max(diff / (e.abs() as f64).max(1e-30));
        }
        eprintln!(
            "{name}: {} values, max relative diff {max_rel:e}",
            got.len()
        );
    }
}

#[test]
fn quantizers_match_gguf_python_bytes() {
    // gguf-py's Q8_0 and Q4_1 quantizers reproduce ggml's reference bit for bit; its Q4_0 one
    // uses float64 intermediates, which can only differ from ggml's f32 at exact rounding ties
    // (none occur in this fixture).
    for (name, q) in [
        ("Q8_0", quantize_q8_0 as fn(&[f32]) -> Vec<u8>),
        ("Q4_1", quantize_q4_1),
        ("Q4_0", quantize_q4_0),
    ] {
        let f = fixture(name);
        let input = f.input.unwrap();
        assert_eq!(hex::encode(q(&input)), hex::encode(&f.bytes), "{name}");
    }
    let f = fixture("BF16");
    assert_eq!(
        encode_float(GgmlType::BF16, &f.input.unwrap()).unwrap(),
        f.bytes
    );
}

fn random_blocks(rng: &mut ChaCha8Rng, n_blocks: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(n_blocks * 32);
    for b in 0..n_blocks {
        let scale = 10f32.powf(rng.gen_range(-4.0..2.0));
        for _ in 0..32 {
            // Some blocks all non-negative, to exercise Q4_1's minimum and Q4_0's sign choice.
            let v: f32 = rng.gen_range(-1.0..1.0) * scale;
            x.push(if b % 3 == 0 { v.abs() } else { v });
        }
    }
    x
}

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

#[test]
fn q8_0_round_trip_within_half_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = random_blocks(&mut rng, 64);
    let y = dequant(GgmlType::Q8_0, &quantize_q8_0(&x), x.len());
    for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        // Half a step from rounding, plus the stored scale's f16 rounding times the largest |q|.
        let bound = d / 2.0 + 127.0 * (d - f16_round(d)).abs() + 1e-6 * amax;
        for (a, b) in xb.iter().zip(yb) {
            assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
        }
    }
}

#[test]
fn q4_0_round_trip_within_half_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = random_blocks(&mut rng, 64);
    let y = dequant(GgmlType::Q4_0, &quantize_q4_0(&x), x.len());
    for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
        let max = xb
            .iter()
            .copied()
            .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let ds = (d - f16_round(d)).abs();
        for (a, b) in xb.iter().zip(yb) {
            // Levels are -8..=7 steps of d; a value on the opposite side of `max` may need +8,
            // which ggml clips to 7: that one case may be off by a full step.
            let clipped = a / d > 7.5;
            let step = if clipped { 1.0 } else { 0.5 };
            let bound = step * d.abs() + 8.0 * ds + 1e-6 * max.abs();
            assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
        }
    }
}

#[test]
fn q4_1_round_trip_within_half_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random_blocks(&mut rng, 64);
    let y = dequant(GgmlType::Q4_1, &quantize_q4_1(&x), x.len());
    for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
        let min = xb.iter().copied().fold(f32::MAX, f32::min);
        let max = xb.iter().copied().fold(-f32::MAX, f32::max);
        let d = (max - min) / 15.0;
        // Half a step, the f16 rounding of d (times up to 15 levels) and of the stored minimum.
        let bound = d / 2.0
            + 15.0 * (d - f16_round(d)).abs()
            + (min - f16_round(min)).abs()
            + 1e-6 * max.abs().max(min.abs());
        for (a, b) in xb.iter().zip(yb) {
            assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
        }
    }
}

#[test]
fn zero_blocks_quantize_to_zero() {
    let x = vec![0.0f32; 64];
    for (ty, bytes) in [
        (GgmlType::Q8_0, quantize_q8_0(&x)),
        (GgmlType::Q4_0, quantize_q4_0(&x)),
        (GgmlType::Q4_1, quantize_q4_1(&x)),
    ] {
        assert_eq!(bytes.len(), ty.row_bytes(64).unwrap());
        assert!(dequant(ty, &bytes, 64).iter().all(|v| *v == 0.0), "{ty}");
    }
}

#[test]
fn type_table() {
    let expect = [
        (GgmlType::F32, 0, "F32", 1, 4),
        (GgmlType::F16, 1, "F16", 1, 2),
        (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
        (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
        (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
        (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
        (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
        (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
        (GgmlType::BF16, 30, "BF16", 1, 2),
    ];
    for (ty, id, name, be, bb) in expect {
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!(ty.id(), id);
        assert_eq!(ty.name(), name);
        assert_eq!(ty.block_elems(), be);
        assert_eq!(ty.block_bytes(), bb);
        assert_eq!(ty.row_bytes(be * 3).unwrap(), bb * 3);
    }
    for id in [4, 5, 6, 7, 9, 10, 11, 15, 29, 31, 1000] {
        assert_eq!(GgmlType::from_id(id), None, "{id}");
    }
}

#[test]
fn size_errors_name_type_and_sizes() {
    let e = GgmlType::Q4_K.row_bytes(100).unwrap_err();
    assert!(matches!(e, QuantError::NotBlockMultiple { .. }));
    assert!(e.to_string().contains("Q4_K") && e.to_string().contains("100"));

    let mut out = vec![0.0; 32];
    let e = dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out).unwrap_err();
    assert_eq!(
        e,
        QuantError::ByteLength {
            ty: "Q8_0",
            n_elems: 32,
            expected: 34,
            actual: 33
        }
    );
    let mut out = vec![0.0; 31];
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], &mut out).is_err());
    let mut out = vec![0.0; 1];
    assert!(dequantize(GgmlType::F32, &[0u8; 3], &mut out).is_err());
}

#[test]
fn large_tensors_dequantize_like_block_by_block() {
    // Above the parallel threshold the work is split across threads; the result must be the same
    // as dequantizing each block on its own.
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let ty = GgmlType::Q4_K;
    let n_blocks = (1 << 20) / 256 + 3;
    let mut bytes = vec![0u8; n_blocks * ty.block_bytes()];
    rng.fill(bytes.as_mut_slice());
    for b in bytes.chunks_mut(ty.block_bytes()) {
        // Finite scales, so the comparison below is not about NaN payloads.
        b[0..2].copy_from_slice(&f16::from_f32(rng.gen_range(-0.1..0.1)).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(rng.gen_range(0.0..0.1)).to_le_bytes());
    }
    let all = dequant(ty, &bytes, n_blocks * 256);
    for (i, b) in bytes.chunks(ty.block_bytes()).enumerate() {
        let one = dequant(ty, b, 256);
        assert_eq!(&all[i * 256..(i + 1) * 256], one.as_slice(), "block {i}");
    }
}
