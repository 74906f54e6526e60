//! The 3-axis rotary position embedding (diffusers' `WanRotaryPosEmbed`).

use tch::{Device, Kind, Tensor};

/// Rotary tables for frames, height and width, as diffusers computes them: per axis
/// `1 / theta^(2i/d)` in float64, times the position, cos and sin repeated pairwise, then
/// float32. The tables are not parameters (diffusers' buffers are non-persistent).
#[derive(Debug)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    dims: [i64; 3],
    patch: [i64; 3],
}

/// The cos and sin of one forward, `[1, tokens, 1, head_dim]` in float32.
#[derive(Debug)]
pub struct Rotary {
    /// Cosines.
    pub cos: Tensor,
    /// Sines.
    pub sin: Tensor,
}

impl Rotary {
    /// A shallow copy on `device`.
    pub fn to_device(&self, device: Device) -> Rotary {
        Rotary {
            cos: self.cos.to_device(device),
            sin: self.sin.to_device(device),
        }
    }

    /// Rotates `x` `[batch, tokens, heads, head_dim]` pairwise (channels 2i and 2i+1), in the
    /// promoted type of `x` and the float32 tables, and returns it in `x`'s type. As diffusers'
    /// `apply_rotary_emb`, the even and odd results are cast as they are copied into the strided
    /// halves of a tensor like `x` (no float32 stack and cast: 2 fewer passes over q and k).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let pairs = x.unflatten(-1, [-1, 2]);
        let x1 = pairs.select(-1, 0);
        let x2 = pairs.select(-1, 1);
        let cos = self.cos.slice(-1, 0, None, 2);
        let sin = self.sin.slice(-1, 1, None, 2);
        let out = x.empty_like();
        out.slice(-1, 0, None, 2).copy_(&(&x1 * &cos - &x2 * &sin));
        out.slice(-1, 1, None, 2).copy_(&(&x1 * &sin + &x2 * &cos));
        out
    }
}

impl RotaryEmbedding {
    /// Tables for `dims` (frames, height, width channels), positions `0..max_seq_len`.
    pub fn new(dims: [i64; 3], patch: [i64; 3], max_seq_len: i64, theta: f64) -> RotaryEmbedding {
        let (cos, sin): (Vec<Tensor>, Vec<Tensor>) = dims
            .iter()
            .map(|&d| {
                // get_1d_rotary_pos_embed(d, max_seq_len, theta, use_real=True,
                // repeat_interleave_real=True, freqs_dtype=float64), op for op.
                let exponent = Tensor::arange_start_step(0, d, 2, (Kind::Double, Device::Cpu))
                    .slice(0, 0, d / 2, 1)
                    / d;
                let freqs = Tensor::pow_scalar(theta, &exponent).reciprocal() * 1.0;
                let pos = Tensor::arange(max_seq_len, (Kind::Int64, Device::Cpu));
                let freqs = pos.outer(&freqs);
                let rep = |t: Tensor| t.repeat_interleave_self_int(2, 1, d).to_kind(Kind::Float);
                (rep(freqs.cos()), rep(freqs.sin()))
            })
            .unzip();
        RotaryEmbedding {
            cos: Tensor::cat(&cos, 1),
            sin: Tensor::cat(&sin, 1),
            dims,
            patch,
        }
    }

    /// The tables for a latent of `frames x height x width` (before patching), on `device`.
    pub fn forward(&self, frames: i64, height: i64, width: i64, device: Device) -> Rotary {
        let [pt, ph, pw] = self.patch;
        let (f, h, w) = (frames / pt, height / ph, width / pw);
        let dims = self.dims.to_vec();
        let axes = |table: &Tensor| {
            let parts = table.split_with_sizes(&dims, 1);
            let ef = parts[0]
                .slice(0, 0, f, 1)
                .view([f, 1, 1, -1])
                .expand([f, h, w, -1], false);
            let eh = parts[1]
                .slice(0, 0, h, 1)
                .view([1, h, 1, -1])
                .expand([f, h, w, -1], false);
            let ew = parts[2]
                .slice(0, 0, w, 1)
                .view([1, 1, w, -1])
                .expand([f, h, w, -1], false);
            Tensor::cat(&[ef, eh, ew], -1)
                .reshape([1, f * h * w, 1, -1])
                .to_device(device)
        };
        Rotary {
            cos: axes(&self.cos),
            sin: axes(&self.sin),
        }
    }
}
