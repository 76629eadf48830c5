//! Byte-level BPE tokenizer for Llama-architecture models.
//!
//! One [`Tokenizer`] serves two sources:
//! - a GGUF-embedded GPT-2-style vocabulary (`tokenizer.ggml.model == "gpt2"`): tokens are GPT-2
//!   byte-to-unicode encoded strings and merges are ranked `"a b"` pairs
//!   ([`Tokenizer::from_gguf`], [`Tokenizer::from_gguf_vocab`]);
//! - Llama 3's tiktoken `tokenizer.model` (`base64 rank` lines) plus Meta's 256 special tokens
//!   ([`Tokenizer::from_tiktoken_file`]).
//!
//! Encoding follows llama.cpp (`llama-vocab.cpp`, `unicode.cpp`) so that token ids agree with it:
//! special tokens are partitioned out first (longest text first), each remaining fragment is split
//! by the pre-tokenizer chosen by `tokenizer.ggml.pre`, and each word is BPE-merged, lowest rank
//! first and leftmost on ties. Both sources share one merge loop; only the rank lookup differs:
//! GGUF ranks come from the merge list (a pair of token ids), tiktoken ranks from the merged byte
//! string. The two are not interchangeable in general (two different merges can produce the same
//! string with different priorities), so both are kept.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine as _;

use super::gguf::GgufFile;

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer model `{0}` is not supported (only byte-level BPE `gpt2` vocabularies are; e.g. `llama` is SentencePiece)")]
    UnsupportedModel(String),
    #[error("pre-tokenizer `{0}` is not supported")]
    UnsupportedPreTokenizer(String),
    #[error("GGUF metadata key `{0}` is missing or has the wrong type")]
    MissingKey(&'static str),
    #[error("invalid vocabulary: {0}")]
    InvalidVocab(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    TiktokenParse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    /// Maps the GGUF integer; unknown values count as normal text, as llama.cpp's attr mapping
    /// gives them no special attribute.
    pub fn from_gguf(t: i32) -> TokenKind {
        match t {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }

    /// Tokens whose text is matched whole in the input and rendered verbatim on decode.
    fn is_special(self) -> bool {
        matches!(
            self,
            TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
        )
    }
}

/// The tokenizer part of a GGUF file's metadata, decoupled from the file reader.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`.
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`; empty means all normal.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`, highest priority first.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Reads the tokenizer keys out of a parsed GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<GgufVocab, TokenizerError> {
        let model = file
            .get_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?
            .to_string();
        if model != "gpt2" {
            // Checked before the other keys so the error names the real problem.
            return Err(TokenizerError::UnsupportedModel(model));
        }
        let tokens = file
            .get_str_array("tokenizer.ggml.tokens")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?
            .to_vec();
        let merges = file
            .get_str_array("tokenizer.ggml.merges")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.merges"))?
            .to_vec();
        Ok(GgufVocab {
            model,
            pre: file.get_str("tokenizer.ggml.pre").map(str::to_string),
            tokens,
            token_types: file
                .get_i32_array("tokenizer.ggml.token_type")
                .unwrap_or_default(),
            merges,
            bos: file.get_u32("tokenizer.ggml.bos_token_id"),
            eos: file.get_u32("tokenizer.ggml.eos_token_id"),
            eot: file.get_u32("tokenizer.ggml.eot_token_id"),
            add_bos: file.get_bool("tokenizer.ggml.add_bos_token"),
            chat_template: file.get_str("tokenizer.chat_template").map(str::to_string),
        })
    }
}

/// Pre-tokenizer regex families, named after llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// Llama 3 / tiktoken cl100k-style: contractions, letters, 1-3 digits, punctuation, newlines.
    Llama3,
    /// As Llama 3 but single digits (Qwen2, StableLM2).
    Qwen2,
    /// GPT-2's regex.
    Gpt2,
    /// Each digit isolated, then GPT-2's regex (StarCoder, Refact, SmolLM, Command-R).
    DigitsGpt2,
    /// llama.cpp's fallback for `default`: punctuation runs, GPT-2, number runs, digit triples.
    Default,
}

