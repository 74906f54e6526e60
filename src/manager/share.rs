//! Peer groups: this member's share of an upload. A raw block's share goes from the host into
//! the member's slot and from there device to device into the same bytes of every other
//! member's slot ([`Share::send`]); their shares arrive in this member's slot the same way.
//!
//! An encoded block is shared by its segments ([`segment_share`]): each member uploads and
//! decodes its own run of segments into its slot, as a single GPU does, and then sends the
//! decoded bytes on ([`Share::send_decoded`]). The host links carry the encoding, split
//! between the members; each member decodes only its share; the device-to-device copies carry
//! raw bytes, over links several times faster than the host's; and the staging buffers stay a
//! segment's size.

use crate::accel::{self, Event, Stream};
use crate::error::Context;
use crate::error::Result;
use crate::host::pieces_within;
use crate::peer::{self, PeerGroup, Post};
use crate::stats::Lane;
use layerwise_offload_codec::Segment;
use std::ops::Range;
use std::sync::Arc;
use tch::Tensor;

use super::device;
use super::fence::Fenced;
use super::tier::Staged;
use super::timing::{Pair, Timer};

/// A peer group member's own state.
#[derive(Debug, Default)]
pub(super) struct PeerLink {
    /// By receiving rank: the stream this member's shares go out on to that member (CUDA; the
    /// same stream for all unless `push_stream_per_member`).
    pub(super) push: Vec<Stream>,
    /// Uploads done so far (the k-th is the same block on every member).
    pub(super) round: u64,
    /// Joined and not yet left.
    pub(super) joined: bool,
}

/// One member's part of one upload in a group.
pub(super) struct Share<'a> {
    pub(super) group: &'a PeerGroup,
    pub(super) rank: usize,
    /// The upload's number (the same block on every member).
    pub(super) round: u64,
    /// The push streams, by receiving rank.
    pub(super) push: &'a [Stream],
    /// The block uploaded.
    pub(super) block: usize,
    /// Bytes of what every member's buffer receives (the block, or its encoding).
    pub(super) bytes: usize,
    /// Most bytes of one chunk of the share: each chunk goes on to the others as soon as it has
    /// arrived from the host ([`PUSH_CHUNK_BYTES`] unless configured).
    pub(super) push_chunk: usize,
}

/// Most bytes of a share that arrive from the host before they go on to the other members, by
/// default: the whole share, the protocol measured so far (`bench/RESULTS.md`).
///
/// A share can go in chunks instead (`OffloadConfig::peer_push_chunk_bytes`, with the `testing`
/// feature), so that the copies to the others of all but the last chunk run while the rest is
/// still arriving: a block is then whole on every member one chunk's device-to-device copy after
/// the last byte of the slowest share arrived, not one whole share's. Sent whole, that copy adds
/// to the time between a slot's release and the next block's arrival, which at compute-bound
/// sizes with one block uploaded ahead every block waits for (docs/DESIGN.md, "Several GPUs").
/// Chunks become the default once measured on GPUs with a peer link.
pub(super) const PUSH_CHUNK_BYTES: usize = usize::MAX;

/// `(offset, length)` of the chunks a share of `len` bytes is sent in: back to back from 0, each
/// `chunk` bytes but the last (one chunk of 0 bytes for an empty share).
pub(super) fn chunks(len: usize, chunk: usize) -> Vec<(usize, usize)> {
    let chunk = chunk.max(1);
    if len == 0 {
        return vec![(0, 0)];
    }
    (0..len)
        .step_by(chunk)
        .map(|o| (o, chunk.min(len - o)))
        .collect()
}

/// The run of `segments` (indices) that member `rank` of a group of `n` uploads and decodes:
/// the runs tile the segments in rank order, each cut where the encoded bytes before it come
/// closest to `k / n` of the whole (a segment goes to the member that holds its middle byte),
/// so that the members' host links carry about the same bytes. Every member computes the same
/// cuts from the same encoding. A member may get no segment (fewer segments than members).
pub(super) fn segment_share(segments: &[Segment], n: usize, rank: usize) -> Range<usize> {
    let total = segments.last().map_or(0, |s| s.encoded.end) as u128;
    let n = n.max(1) as u128;
    // The segments whose encoded middle lies before k/n of the encoding: 2 * mid * n < 2 * k
    // * total, in integers.
    let cut = |k: usize| {
        let k = k as u128;
        segments.partition_point(|s| {
            (s.encoded.start as u128 + s.encoded.end as u128) * n < 2 * k * total
        })
    };
    cut(rank)..cut(rank + 1)
}

