//! An exponential moving average of the trained model's weights (`train.ema_decay`):
//! `ema = d * ema + (1 - d) * w` after every applied step. The phase ends with the average,
//! and every evaluation measures it, since it is what the phase exports.

use candle_core::{Tensor, Var};

use retort_core::{Error, Result};

use crate::artifacts::checkpoint::{Checkpoint, Tensors};

/// The average of the model's weights, in the order of the model's parameters.
pub(super) struct Ema {
    decay: f64,
    average: Vec<Tensor>,
}

/// The name of the average of parameter `name` in a checkpoint.
fn key(name: &str) -> String {
    format!("ema.{name}")
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(decay: f64, vars: &[(String, Var)]) -> Result<Self> {
        let average = vars
            .iter()
            .map(|(_, v)| v.as_tensor().detach().copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(Ema { decay, average })
    }

    /// The average saved in `ck` (an input error naming the checkpoint if one is missing).
    pub fn restore<S>(&mut self, ck: &Checkpoint<S>, vars: &[(String, Var)]) -> Result<()> {
        for ((name, _), slot) in vars.iter().zip(self.average.iter_mut()) {
            *slot = ck.tensors("model").get(&key(name)).cloned().ok_or_else(|| {
                Error::input(
                    format!("checkpoint {}", ck.dir.display()),
                    format!("EMA tensor `{}` is missing", key(name)),
                )
            })?;
        }
        Ok(())
    }

    /// Folds the current weights into the average.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        let d = self.decay;
        for ((_, var), avg) in vars.iter().zip(self.average.iter_mut()) {
            *avg = ((&*avg * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }

    /// The averaged weights.
    pub fn weights(&self) -> &[Tensor] {
        &self.average
    }

    /// Adds the average to a checkpoint's model tensors (`ema.<name>`).
    pub fn save_into(&self, vars: &[(String, Var)], model: &mut Tensors) {
        for ((name, _), t) in vars.iter().zip(&self.average) {
            model.insert(key(name), t.clone());
        }
    }
}
