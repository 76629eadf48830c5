//! The validation decision on its own: levels, consensus strategies and disagreement policies
//! over hand-made evidence.

use cortensor::models::engine::FinishReason;
use cortensor::task::TaskResult;
use cortensor::validation::consensus::*;
use cortensor::validation::judge::Grade;
use cortensor::validation::likelihood::{LikelihoodEvidence, LikelihoodThresholds};
use std::collections::HashMap;

fn result(text: &str) -> TaskResult {
    TaskResult {
        text: text.into(),
        token_ids: text.bytes().map(u32::from).collect(),
        finish_reason: FinishReason::Stop,
        prompt_tokens: 3,
    }
}

fn results(texts: &[&str]) -> Vec<(String, TaskResult)> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("miner-{}", i + 1), result(t)))
        .collect()
}

fn plan(levels: &[Level], consensus: Consensus, policy: DisagreementPolicy) -> ValidationPlan {
    ValidationPlan {
        levels: Levels::new(levels.iter().copied()),
        consensus,
        policy,
        poi_threshold: 0.85,
        judge_threshold: 5.0,
        likelihood: LikelihoodThresholds::default(),
    }
}

fn likely(pass: bool) -> LikelihoodEvidence {
    LikelihoodEvidence {
        tokens: 10,
        argmax_fraction: if pass { 1.0 } else { 0.1 },
        seed_match_fraction: if pass { 1.0 } else { 0.1 },
        outside_support_fraction: 0.0,
        rare_fraction: 0.0,
        mean_logprob: if pass { -0.5 } else { -9.0 },
        end_consistent: true,
    }
}

/// One validator's evidence: per miner (similarity, likelihood pass, grade).
fn evidence(validator: &str, per_miner: &[(Option<f32>, Option<bool>, Option<f32>)]) -> Evidence {
    Evidence {
        validator: validator.into(),
        miners: per_miner
            .iter()
            .enumerate()
            .map(|(i, (sim, lik, grade))| MinerEvidence {
                miner: format!("miner-{}", i + 1),
                similarity: *sim,
                likelihood: lik.map(likely),
                likelihood_failures: match lik {
                    Some(false) => vec!["replay disagrees".into()],
                    _ => vec![],
                },
                grade: grade.map(|score| Grade {
                    score,
                    p_yes: 0.5,
                    answer_mass: 0.9,
                }),
            })
            .collect(),
        errors: vec![],
    }
}

fn no_reputation() -> HashMap<String, i64> {
    HashMap::new()
}

#[test]
fn exact_accepts_the_majority_and_rejects_the_rest() {
    let r = results(&["a", "a", "b"]);
    let p = plan(
        &[Level::Exact],
        Consensus::Majority,
        DisagreementPolicy::FailHard,
    );
    let d = decide(&r, &[], &p, &no_reputation());
    assert_eq!(d.verdict, VerdictLabel::Valid);
    assert_eq!(d.chosen, Some(0));
    assert_eq!(d.accepted_miners(), vec!["miner-1", "miner-2"]);
    assert_eq!(d.rejected_miners(), vec!["miner-3"]);
}

#[test]
fn a_split_fails_hard_returns_all_or_takes_the_best_effort() {
    let r = results(&["a", "b"]);
    let fail = decide(
        &r,
        &[],
        &plan(
            &[Level::Exact],
            Consensus::Majority,
            DisagreementPolicy::FailHard,
        ),
        &no_reputation(),
    );
    assert_eq!((fail.verdict, fail.chosen), (VerdictLabel::Retry, None));
    assert!(fail.accepted_miners().is_empty());

    let all = decide(
        &r,
        &[],
        &plan(
            &[Level::Exact],
            Consensus::Majority,
            DisagreementPolicy::ReturnAll,
        ),
        &no_reputation(),
    );
    assert_eq!(all.verdict, VerdictLabel::Retry);
    assert!(!all.consensus);
    assert_eq!(all.chosen, Some(0));
    // Both are individually valid: both are paid.
    assert_eq!(all.accepted_miners(), vec!["miner-1", "miner-2"]);

    let best = decide(
        &r,
        &[],
        &plan(
            &[Level::Exact],
            Consensus::Majority,
            DisagreementPolicy::BestEffort,
        ),
        &no_reputation(),
    );
    assert_eq!(best.verdict, VerdictLabel::Valid);
    assert!(!best.consensus);
    assert_eq!(best.accepted_miners().len(), 1);
}

