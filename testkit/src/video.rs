//! Writing a generated video: PNG frames, an MP4 (H.264) through an `ffmpeg` found on `PATH`, or an
//! animated GIF through the `image` crate where there is no ffmpeg.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tch::{Kind, Tensor};

/// Frames as 8-bit RGB: `frames` `[F, H, W, 3]` of floats in [0, 1] (diffusers' `output_type="np"`)
/// rounded as diffusers' `numpy_to_pil` does (`(x * 255).round()`), on the CPU.
pub fn to_rgb8(frames: &Tensor) -> Result<(Vec<Vec<u8>>, u32, u32)> {
    let size = frames.size();
    if size.len() != 4 || size[3] != 3 {
        bail!("frames must be [F, H, W, 3], got {size:?}");
    }
    let (f, h, w) = (size[0], size[1], size[2]);
    let bytes = (frames.to_device(tch::Device::Cpu).to_kind(Kind::Float) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .contiguous();
    let mut out = Vec::with_capacity(f as usize);
    for i in 0..f {
        let frame = bytes.get(i);
        let n = (h * w * 3) as usize;
        let mut v = vec![0u8; n];
        frame.copy_data_u8(&mut v, n);
        out.push(v);
    }
    Ok((out, w as u32, h as u32))
}

/// The video formats this example writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// H.264 in MP4, through `ffmpeg` on `PATH`.
    Mp4,
    /// An animated GIF (256 colours per frame), through the `image` crate.
    Gif,
}

impl Format {
    /// The format `path`'s extension names (`.mp4`, `.gif`).
    pub fn of(path: &Path) -> Result<Format> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("mp4") => Ok(Format::Mp4),
            Some("gif") => Ok(Format::Gif),
            _ => bail!(
                "{}: the video file must end in .mp4 (H.264, needs ffmpeg on PATH) or .gif",
                path.display()
            ),
        }
    }
}

/// Whether an `ffmpeg` that runs is on `PATH`.
pub fn ffmpeg_available() -> bool {
    Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The default output: `video.mp4` where ffmpeg is there, `video.gif` otherwise.
pub fn default_out() -> PathBuf {
    PathBuf::from(if ffmpeg_available() {
        "video.mp4"
    } else {
        "video.gif"
    })
}

/// Writes `frames` (8-bit RGB, `w` x `h`) to `path` at `fps` frames per second.
pub fn write_video(path: &Path, frames: &[Vec<u8>], w: u32, h: u32, fps: u32) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match Format::of(path)? {
        Format::Mp4 => write_mp4(path, frames, w, h, fps),
        Format::Gif => write_gif(path, frames, w, h, fps),
    }
}

/// H.264 (yuv420p, CRF 18) in MP4 through ffmpeg, frames fed raw on its standard input.
fn write_mp4(path: &Path, frames: &[Vec<u8>], w: u32, h: u32, fps: u32) -> Result<()> {
    if !ffmpeg_available() {
        bail!(
            "{}: writing MP4 needs ffmpeg on PATH (install it, e.g. `apt-get install ffmpeg`), or name a .gif file",
            path.display()
        );
    }
    // yuv420p needs even sides: pad by one pixel where a side is odd.
    let mut child = Command::new("ffmpeg")
        .args([
            "-y",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
        ])
        .arg(format!("{w}x{h}"))
        .args([
            "-r",
            &fps.to_string(),
            "-i",
            "-",
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
        ])
        .args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            "18",
            "-movflags",
            "+faststart",
        ])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .context("starting ffmpeg")?;
    {
        let mut stdin = child.stdin.take().context("ffmpeg's standard input")?;
        for f in frames {
            stdin.write_all(f).context("writing frames to ffmpeg")?;
        }
    }
    let status = child.wait().context("waiting for ffmpeg")?;
    if !status.success() {
        bail!("ffmpeg failed writing {} ({status})", path.display());
    }
    Ok(())
}

/// An animated GIF that loops, each frame quantized to its own 256-colour palette.
fn write_gif(path: &Path, frames: &[Vec<u8>], w: u32, h: u32, fps: u32) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    use image::{Delay, Frame, RgbaImage};
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = GifEncoder::new_with_speed(std::io::BufWriter::new(file), 30);
    enc.set_repeat(Repeat::Infinite)?;
    let delay = Delay::from_numer_denom_ms(1000, fps.max(1));
    for f in frames {
        let rgba: Vec<u8> = f
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect();
        let img = RgbaImage::from_raw(w, h, rgba).context("frame size")?;
        enc.encode_frame(Frame::from_parts(img, 0, 0, delay))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Writes each frame as `dir/frame_0000.png`, ... (the directory is created).
pub fn write_pngs(dir: &Path, frames: &[Vec<u8>], w: u32, h: u32) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, f) in frames.iter().enumerate() {
        let p = dir.join(format!("frame_{i:04}.png"));
        image::save_buffer(&p, f, w, h, image::ExtendedColorType::Rgb8)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
