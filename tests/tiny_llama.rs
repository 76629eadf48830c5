//! A tiny Llama-3-shaped model (grouped-query attention, Llama 3 rope scaling, the 128k
//! vocabulary) written by this test both as GGUF (Meta/GGUF interleaved rotary layout, scaling
//! as a `rope_freqs` tensor) and as a Hugging Face directory (half-split rotary layout, scaling
//! in config.json). Both must load and give the same logits: that checks both loaders, both
//! rotary layouts and both ways of giving the scaling against each other.
//!
//! The same model also checks the quantized CPU path against the dense one, the KV cache
//! (prefill vs token-by-token) and the wgpu backend against the CPU backend.

use burn::tensor::Device;
use cortensor::models::backend::BackendKind;
use cortensor::models::gguf::{GgufArray, GgufValue};
use cortensor::models::gguf_write::GgufWriter;
use cortensor::models::llama::Llama;
use cortensor::models::quant::{self, GgmlType};
use cortensor::models::safetensors::write_safetensors;
use cortensor::models::weights;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

const VOCAB: usize = 128_256;
const DIM: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = DIM / HEADS;
const FF: usize = 128;
const LAYERS: usize = 2;
const THETA: f64 = 500_000.0;
const SEED: u64 = 20261125;

struct Tensors {
    /// (HF name, GGUF name, row-major shape, values in Hugging Face layout)
    list: Vec<(String, String, Vec<usize>, Vec<f32>)>,
}

fn random_model(seed: u64) -> Tensors {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut list = Vec::new();
    let mut add = |rng: &mut ChaCha8Rng,
                   hf: String,
                   gg: String,
                   shape: Vec<usize>,
                   scale: f32,
                   around: f32| {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| around + rng.gen_range(-scale..scale))
            .collect();
        list.push((hf, gg, shape, v));
    };
    add(
        &mut rng,
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![VOCAB, DIM],
        1.0,
        0.0,
    );
    for i in 0..LAYERS {
        let hf = |s: &str| format!("model.layers.{i}.{s}.weight");
        let gg = |s: &str| format!("blk.{i}.{s}.weight");
        let w = 1.0 / (DIM as f32).sqrt();
        add(
            &mut rng,
            hf("input_layernorm"),
            gg("attn_norm"),
            vec![DIM],
            0.2,
            1.0,
        );
        add(
            &mut rng,
            hf("self_attn.q_proj"),
            gg("attn_q"),
            vec![HEADS * HEAD_DIM, DIM],
            w * 2.0,
            0.0,
        );
        add(
            &mut rng,
            hf("self_attn.k_proj"),
            gg("attn_k"),
            vec![KV_HEADS * HEAD_DIM, DIM],
            w * 2.0,
            0.0,
        );
        add(
            &mut rng,
            hf("self_attn.v_proj"),
            gg("attn_v"),
            vec![KV_HEADS * HEAD_DIM, DIM],
            w,
            0.0,
        );
        add(
            &mut rng,
            hf("self_attn.o_proj"),
            gg("attn_output"),
            vec![DIM, HEADS * HEAD_DIM],
            w,
            0.0,
        );
        add(
            &mut rng,
            hf("post_attention_layernorm"),
            gg("ffn_norm"),
            vec![DIM],
            0.2,
            1.0,
        );
        add(
            &mut rng,
            hf("mlp.gate_proj"),
            gg("ffn_gate"),
            vec![FF, DIM],
            w,
            0.0,
        );
        add(
            &mut rng,
            hf("mlp.up_proj"),
            gg("ffn_up"),
            vec![FF, DIM],
            w,
            0.0,
        );
        add(
            &mut rng,
            hf("mlp.down_proj"),
            gg("ffn_down"),
            vec![DIM, FF],
            1.0 / (FF as f32).sqrt(),
            0.0,
        );
    }
    add(
        &mut rng,
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![DIM],
        0.2,
        1.0,
    );
    add(
        &mut rng,
        "lm_head.weight".into(),
        "output.weight".into(),
        vec![VOCAB, DIM],
        0.5,
        0.0,
    );
    Tensors { list }
}

