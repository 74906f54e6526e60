//! Compressed transport ([`OffloadConfig::compress`](crate::OffloadConfig::compress)): each
//! streamed block is encoded once at `initialize` (the `layerwise-offload-codec` crate), only
//! the encoding stays in host memory, and an upload moves the encoding into one of two device
//! staging buffers on the copy stream, then decodes it into the slot on the decode stream,
//! where the slot's `ready` event is recorded. The two staging buffers let the copy of the next
//! block run while this one decodes; a staging buffer is written again only after an event
//! behind the decode out of it. The CPU test mode decodes with the CPU reference decoder.
//!
//! A block is encoded straight from the model's tensors where they are contiguous CPU tensors
//! laid out as the block's layout says (the codec reads them in place as pieces of the block),
//! else from a copy of the block in a scratch buffer; both give the same bytes (the gaps between
//! tensors are 0). In a peer group each member uploads its share of the encoding into a staging
//! buffer and sends it on, still encoded, to the others' staging buffers; each member decodes
//! the whole block.

use crate::accel::{self, Event, HostMemory, Stream};
use crate::error::{Error, Result};
use crate::host::{self, HostBlock};
use crate::peer::{self, PeerGroup, Post};
use crate::plan::BlockLayout;
use crate::stats::Lane;
use layerwise_offload_codec::{EncodePlan, Encoder, gpu::GpuDecoder};
use std::sync::Arc;
use tch::{Device, Tensor};

use super::LayerwiseOffloadManager;
use super::device;
use super::timing::Pair;
use super::upload::push_shares;

/// Staging buffers: one being decoded from, one being uploaded into.
const STAGING: usize = 2;

/// Where encodings wait for their decode: two staging buffers of the largest encoding (device
/// memory with CUDA; host memory in a peer group of the CPU test mode, which has no other use
/// for them) and, with CUDA, the decoder and the events that order the buffers' reuse. Its
/// events are made once and recorded again at each upload: nothing is allocated in the loop.
#[derive(Debug)]
pub(super) struct Decoding {
    staging: Vec<Tensor>,
    next: usize,
    gpu: Option<GpuDecoding>,
}

/// The GPU side of [`Decoding`].
#[derive(Debug)]
struct GpuDecoding {
    decoder: GpuDecoder,
    /// The decode stream's native handle (a `cudaStream_t`), as an address.
    stream: usize,
    /// Per staging buffer: recorded after the upload into it (this member's share of it in a
    /// peer group).
    uploaded: Vec<Event>,
    /// Per staging buffer: recorded after the last decode out of it (once `decoded[k]`).
    free: Vec<Event>,
    decoded: Vec<bool>,
    /// Peer groups, per staging buffer and receiving rank: recorded on the push stream after
    /// this member's share went out of the buffer to that member (once `pushed_recorded[k]`).
    pushed: Vec<Vec<Event>>,
    pushed_recorded: Vec<bool>,
}

impl GpuDecoding {
    /// Makes `copy` wait until staging buffer `k` may be written: the decode out of it is done
    /// and (peer groups) this member's share of it has gone out to the others.
    fn wait_writable(&self, k: usize, copy: &Stream, rank: usize) -> Result<()> {
        if self.decoded[k] {
            self.free[k].wait(copy)?;
        }
        if self.pushed_recorded[k] {
            for (o, e) in self.pushed[k].iter().enumerate() {
                if o != rank {
                    e.wait(copy)?;
                }
            }
        }
        Ok(())
    }

