//! The VAE's configuration, read from a diffusers `vae/config.json` (`AutoencoderKLWan`).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The largest channel count (of any level, the latent or the output) a configuration may ask
/// for: Wan2.1's widest decoder level has 384 channels, Wan2.2's 1024.
pub const MAX_CHANNELS: i64 = 1 << 16;
/// The most resolution levels (`dim_mult` entries): each but the last doubles height and width,
/// so 8 levels already upsample 128 times.
pub const MAX_LEVELS: usize = 8;
/// The most residual blocks per level (`num_res_blocks`; Wan uses 2).
pub const MAX_RES_BLOCKS: i64 = 64;

/// The hyperparameters of diffusers' `AutoencoderKLWan`, as diffusers writes them to
/// `vae/config.json` (unknown keys such as `_class_name` are ignored; absent keys take
/// diffusers' defaults, which are Wan2.1's VAE).
///
/// Only the decoder is built from it: `in_channels` and `attn_scales` are kept for
/// completeness but do not shape the decoder (diffusers' `WanDecoder3d` has no attention outside
/// its mid block whatever `attn_scales` says). Wan2.2's residual VAE (`is_residual: true`,
/// `patch_size: 2`, TI2V-5B) is refused by [`VaeConfig::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Base channel count of the encoder (and of the decoder unless `decoder_base_dim`).
    pub base_dim: i64,
    /// Base channel count of the decoder (`None`: `base_dim`).
    pub decoder_base_dim: Option<i64>,
    /// Latent channels.
    pub z_dim: i64,
    /// Channel multipliers per resolution level, from the finest (the video's) to the coarsest.
    pub dim_mult: Vec<i64>,
    /// Residual blocks per encoder level; each decoder level has one more.
    pub num_res_blocks: i64,
    /// Levels with attention in the encoder (unused by the decoder).
    pub attn_scales: Vec<f64>,
    /// Whether each encoder downsampling (one per level but the last) also halves time; the
    /// decoder upsamples time where the reversed list says so.
    pub temperal_downsample: Vec<bool>,
    /// Dropout rate (inference: no effect).
    pub dropout: f64,
    /// Per-channel mean of the latents, `z_dim` values (see [`crate::WanVae::denormalize`]).
    pub latents_mean: Vec<f64>,
    /// Per-channel standard deviation of the latents, `z_dim` values.
    pub latents_std: Vec<f64>,
    /// Wan2.2's residual up and down blocks (not implemented: must be false).
    pub is_residual: bool,
    /// Video channels into the encoder (unused by the decoder).
    pub in_channels: i64,
    /// Video channels out of the decoder.
    pub out_channels: i64,
    /// Wan2.2's spatial patching of the video (not implemented: must be absent or 1).
    pub patch_size: Option<i64>,
    /// Frames per latent frame that pipelines assume (`WanPipeline`'s `vae_scale_factor_temporal`).
    pub scale_factor_temporal: Option<i64>,
    /// Pixels per latent pixel that pipelines assume (`vae_scale_factor_spatial`).
    pub scale_factor_spatial: Option<i64>,
}

