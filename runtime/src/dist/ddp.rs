//! Data-parallel training helpers over a [`ProcessGroup`], as PyTorch's DDP does them:
//! parameters and buffers broadcast from rank 0 at start, gradients averaged after each
//! backward in ~25 MB buckets (flatten → all-reduce sum → ÷ world size → copy back),
//! arbitrary statistics (EMA codebook counts and sums) summed over ranks, and each rank's
//! slice of the same global batch order.
//!
//! Equivalence: with the loss a mean over the batch and each rank given an equal slice of
//! the same global batch, the averaged gradient is the gradient of the global batch's mean
//! loss, so N ranks × batch B step exactly like one rank × batch N·B (up to float rounding;
//! tested for 2 ranks in tests/dist.rs). A loss that is a mean over a *varying* number of
//! items per rank (tokens after padding removal) needs its own weighting.

use std::collections::BTreeMap;

use tch::{nn, Kind, Tensor};

use super::env::shard_range;
use super::group::{ProcessGroup, ReduceOp};
use crate::error::{Error, Result, TchContext};

/// PyTorch DDP's default bucket size (`bucket_cap_mb = 25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Rank `rank`'s contiguous slice of `global` (see [`shard_range`]).
pub fn local_slice<'a, T>(global: &'a [T], pg: &ProcessGroup) -> Result<&'a [T]> {
    Ok(&global[shard_range(global.len(), pg.rank(), pg.world_size())?])
}

/// Every variable of `vs` (trainable parameters and buffers), in name order.
pub fn var_store_tensors(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let sorted: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    sorted.into_iter().collect()
}

/// Make every rank start from rank 0's weights: broadcast all variables of `vs`
/// (parameters and buffers). Fails, before moving any data, when the ranks' variable names,
/// shapes or dtypes differ.
pub fn broadcast_var_store(pg: &ProcessGroup, vs: &nn::VarStore) -> Result<()> {
    broadcast_named(pg, &var_store_tensors(vs))
}

/// Broadcast named tensors from rank 0, in place, in buckets of [`DEFAULT_BUCKET_BYTES`].
/// Names are sorted first, so each rank may list them in any order; they must agree on the
/// set (checked).
pub fn broadcast_named(pg: &ProcessGroup, named: &[(String, Tensor)]) -> Result<()> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    let mut sorted: Vec<&(String, Tensor)> = named.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    check_same_everywhere(pg, &sorted, "broadcast of parameters and buffers")?;
    let _g = tch::no_grad_guard();
    for bucket in plan_buckets(sorted.iter().map(|(_, t)| t), DEFAULT_BUCKET_BYTES) {
        let ts: Vec<&Tensor> = bucket.iter().map(|&i| &sorted[i].1).collect();
        let mut flat = flatten(&ts, "broadcast")?;
        pg.broadcast(&mut flat, 0)?;
        if !pg.is_rank0() {
            unflatten_into(&flat, &ts, "broadcast")?;
        }
    }
    Ok(())
}

/// In place: each tensor becomes the sum over ranks (`Sum`), or the max / min. Tensors are
/// bucketed by dtype and device; every rank must pass the same shapes in the same order.
pub fn all_reduce_tensors(pg: &ProcessGroup, tensors: &[Tensor], op: ReduceOp) -> Result<()> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    let _g = tch::no_grad_guard();
    for bucket in plan_buckets(tensors.iter(), DEFAULT_BUCKET_BYTES) {
        let ts: Vec<&Tensor> = bucket.iter().map(|&i| &tensors[i]).collect();
        reduce_bucket(pg, &ts, op, None)?;
    }
    Ok(())
}

/// In place: each floating-point tensor becomes the mean over ranks.
pub fn all_reduce_mean(pg: &ProcessGroup, tensors: &[Tensor]) -> Result<()> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    for t in tensors {
        if !t.is_floating_point() {
            return Err(Error::invalid(format!(
                "all_reduce_mean: a {:?} tensor cannot hold a mean (sum it instead)",
                t.kind()
            )));
        }
    }
    let _g = tch::no_grad_guard();
    for bucket in plan_buckets(tensors.iter(), DEFAULT_BUCKET_BYTES) {
        let ts: Vec<&Tensor> = bucket.iter().map(|&i| &tensors[i]).collect();
        reduce_bucket(pg, &ts, ReduceOp::Sum, Some(pg.world_size()))?;
    }
    Ok(())
}