    /// Queues the decode of `staged` (an encoding) into `out` on the decode stream.
    ///
    /// # Safety
    /// Both are device buffers of this device, alive until the decode stream has run it;
    /// `staged` holds the whole encoding by the time the decode stream reaches this call (it
    /// waited for every upload into it), nothing writes `staged` before `free[k]`, and nothing
    /// reads `out` before an event recorded on the decode stream after it.
    unsafe fn decode(&self, staged: &Tensor, out: &Tensor) -> Result<()> {
        let native = self.stream as *mut std::ffi::c_void;
        let (src, dst) = (staged.data_ptr() as u64, out.data_ptr() as u64);
        // SAFETY: the caller's obligations; both buffers are 16-byte aligned (the allocator's
        // blocks; a slot's block and a staging buffer's encoding start at their starts).
        unsafe {
            self.decoder
                .decode_async(src, staged.numel(), dst, out.numel(), native)
        }
        .map_err(codec_error("decoding a block"))
    }
}

fn codec_error(op: &'static str) -> impl Fn(layerwise_offload_codec::CodecError) -> Error {
    move |source| Error::Codec { op, source }
}

impl LayerwiseOffloadManager {
    /// Encodes `raw` (a block's raw host bytes, a contiguous 1-D uint8 CPU tensor) into a new
    /// host buffer of the manager's host memory kind, and counts it.
    pub(super) fn encode_block(&mut self, raw: &Tensor) -> Result<HostBlock> {
        let _span = crate::observe::encode(None, raw.numel());
        // SAFETY: the caller filled `raw` and does not write it while this runs.
        let input = unsafe { host::bytes(raw)? };
        let plan = Encoder::new()
            .with_threads(host::worker_threads())
            .plan(input)
            .map_err(codec_error("encoding a block"))?;
        self.store_encoding(&plan)
    }

    /// `update_tensor` on an encoded block `li`: decodes the block on the CPU, writes `value`
    /// into its tensor `j`, encodes it again and puts the new encoding in place of the old one
    /// (in the host store too), growing the staging buffers if it got longer. The caller
    /// checked that nobody else holds the store, and waited for the copy and decode streams.
    pub(super) fn reencode_with(&mut self, li: usize, j: usize, value: &Tensor) -> Result<()> {
        let layout = self.layout(li).clone();
        let old = self.blocks[li].host().shallow_clone();
        let (old_len, raw_len) = match old.encoding() {
            Some((e, raw)) => (e.numel(), raw),
            None => return Ok(()),
        };
        if self
            .store
            .as_mut()
            .is_some_and(|s| Arc::get_mut(s).is_none())
        {
            return Err(Error::InvalidArgument {
                op: "update_tensor",
                message: "the compressed host copy is shared with another manager; restore the others first".into(),
            });
        }
        let raw = old.decoded()?;
        let mut view = raw.views(&layout)?.swap_remove(j);
        tch::no_grad(|| view.f_copy_(value)).map_err(|e| Error::from(("update_tensor", e)))?;
        let buf = raw
            .as_whole()
            .expect("a decoded block is one buffer")
            .shallow_clone();
        zero_gaps(&buf, &layout)?;
        let new = self.encode_block(&buf)?;
        // The old encoding no longer counts.
        self.stats.encoded_blocks -= 1;
        self.stats.encoded_bytes -= old_len as u64;
        self.stats.raw_encoded_bytes -= raw_len as u64;
        self.stats.host_bytes -= old_len as u64;
        let new_len = new.encoding().map_or(0, |(e, _)| e.numel());
        if let Some(store) = self.store.as_mut().and_then(Arc::get_mut) {
            store.buffers[li] = Some(new.shallow_clone());
        }
        self.blocks[li].host = Some(new);
        if let Some(dec) = &mut self.decoding
            && dec.staging.iter().any(|b| b.numel() < new_len)
        {
            let bytes = new_len.next_multiple_of(16);
            for b in &mut dec.staging {
                *b = match self.backend.cuda() {
                    Some(d) => accel::alloc_device(bytes, d)?,
                    None => accel::alloc_host(bytes, HostMemory::Pageable)?,
                };
            }
        }
        Ok(())
    }

