//! [`HostTier`]: where one block's bytes live while it is offloaded, one value per block, and
//! everything that depends on it: handing out the host bytes an upload copies
//! ([`HostTier::stage`]), reading the block raw (`tensor`, `restore`), writing a tensor
//! (`update_tensor`), and what the model keeps when the manager is dropped. Each host copy is
//! held raw or encoded ([`HostBlock`]); an encoded one is decoded on the way out. Adding a
//! place for the bytes is one variant here, its arms in these methods, and its tests; the
//! manager asks only these methods.

use crate::accel::{HostMemory, Stream};
use crate::error::Context;
use crate::error::{Error, Result};
use crate::host::{HostBlock, HostStore};
use crate::plan::BlockLayout;
use std::sync::Arc;
use tch::{Device, Tensor};

use super::compress::zero_gaps;
use super::disk::DiskTier;
use super::weights::owned_copy;

/// Where a block's bytes live.
#[derive(Debug)]
pub(super) enum HostTier {
    /// No host copy: the model's own tensors hold the values (a block kept resident on the
    /// device without a host copy, or one restored).
    Model,
    /// A host buffer of this process (pinned; pageable without pinning or in the CPU test
    /// mode), this manager's or that of another manager sharing its store.
    Pinned(HostBlock),
    /// A block of a shared-memory store: published by this manager, or mapped read-only from
    /// another process's (`opened`).
    SharedMemory {
        /// The block's bytes in the mapped file.
        host: HostBlock,
        /// Mapped from another process's store: read-only pages.
        opened: bool,
    },
    /// The checkpoint files' own pages, mapped read-only (`zero_copy`).
    FilePages(HostBlock),
    /// No host copy: read from the checkpoint into a staging buffer at each upload (past the
    /// host budget).
    Disk(Arc<DiskTier>),
}

/// The host bytes of part of a block, ready to copy: pieces of its host copy, or (the disk
/// tier) a staging buffer to give back with [`Staged::finish`] once the copy out of it is
/// queued.
#[derive(Debug)]
pub(super) struct Staged {
    /// `(offset from the start of the part, host bytes)`.
    pub(super) pieces: Vec<(usize, Tensor)>,
    /// The disk tier and its staging buffer the part sits in.
    buffer: Option<(Arc<DiskTier>, usize)>,
}

impl Staged {
    /// Host bytes held elsewhere (a host copy): nothing to give back.
    pub(super) fn host(pieces: Vec<(usize, Tensor)>) -> Staged {
        Staged {
            pieces,
            buffer: None,
        }
    }

    /// Part of disk-tier staging buffer `i` of `disk`.
    pub(super) fn disk(part: Tensor, disk: Arc<DiskTier>, i: usize) -> Staged {
        Staged {
            pieces: vec![(0, part)],
            buffer: Some((disk, i)),
        }
    }

    /// The first `len` bytes as one contiguous host tensor: the one piece itself when it is
    /// that, else a copy (for tests that read what an upload would copy).
    #[cfg(test)]
    pub(super) fn contiguous(&self, len: usize) -> Result<Tensor> {
        if let [(0, t)] = self.pieces.as_slice()
            && t.numel() == len
        {
            return Ok(t.shallow_clone());
        }
        let out = crate::accel::alloc_host(len.max(1), HostMemory::Pageable)?;
        let out = out.f_narrow(0, 0, len as i64).context("upload")?;
        for (o, t) in &self.pieces {
            let mut d = out
                .f_narrow(0, *o as i64, t.numel() as i64)
                .context("upload")?;
            tch::no_grad(|| d.f_copy_(t)).context("upload")?;
        }
        Ok(out)
    }

    /// The first `len` bytes as one host tensor, where they are one piece (an encoding always
    /// is: one buffer, or a disk-tier staging buffer).
    pub(super) fn one_piece(&self, len: usize) -> Result<Tensor> {
        match self.pieces.as_slice() {
            [(0, t)] if t.numel() >= len => t.f_narrow(0, 0, len as i64).context("upload"),
            _ => Err(Error::InvalidArgument {
                op: "upload",
                message: "an encoding in several host pieces: this is a bug".into(),
            }),
        }
    }

    /// Gives a staging buffer back once the copies out of it queued so far on `copy` are done
    /// (at once without a stream); nothing to do for host bytes held elsewhere.
    pub(super) fn finish(self, copy: Option<&Stream>) -> Result<()> {
        match self.buffer {
            Some((disk, i)) => disk.unstage(i, copy),
            None => Ok(()),
        }
    }
}

