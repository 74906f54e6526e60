//! Peer groups: several GPUs of one host that run the same block loop share the uploads.

use crate::accel::Event;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::Tensor;

/// Managers on several devices that split every block's upload between them. Make one with [`PeerGroup::new`], hand it to each member's
/// configuration with a distinct rank, and drive each member from its own thread.
///
/// Data-parallel inference streams every block to every GPU. Each GPU's PCIe link carries the
/// whole model per forward, while GPUs joined by NVLink (or PCIe peer access) have a much
/// faster path between them. In a [`PeerGroup`] of `n` managers, each one uploads `1/n` of every
/// block from the host over its own link and sends that share to the `n - 1` others
/// device-to-device; each GPU then has the whole block after moving only `1/n` of it over
/// PCIe. The members advance in step: the k-th upload of every member is the same block.
///
/// A member is an ordinary [`LayerwiseOffloadManager`](crate::LayerwiseOffloadManager) built
/// with [`OffloadConfig::peer_group`](crate::OffloadConfig::peer_group), driven by its own
/// thread. Every member must enter the same blocks in the same order (same model, same
/// configuration, same loop, same number of forwards). A member that diverges, fails, leaves
/// (restore or drop) while others still upload, or does not arrive within the group's timeout
/// makes every member's next upload fail with [`Error::PeerGroup`] instead of hanging. The
/// weights are never at risk: each member's host copy is the truth, and `restore` works.
///
/// The slot rings of the members stay allocated until every member has left (restored or
/// dropped), because a member may still be sending into another's slots.
pub struct PeerGroup {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    Vacant,
    Joined,
    Left,
}

struct State {
    members: Vec<Member>,
    rounds: BTreeMap<u64, Round>,
    broken: Option<String>,
    /// Every member's slot ring, kept until no member is left joined: another member may still
    /// be copying into a ring whose manager has restored.
    rings: Vec<Vec<Tensor>>,
}

/// One upload, done by every member.
struct Round {
    posts: Vec<Option<Post>>,
    /// Per sender: one event per receiver, recorded after the sender's share reached it.
    delivered: Vec<Option<Vec<Option<Arc<Event>>>>>,
    taken: usize,
}

/// What a member announces for an upload: which block, and where its slot is.
pub(crate) struct Post {
    pub block: usize,
    pub bytes: usize,
    /// The block travels encoded (each member sends its decoded segments), not raw.
    pub encoded: bool,
    /// The member's slot (its first `bytes` bytes).
    pub buf: Tensor,
    /// Recorded on the member's copy stream once the slot may be written (CUDA).
    pub writable: Option<Arc<Event>>,
}

impl Post {
    fn share(&self) -> Post {
        Post {
            block: self.block,
            bytes: self.bytes,
            encoded: self.encoded,
            buf: self.buf.shallow_clone(),
            writable: self.writable.clone(),
        }
    }
}

impl fmt::Debug for PeerGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerGroup")
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .field("broken", &self.lock().broken)
            .finish()
    }
}

impl PeerGroup {
    /// A group of `size` members (ranks `0..size`) that wait up to 5 minutes for each other.
    pub fn new(size: usize) -> Result<Arc<PeerGroup>> {
        Self::with_timeout(size, Duration::from_secs(300))
    }

