//! Encoding for compressed transport ([`OffloadConfig::compress`](crate::OffloadConfig::compress)):
//! each streamed block is encoded once at `initialize` (the `layerwise-offload-codec` crate), in
//! segments of `compress_segment_bytes` raw bytes each (`layerwise_offload_codec::segments`), and
//! only the encoding stays in host memory; uploads move and decode it segment by segment into
//! the slot ([`super::staging`], [`super::decode`]).
//!
//! A block is encoded straight from the model's tensors where they are contiguous CPU tensors
//! laid out as the block's layout says (the codec reads them in place as pieces of the block),
//! else from a copy of the block in a scratch buffer; both give the same bytes (the gaps between
//! tensors are 0). In a peer group each member uploads and decodes its share of the block's
//! segments, then sends the decoded bytes on from its slot into the others' slots
//! ([`super::share`]).

use crate::accel::{self, HostMemory};
use crate::error::Context;
use crate::error::{Error, Result};
use crate::host::{self, HostBlock};
use crate::plan::BlockLayout;
use crate::stats::OffloadStats;
use layerwise_offload_codec::{Encoder, SegmentedPlan};
use std::sync::Arc;
use tch::{Device, Tensor};

use super::LayerwiseOffloadManager;
use super::decode::{Decoding, codec_error};
use super::device::Backend;
use super::phase::Runtime;
use super::weights::BlockState;

/// How the manager encodes a block: in segments of `segment` raw bytes, with one tier of codes
/// per chunk or also two ([`OffloadConfig::compress_two_tier`](crate::OffloadConfig::compress_two_tier)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Encoding {
    /// Raw bytes per segment.
    pub(super) segment: usize,
    /// Two-tier chunks allowed.
    pub(super) two_tier: bool,
}

impl Encoding {
    /// The codec's encoder for these choices, on the manager's worker threads.
    pub(super) fn encoder(self) -> Encoder {
        let e = Encoder::new().with_threads(host::worker_threads());
        if self.two_tier { e } else { e.single_tier() }
    }
}

/// Encodes `raw` (a block's raw host bytes, a contiguous 1-D uint8 CPU tensor) as `encoding`
/// says into a new host buffer of `memory`, and counts it in `stats`.
pub(super) fn encode(
    raw: &Tensor,
    (memory, encoding): (HostMemory, Encoding),
    stats: &mut OffloadStats,
) -> Result<HostBlock> {
    let _span = crate::observe::encode(None, raw.numel());
    // SAFETY: the caller filled `raw` and does not write it while this runs.
    let input = unsafe { host::bytes(raw)? };
    store_encoding(&plan(input, encoding)?, memory, stats)
}

/// The codec's plan for a block's raw bytes, in segments (`layerwise_offload_codec::segments`)
/// as `encoding` says.
fn plan(input: &[u8], encoding: Encoding) -> Result<SegmentedPlan<'_>> {
    encoding
        .encoder()
        .plan_segmented(input, encoding.segment)
        .map_err(codec_error("encoding a block"))
}

/// Writes the encoding `plan` into a new host buffer of `memory` and counts it in `stats`;
/// returns the block's host copy.
fn store_encoding(
    plan: &SegmentedPlan<'_>,
    memory: HostMemory,
    stats: &mut OffloadStats,
) -> Result<HostBlock> {
    let (len, raw) = (plan.encoded_len(), plan.decoded_len());
    let out = accel::alloc_host(len.max(1), memory)?;
    // SAFETY: `out` is a fresh buffer owned here.
    let dst = unsafe { host::bytes_mut(&out)? };
    plan.write(&mut dst[..len])
        .map_err(codec_error("encoding a block"))?;
    let out = out.f_narrow(0, 0, len as i64).context("encoding a block")?;
    count_encoded(stats, len, raw, true);
    Ok(HostBlock::encoded(out, raw))
}

/// Counts in `stats` an encoded block of `len` bytes (`raw` raw), held in host memory if
/// `in_memory` (not on the disk tier).
pub(super) fn count_encoded(stats: &mut OffloadStats, len: usize, raw: usize, in_memory: bool) {
    stats.encoded_blocks += 1;
    stats.encoded_bytes += len as u64;
    stats.raw_encoded_bytes += raw as u64;
    if in_memory {
        stats.host_bytes += len as u64;
    }
}

/// Takes back from `stats` an encoded block of `len` bytes (`raw` raw) held in host memory
/// ([`count_encoded`] undone), once its encoding is replaced or dropped.
pub(super) fn uncount_encoded(stats: &mut OffloadStats, len: usize, raw: usize) {
    stats.encoded_blocks -= 1;
    stats.encoded_bytes -= len as u64;
    stats.raw_encoded_bytes -= raw as u64;
    stats.host_bytes -= len as u64;
}

