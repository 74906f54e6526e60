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
use crate::progress::{Reporter, Stage};
use crate::stats::OffloadStats;
use layerwise_offload_codec::{Encoder, SegmentedPlan};
use std::sync::Arc;
use tch::{Device, Tensor};

use super::LayerwiseOffloadManager;
use super::decode::{Decoding, codec_error};
use super::device::Backend;
use super::phase::Runtime;
use super::tier::HostTier;
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
fn encode(
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
        stats.encoded_blocks -= 1;
        stats.encoded_bytes -= old_len as u64;
        stats.raw_encoded_bytes -= raw_len as u64;
        stats.host_bytes -= old_len as u64;
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
        let Some(largest) = largest else {
            return Ok(None);
        };
        let decoding = Decoding::start(
            &mut self.backend,
            largest,
            self.config.staging_buffers,
            self.config.decode_blocks,
        )?;
        self.stats.staging_bytes = decoding.as_ref().map_or(0, |d| d.bytes() as u64);
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

impl LayerwiseOffloadManager {
    /// How many of the streamed blocks compressed transport needs to encode
    /// ([`OffloadConfig::compress_blocks`](crate::OffloadConfig::compress_blocks)) for one
    /// forward's uploads to fit in `compute_ms` of compute over a link of `link_gib_s`: the
    /// fewest, spread as `compress_blocks` spreads them, whose encodings and the other blocks'
    /// raw bytes cross the link in that time; every streamed block where none do (the link is
    /// the bottleneck then, and encoding all of them makes it shortest). 0 without streamed
    /// blocks.
    ///
    /// `compute_ms` is what the model's kernels take per forward at the size it runs: a
    /// captured forward less its stalls ([`crate::compute_ms`] of a timeline,
    /// [`Self::start_timeline`]) or a resident run's time;
    /// `link_gib_s` the host link's rate (such as [`OffloadStats::upload_gib_s`] after a few
    /// raw uploads). Call it on a manager built with [`OffloadConfig::compress`](crate::OffloadConfig::compress)
    /// (every streamed block encoded, or some: the others' encodings are estimated from the
    /// encoded ones' ratio); convert it with [`Self::set_encoded_blocks`] of the answer, or
    /// build again with `compress_blocks` of it.
    ///
    /// Compute measured with blocks decoding beside the model includes what the decodes took
    /// from it, and a build with fewer encoded blocks computes faster, so an answer from such a
    /// measurement can be too few where the link needs some encoded. On an H100 with
    /// Wan2.1-14B, a 13 GiB budget at 4096 tokens measured 270.8 ms of compute with all 23
    /// streamed blocks encoded (the resident model takes 251.4), the answer was 6, and that
    /// build ran 278.4 ms, link-bound, against 269.1 with all encoded. Where the link needs
    /// none (the answer is 0) the answer is exact: fully streamed at 16384 tokens and a 20 GiB
    /// budget at 4096 it took 1298.2 and 258.8 ms (raw transport 1294.5 and 258.6, every block
    /// encoded 1309.1 and 262.7). Where the answer is above 0, measure the compute again on the
    /// manager converted to it and ask again, or pass a compute time measured without decodes.
    pub fn encoded_blocks_needed(&self, compute_ms: f64, link_gib_s: f64) -> Result<usize> {
        let op = "encoded_blocks_needed";
        if !(compute_ms.is_finite()
            && compute_ms >= 0.0
            && link_gib_s.is_finite()
            && link_gib_s > 0.0)
        {
            return Err(Error::InvalidArgument {
                op,
                message: format!(
                    "compute_ms must be a finite time of at least 0 and link_gib_s a finite rate above 0 (got {compute_ms} ms and {link_gib_s} GiB/s)"
                ),
            });
        }
        let rt = self.phase.runtime().ok_or(Error::NotInitialized { op })?;
        let streamed: Vec<usize> = (0..rt.blocks.len())
            .filter(|&i| !rt.blocks[i].resident)
            .collect();
        let raw: Vec<f64> = streamed
            .iter()
            .map(|&i| rt.plan.blocks[i].bytes as f64)
            .collect();
        let known: Vec<Option<f64>> = streamed
            .iter()
            .map(|&i| rt.blocks[i].tier.encoding().map(|(e, _)| e.numel() as f64))
            .collect();
        let (enc, of): (f64, f64) = known
            .iter()
            .zip(&raw)
            .filter_map(|(e, r)| e.map(|e| (e, *r)))
            .fold((0.0, 0.0), |(a, b), (e, r)| (a + e, b + r));
        if streamed.is_empty() {
            return Ok(0);
        }
        if of == 0.0 {
            return Err(Error::InvalidArgument {
                op,
                message: "no streamed block is encoded, so their encodings' size is unknown; build with compress(true) and without compress_blocks(0)".into(),
            });
        }
        let ratio = enc / of;
        let encoded: Vec<f64> = known
            .iter()
            .zip(&raw)
            .map(|(e, r)| e.unwrap_or(r * ratio))
            .collect();
        let budget = compute_ms / 1e3 * link_gib_s * (1u64 << 30) as f64;
        Ok(fewest_encoded(&raw, &encoded, budget))
    }
}

impl LayerwiseOffloadManager {
    /// Changes which streamed blocks compressed transport encodes, in place: afterwards `n` of
    /// them are encoded (all of them from the number of streamed blocks on, none at 0), spread
    /// as [`OffloadConfig::compress_blocks`](crate::OffloadConfig::compress_blocks) spreads
    /// them, and the others hold raw host copies. Returns how many streamed blocks are encoded.
    ///
    /// This is what a build with `compress_blocks(n)` would have made, without building
    /// again: each block that changes form is encoded from its raw host copy, or decoded (CPU
    /// reference decoder, all cores) into a new raw one, one block at a time, so host memory
    /// grows by one block at most beyond what the new forms take (blocks leaving their
    /// encoding go first). The device staging buffers grow before a new encoding that needs
    /// more takes its block's place, and are freed when no block is left encoded. The outputs
    /// stay bit-exact: the same bytes reach the slots either way.
    ///
    /// Call it between forwards (no block entered), on an initialized manager built with
    /// [`OffloadConfig::compress`](crate::OffloadConfig::compress) whose store nobody else
    /// holds; not with the stores `compress_blocks` refuses. It waits for the device first.
    /// With [`Self::encoded_blocks_needed`] it sizes the encoding in one process:
    ///
    /// ```no_run
    /// # fn f(m: &mut layerwise_offload::LayerwiseOffloadManager, compute_ms: f64, link_gib_s: f64) -> layerwise_offload::Result<()> {
    /// let n = m.encoded_blocks_needed(compute_ms, link_gib_s)?;
    /// m.set_encoded_blocks(n)?;
    /// # Ok(()) }
    /// ```
    ///
    /// On error (a host allocation refused, or no device memory for larger staging buffers)
    /// the blocks converted so far keep their new form and the others their old one; every
    /// block still streams bit-exact and `restore` gives every weight back.
    pub fn set_encoded_blocks(&mut self, n: usize) -> Result<usize> {
        let op = "set_encoded_blocks";
        if let Some(message) = self.config.unmixed_store() {
            return Err(Error::InvalidArgument {
                op,
                message: message.into(),
            });
        }
        let (memory, encoding) = (self.host_memory(), self.config.encoding());
        let rt = self.phase.ready(op)?;
        if let Some(&block) = rt.in_use().first() {
            return Err(Error::BlockInUse { op, block });
        }
        if rt.host_is_shared() {
            return Err(Error::InvalidArgument {
                op,
                message: "the host store is shared with another manager (or held by a caller of host_store); change the forms before sharing it, or restore the others first".into(),
            });
        }
        // Nothing may still read a host copy or a staging buffer this replaces.
        self.backend.synchronize()?;
        let len = rt.blocks.len();
        let streamed: Vec<usize> = (0..len).filter(|&i| !rt.blocks[i].resident).collect();
        let target = encoded_blocks(true, Some(n), &streamed, len);
        let store = Arc::get_mut(&mut rt.store).ok_or_else(|| Error::InvalidArgument {
            op,
            message: "the host store is shared with another manager; restore the others first"
                .into(),
        })?;
        // Encoded to raw first (these need no staging), then raw to encoded.
        let (to_raw, to_encoded): (Vec<usize>, Vec<usize>) = streamed
            .iter()
            .copied()
            .filter(|&i| rt.blocks[i].tier.encoding().is_some() != target[i])
            .partition(|&i| !target[i]);
        let sizes = to_raw
            .iter()
            .chain(&to_encoded)
            .map(|&i| rt.plan.blocks[i].bytes as u64);
        let sizes: Vec<u64> = sizes.collect();
        let _span = crate::observe::convert(n, sizes.len(), sizes.iter().sum());
        let mut progress = Reporter::start(self.config.progress.as_ref(), Stage::Convert, sizes);
        for i in to_raw.into_iter().chain(to_encoded) {
            let HostTier::Pinned(host) = &rt.blocks[i].tier else {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "block {i} has no host copy of this manager's own to convert; this configuration holds every block in one form"
                    ),
                });
            };
            if self.faults.host_alloc() {
                return Err(Error::HostAlloc {
                    kind: "pinned",
                    bytes: rt.plan.blocks[i].bytes as u64,
                    source: crate::error::TorchMessage("injected fault".into()),
                });
            }
            let new = match host.encoding().map(|(e, raw)| (e.numel(), raw)) {
                // Raw to encoded: the gaps between tensors 0, as a build encodes them; the
                // staging buffers hold its segments before it takes the raw copy's place.
                None => {
                    let layout = &rt.plan.blocks[i];
                    let raw = host.as_whole().ok_or_else(|| Error::InvalidArgument {
                        op,
                        message: format!(
                            "block {i}'s raw host copy is not one buffer; this is a bug"
                        ),
                    })?;
                    zero_gaps(raw, layout)?;
                    let mut counted = OffloadStats::default();
                    let new = encode(raw, (memory, encoding), &mut counted)?;
                    let len = new.staging_len()?;
                    match &mut rt.decoding {
                        Some(dec) => dec.grow(&self.backend, len, &mut self.stats)?,
                        none @ None => {
                            *none = Decoding::start(
                                &mut self.backend,
                                len,
                                self.config.staging_buffers,
                                self.config.decode_blocks,
                            )?;
                            self.stats.staging_bytes =
                                none.as_ref().map_or(0, |d| d.bytes() as u64);
                        }
                    }
                    let (enc, raw_len) = new.encoding().expect("just encoded");
                    count_encoded(&mut self.stats, enc.numel(), raw_len, true);
                    self.stats.host_bytes -= layout.bytes as u64;
                    new
                }
                Some((len, raw)) => {
                    let new = host.decoded_in(memory)?;
                    self.stats.encoded_blocks -= 1;
                    self.stats.encoded_bytes -= len as u64;
                    self.stats.raw_encoded_bytes -= raw as u64;
                    self.stats.host_bytes -= len as u64;
                    self.stats.host_bytes += raw as u64;
                    new
                }
            };
            store.buffers[i] = Some(new.shallow_clone());
            rt.blocks[i].tier = HostTier::Pinned(new);
            progress.advance(rt.plan.blocks[i].bytes as u64);
        }
        // No encoding left: no staging buffers either.
        if rt.blocks.iter().all(|b| b.tier.encoding().is_none()) {
            rt.decoding = None;
            self.stats.staging_bytes = 0;
        }
        Ok(streamed
            .iter()
            .filter(|&&i| rt.blocks[i].tier.encoding().is_some())
            .count())
    }
}

