//! retort-sdk: what a third-party retort plugin depends on.
//!
//! It re-exports the contracts of `retort-core`, the exact candle version retort is built
//! against, and the differentiable [`ops`] the built-ins use (`log_softmax`, `softmax`). A
//! statically linked plugin crate registers its kinds with `inventory::submit!` exactly like
//! the built-ins. A loss term: forward KL from the teacher to the student,
//! `L = sum_i w_i KL(p_t || p_s)_i / sum_i w_i`, reduced with [`StepContext::token_mean`] so
//! that padding (`w_i = 0`) and a token-weighting router (`w_i = r_i`) are honoured:
//!
//! ```
//! use retort_sdk::prelude::*;
//!
//! /// `KL(p_t || p_s)` per token, averaged over the tokens that count.
//! struct ForwardKl;
//!
//! impl LossTerm for ForwardKl {
//!     fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
//!         let teacher = ctx.teacher.ok_or_else(|| Error::Runtime("forward_kl needs a teacher".into()))?;
//!         let ls = ops::log_softmax(&ctx.student.logits)?;
//!         let lt = ops::log_softmax(&teacher.logits)?;
//!         let per_token = (lt.exp()? * (lt - ls)?)?.sum(D::Minus1)?;
//!         ctx.token_mean(&per_token)
//!     }
//!     fn needs_teacher(&self) -> bool {
//!         true
//!     }
//! }
//!
//! fn build(_: &Params, _: &BuildContext) -> Result<Box<dyn LossTerm>> {
//!     Ok(Box::new(ForwardKl))
//! }
//!
//! retort_sdk::inventory::submit! {
//!     Factory::<dyn LossTerm> {
//!         kind: "forward_kl",
//!         description: "forward KL, mean over the counted tokens",
//!         build,
//!         params: retort_sdk::registry::no_params,
//!     }
//! }
//! # fn main() -> Result<()> {
//! # use retort_sdk::Registry;
//! # let dev = Device::Cpu;
//! # let logits = Tensor::new(&[[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]]], &dev)?;
//! # let ids = Tensor::zeros((1, 2), DType::U32, &dev)?;
//! # let batch = Batch { input_ids: ids.clone(), targets: ids, mask: None, source: None };
//! # let (s, t) = (Outputs::logits_only(logits.clone()), Outputs::logits_only(logits));
//! # let ctx = StepContext { batch: &batch, student: &s, teacher: Some(&t), progress: Progress::new(0, 1), token_weights: None };
//! # let registry = Registry::from_inventory()?;
//! # let term = registry.losses.build("forward_kl", &Params::empty("loss[0]"), &BuildContext::new(&registry, dev, 0))?;
//! # assert!(term.compute(&ctx)?.to_scalar::<f32>()?.abs() < 1e-6);
//! # Ok(())
//! # }
//! ```
//!
//! A dynamically loaded plugin (a `cdylib`) registers through [`export_plugin!`] instead, since
//! `inventory` does not cross the library boundary; see `docs/plugins.md`.

pub use retort_core::*;

/// Exports a plugin library's registration function together with the ABI fingerprint of the
/// retort it is built against. The host reads the fingerprint through a C-ABI function, refuses
/// a library whose fingerprint differs (naming the field), and only then calls `register`.
///
/// ```
/// use retort_sdk::prelude::*;
///
/// # struct MyLoss;
/// # impl LossTerm for MyLoss {
/// #     fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
/// #         ctx.token_mean(&ctx.student.logits.sqr()?.mean(D::Minus1)?)
/// #     }
/// #     fn needs_teacher(&self) -> bool { false }
/// # }
/// fn build_my_loss(_: &Params, _: &BuildContext) -> Result<Box<dyn LossTerm>> {
///     Ok(Box::new(MyLoss))
/// }
///
/// fn register(r: &mut dyn Registrar) {
///     r.loss(Factory {
///         kind: "my_loss",
///         description: "...",
///         build: build_my_loss,
///         params: retort_sdk::registry::no_params,
///     });
/// }
/// retort_sdk::export_plugin!(register);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($register:path) => {
        /// ABI fingerprint of the retort this plugin was built against (C ABI, NUL-terminated).
        // SAFETY: an exported, unmangled C function returning a pointer to a static string.
        #[allow(unsafe_code)]
        #[no_mangle]
        pub extern "C" fn retort_plugin_fingerprint() -> *const ::std::os::raw::c_char {
            $crate::plugin::FINGERPRINT_NUL.as_ptr().cast()
        }

        /// Registers this plugin's kinds (Rust ABI: called only after the fingerprint matched).
        // SAFETY: unmangled so the host can find it; the host calls it only after the fingerprint
        // proved the same compiler, retort and candle built both sides.
        #[allow(unsafe_code)]
        #[no_mangle]
        pub fn retort_plugin_register(registrar: &mut dyn $crate::Registrar) {
            let register: fn(&mut dyn $crate::Registrar) = $register;
            register(registrar)
        }
    };
}

/// Everything a plugin usually needs in scope.
pub mod prelude {
    pub use retort_core::candle::{DType, Device, Tensor, Var, D};
    pub use retort_core::ops;
    pub use retort_core::registry::Factory;
    pub use retort_core::{
        Batch, BuildContext, DataSource, Decoder, Error, LossTerm, Model, Observer, Outputs, Params, Progress,
        Registrar, Result, Router, Scalar, ScalarSpec, Schedule, SourceLikelihood, Split, StepContext, Student, TapSet,
        Teacher, TermSignals, Tokenizer,
    };
}
