//! Built-in trainable student models.

use candle_core::{DType, Device};
use retort_core::{Params, Result};

pub mod llama;
pub mod transformer;

/// Mixed precision (`dtype = "bf16"`: bf16 compute, f32 master weights) runs on CUDA, where the
/// fused kernels and cuBLAS compute in bf16; elsewhere it is refused, as is f16 (it needs loss
/// scaling, which the training loop does not do).
pub(crate) fn check_precision((compute, stored): (DType, DType), params: &Params, device: &Device) -> Result<()> {
    if compute == stored {
        return Ok(());
    }
    if compute == DType::F16 {
        return Err(params.error(
            "dtype",
            "f16 training needs loss scaling, which retort does not do yet: use \"bf16\" (mixed precision: bf16 \
             compute, f32 master weights) or \"f32\"",
        ));
    }
    if !device.is_cuda() {
        return Err(params.error(
            "dtype",
            "\"bf16\" trains in mixed precision (bf16 compute, f32 master weights) on CUDA devices; on the CPU \
             candle widens bf16 matrix products to f32 and the fused kernels run f32/f64 only, so it would be \
             slower and less precise than \"f32\": use \"f32\" here (run.device = \"cuda\" for bf16)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_students_are_refused_where_mixed_precision_does_not_run() {
        let params = Params::new("student", serde_json::Map::new());
        let cpu = Device::Cpu;
        assert!(check_precision((DType::F32, DType::F32), &params, &cpu).is_ok());
        assert!(check_precision((DType::BF16, DType::BF16), &params, &cpu).is_ok());
        let bf16 = check_precision((DType::BF16, DType::F32), &params, &cpu).expect_err("bf16 on the CPU");
        let f16 = check_precision((DType::F16, DType::F32), &params, &cpu).expect_err("f16");
        for (err, says) in [(bf16, "CUDA"), (f16, "loss scaling")] {
            let text = err.to_string();
            assert!(text.contains("student.dtype") && text.contains(says), "{text}");
            assert_eq!(err.exit_code(), 2);
        }
    }
}
