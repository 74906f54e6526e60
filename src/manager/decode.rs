//! [`Decoding`]: where encoded blocks wait for their decode. An upload moves a block's encoding
//! segment by segment through the staging ring ([`StagingRing`]: two small buffers, each
//! [`Fenced`] as the slots are) on the copy stream; the decode stream decodes each segment into
//! its place in the slot and records the slot's `ready` after the last one. In a peer group each
//! member does so with its share of the segments only ([`super::share`]). The CPU test mode
//! stages in host memory and decodes with the CPU reference decoder.

use crate::accel::{self, HostMemory, Stream};
use crate::error::Context;
use crate::error::{Error, Result};
use crate::host;
use crate::stats::{Lane, OffloadStats};
use layerwise_offload_codec::Segments;
use layerwise_offload_codec::gpu::{self as codec_gpu, DecoderOptions, GpuDecoder};
use tch::Tensor;

use super::device::Backend;
use super::fence::Fenced;
use super::staging::StagingRing;
use super::timing::Timer;

/// The staging ring and, with CUDA, the decoder. The buffers' events are made once and
/// recorded again at each upload: nothing is allocated in the loop.
#[derive(Debug)]
pub(super) struct Decoding {
    ring: StagingRing,
    gpu: Option<GpuDecoding>,
}

/// The GPU decoder and the stream it decodes on.
#[derive(Debug)]
struct GpuDecoding {
    decoder: GpuDecoder,
    /// The decode stream's native handle (a `cudaStream_t`), as an address.
    stream: usize,
}

pub(super) fn codec_error(
    op: &'static str,
) -> impl Fn(layerwise_offload_codec::CodecError) -> Error {
    move |source| Error::Codec { op, source }
}

/// The segments of block `block`'s encoding `enc` (a host buffer), which must decode to `raw`
/// bytes. Reads the segment records only: encodings from outside this process were verified
/// when they were opened or read, and the GPU decoder checks each segment's structure.
pub(super) fn segments_of(enc: &Tensor, raw: usize, block: usize) -> Result<Segments> {
    // SAFETY: `enc` is a host copy or a disk-tier staging buffer holding the block's encoding,
    // which nothing writes while an upload may read it (update_tensor waits for the uploads;
    // a disk-tier buffer is read into again only after it is given back).
    let bytes = unsafe { host::bytes(enc)? };
    let segments = Segments::walk(bytes).map_err(codec_error("reading a block's segments"))?;
    // The GPU decoder writes each segment at its raw offset of the slot, which must be 16-byte
    // aligned (this crate's segments start at multiples of 64 KiB).
    if let Some(s) = segments.iter().find(|s| !s.raw.start.is_multiple_of(16)) {
        return Err(Error::InvalidArgument {
            op: "upload",
            message: format!(
                "block {block}'s encoding has a segment at raw offset {}, not a multiple of 16: encode it again with segments of a multiple of 64 KiB",
                s.raw.start
            ),
        });
    }
    if segments.decoded_len() != raw {
        return Err(Error::InvalidArgument {
            op: "upload",
            message: format!(
                "block {block}'s encoding decodes to {} bytes, its layout has {raw}: this is a bug",
                segments.decoded_len()
            ),
        });
    }
    Ok(segments)
}

impl Decoding {
    /// `buffers` (at least 2) staging buffers of `largest` bytes (the largest segment encoding)
    /// and, with CUDA, the decode stream (taken from the pool) and the GPU decoder (compiled
    /// for the device; at most `grid` blocks a launch, None for a full grid). The CPU test mode
    /// stages in host memory, in the same order.
    pub(super) fn start(
        backend: &mut Backend,
        largest: usize,
        buffers: usize,
        grid: Option<u32>,
    ) -> Result<Option<Decoding>> {
        let device = backend.cuda();
        let bytes = largest.max(1).next_multiple_of(16);
        let staging = (0..buffers.max(2))
            .map(|_| Fenced::new(alloc(device, bytes)?, device.is_some(), None))
            .collect::<Result<Vec<_>>>()?;
        let gpu = match device {
            Some(device) => {
                backend.take_decode_stream()?;
                let Some(stream) = backend.decode_stream() else {
                    return Ok(None);
                };
                Some(GpuDecoding {
                    decoder: codec_gpu::Device::new(device)
                        .and_then(|d| {
                            GpuDecoder::with_options(
                                d,
                                DecoderOptions::default().with_max_blocks(grid),
                            )
                        })
                        .map_err(codec_error("building the GPU decoder"))?,
                    stream: stream.native_handle()? as usize,
                })
            }
            None => None,
        };
        Ok(Some(Decoding {
            ring: StagingRing::new(staging),
            gpu,
        }))
    }