    /// Writes the encoding `plan` into a new host buffer of the manager's host memory kind and
    /// counts it; returns the block's host copy.
    fn store_encoding(&mut self, plan: &EncodePlan<'_>) -> Result<HostBlock> {
        let (len, raw) = (plan.encoded_len(), plan.header().decoded_len() as usize);
        let out = accel::alloc_host(len.max(1), self.host_memory())?;
        // SAFETY: `out` is a fresh buffer owned here.
        let dst = unsafe { host::bytes_mut(&out)? };
        plan.write(&mut dst[..len])
            .map_err(codec_error("encoding a block"))?;
        let out = out
            .f_narrow(0, 0, len as i64)
            .map_err(|e| Error::from(("encoding a block", e)))?;
        self.stats.encoded_blocks += 1;
        self.stats.encoded_bytes += len as u64;
        self.stats.raw_encoded_bytes += raw as u64;
        self.stats.host_bytes += len as u64;
        Ok(HostBlock::encoded(out, raw))
    }

    /// Once blocks are encoded: the two staging buffers of the largest encoding and, with CUDA,
    /// the decode stream and the GPU decoder (compiled for the device). The CPU test mode
    /// decodes from the host copy directly and needs staging buffers only in a peer group. In a
    /// group the staging buffers join the member's ring in the group, which keeps them while
    /// another member may still be sending into them.
    pub(super) fn start_decoding(&mut self) -> Result<()> {
        let device = self.backend.cuda();
        if device.is_none() && self.config.peer.is_none() {
            return Ok(());
        }
        let largest = self
            .blocks
            .iter()
            .filter_map(|b| b.host.as_ref()?.encoding().map(|(e, _)| e.numel()))
            .max();
        let Some(largest) = largest else {
            return Ok(());
        };
        let bytes = largest.next_multiple_of(16);
        let staging = (0..STAGING)
            .map(|_| match device {
                Some(d) => accel::alloc_device(bytes, d),
                None => accel::alloc_host(bytes, HostMemory::Pageable),
            })
            .collect::<Result<Vec<_>>>()?;
        let gpu = match device {
            Some(device) => {
                self.backend.take_decode_stream()?;
                let Some(stream) = self.backend.decode_stream() else {
                    return Ok(());
                };
                let events = |n: usize| (0..n).map(|_| Event::new()).collect::<Result<Vec<_>>>();
                let members = self.config.peer.as_ref().map_or(0, |(g, _)| g.size());
                Some(GpuDecoding {
                    decoder: GpuDecoder::new(device)
                        .map_err(codec_error("building the GPU decoder"))?,
                    stream: stream.native_handle()? as usize,
                    uploaded: events(STAGING)?,
                    free: events(STAGING)?,
                    decoded: vec![false; STAGING],
                    pushed: (0..STAGING)
                        .map(|_| events(members))
                        .collect::<Result<_>>()?,
                    pushed_recorded: vec![false; STAGING],
                })
            }
            None => None,
        };
        if let Some((group, rank)) = &self.config.peer {
            group.retain(*rank, staging.iter().map(Tensor::shallow_clone));
        }
        self.decoding = Some(Decoding {
            staging,
            next: 0,
            gpu,
        });
        Ok(())
    }

    /// The next staging buffer (round robin), its first `len` bytes, and its index.
    fn next_staging(&mut self, len: usize) -> Result<(usize, Tensor)> {
        let dec = self.decoding.as_mut().ok_or(Error::InvalidArgument {
            op: "upload",
            message: "an encoded block with no staging buffer: this is a bug".into(),
        })?;
        let k = dec.next;
        dec.next = (k + 1) % STAGING;
        let staged = dec.staging[k]
            .f_narrow(0, 0, len as i64)
            .map_err(|e| Error::from(("upload", e)))?;
        Ok((k, staged))
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
        let (Some(copy), Some(decode), true) = (
            self.backend.copy_stream(),
            self.backend.decode_stream(),
            self.decoding.as_ref().is_some_and(|d| d.gpu.is_some()),
        ) else {
            // The CPU test mode: the reference decoder into the (host) slot.
            return decode_on_cpu(enc, &out);
        };
        let enc_len = enc.numel();
        let (k, mut staged) = self.next_staging(enc_len)?;
        let gpu = self.gpu_decoding()?;
        // 1. The encoding into staging buffer k, once the decode out of it before is done.
        gpu.wait_writable(k, &copy, 0)?;
        self.timer
            .time(pair, &copy, (block, enc_len as u64, Lane::Upload), || {
                // SAFETY: the host encoding lives in the manager until restore or Drop, which
                // synchronize the copy and decode streams first, and nothing writes it; the
                // staging buffer is not read by a decode until `uploaded` below, and was
                // released by its previous decode (`free`, waited above).
                unsafe { device::copy(&mut staged, enc, Some(&copy), "upload") }
            })?;
        self.gpu_decoding_mut()?.uploaded[k].record(&copy)?;
        // 2. The decode into the slot, once the encoding is there.
        self.gpu_decoding()?.uploaded[k].wait(&decode)?;
        self.decode_into_slot(block, s, k, &staged, &out, &decode)
    }

