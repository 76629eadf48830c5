//! The Llama 3 tiktoken tokenizer (llama-models 0.3.0 `tokenizer.model`, fetched through
//! `cortensor::models::fetch`) against llama.cpp's own test vectors for the same vocabulary.

use std::path::PathBuf;
use std::sync::OnceLock;

use cortensor::models::fetch;
use cortensor::models::tokenizer::{StreamDecoder, Tokenizer};
use proptest::prelude::*;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = fetch::ensure(&fetch::LLAMA3_TOKENIZER, &fetch::cache_dir(), &mut |_| {})
            .expect("fetch the llama3 tokenizer.model");
        Tokenizer::from_tiktoken_file(&path).expect("load tokenizer.model")
    })
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama3")
        .join(name)
}

/// Reads the `.inp`/`.out` pair the way llama.cpp's tests/test-tokenizer-0.cpp does.
fn llama_cpp_cases() -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(fixture("ggml-vocab-llama-bpe.gguf.inp")).unwrap();
    let out = std::fs::read_to_string(fixture("ggml-vocab-llama-bpe.gguf.out")).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.find(sep) {
            Some(p) => {
                texts.push(rest[..p].to_string());
                rest = &rest[p + sep.len()..];
            }
            None => {
                texts.push(rest.to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "inp/out case counts differ");
    texts.into_iter().zip(ids).collect()
}

#[test]
fn matches_llama_cpp_test_vectors() {
    let tok = tokenizer();
    let cases = llama_cpp_cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for (text, expected) in &cases {
        // llama.cpp's test tokenizes without BOS and without parsing special tokens.
        let got = tok.encode(text, false, false);
        if &got != expected {
            failures.push(format!("{text:?}\n  want {expected:?}\n  got  {got:?}"));
        }
        assert_eq!(&tok.decode(&got), text, "round trip of {text:?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn special_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 128_256);
    assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(128_000));
    assert_eq!(tok.token_to_id("<|end_of_text|>"), Some(128_001));
    assert_eq!(tok.token_to_id("<|start_header_id|>"), Some(128_006));
    assert_eq!(tok.token_to_id("<|end_header_id|>"), Some(128_007));
    assert_eq!(tok.token_to_id("<|eom_id|>"), Some(128_008));
    assert_eq!(tok.token_to_id("<|eot_id|>"), Some(128_009));
    assert_eq!(tok.token_to_id("<|python_tag|>"), Some(128_010));
    assert_eq!(
        tok.token_to_id("<|reserved_special_token_245|>"),
        Some(128_255)
    );
    // After the 12 named tokens come reserved_special_token_2 ..= 245 (Meta's tokenizer.py).
    assert_eq!(tok.token_to_id("<|image|>"), Some(128_011));
    assert_eq!(
        tok.token_to_id("<|reserved_special_token_2|>"),
        Some(128_012)
    );
    assert_eq!(tok.bos_id(), Some(128_000));
    assert_eq!(tok.eos_id(), Some(128_001));
    assert!(tok.add_bos_by_default());
    for id in [128_001, 128_008, 128_009] {
        assert!(
            tok.stop_ids().contains(&id),
            "stop ids {:?}",
            tok.stop_ids()
        );
    }
    assert!(tok.is_special(128_009));
    assert!(!tok.is_special(9906));
    assert_eq!(tok.token_bytes(128_009), Some(&b"<|eot_id|>"[..]));
    assert_eq!(tok.token_bytes(128_256), None);
    // " hello" is a single token, found by its bytes.
    assert_eq!(tok.token_to_id(" hello"), Some(24748));

    let text = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>";
    let with = tok.encode(text, true, true);
    assert_eq!(with[..3], [128_000, 128_006, 882]);
    assert_eq!(*with.last().unwrap(), 128_009);
    assert_eq!(tok.decode(&with), format!("<|begin_of_text|>{text}"));

    // Without parse_special the markers are plain text.
    let without = tok.encode(text, false, false);
    assert!(without.iter().all(|&id| id < 128_000), "{without:?}");
    assert_eq!(tok.decode(&without), text);
    assert_eq!(tok.encode("<|eot_id|>", false, true), [128_009]);
    assert_ne!(tok.encode("<|eot_id|>", false, false), [128_009]);
}

#[test]
fn malformed_tiktoken_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8]); 4] = [
        ("bad_base64", b"!!!! 0\n"),
        ("bad_rank", b"YQ== x\n"),
        ("gap", b"YQ== 0\nYg== 2\n"),
        ("empty", b""),
    ];
    for (name, content) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        assert!(
            Tokenizer::from_tiktoken_file(&path).is_err(),
            "{name} should be rejected"
        );
    }
    assert!(Tokenizer::from_tiktoken_file(&dir.path().join("missing")).is_err());
}

