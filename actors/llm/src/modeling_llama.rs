//! LLaMA (Touvron et al. 2023) as Hugging Face builds it: `LlamaForCausalLM`, with the same
//! attribute names so the published LaVIT `language_model/` shards load unchanged.
//! Reference: transformers `models/llama/modeling_llama.py`.
//!
//! Attention goes through libtorch's `scaled_dot_product_attention` (flash / memory-efficient
//! kernels on GPU). A [`KvCache`] holds per-layer keys/values for a batch of streams; each
//! stream has its own key mask (left padding) and its own position ids.

use lavit_runtime::layers;
use std::path::Path;

use lavit_runtime::checkpoint::{self, LoadOptions, StateDict};
use lavit_runtime::shape::dims;
use lavit_runtime::{Error, Result, TchContext};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::quantize::{self, Linear, QLinear, QuantMode};

/// `LlamaRMSNorm`: x / sqrt(mean(x²) + eps) · weight, computed in float32.
#[derive(Debug)]
pub struct LlamaRMSNorm {
    pub weight: Tensor,
    eps: f64,
}

impl LlamaRMSNorm {
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: layers::ones(&vs, "weight", &[dim]),
            eps,
        }
    }
}

impl Module for LlamaRMSNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let x = xs.to_kind(Kind::Float);
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let x = x * (var + self.eps).rsqrt();
        &self.weight * x.to_kind(kind)
    }
}

/// `LlamaRotaryEmbedding` (rope_type "default"): cos/sin tables for given position ids.
#[derive(Debug)]
pub struct LlamaRotaryEmbedding {
    /// 1 / theta^(2i/d), float32, shape (d/2,).
    inv_freq: Tensor,
}

impl LlamaRotaryEmbedding {
    pub fn new(cfg: &LlamaConfig, device: Device) -> Self {
        let dim = cfg.head_dim();
        // inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / dim as f64;
        let base = Tensor::from(cfg.rope_theta() as f32).to_device(device);
        let inv_freq = base.pow(&exponent).reciprocal();
        Self { inv_freq }
    }

    /// (cos, sin), each (B, T, head_dim) in `kind`, for `position_ids` (B, T).
    pub fn forward(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let pos = position_ids.to_kind(Kind::Float).unsqueeze(-1); // (B, T, 1)
        let freqs = pos * self.inv_freq.view([1, 1, -1]); // (B, T, d/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // (B, T, d)
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

/// cat(−x₂, x₁) of the two halves of the last dimension.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// x·cos + rotate_half(x)·sin with cos/sin (B, T, d) broadcast over heads.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let cos = cos.unsqueeze(1); // (B, 1, T, d)
    let sin = sin.unsqueeze(1);
    x * &cos + rotate_half(x) * &sin
}

fn linear(vs: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    let c = nn::LinearConfig {
        bias,
        ..Default::default()
    };
    layers::linear(vs, i, o, c)
}

/// A quantisable layer: a float variable, or (`mode` not None) an empty placeholder that
/// [`LlamaForCausalLM::from_pretrained_quantized`] fills from the stored tensors (no float
/// variable is created for it, so a quantised model never holds a float copy).
fn qlinear(vs: nn::Path, i: i64, o: i64, bias: bool, mode: QuantMode) -> Linear {
    if mode.is_none() {
        Linear::Float(linear(vs, i, o, bias))
    } else {
        Linear::Quant(QLinear::placeholder(mode, i, o))
    }
}

/// Remove variables from `vs` (a layer that was quantised no longer owns float weights).
fn drop_vars(vs: &nn::VarStore, names: &[String]) {
    let mut v = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
    for n in names {
        if let Some(t) = v.named_variables.remove(n) {
            let ptr = t.data_ptr();
            v.trainable_variables
                .retain(|var| var.tensor.data_ptr() != ptr);
        }
    }
}

/// `embed_tokens`: the (vocab, hidden) table looked up by token id.
#[derive(Debug)]
pub struct Embedding {
    pub ws: Tensor,
}

impl Embedding {
    fn new(vs: nn::Path, cfg: &LlamaConfig) -> Self {
        // as `nn::embedding` draws it
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let ws = layers::var(&vs, "weight", &[cfg.vocab_size, cfg.hidden_size], init);
        Embedding { ws }
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.ws, ids, -1, false, false)
    }
}

