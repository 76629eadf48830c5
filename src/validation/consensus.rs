//! How a task's redundant results become one verdict: the session's validation levels
//! (combinable), its consensus strategy and its disagreement policy. Validators gather
//! [`Evidence`]; [`decide`] is a pure function of the results, the evidence of every validator
//! that answered, and the miners' reputations.
//!
//! - Each level but `exact` judges results one by one (`embedding`: similarity to the medoid
//!   at least `poi_threshold`; `likelihood`: the replay passes; `judge`: the pooled grade at
//!   least `judge_threshold`). A result is *valid* when it passes every such level.
//! - `exact` groups the valid results by hash; without it they form one group.
//! - The consensus strategy weighs the groups: `majority` and `median_of_means` count miners,
//!   `reputation_weighted` sums reputations. A group holding more than half of the weight of
//!   all results is accepted. Validators' numeric evidence is pooled by the median, or by the
//!   median of means (over at least three groups) under `median_of_means`: either way one
//!   lying validator among three cannot move the pooled number past the honest two.
//! - Evidence is bounded before it is used ([`check_evidence`]): every number finite and in
//!   its range, every miner it names one of the task's (once), and every miner named unless
//!   the validator reports why not. Evidence that fails counts as a validator that could not
//!   check: it decides nothing and is not paid.
//! - Without an accepted group the disagreement policy decides: `fail_hard` fails the task,
//!   `best_effort` takes the heaviest valid group, `return_all` returns every result.

use super::judge::Grade;
use super::likelihood::{LikelihoodEvidence, LikelihoodThresholds};
use crate::task::TaskResult;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;

/// One way of checking results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Accept the results as they are.
    None,
    /// Identical results (by hash) agree.
    Exact,
    /// Proof of Inference: embeddings within `poi_threshold` of the medoid agree.
    Embedding,
    /// The validator's model replays each result under the task's sampling and seed.
    Likelihood,
    /// Proof of Useful Work: the validator's model grades each result from 1 to 10.
    Judge,
}

impl Level {
    /// Its name in requests.
    pub fn name(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Exact => "exact",
            Level::Embedding => "embedding",
            Level::Likelihood => "likelihood",
            Level::Judge => "judge",
        }
    }
}

/// The levels a session asks for: one (`"exact"`) or several (`["embedding", "likelihood"]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Levels(Vec<Level>);

impl Levels {
    /// Levels in a fixed order, without repeats; `none` alone when nothing else is asked.
    pub fn new(levels: impl IntoIterator<Item = Level>) -> Self {
        let mut v: Vec<Level> = Vec::new();
        for l in levels {
            if l != Level::None && !v.contains(&l) {
                v.push(l);
            }
        }
        v.sort_by_key(|l| *l as u8);
        if v.is_empty() {
            v.push(Level::None);
        }
        Levels(v)
    }
    pub fn has(&self, level: Level) -> bool {
        self.0.contains(&level)
    }
    pub fn iter(&self) -> impl Iterator<Item = Level> + '_ {
        self.0.iter().copied()
    }
    /// Whether validators must look at the results (anything beyond `none` and `exact`).
    pub fn needs_validators(&self) -> bool {
        self.0
            .iter()
            .any(|l| matches!(l, Level::Embedding | Level::Likelihood | Level::Judge))
    }
}

impl Default for Levels {
    fn default() -> Self {
        Levels(vec![Level::Exact])
    }
}

impl Serialize for Levels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.len() == 1 {
            self.0[0].serialize(s)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Levels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(Level),
            Many(Vec<Level>),
        }
        match OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected one of none, exact, embedding, likelihood, judge, or a list of them",
            )
        })? {
            OneOrMany::One(l) => Ok(Levels::new([l])),
            OneOrMany::Many(v) if v.is_empty() => Err(serde::de::Error::custom(
                "the list of validation levels is empty",
            )),
            OneOrMany::Many(v) => Ok(Levels::new(v)),
        }
    }
}

/// How groups of agreeing results, and validators' numeric evidence, are weighed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Consensus {
    /// Miners count one each; evidence is pooled by the median.
    #[default]
    Majority,
    /// Miners count by their reputation (plus one, so a new node still counts); evidence is
    /// pooled by the median.
    ReputationWeighted,
    /// Miners count one each; evidence is pooled by the median of means.
    MedianOfMeans,
}

/// What happens when no group of results is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DisagreementPolicy {
    /// The task fails and nothing is charged.
    #[default]
    FailHard,
    /// Every result is returned (the best first); the individually valid ones are paid.
    ReturnAll,
    /// The heaviest group of valid results is taken as if accepted.
    BestEffort,
}

/// Everything a decision depends on besides the results and the evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationPlan {
    pub levels: Levels,
    pub consensus: Consensus,
    pub policy: DisagreementPolicy,
    pub poi_threshold: f32,
    pub judge_threshold: f32,
    pub likelihood: LikelihoodThresholds,
}

