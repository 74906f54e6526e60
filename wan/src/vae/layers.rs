//! The decoder's layers, as diffusers writes them in `autoencoder_kl_wan.py`: the causal 3D
//! convolution (`WanCausalConv3d`), the RMS norm (`WanRMS_norm`), the residual block
//! (`WanResidualBlock`), the per-frame attention (`WanAttentionBlock`) and the upsampler
//! (`WanResample`, modes `upsample2d` and `upsample3d`). Each runs the same libtorch operations
//! in the same order and on the same types as diffusers, views and permutations included, so
//! that the reductions see the same memory layouts.

use super::cache::{FeatCache, TimeStep};
use tch::nn;
use tch::{Kind, Tensor};

/// How a constructor makes its parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weights {
    /// Drawn at random in the VarStore's type (convolutions as tch's default, gammas at 1).
    Random,
    /// Uninitialized, in this type.
    Empty(Kind),
}

impl Weights {
    fn make(self, p: &nn::Path, name: &str, dims: &[i64], init: nn::Init) -> Tensor {
        match self {
            Weights::Random => p.var(name, dims, init),
            Weights::Empty(kind) => p.add(name, Tensor::empty(dims, (kind, p.device())), true),
        }
    }

    /// `weight` and `bias` of a convolution with `out` channels and this weight shape.
    fn conv(self, p: &nn::Path, dims: &[i64]) -> (Tensor, Tensor) {
        let fan_in: i64 = dims[1..].iter().product();
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let uniform = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        (
            self.make(p, "weight", dims, uniform),
            self.make(p, "bias", &[dims[0]], uniform),
        )
    }
}

/// `WanCausalConv3d`: a Conv3d padded in time on the front only (`2 * padding[0]` frames),
/// where the cached frames of the previous chunk take the place of that padding.
#[derive(Debug)]
pub(crate) struct CausalConv3d {
    weight: Tensor,
    bias: Tensor,
    /// diffusers' `_padding`: (w, w, h, h, 2 * t, 0).
    padding: [i64; 6],
}

impl CausalConv3d {
    pub(crate) fn new(
        p: nn::Path,
        in_dim: i64,
        out_dim: i64,
        kernel: [i64; 3],
        padding: [i64; 3],
        w: Weights,
    ) -> CausalConv3d {
        let (weight, bias) = w.conv(&p, &[out_dim, in_dim, kernel[0], kernel[1], kernel[2]]);
        let [t, h, wd] = padding;
        CausalConv3d {
            weight,
            bias,
            padding: [wd, wd, h, h, 2 * t, 0],
        }
    }

    /// The convolution of `x` after `cache` (the previous chunk's last frames), which replaces
    /// as many frames of the front padding.
    pub(crate) fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Tensor {
        let mut padding = self.padding;
        let x = match cache {
            Some(c) if self.padding[4] > 0 => {
                padding[4] -= c.size()[2];
                Tensor::cat(&[c, x], 2)
            }
            _ => x.shallow_clone(),
        };
        // F.pad with zero widths is the identity.
        let x = if padding.iter().all(|&p| p == 0) {
            x
        } else {
            x.constant_pad_nd(padding)
        };
        x.conv3d(
            &self.weight,
            Some(&self.bias),
            [1, 1, 1],
            [0, 0, 0],
            [1, 1, 1],
            1,
        )
    }

    /// The convolution with the slot's cache, which then keeps `x`'s last frames (the
    /// `feat_cache` pattern of diffusers' decoder and residual blocks).
    pub(crate) fn forward_cached(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let old = cache.swap(x);
        self.forward(x, old.as_ref())
    }
}

/// A 2D convolution (`nn.Conv2d`, stride 1) with this padding.
#[derive(Debug)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: i64,
}