#[test]
fn round_trips() {
    let tok = tokenizer();
    let samples = [
        "",
        " ",
        "Hello, world!",
        "  leading and trailing  ",
        "line1\nline2\r\n\r\n\ttabbed",
        "emoji 🦙🦙 👨‍👩‍👧‍👦 flags 🇫🇷",
        "中文字符和日本語のテキスト、한국어",
        "Ελληνικά και русский текст",
        "मैं हिंदी बोलता हूँ",
        "123456789 3.14159 1,000,000",
        "'s 'T 'RE don't I'LL",
        "\u{0}\u{1}\u{7f} control chars",
        "\u{FFFD} replacement and \u{200B} zero width \u{3000} ideographic space",
        "<|eot_id|> written <|begin_of_text",
        "fn main() { println!(\"{}\", x); }",
        "\u{10FFFF}\u{E000} private use",
    ];
    for s in samples {
        for parse_special in [false, true] {
            let ids = tok.encode(s, false, parse_special);
            assert_eq!(tok.decode(&ids), s, "{s:?} parse_special={parse_special}");
        }
    }
}

#[test]
fn stream_decoder_holds_back_partial_characters() {
    let tok = tokenizer();
    let text = "a🦙b 中文 ok";
    let ids = tok.encode(text, false, false);
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    let mut saw_holdback = false;
    for &id in &ids {
        let piece = dec.push(tok, id);
        saw_holdback |= dec.pending_len() > 0;
        out.push_str(&piece);
    }
    out.push_str(&dec.flush());
    assert_eq!(out, text);
    // The llama emoji spans several byte tokens, so some step must have held bytes back.
    assert!(saw_holdback);

    // A byte that can never start a character comes out as U+FFFD, as decode renders it.
    let ff = (0..1000u32)
        .find(|&id| tok.token_bytes(id) == Some(&[0xFF][..]))
        .expect("a token for byte 0xFF");
    let a = tok.token_to_id("a").unwrap();
    let mut dec = StreamDecoder::new();
    let mut s = dec.push(tok, ff);
    s.push_str(&dec.push(tok, a));
    s.push_str(&dec.flush());
    assert_eq!(s, "\u{FFFD}a");
    assert_eq!(tok.decode(&[ff, a]), s);
}

/// A long prompt (over 4,000 tokens) encodes as its repeated paragraph does: each paragraph
/// after the first adds as many tokens as the third adds to two, and the whole decodes back to
/// the text. (How fast: `cortensor bench tokenize`.)
#[test]
fn a_long_prompt_encodes_paragraph_by_paragraph() {
    let tok = tokenizer();
    let para = "The quick brown fox jumps over the lazy dog. Numbers 12345 and symbols {}[]() \
                appear, as do names like Llama, Cortensor and 東京. ";
    let two = tok.encode(&para.repeat(2), false, false).len();
    let three = tok.encode(&para.repeat(3), false, false).len();
    let text = para.repeat(150);
    let ids = tok.encode(&text, true, true);
    assert!(ids.len() >= 4000, "{} tokens", ids.len());
    assert_eq!(ids[0], tok.bos_id().unwrap());
    assert_eq!(ids.len(), 1 + two + 148 * (three - two));
    assert_eq!(tok.decode(&ids[1..]), text);
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
    fn round_trip_with_specials_and_spaces(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("<|eot_id|>".to_string()),
                Just(" ".to_string()),
                Just("\n".to_string()),
                Just("'s".to_string()),
                "[a-z0-9 ]{0,8}",
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