    /// [`Self::upload_encoded`] in a peer group (upload number `round`): this member's share of
    /// the encoding from the host into its staging buffer and from there into the other
    /// members' staging buffers; once their shares have arrived, every member decodes the whole
    /// encoding into its own slot. Each link to the host carries 1/n of the encoding and the
    /// peer links carry the rest, still encoded. Returns the bytes this member sent from the
    /// host.
    pub(super) fn upload_encoded_peer(
        &mut self,
        (group, rank): (&PeerGroup, usize),
        block: usize,
        s: usize,
        (enc, raw_len): (&Tensor, usize),
        round: u64,
        pair: Pair,
    ) -> Result<usize> {
        let n = group.size();
        let enc_len = enc.numel();
        let out = self.slots[s].dst(raw_len)?;
        let (k, staged) = self.next_staging(enc_len)?;
        let streams = match (self.backend.copy_stream(), self.backend.decode_stream()) {
            (Some(c), Some(d)) => Some((c, d)),
            _ => None,
        };
        // 1. Staging buffer k may be written once its last decode is done and this member's
        //    share of the encoding before has gone out of it.
        let writable = match &streams {
            Some((copy, _)) => {
                self.gpu_decoding()?.wait_writable(k, copy, rank)?;
                let mut e = Event::new()?;
                e.record(copy)?;
                Some(Arc::new(e))
            }
            None => None,
        };
        let posts = group.post(
            round,
            rank,
            Post {
                block,
                bytes: enc_len,
                buf: staged.shallow_clone(),
                writable,
            },
        )?;
        // 2. This member's share: host -> own staging buffer -> every other member's.
        let (off, len) = peer::share(enc_len, n, rank);
        let narrow = |t: &Tensor| {
            t.f_narrow(0, off as i64, len as i64)
                .map_err(|e| Error::from(("upload", e)))
        };
        let (src, mut mine) = (narrow(enc)?, narrow(&staged)?);
        let mut delivered: Vec<Option<Arc<Event>>> = vec![None; n];
        match streams {
            Some((copy, decode)) => {
                self.timer
                    .time(pair, &copy, (block, len as u64, Lane::Upload), || {
                        // SAFETY: the host encoding lives in the manager until restore or Drop,
                        // which synchronize the copy stream first, and nothing writes it; the
                        // staging buffer was made writable above, and nothing reads it before
                        // `uploaded` (waited by the push streams and the decode below).
                        unsafe { device::copy(&mut mine, &src, Some(&copy), "upload") }
                    })?;
                let gpu = self
                    .decoding
                    .as_mut()
                    .and_then(|d| d.gpu.as_mut())
                    .ok_or_else(no_decoder)?;
                gpu.uploaded[k].record(&copy)?;
                // SAFETY: the peers' staging buffers stay allocated until every member has left
                // the group (they joined its ring); each one posted `writable` once its decode
                // out of the buffer was done, and its decode waits for our delivery events;
                // `mine` is not overwritten before `pushed` (recorded below, waited before this
                // staging buffer is written again).
                delivered = unsafe {
                    push_shares(
                        &posts,
                        rank,
                        &self.peer.push,
                        &mine,
                        (off, len),
                        &gpu.uploaded[k],
                    )?
                };
                for (o, p) in self
                    .peer
                    .push
                    .iter()
                    .enumerate()
                    .filter(|(o, _)| *o != rank)
                {
                    gpu.pushed[k][o].record(p)?;
                }
                self.gpu_decoding_mut()?.pushed_recorded[k] = true;
                let incoming = group.deliver(round, rank, delivered)?;
                // 3. The whole encoding is here once this member's upload and every incoming
                //    share are: then the decode.
                self.gpu_decoding()?.uploaded[k].wait(&decode)?;
                for e in &incoming {
                    e.wait(&decode)?;
                }
                self.decode_into_slot(block, s, k, &staged, &out, &decode)?;
            }
            None => {
                // SAFETY: without a stream each copy is done when `copy` returns.
                unsafe { device::copy(&mut mine, &src, None, "upload")? };
                for (_, post) in posts.iter().enumerate().filter(|(o, _)| *o != rank) {
                    let mut theirs = narrow(&post.buf)?;
                    // SAFETY: as above.
                    unsafe { device::copy(&mut theirs, &mine, None, "upload")? };
                }
                // Every member has copied its share once all have delivered.
                group.deliver(round, rank, delivered)?;
                decode_on_cpu(&staged, &out)?;
            }
        }
        Ok(len)
    }