/// `LlamaAttention`: grouped-query attention with RoPE.
#[derive(Debug)]
pub struct LlamaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl LlamaAttention {
    pub fn new(vs: nn::Path, cfg: &LlamaConfig, mode: QuantMode) -> Self {
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim(),
            cfg.num_attention_heads,
            cfg.kv_heads(),
        );
        let b = cfg.attention_bias;
        Self {
            q_proj: qlinear(&vs / "q_proj", h, nh * hd, b, mode),
            k_proj: qlinear(&vs / "k_proj", h, nkv * hd, b, mode),
            v_proj: qlinear(&vs / "v_proj", h, nkv * hd, b, mode),
            o_proj: qlinear(&vs / "o_proj", nh * hd, h, b, mode),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        }
    }

    /// `xs` (B, T, H); `past` the cached (k, v) of this layer, each (B, nkv, Tp, hd);
    /// `mask` a bool (B, 1, T, Tp+T) "may attend" mask, or None for plain causal.
    /// Returns the output and the new (k, v) including the past.
    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let [b, t, _] = dims(xs, "hidden states are (B, T, H)")?;
        let q = self
            .q_proj
            .forward(xs)
            .view([b, t, self.num_heads, self.head_dim])
            .transpose(1, 2); // (B, nh, T, hd)
        let k = self
            .k_proj
            .forward(xs)
            .view([b, t, self.num_kv_heads, self.head_dim])
            .transpose(1, 2); // (B, nkv, T, hd)
        let v = self
            .v_proj
            .forward(xs)
            .view([b, t, self.num_kv_heads, self.head_dim])
            .transpose(1, 2); // (B, nkv, T, hd)
        let q = apply_rotary(&q, cos, sin);
        let k = apply_rotary(&k, cos, sin);
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2), Tensor::cat(&[pv, &v], 2)), // (B, nkv, Tp+T, hd)
            None => (k, v),
        };
        let n_rep = self.num_heads / self.num_kv_heads;
        let (kr, vr) = if n_rep > 1 {
            (repeat_kv(&k, n_rep)?, repeat_kv(&v, n_rep)?) // (B, nh, Tk, hd)
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let causal = mask.is_none() && t > 1;
        let y = Tensor::scaled_dot_product_attention(&q, &kr, &vr, mask, 0.0, causal, None, false); // (B, nh, T, hd)
        let y = y
            .transpose(1, 2)
            .contiguous()
            .view([b, t, self.num_heads * self.head_dim]); // (B, T, nh·hd)
        Ok((self.o_proj.forward(&y), (k, v)))
    }
}

impl LlamaAttention {
    /// [`LlamaAttention::forward`] over a paged KV cache: the new keys/values of `xs`
    /// (B, T, H) are written into this layer's pool (`pool_k`, `pool_v`, each (S, nkv, hd))
    /// at `at.write`, then every row attends to its own keys, gathered from the pool in
    /// position order (`at.read`), under `at.mask`.
    pub fn forward_paged(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pool_k: &Tensor,
        pool_v: &Tensor,
        at: &PagedArgs,
    ) -> Result<Tensor> {
        let [b, t, _] = dims(xs, "hidden states are (B, T, H)")?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(xs).view([b, t, nh, hd]).transpose(1, 2); // (B, nh, T, hd)
        let k = self
            .k_proj
            .forward(xs)
            .view([b, t, nkv, hd])
            .transpose(1, 2); // (B, nkv, T, hd)
        let v = self.v_proj.forward(xs).view([b, t, nkv, hd]); // (B, T, nkv, hd)
        let q = apply_rotary(&q, cos, sin);
        let k = apply_rotary(&k, cos, sin).transpose(1, 2); // (B, T, nkv, hd)
        let _ = pool_k
            .shallow_clone()
            .f_index_copy_(0, at.write, &k.reshape([b * t, nkv, hd]))
            .ctx("writing keys into the KV pool")?;
        let _ = pool_v
            .shallow_clone()
            .f_index_copy_(0, at.write, &v.reshape([b * t, nkv, hd]))
            .ctx("writing values into the KV pool")?;
        let gather = |pool: &Tensor| -> Result<Tensor> {
            Ok(pool
                .f_index_select(0, at.read)
                .ctx("reading the KV pool")?
                .view([b, at.tk, nkv, hd])
                .transpose(1, 2)) // (B, nkv, Tk, hd)
        };
        let (kk, vv) = (gather(pool_k)?, gather(pool_v)?);
        let n_rep = nh / nkv;
        let (kk, vv) = if n_rep > 1 {
            (repeat_kv(&kk, n_rep)?, repeat_kv(&vv, n_rep)?) // (B, nh, Tk, hd)
        } else {
            (kk, vv)
        };
        let y = Tensor::f_scaled_dot_product_attention(
            &q, &kk, &vv, at.mask, 0.0, at.causal, None, false,
        )
        .ctx("attention over the KV pool")?; // (B, nh, T, hd)
        let y = y.transpose(1, 2).contiguous().view([b, t, nh * hd]); // (B, T, nh·hd)
        Ok(self.o_proj.forward(&y))
    }
}

