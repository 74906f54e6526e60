//! diffusers' `WanPipeline` (text to video): the tokenizer, the umT5 text encoder, the
//! transformer, the scheduler and the VAE of a diffusers pipeline directory, and the stages that
//! join them.
//!
//! The stages are open, so that a caller decides where each model's weights live between them
//! (the text encoder streamed and then sent back to the host, the transformer streamed under a
//! VRAM budget, the VAE moved to the GPU for the decode): [`WanPipeline::encode_prompts`],
//! [`WanPipeline::prepare_latents`], [`WanPipeline::denoise`], [`WanPipeline::decode`]. The two
//! block loops (the text encoder's `encoder.block.<i>` and the transformer's `blocks.<i>`) run
//! through a [`BlockLoop`], which an offload manager implements; [`Resident`] runs them as they
//! are:
//!
//! ```no_run
//! use tch::{Device, Kind};
//! use wan::{Request, Resident, WanPipeline};
//!
//! let mut p = WanPipeline::from_pretrained("Wan2.1-T2V-1.3B-Diffusers", Kind::Float)?;
//! let mut r = Request::new("a red fox runs through fresh snow at dawn");
//! r.negative_prompt = "blurry, low quality".into();
//! (r.num_frames, r.num_inference_steps) = (17, 30);
//! let prompts = [r.prompt.as_str(), r.negative_prompt.as_str()];
//! let text = p.encode_prompts(&prompts, r.max_sequence_length, Device::Cpu, &mut Resident)?;
//! let (cond, uncond) = (text.narrow(0, 0, 1), text.narrow(0, 1, 1));
//! let noise = p.prepare_latents(&r, Device::Cpu)?;
//! let latents = p.denoise(&r, &noise, &cond, Some(&uncond), &mut Resident, &mut |s, _| {
//!     eprintln!("step {}/{}", s.done, s.total)
//! })?;
//! let frames = p.decode(&latents)?; // [1, 17, 480, 832, 3], float32 in [0, 1]
//! # Ok::<(), wan::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::model::WanTransformer3DModel;
use crate::scheduler::Scheduler;
use crate::tokenizer::WanTokenizer;
use crate::umt5::UMT5EncoderModel;
use crate::vae::WanVae;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn};

/// A model whose blocks a [`BlockLoop`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The umT5 text encoder (`text_encoder`, blocks `encoder.block.<i>`).
    TextEncoder,
    /// The diffusion transformer (`transformer`, blocks `blocks.<i>`).
    Transformer,
}

