//! The disk tier ([`OffloadConfig::host_budget`](crate::OffloadConfig::host_budget)): blocks
//! past the host budget have no host copy; a background thread reads each from the checkpoint
//! (several `pread`s in parallel) into a ring of page-locked staging buffers, ahead of the loop
//! in loop order, and the upload copies from there. A staging buffer is read into again only
//! once the copy out of it has finished (its fence event).

use crate::accel::{self, Event, HostMemory, Stream};
use crate::checkpoint::cache::EncodedCache;
use crate::checkpoint::{Checkpoint, CheckpointTensor, FileStamp};
use crate::error::Context;
use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tch::Tensor;

use super::tier::Staged;

mod reader;
use reader::{read_raw, reader};

impl DiskTier {
    /// Bytes `[off, off + len)` of disk-tier block `block`'s layout: the staging buffer the
    /// block was read into (waiting for the read if it is not done).
    pub(super) fn stage(self: &Arc<Self>, block: usize, off: usize, len: usize) -> Result<Staged> {
        let (i, buf) = self.take(block)?;
        let part = buf.f_narrow(0, off as i64, len as i64).context("upload");
        match part {
            Ok(part) => Ok(Staged::disk(part, self.clone(), i)),
            Err(e) => {
                self.release(i, None);
                Err(e)
            }
        }
    }

    /// Gives staging buffer `i` back once the copies out of it queued so far on `copy` are
    /// done (an event the reader waits for before reading into it again; a new one per upload,
    /// since the reader thread takes it).
    pub(super) fn unstage(&self, i: usize, copy: Option<&Stream>) -> Result<()> {
        let fence = match copy {
            Some(copy) => {
                let mut e = Event::new()?;
                e.record(copy)?;
                Some(e)
            }
            None => None,
        };
        self.release(i, fence);
        Ok(())
    }
}

/// Staging buffers: one being copied to the GPU, the others read ahead.
pub(super) const STAGING_BUFFERS: usize = 3;

/// What a staging buffer holds.
#[derive(Debug)]
enum Buf {
    Free,
    /// Waiting for the reader.
    Queued(usize),
    /// Being read into.
    Reading(usize),
    /// Read (or failed to be).
    Ready(usize, Option<Error>),
    /// Being copied out of by the manager.
    InUse(usize),
}

impl Buf {
    /// The block it holds or will hold.
    fn block(&self) -> Option<usize> {
        match self {
            Buf::Free => None,
            Buf::Queued(b) | Buf::Reading(b) | Buf::Ready(b, _) | Buf::InUse(b) => Some(*b),
        }
    }
}

#[derive(Debug)]
struct State {
    bufs: Vec<Buf>,
    /// Per buffer: the event after the last copy out of it (CUDA), waited for before reading
    /// into it again.
    fences: Vec<Option<Event>>,
    /// Buffers to read into, in order.
    queue: VecDeque<usize>,
    stop: bool,
}

/// What the reader thread needs.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    ckpt: Arc<Checkpoint>,
    /// Per block (loop order): the tensors to read and their offsets in the block's layout
    /// (empty for blocks with a host copy).
    reads: Vec<Vec<(CheckpointTensor, usize)>>,
    /// Every file's stamp when `initialize()` began reading the checkpoint: each read checks
    /// that the files it read from still have it.
    stamps: Vec<FileStamp>,
    /// Compressed transport: uploads read each block's encoding from the checkpoint's encoded
    /// cache instead (checked at each read); reads for `tensor` and `restore` still read the
    /// checkpoint raw, so that a damaged cache never keeps the weights from coming back.
    cache: Option<Arc<EncodedCache>>,
}

/// Why a file changed since `initialize()` stops the disk tier.
const CHANGED: &str = "since initialize() began reading it: the disk tier reads blocks from it at every forward and would serve a mix of the old weights and the new, so it stops here; the old weights of the blocks it holds on disk are gone with the old contents, so restore() refuses too. Keep checkpoint files unchanged while a manager with a host_budget uses them; to use the new weights, drop this manager (the blocks held in host memory go back to the model, the disk-tier blocks' tensors stay empty) and build a new one";

