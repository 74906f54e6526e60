//! umT5's encoder as transformers defines it (`UMT5EncoderModel`, transformers 5.x), the text
//! encoder of `WanPipeline`: the same parameter names (`shared.weight`,
//! `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`, a
//! `relative_attention_bias.weight` in every block, `layer.0.layer_norm`,
//! `layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `layer.1.layer_norm`, `encoder.final_layer_norm`),
//! the same operations in the same order and precision: T5's RMS norm (variance in float32, no
//! mean, no bias), gated gelu_new, attention without scaling whose relative position bias and
//! padding mask are one additive mask (transformers' SDPA path). In float16, `wo` stays in
//! float32 (`_keep_in_fp32_modules`, which transformers 5 applies to float16 only; in bfloat16
//! every weight is bfloat16) and promotes the hidden state to float32 after the first block's
//! feed-forward, as in transformers.
//!
//! The forward is open, as the transformer's, so that a caller can stream each block (the
//! block list is `encoder.block`):
//!
//! ```
//! use tch::{nn, Device, Kind, Tensor};
//! use wan::umt5::{UMT5EncoderModel, Umt5Config};
//!
//! let config = Umt5Config::tiny();
//! let mut vs = nn::VarStore::new(Device::Cpu);
//! let model = UMT5EncoderModel::new(vs.root(), &config);
//! wan::umt5::set_kind(&mut vs, Kind::Float); // BFloat16 or Half on a GPU
//! let ids = Tensor::from_slice(&[5i64, 9, 1, 0, 0]).view([1, 5]);
//! let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0]).view([1, 5]);
//! let e = model.embed(&ids, &mask)?;
//! let mut h = e.hidden.shallow_clone();
//! for i in 0..model.blocks().len() {
//!     h = model.block(i, &h, &e); // e.g. inside the offload manager's `enter(i)`
//! }
//! let out = model.final_norm(&h);
//! assert!(out.equal(&model.forward(&ids, &mask)?));
//! // WanPipeline's post-processing: keep each prompt's tokens, zeros after them.
//! let embeds = wan::umt5::trim_and_pad(&out, &mask, 8, Kind::Float)?;
//! assert_eq!(embeds.size(), [1, 8, config.d_model]);
//! # Ok::<(), wan::Error>(())
//! ```

use crate::config::ConfigError;
use crate::error::{Error, Result};
use crate::load::{load_files, read_header};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor, nn};

/// transformers' single-file weights of a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// transformers' shard index of a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Modules transformers keeps in float32 when the model is loaded in float16
/// (`UMT5PreTrainedModel._keep_in_fp32_modules`; transformers 5 leaves them in bfloat16 when
/// the model is loaded in bfloat16).
pub const KEEP_IN_FP32_MODULES: [&str; 1] = ["wo"];
/// The embedding's name in a checkpoint that stores the tied copy (`encoder.embed_tokens`)
/// instead of, or beside, `shared.weight`.
const TIED_EMBEDDING: &str = "encoder.embed_tokens.weight";

/// `text_encoder/config.json` (transformers' `UMT5Config`), the keys the encoder uses. Missing
/// keys take `UMT5Config`'s defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Umt5Config {
    /// `model_type`: `umt5` (T5's `t5`, whose blocks share block 0's position bias, is refused).
    pub model_type: String,
    /// Vocabulary size (rows of `shared.weight`).
    pub vocab_size: i64,
    /// Hidden size.
    pub d_model: i64,
    /// Size of one attention head.
    pub d_kv: i64,
    /// Inner size of the feed-forward layer.
    pub d_ff: i64,
    /// Number of encoder blocks.
    pub num_layers: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Relative position buckets (half per direction in the encoder).
    pub relative_attention_num_buckets: i64,
    /// Distance from which all relative positions share a bucket.
    pub relative_attention_max_distance: i64,
    /// The RMS norms' epsilon.
    pub layer_norm_epsilon: f64,
    /// The feed-forward layer: only `gated-gelu` (umT5's) is supported.
    pub feed_forward_proj: String,
    /// `is_decoder`: must be false.
    pub is_decoder: bool,
}

impl Default for Umt5Config {
    fn default() -> Umt5Config {
        Umt5Config {
            model_type: "umt5".into(),
            vocab_size: 250112,
            d_model: 512,
            d_kv: 64,
            d_ff: 1024,
            num_layers: 8,
            num_heads: 6,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            is_decoder: false,
        }
    }
}