/// How the pipeline runs a model's block loop: [`BlockLoop::run`] is called once per forward
/// pass of a [`Component`] and must call `block(i)` for every `i` in `0..num_blocks`, in order,
/// with block `i`'s weights usable on the compute device during the call. An offload manager
/// implements it by entering block `i` around the call (uploading it, and the next one ahead).
pub trait BlockLoop {
    /// Runs `block(0)`, ..., `block(num_blocks - 1)` of `component`.
    fn run(
        &mut self,
        component: Component,
        num_blocks: usize,
        block: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()>;
}

/// Runs every block as it is: the weights are where the model has them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Resident;

impl BlockLoop for Resident {
    fn run(
        &mut self,
        _: Component,
        num_blocks: usize,
        block: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<()> {
        (0..num_blocks).try_for_each(block)
    }
}

/// `model_index.json` of a diffusers pipeline directory: which class each component is.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// The pipeline's class (`WanPipeline`).
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// `[library, class]` of the tokenizer.
    pub tokenizer: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the text encoder.
    pub text_encoder: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the transformer.
    pub transformer: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the second transformer (Wan2.2's low-noise expert; not supported).
    pub transformer_2: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the VAE.
    pub vae: Option<(Option<String>, Option<String>)>,
    /// `[library, class]` of the scheduler.
    pub scheduler: Option<(Option<String>, Option<String>)>,
    /// Wan2.2's switch between its two transformers (not supported).
    pub boundary_ratio: Option<f64>,
    /// Wan2.2 TI2V's per-token timesteps (not supported).
    pub expand_timesteps: Option<bool>,
}

impl ModelIndex {
    /// Reads and checks `dir/model_index.json`: a `WanPipeline` with every component this crate
    /// runs, and none it does not.
    pub fn from_dir(dir: &Path) -> Result<ModelIndex> {
        let path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let index: ModelIndex = serde_json::from_str(&text).map_err(|e| Error::Pipeline {
            path: path.clone(),
            reason: format!("not a diffusers model_index.json: {e}"),
        })?;
        let bad = |reason: String| {
            Err(Error::Pipeline {
                path: path.clone(),
                reason,
            })
        };
        if index.class_name != "WanPipeline" {
            return bad(format!(
                "the pipeline is a {}; this crate runs WanPipeline (Wan2.1 text to video)",
                index.class_name
            ));
        }
        let absent = |c: &Option<(Option<String>, Option<String>)>| {
            c.as_ref()
                .is_none_or(|(lib, class)| lib.is_none() && class.is_none())
        };
        for (name, c) in [
            ("tokenizer", &index.tokenizer),
            ("text_encoder", &index.text_encoder),
            ("transformer", &index.transformer),
            ("vae", &index.vae),
            ("scheduler", &index.scheduler),
        ] {
            if absent(c) {
                return bad(format!(
                    "names no {name}; a WanPipeline directory has tokenizer, text_encoder, transformer, vae and scheduler"
                ));
            }
            if !dir.join(name).is_dir() {
                return bad(format!(
                    "names a {name} but {} is not a directory",
                    dir.join(name).display()
                ));
            }
        }
        if !absent(&index.transformer_2) || index.boundary_ratio.is_some() {
            return bad(
                "has a transformer_2 (Wan2.2's two experts), which this crate does not run yet"
                    .into(),
            );
        }
        if index.expand_timesteps == Some(true) {
            return bad(
                "sets expand_timesteps (Wan2.2 TI2V's per-token timesteps), which this crate does not run"
                    .into(),
            );
        }
        Ok(index)
    }
}

/// What to generate. [`Request::new`] has `WanPipeline.__call__`'s defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (used when `guidance_scale > 1`; empty by default, as diffusers).
    pub negative_prompt: String,
    /// Frame height in pixels (a multiple of 16 for Wan2.1; diffusers rounds down, this crate
    /// refuses with a message).
    pub height: i64,
    /// Frame width in pixels (a multiple of 16).
    pub width: i64,
    /// Frames (`4k + 1`).
    pub num_frames: i64,
    /// Denoising steps.
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale (`> 1` runs the negative prompt too).
    pub guidance_scale: f64,
    /// Seed of the initial noise (diffusers' `generator=torch.Generator("cpu").manual_seed(seed)`).
    pub seed: u64,
    /// Text tokens (padding and truncation length).
    pub max_sequence_length: usize,
    /// Run the conditional and unconditional predictions as one batch of 2 (one pass over the
    /// transformer's weights per step, half the uploads when they stream; default) or as two
    /// passes of batch 1 as diffusers does (the same numbers as diffusers' order of operations).
    pub batch_guidance: bool,
}

impl Request {
    /// `prompt` with `WanPipeline.__call__`'s defaults: 480 x 832, 81 frames, 50 steps, guidance
    /// 5.0, 512 text tokens, seed 0, no negative prompt.
    pub fn new(prompt: impl Into<String>) -> Request {
        Request {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            height: 480,
            width: 832,
            num_frames: 81,
            num_inference_steps: 50,
            guidance_scale: 5.0,
            seed: 0,
            max_sequence_length: 512,
            batch_guidance: true,
        }
    }

    /// Whether the negative prompt runs (`guidance_scale > 1`, as diffusers).
    pub fn guided(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// The largest frame side and frame count a [`Request`] may ask for (Wan2.1 was trained up to
/// 1280 x 720 and 81 frames).
pub const MAX_SIDE: i64 = 4096;
/// See [`MAX_SIDE`].
pub const MAX_FRAMES: i64 = 1025;
/// The most text tokens (umT5's relative attention has no hard limit; Wan uses 512).
pub const MAX_SEQUENCE_LENGTH: usize = 4096;
/// The most denoising steps.
pub const MAX_STEPS: usize = 10_000;

/// Progress of [`WanPipeline::denoise`], given to its callback after each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Steps done (1 after the first).
    pub done: usize,
    /// Steps in all.
    pub total: usize,
    /// The timestep of the step just done.
    pub timestep: f64,
}

/// diffusers' `WanPipeline`, loaded from a pipeline directory (or built from configs): every
/// model on the CPU until the caller moves or streams it.
pub struct WanPipeline {
    /// The tokenizer (`tokenizer/tokenizer.json`).
    pub tokenizer: WanTokenizer,
    /// The umT5 text encoder.
    pub text_encoder: UMT5EncoderModel,
    /// The text encoder's weights.
    pub text_encoder_vs: nn::VarStore,
    /// The diffusion transformer.
    pub transformer: WanTransformer3DModel,
    /// The transformer's weights.
    pub transformer_vs: nn::VarStore,
    /// The VAE (its decoder).
    pub vae: WanVae,
    /// The VAE's weights.
    pub vae_vs: nn::VarStore,
    /// The scheduler.
    pub scheduler: Scheduler,
    /// Where the pipeline was loaded from (None when built from configs).
    pub dir: Option<PathBuf>,
}

impl std::fmt::Debug for WanPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanPipeline")
            .field("dir", &self.dir)
            .field("transformer", self.transformer.config())
            .finish_non_exhaustive()
    }
}

