//! The 3-axis rotary position embedding (diffusers' `WanRotaryPosEmbed`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tch::{Device, Kind, Tensor};

/// Rotary tables for frames, height and width, as diffusers computes them: per axis
/// `1 / theta^(2i/d)` in float64, times the position, cos and sin repeated pairwise, then
/// float32. The tables are not parameters (diffusers' buffers are non-persistent).
///
/// The tables are copied to the model's device once, at the first forward there: a copy from
/// pageable host memory at every forward would make the host wait for the device to finish
/// the previous forward before queuing the next one (the whole queue drained at each forward's
/// start, which leaves a layerwise offload's copy stream idle until the host catches up).
#[derive(Debug)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    dims: [i64; 3],
    patch: [i64; 3],
    /// The tables on the last device a forward asked for.
    on_device: Mutex<Option<(Device, Tensor, Tensor)>>,
    /// Copies of the tables made to a device so far.
    copies: AtomicUsize,
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
            on_device: Mutex::new(None),
            copies: AtomicUsize::new(0),
        }
    }

    /// The tables for a latent of `frames x height x width` (before patching), on `device`.
    pub fn forward(&self, frames: i64, height: i64, width: i64, device: Device) -> Rotary {
        let [pt, ph, pw] = self.patch;
        let (f, h, w) = (frames / pt, height / ph, width / pw);
        let dims = self.dims.to_vec();
        let (cos, sin) = self.tables_on(device);
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
            Tensor::cat(&[ef, eh, ew], -1).reshape([1, f * h * w, 1, -1])
        };
        Rotary {
            cos: axes(&cos),
            sin: axes(&sin),
        }
    }

    /// How many times the tables were copied to a device: once per device that forwards ran
    /// on in turn (forwards on the CPU copy nothing).
    pub fn device_copies(&self) -> usize {
        self.copies.load(Ordering::Relaxed)
    }

    /// The cos and sin tables on `device`: the host tables on the CPU, otherwise copies made
    /// at the first call for that device and kept.
    fn tables_on(&self, device: Device) -> (Tensor, Tensor) {
        if device == Device::Cpu {
            return (self.cos.shallow_clone(), self.sin.shallow_clone());
        }
        // A poisoned lock held only tensors (no invariant to break): take it as it is.
        let mut cached = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        match &*cached {
            Some((d, cos, sin)) if *d == device => (cos.shallow_clone(), sin.shallow_clone()),
            _ => {
                let (cos, sin) = (self.cos.to_device(device), self.sin.to_device(device));
                self.copies.fetch_add(1, Ordering::Relaxed);
                *cached = Some((device, cos.shallow_clone(), sin.shallow_clone()));
                (cos, sin)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RotaryEmbedding;
    use tch::Device;

    /// On the CPU the host tables are used as they are: nothing is copied, and the tables of a
    /// grid do not depend on the forwards before.
    #[test]
    fn cpu_forwards_copy_nothing() {
        let rope = RotaryEmbedding::new([4, 6, 6], [1, 2, 2], 64, 10000.0);
        let a = rope.forward(2, 4, 6, Device::Cpu);
        let _ = rope.forward(3, 8, 8, Device::Cpu);
        let b = rope.forward(2, 4, 6, Device::Cpu);
        assert_eq!(a.cos.size(), [1, 2 * 2 * 3, 1, 16]);
        assert!(a.cos.equal(&b.cos) && a.sin.equal(&b.sin));
        assert_eq!(rope.device_copies(), 0);
    }
}
