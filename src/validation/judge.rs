//! Proof of Useful Work: a validator asks the model itself whether an answer answers the
//! question, through a rubric written for the model's family, and reads the grade from the
//! model's next-token probabilities of "Yes" and "No" (not from free text, so even a small
//! model always yields a grade, and the grade moves smoothly with the model's confidence).
//! The grade is 1 + 9 · σ((logit P(yes) − center) / scale), on 1..10, where each rubric's
//! center and scale calibrate its family: measured fitting and unfitting answers fall on
//! either side of 5.5 on average. Small models separate answers to the same question far
//! better than they grade on an absolute scale (see ARCHITECTURE.md).

use crate::models::chat::ChatMessage;
use crate::models::engine::{EngineError, InferenceEngine, Prompt};

/// A rubric: the instructions, how the question and answer are laid out, and the family's
/// calibration.
#[derive(Clone, Debug, PartialEq)]
pub struct Rubric {
    pub name: &'static str,
    pub system: &'static str,
    /// `{question}` and `{answer}` are replaced.
    pub user: &'static str,
    /// logit P(yes) that maps to the middle of the scale.
    pub center: f32,
    /// How many logits move the grade from the middle by about a quarter of the scale.
    pub scale: f32,
}

const GENERIC: Rubric = Rubric {
    name: "generic",
    system: "You are a strict grader. You read a question and an answer and decide whether the \
answer is relevant, correct and coherent. Reply Yes or No.",
    user: "Question:\n{question}\n\nAnswer:\n{answer}\n\nIs the answer correct? Reply Yes or No.",
    center: 0.0,
    scale: 1.0,
};

/// SmolLM2's instruct models follow short, plain instructions best. They say "No" more often
/// than not: on the measured set P(yes) was about 0.19 for fitting answers and 0.14 for
/// gibberish or another question's answer, hence the center near logit(0.16).
const SMOLLM: Rubric = Rubric {
    name: "smollm",
    system: "You check answers. Reply Yes if the answer correctly answers the question, \
otherwise No.",
    user: "Question: {question}\nAnswer: {answer}\nIs the answer correct? Reply Yes or No.",
    center: -1.66,
    scale: 0.3,
};

/// Llama 3 instruct models take a fuller rubric.
const LLAMA3: Rubric = Rubric {
    name: "llama3",
    system: "You are an impartial evaluator of AI assistant responses. Consider helpfulness, \
relevance, accuracy and coherence. An answer that ignores the question, contradicts itself, is \
cut off mid-sentence, or is not language fails. Reply with exactly Yes (it passes) or No.",
    user:
        "[Question]\n{question}\n\n[Response]\n{answer}\n\nDoes the response pass? Reply Yes or No.",
    center: 0.0,
    scale: 1.0,
};

/// The rubric written for a model, by its name.
pub fn rubric_for(model: &str) -> &'static Rubric {
    let m = model.to_ascii_lowercase();
    if m.contains("smollm") {
        &SMOLLM
    } else if m.contains("llama-3") || m.contains("llama3") {
        &LLAMA3
    } else {
        &GENERIC
    }
}

/// The prompt a judge runs.
pub fn judge_prompt(rubric: &Rubric, question: &str, answer: &str) -> Prompt {
    Prompt::Chat(vec![
        ChatMessage::system(rubric.system),
        ChatMessage::user(
            rubric
                .user
                .replace("{question}", question)
                .replace("{answer}", answer),
        ),
    ])
}

/// One judge's grade of one answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Grade {
    /// 1..=10.
    pub score: f32,
    /// P(yes) / (P(yes) + P(no)).
    pub p_yes: f32,
    /// How much of the model's next-token probability fell on yes or no: low means the model
    /// was not answering the rubric (the grade is then less informative).
    pub answer_mass: f32,
}

/// Grades `answer` to `question` with `engine`, using the rubric for the engine's model.
pub fn grade(
    engine: &mut dyn InferenceEngine,
    question: &str,
    answer: &str,
) -> Result<Grade, EngineError> {
    let rubric = rubric_for(&engine.info().model);
    let prompt = judge_prompt(rubric, question, answer);
    // "Yes" and " Yes" (and "No", " No") are different tokens in most vocabularies.
    let mut words = Vec::new();
    for w in ["Yes", " Yes", "No", " No"] {
        words.push(last_token(engine, w)?);
    }
    let lp = engine.next_logprobs(&prompt, &words)?;
    let p = |i: usize| (lp[i] as f64).exp();
    Ok(grade_from(rubric, p(0) + p(1), p(2) + p(3)))
}

/// The token a word ends with (the word alone, without a BOS the tokenizer may add).
fn last_token(engine: &dyn InferenceEngine, word: &str) -> Result<u32, EngineError> {
    let ids = engine.tokenize(&Prompt::Text(word.to_string()))?;
    ids.last().copied().ok_or(EngineError::EmptyPrompt)
}

/// The grade from the probabilities of yes and no.
pub fn grade_from(rubric: &Rubric, yes: f64, no: f64) -> Grade {
    let mass = yes + no;
    let p_yes = if mass > 0.0 { yes / mass } else { 0.5 };
    let logit = (p_yes.clamp(1e-6, 1.0 - 1e-6) / (1.0 - p_yes.clamp(1e-6, 1.0 - 1e-6))).ln();
    let z = (logit - rubric.center as f64) / rubric.scale as f64;
    let score = 1.0 + 9.0 / (1.0 + (-z).exp());
    Grade {
        score: score as f32,
        p_yes: p_yes as f32,
        answer_mass: mass as f32,
    }
}