/// The mean of a number over ranks (a loss for the log: rank 0 reports the global value).
pub fn mean_scalar(pg: &ProcessGroup, v: f64) -> Result<f64> {
    if pg.world_size() == 1 {
        return Ok(v);
    }
    let mut t = Tensor::from_slice(&[v]);
    pg.all_reduce(&mut t, ReduceOp::Sum)?;
    Ok(t.double_value(&[0]) / pg.world_size() as f64)
}

/// Means over ranks of several scalars in one collective (identity for one rank).
pub fn mean_scalars(pg: &ProcessGroup, v: &[f64]) -> Result<Vec<f64>> {
    if pg.world_size() == 1 || v.is_empty() {
        return Ok(v.to_vec());
    }
    let mut t = Tensor::from_slice(v);
    pg.all_reduce(&mut t, ReduceOp::Sum)?;
    let sums: Vec<f64> = Vec::<f64>::try_from(&t).ctx("mean of scalars")?;
    Ok(sums.iter().map(|s| s / pg.world_size() as f64).collect())
}

/// Concatenation over ranks (in rank order) of each rank's rows `t` (R_r, …): the row
/// counts are exchanged first, then one sum of zero-padded slots. Every rank gets the whole.
pub fn all_gather_rows(pg: &ProcessGroup, t: &Tensor) -> Result<Tensor> {
    let w = pg.world_size();
    if w == 1 {
        return Ok(t.shallow_clone());
    }
    let rows = t.size().first().copied().unwrap_or(0);
    let mut counts = vec![0i64; w];
    counts[pg.rank()] = rows;
    let mut c = Tensor::from_slice(&counts);
    pg.all_reduce(&mut c, ReduceOp::Sum)?;
    let counts: Vec<i64> = Vec::<i64>::try_from(&c).ctx("row counts")?;
    let total: i64 = counts.iter().sum();
    let before: i64 = counts[..pg.rank()].iter().sum();
    let mut shape = t.size();
    shape[0] = total;
    let mut buf = t
        .f_new_zeros(shape.as_slice(), (t.kind(), t.device()))
        .ctx("all-gather buffer")?;
    if rows > 0 {
        buf.f_narrow(0, before, rows)
            .and_then(|mut s| s.f_copy_(t))
            .ctx("all-gather slot")?;
    }
    pg.all_reduce(&mut buf, ReduceOp::Sum)?;
    Ok(buf)
}

/// Gradient averaging for a fixed list of parameters (PyTorch DDP's reducer, run after the
/// backward rather than overlapped with it).
pub struct GradSync {
    params: Vec<(String, Tensor)>,
    bucket_bytes: usize,
}

impl std::fmt::Debug for GradSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradSync")
            .field("params", &self.params.len())
            .field("bucket_bytes", &self.bucket_bytes)
            .finish()
    }
}

impl GradSync {
    /// Average the gradients of `params` (e.g. `AdamW::params()`), sorted by name, in
    /// buckets of `bucket_bytes` ([`DEFAULT_BUCKET_BYTES`] for DDP's 25 MB). Checks, with
    /// one collective, that every rank has the same names, shapes and dtypes.
    pub fn new(
        pg: &ProcessGroup,
        mut params: Vec<(String, Tensor)>,
        bucket_bytes: usize,
    ) -> Result<Self> {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        if pg.world_size() > 1 {
            let refs: Vec<&(String, Tensor)> = params.iter().collect();
            check_same_everywhere(pg, &refs, "gradient averaging")?;
        }
        Ok(Self {
            params,
            bucket_bytes: bucket_bytes.max(1),
        })
    }

    /// Number of parameters synchronised.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Buckets a step uses when every parameter has a gradient.
    pub fn bucket_count(&self) -> usize {
        plan_buckets(self.params.iter().map(|(_, t)| t), self.bucket_bytes).len()
    }

