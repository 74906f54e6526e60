//! The decoder of Wan's video VAE, diffusers' `AutoencoderKLWan` (diffusers 0.42.1,
//! `models/autoencoders/autoencoder_kl_wan.py`), with diffusers' parameter names so that a
//! pipeline's `vae/` directory loads as it is. Only the decode path is built: `post_quant_conv`
//! and `decoder.*`; the encoder's and `quant_conv`'s tensors in the checkpoint are skipped.
//!
//! Decoding runs as diffusers' `_decode` does (without tiling or slicing): `post_quant_conv`
//! over all latent frames, then the decoder one latent frame at a time, each causal convolution
//! keeping the last [`CACHE_T`] frames of its input for the next chunk, so that the activations
//! live for one chunk and the cache stays the same size whatever the number of frames. The
//! first latent frame gives one video frame, each further one `temporal_factor()` (4 for
//! Wan2.1); every chunk is clamped to [-1, 1]. See [`WanVae`] for an example.

mod cache;
mod config;
mod decoder;
mod layers;

pub use cache::CACHE_T;
pub use config::{MAX_CHANNELS, MAX_LEVELS, MAX_RES_BLOCKS, VaeConfig, VaeConfigError};

use crate::error::{Error, Result};
use crate::load::{checkpoint_files, load_files};
use cache::FeatCache;
use decoder::Decoder3d;
use layers::{CausalConv3d, Weights};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

/// Checkpoint prefixes of the encoder half, which the decoder does not load.
pub const ENCODER_PREFIXES: [&str; 2] = ["encoder.", "quant_conv."];

/// One chunk of decoded video handed to [`WanVae::decode_chunks`]' callback.
#[derive(Debug)]
pub struct VideoChunk {
    /// The chunk's index: the latent frame it comes from.
    pub index: usize,
    /// The index of its first frame in the whole video.
    pub first_frame: i64,
    /// The frames, `[batch, out_channels, frames, height, width]`, clamped to [-1, 1], in the
    /// VAE's type and on its device: 1 frame for the first chunk, `temporal_factor()` after.
    pub video: Tensor,
}

/// What a decode held in its feature cache, for checking that memory does not grow with the
/// number of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    /// Chunks decoded (latent frames).
    pub chunks: usize,
    /// Video frames produced.
    pub frames: i64,
    /// Cache slots (causal convolutions with a temporal kernel, time convolutions included).
    pub cache_slots: usize,
    /// The most frames any slot held after any chunk (at most [`CACHE_T`]).
    pub cache_frames_max: i64,
    /// The most bytes the whole cache held after any chunk.
    pub cache_bytes_max: i64,
}

/// Wan's video VAE, decoder half: `post_quant_conv` and `decoder` (`WanDecoder3d`) with
/// diffusers' module tree and parameter names (`decoder.conv_in.weight`,
/// `decoder.mid_block.attentions.0.to_qkv.weight`, `decoder.up_blocks.0.upsamplers.0.time_conv.weight`,
/// ...). A diffusers `vae/` directory loads with [`WanVae::from_pretrained`]; the encoder's
/// tensors in it are skipped.
///
/// Decoding follows diffusers' `AutoencoderKLWan._decode` (no tiling, no batch slicing):
/// `post_quant_conv` over all latent frames, then the decoder one latent frame at a time with a
/// per-convolution cache of the last [`CACHE_T`] frames, so that memory does not grow with the
/// number of frames; the first latent frame gives one video frame, each further one
/// [`VaeConfig::temporal_factor`] (4); the output is clamped to [-1, 1]. The whole path runs
/// without autograd.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use wan::{VaeConfig, WanVae};
///
/// let config = VaeConfig::tiny();
/// let vs = nn::VarStore::new(Device::Cpu);
/// let vae = WanVae::new(vs.root(), &config)?;
/// let latents = Tensor::randn([1, 4, 3, 4, 5], (Kind::Float, Device::Cpu));
/// let video = vae.decode(&vae.denormalize(&latents)?)?; // [1, 3, 9, 32, 40] in [-1, 1]
/// assert_eq!(video.size(), [1, 3, 9, 32, 40]);
/// let frames = wan::to_frames(&video); // [1, 9, 32, 40, 3] in [0, 1], float32
/// assert_eq!(frames.size(), [1, 9, 32, 40, 3]);
/// # Ok::<(), wan::Error>(())
/// ```
#[derive(Debug)]
pub struct WanVae {
    config: VaeConfig,
    post_quant_conv: CausalConv3d,
    decoder: Decoder3d,
    /// A parameter, for the VAE's type and device.
    probe: Tensor,
}

