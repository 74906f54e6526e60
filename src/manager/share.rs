//! Peer groups: this member's share of an upload. A raw block's share goes from the host into
//! the member's slot, an encoded block's into one of its staging buffers; from there it is
//! sent device to device into the same bytes of every other member's buffer, and their shares
//! arrive in this member's buffer the same way. Both are the same steps on a [`Fenced`]
//! buffer, written once here.

use crate::accel::{self, Event, Stream};
use crate::error::Context;
use crate::error::Result;
use crate::host::pieces_within;
use crate::peer::{self, PeerGroup, Post};
use crate::stats::Lane;
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

impl Share<'_> {
    /// This member's share of the bytes: `(offset, length)`.
    pub(super) fn range(&self) -> (usize, usize) {
        peer::share(self.bytes, self.group.size(), self.rank)
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
        let n = self.group.size();
        // 1. The buffer may be written once its last reader is done and this member's share
        //    of its previous contents has gone out to the others.
        let writable = match copy {
            Some(c) => {
                target.wait_writable(c)?;
                let mut e = Event::new()?;
                e.record(c)?;
                Some(Arc::new(e))
            }
            None => None,
        };
        let dst = target.head(self.bytes)?;
        let posts = self.group.post(
            self.round,
            self.rank,
            Post {
                block: self.block,
                bytes: self.bytes,
                buf: dst.shallow_clone(),
                writable,
            },
        )?;
        // 2. This member's share: host -> own buffer -> every other member's.
        let (off, len) = self.range();
        let narrow = |t: &Tensor| t.f_narrow(0, off as i64, len as i64).context("upload");
        let staged = source(off, len)?;
        let mine = narrow(&dst)?;
        let mut delivered: Vec<Option<Arc<Event>>> = vec![None; n];
        let parts = chunks(len, self.push_chunk);
        let others: Vec<(usize, &Post)> = posts
            .iter()
            .enumerate()
            .filter(|(o, _)| *o != self.rank)
            .collect();
        match copy {
            Some(c) => {
                timer.time(pair, c, (self.block, len as u64, Lane::Upload), || {
                    for (i, &(po, pl)) in parts.iter().enumerate() {
                        let part = mine.f_narrow(0, po as i64, pl as i64).context("upload")?;
                        let host = pieces_within(&staged.pieces, po, pl, "upload")?;
                        // SAFETY: the host bytes live in the manager until restore or Drop,
                        // which wait for the copy stream, and nothing writes them meanwhile; the
                        // buffer was made writable above, and nothing reads it before `ready`
                        // (recorded after each chunk; compute or the decode waits for it only
                        // after the last, the push streams below after each).
                        unsafe { device::copy_pieces(&part, &host, c, "upload")? };
                        target.mark_ready(c)?;
                        for &(o, post) in &others {
                            let p = &self.push[o];
                            if i == 0
                                && let Some(w) = &post.writable
                            {
                                w.wait(p)?;
                            }
                            // A stream waits for the recording at the time of the call: this
                            // chunk's, not a later one's.
                            target.wait_ready(p)?;
                            let theirs = narrow(&post.buf)?
                                .f_narrow(0, po as i64, pl as i64)
                                .context("upload")?;
                            // SAFETY: the other member's buffer stays allocated until every
                            // member has left the group (it joined the group's ring), and its
                            // owner posted `writable` (waited above, before the first chunk) once
                            // nothing read it any more; it reads the bytes only after our
                            // delivery event, recorded after the last chunk. `part` holds this
                            // chunk once `ready` (waited above) completes, and is not written
                            // again before `pushed` (recorded below, waited by the buffer's
                            // next write).
                            unsafe { accel::copy_peer_async(&theirs, &part, p)? };
                        }
                    }
                    Ok(())
                })?;
                for &(o, _) in &others {
                    let mut e = Event::new()?;
                    e.record(&self.push[o])?;
                    delivered[o] = Some(Arc::new(e));
                }
                for &(o, _) in &others {
                    target.mark_pushed(o, &self.push[o])?;
                }
                target.shares_pushed();
            }
            None => {
                for &(po, pl) in &parts {
                    let part = mine.f_narrow(0, po as i64, pl as i64).context("upload")?;
                    device::copy_pieces_now(
                        &part,
                        &pieces_within(&staged.pieces, po, pl, "upload")?,
                        "upload",
                    )?;
                    for &(_, post) in &others {
                        let mut theirs = narrow(&post.buf)?
                            .f_narrow(0, po as i64, pl as i64)
                            .context("upload")?;
                        device::copy_now(&mut theirs, &part, "upload")?;
                    }
                }
            }
        }
        Ok((delivered, staged))
    }
}

#[cfg(test)]
mod tests {
    use super::{Share, chunks};
    use crate::manager::fence::Fenced;
    use crate::manager::tier::Staged;
    use crate::manager::timing::Timer;
    use crate::peer::PeerGroup;
    use tch::{Device, Kind, Tensor};

    /// Members of a CPU group of `n`, each with host bytes right only inside its own share,
    /// given in host pieces cut at `cuts` (offsets into the share) and sent in chunks of
    /// `push_chunk` bytes: each member's buffer ends up holding every byte right, so each share
    /// came from the host of its member and went on to the others.
    fn every_member_receives_every_share(n: usize, push_chunk: usize, cuts: &[usize]) {
        const BYTES: usize = 1000;
        let group = PeerGroup::new(n).unwrap();
        let truth = Tensor::arange(BYTES as i64, (Kind::Uint8, Device::Cpu));
        let results: Vec<Tensor> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|rank| {
                    let (group, truth) = (group.clone(), truth.shallow_clone());
                    scope.spawn(move || {
                        let share = Share {
                            group: &group,
                            rank,
                            round: 0,
                            push: &[],
                            block: 3,
                            bytes: BYTES,
                            push_chunk,
                        };
                        let (off, len) = share.range();
                        // Host bytes wrong everywhere but in this member's share.
                        let host = Tensor::full([BYTES as i64], 7, (Kind::Uint8, Device::Cpu));
                        host.narrow(0, off as i64, len as i64)
                            .copy_(&truth.narrow(0, off as i64, len as i64));
                        let buf = Tensor::zeros([BYTES as i64 + 24], (Kind::Uint8, Device::Cpu));
                        let mut target =
                            Fenced::new(buf.shallow_clone(), false, Some((n, rank))).unwrap();
                        let mut asked = Vec::new();
                        let (delivered, staged) = share
                            .send(&mut target, None, (&mut Timer::default(), None), |o, l| {
                                asked.push((o, l));
                                let mut edges: Vec<usize> =
                                    cuts.iter().copied().filter(|&c| c < l).collect();
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
                        assert!(
                            delivered.iter().all(Option::is_none),
                            "no events on the CPU"
                        );
                        staged.finish(None).unwrap();
                        let incoming = group.deliver(0, rank, delivered).unwrap();
                        assert!(incoming.is_empty());
                        buf
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, buf) in results.iter().enumerate() {
            assert!(
                buf.narrow(0, 0, BYTES as i64).equal(&truth),
                "member {rank} of {n} holds every share (chunks of {push_chunk}, host cut at {cuts:?})"
            );
            assert!(
                buf.narrow(0, BYTES as i64, 24).eq(0).all().int64_value(&[]) == 1,
                "nothing written past the block"
            );
        }
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
}
