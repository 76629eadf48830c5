//! `cortensor bench likelihood`: the distributions behind the likelihood thresholds. For each
//! prompt and sampling setting it generates the honest output and dishonest ones (random
//! tokens, another seed, another setting, truncated, another prompt's answer), replays each as
//! a validator would, and prints per kind the spread of each figure and how often the default
//! thresholds reject it, with the seed known and without.

use super::generate::resolve_model;
use crate::models::backend::BackendChoice;
use crate::models::engine::{EngineOptions, LlamaEngine};
use crate::validation::likelihood::LikelihoodThresholds;
use crate::validation::likelihood_study::{self, OutputKind, Sample, PROMPTS};
use anyhow::Context;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct LikelihoodArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub backend: BackendChoice,
    /// How many of the built-in prompts to use (at most 12).
    #[arg(long, default_value_t = 12)]
    pub prompts: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

fn spread(values: &mut [f32]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort_by(f32::total_cmp);
    let at = |q: f32| values[((values.len() - 1) as f32 * q).round() as usize];
    format!("{:.2} / {:.2} / {:.2}", at(0.0), at(0.5), at(1.0))
}

pub fn run(args: LikelihoodArgs) -> anyhow::Result<()> {
    let model = resolve_model(args.model)?;
    let mut opts = EngineOptions::new(&model);
    opts.backend = args.backend;
    let mut engine =
        LlamaEngine::load(&opts).with_context(|| format!("loading {}", model.display()))?;
    let prompts = &PROMPTS[..args.prompts.clamp(1, PROMPTS.len())];
    let thresholds = LikelihoodThresholds::default();
    eprintln!(
        "{} prompts x 3 settings, max_tokens {}, seed {}; thresholds {:?}",
        prompts.len(),
        args.max_tokens,
        args.seed,
        thresholds
    );
    let samples = likelihood_study::run(
        &mut engine,
        prompts,
        args.max_tokens,
        args.seed,
        &thresholds,
    )?;
    println!("figures: min / median / max over the outputs of each kind");
    println!(
        "| kind | setting | n | seed match | argmax | outside support | rare (rank>1000) | mean logprob | end consistent | rejected (seed known) | rejected (no seed) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for kind in OutputKind::ALL {
        for (setting, _) in likelihood_study::settings() {
            let of: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.kind == kind && s.setting == setting)
                .collect();
            if of.is_empty() {
                continue;
            }
            let col = |f: &dyn Fn(&Sample) -> f32| {
                let mut v: Vec<f32> = of.iter().map(|s| f(s)).collect();
                spread(&mut v)
            };
            let n = of.len();
            let count = |f: &dyn Fn(&Sample) -> bool| of.iter().filter(|s| f(s)).count();
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {}/{n} | {}/{n} | {}/{n} |",
                kind.name(),
                setting,
                n,
                col(&|s| s.evidence.seed_match_fraction),
                col(&|s| s.evidence.argmax_fraction),
                col(&|s| s.evidence.outside_support_fraction),
                col(&|s| s.evidence.rare_fraction),
                col(&|s| s.evidence.mean_logprob),
                count(&|s| s.evidence.end_consistent),
                count(&|s| s.rejected_seeded),
                count(&|s| s.rejected_unseeded),
            );
        }
    }
    Ok(())
}
