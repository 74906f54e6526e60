//! Host -> slot: one copy of a block's host buffer into its slot on the copy stream or, in a
//! peer group, this member's share from the host and the other members' shares device to device.

use crate::accel::{self, Event, Stream};
use crate::error::{Error, Result};
use crate::peer::{self, PeerGroup, Post};
use crate::stats::Lane;
use std::sync::Arc;
use tch::Tensor;

use super::LayerwiseOffloadManager;
use super::device;

/// A peer group member's own state.
#[derive(Debug, Default)]
pub(super) struct PeerLink {
    /// By receiving rank: the stream this member's shares go out on to that member (CUDA; the
    /// same stream for all unless `push_stream_per_member`).
    pub(super) push: Vec<Stream>,
    /// Uploads done so far (the k-th is the same block on every member).
    round: u64,
    /// Joined and not yet left.
    pub(super) joined: bool,
}

impl LayerwiseOffloadManager {
    /// Queues the upload of block `block` into slot `s`.
    pub(super) fn upload(&mut self, block: usize, s: usize) -> Result<()> {
        let r = self.upload_inner(block, s);
        // In a peer group the others wait for this member's part of the upload: a failure here
        // breaks the group, so that they get an error now instead of at the timeout.
        if let (Err(e), Some((group, rank))) = (&r, &self.config.peer)
            && !matches!(e, Error::PeerGroup { .. })
        {
            group.fail(*rank, &crate::error::chain_text(e));
        }
        r
    }

    fn upload_inner(&mut self, block: usize, s: usize) -> Result<()> {
        let _span = crate::observe::upload(block, self.layout(block).bytes);
        self.evict(s)?;
        if self.faults.upload() {
            return Err(Error::Torch {
                op: "upload",
                source: crate::error::TorchMessage("injected fault".into()),
            });
        }
        if let Some((group, rank)) = self.config.peer.clone() {
            return self.upload_peer(&group, rank, block, s);
        }
        let bytes = self.layout(block).bytes;
        let pair = self.timing_pair()?;
        let encoded = self.blocks[block]
            .host
            .as_ref()
            .and_then(|h| h.encoding().map(|(e, raw)| (e.shallow_clone(), raw)));
        let moved = match encoded {
            Some((enc, raw)) => {
                self.upload_encoded(block, s, (&enc, raw), pair)?;
                enc.numel()
            }
            None => {
                let staged = self.host_range(block, 0, bytes)?;
                // A staging buffer goes back also when the copy fails.
                let copied = self.copy_into_slot(block, s, bytes, &staged.pieces, pair);
                let released = self.release_staged(staged);
                copied.and(released)?;
                bytes
            }
        };
        self.slots[s].hold(block, Vec::new());
        self.blocks[block].slot = Some(s);
        self.stats.uploads += 1;
        self.stats.bytes_uploaded += moved as u64;
        Ok(())
    }

    /// Queues the copy of `host` (block `block`'s `bytes` bytes) into slot `s`.
    fn copy_into_slot(
        &mut self,
        block: usize,
        s: usize,
        bytes: usize,
        host: &[(usize, Tensor)],
        pair: super::timing::Pair,
    ) -> Result<()> {
        let slot = &mut self.slots[s];
        let dst = slot.dst(bytes)?;
        let copy = self.backend.copy_stream();
        match &copy {
            Some(copy) => {
                // The compute stream released the slot's previous block: wait for that work.
                slot.wait_writable(copy)?;
                self.timer
                    .time(pair, copy, (block, bytes as u64, Lane::Upload), || {
                        // SAFETY: `host` and the slot live in the manager until Drop or restore,
                        // both of which synchronize the copy stream first; nothing writes the
                        // host buffer while an upload may read it (update_tensor synchronizes
                        // first; a disk-tier staging buffer is read into again only after the
                        // event recorded behind this copy), and the compute stream reads the
                        // slot only after waiting on `ready`.
                        unsafe { device::copy_pieces(&dst, host, Some(copy), "upload")? };
                        slot.mark_ready(copy)
                    })?;
            }
            // SAFETY: without a stream the copy is done when `copy` returns.
            None => unsafe { device::copy_pieces(&dst, host, None, "upload")? },
        }
        Ok(())
    }