impl WanPipeline {
    /// Loads a diffusers `WanPipeline` directory (`model_index.json`, `tokenizer/`,
    /// `text_encoder/`, `transformer/`, `vae/`, `scheduler/`) onto the CPU: the text encoder and
    /// the transformer in `kind` (bfloat16 for a GPU; float32 where transformers and diffusers
    /// keep it), the VAE in float32 as Wan's examples run it.
    pub fn from_pretrained(dir: impl AsRef<Path>, kind: Kind) -> Result<WanPipeline> {
        let dir = dir.as_ref();
        ModelIndex::from_dir(dir)?;
        let tokenizer = WanTokenizer::from_dir(dir.join("tokenizer"))?;
        let scheduler = Scheduler::from_file(dir.join("scheduler").join("scheduler_config.json"))?;
        let mut text_encoder_vs = nn::VarStore::new(Device::Cpu);
        let (_, text_encoder) =
            crate::umt5::from_pretrained(&mut text_encoder_vs, dir.join("text_encoder"), kind)?;
        let mut transformer_vs = nn::VarStore::new(Device::Cpu);
        let (_, transformer) =
            crate::from_pretrained(&mut transformer_vs, dir.join("transformer"), kind)?;
        let mut vae_vs = nn::VarStore::new(Device::Cpu);
        let vae = WanVae::from_pretrained(&mut vae_vs, dir.join("vae"), Kind::Float)?;
        let mut p = WanPipeline::from_parts(
            tokenizer,
            (text_encoder, text_encoder_vs),
            (transformer, transformer_vs),
            (vae, vae_vs),
            scheduler,
        )
        .map_err(|e| match e {
            Error::Pipeline { reason, .. } => Error::Pipeline {
                path: dir.to_owned(),
                reason,
            },
            e => e,
        })?;
        p.dir = Some(dir.to_owned());
        Ok(p)
    }

    /// A pipeline of components built in code (e.g. with seeded random weights, for a
    /// benchmark), each model with the `VarStore` that holds its weights; checked to fit
    /// together ([`Self::check_components`]).
    pub fn from_parts(
        tokenizer: WanTokenizer,
        text_encoder: (UMT5EncoderModel, nn::VarStore),
        transformer: (WanTransformer3DModel, nn::VarStore),
        vae: (WanVae, nn::VarStore),
        scheduler: Scheduler,
    ) -> Result<WanPipeline> {
        let p = WanPipeline {
            tokenizer,
            text_encoder: text_encoder.0,
            text_encoder_vs: text_encoder.1,
            transformer: transformer.0,
            transformer_vs: transformer.1,
            vae: vae.0,
            vae_vs: vae.1,
            scheduler,
            dir: None,
        };
        p.check_components()?;
        Ok(p)
    }

    /// Checks that the components fit together: the text encoder's width is the transformer's
    /// `text_dim`, the VAE's `z_dim` its channels.
    pub fn check_components(&self) -> Result<()> {
        let c = self.transformer.config();
        let path = self.dir.clone().unwrap_or_default();
        let d_model = self.text_encoder.config().d_model;
        if d_model != c.text_dim {
            return Err(Error::Pipeline {
                path,
                reason: format!(
                    "the text encoder's d_model is {d_model} but the transformer's text_dim is {}",
                    c.text_dim
                ),
            });
        }
        let z = self.vae.config().z_dim;
        if z != c.in_channels || z != c.out_channels() {
            return Err(Error::Pipeline {
                path,
                reason: format!(
                    "the VAE's z_dim is {z} but the transformer takes {} and gives {} channels",
                    c.in_channels,
                    c.out_channels()
                ),
            });
        }
        Ok(())
    }

