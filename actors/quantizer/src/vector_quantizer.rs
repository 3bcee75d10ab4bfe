//! `VectorQuantizer` of LaVIT (reference `LaVIT/models/modeling_visual_tokenzier.py`:
//! `VectorQuantizer`, `CodebookEmbedding`, `l2norm`): z is l2-normalised and mapped to the
//! nearest row of `embedding.weight` by squared distance; the id is the row index.
//!
//! For stage-1 training (not in the official repository) it adds a straight-through
//! estimator and, optionally, EMA codebook updates with dead-code restarts (as in VQ-KD /
//! BEiT v2's normalised EMA quantiser), so the codebook is not trained by the optimiser.

use lavit_plugin_api::{Codebook, PluginError, PluginResult, QuantizeOut};
use lavit_runtime::layers;
use lavit_runtime::{checkpoint, checkpoint::StateDict, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tch::{nn, Device, Kind, Tensor};

/// `F.normalize(t, p=2, dim=-1)` (eps 1e-12).
pub fn l2norm(t: &Tensor) -> Tensor {
    let n = t
        .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    t / n
}

/// EMA update settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EmaConfig {
    /// EMA decay of the per-code counts and sums.
    pub decay: f64,
    /// Laplace smoothing of the counts.
    pub eps: f64,
    /// A code whose EMA count falls below this is restarted from a random input vector.
    pub dead_threshold: f64,
    /// Seed of the restart sampling (each update uses `seed + update index`).
    pub seed: u64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.99,
            eps: 1e-5,
            dead_threshold: 0.05,
            seed: 0,
        }
    }
}

/// The built-in l2-normalised codebook (`quantize.embedding.weight` [K, D]).
pub struct VectorQuantizer {
    pub vs: nn::VarStore,
    /// `embedding.weight` [K, D].
    pub weight: Tensor,
    /// EMA updates (None: the weight is trained by the optimiser with a codebook loss).
    pub ema: Option<EmaConfig>,
    /// Commitment weight β of `β‖z − sg(z_q)‖²`.
    pub beta: f64,
    /// EMA count per code [K] and EMA sum per code [K, D].
    pub cluster_size: Tensor,
    pub embed_avg: Tensor,
    /// Number of `update` calls so far (saved with the training state).
    pub updates: u64,
    /// Number of codes restarted so far.
    pub restarts: u64,
    /// k-means iterations of [`Codebook::init_from_samples`].
    pub kmeans_iters: usize,
}

impl std::fmt::Debug for VectorQuantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VectorQuantizer({:?})", self.weight.size())
    }
}

impl VectorQuantizer {
    /// A random l2-normalised codebook (`CodebookEmbedding.__init__`).
    pub fn new(n_embed: i64, dim: i64, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let weight = layers::var(
            &(&vs.root() / "embedding"),
            "weight",
            &[n_embed, dim],
            nn::Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        );
        tch::no_grad(|| {
            let n = l2norm(&weight);
            weight.shallow_clone().copy_(&n);
        });
        let cluster_size = Tensor::ones([n_embed], (Kind::Float, device));
        let embed_avg = weight.detach().copy();
        Self {
            vs,
            weight,
            ema: None,
            beta: 0.25,
            cluster_size,
            embed_avg,
            updates: 0,
            restarts: 0,
            kmeans_iters: 10,
        }
    }

    /// Load `embedding.weight` from `sd` (the `quantize.*` keys of `tokenizer_encoder.bin`,
    /// prefix stripped), strictly.
    pub fn load_state_dict(&mut self, sd: &StateDict, source: &str) -> Result<()> {
        checkpoint::load_into(&self.vs, "", sd, source, &Default::default())?;
        self.reset_ema();
        Ok(())
    }

    /// Switch to EMA updates (the weight stops being a trainable parameter).
    pub fn with_ema(mut self, cfg: EmaConfig) -> Self {
        let _ = self.weight.set_requires_grad(false);
        self.ema = Some(cfg);
        self.reset_ema();
        self
    }

    fn reset_ema(&mut self) {
        let k = self.weight.size()[0];
        self.cluster_size = Tensor::ones([k], (Kind::Float, self.weight.device()));
        self.embed_avg = self.weight.detach().to_kind(Kind::Float).copy();
    }

    /// Replace the codebook with `codes` [K, D] (l2-normalised), e.g. from k-means.
    pub fn set_codes(&mut self, codes: &Tensor) {
        tch::no_grad(|| {
            self.weight
                .shallow_clone()
                .copy_(&l2norm(codes).to_kind(self.weight.kind()));
        });
        self.reset_ema();
    }

    /// Official `tokenize`: z [T, D] → (z_q [T, D], ids [T]).
    pub fn tokenize(&self, z: &Tensor) -> (Tensor, Tensor) {
        let ids = self.nearest(z);
        (Tensor::embedding(&self.weight, &ids, -1, false, false), ids)
    }

