//! Compressed transport ([`OffloadConfig::compress`](crate::OffloadConfig::compress)): each
//! streamed block is encoded once at `initialize` (the `layerwise-offload-codec` crate), only
//! the encoding stays in host memory, and an upload moves the encoding into one of two device
//! staging buffers on the copy stream, then decodes it into the slot on the decode stream,
//! where the slot's `ready` event is recorded. The two staging buffers let the copy of the next
//! block run while this one decodes; a staging buffer is written again only after an event
//! behind the decode out of it. The CPU test mode decodes with the CPU reference decoder.

use crate::accel::{self, Event};
use crate::error::{Error, Result};
use crate::host::{self, HostBlock};
use crate::stats::Lane;
use layerwise_offload_codec::{Encoder, gpu::GpuDecoder};
use tch::Tensor;

use super::LayerwiseOffloadManager;
use super::device;
use super::timing::Pair;

/// Device staging buffers: one being decoded from, one being uploaded into.
const STAGING: usize = 2;

/// The GPU side of decoding (CUDA only). Its events are made once and recorded again at each
/// upload: nothing is allocated in the loop.
#[derive(Debug)]
pub(super) struct Decoding {
    gpu: GpuDecoder,
    /// The decode stream's native handle (a `cudaStream_t`), as an address.
    stream: usize,
    staging: Vec<Tensor>,
    /// Per staging buffer: recorded after the upload into it.
    uploaded: Vec<Event>,
    /// Per staging buffer: recorded after the last decode out of it (once `decoded[k]`).
    free: Vec<Event>,
    decoded: Vec<bool>,
    next: usize,
}

fn codec_error(op: &'static str) -> impl Fn(layerwise_offload_codec::CodecError) -> Error {
    move |source| Error::Codec { op, source }
}

impl LayerwiseOffloadManager {
    /// Encodes `raw` (a block's raw host bytes, a contiguous 1-D uint8 CPU tensor) into a new
    /// host buffer of the manager's host memory kind, and counts it.
    pub(super) fn encode_block(&mut self, raw: &Tensor) -> Result<HostBlock> {
        // SAFETY: the caller filled `raw` and does not write it while this runs.
        let input = unsafe { host::bytes(raw)? };
        let plan = Encoder::new()
            .with_threads(host::worker_threads())
            .plan(input)
            .map_err(codec_error("encoding a block"))?;
        let out = accel::alloc_host(plan.encoded_len().max(1), self.host_memory())?;
        // SAFETY: `out` is a fresh buffer owned here.
        let dst = unsafe { host::bytes_mut(&out)? };
        plan.write(&mut dst[..plan.encoded_len()])
            .map_err(codec_error("encoding a block"))?;
        let out = out
            .f_narrow(0, 0, plan.encoded_len() as i64)
            .map_err(|e| Error::from(("encoding a block", e)))?;
        self.stats.encoded_blocks += 1;
        self.stats.encoded_bytes += plan.encoded_len() as u64;
        self.stats.raw_encoded_bytes += input.len() as u64;
        self.stats.host_bytes += plan.encoded_len() as u64;
        Ok(HostBlock::encoded(out, input.len()))
    }

    /// Once blocks are encoded (CUDA): the decode stream, the GPU decoder (compiled for the
    /// device) and the two staging buffers of the largest encoding.
    pub(super) fn start_decoding(&mut self) -> Result<()> {
        let Some(device) = self.backend.cuda() else {
            return Ok(());
        };
        let largest = self
            .blocks
            .iter()
            .filter_map(|b| b.host.as_ref()?.encoding().map(|(e, _)| e.numel()))
            .max();
        let Some(largest) = largest else {
            return Ok(());
        };
        self.backend.take_decode_stream()?;
        let stream = match self.backend.decode_stream() {
            Some(s) => s.native_handle()? as usize,
            None => return Ok(()),
        };
        let gpu = GpuDecoder::new(device).map_err(codec_error("building the GPU decoder"))?;
        let staging = (0..STAGING)
            .map(|_| accel::alloc_device(largest.next_multiple_of(16), device))
            .collect::<Result<Vec<_>>>()?;
        let events = || {
            (0..STAGING)
                .map(|_| Event::new())
                .collect::<Result<Vec<_>>>()
        };
        self.decoding = Some(Decoding {
            gpu,
            stream,
            staging,
            uploaded: events()?,
            free: events()?,
            decoded: vec![false; STAGING],
            next: 0,
        });
        Ok(())
    }

