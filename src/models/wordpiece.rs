//! BERT's WordPiece tokenizer, from a Hugging Face `tokenizer.json` (the embedding model's):
//! the BERT normaliser (clean text, spaces around CJK ideographs, accents stripped, lower
//! case), the BERT pre-tokenizer (whitespace, and each punctuation character on its own), then
//! greedy longest-match WordPiece with the `##` continuation prefix, between `[CLS]` and `[SEP]`.

use std::collections::HashMap;
use std::path::Path;
use unicode_general_category::{get_general_category, GeneralCategory as C};
use unicode_normalization::UnicodeNormalization;

#[derive(Debug, thiserror::Error)]
pub enum WordPieceError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is not a WordPiece tokenizer.json: {message}")]
    Format { path: String, message: String },
}

pub struct WordPieceTokenizer {
    vocab: HashMap<String, u32>,
    unk: u32,
    cls: u32,
    sep: u32,
    prefix: String,
    max_word_chars: usize,
    lowercase: bool,
    strip_accents: bool,
}

impl WordPieceTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, WordPieceError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| WordPieceError::Read {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let format = |message: String| WordPieceError::Format {
            path: shown.clone(),
            message,
        };
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        let model = &doc["model"];
        if model["type"] != "WordPiece" {
            return Err(format(format!("model.type is {}", model["type"])));
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or_else(|| format("model.vocab is missing".into()))?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), u32::try_from(v.as_u64()?).ok()?)))
            .collect();
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| format(format!("the vocabulary has no {token}")))
        };
        let normalizer = &doc["normalizer"];
        let lowercase = normalizer["lowercase"].as_bool().unwrap_or(false);
        // Hugging Face: accents are stripped when asked, or (unset) when lower-casing.
        let strip_accents = normalizer["strip_accents"].as_bool().unwrap_or(lowercase);
        Ok(Self {
            unk: id(model["unk_token"].as_str().unwrap_or("[UNK]"))?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            prefix: model["continuing_subword_prefix"]
                .as_str()
                .unwrap_or("##")
                .to_string(),
            max_word_chars: model["max_input_chars_per_word"].as_u64().unwrap_or(100) as usize,
            lowercase,
            strip_accents,
            vocab,
        })
    }

    /// `[CLS] pieces… [SEP]`, at most `max_tokens` ids in all (the pieces are cut to fit).
    pub fn encode(&self, text: &str, max_tokens: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        let room = max_tokens.saturating_sub(2);
        'words: for word in pre_tokenize(&self.normalize(text)) {
            for id in self.word_pieces(&word) {
                if ids.len() > room {
                    break 'words;
                }
                ids.push(id);
            }
        }
        ids.push(self.sep);
        ids
    }

    fn normalize(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0' || c == '\u{fffd}' || is_control(c) {
                continue;
            }
            if is_whitespace(c) {
                out.push(' ');
            } else if is_cjk(c) {
                out.push(' ');
                out.push(c);
                out.push(' ');
            } else {
                out.push(c);
            }
        }
        let out: String = if self.strip_accents {
            out.nfd()
                .filter(|c| get_general_category(*c) != C::NonspacingMark)
                .collect()
        } else {
            out
        };
        if self.lowercase {
            out.to_lowercase()
        } else {
            out
        }
    }

    fn word_pieces(&self, word: &str) -> Vec<u32> {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > self.max_word_chars {
            return vec![self.unk];
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len();
            let found = loop {
                if end == start {
                    break None;
                }
                let mut piece: String = chars[start..end].iter().collect();
                if start > 0 {
                    piece.insert_str(0, &self.prefix);
                }
                if let Some(id) = self.vocab.get(&piece) {
                    break Some(*id);
                }
                end -= 1;
            };
            match found {
                Some(id) => pieces.push(id),
                None => return vec![self.unk],
            }
            start = end;
        }
        pieces
    }
}

/// Words split on whitespace, with each punctuation character a word of its own.
fn pre_tokenize(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_whitespace() {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
        } else if is_punctuation(c) {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            words.push(c.to_string());
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || get_general_category(c) == C::SpaceSeparator
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    matches!(
        get_general_category(c),
        C::Control | C::Format | C::Unassigned | C::PrivateUse
    )
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            get_general_category(c),
            C::ConnectorPunctuation
                | C::DashPunctuation
                | C::ClosePunctuation
                | C::FinalPunctuation
                | C::InitialPunctuation
                | C::OtherPunctuation
                | C::OpenPunctuation
        )
}

/// The CJK ideograph blocks BERT puts spaces around.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}
