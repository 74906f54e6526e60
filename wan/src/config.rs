//! The model's configuration, read from a diffusers `config.json`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The hyperparameters of a `WanTransformer3DModel`, as diffusers writes them to the
/// transformer's `config.json` (unknown keys such as `_class_name` are ignored; absent keys take
/// diffusers' defaults, which are Wan2.1-14B's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Patch size (frames, height, width) of the Conv3d patch embedding.
    pub patch_size: [i64; 3],
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Channels per head; the model width is `num_attention_heads * attention_head_dim`.
    pub attention_head_dim: i64,
    /// Latent channels in.
    pub in_channels: i64,
    /// Latent channels out (`None`: `in_channels`).
    pub out_channels: Option<i64>,
    /// Width of the text embeddings (umT5-XXL: 4096).
    pub text_dim: i64,
    /// Width of the sinusoidal timestep embedding.
    pub freq_dim: i64,
    /// Inner width of the feed-forward network.
    pub ffn_dim: i64,
    /// Transformer blocks.
    pub num_layers: i64,
    /// Whether cross-attention's input is layer-normed (with a learned scale and shift).
    pub cross_attn_norm: bool,
    /// Query/key normalization. diffusers builds `norm_q`/`norm_k` (RMS norms over the full
    /// inner dimension) whatever this says; so does this crate.
    pub qk_norm: Option<String>,
    /// Epsilon of every norm.
    pub eps: f64,
    /// Image embedding width (I2V models only; must be `None` here).
    pub image_dim: Option<i64>,
    /// Added key/value projections' width (I2V models only; must be `None` here).
    pub added_kv_proj_dim: Option<i64>,
    /// Positions the rotary tables cover per axis (post-patch frames, height, width).
    pub rope_max_seq_len: i64,
    /// Image position embedding length (Wan2.1 FLF2V only; must be `None` here).
    pub pos_embed_seq_len: Option<i64>,
}

impl Default for Config {
    /// diffusers' defaults of `WanTransformer3DModel.__init__`.
    fn default() -> Config {
        Config {
            patch_size: [1, 2, 2],
            num_attention_heads: 40,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 13824,
            num_layers: 40,
            cross_attn_norm: true,
            qk_norm: Some("rms_norm_across_heads".into()),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }
}

impl Config {
    /// Wan2.1-T2V-1.3B (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`, `transformer/config.json`): 30
    /// blocks, 12 heads of 128 (width 1536), ffn 8960.
    pub fn wan2_1_t2v_1_3b() -> Config {
        Config {
            num_attention_heads: 12,
            ffn_dim: 8960,
            num_layers: 30,
            ..Config::default()
        }
    }

    /// Wan2.1-T2V-14B (`Wan-AI/Wan2.1-T2V-14B-Diffusers`, `transformer/config.json`): 40
    /// blocks, 40 heads of 128 (width 5120), ffn 13824.
    pub fn wan2_1_t2v_14b() -> Config {
        Config::default()
    }

    /// The `tiny` preset of offload-bench, the dit_layer_loop and checkpoint_load examples and
    /// `scripts/bench_peers.py`: 6 blocks, 4 heads of 64 (width 256), ffn 1024, text width 128,
    /// Wan2.1-T2V-1.3B's other values. Big enough to time on a CPU, small enough for tests
    /// (about 1 M parameters per block).
    pub fn small() -> Config {
        Config {
            num_layers: 6,
            num_attention_heads: 4,
            attention_head_dim: 64,
            ffn_dim: 1024,
            text_dim: 128,
            ..Config::wan2_1_t2v_1_3b()
        }
    }

    /// A small configuration for tests and CPU runs: 2 blocks, 2 heads of 16, ffn 64, 4
    /// channels, text width 32 (the parity fixture's, see `scripts/export_wan_fixture.py`).
    pub fn tiny() -> Config {
        Config {
            num_attention_heads: 2,
            attention_head_dim: 16,
            in_channels: 4,
            out_channels: Some(4),
            text_dim: 32,
            freq_dim: 32,
            ffn_dim: 64,
            num_layers: 2,
            rope_max_seq_len: 32,
            ..Config::default()
        }
    }

