//! `WanDecoder3d`: `conv_in`, the mid block (residual block, attention, residual block), the up
//! blocks (residual blocks, then an upsampler on every level but the last), `norm_out`, silu and
//! `conv_out`, run on one chunk of frames with the feature cache.

use super::cache::FeatCache;
use super::config::VaeConfig;
use super::layers::{AttentionBlock, CausalConv3d, Resample, ResidualBlock, RmsNorm, Weights};
use tch::{Tensor, nn};

/// `WanMidBlock` with one attention: `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResidualBlock; 2],
    attention: AttentionBlock,
}

impl MidBlock {
    fn new(p: nn::Path, dim: i64, w: Weights) -> MidBlock {
        MidBlock {
            resnets: [
                ResidualBlock::new(&p / "resnets" / 0, dim, dim, w),
                ResidualBlock::new(&p / "resnets" / 1, dim, dim, w),
            ],
            attention: AttentionBlock::new(&p / "attentions" / 0, dim, w),
        }
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let x = self.resnets[0].forward(x, cache);
        let x = self.attention.forward(&x);
        self.resnets[1].forward(&x, cache)
    }
}

/// `WanUpBlock`: `num_res_blocks + 1` residual blocks, then `upsamplers.0` where there is one.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        let mut x = x.shallow_clone();
        for r in &self.resnets {
            x = r.forward(&x, cache);
        }
        match &self.upsampler {
            Some(u) => u.forward(&x, cache),
            None => x,
        }
    }
}

/// Wan2.1's decoder (`is_residual: false`).
#[derive(Debug)]
pub(crate) struct Decoder3d {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder3d {
    /// The decoder's parameters under `p` (`decoder`) for a validated configuration.
    pub(crate) fn new(p: nn::Path, c: &VaeConfig, w: Weights) -> Decoder3d {
        let base = c.decoder_base_dim();
        let levels = c.dim_mult.len();
        // dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        let dims: Vec<i64> = std::iter::once(c.dim_mult[levels - 1])
            .chain(c.dim_mult.iter().rev().copied())
            .map(|m| base * m)
            .collect();
        let temporal = c.temporal_upsample();
        let conv_in = CausalConv3d::new(&p / "conv_in", c.z_dim, dims[0], [3; 3], [1; 3], w);
        let mid_block = MidBlock::new(&p / "mid_block", dims[0], w);
        let mut up_blocks = Vec::with_capacity(levels);
        let mut out_dim = dims[0];
        for i in 0..levels {
            let b = &p / "up_blocks" / i;
            // Wan2.1: every level after the first receives its predecessor's upsampler output,
            // which has half the channels.
            let mut in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
            out_dim = dims[i + 1];
            let mut resnets = Vec::new();
            for j in 0..=c.num_res_blocks {
                resnets.push(ResidualBlock::new(&b / "resnets" / j, in_dim, out_dim, w));
                in_dim = out_dim;
            }
            let upsampler = (i != levels - 1).then(|| {
                Resample::new(&b / "upsamplers" / 0, out_dim, out_dim / 2, temporal[i], w)
            });
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        Decoder3d {
            conv_in,
            mid_block,
            up_blocks,
            norm_out: RmsNorm::new(&p / "norm_out", out_dim, false, w),
            conv_out: CausalConv3d::new(
                &p / "conv_out",
                out_dim,
                c.out_channels,
                [3; 3],
                [1; 3],
                w,
            ),
        }
    }

    /// One chunk (one latent frame after `post_quant_conv`) through the decoder.
    pub(crate) fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Tensor {
        cache.start_chunk();
        let x = self.conv_in.forward_cached(x, cache);
        let mut x = self.mid_block.forward(&x, cache);
        for b in &self.up_blocks {
            x = b.forward(&x, cache);
        }
        let x = self.norm_out.forward(&x).silu();
        self.conv_out.forward_cached(&x, cache)
    }
}
