//! Spherical k-means for codebook initialisation (the authors' recipe for the 32-d
//! codebook, LaVIT issues #10/#29): l2-normalised samples, cosine assignment, centroids
//! renormalised, empty clusters re-seeded from random samples. Deterministic for a seed.

use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::vector_quantizer::l2norm;

/// samples [M, D] → k l2-normalised centroids [k, D] after `iters` Lloyd iterations.
pub fn spherical_kmeans(samples: &Tensor, k: i64, iters: usize, seed: u64) -> Tensor {
    let _g = tch::no_grad_guard();
    let x = l2norm(&samples.detach().to_kind(Kind::Float));
    let m = x.size()[0];
    let mut rng = StdRng::seed_from_u64(seed);
    let pick = |rng: &mut StdRng, n: i64| -> Tensor {
        let idx: Vec<i64> = (0..n).map(|_| rng.gen_range(0..m.max(1))).collect();
        x.index_select(0, &Tensor::from_slice(&idx).to_device(x.device()))
    };
    let mut c = pick(&mut rng, k);
    for _ in 0..iters {
        let assign = x.matmul(&c.tr()).argmax(1, false); // (M,)
        let onehot = assign.one_hot(k).to_kind(Kind::Float); // (M, k)
        let counts = onehot.sum_dim_intlist(0, false, Kind::Float); // (k,)
        let sums = onehot.tr().matmul(&x); // (k, D)
        let empty = counts.eq(0.0);
        let n_empty = empty.sum(Kind::Int64).int64_value(&[]);
        let mut newc = l2norm(&sums);
        if n_empty > 0 {
            let fresh = pick(&mut rng, k);
            newc = newc.where_self(&empty.logical_not().unsqueeze(1), &fresh);
        }
        c = newc;
    }
    c
}