impl WanVae {
    /// The decoder's parameters under `path`, drawn at random (convolutions uniform in
    /// ±1/sqrt(fan_in), RMS norm gammas at 1) in the VarStore's type, after checking `config`
    /// ([`VaeConfig::validate`]). Convert with `VarStore::set_kind` for bf16.
    pub fn new(path: nn::Path, config: &VaeConfig) -> Result<WanVae> {
        WanVae::build(path, config, Weights::Random)
    }

    /// The same parameters, uninitialized, in `kind`: for loading a checkpoint into.
    pub fn new_empty(path: nn::Path, config: &VaeConfig, kind: Kind) -> Result<WanVae> {
        WanVae::build(path, config, Weights::Empty(kind))
    }

    fn build(path: nn::Path, config: &VaeConfig, w: Weights) -> Result<WanVae> {
        config
            .validate()
            .map_err(|source| Error::VaeConfig { path: None, source })?;
        let post_quant_conv = CausalConv3d::new(
            &path / "post_quant_conv",
            config.z_dim,
            config.z_dim,
            [1; 3],
            [0; 3],
            w,
        );
        let decoder = Decoder3d::new(&path / "decoder", config, w);
        let probe = path
            .sub("post_quant_conv")
            .get("bias")
            .expect("post_quant_conv.bias was just made");
        Ok(WanVae {
            config: config.clone(),
            post_quant_conv,
            decoder,
            probe,
        })
    }

    /// Reads `dir/config.json`, builds the decoder under `vs`'s root in `kind` (diffusers runs
    /// Wan's VAE in float32; bfloat16 works too) and loads the directory's weights (one
    /// safetensors file or shards with an index), skipping the encoder's ([`ENCODER_PREFIXES`]).
    pub fn from_pretrained(
        vs: &mut nn::VarStore,
        dir: impl AsRef<Path>,
        kind: Kind,
    ) -> Result<WanVae> {
        let dir = dir.as_ref();
        let config = VaeConfig::from_file(dir.join("config.json"))?;
        let vae = WanVae::new_empty(vs.root(), &config, kind)?;
        load_decoder(vs, dir)?;
        Ok(vae)
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The parameters' element type.
    pub fn kind(&self) -> Kind {
        self.probe.kind()
    }

    /// The parameters' device.
    pub fn device(&self) -> Device {
        self.probe.device()
    }

    /// The video's shape for latents of shape `z` (`[batch, z_dim, frames, height, width]`):
    /// `[batch, out_channels, 1 + temporal_factor * (frames - 1), spatial_factor * height,
    /// spatial_factor * width]`, or [`Error::Input`] for a shape the decoder does not take.
    pub fn video_shape(&self, z: &[i64]) -> Result<[i64; 5]> {
        let c = &self.config;
        let bad = |reason: String| Err(Error::Input { reason });
        let &[b, ch, t, h, w] = z else {
            return bad(format!(
                "latents of shape {z:?}: expected 5 dimensions [batch, z_dim = {}, frames, height, width]",
                c.z_dim
            ));
        };
        if ch != c.z_dim {
            return bad(format!(
                "latents of shape {z:?} have {ch} channels, the VAE's z_dim is {}",
                c.z_dim
            ));
        }
        if b < 1 || t < 1 || h < 1 || w < 1 {
            return bad(format!(
                "latents of shape {z:?}: every dimension must be at least 1"
            ));
        }
        let (sf, tf) = (c.spatial_factor(), c.temporal_factor());
        let frames = (t - 1).checked_mul(tf).and_then(|f| f.checked_add(1));
        let (oh, ow) = (h.checked_mul(sf), w.checked_mul(sf));
        let numel = [Some(b), Some(c.out_channels), frames, oh, ow]
            .into_iter()
            .try_fold(1i64, |acc, d| d.and_then(|d| acc.checked_mul(d)));
        match (frames, oh, ow, numel) {
            (Some(f), Some(oh), Some(ow), Some(_)) => Ok([b, c.out_channels, f, oh, ow]),
            _ => bad(format!(
                "latents of shape {z:?} decode to a video too large to index"
            )),
        }
    }

    fn check_latents(&self, z: &Tensor) -> Result<[i64; 5]> {
        let shape = self.video_shape(&z.size())?;
        if z.kind() != self.kind() || z.device() != self.device() {
            return Err(Error::Input {
                reason: format!(
                    "latents are {:?} on {:?}, the VAE is {:?} on {:?}: convert them first (denormalize does)",
                    z.kind(),
                    z.device(),
                    self.kind(),
                    self.device()
                ),
            });
        }
        Ok(shape)
    }

    /// WanPipeline's de-normalization before decoding, as diffusers writes it: the latents moved
    /// to the VAE's device and type, then `latents / (1 / std) + mean`, with `mean` and `std`
    /// the config's `latents_mean`/`latents_std` made float32 (`torch.tensor`), converted to
    /// the VAE's type, and `1 / std` taken in that type.
    pub fn denormalize(&self, latents: &Tensor) -> Result<Tensor> {
        let (kind, device) = (self.kind(), self.device());
        let z = self.config.z_dim;
        let dims = latents.size();
        if dims.len() != 5 || dims[1] != z {
            return Err(Error::Input {
                reason: format!(
                    "latents of shape {dims:?}: expected [batch, z_dim = {z}, frames, height, width]"
                ),
            });
        }
        let table = |v: &[f64]| {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::from_slice(&v)
                .view([1, z, 1, 1, 1])
                .to_device(device)
                .to_kind(kind)
        };
        tch::no_grad(|| {
            let latents = latents.to_device(device).to_kind(kind);
            let mean = table(&self.config.latents_mean);
            let inv_std = table(&self.config.latents_std).reciprocal();
            Ok(latents / inv_std + mean)
        })
    }

    /// Decodes latents `z` `[batch, z_dim, frames, height, width]` (de-normalized, in the VAE's
    /// type and on its device) to a video `[batch, out_channels, 1 + temporal_factor *
    /// (frames - 1), spatial_factor * height, spatial_factor * width]` in [-1, 1]. The output
    /// is allocated once and each chunk copied in: memory is the video plus one chunk's
    /// activations plus the cache.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let shape = self.check_latents(z)?;
        let out = Tensor::empty(shape, (self.kind(), self.device()));
        self.decode_chunks(z, |chunk: VideoChunk| -> Result<()> {
            let n = chunk.video.size()[2];
            let mut view = out.narrow(2, chunk.first_frame, n);
            view.copy_(&chunk.video);
            Ok(())
        })?;
        Ok(out)
    }