#[test]
fn reputation_weighting_lets_trusted_miners_outvote_new_ones() {
    let r = results(&["a", "b", "b"]);
    let mut reputation = HashMap::new();
    reputation.insert("miner-1".to_string(), 100);
    reputation.insert("miner-2".to_string(), 5);
    reputation.insert("miner-3".to_string(), 5);
    let by_count = decide(
        &r,
        &[],
        &plan(
            &[Level::Exact],
            Consensus::Majority,
            DisagreementPolicy::FailHard,
        ),
        &reputation,
    );
    assert_eq!(by_count.accepted_miners(), vec!["miner-2", "miner-3"]);
    let weighted = decide(
        &r,
        &[],
        &plan(
            &[Level::Exact],
            Consensus::ReputationWeighted,
            DisagreementPolicy::FailHard,
        ),
        &reputation,
    );
    assert_eq!(weighted.accepted_miners(), vec!["miner-1"]);
}

#[test]
fn the_median_and_the_median_of_means_resist_a_few_lying_validators() {
    // Three miners, nine validators; the last two grade the honest answers 1 and the bad 10.
    let r = results(&["good", "good too", "bad"]);
    let honest = [
        (None, None, Some(6.0)),
        (None, None, Some(6.0)),
        (None, None, Some(2.0)),
    ];
    let lying = [
        (None, None, Some(1.0)),
        (None, None, Some(1.0)),
        (None, None, Some(10.0)),
    ];
    let ev: Vec<Evidence> = (1..=9)
        .map(|v| {
            evidence(
                &format!("validator-{v}"),
                if v <= 7 { &honest } else { &lying },
            )
        })
        .collect();
    let median = decide(
        &r,
        &ev,
        &plan(
            &[Level::Judge],
            Consensus::Majority,
            DisagreementPolicy::FailHard,
        ),
        &no_reputation(),
    );
    let mom = decide(
        &r,
        &ev,
        &plan(
            &[Level::Judge],
            Consensus::MedianOfMeans,
            DisagreementPolicy::FailHard,
        ),
        &no_reputation(),
    );
    // A mean would drag the honest grades (6) under the threshold (5): (7·6 + 2·1) / 9.
    for d in [&median, &mom] {
        assert_eq!(d.verdict, VerdictLabel::Valid);
        assert_eq!(d.accepted_miners(), vec!["miner-1", "miner-2"]);
        assert_eq!(d.miners[0].grade, Some(6.0));
    }
}

#[test]
fn one_liar_among_three_validators_cannot_move_the_pooled_number() {
    for consensus in [
        Consensus::Majority,
        Consensus::ReputationWeighted,
        Consensus::MedianOfMeans,
    ] {
        for liar in 0..3 {
            let pooled = |honest: f32, lie: f32| {
                let mut v = [honest; 3];
                v[liar] = lie;
                pool(&v, consensus).unwrap()
            };
            assert_eq!(pooled(6.0, 1.0), 6.0, "{consensus:?}, liar {liar}");
            assert_eq!(pooled(4.0, 10.0), 4.0, "{consensus:?}, liar {liar}");
            assert_eq!(pooled(0.9, -1.0), 0.9, "{consensus:?}, liar {liar}");
        }
    }
    // Two validators: nothing to out-vote, the middle of the two.
    assert_eq!(pool(&[2.0, 4.0], Consensus::Majority), Some(3.0));
}

#[test]
fn evidence_out_of_range_or_about_other_miners_counts_as_could_not_check() {
    let r = results(&["a", "b"]);
    let names = ["miner-1", "miner-2"];
    let good = evidence(
        "v",
        &[(Some(0.9), None, Some(7.0)), (Some(0.9), None, Some(7.0))],
    );
    assert_eq!(check_evidence(good.clone(), &names), good);
    let dropped = |e: Evidence, why: &str| {
        let checked = check_evidence(e, &names);
        assert!(checked.miners.is_empty(), "{checked:?}");
        let errors = checked.errors.join("; ");
        assert!(
            errors.contains("evidence dropped") && errors.contains(why),
            "{errors}"
        );
    };
    let mut huge = good.clone();
    huge.miners[1].grade.as_mut().unwrap().score = f32::INFINITY;
    dropped(huge, "grade inf");
    let mut nan = good.clone();
    nan.miners[0].similarity = Some(f32::NAN);
    dropped(nan, "similarity NaN");
    let mut far = good.clone();
    far.miners[0].similarity = Some(5.0);
    dropped(far, "similarity 5");
    let mut stranger = good.clone();
    stranger.miners[1].miner = "miner-9".into();
    dropped(stranger, "\"miner-9\", which is not a miner of this task");
    let mut twice = good.clone();
    twice.miners[1].miner = "miner-1".into();
    dropped(twice, "more than once");
    let silent = Evidence {
        validator: "v".into(),
        ..Evidence::default()
    };
    dropped(silent, "says nothing about \"miner-1\"");
    // Saying why it could not check is not a fault.
    let excused = Evidence {
        validator: "v".into(),
        miners: vec![],
        errors: vec!["no model".into()],
    };
    assert_eq!(check_evidence(excused.clone(), &names), excused);

    // In the decision, an infinite grade from one of three validators changes nothing: the
    // two others reject both results.
    let low = evidence("low", &[(None, None, Some(2.0)), (None, None, Some(2.0))]);
    let mut inf = evidence("inf", &[(None, None, Some(10.0)), (None, None, Some(10.0))]);
    for m in &mut inf.miners {
        m.grade.as_mut().unwrap().score = f32::INFINITY;
    }
    let d = decide(
        &r,
        &[low.clone(), inf, low],
        &plan(
            &[Level::Judge],
            Consensus::Majority,
            DisagreementPolicy::FailHard,
        ),
        &no_reputation(),
    );
    assert_eq!(d.verdict, VerdictLabel::Invalid, "{d:?}");
    assert_eq!(d.miners[0].grade, Some(2.0));
    assert!(
        d.reasons
            .iter()
            .any(|r| r.contains("inf: evidence dropped")),
        "{d:?}"
    );
}

