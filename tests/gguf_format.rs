//! GGUF reader and writer through the public API: round trips, a file written by the Python
//! `gguf` package, and malformed inputs (which must give errors, never panics).

use std::path::PathBuf;

use cortensor::models::gguf::{GgufArray, GgufError, GgufFile, GgufValue, GgufValueType};
use cortensor::models::gguf_write::{GgufWriteError, GgufWriter};
use cortensor::models::quant::{
    dequantize, encode_float, quantize_q4_0, quantize_q4_1, quantize_q8_0, GgmlType,
};
use half::f16;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
}

/// Random K-quant blocks with finite f16 scales at the positions each layout uses.
fn kquant_bytes(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut bytes = vec![0u8; n_blocks * ty.block_bytes()];
    rng.fill(bytes.as_mut_slice());
    let scale_at: &[usize] = match ty {
        GgmlType::Q6_K => &[208],
        _ => &[0, 2],
    };
    for b in bytes.chunks_mut(ty.block_bytes()) {
        for &at in scale_at {
            b[at..at + 2].copy_from_slice(&f16::from_f32(rng.gen_range(0.0..0.05)).to_le_bytes());
        }
    }
    bytes
}

fn all_metadata() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("general.architecture", "llama".into()),
        ("t.u8", GgufValue::U8(255)),
        ("t.i8", GgufValue::I8(-128)),
        ("t.u16", GgufValue::U16(65535)),
        ("t.i16", GgufValue::I16(-32768)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-7)),
        ("t.i32_pos", GgufValue::I32(4096)),
        ("t.f32", GgufValue::F32(1e-5)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.str", "Grüße ☃".into()),
        ("t.u64", GgufValue::U64(1 << 40)),
        ("t.u64_small", GgufValue::U64(128256)),
        ("t.i64", GgufValue::I64(-(1 << 40))),
        ("t.f64", GgufValue::F64(500000.0)),
        ("t.empty_str", "".into()),
        ("a.u8", GgufArray::U8(vec![0, 1, 255]).into()),
        ("a.i8", GgufArray::I8(vec![-1, 2]).into()),
        ("a.u16", GgufArray::U16(vec![7]).into()),
        ("a.i16", GgufArray::I16(vec![-300, 300]).into()),
        ("a.u32", GgufArray::U32(vec![1, 2, 3]).into()),
        ("a.i32", GgufArray::I32(vec![1, -2, 3]).into()),
        ("a.f32", GgufArray::F32(vec![0.5, -1.5]).into()),
        ("a.bool", GgufArray::Bool(vec![true, false]).into()),
        (
            "a.str",
            GgufArray::String(vec!["<s>".into(), "".into(), "Ġhello".into()]).into(),
        ),
        ("a.u64", GgufArray::U64(vec![u64::MAX]).into()),
        ("a.i64", GgufArray::I64(vec![i64::MIN, 5]).into()),
        ("a.f64", GgufArray::F64(vec![0.25]).into()),
        ("a.empty", GgufArray::U32(vec![]).into()),
        (
            "a.nested",
            GgufArray::Array(vec![
                GgufArray::I32(vec![1, 2]),
                GgufArray::String(vec!["x".into()]),
                GgufArray::Array(vec![GgufArray::F32(vec![3.0])]),
            ])
            .into(),
        ),
    ]
}

