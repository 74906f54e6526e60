//! The encoded cache of a checkpoint ([`OffloadConfig::encoded_cache`](crate::OffloadConfig::encoded_cache)):
//! every block of a model encoded once (the `layerwise-offload-codec` format) into one file
//! beside the checkpoint, read or memory-mapped by every later start instead of encoding again.
//!
//! ```text
//! block 0's encoding at 0, block 1's at the next 4 KiB boundary, ...   (page-aligned: mappable)
//!   (each a segmented encoding: `layerwise_offload_codec::segments`)
//! header: JSON, see `Document`
//! trailer (32 bytes): "LWOCACHE" | header offset u64 | header length u64 | FNV-1a 64 of the header
//! ```
//! The header ties the file to the checkpoint it was made from: per checkpoint file its name,
//! size, modification time and an FNV-1a 64 hash of its safetensors header; and per block a
//! key (its layout, the stored names it was read from) and where its encoding lies, and the
//! segment size the encodings were made with (version 2; version 1 held whole encodings). A cache
//! whose checkpoint or model changed since, or whose bytes changed (the header's hash, each
//! encoding's CRC-32 checked by [`layerwise_offload_codec::verify`]), is [`Error::EncodedCache`]:
//! never served stale. Written to a temporary name and renamed, so a cache is whole or absent.

use super::{Checkpoint, FileStamp};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

/// The `format` field.
const FORMAT: &str = "layerwise-offload encoded cache";
/// The `version` field this crate writes and reads (2: segmented encodings, `segment_bytes`).
const VERSION: u32 = 2;
/// The trailer's magic bytes.
const MAGIC: &[u8; 8] = b"LWOCACHE";
/// Trailer length.
const TRAILER: usize = 32;
/// Alignment of each encoding in the file (a page: the file is mapped).
const FILE_ALIGN: usize = 4096;
/// Largest header read.
const MAX_HEADER: u64 = 64 << 20;

/// FNV-1a, 64 bits: a stable hash (the same in every build) of small texts.
pub(crate) fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One checkpoint file as the cache saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIdentity {
    name: String,
    bytes: u64,
    /// Modification time: seconds and nanoseconds.
    mtime: (i64, i64),
    /// FNV-1a 64 of the safetensors header (its length prefix and JSON), in hex.
    header: String,
}

/// Where one block's encoding lies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockEntry {
    /// What the block is made of (its layout and sources), in hex: see `block_key`.
    key: String,
    /// The raw block's size.
    raw: u64,
    offset: u64,
    bytes: u64,
    /// The longest segment encoding in it (absent before version 2).
    #[serde(default)]
    largest_segment: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    format: String,
    version: u32,
    /// The codec's format version of every encoding.
    codec_version: u16,
    /// The raw bytes per segment of every encoding (absent before version 2).
    #[serde(default)]
    segment_bytes: u64,
    /// Whether the encoder could code chunks in two tiers (`OffloadConfig::compress_two_tier`;
    /// absent: one tier).
    #[serde(default)]
    two_tier: bool,
    checkpoint: Vec<FileIdentity>,
    blocks: Vec<BlockEntry>,
}

/// One block's encoding in the cache file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CachedBlock {
    /// Offset in the file (4 KiB aligned).
    pub(crate) offset: usize,
    /// Length of the encoding.
    pub(crate) len: usize,
    /// Length of the raw block it decodes to.
    pub(crate) raw: usize,
    /// The longest segment encoding in it.
    pub(crate) largest_segment: usize,
}

/// A validated encoded cache, open.
#[derive(Debug)]
pub(crate) struct EncodedCache {
    path: PathBuf,
    file: File,
    /// Per block (loop order).
    blocks: Vec<CachedBlock>,
    /// The file as it was when validated: reads check it is still so.
    stamp: FileStamp,
}

/// The default place of the cache of `ckpt`: beside it (`<file>.encoded` for a file or a
/// shard index, `<dir>/layerwise-offload.encoded` for a directory).
pub(crate) fn default_path(ckpt: &Checkpoint) -> PathBuf {
    let p = ckpt.path();
    if p.is_dir() {
        p.join("layerwise-offload.encoded")
    } else {
        let mut s = p.as_os_str().to_owned();
        s.push(".encoded");
        PathBuf::from(s)
    }
}