/// Where a forward over a paged KV cache ([`LlamaForCausalLM::forward_paged`]) writes the new
/// keys/values and which ones each row reads. Slot 0 of a pool is scratch: padding writes
/// there and reads it masked.
pub struct PagedArgs<'a> {
    /// (B, T) int64 position of each new token (padding: 0).
    pub positions: &'a Tensor,
    /// (B·T,) int64 pool slot of each new token (padding: 0).
    pub write: &'a Tensor,
    /// (B·Tk,) int64 pool slots of the keys of each row in position order (padding: 0).
    pub read: &'a Tensor,
    /// Keys per row in `read`.
    pub tk: i64,
    /// (B, 1, T, Tk) bool: query t of row b may attend to key j. `None`: every query
    /// attends to every key (one decoding position of rows of equal length), or, with
    /// `causal`, to the keys up to its own (prompts from position 0, no padding).
    pub mask: Option<&'a Tensor>,
    pub causal: bool,
}

/// A paged KV cache: per layer (k, v), each (slots, nkv, hd); a sequence's positions live in
/// the slots of its blocks (see `crate::batch`).
#[derive(Debug)]
pub struct KvPool {
    pub layers: Vec<(Tensor, Tensor)>,
}

impl KvPool {
    /// Slots for `slots` positions of every layer of `cfg`, in `kind` on `device`; an
    /// allocation that fails is an error, not an abort. Only the scratch slot 0 is zeroed:
    /// every other slot is written before it is read (and a page of host memory is only
    /// paid for once written). The scratch slot is read under the mask, so it must hold
    /// finite values (a masked NaN still poisons the attention's sums).
    pub fn new(cfg: &LlamaConfig, slots: i64, device: Device, kind: Kind) -> Result<Self> {
        let shape = [slots.max(1), cfg.kv_heads(), cfg.head_dim()];
        let make = || -> Result<Tensor> {
            let t = Tensor::f_empty(shape, (kind, device)).ctx("allocating the KV pool")?;
            let _ = t.narrow(0, 0, 1).zero_();
            Ok(t)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Ok((make()?, make()?)))
            .collect::<Result<_>>()?;
        Ok(KvPool { layers })
    }

    /// Bytes one position takes in every layer (keys and values) of a `kind` model.
    pub fn bytes_per_position(cfg: &LlamaConfig, kind: Kind) -> i64 {
        2 * cfg.num_hidden_layers
            * cfg.kv_heads()
            * cfg.head_dim()
            * kind.elt_size_in_bytes() as i64
    }
}

/// HF `repeat_kv`: (B, nkv, T, hd) → (B, nkv·n_rep, T, hd), each kv head repeated n_rep times.
fn repeat_kv(x: &Tensor, n_rep: i64) -> Result<Tensor> {
    let [b, nkv, t, hd] = dims(x, "(B, nkv, T, hd)")?;
    Ok(x.unsqueeze(2)
        .expand([b, nkv, n_rep, t, hd], false)
        .reshape([b, nkv * n_rep, t, hd]))
}