    /// Checks `r` against the models and the limits, before any work: frame sides multiples of
    /// the VAE's spatial factor times the patch, `4k + 1` frames, steps, guidance, text length.
    pub fn check_request(&self, r: &Request) -> Result<()> {
        let bad = |reason: String| Err(Error::Input { reason });
        let [pt, ph, pw] = self.transformer.config().patch_size;
        let (sh, sw) = (8 * ph, 8 * pw);
        if r.height < sh || r.height > MAX_SIDE || r.height % sh != 0 {
            return bad(format!(
                "height {} must be a multiple of {sh} in {sh}..={MAX_SIDE}",
                r.height
            ));
        }
        if r.width < sw || r.width > MAX_SIDE || r.width % sw != 0 {
            return bad(format!(
                "width {} must be a multiple of {sw} in {sw}..={MAX_SIDE}",
                r.width
            ));
        }
        if r.num_frames < 1 || r.num_frames > MAX_FRAMES || (r.num_frames - 1) % 4 != 0 {
            return bad(format!(
                "num_frames {} must be 4k + 1 in 1..={MAX_FRAMES} (e.g. 81)",
                r.num_frames
            ));
        }
        let latent_frames = (r.num_frames - 1) / 4 + 1;
        if latent_frames % pt != 0 {
            return bad(format!(
                "{latent_frames} latent frames are not a multiple of the temporal patch {pt}"
            ));
        }
        if r.num_inference_steps == 0 || r.num_inference_steps > MAX_STEPS {
            return bad(format!(
                "num_inference_steps {} must be in 1..={MAX_STEPS}",
                r.num_inference_steps
            ));
        }
        if !r.guidance_scale.is_finite() || r.guidance_scale < 0.0 || r.guidance_scale > 100.0 {
            return bad(format!(
                "guidance_scale {} must be a number in 0..=100",
                r.guidance_scale
            ));
        }
        if r.max_sequence_length == 0 || r.max_sequence_length > MAX_SEQUENCE_LENGTH {
            return bad(format!(
                "max_sequence_length {} must be in 1..={MAX_SEQUENCE_LENGTH}",
                r.max_sequence_length
            ));
        }
        Ok(())
    }

    /// The latent shape of `r`: `[1, z_dim, (frames - 1) / 4 + 1, height / 8, width / 8]`.
    pub fn latent_shape(&self, r: &Request) -> [i64; 5] {
        [
            1,
            self.transformer.config().in_channels,
            (r.num_frames - 1) / 4 + 1,
            r.height / 8,
            r.width / 8,
        ]
    }

