//! The whole transformer (diffusers' `WanTransformer3DModel`): patch embedding, condition
//! embedder, blocks, output norm and projection, unpatchify.

use crate::block::Block;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::rope::{Rotary, RotaryEmbedding};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// The modules diffusers keeps in float32 (`WanTransformer3DModel._keep_in_fp32_modules`).
pub const KEEP_IN_FP32_MODULES: [&str; 6] = [
    "rope",
    "time_embedder",
    "scale_shift_table",
    "norm1",
    "norm2",
    "norm3",
];

/// Whether diffusers keeps the parameter `name` in float32 when it loads the model in another
/// type: one of its dot-separated parts is in [`KEEP_IN_FP32_MODULES`] (diffusers' rule). Here:
/// `condition_embedder.time_embedder.*`, every `scale_shift_table` and `blocks.<i>.norm2.*`.
pub fn keeps_fp32(name: &str) -> bool {
    name.split('.')
        .any(|part| KEEP_IN_FP32_MODULES.contains(&part))
}

/// Converts the model's parameters to `kind`, except those diffusers keeps in float32 (see
/// [`keeps_fp32`]), which become float32.
pub fn set_kind(vs: &mut nn::VarStore, kind: Kind) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            let target = if keeps_fp32(&name) { Kind::Float } else { kind };
            if v.kind() != target {
                let converted = v.to_kind(target);
                v.set_data(&converted);
            }
        }
    });
}

/// How a constructor makes its parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weights {
    /// Drawn at random in the VarStore's type.
    Random,
    /// Uninitialized, in this type (float32 where diffusers keeps it).
    Empty(Kind),
}

/// Parameter `name` under `p`: drawn with `init`, or uninitialized.
pub(crate) fn param(p: &nn::Path, name: &str, dims: &[i64], init: nn::Init, w: Weights) -> Tensor {
    match w {
        Weights::Random => p.var(name, dims, init),
        Weights::Empty(kind) => {
            let kind = if keeps_fp32(&p.path(name)) {
                Kind::Float
            } else {
                kind
            };
            p.add(name, Tensor::empty(dims, (kind, p.device())), true)
        }
    }
}

/// A linear layer (`weight` `[out, in]`, `bias` `[out]`) under `p`: tch's default
/// initialization, or uninitialized.
pub(crate) fn linear(p: nn::Path, i: i64, o: i64, w: Weights) -> nn::Linear {
    match w {
        Weights::Random => nn::linear(p, i, o, Default::default()),
        Weights::Empty(_) => nn::Linear {
            ws: param(&p, "weight", &[o, i], nn::Init::Const(0.0), w),
            bs: Some(param(&p, "bias", &[o], nn::Init::Const(0.0), w)),
        },
    }
}

/// What the embedding part of a forward hands to the blocks and the head.
#[derive(Debug)]
pub struct Embedded {
    /// Patch tokens `[batch, tokens, dim]` in the model's type.
    pub hidden: Tensor,
    /// The time embedding `[batch, dim]` (the head's modulation).
    pub temb: Tensor,
    /// The time projection `[batch, 6, dim]` (the blocks' modulation).
    pub timestep_proj: Tensor,
    /// The projected text `[batch, text_tokens, dim]`.
    pub context: Tensor,
    /// The rotary tables of this latent's grid.
    pub rotary: Rotary,
    /// Batch and post-patch frames, height and width.
    pub grid: [i64; 4],
}

/// Wan2.1's transformer with diffusers' module tree: `patch_embedding` (Conv3d),
/// `condition_embedder.{time_embedder.linear_1, time_embedder.linear_2, time_proj,
/// text_embedder.linear_1, text_embedder.linear_2}`, `blocks.<i>`, `proj_out`,
/// `scale_shift_table`. The rotary tables (`rope`) are not parameters.
#[derive(Debug)]
pub struct WanTransformer3DModel {
    config: Config,
    rope: RotaryEmbedding,
    patch_weight: Tensor,
    patch_bias: Tensor,
    time_1: nn::Linear,
    time_2: nn::Linear,
    time_proj: nn::Linear,
    text_1: nn::Linear,
    text_2: nn::Linear,
    blocks: Vec<Block>,
    proj_out: nn::Linear,
    scale_shift_table: Tensor,
}