/// `LlamaMLP`: down(silu(gate(x)) · up(x)).
#[derive(Debug)]
pub struct LlamaMLP {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl LlamaMLP {
    pub fn new(vs: nn::Path, cfg: &LlamaConfig, mode: QuantMode) -> Self {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Self {
            gate_proj: qlinear(&vs / "gate_proj", h, i, b, mode),
            up_proj: qlinear(&vs / "up_proj", h, i, b, mode),
            down_proj: qlinear(&vs / "down_proj", i, h, b, mode),
        }
    }
}

impl Module for LlamaMLP {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.down_proj
            .forward(&(self.gate_proj.forward(xs).silu() * self.up_proj.forward(xs)))
    }
}

/// `LlamaDecoderLayer`: pre-norm attention and MLP with residuals.
#[derive(Debug)]
pub struct LlamaDecoderLayer {
    pub self_attn: LlamaAttention,
    pub mlp: LlamaMLP,
    pub input_layernorm: LlamaRMSNorm,
    pub post_attention_layernorm: LlamaRMSNorm,
}

impl LlamaDecoderLayer {
    pub fn new(vs: nn::Path, cfg: &LlamaConfig, mode: QuantMode) -> Self {
        Self {
            self_attn: LlamaAttention::new(&vs / "self_attn", cfg, mode),
            mlp: LlamaMLP::new(&vs / "mlp", cfg, mode),
            input_layernorm: LlamaRMSNorm::new(
                &vs / "input_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            ),
            post_attention_layernorm: LlamaRMSNorm::new(
                &vs / "post_attention_layernorm",
                cfg.hidden_size,
                cfg.rms_norm_eps,
            ),
        }
    }
}

/// Keys/values of every layer for a batch of streams, plus each stream's key mask.
#[derive(Debug, Default)]
pub struct KvCache {
    /// Per layer (k, v), each (B, nkv, Tk, hd).
    pub layers: Vec<(Tensor, Tensor)>,
    /// (B, Tk) bool: which cached positions are real tokens (false = left padding).
    pub key_mask: Option<Tensor>,
    /// Whether any stream was given padding (decided on the host once, at prefill).
    pub padded: bool,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Cached length Tk (0 when empty).
    pub fn len(&self) -> i64 {
        self.key_mask.as_ref().map_or(0, |m| m.size()[1])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keep only the streams `index` (B',) of the batch (beam search reordering).
    pub fn select(&mut self, index: &Tensor) {
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(0, index);
            *v = v.index_select(0, index);
        }
        if let Some(m) = self.key_mask.as_mut() {
            *m = m.index_select(0, index);
        }
    }
}

/// Position ids = number of real tokens before each position (HF: cumsum(mask) − 1,
/// padding clamped to 0), for the last `t` of the `key_mask` (B, Tk) columns.
pub fn positions_from_mask(key_mask: &Tensor, t: i64) -> Tensor {
    let tk = key_mask.size()[1];
    let pos = key_mask.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1;
    pos.clamp_min(0).narrow(1, tk - t, t)
}

/// The "may attend" mask (B, 1, T, Tk) for `t` new queries against `key_mask` (B, Tk):
/// causal by cache index, real keys only; each query may always see itself (so rows of
/// padding never become all-masked, which would make NaNs).
pub fn causal_padding_mask(key_mask: &Tensor, t: i64) -> Result<Tensor> {
    let [b, tk] = dims(key_mask, "key mask is (B, Tk)")?;
    let dev = key_mask.device();
    let past = tk - t;
    let qi = Tensor::arange(t, (Kind::Int64, dev)).view([t, 1]) + past; // (T, 1)
    let kj = Tensor::arange(tk, (Kind::Int64, dev)).view([1, tk]); // (1, Tk)
    let causal = kj.le_tensor(&qi); // (T, Tk)
    let diag = kj.eq_tensor(&qi);
    let m = causal
        .unsqueeze(0)
        .logical_and(&key_mask.to_kind(Kind::Bool).view([b, 1, tk])); // (B, T, Tk)
    Ok(m.logical_or(&diag.unsqueeze(0)).unsqueeze(1)) // (B, 1, T, Tk)
}

/// `LlamaModel`: embeddings, decoder layers, final norm.
#[derive(Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaDecoderLayer>,
    pub norm: LlamaRMSNorm,
    pub rotary_emb: LlamaRotaryEmbedding,
}

impl LlamaModel {
    pub fn new(vs: nn::Path, cfg: &LlamaConfig, mode: QuantMode) -> Self {
        let layers_vs = &vs / "layers";
        Self {
            embed_tokens: Embedding::new(&vs / "embed_tokens", cfg),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| LlamaDecoderLayer::new(&layers_vs / i, cfg, mode))
                .collect(),
            norm: LlamaRMSNorm::new(&vs / "norm", cfg.hidden_size, cfg.rms_norm_eps),
            rotary_emb: LlamaRotaryEmbedding::new(cfg, vs.device()),
        }
    }
}

