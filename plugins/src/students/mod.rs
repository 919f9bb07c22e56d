//! Built-in trainable student models.

use candle_core::{DType, Device};
use retort_core::{Params, Result};

pub mod llama;
pub mod transformer;

/// Mixed precision (`dtype = "bf16"` or `"f16"`: half-precision compute, f32 master weights;
/// f16 with a dynamic loss scale, `train.loss_scale`) runs on CUDA, where the fused kernels
/// and cuBLAS compute in half precision; elsewhere it is refused.
pub(crate) fn check_precision((compute, stored): (DType, DType), params: &Params, device: &Device) -> Result<()> {
    if compute == stored || device.is_cuda() {
        return Ok(());
    }
    let name = format!("{compute:?}").to_lowercase();
    Err(params.error(
        "dtype",
        format!(
            "\"{name}\" trains in mixed precision ({name} compute, f32 master weights) on CUDA devices; on the \
             CPU candle widens half-precision matrix products to f32 and the fused kernels run f32/f64 only, so \
             it would be slower and less precise than \"f32\": use \"f32\" here (run.device = \"cuda\" for \
             {name})"
        ),
    ))
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
        let f16 = check_precision((DType::F16, DType::F32), &params, &cpu).expect_err("f16 on the CPU");
        for (err, says) in [(bf16, "bf16 compute"), (f16, "f16 compute")] {
            let text = err.to_string();
            assert!(
                text.contains("student.dtype") && text.contains(says) && text.contains("CUDA"),
                "{text}"
            );
            assert_eq!(err.exit_code(), 2);
        }
    }
}