/// Makes `decoding` stage segment encodings of `len` bytes: its staging buffers grow if
/// shorter, or, with none yet, the staging ring, the decode stream and the GPU decoder start
/// ([`Decoding::start`], `staging` buffers, at most `grid` blocks a launch); counted in
/// `staging_bytes`.
pub(super) fn stage_up_to(
    decoding: &mut Option<Decoding>,
    backend: &mut Backend,
    len: usize,
    (staging, grid): (usize, Option<u32>),
    stats: &mut OffloadStats,
) -> Result<()> {
    match decoding {
        Some(dec) => dec.grow(backend, len, stats),
        None => {
            *decoding = Decoding::start(backend, len, staging, grid)?;
            stats.staging_bytes = decoding.as_ref().map_or(0, |d| d.bytes() as u64);
            Ok(())
        }
    }
}

/// Block `raw` (a contiguous 1-D uint8 CPU tensor) encoded as `encoding` says into a new
/// vector; returns it and the raw size.
pub(super) fn encode_to_vec(raw: &Tensor, encoding: Encoding) -> Result<(Vec<u8>, usize)> {
    let _span = crate::observe::encode(None, raw.numel());
    // SAFETY: the caller filled `raw` and does not write it while this runs.
    let input = unsafe { host::bytes(raw)? };
    let plan = plan(input, encoding)?;
    let mut out = vec![0u8; plan.encoded_len()];
    plan.write(&mut out)
        .map_err(codec_error("encoding a block"))?;
    Ok((out, input.len()))
}

impl LayerwiseOffloadManager {
    /// Where `initialize` puts the encodings it makes: the host memory kind, or pageable memory
    /// when they are moved into a shared-memory file right after (no pages to lock twice).
    fn encoding_memory(&self) -> HostMemory {
        match self.config.shm {
            Some(_) => HostMemory::Pageable,
            None => self.host_memory(),
        }
    }

    /// Encodes `raw` (a block's raw host bytes, a contiguous 1-D uint8 CPU tensor) into a new
    /// host buffer of the manager's host memory kind, and counts it.
    pub(super) fn encode_block(&mut self, raw: &Tensor) -> Result<HostBlock> {
        let to = (self.encoding_memory(), self.config.encoding());
        encode(raw, to, &mut self.stats)
    }
}

impl Runtime {
    /// `update_tensor`'s write of `value` into tensor `j` of block `li`'s host copy
    /// ([`HostTier::update`](super::tier::HostTier::update)). An encoded copy is encoded again
    /// into a new buffer of `memory` in segments of `segment` raw bytes: the new encoding is
    /// counted in `stats` instead of the old one, takes its place in the host store, and the
    /// staging buffers grow if a segment's encoding got longer.
    /// The caller checked that nobody else holds the store, and waited for the copy and decode
    /// streams.
    pub(super) fn update_host(
        &mut self,
        name: &str,
        (li, j): (usize, usize),
        value: &Tensor,
        (memory, encoding, stats): (HostMemory, Encoding, &mut OffloadStats),
        backend: &Backend,
    ) -> Result<()> {
        if self.blocks[li].tier.encoding().is_some() && Arc::get_mut(&mut self.store).is_none() {
            return Err(Error::InvalidArgument {
                op: "update_tensor",
                message: "the compressed host copy is shared with another manager; restore the others first".into(),
            });
        }
        let layout = self.layout(li).clone();
        let old = self.blocks[li]
            .tier
            .update(name, &layout, j, value, |raw| {
                encode(raw, (memory, encoding), stats)
            })?;
        let Some((old_len, raw_len)) = old
            .as_ref()
            .and_then(|o| o.encoding())
            .map(|(e, r)| (e.numel(), r))
        else {
            return Ok(());
        };
        // The old encoding no longer counts.
        uncount_encoded(stats, old_len, raw_len);
        let new = self.blocks[li].tier.host().map(HostBlock::shallow_clone);
        let staging_len = match &new {
            Some(h) => h.staging_len()?,
            None => 0,
        };
        if let Some(store) = Arc::get_mut(&mut self.store) {
            store.buffers[li] = new;
        }
        if let Some(dec) = &mut self.decoding {
            dec.grow(backend, staging_len, stats)?;
        }
        Ok(())
    }
}

impl LayerwiseOffloadManager {
    /// Once `blocks` are encoded: the staging ring of the largest segment encoding and, with
    /// CUDA, the decode stream and the GPU decoder ([`Decoding::start`]), counted in
    /// `staging_bytes`; None without encoded blocks. Peer groups stage segments as a single
    /// GPU does: the members send each other decoded bytes, slot to slot.
    pub(super) fn start_decoding(&mut self, blocks: &[BlockState]) -> Result<Option<Decoding>> {
        let mut largest = None;
        for (i, b) in blocks.iter().enumerate() {
            if let Some(len) = b.tier.staging_len(i)? {
                largest = largest.max(Some(len));
            }
        }
        let mut decoding = None;
        if let Some(largest) = largest {
            let staging = (self.config.staging_buffers, self.config.decode_blocks);
            stage_up_to(
                &mut decoding,
                &mut self.backend,
                largest,
                staging,
                &mut self.stats,
            )?;
        }
        Ok(decoding)
    }