impl Umt5Config {
    /// umT5-XXL as Wan2.1 ships it (`text_encoder/config.json` of the Wan-AI diffusers
    /// repositories).
    pub fn umt5_xxl() -> Umt5Config {
        Umt5Config {
            vocab_size: 256384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            ..Umt5Config::default()
        }
    }

    /// A tiny configuration for tests and examples (the fixture's shape, vocabulary 160).
    pub fn tiny() -> Umt5Config {
        Umt5Config {
            vocab_size: 160,
            d_model: 32,
            d_kv: 8,
            d_ff: 64,
            num_layers: 2,
            num_heads: 4,
            ..Umt5Config::default()
        }
    }

    /// Parses and checks a `config.json` text.
    pub fn from_json(text: &str) -> std::result::Result<Umt5Config, ConfigError> {
        let c: Umt5Config = serde_json::from_str(text).map_err(ConfigError::Json)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and checks `path` (a `text_encoder/config.json`): [`Error::Io`] when it cannot be
    /// read, [`Error::Format`] when it is not JSON of the right types, [`Error::Config`] for
    /// values out of range or not supported.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Umt5Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Umt5Config::from_json(&text).map_err(|e| match e {
            ConfigError::Json(e) => Error::Format {
                path: path.to_owned(),
                reason: format!("not a UMT5Config: {e}"),
            },
            source => Error::Config {
                path: path.to_owned(),
                source,
            },
        })
    }

    /// Checks the values: sizes positive, a bucket layout the encoder can use, the supported
    /// variants only.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let unsupported = |field, reason: String| Err(ConfigError::Unsupported { field, reason });
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        if self.model_type != "umt5" {
            return unsupported(
                "model_type",
                format!(
                    "is {:?}: only umT5 (\"umt5\", one relative position bias per block) is supported",
                    self.model_type
                ),
            );
        }
        if self.feed_forward_proj != "gated-gelu" {
            return unsupported(
                "feed_forward_proj",
                format!(
                    "is {:?}: only \"gated-gelu\" (umT5's gelu_new gated feed-forward) is supported",
                    self.feed_forward_proj
                ),
            );
        }
        if self.is_decoder {
            return unsupported("is_decoder", "is true: this is the encoder".into());
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ] {
            if v < 1 {
                return invalid(field, format!("is {v}: must be at least 1"));
            }
        }
        // The encoder halves the buckets per direction and spends half of those on exact
        // distances: fewer than 4 leaves no exact bucket.
        let exact = self.relative_attention_num_buckets / 4;
        if exact < 1 {
            return invalid(
                "relative_attention_num_buckets",
                format!(
                    "is {}: must be at least 4",
                    self.relative_attention_num_buckets
                ),
            );
        }
        if self.relative_attention_max_distance <= exact {
            return invalid(
                "relative_attention_max_distance",
                format!(
                    "is {}: must exceed relative_attention_num_buckets / 4 = {exact}",
                    self.relative_attention_max_distance
                ),
            );
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return invalid(
                "layer_norm_epsilon",
                format!("is {}: must be positive", self.layer_norm_epsilon),
            );
        }
        Ok(())
    }

    /// `num_heads * d_kv`.
    pub fn inner_dim(&self) -> i64 {
        self.num_heads * self.d_kv
    }
}

/// Whether transformers keeps the parameter `name` in float32 when the model is loaded in
/// `kind`: a module of [`KEEP_IN_FP32_MODULES`] on its path and `kind` float16.
pub fn keeps_fp32(name: &str, kind: Kind) -> bool {
    kind == Kind::Half
        && name
            .split('.')
            .any(|part| KEEP_IN_FP32_MODULES.contains(&part))
}

/// Converts every parameter to `kind`, except those transformers keeps in float32 (`wo` in
/// float16), as `UMT5EncoderModel.from_pretrained(..., dtype=kind)` does.
pub fn set_kind(vs: &mut nn::VarStore, kind: Kind) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            let target = if keeps_fp32(&name, kind) {
                Kind::Float
            } else {
                kind
            };
            if v.kind() != target {
                let converted = v.to_kind(target);
                v.set_data(&converted);
            }
        }
    });
}

#[derive(Clone, Copy)]
enum Weights {
    Random,
    Empty(Kind),
}

