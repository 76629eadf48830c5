//! Likelihood re-scoring and PoUW judging with the real SmolLM2 model: honest outputs pass the
//! replay and dishonest ones do not; the judge grades fitting answers above unfitting ones.

use cortensor::models::engine::{EngineOptions, LlamaEngine};
use cortensor::models::fetch;
use cortensor::validation::judge::grade;
use cortensor::validation::likelihood::LikelihoodThresholds;
use cortensor::validation::likelihood_study::{self, OutputKind, PROMPTS};

fn engine() -> LlamaEngine {
    let path = fetch::ensure(&fetch::SMOLLM2_135M_Q4_1, &fetch::cache_dir(), &mut |_| {})
        .expect("the default model (scripts/setup fetches it)");
    LlamaEngine::load(&EngineOptions::new(&path)).unwrap()
}

#[test]
fn honest_outputs_replay_exactly_and_dishonest_ones_are_rejected() {
    let seed = 11;
    let mut e = engine();
    let samples = likelihood_study::run(
        &mut e,
        &PROMPTS[..3],
        16,
        seed,
        &LikelihoodThresholds::default(),
    )
    .unwrap();
    let of = |k: OutputKind| samples.iter().filter(move |s| s.kind == k);
    assert_eq!(
        of(OutputKind::Honest).count(),
        9,
        "3 prompts x 3 settings (seed {seed})"
    );
    for s in of(OutputKind::Honest) {
        assert_eq!(
            s.evidence.seed_match_fraction, 1.0,
            "an honest output replays token for token ({}, seed {seed}): {:?}",
            s.setting, s.evidence
        );
        assert!(!s.rejected_seeded && !s.rejected_unseeded, "{s:?}");
    }
    for kind in [
        OutputKind::RandomTokens,
        OutputKind::OtherSeed,
        OutputKind::Truncated,
        OutputKind::OtherPrompt,
    ] {
        assert!(of(kind).count() > 0);
        for s in of(kind) {
            assert!(
                s.rejected_seeded,
                "{} should be rejected (seed {seed}): {s:?}",
                kind.name()
            );
        }
    }
    // Without the seed only what ranks and log-probabilities show is caught.
    for s in of(OutputKind::RandomTokens).chain(of(OutputKind::Truncated)) {
        assert!(s.rejected_unseeded, "{s:?}");
    }
}

#[test]
fn the_judge_grades_fitting_answers_above_gibberish_and_other_questions_answers() {
    let mut e = engine();
    let cases = [
        (
            "What is the capital of France?",
            "The capital of France is Paris.",
        ),
        (
            "How many legs does a spider have?",
            "A spider has eight legs.",
        ),
        (
            "What color is the sky on a clear day?",
            "On a clear day the sky is blue.",
        ),
        (
            "Name a fruit that is yellow.",
            "A banana is a yellow fruit.",
        ),
    ];
    let (mut fitting, mut unfitting) = (0.0, 0.0);
    for (i, (q, good)) in cases.iter().enumerate() {
        let g = grade(&mut e, q, good).unwrap();
        let gibberish = grade(&mut e, q, "zxq blorp 7781 ,,, ;; vex").unwrap();
        let other = grade(&mut e, q, cases[(i + 1) % cases.len()].1).unwrap();
        println!(
            "{q}: fitting {:.2} (p_yes {:.2}), gibberish {:.2}, another question's answer {:.2}",
            g.score, g.p_yes, gibberish.score, other.score
        );
        for x in [&g, &gibberish, &other] {
            assert!((1.0..=10.0).contains(&x.score), "{x:?}");
        }
        assert!(g.score > gibberish.score, "{q}: {g:?} vs {gibberish:?}");
        assert!(g.score > other.score, "{q}: {g:?} vs {other:?}");
        fitting += g.score / cases.len() as f32;
        unfitting += (gibberish.score + other.score) / (2 * cases.len()) as f32;
    }
    // The calibration puts the averages on either side of the default threshold.
    assert!(fitting > 5.0 && unfitting < 5.0, "{fitting} {unfitting}");
}
