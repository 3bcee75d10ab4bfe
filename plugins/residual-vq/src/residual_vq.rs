//! Residual vector quantisation (RVQ): Zeghidour et al., "SoundStream" (2021), Alg. 1, and
//! Lee et al., "Autoregressive Image Generation using Residual Quantization" (RQ-VAE, CVPR
//! 2022). Reference Python: lucidrains/vector-quantize-pytorch `residual_vq.py` (the
//! `layers.{l}` loop), with one plain Euclidean codebook per level.
//!
//! Differs in kind from LaVIT's built-in codebook (one l2-normalised table of 16384 codes):
//! `levels` tables of `codes_per_level` codes quantise the input and then each level's
//! residual; the token id is the mixed-radix number of the per-level ids,
//! `id = Σ_l id_l · K^l` in `0..K^levels`, so the LLM still sees one id per token.

use lavit_plugin_api::weights::{load_var_store, var_store_state_dict};
use lavit_plugin_api::{Codebook, PluginArgs, PluginError, PluginResult, QuantizeOut};
use serde::Deserialize;
use tch::{nn, Kind, Tensor};

/// The plugin's `config` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ResidualVqConfig {
    /// Number of residual levels L.
    pub levels: i64,
    /// Codes per level K (num_codes = K^L).
    pub codes_per_level: i64,
    /// Width D of the vectors quantised (the tokenizer's `encode_task_layer` output).
    pub code_dim: i64,
    /// Weight of the commitment term β·‖r − sg(c)‖² (SoundStream/VQ-VAE use 0.25).
    pub beta: f64,
}

impl Default for ResidualVqConfig {
    fn default() -> Self {
        ResidualVqConfig {
            levels: 2,
            codes_per_level: 64,
            code_dim: 32,
            beta: 0.25,
        }
    }
}

/// `levels` Euclidean codebooks, `codebooks.{l}` [K, D] (the safetensors keys).
pub struct ResidualVq {
    cfg: ResidualVqConfig,
    vs: nn::VarStore,
    codebooks: Vec<Tensor>,
    /// False until the codebooks hold data (weights loaded, or the first training batch).
    initialised: bool,
}