    /// [`Self::upload`] in a peer group: this member's share from the host into its slot, then
    /// from there into the other members' slots; their shares arrive in this slot the same way.
    /// An encoded block goes through the staging buffers instead
    /// ([`Self::upload_encoded_peer`]).
    fn upload_peer(
        &mut self,
        group: &PeerGroup,
        rank: usize,
        block: usize,
        s: usize,
    ) -> Result<()> {
        let n = group.size();
        let bytes = self.layout(block).bytes;
        let round = self.peer.round;
        self.peer.round += 1;
        let pair = self.timing_pair()?;
        let encoded = self.blocks[block]
            .host
            .as_ref()
            .and_then(|h| h.encoding().map(|(e, raw)| (e.shallow_clone(), raw)));
        if let Some((enc, raw)) = encoded {
            self.slots[s].clear_incoming();
            let len =
                self.upload_encoded_peer((group, rank), block, s, (&enc, raw), round, pair)?;
            self.slots[s].hold(block, Vec::new());
            self.blocks[block].slot = Some(s);
            self.stats.uploads += 1;
            self.stats.bytes_uploaded += len as u64;
            self.stats.peer_bytes += (enc.numel() - len) as u64;
            return Ok(());
        }
        let copy = self.backend.copy_stream();
        let slot = &mut self.slots[s];
        // 1. The slot may be written once compute released its previous block and this member's
        //    share of that block has gone out to the others.
        let writable = match copy {
            Some(c) => {
                slot.wait_writable(&c)?;
                let mut e = Event::new()?;
                e.record(&c)?;
                Some(Arc::new(e))
            }
            None => None,
        };
        slot.clear_incoming();
        let dst = slot.dst(bytes)?;
        let posts = group.post(
            round,
            rank,
            Post {
                block,
                bytes,
                buf: dst.shallow_clone(),
                writable,
            },
        )?;
        // 2. This member's share: host -> own slot -> every other member's slot.
        let (off, len) = peer::share(bytes, n, rank);
        let narrow = |t: &Tensor| {
            t.f_narrow(0, off as i64, len as i64)
                .map_err(|e| Error::from(("upload", e)))
        };
        let staged = self.host_range(block, off, len)?;
        let src = &staged.pieces;
        let mine = narrow(&dst)?;
        let slot = &mut self.slots[s];
        let mut delivered: Vec<Option<Arc<Event>>> = vec![None; n];
        match copy {
            Some(c) => {
                self.timer
                    .time(pair, &c, (block, len as u64, Lane::Upload), || {
                        // SAFETY: the host buffer and the slot live until restore or Drop, which
                        // wait for the copy stream; the slot was made writable above (its
                        // previous block's compute and outgoing copies are done), and the
                        // compute stream reads it only after `ready` and the incoming events.
                        unsafe { device::copy_pieces(&mine, src, Some(&c), "upload")? };
                        slot.mark_ready(&c)
                    })?;
                // SAFETY: the peers' slots stay allocated until every member has left the group;
                // each one posted `writable` once compute released its previous block there and
                // its compute waits for our delivery events; `mine` is not overwritten before
                // `pushed` (recorded below, waited by this slot's next upload).
                delivered = unsafe {
                    push_shares(
                        &posts,
                        rank,
                        &self.peer.push,
                        &mine,
                        (off, len),
                        slot.uploaded(),
                    )?
                };
                for (o, p) in self
                    .peer
                    .push
                    .iter()
                    .enumerate()
                    .filter(|(o, _)| *o != rank)
                {
                    slot.mark_pushed(o, p)?;
                }
                slot.shares_pushed();
            }
            None => {
                // SAFETY: without a stream each copy is done when `copy` returns.
                unsafe { device::copy_pieces(&mine, src, None, "upload")? };
                for (_, post) in posts.iter().enumerate().filter(|(o, _)| *o != rank) {
                    let mut theirs = narrow(&post.buf)?;
                    // SAFETY: as above.
                    unsafe { device::copy(&mut theirs, &mine, None, "upload")? };
                }
            }
        }
        self.release_staged(staged)?;
        let incoming = group.deliver(round, rank, delivered)?;
        self.slots[s].hold(block, incoming);
        self.blocks[block].slot = Some(s);
        self.stats.uploads += 1;
        self.stats.bytes_uploaded += len as u64;
        self.stats.peer_bytes += (bytes - len) as u64;
        Ok(())
    }

    /// Waits for this member's outgoing peer copies and leaves the group. Copies into this
    /// member's slots need no wait here: the group keeps every ring until each member has left,
    /// and each one waits for its own outgoing copies first.
    pub(super) fn leave_group(&mut self) {
        if !self.peer.joined {
            return;
        }
        for p in &self.peer.push {
            let _ = p.synchronize();
        }
        if let Some((group, rank)) = &self.config.peer {
            group.leave(*rank);
        }
        self.peer.joined = false;
    }
}

/// Sends this member's share (`mine`, bytes `off..off + len` of the block or encoding, once
/// `uploaded` has completed) into the same bytes of every other member's posted buffer, each
/// on the push stream to that member after the member's `writable`; returns one delivery event
/// per receiving rank.
///
/// # Safety
/// Every posted buffer stays allocated until this member has left the group and waited for its
/// push streams; its owner neither reads nor writes those bytes between its `writable` and our
/// delivery event; `mine` is not written again before the push streams' work queued here has
/// completed.
pub(super) unsafe fn push_shares(
    posts: &[Post],
    rank: usize,
    push: &[Stream],
    mine: &Tensor,
    (off, len): (usize, usize),
    uploaded: &Event,
) -> Result<Vec<Option<Arc<Event>>>> {
    let mut delivered = vec![None; posts.len()];
    for (o, post) in posts.iter().enumerate().filter(|(o, _)| *o != rank) {
        let p = &push[o];
        uploaded.wait(p)?;
        if let Some(w) = &post.writable {
            w.wait(p)?;
        }
        let theirs = post
            .buf
            .f_narrow(0, off as i64, len as i64)
            .map_err(|e| Error::from(("upload", e)))?;
        // SAFETY: the caller's obligations; this stream waited for `uploaded` (our share is in
        // `mine`) and for the receiver's `writable`.
        unsafe { accel::copy_peer_async(&theirs, mine, p)? };
        let mut e = Event::new()?;
        e.record(p)?;
        delivered[o] = Some(Arc::new(e));
    }
    Ok(delivered)
}