/// (name, dims in ggml order, type, bytes) for one tensor of every supported type.
fn all_tensors() -> Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> {
    let f = floats(64, 7);
    vec![
        (
            "f32".into(),
            vec![4, 2],
            GgmlType::F32,
            encode_float(GgmlType::F32, &f[..8]).unwrap(),
        ),
        (
            "f16".into(),
            vec![3],
            GgmlType::F16,
            encode_float(GgmlType::F16, &f[..3]).unwrap(),
        ),
        (
            "bf16".into(),
            vec![5, 1, 1],
            GgmlType::BF16,
            encode_float(GgmlType::BF16, &f[..5]).unwrap(),
        ),
        (
            "q4_0".into(),
            vec![32, 2],
            GgmlType::Q4_0,
            quantize_q4_0(&f),
        ),
        ("q4_1".into(), vec![64], GgmlType::Q4_1, quantize_q4_1(&f)),
        (
            "q8_0".into(),
            vec![32, 1, 2],
            GgmlType::Q8_0,
            quantize_q8_0(&f),
        ),
        (
            "q4_k".into(),
            vec![256, 2],
            GgmlType::Q4_K,
            kquant_bytes(GgmlType::Q4_K, 2, 1),
        ),
        (
            "q5_k".into(),
            vec![256],
            GgmlType::Q5_K,
            kquant_bytes(GgmlType::Q5_K, 1, 2),
        ),
        (
            "q6_k".into(),
            vec![512, 1, 1, 1],
            GgmlType::Q6_K,
            kquant_bytes(GgmlType::Q6_K, 2, 3),
        ),
        // Last tensor is 32 bytes, so the file ends exactly at its data (no trailing padding).
        (
            "last".into(),
            vec![8],
            GgmlType::F32,
            encode_float(GgmlType::F32, &f[..8]).unwrap(),
        ),
    ]
}

fn full_writer(version: u32) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.set_version(version);
    for (k, v) in all_metadata() {
        w.add_metadata(k, v);
    }
    for (name, dims, ty, bytes) in all_tensors() {
        w.add_tensor(name, &dims, ty, bytes).unwrap();
    }
    w
}

fn check_full_file(g: &GgufFile, version: u32) {
    assert_eq!(g.version, version);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.data_offset % 32, 0);
    let meta = all_metadata();
    assert_eq!(g.metadata.len(), meta.len());
    for (k, v) in &meta {
        assert_eq!(g.get(k), Some(v), "{k}");
    }
    let tensors = all_tensors();
    assert_eq!(g.tensors.len(), tensors.len());
    for (info, (name, dims, ty, bytes)) in g.tensors.iter().zip(&tensors) {
        assert_eq!(&info.name, name);
        assert_eq!(&info.dims, dims);
        assert_eq!(info.ty, *ty);
        assert_eq!(info.offset % 32, 0);
        assert_eq!(g.tensor(name), Some(info));
        assert_eq!(g.tensor_data(info), bytes.as_slice(), "{name}");
        let n = info.n_elements() as usize;
        let mut expect = vec![0.0f32; n];
        dequantize(*ty, bytes, &mut expect).unwrap();
        let got = g.tensor_f32(name).unwrap();
        assert_eq!(got.len(), n);
        assert!(
            got.iter()
                .zip(&expect)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}"
        );
    }
    assert_eq!(g.tensor("q6_k").unwrap().shape(), vec![1, 1, 1, 512]);
}

#[test]
fn round_trip_v3_and_v2() {
    for version in [3, 2] {
        let bytes = full_writer(version).to_bytes();
        let g = GgufFile::from_bytes(bytes.clone()).unwrap();
        check_full_file(&g, version);
        let last = g.tensor("last").unwrap();
        assert_eq!(g.data_offset + last.offset + 32, bytes.len() as u64);
    }
}

#[test]
fn round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    full_writer(3).write(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    check_full_file(&g, 3);
    assert!(matches!(
        GgufFile::open(&dir.path().join("missing.gguf")),
        Err(GgufError::Io { .. })
    ));
}

