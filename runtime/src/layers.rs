//! The layer and variable constructors every model of the workspace is built with.
//!
//! Outside [`uninit`] they are tch's own (`nn::linear`, `nn::conv2d`, `Path::var`, ...):
//! the same variables drawn the same way, so training from scratch is unchanged. Inside
//! [`uninit`] every variable is uninitialised memory of its shape, kind and device: a
//! loader that replaces every weight right away (a strict [`crate::checkpoint::load_into_owned`])
//! builds its model there, so nothing is drawn (drawing billions of random numbers on a CPU
//! takes longer than reading the file) and, since untouched memory is never resident, a
//! real-size model never exists twice while it loads.
//!
//! tch keeps the configuration of its convolution and normalisation layers private, so
//! [`Conv2d`], [`LayerNorm`] and [`GroupNorm`] are this module's own, computing exactly
//! what tch's do.

use std::borrow::Borrow;
use std::cell::Cell;

use tch::nn::{self, Module};
use tch::Tensor;

thread_local! {
    static UNINIT: Cell<bool> = const { Cell::new(false) };
}

/// Run `build` with every variable that it creates through this module uninitialised (on
/// this thread; nests; restored on return or unwind). Only for a model whose every
/// variable is then replaced.
pub fn uninit<T>(build: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNINIT.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNINIT.with(|u| u.replace(true)));
    build()
}

/// Whether variables are created uninitialised here (inside [`uninit`]).
pub fn is_uninit() -> bool {
    UNINIT.with(Cell::get)
}

fn empty(vs: &nn::Path, name: &str, dims: &[i64], trainable: bool) -> Tensor {
    vs.add(
        name,
        Tensor::empty(dims, (vs.kind(), vs.device())),
        trainable,
    )
}

/// `vs.var(name, dims, init)` (a trainable variable).
pub fn var(vs: &nn::Path, name: &str, dims: &[i64], init: nn::Init) -> Tensor {
    if is_uninit() {
        empty(vs, name, dims, true)
    } else {
        vs.var(name, dims, init)
    }
}

/// `vs.zeros(name, dims)`.
pub fn zeros(vs: &nn::Path, name: &str, dims: &[i64]) -> Tensor {
    var(vs, name, dims, nn::Init::Const(0.))
}

/// `vs.ones(name, dims)`.
pub fn ones(vs: &nn::Path, name: &str, dims: &[i64]) -> Tensor {
    var(vs, name, dims, nn::Init::Const(1.))
}

/// `nn::linear`: `weight` [out, in] and, with `c.bias`, `bias` [out].
pub fn linear<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    in_dim: i64,
    out_dim: i64,
    c: nn::LinearConfig,
) -> nn::Linear {
    let vs = vs.borrow();
    if !is_uninit() {
        return nn::linear(vs, in_dim, out_dim, c);
    }
    nn::Linear {
        ws: empty(vs, "weight", &[out_dim, in_dim], true),
        bs: c.bias.then(|| empty(vs, "bias", &[out_dim], true)),
    }
}

/// A 2-D convolution with zero padding (`nn.Conv2d`), as tch's `nn::Conv2D` computes it.
#[derive(Debug)]
pub struct Conv2d {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    pub stride: [i64; 2],
    pub padding: [i64; 2],
    pub dilation: [i64; 2],
    pub groups: i64,
}

