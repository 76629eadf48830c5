//! Proof of Inference on real embeddings (all-MiniLM-L6-v2): honest paraphrases form the
//! agreeing cluster, a forged answer is flagged, and disagreement leaves no majority.

use burn::tensor::Device;
use cortensor::models::bert::Embedder;
use cortensor::models::fetch;
use cortensor::validation::poi::{poi, DEFAULT_POI_THRESHOLD};

fn embed_all(texts: &[&str]) -> Vec<Vec<f32>> {
    let dir = fetch::embedding_model_dir(&fetch::cache_dir())
        .expect("all-MiniLM-L6-v2 in the cache (scripts/setup fetches it)");
    let e = Embedder::load(&dir, &Device::flex()).unwrap();
    texts.iter().map(|t| e.embed(t).unwrap()).collect()
}

#[test]
fn paraphrases_agree_and_a_forged_answer_is_an_outlier() {
    let v = embed_all(&[
        "The capital of France is Paris.",
        "Paris is the capital of France.",
        "I like turtles, and the weather is nice today.",
        "France's capital city is Paris.",
    ]);
    let out = poi(&v, DEFAULT_POI_THRESHOLD).unwrap();
    assert_eq!(out.cluster, vec![0, 1, 3], "{out:?}");
    assert_eq!(out.outliers, vec![2]);
    assert!(out.has_majority());
    assert!(out.similarity_to_medoid[2] < 0.3, "{out:?}");
}

#[test]
fn identical_results_all_agree() {
    let v = embed_all(&["Water boils at 100 degrees Celsius at sea level."; 3]);
    let out = poi(&v, DEFAULT_POI_THRESHOLD).unwrap();
    assert_eq!(out.cluster, vec![0, 1, 2]);
    assert!(out.outliers.is_empty());
    assert!(out.similarity_to_medoid.iter().all(|s| *s > 0.9999));
}

#[test]
fn two_different_answers_have_no_majority() {
    let v = embed_all(&[
        "The capital of France is Paris.",
        "Photosynthesis converts light energy into chemical energy.",
    ]);
    let out = poi(&v, DEFAULT_POI_THRESHOLD).unwrap();
    assert_eq!(out.cluster.len(), 1);
    assert_eq!(out.outliers.len(), 1);
    assert!(!out.has_majority());
}

#[test]
fn the_medoid_is_the_result_closest_to_the_others() {
    // Unit vectors on a circle: 0° and 20° and 40°; 40° is nearer 20° than 0° is to 40°.
    let at = |deg: f32| vec![deg.to_radians().cos(), deg.to_radians().sin()];
    let out = poi(&[at(0.0), at(20.0), at(40.0), at(180.0)], 0.9).unwrap();
    assert_eq!(out.medoid, 1);
    assert_eq!(out.cluster, vec![0, 1, 2]);
    assert_eq!(out.outliers, vec![3]);
    assert!(poi(&[], 0.85).is_none());
    let lone = poi(&[at(10.0)], 0.85).unwrap();
    assert_eq!((lone.cluster.clone(), lone.has_majority()), (vec![0], true));
}
