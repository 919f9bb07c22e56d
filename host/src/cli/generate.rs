//! `retort generate --model PATH --prompt TEXT [...]`: continue a prompt.

use clap::Args;

use retort_core::Result;

use crate::engine::generate::{run_generate, GenerateOptions};

/// Arguments of `retort generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model, the prompt and how to sample.
    #[command(flatten)]
    options: GenerateOptions,
}

impl GenerateArgs {
    /// Prints the prompt and its continuation, each sample under a numbered rule when there
    /// are several (and the speed on stderr).
    pub fn run(self) -> Result<()> {
        let registry = crate::builtin_registry()?;
        let g = run_generate(&registry, &self.options)?;
        let several = g.texts.len() > 1;
        for (i, text) in g.texts.iter().enumerate() {
            if several {
                println!("--- sample {} ---", i + 1);
            }
            println!("{}{}", self.options.prompt, text);
        }
        eprintln!(
            "{}: {} prompt tokens, {} generated in {:.2}s ({:.1} tokens/s)",
            g.model,
            g.prompt_tokens,
            g.tokens,
            g.seconds,
            g.tokens as f64 / g.seconds.max(1e-9)
        );
        Ok(())
    }
}
