//! The sizes of a tensor whose rank is part of a forward pass's contract.

use tch::Tensor;

use crate::{Error, Result};

/// The sizes of `t`, which must have rank `N`: `let [b, n, c] = dims(x, "[B, N, C]")?;`.
///
/// A tensor of another rank is an [`Error::Invalid`] naming `what` and the shape it got, never
/// a panic: forward passes that take their input from a file or a request return it as their
/// own error.
pub fn dims<const N: usize>(t: &Tensor, what: &str) -> Result<[i64; N]> {
    let size = t.size();
    <[i64; N]>::try_from(size.as_slice()).map_err(|_| {
        Error::Invalid(format!(
            "{what}: expected a tensor of rank {N}, got shape {size:?}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_rank_is_an_error_naming_the_contract() {
        let t = Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(dims::<2>(&t, "x").ok(), Some([2, 3]));
        let e = dims::<3>(&t, "attention input [B, N, C]")
            .err()
            .map(|e| e.to_string());
        let msg = e.unwrap_or_default();
        assert!(msg.contains("attention input [B, N, C]"), "{msg}");
        assert!(msg.contains("rank 3") && msg.contains("[2, 3]"), "{msg}");
    }
}