/// What an upload of a block moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    /// The raw block, `bytes` long (its layout's size).
    Raw { bytes: usize },
    /// The block's encoding, `len` bytes, which decodes into the raw block of `raw` bytes.
    Encoded { len: usize, raw: usize },
}

impl Transport {
    /// Bytes moved from the host.
    pub(super) fn len(self) -> usize {
        match self {
            Transport::Raw { bytes } => bytes,
            Transport::Encoded { len, .. } => len,
        }
    }
}

impl HostTier {
    /// Block `i` of `store` (another manager's, or one opened from another process), as a
    /// tier: read-only pages stay read-only.
    pub(super) fn from_store(store: &HostStore, i: usize) -> HostTier {
        let Some(host) = store.buffers[i].as_ref().map(HostBlock::shallow_clone) else {
            return HostTier::Model;
        };
        if store.file_pages {
            HostTier::FilePages(host)
        } else if store.read_only || store.owner_path.is_some() {
            HostTier::SharedMemory {
                host,
                opened: store.read_only,
            }
        } else {
            HostTier::Pinned(host)
        }
    }

    /// The host copy, where the block has one in memory.
    pub(super) fn host(&self) -> Option<&HostBlock> {
        match self {
            HostTier::Pinned(h) | HostTier::FilePages(h) => Some(h),
            HostTier::SharedMemory { host, .. } => Some(host),
            HostTier::Model | HostTier::Disk(_) => None,
        }
    }

    /// Whether the manager holds the block's values (a host copy, or the disk tier), as opposed
    /// to the model's tensors.
    pub(super) fn is_offloaded(&self) -> bool {
        !matches!(self, HostTier::Model)
    }

    /// For an encoded host copy: its encoding and the raw block's size.
    pub(super) fn encoding(&self) -> Option<(&Tensor, usize)> {
        self.host()?.encoding()
    }

    /// Whether the host copy is raw pages of a read-only mapping, which an in-place write
    /// would turn into SIGSEGV.
    pub(super) fn is_read_only(&self) -> bool {
        match self {
            HostTier::FilePages(h)
            | HostTier::SharedMemory {
                host: h,
                opened: true,
            } => h.encoding().is_none(),
            _ => false,
        }
    }

    /// What an upload of block `block` moves: the raw block (`bytes`, its layout's size) or
    /// its encoding (an encoded host copy, or a disk tier reading encodings).
    pub(super) fn transport(&self, block: usize, bytes: usize) -> Transport {
        if let HostTier::Disk(disk) = self
            && let Some((len, raw)) = disk.encoding(block)
        {
            return Transport::Encoded { len, raw };
        }
        match self.encoding() {
            Some((enc, raw)) => Transport::Encoded {
                len: enc.numel(),
                raw,
            },
            None => Transport::Raw { bytes },
        }
    }

    /// For an encoded block: the bytes a staging buffer needs for it (its longest segment
    /// encoding); None for a raw block.
    pub(super) fn staging_len(&self, block: usize) -> Result<Option<usize>> {
        if let HostTier::Disk(disk) = self
            && let Some((len, _)) = disk.encoding(block)
        {
            return Ok(Some(disk.largest_segment(block).unwrap_or(len)));
        }
        match self.host() {
            Some(h) if h.encoding().is_some() => h.staging_len().map(Some),
            _ => Ok(None),
        }
    }

    /// Bytes `[off, off + len)` of what an upload of block `block` moves ([`Self::transport`]):
    /// of its layout, raw (pieces of its host copy, or the disk tier's staging buffer the block
    /// was read into, waiting for the read), or of its encoding.
    pub(super) fn stage(&self, block: usize, off: usize, len: usize) -> Result<Staged> {
        match self {
            HostTier::Disk(disk) => disk.stage(block, off, len),
            _ => match (self.host(), self.encoding()) {
                (Some(_), Some((enc, _))) => {
                    let part = enc.f_narrow(0, off as i64, len as i64).context("upload")?;
                    Ok(Staged::host(vec![(0, part)]))
                }
                (Some(h), None) => Ok(Staged::host(h.range(off, len)?)),
                (None, _) => Err(no_host_copy("upload", block)),
            },
        }
    }

    /// The block raw (`bytes` long): the host copy itself, or decoded into a fresh pageable
    /// buffer if encoded, or read now from the disk tier into one.
    pub(super) fn read(&self, block: usize, bytes: usize) -> Result<HostBlock> {
        match self {
            // Raw from the checkpoint, also where uploads read encodings from its cache.
            HostTier::Disk(disk) => {
                let buf = crate::accel::alloc_host(bytes, HostMemory::Pageable)?;
                disk.read_into(block, &buf)?;
                Ok(HostBlock::whole(buf))
            }
            _ => match self.host() {
                Some(h) => h.decoded(),
                None => Err(no_host_copy("reading a block's host copy", block)),
            },
        }
    }

