//! The logit terms fused with the student's output head: the loss of a step and its gradients
//! w.r.t. the head's input and weight, computed over chunks of tokens, so that the step's
//! `[tokens, vocabulary]` logits (student's and teacher's) and their gradient never exist whole.
//!
//! With the head's input `h [N, H]` (after the final norm) and weight `W [V, H]`
//! (`z = h W^T`), and each term `k` in its per-token form (`LossTerm::per_token`: values
//! `v_k(z_i)` and a factor `s_k`, e.g. `T^2`), the objective is
//!
//! `L = sum_k w_k s_k sum_i omega_i v_k(z_i) / D`
//!
//! with `w_k` the router's weights and `omega` the token weights of `StepContext::token_mean`
//! (padding mask times the router's token weights, `D = max(sum_i omega_i, 1)`; or
//! `omega = 1, D = N` when there are neither). For each chunk `c` of `C` tokens:
//! `z_c = h_c W^T` (`[C, V]`), the teacher's rows of the chunk (its dense logits, its own head
//! applied to its hidden states, or its top-`k` rows), `G_c = dL/dz_c` by the terms' own
//! backward (the fused divergence kernels where they run), then `dL/dh_c = G_c W` and
//! `dL/dW += G_c^T h_c`. The products are those of the unfused path (plus the teacher's head
//! when it hands its head instead of logits); what is saved is memory: a few `[C, V]` instead
//! of several `[N, V]`. A chunk holds whole vocabulary rows, so every term applies unchanged.
//!
//! The same idea as Liger-Kernel's fused linear cross-entropy / JSD (Hsu et al., 2024,
//! "Liger Kernel: Efficient Triton Kernels for LLM Training") and Cut Cross-Entropy
//! (Wijmans et al., 2024, "Cut Your Losses in Large-Vocabulary Language Models"). Device
//! generic: the products run through candle (cuBLAS on CUDA, the `gemm` crate on the CPU, where
//! `dL/dW` accumulates in place) and the terms through their own ops.

mod chunks;
mod inject;
mod student_head;
mod weight_grad;

pub use chunks::{fused_loss, HeadLoss, HeadTerm, WeightGradient};

/// Tokens per chunk when the size is left to [`chunk_tokens`]: each chunk adds `dL/dW`'s
/// `[V, H]` once more to the memory traffic, so chunks much smaller than this cost time.
pub const AUTO_CHUNK_TOKENS: usize = 256;

/// Bytes one chunk's f32 student logits may take when the size is left to [`chunk_tokens`].
pub const CHUNK_LOGIT_BYTES: usize = 128 << 20;

/// Tokens per chunk: `requested` when non-zero, else [`AUTO_CHUNK_TOKENS`], or fewer (at least
/// 16) where one chunk's f32 logits would pass [`CHUNK_LOGIT_BYTES`] (vocabularies above
/// 131,072).
pub fn chunk_tokens(requested: usize, vocab: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    (CHUNK_LOGIT_BYTES / (4 * vocab.max(1))).clamp(16, AUTO_CHUNK_TOKENS)
}

#[cfg(test)]
mod tests;
