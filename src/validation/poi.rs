//! Proof of Inference (PoI): redundant results of one task should say the same thing. Their
//! embeddings are compared pairwise by cosine similarity; the agreeing cluster is every result
//! within `threshold` of the medoid (the result most similar to all the others); the rest are
//! outliers. Cortensor's default threshold is 0.85.

use crate::models::bert::cosine;

/// Cortensor's default PoI similarity threshold.
pub const DEFAULT_POI_THRESHOLD: f32 = 0.85;

#[derive(Clone, Debug, PartialEq)]
pub struct PoiOutcome {
    /// Indexes of the results that agree with the medoid, ascending (the medoid included).
    pub cluster: Vec<usize>,
    /// Indexes of the results below the threshold, ascending.
    pub outliers: Vec<usize>,
    /// The result most similar to all others (ties: the lowest index).
    pub medoid: usize,
    /// Each result's similarity to the medoid.
    pub similarity_to_medoid: Vec<f32>,
    /// Pairwise cosine similarities.
    pub similarity: Vec<Vec<f32>>,
}

impl PoiOutcome {
    /// More than half of the results agree.
    pub fn has_majority(&self) -> bool {
        self.cluster.len() * 2 > self.similarity.len()
    }
}

/// Clusters `embeddings` (one per result); `None` when there are none.
pub fn poi(embeddings: &[Vec<f32>], threshold: f32) -> Option<PoiOutcome> {
    let n = embeddings.len();
    if n == 0 {
        return None;
    }
    let similarity: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| cosine(&embeddings[i], &embeddings[j]))
                .collect()
        })
        .collect();
    // The medoid: most results within the threshold, then the largest total similarity.
    let score = |i: usize| {
        let close = similarity[i].iter().filter(|s| **s >= threshold).count();
        let total: f32 = similarity[i].iter().sum();
        (close, total)
    };
    let mut medoid = 0;
    for i in 1..n {
        let (a, b) = (score(i), score(medoid));
        if a.0 > b.0 || (a.0 == b.0 && a.1 > b.1) {
            medoid = i;
        }
    }
    let similarity_to_medoid = similarity[medoid].clone();
    let (cluster, outliers): (Vec<usize>, Vec<usize>) =
        (0..n).partition(|&i| similarity_to_medoid[i] >= threshold);
    Some(PoiOutcome {
        cluster,
        outliers,
        medoid,
        similarity_to_medoid,
        similarity,
    })
}