    /// Decodes `z` as [`WanVae::decode`] but hands each chunk of frames to `on_chunk` as soon as
    /// it is decoded, without holding the whole video: memory is one chunk's activations plus
    /// the cache, whatever the number of frames. Returns what the cache held.
    pub fn decode_chunks<E: From<Error>>(
        &self,
        z: &Tensor,
        mut on_chunk: impl FnMut(VideoChunk) -> std::result::Result<(), E>,
    ) -> std::result::Result<DecodeStats, E> {
        self.check_latents(z)?;
        let frames = z.size()[2];
        let mut cache = FeatCache::default();
        let mut stats = DecodeStats {
            chunks: 0,
            frames: 0,
            cache_slots: 0,
            cache_frames_max: 0,
            cache_bytes_max: 0,
        };
        let _guard = tch::no_grad_guard();
        let x = self.post_quant_conv.forward(z, None);
        for i in 0..frames {
            let video = self
                .decoder
                .forward(&x.narrow(2, i, 1), &mut cache)
                .clamp(-1.0, 1.0);
            stats.cache_slots = cache.len();
            stats.cache_frames_max = stats.cache_frames_max.max(cache.max_frames());
            stats.cache_bytes_max = stats.cache_bytes_max.max(cache.bytes());
            let n = video.size()[2];
            on_chunk(VideoChunk {
                index: i as usize,
                first_frame: stats.frames,
                video,
            })?;
            stats.chunks += 1;
            stats.frames += n;
        }
        Ok(stats)
    }
}

/// diffusers' `VideoProcessor.postprocess_video(video, output_type="np")`: the video
/// `[batch, channels, frames, height, width]` in [-1, 1] to frames `[batch, frames, height,
/// width, channels]` in [0, 1], float32 on the CPU: `(video * 0.5 + 0.5).clamp(0, 1)` in the
/// video's type, then moved and converted.
pub fn to_frames(video: &Tensor) -> Tensor {
    tch::no_grad(|| {
        (video * 0.5 + 0.5)
            .clamp(0.0, 1.0)
            .to_device(Device::Cpu)
            .permute([0, 2, 3, 4, 1])
            .to_kind(Kind::Float)
            .contiguous()
    })
}

/// Frames from [`to_frames`] (float in [0, 1]) to 8-bit pixels, as diffusers' `numpy_to_pil`
/// does before writing images: `(frames * 255).round()` (half to even) as `uint8`. Same shape.
pub fn frames_to_u8(frames: &Tensor) -> Tensor {
    tch::no_grad(|| (frames * 255.0).round().to_kind(Kind::Uint8))
}

/// Loads the decoder's tensors of the checkpoint at `path` (a diffusers `vae/` directory or one
/// safetensors file) into `vs`, skipping the encoder's; nothing is copied unless every decoder
/// tensor is there with its shape and a float type ([`Error::VaeMismatch`] lists the
/// differences).
pub fn load_decoder(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let files = checkpoint_files(path)?;
    let is_encoder = |name: &str| ENCODER_PREFIXES.iter().any(|p| name.starts_with(p));
    load_files(
        vs,
        path,
        &files,
        |key| (!is_encoder(key)).then_some(key),
        |path, mismatch| Error::VaeMismatch { path, mismatch },
    )
}
