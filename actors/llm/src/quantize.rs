//! Weight-only quantisation of the LLM's linear layers (q/k/v/o, gate/up/down), as gpt-fast
//! and torchao do it with libtorch's packed kernels:
//!
//! - **int8**: symmetric, one scale per output channel: `q = round(w / s)` in [−128, 127],
//!   `s = max|w_row| / 127`; `y = x · (q·s)ᵀ` by `_weight_int8pack_mm`.
//! - **int4**: asymmetric, a scale and a zero per `group_size` input features of each output
//!   channel: `q = round((w − min) / s)` in [0, 15], `s = (max − min) / 15`,
//!   `zero = min + 8·s`, so `w ≈ (q − 8)·s + zero`; `y` by `_weight_int4pack_mm_for_cpu`
//!   (CPU) or `_weight_int4pack_mm` (CUDA, bf16).
//!
//! The packed kernels are fast with bf16 activations (the float32 ones take a slow path on the
//! CPU: 13× slower for int8 at 1376×512 on AVX2), so a quantised layer computes in bf16 and
//! returns the input's dtype.
//!
//! Stored form (a `lavit quantize` folder; the layout the device packing starts from, which
//! is CPU-capability dependent and never stored): `{layer}.weight` int8 (N, K) and
//! `{layer}.scales` float32 (N,) for int8; `{layer}.qweight` uint8 (N, K/2) (two 4-bit
//! values per byte, the even input feature in the high nibble) and `{layer}.scales_and_zeros`
//! float32 (K/g, N, 2) for int4.

use lavit_runtime::checkpoint::StateDict;
pub use lavit_runtime::manifest::QuantMode;
use lavit_runtime::{Error, Result, TchContext};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// The dtype a quantised layer computes in (the packed kernels' fast path).
const COMPUTE: Kind = Kind::BFloat16;

/// A linear layer of the LLM: float (`nn::Linear`, a variable of the VarStore) or quantised
/// (tensors owned here, outside the VarStore).
#[derive(Debug)]
pub enum Linear {
    Float(nn::Linear),
    Quant(QLinear),
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Linear::Float(l) => l.forward(xs),
            Linear::Quant(q) => q.forward(xs),
        }
    }
}

impl Linear {
    /// The quantised layer, if this one is.
    pub fn quantized(&self) -> Option<&QLinear> {
        match self {
            Linear::Quant(q) => Some(q),
            Linear::Float(_) => None,
        }
    }
}

/// A weight-only quantised linear layer on its device, packed for the device's kernel.
#[derive(Debug)]
pub struct QLinear {
    pub in_features: i64,
    pub out_features: i64,
    pub mode: QuantMode,
    /// int8: (N, K) int8. int4: the device's packed layout.
    weight: Tensor,
    /// int8: (N,) bf16 scales. int4: (K/g, N, 2) bf16 scales and zeros.
    scales: Tensor,
    /// (N,) in the model's dtype.
    bias: Option<Tensor>,
}

impl Module for QLinear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut shape = xs.size();
        let kind = xs.kind();
        let x = xs
            .reshape([-1, self.in_features])
            .to_kind(COMPUTE)
            .contiguous(); // (M, K)
        let y = match self.mode {
            QuantMode::Int4 { group_size } if self.weight.device() == Device::Cpu => {
                x.internal_weight_int4pack_mm_for_cpu(&self.weight, group_size, &self.scales)
            }
            QuantMode::Int4 { group_size } => {
                x.internal_weight_int4pack_mm(&self.weight, group_size, &self.scales)
            }
            _ => x.internal_weight_int8pack_mm(&self.weight, &self.scales),
        }; // (M, N)
        if let Some(last) = shape.last_mut() {
            *last = self.out_features;
        }
        let y = y.to_kind(kind).reshape(shape.as_slice());
        match &self.bias {
            Some(b) => y + b,
            None => y,
        }
    }
}

/// int8 of a float weight (N, K): (int8 (N, K), float32 scales (N,)).
pub fn quantize_int8(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let w = w.f_to_kind(Kind::Float).ctx("int8: weight to float32")?;
    let scales = w
        .f_abs()
        .and_then(|a| a.f_amax([1i64].as_slice(), false))
        .ctx("int8: row maxima")?
        .clamp_min(1e-12)
        / 127.0; // (N,)
    let q = (w / scales.unsqueeze(1))
        .f_round()
        .ctx("int8: rounding")?
        .clamp(-128i64, 127i64)
        .to_kind(Kind::Int8);
    Ok((q, scales))
}

