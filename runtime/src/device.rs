//! Device and dtype strings as users write them in configs and on the command line.
//!
//! The one device parser of the project (CLI flags, configs, placements):
//! `cpu`, `cuda` (= `cuda:0`), `cuda:N`, `mps`, `auto` → [`tch::Device`]; `f32`/`float32`/`fp32`,
//! `bf16`/`bfloat16`, `f16`/`float16`/`fp16`/`half` → [`tch::Kind`]. Asking for CUDA on a
//! machine without it is an error, never a silent fall-back to the CPU; the only fall-back
//! is the explicit `auto` (CUDA 0 when available, else the CPU).

use tch::{Device, Kind};

use crate::error::{Error, Result};

/// Parse a device string without checking that the device exists.
pub fn parse_device(s: &str) -> Result<Device> {
    let t = s.trim().to_ascii_lowercase();
    match t.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        "mps" => Ok(Device::Mps),
        "auto" => Ok(Device::cuda_if_available()),
        _ => {
            if let Some(n) = t.strip_prefix("cuda:") {
                match n.parse::<usize>() {
                    Ok(i) if i < 1024 => Ok(Device::Cuda(i)),
                    _ => Err(Error::invalid(format!(
                        "device `{s}`: `{n}` is not a CUDA device index (expected cuda:0, cuda:1, ...)"
                    ))),
                }
            } else {
                Err(Error::invalid(format!(
                    "device `{s}` is not one of cpu, cuda, cuda:N, mps, auto"
                )))
            }
        }
    }
}

/// Parse a device string and check that it exists on this machine: `cuda:N` needs CUDA
/// and at least N + 1 devices (an error saying what is there, never a silent CPU run).
pub fn resolve_device(s: &str) -> Result<Device> {
    let d = parse_device(s)?;
    check_available(d, s)?;
    Ok(d)
}

fn check_available(d: Device, asked: &str) -> Result<()> {
    if d == Device::Mps && !tch::utils::has_mps() {
        return Err(Error::invalid(format!(
            "device `{asked}`: MPS (Apple GPU) is not available on this machine; use `cpu`"
        )));
    }
    if let Device::Cuda(i) = d {
        if !tch::Cuda::is_available() {
            return Err(Error::invalid(format!(
                "device `{asked}`: CUDA is not available on this machine (libtorch sees no GPU); use `cpu`, or `auto` to fall back to the CPU"
            )));
        }
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            return Err(Error::invalid(format!(
                "device `{asked}`: this machine has {n} CUDA device(s) (cuda:0..cuda:{})",
                n.saturating_sub(1)
            )));
        }
    }
    Ok(())
}

/// Parse a dtype string.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" | "float" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "fp16" | "float16" | "half" => Ok(Kind::Half),
        _ => Err(Error::invalid(format!(
            "dtype `{s}` is not one of f32, bf16, f16"
        ))),
    }
}

/// Parse a dtype and check that `device` can compute in it (half precision on the CPU is
/// slow and partly unsupported in libtorch: refused, use f32 or bf16 there).
pub fn resolve_dtype(s: &str, device: Device) -> Result<Kind> {
    let k = parse_dtype(s)?;
    if device == Device::Cpu && k == Kind::Half {
        return Err(Error::invalid(format!(
            "dtype `{s}` on the CPU: float16 is not supported there; use f32 or bf16"
        )));
    }
    Ok(k)
}

/// The canonical name of a device (`cpu`, `cuda:N`, …), the inverse of [`parse_device`].
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

/// The canonical name of a dtype (`f32`, `bf16`, `f16`, else the Kind's debug name).
pub fn dtype_name(k: Kind) -> String {
    match k {
        Kind::Float => "f32".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Half => "f16".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device(" CUDA ").unwrap(), Device::Cuda(0));
        assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
        for bad in ["cuda:", "cuda:-1", "cuda:x", "tpu", "", "cuda:99999"] {
            let e = parse_device(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
        assert_eq!(resolve_device("cpu").unwrap(), Device::Cpu);
        for d in [Device::Cpu, Device::Cuda(2)] {
            assert_eq!(parse_device(&device_name(d)).unwrap(), d);
        }
    }

    #[test]
    fn cuda_absent_is_an_error_not_a_fallback() {
        let n = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        let too_far = format!("cuda:{n}");
        let e = resolve_device(&too_far).unwrap_err().to_string();
        assert!(e.contains(&too_far), "{e}");
        if n == 0 {
            assert!(e.contains("not available"), "{e}");
            assert_eq!(resolve_device("auto").unwrap(), Device::Cpu);
        }
    }

    #[test]
    fn dtypes() {
        assert_eq!(parse_dtype("f32").unwrap(), Kind::Float);
        assert_eq!(parse_dtype("BF16").unwrap(), Kind::BFloat16);
        assert_eq!(parse_dtype("fp16").unwrap(), Kind::Half);
        assert!(parse_dtype("int8")
            .unwrap_err()
            .to_string()
            .contains("int8"));
        assert!(resolve_dtype("f16", Device::Cpu).is_err());
        assert_eq!(resolve_dtype("bf16", Device::Cpu).unwrap(), Kind::BFloat16);
        assert_eq!(dtype_name(parse_dtype("bfloat16").unwrap()), "bf16");
    }
}
