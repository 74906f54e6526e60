//! One transformer block (diffusers' `WanTransformerBlock`) and its attention (`WanAttention`
//! with `WanAttnProcessor`).

use crate::config::Config;
use crate::model::{Weights, linear, param};
use crate::rope::Rotary;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

fn layer_norm(x: &Tensor, dim: i64, eps: f64) -> Tensor {
    x.layer_norm([dim], None::<Tensor>, None::<Tensor>, eps, false)
}

/// Self- or cross-attention: `to_q`, `to_k`, `to_v`, `to_out.0`, and RMS norms of the query and
/// key over the full inner dimension (across heads), `norm_q` and `norm_k`.
#[derive(Debug)]
pub struct Attention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    heads: i64,
    inner: i64,
    eps: f64,
}

impl Attention {
    /// The attention's parameters under `p`, drawn at random.
    pub fn new(p: nn::Path, c: &Config) -> Attention {
        Attention::build(p, c, Weights::Random)
    }

    pub(crate) fn build(p: nn::Path, c: &Config, w: Weights) -> Attention {
        let dim = c.inner_dim();
        let lin = |name: &str| linear(&p / name, dim, dim, w);
        Attention {
            to_q: lin("to_q"),
            to_k: lin("to_k"),
            to_v: lin("to_v"),
            to_out: linear(&p / "to_out" / 0, dim, dim, w),
            norm_q: param(&(&p / "norm_q"), "weight", &[dim], nn::Init::Const(1.0), w),
            norm_k: param(&(&p / "norm_k"), "weight", &[dim], nn::Init::Const(1.0), w),
            heads: c.num_attention_heads,
            inner: dim,
            eps: c.eps,
        }
    }

    /// Attention of `x` `[batch, tokens, dim]` to `ctx` (itself when `None`), with the rotary
    /// embedding applied to the query and key when given.
    pub fn forward(&self, x: &Tensor, ctx: Option<&Tensor>, rotary: Option<&Rotary>) -> Tensor {
        let ctx = ctx.unwrap_or(x);
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(ctx);
        let v = self.to_v.forward(ctx);
        let q = q.rms_norm([self.inner], Some(&self.norm_q), self.eps);
        let k = k.rms_norm([self.inner], Some(&self.norm_k), self.eps);
        let heads = |t: Tensor| t.unflatten(2, [self.heads, -1]);
        let (mut q, mut k, v) = (heads(q), heads(k), heads(v));
        if let Some(r) = rotary {
            q = r.apply(&q);
            k = r.apply(&k);
        }
        let kind = q.kind();
        let perm = |t: &Tensor| t.permute([0, 2, 1, 3]);
        let out = Tensor::scaled_dot_product_attention(
            &perm(&q),
            &perm(&k),
            &perm(&v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let out = out.permute([0, 2, 1, 3]).flatten(2, 3).to_kind(kind);
        self.to_out.forward(&out)
    }
}

/// A transformer block: adaLN-modulated self-attention with the rotary embedding,
/// cross-attention to the text (after `norm2`, a float32 layer norm with a learned scale and
/// shift when `cross_attn_norm`), and a gelu-tanh feed-forward network (`ffn.net.0.proj`,
/// `ffn.net.2`). `scale_shift_table` `[1, 6, dim]` and `norm2` are float32 whatever the model's
/// type, and the modulation is computed in float32, as in diffusers.
#[derive(Debug)]
pub struct Block {
    attn1: Attention,
    attn2: Attention,
    norm2: Option<(Tensor, Tensor)>,
    ffn_in: nn::Linear,
    ffn_out: nn::Linear,
    scale_shift_table: Tensor,
    dim: i64,
    eps: f64,
}

impl Block {
    /// The block's parameters under `p` (`blocks.<i>`), drawn at random.
    pub fn new(p: nn::Path, c: &Config) -> Block {
        Block::build(p, c, Weights::Random)
    }

    pub(crate) fn build(p: nn::Path, c: &Config, w: Weights) -> Block {
        let dim = c.inner_dim();
        let norm2 = c.cross_attn_norm.then(|| {
            let n = &p / "norm2";
            (
                param(&n, "weight", &[dim], nn::Init::Const(1.0), w),
                param(&n, "bias", &[dim], nn::Init::Const(0.0), w),
            )
        });
        Block {
            attn1: Attention::build(&p / "attn1", c, w),
            attn2: Attention::build(&p / "attn2", c, w),
            norm2,
            ffn_in: linear(&p / "ffn" / "net" / 0 / "proj", dim, c.ffn_dim, w),
            ffn_out: linear(&p / "ffn" / "net" / 2, c.ffn_dim, dim, w),
            scale_shift_table: param(
                &p,
                "scale_shift_table",
                &[1, 6, dim],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0 / (dim as f64).sqrt(),
                },
                w,
            ),
            dim,
            eps: c.eps,
        }
    }

    /// The block on `x` `[batch, tokens, dim]`, with the text `ctx` `[batch, text_tokens, dim]`,
    /// the timestep projection `timestep_proj` `[batch, 6, dim]` and the rotary tables.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        timestep_proj: &Tensor,
        rotary: &Rotary,
    ) -> Tensor {
        let kind = x.kind();
        let m = (&self.scale_shift_table + timestep_proj.to_kind(Kind::Float)).chunk(6, 1);
        let (shift, scale, gate) = (&m[0], &m[1], &m[2]);
        let (c_shift, c_scale, c_gate) = (&m[3], &m[4], &m[5]);

        // 1. Self-attention. (`x` in float32 is made once, for the norm and the residual.)
        let x32 = x.to_kind(Kind::Float);
        let h = (layer_norm(&x32, self.dim, self.eps) * (scale + 1.0) + shift).to_kind(kind);
        let a = self.attn1.forward(&h, None, Some(rotary));
        let x = (x32 + a * gate).to_kind(kind);

        // 2. Cross-attention.
        let h = match &self.norm2 {
            Some((w, b)) => x
                .to_kind(Kind::Float)
                .layer_norm(
                    [self.dim],
                    Some(w.to_kind(Kind::Float)),
                    Some(b.to_kind(Kind::Float)),
                    self.eps,
                    false,
                )
                .to_kind(kind),
            None => x.to_kind(Kind::Float).to_kind(kind),
        };
        let a = self.attn2.forward(&h, Some(ctx), None);
        let x = &x + a;

        // 3. Feed-forward.
        let x32 = x.to_kind(Kind::Float);
        let h = (layer_norm(&x32, self.dim, self.eps) * (c_scale + 1.0) + c_shift).to_kind(kind);
        let y = self.ffn_out.forward(&self.ffn_in.forward(&h).gelu("tanh"));
        (x32 + y.to_kind(Kind::Float) * c_gate).to_kind(kind)
    }
}
