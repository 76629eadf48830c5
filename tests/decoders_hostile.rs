//! Hostile input to the file decoders, with every heap allocation watched: GGUF and
//! safetensors headers mutated where their lengths and counts live (huge counts, 2^40-byte
//! strings, 2^60 tensors), flipped and truncated; configuration overlays of arbitrary TOML.
//! Each must end in `Ok` or a typed error: never a panic, and never an allocation larger
//! than the input justifies (a counting allocator records the largest one made while
//! decoding, on the decoding thread).
//!
//! Seeded (printed; `CORTENSOR_PROPTEST_SEED` overrides): proptest prints the smallest
//! failing input.

use cortensor::config::TestnetConfig;
use cortensor::models::gguf::{GgufArray, GgufFile, GgufValue};
use cortensor::models::gguf_write::GgufWriter;
use cortensor::models::quant::GgmlType;
use cortensor::models::safetensors::{write_safetensors, HfModelDir};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;

/// The system allocator, recording the largest request made on a thread while it watches.
struct Watching;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    // `try_with`: a thread being torn down has no thread-locals left; it is not watching.
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// Runs `f` watching allocations; returns its result (or the panic's message) and the
/// largest allocation it made.
fn watched<T>(f: impl FnOnce() -> T) -> (Result<T, String>, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHING.with(|w| w.set(true));
    let out = std::panic::catch_unwind(AssertUnwindSafe(f));
    WATCHING.with(|w| w.set(false));
    let out = out.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())
    });
    (out, LARGEST.with(|l| l.get()))
}

/// The most a decoder may allocate at once for an input of `len` bytes: a small multiple of
/// the input (decoded structures are larger than their encoding: a 24-byte tensor entry
/// becomes a struct with a `String` and a `Vec`) plus a fixed allowance.
fn allowance(len: usize) -> usize {
    16 * len + (64 << 10)
}

const DEFAULT_SEED: u64 = 0xdec0_de55;

fn runner(cases: u32) -> TestRunner {
    let seed = std::env::var("CORTENSOR_PROPTEST_SEED")
        .ok()
        .map(|s| s.parse().expect("CORTENSOR_PROPTEST_SEED is a number"))
        .unwrap_or(DEFAULT_SEED);
    println!("proptest seed {seed} (set CORTENSOR_PROPTEST_SEED to replay another)");
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Values written over a length or count: each larger than any file here.
const HUGE: [u64; 7] = [
    1 << 32,
    1 << 40,
    1 << 60,
    u64::MAX,
    u64::MAX / 24,
    (1 << 31) - 1,
    u32::MAX as u64,
];

/// A mutation of a well-formed file: a huge little-endian u64 or u32 written at an offset
/// (lengths and counts are u64, types and dims counts u32), a byte flipped, or a cut.
#[derive(Clone, Debug)]
enum Edit {
    U64(prop::sample::Index, u64),
    U32(prop::sample::Index, u32),
    Byte(prop::sample::Index, u8),
    Cut(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let huge = prop_oneof![prop::sample::select(HUGE.to_vec()), any::<u64>()];
    prop_oneof![
        3 => (any::<prop::sample::Index>(), huge).prop_map(|(i, v)| Edit::U64(i, v)),
        1 => (any::<prop::sample::Index>(), any::<u32>()).prop_map(|(i, v)| Edit::U32(i, v)),
        2 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, v)| Edit::Byte(i, v)),
        1 => any::<prop::sample::Index>().prop_map(Edit::Cut),
    ]
}

