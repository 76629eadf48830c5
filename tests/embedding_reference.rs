//! all-MiniLM-L6-v2 in burn against reference embeddings made independently
//! (tests/fixtures/minilm/embeddings.json, by scripts/make_embedding_fixtures.py: Hugging Face
//! `tokenizers` for the ids, a float64 numpy forward pass for the vectors): the same token ids,
//! and cosine ≥ 0.999 to every reference vector, on the CPU backend and on wgpu.

use burn::tensor::Device;
use cortensor::models::backend::{select, BackendChoice};
use cortensor::models::bert::{cosine, Embedder};
use cortensor::models::fetch;

struct Case {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/minilm/embeddings.json"
    ))
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: serde_json::from_value(c["ids"].clone()).unwrap(),
            embedding: serde_json::from_value(c["embedding"].clone()).unwrap(),
        })
        .collect()
}

fn embedder(device: &Device) -> Embedder {
    let dir = fetch::embedding_model_dir(&fetch::cache_dir())
        .expect("all-MiniLM-L6-v2 in the cache (scripts/setup fetches it)");
    Embedder::load(&dir, device).expect("the model loads")
}

#[test]
fn token_ids_match_hugging_face_tokenizers() {
    let e = embedder(&Device::flex());
    for c in cases() {
        assert_eq!(e.token_ids(&c.text), c.ids, "{:?}", c.text);
    }
}

#[test]
fn embeddings_match_the_reference_on_cpu() {
    let e = embedder(&Device::flex());
    let all = cases();
    let mut ours = Vec::new();
    let mut worst = 1.0f32;
    for c in &all {
        let v = e.embed(&c.text).unwrap();
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{:?}: norm {norm}", c.text);
        let sim = cosine(&v, &c.embedding);
        assert!(sim >= 0.999, "{:?}: cosine {sim} to the reference", c.text);
        worst = worst.min(sim);
        ours.push(v);
    }
    eprintln!("lowest cosine to the reference on cpu: {worst:.6}");
    // What validators rely on: paraphrases are close, unrelated texts are not.
    let paraphrase = cosine(&ours[0], &ours[1]);
    let unrelated = cosine(&ours[0], &ours[2]);
    assert!(paraphrase > 0.9, "paraphrases: {paraphrase}");
    assert!(unrelated < 0.3, "unrelated: {unrelated}");
}

#[test]
fn embeddings_match_the_reference_on_wgpu() {
    // CI has no GPU: Mesa's software Vulkan driver (installed by scripts/setup) runs the same
    // burn-wgpu path a GPU would.
    let selected = select(BackendChoice::Wgpu, 1)
        .expect("a wgpu adapter (scripts/setup installs mesa-vulkan-drivers)");
    let e = embedder(&selected.device);
    for c in cases().iter().take(4) {
        let sim = cosine(&e.embed(&c.text).unwrap(), &c.embedding);
        assert!(
            sim >= 0.999,
            "{:?}: cosine {sim} on {}",
            c.text,
            selected.description
        );
    }
}