    fn nearest(&self, z: &Tensor) -> Tensor {
        let _g = tch::no_grad_guard();
        let d = self.weight.size()[1];
        let z = l2norm(z).reshape([-1, d]); // (T, D)
        let w = &self.weight;
        let dist = z.pow_tensor_scalar(2).sum_dim_intlist(1, true, None)
            + w.pow_tensor_scalar(2).sum_dim_intlist(1, false, None)
            - z.matmul(&w.tr()) * 2.0; // (T, K)
        dist.argmin(1, false)
    }

    /// EMA count/sum buffers and counters, for training checkpoints.
    pub fn ema_state(&self) -> StateDict {
        let mut sd = StateDict::new();
        sd.insert("cluster_size".into(), self.cluster_size.copy());
        sd.insert("embed_avg".into(), self.embed_avg.copy());
        sd.insert("embedding.weight".into(), self.weight.detach().copy());
        sd.insert(
            "counters".into(),
            Tensor::from_slice(&[self.updates as i64, self.restarts as i64]),
        );
        sd
    }

    /// Restore [`ema_state`](Self::ema_state).
    pub fn load_ema_state(&mut self, sd: &StateDict) -> Result<()> {
        let get = |k: &str| {
            sd.get(k)
                .ok_or_else(|| lavit_runtime::Error::invalid(format!("codebook state lacks `{k}`")))
        };
        let dev = self.weight.device();
        self.cluster_size = get("cluster_size")?.to_device(dev);
        self.embed_avg = get("embed_avg")?.to_device(dev);
        tch::no_grad(|| -> Result<()> {
            self.weight
                .shallow_clone()
                .copy_(&get("embedding.weight")?.to_device(dev));
            Ok(())
        })?;
        let c = get("counters")?;
        self.updates = c.int64_value(&[0]) as u64;
        self.restarts = c.int64_value(&[1]) as u64;
        Ok(())
    }

    /// Codebook usage statistics of ids [T]: (fraction of codes used, perplexity).
    pub fn usage(ids: &Tensor, num_codes: i64) -> (f64, f64) {
        if ids.numel() == 0 {
            return (0.0, 0.0);
        }
        let counts = ids
            .bincount::<Tensor>(None, num_codes)
            .to_kind(Kind::Double);
        let used = counts.gt(0.0).sum(Kind::Double).double_value(&[]) / num_codes as f64;
        let p = &counts / counts.sum(Kind::Double);
        let ent = -(&p * (&p + 1e-10).log())
            .sum(Kind::Double)
            .double_value(&[]);
        (used, ent.exp())
    }
}