    /// Queues the decode of staging buffer `k` (`staged`, its encoding) into slot `s` (`out`)
    /// on the decode stream, once the compute stream has released the slot's previous block;
    /// records the slot's `ready` and the buffer's `free` behind it. The caller made `decode`
    /// wait for every upload into the buffer.
    fn decode_into_slot(
        &mut self,
        block: usize,
        s: usize,
        k: usize,
        staged: &Tensor,
        out: &Tensor,
        decode: &Stream,
    ) -> Result<()> {
        self.slots[s].wait_writable(decode)?;
        let _span = crate::observe::decode(Some(block), out.numel());
        let pair = self.timing_pair()?;
        let gpu = self
            .decoding
            .as_ref()
            .and_then(|d| d.gpu.as_ref())
            .expect("checked by the callers");
        self.timer.time(
            pair,
            decode,
            (block, out.numel() as u64, Lane::Decode),
            || {
                // SAFETY: the staging buffer and the slot are device memory of this device that
                // live until restore or Drop (which synchronize this stream first); the caller
                // made this stream wait for every upload into the buffer, which is written again
                // only after `free` below; the slot is not read before `ready`, recorded after.
                unsafe { gpu.decode(staged, out) }
            },
        )?;
        self.slots[s].mark_ready(decode)?;
        let gpu = self.gpu_decoding_mut()?;
        gpu.free[k].record(decode)?;
        gpu.decoded[k] = true;
        Ok(())
    }

    fn gpu_decoding(&self) -> Result<&GpuDecoding> {
        self.decoding
            .as_ref()
            .and_then(|d| d.gpu.as_ref())
            .ok_or_else(no_decoder)
    }

    fn gpu_decoding_mut(&mut self) -> Result<&mut GpuDecoding> {
        self.decoding
            .as_mut()
            .and_then(|d| d.gpu.as_mut())
            .ok_or_else(no_decoder)
    }
}

fn no_decoder() -> Error {
    Error::InvalidArgument {
        op: "upload",
        message: "an encoded block on CUDA with no GPU decoder: this is a bug".into(),
    }
}

