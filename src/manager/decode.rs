//! [`Decoding`]: where encoded blocks wait for their decode. An upload moves a block's encoding
//! segment by segment through the staging ring ([`StagingRing`]: two small buffers, each
//! [`Fenced`] as the slots are) on the copy stream; the decode stream decodes each segment into
//! its place in the slot and records the slot's `ready` after the last one. In a peer group the
//! members exchange shares of a block's whole encoding (their protocol moves one buffer per
//! block), so there the staging buffers hold a whole encoding each and its segments are decoded
//! out of one buffer. The CPU test mode decodes from the host copy with the CPU reference
//! decoder (it needs staging buffers only in a peer group, in host memory).

use crate::accel::{self, HostMemory, Stream};
use crate::error::Context;
use crate::error::{Error, Result};
use crate::host;
use crate::stats::{Lane, OffloadStats};
use layerwise_offload_codec::Segments;
use layerwise_offload_codec::gpu::GpuDecoder;
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
    /// Each buffer holds a block's whole encoding (peer groups), not one segment's.
    whole: bool,
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
    /// `buffers` staging buffers of `largest` bytes (the largest segment encoding; with `peer`,
    /// two of the largest whole encoding) and, with CUDA, the decode stream (taken from the
    /// pool) and the GPU decoder (compiled for the device). The CPU test mode stages in host
    /// memory, in the same order. `peer` is the group's size and this member's rank.
    pub(super) fn start(
        backend: &mut Backend,
        largest: usize,
        peer: Option<(usize, usize)>,
        buffers: usize,
    ) -> Result<Option<Decoding>> {
        let device = backend.cuda();
        let bytes = largest.max(1).next_multiple_of(16);
        let buffers = if peer.is_some() { 2 } else { buffers.max(2) };
        let staging = (0..buffers)
            .map(|_| Fenced::new(alloc(device, bytes)?, device.is_some(), peer))
            .collect::<Result<Vec<_>>>()?;
        let gpu = match device {
            Some(device) => {
                backend.take_decode_stream()?;
                let Some(stream) = backend.decode_stream() else {
                    return Ok(None);
                };
                Some(GpuDecoding {
                    decoder: GpuDecoder::new(device)
                        .map_err(codec_error("building the GPU decoder"))?,
                    stream: stream.native_handle()? as usize,
                })
            }
            None => None,
        };
        Ok(Some(Decoding {
            ring: StagingRing::new(staging),
            whole: peer.is_some(),
            gpu,
        }))
    }

    /// Whether blocks decode on the GPU.
    pub(super) fn on_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// Whether each staging buffer holds a whole encoding (peer groups).
    pub(super) fn whole(&self) -> bool {
        self.whole
    }

    /// Bytes of the staging buffers together.
    pub(super) fn bytes(&self) -> usize {
        self.ring.bytes()
    }

    /// The staging buffers (handles), for a peer group to keep while others send into them.
    pub(super) fn buffers(&self) -> Vec<Tensor> {
        self.ring
            .buffers()
            .iter()
            .map(|b| b.buf().shallow_clone())
            .collect()
    }

    /// The index of the next staging buffer (round robin).
    pub(super) fn next(&mut self) -> usize {
        self.ring.next()
    }

    /// Staging buffer `k`.
    pub(super) fn staging(&self, k: usize) -> &Fenced {
        self.ring.buffer(k)
    }

    /// Staging buffer `k`, to record on.
    pub(super) fn staging_mut(&mut self, k: usize) -> &mut Fenced {
        self.ring.buffer_mut(k)
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
    /// is decoded by the CPU reference decoder.
    pub(super) fn upload(
        &mut self,
        segments: &Segments,
        (slot, out): (&mut Fenced, &Tensor),
        streams: Option<(&Stream, &Stream)>,
        (block, timer, timing, copies, stats): (usize, &mut Timer, bool, bool, &mut OffloadStats),
        mut copy_in: impl FnMut(&layerwise_offload_codec::Segment, &Tensor) -> Result<()>,
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
        )
    }

    /// Queues the decode of the whole encoding in staging buffer `k` (its `segments`) into
    /// `out` (the first bytes of `slot`) on `decode`, once the slot's last reader is done;
    /// records the slot's `ready` and the staging buffer's `free` behind it (peer groups). The
    /// caller made `decode` wait for every upload into the staging buffer.
    pub(super) fn decode_whole(
        &mut self,
        k: usize,
        segments: &Segments,
        (slot, out): (&mut Fenced, &Tensor),
        decode: &Stream,
        block: usize,
        (timer, timing, stats): (&mut Timer, bool, &mut OffloadStats),
    ) -> Result<()> {
        let gpu = self.gpu.as_ref().ok_or_else(no_decoder)?;
        slot.wait_writable(decode)?;
        let buf = self.ring.buffer(k).buf();
        for seg in segments {
            let staged = buf
                .f_narrow(0, seg.encoded.start as i64, seg.encoded_len() as i64)
                .context("upload")?;
            let pair = timer.pair(timing, stats)?;
            decode_segment(gpu, &staged, seg, out, decode, block, (timer, pair))?;
        }
        slot.mark_ready(decode)?;
        self.ring.buffer_mut(k).mark_free(decode)
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

/// Decodes `enc` (a segmented encoding) into `out` (both host buffers) with the CPU reference
/// decoder, segment by segment.
pub(super) fn decode_on_cpu(enc: &Tensor, out: &Tensor) -> Result<()> {
    let _span = crate::observe::decode(None, out.numel());
    // SAFETY: `enc` is a host copy or staging buffer that nothing writes while uploads run
    // (update_tensor waits for them; the members of a peer group have all delivered their
    // shares); `out` is a contiguous uint8 host buffer of the slot that no block uses while it
    // is being filled, and does not overlap `enc`.
    let (src, dst) = unsafe { (host::bytes(enc)?, host::bytes_mut(out)?) };
    layerwise_offload_codec::decode_segmented(src, dst, host::worker_threads())
        .map_err(codec_error("decoding a block"))
}

#[cfg(test)]
mod tests {
    use super::{Decoding, decode_on_cpu};
    use crate::manager::device::Backend;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn the_cpu_test_mode_stages_in_host_memory() -> crate::Result<()> {
        let mut cpu = Backend::Cpu;
        let alone = Decoding::start(&mut cpu, 100, None, 2)?.unwrap();
        assert!(!alone.whole(), "segments, outside a peer group");
        assert_eq!(alone.bytes(), 224);
        let mut dec = Decoding::start(&mut cpu, 100, Some((2, 1)), 3)?.unwrap();
        assert!(!dec.on_gpu());
        // Two buffers of the largest encoding, rounded up to 16 bytes, used in turn.
        assert_eq!(
            dec.buffers().iter().map(Tensor::numel).collect::<Vec<_>>(),
            [112, 112]
        );
        assert_eq!((dec.next(), dec.next(), dec.next()), (0, 1, 0));
        assert!(dec.whole(), "a peer group stages whole encodings");
        let mut stats = crate::OffloadStats::default();
        dec.grow(&cpu, 64, &mut stats)?;
        assert_eq!(dec.staging(0).len(), 112, "long enough already");
        dec.grow(&cpu, 200, &mut stats)?;
        assert!((0..2).all(|k| dec.staging(k).len() == 208));
        assert_eq!((dec.bytes(), stats.staging_bytes), (416, 416));
        Ok(())
    }

    #[test]
    fn the_reference_decoder_fills_the_slot_exactly() -> crate::Result<()> {
        let raw = (Tensor::randn([4096], (Kind::Float, Device::Cpu)) * 0.02)
            .to_kind(Kind::BFloat16)
            .view_dtype(Kind::Uint8);
        let bytes = Vec::<u8>::try_from(&raw).unwrap();
        let enc = layerwise_offload_codec::encode_segmented(&bytes, 1024).unwrap();
        assert_eq!(
            layerwise_offload_codec::Segments::walk(&enc).unwrap().len(),
            8,
            "8 segments"
        );
        let enc = Tensor::from_slice(&enc);
        assert!(enc.numel() < raw.numel(), "bf16 weights shrink");
        let out = Tensor::zeros([raw.numel() as i64], (Kind::Uint8, Device::Cpu));
        decode_on_cpu(&enc, &out)?;
        assert!(out.equal(&raw));
        Ok(())
    }
}
