//! Hugging Face model directories through the public API: sharded round trips in every dtype,
//! index handling, and malformed headers (errors, never panics).

use std::path::Path;

use cortensor::models::safetensors::{
    write_safetensors, HfModelDir, SafetensorsDtype, SafetensorsError,
};
use half::{bf16, f16};
use proptest::prelude::*;

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.7311).sin() * 3.0)
        .collect()
}

fn shard_a() -> Tensors {
    vec![
        (
            "model.embed_tokens.weight".into(),
            vec![4, 3],
            values(12, 1.0),
        ),
        ("model.norm.weight".into(), vec![3], values(3, 2.0)),
        ("scalar".into(), vec![], vec![0.5]),
    ]
}

fn shard_b() -> Tensors {
    vec![
        ("lm_head.weight".into(), vec![2, 2, 2], values(8, 3.0)),
        ("empty".into(), vec![0, 5], vec![]),
    ]
}

fn write_config(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":3,"rms_norm_eps":1e-5}"#,
    )
    .unwrap();
}

/// A two-shard directory: shard A in `dtype_a`, shard B in `dtype_b`.
fn model_dir(dtype_a: &str, dtype_b: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    write_safetensors(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &shard_a(),
        dtype_a,
    )
    .unwrap();
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &shard_b(),
        dtype_b,
    )
    .unwrap();
    dir
}

fn rounded(v: &[f32], dtype: &str) -> Vec<f32> {
    v.iter()
        .map(|x| match dtype {
            "F16" => f16::from_f32(*x).to_f32(),
            "BF16" => bf16::from_f32(*x).to_f32(),
            _ => *x,
        })
        .collect()
}

#[test]
fn round_trip_every_dtype_over_two_shards() {
    for (da, db) in [("F32", "F16"), ("BF16", "F32"), ("F16", "BF16")] {
        let dir = model_dir(da, db);
        let m = HfModelDir::open(dir.path()).unwrap();
        assert_eq!(m.config()["hidden_size"], 3);
        assert_eq!(m.shard_paths().len(), 2);
        let mut names = m.names();
        names.sort();
        assert_eq!(
            names,
            vec![
                "empty",
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.norm.weight",
                "scalar"
            ]
        );
        for (tensors, dtype) in [(shard_a(), da), (shard_b(), db)] {
            for (name, shape, vals) in tensors {
                assert_eq!(m.shape(&name), Some(shape.as_slice()));
                assert_eq!(m.dtype(&name), SafetensorsDtype::parse(dtype));
                let (s, v) = m.tensor_f32(&name).unwrap();
                assert_eq!(s, shape);
                let want = rounded(&vals, dtype);
                assert_eq!(v.len(), want.len());
                assert!(
                    v.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} {dtype}"
                );
            }
        }
        assert!(matches!(
            m.tensor_f32("nope"),
            Err(SafetensorsError::TensorNotFound(_))
        ));
    }
}

#[test]
fn index_selects_shards() {
    let dir = model_dir("F32", "F32");
    let mut map = serde_json::Map::new();
    for (n, _, _) in shard_a() {
        map.insert(n, "model-00001-of-00002.safetensors".into());
    }
    for (n, _, _) in shard_b() {
        map.insert(n, "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 100}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    // A stray file the index does not mention is ignored (it would otherwise clash on names).
    write_safetensors(&dir.path().join("stray.safetensors"), &shard_a(), "F32").unwrap();
    let m = HfModelDir::open(dir.path()).unwrap();
    assert_eq!(m.names().len(), 5);
    assert_eq!(m.shard_paths().len(), 2);

    // An index entry pointing at the wrong shard.
    let mut bad = map.clone();
    bad.insert(
        "lm_head.weight".into(),
        "model-00001-of-00002.safetensors".into(),
    );
    let index = serde_json::json!({"weight_map": bad});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let e = HfModelDir::open(dir.path()).unwrap_err();
    assert!(matches!(e, SafetensorsError::BadIndex { .. }), "{e}");

    // Shard names must stay inside the directory.
    let index = serde_json::json!({"weight_map": {"x": "../model-00001-of-00002.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let e = HfModelDir::open(dir.path()).unwrap_err();
    assert!(matches!(e, SafetensorsError::BadIndex { .. }), "{e}");

    std::fs::write(dir.path().join("model.safetensors.index.json"), "{").unwrap();
    assert!(matches!(
        HfModelDir::open(dir.path()),
        Err(SafetensorsError::BadJson { .. })
    ));
}

#[test]
fn duplicate_names_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    write_safetensors(&dir.path().join("a.safetensors"), &shard_a(), "F32").unwrap();
    write_safetensors(&dir.path().join("b.safetensors"), &shard_a()[..1], "F16").unwrap();
    let e = HfModelDir::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, SafetensorsError::DuplicateTensor { ref tensor, .. } if tensor == "model.embed_tokens.weight"),
        "{e}"
    );
}

#[test]
fn directory_level_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        HfModelDir::open(dir.path()),
        Err(SafetensorsError::Io { .. })
    ));
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(matches!(
        HfModelDir::open(dir.path()),
        Err(SafetensorsError::BadJson { .. })
    ));
    write_config(dir.path());
    assert!(matches!(
        HfModelDir::open(dir.path()),
        Err(SafetensorsError::NoShards(_))
    ));
}