/// Decodes `enc` into `out` (both host buffers) with the CPU reference decoder.
fn decode_on_cpu(enc: &Tensor, out: &Tensor) -> Result<()> {
    let _span = crate::observe::decode(None, out.numel());
    // SAFETY: `enc` is a host copy or staging buffer that nothing writes while uploads run
    // (update_tensor is refused for encoded blocks; the members of a peer group have all
    // delivered their shares); `out` is a contiguous uint8 host buffer of the slot that no
    // block uses while it is being filled, and does not overlap `enc`.
    let (src, dst) = unsafe { (host::bytes(enc)?, host::bytes_mut(out)?) };
    layerwise_offload_codec::decode_with_threads(src, dst, host::worker_threads())
        .map_err(codec_error("decoding a block"))
}

impl LayerwiseOffloadManager {
    /// Encodes block `i` (`layout`, its layout) straight from its tensors, each read in place as
    /// one piece of the block's buffer at its offset, the alignment gaps between them 0, into a
    /// new host buffer of the manager's host memory kind, and counts it (as
    /// [`Self::encode_block`] does for a block copied into one buffer). The caller checked
    /// [`in_place`].
    pub(super) fn encode_in_place(&mut self, i: usize, layout: &BlockLayout) -> Result<HostBlock> {
        let _span = crate::observe::encode(Some(i), layout.bytes);
        // Handles of the model's tensors (sharing their storage), so that the encoding can be
        // stored by `&mut self` while the pieces borrow from them.
        let params: Vec<Tensor> = self.blocks[i]
            .params
            .iter()
            .map(Tensor::shallow_clone)
            .collect();
        let mut pieces = Vec::with_capacity(params.len());
        for (t, p) in layout.tensors.iter().zip(&params) {
            if t.bytes == 0 {
                continue; // nothing to read (and an empty tensor may have no data pointer)
            }
            // SAFETY: `p` is a handle of the model's tensor, which outlives `pieces` (nothing
            // here drops or replaces it before the encoding is written below); `host::bytes` checks that it is a contiguous CPU tensor. Nothing
            // writes it meanwhile: `initialize` holds the manager mutably, and the model's
            // tensors are not to be written while it runs (the same condition under which the
            // copy into a scratch buffer that this replaces reads them).
            pieces.push((t.offset, unsafe { host::bytes(p)? }));
        }
        let plan = Encoder::new()
            .with_threads(host::worker_threads())
            .plan_pieces(&pieces, layout.bytes)
            .map_err(codec_error("encoding a block"))?;
        self.store_encoding(&plan)
    }
}

/// Zeroes the bytes of `host` (a block's buffer) that no tensor of `layout` covers.
pub(super) fn zero_gaps(host: &Tensor, layout: &BlockLayout) -> Result<()> {
    let mut spans: Vec<(usize, usize)> = layout
        .tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.bytes))
        .collect();
    spans.sort_unstable();
    let mut at = 0;
    for (start, end) in spans.into_iter().chain([(layout.bytes, layout.bytes)]) {
        if start > at {
            let _ = host
                .f_narrow(0, at as i64, (start - at) as i64)
                .and_then(|mut g| g.f_fill_(0))
                .map_err(|e| Error::from(("zeroing a block's gaps", e)))?;
        }
        at = at.max(end);
    }
    Ok(())
}

/// Whether block tensors `params` can be encoded in place
/// ([`LayerwiseOffloadManager::encode_in_place`]): each a contiguous CPU tensor of its layout's
/// dtype, shape and strides, so that its bytes are what copying it into its view of the block's
/// buffer would write there.
pub(super) fn in_place(layout: &BlockLayout, params: &[Tensor]) -> bool {
    layout.tensors.len() == params.len()
        && layout.tensors.iter().zip(params).all(|(t, p)| {
            p.device() == Device::Cpu
                && p.kind() == t.kind
                && p.is_contiguous()
                && p.size() == t.shape
                && p.stride() == t.strides
                && p.numel() * p.kind().elt_size_in_bytes() == t.bytes
        })
}

#[cfg(test)]
mod tests {
    use super::in_place;
    use crate::OffloadConfig;
    use crate::manager::weights::views;
    use tch::{Device, Kind, Tensor};

