//! The host side of the data path: [`HostStore`], the page-locked copy of every streamed block,
//! shareable by managers on several devices of one process, and (through a file on a
//! shared-memory file system) by managers in other processes.

mod manifest;
pub(crate) mod shm;

use crate::accel::{self, FileMapping, HostMemory};
use crate::error::{Context as _, Error, Result};
use crate::plan::{BlockLayout, Plan};
use manifest::{FILE_ALIGN, Manifest};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

/// Where each block sits in a shared-memory file: `bytes[i]` is block `i`'s buffer size, or
/// None for a block without a host copy (which sits nowhere, at offset 0). Each block starts at
/// a 4 KiB aligned offset. Returns the offsets and the file's size.
pub(crate) fn file_offsets(bytes: &[Option<usize>]) -> (Vec<usize>, usize) {
    let mut offsets = vec![0usize; bytes.len()];
    let mut total = 0usize;
    for (i, b) in bytes.iter().enumerate() {
        if let Some(b) = b {
            offsets[i] = total;
            total += b.div_ceil(FILE_ALIGN) * FILE_ALIGN;
        }
    }
    (offsets, total)
}

/// The manifest written next to a shared-memory store: `<path>.manifest`.
pub(crate) fn manifest_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".manifest");
    PathBuf::from(p)
}

/// Threads for host-side work on weights (reading checkpoints, encoding, decoding): the
/// machine's cores, at most 16.
pub(crate) fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(16)
}

/// Checks that `t` is a contiguous CPU tensor; returns its size in bytes.
fn host_extent(t: &Tensor) -> Result<usize> {
    if t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return Err(Error::InvalidArgument {
            op: "viewing a host buffer as bytes",
            message: format!(
                "a contiguous CPU tensor is needed, got {:?} on {:?}",
                t.size(),
                t.device()
            ),
        });
    }
    Ok(t.numel() * t.kind().elt_size_in_bytes())
}

/// The bytes of host buffer `t` (a contiguous CPU tensor, checked).
///
/// # Safety
/// Nothing may write `t`'s storage while the slice lives, and `t` must outlive it.
pub(crate) unsafe fn bytes(t: &Tensor) -> Result<&[u8]> {
    let len = host_extent(t)?;
    // SAFETY: a contiguous CPU tensor's storage is `len` bytes from its data pointer; the
    // caller guarantees it is neither written nor freed while the slice lives.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) })
}

/// The bytes of host buffer `t` (a contiguous CPU tensor, checked), to fill.
///
/// # Safety
/// Nothing else may read or write `t`'s storage while the slice lives (no other slice, view or
/// asynchronous copy), and `t` must outlive it.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn bytes_mut(t: &Tensor) -> Result<&mut [u8]> {
    let len = host_extent(t)?;
    // SAFETY: as in `bytes`, with exclusive access guaranteed by the caller.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) })
}

/// A block's host copy: one buffer, or (the zero-copy checkpoint store) pieces of mapped
/// checkpoint files, each a contiguous range of the block's layout, or (compressed transport)
/// one buffer holding the block's encoding. Every piece is a 1-D `uint8` CPU tensor.
#[derive(Debug)]
pub(crate) struct HostBlock {
    /// `(offset in the block's layout, bytes)`, sorted by offset, not overlapping; for an
    /// encoded block its one buffer, at 0.
    pieces: Vec<(usize, Tensor)>,
    /// Encoded: the raw block's size in bytes.
    encoded: Option<usize>,
}

impl HostBlock {
    /// A block held in one buffer.
    pub(crate) fn whole(buf: Tensor) -> HostBlock {
        HostBlock {
            pieces: vec![(0, buf)],
            encoded: None,
        }
    }

    /// A block held in pieces: `(offset in the layout, buffer)`.
    pub(crate) fn pieces(mut pieces: Vec<(usize, Tensor)>) -> HostBlock {
        pieces.sort_by_key(|(o, _)| *o);
        HostBlock {
            pieces,
            encoded: None,
        }
    }

    /// A block held as its encoding (`buf`) of `raw_len` bytes.
    pub(crate) fn encoded(buf: Tensor, raw_len: usize) -> HostBlock {
        HostBlock {
            pieces: vec![(0, buf)],
            encoded: Some(raw_len),
        }
    }

    /// For an encoded block: its encoding and its raw size.
    pub(crate) fn encoding(&self) -> Option<(&Tensor, usize)> {
        self.encoded.map(|raw| (&self.pieces[0].1, raw))
    }