    /// The text embeddings of `prompts` as `WanPipeline.encode_prompt` makes them: cleaned,
    /// tokenized to `max_len` tokens, encoded by umT5 (its block loop run by `blocks`), each cut
    /// to its own length and padded with zeros back to `max_len`; `[prompts.len(), max_len,
    /// d_model]` on `device` in the transformer's type. The text encoder's non-block weights
    /// must be on `device` (and its blocks there, or streamed by `blocks`).
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
        max_len: usize,
        device: Device,
        blocks: &mut dyn BlockLoop,
    ) -> Result<Tensor> {
        let enc = self.tokenizer.encode(prompts, max_len)?;
        let ids = enc.input_ids.to_device(device);
        let mask = enc.attention_mask.to_device(device);
        let te = &self.text_encoder;
        let hidden = crate::error::catch_torch(
            || "encoding the prompts".into(),
            || {
                tch::no_grad(|| -> Result<Tensor> {
                    let e = te.embed(&ids, &mask)?;
                    let mut h = e.hidden.shallow_clone();
                    blocks.run(Component::TextEncoder, te.blocks().len(), &mut |i| {
                        h = te.block(i, &h, &e);
                        Ok(())
                    })?;
                    Ok(te.final_norm(&h))
                })
            },
        )?;
        let kind = self.transformer_kind();
        crate::umt5::trim_and_pad(&hidden, &mask, max_len, kind)
    }

    /// Tokens each of `prompts` loses to truncation at `max_len` (0 where it fits):
    /// `WanPipeline` drops them without a word; a caller should say so.
    pub fn truncated_tokens(&self, prompts: &[&str], max_len: usize) -> Result<Vec<usize>> {
        Ok(self.tokenizer.encode(prompts, max_len)?.truncated)
    }

    /// The transformer's compute type (that of its patch embedding).
    pub fn transformer_kind(&self) -> Kind {
        self.transformer_vs
            .variables()
            .get("patch_embedding.weight")
            .map_or(Kind::Float, |t| t.kind())
    }

    /// The initial noise of `r` as `WanPipeline.prepare_latents` draws it with a CPU generator
    /// seeded with `r.seed`: float32 normal values on the CPU, then moved to `device`. It reseeds
    /// libtorch's global CPU generator (tch has no generator objects): a thread drawing random
    /// values at the same time changes the noise.
    pub fn prepare_latents(&self, r: &Request, device: Device) -> Result<Tensor> {
        self.check_request(r)?;
        let shape = self.latent_shape(r);
        // torch.Generator("cpu").manual_seed(s) and the default CPU generator reseeded with s
        // draw the same numbers.
        tch::manual_seed(r.seed as i64);
        Ok(Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device))
    }

    /// The transformer's prediction for `latents` at `timestep`, its blocks run by `blocks`.
    fn predict(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
        blocks: &mut dyn BlockLoop,
    ) -> Result<Tensor> {
        let tr = &self.transformer;
        let e = tr.embed(latents, timestep, text)?;
        let mut h = e.hidden.shallow_clone();
        blocks.run(Component::Transformer, tr.blocks().len(), &mut |i| {
            h = tr.block(i, &h, &e);
            Ok(())
        })?;
        Ok(tr.head(&h, &e))
    }

    /// The denoising loop of `WanPipeline.__call__`: for each of the scheduler's timesteps the
    /// transformer's prediction for `latents` (float32, from [`Self::prepare_latents`]) given
    /// `text` (`[1, L, D]`) and, when `uncond` is given, classifier-free guidance against the
    /// negative prompt's (`noise_uncond + scale * (noise_cond - noise_uncond)`), then the
    /// scheduler's step. `on_step` is called after each step with the latents it made. Returns
    /// the final latents (float32). A libtorch failure inside a step (CUDA out of memory, for
    /// instance) is [`Error::Torch`] naming the step ([`Error::is_out_of_memory`] tells which).
    pub fn denoise(
        &mut self,
        r: &Request,
        latents: &Tensor,
        text: &Tensor,
        uncond: Option<&Tensor>,
        blocks: &mut dyn BlockLoop,
        on_step: &mut dyn FnMut(Step, &Tensor),
    ) -> Result<Tensor> {
        self.check_request(r)?;
        let kind = self.transformer_kind();
        let device = latents.device();
        self.scheduler.set_timesteps(r.num_inference_steps)?;
        self.scheduler.set_begin_index(0);
        let timesteps = self.scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let both = uncond.map(|u| Tensor::cat(&[text, u], 0));
        let mut x = latents.shallow_clone();
        for (i, &t) in timesteps.iter().enumerate() {
            let context = || format!("denoising step {} of {total}", i + 1);
            let input = x.to_kind(kind);
            let pred = crate::error::catch_torch(context, || {
                tch::no_grad(|| -> Result<Tensor> {
                    match (uncond, &both) {
                        (Some(_), Some(both)) if r.batch_guidance => {
                            let ts = Tensor::from_slice(&[t, t]).to_device(device);
                            let p = self.predict(
                                &Tensor::cat(&[&input, &input], 0),
                                &ts,
                                both,
                                blocks,
                            )?;
                            let (c, u) = (p.get(0).unsqueeze(0), p.get(1).unsqueeze(0));
                            Ok(&u + (&c - &u) * r.guidance_scale)
                        }
                        (Some(u), _) => {
                            let ts = Tensor::from_slice(&[t]).to_device(device);
                            let c = self.predict(&input, &ts, text, blocks)?;
                            let un = self.predict(&input, &ts, u, blocks)?;
                            Ok(&un + (&c - &un) * r.guidance_scale)
                        }
                        (None, _) => {
                            let ts = Tensor::from_slice(&[t]).to_device(device);
                            self.predict(&input, &ts, text, blocks)
                        }
                    }
                })
            })?;
            let scheduler = &mut self.scheduler;
            x = crate::error::catch_torch(context, || {
                tch::no_grad(|| scheduler.step(&pred, t, &x))
            })?;
            on_step(
                Step {
                    done: i + 1,
                    total,
                    timestep: t,
                },
                &x,
            );
        }
        Ok(x)
    }

    /// Decodes `latents` (from [`Self::denoise`]) into frames as `WanPipeline` does with
    /// `output_type="np"`: de-normalized with the VAE's `latents_mean`/`latents_std`, decoded
    /// frame by frame (the VAE's weights must be on the latents' device), post-processed to
    /// `[batch, frames, height, width, 3]` float32 in [0, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        crate::error::catch_torch(
            || "decoding the latents with the VAE".into(),
            || {
                tch::no_grad(|| {
                    let z = self.vae.denormalize(latents)?;
                    let video = self.vae.decode(&z)?;
                    Ok(crate::vae::to_frames(&video))
                })
            },
        )
    }
}