    /// A bf16 tensor of N(0, 0.02) values.
    fn weights(shape: &[i64]) -> Tensor {
        (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.02).to_kind(Kind::BFloat16)
    }

    /// Two blocks of odd-sized tensors (alignment gaps between them): block 0's all contiguous,
    /// block 1's with a transposed (dense, not contiguous) one.
    fn model() -> Vec<(String, Tensor)> {
        tch::manual_seed(3);
        vec![
            ("blocks.0.a".into(), weights(&[33, 7])),
            ("blocks.0.b".into(), weights(&[301, 129])),
            ("blocks.0.c".into(), weights(&[5])),
            (
                "blocks.0.d".into(),
                Tensor::zeros([0], (Kind::BFloat16, Device::Cpu)),
            ),
            ("blocks.1.a".into(), weights(&[129, 300]).transpose(0, 1)),
            ("blocks.1.b".into(), weights(&[999])),
            // Another copied block, whose gaps the scratch buffer held block 1's bytes in.
            ("blocks.2.a".into(), weights(&[3, 5]).transpose(0, 1)),
            ("blocks.2.b".into(), weights(&[100])),
            ("head".into(), weights(&[4, 4])),
        ]
    }

    #[test]
    fn contiguous_cpu_tensors_of_their_layout_are_read_in_place() {
        let named = model();
        let plan = crate::plan::build(&named, &[("blocks".into(), 3)], &[Device::Cpu]).unwrap();
        let params = |b: usize| -> Vec<Tensor> {
            plan.blocks[b]
                .tensors
                .iter()
                .map(|t| named[t.source_index].1.shallow_clone())
                .collect()
        };
        assert!(in_place(&plan.blocks[0], &params(0)));
        assert!(
            !in_place(&plan.blocks[1], &params(1)),
            "a transposed tensor"
        );
        let mut other = params(0);
        other[1] = other[1].to_kind(Kind::Float);
        assert!(!in_place(&plan.blocks[0], &other), "another dtype");
        assert!(!in_place(&plan.blocks[0], &params(0)[..2]), "fewer tensors");
    }

    /// Block 0 is encoded in place, blocks 1 and 2 from a scratch copy; every block's encoding
    /// is that of its buffer assembled with zero gaps (whichever way it was read), and every
    /// weight reads back exactly.
    #[test]
    fn blocks_encode_in_place_or_from_a_copy_and_read_back_exactly() -> anyhow::Result<()> {
        let named = model();
        let before: Vec<(String, Tensor)> =
            named.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        let mut m = OffloadConfig::new("blocks", 3)
            .cpu_test_mode(true)
            .compress(true)
            .build(&named)?;
        m.initialize()?;
        assert_eq!(m.stats().encoded_blocks, 3);
        for b in 0..3 {
            // The block's buffer assembled with zero gaps.
            let layout = m.layout(b).clone();
            let buf = Tensor::zeros([layout.bytes as i64], (Kind::Uint8, Device::Cpu));
            for (mut v, t) in views(&buf, &layout)?.into_iter().zip(&layout.tensors) {
                v.copy_(&before[t.source_index].1);
            }
            // SAFETY: `buf` and the host copy live to the end of the test; nothing writes them.
            let (raw, enc) = unsafe {
                (
                    crate::host::bytes(&buf)?,
                    crate::host::bytes(m.blocks[b].host.as_ref().unwrap().encoding().unwrap().0)?,
                )
            };
            assert!(
                enc == layerwise_offload_codec::encode(raw).as_slice(),
                "block {b} encodes differently"
            );
        }
        let mut got = m.named_tensors()?;
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got.len(), before.len());
        for ((n, g), (bn, b)) in got.iter().zip(&before) {
            assert_eq!(n, bn);
            assert!(g.to_device(Device::Cpu).equal(b), "{n} reads back changed");
        }
        m.restore()?;
        for ((n, t), (_, b)) in named.iter().zip(&before) {
            assert!(t.equal(b), "{n} restored changed");
        }
        Ok(())
    }
}