/// Applies `edits`, offsets drawn within the first `focus` bytes (the header).
fn apply(mut bytes: Vec<u8>, edits: &[Edit], focus: usize) -> Vec<u8> {
    for e in edits {
        let span = focus.min(bytes.len());
        if span == 0 {
            break;
        }
        match e {
            Edit::U64(at, v) => {
                let at = at.index(span);
                let end = (at + 8).min(bytes.len());
                bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            Edit::U32(at, v) => {
                let at = at.index(span);
                let end = (at + 4).min(bytes.len());
                bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            Edit::Byte(at, v) => bytes[at.index(span)] = *v,
            Edit::Cut(at) => bytes.truncate(at.index(bytes.len() + 1)),
        }
    }
    bytes
}

/// A small GGUF v3 file in the real format: metadata of every kind (strings, arrays of
/// strings and numbers) and tensors of several types.
fn gguf_bytes() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::from("llama"));
    w.add_metadata("general.name", GgufValue::from("hostile"));
    w.add_metadata("llama.context_length", GgufValue::from(128u32));
    w.add_metadata("llama.rope.freq_base", GgufValue::from(10000.0f32));
    w.add_metadata(
        "tokenizer.ggml.tokens",
        GgufValue::from(GgufArray::String(
            ["<s>", "</s>", "a", "b"].map(String::from).to_vec(),
        )),
    );
    w.add_metadata(
        "tokenizer.ggml.scores",
        GgufValue::from(GgufArray::F32(vec![0.0, 0.5, 1.0, 1.5])),
    );
    let floats: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let f32_bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
    w.add_tensor("token_embd.weight", &[16, 4], GgmlType::F32, f32_bytes)
        .unwrap();
    w.add_tensor("output_norm.weight", &[32], GgmlType::F16, vec![0x3c; 64])
        .unwrap();
    w.add_tensor("blk.0.attn_q.weight", &[32, 2], GgmlType::Q8_0, vec![1; 68])
        .unwrap();
    w.to_bytes()
}

#[test]
fn claimed_huge_counts_and_lengths_are_refused_before_allocating() {
    // The instrument itself: an allocation of 1 MiB is seen.
    let (v, largest) = watched(|| vec![1u8; 1 << 20]);
    assert_eq!(v.unwrap().len(), 1 << 20);
    assert!(largest >= 1 << 20, "the allocator saw {largest}");
    // Hand-made headers: the counts and lengths alone, with nothing behind them.
    let header = |tensors: u64, kvs: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&tensors.to_le_bytes());
        b.extend_from_slice(&kvs.to_le_bytes());
        b
    };
    let mut cases = vec![
        ("2^60 tensors", header(1 << 60, 0)),
        ("u64::MAX metadata entries", header(0, u64::MAX)),
    ];
    // One metadata key of 2^40 bytes.
    let mut b = header(0, 1);
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    b.extend_from_slice(b"key");
    cases.push(("a 2^40-byte key", b));
    // A string value of 2^40 bytes.
    let mut b = header(0, 1);
    b.extend_from_slice(&3u64.to_le_bytes());
    b.extend_from_slice(b"key");
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    b.extend_from_slice(&[b'x'; 32]);
    cases.push(("a 2^40-byte string value", b));
    // An array of 2^60 u8s, and of 2^40 strings.
    for (elem, n) in [(0u32, 1u64 << 60), (8, 1 << 40)] {
        let mut b = header(0, 1);
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(b"arr");
        b.extend_from_slice(&9u32.to_le_bytes()); // array
        b.extend_from_slice(&elem.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&[0; 64]);
        cases.push(("a 2^60- or 2^40-element array", b));
    }
    // A tensor with 2^40-byte name, and one with 2^32 × 2^32 elements.
    let mut b = header(1, 0);
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    b.extend_from_slice(&[b't'; 64]);
    cases.push(("a 2^40-byte tensor name", b));
    let mut b = header(1, 0);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b't');
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 32).to_le_bytes());
    b.extend_from_slice(&(1u64 << 32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    cases.push(("a tensor of 2^64 elements", b));
    for (what, bytes) in cases {
        let len = bytes.len();
        let (out, largest) = watched(|| GgufFile::from_bytes(bytes).map(|_| ()));
        let out = out.unwrap_or_else(|p| panic!("{what}: panicked: {p}"));
        let e = out.expect_err(what);
        assert!(!e.to_string().is_empty());
        assert!(
            largest <= allowance(len),
            "{what}: allocated {largest} bytes for a {len}-byte file ({e})"
        );
    }
}

#[test]
fn mutated_gguf_headers_never_panic_or_overallocate() {
    let clean = gguf_bytes();
    // The header (metadata and tensor index) is what is parsed; the data follows it.
    let header_len = clean.len() - (64 * 4 + 64 + 68);
    assert!(GgufFile::from_bytes(clean.clone()).is_ok());
    let counts = std::cell::Cell::new((0u32, 0u32));
    runner(3000)
        .run(&prop::collection::vec(edit(), 1..6), |edits| {
            let bytes = apply(clean.clone(), &edits, header_len + 8);
            let len = bytes.len();
            let (out, largest) = watched(|| GgufFile::from_bytes(bytes).map(|g| g.tensors.len()));
            let out = out.map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?;
            prop_assert!(
                largest <= allowance(len),
                "allocated {largest} bytes for a {len}-byte file ({out:?})"
            );
            let (o, e) = counts.get();
            counts.set(if out.is_ok() { (o + 1, e) } else { (o, e + 1) });
            Ok(())
        })
        .unwrap();
    let (ok, err) = counts.get();
    println!("GGUF: 3000 mutated files, {ok} parsed, {err} refused");
    assert!(
        err > 1000,
        "the mutations must mostly break the header: {ok} ok, {err} refused"
    );
}

/// A safetensors shard in the real format (BF16 and F32 tensors, `__metadata__`).
fn safetensors_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let t = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![4, 3],
            vec![0.25f32; 12],
        ),
        ("model.norm.weight".to_string(), vec![3], vec![1.0; 3]),
        ("lm_head.weight".to_string(), vec![2, 2, 2], vec![-0.5; 8]),
    ];
    write_safetensors(&p, &t, "BF16").unwrap();
    std::fs::read(p).unwrap()
}