impl Share<'_> {
    /// This member's share of the bytes: `(offset, length)`.
    pub(super) fn range(&self) -> (usize, usize) {
        peer::share(self.bytes, self.group.size(), self.rank)
    }

    /// Makes `copy` wait until `target` may be written (its last reader done, this member's
    /// previous shares of it sent) and records that point: the other members write into it
    /// once the returned event completes (CUDA; None without a stream).
    pub(super) fn writable(target: &Fenced, copy: Option<&Stream>) -> Result<Option<Arc<Event>>> {
        match copy {
            Some(c) => {
                target.wait_writable(c)?;
                let mut e = Event::new()?;
                e.record(c)?;
                Ok(Some(Arc::new(e)))
            }
            None => Ok(None),
        }
    }

    /// Announces `target`'s first [`Self::bytes`] bytes to the group for this upload (of an
    /// `encoded` block or a raw one) and waits for every member's announcement (the others'
    /// buffers, by rank).
    fn post(
        &self,
        target: &Fenced,
        writable: Option<Arc<Event>>,
        encoded: bool,
    ) -> Result<Vec<Post>> {
        self.group.post(
            self.round,
            self.rank,
            Post {
                block: self.block,
                bytes: self.bytes,
                encoded,
                buf: target.head(self.bytes)?,
                writable,
            },
        )
    }

    /// Encoded blocks: announces `slot` to the group (made writable by the caller,
    /// [`Self::writable`], the event given here) and returns what sends this member's decoded
    /// segments on to the others as they are decoded on `decode` ([`DecodedSend::decoded`],
    /// then [`DecodedSend::finish`]). Without `decode` (the CPU test mode, where each decode is
    /// done when it returns) every copy is done at once.
    pub(super) fn send_decoded(
        &self,
        slot: &Fenced,
        writable: Option<Arc<Event>>,
        decode: Option<Stream>,
    ) -> Result<DecodedSend<'_>> {
        let posts = self.post(slot, writable, true)?;
        Ok(DecodedSend {
            out: Outgoing::new(self, posts, decode.is_some()),
            decode,
            pending: None,
        })
    }

    /// Fills `target`'s first `bytes` bytes together with the other members: posts the buffer
    /// once it may be written (its last reader done, this member's previous share of it sent),
    /// copies this member's share (`source` gives its host bytes, asked after the post) into it
    /// on `copy`, chunk by chunk ([`Self::push_chunk`] bytes), each chunk on into the others'
    /// buffers as soon as it has arrived, and records `ready` behind the copies from the host.
    /// Returns the delivery events to hand to [`PeerGroup::deliver`] and the host bytes, for the
    /// caller to give back. Without a stream (the CPU test mode) every copy is done when this
    /// returns.
    pub(super) fn send(
        &self,
        target: &mut Fenced,
        copy: Option<&Stream>,
        (timer, pair): (&mut Timer, Pair),
        source: impl FnOnce(usize, usize) -> Result<Staged>,
    ) -> Result<(Vec<Option<Arc<Event>>>, Staged)> {
        // 1. The buffer may be written once its last reader is done and this member's share
        //    of its previous contents has gone out to the others.
        let writable = Self::writable(target, copy)?;
        let posts = self.post(target, writable, false)?;
        // 2. This member's share: host -> own buffer -> every other member's, chunk by chunk.
        let (off, len) = self.range();
        let staged = source(off, len)?;
        let mut out = Outgoing::new(self, posts, copy.is_some());
        let parts = chunks(len, self.push_chunk);
        let buf = target.buf().shallow_clone();
        let chunk = |po: usize, pl: usize| -> Result<(Tensor, Vec<(usize, Tensor)>)> {
            let part = buf.f_narrow(0, (off + po) as i64, pl as i64);
            let host = pieces_within(&staged.pieces, po, pl, "upload")?;
            Ok((part.context("upload")?, host))
        };
        match copy {
            Some(c) => {
                timer.time(pair, c, (self.block, len as u64, Lane::Upload), || {
                    for &(po, pl) in &parts {
                        let (part, host) = chunk(po, pl)?;
                        // SAFETY: the host bytes live in the manager until restore or Drop,
                        // which wait for the copy stream, and nothing writes them meanwhile; the
                        // buffer was made writable above, and nothing reads it before `ready`
                        // (recorded after each chunk; compute or the decode waits for it only
                        // after the last, the pushes after each).
                        unsafe { device::copy_pieces(&part, &host, c, "upload")? };
                        target.mark_ready(c)?;
                        out.push(target, (off + po, pl))?;
                    }
                    Ok(())
                })?;
            }
            None => {
                for &(po, pl) in &parts {
                    let (part, host) = chunk(po, pl)?;
                    device::copy_pieces_now(&part, &host, "upload")?;
                    out.push(target, (off + po, pl))?;
                }
            }
        }
        let delivered = out.finish(target)?;
        Ok((delivered, staged))
    }
}