/// Per block of `n`: whether compressed transport encodes its host copy. Without `limit`
/// every block is encoded as `compress` says; with it, `limit` of the `streamed` blocks,
/// spread evenly (the `j`-th streamed block is encoded when `⌊(j+1)·k/s⌋` passes an integer,
/// `k = min(limit, s)`), the other streamed blocks stay raw.
pub(super) fn encoded_blocks(
    compress: bool,
    limit: Option<usize>,
    streamed: &[usize],
    n: usize,
) -> Vec<bool> {
    let mut encode = vec![compress; n];
    if let (true, Some(limit)) = (compress, limit) {
        let s = streamed.len();
        let k = limit.min(s);
        for (j, &i) in streamed.iter().enumerate() {
            encode[i] = (j + 1) * k / s > j * k / s;
        }
    }
    encode
}

/// The fewest `k` whose pattern of encoded blocks
/// ([`encoded_blocks`]: `k` of the streamed blocks spread
/// evenly) moves at most `budget` bytes, the streamed blocks' `raw` bytes or `encoded` bytes
/// each; all of them if no `k` does.
pub(super) fn fewest_encoded(raw: &[f64], encoded: &[f64], budget: f64) -> usize {
    let s = raw.len();
    let positions: Vec<usize> = (0..s).collect();
    (0..=s)
        .find(|&k| {
            let pattern = encoded_blocks(true, Some(k), &positions, s);
            let bytes: f64 = pattern
                .iter()
                .zip(raw.iter().zip(encoded))
                .map(|(&e, (&r, &c))| if e { c } else { r })
                .sum();
            bytes <= budget
        })
        .unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::in_place;
    use crate::OffloadConfig;
    use crate::manager::weights::views;
    use tch::{Device, Kind, Tensor};

    /// `compress_blocks`' pattern: exactly `k` of the streamed blocks encoded (all from `s` on),
    /// evenly spread (the gaps between encoded blocks differ by one at most), the others as
    /// `compress` says; `fewest_encoded` takes the first `k` whose bytes fit.
    #[test]
    fn encoded_blocks_are_spread_evenly_and_the_fewest_that_fit_are_found() {
        use crate::manager::compress::encoded_blocks;
        use crate::manager::compress::fewest_encoded;
        let streamed = [0, 2, 3, 5, 6, 7, 9];
        let s = streamed.len();
        for k in 0..=s + 2 {
            let e = encoded_blocks(true, Some(k), &streamed, 10);
            for i in [1, 4, 8] {
                assert!(e[i], "block {i} is resident: as compress says");
            }
            let on: Vec<usize> = (0..s).filter(|&j| e[streamed[j]]).collect();
            assert_eq!(on.len(), k.min(s), "k {k}");
            let gaps: Vec<usize> = on.windows(2).map(|w| w[1] - w[0]).collect();
            if let (Some(lo), Some(hi)) = (gaps.iter().min(), gaps.iter().max()) {
                assert!(hi - lo <= 1, "k {k}: gaps {gaps:?}");
            }
        }
        assert_eq!(
            encoded_blocks(false, Some(3), &streamed, 10),
            vec![false; 10]
        );
        assert_eq!(encoded_blocks(true, None, &streamed, 10), vec![true; 10]);
        // Four blocks of 10 raw bytes, encodings of 6.
        let (raw, enc) = ([10.0; 4], [6.0; 4]);
        for (budget, k) in [
            (40.0, 0),
            (39.0, 1),
            (36.0, 1),
            (35.9, 2),
            (24.0, 4),
            (1.0, 4),
        ] {
            assert_eq!(fewest_encoded(&raw, &enc, budget), k, "budget {budget}");
        }
        assert_eq!(fewest_encoded(&[], &[], 0.0), 0);
    }

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