/// Text edits of the JSON header: numbers where the lengths, shapes and offsets are.
fn header_text_edit() -> impl Strategy<Value = (prop::sample::Index, String)> {
    (
        any::<prop::sample::Index>(),
        prop::sample::select(vec![
            "1099511627776".to_string(),
            "18446744073709551615".to_string(),
            "18446744073709551616".to_string(),
            "-1".to_string(),
            "1e300".to_string(),
            "[4294967296,4294967296,4294967296]".to_string(),
            "\"F64\"".to_string(),
            "{".to_string(),
            "\"\\ud800\"".to_string(),
            "null".to_string(),
        ]),
    )
}

#[test]
fn mutated_safetensors_headers_never_panic_or_overallocate() {
    let clean = safetensors_bytes();
    let header_len = u64::from_le_bytes(clean[..8].try_into().unwrap()) as usize;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":3}"#,
    )
    .unwrap();
    let shard = dir.path().join("model.safetensors");
    let counts = std::cell::Cell::new((0u32, 0u32));
    let strategy = (
        prop::collection::vec(edit(), 0..4),
        prop::option::of(header_text_edit()),
    );
    runner(1500)
        .run(&strategy, |(edits, text)| {
            let mut bytes = clean.clone();
            if let Some((at, replacement)) = text {
                // Replace a run of digits (a length, a shape, an offset) inside the header.
                let header = &bytes[8..8 + header_len];
                let digits: Vec<usize> = (0..header.len())
                    .filter(|&i| {
                        header[i].is_ascii_digit() && (i == 0 || !header[i - 1].is_ascii_digit())
                    })
                    .collect();
                let start = 8 + digits[at.index(digits.len())];
                let end = (start..8 + header_len)
                    .find(|&i| !bytes[i].is_ascii_digit())
                    .unwrap();
                let mut header = bytes[8..start].to_vec();
                header.extend_from_slice(replacement.as_bytes());
                header.extend_from_slice(&bytes[end..8 + header_len]);
                let mut out = (header.len() as u64).to_le_bytes().to_vec();
                out.extend_from_slice(&header);
                out.extend_from_slice(&bytes[8 + header_len..]);
                bytes = out;
            }
            let bytes = apply(bytes, &edits, 8 + header_len);
            let len = bytes.len();
            std::fs::write(&shard, &bytes).unwrap();
            let (out, largest) = watched(|| HfModelDir::open(dir.path()).map(|m| m.names().len()));
            let out = out.map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?;
            prop_assert!(
                largest <= allowance(len),
                "allocated {largest} bytes for a {len}-byte shard ({out:?})"
            );
            let (o, e) = counts.get();
            counts.set(if out.is_ok() { (o + 1, e) } else { (o, e + 1) });
            Ok(())
        })
        .unwrap();
    let (ok, err) = counts.get();
    println!("safetensors: 1500 mutated shards, {ok} opened, {err} refused");
    assert!(err > 500 && ok > 0, "{ok} ok, {err} refused");
}