impl PreTokenizer {
    /// Maps `tokenizer.ggml.pre` to a pre-tokenizer and whether whole words found in the vocab
    /// skip merging (llama.cpp's `ignore_merges`). A missing name means llama.cpp's default.
    pub fn from_gguf_name(name: Option<&str>) -> Result<(PreTokenizer, bool), TokenizerError> {
        let Some(name) = name else {
            return Ok((PreTokenizer::Default, false));
        };
        Ok(match name {
            "default" => (PreTokenizer::Default, false),
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" => (PreTokenizer::Llama3, true),
            "dbrx" | "smaug-bpe" => (PreTokenizer::Llama3, false),
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (PreTokenizer::Qwen2, false),
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" => {
                (PreTokenizer::DigitsGpt2, false)
            }
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "exaone4" => {
                (PreTokenizer::Gpt2, false)
            }
            other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
        })
    }

    fn steps(self) -> &'static [Step] {
        match self {
            PreTokenizer::Llama3 => &[Step::Llama3 { max_digits: 3 }],
            PreTokenizer::Qwen2 => &[Step::Llama3 { max_digits: 1 }],
            PreTokenizer::Gpt2 => &[Step::Gpt2],
            PreTokenizer::DigitsGpt2 => &[Step::EachNumber, Step::Gpt2],
            PreTokenizer::Default => &[
                Step::PunctRuns,
                Step::Gpt2,
                Step::NumberRuns,
                Step::AsciiDigitTriples,
            ],
        }
    }
}

/// Where merge priorities come from.
#[derive(Debug, Clone)]
enum Ranks {
    /// GGUF merge list: (left id, right id) -> (rank, merged id).
    Pairs(HashMap<(u32, u32), (u32, u32)>),
    /// tiktoken: the rank of a merge is the id of the merged byte string.
    Bytes,
}

