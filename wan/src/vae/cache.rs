//! The decoder's per-convolution feature cache (diffusers' `feat_cache` / `feat_idx`).
//!
//! The decoder runs one latent frame at a time. Each causal convolution with a temporal kernel
//! needs the frames before its input: it keeps the last [`CACHE_T`] frames it saw (at its own
//! resolution) in its slot, and the next chunk prepends them. Slots are visited in the same
//! order in every chunk (the index restarts at 0), so slot `i` always belongs to the same
//! convolution. The cache therefore holds at most `CACHE_T` frames per convolution whatever the
//! number of frames decoded: memory does not grow with the video's length.

use tch::Tensor;

/// Frames each causal convolution keeps from one chunk to the next (diffusers' `CACHE_T`).
pub const CACHE_T: i64 = 2;

/// One convolution's slot.
#[derive(Debug)]
enum Slot {
    /// Not visited yet (diffusers' `None`).
    Empty,
    /// An `upsample3d` seen once, on the first chunk, which it passes through without its
    /// time convolution (diffusers' `"Rep"`).
    Rep,
    /// The last frames of the convolution's input.
    Frames(Tensor),
}

/// What an `upsample3d` does with the current chunk.
#[derive(Debug)]
pub(crate) enum TimeStep {
    /// The first chunk: no time convolution, the frame count stays.
    First,
    /// Run the time convolution, after these cached frames (`None`: zero padding).
    Conv(Option<Tensor>),
}

/// The slots of one decode, in the order the decoder visits them.
#[derive(Debug, Default)]
pub(crate) struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

/// `x[:, :, -CACHE_T:].clone()`.
fn last_frames(x: &Tensor) -> Tensor {
    let t = x.size()[2];
    let n = t.min(CACHE_T);
    x.narrow(2, t - n, n).copy()
}

/// `t[:, :, -1, :, :].unsqueeze(2)`.
fn last_frame(t: &Tensor) -> Tensor {
    t.select(2, -1).unsqueeze(2)
}

impl FeatCache {
    /// Restarts the visit at slot 0 (diffusers' `self._conv_idx = [0]` before each chunk).
    pub(crate) fn start_chunk(&mut self) {
        self.idx = 0;
    }

    fn slot(&mut self) -> &mut Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        &mut self.slots[self.idx]
    }

    /// A causal convolution (`conv_in`, a residual block's `conv1`/`conv2`, `conv_out`) about
    /// to run on `x`: stores `x`'s last `CACHE_T` frames (with the previous chunk's last frame
    /// in front when `x` has only one) and returns what the slot held before, the frames the
    /// convolution prepends.
    pub(crate) fn swap(&mut self, x: &Tensor) -> Option<Tensor> {
        let mut cache_x = last_frames(x);
        let slot = self.slot();
        let old = match std::mem::replace(slot, Slot::Empty) {
            Slot::Frames(t) => Some(t),
            Slot::Empty | Slot::Rep => None,
        };
        if cache_x.size()[2] < 2
            && let Some(prev) = &old
        {
            cache_x = Tensor::cat(&[last_frame(prev), cache_x], 2);
        }
        *slot = Slot::Frames(cache_x);
        self.idx += 1;
        old
    }

    /// An `upsample3d`'s time convolution about to run on `x` (diffusers' `WanResample.forward`
    /// with `feat_cache`): on the first chunk it marks the slot and skips the convolution; then
    /// it keeps `x`'s last frames (after the previous chunk's last frame, or a zero frame on the
    /// chunk after the first) and returns the previous frames to prepend.
    pub(crate) fn time_step(&mut self, x: &Tensor) -> TimeStep {
        let slot = self.slot();
        let step = match std::mem::replace(slot, Slot::Empty) {
            Slot::Empty => {
                *slot = Slot::Rep;
                TimeStep::First
            }
            Slot::Rep => {
                let mut cache_x = last_frames(x);
                if cache_x.size()[2] < 2 {
                    cache_x = Tensor::cat(&[cache_x.zeros_like(), cache_x], 2);
                }
                *slot = Slot::Frames(cache_x);
                TimeStep::Conv(None)
            }
            Slot::Frames(prev) => {
                let mut cache_x = last_frames(x);
                if cache_x.size()[2] < 2 {
                    cache_x = Tensor::cat(&[last_frame(&prev), cache_x], 2);
                }
                *slot = Slot::Frames(cache_x);
                TimeStep::Conv(Some(prev))
            }
        };
        self.idx += 1;
        step
    }

    /// Slots visited so far.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The most frames any slot holds.
    pub(crate) fn max_frames(&self) -> i64 {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Frames(t) => Some(t.size()[2]),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Bytes the cached frames take.
    pub(crate) fn bytes(&self) -> i64 {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Frames(t) => Some(t.numel() as i64 * t.kind().elt_size_in_bytes() as i64),
                _ => None,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn frames(t: i64, v: f64) -> Tensor {
        Tensor::full([1, 2, t, 3, 3], v, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn a_slot_keeps_at_most_cache_t_frames_with_the_previous_last_one_in_front() {
        let mut c = FeatCache::default();
        assert!(c.swap(&frames(1, 1.0)).is_none());
        assert_eq!(c.max_frames(), 1);
        c.start_chunk();
        let prev = c.swap(&frames(1, 2.0)).unwrap();
        assert_eq!(prev.size()[2], 1);
        assert_eq!(c.max_frames(), 2);
        c.start_chunk();
        let prev = c.swap(&frames(4, 3.0)).unwrap();
        // The previous chunk's [1, 2]; now the last two of four.
        assert_eq!(
            prev.mean_dim(&[0i64, 1, 3, 4][..], false, Kind::Float)
                .size(),
            [2]
        );
        assert_eq!(prev.select(2, 0).mean(Kind::Float).double_value(&[]), 1.0);
        assert_eq!(prev.select(2, 1).mean(Kind::Float).double_value(&[]), 2.0);
        assert_eq!(c.max_frames(), 2);
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), 2 * 2 * 3 * 3 * 4);
    }

    #[test]
    fn upsample3d_skips_the_first_chunk_then_starts_from_a_zero_frame() {
        let mut c = FeatCache::default();
        assert!(matches!(c.time_step(&frames(1, 1.0)), TimeStep::First));
        c.start_chunk();
        assert!(matches!(c.time_step(&frames(1, 2.0)), TimeStep::Conv(None)));
        c.start_chunk();
        let TimeStep::Conv(Some(prev)) = c.time_step(&frames(1, 3.0)) else {
            panic!("the third chunk runs the time convolution after the cached frames");
        };
        assert_eq!(prev.select(2, 0).abs().max().double_value(&[]), 0.0);
        assert_eq!(prev.select(2, 1).mean(Kind::Float).double_value(&[]), 2.0);
    }
}