    /// Parses a diffusers `config.json` and checks it (see [`Config::validate`]).
    pub fn from_json(text: &str) -> std::result::Result<Config, ConfigError> {
        let c: Config = serde_json::from_str(text).map_err(ConfigError::Json)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and checks `path` (a transformer's `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        // A FIFO or device in place of the file is refused instead of waited on.
        let text = crate::load::read_regular_to_string(path)?;
        Config::from_json(&text).map_err(|source| Error::Config {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks that the sizes are positive and within [`Config::MAX_SIZES`] (far above every
    /// released Wan model's), that the model width and the model's size in float32 stay within
    /// [`Config::MAX_INNER_DIM`] and [`Config::MAX_PARAMETER_BYTES`], that the head dimension
    /// splits into the three rotary axes, and that the model is text-to-video (no image
    /// conditioning). A config that passes builds without overflow in any size the model
    /// computes from it.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let sizes = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels()),
            ("text_dim", self.text_dim),
            ("freq_dim", self.freq_dim),
            ("ffn_dim", self.ffn_dim),
            ("num_layers", self.num_layers),
            ("rope_max_seq_len", self.rope_max_seq_len),
            ("patch_size[0]", self.patch_size[0]),
            ("patch_size[1]", self.patch_size[1]),
            ("patch_size[2]", self.patch_size[2]),
        ];
        for (field, value) in sizes {
            if value <= 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!("is {value}, must be positive"),
                });
            }
            let max = Config::max_size(field);
            if value > max {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!(
                        "is {value}, must be at most {max} (no Wan model comes near; is the config.json right?)"
                    ),
                });
            }
        }
        // Each factor is at most 1024 (checked above): no overflow.
        let inner = self.num_attention_heads * self.attention_head_dim;
        if inner > Config::MAX_INNER_DIM {
            return Err(ConfigError::Invalid {
                field: "num_attention_heads * attention_head_dim",
                reason: format!(
                    "is {inner} (the model width), must be at most {}",
                    Config::MAX_INNER_DIM
                ),
            });
        }
        let params = self.num_parameters();
        let bytes = params.and_then(|n| n.checked_mul(4));
        if bytes.is_none_or(|b| b > Config::MAX_PARAMETER_BYTES) {
            let big = || "more than 2^64".to_owned();
            return Err(ConfigError::Invalid {
                field: "parameters",
                reason: format!(
                    "would take {} bytes in float32 ({} parameters), must be at most {} bytes (1 TiB): check num_layers, ffn_dim, num_attention_heads, attention_head_dim, in_channels and patch_size",
                    bytes.map_or_else(big, |b| b.to_string()),
                    params.map_or_else(big, |n| n.to_string()),
                    Config::MAX_PARAMETER_BYTES
                ),
            });
        }
        if self.freq_dim % 2 != 0 {
            return Err(ConfigError::Invalid {
                field: "freq_dim",
                reason: format!("is {}, must be even", self.freq_dim),
            });
        }
        let [t, h, w] = self.rope_dims();
        if t <= 0 || t % 2 != 0 || h <= 0 {
            return Err(ConfigError::Invalid {
                field: "attention_head_dim",
                reason: format!(
                    "is {}: the rotary axes (frames {t}, height {h}, width {w}) must be even and positive",
                    self.attention_head_dim
                ),
            });
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(ConfigError::Invalid {
                field: "eps",
                reason: format!("is {}, must be positive", self.eps),
            });
        }
        for (field, value) in [
            ("image_dim", self.image_dim),
            ("added_kv_proj_dim", self.added_kv_proj_dim),
            ("pos_embed_seq_len", self.pos_embed_seq_len),
        ] {
            if let Some(v) = value {
                return Err(ConfigError::Unsupported {
                    field,
                    reason: format!(
                        "is {v}: image conditioning (I2V, FLF2V) is not implemented, only text-to-video"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The largest value each size key may have: far above every released Wan2.1 and Wan2.2
    /// model (Wan2.1-14B: 40 heads of 128, ffn 13824, 40 layers, 16 channels, text 4096, patch
    /// 1x2x2, rope 1024; Wan2.2 TI2V-5B: 48 channels), low enough that nothing the model
    /// computes from them overflows.
    pub const MAX_SIZES: [(&'static str, i64); 10] = [
        ("num_attention_heads", 1024),
        ("attention_head_dim", 1024),
        ("in_channels", 4096),
        ("out_channels", 4096),
        ("text_dim", 65536),
        ("freq_dim", 65536),
        ("ffn_dim", 1 << 20),
        ("num_layers", 1024),
        ("rope_max_seq_len", 65536),
        ("patch_size", 64),
    ];
    /// The largest model width, `num_attention_heads * attention_head_dim` (Wan2.1-14B: 5120).
    pub const MAX_INNER_DIM: i64 = 65536;
    /// The largest model size in float32 bytes, 1 TiB (Wan2.1-14B: 57 GB).
    pub const MAX_PARAMETER_BYTES: u64 = 1 << 40;

    /// The bound of `field` in [`Config::MAX_SIZES`] (`patch_size[i]` is `patch_size`'s).
    fn max_size(field: &str) -> i64 {
        let key = field.split('[').next().unwrap_or(field);
        Config::MAX_SIZES
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(i64::MAX, |&(_, v)| v)
    }

    /// The model's number of parameters (every weight, bias, norm scale and modulation table
    /// that [`WanTransformer3DModel`](crate::WanTransformer3DModel) builds), or `None` if it
    /// does not fit a `u64` or a size is negative.
    pub fn num_parameters(&self) -> Option<u64> {
        let u = |v: i64| u64::try_from(v).ok();
        let dim = u(self.num_attention_heads)?.checked_mul(u(self.attention_head_dim)?)?;
        let [pt, ph, pw] = self.patch_size;
        let patch = u(pt)?.checked_mul(u(ph)?)?.checked_mul(u(pw)?)?;
        let linear = |i: u64, o: u64| i.checked_mul(o)?.checked_add(o);
        let add = |xs: &[Option<u64>]| xs.iter().try_fold(0u64, |acc, x| acc.checked_add((*x)?));
        let ffn = u(self.ffn_dim)?;
        let attention = add(&[linear(dim, dim)?.checked_mul(4), dim.checked_mul(2)])?;
        let norm2 = if self.cross_attn_norm {
            dim.checked_mul(2)?
        } else {
            0
        };
        let block = add(&[
            attention.checked_mul(2),
            Some(norm2),
            linear(dim, ffn),
            linear(ffn, dim),
            dim.checked_mul(6),
        ])?;
        add(&[
            linear(u(self.in_channels)?.checked_mul(patch)?, dim),
            linear(u(self.freq_dim)?, dim),
            linear(dim, dim),
            linear(dim, dim.checked_mul(6)?),
            linear(u(self.text_dim)?, dim),
            linear(dim, dim),
            block.checked_mul(u(self.num_layers)?),
            linear(dim, u(self.out_channels())?.checked_mul(patch)?),
            dim.checked_mul(2),
        ])
    }

    /// The model width, `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Latent channels out.
    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The rotary dimensions of the frame, height and width axes (diffusers'
    /// `WanRotaryPosEmbed`: height and width get `2 * (head_dim / 6)` each, frames the rest).
    pub fn rope_dims(&self) -> [i64; 3] {
        let hw = 2 * (self.attention_head_dim / 6);
        [self.attention_head_dim - 2 * hw, hw, hw]
    }
}

/// A `config.json` that does not parse or describes a model this crate does not build.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, or a field of the wrong type.
    #[error("not a WanTransformer3DModel config")]
    Json(#[source] serde_json::Error),
    /// A value out of range.
    #[error("{field} {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A feature of the diffusers model that this crate does not implement.
    #[error("{field} {reason}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diffusers_config_parses_with_unknown_keys() {
        let c = Config::from_json(
            r#"{"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
               "added_kv_proj_dim": null, "attention_head_dim": 128, "cross_attn_norm": true,
               "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": null,
               "in_channels": 16, "num_attention_heads": 12, "num_layers": 30,
               "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
               "rope_max_seq_len": 1024, "text_dim": 4096}"#,
        )
        .unwrap();
        assert_eq!(c, Config::wan2_1_t2v_1_3b());
        assert_eq!(c.inner_dim(), 1536);
        assert_eq!(c.rope_dims(), [44, 42, 42]);
    }

    #[test]
    fn image_conditioning_and_bad_sizes_are_refused_by_name() {
        let e = Config::from_json(r#"{"image_dim": 1280}"#).unwrap_err();
        assert!(e.to_string().starts_with("image_dim is 1280"), "{e}");
        let e = Config::from_json(r#"{"num_layers": 0}"#).unwrap_err();
        assert_eq!(e.to_string(), "num_layers is 0, must be positive");
        let e = Config::from_json(r#"{"patch_size": [1, 2]}"#).unwrap_err();
        assert!(matches!(e, ConfigError::Json(_)), "{e}");
    }

    /// Each size far beyond any Wan model, alone: refused naming the key and its bound.
    #[test]
    fn huge_sizes_are_refused_naming_the_key_and_the_bound() {
        for (key, json) in [
            (
                "num_attention_heads",
                r#"{"num_attention_heads": 1000000000000}"#,
            ),
            (
                "attention_head_dim",
                r#"{"attention_head_dim": 1099511627776}"#,
            ),
            ("patch_size[1]", r#"{"patch_size": [1, 1099511627776, 2]}"#),
            (
                "patch_size[0]",
                r#"{"patch_size": [9223372036854775807, 2, 2]}"#,
            ),
            ("ffn_dim", r#"{"ffn_dim": 1125899906842624}"#),
            ("rope_max_seq_len", r#"{"rope_max_seq_len": 1099511627776}"#),
            ("num_layers", r#"{"num_layers": 1000000000}"#),
            ("in_channels", r#"{"in_channels": 1000000000}"#),
            ("out_channels", r#"{"out_channels": 1000000000}"#),
            ("text_dim", r#"{"text_dim": 1000000000}"#),
            ("freq_dim", r#"{"freq_dim": 1000000000}"#),
        ] {
            let e = Config::from_json(json).expect_err(json);
            let text = e.to_string();
            assert!(
                matches!(&e, ConfigError::Invalid { field, .. } if *field == key),
                "{json}: the error must name {key}: {text}"
            );
            assert!(
                text.contains("at most"),
                "{json}: the bound must be named: {text}"
            );
        }
    }

    /// Sizes each within its bound whose products are not: the model width, then the model's
    /// size in bytes.
    #[test]
    fn products_of_sizes_are_checked() {
        let e = Config::from_json(r#"{"num_attention_heads": 1000, "attention_head_dim": 1000}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("num_attention_heads * attention_head_dim is 1000000"),
            "{e}"
        );
        let e = Config::from_json(
            r#"{"num_attention_heads": 512, "attention_head_dim": 128, "ffn_dim": 500000, "num_layers": 1000}"#,
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Invalid {
                    field: "parameters",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("bytes"), "{e}");
        // Every released Wan2.1/2.2 text-to-video transformer passes.
        Config::wan2_1_t2v_14b().validate().unwrap();
        Config::wan2_1_t2v_1_3b().validate().unwrap();
        let ti2v_5b = Config {
            num_attention_heads: 24,
            in_channels: 48,
            out_channels: Some(48),
            ffn_dim: 14336,
            num_layers: 30,
            ..Config::default()
        };
        ti2v_5b.validate().unwrap();
    }

    /// A crafted config.json on disk: the error names the file and the key.
    #[test]
    fn a_crafted_config_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("wan-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, r#"{"attention_head_dim": 4611686018427387904}"#).unwrap();
        let e = Config::from_file(&path).unwrap_err();
        // The file in the message, the key in its source (the ConfigError), each once.
        assert!(e.to_string().contains("config.json"), "{e:?}");
        let source = std::error::Error::source(&e).expect("the ConfigError is the source");
        assert!(source.is::<ConfigError>(), "{e:?}");
        assert!(source.to_string().contains("attention_head_dim"), "{e:?}");
        assert_eq!(
            format!("{e:?}").matches("attention_head_dim").count(),
            1,
            "{e:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