/// What a member sends on to the other members of its group in one upload: ranges of its
/// buffer, each once the buffer's latest `ready` covers it, into the same bytes of every other
/// member's buffer (posted to the group), on the push streams; then the delivery events.
struct Outgoing<'a> {
    share: &'a Share<'a>,
    /// Every member's buffer, by rank.
    posts: Vec<Post>,
    /// The copies run on the push streams (CUDA); without, each is done at once.
    streams: bool,
    /// The push streams waited for the receivers' `writable` already.
    started: bool,
}

impl<'a> Outgoing<'a> {
    fn new(share: &'a Share<'a>, posts: Vec<Post>, streams: bool) -> Outgoing<'a> {
        Outgoing {
            share,
            posts,
            streams,
            started: false,
        }
    }

    /// Sends bytes `[off, off + len)` of `from`, whose writes `from`'s latest `ready` follows.
    fn push(&mut self, from: &Fenced, (off, len): (usize, usize)) -> Result<()> {
        let (off, len) = (off as i64, len as i64);
        let mine = from.buf().f_narrow(0, off, len).context("upload")?;
        let share = self.share;
        for (o, post) in self.posts.iter().enumerate() {
            if o == share.rank {
                continue;
            }
            let mut theirs = post.buf.f_narrow(0, off, len).context("upload")?;
            if !self.streams {
                device::copy_now(&mut theirs, &mine, "upload")?;
                continue;
            }
            let p = &share.push[o];
            if !self.started
                && let Some(w) = &post.writable
            {
                w.wait(p)?;
            }
            // A stream waits for the recording at the time of the call: this range's.
            from.wait_ready(p)?;
            // SAFETY: the other member's buffer stays allocated until every member has left the
            // group (it joined the group's ring), and its owner posted `writable` (waited above,
            // before the first range) once nothing read it any more; it reads these bytes only
            // after our delivery event, recorded by `finish` after the last range. `mine` holds
            // this range once `ready` (waited above) completes, and is not written again before
            // `pushed` (recorded by `finish`, waited by the buffer's next write).
            unsafe { accel::copy_peer_async(&theirs, &mine, p)? };
        }
        self.started = true;
        Ok(())
    }

    /// Every range is queued: records the delivery events to hand to [`PeerGroup::deliver`]
    /// (None for this member, and without streams) and `from`'s `pushed`, which its next write
    /// waits for.
    fn finish(self, from: &mut Fenced) -> Result<Vec<Option<Arc<Event>>>> {
        let share = self.share;
        let mut delivered: Vec<Option<Arc<Event>>> = vec![None; share.group.size()];
        if !self.streams {
            return Ok(delivered);
        }
        for o in (0..share.group.size()).filter(|&o| o != share.rank) {
            let p = &share.push[o];
            let mut e = Event::new()?;
            e.record(p)?;
            delivered[o] = Some(Arc::new(e));
            from.mark_pushed(o, p)?;
        }
        from.shares_pushed();
        Ok(delivered)
    }
}

/// A member's decoded segments on their way to the other members of its group (an encoded
/// block's upload, [`Share::send_decoded`]): runs of consecutive segments of at least
/// [`Share::push_chunk`] raw bytes go on as soon as their last segment is decoded, the rest
/// once the member's last segment is.
pub(super) struct DecodedSend<'a> {
    out: Outgoing<'a>,
    /// The decode stream (CUDA).
    decode: Option<Stream>,
    /// Raw bytes `[start, end)` decoded and not yet sent.
    pending: Option<(usize, usize)>,
}

