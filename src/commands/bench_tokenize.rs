//! `cortensor bench tokenize`: how encoding cost grows with the prompt. Each shipped tokenizer
//! (the Llama 3 tiktoken vocabulary and the default model's GGUF vocabulary) encodes one
//! paragraph of mixed text repeated 1, 16 and 150 times; the figures are the best of several
//! runs, and each length's cost per token is given as a ratio to the one-paragraph cost
//! measured in the same run (near 1 when encoding is linear in the prompt).

use crate::models::fetch;
use crate::models::gguf::GgufFile;
use crate::models::tokenizer::Tokenizer;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct TokenizeArgs {
    /// Runs per length; the fastest counts.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

/// Ordinary prose with digits, brackets and non-Latin script, as prompts have.
const PARAGRAPH: &str = "The quick brown fox jumps over the lazy dog. Numbers 12345 and \
                         symbols {}[]() appear, as do names like Llama, Cortensor and 東京. ";

/// Paragraphs per prompt: the first is the baseline the others are compared with.
const REPEATS: [usize; 3] = [1, 16, 150];

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    let cache = fetch::cache_dir();
    let tiktoken = fetch::ensure(&fetch::LLAMA3_TOKENIZER, &cache, &mut |_| {})?;
    let llama3 = Tokenizer::from_tiktoken_file(&tiktoken)?;
    let model = fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &cache, &mut |_| {})?;
    let smollm2 = Tokenizer::from_gguf(&GgufFile::open(&model)?)?;
    println!(
        "encoding cost by prompt length (best of {} runs)",
        args.runs
    );
    println!(
        "{:<28} {:>10} {:>8} {:>12} {:>12} {:>18}",
        "tokenizer", "paragraphs", "tokens", "ms", "us/token", "vs 1 paragraph"
    );
    for (name, tokenizer) in [
        ("llama3 (tiktoken)", &llama3),
        ("smollm2 (gguf bpe)", &smollm2),
    ] {
        let mut baseline = None;
        for repeats in REPEATS {
            let text = PARAGRAPH.repeat(repeats);
            let (tokens, best) = encode_best_of(tokenizer, &text, args.runs);
            if tokenizer.decode(&tokens) != text {
                anyhow::bail!("{name}: {repeats} paragraphs do not decode back to the text");
            }
            let per_token = best.as_secs_f64() * 1e6 / tokens.len() as f64;
            let base = *baseline.get_or_insert(per_token);
            println!(
                "{name:<28} {repeats:>10} {:>8} {:>12.3} {per_token:>12.3} {:>17.2}x",
                tokens.len(),
                best.as_secs_f64() * 1e3,
                per_token / base
            );
        }
    }
    Ok(())
}

/// The tokens of `text` and the fastest of `runs` encodings.
fn encode_best_of(tokenizer: &Tokenizer, text: &str, runs: usize) -> (Vec<u32>, Duration) {
    let mut best = Duration::MAX;
    let mut tokens = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        tokens = tokenizer.encode(text, false, false);
        best = best.min(started.elapsed());
    }
    (tokens, best)
}