#[test]
fn getters_accept_any_fitting_integer_type() {
    let g = GgufFile::from_bytes(full_writer(3).to_bytes()).unwrap();
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.get_u32("t.u8"), Some(255));
    assert_eq!(g.get_u32("t.i32_pos"), Some(4096));
    assert_eq!(g.get_u32("t.u64_small"), Some(128256));
    assert_eq!(g.get_u32("t.i32"), None, "negative");
    assert_eq!(g.get_u32("t.u64"), None, "too big");
    assert_eq!(g.get_u64("t.u64"), Some(1 << 40));
    assert_eq!(g.get_i64("t.i64"), Some(-(1 << 40)));
    assert_eq!(g.get_u32("t.str"), None, "not an integer");
    assert_eq!(g.get_u32("missing"), None);
    assert_eq!(g.get_f32("t.f32"), Some(1e-5));
    assert_eq!(g.get_f32("t.f64"), Some(500000.0));
    assert_eq!(g.get_bool("t.bool"), Some(true));
    assert_eq!(g.get_str("t.str"), Some("Grüße ☃"));
    assert_eq!(
        g.get_str_array("a.str").unwrap(),
        &["<s>".to_string(), "".into(), "Ġhello".into()]
    );
    assert_eq!(g.get_i32_array("a.i32"), Some(vec![1, -2, 3]));
    assert_eq!(g.get_i32_array("a.u8"), Some(vec![0, 1, 255]));
    assert_eq!(g.get_i32_array("a.u64"), None, "does not fit i32");
    assert_eq!(g.get_i32_array("a.empty"), Some(vec![]));
    assert_eq!(g.get_f32_array("a.f32"), Some(vec![0.5, -1.5]));
    assert_eq!(g.get_f32_array("a.f64"), Some(vec![0.25]));
    assert_eq!(
        g.get("a.nested").unwrap().value_type(),
        GgufValueType::Array
    );
    assert!(matches!(
        g.tensor_f32("nope"),
        Err(GgufError::TensorNotFound(n)) if n == "nope"
    ));
}

#[test]
fn custom_alignment() {
    for align in [1u32, 8, 64, 256] {
        let mut w = GgufWriter::new();
        w.add_metadata("general.alignment", GgufValue::U32(align));
        w.add_tensor("a", &[3], GgmlType::F32, vec![1; 12]).unwrap();
        w.add_tensor("b", &[5], GgmlType::F16, vec![2; 10]).unwrap();
        assert_eq!(w.alignment(), align as u64);
        let g = GgufFile::from_bytes(w.to_bytes()).unwrap();
        assert_eq!(g.alignment, align as u64);
        assert_eq!(g.data_offset % align as u64, 0);
        let b = g.tensor("b").unwrap();
        assert_eq!(b.offset % align as u64, 0);
        assert_eq!(g.tensor_data(b), &[2; 10]);
    }
    for bad in [
        GgufValue::U32(0),
        GgufValue::U32(48),
        GgufValue::I32(-32),
        "32".into(),
    ] {
        let mut w = GgufWriter::new();
        w.add_metadata("general.alignment", bad.clone());
        let e = GgufFile::from_bytes(w.to_bytes()).unwrap_err();
        assert!(matches!(e, GgufError::BadAlignment(_)), "{bad:?}: {e}");
    }
}