    /// Uploads encoded block `block` (`enc`, `raw_len` bytes raw) into slot `s`: the encoding
    /// into a staging buffer on the copy stream, the decode into the slot on the decode stream
    /// (CUDA), or straight into the slot on the CPU.
    pub(super) fn upload_encoded(
        &mut self,
        block: usize,
        s: usize,
        (enc, raw_len): (&Tensor, usize),
        pair: Pair,
    ) -> Result<()> {
        let out = self.slots[s].dst(raw_len)?;
        let (Some(copy), Some(decode), Some(dec)) = (
            self.backend.copy_stream(),
            self.backend.decode_stream(),
            self.decoding.as_mut(),
        ) else {
            // The CPU test mode: the reference decoder into the (host) slot.
            // SAFETY: the host copy is not written while uploads run (update_tensor is refused
            // for encoded blocks); the slot is a contiguous uint8 CPU buffer of at least
            // `raw_len` bytes that no block uses while it is being filled.
            let (src, dst) = unsafe { (host::bytes(enc)?, host::bytes_mut(&out)?) };
            return layerwise_offload_codec::decode_with_threads(src, dst, host::worker_threads())
                .map_err(codec_error("decoding a block"));
        };
        let k = dec.next;
        dec.next = (k + 1) % STAGING;
        let enc_len = enc.numel();
        let mut staged = dec.staging[k]
            .f_narrow(0, 0, enc_len as i64)
            .map_err(|e| Error::from(("upload", e)))?;
        // 1. The encoding into staging buffer k, once the decode out of it before is done.
        if dec.decoded[k] {
            dec.free[k].wait(&copy)?;
        }
        self.timer
            .time(pair, &copy, (block, enc_len as u64, Lane::Upload), || {
                // SAFETY: the host encoding lives in the manager until restore or Drop, which
                // synchronize the copy and decode streams first, and nothing writes it; the
                // staging buffer is not read by a decode until `uploaded` below, and was
                // released by its previous decode (`free`, waited above).
                unsafe { device::copy(&mut staged, enc, Some(&copy), "upload") }
            })?;
        let dec = self.decoding.as_mut().expect("checked above");
        dec.uploaded[k].record(&copy)?;
        // 2. The decode into the slot, once the encoding is there and the compute stream has
        //    released the slot's previous block.
        dec.uploaded[k].wait(&decode)?;
        self.slots[s].wait_writable(&decode)?;
        let decode_pair = self.timing_pair()?;
        let dec = self.decoding.as_mut().expect("checked above");
        let native = dec.stream as *mut std::ffi::c_void;
        let (src, dst) = (staged.data_ptr() as u64, out.data_ptr() as u64);
        self.timer.time(
            decode_pair,
            &decode,
            (block, raw_len as u64, Lane::Decode),
            || {
                // SAFETY: both buffers are device memory of this device, 16-byte aligned (the
                // allocator's blocks; the slot's block starts at its start), of the lengths
                // given, alive until restore or Drop (which synchronize this stream first).
                // The staging buffer holds the encoding once `uploaded` completes, which this
                // stream waits for; the slot is not read until `ready`, recorded after.
                unsafe { dec.gpu.decode_async(src, enc_len, dst, raw_len, native) }
                    .map_err(codec_error("decoding a block"))
            },
        )?;
        self.slots[s].mark_ready(&decode)?;
        let dec = self.decoding.as_mut().expect("checked above");
        dec.free[k].record(&decode)?;
        dec.decoded[k] = true;
        Ok(())
    }
}