/// Keys of the configuration, so overlays reach past "unknown key".
const CONFIG_KEYS: &[(&str, &[&str])] = &[
    (
        "router",
        &[
            "listen",
            "api_keys",
            "max_inflight_per_key",
            "max_inflight_total",
            "retry_after_s",
            "max_body_bytes",
        ],
    ),
    (
        "queue",
        &[
            "ack_timeout_ms",
            "precommit_timeout_ms",
            "commit_timeout_ms",
            "task_timeout_ms",
            "max_replacements",
            "max_live_tasks",
            "tick_ms",
        ],
    ),
    ("pricing", &["price_per_token", "default_deposit"]),
    (
        "nodes",
        &[
            "miners",
            "validators",
            "backend",
            "threads_per_miner",
            "max_context",
            "model",
            "heartbeat_interval_ms",
            "offline_after_ms",
            "max_tasks_per_miner",
            "selection_seed",
            "probes_required",
        ],
    ),
    ("storage", &["data_dir"]),
    (
        "chain",
        &[
            "kind",
            "rpc_url",
            "private_key",
            "confirm_after_ms",
            "contracts",
        ],
    ),
];

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        prop::sample::select(vec![0i64, 1, -1, i64::MAX, i64::MIN, 5010, 65536])
            .prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        ".{0,24}".prop_map(toml::Value::String),
        prop::sample::select(vec![
            "127.0.0.1:0",
            "[::1]:5010",
            "embedded",
            "anvil",
            "rpc",
            "cpu",
            "0x12",
            ""
        ])
        .prop_map(|s| toml::Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// An overlay: known sections and keys (and some unknown ones) with arbitrary values.
fn overlay() -> impl Strategy<Value = toml::Table> {
    let entry = (
        0..CONFIG_KEYS.len() + 1,
        any::<prop::sample::Index>(),
        ".{1,8}",
        toml_value(),
    )
        .prop_map(
            |(section, key, other, value)| match CONFIG_KEYS.get(section) {
                Some((name, keys)) => (
                    name.to_string(),
                    keys[key.index(keys.len())].to_string(),
                    value,
                ),
                None => (other.clone(), other, value),
            },
        );
    prop::collection::vec(entry, 0..6).prop_map(|entries| {
        let mut table = toml::Table::new();
        for (section, key, value) in entries {
            let t = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = t {
                t.insert(key, value);
            }
        }
        table
    })
}

#[test]
fn arbitrary_configuration_overlays_are_accepted_or_refused_by_name() {
    let counts = std::cell::Cell::new((0u32, 0u32));
    let strategy = prop_oneof![
        4 => overlay().prop_map(|t| toml::to_string(&t).unwrap_or_default()),
        1 => ".{0,200}",
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    runner(2000)
        .run(&strategy, |text| {
            let len = text.len();
            let (out, largest) = watched(|| TestnetConfig::from_toml_str(&text, "overlay.toml"));
            let out = out.map_err(|p| TestCaseError::fail(format!("panicked: {p}")))?;
            // The embedded defaults are parsed too: a few KiB beyond the overlay.
            prop_assert!(
                largest <= allowance(len + 8192),
                "allocated {largest} for {len} bytes"
            );
            match out {
                Ok(config) => {
                    // What parses is valid, and its durations are usable.
                    prop_assert!(config.validate().is_ok());
                    let _ = (config.queue.task_timeout(), config.chain.confirm_after());
                    counts.set((counts.get().0 + 1, counts.get().1));
                }
                Err(e) => {
                    let message = e.to_string();
                    prop_assert!(
                        message.contains("overlay.toml")
                            || message.starts_with("invalid configuration"),
                        "an error that names neither the file nor the field: {message}"
                    );
                    counts.set((counts.get().0, counts.get().1 + 1));
                }
            }
            Ok(())
        })
        .unwrap();
    let (ok, err) = counts.get();
    println!("config: 2000 overlays, {ok} accepted, {err} refused");
    assert!(ok > 50 && err > 500, "{ok} accepted, {err} refused");

    // Nesting far deeper than any parser's stack: refused, not a stack overflow.
    for deep in [
        format!("a = {}1{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("a = {}1{}", "{b = ".repeat(100_000), "}".repeat(100_000)),
        "[a]\n".repeat(100_000),
    ] {
        let (out, _) = watched(|| TestnetConfig::from_toml_str(&deep, "deep.toml").map(|_| ()));
        assert!(out.expect("no panic").is_err());
    }
}
