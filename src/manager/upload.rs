//! Host -> slot: a block's host bytes into a slot of the ring on the copy stream (raw), or into
//! a staging buffer and decoded from there into the slot (encoded); in a peer group this
//! member's share only, the others' arriving device to device ([`super::share`]).

use crate::accel::Event;
use crate::error::Context;
use crate::error::{Error, Result};
use crate::peer::PeerGroup;
use crate::stats::Lane;
use layerwise_offload_codec::Segment;
use std::sync::Arc;

use super::decode::segments_of;
use super::device;
use super::fence::Fenced;
use super::phase::Loop;
use super::share::{Share, segment_share};
use super::tier::Transport;
use super::timing::{Pair, Timer};

/// What one upload moved.
struct Moved {
    /// Bytes this member sent from the host.
    sent: usize,
    /// Bytes that arrived from the other members of a peer group.
    received: usize,
    /// Peer groups: the other members' shares have arrived in the slot once these complete.
    incoming: Vec<Arc<Event>>,
}

/// What an upload of encoded segments (a run of a block's) filled.
#[derive(Clone, Copy)]
struct Decoded {
    /// The bytes of the slot they decode into: `(offset, length)`.
    raw: (usize, usize),
    /// Bytes of their encodings (what came from the host).
    encoded: usize,
}

impl Decoded {
    /// What `segments` (consecutive) fill.
    fn of(segments: &[Segment]) -> Decoded {
        match (segments.first(), segments.last()) {
            (Some(a), Some(b)) => Decoded {
                raw: (a.raw.start, b.raw.end - a.raw.start),
                encoded: segments.iter().map(Segment::encoded_len).sum(),
            },
            _ => Decoded {
                raw: (0, 0),
                encoded: 0,
            },
        }
    }
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
            received,
            incoming,
        } = match self.config.peer.clone() {
            Some((group, rank)) => self.upload_peer(&group, rank, block, s, transport)?,
            None => {
                let pair = self.timing_pair()?;
                match transport {
                    Transport::Raw { bytes } => self.upload_raw(block, s, bytes, pair)?,
                    Transport::Encoded { len, raw } => {
                        self.upload_encoded(block, s, (len, raw), pair, None, |_, _| Ok(()))?;
                    }
                }
                Moved {
                    sent: transport.len(),
                    received: 0,
                    incoming: Vec::new(),
                }
            }
        };
        self.rt.ring.hold(s, block, incoming);
        self.stats.uploads += 1;
        self.stats.bytes_uploaded += sent as u64;
        self.stats.peer_bytes += received as u64;
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
    /// excluded); each decode is timed on its own. With `share` (a peer group's size and this
    /// member's rank) only this member's run of segments ([`segment_share`]), and
    /// `on_decoded(segment, slot)` after each one's decode is queued. Returns the bytes of the
    /// slot those segments decode into and of their encodings.
    fn upload_encoded(
        &mut self,
        block: usize,
        s: usize,
        (len, raw): (usize, usize),
        pair: Pair,
        share: Option<(usize, usize)>,
        on_decoded: impl FnMut(&Segment, &mut Fenced) -> Result<()>,
    ) -> Result<Decoded> {
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
                let all = segments_of(&enc, raw, block)?;
                let segments = match share {
                    Some((n, rank)) => &all.as_slice()[segment_share(all.as_slice(), n, rank)],
                    None => all.as_slice(),
                };
                let decoded = Decoded::of(segments);
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
                    segments,
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
                    on_decoded,
                )?;
                if let Some((c, _)) = streams {
                    let key = (block, decoded.encoded as u64, Lane::Upload);
                    self.timer.close(copies, c, key)?;
                }
                Ok(decoded)
            });
        // A disk-tier staging buffer goes back also when the upload fails.
        let released = staged.finish(copy.as_ref());
        uploaded.and_then(|d| released.map(|()| d))
    }

    /// [`Self::upload`] in a peer group. A raw block: this member's share of its bytes from the
    /// host into the slot and from there into the other members' slots; their shares arrive
    /// the same way ([`Share::send`]). An encoded block: this member's run of segments
    /// ([`segment_share`]) uploaded and decoded into the slot as [`Self::upload_encoded`] does
    /// alone, then its decoded bytes sent into the others' slots ([`Share::send_decoded`]).
    /// Returns the bytes moved and the events the compute stream waits for before the slot
    /// holds the block.
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
        self.rt.ring.slot_mut(s).clear_incoming();
        let copy = self.backend.copy_stream();
        match transport {
            Transport::Raw { bytes } => {
                let share = Share {
                    group,
                    rank,
                    round,
                    push: &self.peer.push,
                    block,
                    bytes,
                    push_chunk: self.config.push_chunk,
                };
                let tier = &self.rt.blocks[block].tier;
                let source = |off, len| tier.stage(block, off, len);
                let target = self.rt.ring.slot_mut(s).fenced_mut();
                let timer = (&mut *self.timer, pair);
                let (delivered, staged) = share.send(target, copy.as_ref(), timer, source)?;
                staged.finish(copy.as_ref())?;
                let (_, sent) = share.range();
                Ok(Moved {
                    sent,
                    received: bytes - sent,
                    incoming: group.deliver(round, rank, delivered)?,
                })
            }
            Transport::Encoded { len, raw } => {
                // Writable for the others before this member's own copies are queued, so
                // that their copies into the slot need not wait for these.
                let writable = Share::writable(self.rt.ring.slot(s).fenced(), copy.as_ref())?;
                // A copy of the push streams' handles (a few words, beside the posts and events
                // every upload of a group makes): `upload_encoded` borrows `self` meanwhile.
                let push = self.peer.push.clone();
                let share = Share {
                    group,
                    rank,
                    round,
                    push: &push,
                    block,
                    bytes: raw,
                    push_chunk: self.config.push_chunk,
                };
                let decode = copy.and(self.backend.decode_stream());
                let slot = self.rt.ring.slot(s).fenced();
                let mut send = share.send_decoded(slot, writable, decode)?;
                let n = group.size();
                let mine = self.upload_encoded(
                    block,
                    s,
                    (len, raw),
                    pair,
                    Some((n, rank)),
                    |seg, slot| send.decoded(seg, slot),
                )?;
                let delivered = send.finish(self.rt.ring.slot_mut(s).fenced_mut())?;
                Ok(Moved {
                    sent: mine.encoded,
                    received: raw - mine.raw.1,
                    incoming: group.deliver(round, rank, delivered)?,
                })
            }
        }
    }
}

fn no_staging() -> Error {
    Error::InvalidArgument {
        op: "upload",
        message: "an encoded block with no staging buffer: this is a bug".into(),
    }
}