/// A byte-level BPE tokenizer (see the module docs).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Bytes each id decodes to (special tokens: their text).
    tokens: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    /// Normal tokens by their bytes.
    bytes_to_id: HashMap<Vec<u8>, u32>,
    /// Special tokens by their text.
    special_to_id: HashMap<String, u32>,
    /// Special token ids, longest text first (llama.cpp's partition order).
    specials_by_len: Vec<u32>,
    byte_ids: [Option<u32>; 256],
    ranks: Ranks,
    pre: PreTokenizer,
    ignore_merges: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer embedded in a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_gguf_vocab(GgufVocab::from_gguf(file)?)
    }

    /// Builds a tokenizer from GGUF tokenizer metadata.
    pub fn from_gguf_vocab(vocab: GgufVocab) -> Result<Tokenizer, TokenizerError> {
        if vocab.model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(vocab.model));
        }
        let (pre, ignore_merges) = PreTokenizer::from_gguf_name(vocab.pre.as_deref())?;
        let n = vocab.tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(TokenizerError::InvalidVocab(format!("{n} tokens")));
        }
        if !vocab.token_types.is_empty() && vocab.token_types.len() != n {
            return Err(TokenizerError::InvalidVocab(format!(
                "{} token types for {n} tokens",
                vocab.token_types.len()
            )));
        }
        for (what, id) in [("bos", vocab.bos), ("eos", vocab.eos), ("eot", vocab.eot)] {
            if let Some(id) = id {
                if id as usize >= n {
                    return Err(TokenizerError::InvalidVocab(format!(
                        "{what} id {id} out of range ({n} tokens)"
                    )));
                }
            }
        }

        let unicode_to_byte = unicode_to_byte_table();
        let mut tokens = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        // Encoded text -> id over all tokens, as llama.cpp's token_to_id (later entries win).
        let mut text_to_id: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (i, text) in vocab.tokens.iter().enumerate() {
            let kind = vocab
                .token_types
                .get(i)
                .map_or(TokenKind::Normal, |&t| TokenKind::from_gguf(t));
            let bytes = if kind.is_special() {
                text.as_bytes().to_vec()
            } else {
                decode_gpt2_text(text, &unicode_to_byte)
            };
            tokens.push(bytes);
            kinds.push(kind);
            text_to_id.insert(text.as_str(), i as u32);
        }

        let mut pairs = HashMap::with_capacity(vocab.merges.len());
        let mut merged = String::new();
        for (rank, merge) in vocab.merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let bytes = merge.as_bytes();
            let Some(pos) = bytes.iter().skip(1).position(|&b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (left, right) = (&merge[..pos], &merge[pos + 1..]);
            merged.clear();
            merged.push_str(left);
            merged.push_str(right);
            // A merge whose parts or result are not tokens can never yield a token: skip it.
            if let (Some(&l), Some(&r), Some(&m)) = (
                text_to_id.get(left),
                text_to_id.get(right),
                text_to_id.get(merged.as_str()),
            ) {
                pairs.entry((l, r)).or_insert((rank as u32, m));
            }
        }
        drop(text_to_id);

        Ok(Tokenizer::assemble(
            tokens,
            kinds,
            Ranks::Pairs(pairs),
            pre,
            ignore_merges,
            vocab.bos,
            vocab.eos,
            vocab.eot,
            vocab
                .add_bos
                .unwrap_or(pre == PreTokenizer::Llama3 && ignore_merges),
            vocab.chat_template,
        ))
    }

    /// Loads Llama 3's tiktoken `tokenizer.model` and adds Meta's 256 special tokens
    /// (llama_models/llama3/tokenizer.py): `<|begin_of_text|>` = 128000, ..., `<|eot_id|>` = 128009.
    pub fn from_tiktoken_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let data = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_err = |line: usize, message: String| TokenizerError::TiktokenParse {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut ranked: Vec<Option<Vec<u8>>> = Vec::new();
        for (lineno, line) in data.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line =
                std::str::from_utf8(line).map_err(|_| parse_err(lineno + 1, "not UTF-8".into()))?;
            let mut parts = line.split_ascii_whitespace();
            let (Some(b64), Some(rank), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(parse_err(lineno + 1, "expected `base64 rank`".into()));
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| parse_err(lineno + 1, format!("bad base64: {e}")))?;
            let rank: usize = rank
                .parse()
                .map_err(|e| parse_err(lineno + 1, format!("bad rank: {e}")))?;
            if rank >= 1 << 24 {
                return Err(parse_err(lineno + 1, format!("rank {rank} too large")));
            }
            if ranked.len() <= rank {
                ranked.resize(rank + 1, None);
            }
            if ranked[rank].replace(bytes).is_some() {
                return Err(parse_err(lineno + 1, format!("duplicate rank {rank}")));
            }
        }
        // Ids are ranks, so the ranks must be exactly 0..n.
        let mut tokens = Vec::with_capacity(ranked.len() + LLAMA3_NUM_SPECIAL);
        for (rank, bytes) in ranked.into_iter().enumerate() {
            tokens.push(bytes.ok_or_else(|| {
                TokenizerError::InvalidVocab(format!("{}: rank {rank} missing", path.display()))
            })?);
        }
        if tokens.is_empty() {
            return Err(TokenizerError::InvalidVocab(format!(
                "{}: no tokens",
                path.display()
            )));
        }
        let num_base = tokens.len();
        let mut kinds = vec![TokenKind::Normal; num_base];
        for name in llama3_special_tokens() {
            tokens.push(name.into_bytes());
            kinds.push(TokenKind::Control);
        }
        let id_of = |k: usize| Some((num_base + k) as u32);
        Ok(Tokenizer::assemble(
            tokens,
            kinds,
            Ranks::Bytes,
            PreTokenizer::Llama3,
            true,
            id_of(0), // <|begin_of_text|>
            id_of(1), // <|end_of_text|>
            id_of(9), // <|eot_id|>
            true,
            None,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        tokens: Vec<Vec<u8>>,
        kinds: Vec<TokenKind>,
        ranks: Ranks,
        pre: PreTokenizer,
        ignore_merges: bool,
        bos: Option<u32>,
        eos: Option<u32>,
        eot: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Tokenizer {
        let mut bytes_to_id = HashMap::with_capacity(tokens.len());
        let mut special_to_id = HashMap::new();
        let mut specials_by_len = Vec::new();
        for (i, (bytes, kind)) in tokens.iter().zip(&kinds).enumerate() {
            let id = i as u32;
            if kind.is_special() {
                // Special texts come from `String`s, so they are valid UTF-8.
                let text = String::from_utf8_lossy(bytes).into_owned();
                if !text.is_empty() {
                    special_to_id.insert(text, id);
                    specials_by_len.push(id);
                }
            } else {
                bytes_to_id.insert(bytes.clone(), id);
            }
        }
        // Build the Unicode tables now so the first encode does not pay for them.
        categories();
        // Stable sort: equal lengths keep id order.
        specials_by_len.sort_by_key(|&id| Reverse(tokens[id as usize].len()));
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = bytes_to_id.get(&[b as u8][..]).copied();
        }
        Tokenizer {
            tokens,
            kinds,
            bytes_to_id,
            special_to_id,
            specials_by_len,
            byte_ids,
            ranks,
            pre,
            ignore_merges,
            bos,
            eos,
            eot,
            add_bos,
            chat_template,
        }
    }

    /// Encodes `text`. `add_bos` prepends the BOS token (when the vocabulary has one);
    /// `parse_special` lets control tokens written in the text (e.g. `<|eot_id|>`) become their
    /// ids. User-defined tokens are always matched whole, as in llama.cpp.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            if let Some(bos) = self.bos {
                out.push(bos);
            }
        }
        let mut scratch = Scratch::default();
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Raw(start, end) => {
                    self.encode_raw(&text[start..end], &mut scratch, &mut out)
                }
                Fragment::Token(id) => out.push(id),
            }
        }
        out
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD); special tokens appear as their text,
    /// unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(b) = self.token_bytes(id) {
                bytes.extend_from_slice(b);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes token `id` stands for (a special token's text for special tokens).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.tokens.get(id as usize).map(Vec::as_slice)
    }

    /// The token whose text is exactly `text`: special tokens by their text, normal tokens by the
    /// bytes they decode to.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.special_to_id
            .get(text)
            .or_else(|| self.bytes_to_id.get(text.as_bytes()))
            .copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (`tokenizer.ggml.eot_token_id`; Llama 3: `<|eot_id|>`).
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }

    /// Ids that end generation: eos, eot, and the usual end-of-turn special tokens present in
    /// this vocabulary. No duplicates, eos first.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = Vec::new();
        let named = [
            "<|eot_id|>",
            "<|eom_id|>",
            "<|im_end|>",
            "<|end_of_text|>",
            "<|endoftext|>",
        ]
        .into_iter()
        .filter_map(|t| self.special_to_id.get(t).copied());
        for id in [self.eos, self.eot].into_iter().flatten().chain(named) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Whether prompts should start with BOS (GGUF `tokenizer.ggml.add_bos_token`; Llama 3: yes).
    pub fn add_bos_by_default(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Control, user-defined or unknown-kind token.
    pub fn is_special(&self, id: u32) -> bool {
        self.kinds.get(id as usize).is_some_and(|k| k.is_special())
    }

    /// The token's kind, when `id` is in range.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// The chat template carried by the GGUF file (`tokenizer.chat_template`), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// Splits `text` around special tokens like llama.cpp's `tokenizer_st_partition`: for each
    /// special token, longest first, every occurrence in the remaining raw fragments is cut out.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Raw(0, text.len())];
        if text.is_empty() {
            return frags;
        }
        for &id in &self.specials_by_len {
            if !parse_special && self.kinds[id as usize] != TokenKind::UserDefined {
                continue;
            }
            let needle = &self.tokens[id as usize];
            // Special texts came from strings, so this is valid UTF-8; finds land on char bounds.
            let Ok(needle) = std::str::from_utf8(needle) else {
                continue;
            };
            let occurs = frags.iter().any(|f| match *f {
                Fragment::Raw(s, e) => text[s..e].contains(needle),
                Fragment::Token(_) => false,
            });
            if !occurs {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Raw(mut s, e) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(p) = text[s..e].find(needle) {
                    if p > 0 {
                        next.push(Fragment::Raw(s, s + p));
                    }
                    next.push(Fragment::Token(id));
                    s += p + needle.len();
                }
                if s < e {
                    next.push(Fragment::Raw(s, e));
                }
            }
            frags = next;
        }
        frags
    }

    /// Pre-tokenizes and BPE-encodes text that holds no special tokens.
    fn encode_raw(&self, text: &str, scratch: &mut Scratch, out: &mut Vec<u32>) {
        for (start, end) in split_words(text, self.pre) {
            self.encode_word(&text.as_bytes()[start..end], scratch, out);
        }
    }

    /// BPE over one word's bytes, as llama.cpp's llm_tokenizer_bpe_session: start from single
    /// bytes, repeatedly merge the adjacent pair of lowest rank (leftmost on ties).
    fn encode_word(&self, word: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges || word.len() == 1 {
            if let Some(&id) = self.bytes_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        // Symbol i starts at byte i; merged-away symbols get len 0.
        let syms = &mut scratch.syms;
        syms.clear();
        syms.extend((0..word.len()).map(|i| Sym {
            len: 1,
            prev: i as u32 as i64 - 1,
            next: if i + 1 < word.len() { i as i64 + 1 } else { -1 },
            id: self.byte_ids[word[i] as usize],
        }));
        let heap = &mut scratch.heap;
        heap.clear();
        for i in 1..word.len() {
            if let Some(c) = self.pair_rank(word, syms, i - 1, i) {
                heap.push(c);
            }
        }
        while let Some(Reverse(c)) = heap.pop() {
            let (l, r) = (c.left as usize, c.right as usize);
            // Stale unless both symbols still have the lengths the candidate was made for.
            if syms[l].len != c.left_len || syms[r].len != c.right_len || syms[l].next != r as i64 {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[l].id = Some(c.merged);
            syms[r].len = 0;
            let rn = syms[r].next;
            syms[l].next = rn;
            if rn >= 0 {
                syms[rn as usize].prev = l as i64;
            }
            let lp = syms[l].prev;
            if lp >= 0 {
                if let Some(c) = self.pair_rank(word, syms, lp as usize, l) {
                    heap.push(c);
                }
            }
            if rn >= 0 {
                if let Some(c) = self.pair_rank(word, syms, l, rn as usize) {
                    heap.push(c);
                }
            }
        }
        let mut i = 0i64;
        while i >= 0 {
            let s = &syms[i as usize];
            // A byte missing from the vocabulary is dropped, as llama.cpp does.
            if let Some(id) = s.id {
                out.push(id);
            }
            i = s.next;
        }
    }

    fn pair_rank(&self, word: &[u8], syms: &[Sym], l: usize, r: usize) -> Option<Reverse<Cand>> {
        let (ls, rs) = (&syms[l], &syms[r]);
        let (rank, merged) = match &self.ranks {
            Ranks::Pairs(map) => *map.get(&(ls.id?, rs.id?))?,
            Ranks::Bytes => {
                let id = *self.bytes_to_id.get(&word[l..r + rs.len as usize])?;
                (id, id)
            }
        };
        Some(Reverse(Cand {
            rank,
            left: l as u32,
            right: r as u32,
            left_len: ls.len,
            right_len: rs.len,
            merged,
        }))
    }
}

/// Turns token ids into text as they arrive, emitting only complete UTF-8 characters: a token
/// that ends inside a multi-byte character is held back until the rest arrives.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Adds one token and returns the text that is now complete (possibly empty). Invalid byte
    /// sequences become U+FFFD, as in [`Tokenizer::decode`].
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if let Some(b) = tokenizer.token_bytes(id) {
            self.pending.extend_from_slice(b);
        }
        self.take_complete()
    }

    /// Returns whatever is still held back (lossily), e.g. at the end of generation.
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // valid_up_to marks a valid prefix.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drop = self.pending.len() - keep;
        self.pending.drain(..drop);
        out
    }
}