impl Shared {
    /// Checks that the files block `block` is read from are as `initialize()` found them.
    fn check_files(&self, block: usize) -> Result<()> {
        let mut files: Vec<usize> = self.reads[block].iter().map(|(t, _)| t.file).collect();
        files.sort_unstable();
        files.dedup();
        self.ckpt.check_unchanged(&self.stamps, files, CHANGED)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The disk tier of one manager.
#[derive(Debug)]
pub(super) struct DiskTier {
    shared: Arc<Shared>,
    /// The staging buffers (handles; the reader thread has its own). In a mutex so that the
    /// tier can be shared by the blocks on it ([`HostTier::Disk`](super::tier::HostTier)):
    /// only the manager's thread takes it, to narrow a buffer.
    staging: Mutex<Vec<Tensor>>,
    /// Number of staging buffers.
    buffers: usize,
    /// Disk-tier blocks in loop order.
    order: Vec<usize>,
    thread: Option<JoinHandle<()>>,
    /// Bytes of each block's layout.
    bytes: Vec<usize>,
}

impl DiskTier {
    /// A disk tier for the blocks whose `reads` are not empty (`bytes[i]` is block `i`'s
    /// layout size), staging in `memory`; starts its reader and reads the first blocks ahead.
    /// Every read checks that its files still have their `stamps` (taken when `initialize()`
    /// began reading the checkpoint).
    pub(super) fn new(
        ckpt: Arc<Checkpoint>,
        reads: Vec<Vec<(CheckpointTensor, usize)>>,
        bytes: Vec<usize>,
        memory: HostMemory,
        stamps: Vec<FileStamp>,
    ) -> Result<DiskTier> {
        DiskTier::start(ckpt, reads, bytes, memory, stamps, None)
    }

    /// [`Self::new`] for compressed transport: uploads read each block's encoding from
    /// `cache` (checked at each read) instead of the raw tensors, which `tensor` and `restore`
    /// still read.
    pub(super) fn encoded(
        ckpt: Arc<Checkpoint>,
        reads: Vec<Vec<(CheckpointTensor, usize)>>,
        memory: HostMemory,
        stamps: Vec<FileStamp>,
        cache: Arc<EncodedCache>,
    ) -> Result<DiskTier> {
        let bytes = (0..reads.len()).map(|i| cache.block(i).len).collect();
        DiskTier::start(ckpt, reads, bytes, memory, stamps, Some(cache))
    }

    /// For a tier reading encodings: block `block`'s encoding length and raw size.
    pub(super) fn encoding(&self, block: usize) -> Option<(usize, usize)> {
        let c = self.shared.cache.as_ref()?.block(block);
        Some((c.len, c.raw))
    }

    /// For a tier reading encodings: block `block`'s longest segment encoding (as the cache
    /// records it; each read checks the encoding has it).
    pub(super) fn largest_segment(&self, block: usize) -> Option<usize> {
        Some(self.shared.cache.as_ref()?.block(block).largest_segment)
    }

    /// A disk tier for the blocks whose `reads` are not empty, read into staging buffers of
    /// `bytes[i]` for block `i`.
    fn start(
        ckpt: Arc<Checkpoint>,
        reads: Vec<Vec<(CheckpointTensor, usize)>>,
        bytes: Vec<usize>,
        memory: HostMemory,
        stamps: Vec<FileStamp>,
        cache: Option<Arc<EncodedCache>>,
    ) -> Result<DiskTier> {
        let order: Vec<usize> = (0..reads.len()).filter(|&i| !reads[i].is_empty()).collect();
        let largest = order.iter().map(|&i| bytes[i]).max().unwrap_or(0);
        let n = STAGING_BUFFERS.min(order.len());
        let staging = (0..n)
            .map(|_| accel::alloc_host(largest, memory))
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                bufs: (0..n).map(|_| Buf::Free).collect(),
                fences: (0..n).map(|_| None).collect(),
                queue: VecDeque::new(),
                stop: false,
            }),
            changed: Condvar::new(),
            ckpt,
            reads,
            stamps,
            cache,
        });
        let thread = {
            let shared = shared.clone();
            let staging: Vec<Tensor> = staging.iter().map(|t| t.shallow_clone()).collect();
            std::thread::Builder::new()
                .name("offload-disk".into())
                .spawn(move || reader(shared, staging))
                .map_err(|e| Error::InvalidArgument {
                    op: "host_budget",
                    message: format!("cannot start the disk tier's reader thread: {e}"),
                })?
        };
        let tier = DiskTier {
            shared,
            buffers: staging.len(),
            staging: Mutex::new(staging),
            order,
            thread: Some(thread),
            bytes,
        };
        if let Some(&first) = tier.order.first() {
            tier.ahead(&tier.next_blocks_from(first, true));
        }
        Ok(tier)
    }

    /// Blocks on the disk tier (loop order).
    pub(super) fn blocks(&self) -> &[usize] {
        &self.order
    }

    /// Waits until `block` sits in a staging buffer and hands that buffer out (narrowed to the
    /// block's layout): the caller copies from it and gives it back with [`Self::release`].
    /// Then queues the next disk-tier blocks in loop order.
    fn take(&self, block: usize) -> Result<(usize, Tensor)> {
        let mut st = self.shared.lock();
        let i = loop {
            if let Some(i) = st.bufs.iter().position(|b| b.block() == Some(block)) {
                match &mut st.bufs[i] {
                    Buf::Ready(_, err) => {
                        let err = err.take();
                        st.bufs[i] = Buf::InUse(block);
                        if let Some(e) = err {
                            st.bufs[i] = Buf::Free;
                            self.shared.changed.notify_all();
                            return Err(e);
                        }
                        break i;
                    }
                    Buf::InUse(_) => {
                        return Err(Error::InvalidArgument {
                            op: "upload",
                            message: format!("block {block} is being uploaded already"),
                        });
                    }
                    _ => {
                        st = self.wait(st);
                        continue;
                    }
                }
            }
            // Not read ahead (out of loop order, or the first time): a free buffer, else one
            // holding a block read ahead.
            let free = st
                .bufs
                .iter()
                .position(|b| matches!(b, Buf::Free))
                .or_else(|| st.bufs.iter().position(|b| matches!(b, Buf::Ready(_, _))));
            match free {
                Some(i) => {
                    st.bufs[i] = Buf::Queued(block);
                    st.queue.push_front(i);
                    self.shared.changed.notify_all();
                }
                None => st = self.wait(st),
            }
        };
        drop(st);
        self.ahead(&self.next_blocks_from(block, false));
        let staged = self.staging.lock().unwrap_or_else(|p| p.into_inner())[i]
            .f_narrow(0, 0, self.bytes[block] as i64)
            .context("reading a disk-tier block")?;
        Ok((i, staged))
    }

    /// Gives back staging buffer `i` after the copy out of it was queued; `fence` completes
    /// when that copy has (None: the copy is done).
    fn release(&self, i: usize, fence: Option<Event>) {
        let mut st = self.shared.lock();
        st.fences[i] = fence;
        st.bufs[i] = Buf::Free;
        self.shared.changed.notify_all();
    }

    /// Reads `block` now into `dst` (a host buffer of its layout's size), outside the ring
    /// (for `restore` and `tensor`).
    pub(super) fn read_into(&self, block: usize, dst: &Tensor) -> Result<()> {
        read_raw(&self.shared, block, dst)
    }

    /// Checks that every file a disk-tier block is read from is as `initialize()` found it
    /// (before `restore` changes anything).
    pub(super) fn check_files(&self) -> Result<()> {
        self.order
            .iter()
            .try_for_each(|&b| self.shared.check_files(b))
    }

    /// The disk-tier blocks after `block` in loop order, as many as the ring reads ahead
    /// (`block` itself first if `including`).
    fn next_blocks_from(&self, block: usize, including: bool) -> Vec<usize> {
        let Some(pos) = self.order.iter().position(|&b| b == block) else {
            return Vec::new();
        };
        let n = self.order.len();
        let ahead = self.buffers.saturating_sub(1).max(1);
        let start = if including { 0 } else { 1 };
        let mut want: Vec<usize> = (start..start + ahead)
            .map(|k| self.order[(pos + k) % n])
            .filter(|&b| including || b != block)
            .collect();
        want.dedup();
        want
    }

    /// Queues reads of `want` into free buffers (or ones holding blocks not wanted).
    fn ahead(&self, want: &[usize]) {
        let mut st = self.shared.lock();
        for &b in want {
            if st.bufs.iter().any(|x| x.block() == Some(b)) {
                continue;
            }
            let slot = st
                .bufs
                .iter()
                .position(|x| matches!(x, Buf::Free))
                .or_else(|| {
                    st.bufs
                        .iter()
                        .position(|x| matches!(x, Buf::Ready(other, _) if !want.contains(other)))
                });
            let Some(i) = slot else { break };
            st.bufs[i] = Buf::Queued(b);
            st.queue.push_back(i);
        }
        self.shared.changed.notify_all();
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.shared
            .changed
            .wait(st)
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