impl ResidualVq {
    /// Builds the codebook on `device`; codebooks start random (scaled down per level) and
    /// are re-initialised from the first training batch unless `weights` were loaded.
    pub fn new(
        cfg: ResidualVqConfig,
        device: tch::Device,
        weights: Option<&std::path::Path>,
    ) -> PluginResult<Self> {
        let k = cfg.codes_per_level;
        if cfg.levels < 1 || k < 2 || cfg.code_dim < 1 {
            return Err(PluginError(format!(
                "residual-vq: need levels ≥ 1, codes_per_level ≥ 2, code_dim ≥ 1, got {cfg:?}"
            )));
        }
        if (k as f64).powi(cfg.levels as i32) > i64::MAX as f64 / 2.0 {
            return Err(PluginError(format!(
                "residual-vq: {k}^{} ids do not fit in an int64",
                cfg.levels
            )));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root() / "codebooks";
        let codebooks = (0..cfg.levels)
            .map(|l| {
                let std = 1.0 / (cfg.code_dim as f64).sqrt() / 2f64.powi(l as i32);
                root.f_randn(&l.to_string(), &[k, cfg.code_dim], 0.0, std)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let initialised = match weights {
            Some(path) => {
                load_var_store(&vs, path)?;
                true
            }
            None => false,
        };
        Ok(ResidualVq {
            cfg,
            vs,
            codebooks,
            initialised,
        })
    }

    /// The registered factory: parses `args.config` as [`ResidualVqConfig`].
    pub fn from_args(args: &PluginArgs) -> PluginResult<Self> {
        let cfg: ResidualVqConfig = serde_json::from_str(&args.config)
            .map_err(|e| PluginError(format!("residual-vq config: {e}")))?;
        Self::new(cfg, args.device, args.weights.as_deref())
    }

    pub fn config(&self) -> &ResidualVqConfig {
        &self.cfg
    }

    fn check_input(&self, z: &Tensor) -> PluginResult<()> {
        let size = z.size();
        if size.len() != 2 || size[1] != self.cfg.code_dim {
            return Err(PluginError(format!(
                "residual-vq: expected z [T, {}], got {size:?}",
                self.cfg.code_dim
            )));
        }
        Ok(())
    }

    /// Nearest code of each row: r [T, D], c [K, D] → [T].
    fn nearest(r: &Tensor, c: &Tensor) -> PluginResult<Tensor> {
        // ‖r − c‖² = ‖r‖² − 2 r·c + ‖c‖²; ‖r‖² does not change the arg-min.
        let dist = c
            .f_pow_tensor_scalar(2)?
            .f_sum_dim_intlist(1, false, Kind::Float)?
            .f_unsqueeze(0)? // (1, K)
            .f_sub(&r.f_matmul(&c.f_transpose(0, 1)?.f_mul_scalar(2.0)?)?)?; // (T, K)
        Ok(dist.f_argmin(1, false)?)
    }

    /// Greedy residual encoding of z [T, D]: per-level ids [T] and chosen codes [T, D].
    fn encode(&self, z: &Tensor) -> PluginResult<Vec<(Tensor, Tensor)>> {
        let mut residual = z.f_detach()?.f_to_kind(self.codebooks[0].kind())?;
        let mut out = Vec::with_capacity(self.codebooks.len());
        for c in &self.codebooks {
            let ids = Self::nearest(&residual, &c.f_detach()?)?;
            let code = c.f_index_select(0, &ids)?; // (T, D), differentiable w.r.t. c
            residual = residual.f_sub(&code.f_detach()?)?;
            out.push((ids, code));
        }
        Ok(out)
    }

    /// Per-level ids → combined id Σ id_l·K^l.
    fn combine(&self, level_ids: &[&Tensor]) -> PluginResult<Tensor> {
        let mut id = level_ids[0].f_zeros_like()?;
        let mut radix = 1i64;
        for ids in level_ids {
            id = id.f_add(&ids.f_mul_scalar(radix)?)?;
            radix *= self.cfg.codes_per_level;
        }
        Ok(id)
    }

    /// Sets each level's codebook to K rows of that level's residual (plus a little
    /// noise), the data-dependent initialisation of SoundStream §3.3 (k-means++-lite).
    /// Rows and noise are a function of `seed` only (not of libtorch's global generator),
    /// so a resumed training run initialises exactly as a straight one.
    fn init_from(&mut self, z: &Tensor, seed: u64) -> PluginResult<()> {
        let k = self.cfg.codes_per_level;
        let d = self.cfg.code_dim;
        let mut state = splitmix64(seed ^ 0x5eed_c0de);
        let mut next = move || {
            state = splitmix64(state);
            state
        };
        tch::no_grad(|| -> PluginResult<()> {
            let mut residual = z.f_detach()?.f_to_kind(self.codebooks[0].kind())?;
            let t = residual.size()[0];
            if t == 0 {
                return Err(PluginError(
                    "residual-vq: no samples to initialise from".into(),
                ));
            }
            for c in &mut self.codebooks {
                // Distinct rows while there are enough (partial Fisher–Yates), then repeats.
                let mut order: Vec<i64> = (0..t).collect();
                let pick: Vec<i64> = (0..k)
                    .map(|j| {
                        let j = (j % t) as usize;
                        let r = j + (next() % (t as u64 - j as u64)) as usize;
                        order.swap(j, r);
                        order[j]
                    })
                    .collect();
                let pick = Tensor::from_slice(&pick).f_to_device(residual.device())?;
                let rows = residual.f_index_select(0, &pick)?;
                let noise: Vec<f32> = (0..k * d)
                    .map(|_| ((next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 1e-3)
                    .collect();
                let noise = Tensor::from_slice(&noise)
                    .f_reshape([k, d])?
                    .f_to_device(residual.device())?
                    .f_to_kind(rows.kind())?;
                c.f_copy_(&rows.f_add(&noise)?)?;
                let ids = Self::nearest(&residual, c)?;
                residual = residual.f_sub(&c.f_index_select(0, &ids)?)?;
            }
            Ok(())
        })?;
        self.initialised = true;
        Ok(())
    }
}

/// SplitMix64 step (Steele et al. 2014), the plugin's own seeded generator.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Codebook for ResidualVq {
    fn name(&self) -> String {
        format!(
            "residual-vq({}×{}, d={})",
            self.cfg.levels, self.cfg.codes_per_level, self.cfg.code_dim
        )
    }

    fn num_codes(&self) -> i64 {
        self.cfg.codes_per_level.pow(self.cfg.levels as u32)
    }

    fn code_dim(&self) -> i64 {
        self.cfg.code_dim
    }

    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor> {
        self.check_input(z)?;
        tch::no_grad(|| {
            let levels = self.encode(z)?;
            self.combine(&levels.iter().map(|(ids, _)| ids).collect::<Vec<_>>())
        })
    }

    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        let n = self.num_codes();
        let (lo, hi) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
        if ids.numel() > 0 && (lo < 0 || hi >= n) {
            return Err(PluginError(format!(
                "residual-vq: ids must be in 0..{n}, got {lo}..={hi}"
            )));
        }
        let k = self.cfg.codes_per_level;
        let ids = ids.f_to_device(self.vs.device())?.f_to_kind(Kind::Int64)?;
        let mut out = Tensor::f_zeros(
            [ids.size()[0], self.cfg.code_dim],
            (self.codebooks[0].kind(), self.vs.device()),
        )?;
        let mut radix = 1i64;
        for c in &self.codebooks {
            let digit = ids.f_floor_divide_scalar(radix)?.f_remainder(k)?; // id_l
            out = out.f_add(&c.f_index_select(0, &digit)?)?;
            radix *= k;
        }
        Ok(out)
    }

    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut> {
        self.check_input(z)?;
        if !self.initialised {
            self.init_from(z, 0)?;
        }
        let levels = self.encode(z)?;
        // Codebook term ‖sg(r_l) − c_l‖² (moves codes) + β‖r_l − sg(c_l)‖² (commits the
        // encoder), summed over levels; r_0 = z, r_{l+1} = r_l − sg(c_l).
        let mut residual = z.shallow_clone();
        let mut loss = Tensor::f_zeros([], (Kind::Float, z.device()))?;
        let mut quantized = z.f_zeros_like()?;
        for (_, code) in &levels {
            let codebook_term = code.f_mse_loss(&residual.f_detach()?, tch::Reduction::Mean)?;
            let commit_term = residual.f_mse_loss(&code.f_detach()?, tch::Reduction::Mean)?;
            loss = loss
                .f_add(&codebook_term)?
                .f_add(&commit_term.f_mul_scalar(self.cfg.beta)?)?;
            quantized = quantized.f_add(&code.f_detach()?)?;
            residual = residual.f_sub(&code.f_detach()?)?;
        }
        // Straight-through: forward value = Σ codes, gradient to z unchanged.
        let quantized = z.f_add(&quantized.f_sub(z)?.f_detach()?)?;
        let ids = self.combine(&levels.iter().map(|(ids, _)| ids).collect::<Vec<_>>())?;
        Ok(QuantizeOut {
            quantized,
            ids,
            loss,
        })
    }

    fn trainable_parameters(&self) -> Vec<Tensor> {
        self.vs.trainable_variables()
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(var_store_state_dict(&self.vs))
    }

    /// `codebooks.{l}` exactly as [`Codebook::state_dict`] wrote them (the same layout as
    /// the `weights` file); the codebook then counts as initialised.
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        let mut problems = Vec::new();
        for (l, c) in self.codebooks.iter().enumerate() {
            let key = format!("codebooks.{l}");
            match state.iter().find(|(k, _)| *k == key) {
                None => problems.push(format!("missing `{key}`")),
                Some((_, t)) if t.size() != c.size() => problems.push(format!(
                    "`{key}`: state has {:?}, the codebook {:?}",
                    t.size(),
                    c.size()
                )),
                Some(_) => {}
            }
        }
        for (k, _) in state {
            let known = k
                .strip_prefix("codebooks.")
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| (0..self.cfg.levels).contains(&l));
            if !known {
                problems.push(format!("unexpected `{k}`"));
            }
        }
        if !problems.is_empty() {
            return Err(PluginError(format!(
                "residual-vq: state does not fit: {}",
                problems.join("; ")
            )));
        }
        tch::no_grad(|| -> PluginResult<()> {
            for (l, c) in self.codebooks.iter_mut().enumerate() {
                let key = format!("codebooks.{l}");
                let (_, t) = state
                    .iter()
                    .find(|(k, _)| *k == key)
                    .ok_or_else(|| PluginError(format!("residual-vq: state has no `{key}`")))?;
                c.f_copy_(&t.f_to_kind(c.kind())?.f_to_device(c.device())?)?;
            }
            Ok(())
        })?;
        self.initialised = true;
        Ok(())
    }

    fn init_from_samples(&mut self, z: &Tensor, seed: u64) -> PluginResult<()> {
        self.check_input(z)?;
        self.init_from(z, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ResidualVqConfig {
        ResidualVqConfig {
            levels: 3,
            codes_per_level: 8,
            code_dim: 4,
            ..Default::default()
        }
    }

    #[test]
    fn ids_are_single_and_embed_inverts_the_digits() {
        let rvq = ResidualVq::new(small(), tch::Device::Cpu, None).unwrap();
        assert_eq!(rvq.num_codes(), 512);
        let z = Tensor::randn([50, 4], (Kind::Float, tch::Device::Cpu));
        let ids = rvq.quantize(&z).unwrap();
        assert_eq!(ids.size(), [50]);
        assert_eq!(ids.kind(), Kind::Int64);
        assert!(ids.min().int64_value(&[]) >= 0 && ids.max().int64_value(&[]) < 512);
        // embed(ids) equals the sum of the chosen codes level by level.
        let levels = rvq.encode(&z).unwrap();
        let sum = levels.iter().fold(z.zeros_like(), |a, (_, c)| a + c);
        assert!(rvq.embed(&ids).unwrap().allclose(&sum, 1e-5, 1e-5, false));
        // More levels → closer reconstruction (each level quantises the last residual).
        let err = |n: usize| {
            let s = levels[..n].iter().fold(z.zeros_like(), |a, (_, c)| a + c);
            (&z - s)
                .pow_tensor_scalar(2)
                .mean(Kind::Float)
                .double_value(&[])
        };
        assert!(err(3) < err(1), "{} !< {}", err(3), err(1));
        assert!(rvq.embed(&Tensor::from_slice(&[512i64])).is_err());
        assert!(rvq
            .quantize(&Tensor::zeros([3, 5], (Kind::Float, tch::Device::Cpu)))
            .is_err());
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let dir = std::env::temp_dir().join(format!("rvq-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rvq.safetensors");
        let a = ResidualVq::new(small(), tch::Device::Cpu, None).unwrap();
        lavit_plugin_api::weights::save_safetensors(&a.state_dict().unwrap(), &path).unwrap();
        let b = ResidualVq::new(small(), tch::Device::Cpu, Some(&path)).unwrap();
        let z = Tensor::randn([20, 4], (Kind::Float, tch::Device::Cpu));
        assert!(a.quantize(&z).unwrap().equal(&b.quantize(&z).unwrap()));
        // A file for another shape is refused with the key named.
        let wrong = ResidualVqConfig {
            code_dim: 8,
            ..small()
        };
        let e = ResidualVq::new(wrong, tch::Device::Cpu, Some(&path))
            .err()
            .unwrap();
        assert!(e.0.contains("codebooks.0"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn state_loads_back_and_seeded_init_repeats() {
        let z = Tensor::randn([40, 4], (Kind::Float, tch::Device::Cpu));
        let mut a = ResidualVq::new(small(), tch::Device::Cpu, None).unwrap();
        a.init_from_samples(&z, 7).unwrap();
        let mut b = ResidualVq::new(small(), tch::Device::Cpu, None).unwrap();
        b.init_from_samples(&z, 7).unwrap();
        for (x, y) in a.codebooks.iter().zip(&b.codebooks) {
            assert!(x.equal(y), "same seed, same samples: same codebooks");
        }
        b.init_from_samples(&z, 8).unwrap();
        assert!(!a.codebooks[0].equal(&b.codebooks[0]));
        let mut c = ResidualVq::new(small(), tch::Device::Cpu, None).unwrap();
        c.load_state_dict(&a.state_dict().unwrap()).unwrap();
        assert!(c.initialised);
        assert!(a.quantize(&z).unwrap().equal(&c.quantize(&z).unwrap()));
        let mut sd = a.state_dict().unwrap();
        sd.pop();
        let e = c.load_state_dict(&sd).unwrap_err();
        assert!(e.0.contains("missing `codebooks.2`"), "{e}");
    }
}
