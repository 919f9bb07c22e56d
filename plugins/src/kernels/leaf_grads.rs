//! Gradients of the trainable parameters accumulated in place, in buffers kept from one step
//! to the next (what PyTorch keeps in `param.grad`).
//!
//! candle's backward gives every node's gradient a fresh zero tensor and adds each
//! contribution into it: for a parameter that is a zero-filled tensor, a second one for the
//! sum and a full pass, per step, in freshly faulted pages (for SmolLM2's tied `[49152, 576]`
//! embedding, 113 MB each). A fused op that computes a parameter's gradient itself (the CPU
//! linear layer's `dW`, the embedding's scatter, the fused LM head's `dL/dW`) writes it here
//! instead, overwriting the buffer for the first contribution of a step and adding onto it
//! for the next ones, and hands candle no gradient for that parameter.
//!
//! The engine owns one [`LeafGrads`] for the parameters it trains and makes it the thread's
//! collector for a step ([`LeafGrads::collect`]); outside such a scope, or for a tensor it does
//! not hold, [`claim`] says no and the op returns its gradient to candle as usual. An op whose
//! gradient is a fresh tensor anyway gives it over whole ([`hand_over`]): the fused LM head
//! collects each chunk's `dL/dlogits` from the loss kernels that way.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, InplaceOp2, Layout, Result, Tensor, TensorId};

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::rows::{slice, slice_mut};

/// The gradient buffers of a set of parameters.
pub struct LeafGrads {
    slots: Mutex<HashMap<TensorId, Slot>>,
}

/// One parameter's buffer and what it holds this step.
struct Slot {
    /// The parameter (its shape, dtype and device).
    param: Tensor,
    /// Allocated at the parameter's first in-place contribution, then kept.
    buffer: Option<Tensor>,
    state: State,
}

/// What a slot holds this step.
enum State {
    /// No contribution yet.
    Empty,
    /// The sum so far is in the buffer.
    Buffer,
    /// The sum so far is this tensor (contributions handed over whole, [`LeafGrads::add`]).
    Held(Tensor),
}

/// While alive, a [`LeafGrads`] is the thread's collector ([`LeafGrads::collect`]).
#[must_use = "the collector is the thread's only while the guard lives"]
pub struct Collecting(Option<Arc<LeafGrads>>);

impl Drop for Collecting {
    fn drop(&mut self) {
        let previous = self.0.take();
        ACTIVE.with(|a| *a.borrow_mut() = previous);
    }
}

/// Where an op writes a parameter's gradient ([`claim`]).
pub struct Claim {
    /// The parameter's buffer: contiguous, its shape, dtype and device.
    pub buffer: Tensor,
    /// Whether to add onto the buffer (`false`: overwrite it, the step's first contribution).
    pub accumulate: bool,
}

thread_local! {
    static ACTIVE: RefCell<Option<Arc<LeafGrads>>> = const { RefCell::new(None) };
}

/// The buffer to write `param`'s gradient into, when the thread is collecting
/// ([`LeafGrads::collecting`]) and the collector holds `param` with nothing handed over whole
/// this step; `None` otherwise (then the op returns the gradient to candle). The caller must
/// write the whole gradient into the buffer (added when [`Claim::accumulate`]).
pub fn claim(param: &Tensor) -> Result<Option<Claim>> {
    let active = ACTIVE.with(|a| a.borrow().clone());
    match active {
        Some(grads) => grads.claim(param),
        None => Ok(None),
    }
}

/// Hands `grad`, the gradient an op computed for its argument `arg`, to the thread's
/// collector when it holds `arg` (returns `None`: the op gives candle nothing for `arg`, so no
/// zero-filled sum is made for it); returns `Some(grad)` otherwise. For ops whose gradient is a
/// fresh tensor anyway (a loss kernel's `dL/dlogits`).
pub fn hand_over(arg: &Tensor, grad: Tensor) -> Result<Option<Tensor>> {
    let active = ACTIVE.with(|a| a.borrow().clone());
    match active {
        Some(grads) if grads.holds(arg) => {
            grads.add(arg, grad)?;
            Ok(None)
        }
        _ => Ok(Some(grad)),
    }
}

