//! Comparison of computed tensors with the reference tensors of a checkpoint folder
//! (`reference/expected.safetensors`), shared by every stage's parity rows.

use tch::{Kind, Tensor};

/// One line of `lavit parity`: a reference tensor and how ours compares.
#[derive(Debug, Clone)]
pub struct ParityRow {
    pub name: String,
    /// Largest |ours − reference| (0 for exact integer matches).
    pub max_abs_err: f64,
    pub pass: bool,
    /// Why it failed or was skipped, if so.
    pub note: String,
}

/// Floats: |a − b| ≤ atol + rtol·|b| everywhere (issue 3: atol 1e-4, rtol 1e-3).
pub const ATOL: f64 = 1e-4;
pub const RTOL: f64 = 1e-3;

/// Compare `ours` with `reference` under the parity rule: floats within tolerance,
/// integer tensors exactly. Shapes must match.
pub fn compare(name: &str, ours: &Tensor, reference: &Tensor) -> ParityRow {
    let fail = |note: String| ParityRow {
        name: name.to_string(),
        max_abs_err: f64::INFINITY,
        pass: false,
        note,
    };
    if ours.size() != reference.size() {
        return fail(format!(
            "shape {:?} ≠ reference {:?}",
            ours.size(),
            reference.size()
        ));
    }
    let a = ours.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let b = reference.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    if a.numel() == 0 {
        return ParityRow {
            name: name.into(),
            max_abs_err: 0.0,
            pass: true,
            note: String::new(),
        };
    }
    let diff = (&a - &b).abs();
    let max_abs_err = diff.max().double_value(&[]);
    let is_int = !reference.is_floating_point();
    let pass = if is_int {
        max_abs_err == 0.0
    } else {
        let bound = b.abs() * RTOL + ATOL;
        diff.le_tensor(&bound).all().int64_value(&[]) == 1 && max_abs_err.is_finite()
    };
    ParityRow {
        name: name.to_string(),
        max_abs_err,
        pass,
        note: if pass {
            String::new()
        } else if is_int {
            "ids differ".into()
        } else {
            "over tolerance".into()
        },
    }
}
