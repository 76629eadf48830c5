//! SmolLM2-135M-Instruct's GGUF vocabulary (GPT-2 style, pre-tokenizer `smollm`), fetched through
//! `cortensor::models::fetch`, against llama.cpp's tokenization of the same file.

use std::path::PathBuf;
use std::sync::OnceLock;

use cortensor::models::fetch;
use cortensor::models::gguf::GgufFile;
use cortensor::models::tokenizer::{
    GgufVocab, PreTokenizer, StreamDecoder, Tokenizer, TokenizerError,
};
use proptest::prelude::*;
use serde::Deserialize;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &fetch::cache_dir(), &mut |_| {})
            .expect("fetch the SmolLM2 GGUF");
        let gguf = GgufFile::open(&path).expect("open GGUF");
        Tokenizer::from_gguf(&gguf).expect("load GGUF tokenizer")
    })
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    add_bos: bool,
    parse_special: bool,
    ids: Vec<u32>,
}

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2/tokenize.json")
}

#[test]
fn matches_llama_cpp_fixture() {
    let tok = tokenizer();
    let data = std::fs::read_to_string(fixture_path()).expect("read smollm2 fixture");
    let fixture: Fixture = serde_json::from_str(&data).expect("parse smollm2 fixture");
    assert!(!fixture.cases.is_empty());
    let mut failures = Vec::new();
    for case in &fixture.cases {
        // The fixture's add_bos is llama.cpp's add_special: BOS only when the GGUF asks for it.
        let got = tok.encode(
            &case.text,
            case.add_bos && tok.add_bos_by_default(),
            case.parse_special,
        );
        if got != case.ids {
            failures.push(format!(
                "{:?} (add_bos={}, parse_special={})\n  want {:?}\n  got  {:?}",
                case.text, case.add_bos, case.parse_special, case.ids, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        fixture.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn vocabulary_facts() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!(tok.pre_tokenizer(), PreTokenizer::DigitsGpt2);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    // The GGUF says tokenizer.ggml.add_bos_token = false.
    assert!(!tok.add_bos_by_default());
    let stops = tok.stop_ids();
    assert!(stops.contains(&2) && stops.contains(&0), "{stops:?}");
    assert!(tok.is_special(1) && !tok.is_special(100));
    assert!(tok
        .chat_template()
        .is_some_and(|t| t.contains("<|im_start|>")));
    assert_eq!(tok.token_bytes(1), Some(&b"<|im_start|>"[..]));
}

#[test]
fn hand_checked_encodings() {
    let tok = tokenizer();
    let id = |s: &str| {
        tok.token_to_id(s)
            .unwrap_or_else(|| panic!("no token {s:?}"))
    };
    // Whole common words with their leading space are single tokens.
    assert_eq!(tok.encode(" Hello", false, false), [id(" Hello")]);
    assert_eq!(
        tok.encode("Hello world", false, false),
        [id("Hello"), id(" world")]
    );
    // The smollm pre-tokenizer isolates every digit, and the space before a number stays apart.
    assert_eq!(
        tok.encode("a 2024", false, false),
        [id("a"), id(" "), id("2"), id("0"), id("2"), id("4")]
    );
    // Special tokens only with parse_special; BOS only when asked.
    assert_eq!(
        tok.encode("<|im_start|>user", true, true),
        [1, 1, id("user")]
    );
    let plain = tok.encode("<|im_start|>", false, false);
    assert!(!plain.contains(&1), "{plain:?}");
    assert_eq!(tok.decode(&plain), "<|im_start|>");
}

#[test]
fn unsupported_vocabularies_are_errors() {
    let vocab = |model: &str, pre: Option<&str>| GgufVocab {
        model: model.into(),
        pre: pre.map(str::to_string),
        tokens: vec!["a".into(), "b".into()],
        ..GgufVocab::default()
    };
    match Tokenizer::from_gguf_vocab(vocab("llama", Some("default"))) {
        Err(e @ TokenizerError::UnsupportedModel(_)) => assert!(e.to_string().contains("`llama`")),
        other => panic!("{other:?}"),
    }
    match Tokenizer::from_gguf_vocab(vocab("gpt2", Some("no-such-pre"))) {
        Err(e @ TokenizerError::UnsupportedPreTokenizer(_)) => {
            assert!(e.to_string().contains("no-such-pre"))
        }
        other => panic!("{other:?}"),
    }
    // Out-of-range special ids are rejected instead of panicking later.
    let mut bad = vocab("gpt2", Some("gpt-2"));
    bad.eos = Some(7);
    assert!(matches!(
        Tokenizer::from_gguf_vocab(bad),
        Err(TokenizerError::InvalidVocab(_))
    ));
    // A tiny valid vocabulary works, merges included.
    let mut ok = vocab("gpt2", Some("gpt-2"));
    ok.tokens.push("ab".into());
    ok.merges = vec!["a b".into()];
    let tok = Tokenizer::from_gguf_vocab(ok).unwrap();
    assert_eq!(tok.encode("abba", false, false), [2, 1, 0]);
    assert_eq!(tok.decode(&[2, 1, 0]), "abba");
}

#[test]
fn round_trips() {
    let tok = tokenizer();
    let samples = [
        "",
        "Hello, world!",
        "  two spaces\tand a tab\n\nnewlines  ",
        "emoji 🦙 and 👨‍👩‍👧‍👦",
        "中文 日本語 한국어 русский ελληνικά",
        "x = 3.14159 * 2 ** 10; // 1,000,000",
        "<|im_start|>system\nYou are helpful<|im_end|>\n",
        "\u{0}\u{7f}\u{FFFD}\u{10FFFF}",
    ];
    for s in samples {
        for parse_special in [false, true] {
            let ids = tok.encode(s, false, parse_special);
            assert_eq!(tok.decode(&ids), s, "{s:?}");
        }
    }
    let ids = tok.encode("日本語 🦙", false, false);
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for id in ids {
        out.push_str(&dec.push(tok, id));
    }
    out.push_str(&dec.flush());
    assert_eq!(out, "日本語 🦙");
}

proptest! {
    // No failure persistence: integration tests have no source file proptest could key on.
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn encode_decode_round_trip(s in any::<String>(), parse_special in any::<bool>()) {
        let tok = tokenizer();
        let ids = tok.encode(&s, false, parse_special);
        prop_assert_eq!(tok.decode(&ids), s);
    }

    #[test]
    fn round_trip_with_specials_and_digits(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("<|im_end|>".to_string()),
                Just(" ".to_string()),
                Just("\n".to_string()),
                "[0-9]{1,5}",
                "[a-zA-Z' ]{0,8}",
                "\\PC{0,4}",
            ],
            0..12,
        )
    ) {
        let tok = tokenizer();
        let s: String = parts.concat();
        for parse_special in [false, true] {
            let ids = tok.encode(&s, false, parse_special);
            prop_assert_eq!(tok.decode(&ids), s.clone());
        }
    }
}