    /// Encodes block `i` (`layout`) straight from its tensors `params`, each read in place as
    /// one piece of the block's buffer at its offset, the alignment gaps between them 0, into a
    /// new host buffer of the manager's host memory kind, and counts it (as
    /// [`Self::encode_block`] does for a block copied into one buffer). The caller checked
    /// [`in_place`].
    pub(super) fn encode_in_place(
        &mut self,
        i: usize,
        params: &[Tensor],
        layout: &BlockLayout,
    ) -> Result<HostBlock> {
        let _span = crate::observe::encode(Some(i), layout.bytes);
        let mut pieces = Vec::with_capacity(params.len());
        for (t, p) in layout.tensors.iter().zip(params) {
            if t.bytes == 0 {
                continue; // nothing to read (and an empty tensor may have no data pointer)
            }
            // SAFETY: `p` is a handle of the model's tensor, which outlives `pieces` (nothing
            // here drops or replaces it before the encoding is written below); `host::bytes`
            // checks that it is a contiguous CPU tensor. Nothing
            // writes it meanwhile: `initialize` holds the manager mutably, and the model's
            // tensors are not to be written while it runs (the same condition under which the
            // copy into a scratch buffer that this replaces reads them).
            pieces.push((t.offset, unsafe { host::bytes(p)? }));
        }
        let encoding = self.config.encoding();
        let plan = encoding
            .encoder()
            .plan_pieces_segmented(&pieces, layout.bytes, encoding.segment)
            .map_err(codec_error("encoding a block"))?;
        store_encoding(&plan, self.encoding_memory(), &mut self.stats)
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
                .context("zeroing a block's gaps")?;
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

    /// Raw bytes per segment: the smallest accepted.
    const SEG: usize = crate::manager::SEGMENT_BYTES_MULTIPLE;

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
    /// is the segmented one-tier encoding of its buffer assembled with zero gaps (whichever way it was
    /// read; block 0 and 1 are two segments each), and every weight reads back exactly.
    #[test]
    fn blocks_encode_in_place_or_from_a_copy_and_read_back_exactly() -> anyhow::Result<()> {
        let named = model();
        let before: Vec<(String, Tensor)> =
            named.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        let mut m = OffloadConfig::new("blocks", 3)
            .cpu_test_mode(true)
            .compress(true)
            .compress_segment_bytes(SEG)
            .build(&named)?;
        m.initialize()?;
        assert_eq!(m.stats().encoded_blocks, 3);
        let rt = m.phase.runtime().unwrap();
        for b in 0..3 {
            // The block's buffer assembled with zero gaps.
            let layout = rt.layout(b).clone();
            let buf = Tensor::zeros([layout.bytes as i64], (Kind::Uint8, Device::Cpu));
            for (mut v, t) in views(&buf, &layout)?.into_iter().zip(&layout.tensors) {
                v.copy_(&before[t.source_index].1);
            }
            let raw = Vec::<u8>::try_from(&buf)?;
            let enc = Vec::<u8>::try_from(rt.blocks[b].tier.encoding().unwrap().0)?;
            assert!(
                enc == layerwise_offload_codec::Encoder::new()
                    .single_tier()
                    .encode_segmented(&raw, SEG)?,
                "block {b} encodes differently (one tier of codes, the default)"
            );
            let segments = layerwise_offload_codec::Segments::parse(&enc)?.len();
            assert_eq!(segments, raw.len().div_ceil(SEG), "block {b}'s segments");
        }
        // The staging ring: two buffers of the longest segment encoding (16-byte rounded),
        // less than two of the longest whole encoding.
        let rt = m.phase.runtime().unwrap();
        let encodings: Vec<Vec<u8>> = (0..3)
            .map(|b| Vec::<u8>::try_from(rt.blocks[b].tier.encoding().unwrap().0).unwrap())
            .collect();
        let longest_segment = encodings
            .iter()
            .map(|e| {
                layerwise_offload_codec::Segments::walk(e)
                    .unwrap()
                    .largest_encoded()
            })
            .max()
            .unwrap();
        let longest_whole = encodings.iter().map(Vec::len).max().unwrap();
        let staging = m.stats().staging_bytes as usize;
        assert_eq!(staging, 2 * longest_segment.next_multiple_of(16));
        assert!(
            staging < 2 * longest_whole,
            "{staging} against {longest_whole}"
        );
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