    /// A group whose members give up waiting for the others after `timeout` (the wait between
    /// one member's upload and the slowest member's arrival at the same upload). A timeout
    /// beyond what the clock can represent (`Duration::MAX`) waits without limit.
    pub fn with_timeout(size: usize, timeout: Duration) -> Result<Arc<PeerGroup>> {
        if size == 0 {
            return Err(Error::InvalidArgument {
                op: "PeerGroup::new",
                message: "a peer group needs at least one member".into(),
            });
        }
        Ok(Arc::new(PeerGroup {
            size,
            timeout,
            state: Mutex::new(State {
                members: vec![Member::Vacant; size],
                rounds: BTreeMap::new(),
                broken: None,
                rings: (0..size).map(|_| Vec::new()).collect(),
            }),
            cv: Condvar::new(),
        }))
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Why the group stopped working, if it did.
    pub fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state (every update is one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers member `rank` with its slot ring.
    pub(crate) fn join(&self, rank: usize, ring: Vec<Tensor>) -> Result<()> {
        let mut st = self.lock();
        if rank >= self.size {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::peer_group",
                message: format!("rank {rank} is out of range for a group of {}", self.size),
            });
        }
        if st.members[rank] != Member::Vacant {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::peer_group",
                message: format!(
                    "rank {rank} is taken: give each member of the group its own rank in 0..{}",
                    self.size
                ),
            });
        }
        if let Some(why) = &st.broken {
            return Err(Error::PeerGroup {
                rank,
                message: format!("the group is broken ({why})"),
            });
        }
        st.members[rank] = Member::Joined;
        st.rings[rank] = ring;
        Ok(())
    }

    /// Undoes [`Self::join`] for a member whose `initialize` failed before any upload: the rank
    /// is free again, so that the member (or another) can join with it.
    pub(crate) fn unjoin(&self, rank: usize) {
        let mut st = self.lock();
        if st.members[rank] == Member::Joined {
            st.members[rank] = Member::Vacant;
            st.rings[rank].clear();
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Member `rank` is done (its own copies have finished). The rings go once nobody is left.
    pub(crate) fn leave(&self, rank: usize) {
        let mut st = self.lock();
        st.members[rank] = Member::Left;
        if !st.members.contains(&Member::Joined) {
            st.rings.iter_mut().for_each(Vec::clear);
            st.rounds.clear();
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Marks the group broken (every waiting or later upload fails).
    pub(crate) fn fail(&self, rank: usize, message: &str) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(format!("member {rank}: {message}"));
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Waits until `ready` holds for round `round`; fails if the group broke, a member it waits
    /// for left, or the timeout passed (which breaks the group).
    fn wait<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        rank: usize,
        round: u64,
        what: &str,
        missing: impl Fn(&Round) -> Vec<usize>,
    ) -> Result<MutexGuard<'a, State>> {
        // A timeout too long to represent (`Duration::MAX`) means no deadline.
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            if let Some(why) = &st.broken {
                return Err(Error::PeerGroup {
                    rank,
                    message: format!("the group is broken ({why})"),
                });
            }
            let absent = st.rounds.get(&round).map(&missing).unwrap_or_default();
            if absent.is_empty() {
                return Ok(st);
            }
            if let Some(&gone) = absent.iter().find(|&&r| st.members[r] == Member::Left) {
                let message = format!(
                    "member {gone} left the group (restored or dropped) before upload {round}"
                );
                st.broken.get_or_insert_with(|| message.clone());
                drop(st);
                self.cv.notify_all();
                return Err(Error::PeerGroup { rank, message });
            }
            let Some(deadline) = deadline else {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let now = Instant::now();
            if now >= deadline {
                let message = format!(
                    "members {absent:?} did not {what} upload {round} within {:?}",
                    self.timeout
                );
                st.broken.get_or_insert_with(|| message.clone());
                drop(st);
                self.cv.notify_all();
                return Err(Error::PeerGroup { rank, message });
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Announces member `rank`'s slot for upload number `round` and waits for every member's;
    /// returns them by rank. Fails if another member uploads a different block.
    pub(crate) fn post(&self, round: u64, rank: usize, post: Post) -> Result<Vec<Post>> {
        let n = self.size;
        let mut st = self.lock();
        let r = st.rounds.entry(round).or_insert_with(|| Round {
            posts: (0..n).map(|_| None).collect(),
            delivered: vec![None; n],
            taken: 0,
        });
        r.posts[rank] = Some(post);
        drop(st);
        self.cv.notify_all();
        let st = self.wait(self.lock(), rank, round, "reach", |r| {
            (0..n).filter(|&i| r.posts[i].is_none()).collect()
        })?;
        let posts: Vec<Post> = st.rounds[&round]
            .posts
            .iter()
            .map(|p| p.as_ref().expect("all posted").share())
            .collect();
        drop(st);
        let mine = &posts[rank];
        if let Some((o, p)) = posts.iter().enumerate().find(|(_, p)| {
            p.block != mine.block || p.bytes != mine.bytes || p.encoded != mine.encoded
        }) {
            let kind = |encoded| if encoded { "compressed" } else { "raw" };
            let message = if p.block != mine.block {
                format!(
                    "upload {round} is block {} here but block {} on member {o}",
                    mine.block, p.block
                )
            } else if p.encoded != mine.encoded {
                format!(
                    "upload {round} (block {}) is {} here but {} on member {o}: the members need the same host copies (all raw or all compressed)",
                    mine.block,
                    kind(mine.encoded),
                    kind(p.encoded)
                )
            } else {
                format!(
                    "upload {round} (block {}) moves {} bytes here but {} on member {o}: the members need the same blocks, and the same host copies (all raw or all compressed)",
                    mine.block, mine.bytes, p.bytes
                )
            };
            self.fail(rank, &message);
            return Err(Error::PeerGroup { rank, message });
        }
        Ok(posts)
    }

    /// Hands over member `rank`'s delivery events of upload `round` (one per receiver) and waits
    /// for every member's; returns the events of the shares sent to `rank`.
    pub(crate) fn deliver(
        &self,
        round: u64,
        rank: usize,
        delivered: Vec<Option<Arc<Event>>>,
    ) -> Result<Vec<Arc<Event>>> {
        let n = self.size;
        let mut st = self.lock();
        if let Some(r) = st.rounds.get_mut(&round) {
            r.delivered[rank] = Some(delivered);
        }
        drop(st);
        self.cv.notify_all();
        let mut st = self.wait(self.lock(), rank, round, "finish", |r| {
            (0..n).filter(|&i| r.delivered[i].is_none()).collect()
        })?;
        let r = st.rounds.get_mut(&round).expect("waited for it");
        let incoming = r
            .delivered
            .iter()
            .filter_map(|d| d.as_ref().and_then(|d| d[rank].clone()))
            .collect();
        r.taken += 1;
        if r.taken == n {
            st.rounds.remove(&round);
        }
        Ok(incoming)
    }
}

/// Member `rank`'s share of a block of `bytes` bytes split `n` ways: `(offset, len)`. Share
/// boundaries fall on 256-byte multiples; the last share takes the rest.
pub(crate) fn share(bytes: usize, n: usize, rank: usize) -> (usize, usize) {
    let edge = |k: usize| {
        if k >= n {
            bytes
        } else {
            (bytes / n * k + bytes % n * k / n) / 256 * 256
        }
    };
    let (a, b) = (edge(rank), edge(rank + 1));
    (a, b - a)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_tile_the_block() {
        for bytes in [0usize, 1, 255, 256, 1000, 4096, 1 << 20, (1 << 20) + 37] {
            for n in 1..=8 {
                let mut next = 0;
                for r in 0..n {
                    let (off, len) = share(bytes, n, r);
                    assert_eq!(off, next, "{bytes} {n} {r}");
                    if r + 1 < n {
                        assert_eq!(off % 256, 0);
                    }
                    next = off + len;
                }
                assert_eq!(next, bytes);
                if bytes >= 256 * n * 4 {
                    // Nearly even: no share is more than 256 bytes off bytes / n.
                    for r in 0..n {
                        let len = share(bytes, n, r).1 as i64;
                        assert!((len - (bytes / n) as i64).abs() <= 256 + n as i64);
                    }
                }
            }
        }
    }
}
