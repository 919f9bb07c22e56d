//! The run-time choice of the AVX-512 build of a CPU loop.

/// Defines a function that runs its body's AVX-512 build where the CPU has it (AVX-512 F and
/// DQ, AVX2, FMA: [`avx512::available`](super::avx512::available), checked at run time and
/// cached by std) and its baseline (SSE2) build elsewhere. The crate targets baseline x86-64;
/// this widens the hot loops without `-C target-cpu=native`. Two forms:
///
/// - `avx512_dispatch!(fn name<T: Real>(args) -> R => inner)`: one generic loop compiled
///   twice. `inner` and what it calls should be `#[inline(always)]`, so that the loops are
///   generated inside the AVX-512 copy.
/// - `avx512_dispatch!(fn name(args) -> R => fast, else slow)`: `fast` is a
///   `#[target_feature(enable = "avx512f,fma")]` function of explicit intrinsics (an op's
///   `cpu_avx512.rs`, built from [`avx512`](super::avx512)'s helpers), `slow` the generic
///   function it must agree with.
///
/// This is how every kernel enters AVX-512 code; the `unsafe` call it takes is written here.
macro_rules! avx512_dispatch {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident $(<$t:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        => $fast:expr, else $slow:expr
    ) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$t: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512 $(<$t: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    $fast($($arg),*)
                }
                if $crate::kernels::cpu::raw::avx512::available() {
                    // SAFETY: the CPU runs every feature `avx512` is compiled for (checked
                    // just above).
                    #[allow(unsafe_code)]
                    return unsafe { avx512($($arg),*) };
                }
            }
            $slow($($arg),*)
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident $(<$t:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        => $inner:expr
    ) => {
        $crate::kernels::cpu::raw::avx512_dispatch! {
            $(#[$meta])*
            $vis fn $name $(<$t: $bound>)? ($($arg: $ty),*) $(-> $ret)? => $inner, else $inner
        }
    };
}

pub(crate) use avx512_dispatch;