    /// The block raw: itself, or an encoded block decoded (CPU reference decoder, all cores)
    /// into a fresh pageable buffer.
    pub(crate) fn decoded(&self) -> Result<HostBlock> {
        self.decoded_in(crate::accel::HostMemory::Pageable)
    }

    /// [`Self::decoded`] into a fresh buffer of `memory` (a raw host copy to stream from, when
    /// pinned).
    pub(crate) fn decoded_in(&self, memory: crate::accel::HostMemory) -> Result<HostBlock> {
        let Some((enc, raw)) = self.encoding() else {
            return Ok(self.shallow_clone());
        };
        let out = crate::accel::alloc_host(raw.max(1), memory)?;
        // SAFETY: nothing writes `enc` (host copies are written only by update_tensor, refused
        // for encoded blocks); `out` is a fresh buffer owned here; both outlive the slices.
        let (src, dst) = unsafe { (bytes(enc)?, bytes_mut(&out)?) };
        layerwise_offload_codec::decode_segmented(src, &mut dst[..raw], worker_threads()).map_err(
            |source| Error::Codec {
                op: "decoding a compressed host copy",
                source,
            },
        )?;
        Ok(HostBlock::whole(out))
    }

    /// For an encoded block: the bytes a device staging buffer needs for it, its longest
    /// segment's encoding (`layerwise_offload_codec::segments`); 0 for a raw block.
    pub(crate) fn staging_len(&self) -> Result<usize> {
        let Some((enc, _)) = self.encoding() else {
            return Ok(0);
        };
        // SAFETY: nothing writes an encoded host copy while it is held (update_tensor replaces
        // it by a new one); `enc` outlives the slice.
        let bytes = unsafe { bytes(enc)? };
        let segments =
            layerwise_offload_codec::Segments::walk(bytes).map_err(|source| Error::Codec {
                op: "reading a compressed host copy's segments",
                source,
            })?;
        Ok(segments.largest_encoded())
    }

