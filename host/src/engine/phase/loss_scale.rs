//! The loss scale of a phase's steps (`train.loss_scale`, see `retort_core::loss_scale`): the
//! loss is multiplied by `scale` before the backward pass and the gradients divided by it after
//! (Micikevicius et al., 2018, "Mixed Precision Training"), so that f16 gradients do not
//! underflow. A dynamic scale halves when the gradient overflows (the step is skipped) and
//! doubles after [`DYNAMIC_INTERVAL`] steps in a row without an overflow; it never goes below
//! 1, where an overflow is no longer the scale's doing and counts as any non-finite step.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use retort_core::loss_scale::{LossScale, DYNAMIC_INIT, DYNAMIC_INTERVAL};

/// The scale and, when dynamic, its record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale.
    pub scale: f64,
    /// Whether it adapts to overflows.
    pub dynamic: bool,
    /// Steps applied since the last change of a dynamic scale.
    pub good_steps: usize,
}

impl LossScaler {
    /// The scaler of `spec` for a student computing in `compute`; `None` for no scaling
    /// (`"none"`, or `"auto"` for a student that does not compute in f16).
    pub fn new(spec: LossScale, compute: DType) -> Option<Self> {
        let dynamic = |scale| LossScaler {
            scale,
            dynamic: true,
            good_steps: 0,
        };
        match spec {
            LossScale::Auto if compute == DType::F16 => Some(dynamic(DYNAMIC_INIT)),
            LossScale::Auto | LossScale::None => None,
            LossScale::Dynamic => Some(dynamic(DYNAMIC_INIT)),
            LossScale::Fixed(scale) => Some(LossScaler {
                scale,
                dynamic: false,
                good_steps: 0,
            }),
        }
    }

    /// A step was applied: a dynamic scale doubles after [`DYNAMIC_INTERVAL`] of them in a row.
    pub fn on_applied(&mut self) {
        if !self.dynamic {
            return;
        }
        self.good_steps += 1;
        if self.good_steps >= DYNAMIC_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }

    /// The gradient overflowed: a dynamic scale above 1 halves and `true` says the skip is
    /// the scale's (expected, not counted against `train.max_consecutive_skips`); otherwise
    /// `false`.
    pub fn on_overflow(&mut self) -> bool {
        if !self.dynamic || self.scale <= 1.0 {
            return false;
        }
        self.scale = (self.scale / 2.0).max(1.0);
        self.good_steps = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_scales_f16_students_only() {
        assert!(LossScaler::new(LossScale::Auto, DType::F32).is_none());
        assert!(LossScaler::new(LossScale::Auto, DType::BF16).is_none());
        assert!(LossScaler::new(LossScale::None, DType::F16).is_none());
        let s = LossScaler::new(LossScale::Auto, DType::F16).expect("f16");
        assert_eq!((s.scale, s.dynamic), (DYNAMIC_INIT, true));
        let f = LossScaler::new(LossScale::Fixed(8.0), DType::F32).expect("fixed");
        assert_eq!((f.scale, f.dynamic), (8.0, false));
    }

    #[test]
    fn a_dynamic_scale_halves_on_overflow_and_doubles_after_an_interval() {
        let mut s = LossScaler::new(LossScale::Dynamic, DType::F32).expect("dynamic");
        for _ in 0..DYNAMIC_INTERVAL - 1 {
            s.on_applied();
        }
        assert_eq!(s.scale, DYNAMIC_INIT);
        assert!(s.on_overflow());
        assert_eq!((s.scale, s.good_steps), (DYNAMIC_INIT / 2.0, 0));
        for _ in 0..DYNAMIC_INTERVAL {
            s.on_applied();
        }
        assert_eq!((s.scale, s.good_steps), (DYNAMIC_INIT, 0));
        // Down to 1 and no further: an overflow there is not the scale's.
        while s.on_overflow() {}
        assert_eq!(s.scale, 1.0);
        assert!(!s.on_overflow());
    }

    #[test]
    fn a_fixed_scale_never_changes() {
        let mut s = LossScaler::new(LossScale::Fixed(4.0), DType::F16).expect("fixed");
        assert!(!s.on_overflow());
        for _ in 0..=DYNAMIC_INTERVAL {
            s.on_applied();
        }
        assert_eq!(s.scale, 4.0);
    }
}