impl Codebook for VectorQuantizer {
    fn name(&self) -> String {
        let s = self.weight.size();
        format!("vq-l2 ({} x {})", s[0], s[1])
    }
    fn num_codes(&self) -> i64 {
        self.weight.size()[0]
    }
    fn code_dim(&self) -> i64 {
        self.weight.size()[1]
    }
    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor> {
        if z.dim() != 2 || z.size()[1] != self.code_dim() {
            return Err(PluginError(format!(
                "quantize expects [T, {}], got {:?}",
                self.code_dim(),
                z.size()
            )));
        }
        Ok(self.nearest(
            &z.to_device(self.weight.device())
                .to_kind(self.weight.kind()),
        ))
    }
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        let k = self.num_codes();
        if ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= k {
                return Err(PluginError(format!(
                    "code ids must be in 0..{k}, got {lo}..={hi}"
                )));
            }
        }
        Ok(Tensor::embedding(
            &self.weight,
            &ids.to_device(self.weight.device()),
            -1,
            false,
            false,
        ))
    }
    /// Straight-through: forward = nearest code, gradient flows to z (through l2norm).
    /// loss = β‖l2(z) − sg(z_q)‖² (+ ‖sg(l2(z)) − z_q‖² when the codebook is not EMA).
    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut> {
        let zn = l2norm(z);
        let ids = self.nearest(z);
        let zq = Tensor::embedding(&self.weight, &ids, -1, false, false);
        let commit = (&zn - zq.detach()).square().mean(Kind::Float) * self.beta;
        let loss = if self.ema.is_some() {
            commit
        } else {
            commit + (zn.detach() - &zq).square().mean(Kind::Float)
        };
        let quantized = &zn + (zq - &zn).detach();
        Ok(QuantizeOut {
            quantized,
            ids,
            loss,
        })
    }
    fn update(&mut self, z: &Tensor, ids: &Tensor) -> PluginResult<()> {
        let Some(cfg) = self.ema.clone() else {
            return Ok(());
        };
        let _g = tch::no_grad_guard();
        let k = self.num_codes();
        let zn = l2norm(&z.detach().to_kind(Kind::Float));
        let onehot = ids.one_hot(k).to_kind(Kind::Float); // (T, K)
        let counts = onehot.sum_dim_intlist(0, false, Kind::Float); // (K,)
        let sums = onehot.tr().matmul(&zn); // (K, D)
        self.cluster_size = &self.cluster_size * cfg.decay + counts * (1.0 - cfg.decay);
        self.embed_avg = &self.embed_avg * cfg.decay + sums * (1.0 - cfg.decay);
        let n = self.cluster_size.sum(Kind::Float);
        let smoothed = (&self.cluster_size + cfg.eps) / (&n + k as f64 * cfg.eps) * &n;
        let mut new_w = l2norm(&(&self.embed_avg / smoothed.unsqueeze(1)));
        // Dead-code restart: codes whose EMA count is below the threshold take a random
        // input vector of this batch.
        let dead = self.cluster_size.lt(cfg.dead_threshold);
        let n_dead = dead.sum(Kind::Int64).int64_value(&[]);
        let t = zn.size()[0];
        if n_dead > 0 && t > 0 {
            let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(self.updates));
            let idx: Vec<i64> = (0..k).map(|_| rng.gen_range(0..t)).collect();
            let fresh = zn.index_select(0, &Tensor::from_slice(&idx).to_device(zn.device()));
            let dead2 = dead.unsqueeze(1);
            new_w = fresh.where_self(&dead2, &new_w);
            self.embed_avg = fresh.where_self(&dead2, &self.embed_avg);
            self.cluster_size = self
                .cluster_size
                .ones_like()
                .where_self(&dead, &self.cluster_size);
            self.restarts += n_dead as u64;
        }
        self.weight
            .shallow_clone()
            .copy_(&new_w.to_kind(self.weight.kind()));
        self.updates += 1;
        Ok(())
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        if self.ema.is_some() {
            Vec::new()
        } else {
            vec![self.weight.shallow_clone()]
        }
    }
    /// [`ema_state`](VectorQuantizer::ema_state): `embedding.weight`, the EMA buffers and
    /// the counters.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(self.ema_state().into_iter().collect())
    }
    /// The full [`ema_state`](VectorQuantizer::ema_state) (a training checkpoint), or only
    /// `embedding.weight` (an exported codebook; the EMA buffers restart from it).
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        let sd: StateDict = state
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        let k = self.num_codes();
        let d = self.code_dim();
        match sd.get("embedding.weight") {
            Some(w) if w.size() == [k, d] => {}
            Some(w) => {
                return Err(PluginError(format!(
                    "codebook state: `embedding.weight` is {:?}, the codebook [{k}, {d}]",
                    w.size()
                )))
            }
            None => {
                return Err(PluginError(
                    "codebook state lacks `embedding.weight`".into(),
                ))
            }
        }
        if sd.len() == 1 {
            tch::no_grad(|| -> PluginResult<()> {
                let w = sd["embedding.weight"]
                    .f_to_device(self.weight.device())?
                    .f_to_kind(self.weight.kind())?;
                self.weight.shallow_clone().f_copy_(&w)?;
                Ok(())
            })?;
            self.reset_ema();
            return Ok(());
        }
        self.load_ema_state(&sd)
            .map_err(|e| PluginError(e.to_string()))
    }
    /// Spherical k-means ([`crate::spherical_kmeans`], `kmeans_iters` iterations) on the
    /// samples, then [`set_codes`](VectorQuantizer::set_codes).
    fn init_from_samples(&mut self, z: &Tensor, seed: u64) -> PluginResult<()> {
        let codes = crate::spherical_kmeans(z, self.num_codes(), self.kmeans_iters, seed);
        self.set_codes(&codes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(vq: &VectorQuantizer, z: &[[f32; 4]]) -> Vec<i64> {
        let flat: Vec<f32> = z.iter().flatten().copied().collect();
        let z = Tensor::from_slice(&flat).view([-1, 4]);
        Vec::<i64>::try_from(vq.quantize(&z).unwrap()).unwrap()
    }

    /// The nearest code is `torch.argmin` over the distances: the first index on an exact tie
    /// (two identical codes, or a vector halfway between two codes).
    #[test]
    fn nearest_code_ties_take_the_first_index() {
        let mut vq = VectorQuantizer::new(4, 4, Device::Cpu);
        let (c, d) = ([1.0f32, 0.0, 0.0, 0.0], [0.0f32, 1.0, 0.0, 0.0]);
        let e = [0.0f32, 0.0, 1.0, 0.0];
        let codes = |rows: [[f32; 4]; 4]| {
            Tensor::from_slice(&rows.iter().flatten().copied().collect::<Vec<_>>()).view([4, 4])
        };
        vq.set_codes(&codes([c, c, d, e]));
        assert_eq!(ids(&vq, &[[2.0, 0.0, 0.0, 0.0]]), vec![0]);
        vq.set_codes(&codes([e, d, c, c]));
        assert_eq!(ids(&vq, &[[3.0, 0.0, 0.0, 0.0]]), vec![2]);
        // halfway between d and e: the earlier of the two
        assert_eq!(ids(&vq, &[[0.0, 1.0, 1.0, 0.0]]), vec![0]);
        vq.set_codes(&codes([c, d, e, e]));
        assert_eq!(
            ids(&vq, &[[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 5.0, 0.0]]),
            vec![1, 2]
        );
    }
}
