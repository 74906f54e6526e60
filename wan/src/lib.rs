//! Wan2.1 text to video as diffusers defines it (diffusers 0.42, transformers 5), written with
//! tch: the same module trees and parameter names, so a diffusers pipeline directory loads as it
//! is, and the same operations in the same order and precision, so that the outputs match
//! diffusers' (see the parity tests in the repository):
//!
//! - [`WanPipeline`]: diffusers' `WanPipeline` (`model_index.json` and its components), its
//!   stages open ([`WanPipeline::encode_prompts`], [`WanPipeline::prepare_latents`],
//!   [`WanPipeline::denoise`], [`WanPipeline::decode`]) and each model's block loop run through
//!   a [`BlockLoop`], so that a caller can stream the blocks' weights;
//! - [`WanTokenizer`] (`tokenizer.json`, the pipeline's prompt cleaning, padding and truncation)
//!   and [`UMT5EncoderModel`] (the umT5 text encoder);
//! - [`WanTransformer3DModel`], the diffusion transformer;
//! - [`Scheduler`] (`UniPCMultistepScheduler`, `FlowMatchEulerDiscreteScheduler`);
//! - [`WanVae`] (`AutoencoderKLWan`'s decoder, frame by frame with its feature cache).
//!
//! The transformer's forward is open so that a caller can wrap each block, e.g. to stream its
//! weights:
//!
//! ```
//! use tch::{nn, Device, Kind, Tensor};
//! use wan::{Config, WanTransformer3DModel};
//!
//! let config = Config::tiny();
//! let mut vs = nn::VarStore::new(Device::Cpu);
//! let model = WanTransformer3DModel::new(vs.root(), &config);
//! wan::set_kind(&mut vs, Kind::Float); // bf16 on a GPU: float32 where diffusers keeps it
//! let latents = Tensor::randn([1, 4, 2, 8, 8], (Kind::Float, Device::Cpu));
//! let text = Tensor::randn([1, 7, config.text_dim], (Kind::Float, Device::Cpu));
//! let t = Tensor::from_slice(&[500.0f32]);
//! let e = model.embed(&latents, &t, &text)?;
//! let mut h = e.hidden.shallow_clone();
//! for i in 0..model.blocks().len() {
//!     h = model.block(i, &h, &e); // e.g. inside the offload manager's `enter(i)`
//! }
//! let out = model.head(&h, &e);
//! assert_eq!(out.size(), [1, 4, 2, 8, 8]);
//! assert!(out.equal(&model.forward(&latents, &t, &text)?));
//! # Ok::<(), wan::Error>(())
//! ```
//!
//! Supported: text-to-video Wan2.1 (and Wan2.2 A14B's per-expert transformers, which share the
//! config keys) with one timestep per sample; not the image-conditioned variants (`image_dim`,
//! `added_kv_proj_dim`) nor Wan2.2 TI2V's per-token timesteps. The pipeline runs one
//! transformer (Wan2.1); Wan2.2's two experts (`transformer_2`) are refused by name.
#![deny(missing_docs)]

mod block;
mod config;
mod error;
mod load;
mod model;
pub mod pipeline;
mod rope;
pub mod scheduler;
pub mod tokenizer;
pub mod umt5;
mod vae;

pub use block::{Attention, Block};
pub use config::{Config, ConfigError};
pub use error::{DtypeMismatch, Error, Mismatch, Result, ShapeMismatch};
pub use load::{
    INDEX_FILE, TensorInfo, WEIGHTS_FILE, checkpoint_files, compare, load_checkpoint, read_header,
};
pub use model::{Embedded, KEEP_IN_FP32_MODULES, WanTransformer3DModel, keeps_fp32, set_kind};
pub use pipeline::{BlockLoop, Component, ModelIndex, Request, Resident, Step, WanPipeline};
pub use rope::{Rotary, RotaryEmbedding};
pub use scheduler::{Scheduler, SchedulerError};
pub use tokenizer::{Encoded, WanTokenizer, prompt_clean};
pub use umt5::{TextEmbedded, UMT5EncoderModel, Umt5Config};
pub use vae::{
    CACHE_T, DecodeStats, ENCODER_PREFIXES, MAX_CHANNELS, MAX_LEVELS, MAX_RES_BLOCKS, VaeConfig,
    VaeConfigError, VideoChunk, WanVae, frames_to_u8, load_decoder, to_frames,
};

/// Reads `dir/config.json`, builds the model under `vs`'s root, converts it to `kind` (float32
/// where diffusers keeps it) and loads the directory's weights.
pub fn from_pretrained(
    vs: &mut tch::nn::VarStore,
    dir: impl AsRef<std::path::Path>,
    kind: tch::Kind,
) -> Result<(Config, WanTransformer3DModel)> {
    let dir = dir.as_ref();
    let config = Config::from_file(dir.join("config.json"))?;
    // Uninitialized (every value comes from the files): no random draw, no memory touched twice.
    let model = WanTransformer3DModel::new_empty(vs.root(), &config, kind);
    load_checkpoint(vs, dir)?;
    Ok((config, model))
}

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