impl WanTransformer3DModel {
    /// The model's parameters under `path`, drawn at random (tch's default initialization of
    /// linear layers, unit norm scales, `scale_shift_table`s from N(0, 1/dim) as diffusers), in
    /// the VarStore's type. Call [`set_kind`] afterwards for diffusers' mixed precision.
    pub fn new(path: nn::Path, config: &Config) -> WanTransformer3DModel {
        WanTransformer3DModel::build(path, config, Weights::Random)
    }

    /// The model's parameters under `path`, uninitialized (`Tensor::empty`, which touches no
    /// memory until written), in `kind` and float32 where diffusers keeps it (see
    /// [`keeps_fp32`]): for loading a checkpoint into, so that the host never holds the model
    /// twice (with layerwise-offload's `OffloadConfig::checkpoint` the block weights are read
    /// straight into their offload buffers and these tensors are never written).
    pub fn new_empty(path: nn::Path, config: &Config, kind: Kind) -> WanTransformer3DModel {
        WanTransformer3DModel::build(path, config, Weights::Empty(kind))
    }

    fn build(path: nn::Path, config: &Config, w: Weights) -> WanTransformer3DModel {
        let c = config;
        let dim = c.inner_dim();
        let [pt, ph, pw] = c.patch_size;
        let lin = |p: nn::Path, i: i64, o: i64| linear(p, i, o, w);
        let pe = &path / "patch_embedding";
        let fan_in = (c.in_channels * pt * ph * pw) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let ce = &path / "condition_embedder";
        WanTransformer3DModel {
            config: c.clone(),
            rope: RotaryEmbedding::new(c.rope_dims(), c.patch_size, c.rope_max_seq_len, 10000.0),
            patch_weight: param(
                &pe,
                "weight",
                &[dim, c.in_channels, pt, ph, pw],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                w,
            ),
            patch_bias: param(
                &pe,
                "bias",
                &[dim],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                w,
            ),
            time_1: lin(&ce / "time_embedder" / "linear_1", c.freq_dim, dim),
            time_2: lin(&ce / "time_embedder" / "linear_2", dim, dim),
            time_proj: lin(&ce / "time_proj", dim, 6 * dim),
            text_1: lin(&ce / "text_embedder" / "linear_1", c.text_dim, dim),
            text_2: lin(&ce / "text_embedder" / "linear_2", dim, dim),
            blocks: (0..c.num_layers)
                .map(|i| Block::build(&path / "blocks" / i, c, w))
                .collect(),
            proj_out: lin(&path / "proj_out", dim, c.out_channels() * pt * ph * pw),
            scale_shift_table: param(
                &path,
                "scale_shift_table",
                &[1, 2, dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / (dim as f64).sqrt(),
                },
                w,
            ),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The blocks, in order (`blocks.0`, `blocks.1`, ...).
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The sinusoidal timestep embedding (diffusers' `Timesteps` with `flip_sin_to_cos=True`,
    /// `downscale_freq_shift=0`): `[batch, freq_dim]` in float32, cos first.
    fn timesteps_proj(&self, t: &Tensor) -> Tensor {
        let half = self.config.freq_dim / 2;
        let exponent = Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()));
        let exponent = exponent / half;
        let emb = t.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
        let emb = emb * 1.0;
        Tensor::cat(&[emb.cos(), emb.sin()], -1)
    }

    /// Patch-embeds `latents` `[batch, in_channels, frames, height, width]` (frames, height and
    /// width multiples of the patch size), embeds `timestep` `[batch]` (0..1000) and projects
    /// the text embeddings `text` `[batch, text_tokens, text_dim]`. Inputs are converted to the
    /// model's type. Every shape is checked before any kernel runs: a batch of 0, batches that
    /// differ between the three inputs, another channel count, sizes that are not positive
    /// multiples of the patch, or no text token are [`Error::Input`].
    pub fn embed(&self, latents: &Tensor, timestep: &Tensor, text: &Tensor) -> Result<Embedded> {
        let c = &self.config;
        let size = latents.size();
        let bad = |reason: String| Err(Error::Input { reason });
        let [b, ch, f, h, w] = size[..] else {
            return bad(format!(
                "latents must be [batch, channels, frames, height, width], got {size:?}"
            ));
        };
        if b < 1 {
            return bad(format!(
                "latents {size:?} have a batch of {b}: the batch must be at least 1"
            ));
        }
        if ch != c.in_channels {
            return bad(format!(
                "latents have {ch} channels, the model takes {}",
                c.in_channels
            ));
        }
        let [pt, ph, pw] = c.patch_size;
        if f % pt != 0 || h % ph != 0 || w % pw != 0 || f < pt || h < ph || w < pw {
            return bad(format!(
                "latent frames x height x width {f} x {h} x {w} must be positive multiples of the patch {pt} x {ph} x {pw}"
            ));
        }
        let (gf, gh, gw) = (f / pt, h / ph, w / pw);
        if gf.max(gh).max(gw) > c.rope_max_seq_len {
            return bad(format!(
                "a {gf} x {gh} x {gw} patch grid exceeds rope_max_seq_len {}",
                c.rope_max_seq_len
            ));
        }
        if timestep.size() != [b] {
            return bad(format!("timestep must be [{b}], got {:?}", timestep.size()));
        }
        let ts = text.size();
        if ts.len() != 3 || ts[0] != b || ts[2] != c.text_dim {
            return bad(format!(
                "text embeddings must be [{b}, tokens, {}], got {ts:?}",
                c.text_dim
            ));
        }
        if ts[1] < 1 {
            return bad(format!(
                "text embeddings {ts:?} have no token: cross-attention needs at least one"
            ));
        }
        let kind = self.patch_weight.kind();
        let device = self.patch_weight.device();
        let rotary = self.rope.forward(f, h, w, device);
        let hidden = latents
            .to_kind(kind)
            .conv3d(
                &self.patch_weight,
                Some(&self.patch_bias),
                c.patch_size,
                0,
                1,
                1,
            )
            .flatten(2, -1)
            .transpose(1, 2)
            .contiguous();
        let text_kind = self.text_1.ws.kind();
        let text = text.to_kind(text_kind);
        let t = self
            .timesteps_proj(&timestep.to_device(device))
            .to_kind(self.time_1.ws.kind());
        let temb = self
            .time_2
            .forward(&self.time_1.forward(&t).silu())
            .to_kind(text_kind);
        let timestep_proj = self.time_proj.forward(&temb.silu()).unflatten(1, [6, -1]);
        let context = self
            .text_2
            .forward(&self.text_1.forward(&text).gelu("tanh"));
        Ok(Embedded {
            hidden,
            temb,
            timestep_proj,
            context,
            rotary,
            grid: [b, gf, gh, gw],
        })
    }

    /// Block `i` on `hidden` (the block loop's body; wrap it with the offload manager).
    pub fn block(&self, i: usize, hidden: &Tensor, e: &Embedded) -> Tensor {
        self.blocks[i].forward(hidden, &e.context, &e.timestep_proj, &e.rotary)
    }

    /// The output norm, modulated by the time embedding, the projection and unpatchify:
    /// `[batch, out_channels, frames, height, width]` in the model's type.
    pub fn head(&self, hidden: &Tensor, e: &Embedded) -> Tensor {
        let c = &self.config;
        let m = (&self.scale_shift_table + e.temb.unsqueeze(1)).chunk(2, 1);
        let (shift, scale) = (&m[0], &m[1]);
        let h = (hidden.to_kind(Kind::Float).layer_norm(
            [c.inner_dim()],
            None::<Tensor>,
            None::<Tensor>,
            c.eps,
            false,
        ) * (scale + 1.0)
            + shift)
            .to_kind(hidden.kind());
        let h = self.proj_out.forward(&h);
        let [b, f, gh, gw] = e.grid;
        let [pt, ph, pw] = c.patch_size;
        h.reshape([b, f, gh, gw, pt, ph, pw, -1])
            .permute([0, 7, 1, 4, 2, 5, 3, 6])
            .flatten(6, 7)
            .flatten(4, 5)
            .flatten(2, 3)
    }

    /// The whole forward with every block resident: the model's prediction (flow velocity)
    /// for `latents` at `timestep` given `text`.
    pub fn forward(&self, latents: &Tensor, timestep: &Tensor, text: &Tensor) -> Result<Tensor> {
        let e = self.embed(latents, timestep, text)?;
        let mut h = e.hidden.shallow_clone();
        for i in 0..self.blocks.len() {
            h = self.block(i, &h, &e);
        }
        Ok(self.head(&h, &e))
    }
}
