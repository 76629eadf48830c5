//! `cortensor generate`: run a prompt through a model and stream the tokens to stdout.

use crate::models::backend::BackendChoice;
use crate::models::chat::ChatMessage;
use crate::models::engine::{
    CancelToken, EngineOptions, GenerateRequest, InferenceEngine, LlamaEngine, Prompt,
};
use crate::models::fetch;
use crate::models::sampling::SamplingParams;
use anyhow::Context;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// A GGUF file or a Hugging Face directory (config.json + *.safetensors). Default: the
    /// fetched SmolLM2-135M-Instruct Q4_1.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// auto (a real GPU through wgpu, else the CPU), wgpu, or cpu.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// CPU threads; 0 = all cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// KV-cache positions (bounded by the model's context).
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// A tiktoken tokenizer.model for models that carry no tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
}

/// The model to use: the given path, or the default one, fetched (with progress) if missing.
pub fn resolve_model(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match model {
        Some(p) if p.exists() => Ok(p),
        Some(p) => anyhow::bail!("model {} does not exist", p.display()),
        None => {
            let dir = fetch::cache_dir();
            let mut progress = fetch::print_progress(fetch::SMOLLM2_135M_Q4_1.name);
            fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &dir, &mut progress)
                .context("fetching the default model (cortensor models fetch)")
        }
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let model = resolve_model(args.model.clone())?;
    let mut opts = EngineOptions::new(&model);
    opts.backend = args.backend;
    opts.threads = args.threads;
    opts.max_context = args.context;
    opts.tokenizer = args.tokenizer.clone();
    let mut engine =
        LlamaEngine::load(&opts).with_context(|| format!("loading {}", model.display()))?;
    let info = engine.info();
    eprintln!(
        "model: {} ({:.1} MB of weights)",
        info.model,
        info.weight_bytes as f64 / 1e6
    );
    eprintln!("backend: {}", info.backend_description);
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        Prompt::Chat(messages)
    } else {
        Prompt::Text(args.prompt.clone())
    };
    let request = GenerateRequest {
        prompt,
        params: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repeat_penalty: args.repeat_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        prefix: vec![],
    };
    let stream = args.format == OutputFormat::Text;
    let mut stdout = std::io::stdout().lock();
    let generation = engine.generate(&request, &CancelToken::new(), &mut |event| {
        if stream && !event.text.is_empty() {
            // A closed stdout (e.g. piped into `head`) must not abort generation mid-way.
            let _ = stdout.write_all(event.text.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    if stream {
        let _ = writeln!(stdout);
        eprintln!(
            "[{} prompt tokens, {} generated, finish: {:?}; prefill {:.1} tok/s, decode {:.1} tok/s]",
            generation.prompt_tokens,
            generation.token_ids.len(),
            generation.finish_reason,
            generation.prefill_tok_s,
            generation.decode_tok_s
        );
    } else {
        let out = json!({
            "model": info.model,
            "backend": info.backend,
            "backend_description": info.backend_description,
            "prompt_tokens": generation.prompt_tokens,
            "token_ids": generation.token_ids,
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "prefill_ms": generation.prefill_ms,
            "decode_ms": generation.decode_ms,
            "prefill_tok_s": generation.prefill_tok_s,
            "decode_tok_s": generation.decode_tok_s,
        });
        writeln!(stdout, "{out}")?;
    }
    Ok(())
}
