//! Where blocks compute: a CUDA device with its copy stream, the CPU (the CPU test mode), or
//! nowhere (disabled). The one place that knows the difference: the rest of the manager asks
//! for streams, synchronization and memory through [`Backend`]'s methods.

use crate::accel::{self, HostMemory, Stream};
use crate::error::Context;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The compute backend of a manager.
#[derive(Debug)]
pub(super) enum Backend {
    /// No CUDA device (or disabled): every call is a no-op.
    Disabled,
    /// Compute on the CPU, synchronous copies (the CPU test mode).
    Cpu,
    /// Compute on CUDA device `device`; uploads on `copy` (from the pool, taken at
    /// `initialize`).
    /// Compressed blocks decode on `decode` (taken at `initialize` when a block is encoded).
    /// Pool streams whose index is in `avoid` are drawn and passed over
    /// ([`OffloadConfig::avoid_pool_streams`](super::OffloadConfig)).
    Cuda {
        device: usize,
        copy: Option<Stream>,
        decode: Option<Stream>,
        avoid: Vec<usize>,
    },
}

/// Streams of each priority in libtorch's pool (c10's `kStreamsPerPool`).
pub(super) const POOL_STREAMS: usize = 32;

/// A pool stream's index in its pool of [`POOL_STREAMS`], from its id: c10 packs a pool
/// stream's id as `index << 5 | priority level << 1 | 1` (the default stream's id is 0, an
/// external stream's its even address). None for a stream not from the pool.
pub(super) fn pool_index(id: i64) -> Option<usize> {
    (id & 1 == 1 && (id >> 1) & 0xf != 0 && id >> 10 == 0).then_some(((id >> 5) & 0x1f) as usize)
}

/// The next stream of `device`'s pool (normal priority) whose index is not in `avoid`: the ones
/// in it are drawn and passed over. `avoid` leaves at least one index (checked at build), so a
/// round of the pool finds one unless other threads draw at the same time; after two rounds
/// the stream drawn last is taken.
fn pool_stream(device: usize, avoid: &[usize]) -> Result<Stream> {
    let mut s = Stream::from_pool(device)?;
    for _ in 0..2 * POOL_STREAMS {
        if !pool_index(s.id()).is_some_and(|i| avoid.contains(&i)) {
            break;
        }
        s = Stream::from_pool(device)?;
    }
    Ok(s)
}

impl Backend {
    /// The backend a configuration asks for: CUDA device `device` if usable, the CPU in the
    /// test mode, disabled when off. Without a usable device: disabled with `allow_cpu_fallback`,
    /// [`Error::NoDevice`] otherwise.
    pub(super) fn select(
        enabled: bool,
        cpu_test_mode: bool,
        device: usize,
        allow_cpu_fallback: bool,
        avoid: &[usize],
    ) -> Result<Backend> {
        Ok(if !enabled {
            Backend::Disabled
        } else if cpu_test_mode {
            Backend::Cpu
        } else {
            match accel::require_device("OffloadConfig::build", device) {
                Ok(()) => Backend::Cuda {
                    device,
                    copy: None,
                    decode: None,
                    avoid: avoid.to_vec(),
                },
                Err(_) if allow_cpu_fallback => Backend::Disabled,
                Err(Error::NoDevice { op, reason }) => {
                    return Err(Error::NoDevice {
                        op,
                        reason: format!(
                            "{reason} (allow_cpu_fallback(true) builds a disabled manager instead)"
                        ),
                    });
                }
                Err(e) => return Err(e),
            }
        })
    }

    /// Whether the manager does anything.
    pub(super) fn is_enabled(&self) -> bool {
        !matches!(self, Backend::Disabled)
    }

    /// The CUDA device index, if blocks compute on CUDA.
    pub(super) fn cuda(&self) -> Option<usize> {
        match self {
            Backend::Cuda { device, .. } => Some(*device),
            _ => None,
        }
    }

    /// The device blocks compute on.
    pub(super) fn compute_device(&self) -> Device {
        match self.cuda() {
            Some(device) => Device::Cuda(device),
            None => Device::Cpu,
        }
    }

    /// The calling thread's current stream on the compute device (CUDA only).
    pub(super) fn compute_stream(&self) -> Result<Option<Stream>> {
        self.cuda().map(Stream::current).transpose()
    }

    /// The stream uploads run on (CUDA only, once taken).
    pub(super) fn copy_stream(&self) -> Option<Stream> {
        match self {
            Backend::Cuda { copy, .. } => *copy,
            _ => None,
        }
    }

    /// Takes the copy stream from the pool if not yet taken (CUDA only).
    pub(super) fn take_copy_stream(&mut self) -> Result<()> {
        if let Backend::Cuda {
            device,
            copy,
            avoid,
            ..
        } = self
            && copy.is_none()
        {
            *copy = Some(pool_stream(*device, avoid)?);
        }
        Ok(())
    }

    /// `n` streams from the pool for sending to peer group members: one shared by all, or one
    /// each with `per_member`. Empty outside CUDA.
    pub(super) fn push_streams(&self, n: usize, per_member: bool) -> Result<Vec<Stream>> {
        let Backend::Cuda { device, avoid, .. } = self else {
            return Ok(Vec::new());
        };
        let one = pool_stream(*device, avoid)?;
        (0..n)
            .map(|_| {
                if per_member {
                    pool_stream(*device, avoid)
                } else {
                    Ok(one)
                }
            })
            .collect()
    }