    /// After `backward` on every rank: every gradient becomes the mean over ranks. A
    /// parameter the loss reached on some ranks only gets a zero gradient on the others
    /// first (so the mean is that of the global batch); one reached on no rank keeps no
    /// gradient (the optimiser skips it, as it would in a one-rank run).
    pub fn average(&self, pg: &ProcessGroup) -> Result<()> {
        if pg.world_size() == 1 || self.params.is_empty() {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        // Which parameters have a gradient on any rank (one small collective).
        let local: Vec<i32> = grads.iter().map(|g| i32::from(g.defined())).collect();
        let mut any = Tensor::from_slice(&local);
        pg.all_reduce(&mut any, ReduceOp::Max)?;
        let any: Vec<i32> = Vec::<i32>::try_from(&any).ctx("gradient presence flags")?;
        let mut present: Vec<Tensor> = Vec::new();
        for ((i, g), (name, p)) in grads.into_iter().enumerate().zip(&self.params) {
            if any[i] == 0 {
                continue;
            }
            if g.defined() {
                present.push(g);
            } else {
                let z = p
                    .f_zeros_like()
                    .ctx(format!("zero gradient for `{name}`"))?;
                pg.set_grad(p, z.shallow_clone())?;
                present.push(p.grad());
            }
        }
        for bucket in plan_buckets(present.iter(), self.bucket_bytes) {
            let ts: Vec<&Tensor> = bucket.iter().map(|&i| &present[i]).collect();
            reduce_bucket(pg, &ts, ReduceOp::Sum, Some(pg.world_size()))?;
        }
        Ok(())
    }
}

/// Reduce one bucket in place: a single contiguous tensor directly, several through one
/// flat buffer. `mean_over`: divide by this many ranks afterwards.
fn reduce_bucket(
    pg: &ProcessGroup,
    ts: &[&Tensor],
    op: ReduceOp,
    mean_over: Option<usize>,
) -> Result<()> {
    if let [t] = ts {
        if t.is_contiguous() {
            let mut t = t.shallow_clone();
            pg.all_reduce(&mut t, op)?;
            if let Some(n) = mean_over {
                let _ = t.f_div_scalar_(n as f64).ctx("all_reduce mean")?;
            }
            return Ok(());
        }
    }
    let mut flat = flatten(ts, "all_reduce")?;
    pg.all_reduce(&mut flat, op)?;
    if let Some(n) = mean_over {
        let _ = flat.f_div_scalar_(n as f64).ctx("all_reduce mean")?;
    }
    unflatten_into(&flat, ts, "all_reduce")
}

/// Consecutive runs of tensors with the same dtype and device, each run cut after it
/// reaches `bucket_bytes` (a tensor larger than that is a bucket of its own). Indices into
/// the input order.
fn plan_buckets<'a>(ts: impl Iterator<Item = &'a Tensor>, bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut cur_key: Option<(Kind, tch::Device)> = None;
    let mut cur_bytes = 0usize;
    for (i, t) in ts.enumerate() {
        let key = (t.kind(), t.device());
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let fits = cur_key == Some(key) && cur_bytes < bucket_bytes;
        match buckets.last_mut() {
            Some(bucket) if fits => {
                bucket.push(i);
                cur_bytes += bytes;
            }
            _ => {
                buckets.push(vec![i]);
                cur_key = Some(key);
                cur_bytes = bytes;
            }
        }
    }
    buckets
}

/// One 1-d tensor holding `ts` end to end.
fn flatten(ts: &[&Tensor], what: &str) -> Result<Tensor> {
    let views: Vec<Tensor> = ts
        .iter()
        .map(|t| t.f_reshape([-1]))
        .collect::<std::result::Result<_, _>>()
        .ctx(format!("{what}: flattening a bucket"))?;
    Tensor::f_cat(&views, 0).ctx(format!("{what}: flattening a bucket"))
}