/// Wan2.1's `latents_mean` (diffusers' default).
const WAN2_1_MEAN: [f64; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
/// Wan2.1's `latents_std` (diffusers' default).
const WAN2_1_STD: [f64; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

impl Default for VaeConfig {
    /// diffusers' defaults of `AutoencoderKLWan.__init__`: Wan2.1's VAE.
    fn default() -> VaeConfig {
        VaeConfig {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            latents_mean: WAN2_1_MEAN.to_vec(),
            latents_std: WAN2_1_STD.to_vec(),
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
        }
    }
}

impl VaeConfig {
    /// Wan2.1's VAE (`Wan-AI/Wan2.1-T2V-*-Diffusers`, `vae/config.json`), used by every Wan2.1
    /// pipeline and by Wan2.2 A14B: base 96, `dim_mult` [1, 2, 4, 4], 2 residual blocks, 16
    /// latent channels, 4x in time and 8x in space.
    pub fn wan2_1() -> VaeConfig {
        VaeConfig::default()
    }

    /// The small VAE of the parity fixture (`scripts/export_wan_vae_fixture.py`): base 8, 4
    /// latent channels, `dim_mult` [1, 2, 2, 2], 1 residual block.
    pub fn tiny() -> VaeConfig {
        VaeConfig {
            base_dim: 8,
            z_dim: 4,
            dim_mult: vec![1, 2, 2, 2],
            num_res_blocks: 1,
            latents_mean: vec![-0.7571, 0.2503, 1.5508, -0.2921],
            latents_std: vec![2.8184, 1.4541, 0.6382, 1.9160],
            ..VaeConfig::default()
        }
    }

    /// Parses a diffusers `vae/config.json` and checks it (see [`VaeConfig::validate`]).
    pub fn from_json(text: &str) -> std::result::Result<VaeConfig, VaeConfigError> {
        let c: VaeConfig = serde_json::from_str(text).map_err(VaeConfigError::Json)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and checks `path` (a VAE's `config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<VaeConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        VaeConfig::from_json(&text).map_err(|source| Error::VaeConfig {
            path: Some(path.to_owned()),
            source,
        })
    }

    /// Checks that every size is in range (so that no absurd value reaches an allocation), that
    /// the per-level lists agree in length, that `latents_mean`/`latents_std` have `z_dim`
    /// finite values (the deviations non-zero), and that the configuration is Wan2.1's kind of
    /// VAE (not Wan2.2's residual one).
    pub fn validate(&self) -> std::result::Result<(), VaeConfigError> {
        let invalid =
            |field: &'static str, reason: String| VaeConfigError::Invalid { field, reason };
        if self.is_residual {
            return Err(VaeConfigError::Unsupported {
                field: "is_residual",
                reason: "is true: Wan2.2's residual VAE (DupUp3D shortcuts) is not implemented, only Wan2.1's".into(),
            });
        }
        if let Some(p) = self.patch_size
            && p != 1
        {
            return Err(VaeConfigError::Unsupported {
                field: "patch_size",
                reason: format!(
                    "is {p}: Wan2.2's patched VAE is not implemented (absent or 1 only)"
                ),
            });
        }
        let channels = [
            ("base_dim", self.base_dim),
            ("decoder_base_dim", self.decoder_base_dim()),
            ("z_dim", self.z_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ];
        for (field, v) in channels {
            if !(1..=MAX_CHANNELS).contains(&v) {
                return Err(invalid(
                    field,
                    format!("is {v}, must be in 1..={MAX_CHANNELS}"),
                ));
            }
        }
        let levels = self.dim_mult.len();
        if !(1..=MAX_LEVELS).contains(&levels) {
            return Err(invalid(
                "dim_mult",
                format!("has {levels} levels, must have 1..={MAX_LEVELS}"),
            ));
        }
        for &m in &self.dim_mult {
            let dim = self.decoder_base_dim().checked_mul(m);
            if m < 1 || dim.is_none_or(|d| d > MAX_CHANNELS) {
                return Err(invalid(
                    "dim_mult",
                    format!(
                        "{:?} times decoder base {} must give 1..={MAX_CHANNELS} channels per level",
                        self.dim_mult,
                        self.decoder_base_dim()
                    ),
                ));
            }
        }
        // Every level but the coarsest upsamples to half its channels: that half must exist.
        for &m in &self.dim_mult[..levels - 1] {
            if self.decoder_base_dim() * m < 2 {
                return Err(invalid(
                    "dim_mult",
                    format!(
                        "{:?} times decoder base {}: an upsampling level has fewer than 2 channels to halve",
                        self.dim_mult,
                        self.decoder_base_dim()
                    ),
                ));
            }
        }
        if !(0..=MAX_RES_BLOCKS).contains(&self.num_res_blocks) {
            return Err(invalid(
                "num_res_blocks",
                format!(
                    "is {}, must be in 0..={MAX_RES_BLOCKS}",
                    self.num_res_blocks
                ),
            ));
        }
        if self.temperal_downsample.len() + 1 != levels {
            return Err(invalid(
                "temperal_downsample",
                format!(
                    "has {} entries, must have one per level but the last ({})",
                    self.temperal_downsample.len(),
                    levels - 1
                ),
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(invalid(
                "dropout",
                format!("is {}, must be in [0, 1)", self.dropout),
            ));
        }
        for (field, values) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if values.len() as i64 != self.z_dim {
                return Err(invalid(
                    field,
                    format!(
                        "has {} values, must have z_dim = {}",
                        values.len(),
                        self.z_dim
                    ),
                ));
            }
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(invalid(field, format!("holds {v}, must be finite")));
            }
        }
        if self.latents_std.iter().any(|&s| s as f32 == 0.0) {
            return Err(invalid(
                "latents_std",
                "holds 0: the latents are multiplied by it (divided by 1/std)".into(),
            ));
        }
        for (field, v) in [
            ("scale_factor_temporal", self.scale_factor_temporal),
            ("scale_factor_spatial", self.scale_factor_spatial),
        ] {
            if let Some(v) = v
                && v < 1
            {
                return Err(invalid(field, format!("is {v}, must be positive")));
            }
        }
        Ok(())
    }

    /// The decoder's base channel count: `decoder_base_dim`, else `base_dim`.
    pub fn decoder_base_dim(&self) -> i64 {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// Whether each decoder up block but the last doubles time: `temperal_downsample` reversed
    /// (diffusers' `temperal_upsample`).
    pub fn temporal_upsample(&self) -> Vec<bool> {
        self.temperal_downsample.iter().rev().copied().collect()
    }

    /// Output pixels per latent pixel along height and width: `2^(levels - 1)` (8 for Wan2.1).
    pub fn spatial_factor(&self) -> i64 {
        1 << (self.dim_mult.len().max(1) - 1)
    }

    /// Output frames per latent frame after the first: 2 to the number of temporal upsamplings
    /// (4 for Wan2.1). `T` latent frames decode to `1 + temporal_factor() * (T - 1)` frames.
    pub fn temporal_factor(&self) -> i64 {
        1 << self.temperal_downsample.iter().filter(|&&t| t).count()
    }
}

/// A `vae/config.json` that does not parse or describes a VAE this crate does not build.
#[derive(Debug, thiserror::Error)]
pub enum VaeConfigError {
    /// Not JSON, or a field of the wrong type.
    #[error("not an AutoencoderKLWan config")]
    Json(#[source] serde_json::Error),
    /// A value out of range.
    #[error("{field} {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A feature of diffusers' `AutoencoderKLWan` that this crate does not implement.
    #[error("{field} {reason}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl VaeConfigError {
    /// The offending key, where there is one (`None` for JSON that does not parse).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            VaeConfigError::Json(_) => None,
            VaeConfigError::Invalid { field, .. } | VaeConfigError::Unsupported { field, .. } => {
                Some(field)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan2_1_config_parses_with_unknown_keys() {
        // Wan-AI/Wan2.1-T2V-1.3B-Diffusers' vae/config.json (no Wan2.2 keys).
        let c = VaeConfig::from_json(
            r#"{"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0",
               "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4], "dropout": 0.0,
               "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517,
                 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
               "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
               "num_res_blocks": 2, "temperal_downsample": [false, true, true], "z_dim": 16}"#,
        )
        .unwrap();
        assert_eq!(c, VaeConfig::wan2_1());
        assert_eq!((c.spatial_factor(), c.temporal_factor()), (8, 4));
        assert_eq!(c.temporal_upsample(), [true, true, false]);
    }

    #[test]
    fn refusals_name_the_key() {
        let field = |json: &str| VaeConfig::from_json(json).unwrap_err().field();
        assert_eq!(field(r#"{"is_residual": true}"#), Some("is_residual"));
        assert_eq!(field(r#"{"patch_size": 2}"#), Some("patch_size"));
        assert_eq!(field(r#"{"base_dim": 0}"#), Some("base_dim"));
        assert_eq!(field(r#"{"z_dim": 4}"#), Some("latents_mean"));
        assert_eq!(field(r#"{"dim_mult": []}"#), Some("dim_mult"));
        assert_eq!(
            field(r#"{"dim_mult": [1, 2, 4, 9223372036854775807]}"#),
            Some("dim_mult")
        );
        assert_eq!(
            field(r#"{"base_dim": 1, "dim_mult": [1, 1, 1, 1]}"#),
            Some("dim_mult")
        );
        assert_eq!(
            field(r#"{"num_res_blocks": 100000}"#),
            Some("num_res_blocks")
        );
        assert_eq!(
            field(r#"{"temperal_downsample": [true]}"#),
            Some("temperal_downsample")
        );
        assert_eq!(field(r#"{"dropout": 1.5}"#), Some("dropout"));
        assert!(VaeConfig::from_json(r#"{"patch_size": 1}"#).is_ok());
        assert!(matches!(
            VaeConfig::from_json(r#"{"dim_mult": "1,2"}"#),
            Err(VaeConfigError::Json(_))
        ));
    }
}