    /// Whether blocks decode on the GPU.
    pub(super) fn on_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// The most blocks a GPU decode launches (None in the CPU test mode).
    #[cfg(feature = "testing")]
    pub(super) fn grid(&self) -> Option<u32> {
        self.gpu.as_ref().map(|g| g.decoder.max_blocks())
    }

    /// Bytes of the staging buffers together.
    pub(super) fn bytes(&self) -> usize {
        self.ring.bytes()
    }

    /// Staging buffer `k`.
    #[cfg(test)]
    fn staging(&self, k: usize) -> &Fenced {
        self.ring.buffer(k)
    }

    /// Makes every staging buffer hold at least `len` bytes (an encoding, or a segment's, got
    /// longer), and counts them in `stats`. The caller waited for the copy and decode streams.
    pub(super) fn grow(
        &mut self,
        backend: &Backend,
        len: usize,
        stats: &mut OffloadStats,
    ) -> Result<()> {
        if self.ring.buffers().iter().all(|b| b.len() >= len) {
            return Ok(());
        }
        let bytes = len.next_multiple_of(16);
        self.ring
            .replace(|| Fenced::new(alloc(backend.cuda(), bytes)?, backend.has_events(), None))?;
        stats.staging_bytes = self.ring.bytes() as u64;
        Ok(())
    }

    /// Queues the upload of block `block` (the `segments` of its encoding) into `out` (the
    /// first bytes of `slot`) through the staging ring: each segment's copy into the next
    /// staging buffer (`copy_in(segment, staging)` queues it on the copy stream of `streams`),
    /// its decode into its place in `out` on the decode stream, timed per segment when `timing`
    /// (pairs from `timer`, read back into `stats`). With `copies` the segment copies are
    /// timed one by one too, each from the end of its wait for a staging buffer (the caller
    /// then times no interval around them): the copy stream's busy time without the waits.
    /// Without `streams` (the CPU test mode) the copies are done by `copy_in` and each segment
    /// is decoded by the CPU reference decoder. `decoded(segment, slot)` follows each decode
    /// (a peer group sends the decoded bytes on from there).
    pub(super) fn upload(
        &mut self,
        segments: &[layerwise_offload_codec::Segment],
        (slot, out): (&mut Fenced, &Tensor),
        streams: Option<(&Stream, &Stream)>,
        (block, timer, timing, copies, stats): (usize, &mut Timer, bool, bool, &mut OffloadStats),
        mut copy_in: impl FnMut(&layerwise_offload_codec::Segment, &Tensor) -> Result<()>,
        decoded: impl FnMut(&layerwise_offload_codec::Segment, &mut Fenced) -> Result<()>,
    ) -> Result<()> {
        let gpu = self.gpu.as_ref();
        if streams.is_some() && gpu.is_none() {
            return Err(no_decoder());
        }
        // Both closures time on the timer, one at a time.
        let timed = std::cell::RefCell::new((timer, stats));
        let mut first = true;
        self.ring.upload(
            segments,
            slot,
            streams,
            |seg, staged| match streams {
                Some((copy, _)) if timing && copies => {
                    let (timer, stats) = &mut *timed.borrow_mut();
                    let pair = timer.pair(true, stats)?;
                    let key = (block, seg.encoded_len() as u64, Lane::Upload);
                    let counted = std::mem::replace(&mut first, false);
                    timer.time_part(pair, copy, key, counted, || copy_in(seg, staged))
                }
                _ => copy_in(seg, staged),
            },
            |seg, staged| match (gpu, streams) {
                (Some(gpu), Some((_, decode))) => {
                    let (timer, stats) = &mut *timed.borrow_mut();
                    let pair = timer.pair(timing, stats)?;
                    decode_segment(gpu, staged, seg, out, decode, block, (timer, pair))
                }
                _ => decode_segment_on_cpu(staged, seg, out),
            },
            decoded,
        )
    }
}