fn param(p: &nn::Path, name: &str, dims: &[i64], init: nn::Init, w: Weights) -> Tensor {
    match w {
        Weights::Random => p.var(name, dims, init),
        Weights::Empty(kind) => {
            let kind = if keeps_fp32(&p.path(name), kind) {
                Kind::Float
            } else {
                kind
            };
            p.add(name, Tensor::empty(dims, (kind, p.device())), true)
        }
    }
}

/// A bias-free linear layer's weight `[out, in]`, drawn as `torch.nn.Linear` draws it.
fn linear(p: nn::Path, i: i64, o: i64, w: Weights) -> Tensor {
    let bound = 1.0 / (i as f64).sqrt();
    param(
        &p,
        "weight",
        &[o, i],
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
        w,
    )
}

/// T5's layer norm (`UMT5LayerNorm`): RMS only, variance in float32, the normalized state cast
/// to the weight's type when that is half or bfloat16.
#[derive(Debug)]
pub struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn build(p: nn::Path, dim: i64, eps: f64, w: Weights) -> T5LayerNorm {
        T5LayerNorm {
            weight: param(&p, "weight", &[dim], nn::Init::Const(1.0), w),
            eps,
        }
    }

    /// The norm of `h` `[..., d_model]`.
    pub fn forward(&self, h: &Tensor) -> Tensor {
        let variance = h.to_kind(Kind::Float).pow_tensor_scalar(2).mean_dim(
            Some([-1i64].as_slice()),
            true,
            None,
        );
        let mut h = h * (variance + self.eps).rsqrt();
        let kind = self.weight.kind();
        if matches!(kind, Kind::Half | Kind::BFloat16) {
            h = h.to_kind(kind);
        }
        &self.weight * h
    }
}

/// transformers' `gelu_new` (`NewGELUActivation`), operation for operation.
fn gelu_new(x: &Tensor) -> Tensor {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x + x.pow_tensor_scalar(3.0) * 0.044715) * c;
    (x * 0.5) * (inner.tanh() + 1.0)
}

fn lin(x: &Tensor, w: &Tensor) -> Tensor {
    x.linear::<&Tensor>(w, None)
}

/// One encoder block (`UMT5Block`): self-attention with its own relative position bias, then
/// the gated feed-forward, each behind a T5 layer norm and added to the residual.
#[derive(Debug)]
pub struct Umt5Block {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    relative_attention_bias: Tensor,
    norm_attn: T5LayerNorm,
    wi_0: Tensor,
    wi_1: Tensor,
    wo: Tensor,
    norm_ff: T5LayerNorm,
    heads: i64,
    d_kv: i64,
}

impl Umt5Block {
    fn build(p: nn::Path, c: &Umt5Config, w: Weights) -> Umt5Block {
        let attn = &p / "layer" / 0;
        let sa = &attn / "SelfAttention";
        let ff = &p / "layer" / 1;
        let dense = &ff / "DenseReluDense";
        let inner = c.inner_dim();
        Umt5Block {
            q: linear(&sa / "q", c.d_model, inner, w),
            k: linear(&sa / "k", c.d_model, inner, w),
            v: linear(&sa / "v", c.d_model, inner, w),
            o: linear(&sa / "o", inner, c.d_model, w),
            relative_attention_bias: param(
                &(&sa / "relative_attention_bias"),
                "weight",
                &[c.relative_attention_num_buckets, c.num_heads],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
                w,
            ),
            norm_attn: T5LayerNorm::build(&attn / "layer_norm", c.d_model, c.layer_norm_epsilon, w),
            wi_0: linear(&dense / "wi_0", c.d_model, c.d_ff, w),
            wi_1: linear(&dense / "wi_1", c.d_model, c.d_ff, w),
            wo: linear(&dense / "wo", c.d_ff, c.d_model, w),
            norm_ff: T5LayerNorm::build(&ff / "layer_norm", c.d_model, c.layer_norm_epsilon, w),
            heads: c.num_heads,
            d_kv: c.d_kv,
        }
    }