#[test]
fn combined_levels_require_every_level() {
    // All three are similar in meaning, but miner-2's text is not what the model produces.
    let r = results(&["x", "y", "z"]);
    let ev = [evidence(
        "validator-1",
        &[
            (Some(0.97), Some(true), None),
            (Some(0.95), Some(false), None),
            (Some(0.96), Some(true), None),
        ],
    )];
    let embedding_only = decide(
        &r,
        &ev,
        &plan(
            &[Level::Embedding],
            Consensus::Majority,
            DisagreementPolicy::FailHard,
        ),
        &no_reputation(),
    );
    assert_eq!(embedding_only.accepted_miners().len(), 3);
    let both = decide(
        &r,
        &ev,
        &plan(
            &[Level::Embedding, Level::Likelihood],
            Consensus::Majority,
            DisagreementPolicy::FailHard,
        ),
        &no_reputation(),
    );
    assert_eq!(both.verdict, VerdictLabel::Valid);
    assert_eq!(both.accepted_miners(), vec!["miner-1", "miner-3"]);
    let m2 = &both.miners[1];
    assert!(
        !m2.valid && m2.reasons[0].starts_with("likelihood"),
        "{m2:?}"
    );
}

#[test]
fn no_evidence_means_retry_and_no_valid_result_means_invalid() {
    let r = results(&["x", "y", "z"]);
    let p = plan(
        &[Level::Likelihood],
        Consensus::Majority,
        DisagreementPolicy::FailHard,
    );
    let none = decide(&r, &[], &p, &no_reputation());
    assert_eq!((none.verdict, none.chosen), (VerdictLabel::Retry, None));
    let ev = [evidence(
        "validator-1",
        &[
            (None, Some(false), None),
            (None, Some(false), None),
            (None, Some(false), None),
        ],
    )];
    let bad = decide(&r, &ev, &p, &no_reputation());
    assert_eq!((bad.verdict, bad.chosen), (VerdictLabel::Invalid, None));
    let empty = decide(&[], &[], &p, &no_reputation());
    assert_eq!(empty.verdict, VerdictLabel::NeedsSpec);
}

#[test]
fn levels_parse_from_a_name_or_a_list_and_reject_nonsense() {
    let one: Levels = serde_json::from_str("\"exact\"").unwrap();
    assert_eq!(one, Levels::new([Level::Exact]));
    let many: Levels =
        serde_json::from_str("[\"likelihood\", \"embedding\", \"likelihood\"]").unwrap();
    assert_eq!(many, Levels::new([Level::Embedding, Level::Likelihood]));
    assert_eq!(
        serde_json::to_string(&many).unwrap(),
        "[\"embedding\",\"likelihood\"]"
    );
    assert_eq!(serde_json::to_string(&one).unwrap(), "\"exact\"");
    let none: Levels = serde_json::from_str("[\"none\"]").unwrap();
    assert!(!none.needs_validators() && !none.has(Level::Exact));
    for bad in ["\"fuzzy\"", "[]", "3", "[\"exact\", 1]"] {
        let e = serde_json::from_str::<Levels>(bad);
        assert!(e.is_err(), "{bad} should not parse");
    }
}

#[test]
fn pooling_by_median_of_means_ignores_an_outlier_group() {
    let v = [8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 0.0, 0.0, 0.0];
    assert_eq!(pool(&v, Consensus::Majority), Some(8.0));
    assert_eq!(pool(&v, Consensus::MedianOfMeans), Some(8.0));
    assert_eq!(pool(&[], Consensus::MedianOfMeans), None);
}
