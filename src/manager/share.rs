//! Peer groups: this member's share of an upload. A raw block's share goes from the host into
//! the member's slot, an encoded block's into one of its staging buffers; from there it is
//! sent device to device into the same bytes of every other member's buffer, and their shares
//! arrive in this member's buffer the same way. Both are the same steps on a [`Fenced`]
//! buffer, written once here.

use crate::accel::{self, Event, Stream};
use crate::error::Context;
use crate::error::Result;
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
}

impl Share<'_> {
    /// This member's share of the bytes: `(offset, length)`.
    pub(super) fn range(&self) -> (usize, usize) {
        peer::share(self.bytes, self.group.size(), self.rank)
    }

    /// Fills `target`'s first `bytes` bytes together with the other members: posts the buffer
    /// once it may be written (its last reader done, this member's previous share of it sent),
    /// copies this member's share (`source` gives its host bytes, asked after the post) into it
    /// on `copy` and from there into the others' buffers, and records `ready` behind the copy
    /// from the host. Returns the delivery events to hand to [`PeerGroup::deliver`] and the
    /// host bytes, for the caller to give back. Without a stream (the CPU test mode) every copy
    /// is done when this returns.
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
        match copy {
            Some(c) => {
                timer.time(pair, c, (self.block, len as u64, Lane::Upload), || {
                    // SAFETY: the host bytes live in the manager until restore or Drop, which
                    // wait for the copy stream, and nothing writes them meanwhile; the buffer
                    // was made writable above, and nothing reads it before `ready` (waited by
                    // the push streams below, and by compute or the decode).
                    unsafe { device::copy_pieces(&mine, &staged.pieces, c, "upload")? };
                    target.mark_ready(c)
                })?;
                for (o, post) in posts.iter().enumerate().filter(|(o, _)| *o != self.rank) {
                    let p = &self.push[o];
                    target.ready()?.wait(p)?;
                    if let Some(w) = &post.writable {
                        w.wait(p)?;
                    }
                    let theirs = narrow(&post.buf)?;
                    // SAFETY: the other member's buffer stays allocated until every member has
                    // left the group (it joined the group's ring), and its owner posted
                    // `writable` (waited above) once nothing read it any more; it reads the
                    // bytes only after our delivery event, recorded below. `mine` holds our
                    // share once `ready` (waited above) completes, and is not written again
                    // before `pushed` (recorded below, waited by the buffer's next write).
                    unsafe { accel::copy_peer_async(&theirs, &mine, p)? };
                    let mut e = Event::new()?;
                    e.record(p)?;
                    delivered[o] = Some(Arc::new(e));
                }
                for (o, p) in self
                    .push
                    .iter()
                    .enumerate()
                    .filter(|(o, _)| *o != self.rank)
                {
                    target.mark_pushed(o, p)?;
                }
                target.shares_pushed();
            }
            None => {
                device::copy_pieces_now(&mine, &staged.pieces, "upload")?;
                for (_, post) in posts.iter().enumerate().filter(|(o, _)| *o != self.rank) {
                    device::copy_now(&mut narrow(&post.buf)?, &mine, "upload")?;
                }
            }
        }
        Ok((delivered, staged))
    }
}

#[cfg(test)]
mod tests {
    use super::Share;
    use crate::manager::fence::Fenced;
    use crate::manager::tier::Staged;
    use crate::manager::timing::Timer;
    use crate::peer::PeerGroup;
    use tch::{Device, Kind, Tensor};

    /// Two members of a CPU group, each with host bytes right only inside its own share:
    /// each member's buffer ends up holding every byte right, so each share came from the host
    /// of its member and went on to the other.
    #[test]
    fn each_member_sends_its_share_and_receives_the_others() {
        const BYTES: usize = 1000;
        let group = PeerGroup::new(2).unwrap();
        let truth = Tensor::arange(BYTES as i64, (Kind::Uint8, Device::Cpu));
        let results: Vec<Tensor> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
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
                        };
                        let (off, len) = share.range();
                        // Host bytes wrong everywhere but in this member's share.
                        let host = Tensor::full([BYTES as i64], 7, (Kind::Uint8, Device::Cpu));
                        host.narrow(0, off as i64, len as i64)
                            .copy_(&truth.narrow(0, off as i64, len as i64));
                        let buf = Tensor::zeros([BYTES as i64 + 24], (Kind::Uint8, Device::Cpu));
                        let mut target =
                            Fenced::new(buf.shallow_clone(), false, Some((2, rank))).unwrap();
                        let mut asked = Vec::new();
                        let (delivered, staged) = share
                            .send(&mut target, None, (&mut Timer::default(), None), |o, l| {
                                asked.push((o, l));
                                Ok(Staged::host(vec![(0, host.narrow(0, o as i64, l as i64))]))
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
                "member {rank} holds every share"
            );
        }
    }
}
