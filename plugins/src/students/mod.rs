//! Built-in trainable student models.

use candle_core::{DType, Device};
use retort_core::{Params, Result};

pub mod llama;
pub mod transformer;

/// Mixed precision (`dtype = "bf16"` or `"f16"`: f32 master weights; f16 with a dynamic loss
/// scale, `train.loss_scale`) runs on CUDA, where the fused kernels and cuBLAS compute in half
/// precision. On the CPU, `"bf16"` runs where the model multiplies in bf16 products
/// (`cpu_bf16`: the llama student) and the CPU has the AMX tiles that make them fast; anything
/// else is refused, saying why.
pub(crate) fn check_precision(requested: DType, cpu_bf16: bool, params: &Params, device: &Device) -> Result<()> {
    if !matches!(requested, DType::BF16 | DType::F16) || device.is_cuda() {
        return Ok(());
    }
    let tiles = crate::kernels::cpu::bf16_matmul::tiles_available();
    if requested == DType::BF16 && cpu_bf16 && tiles {
        return Ok(());
    }
    let why = match (requested, cpu_bf16) {
        (DType::F16, _) => "\"f16\" trains in mixed precision (f16 compute, f32 master weights) on CUDA devices only; \
                            on the CPU use \"f32\", or \"bf16\" for a llama student on a CPU with AMX"
            .to_string(),
        (_, false) => "\"bf16\" trains in mixed precision on CUDA devices, and on the CPU only for llama students \
                       (bf16 products on the AMX tiles); use \"f32\" here (run.device = \"cuda\" for bf16)"
            .to_string(),
        _ => format!(
            "\"bf16\" on the CPU multiplies on Intel AMX tiles (Xeon Sapphire Rapids or later), which {}: \
             without them bf16 products run at the speed of f32 ones with less precision; use \"f32\" here \
             (run.device = \"cuda\" for bf16)",
            if std::env::var("RETORT_AMX").is_ok_and(|v| v == "0") {
                "RETORT_AMX=0 turned off"
            } else {
                "this CPU or its kernel does not offer"
            }
        ),
    };
    Err(params.error("dtype", why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_students_are_refused_where_mixed_precision_does_not_run() {
        let params = Params::new("student", serde_json::Map::new());
        let cpu = Device::Cpu;
        assert!(check_precision(DType::F32, false, &params, &cpu).is_ok());
        assert!(check_precision(DType::F64, true, &params, &cpu).is_ok());
        let tiles = crate::kernels::cpu::bf16_matmul::tiles_available();
        assert_eq!(check_precision(DType::BF16, true, &params, &cpu).is_ok(), tiles);
        let mut refused = vec![
            (check_precision(DType::F16, true, &params, &cpu), "CUDA devices only"),
            (
                check_precision(DType::BF16, false, &params, &cpu),
                "only for llama students",
            ),
        ];
        if !tiles {
            refused.push((check_precision(DType::BF16, true, &params, &cpu), "AMX"));
        }
        for (result, says) in refused {
            let err = result.expect_err(says);
            let text = err.to_string();
            assert!(text.contains("student.dtype") && text.contains(says), "{text}");
            assert_eq!(err.exit_code(), 2);
        }
    }
}