impl Conv2d {
    pub(crate) fn new(p: nn::Path, in_dim: i64, out_dim: i64, k: i64, w: Weights) -> Conv2d {
        let (weight, bias) = w.conv(&p, &[out_dim, in_dim, k, k]);
        Conv2d {
            weight,
            bias,
            padding: k / 2,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [1, 1],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// `WanRMS_norm` over the channels (dimension 1): `F.normalize(x) * sqrt(dim) * gamma`, the
/// normalization in float32 for half-precision inputs. `gamma` is `[dim, 1, 1, 1]` for videos,
/// `[dim, 1, 1]` for images (the attention's per-frame input). No bias (diffusers' default).
#[derive(Debug)]
pub(crate) struct RmsNorm {
    gamma: Tensor,
    scale: f64,
}

impl RmsNorm {
    pub(crate) fn new(p: nn::Path, dim: i64, images: bool, w: Weights) -> RmsNorm {
        let dims: &[i64] = if images {
            &[dim, 1, 1]
        } else {
            &[dim, 1, 1, 1]
        };
        RmsNorm {
            gamma: w.make(&p, "gamma", dims, nn::Init::Const(1.0)),
            scale: (dim as f64).sqrt(),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = match kind {
            Kind::Half | Kind::BFloat16 => x.to_kind(Kind::Float),
            _ => x.shallow_clone(),
        };
        // F.normalize(x, dim=1): x / ||x||_2.clamp_min(1e-12), the norm as linalg.vector_norm.
        let denom = x32
            .linalg_norm(2.0, [1i64].as_slice(), true, None::<Kind>)
            .clamp_min(1e-12)
            .expand_as(&x32);
        let normalized = (x32 / denom).to_kind(kind);
        normalized * self.scale * &self.gamma
    }
}

/// `WanResidualBlock`: norm1, silu, conv1 (3x3x3), norm2, silu, (dropout), conv2, plus the
/// input through `conv_shortcut` (1x1x1) where the channel count changes.
#[derive(Debug)]
pub(crate) struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    conv_shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub(crate) fn new(p: nn::Path, in_dim: i64, out_dim: i64, w: Weights) -> ResidualBlock {
        let conv3 = |name: &str, i, o| CausalConv3d::new(&p / name, i, o, [3; 3], [1; 3], w);
        ResidualBlock {
            norm1: RmsNorm::new(&p / "norm1", in_dim, false, w),
            conv1: conv3("conv1", in_dim, out_dim),
            norm2: RmsNorm::new(&p / "norm2", out_dim, false, w),
            conv2: conv3("conv2", out_dim, out_dim),
            conv_shortcut: (in_dim != out_dim).then(|| {
                CausalConv3d::new(&p / "conv_shortcut", in_dim, out_dim, [1; 3], [0; 3], w)
            }),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let h = match &self.conv_shortcut {
            Some(c) => c.forward(x, None),
            None => x.shallow_clone(),
        };
        let x = self.norm1.forward(x).silu();
        let x = self.conv1.forward_cached(&x, cache);
        let x = self.norm2.forward(&x).silu();
        let x = self.conv2.forward_cached(&x, cache);
        x + h
    }
}

/// `WanAttentionBlock`: single-head self-attention within each frame over its `h * w`
/// positions (RMS norm, 1x1 `to_qkv`, scaled dot-product attention, 1x1 `proj`, residual).
#[derive(Debug)]
pub(crate) struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    pub(crate) fn new(p: nn::Path, dim: i64, w: Weights) -> AttentionBlock {
        AttentionBlock {
            norm: RmsNorm::new(&p / "norm", dim, true, w),
            to_qkv: Conv2d::new(&p / "to_qkv", dim, 3 * dim, 1, w),
            proj: Conv2d::new(&p / "proj", dim, dim, 1, w),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let [b, c, t, h, w] = x.size()[..] else {
            unreachable!("the decoder's activations are 5-D")
        };
        let y = x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w]);
        let y = self.norm.forward(&y);
        let qkv = self.to_qkv.forward(&y);
        let qkv = qkv.reshape([b * t, 1, c * 3, -1]);
        let qkv = qkv.permute([0, 1, 3, 2]).contiguous();
        let qkv = qkv.chunk(3, -1);
        let y = Tensor::scaled_dot_product_attention(
            &qkv[0],
            &qkv[1],
            &qkv[2],
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let y = y
            .squeeze_dim(1)
            .permute([0, 2, 1])
            .reshape([b * t, c, h, w]);
        let y = self.proj.forward(&y);
        let y = y.view([b, t, c, h, w]).permute([0, 2, 1, 3, 4]);
        y + x
    }
}

/// `WanResample` in mode `upsample2d` (nearest-exact 2x in height and width, in float32, then a
/// 3x3 Conv2d to half the channels) or `upsample3d` (the same after `time_conv`, a (3, 1, 1)
/// causal convolution to twice the channels whose halves become two frames per frame: time
/// doubles, except on the first chunk, which it passes through).
#[derive(Debug)]
pub(crate) struct Resample {
    conv: Conv2d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    pub(crate) fn new(p: nn::Path, dim: i64, out_dim: i64, temporal: bool, w: Weights) -> Resample {
        Resample {
            conv: Conv2d::new(&p / "resample" / 1, dim, out_dim, 3, w),
            time_conv: temporal.then(|| {
                CausalConv3d::new(&p / "time_conv", dim, dim * 2, [3, 1, 1], [1, 0, 0], w)
            }),
        }
    }

    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let [b, c, t, h, w] = x.size()[..] else {
            unreachable!("the decoder's activations are 5-D")
        };
        let mut x = x.shallow_clone();
        if let Some(time_conv) = &self.time_conv {
            let y = match cache.time_step(&x) {
                TimeStep::First => None,
                TimeStep::Conv(prev) => Some(time_conv.forward(&x, prev.as_ref())),
            };
            if let Some(y) = y {
                let y = y.reshape([b, 2, c, t, h, w]);
                let y = Tensor::stack(&[y.select(1, 0), y.select(1, 1)], 3);
                x = y.reshape([b, c, t * 2, h, w]);
            }
        }
        let t = x.size()[2];
        let y = x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w]);
        // WanUpsample: nearest-exact in float32, back to the input's type.
        let up = y
            .to_kind(Kind::Float)
            .internal_upsample_nearest_exact2d_vec(None::<&[i64]>, [2.0, 2.0].as_slice())
            .to_kind(y.kind());
        let y = self.conv.forward(&up);
        let [_, c2, h2, w2] = y.size()[..] else {
            unreachable!("a 2D convolution's output is 4-D")
        };
        y.view([b, t, c2, h2, w2]).permute([0, 2, 1, 3, 4])
    }
}