    /// The value of tensor `j` of block `block` (`layout`): a view of the raw host copy, or
    /// (read-only pages, when `owned`) a copy the caller owns; a fresh tensor where the block
    /// had to be decoded or read.
    pub(super) fn tensor(
        &self,
        block: usize,
        layout: &BlockLayout,
        j: usize,
        owned: bool,
    ) -> Result<Tensor> {
        let view = self
            .read(block, layout.bytes)?
            .views(layout)?
            .swap_remove(j);
        if owned && self.is_read_only() {
            owned_copy(&layout.tensors[j], &view, Device::Cpu, "tensor")
        } else {
            Ok(view)
        }
    }

    /// Refuses `update_tensor` of tensor `name` on the disk tier, whose values are the
    /// checkpoint's.
    pub(super) fn refuse_update(&self, name: &str) -> Result<()> {
        match self {
            HostTier::Disk(_) => Err(Error::InvalidArgument {
                op: "update_tensor",
                message: format!(
                    "{name:?} is in a block on the disk tier, read from the checkpoint at every upload; update the checkpoint, or raise host_budget so the block is held in host memory"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Writes `value` into tensor `j` of the host copy (`layout`). An encoded copy is decoded,
    /// written and encoded again by `encode` (which gets the raw block, its gaps zero); the new
    /// encoding replaces the old one, which is returned. Refused on the disk tier (update the
    /// checkpoint) and for read-only pages. The caller checked that nobody else reads the copy.
    pub(super) fn update(
        &mut self,
        name: &str,
        layout: &BlockLayout,
        j: usize,
        value: &Tensor,
        encode: impl FnOnce(&Tensor) -> Result<HostBlock>,
    ) -> Result<Option<HostBlock>> {
        self.refuse_update(name)?;
        if self.is_read_only() {
            return Err(Error::InvalidArgument {
                op: "update_tensor",
                message: format!(
                    "the host copy of {name:?} is read-only pages (zero_copy, or a store opened from another process); load without zero_copy, or update the publisher's model"
                ),
            });
        }
        let write = |raw: &HostBlock| -> Result<()> {
            let mut view = raw.views(layout)?.swap_remove(j);
            tch::no_grad(|| view.f_copy_(value)).context("update_tensor")?;
            Ok(())
        };
        let host = match self {
            HostTier::Pinned(h) | HostTier::FilePages(h) => h,
            HostTier::SharedMemory { host, .. } => host,
            HostTier::Model | HostTier::Disk(_) => {
                return Err(no_host_copy("update_tensor", layout.index));
            }
        };
        if host.encoding().is_none() {
            write(host)?;
            return Ok(None);
        }
        let raw = host.decoded()?;
        write(&raw)?;
        let buf = raw.as_whole().expect("a decoded block is one buffer");
        zero_gaps(buf, layout)?;
        let new = encode(buf)?;
        Ok(Some(std::mem::replace(host, new)))
    }

    /// Fresh tensors on `device` with the block's values (`layout`), in memory the caller owns.
    pub(super) fn restore(
        &self,
        block: usize,
        layout: &BlockLayout,
        device: Device,
    ) -> Result<Vec<Tensor>> {
        let host = self.read(block, layout.bytes)?;
        let views = host.views(layout)?;
        layout
            .tensors
            .iter()
            .zip(&views)
            .map(|(t, v)| owned_copy(t, v, device, "restore"))
            .collect()
    }

    /// What the model's tensors of the block point at once the manager is gone: views of the
    /// raw host copy (an encoded one decoded into pageable memory they then own), or, where the
    /// copy is not the manager's alone (`shared`: other managers or processes read it, or it is
    /// read-only pages), copies in memory the model owns (the view should a copy fail). None
    /// without a host copy (the disk tier's values stay in the checkpoint).
    pub(super) fn detach(&self, layout: &BlockLayout, shared: bool) -> Option<Vec<Tensor>> {
        let host = self.host()?;
        let owned = shared && host.encoding().is_none();
        let views = host.decoded().and_then(|h| h.views(layout)).ok()?;
        Some(
            layout
                .tensors
                .iter()
                .zip(views)
                .map(|(t, v)| match owned {
                    true => owned_copy(t, &v, Device::Cpu, "dropping the manager").unwrap_or(v),
                    false => v,
                })
                .collect(),
        )
    }
}

fn no_host_copy(op: &'static str, block: usize) -> Error {
    Error::InvalidArgument {
        op,
        message: format!("block {block} has no host copy"),
    }
}

#[cfg(test)]
mod tests;
