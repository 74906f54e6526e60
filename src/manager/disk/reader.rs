//! The disk tier's reads: the reader thread that fills staging buffers ahead of the loop, and
//! the reads of one block (its encoding from the encoded cache, or its tensors raw from the
//! checkpoint).

use crate::checkpoint;
use crate::error::{Error, Result};
use std::sync::Arc;
use tch::Tensor;

use super::{Buf, Shared};

/// The reader thread: reads queued blocks into their staging buffers until stopped.
pub(super) fn reader(shared: Arc<Shared>, staging: Vec<Tensor>) {
    loop {
        let (i, block, fence) = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    return;
                }
                if let Some(i) = st.queue.pop_front() {
                    match st.bufs[i] {
                        Buf::Queued(b) => {
                            st.bufs[i] = Buf::Reading(b);
                            let fence = st.fences[i].take();
                            break (i, b, fence);
                        }
                        _ => continue, // re-queued since: a stale entry
                    }
                }
                st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        // The copy out of this buffer must be done before it is written.
        let fenced = match fence {
            Some(f) => f.synchronize(),
            None => Ok(()),
        };
        let r = fenced.and_then(|()| read_staged(&shared, block, &staging[i]));
        let mut st = shared.lock();
        st.bufs[i] = Buf::Ready(block, r.err());
        shared.changed.notify_all();
    }
}

/// Reads block `block` into staging buffer `dst` for an upload: its encoding from the cache
/// (checked), or raw ([`read_raw`]).
fn read_staged(shared: &Shared, block: usize, dst: &Tensor) -> Result<()> {
    let Some(cache) = &shared.cache else {
        return read_raw(shared, block, dst);
    };
    if dst.kind() != tch::Kind::Uint8 {
        return Err(Error::InvalidArgument {
            op: "reading a disk-tier block",
            message: format!("block {block}'s staging buffer is not bytes"),
        });
    }
    // SAFETY: a staging buffer (a contiguous CPU buffer, checked by bytes_mut) that is
    // Reading: the manager does not touch it, and the copy out of it before was fenced. It
    // stays alive for the call.
    let buf = unsafe { crate::host::bytes_mut(dst)? };
    // Its pages dropped once read, as the raw reads' are.
    cache.read_block(block, buf, true)
}

/// Reads block `block`'s tensors from the checkpoint into `dst` at their layout offsets.
pub(super) fn read_raw(shared: &Shared, block: usize, dst: &Tensor) -> Result<()> {
    let reads = &shared.reads[block];
    let len = dst.numel();
    if reads.iter().any(|(t, at)| at + t.bytes > len) || dst.kind() != tch::Kind::Uint8 {
        return Err(Error::InvalidArgument {
            op: "reading a disk-tier block",
            message: format!("block {block} does not fit its staging buffer of {len} bytes"),
        });
    }
    // SAFETY: `dst` is a contiguous 1-D uint8 CPU tensor of `len` bytes (checked above; staging
    // buffers and restore's buffers are made so) that nothing else reads or writes now: a
    // staging buffer is Reading (the manager does not touch it, and the copy out of it before
    // was fenced), a restore buffer is fresh. It stays alive for the call.
    let buf = unsafe { crate::host::bytes_mut(dst)? };
    let ranges: Vec<(usize, usize)> = reads.iter().map(|(t, at)| (*at, t.bytes)).collect();
    let slices = checkpoint::disjoint_slices(buf, &ranges)?;
    let jobs = checkpoint::split_jobs(reads.iter().map(|(t, _)| t).zip(slices));
    checkpoint::read_parallel(&shared.ckpt, jobs, crate::host::worker_threads())?;
    // After the reads: a change that could have reached the bytes just read has set the
    // files' times by now.
    shared.check_files(block)?;
    // Read again at the next forward: its pages would only crowd host memory, which the disk
    // tier exists to spare.
    for (t, _) in reads {
        shared.ckpt.forget(t);
    }
    Ok(())
}