impl ValidationPlan {
    /// A plan with the default likelihood thresholds.
    pub fn new(
        levels: Levels,
        consensus: Consensus,
        policy: DisagreementPolicy,
        poi_threshold: f32,
        judge_threshold: f32,
    ) -> Self {
        Self {
            levels,
            consensus,
            policy,
            poi_threshold,
            judge_threshold,
            likelihood: LikelihoodThresholds::default(),
        }
    }
}

/// One validator's findings about one result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct MinerEvidence {
    pub miner: String,
    /// `embedding`: cosine similarity to the medoid of the results.
    pub similarity: Option<f32>,
    /// `likelihood`: the replay's figures and, when it fails, why.
    pub likelihood: Option<LikelihoodEvidence>,
    pub likelihood_failures: Vec<String>,
    /// `judge`: the grade.
    pub grade: Option<Grade>,
}

/// One validator's findings about a task's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct Evidence {
    pub validator: String,
    pub miners: Vec<MinerEvidence>,
    /// Levels this validator could not check, and why (no embedder, engine busy...).
    pub errors: Vec<String>,
}

/// The outcome as Cortensor's `/validate` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VerdictLabel {
    /// A group of results was accepted.
    Valid,
    /// No result passes.
    Invalid,
    /// Valid results exist but no consensus formed, or validators could not check: trying
    /// again may settle it.
    Retry,
    /// The request does not say enough to validate (missing input or output, a level that
    /// needs more results than given).
    NeedsSpec,
}

/// What the decision says of one miner's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MinerVerdict {
    pub miner: String,
    pub result_hash: String,
    /// Passed every level that judges results one by one.
    pub valid: bool,
    /// In the accepted (or, under `best_effort`, chosen) group: paid.
    pub accepted: bool,
    /// Why it failed, level by level.
    pub reasons: Vec<String>,
    /// Pooled over the validators.
    pub similarity: Option<f32>,
    pub grade: Option<f32>,
    /// The first validator's replay figures.
    pub likelihood: Option<LikelihoodEvidence>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: VerdictLabel,
    /// A group held more than half of the weight.
    pub consensus: bool,
    /// Index (into the results) of the result returned; `None` when the task fails.
    pub chosen: Option<usize>,
    /// One per result, in the results' order.
    pub miners: Vec<MinerVerdict>,
    pub reasons: Vec<String>,
}

impl Decision {
    pub fn accepted_miners(&self) -> Vec<String> {
        self.miners
            .iter()
            .filter(|m| m.accepted)
            .map(|m| m.miner.clone())
            .collect()
    }
    pub fn rejected_miners(&self) -> Vec<String> {
        self.miners
            .iter()
            .filter(|m| !m.accepted)
            .map(|m| m.miner.clone())
            .collect()
    }
}

/// Pools one number from several validators: the median, or under `median_of_means` the
/// median of the means of at least three groups of consecutive values (about √n of them, an
/// odd number). Fewer than half of the values (or groups) lying cannot move it past the
/// others.
pub fn pool(values: &[f32], consensus: Consensus) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let n = values.len();
    let groups = if consensus == Consensus::MedianOfMeans {
        let g = ((n as f64).sqrt().round() as usize).max(3) | 1;
        g.min(n)
    } else {
        n
    };
    let mut means: Vec<f32> = (0..groups)
        .map(|j| mean(&values[j * n / groups..(j + 1) * n / groups]))
        .collect();
    means.sort_by(f32::total_cmp);
    let mid = means.len() / 2;
    Some(if means.len() % 2 == 1 {
        means[mid]
    } else {
        (means[mid - 1] + means[mid]) / 2.0
    })
}

/// How far an honest figure may stray past its range by rounding (a cosine of 1.0000001).
const ROUNDING: f32 = 1e-3;

fn within(x: f32, lo: f32, hi: f32) -> bool {
    x.is_finite() && x >= lo - ROUNDING && x <= hi + ROUNDING
}

/// What is wrong with one miner's evidence: a number that is not finite or out of its range.
fn out_of_range(e: &MinerEvidence) -> Option<String> {
    if let Some(s) = e.similarity {
        if !within(s, -1.0, 1.0) {
            return Some(format!("similarity {s} is not within -1..1"));
        }
    }
    if let Some(g) = &e.grade {
        if !within(g.score, 1.0, 10.0) {
            return Some(format!("grade {} is not within 1..10", g.score));
        }
        if !within(g.p_yes, 0.0, 1.0) || !within(g.answer_mass, 0.0, 1.0) {
            return Some("a grade's probabilities are not within 0..1".into());
        }
    }
    if let Some(l) = &e.likelihood {
        let fractions = [
            l.argmax_fraction,
            l.seed_match_fraction,
            l.outside_support_fraction,
            l.rare_fraction,
        ];
        if fractions.iter().any(|&f| !within(f, 0.0, 1.0)) {
            return Some("a likelihood fraction is not within 0..1".into());
        }
        if !within(l.mean_logprob, f32::MIN, 0.0) {
            return Some(format!(
                "mean log-probability {} is not finite and at most 0",
                l.mean_logprob
            ));
        }
    }
    None
}

