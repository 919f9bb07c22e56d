//! `retort eval --model PATH --data FILE [...]`: a model's loss on a text file.

use clap::Args;

use retort_core::Result;

use crate::engine::model_eval::{run_eval, EvalOptions};

/// Arguments of `retort eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model, the text and the windows.
    #[command(flatten)]
    options: EvalOptions,
}

impl EvalArgs {
    /// Prints the loss and the perplexity.
    pub fn run(self) -> Result<()> {
        let registry = crate::builtin_registry()?;
        let (r, desc, secs) = run_eval(&registry, &self.options)?;
        println!("model:      {desc}");
        println!("tokens:     {}", r.tokens);
        println!("loss:       {:.4} nats/token", r.val_loss);
        println!("perplexity: {:.2}", r.perplexity);
        eprintln!("evaluated in {secs:.2}s");
        Ok(())
    }
}