    /// This block's position bias `[1, heads, L, L]` for the bucket indices `[L, L]`
    /// (`UMT5Attention.compute_bias`).
    pub fn position_bias(&self, buckets: &Tensor) -> Tensor {
        Tensor::embedding(&self.relative_attention_bias, buckets, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }

    fn attention(&self, x: &Tensor, e: &TextEmbedded) -> Tensor {
        let (b, l) = (x.size()[0], x.size()[1]);
        let heads = |t: Tensor| t.view([b, -1, self.heads, self.d_kv]).transpose(1, 2);
        let q = heads(lin(x, &self.q));
        let k = heads(lin(x, &self.k));
        let v = heads(lin(x, &self.v));
        let bias = self.position_bias(&e.buckets);
        // transformers' create_position_bias_mask: the bias where a key may be attended to,
        // the lowest finite value of the types involved elsewhere.
        let min = lowest(k.kind()).max(lowest(bias.kind()));
        let mask = bias.where_scalarother(&e.key_mask, min).contiguous();
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(&mask),
            0.0,
            false,
            Some(1.0),
            false,
        );
        let out = out
            .transpose(1, 2)
            .contiguous()
            .reshape([b, l, -1])
            .contiguous();
        lin(&out, &self.o)
    }

    fn feed_forward(&self, x: &Tensor) -> Tensor {
        let gelu = gelu_new(&lin(x, &self.wi_0));
        let linear = lin(x, &self.wi_1);
        let mut h = gelu * linear;
        if h.kind() != self.wo.kind() {
            h = h.to_kind(self.wo.kind());
        }
        lin(&h, &self.wo)
    }

    /// The block applied to `hidden` `[batch, L, d_model]`.
    pub fn forward(&self, hidden: &Tensor, e: &TextEmbedded) -> Tensor {
        let h = hidden + self.attention(&self.norm_attn.forward(hidden), e);
        let h = clamp_half(h);
        let h = &h + self.feed_forward(&self.norm_ff.forward(&h));
        clamp_half(h)
    }
}

/// The lowest finite value of a floating type (`torch.finfo(kind).min`).
fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// transformers' float16 guard after each layer: clamp to the largest finite value (less 1000
/// where an infinity appeared).
fn clamp_half(h: Tensor) -> Tensor {
    if h.kind() != Kind::Half {
        return h;
    }
    let max = 65504.0;
    let clamp = if h.isinf().any().int64_value(&[]) != 0 {
        max - 1000.0
    } else {
        max
    };
    h.clamp(-clamp, clamp)
}

/// What [`UMT5EncoderModel::embed`] hands to the blocks.
#[derive(Debug)]
pub struct TextEmbedded {
    /// Token embeddings `[batch, L, d_model]` in the embedding's type.
    pub hidden: Tensor,
    /// Which keys may be attended to: `attention_mask != 0` as bool `[batch, 1, 1, L]`.
    pub key_mask: Tensor,
    /// Relative position buckets `[L, L]` (int64), the same for every block; each block looks
    /// its own bias up with them.
    pub buckets: Tensor,
}

/// `UMT5EncoderModel`: `shared` (the token embedding), `encoder.block`, `encoder.final_layer_norm`.
#[derive(Debug)]
pub struct UMT5EncoderModel {
    config: Umt5Config,
    shared: Tensor,
    blocks: Vec<Umt5Block>,
    final_layer_norm: T5LayerNorm,
}

impl UMT5EncoderModel {
    /// The model's parameters under `path`, drawn at random (norm scales 1, the rest as
    /// torch's defaults), in the VarStore's type. Call [`set_kind`] afterwards for
    /// transformers' mixed precision.
    pub fn new(path: nn::Path, config: &Umt5Config) -> UMT5EncoderModel {
        UMT5EncoderModel::build(path, config, Weights::Random)
    }

    /// The model's parameters under `path`, uninitialized, in `kind` and float32 where
    /// transformers keeps it ([`keeps_fp32`]): for loading a checkpoint into without holding the model twice.
    pub fn new_empty(path: nn::Path, config: &Umt5Config, kind: Kind) -> UMT5EncoderModel {
        UMT5EncoderModel::build(path, config, Weights::Empty(kind))
    }