/// The key of a block: a hash of what its raw bytes are made of. `parts` lists, per tensor,
/// its name, element type, shape, strides, offset, bytes, and the name it is stored under.
pub(crate) fn block_key(raw: usize, parts: impl IntoIterator<Item = String>) -> String {
    let mut text = format!("{raw}");
    for p in parts {
        text.push('\u{1f}');
        text.push_str(&p);
    }
    format!("{:016x}", fnv64(text.as_bytes()))
}

fn identity(ckpt: &Checkpoint) -> Result<Vec<FileIdentity>> {
    ckpt.shards
        .iter()
        .map(|s| {
            let m = s
                .file
                .metadata()
                .map_err(|e| Error::io("cannot stat", &s.path, e))?;
            // The safetensors header: its 8-byte length and the JSON (Checkpoint::open checked
            // both are in the file).
            let n = s
                .map
                .get(..8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
            let header = n
                .and_then(|n| s.map.get(..8usize.saturating_add(n)))
                .ok_or_else(|| super::bad(&s.path, "is shorter than its header".into()))?;
            Ok(FileIdentity {
                name: s
                    .path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                bytes: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                header: format!("{:016x}", fnv64(header)),
            })
        })
        .collect()
}

fn refuse<T>(path: &Path, reason: impl Into<String>) -> Result<T> {
    Err(Error::EncodedCache {
        path: path.to_owned(),
        reason: reason.into(),
    })
}

/// What to do about a cache that cannot be used.
const DELETE: &str =
    "delete the file to have it written again at the next initialize(), or give another path";

impl EncodedCache {
    /// Opens the cache at `path` made for `ckpt` and blocks `keys` (loop order) in segments of
    /// `segment` raw bytes, and checks it: its header, that the checkpoint files are those it
    /// was made from, that it holds these blocks in these segments, and (with `verify`) every
    /// encoding's checksum. None if there is no file.
    pub(crate) fn open(
        path: &Path,
        ckpt: &Checkpoint,
        keys: &[String],
        (segment, two_tier): (usize, bool),
        verify: bool,
    ) -> Result<Option<EncodedCache>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("cannot open the encoded cache", path, e)),
        };
        let stamp = FileStamp::of(&file, path)?;
        let len = stamp.len();
        if len < TRAILER as u64 {
            return refuse(
                path,
                format!("is {len} bytes, shorter than a cache; {DELETE}"),
            );
        }
        let mut trailer = [0u8; TRAILER];
        file.read_exact_at(&mut trailer, len - TRAILER as u64)
            .map_err(|e| Error::io("cannot read the encoded cache", path, e))?;
        let word = |i: usize| u64::from_le_bytes(trailer[i..i + 8].try_into().expect("8 bytes"));
        let (at, n, hash) = (word(8), word(16), word(24));
        if &trailer[..8] != MAGIC {
            return refuse(
                path,
                format!("is not an encoded cache (no trailer); {DELETE}"),
            );
        }
        if n > MAX_HEADER || at.checked_add(n) != Some(len - TRAILER as u64) {
            return refuse(path, format!("has a damaged trailer; {DELETE}"));
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact_at(&mut text, at)
            .map_err(|e| Error::io("cannot read the encoded cache", path, e))?;
        if fnv64(&text) != hash {
            return refuse(
                path,
                format!("its header changed since it was written (hash mismatch); {DELETE}"),
            );
        }
        let doc: Document = serde_json::from_slice(&text)
            .or_else(|e| refuse(path, format!("has a malformed header ({e}); {DELETE}")))?;
        if doc.format != FORMAT || doc.version != VERSION {
            return refuse(
                path,
                format!(
                    "is {:?} version {}, not {FORMAT:?} version {VERSION}; {DELETE}",
                    doc.format, doc.version
                ),
            );
        }
        if doc.codec_version != layerwise_offload_codec::format::VERSION {
            return refuse(
                path,
                format!(
                    "holds codec format version {}, this build reads {}; {DELETE}",
                    doc.codec_version,
                    layerwise_offload_codec::format::VERSION
                ),
            );
        }
        if doc.segment_bytes != segment as u64 {
            return refuse(
                path,
                format!(
                    "is stale: its encodings are in segments of {} raw bytes, this manager uses {segment} (OffloadConfig::compress_segment_bytes); {DELETE}, or use the segment size it was written with",
                    doc.segment_bytes
                ),
            );
        }
        if doc.two_tier != two_tier {
            let tiers = |two| if two { "two tiers" } else { "one tier" };
            return refuse(
                path,
                format!(
                    "is stale: its encodings were made with {} of codes, this manager asks for {} (OffloadConfig::compress_two_tier); {DELETE}, or use the setting it was written with",
                    tiers(doc.two_tier),
                    tiers(two_tier)
                ),
            );
        }
        let now = identity(ckpt)?;
        if doc.checkpoint != now {
            let what: Vec<String> = doc
                .checkpoint
                .iter()
                .zip(&now)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| {
                    let mut d = Vec::new();
                    if a.name != b.name {
                        d.push(format!("name {:?} -> {:?}", a.name, b.name));
                    }
                    if a.bytes != b.bytes {
                        d.push(format!("size {} -> {} bytes", a.bytes, b.bytes));
                    }
                    if a.mtime != b.mtime {
                        d.push("modification time".into());
                    }
                    if a.header != b.header {
                        d.push("header".into());
                    }
                    format!("{}: {}", b.name, d.join(", "))
                })
                .collect();
            let files = match doc.checkpoint.len() == now.len() {
                true => what.join("; "),
                false => format!("{} files then, {} now", doc.checkpoint.len(), now.len()),
            };
            return refuse(
                path,
                format!(
                    "is stale: the checkpoint changed since the cache was written ({files}); {DELETE}"
                ),
            );
        }
        if doc.blocks.len() != keys.len() || doc.blocks.iter().zip(keys).any(|(b, k)| b.key != *k) {
            return refuse(
                path,
                format!(
                    "was written for other blocks ({} blocks, or other tensors, layouts or names than the model's {}): another model, module_list_attr or rename; {DELETE}",
                    doc.blocks.len(),
                    keys.len()
                ),
            );
        }
        let mut blocks = Vec::with_capacity(keys.len());
        let mut end = 0u64;
        for (i, b) in doc.blocks.iter().enumerate() {
            let stop = b.offset.checked_add(b.bytes);
            if b.offset % FILE_ALIGN as u64 != 0
                || b.offset < end
                || stop.is_none_or(|s| s > at)
                || b.bytes == 0
            {
                return refuse(path, format!("block {i} lies outside its place; {DELETE}"));
            }
            end = stop.expect("checked");
            blocks.push(CachedBlock {
                offset: b.offset as usize,
                len: b.bytes as usize,
                raw: b.raw as usize,
                largest_segment: b.largest_segment as usize,
            });
        }
        let cache = EncodedCache {
            path: path.to_owned(),
            file,
            blocks,
            stamp,
        };
        if verify {
            cache.verify_all()?;
        }
        Ok(Some(cache))
    }

    /// Checks every encoding's checksum and raw size (through a read-only mapping).
    fn verify_all(&self) -> Result<()> {
        // SAFETY: a read-only private mapping of a regular file this process opened; its length
        // was checked against the blocks just now. A process truncating the file meanwhile
        // would be SIGBUS here, as with any mapped file (the caches are this user's files).
        let map = unsafe { memmap2::Mmap::map(&self.file) }
            .map_err(|e| Error::io("cannot map the encoded cache", &self.path, e))?;
        (0..self.blocks.len()).try_for_each(|i| self.check_block_in(i, &map))
    }

    /// Checks block `i`'s encoding within `file`, the cache file's bytes from its start (a
    /// mapping of it), as [`Self::check_block`] does.
    pub(crate) fn check_block_in(&self, i: usize, file: &[u8]) -> Result<()> {
        let b = self.blocks[i];
        let bytes = file
            .get(b.offset..b.offset + b.len)
            .ok_or_else(|| self.damaged(i, "lies past the end of the file".into()))?;
        self.check_block(i, bytes)
    }

    /// Checks block `i`'s encoding `bytes`: every segment's structure and checksum, that it
    /// decodes to its raw size, and that its longest segment encoding is the recorded one
    /// (what the device staging buffers are sized by).
    pub(crate) fn check_block(&self, i: usize, bytes: &[u8]) -> Result<()> {
        let parsed =
            layerwise_offload_codec::verify_segmented(bytes, crate::host::worker_threads());
        let b = self.blocks[i];
        match parsed {
            Ok(s) if s.decoded_len() != b.raw => Err(self.damaged(
                i,
                format!("decodes to {} bytes, not {}", s.decoded_len(), b.raw),
            )),
            Ok(s) if s.largest_encoded() != b.largest_segment => Err(self.damaged(
                i,
                format!(
                    "has a longest segment of {} bytes, not the recorded {}",
                    s.largest_encoded(),
                    b.largest_segment
                ),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(self.damaged(i, format!("is corrupt ({e})"))),
        }
    }

    fn damaged(&self, i: usize, what: String) -> Error {
        Error::EncodedCache {
            path: self.path.clone(),
            reason: format!("block {i}'s encoding {what}; {DELETE}"),
        }
    }

    /// Encodes every block into a new cache at `path` for `ckpt` and blocks `keys`: `encode(i)`
    /// gives block `i`'s segmented encoding (segments of `segment` raw bytes) and its raw size.
    /// Written beside `path` and renamed, then opened (without verifying what was just
    /// written).
    pub(crate) fn write(
        path: &Path,
        ckpt: &Checkpoint,
        keys: &[String],
        (segment, two_tier): (usize, bool),
        mut encode: impl FnMut(usize) -> Result<(Vec<u8>, usize)>,
    ) -> Result<EncodedCache> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".partial-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let write_err = |e| {
            Error::io(
                "cannot write the encoded cache; give OffloadConfig::encoded_cache a path in a writable directory",
                path,
                e,
            )
        };
        let result = (|| -> Result<()> {
            let file = File::create(&tmp).map_err(write_err)?;
            let mut blocks = Vec::with_capacity(keys.len());
            let mut at = 0u64;
            for (i, key) in keys.iter().enumerate() {
                let (enc, raw) = encode(i)?;
                let largest = layerwise_offload_codec::Segments::walk(&enc)
                    .map_err(|source| Error::Codec {
                        op: "writing the encoded cache",
                        source,
                    })?
                    .largest_encoded();
                file.write_all_at(&enc, at).map_err(write_err)?;
                blocks.push(BlockEntry {
                    key: key.clone(),
                    raw: raw as u64,
                    offset: at,
                    bytes: enc.len() as u64,
                    largest_segment: largest as u64,
                });
                at = (at + enc.len() as u64).div_ceil(FILE_ALIGN as u64) * FILE_ALIGN as u64;
            }
            let doc = Document {
                format: FORMAT.into(),
                version: VERSION,
                codec_version: layerwise_offload_codec::format::VERSION,
                segment_bytes: segment as u64,
                two_tier,
                checkpoint: identity(ckpt)?,
                blocks,
            };
            let text = serde_json::to_vec(&doc).expect("a cache header always serializes");
            let mut tail = Vec::with_capacity(TRAILER);
            tail.extend_from_slice(MAGIC);
            tail.extend_from_slice(&at.to_le_bytes());
            tail.extend_from_slice(&(text.len() as u64).to_le_bytes());
            tail.extend_from_slice(&fnv64(&text).to_le_bytes());
            file.write_all_at(&text, at).map_err(write_err)?;
            file.write_all_at(&tail, at + text.len() as u64)
                .map_err(write_err)?;
            file.sync_all().map_err(write_err)?;
            std::fs::rename(&tmp, path).map_err(write_err)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        EncodedCache::open(path, ckpt, keys, (segment, two_tier), false)?.ok_or_else(|| {
            Error::io(
                "the encoded cache vanished right after it was written",
                path,
                std::io::ErrorKind::NotFound.into(),
            )
        })
    }

    /// The cache file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (to map it).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Bytes up to the end of the last encoding (what a mapping must cover).
    pub(crate) fn data_len(&self) -> usize {
        self.blocks.last().map_or(0, |b| b.offset + b.len)
    }

    /// Block `i`'s encoding.
    pub(crate) fn block(&self, i: usize) -> CachedBlock {
        self.blocks[i]
    }

    /// Checks the file is as it was validated (before a read is used): a cache rewritten in
    /// place since is [`Error::EncodedCache`].
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        let now = FileStamp::of(&self.file, &self.path)?;
        if now != self.stamp {
            return refuse(
                &self.path,
                format!(
                    "was changed in place while in use ({}); keep it unchanged while a manager uses it",
                    self.stamp.differences(&now)
                ),
            );
        }
        Ok(())
    }

    /// Reads block `i`'s encoding into `dst` (at least its length; the rest is left as it
    /// is), checks its checksum and that the file did not change, and drops the pages read
    /// from the page cache if `forget`.
    pub(crate) fn read_block(&self, i: usize, dst: &mut [u8], forget: bool) -> Result<()> {
        let b = self.blocks[i];
        let dst = dst.get_mut(..b.len).ok_or_else(|| Error::InvalidArgument {
            op: "reading an encoded block",
            message: format!("block {i}'s encoding of {} bytes does not fit", b.len),
        })?;
        read_parallel_at(&self.file, dst, b.offset as u64)
            .map_err(|e| Error::io("cannot read the encoded cache", &self.path, e))?;
        self.check_unchanged()?;
        self.check_block(i, dst)?;
        if forget {
            let _ = super::fadvise_dontneed(&self.file, b.offset as u64, b.len as u64);
        }
        Ok(())
    }
}