/// How the new positions of a forward attend and where they sit.
#[derive(Default)]
pub struct ForwardArgs<'a> {
    /// (B, T) position ids; None = from the key mask (left padding aware).
    pub position_ids: Option<&'a Tensor>,
    /// (B, T) bool/int: real new tokens (false = padding); None = all real. Pass it only
    /// when there is padding (it switches attention to the masked path).
    pub attention_mask: Option<&'a Tensor>,
    /// Explicit (B, 1, T, Tk) bool mask (e.g. block-diagonal for packed training); overrides
    /// the causal/padding mask. Only without a cache.
    pub mask_4d: Option<&'a Tensor>,
}

/// `LlamaForCausalLM`: the decoder and the vocabulary head (shared with the embedding when
/// `tie_word_embeddings`).
#[derive(Debug)]
pub struct LlamaForCausalLM {
    pub model: LlamaModel,
    /// None when tied to `model.embed_tokens`.
    pub lm_head: Option<nn::Linear>,
    pub config: LlamaConfig,
}

impl LlamaForCausalLM {
    /// A float model with variables in `vs`.
    pub fn new(vs: nn::Path, cfg: &LlamaConfig) -> Self {
        Self::new_with(vs, cfg, QuantMode::None)
    }

    /// A model whose linear layers are stored in `mode`: float variables for `None`, else
    /// placeholders (filled by the loader) and float variables only for the embeddings, the
    /// norms and the head.
    fn new_with(vs: nn::Path, cfg: &LlamaConfig, mode: QuantMode) -> Self {
        let model = LlamaModel::new(&vs / "model", cfg, mode);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| linear(&vs / "lm_head", cfg.hidden_size, cfg.vocab_size, false));
        Self {
            model,
            lm_head,
            config: cfg.clone(),
        }
    }

    /// Every parameter name and shape of the model `cfg` describes, without allocating it
    /// (what the checkpoint must hold; used to check presets against the official files).
    pub fn param_shapes(cfg: &LlamaConfig) -> std::collections::BTreeMap<String, Vec<i64>> {
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.kv_heads() * cfg.head_dim(),
        );
        let mut m = std::collections::BTreeMap::new();
        m.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
        m.insert("model.norm.weight".to_string(), vec![h]);
        if !cfg.tie_word_embeddings {
            m.insert("lm_head.weight".to_string(), vec![v, h]);
        }
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut put = |name: &str, shape: Vec<i64>| {
                m.insert(format!("{p}.{name}"), shape);
            };
            for (n, o, inp) in [
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ] {
                put(&format!("self_attn.{n}.weight"), vec![o, inp]);
                if cfg.attention_bias {
                    put(&format!("self_attn.{n}.bias"), vec![o]);
                }
            }
            for (n, o, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                put(&format!("mlp.{n}.weight"), vec![o, inp]);
                if cfg.mlp_bias {
                    put(&format!("mlp.{n}.bias"), vec![o]);
                }
            }
            put("input_layernorm.weight", vec![h]);
            put("post_attention_layernorm.weight", vec![h]);
        }
        m
    }

    /// Load a HF folder (`config.json` + sharded safetensors or .bin) strictly into a new
    /// VarStore on `device` in `kind` (Float, BFloat16 or Half).
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<(nn::VarStore, Self)> {
        Self::from_pretrained_quantized(dir, device, kind, QuantMode::None, QuantMode::None)
    }

    /// [`LlamaForCausalLM::from_pretrained`] of a folder whose linear layers are stored in
    /// `stored` (a `lavit quantize` folder: the manifest's `llm.quantization`), loaded as
    /// `target` (the pipeline's `quantize`): a float folder is quantised at load (each float
    /// weight leaves the VarStore as its layer is quantised); a quantised folder loads as
    /// stored, its layers built straight from the stored tensors (no float copy of them ever
    /// exists); asking another quantisation of a quantised folder is refused.
    pub fn from_pretrained_quantized(
        dir: &Path,
        device: Device,
        kind: Kind,
        stored: QuantMode,
        target: QuantMode,
    ) -> Result<(nn::VarStore, Self)> {
        if !stored.is_none() && !target.is_none() && stored != target {
            return Err(Error::ckpt(
                dir,
                format!(
                    "the folder stores {stored} weights (manifest llm.quantization); `quantize` {target} is refused (quantise the float checkpoint instead, or leave `quantize` none)"
                ),
            ));
        }
        let (cfg, mut sd) = Self::read_folder(dir, stored)?;
        if !target.is_none() {
            // Refused before anything is loaded: a layer the packed kernels cannot take.
            for (k, shape) in Self::param_shapes(&cfg) {
                if let (true, [n, i]) = (quantize::is_quantizable(&k), shape.as_slice()) {
                    if let Some(why) = quantize::unsupported(target, *n, *i) {
                        return Err(Error::ckpt(
                            dir,
                            format!("`{k}` {shape:?} cannot be quantised to {target}: {why}"),
                        ));
                    }
                }
            }
        }
        // Variables are created in `kind` (an empty store's `set_kind` only sets the kind of
        // new variables): a bf16 model never exists in float32 first.
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        // Uninitialised, not random draws: the strict load below replaces every variable.
        let mut model = layers::uninit(|| Self::new_with(vs.root(), &cfg, stored));
        if !stored.is_none() {
            for (name, lin) in model.linears_mut() {
                let (wk, sk) = quantize::stored_keys(stored, &name);
                let (Some(w), Some(s)) = (sd.remove(&wk), sd.remove(&sk)) else {
                    return Err(Error::ckpt(dir, format!("no `{wk}` and `{sk}`")));
                };
                let b = sd.remove(&format!("{name}.bias"));
                let q = QLinear::from_stored(stored, &w, &s, b.as_ref(), device, kind)
                    .map_err(|e| Error::ckpt(dir, format!("`{wk}`: {e}")))?;
                *lin = Linear::Quant(q);
            }
        }
        let opts = LoadOptions {
            allow_unexpected: if cfg.tie_word_embeddings {
                vec!["lm_head.weight".into()]
            } else {
                vec![]
            },
            ..Default::default()
        };
        // The model takes the checkpoint's tensors where their dtype is `kind` (safetensors:
        // views of the mapped file, so the weights are never in memory twice).
        let report = checkpoint::load_into_owned(&vs, "", sd, &dir.display().to_string(), &opts)?;
        if stored.is_none() && !target.is_none() {
            model
                .quantize(&vs, target)
                .map_err(|e| Error::ckpt(dir, e.to_string()))?;
        }
        tracing::info!(tensors = report.loaded, dir = %dir.display(), quantize = %model.quant_mode(), "loaded LLaMA");
        Ok((vs, model))
    }

    /// The config and the tensors of a HF folder whose linear layers are stored in `stored`,
    /// every shape the config implies checked against the tensors (before anything is
    /// allocated from the config: a hostile `vocab_size` never reaches a VarStore).
    pub fn read_folder(dir: &Path, stored: QuantMode) -> Result<(LlamaConfig, StateDict)> {
        let cfg_path = dir.join("config.json");
        let cfg = LlamaConfig::from_json_file(&cfg_path)?;
        let sd = checkpoint::load_path(dir)?;
        check_shapes(&Self::stored_shapes(&cfg, stored), &sd, &cfg_path, dir)?;
        Ok((cfg, sd))
    }

    /// [`LlamaForCausalLM::param_shapes`] as a folder stored in `mode` holds them.
    pub fn stored_shapes(
        cfg: &LlamaConfig,
        mode: QuantMode,
    ) -> std::collections::BTreeMap<String, Vec<i64>> {
        let float = Self::param_shapes(cfg);
        if mode.is_none() {
            return float;
        }
        let mut m = std::collections::BTreeMap::new();
        for (k, shape) in float {
            match (quantize::is_quantizable(&k), shape.as_slice()) {
                (true, [n, i]) => {
                    let prefix = k.trim_end_matches(".weight");
                    let (wk, sk) = quantize::stored_keys(mode, prefix);
                    let (ws, ss) = quantize::stored_shapes(mode, *n, *i);
                    m.insert(wk, ws);
                    m.insert(sk, ss);
                }
                _ => {
                    m.insert(k, shape);
                }
            }
        }
        m
    }

    /// Every quantisable layer (q/k/v/o, gate/up/down) with its checkpoint prefix.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::with_capacity(7 * self.model.layers.len());
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            v.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            v.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            v.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            v.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            v.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            v.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            v.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        v
    }

    /// How the linear layers hold their weights (None: float).
    pub fn quant_mode(&self) -> QuantMode {
        self.model
            .layers
            .first()
            .and_then(|l| l.self_attn.q_proj.quantized())
            .map_or(QuantMode::None, |q| q.mode)
    }

    /// Quantise the float linear layers (q/k/v/o, gate/up/down) to `mode` in place; each
    /// one's float weight leaves `vs` as it is replaced. The embeddings, the norms and the
    /// head stay float. Errors name the layer.
    pub fn quantize(&mut self, vs: &nn::VarStore, mode: QuantMode) -> Result<()> {
        if mode.is_none() {
            return Ok(());
        }
        let kind = self.kind();
        for (name, lin) in self.linears_mut() {
            let q = match lin {
                Linear::Float(f) => QLinear::quantize(mode, &f.ws, f.bs.as_ref(), kind)
                    .map_err(|e| Error::invalid(format!("`{name}.weight`: {e}")))?,
                Linear::Quant(q) => {
                    return Err(Error::invalid(format!(
                        "`{name}` holds {} weights already",
                        q.mode
                    )))
                }
            };
            *lin = Linear::Quant(q);
            drop_vars(vs, &[format!("{name}.weight"), format!("{name}.bias")]);
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.model.embed_tokens.ws.device()
    }

    pub fn kind(&self) -> Kind {
        self.model.embed_tokens.ws.kind()
    }

    /// Embeddings of ids (B, T) → (B, T, H).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        self.model.embed_tokens.forward(ids)
    }

    /// Checked embedding: ids outside the vocabulary are an error, not a crash.
    pub fn f_embed(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= self.config.vocab_size {
                return Err(Error::invalid(format!(
                    "token id out of range [0, {}): min {lo}, max {hi}",
                    self.config.vocab_size
                )));
            }
        }
        Tensor::f_embedding(&self.model.embed_tokens.ws, ids, -1, false, false)
            .ctx("embedding lookup")
    }

    /// Vocabulary logits of hidden states (…, H) → (…, V).
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        match &self.lm_head {
            Some(l) => l.forward(hidden),
            None => hidden.matmul(&self.model.embed_tokens.ws.tr()),
        }
    }

    /// Final hidden states (B, T, H) of `inputs_embeds` (B, T, H). With a cache, the new
    /// positions follow the cached ones and the cache is extended.
    pub fn forward_hidden(
        &self,
        inputs_embeds: &Tensor,
        args: &ForwardArgs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let [b, t, _] = dims(inputs_embeds, "inputs_embeds are (B, T, H)")?;
        let dev = inputs_embeds.device();
        let new_mask = match args.attention_mask {
            Some(m) => m.to_kind(Kind::Bool),
            None => Tensor::ones([b, t], (Kind::Bool, dev)),
        };
        let past_mask = cache.as_ref().and_then(|c| c.key_mask.as_ref());
        let key_mask = match past_mask {
            Some(p) => Tensor::cat(&[p, &new_mask], 1), // (B, Tk)
            None => new_mask.shallow_clone(),
        };
        let position_ids = match args.position_ids {
            Some(p) => p.shallow_clone(),
            None => positions_from_mask(&key_mask, t),
        };
        // No device→host sync here: padding is known from the arguments and the cache.
        let has_padding = args.attention_mask.is_some() || cache.as_ref().is_some_and(|c| c.padded);
        let past_len = key_mask.size()[1] - t;
        let mask = if let Some(m) = args.mask_4d {
            Some(m.shallow_clone())
        } else if has_padding || (past_len > 0 && t > 1) {
            Some(causal_padding_mask(&key_mask, t)?)
        } else {
            None
        };
        let (cos, sin) = self
            .model
            .rotary_emb
            .forward(&position_ids, inputs_embeds.kind());
        let mut h = inputs_embeds.shallow_clone();
        let mut new_layers = Vec::with_capacity(self.model.layers.len());
        let past_layers = cache.as_ref().map(|c| &c.layers);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let past = past_layers.and_then(|l| l.get(i));
            let (a, kv) = layer.self_attn.forward(
                &layer.input_layernorm.forward(&h),
                &cos,
                &sin,
                past,
                mask.as_ref(),
            )?;
            h = &h + a;
            h = &h
                + layer
                    .mlp
                    .forward(&layer.post_attention_layernorm.forward(&h));
            new_layers.push(kv);
        }
        if let Some(c) = cache {
            c.layers = new_layers;
            c.key_mask = Some(key_mask);
            c.padded = has_padding;
        }
        Ok(self.model.norm.forward(&h))
    }

    /// Logits (B, T, V) of `inputs_embeds` (B, T, H).
    pub fn forward_embeds(
        &self,
        inputs_embeds: &Tensor,
        args: &ForwardArgs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Ok(self.head(&self.forward_hidden(inputs_embeds, args, cache)?))
    }

    /// Logits (B, T, V) of token ids (B, T).
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        args: &ForwardArgs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_embeds(&self.embed(ids), args, cache)
    }

    /// Logits (B, V) of the last position only (what decoding needs; with left padding the
    /// last position is real for every stream).
    pub fn forward_last(
        &self,
        inputs_embeds: &Tensor,
        args: &ForwardArgs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(inputs_embeds, args, cache)?;
        let [_, t, _] = dims(&h, "hidden states are (B, T, H)")?;
        Ok(self.head(&h.select(1, t - 1)))
    }
}