#[test]
fn reads_file_written_by_python_gguf() {
    // Stored as hex text (64 digits a line) so no binary GGUF sits in the repository.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/python_writer.gguf.hex");
    let hex: String = std::fs::read_to_string(&path)
        .unwrap()
        .split_whitespace()
        .collect();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let g = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.get("test.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(g.get("test.i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(g.get("test.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(g.get("test.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(g.get_u32("test.u32"), Some(4_000_000_000));
    assert_eq!(g.get_i64("test.i32"), Some(-2_000_000_000));
    assert_eq!(g.get_f32("test.f32"), Some(0.15625));
    assert_eq!(g.get_u64("test.u64"), Some(1 << 40));
    assert_eq!(g.get_i64("test.i64"), Some(-(1 << 40)));
    assert_eq!(
        g.get("test.f64"),
        Some(&GgufValue::F64(std::f64::consts::E))
    );
    assert_eq!(g.get_bool("test.bool"), Some(true));
    assert_eq!(g.get_str("test.str"), Some("héllo ☃"));
    assert_eq!(
        g.get_str_array("test.str_arr").unwrap(),
        &["a".to_string(), "bc".into(), "".into()]
    );
    assert_eq!(g.get_i32_array("test.i32_arr"), Some(vec![1, -2, 3]));
    assert_eq!(g.get_f32_array("test.f32_arr"), Some(vec![0.5, -1.25]));
    assert_eq!(
        g.get("test.nested").and_then(|v| v.as_array()),
        Some(&GgufArray::Array(vec![
            GgufArray::I32(vec![1, 2]),
            GgufArray::I32(vec![3])
        ]))
    );

    // numpy shape (2, 3) is stored in ggml order [3, 2].
    let t = g.tensor("t.f32").unwrap();
    assert_eq!((t.dims.as_slice(), t.ty), (&[3u64, 2][..], GgmlType::F32));
    assert_eq!(t.shape(), vec![2, 3]);
    assert_eq!(
        g.tensor_f32("t.f32").unwrap(),
        vec![-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]
    );
    let t = g.tensor("t.f16").unwrap();
    assert_eq!((t.dims.as_slice(), t.ty), (&[4u64, 1][..], GgmlType::F16));
    let want: Vec<f32> = (0..4)
        .map(|i| f16::from_f32(i as f32 / 3.0).to_f32())
        .collect();
    assert_eq!(g.tensor_f32("t.f16").unwrap(), want);
    let t = g.tensor("t.q8_0").unwrap();
    assert_eq!((t.dims.as_slice(), t.ty), (&[32u64, 2][..], GgmlType::Q8_0));
    // Same input through our quantizer gives the same bytes as gguf-py's.
    let x: Vec<f32> = (0..64).map(|i| -1.0 + 2.0 * i as f32 / 63.0).collect();
    let ours = quantize_q8_0(&x);
    let got = g.tensor_f32("t.q8_0").unwrap();
    for (a, b) in got.iter().zip(&x) {
        assert!((a - b).abs() < 0.01, "{a} vs {b}");
    }
    assert_eq!(ours.len(), g.tensor_data(t).len());
}

#[test]
fn writer_rejects_inconsistent_tensors() {
    let mut w = GgufWriter::new();
    assert!(matches!(
        w.add_tensor("a", &[3], GgmlType::F32, vec![0; 11]),
        Err(GgufWriteError::BadTensor { .. })
    ));
    assert!(w
        .add_tensor("a", &[16], GgmlType::Q8_0, vec![0; 17])
        .is_err());
    assert!(w.add_tensor("a", &[0], GgmlType::F32, vec![]).is_err());
    assert!(w
        .add_tensor("a", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])
        .is_err());
    w.add_tensor("a", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    assert!(matches!(
        w.add_tensor("a", &[1], GgmlType::F32, vec![0; 4]),
        Err(GgufWriteError::DuplicateTensor(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Malformed inputs, built byte by byte so every field can be made wrong.

#[derive(Default)]
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw::default();
        r.0.extend_from_slice(b"GGUF");
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for d in dims {
            self.u64(*d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pad to 32 and append `n` data bytes.
    fn data(&mut self, n: usize) -> Vec<u8> {
        let mut b = self.0.clone();
        b.resize(b.len().next_multiple_of(32) + n, 0);
        b
    }
    fn parse(&self) -> GgufError {
        GgufFile::from_bytes(self.0.clone()).unwrap_err()
    }
}

fn err_of(bytes: Vec<u8>) -> GgufError {
    GgufFile::from_bytes(bytes).unwrap_err()
}

#[test]
fn raw_builder_makes_valid_files() {
    // Sanity check of the helper, so the error tests below fail for the intended reason.
    let mut r = Raw::header(3, 1, 1);
    r.str("k").u32(4).u32(7);
    r.tensor("t", &[2, 3], 0, 0);
    let g = GgufFile::from_bytes(r.data(24)).unwrap();
    assert_eq!(g.get_u32("k"), Some(7));
    assert_eq!(g.tensor("t").unwrap().dims, vec![2, 3]);
}

#[test]
fn truncated_at_every_offset_is_an_error() {
    let bytes = full_writer(3).to_bytes();
    assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
    for len in 0..bytes.len() {
        let r = GgufFile::from_bytes(bytes[..len].to_vec());
        assert!(r.is_err(), "truncated to {len} of {} parsed", bytes.len());
    }
    let e = err_of(bytes[..20].to_vec());
    assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
}

#[test]
fn wrong_magic_says_what_was_found() {
    let mut bytes = full_writer(3).to_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let e = err_of(bytes);
    assert!(matches!(e, GgufError::BadMagic { .. }));
    assert!(e.to_string().contains("GGML"), "{e}");
    assert!(matches!(err_of(b"PK".to_vec()), GgufError::BadMagic { .. }));
    assert!(matches!(
        err_of(b"GG".to_vec()),
        GgufError::Truncated { .. }
    ));
}

#[test]
fn unsupported_versions() {
    let e = Raw::header(1, 0, 0).parse();
    assert!(matches!(
        e,
        GgufError::UnsupportedVersion { version: 1, .. }
    ));
    assert!(e.to_string().contains("v1"), "{e}");
    let e = Raw::header(3u32.swap_bytes(), 0, 0).parse();
    assert!(e.to_string().contains("big-endian"), "{e}");
    assert!(matches!(
        Raw::header(4, 0, 0).parse(),
        GgufError::UnsupportedVersion { .. }
    ));
    // An empty v2/v3 file is fine.
    assert!(GgufFile::from_bytes(Raw::header(2, 0, 0).0).is_ok());
}

#[test]
fn huge_string_length() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 60).0.extend_from_slice(b"abcdefghijklmnop");
    let e = r.parse();
    assert!(
        matches!(e, GgufError::LengthTooLarge { len, .. } if len == 1 << 60),
        "{e}"
    );

    let mut r = Raw::header(3, 0, 1);
    r.str("key")
        .u32(8)
        .u64(u64::MAX)
        .0
        .extend_from_slice(&[0; 16]);
    assert!(matches!(r.parse(), GgufError::LengthTooLarge { .. }));
}

#[test]
fn huge_array_length() {
    for (elem_ty, count) in [(0u32, 1u64 << 62), (8, 100), (9, 1 << 40), (12, u64::MAX)] {
        let mut r = Raw::header(3, 0, 1);
        r.str("arr")
            .u32(9)
            .u32(elem_ty)
            .u64(count)
            .0
            .extend_from_slice(&[0; 64]);
        let e = r.parse();
        assert!(
            matches!(e, GgufError::LengthTooLarge { .. }),
            "{elem_ty}: {e}"
        );
        assert!(e.to_string().contains("arr"), "{e}");
    }
}

#[test]
fn huge_counts() {
    let e = Raw::header(3, 1 << 50, 0).parse();
    assert!(
        matches!(
            e,
            GgufError::CountTooLarge {
                what: "tensor count",
                ..
            }
        ),
        "{e}"
    );
    let e = Raw::header(3, 0, u64::MAX).parse();
    assert!(
        matches!(
            e,
            GgufError::CountTooLarge {
                what: "metadata count",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn absurd_dims() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("big", &[1 << 40, 1 << 40], 0, 0);
    let e = r.parse();
    assert!(
        matches!(e, GgufError::ShapeOverflow { ref tensor, .. } if tensor == "big"),
        "{e}"
    );

    // The element count fits in u64 but the byte size does not.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("big", &[1 << 32, 1 << 31], 0, 0);
    assert!(matches!(r.parse(), GgufError::ShapeOverflow { .. }));

    // Representable, but far beyond the file.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("big", &[1 << 20, 1 << 20], 0, 0);
    let e = err_of(r.data(64));
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");

    let mut r = Raw::header(3, 1, 0);
    r.tensor("five", &[1, 1, 1, 1, 1], 0, 0);
    assert!(matches!(
        r.parse(),
        GgufError::TooManyDims { n_dims: 5, .. }
    ));

    let mut r = Raw::header(3, 1, 0);
    r.str("many").u32(u32::MAX);
    assert!(matches!(err_of(r.data(64)), GgufError::TooManyDims { .. }));

    let mut r = Raw::header(3, 1, 0);
    r.tensor("zero", &[4, 0], 0, 0);
    assert!(matches!(err_of(r.data(64)), GgufError::ZeroDim { .. }));
}

#[test]
fn unknown_tensor_type_names_id_and_tensor() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("blk.0.w", &[32], 6, 0);
    let e = err_of(r.data(64));
    let msg = e.to_string();
    assert!(
        msg.contains("blk.0.w") && msg.contains('6') && msg.contains("Q5_0"),
        "{msg}"
    );

    let mut r = Raw::header(3, 1, 0);
    r.tensor("x", &[32], 999, 0);
    let e = err_of(r.data(64));
    assert!(
        matches!(e, GgufError::UnknownTensorType { type_id: 999, .. }),
        "{e}"
    );
}

#[test]
fn tensor_data_placement_errors() {
    // Offset past the data section.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[4], 0, 64);
    let e = err_of(r.data(32));
    assert!(
        matches!(e, GgufError::TensorOutOfBounds { offset: 64, .. }),
        "{e}"
    );

    // Offset near u64::MAX must not overflow.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[4], 0, u64::MAX - 31);
    assert!(matches!(
        err_of(r.data(32)),
        GgufError::TensorOutOfBounds { .. }
    ));

    // Misaligned.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[4], 0, 4);
    assert!(matches!(
        err_of(r.data(64)),
        GgufError::MisalignedTensor { offset: 4, .. }
    ));

    // Header ends, but the file stops before the padded data section starts.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[4], 0, 0);
    let e = r.parse();
    assert!(
        matches!(
            e,
            GgufError::DataOffsetOutOfBounds { .. } | GgufError::TensorOutOfBounds { .. }
        ),
        "{e}"
    );

    // Not a whole number of blocks per row.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("q", &[16, 2], GgmlType::Q8_0.id(), 0);
    assert!(matches!(
        err_of(r.data(64)),
        GgufError::NotBlockMultiple { row: 16, .. }
    ));
}

#[test]
fn duplicates() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[4], 0, 0).tensor("t", &[4], 0, 32);
    assert!(matches!(err_of(r.data(64)), GgufError::DuplicateTensor(n) if n == "t"));

    let mut r = Raw::header(3, 0, 2);
    r.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
    assert!(matches!(r.parse(), GgufError::DuplicateKey(k) if k == "k"));
}

#[test]
fn bad_metadata_encodings() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u32(0);
    assert!(matches!(
        r.parse(),
        GgufError::UnknownValueType { type_id: 13, .. }
    ));

    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(9).u32(77).u64(0);
    assert!(matches!(
        r.parse(),
        GgufError::UnknownValueType { type_id: 77, .. }
    ));

    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(2).0.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(r.parse(), GgufError::InvalidUtf8 { .. }));

    // Arrays of arrays of ... deeper than the limit.
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..64 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    let e = r.parse();
    assert!(matches!(e, GgufError::ArrayTooDeep { .. }), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte corruption anywhere in a valid file: any Ok or Err is fine, panics are not,
    /// and whatever parses must serve its tensors without panicking.
    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = full_writer(3).to_bytes();
        // Concentrate half the edits on the header, where the structure is.
        for (i, (at, v)) in edits.iter().enumerate() {
            let span = if i % 2 == 0 { 600.min(bytes.len()) } else { bytes.len() };
            let at = at.index(span);
            bytes[at] = *v;
        }
        if do_cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(g) = GgufFile::from_bytes(bytes) {
            for t in &g.tensors {
                prop_assert_eq!(g.tensor_data(t).len() as u64, t.n_bytes());
                let _ = g.tensor_f32(&t.name);
            }
        }
    }
}