/// Group-wise int4 of a float weight (N, K), K a multiple of `group_size`: (uint8 (N, K/2),
/// the even input feature in the high nibble; float32 scales and zeros (K/g, N, 2)).
pub fn quantize_int4(w: &Tensor, group_size: i64) -> Result<(Tensor, Tensor)> {
    let [n, k] = two_dims(w)?;
    if group_size <= 0 || k % group_size != 0 {
        return Err(Error::invalid(format!(
            "int4: {k} input features are not a multiple of the group size {group_size}"
        )));
    }
    let g = w
        .f_to_kind(Kind::Float)
        .and_then(|w| w.f_reshape([n, k / group_size, group_size]))
        .ctx("int4: grouping")?; // (N, K/g, g)
    let hi = g.amax([-1i64].as_slice(), true);
    let lo = g.amin([-1i64].as_slice(), true);
    let scales = (hi - &lo).clamp_min(1e-6) / 15.0; // (N, K/g, 1)
    let zeros = &lo + &scales * 8.0;
    let q = ((g - &lo) / &scales)
        .round()
        .clamp(0.0, 15.0)
        .to_kind(Kind::Uint8)
        .reshape([n, k / 2, 2]); // (N, K/2, 2)
    let packed = q.select(2, 0) * 16i64 + q.select(2, 1); // (N, K/2)
    let sz = Tensor::cat(&[scales, zeros], -1) // (N, K/g, 2)
        .transpose(0, 1)
        .contiguous(); // (K/g, N, 2)
    Ok((packed.to_kind(Kind::Uint8), sz))
}

/// The int4 values (N, K) int32 in [0, 15] of a stored (N, K/2) uint8 weight.
fn unpack_int4(packed: &Tensor) -> Tensor {
    let p = packed.to_kind(Kind::Int);
    let hi = p.bitwise_right_shift_tensor_scalar(4i64);
    let lo = p.bitwise_and(15i64);
    let [n, half] = [p.size()[0], p.size()[1]];
    Tensor::stack(&[hi, lo], -1).reshape([n, 2 * half])
}

fn two_dims(w: &Tensor) -> Result<[i64; 2]> {
    match w.size().as_slice() {
        [n, k] => Ok([*n, *k]),
        s => Err(Error::invalid(format!(
            "a linear weight is (out, in), got shape {s:?}"
        ))),
    }
}

/// Why a (N, K) weight cannot be quantised in `mode` (the packed kernels' constraints), or
/// None when it can.
pub fn unsupported(mode: QuantMode, n: i64, k: i64) -> Option<String> {
    match mode {
        QuantMode::Int4 { group_size } if k % group_size != 0 => Some(format!(
            "{k} input features are not a multiple of the int4 group size {group_size}"
        )),
        QuantMode::Int4 { .. } if n % 16 != 0 => Some(format!(
            "{n} output features are not a multiple of 16 (the int4 packing's tile)"
        )),
        _ => None,
    }
}

impl QLinear {
    /// An empty layer of (N, K) = (`o`, `i`) that the loader replaces.
    pub(crate) fn placeholder(mode: QuantMode, i: i64, o: i64) -> Self {
        QLinear {
            in_features: i,
            out_features: o,
            mode,
            weight: Tensor::new(),
            scales: Tensor::new(),
            bias: None,
        }
    }

    /// A layer from its stored tensors (see the module doc), packed on `device`; the bias (if
    /// any) in `kind`.
    pub fn from_stored(
        mode: QuantMode,
        weight: &Tensor,
        scales: &Tensor,
        bias: Option<&Tensor>,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let [n, stored_k] = two_dims(weight)?;
        let (k, packed, scales) = match mode {
            QuantMode::None => return Err(Error::invalid("QLinear of a float layer")),
            QuantMode::Int8 => {
                if weight.kind() != Kind::Int8 || scales.size() != [n] {
                    return Err(Error::invalid(format!(
                        "int8 weight {:?} {:?} with scales {:?}: want int8 (N, K) and (N,)",
                        weight.kind(),
                        weight.size(),
                        scales.size()
                    )));
                }
                let w = weight
                    .f_to_device(device)
                    .and_then(|w| w.f_contiguous())
                    .ctx("int8 weight to its device")?;
                (stored_k, w, scales.f_to_kind(COMPUTE).ctx("int8 scales")?)
            }
            QuantMode::Int4 { group_size } => {
                let k = stored_k * 2;
                if weight.kind() != Kind::Uint8 || scales.size() != [k / group_size, n, 2] {
                    return Err(Error::invalid(format!(
                        "int4 weight {:?} {:?} with scales and zeros {:?}: want uint8 (N, K/2) and (K/{group_size}, N, 2)",
                        weight.kind(),
                        weight.size(),
                        scales.size()
                    )));
                }
                if let Some(why) = unsupported(mode, n, k) {
                    return Err(Error::invalid(why));
                }
                let packed = if device == Device::Cpu {
                    unpack_int4(weight)
                        .f_internal_convert_weight_to_int4pack_for_cpu(2)
                        .ctx("packing int4 weights")?
                } else {
                    weight
                        .f_to_device(device)
                        .and_then(|w| w.f_internal_convert_weight_to_int4pack(8))
                        .ctx("packing int4 weights")?
                };
                let sz = scales.f_to_kind(COMPUTE).ctx("int4 scales")?;
                (k, packed, sz)
            }
        };
        let scales = scales.f_to_device(device).ctx("scales to their device")?;
        let bias = bias
            .map(|b| b.f_to_kind(kind).and_then(|b| b.f_to_device(device)))
            .transpose()
            .ctx("bias to its device")?;
        Ok(QLinear {
            in_features: k,
            out_features: n,
            mode,
            weight: packed,
            scales,
            bias,
        })
    }

