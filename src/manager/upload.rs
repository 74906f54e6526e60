//! Host -> slot: a block's host bytes into a slot of the ring on the copy stream (raw), or into
//! a staging buffer and decoded from there into the slot (encoded); in a peer group this
//! member's share only, the others' arriving device to device ([`super::share`]).

use crate::accel::Event;
use crate::error::Context;
use crate::error::{Error, Result};
use crate::peer::PeerGroup;
use crate::stats::Lane;
use std::sync::Arc;

use super::decode::{decode_on_cpu, segments_of};
use super::device;
use super::phase::Loop;
use super::share::Share;
use super::tier::Transport;
use super::timing::{Pair, Timer};

/// What one upload moved.
struct Moved {
    /// Bytes this member sent from the host.
    sent: usize,
    /// Bytes of the whole block (or encoding) its buffer received.
    total: usize,
    /// Peer groups: the other members' shares have arrived in the slot once these complete.
    incoming: Vec<Arc<Event>>,
}

impl Loop<'_> {
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
        let _span = crate::observe::upload(block, self.rt.layout(block).bytes);
        self.evict(s)?;
        if self.faults.upload() {
            return Err(Error::Torch {
                op: "upload",
                source: crate::error::TorchMessage("injected fault".into()),
            });
        }
        let transport = self.rt.blocks[block]
            .tier
            .transport(block, self.rt.layout(block).bytes);
        let Moved {
            sent,
            total,
            incoming,
        } = match self.config.peer.clone() {
            Some((group, rank)) => self.upload_peer(&group, rank, block, s, transport)?,
            None => {
                let pair = self.timing_pair()?;
                match transport {
                    Transport::Raw { bytes } => self.upload_raw(block, s, bytes, pair)?,
                    Transport::Encoded { len, raw } => {
                        self.upload_encoded(block, s, (len, raw), pair)?;
                    }
                }
                Moved {
                    sent: transport.len(),
                    total: transport.len(),
                    incoming: Vec::new(),
                }
            }
        };
        self.rt.ring.hold(s, block, incoming);
        self.stats.uploads += 1;
        self.stats.bytes_uploaded += sent as u64;
        self.stats.peer_bytes += (total - sent) as u64;
        Ok(())
    }

    /// Queues the copy of raw block `block` (`bytes` long) into slot `s`.
    fn upload_raw(&mut self, block: usize, s: usize, bytes: usize, pair: Pair) -> Result<()> {
        let staged = self.rt.blocks[block].tier.stage(block, 0, bytes)?;
        let dst = self.rt.ring.slot(s).dst(bytes);
        let copied = dst.and_then(|dst| match self.backend.copy_stream() {
            Some(copy) => {
                let slot = self.rt.ring.slot_mut(s).fenced_mut();
                // The compute stream released the slot's previous block: wait for that work.
                slot.wait_writable(&copy)?;
                self.timer
                    .time(pair, &copy, (block, bytes as u64, Lane::Upload), || {
                        // SAFETY: the host bytes and the slot live in the manager until Drop or
                        // restore, both of which synchronize the copy stream first; nothing
                        // writes the host bytes while an upload may read them (update_tensor
                        // synchronizes first; a disk-tier staging buffer is read into again
                        // only after the event recorded behind this copy), and the compute
                        // stream reads the slot only after waiting on `ready`.
                        unsafe { device::copy_pieces(&dst, &staged.pieces, &copy, "upload")? };
                        slot.mark_ready(&copy)
                    })
            }
            None => device::copy_pieces_now(&dst, &staged.pieces, "upload"),
        });
        // A staging buffer goes back also when the copy fails.
        let released = staged.finish(self.backend.copy_stream().as_ref());
        copied.and(released)
    }

    /// Uploads encoded block `block` (an encoding of `len` bytes, `raw` bytes raw) into slot
    /// `s`: segment by segment, each segment's encoding into the next staging buffer on the copy
    /// stream and its decode into its place in the slot on the decode stream (CUDA; in the CPU
    /// test mode the same steps in host memory, each done at once, with the reference decoder).
    /// `pair` times the copies together (from the first segment's to the last one's, waits for
    /// staging buffers included) or, while a timeline is captured, each copy on its own (waits
    /// excluded); each decode is timed on its own.
    fn upload_encoded(
        &mut self,
        block: usize,
        s: usize,
        (len, raw): (usize, usize),
        pair: Pair,
    ) -> Result<()> {
        let out = self.rt.ring.slot(s).dst(raw)?;
        let staged = self.rt.blocks[block].tier.stage(block, 0, len)?;
        let copy = self.backend.copy_stream();
        let decode = self.backend.decode_stream();
        let uploaded = self
            .rt
            .decoding
            .as_mut()
            .ok_or_else(no_staging)
            .and_then(|dec| {
                // CUDA: the copy and decode streams; the CPU test mode: neither (done at once).
                let streams = match (&copy, &decode) {
                    (Some(c), Some(d)) if dec.on_gpu() => Some((c, d)),
                    _ => None,
                };
                let enc = staged.one_piece(len)?;
                let segments = segments_of(&enc, raw, block)?;
                let slot = self.rt.ring.slot_mut(s).fenced_mut();
                let timing = pair.is_some();
                // While a timeline is captured each segment's copy is timed on its own, so that
                // the copy stream's waits for staging buffers show as idle time.
                let per_segment = self.timer.is_tracing();
                let copies = match streams {
                    Some((c, _)) if !per_segment => Timer::open(pair, c)?,
                    _ => {
                        self.timer.put_back(pair);
                        None
                    }
                };
                let timer = &mut *self.timer;
                dec.upload(
                    &segments,
                    (slot, &out),
                    streams,
                    (block, timer, timing, per_segment, &mut *self.stats),
                    |seg, dst| {
                        let part = enc
                            .f_narrow(0, seg.encoded.start as i64, seg.encoded_len() as i64)
                            .context("upload")?;
                        let Some((c, _)) = streams else {
                            return device::copy_pieces_now(dst, &[(0, part)], "upload");
                        };
                        // SAFETY: the host encoding lives in the manager until restore or Drop,
                        // which synchronize the copy and decode streams first, and nothing writes
                        // it meanwhile (a disk-tier staging buffer is read into again only after
                        // the event recorded behind these copies); the staging buffer is not read
                        // by a decode until its `ready`, recorded after this copy, and was released
                        // by its previous decode (`free`, waited before this copy).
                        unsafe { device::copy_pieces(dst, &[(0, part)], c, "upload") }
                    },
                )?;
                match streams {
                    Some((c, _)) => self
                        .timer
                        .close(copies, c, (block, len as u64, Lane::Upload)),
                    None => Ok(()),
                }
            });
        // A disk-tier staging buffer goes back also when the upload fails.
        let released = staged.finish(copy.as_ref());
        uploaded.and(released)
    }

    /// [`Self::upload`] in a peer group: this member's share of the block (or of its encoding)
    /// from the host into its slot (or a staging buffer) and from there into the other members'
    /// buffers; their shares arrive the same way. An encoded block is then decoded whole into
    /// the slot by every member, segment by segment out of the one staging buffer (the group's
    /// protocol moves one buffer per upload: a peer group's staging buffers hold a whole
    /// encoding each). Returns the bytes this member sent from the host and the
    /// bytes of the whole block (or encoding), and the events the compute stream waits for
    /// before the slot holds the block.
    fn upload_peer(
        &mut self,
        group: &PeerGroup,
        rank: usize,
        block: usize,
        s: usize,
        transport: Transport,
    ) -> Result<Moved> {
        let round = self.peer.round;
        self.peer.round += 1;
        let pair = self.timing_pair()?;
        let timing = pair.is_some();
        self.rt.ring.slot_mut(s).clear_incoming();
        let copy = self.backend.copy_stream();
        let share = Share {
            group,
            rank,
            round,
            push: &self.peer.push,
            block,
            bytes: transport.len(),
            push_chunk: self.config.push_chunk,
        };
        let moved = |incoming| Moved {
            sent: share.range().1,
            total: share.bytes,
            incoming,
        };
        let tier = &self.rt.blocks[block].tier;
        let source = |off, len| tier.stage(block, off, len);
        let Transport::Encoded { len, raw } = transport else {
            let target = self.rt.ring.slot_mut(s).fenced_mut();
            let timer = (&mut *self.timer, pair);
            let (delivered, staged) = share.send(target, copy.as_ref(), timer, source)?;
            staged.finish(copy.as_ref())?;
            return Ok(moved(group.deliver(round, rank, delivered)?));
        };
        let out = self.rt.ring.slot(s).dst(raw)?;
        let dec = self.rt.decoding.as_mut().ok_or_else(no_staging)?;
        let k = dec.next();
        let timer = (&mut *self.timer, pair);
        // This member's share of the encoding, and the segment records from its whole host
        // encoding (the same bytes the members assemble in the staging buffer).
        let mut segments = None;
        let source = |off, part| {
            let staged = tier.stage(block, 0, len)?;
            let walked = staged
                .one_piece(len)
                .and_then(|enc| segments_of(&enc, raw, block));
            match walked {
                Ok(w) => segments = Some(w),
                Err(e) => {
                    staged.finish(None)?;
                    return Err(e);
                }
            }
            staged.narrow(off, part)
        };
        let (delivered, staged) = share.send(dec.staging_mut(k), copy.as_ref(), timer, source)?;
        staged.finish(copy.as_ref())?;
        let segments = segments.ok_or_else(no_staging)?;
        let incoming = group.deliver(round, rank, delivered)?;
        // The whole encoding is here once this member's upload and every incoming share are:
        // then the decode, segment by segment out of the one staging buffer.
        match (copy, self.backend.decode_stream()) {
            (Some(_), Some(decode)) => {
                dec.staging(k).wait_ready(&decode)?;
                for e in &incoming {
                    e.wait(&decode)?;
                }
                let slot = self.rt.ring.slot_mut(s).fenced_mut();
                let timer = (&mut *self.timer, timing, &mut *self.stats);
                dec.decode_whole(k, &segments, (slot, &out), &decode, block, timer)?;
            }
            _ => decode_on_cpu(&dec.staging(k).head(len)?, &out)?,
        }
        Ok(moved(Vec::new()))
    }
}

fn no_staging() -> Error {
    Error::InvalidArgument {
        op: "upload",
        message: "an encoded block with no staging buffer: this is a bug".into(),
    }
}