    fn build(path: nn::Path, c: &Umt5Config, w: Weights) -> UMT5EncoderModel {
        let enc = &path / "encoder";
        UMT5EncoderModel {
            config: c.clone(),
            shared: param(
                &(&path / "shared"),
                "weight",
                &[c.vocab_size, c.d_model],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
                w,
            ),
            blocks: (0..c.num_layers)
                .map(|i| Umt5Block::build(&enc / "block" / i, c, w))
                .collect(),
            final_layer_norm: T5LayerNorm::build(
                &enc / "final_layer_norm",
                c.d_model,
                c.layer_norm_epsilon,
                w,
            ),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Umt5Config {
        &self.config
    }

    /// The blocks, in order (parameters under `encoder.block.{i}`).
    pub fn blocks(&self) -> &[Umt5Block] {
        &self.blocks
    }

    /// Checks `input_ids` and `attention_mask` (both `[batch, L]`, the ids int64 below the
    /// vocabulary size), moves them to the model's device, looks the tokens up and computes
    /// the key mask and the position buckets the blocks share.
    pub fn embed(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<TextEmbedded> {
        let bad = |reason: String| Err(Error::Input { reason });
        let size = input_ids.size();
        if size.len() != 2 || size[1] < 1 {
            return bad(format!("input_ids must be [batch, tokens], got {size:?}"));
        }
        if input_ids.kind() != Kind::Int64 {
            return bad(format!(
                "input_ids must be int64, got {:?}",
                input_ids.kind()
            ));
        }
        if attention_mask.size() != size {
            return bad(format!(
                "attention_mask is {:?}, input_ids {size:?}: they must match",
                attention_mask.size()
            ));
        }
        if input_ids.numel() > 0 {
            let (lo, hi) = (
                input_ids.min().int64_value(&[]),
                input_ids.max().int64_value(&[]),
            );
            if lo < 0 || hi >= self.config.vocab_size {
                return bad(format!(
                    "token ids span {lo}..={hi}: the vocabulary has {} (a tokenizer of another model?)",
                    self.config.vocab_size
                ));
            }
        }
        let device = self.shared.device();
        let ids = input_ids.to_device(device);
        let hidden = Tensor::embedding(&self.shared, &ids, -1, false, false);
        let key_mask = attention_mask
            .to_device(device)
            .ne(0)
            .view([size[0], 1, 1, size[1]]);
        let buckets = self.relative_position_buckets(size[1], device);
        Ok(TextEmbedded {
            hidden,
            key_mask,
            buckets,
        })
    }

    /// `UMT5Attention._relative_position_bucket` of the encoder (bidirectional) for a sequence
    /// of `len` tokens: `[len, len]`, int64, query positions along rows.
    pub fn relative_position_buckets(&self, len: i64, device: tch::Device) -> Tensor {
        let c = &self.config;
        let opts = (Kind::Int64, device);
        let context = Tensor::arange(len, opts).unsqueeze(1);
        let memory = Tensor::arange(len, opts).unsqueeze(0);
        let relative = memory - context;
        let buckets = c.relative_attention_num_buckets / 2;
        let mut out = relative.gt(0).to_kind(Kind::Int64) * buckets;
        let relative = relative.abs();
        let max_exact = buckets / 2;
        let is_small = relative.lt(max_exact);
        let ratio = (relative.to_kind(Kind::Float) / max_exact).log()
            / (c.relative_attention_max_distance as f64 / max_exact as f64).ln();
        let ratio = ratio * (buckets - max_exact);
        let large = ratio.to_kind(Kind::Int64) + max_exact;
        let large = large.minimum(&large.full_like(buckets - 1));
        out += relative.where_self(&is_small, &large);
        out
    }

    /// Block `i` applied to `hidden`.
    pub fn block(&self, i: usize, hidden: &Tensor, e: &TextEmbedded) -> Tensor {
        self.blocks[i].forward(hidden, e)
    }

    /// `encoder.final_layer_norm`: the last hidden state.
    pub fn final_norm(&self, hidden: &Tensor) -> Tensor {
        self.final_layer_norm.forward(hidden)
    }

    /// `UMT5EncoderModel(input_ids, attention_mask).last_hidden_state`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let e = self.embed(input_ids, attention_mask)?;
        let mut h = e.hidden.shallow_clone();
        for i in 0..self.blocks.len() {
            h = self.block(i, &h, &e);
        }
        Ok(self.final_norm(&h))
    }
}

/// `WanPipeline._get_t5_prompt_embeds`'s post-processing: each row of `hidden` `[batch, L, D]`
/// cut to its prompt's tokens (the number of non-zero entries of its `attention_mask` row),
/// padded with zeros to `max_sequence_length` rows, and cast to `kind` (the transformer's
/// type). [`Error::Input`] when the shapes disagree or a prompt is longer than
/// `max_sequence_length`.
pub fn trim_and_pad(
    hidden: &Tensor,
    attention_mask: &Tensor,
    max_sequence_length: usize,
    kind: Kind,
) -> Result<Tensor> {
    let size = hidden.size();
    let bad = |reason: String| Err(Error::Input { reason });
    if size.len() != 3 || attention_mask.size() != size[..2] {
        return bad(format!(
            "hidden {size:?} and attention_mask {:?} must be [batch, L, D] and [batch, L]",
            attention_mask.size()
        ));
    }
    let max = max_sequence_length as i64;
    let lens = attention_mask.gt(0).sum_dim_intlist(1, false, Kind::Int64);
    let lens: Vec<i64> =
        Vec::<i64>::try_from(&lens.to_device(tch::Device::Cpu)).map_err(|source| Error::Torch {
            context: "reading the prompt lengths".into(),
            source,
        })?;
    let rows = lens
        .iter()
        .enumerate()
        .map(|(b, &n)| {
            if n > max {
                return bad(format!(
                    "prompt {b} has {n} tokens, more than max_sequence_length {max}"
                ));
            }
            let u = hidden.get(b as i64).narrow(0, 0, n);
            let zeros = u.new_zeros([max - n, size[2]], (u.kind(), u.device()));
            Ok(Tensor::cat(&[u, zeros], 0))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0).to_kind(kind))
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// The safetensors files of a transformers model directory: the shards its
/// `model.safetensors.index.json` lists, or its `model.safetensors`, or `path` itself when it
/// is a file.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let index = path.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let parsed: Index = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: index.clone(),
            reason: format!("not a shard index: {e}"),
        })?;
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        if let Some(s) = shards
            .iter()
            .find(|s| Path::new(s.as_str()).components().count() != 1)
        {
            return Err(Error::Format {
                path: index,
                reason: format!("shard {s:?} is not a file name in the directory"),
            });
        }
        return Ok(shards.into_iter().map(|s| path.join(s)).collect());
    }
    let single = path.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Io {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is in the directory"),
        ),
    })
}