/// `nn::conv2d` with a square kernel: `weight` [out, in / groups, k, k] and, with
/// `c.bias`, `bias` [out]. Only zero padding (`c.padding_mode` is not read).
pub fn conv2d<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    in_dim: i64,
    out_dim: i64,
    k: i64,
    c: nn::ConvConfig,
) -> Conv2d {
    let vs = vs.borrow();
    let (ws, bs) = if is_uninit() {
        (
            empty(vs, "weight", &[out_dim, in_dim / c.groups, k, k], true),
            c.bias.then(|| empty(vs, "bias", &[out_dim], true)),
        )
    } else {
        let conv = nn::conv2d(vs, in_dim, out_dim, k, c);
        (conv.ws, conv.bs)
    };
    Conv2d {
        ws,
        bs,
        stride: [c.stride; 2],
        padding: [c.padding; 2],
        dilation: [c.dilation; 2],
        groups: c.groups,
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d(
            &self.ws,
            self.bs.as_ref(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
    }
}

/// A norm's `weight` and `bias` of `shape` when `affine`: uninitialised inside [`uninit`],
/// else what `draw` (tch's own layer) made.
fn affine_pair(
    vs: &nn::Path,
    shape: &[i64],
    affine: bool,
    draw: impl FnOnce() -> (Option<Tensor>, Option<Tensor>),
) -> (Option<Tensor>, Option<Tensor>) {
    if !affine {
        (None, None)
    } else if is_uninit() {
        (
            Some(empty(vs, "weight", shape, true)),
            Some(empty(vs, "bias", shape, true)),
        )
    } else {
        draw()
    }
}

/// `nn.LayerNorm` over the trailing `normalized_shape`, as tch's `nn::LayerNorm`.
#[derive(Debug)]
pub struct LayerNorm {
    pub ws: Option<Tensor>,
    pub bs: Option<Tensor>,
    pub normalized_shape: Vec<i64>,
    pub eps: f64,
    cudnn_enabled: bool,
}

/// `nn::layer_norm`: with `c.elementwise_affine`, `weight` and `bias` of `normalized_shape`.
pub fn layer_norm<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    normalized_shape: Vec<i64>,
    c: nn::LayerNormConfig,
) -> LayerNorm {
    let vs = vs.borrow();
    let (ws, bs) = affine_pair(vs, &normalized_shape, c.elementwise_affine, || {
        let ln = nn::layer_norm(vs, normalized_shape.clone(), c);
        (ln.ws, ln.bs)
    });
    LayerNorm {
        ws,
        bs,
        normalized_shape,
        eps: c.eps,
        cudnn_enabled: c.cudnn_enabled,
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        Tensor::layer_norm(
            xs,
            self.normalized_shape.as_slice(),
            self.ws.as_ref(),
            self.bs.as_ref(),
            self.eps,
            self.cudnn_enabled,
        )
    }
}

/// `nn.GroupNorm`, as tch's `nn::GroupNorm`.
#[derive(Debug)]
pub struct GroupNorm {
    pub ws: Option<Tensor>,
    pub bs: Option<Tensor>,
    pub num_groups: i64,
    pub num_channels: i64,
    pub eps: f64,
    cudnn_enabled: bool,
}

/// `nn::group_norm`: with `c.affine`, `weight` and `bias` [num_channels].
pub fn group_norm<'a>(
    vs: impl Borrow<nn::Path<'a>>,
    num_groups: i64,
    num_channels: i64,
    c: nn::GroupNormConfig,
) -> GroupNorm {
    let vs = vs.borrow();
    let (ws, bs) = affine_pair(vs, &[num_channels], c.affine, || {
        let gn = nn::group_norm(vs, num_groups, num_channels, c);
        (gn.ws, gn.bs)
    });
    GroupNorm {
        ws,
        bs,
        num_groups,
        num_channels,
        eps: c.eps,
        cudnn_enabled: c.cudnn_enabled,
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Tensor {
        Tensor::group_norm(
            xs,
            self.num_groups,
            self.ws.as_ref(),
            self.bs.as_ref(),
            self.eps,
            self.cudnn_enabled,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn outside_uninit_the_draws_are_tchs_own_and_inside_nothing_is_drawn() {
        let build = |vs: &nn::VarStore| {
            let r = vs.root();
            let c = conv2d(&r / "c", 3, 4, 3, nn::ConvConfig::default());
            let l = linear(&r / "l", 4, 5, Default::default());
            let n = group_norm(&r / "g", 2, 4, Default::default());
            let ln = layer_norm(&r / "n", vec![5], Default::default());
            (c, l, n, ln)
        };
        tch::manual_seed(7);
        let ours = nn::VarStore::new(Device::Cpu);
        let (c, l, ..) = build(&ours);
        tch::manual_seed(7);
        let theirs = nn::VarStore::new(Device::Cpu);
        let tc = nn::conv2d(theirs.root() / "c", 3, 4, 3, Default::default());
        let tl = nn::linear(theirs.root() / "l", 4, 5, Default::default());
        assert!(c.ws.equal(&tc.ws) && l.ws.equal(&tl.ws));
        let x = Tensor::randn([2, 3, 6, 6], (Kind::Float, Device::Cpu));
        assert!(c.forward(&x).equal(&tc.forward(&x)));

        // Inside: the same names and shapes, and the global generator is not advanced.
        tch::manual_seed(7);
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::BFloat16);
        let _ = uninit(|| build(&vs));
        assert!(!is_uninit());
        let after = Tensor::rand([1], (Kind::Float, Device::Cpu));
        tch::manual_seed(7);
        assert!(after.equal(&Tensor::rand([1], (Kind::Float, Device::Cpu))));
        let shapes = |vs: &nn::VarStore| {
            let mut v: Vec<_> = vs
                .variables()
                .into_iter()
                .map(|(k, t)| (k, t.size()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(shapes(&vs), shapes(&ours));
        assert!(vs.variables().values().all(|t| t.kind() == Kind::BFloat16));
    }
}