/// llama.cpp's converter permutes Hugging Face Q/K rows back to Meta's interleaved pairs:
/// GGUF row (head h, 2i + s) = HF row (head h, s * head_dim/2 + i).
fn hf_to_interleaved(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..HEAD_DIM / 2 {
            for s in 0..2 {
                let dst = h * HEAD_DIM + 2 * i + s;
                let src = h * HEAD_DIM + s * HEAD_DIM / 2 + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3.1's scaling written out here from Meta's reference `apply_scaling`, independently
/// of the library, as the per-pair divisors llama.cpp stores in `rope_freqs.weight`.
fn rope_freq_divisors() -> Vec<f32> {
    let (factor, low, high, old) = (8.0f64, 1.0f64, 4.0f64, 8192.0f64);
    (0..HEAD_DIM / 2)
        .map(|i| {
            let freq = 1.0 / THETA.powf(2.0 * i as f64 / HEAD_DIM as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let new = if wavelen < old / high {
                freq
            } else if wavelen > old / low {
                freq / factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * freq / factor + smooth * freq
            };
            (freq / new) as f32
        })
        .collect()
}

fn write_hf(dir: &Path, t: &Tensors, dtype: &str) {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": DIM,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": THETA,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // Two shards, as large checkpoints come.
    let (a, b): (Vec<_>, Vec<_>) = t.list.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    for (k, part) in [a, b].into_iter().enumerate() {
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = part
            .into_iter()
            .map(|(_, (hf, _, s, v))| (hf.clone(), s.clone(), v.clone()))
            .collect();
        write_safetensors(
            &dir.join(format!("model-0000{}-of-00002.safetensors", k + 1)),
            &tensors,
            dtype,
        )
        .unwrap();
    }
}

/// Writes the GGUF; matrices in `matrix_type` (F32 or a quant type), vectors in F32.
fn write_gguf(path: &Path, t: &Tensors, matrix_type: GgmlType) {
    let mut w = GgufWriter::new();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    w.add_metadata("general.name", GgufValue::String("tiny-llama3".into()));
    w.add_metadata("llama.vocab_size", u32v(VOCAB));
    w.add_metadata("llama.context_length", u32v(131072));
    w.add_metadata("llama.embedding_length", u32v(DIM));
    w.add_metadata("llama.feed_forward_length", u32v(FF));
    w.add_metadata("llama.block_count", u32v(LAYERS));
    w.add_metadata("llama.attention.head_count", u32v(HEADS));
    w.add_metadata("llama.attention.head_count_kv", u32v(KV_HEADS));
    w.add_metadata("llama.rope.dimension_count", u32v(HEAD_DIM));
    w.add_metadata("llama.rope.freq_base", GgufValue::F32(THETA as f32));
    w.add_metadata(
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F32(1e-5),
    );
    w.add_metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()));
    w.add_metadata(
        "tokenizer.ggml.tokens",
        GgufValue::Array(GgufArray::String(vec!["a".into()])),
    );
    let divisors = rope_freq_divisors();
    w.add_tensor(
        "rope_freqs.weight",
        &[divisors.len() as u64],
        GgmlType::F32,
        quant::encode_float(GgmlType::F32, &divisors).unwrap(),
    )
    .unwrap();
    for (_, name, shape, values) in &t.list {
        let values = if name.ends_with("attn_q.weight") {
            hf_to_interleaved(values, HEADS, DIM)
        } else if name.ends_with("attn_k.weight") {
            hf_to_interleaved(values, KV_HEADS, DIM)
        } else {
            values.clone()
        };
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let (ty, bytes) = if shape.len() == 2 {
            match matrix_type {
                GgmlType::Q8_0 => (matrix_type, quant::quantize_q8_0(&values)),
                GgmlType::Q4_0 => (matrix_type, quant::quantize_q4_0(&values)),
                GgmlType::Q4_1 => (matrix_type, quant::quantize_q4_1(&values)),
                float => (float, quant::encode_float(float, &values).unwrap()),
            }
        } else {
            (
                GgmlType::F32,
                quant::encode_float(GgmlType::F32, &values).unwrap(),
            )
        };
        w.add_tensor(name.as_str(), &dims, ty, bytes).unwrap();
    }
    w.write(path).unwrap();
}

const PROMPT: [u32; 9] = [128000, 9906, 1917, 0, 42, 128255, 100000, 77, 5];

fn logits_all(path: &Path, device: Device, backend: BackendKind) -> Vec<f32> {
    let w = weights::load(path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    let model = Llama::new(w.clone(), &device, backend, 64).unwrap();
    let mut s = model.new_session(64);
    model.forward(&mut s, &PROMPT, true).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax_rows(v: &[f32]) -> Vec<usize> {
    v.chunks(VOCAB)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        })
        .collect()
}

#[test]
fn gguf_and_safetensors_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let t = random_model(SEED);
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    write_hf(&hf, &t, "F32");
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &t, GgmlType::F32);

    let a = logits_all(&gguf, Device::flex(), BackendKind::Cpu);
    let b = logits_all(&hf, Device::flex(), BackendKind::Cpu);
    assert_eq!(a.len(), PROMPT.len() * VOCAB);
    // Same f32 weights, same arithmetic up to the order of the rotary pairs: only rounding
    // differs (logits here are O(1..10)).
    let d = max_diff(&a, &b);
    assert!(
        d < 1e-3,
        "GGUF vs safetensors logits differ by {d} (seed {SEED})"
    );
    assert_eq!(argmax_rows(&a), argmax_rows(&b));

    // A bf16 checkpoint of the same weights stays close (bf16 keeps 8 bits of mantissa).
    let hf16 = dir.path().join("hf16");
    std::fs::create_dir(&hf16).unwrap();
    write_hf(&hf16, &t, "BF16");
    let c = logits_all(&hf16, Device::flex(), BackendKind::Cpu);
    let d16 = max_diff(&a, &c);
    assert!(d16 < 0.25, "bf16 logits differ by {d16} (seed {SEED})");
}

