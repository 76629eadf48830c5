//! Determinism across chunks: a generation continued after an accepted prefix (the request's
//! `prefix`, as the next chunk of a long generation or another miner taking over would run
//! it) produces exactly the tokens and the text of the whole generation on the same backend,
//! greedy or sampled with a seed, with penalties and stop strings: the real SmolLM2 on the CPU.

use cortensor::models::engine::{
    CancelToken, EngineOptions, FinishReason, GenerateRequest, Generation, InferenceEngine,
    LlamaEngine, Prompt,
};
use cortensor::models::fetch;
use cortensor::models::sampling::SamplingParams;

fn engine() -> LlamaEngine {
    let model = fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &fetch::cache_dir(), &mut |_| {}).unwrap();
    let mut opts = EngineOptions::new(model);
    opts.backend = cortensor::models::backend::BackendChoice::Cpu;
    opts.threads = 2;
    opts.max_context = 512;
    LlamaEngine::load(&opts).unwrap()
}

/// Runs `request` in chunks of `chunk` tokens, each continuing after the previous one's
/// output; returns the last result and the token indexes streamed.
fn chunked(
    engine: &mut LlamaEngine,
    request: &GenerateRequest,
    chunk: usize,
) -> (Generation, Vec<usize>) {
    let mut prefix: Vec<u32> = Vec::new();
    let mut indexes = Vec::new();
    loop {
        let left = request.max_tokens - prefix.len();
        let part = GenerateRequest {
            max_tokens: left.min(chunk),
            prefix: prefix.clone(),
            ..request.clone()
        };
        let g = engine
            .generate(&part, &CancelToken::new(), &mut |e| indexes.push(e.index))
            .unwrap();
        assert!(g.token_ids.starts_with(&prefix), "a chunk keeps its prefix");
        if g.finish_reason != FinishReason::Length || g.token_ids.len() >= request.max_tokens {
            return (g, indexes);
        }
        prefix = g.token_ids;
    }
}

#[test]
fn chunked_generation_matches_the_whole_generation() {
    let mut engine = engine();
    let prompt = Prompt::Text("Once upon a time, in a village by the sea,".into());
    let cases = [
        ("greedy", SamplingParams::greedy(), vec![]),
        (
            "sampled t0.9 top-p 0.95",
            SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                seed: 7,
                ..SamplingParams::default()
            },
            vec![],
        ),
        (
            "sampled with penalties",
            SamplingParams {
                temperature: 1.0,
                top_k: 40,
                repeat_penalty: 1.15,
                presence_penalty: 0.3,
                seed: 1234,
                ..SamplingParams::default()
            },
            vec![],
        ),
        (
            "greedy with a stop string",
            SamplingParams::greedy(),
            vec![" the sea".to_string(), "\n\n".to_string()],
        ),
    ];
    for (name, params, stop) in cases {
        let request = GenerateRequest {
            prompt: prompt.clone(),
            params,
            max_tokens: 40,
            stop,
            prefix: vec![],
        };
        let whole = engine
            .generate(&request, &CancelToken::new(), &mut |_| {})
            .unwrap();
        for chunk in [7, 16] {
            let (parts, indexes) = chunked(&mut engine, &request, chunk);
            assert_eq!(
                parts.token_ids, whole.token_ids,
                "{name}, chunks of {chunk}: tokens"
            );
            assert_eq!(parts.text, whole.text, "{name}, chunks of {chunk}: text");
            assert_eq!(
                parts.finish_reason, whole.finish_reason,
                "{name}, chunks of {chunk}"
            );
            // Streamed indexes count the whole output: chunks continue where the last stopped.
            let mut sorted = indexes.clone();
            sorted.dedup();
            assert!(
                sorted.windows(2).all(|w| w[0] <= w[1]),
                "{name}: indexes go forward across chunks: {indexes:?}"
            );
        }
        assert!(!whole.token_ids.is_empty(), "{name} generated something");
    }
}
