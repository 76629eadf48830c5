//! Determinism across chunks: a generation continued after an accepted prefix (the request's
//! `prefix`, as the next chunk of a long generation or another miner taking over would run
//! it) produces exactly the tokens and the text of the whole generation on the same backend,
//! greedy or sampled with a seed, with penalties and stop strings: the real SmolLM2 on the CPU.
//! Both ways a chunk runs: on the engine that made the chunk before (which continues the
//! session it kept) and on another engine (which runs the prompt and the prefix again).

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
/// output, chunk i on `engines[i % engines.len()]`; returns the last result and the token
/// indexes streamed.
fn chunked(
    engines: &mut [LlamaEngine],
    request: &GenerateRequest,
    chunk: usize,
) -> (Generation, Vec<usize>) {
    let mut prefix: Vec<u32> = Vec::new();
    let mut indexes = Vec::new();
    for i in 0.. {
        let count = engines.len();
        let engine = &mut engines[i % count];
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
    unreachable!()
}

#[test]
fn chunked_generation_matches_the_whole_generation() {
    let mut engines = [engine(), engine()];
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
        let whole = engines[0]
            .generate(&request, &CancelToken::new(), &mut |_| {})
            .unwrap();
        for (chunk, on) in [(7, 1), (7, 2), (16, 1), (16, 2)] {
            let name = &format!("{name} on {on} engine(s)");
            let (parts, indexes) = chunked(&mut engines[..on], &request, chunk);
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

#[test]
fn a_chunk_replayed_as_a_continuation_checks_what_the_whole_replay_checks() {
    // What validators do: each chunk's results replayed with the accepted output as the
    // prefix, twice per chunk (two miners' results), on one engine that keeps its session
    // between replays; against one replay of the whole output on a fresh engine.
    let mut validator = engine();
    let request = GenerateRequest {
        prompt: Prompt::Text("The old lighthouse keeper looked at the storm and".into()),
        params: SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            repeat_penalty: 1.1,
            seed: 99,
            ..SamplingParams::default()
        },
        max_tokens: 36,
        stop: vec![],
        prefix: vec![],
    };
    let output = validator
        .generate(&request, &CancelToken::new(), &mut |_| {})
        .unwrap();
    assert_eq!(output.token_ids.len(), 36, "the model stopped early");
    let whole = engine().replay(&request, &output.token_ids).unwrap();
    assert!(whole.checks.iter().all(|c| c.drawn != u32::MAX));
    let mut checks = Vec::new();
    for chunk in output.token_ids.chunks(12).scan(0, |end, c| {
        *end += c.len();
        Some(*end)
    }) {
        let from = checks.len();
        let part = GenerateRequest {
            prefix: output.token_ids[..from].to_vec(),
            max_tokens: chunk - from,
            ..request.clone()
        };
        let claimed = &output.token_ids[..chunk];
        let first = validator.replay(&part, claimed).unwrap();
        let second = validator.replay(&part, claimed).unwrap();
        assert_eq!(first.checks, second.checks, "the same chunk replayed twice");
        assert_eq!(
            first.checks.len(),
            chunk - from,
            "only the new tokens are checked"
        );
        assert_eq!(first.budget, chunk - from);
        checks.extend(first.checks);
    }
    assert_eq!(
        checks, whole.checks,
        "chunk by chunk = the whole output at once"
    );
    // A claimed output that does not continue the prefix is refused, not judged.
    let part = GenerateRequest {
        prefix: vec![output.token_ids[0] + 1],
        ..request.clone()
    };
    assert!(validator.replay(&part, &output.token_ids).is_err());
}