impl LeafGrads {
    /// Buffers for `params` (none allocated yet).
    pub fn new<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Arc<Self> {
        let slots = params
            .into_iter()
            .map(|p| {
                let slot = Slot {
                    param: p.clone(),
                    buffer: None,
                    state: State::Empty,
                };
                (p.id(), slot)
            })
            .collect();
        Arc::new(LeafGrads {
            slots: Mutex::new(slots),
        })
    }

    /// Makes `self` this thread's collector until the returned guard is dropped (the previous
    /// one is then restored).
    pub fn collect(self: &Arc<Self>) -> Collecting {
        Collecting(ACTIVE.with(|a| a.borrow_mut().replace(self.clone())))
    }

    /// Runs `f` with `self` as this thread's collector ([`LeafGrads::collect`]).
    pub fn collecting<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        let _scope = self.collect();
        f()
    }

    /// Forgets every contribution (the start of a step; buffers are kept).
    pub fn clear(&self) {
        for slot in self.lock().values_mut() {
            slot.state = State::Empty;
        }
    }

    /// The step's gradient of `param` (`None` if nothing was contributed), leaving its slot
    /// empty. A buffer is returned as it is, not copied: the tensor is valid until the next
    /// contribution to `param`, so it must be used up before the next step's backward.
    pub fn take(&self, param: &Tensor) -> Option<Tensor> {
        let mut slots = self.lock();
        let slot = slots.get_mut(&param.id())?;
        match std::mem::replace(&mut slot.state, State::Empty) {
            State::Empty => None,
            State::Buffer => slot.buffer.clone(),
            State::Held(t) => Some(t),
        }
    }

    /// Adds a contribution computed whole (`grad`, `param`'s shape) to `param`'s gradient: in
    /// place where the sum is in a CPU f32/f64 buffer, else by a new tensor. `false` (and
    /// nothing done) when `param` is not one of the collector's parameters.
    pub fn add(&self, param: &Tensor, grad: Tensor) -> Result<bool> {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&param.id()) else {
            return Ok(false);
        };
        if grad.dims() != param.dims() {
            bail!(
                "leaf gradient of {:?}: got a {:?} contribution",
                param.dims(),
                grad.dims()
            )
        }
        slot.state = match std::mem::replace(&mut slot.state, State::Empty) {
            State::Empty => State::Held(grad),
            State::Held(t) => State::Held((t + grad)?),
            State::Buffer => {
                let buffer = slot.buffer.as_ref().expect("a buffer state has a buffer");
                if buffer.device().is_cpu() && grad.dtype() == buffer.dtype() {
                    buffer.inplace_op2(&grad, &AddInto)?;
                    State::Buffer
                } else {
                    State::Held((buffer + grad)?)
                }
            }
        };
        Ok(true)
    }

    /// Whether `param` is one of the collector's tensors.
    pub fn holds(&self, param: &Tensor) -> bool {
        self.lock().contains_key(&param.id())
    }

    fn claim(&self, param: &Tensor) -> Result<Option<Claim>> {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&param.id()) else {
            return Ok(None);
        };
        let accumulate = match slot.state {
            State::Empty => false,
            State::Buffer => true,
            State::Held(_) => return Ok(None),
        };
        let buffer = match &slot.buffer {
            Some(b) => b.clone(),
            None => {
                let b = slot.param.zeros_like()?.contiguous()?;
                slot.buffer = Some(b.clone());
                b
            }
        };
        slot.state = State::Buffer;
        Ok(Some(Claim { buffer, accumulate }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TensorId, Slot>> {
        // A panic while the lock was held left no half-written state worth refusing.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `dst += src` in place (CPU f32/f64, contiguous, one size).
struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "leaf-grad-add"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> Result<()> {
        match dst {
            CpuStorage::F32(_) => add_into::<f32>(dst, dl, src, sl),
            CpuStorage::F64(_) => add_into::<f64>(dst, dl, src, sl),
            other => bail!("leaf gradient add: unsupported dtype {:?}", other.dtype()),
        }
    }
}

fn add_into<T: Real>(dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> Result<()> {
    use rayon::prelude::*;
    let dst = slice_mut::<T>(dst, dl, "leaf gradient")?;
    let src = slice::<T>(src, sl, "leaf gradient contribution")?;
    if dst.len() != src.len() {
        bail!("leaf gradient add: {} elements onto {}", src.len(), dst.len())
    }
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = *d + s;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).expect("tensor")
    }

    fn values(x: &Tensor) -> Vec<f32> {
        x.to_vec1().expect("values")
    }

    #[test]
    fn claims_only_inside_a_scope_and_for_held_parameters() {
        let (p, q) = (t(&[1.0, 2.0]), t(&[3.0]));
        let grads = LeafGrads::new([&p]);
        assert!(claim(&p).expect("claim").is_none(), "no scope");
        grads.collecting(|| {
            assert!(claim(&q).expect("claim").is_none(), "not held");
            let first = claim(&p).expect("claim").expect("held");
            assert!(!first.accumulate);
            assert_eq!(first.buffer.dims(), &[2]);
            assert!(claim(&p).expect("claim").expect("held").accumulate);
        });
        assert!(claim(&p).expect("claim").is_none(), "scope restored");
    }

    #[test]
    fn contributions_add_up_and_take_empties_the_slot() {
        let p = t(&[0.0, 0.0, 0.0]);
        let grads = LeafGrads::new([&p]);
        assert!(grads.take(&p).is_none());
        // Whole contributions: held, summed.
        assert!(grads.add(&p, t(&[1.0, 2.0, 3.0])).expect("add"));
        assert!(grads.add(&p, t(&[1.0, 1.0, 1.0])).expect("add"));
        assert_eq!(values(&grads.take(&p).expect("sum")), vec![2.0, 3.0, 4.0]);
        assert!(grads.take(&p).is_none());
        // In the buffer: a claim overwrites, a whole contribution adds in place.
        let buffer = grads.collecting(|| {
            let c = claim(&p).expect("claim").expect("held");
            c.buffer.inplace_op2(&t(&[5.0, 5.0, 5.0]), &AddInto).expect("write");
            c.buffer
        });
        assert!(grads.add(&p, t(&[1.0, 2.0, 3.0])).expect("add"));
        let sum = grads.take(&p).expect("sum");
        assert_eq!(values(&sum), vec![6.0, 7.0, 8.0]);
        assert_eq!(values(&buffer), vec![6.0, 7.0, 8.0], "the same buffer, not a copy");
        assert!(!grads.add(&t(&[1.0]), t(&[1.0])).expect("add"), "not held");
        assert!(grads.add(&p, t(&[1.0])).is_err(), "wrong shape");
    }

    #[test]
    fn hand_over_gives_a_held_tensor_to_the_collector_only() {
        let (p, q) = (t(&[1.0, 2.0]), t(&[3.0]));
        let grads = LeafGrads::new([&p]);
        assert!(hand_over(&p, t(&[1.0, 1.0])).expect("no scope").is_some());
        grads.collecting(|| {
            assert!(hand_over(&p, t(&[1.0, 1.0])).expect("held").is_none());
            assert!(hand_over(&p, t(&[0.5, 0.0])).expect("held").is_none());
            assert!(hand_over(&q, t(&[1.0])).expect("not held").is_some());
        });
        assert_eq!(values(&grads.take(&p).expect("sum")), vec![1.5, 1.0]);
    }

    #[test]
    fn a_parameter_held_whole_is_not_claimed_and_clear_forgets() {
        let p = Tensor::zeros(4, DType::F64, &Device::Cpu).expect("p");
        let grads = LeafGrads::new([&p]);
        grads.add(&p, p.ones_like().expect("ones")).expect("add");
        grads.collecting(|| assert!(claim(&p).expect("claim").is_none()));
        grads.clear();
        assert!(grads.take(&p).is_none());
        grads.collecting(|| assert!(!claim(&p).expect("claim").expect("held").accumulate));
    }
}