#[derive(Debug, Clone, Copy)]
enum Fragment {
    Raw(usize, usize),
    Token(u32),
}

#[derive(Debug, Clone, Copy)]
struct Sym {
    len: u32,
    prev: i64,
    next: i64,
    id: Option<u32>,
}

/// A merge candidate; ordered by rank, then leftmost (llama.cpp's comparator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Cand {
    rank: u32,
    left: u32,
    right: u32,
    left_len: u32,
    right_len: u32,
    merged: u32,
}

/// Buffers reused across the words of one `encode` call.
#[derive(Default)]
struct Scratch {
    syms: Vec<Sym>,
    heap: BinaryHeap<Reverse<Cand>>,
}

const LLAMA3_NUM_SPECIAL: usize = 256;

/// Meta's special tokens in id order (llama_models 0.3.0, llama3/tokenizer.py).
fn llama3_special_tokens() -> Vec<String> {
    let named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ];
    let mut v: Vec<String> = named.iter().map(|s| s.to_string()).collect();
    for i in 0..LLAMA3_NUM_SPECIAL - named.len() {
        v.push(format!("<|reserved_special_token_{}|>", 2 + i));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode mapping.

/// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100.. in order.
fn byte_to_unicode_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// Inverse of [`byte_to_unicode_table`], indexed by code point (all targets are below 0x200).
fn unicode_to_byte_table() -> Vec<Option<u8>> {
    let mut inv = vec![None; 0x200];
    for (b, c) in byte_to_unicode_table().iter().enumerate() {
        inv[*c as usize] = Some(b as u8);
    }
    inv
}

/// Decodes a GPT-2-encoded token text to bytes; a char outside the mapping keeps its UTF-8 bytes
/// (malformed vocabularies must not make loading fail).
fn decode_gpt2_text(text: &str, inv: &[Option<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match inv.get(c as usize).copied().flatten() {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Unicode categories, as llama.cpp's unicode_cpt_flags uses them.

struct Categories {
    letter: Vec<(u32, u32)>,
    punct: Vec<(u32, u32)>,
}

/// Letter (`\p{L}`) and punctuation (`\p{P}`) ranges above ASCII, taken once from the regex
/// engine's Unicode tables (std has no general-category API).
fn categories() -> &'static Categories {
    static CATS: OnceLock<Categories> = OnceLock::new();
    CATS.get_or_init(|| {
        // Planes 4-16 hold no letters or punctuation (only tags, variation selectors and
        // private use), so scanning planes 0-3 is enough and keeps this one-time cost small.
        let all: String = (0x80u32..0x40000).filter_map(char::from_u32).collect();
        let ranges = |pattern: &str| -> Vec<(u32, u32)> {
            let Ok(re) = fancy_regex::Regex::new(pattern) else {
                return Vec::new();
            };
            re.find_iter(&all)
                .filter_map(Result::ok)
                .filter_map(|m| {
                    let s = m.as_str();
                    Some((s.chars().next()? as u32, s.chars().next_back()? as u32))
                })
                .collect()
        };
        Categories {
            letter: ranges(r"\p{L}+"),
            punct: ranges(r"\p{P}+"),
        }
    })
}

fn in_ranges(ranges: &[(u32, u32)], c: u32) -> bool {
    match ranges.binary_search_by(|&(lo, _)| lo.cmp(&c)) {
        Ok(_) => true,
        Err(0) => false,
        Err(i) => c <= ranges[i - 1].1,
    }
}

const F_LETTER: u8 = 1;
const F_NUMBER: u8 = 2;
const F_SPACE: u8 = 4;
const F_PUNCT: u8 = 8;
/// Set for every in-range code point (llama.cpp's `as_uint() != 0`).
const F_VALID: u8 = 16;

fn char_flags(c: char) -> u8 {
    let mut f = F_VALID;
    if c.is_ascii() {
        if c.is_ascii_alphabetic() {
            f |= F_LETTER;
        } else if c.is_ascii_digit() {
            f |= F_NUMBER;
        } else if c.is_ascii_whitespace() || c == '\x0B' {
            f |= F_SPACE;
        } else if c.is_ascii_punctuation() && !"$+<=>^`|~".contains(c) {
            f |= F_PUNCT;
        }
        return f;
    }
    let cats = categories();
    let u = c as u32;
    if c.is_whitespace() {
        f |= F_SPACE;
    }
    if c.is_numeric() {
        f |= F_NUMBER;
    } else if in_ranges(&cats.letter, u) {
        f |= F_LETTER;
    } else if in_ranges(&cats.punct, u) {
        f |= F_PUNCT;
    }
    f
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer: llama.cpp's unicode_regex_split, step by step over code points.

#[derive(Debug, Clone, Copy)]
enum Step {
    /// `unicode_regex_split_custom_gpt2`.
    Gpt2,
    /// `unicode_regex_split_custom_llama3` (max_digits 3) / `_qwen2` (max_digits 1).
    Llama3 { max_digits: usize },
    /// `\p{N}`: each number isolated.
    EachNumber,
    /// `\p{N}+`.
    NumberRuns,
    /// `[0-9][0-9][0-9]`.
    AsciiDigitTriples,
    /// `[\p{P}\$\+<=>\^~\|]+`.
    PunctRuns,
}

/// Splits `text` into words (byte ranges) with the pre-tokenizer's steps; each step refines the
/// pieces of the previous one, and text a pattern does not match stays as its own piece.
fn split_words(text: &str, pre: PreTokenizer) -> Vec<(usize, usize)> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut cpts = Vec::with_capacity(text.len());
    let mut flags = Vec::with_capacity(text.len());
    let mut byte_at = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        cpts.push(c);
        flags.push(char_flags(c));
        byte_at.push(i);
    }
    byte_at.push(text.len());
    let mut lens = vec![cpts.len()];
    for step in pre.steps() {
        let mut next = Vec::with_capacity(lens.len() * 2);
        let mut start = 0;
        for &len in &lens {
            let piece = Piece {
                cpts: &cpts,
                flags: &flags,
                ini: start,
                end: start + len,
            };
            match *step {
                Step::Gpt2 => piece.split_gpt2(&mut next),
                Step::Llama3 { max_digits } => piece.split_llama3(max_digits, &mut next),
                Step::EachNumber => piece.isolate(&mut next, |p, pos| {
                    (p.flags_at(pos) & F_NUMBER != 0) as usize
                }),
                Step::NumberRuns => piece.isolate(&mut next, |p, pos| {
                    let mut n = 0;
                    while p.flags_at(pos + n) & F_NUMBER != 0 {
                        n += 1;
                    }
                    n
                }),
                Step::AsciiDigitTriples => piece.isolate(&mut next, |p, pos| {
                    let digit = |i| p.cpt_at(i).is_some_and(|c: char| c.is_ascii_digit());
                    if digit(pos) && digit(pos + 1) && digit(pos + 2) {
                        3
                    } else {
                        0
                    }
                }),
                Step::PunctRuns => piece.isolate(&mut next, |p, pos| {
                    let mut n = 0;
                    while p.cpt_at(pos + n).is_some_and(|c| {
                        "$+<=>^~|".contains(c) || (p.flags_at(pos + n) & F_PUNCT != 0)
                    }) {
                        n += 1;
                    }
                    n
                }),
            }
            start += len;
        }
        lens = next;
    }
    let mut words = Vec::with_capacity(lens.len());
    let mut start = 0;
    for len in lens {
        words.push((byte_at[start], byte_at[start + len]));
        start += len;
    }
    words
}

/// One piece `[ini, end)` of the code point sequence; positions outside it read as nothing.
struct Piece<'a> {
    cpts: &'a [char],
    flags: &'a [u8],
    ini: usize,
    end: usize,
}

impl Piece<'_> {
    fn cpt_at(&self, pos: usize) -> Option<char> {
        (self.ini <= pos && pos < self.end).then(|| self.cpts[pos])
    }

    fn flags_at(&self, pos: usize) -> u8 {
        if self.ini <= pos && pos < self.end {
            self.flags[pos]
        } else {
            0
        }
    }

    /// Pieces for matches of a pattern (`match_len` at a position, 0 for none) and the gaps
    /// between them, as llama.cpp's std::regex fallback does.
    fn isolate(&self, out: &mut Vec<usize>, match_len: impl Fn(&Self, usize) -> usize) {
        let mut gap_start = self.ini;
        let mut pos = self.ini;
        while pos < self.end {
            let n = match_len(self, pos);
            if n > 0 {
                if pos > gap_start {
                    out.push(pos - gap_start);
                }
                out.push(n);
                pos += n;
                gap_start = pos;
            } else {
                pos += 1;
            }
        }
        if self.end > gap_start {
            out.push(self.end - gap_start);
        }
    }

    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    fn split_gpt2(&self, out: &mut Vec<usize>) {
        let mut pos = self.ini;
        let mut prev_end = self.ini;
        let mut add = |end: usize, out: &mut Vec<usize>| {
            if end > prev_end {
                out.push(end - prev_end);
            }
            prev_end = end;
        };
        let not_lnw = |f: u8| f & (F_LETTER | F_NUMBER | F_SPACE) == 0 && f != 0;
        while pos < self.end {
            let c = self.cpts[pos];
            let f = self.flags[pos];
            if c == '\'' && pos + 1 < self.end {
                let n = self.cpts[pos + 1];
                if matches!(n, 's' | 't' | 'm' | 'd') {
                    pos += 2;
                    add(pos, out);
                    continue;
                }
                if pos + 2 < self.end {
                    let nn = self.cpts[pos + 2];
                    if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                        pos += 3;
                        add(pos, out);
                        continue;
                    }
                }
            }
            let mut f2 = if c == ' ' { self.flags_at(pos + 1) } else { f };
            let mut matched = false;
            for class in [F_LETTER, F_NUMBER] {
                if f2 & class != 0 {
                    pos += (c == ' ') as usize;
                    while f2 & class != 0 {
                        pos += 1;
                        f2 = self.flags_at(pos);
                    }
                    matched = true;
                    break;
                }
            }
            if matched {
                add(pos, out);
                continue;
            }
            if not_lnw(f2) {
                pos += (c == ' ') as usize;
                while not_lnw(f2) {
                    pos += 1;
                    f2 = self.flags_at(pos);
                }
                add(pos, out);
                continue;
            }
            let mut nws = 0;
            while self.flags_at(pos + nws) & F_SPACE != 0 {
                nws += 1;
            }
            if nws > 1 && self.cpt_at(pos + nws).is_some() {
                // \s+(?!\S): leave the last space to the following word.
                pos += nws - 1;
            } else if nws > 0 {
                pos += nws;
            } else {
                pos += 1;
            }
            add(pos, out);
        }
    }

    /// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`; Qwen2 with `\p{N}` instead.
    fn split_llama3(&self, max_digits: usize, out: &mut Vec<usize>) {
        let mut pos = self.ini;
        let mut prev_end = self.ini;
        let mut add = |end: usize, out: &mut Vec<usize>| {
            if end > prev_end {
                out.push(end - prev_end);
            }
            prev_end = end;
        };
        let is_rn = |c: Option<char>| matches!(c, Some('\r' | '\n'));
        while pos < self.end {
            let c = self.cpts[pos];
            let f = self.flags[pos];
            if c == '\'' && pos + 1 < self.end {
                let n = self.cpts[pos + 1].to_ascii_lowercase();
                if matches!(n, 's' | 't' | 'm' | 'd') {
                    pos += 2;
                    add(pos, out);
                    continue;
                }
                if pos + 2 < self.end {
                    let nn = self.cpts[pos + 2].to_ascii_lowercase();
                    if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                        pos += 3;
                        add(pos, out);
                        continue;
                    }
                }
            }
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(c == '\r' || c == '\n' || f & F_NUMBER != 0)
                && (f & F_LETTER != 0 || self.flags_at(pos + 1) & F_LETTER != 0)
            {
                pos += 1;
                while self.flags_at(pos) & F_LETTER != 0 {
                    pos += 1;
                }
                add(pos, out);
                continue;
            }
            // \p{N}{1,3}
            if f & F_NUMBER != 0 {
                let mut ini = pos;
                while self.flags_at(pos) & F_NUMBER != 0 {
                    pos += 1;
                    if pos - ini >= max_digits {
                        add(pos, out);
                        ini = pos;
                    }
                }
                add(pos, out);
                continue;
            }
            // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
            let mut f2 = if c == ' ' { self.flags_at(pos + 1) } else { f };
            if f2 & (F_SPACE | F_LETTER | F_NUMBER) == 0 && f != 0 {
                pos += (c == ' ') as usize;
                while f2 & (F_SPACE | F_LETTER | F_NUMBER) == 0 && f2 != 0 {
                    pos += 1;
                    f2 = self.flags_at(pos);
                }
                while is_rn(self.cpt_at(pos)) {
                    pos += 1;
                }
                add(pos, out);
                continue;
            }
            let mut nws = 0;
            let mut last_rn = None;
            while self.flags_at(pos + nws) & F_SPACE != 0 {
                if is_rn(self.cpt_at(pos + nws)) {
                    last_rn = Some(pos + nws + 1);
                }
                nws += 1;
            }
            if let Some(end) = last_rn {
                // \s*[\r\n]+
                pos = end;
            } else if nws > 1 && self.cpt_at(pos + nws).is_some() {
                // \s+(?!\S)
                pos += nws - 1;
            } else if nws > 0 {
                pos += nws;
            } else {
                pos += 1;
            }
            add(pos, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str, pre: PreTokenizer) -> Vec<&str> {
        split_words(text, pre)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    #[test]
    fn llama3_split() {
        assert_eq!(
            words("Hello world's 12345  x\n\n y", PreTokenizer::Llama3),
            ["Hello", " world", "'s", " ", "123", "45", " ", " x", "\n\n", " y"]
        );
    }

    #[test]
    fn digits_gpt2_split() {
        assert_eq!(
            words("a 12 b!!  c", PreTokenizer::DigitsGpt2),
            ["a", " ", "1", "2", " b", "!!", " ", " c"]
        );
    }

    #[test]
    fn categories_cover_non_ascii() {
        assert!(char_flags('é') & F_LETTER != 0);
        assert!(char_flags('中') & F_LETTER != 0);
        assert!(char_flags('٣') & F_NUMBER != 0);
        assert!(char_flags('«') & F_PUNCT != 0);
        assert!(char_flags('\u{3000}') & F_SPACE != 0);
        assert!(char_flags('🦙') & (F_LETTER | F_NUMBER | F_SPACE) == 0);
    }

    #[test]
    fn gpt2_byte_table_is_a_bijection() {
        let inv = unicode_to_byte_table();
        let t = byte_to_unicode_table();
        for b in 0..=255u8 {
            assert_eq!(inv[t[b as usize] as usize], Some(b));
        }
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