#[test]
fn rope_scaling_matters() {
    // Without the rope_freqs tensor the long-wavelength pairs rotate faster, which changes
    // the logits at later positions: proves the scaling is applied, not ignored.
    let dir = tempfile::tempdir().unwrap();
    let t = random_model(SEED);
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    write_hf(&hf, &t, "F32");
    let scaled = logits_all(&hf, Device::flex(), BackendKind::Cpu);
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    cfg["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    let plain = logits_all(&hf, Device::flex(), BackendKind::Cpu);
    assert!(max_diff(&scaled, &plain) > 1e-3);
}

#[test]
fn prefill_equals_token_by_token_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    write_gguf(&gguf, &random_model(SEED), GgmlType::F32);
    let w = weights::load(&gguf).unwrap();
    let model = Llama::new(w.clone(), &Device::flex(), BackendKind::Cpu, 64).unwrap();
    let mut s = model.new_session(64);
    let batch = model.forward(&mut s, &PROMPT, false).unwrap();
    let mut s = model.new_session(64);
    let mut last = Vec::new();
    for &t in &PROMPT {
        last = model.forward(&mut s, &[t], false).unwrap();
    }
    let d = max_diff(&batch, &last);
    assert!(d < 1e-3, "prefill vs step-by-step differ by {d}");
    // The context bound holds: 64 positions, no more.
    let mut s = model.new_session(10);
    assert!(model.forward(&mut s, &[1; 11], false).is_err());
    // Out-of-vocabulary ids are errors, not panics.
    let mut s = model.new_session(10);
    assert!(model.forward(&mut s, &[VOCAB as u32], false).is_err());
}

