//! [`Decoding`]: where encoded blocks wait for their decode. An upload moves a block's encoding
//! into one of two staging buffers ([`Fenced`], as the slots are) on the copy stream; the
//! decode stream waits for it, decodes it into the slot and records the slot's `ready` and the
//! staging buffer's `free` behind the decode. The two buffers let the copy of the next block
//! run while this one decodes. The CPU test mode decodes from the host copy with the CPU
//! reference decoder (it needs staging buffers only in a peer group, in host memory).

use crate::accel::{self, HostMemory, Stream};
use crate::error::{Error, Result};
use crate::host;
use crate::stats::Lane;
use layerwise_offload_codec::gpu::GpuDecoder;
use tch::Tensor;

use super::device::Backend;
use super::fence::Fenced;
use super::timing::{Pair, Timer};

/// Staging buffers: one being decoded from, one being uploaded into.
const STAGING: usize = 2;

/// The staging buffers and, with CUDA, the decoder. Their events are made once and recorded
/// again at each upload: nothing is allocated in the loop.
#[derive(Debug)]
pub(super) struct Decoding {
    staging: Vec<Fenced>,
    next: usize,
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

impl Decoding {
    /// Two staging buffers of `largest` bytes (the largest encoding) and, with CUDA, the decode
    /// stream (taken from the pool) and the GPU decoder (compiled for the device). None where
    /// nothing needs them: the CPU test mode outside a peer group. `peer` is the group's size
    /// and this member's rank.
    pub(super) fn start(
        backend: &mut Backend,
        largest: usize,
        peer: Option<(usize, usize)>,
    ) -> Result<Option<Decoding>> {
        let device = backend.cuda();
        if device.is_none() && peer.is_none() {
            return Ok(None);
        }
        let bytes = largest.next_multiple_of(16);
        let staging = (0..STAGING)
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
            staging,
            next: 0,
            gpu,
        }))
    }

    /// Whether blocks decode on the GPU.
    pub(super) fn on_gpu(&self) -> bool {
        self.gpu.is_some()
    }

    /// The staging buffers (handles), for a peer group to keep while others send into them.
    pub(super) fn buffers(&self) -> Vec<Tensor> {
        self.staging
            .iter()
            .map(|b| b.buf().shallow_clone())
            .collect()
    }

    /// The index of the next staging buffer (round robin).
    pub(super) fn next(&mut self) -> usize {
        let k = self.next;
        self.next = (k + 1) % STAGING;
        k
    }

    /// Staging buffer `k`.
    pub(super) fn staging(&self, k: usize) -> &Fenced {
        &self.staging[k]
    }

    /// Staging buffer `k`, to record on.
    pub(super) fn staging_mut(&mut self, k: usize) -> &mut Fenced {
        &mut self.staging[k]
    }

    /// Makes every staging buffer hold at least `len` bytes (an encoding got longer). The
    /// caller waited for the copy and decode streams.
    pub(super) fn grow(&mut self, backend: &Backend, len: usize) -> Result<()> {
        if self.staging.iter().all(|b| b.len() >= len) {
            return Ok(());
        }
        let bytes = len.next_multiple_of(16);
        for b in &mut self.staging {
            *b = Fenced::new(alloc(backend.cuda(), bytes)?, backend.has_events(), None)?;
        }
        Ok(())
    }

    /// Queues the decode of staging buffer `k`'s first `enc_len` bytes (an encoding) into
    /// `out` (the first bytes of `slot`) on `decode`, once the slot's last reader is done;
    /// records the slot's `ready` and the staging buffer's `free` behind it. The caller made
    /// `decode` wait for every upload into the staging buffer.
    pub(super) fn decode_into(
        &mut self,
        k: usize,
        enc_len: usize,
        (slot, out): (&mut Fenced, &Tensor),
        decode: &Stream,
        block: usize,
        (timer, pair): (&mut Timer, Pair),
    ) -> Result<()> {
        let gpu = self.gpu.as_ref().ok_or_else(no_decoder)?;
        let staged = self.staging[k].head(enc_len)?;
        slot.wait_writable(decode)?;
        let _span = crate::observe::decode(Some(block), out.numel());
        let (src, dst) = (staged.data_ptr() as u64, out.data_ptr() as u64);
        let native = gpu.stream as *mut std::ffi::c_void;
        timer.time(
            pair,
            decode,
            (block, out.numel() as u64, Lane::Decode),
            || {
                // SAFETY: the staging buffer and the slot are device memory of this device (16-byte
                // aligned: the allocator's blocks, whose starts the encoding and the block start
                // at) that live until restore or Drop, which synchronize this stream first; the
                // caller made this stream wait for every upload into the staging buffer, which is
                // written again only after `free` below; the slot was released by its last reader
                // (waited above) and is not read before `ready`, recorded after.
                unsafe {
                    gpu.decoder
                        .decode_async(src, staged.numel(), dst, out.numel(), native)
                }
                .map_err(codec_error("decoding a block"))
            },
        )?;
        slot.mark_ready(decode)?;
        self.staging[k].mark_free(decode)
    }
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

/// Decodes `enc` into `out` (both host buffers) with the CPU reference decoder.
pub(super) fn decode_on_cpu(enc: &Tensor, out: &Tensor) -> Result<()> {
    let _span = crate::observe::decode(None, out.numel());
    // SAFETY: `enc` is a host copy or staging buffer that nothing writes while uploads run
    // (update_tensor waits for them; the members of a peer group have all delivered their
    // shares); `out` is a contiguous uint8 host buffer of the slot that no block uses while it
    // is being filled, and does not overlap `enc`.
    let (src, dst) = unsafe { (host::bytes(enc)?, host::bytes_mut(out)?) };
    layerwise_offload_codec::decode_with_threads(src, dst, host::worker_threads())
        .map_err(codec_error("decoding a block"))
}

#[cfg(test)]
mod tests {
    use super::{Decoding, decode_on_cpu};
    use crate::manager::device::Backend;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn the_cpu_test_mode_stages_only_in_a_peer_group() -> crate::Result<()> {
        let mut cpu = Backend::Cpu;
        assert!(Decoding::start(&mut cpu, 100, None)?.is_none());
        let mut dec = Decoding::start(&mut cpu, 100, Some((2, 1)))?.unwrap();
        assert!(!dec.on_gpu());
        // Two buffers of the largest encoding, rounded up to 16 bytes, used in turn.
        assert_eq!(
            dec.buffers().iter().map(Tensor::numel).collect::<Vec<_>>(),
            [112, 112]
        );
        assert_eq!((dec.next(), dec.next(), dec.next()), (0, 1, 0));
        dec.grow(&cpu, 64)?;
        assert_eq!(dec.staging(0).len(), 112, "long enough already");
        dec.grow(&cpu, 200)?;
        assert!((0..2).all(|k| dec.staging(k).len() == 208));
        Ok(())
    }

    #[test]
    fn the_reference_decoder_fills_the_slot_exactly() -> crate::Result<()> {
        let raw = (Tensor::randn([4096], (Kind::Float, Device::Cpu)) * 0.02)
            .to_kind(Kind::BFloat16)
            .view_dtype(Kind::Uint8);
        let bytes = Vec::<u8>::try_from(&raw).unwrap();
        let enc = Tensor::from_slice(&layerwise_offload_codec::encode(&bytes));
        assert!(enc.numel() < raw.numel(), "bf16 weights shrink");
        let out = Tensor::zeros([raw.numel() as i64], (Kind::Uint8, Device::Cpu));
        decode_on_cpu(&enc, &out)?;
        assert!(out.equal(&raw));
        Ok(())
    }
}
