//! Which streamed blocks compressed transport encodes: the pattern
//! ([`OffloadConfig::compress_blocks`](crate::OffloadConfig::compress_blocks): `k` of them
//! spread evenly), how many the link needs for a compute time
//! ([`LayerwiseOffloadManager::encoded_blocks_needed`]), and changing a built manager's blocks
//! to another count in place ([`LayerwiseOffloadManager::set_encoded_blocks`]). A block's form
//! is only its host copy (the upload path picks its transport per block from the tier), so
//! none of this touches the upload path.

use crate::error::{Error, Result};
use crate::progress::{Reporter, Stage};
use crate::stats::OffloadStats;
use std::sync::Arc;

use super::LayerwiseOffloadManager;
use super::compress::{count_encoded, encode, stage_up_to, uncount_encoded, zero_gaps};
use super::tier::HostTier;

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
                    // Counted in the manager's statistics only once it takes the block's
                    // place (below), so that a failure to stage it leaves them as they were.
                    let new = encode(raw, (memory, encoding), &mut OffloadStats::default())?;
                    let staging = (self.config.staging_buffers, self.config.decode_blocks);
                    let len = new.staging_len()?;
                    stage_up_to(
                        &mut rt.decoding,
                        &mut self.backend,
                        len,
                        staging,
                        &mut self.stats,
                    )?;
                    let (enc, raw_len) = new.encoding().expect("just encoded");
                    count_encoded(&mut self.stats, enc.numel(), raw_len, true);
                    self.stats.host_bytes -= layout.bytes as u64;
                    new
                }
                Some((len, raw)) => {
                    let new = host.decoded_in(memory)?;
                    uncount_encoded(&mut self.stats, len, raw);
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
    use super::{encoded_blocks, fewest_encoded};

    /// `compress_blocks`' pattern: exactly `k` of the streamed blocks encoded (all from `s` on),
    /// evenly spread (the gaps between encoded blocks differ by one at most), the others as
    /// `compress` says; `fewest_encoded` takes the first `k` whose bytes fit.
    #[test]
    fn encoded_blocks_are_spread_evenly_and_the_fewest_that_fit_are_found() {
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
}