impl LlamaForCausalLM {
    /// Final hidden states (B, T, H) of `inputs_embeds` (B, T, H) over a paged KV cache:
    /// each row's new positions (`at.positions`) attend to its own cached keys and the new
    /// ones, which this call writes into `pool` (continuous batching: rows of different
    /// lengths and requests in one forward).
    pub fn forward_paged(
        &self,
        inputs_embeds: &Tensor,
        pool: &KvPool,
        at: &PagedArgs,
    ) -> Result<Tensor> {
        if pool.layers.len() != self.model.layers.len() {
            return Err(Error::invalid(format!(
                "a KV pool of {} layers for a model of {}",
                pool.layers.len(),
                self.model.layers.len()
            )));
        }
        let (cos, sin) = self
            .model
            .rotary_emb
            .forward(at.positions, inputs_embeds.kind());
        let mut h = inputs_embeds.shallow_clone();
        for (layer, (pk, pv)) in self.model.layers.iter().zip(&pool.layers) {
            let a = layer.self_attn.forward_paged(
                &layer.input_layernorm.forward(&h),
                &cos,
                &sin,
                pk,
                pv,
                at,
            )?;
            h = &h + a;
            h = &h
                + layer
                    .mlp
                    .forward(&layer.post_attention_layernorm.forward(&h));
        }
        Ok(self.model.norm.forward(&h))
    }
}

/// Refuse a config whose implied parameter shapes are not the checkpoint's, naming the
/// first tensor that differs (a cheap check done before the model is built).
fn check_shapes(
    want: &std::collections::BTreeMap<String, Vec<i64>>,
    sd: &checkpoint::StateDict,
    cfg_path: &Path,
    dir: &Path,
) -> Result<()> {
    for (k, shape) in want {
        match sd.get(k) {
            Some(t) if t.size() == *shape => {}
            Some(t) => {
                return Err(Error::config(
                    cfg_path.display().to_string(),
                    "(shapes)",
                    format!(
                    "the config implies `{k}` of shape {shape:?}, the checkpoint in {} holds {:?}",
                    dir.display(),
                    t.size()
                ),
                ))
            }
            None => {
                return Err(Error::config(
                    cfg_path.display().to_string(),
                    "(shapes)",
                    format!(
                        "the config implies a tensor `{k}` that the checkpoint in {} does not hold",
                        dir.display()
                    ),
                ))
            }
        }
    }
    Ok(())
}