#[test]
fn quantized_cpu_path_tracks_the_dense_model() {
    let dir = tempfile::tempdir().unwrap();
    let t = random_model(SEED);
    let dense = dir.path().join("f32.gguf");
    write_gguf(&dense, &t, GgmlType::F32);
    let f32_model = logits_all(&dense, Device::flex(), BackendKind::Cpu);
    let f32_last = &f32_model[(PROMPT.len() - 1) * VOCAB..];
    let scale = f32_last.iter().fold(0f32, |m, v| m.max(v.abs()));
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0] {
        let path = dir.path().join(format!("{}.gguf", ty.name()));
        write_gguf(&path, &t, ty);
        let w = weights::load(&path).unwrap();
        // Reference: the same quantized weights, dequantized to f32 at load.
        let reference =
            Llama::new_dequantized(w.clone(), &Device::flex(), BackendKind::Cpu, 64).unwrap();
        let mut s = reference.new_session(64);
        let ref_all = reference.forward(&mut s, &PROMPT, true).unwrap();
        let ref_last = &ref_all[(PROMPT.len() - 1) * VOCAB..];
        let packed = Llama::new(w.clone(), &Device::flex(), BackendKind::Cpu, 64).unwrap();
        // Prefill of 9 rows (all logits, so the output layer too) dequantizes each matrix and
        // uses the dense product: the same numbers as the reference.
        let mut s = packed.new_session(64);
        let prefill_all = packed.forward(&mut s, &PROMPT, true).unwrap();
        let d = max_diff(&prefill_all, &ref_all);
        assert!(
            d < 1e-3,
            "{ty:?}: packed prefill vs dequantized reference differ by {d}"
        );
        // One row at a time runs the integer kernels on 8-bit activations: each product is
        // off by at most ~1/254 of its activations' range, so logits of size ~10 move by
        // hundredths.
        let mut s = packed.new_session(64);
        let mut stepwise = Vec::new();
        for &tok in &PROMPT {
            stepwise = packed.forward(&mut s, &[tok], false).unwrap();
        }
        let d = max_diff(&stepwise, ref_last);
        assert!(
            d < 0.05 * scale,
            "{ty:?}: integer decode vs reference differ by {d} (logit scale {scale})"
        );
        // Sanity against the unquantized model: Q8 is close; 4-bit weights of a random
        // (hence incompressible) model move logits by up to ~10% of their range.
        let dq = max_diff(ref_last, f32_last);
        let bound = if ty == GgmlType::Q8_0 { 0.01 } else { 0.2 } * scale;
        assert!(
            dq < bound,
            "{ty:?}: logits differ from the f32 model by {dq} (scale {scale})"
        );
    }
}

#[test]
fn wgpu_backend_agrees_with_cpu_backend() {
    // CI has no GPU: this runs on Mesa's software Vulkan driver (installed by scripts/setup),
    // which exercises the same burn-wgpu path a GPU would.
    let selected =
        cortensor::models::backend::select(cortensor::models::backend::BackendChoice::Wgpu, 1)
            .expect("a wgpu adapter (scripts/setup installs mesa-vulkan-drivers)");
    let dir = tempfile::tempdir().unwrap();
    let t = random_model(SEED);
    let gguf = dir.path().join("q8.gguf");
    write_gguf(&gguf, &t, GgmlType::Q8_0);
    let cpu = logits_all(&gguf, Device::flex(), BackendKind::Cpu);
    let gpu = logits_all(&gguf, selected.device, BackendKind::Wgpu);
    // Same (dequantized) weights; the GPU's f32 reductions run in another order.
    let d = max_diff(&cpu, &gpu);
    assert!(
        d < 1e-2,
        "wgpu vs cpu logits differ by {d} ({})",
        selected.description
    );
    assert_eq!(argmax_rows(&cpu), argmax_rows(&gpu));
}

/// The CPU backend decodes quantized models on the host: several rows in one pass with
/// decoding's numerics (a validator's replay) give every row's logits bit for bit as one token
/// at a time does, and a session prefilled through the dense path continues there.
#[test]
fn host_decoding_is_the_same_bits_one_row_or_many() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4_1.gguf");
    write_gguf(&path, &random_model(SEED), GgmlType::Q4_1);
    let model = Llama::new(
        weights::load(&path).unwrap(),
        &Device::flex(),
        BackendKind::Cpu,
        64,
    )
    .unwrap();
    let mut one_by_one = Vec::new();
    let mut s = model.new_session(64);
    for &t in &PROMPT {
        one_by_one.extend(model.forward(&mut s, &[t], false).unwrap());
    }
    let mut s = model.new_session(64);
    s.decode_numerics = true;
    let together = model.forward(&mut s, &PROMPT, true).unwrap();
    assert_eq!(together.len(), one_by_one.len());
    assert!(
        together
            .iter()
            .zip(&one_by_one)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "rows in one pass differ from one at a time"
    );
    // Dense prefill of the prompt (9 rows), then two decoded tokens: close to decoding all of
    // it step by step (the prefill's f32 activations differ from 8-bit ones by hundredths).
    let mut dense = model.new_session(64);
    model.forward(&mut dense, &PROMPT, false).unwrap();
    let after_dense = model.forward(&mut dense, &[3, 4], false).unwrap();
    let mut steps = s.clone();
    let after_steps = model.forward(&mut steps, &[3, 4], false).unwrap();
    let scale = after_steps.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_diff(&after_dense, &after_steps);
    assert!(
        d < 0.05 * scale,
        "continuing a dense prefill differs by {d} (scale {scale})"
    );
    assert_eq!(dense.position(), PROMPT.len() + 2);
}