/// `pread` of `dst.len()` bytes at `offset`, in 16 MiB pieces from several threads.
fn read_parallel_at(file: &File, dst: &mut [u8], offset: u64) -> std::io::Result<()> {
    const PIECE: usize = 16 << 20;
    let threads = crate::host::worker_threads().max(1);
    let pieces: Vec<(u64, &mut [u8])> = dst
        .chunks_mut(PIECE)
        .enumerate()
        .map(|(k, c)| (offset + (k * PIECE) as u64, c))
        .collect();
    let per = pieces.len().div_ceil(threads).max(1);
    let mut groups: Vec<Vec<(u64, &mut [u8])>> = Vec::new();
    let mut it = pieces.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(per).collect());
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    g.into_iter()
                        .try_for_each(|(o, c)| file.read_exact_at(c, o))
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a read thread panicked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// A checkpoint of two tensors in a fresh directory.
    fn checkpoint(tag: &str, seed: i64) -> (PathBuf, Checkpoint) {
        let dir = std::env::temp_dir().join(format!("lo-cache-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        tch::manual_seed(seed);
        let named = vec![
            (
                "a".to_string(),
                Tensor::randn([64, 64], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16),
            ),
            (
                "b".to_string(),
                Tensor::randn([300], (Kind::Float, Device::Cpu)),
            ),
        ];
        let path = dir.join("w.safetensors");
        Tensor::write_safetensors(&named, &path).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        (dir, ckpt)
    }

    fn blocks() -> Vec<Vec<u8>> {
        (0..3u8)
            .map(|k| {
                (0..5000 + 3000 * k as usize)
                    .map(|i| (i % 7) as u8 ^ k)
                    .collect()
            })
            .collect()
    }

    /// Raw bytes per segment: every test block is 2 or 3 segments.
    const SEG: usize = 4096;

    fn write(path: &Path, ckpt: &Checkpoint, keys: &[String]) -> Result<EncodedCache> {
        let raw = blocks();
        EncodedCache::write(path, ckpt, keys, (SEG, false), |i| {
            let enc = layerwise_offload_codec::encode_segmented(&raw[i], SEG).unwrap();
            Ok((enc, raw[i].len()))
        })
    }

    #[test]
    fn written_encodings_read_back_and_page_aligned() -> Result<()> {
        let (dir, ckpt) = checkpoint("round", 1);
        let path = default_path(&ckpt);
        assert_eq!(path, dir.join("w.safetensors.encoded"));
        let keys: Vec<String> = (0..3).map(|i| block_key(i, [format!("t{i}")])).collect();
        write(&path, &ckpt, &keys)?;
        let cache = EncodedCache::open(&path, &ckpt, &keys, (SEG, false), true)?.expect("written");
        for (i, raw) in blocks().iter().enumerate() {
            let b = cache.block(i);
            assert_eq!(b.offset % FILE_ALIGN, 0);
            assert_eq!(b.raw, raw.len());
            let mut enc = vec![0u8; b.len];
            cache.read_block(i, &mut enc, false)?;
            let mut out = vec![0u8; raw.len()];
            layerwise_offload_codec::decode_segmented(&enc, &mut out, 1).unwrap();
            assert_eq!(&out, raw, "block {i}");
        }
        // Other keys: refused; no file: None.
        let other: Vec<String> = (0..3)
            .map(|i| block_key(i + 1, [format!("t{i}")]))
            .collect();
        assert!(matches!(
            EncodedCache::open(&path, &ckpt, &other, (SEG, false), false),
            Err(Error::EncodedCache { .. })
        ));
        assert!(
            EncodedCache::open(&dir.join("none"), &ckpt, &keys, (SEG, false), false)?.is_none()
        );
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(())
    }

    #[test]
    fn every_byte_of_the_header_and_trailer_is_checked() -> Result<()> {
        let (dir, ckpt) = checkpoint("flip", 2);
        let path = dir.join("c.encoded");
        let keys: Vec<String> = (0..3).map(|i| block_key(i, [])).collect();
        write(&path, &ckpt, &keys)?;
        let good = std::fs::read(&path).unwrap();
        let data = EncodedCache::open(&path, &ckpt, &keys, (SEG, false), false)?
            .expect("written")
            .data_len();
        // Every byte past the encodings (padding excluded): the header and the trailer.
        let header_at = data.div_ceil(FILE_ALIGN) * FILE_ALIGN;
        for at in header_at..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x04;
            std::fs::write(&path, &bad).unwrap();
            match EncodedCache::open(&path, &ckpt, &keys, (SEG, false), true) {
                Err(Error::EncodedCache { .. }) => {}
                r => panic!("byte {at} changed: {:?}", r.map(|c| c.is_some())),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(())
    }

    /// Rewrites the cache at `path` with header `doc` (hash and trailer made to match).
    fn rewrite_header(path: &Path, doc: &serde_json::Value) {
        let mut bytes = std::fs::read(path).unwrap();
        let n = bytes.len();
        let at = u64::from_le_bytes(bytes[n - 24..n - 16].try_into().unwrap()) as usize;
        let text = serde_json::to_vec(doc).unwrap();
        bytes.truncate(at);
        bytes.extend_from_slice(&text);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(at as u64).to_le_bytes());
        bytes.extend_from_slice(&(text.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&fnv64(&text).to_le_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    fn header(path: &Path) -> serde_json::Value {
        let bytes = std::fs::read(path).unwrap();
        let n = bytes.len();
        let at = u64::from_le_bytes(bytes[n - 24..n - 16].try_into().unwrap()) as usize;
        let len = u64::from_le_bytes(bytes[n - 16..n - 8].try_into().unwrap()) as usize;
        serde_json::from_slice(&bytes[at..at + len]).unwrap()
    }

    /// A cache of other segments, or of the version before segments (whole encodings, no
    /// segment size), is refused as stale with `Error::EncodedCache`, never read.
    #[test]
    fn caches_of_other_segments_or_whole_encodings_are_refused() -> Result<()> {
        let (dir, ckpt) = checkpoint("segments", 3);
        let path = dir.join("c.encoded");
        let keys: Vec<String> = (0..3).map(|i| block_key(i, [])).collect();
        write(&path, &ckpt, &keys)?;
        assert!(EncodedCache::open(&path, &ckpt, &keys, (SEG, false), true)?.is_some());
        match EncodedCache::open(&path, &ckpt, &keys, (2 * SEG, false), false) {
            Err(Error::EncodedCache { reason, .. }) => {
                assert!(reason.contains("is stale"), "{reason}");
                assert!(
                    reason.contains(&format!("segments of {SEG} raw bytes")),
                    "{reason}"
                );
            }
            r => panic!("another segment size: {:?}", r.map(|c| c.is_some())),
        }
        // Written with one tier of codes, asked for with two.
        match EncodedCache::open(&path, &ckpt, &keys, (SEG, true), false) {
            Err(Error::EncodedCache { reason, .. }) => {
                assert!(reason.contains("is stale"), "{reason}");
                assert!(
                    reason.contains("made with one tier of codes, this manager asks for two tiers")
                        && reason.contains("compress_two_tier"),
                    "{reason}"
                );
            }
            r => panic!("another tier setting: {:?}", r.map(|c| c.is_some())),
        }
        // A version 1 cache: whole encodings at the same places, no segment size.
        let raw = blocks();
        let mut doc = header(&path);
        doc["version"] = 1.into();
        doc.as_object_mut().unwrap().remove("segment_bytes");
        let mut bytes = std::fs::read(&path).unwrap();
        for (i, b) in doc["blocks"].as_array_mut().unwrap().iter_mut().enumerate() {
            b.as_object_mut().unwrap().remove("largest_segment");
            let whole = layerwise_offload_codec::encode(&raw[i]);
            let at = b["offset"].as_u64().unwrap() as usize;
            bytes[at..at + whole.len()].copy_from_slice(&whole);
            b["bytes"] = whole.len().into();
        }
        std::fs::write(&path, bytes).unwrap();
        rewrite_header(&path, &doc);
        match EncodedCache::open(&path, &ckpt, &keys, (SEG, false), true) {
            Err(Error::EncodedCache { reason, .. }) => {
                assert!(reason.contains("version 1"), "{reason}");
            }
            r => panic!("a version 1 cache: {:?}", r.map(|c| c.is_some())),
        }
        // Whole encodings under a version 2 header: each block refused when checked.
        doc["version"] = VERSION.into();
        doc["segment_bytes"] = SEG.into();
        for b in doc["blocks"].as_array_mut().unwrap() {
            b["largest_segment"] = b["bytes"].clone();
        }
        rewrite_header(&path, &doc);
        match EncodedCache::open(&path, &ckpt, &keys, (SEG, false), true) {
            Err(Error::EncodedCache { reason, .. }) => {
                assert!(reason.contains("block 0's encoding is corrupt"), "{reason}");
            }
            r => panic!("whole encodings: {:?}", r.map(|c| c.is_some())),
        }
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(())
    }

    /// A cache written with an earlier codec format version (the header says so, its hash and
    /// trailer consistent) is refused with `EncodedCache`, saying which version and to delete
    /// the file, before any encoding is read.
    #[test]
    fn a_cache_of_another_codec_version_is_refused() -> Result<()> {
        let (dir, ckpt) = checkpoint("codec-version", 3);
        let path = dir.join("c.encoded");
        let keys: Vec<String> = (0..3).map(|i| block_key(i, [])).collect();
        write(&path, &ckpt, &keys)?;
        let good = std::fs::read(&path).unwrap();
        let trailer = good.len() - TRAILER;
        let at = u64::from_le_bytes(good[trailer + 8..trailer + 16].try_into().unwrap()) as usize;
        let len = u64::from_le_bytes(good[trailer + 16..trailer + 24].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&good[at..at + len]).unwrap();
        let current = format!(
            "\"codec_version\":{}",
            layerwise_offload_codec::format::VERSION
        );
        assert!(header.contains(&current), "{header}");
        let old = layerwise_offload_codec::format::VERSION - 1;
        let header = header.replace(&current, &format!("\"codec_version\":{old}"));
        let mut bad = good[..at].to_vec();
        bad.extend_from_slice(header.as_bytes());
        bad.extend_from_slice(MAGIC);
        bad.extend_from_slice(&(at as u64).to_le_bytes());
        bad.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bad.extend_from_slice(&fnv64(header.as_bytes()).to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        match EncodedCache::open(&path, &ckpt, &keys, (SEG, false), true) {
            Err(e @ Error::EncodedCache { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("codec format version {old}")),
                    "{msg}"
                );
                assert!(msg.contains("delete the file"), "{msg}");
            }
            r => panic!(
                "an old codec version was accepted: {:?}",
                r.map(|c| c.is_some())
            ),
        }
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(())
    }

    #[test]
    fn fnv64_is_the_published_function() {
        // The FNV-1a test vectors: the hash must not change between builds.
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