/// Bounds one validator's `evidence` about `miners` (the task's, in its results' order)
/// before anything uses it. Evidence whose numbers are not finite and in range, that names a
/// miner not among `miners` (or one more often than it has a result), or that names none of
/// them without saying why, is replaced by evidence that only reports the validator could not
/// check (its own errors kept): it decides nothing and is not paid.
pub fn check_evidence(evidence: Evidence, miners: &[&str]) -> Evidence {
    let mut named: HashMap<&str, usize> = HashMap::new();
    let mut problem = None;
    for e in &evidence.miners {
        let count = named.entry(e.miner.as_str()).or_default();
        *count += 1;
        let results = miners.iter().filter(|m| **m == e.miner).count();
        if *count > results {
            problem = Some(if results == 0 {
                format!("it names {:?}, which is not a miner of this task", e.miner)
            } else {
                format!("it names {:?} more than once", e.miner)
            });
        } else if let Some(why) = out_of_range(e) {
            problem = Some(format!("about {:?}: {why}", e.miner));
        }
        if problem.is_some() {
            break;
        }
    }
    if problem.is_none() && evidence.errors.is_empty() {
        if let Some(m) = miners.iter().find(|m| !named.contains_key(**m)) {
            problem = Some(format!("it says nothing about {m:?} and not why"));
        }
    }
    match problem {
        None => evidence,
        Some(why) => {
            let mut errors = evidence.errors;
            errors.push(format!("evidence dropped: {why}"));
            Evidence {
                validator: evidence.validator,
                miners: vec![],
                errors,
            }
        }
    }
}