impl DecodedSend<'_> {
    /// `segment` is decoded into `slot` (queued on the decode stream): its raw bytes join the
    /// run to send, which goes on once it reaches [`Share::push_chunk`] bytes.
    pub(super) fn decoded(&mut self, segment: &Segment, slot: &mut Fenced) -> Result<()> {
        let (start, _) = self
            .pending
            .unwrap_or((segment.raw.start, segment.raw.start));
        self.pending = Some((start, segment.raw.end));
        if segment.raw.end - start >= self.out.share.push_chunk {
            if let Some(d) = &self.decode {
                // The pushes of this run wait for this recording, made behind its last decode.
                slot.mark_ready(d)?;
            }
            self.push(slot)?;
        }
        Ok(())
    }

    /// Sends the pending run, whose decodes `slot`'s latest `ready` follows.
    fn push(&mut self, slot: &Fenced) -> Result<()> {
        match self.pending.take() {
            Some((start, end)) => self.out.push(slot, (start, end - start)),
            None => Ok(()),
        }
    }

    /// This member's last segment is decoded (the slot's `ready` recorded behind it): sends
    /// what is pending and returns the delivery events to hand to [`PeerGroup::deliver`].
    pub(super) fn finish(mut self, slot: &mut Fenced) -> Result<Vec<Option<Arc<Event>>>> {
        self.push(slot)?;
        self.out.finish(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::{Share, chunks, segment_share};
    use crate::manager::fence::Fenced;
    use crate::manager::tier::Staged;
    use crate::manager::timing::Timer;
    use crate::peer::PeerGroup;
    use layerwise_offload_codec::Segment;
    use tch::{Device, Kind, Tensor};

    /// Runs `member(share, buffer, truth)` for every rank of a CPU group of `n`, each in its own
    /// thread with a share of a `bytes`-byte block sent on in chunks of `push_chunk` and a zeroed
    /// buffer 24 bytes longer; `member` fills its part and sends it on, returning the delivery
    /// events (none on the CPU). Then every buffer must hold `truth` (0, 1, 2, ... as bytes)
    /// whole, and nothing past the block: every part reached every member. `what` names the
    /// case in a failure.
    fn every_buffer_ends_whole(
        n: usize,
        bytes: usize,
        push_chunk: usize,
        what: &str,
        member: impl Fn(
            &Share,
            &mut Fenced,
            &Tensor,
        ) -> Vec<Option<std::sync::Arc<crate::accel::Event>>>
        + Sync,
    ) {
        let group = PeerGroup::new(n).unwrap();
        let truth = Tensor::arange(bytes as i64, (Kind::Uint8, Device::Cpu));
        let results: Vec<Tensor> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|rank| {
                    let (group, truth, member) = (group.clone(), truth.shallow_clone(), &member);
                    scope.spawn(move || {
                        let share = Share {
                            group: &group,
                            rank,
                            round: 0,
                            push: &[],
                            block: 3,
                            bytes,
                            push_chunk,
                        };
                        let buf = Tensor::zeros([bytes as i64 + 24], (Kind::Uint8, Device::Cpu));
                        let mut target =
                            Fenced::new(buf.shallow_clone(), false, Some((n, rank))).unwrap();
                        let delivered = member(&share, &mut target, &truth);
                        assert!(
                            delivered.iter().all(Option::is_none),
                            "no events on the CPU"
                        );
                        assert!(group.deliver(0, rank, delivered).unwrap().is_empty());
                        buf
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, buf) in results.iter().enumerate() {
            assert!(
                buf.narrow(0, 0, bytes as i64).equal(&truth),
                "member {rank} of {n} holds every part ({what}, chunks of {push_chunk})"
            );
            assert!(
                buf.narrow(0, bytes as i64, 24).eq(0).all().int64_value(&[]) == 1,
                "nothing written past the block"
            );
        }
    }

    /// Members of a CPU group of `n`, each with host bytes right only inside its own share,
    /// given in host pieces cut at `cuts` (offsets into the share) and sent in chunks of
    /// `push_chunk` bytes: each member's buffer ends up holding every byte right, so each share
    /// came from the host of its member and went on to the others.
    fn every_member_receives_every_share(n: usize, push_chunk: usize, cuts: &[usize]) {
        const BYTES: usize = 1000;
        let what = format!("host cut at {cuts:?}");
        every_buffer_ends_whole(n, BYTES, push_chunk, &what, |share, target, truth| {
            let (off, len) = share.range();
            // Host bytes wrong everywhere but in this member's share.
            let host = Tensor::full([BYTES as i64], 7, (Kind::Uint8, Device::Cpu));
            host.narrow(0, off as i64, len as i64)
                .copy_(&truth.narrow(0, off as i64, len as i64));
            let mut asked = Vec::new();
            let (delivered, staged) = share
                .send(target, None, (&mut Timer::default(), None), |o, l| {
                    asked.push((o, l));
                    let mut edges: Vec<usize> = cuts.iter().copied().filter(|&c| c < l).collect();
                    edges.insert(0, 0);
                    edges.push(l);
                    let pieces = edges
                        .windows(2)
                        .map(|w| {
                            (
                                w[0],
                                host.narrow(0, (o + w[0]) as i64, (w[1] - w[0]) as i64),
                            )
                        })
                        .collect();
                    Ok(Staged::host(pieces))
                })
                .unwrap();
            assert_eq!(asked, [(off, len)], "only this member's share is read");
            staged.finish(None).unwrap();
            delivered
        });
    }

    #[test]
    fn each_member_sends_its_share_whole_and_receives_the_others() {
        every_member_receives_every_share(2, super::PUSH_CHUNK_BYTES, &[]);
    }

    /// Chunks smaller than the share, whose edges fall inside host pieces and on their edges.
    #[test]
    fn shares_sent_in_chunks_across_host_pieces_arrive_whole() {
        every_member_receives_every_share(2, 96, &[37, 96, 150]);
        every_member_receives_every_share(3, 64, &[1, 64, 65, 200]);
        every_member_receives_every_share(3, 1, &[10]);
    }

    /// Pieces tile the share back to back, all `chunk` bytes but the last.
    #[test]
    fn chunks_tile_the_share() {
        assert_eq!(chunks(0, 64), [(0, 0)]);
        assert_eq!(chunks(10, 64), [(0, 10)]);
        assert_eq!(chunks(128, 64), [(0, 64), (64, 64)]);
        assert_eq!(chunks(130, 64), [(0, 64), (64, 64), (128, 2)]);
        assert_eq!(
            chunks(3, 0),
            [(0, 1), (1, 1), (2, 1)],
            "a chunk of 0 means 1"
        );
    }

    /// Segments back to back with encodings of `lens` bytes (each 100 raw bytes).
    fn segments(lens: &[usize]) -> Vec<Segment> {
        let mut at = 0;
        lens.iter()
            .enumerate()
            .map(|(i, &l)| {
                at += l;
                Segment {
                    raw: i * 100..(i + 1) * 100,
                    encoded: at - l..at,
                }
            })
            .collect()
    }

    /// The runs of every member tile the segments in rank order, and each run's encoded bytes
    /// are within one segment of an even split.
    #[test]
    fn segment_shares_tile_the_segments_evenly() {
        let cases: [&[usize]; 5] = [
            &[10; 8],
            &[10, 30, 5, 5, 40, 10, 10, 1],
            &[1000, 1, 1, 1],
            &[7],
            &[],
        ];
        for lens in cases {
            let segs = segments(lens);
            let total: usize = lens.iter().sum();
            let largest = lens.iter().copied().max().unwrap_or(0);
            for n in 1..=5 {
                let runs: Vec<_> = (0..n).map(|r| segment_share(&segs, n, r)).collect();
                assert_eq!(runs[0].start, 0);
                assert_eq!(runs[n - 1].end, segs.len(), "{lens:?} / {n}");
                for w in runs.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{lens:?} / {n}: back to back");
                }
                for run in &runs {
                    let bytes: usize = lens[run.clone()].iter().sum();
                    assert!(
                        bytes.abs_diff(total / n) <= largest,
                        "{lens:?} / {n}: {bytes} bytes in {run:?}"
                    );
                }
            }
        }
        assert_eq!(segment_share(&segments(&[10; 8]), 2, 1), 4..8, "halves");
        assert_eq!(
            segment_share(&segments(&[10; 8]), 3, 1),
            3..5,
            "middles at 15, 25 .. 75"
        );
    }

    /// Every member of a CPU group writes its own run of decoded segments into its slot one by
    /// one, each sent on as decoded (in runs of at least `push_chunk` bytes): every slot ends up
    /// whole, nothing past the block written; a segment is sent only once decoded.
    #[test]
    fn decoded_runs_reach_every_member() {
        let segs = segments(&[10, 30, 5, 5, 40, 10, 10, 1]);
        for (n, push_chunk) in [
            (2, super::PUSH_CHUNK_BYTES),
            (3, super::PUSH_CHUNK_BYTES),
            (2, 150),
            (3, 1),
        ] {
            every_buffer_ends_whole(n, 800, push_chunk, "decoded runs", |share, slot, truth| {
                let mut send = share.send_decoded(slot, None, None).unwrap();
                for seg in &segs[segment_share(&segs, n, share.rank)] {
                    // This member's "decode" of the segment, then its hook.
                    let (off, len) = (seg.raw.start as i64, seg.raw.len() as i64);
                    slot.buf()
                        .narrow(0, off, len)
                        .copy_(&truth.narrow(0, off, len));
                    send.decoded(seg, slot).unwrap();
                }
                send.finish(slot).unwrap()
            });
        }
    }
}
