//! The sizes of a tensor whose rank is part of a forward pass's contract.

use tch::Tensor;

/// The sizes of `t`, which must have rank `N`: `let [b, n, c] = dims(x, "[B, N, C]");`.
///
/// For forward passes that return a bare `Tensor`, as tch's own ops do: a tensor of another
/// rank is a bug of the caller, and panics (naming `what` and the shape it got) just as a
/// shape mismatch inside any tch op would. Code that can return an error checks the shape
/// itself and returns [`crate::Error::Invalid`] instead.
#[track_caller]
pub fn dims<const N: usize>(t: &Tensor, what: &str) -> [i64; N] {
    let size = t.size();
    match <[i64; N]>::try_from(size.as_slice()) {
        Ok(d) => d,
        Err(_) => panic!("{what}: expected a tensor of rank {N}, got shape {size:?}"),
    }
}