/// Decides on `results` ((miner, result) pairs) from the validators' `evidence`.
/// `reputation` is read under `reputation_weighted` (a missing miner counts as 0).
pub fn decide(
    results: &[(String, TaskResult)],
    evidence: &[Evidence],
    plan: &ValidationPlan,
    reputation: &HashMap<String, i64>,
) -> Decision {
    let mut reasons = Vec::new();
    if results.is_empty() {
        return Decision {
            verdict: VerdictLabel::NeedsSpec,
            consensus: false,
            chosen: None,
            miners: vec![],
            reasons: vec!["there are no results to validate".into()],
        };
    }
    if plan.levels.needs_validators() && evidence.is_empty() {
        return Decision {
            verdict: VerdictLabel::Retry,
            consensus: false,
            chosen: None,
            miners: results
                .iter()
                .map(|(m, r)| unjudged(m, r, "no validator answered"))
                .collect(),
            reasons: vec!["no validator answered".into()],
        };
    }
    let names: Vec<&str> = results.iter().map(|(m, _)| m.as_str()).collect();
    let evidence: Vec<Evidence> = evidence
        .iter()
        .map(|e| check_evidence(e.clone(), &names))
        .collect();
    for e in &evidence {
        for err in &e.errors {
            reasons.push(format!("{}: {err}", e.validator));
        }
    }
    let of = |miner: &str| -> Vec<&MinerEvidence> {
        evidence
            .iter()
            .filter_map(|e| e.miners.iter().find(|m| m.miner == miner))
            .collect()
    };
    let mut miners: Vec<MinerVerdict> = Vec::with_capacity(results.len());
    for (miner, result) in results {
        // A level asked for with no evidence about this result (every validator failed it).
        let mut lacking = false;
        let found = of(miner);
        let mut v = MinerVerdict {
            miner: miner.clone(),
            result_hash: format!("0x{}", hex::encode(result.hash())),
            valid: true,
            accepted: false,
            reasons: vec![],
            similarity: None,
            grade: None,
            likelihood: found.iter().find_map(|e| e.likelihood.clone()),
        };
        if plan.levels.has(Level::Embedding) {
            let values: Vec<f32> = found.iter().filter_map(|e| e.similarity).collect();
            v.similarity = pool(&values, plan.consensus);
            match v.similarity {
                None => lacking = true,
                Some(s) if s < plan.poi_threshold => v.reasons.push(format!(
                    "embedding: similarity {s:.3} to the medoid is below {:.3}",
                    plan.poi_threshold
                )),
                Some(_) => {}
            }
        }
        if plan.levels.has(Level::Likelihood) {
            let votes: Vec<f32> = found
                .iter()
                .filter(|e| e.likelihood.is_some())
                .map(|e| f32::from(u8::from(e.likelihood_failures.is_empty())))
                .collect();
            match pool(&votes, plan.consensus) {
                None => lacking = true,
                Some(p) if p <= 0.5 => {
                    let why = found
                        .iter()
                        .flat_map(|e| e.likelihood_failures.iter())
                        .next()
                        .cloned()
                        .unwrap_or_default();
                    v.reasons.push(format!("likelihood: {why}"));
                }
                Some(_) => {}
            }
        }
        if plan.levels.has(Level::Judge) {
            let scores: Vec<f32> = found
                .iter()
                .filter_map(|e| e.grade.as_ref().map(|g| g.score))
                .collect();
            v.grade = pool(&scores, plan.consensus);
            match v.grade {
                None => lacking = true,
                Some(g) if g < plan.judge_threshold => v.reasons.push(format!(
                    "judge: grade {g:.2} is below {:.2}",
                    plan.judge_threshold
                )),
                Some(_) => {}
            }
        }
        if lacking && v.reasons.is_empty() {
            v.reasons
                .push("validators gave no evidence for this result".into());
        }
        v.valid = v.reasons.is_empty();
        miners.push(v);
    }

    // Groups of valid results: by hash under `exact`, otherwise one group.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in 0..results.len() {
        if !miners[i].valid {
            continue;
        }
        let same = groups.iter_mut().find(|g| {
            !plan.levels.has(Level::Exact) || miners[g[0]].result_hash == miners[i].result_hash
        });
        match same {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    let weight = |i: usize| -> f64 {
        match plan.consensus {
            Consensus::ReputationWeighted => {
                reputation.get(&results[i].0).copied().unwrap_or(0).max(0) as f64 + 1.0
            }
            _ => 1.0,
        }
    };
    let total: f64 = (0..results.len()).map(weight).sum();
    let group_weight = |g: &Vec<usize>| g.iter().map(|&i| weight(i)).sum::<f64>();
    // The best result of a group: the highest grade, then similarity, then likelihood, then
    // the earliest.
    let best_of = |g: &[usize]| -> usize {
        let key = |i: usize| {
            let m = &miners[i];
            (
                m.grade.unwrap_or(0.0),
                m.similarity.unwrap_or(0.0),
                m.likelihood.as_ref().map(|l| l.mean_logprob).unwrap_or(0.0),
            )
        };
        let mut best = g[0];
        for &i in &g[1..] {
            if key(i).partial_cmp(&key(best)) == Some(std::cmp::Ordering::Greater) {
                best = i;
            }
        }
        best
    };
    let heaviest = groups
        .iter()
        .max_by(|a, b| {
            group_weight(a)
                .total_cmp(&group_weight(b))
                .then(b[0].cmp(&a[0]))
        })
        .cloned();
    let accepted = heaviest.clone().filter(|g| group_weight(g) * 2.0 > total);

    let any_valid = miners.iter().any(|m| m.valid);
    let (verdict, consensus, chosen, paid): (VerdictLabel, bool, Option<usize>, Vec<usize>) =
        match (&accepted, plan.policy) {
            (Some(g), _) => (VerdictLabel::Valid, true, Some(best_of(g)), g.clone()),
            (None, _) if !any_valid => {
                reasons.push("no result passes validation".into());
                (VerdictLabel::Invalid, false, None, vec![])
            }
            (None, DisagreementPolicy::FailHard) => {
                reasons.push("the valid results disagree and no group holds more than half".into());
                (VerdictLabel::Retry, false, None, vec![])
            }
            (None, DisagreementPolicy::BestEffort) => {
                let g = heaviest.expect("some result is valid");
                reasons.push("no consensus: the heaviest group of valid results is taken".into());
                (VerdictLabel::Valid, false, Some(best_of(&g)), g)
            }
            (None, DisagreementPolicy::ReturnAll) => {
                let valid: Vec<usize> = (0..results.len()).filter(|&i| miners[i].valid).collect();
                reasons.push("no consensus: every result is returned".into());
                (VerdictLabel::Retry, false, Some(best_of(&valid)), valid)
            }
        };
    for i in paid {
        miners[i].accepted = true;
    }
    for m in miners.iter_mut().filter(|m| m.valid && !m.accepted) {
        if consensus || plan.policy == DisagreementPolicy::BestEffort {
            m.reasons.push("disagrees with the accepted result".into());
        }
    }
    Decision {
        verdict,
        consensus,
        chosen,
        miners,
        reasons,
    }
}

fn unjudged(miner: &str, result: &TaskResult, why: &str) -> MinerVerdict {
    MinerVerdict {
        miner: miner.to_string(),
        result_hash: format!("0x{}", hex::encode(result.hash())),
        valid: false,
        accepted: false,
        reasons: vec![why.to_string()],
        similarity: None,
        grade: None,
        likelihood: None,
    }
}