/// Copy `flat`'s consecutive pieces back into `ts`.
fn unflatten_into(flat: &Tensor, ts: &[&Tensor], what: &str) -> Result<()> {
    let mut off = 0i64;
    for t in ts {
        let n = t.numel() as i64;
        let piece = flat
            .f_narrow(0, off, n)
            .and_then(|p| p.f_view(t.size().as_slice()))
            .ctx(format!("{what}: unflattening a bucket"))?;
        let mut dst = t.shallow_clone();
        dst.f_copy_(&piece)
            .ctx(format!("{what}: unflattening a bucket"))?;
        off += n;
    }
    Ok(())
}

/// 62-bit FNV-1a of names, shapes and dtypes.
fn fingerprint(named: &[&(String, Tensor)]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, t) in named {
        eat(name.as_bytes());
        eat(&[0]);
        for d in t.size() {
            eat(&d.to_le_bytes());
        }
        eat(format!("{:?}", t.kind()).as_bytes());
        eat(&[1]);
    }
    (h >> 2) as i64
}

/// One all-reduce (max of `[h, −h]`) telling whether every rank has the same fingerprint.
fn check_same_everywhere(pg: &ProcessGroup, named: &[&(String, Tensor)], what: &str) -> Result<()> {
    let h = fingerprint(named);
    let mut t = Tensor::from_slice(&[h, -h, named.len() as i64, -(named.len() as i64)]);
    pg.all_reduce(&mut t, ReduceOp::Max)?;
    let v: Vec<i64> = Vec::<i64>::try_from(&t).ctx("parameter fingerprint")?;
    if v[0] != -v[1] {
        return Err(Error::Collective {
            op: what.to_string(),
            msg: format!(
                "the ranks' tensors differ (names, shapes or dtypes; {} to {} tensors per rank): every rank must build the same model from the same config",
                -v[3], v[2]
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_by_size_and_dtype() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu));
        let d = |n: i64| Tensor::zeros([n], (Kind::Double, tch::Device::Cpu));
        // 4-byte floats, 40-byte buckets: [10] fills one, [5,5] another, the double starts anew.
        let ts = [f(10), f(5), f(5), f(3), d(2), d(1), f(1)];
        let b = plan_buckets(ts.iter(), 40);
        assert_eq!(b, vec![vec![0], vec![1, 2], vec![3], vec![4, 5], vec![6]]);
        let flat = flatten(&[&ts[1], &ts[3]], "t").unwrap();
        assert_eq!(flat.size(), [8]);
    }

    #[test]
    fn flatten_round_trips() {
        let a = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
        let b = Tensor::arange(4, (Kind::Float, tch::Device::Cpu)) + 10.0;
        let flat = flatten(&[&a, &b], "t").unwrap() * 2.0;
        unflatten_into(&flat, &[&a, &b], "t").unwrap();
        assert_eq!(
            Vec::<f32>::try_from(a.view([-1])).unwrap(),
            [0., 2., 4., 6., 8., 10.]
        );
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), [20., 22., 24., 26.]);
    }

    #[test]
    fn fingerprint_sees_names_shapes_and_dtypes() {
        let t = |s: &[i64], k| Tensor::zeros(s, (k, tch::Device::Cpu));
        let a = ("w".to_string(), t(&[2, 3], Kind::Float));
        let b = ("w".to_string(), t(&[3, 2], Kind::Float));
        let c = ("w".to_string(), t(&[2, 3], Kind::Double));
        let d = ("v".to_string(), t(&[2, 3], Kind::Float));
        let fa = fingerprint(&[&a]);
        assert_eq!(fa, fingerprint(&[&a]));
        for x in [&b, &c, &d] {
            assert_ne!(fa, fingerprint(&[x]));
        }
        assert!(fa >= 0);
    }

    #[test]
    fn single_rank_helpers_are_identities() {
        let pg = ProcessGroup::single();
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        all_reduce_tensors(&pg, &[t.shallow_clone()], ReduceOp::Sum).unwrap();
        all_reduce_mean(&pg, &[t.shallow_clone()]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0]);
        assert_eq!(mean_scalar(&pg, 3.5).unwrap(), 3.5);
        assert_eq!(local_slice(&[1, 2, 3], &pg).unwrap(), [1, 2, 3]);
        assert!(pg.is_rank0());
    }
}