/// Queues the decode of one segment's encoding `staged` (device memory) into its raw range of
/// `out` on `decode`, timed with `pair`. The caller ordered `decode` after the copy into
/// `staged` and after the slot's last reader, and records `free` and `ready` after.
fn decode_segment(
    gpu: &GpuDecoding,
    staged: &Tensor,
    seg: &layerwise_offload_codec::Segment,
    out: &Tensor,
    decode: &Stream,
    block: usize,
    (timer, pair): (&mut Timer, super::timing::Pair),
) -> Result<()> {
    let dst = out
        .f_narrow(0, seg.raw.start as i64, seg.raw.len() as i64)
        .context("upload")?;
    let _span = crate::observe::decode(Some(block), dst.numel());
    let (src, dst_ptr) = (staged.data_ptr() as u64, dst.data_ptr() as u64);
    let native = gpu.stream as *mut std::ffi::c_void;
    timer.time(
        pair,
        decode,
        (block, dst.numel() as u64, Lane::Decode),
        || {
            // SAFETY: the staging buffer and the slot are device memory of this device that
            // live until restore or Drop, which synchronize this stream first; both ranges are
            // 16-byte aligned (the allocator's blocks; segment encodings start at 16-byte
            // offsets of a whole encoding, and segments at multiples of the segment size, a
            // multiple of 64 KiB, in the slot); the caller made this stream wait for the copy
            // into the staging buffer, which is written again only after the `free` recorded
            // behind this decode, and for the slot's last reader; the slot is not read before
            // `ready`, recorded after the last segment.
            unsafe {
                gpu.decoder
                    .decode_async(src, staged.numel(), dst_ptr, dst.numel(), native)
            }
            .map_err(codec_error("decoding a block"))
        },
    )
}

/// Decodes one segment's encoding `staged` (a host staging buffer) into its raw range of
/// `out` (the host slot) with the CPU reference decoder.
fn decode_segment_on_cpu(
    staged: &Tensor,
    seg: &layerwise_offload_codec::Segment,
    out: &Tensor,
) -> Result<()> {
    let dst = out
        .f_narrow(0, seg.raw.start as i64, seg.raw.len() as i64)
        .context("upload")?;
    let _span = crate::observe::decode(None, dst.numel());
    // SAFETY: `staged` is a host staging buffer that the copy just filled and nothing else
    // writes until its next segment; `dst` is part of a contiguous uint8 host slot that no block
    // uses while it is being filled, and does not overlap `staged`.
    let (src, dst) = unsafe { (host::bytes(staged)?, host::bytes_mut(&dst)?) };
    layerwise_offload_codec::decode_with_threads(src, dst, host::worker_threads())
        .map_err(codec_error("decoding a block"))
}

/// A staging buffer of `bytes` bytes: device memory with CUDA, host memory elsewhere.
fn alloc(device: Option<usize>, bytes: usize) -> Result<Tensor> {
    match device {
        Some(d) => accel::alloc_device(bytes, d),
        None => accel::alloc_host(bytes, HostMemory::Pageable),
    }
}

fn no_decoder() -> Error {
    Error::InvalidArgument {
        op: "upload",
        message: "an encoded block on CUDA with no GPU decoder: this is a bug".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::Decoding;
    use crate::manager::device::Backend;
    #[test]
    fn the_cpu_test_mode_stages_in_host_memory() -> crate::Result<()> {
        let mut cpu = Backend::Cpu;
        // At least two buffers of the largest segment encoding, rounded up to 16 bytes.
        let two = Decoding::start(&mut cpu, 100, 1, None)?.unwrap();
        assert_eq!(two.bytes(), 224);
        let mut dec = Decoding::start(&mut cpu, 100, 2, None)?.unwrap();
        assert!(!dec.on_gpu());
        assert!((0..2).all(|k| dec.staging(k).len() == 112));
        let mut stats = crate::OffloadStats::default();
        dec.grow(&cpu, 64, &mut stats)?;
        assert_eq!(dec.staging(0).len(), 112, "long enough already");
        dec.grow(&cpu, 200, &mut stats)?;
        assert!((0..2).all(|k| dec.staging(k).len() == 208));
        assert_eq!((dec.bytes(), stats.staging_bytes), (416, 416));
        let three = Decoding::start(&mut cpu, 100, 3, None)?.unwrap();
        assert_eq!(three.bytes(), 336);
        Ok(())
    }
}