    /// The buffer, if the block is held raw in one starting at offset 0.
    pub(crate) fn as_whole(&self) -> Option<&Tensor> {
        match (self.pieces.as_slice(), self.encoded) {
            ([(0, t)], None) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn shallow_clone(&self) -> HostBlock {
        HostBlock {
            pieces: self
                .pieces
                .iter()
                .map(|(o, t)| (*o, t.shallow_clone()))
                .collect(),
            encoded: self.encoded,
        }
    }

    /// Bytes held (the pieces together).
    pub(crate) fn bytes(&self) -> usize {
        self.pieces.iter().map(|(_, t)| t.numel()).sum()
    }

    /// The parts of the pieces inside `[off, off + len)` of the layout: `(offset from off,
    /// host bytes)`. Gaps between pieces (layout padding) are left out.
    pub(crate) fn range(&self, off: usize, len: usize) -> Result<Vec<(usize, Tensor)>> {
        self.refuse_encoded()?;
        pieces_within(&self.pieces, off, len, "reading a host block")
    }

    /// Raw bytes of an encoded block exist only once decoded ([`Self::decoded`]).
    fn refuse_encoded(&self) -> Result<()> {
        match self.encoded {
            Some(_) => Err(Error::InvalidArgument {
                op: "reading a host block",
                message: "the host copy is encoded; decode it first".into(),
            }),
            None => Ok(()),
        }
    }

    /// Typed views of the block's tensors (as [`crate::plan::BlockLayout`] places them), one
    /// per tensor, with their shapes and strides.
    pub(crate) fn views(&self, layout: &BlockLayout) -> Result<Vec<Tensor>> {
        self.refuse_encoded()?;
        layout
            .tensors
            .iter()
            .map(|t| {
                let (o, buf) = self
                    .pieces
                    .iter()
                    .rev()
                    .find(|(o, b)| *o <= t.offset && t.offset + t.bytes <= o + b.numel())
                    .ok_or_else(|| Error::InvalidArgument {
                        op: "making views of a host block",
                        message: format!("no piece of the host copy holds {}", t.name),
                    })?;
                buf.f_narrow(0, (t.offset - o) as i64, t.bytes as i64)
                    .and_then(|v| v.f_view_dtype(t.kind))
                    .and_then(|v| v.f_as_strided(t.shape.as_slice(), t.strides.as_slice(), None))
                    .context("making views of a host block")
            })
            .collect()
    }
}

/// The host copy of every streamed block of a model: one buffer per block, page-locked as
/// portable memory (usable by every CUDA device of the process). Managers on several GPUs of one
/// process can stream from one store, each with its own slot ring and streams, so host memory
/// holds the block weights once whatever the number of GPUs.
///
/// Get it from an initialized manager with [`LayerwiseOffloadManager::host_store`](crate::LayerwiseOffloadManager::host_store) and hand it
/// to the others with [`OffloadConfig::host_store`](crate::OffloadConfig::host_store). The buffers are freed when the last
/// manager holding the store is restored or dropped.
#[derive(Debug)]
pub struct HostStore {
    pub(crate) blocks: Vec<BlockLayout>,
    pub(crate) buffers: Vec<Option<HostBlock>>,
    pub(crate) pinned: bool,
    /// Mapped read-only from another process's store: never written.
    pub(crate) read_only: bool,
    /// The shared-memory file this process created (removed when the store is dropped).
    pub(crate) owner_path: Option<PathBuf>,
    /// The buffers are the pages of a checkpoint's files (`zero_copy`; read-only too).
    pub(crate) file_pages: bool,
}

// SAFETY: the store is never written after construction: its buffers are only read (views are
// made from them, and uploads copy out of them), and libtorch's tensor handles are safe to
// clone and read from several threads at once (reference counts are atomic). Writes to the
// host copy (`update_tensor`) are refused while a store is shared.
unsafe impl Sync for HostStore {}

impl HostStore {
    /// A store over this process's own host buffers (`buffers[i]` is block `i`'s, None for a
    /// block without a host copy); `owner_path` is the shared-memory file it published, removed
    /// when the store is dropped.
    pub(crate) fn own(
        blocks: Vec<BlockLayout>,
        buffers: Vec<Option<HostBlock>>,
        pinned: bool,
        owner_path: Option<PathBuf>,
    ) -> HostStore {
        HostStore {
            blocks,
            buffers,
            pinned,
            read_only: false,
            owner_path,
            file_pages: false,
        }
    }

    /// Gives up block `i`'s buffer once its weights live elsewhere (a restore copied them
    /// out), so that its memory is freed as soon as nothing else holds it, instead of when the
    /// whole store goes. Only the store's one owner can call it (`Arc::get_mut`): a store
    /// shared with other managers keeps every block.
    pub(crate) fn release(&mut self, i: usize) {
        if let Some(b) = self.buffers.get_mut(i) {
            *b = None;
        }
    }

    /// Bytes of host memory the store holds.
    pub fn bytes(&self) -> u64 {
        self.blocks
            .iter()
            .zip(&self.buffers)
            .filter_map(|(_, b)| b.as_ref())
            .map(|b| b.bytes() as u64)
            .sum()
    }

    /// Number of blocks (loop order, all lists).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the store holds its blocks encoded (published by a manager with
    /// [`OffloadConfig::compress`](crate::OffloadConfig::compress)): managers streaming from it
    /// upload the encodings and decode them on the device, whatever their own `compress` says.
    pub fn is_encoded(&self) -> bool {
        self.buffers
            .iter()
            .flatten()
            .any(|b| b.encoding().is_some())
    }

    /// Whether the buffers are page-locked.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// The host buffer of block `i` (loop order) as a 1-D `uint8` CPU tensor, if the store
    /// holds it in one buffer (a zero-copy checkpoint store holds blocks in pieces of the
    /// checkpoint's files, and has no one buffer to give). Read it, do not write it: it is the
    /// buffer managers stream from. For a store opened read-only ([`Self::is_read_only`]) it is
    /// a copy in memory the caller owns (None if that cannot be allocated): the store's pages
    /// are a read-only mapping, which an in-place write would turn into SIGSEGV.
    pub fn block(&self, i: usize) -> Option<Tensor> {
        let buf = self.buffers.get(i)?.as_ref()?.as_whole()?;
        if self.read_only {
            let mut copy = Tensor::f_empty_like(buf).ok()?;
            tch::no_grad(|| copy.f_copy_(buf)).ok()?;
            Some(copy)
        } else {
            Some(buf.shallow_clone())
        }
    }

    /// Whether the store was opened from another process's shared-memory file (read-only).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Opens the store another process of this machine published with
    /// `OffloadConfig::shared_memory(path)`: maps its shared-memory file read-only (page-locked
    /// in this process with [`HostMemory::Pinned`]) so that host memory holds the block weights
    /// once for every process. Hand the result to [`crate::OffloadConfig::host_store`].
    ///
    /// The publishing process must have finished `initialize()` (the manifest appears last) and
    /// must not have dropped its store yet (that removes the file; mappings made before stay
    /// valid).
    ///
    /// Only a store this user published is opened: the file and the manifest must be regular
    /// files (not symbolic links) owned by this process's user and writable by nobody else
    /// (the publisher makes them 0600); anything else is [`Error::SharedFile`], checked on the
    /// open file, so another local user can neither plant weights nor swap the file in between.
    ///
    /// A mapping survives the file's removal, not its truncation: should a process of the same
    /// user (or root) truncate or shrink the file while this store is alive, this process dies
    /// with SIGBUS at its next read of a lost page, and no error can be returned. The refusal of
    /// other users' files is the guard (no other user can change the file); the publisher never
    /// truncates it, and nothing else of the same user should touch it. The pages never leave
    /// the store: [`Self::block`], a manager's `tensor(name)` and a manager dropped without
    /// `restore()` give copies, so nothing outside the store can write them or outlive it.
    pub fn open_shared(path: impl AsRef<Path>, memory: HostMemory) -> Result<Arc<HostStore>> {
        let path = path.as_ref();
        let mpath = manifest_path(path);
        let text = read_manifest(&mpath)?;
        let manifest = Manifest::parse(text.as_bytes()).map_err(|why| Error::SharedFile {
            path: mpath.clone(),
            reason: why.0,
        })?;
        // The pages stay inside the store: views of them go only to uploads, and every public
        // read of them ([`Self::block`], a manager's `tensor`, its drop) is a copy.
        let file = accel::map_shared_file(path, manifest.bytes, FileMapping::OpenReadOnly, memory)?;
        let mut blocks = Vec::with_capacity(manifest.blocks.len());
        let mut buffers = Vec::with_capacity(manifest.blocks.len());
        for (i, ((layout, offset), enc)) in manifest
            .blocks
            .into_iter()
            .zip(manifest.encoded)
            .enumerate()
        {
            // In range: the manifest checked offset + span <= its file size, which the mapping
            // checked against the file.
            let span = enc.unwrap_or(layout.bytes);
            let buffer = offset
                .map(|o| file.f_narrow(0, o as i64, span as i64))
                .transpose()
                .context("HostStore::open_shared")?;
            let block = match (buffer, enc) {
                (None, _) => None,
                (Some(b), None) => Some(HostBlock::whole(b)),
                (Some(b), Some(_)) => {
                    // Bytes from another process: checked on the host before the GPU decoder,
                    // which checks structure only, ever sees them.
                    check_encoding(&b, layout.bytes).map_err(|why| Error::SharedFile {
                        path: path.to_owned(),
                        reason: format!("block {i}'s encoding {why}; publish the store again"),
                    })?;
                    Some(HostBlock::encoded(b, layout.bytes))
                }
            };
            blocks.push(layout);
            buffers.push(block);
        }
        Ok(Arc::new(HostStore {
            blocks,
            buffers,
            pinned: memory == HostMemory::Pinned,
            read_only: true,
            owner_path: None,
            file_pages: false,
        }))
    }

    /// Writes the manifest of a store whose block `i` sits at `offsets[i]` of a `total`-byte
    /// file (blocks without a host copy sit nowhere); mode 0600, written to a temporary name
    /// and renamed, so readers see all of it or nothing.
    pub(crate) fn write_manifest(
        &self,
        path: &Path,
        offsets: &[usize],
        total: usize,
    ) -> Result<()> {
        let blocks = self
            .blocks
            .iter()
            .zip(&self.buffers)
            .zip(offsets)
            .map(|((l, b), &o)| (l.clone(), b.as_ref().map(|_| o)))
            .collect();
        let encoded = self
            .buffers
            .iter()
            .map(|b| b.as_ref()?.encoding().map(|(e, _)| e.numel()))
            .collect();
        shm::write_private(
            &manifest_path(path),
            Manifest::new(total, blocks)
                .with_encoded(encoded)
                .to_json()
                .as_bytes(),
            "OffloadConfig::shared_memory",
        )
    }

    /// Checks that a plan has the store's blocks and tensors (names, shapes, element types,
    /// sizes; says what differs), and takes the store's layout: where each tensor sits in the
    /// block buffer (a zero-copy store lays blocks out as the checkpoint's files do) and its
    /// strides.
    pub(crate) fn adopt_plan(&self, plan: &mut Plan) -> Result<()> {
        let differ = |message: String| Error::InvalidArgument {
            op: "initialize with a shared host store",
            message,
        };
        if plan.blocks.len() != self.blocks.len() {
            return Err(differ(format!(
                "the model has {} blocks, the store {}",
                plan.blocks.len(),
                self.blocks.len()
            )));
        }
        for (i, (a, b)) in plan.blocks.iter().zip(&self.blocks).enumerate() {
            if self.buffers[i].is_none() {
                return Err(differ(format!(
                    "block {i} has no host copy in the store: the manager that made it kept the block resident (build it with .shareable(true) or without a VRAM budget) or on its disk tier (no host_budget)"
                )));
            }
            if a.attr != b.attr || a.index != b.index || a.tensors.len() != b.tensors.len() {
                return Err(differ(format!(
                    "block {i} is {}.{} in the model and {}.{} in the store",
                    a.attr, a.index, b.attr, b.index
                )));
            }
            for (x, y) in a.tensors.iter().zip(&b.tensors) {
                if x.name != y.name || x.shape != y.shape || x.kind != y.kind || x.bytes != y.bytes
                {
                    return Err(differ(format!(
                        "{} is {:?} {:?} in the model, but the store holds {} as {:?} {:?}",
                        x.name, x.shape, x.kind, y.name, y.shape, y.kind
                    )));
                }
            }
        }
        for (a, b) in plan.blocks.iter_mut().zip(&self.blocks) {
            a.bytes = b.bytes;
            for (x, y) in a.tensors.iter_mut().zip(&b.tensors) {
                x.offset = y.offset;
                x.strides = y.strides.clone();
            }
        }
        Ok(())
    }
}

impl Drop for HostStore {
    fn drop(&mut self) {
        // The publishing process removes its file and manifest; mappings other processes made
        // stay valid until they unmap.
        if let Some(p) = &self.owner_path {
            let _ = std::fs::remove_file(manifest_path(p));
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Checks an encoding `enc` (a host buffer) from another process: its checksum, and that it
/// decodes to `raw` bytes; the reason otherwise.
fn check_encoding(enc: &Tensor, raw: usize) -> std::result::Result<(), String> {
    // SAFETY: `enc` is a view of a read-only mapping this store owns, alive for the call;
    // nothing in this process writes it.
    let bytes = unsafe { bytes(enc) }.map_err(|e| e.to_string())?;
    let parsed = layerwise_offload_codec::verify_segmented(bytes, worker_threads())
        .map_err(|e| format!("is corrupt ({e})"))?;
    match parsed.decoded_len() {
        n if n == raw => Ok(()),
        n => Err(format!("decodes to {n} bytes, not the block's {raw}")),
    }
}

/// Largest manifest read: far above any model's (a few hundred bytes per tensor).
const MANIFEST_MAX_BYTES: u64 = 64 << 20;

/// Reads the manifest at `mpath`, a file this user owns and nobody else can write.
fn read_manifest(mpath: &Path) -> Result<String> {
    use std::io::Read as _;
    let (file, meta) = shm::open_trusted(mpath)?.map_err(|e| {
        Error::io(
            "cannot read the shared host store's manifest; has the publishing process finished initialize()?",
            mpath,
            e,
        )
    })?;
    if meta.len() > MANIFEST_MAX_BYTES {
        return Err(Error::SharedFile {
            path: mpath.to_owned(),
            reason: format!("holds {} bytes, too many for a manifest", meta.len()),
        });
    }
    let mut text = String::new();
    file.take(MANIFEST_MAX_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| Error::io("cannot be read as a manifest", mpath, e))?;
    Ok(text)
}

/// The parts of `pieces` (`(offset, host bytes)`) inside `[off, off + len)`, cut to it:
/// `(offset from off, host bytes)`. Gaps between pieces are left out; `op` names the operation
/// in an error.
pub(crate) fn pieces_within(
    pieces: &[(usize, Tensor)],
    off: usize,
    len: usize,
    op: &'static str,
) -> Result<Vec<(usize, Tensor)>> {
    let end = off + len;
    let mut out = Vec::new();
    for (o, t) in pieces {
        let (a, b) = ((*o).max(off), (o + t.numel()).min(end));
        if a < b {
            let part = t.f_narrow(0, (a - o) as i64, (b - a) as i64).context(op)?;
            out.push((a - off, part));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::pieces_within;
    use tch::{Device, Kind, Tensor};

    /// The host pieces that fall in a range, cut to it, with offsets from its start.
    #[test]
    fn pieces_within_cuts_the_pieces_to_the_range() {
        let t = Tensor::arange(100, (Kind::Uint8, Device::Cpu));
        let pieces = vec![
            (0, t.narrow(0, 0, 30)),
            (30, t.narrow(0, 30, 50)),
            (80, t.narrow(0, 80, 20)),
        ];
        let got = pieces_within(&pieces, 20, 65, "test").unwrap();
        let summary: Vec<(usize, i64, i64)> = got
            .iter()
            .map(|(o, p)| (*o, p.numel() as i64, p.int64_value(&[0])))
            .collect();
        assert_eq!(summary, [(0, 10, 20), (10, 50, 30), (60, 5, 80)]);
        assert!(pieces_within(&pieces, 100, 0, "test").unwrap().is_empty());
    }
}
