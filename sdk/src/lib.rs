//! retort-sdk: what a third-party retort plugin depends on.
//!
//! It re-exports the contracts of `retort-core` and the exact candle version retort is built
//! against. A statically linked plugin crate registers its kinds with `inventory::submit!`
//! exactly like the built-ins:
//!
//! ```
//! use retort_sdk::prelude::*;
//!
//! struct Zero;
//! impl LossTerm for Zero {
//!     fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
//!         Ok(ctx.student.logits.zeros_like()?.sum_all()?)
//!     }
//!     fn needs_teacher(&self) -> bool { false }
//! }
//! fn build(_: &Params, _: &BuildContext) -> Result<Box<dyn LossTerm>> { Ok(Box::new(Zero)) }
//! retort_sdk::inventory::submit! {
//!     Factory::<dyn LossTerm> { kind: "zero", description: "always 0", build }
//! }
//! ```
//!
//! A dynamically loaded plugin (a `cdylib`) registers through [`export_plugin!`] instead, since
//! `inventory` does not cross the library boundary; see `docs/plugins.md`.

pub use retort_core::*;

/// Exports a plugin library's registration function together with the ABI fingerprint of the
/// retort it is built against. The host reads the fingerprint through a C-ABI function, refuses
/// a library whose fingerprint differs (naming the field), and only then calls `register`.
///
/// ```ignore
/// fn register(r: &mut dyn retort_sdk::Registrar) {
///     r.loss(Factory { kind: "my_loss", description: "...", build: build_my_loss });
/// }
/// retort_sdk::export_plugin!(register);
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
    pub use retort_core::registry::Factory;
    pub use retort_core::{
        Batch, BuildContext, DataSource, Error, LossTerm, Model, Observer, Outputs, Params, Progress, Registrar,
        Result, Router, Scalar, ScalarSpec, Schedule, Split, StepContext, Student, TapSet, Teacher, TermSignals,
        Tokenizer,
    };
}