    /// Quantise a float weight (N, K) (and bias) in `mode` onto its device.
    pub fn quantize(
        mode: QuantMode,
        weight: &Tensor,
        bias: Option<&Tensor>,
        kind: Kind,
    ) -> Result<Self> {
        let device = weight.device();
        let [n, k] = two_dims(weight)?;
        if let Some(why) = unsupported(mode, n, k) {
            return Err(Error::invalid(why));
        }
        let (w, s) = stored(mode, weight)?;
        Self::from_stored(mode, &w, &s, bias, device, kind)
    }
}

/// The stored tensors (weight, scales) of a float weight in `mode` (see the module doc).
pub fn stored(mode: QuantMode, weight: &Tensor) -> Result<(Tensor, Tensor)> {
    let _g = tch::no_grad_guard();
    match mode {
        QuantMode::Int8 => quantize_int8(weight),
        QuantMode::Int4 { group_size } => quantize_int4(weight, group_size),
        QuantMode::None => Err(Error::invalid("no quantisation mode given")),
    }
}

/// The checkpoint keys of a stored quantised layer `prefix` (without `.weight`): weight and
/// scales.
pub fn stored_keys(mode: QuantMode, prefix: &str) -> (String, String) {
    match mode {
        QuantMode::Int4 { .. } => (
            format!("{prefix}.qweight"),
            format!("{prefix}.scales_and_zeros"),
        ),
        _ => (format!("{prefix}.weight"), format!("{prefix}.scales")),
    }
}

/// The shapes a layer of (N, K) stores in `mode`: weight and scales.
pub fn stored_shapes(mode: QuantMode, n: i64, k: i64) -> (Vec<i64>, Vec<i64>) {
    match mode {
        QuantMode::Int4 { group_size } => (vec![n, k / 2], vec![k / group_size, n, 2]),
        _ => (vec![n, k], vec![n]),
    }
}

/// Whether `key` (a checkpoint key ending in `.weight`) is a weight of a quantisable layer
/// of the LLM: q/k/v/o of the attention and gate/up/down of the MLP.
pub fn is_quantizable(key: &str) -> bool {
    const LAYERS: [&str; 7] = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    key.strip_suffix(".weight").is_some_and(|p| {
        p.starts_with("model.layers.") && LAYERS.iter().any(|l| p.ends_with(&format!(".{l}")))
    })
}

/// A float state dict of the LLM with its quantisable weights replaced by their stored
/// quantised tensors (`lavit quantize`); `source` names the folder in errors.
pub fn quantize_state_dict(sd: StateDict, mode: QuantMode, source: &str) -> Result<StateDict> {
    let mut out = StateDict::new();
    for (k, t) in sd {
        if !is_quantizable(&k) {
            out.insert(k, t);
            continue;
        }
        let prefix = k.trim_end_matches(".weight");
        let [n, kk] = two_dims(&t).map_err(|e| Error::ckpt(source, format!("`{k}`: {e}")))?;
        if let Some(why) = unsupported(mode, n, kk) {
            return Err(Error::ckpt(source, format!("`{k}` {:?}: {why}", t.size())));
        }
        let (w, s) = stored(mode, &t).map_err(|e| Error::ckpt(source, format!("`{k}`: {e}")))?;
        let (wk, sk) = stored_keys(mode, prefix);
        out.insert(wk, w);
        out.insert(sk, s);
    }
    Ok(out)
}