/// The model's name for a checkpoint key: the tied `encoder.embed_tokens.weight` is
/// `shared.weight` when the checkpoint has no `shared.weight`; `None` drops the key (the tied
/// copy beside `shared.weight`).
fn model_name(key: &str, has_shared: bool) -> Option<&str> {
    match key {
        TIED_EMBEDDING if has_shared => None,
        TIED_EMBEDDING => Some("shared.weight"),
        other => Some(other),
    }
}

/// Loads a transformers `UMT5EncoderModel` checkpoint (a `text_encoder/` directory or one
/// safetensors file) into the parameters in `vs`, converting each tensor to its parameter's
/// type. Every header is checked first: nothing is copied unless the names, shapes and types
/// all match ([`Error::Mismatch`] lists every difference).
pub fn load_checkpoint(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let files = checkpoint_files(path)?;
    let mut has_shared = false;
    for f in &files {
        has_shared |= read_header(f)?.contains_key("shared.weight");
    }
    load_files(
        vs,
        path,
        &files,
        |key| model_name(key, has_shared),
        |path, mismatch| Error::Mismatch { path, mismatch },
    )
}

/// Reads `dir/config.json`, builds the encoder under `vs`'s root (uninitialized), in `kind`
/// (with `wo` in float32 when `kind` is float16), and loads the directory's weights: transformers'
/// `UMT5EncoderModel.from_pretrained(dir, torch_dtype=kind)`.
pub fn from_pretrained(
    vs: &mut nn::VarStore,
    dir: impl AsRef<Path>,
    kind: Kind,
) -> Result<(Umt5Config, UMT5EncoderModel)> {
    let dir = dir.as_ref();
    let config = Umt5Config::from_file(dir.join("config.json"))?;
    let model = UMT5EncoderModel::new_empty(vs.root(), &config, kind);
    load_checkpoint(vs, dir)?;
    Ok((config, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umt5_xxl_is_wans_shipped_text_encoder_config() {
        // Wan-AI/Wan2.1-T2V-*-Diffusers text_encoder/config.json (google/umt5-xxl's).
        let text = r#"{"architectures":["UMT5EncoderModel"],"d_ff":10240,"d_kv":64,"d_model":4096,"dense_act_fn":"gelu_new","dropout_rate":0.1,"feed_forward_proj":"gated-gelu","is_gated_act":true,"layer_norm_epsilon":1e-06,"model_type":"umt5","num_heads":64,"num_layers":24,"relative_attention_max_distance":128,"relative_attention_num_buckets":32,"vocab_size":256384}"#;
        assert_eq!(Umt5Config::from_json(text).unwrap(), Umt5Config::umt5_xxl());
    }
}