#[test]
fn writer_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let t = |shape: Vec<usize>, n: usize| vec![("t".to_string(), shape, vec![0.0; n])];
    assert!(write_safetensors(&p, &t(vec![2], 2), "I64").is_err());
    assert!(write_safetensors(&p, &t(vec![2, 2], 3), "F32").is_err());
    let mut two = t(vec![1], 1);
    two.extend(t(vec![1], 1));
    assert!(write_safetensors(&p, &two, "F32").is_err());
}

// ---------------------------------------------------------------------------------------------
// Malformed single-shard files.

/// A shard with this raw header text and data.
fn raw_shard(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn open_single(bytes: &[u8]) -> Result<HfModelDir, SafetensorsError> {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path());
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    HfModelDir::open(dir.path())
}

fn err_single(bytes: &[u8]) -> SafetensorsError {
    open_single(bytes).unwrap_err()
}

#[test]
fn raw_shard_helper_is_valid() {
    let h =
        br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut data = 1.5f32.to_le_bytes().to_vec();
    data.extend_from_slice(&(-2.0f32).to_le_bytes());
    let m = open_single(&raw_shard(h, &data)).unwrap();
    assert_eq!(m.tensor_f32("a").unwrap(), (vec![2], vec![1.5, -2.0]));
}

#[test]
fn truncated_files() {
    for n in 0..8 {
        let e = err_single(&vec![0u8; n]);
        assert!(matches!(e, SafetensorsError::TooShort { .. }), "{n}: {e}");
    }
    let h = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let full = raw_shard(h, &[0; 8]);
    for n in 8..full.len() {
        assert!(open_single(&full[..n]).is_err(), "truncated to {n}");
    }
}

#[test]
fn header_length_too_large() {
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    let e = err_single(&b);
    assert!(matches!(e, SafetensorsError::HeaderTooLarge { .. }), "{e}");

    // Under the size limit but past the end of the file.
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    assert!(matches!(
        err_single(&b),
        SafetensorsError::HeaderTooLarge { .. }
    ));

    // Over the 100 MiB limit even if it were all there.
    let mut b = (200u64 << 20).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    assert!(matches!(
        err_single(&b),
        SafetensorsError::HeaderTooLarge { .. }
    ));
}

#[test]
fn bad_json_headers() {
    for h in [
        &b"{"[..],
        b"[]",
        b"\"x\"",
        b"{\"a\":1}",
        b"\xff\xfe",
        b"{\"a\":{\"dtype\":\"F32\"}}",
    ] {
        let e = err_single(&raw_shard(h, &[]));
        assert!(
            matches!(
                e,
                SafetensorsError::BadHeaderJson { .. } | SafetensorsError::BadEntry { .. }
            ),
            "{}: {e}",
            String::from_utf8_lossy(h)
        );
    }
    // Duplicate keys in one header (a plain JSON map would silently keep the last).
    let h = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    assert!(matches!(
        err_single(&raw_shard(h, &[0; 8])),
        SafetensorsError::DuplicateTensor { .. }
    ));
}

#[test]
fn unsupported_dtype_names_tensor_and_dtype() {
    let h = br#"{"ids":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#;
    let e = err_single(&raw_shard(h, &[0; 1]));
    assert!(matches!(e, SafetensorsError::UnsupportedDtype { .. }));
    let msg = e.to_string();
    assert!(msg.contains("ids") && msg.contains("F8_E4M3"), "{msg}");
}

#[test]
fn integer_buffers_are_skipped() {
    // BERT checkpoints carry `position_ids` as I64: a buffer, not a weight.
    let h = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"position_ids":{"dtype":"I64","shape":[1],"data_offsets":[4,12]}}"#;
    let dir = open_single(&raw_shard(h, &[0; 12])).unwrap();
    assert!(dir.contains("w"));
    assert!(!dir.contains("position_ids"));
}

#[test]
fn bad_offsets_and_shapes() {
    let cases: [(&[u8], &str); 5] = [
        (br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#, "past end"),
        (br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, "reversed"),
        (br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, "size mismatch"),
        (br#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}}"#, "dtype size mismatch"),
        (br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}}"#, "huge"),
    ];
    for (h, what) in cases {
        let e = err_single(&raw_shard(h, &[0; 8]));
        assert!(
            matches!(e, SafetensorsError::BadOffsets { .. }),
            "{what}: {e}"
        );
    }
    let h = br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
    let e = err_single(&raw_shard(h, &[0; 8]));
    assert!(matches!(e, SafetensorsError::ShapeOverflow { .. }), "{e}");
    let h = br#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#;
    assert!(matches!(
        err_single(&raw_shard(h, &[0; 8])),
        SafetensorsError::BadEntry { .. }
    ));
}

fn valid_shard_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let mut t = shard_a();
    t.extend(shard_b());
    write_safetensors(&p, &t, "BF16").unwrap();
    std::fs::read(p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte corruption (mostly in the header) or truncation: Ok or Err, never a panic, and
    /// whatever opens must serve every tensor without panicking.
    #[test]
    fn mutated_shards_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = valid_shard_bytes();
        for (at, v) in &edits {
            let at = at.index(bytes.len());
            bytes[at] = *v;
        }
        if do_cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        if let Ok(m) = open_single(&bytes) {
            for n in m.names() {
                let (shape, vals) = m.tensor_f32(n).unwrap();
                prop_assert_eq!(shape.iter().product::<usize>(), vals.len());
            }
        }
    }
}