    /// The stream compressed blocks are decoded on (CUDA only, once taken).
    pub(super) fn decode_stream(&self) -> Option<Stream> {
        match self {
            Backend::Cuda { decode, .. } => *decode,
            _ => None,
        }
    }

    /// Takes the decode stream from the pool if not yet taken (CUDA only).
    pub(super) fn take_decode_stream(&mut self) -> Result<()> {
        if let Backend::Cuda {
            device,
            decode,
            avoid,
            ..
        } = self
            && decode.is_none()
        {
            *decode = Some(pool_stream(*device, avoid)?);
        }
        Ok(())
    }

    /// Waits on the host until every queued upload (and decode) has finished.
    pub(super) fn sync_copies(&self) {
        for s in [self.copy_stream(), self.decode_stream()]
            .into_iter()
            .flatten()
        {
            let _ = s.synchronize();
        }
    }

    /// Waits on the host until the compute device has finished all its work (CUDA only).
    pub(super) fn synchronize(&self) -> Result<()> {
        match self.cuda() {
            Some(device) => accel::synchronize_device(device),
            None => Ok(()),
        }
    }

    /// How host buffers are allocated: pinned on CUDA when asked for, pageable otherwise.
    pub(super) fn host_memory(&self, pin: bool) -> HostMemory {
        match self {
            Backend::Cuda { .. } if pin => HostMemory::Pinned,
            _ => HostMemory::Pageable,
        }
    }

    /// Whether device events exist (and so timing, slot events and timelines).
    pub(super) fn has_events(&self) -> bool {
        self.cuda().is_some()
    }

    /// Bytes free on the compute device (CUDA only; None elsewhere).
    pub(super) fn free_memory(&self) -> Result<Option<u64>> {
        self.cuda()
            .map(|device| accel::memory_info(device).map(|(free, _)| free))
            .transpose()
    }

    /// The peak of device memory allocated so far (CUDA only).
    pub(super) fn peak_memory(&self) -> Option<u64> {
        self.cuda()
            .and_then(|device| accel::memory_stats(device).ok())
            .map(|m| m.peak_allocated)
    }

    /// A `uint8` buffer of `bytes` bytes on the compute device, for one slot.
    pub(super) fn alloc_slot(&self, bytes: usize) -> Result<Tensor> {
        match self.cuda() {
            Some(device) => accel::alloc_device(bytes, device),
            None => Tensor::f_empty([bytes as i64], (Kind::Uint8, Device::Cpu))
                .context("allocating CPU slots"),
        }
    }
}

/// Queues the copy of `src` into `dst` on `stream` (CUDA).
///
/// # Safety
/// Both tensors must stay alive and `src` unwritten until the copy has run on `stream`, and
/// nothing may read `dst` before then without waiting for the stream.
pub(super) unsafe fn copy(dst: &mut Tensor, src: &Tensor, stream: &Stream) -> Result<()> {
    // SAFETY: the caller's obligations, passed on.
    unsafe { accel::copy_async(dst, src, Some(stream)) }
}

/// Copies `src` into `dst` now, on the host's side of every stream (the CPU test mode).
pub(super) fn copy_now(dst: &mut Tensor, src: &Tensor, op: &'static str) -> Result<()> {
    tch::no_grad(|| dst.f_copy_(src))
        .map(|_| ())
        .map_err(|e| Error::from((op, e)))
}

/// `dst`'s part at each piece's offset: `(part of dst, piece)` for host pieces `(offset in dst,
/// bytes)`.
fn parts<'a>(
    dst: &Tensor,
    pieces: &'a [(usize, Tensor)],
    op: &'static str,
) -> Result<Vec<(Tensor, &'a Tensor)>> {
    pieces
        .iter()
        .map(|(o, piece)| {
            dst.f_narrow(0, *o as i64, piece.numel() as i64)
                .map(|d| (d, piece))
                .map_err(|e| Error::from((op, e)))
        })
        .collect()
}

/// Queues the copies of host pieces into `dst` on `stream`: each `(offset in dst, bytes)` as
/// [`copy`] does.
///
/// # Safety
/// As [`copy`], for every piece.
pub(super) unsafe fn copy_pieces(
    dst: &Tensor,
    pieces: &[(usize, Tensor)],
    stream: &Stream,
    op: &'static str,
) -> Result<()> {
    for (mut d, piece) in parts(dst, pieces, op)? {
        // SAFETY: the caller's obligations, passed on.
        unsafe { copy(&mut d, piece, stream)? };
    }
    Ok(())
}

/// Copies host pieces into `dst` now, as [`copy_now`] does.
pub(super) fn copy_pieces_now(
    dst: &Tensor,
    pieces: &[(usize, Tensor)],
    op: &'static str,
) -> Result<()> {
    for (mut d, piece) in parts(dst, pieces, op)? {
        copy_now(&mut d, piece, op)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pool_index;

    #[test]
    fn pool_indices_are_read_from_c10s_stream_ids() {
        // index << 5 | priority level << 1 | 1: level 1 normal, 4 high on Hopper.
        assert_eq!(pool_index(1 << 5 | 1 << 1 | 1), Some(1));
        assert_eq!(pool_index(8 << 5 | 1 << 1 | 1), Some(8));
        assert_eq!(pool_index(31 << 5 | 4 << 1 | 1), Some(31));
        // The default stream, an external stream's address, a malformed id.
        assert_eq!(pool_index(0), None);
        assert_eq!(pool_index(0x7f00_1000), None);
        assert_eq!(pool_index(1), None);
    }
}
