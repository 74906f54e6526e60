//! The byte layout of an encoding, its parser and its writer.
//!
//! # Layout, version 3
//!
//! All integers are little-endian. "pad16(x)" is x rounded up to a multiple of 16. A bf16 value
//! is the 16-bit word `lo | hi << 8` of two input bytes; its sign is bit 15, its exponent bits
//! 14..7 and its mantissa bits 6..0.
//!
//! ```text
//! offset  size        field
//! 0       4           magic "LWBC"
//! 4       2           version = 3
//! 6       1           tail_len: 0, or 1 when the input had an odd byte count
//! 7       1           tail_byte: the input's last byte when tail_len = 1, else 0
//! 8       4           chunk_values: values per chunk, a multiple of 256 in 256..=4194304
//! 12      4           n_chunks = ceil(n_values / chunk_values)
//! 16      8           n_values: bf16 values (the input's byte count / 2, rounded down)
//! 24      8           encoded_len: bytes of the whole encoding, this header included
//! 32      4           checksum: CRC-32 (IEEE) of every byte of the encoding but these four
//! 36      12          reserved, 0
//! 48      16*n_chunks directory: one entry per chunk
//! ...                 chunk data, chunk i at its entry's offset
//! ```
//!
//! A directory entry (16 bytes):
//!
//! ```text
//! 0   8   offset of the chunk's data from the start of the encoding (a multiple of 16)
//! 8   4   n_exceptions: values with the (first-tier) escape code (0 for a raw chunk)
//! 12  1   mode: 0 raw, 1 coded, 2 two-tier
//! 13  1   k: code bits, 1..=7 for a coded chunk, 1..=4 (k1) for a two-tier one, 0 for a raw one
//! 14  1   k2: second-tier code bits, 1..=5 for a two-tier chunk, else 0
//! 15  1   reserved, 0
//! ```
//!
//! Chunk i holds values `i*chunk_values ..` up to `chunk_values` of them (the last one may hold
//! fewer); call that count n. Its data starts at its offset, and chunks follow one another with
//! no gap: chunk 0 starts right after the directory (48 + 16*n_chunks, a multiple of 16), each
//! next chunk at the previous one's offset plus its size, and `encoded_len` is where the last
//! chunk ends. The offsets are therefore redundant; they are stored so that a GPU block finds
//! its chunk with one load, and the parser checks that they are what the sizes say.
//!
//! A **raw** chunk is the n values' 2n input bytes, then zeros up to pad16(2n).
//!
//! A **coded** chunk with k code bits and e exceptions, t = 2^k - 1 and g = ceil(n / 32) groups,
//! is four sections, each starting at a multiple of 16 and padded with zeros:
//!
//! ```text
//! table       t bytes        pad16(t)        the exponents of codes 0..t-1
//! planes      4*g*k bytes    pad16(4*g*k)    group j's bit plane b is the u32 at 4*(j*k + b);
//!                                            its bit l is bit b of the code of value 32*j + l
//! sign_mant   n bytes        pad16(n)        per value: sign << 7 | mantissa
//! exceptions  e bytes        pad16(e)        the exponents of the escaped values, in value order
//! ```
//!
//! A value's code c < t stands for exponent `table[c]`; c = t is the escape: the exponent is the
//! next unused byte of `exceptions`. The number of escape codes among the chunk's n values is e
//! exactly. Bits of a group's planes past value n-1 are 0 and ignored.
//!
//! A **two-tier** chunk with k1 first-tier and k2 second-tier code bits, e1 = n_exceptions
//! first-tier escapes and e2 second-tier escapes, t1 = 2^k1 - 1, t2 = 2^k2 - 1:
//!
//! ```text
//! tables      4 + t1 + t2 bytes     pad16(4 + t1 + t2)  e2 (u32), then the exponents of the
//!                                                       first-tier codes 0..t1-1, then those of
//!                                                       the second-tier codes 0..t2-1
//! planes      4*g*k1 bytes          pad16(4*g*k1)       as in a coded chunk, k = k1
//! sign_mant   n bytes               pad16(n)            as in a coded chunk
//! tier2       ceil(e1*k2/8) bytes   pad16(...)          one k2-bit code per first-tier escape,
//!                                                       in value order: code j is bits
//!                                                       j*k2 .. j*k2+k2-1 of the section read as
//!                                                       one little-endian integer (bit i is bit
//!                                                       i % 8 of byte i / 8); unused bits 0
//! exceptions  e2 bytes              pad16(e2)           the exponents of the values whose
//!                                                       second-tier code escapes, in value order
//! ```
//!
//! A value's first-tier code c < t1 stands for `table1[c]`; c = t1 sends it to the second tier:
//! its second-tier code is the next unused one of `tier2`, d < t2 standing for `table2[d]`, and
//! d = t2 is the escape: the exponent is the next unused byte of `exceptions`. The first-tier
//! escapes number e1 exactly, the second-tier ones e2 <= e1 exactly.
//!
//! The checksum covers the header (but its own four bytes), the directory and every chunk with
//! its padding, so any change to the bytes after they were written is found by [`verify`](crate::verify)
//! without decoding (CRC-32 finds every error burst of up to 32 bits, so every single-byte
//! change). The CPU decoder verifies before it decodes. The GPU decoder does not: it reads the
//! encoding from device memory and checks only its structure, so bytes that come from outside
//! the process (a file, another process's memory) are verified on the host before they are
//! uploaded. Versions 1 (a 32-byte header without checksum) and 2 (the same layout without
//! two-tier chunks, whose directory entry had 2 reserved bytes where k2 is now) are refused by
//! their version number: they are encoded again, never read.
//!
//! Why this layout: every value's exponent code sits at the same bit of k words, so a GPU
//! thread decodes 8 values with k word loads and shifts, and a warp's loads and stores are
//! contiguous; the exceptions need no positions (an escape takes 8 bits, not 24), at the cost of
//! one prefix sum of escape counts per block on the GPU; sign and mantissa, which are nearly
//! incompressible, are copied. The second tier gives the next most frequent exponents short
//! fixed-width codes too (k1 = 2, k2 = 3 on Gaussian weights: 3 exponents in 2 bits, the next 7
//! in 2 + 3 bits, the rest in 2 + 3 + 8), still without positions: a first-tier escape's index
//! among the first-tier escapes, which the GPU finds with the same prefix sum, is its
//! second-tier code's index; a second count and prefix sum, over the first-tier escapes only,
//! gives each second-tier escape its exception index. See the crate's README for the
//! measurements behind the choices.

use crate::error::{CodecError, Result};
use std::ops::Range;

/// The format's magic, the encoding's first four bytes.
pub const MAGIC: [u8; 4] = *b"LWBC";
/// The format version this build writes and reads.
pub const VERSION: u16 = 3;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Where the checksum sits in the header (4 bytes, little-endian).
pub const CHECKSUM_AT: usize = 32;
/// Bytes of one directory entry.
pub const ENTRY_LEN: usize = 16;
/// Alignment of every chunk and section, in bytes.
pub const ALIGN: usize = 16;
/// Values whose codes share one set of bit-plane words.
pub const GROUP: usize = 32;
/// The smallest `chunk_values`; every `chunk_values` is a multiple of it.
pub const MIN_CHUNK_VALUES: u32 = 256;
/// The largest `chunk_values`.
pub const MAX_CHUNK_VALUES: u32 = 1 << 22;
/// The largest number of code bits of a coded chunk.
pub const MAX_CODE_BITS: u8 = 7;
/// The largest number of first-tier code bits k1 of a two-tier chunk.
pub const MAX_TIER1_BITS: u8 = 4;
/// The largest number of second-tier code bits k2 of a two-tier chunk.
pub const MAX_TIER2_BITS: u8 = 5;
/// Bytes before a two-tier chunk's tables: its second-tier escape count (u32).
pub const TIER2_COUNT_LEN: usize = 4;

/// `x` rounded up to a multiple of [`ALIGN`]. Callers keep `x` far below `usize::MAX`.
pub(crate) const fn pad16(x: usize) -> usize {
    (x + (ALIGN - 1)) & !(ALIGN - 1)
}

/// The fixed header of an encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    chunk_values: u32,
    n_chunks: u32,
    n_values: u64,
    encoded_len: u64,
    tail: Option<u8>,
}

impl Header {
    /// A header for `n_values` values in chunks of `chunk_values` (already validated), with an
    /// odd trailing byte if any. `encoded_len` is filled in once the chunks are sized.
    pub(crate) fn new(chunk_values: u32, n_values: u64, tail: Option<u8>) -> Self {
        let n_chunks = n_values.div_ceil(u64::from(chunk_values));
        Header {
            chunk_values,
            n_chunks: u32::try_from(n_chunks).expect("chunk count checked by the encoder"),
            n_values,
            encoded_len: 0,
            tail,
        }
    }

    pub(crate) fn with_encoded_len(mut self, encoded_len: u64) -> Self {
        self.encoded_len = encoded_len;
        self
    }

    /// Reads and checks the header at the start of `bytes`: magic, version, field ranges and
    /// their consistency with each other and with `bytes.len()`. The directory is not read.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(CodecError::Truncated {
                what: "header",
                needed: HEADER_LEN as u64,
                len: bytes.len(),
            });
        };
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(CodecError::BadMagic {
                found: magic,
                expected: MAGIC,
            });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        if h[CHECKSUM_AT + 4..HEADER_LEN].iter().any(|&b| b != 0) {
            return Err(CodecError::CorruptHeader {
                field: "reserved",
                value: u64::from_le_bytes(h[40..48].try_into().expect("8 bytes")),
                reason: "header bytes 36..48 must be 0",
            });
        }
        let corrupt = |field, value: u64, reason| {
            Err(CodecError::CorruptHeader {
                field,
                value,
                reason,
            })
        };
        let tail = match (h[6], h[7]) {
            (0, 0) => None,
            (0, b) => return corrupt("tail_byte", u64::from(b), "must be 0 when tail_len is 0"),
            (1, b) => Some(b),
            (n, _) => return corrupt("tail_len", u64::from(n), "must be 0 or 1"),
        };
        let chunk_values = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if !(MIN_CHUNK_VALUES..=MAX_CHUNK_VALUES).contains(&chunk_values)
            || !chunk_values.is_multiple_of(MIN_CHUNK_VALUES)
        {
            return corrupt(
                "chunk_values",
                chunk_values.into(),
                "must be a multiple of 256 in 256..=4194304",
            );
        }
        let n_chunks = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let n_values = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        let encoded_len = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
        // The decoded length must fit a usize (and a u64 with room to spare).
        if n_values > (u64::MAX >> 2) || usize::try_from(n_values * 2 + 1).is_err() {
            return corrupt(
                "n_values",
                n_values,
                "decoded length does not fit in memory",
            );
        }
        if u64::from(n_chunks) != n_values.div_ceil(u64::from(chunk_values)) {
            return corrupt(
                "n_chunks",
                n_chunks.into(),
                "is not ceil(n_values / chunk_values)",
            );
        }
        if encoded_len != bytes.len() as u64 {
            return corrupt(
                "encoded_len",
                encoded_len,
                "differs from the buffer's length",
            );
        }
        Ok(Header {
            chunk_values,
            n_chunks,
            n_values,
            encoded_len,
            tail,
        })
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`, with a zero checksum
    /// (the writer seals the encoding once every byte is written).
    pub(crate) fn write(&self, out: &mut [u8]) {
        let h = &mut out[..HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6] = u8::from(self.tail.is_some());
        h[7] = self.tail.unwrap_or(0);
        h[8..12].copy_from_slice(&self.chunk_values.to_le_bytes());
        h[12..16].copy_from_slice(&self.n_chunks.to_le_bytes());
        h[16..24].copy_from_slice(&self.n_values.to_le_bytes());
        h[24..32].copy_from_slice(&self.encoded_len.to_le_bytes());
        h[CHECKSUM_AT..HEADER_LEN].fill(0);
    }

    /// Values per chunk (the last chunk may have fewer).
    pub fn chunk_values(&self) -> u32 {
        self.chunk_values
    }

    /// Number of chunks.
    pub fn n_chunks(&self) -> u32 {
        self.n_chunks
    }

    /// Number of bf16 values.
    pub fn n_values(&self) -> u64 {
        self.n_values
    }

    /// The input's odd trailing byte, if its length was odd.
    pub fn tail(&self) -> Option<u8> {
        self.tail
    }

    /// Bytes of the whole encoding.
    pub fn encoded_len(&self) -> u64 {
        self.encoded_len
    }

    /// Bytes the encoding decodes to (the input's length).
    pub fn decoded_len(&self) -> u64 {
        self.n_values * 2 + u64::from(self.tail.is_some())
    }

    /// Where the chunk data starts: right after the directory.
    pub fn data_offset(&self) -> u64 {
        HEADER_LEN as u64 + ENTRY_LEN as u64 * u64::from(self.n_chunks)
    }

    /// Values in chunk `i`, or `None` when there is no chunk `i` (`i >= n_chunks`).
    pub fn chunk_len(&self, i: u32) -> Option<usize> {
        (i < self.n_chunks).then(|| self.len_of(i))
    }

    /// Values in chunk `i < n_chunks` (then `i * chunk_values < n_values`: no underflow, and
    /// the count is at most `chunk_values`).
    fn len_of(&self, i: u32) -> usize {
        debug_assert!(i < self.n_chunks);
        let start = u64::from(i) * u64::from(self.chunk_values);
        self.n_values
            .saturating_sub(start)
            .min(u64::from(self.chunk_values)) as usize
    }
}

/// How a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkMode {
    /// The values' bytes as they are.
    Raw,
    /// Exponents as `k`-bit codes, `exceptions` of them escaped.
    Coded {
        /// Code bits, 1..=[`MAX_CODE_BITS`].
        k: u8,
        /// Escaped values.
        exceptions: u32,
    },
    /// Exponents as `k1`-bit codes, `tier1_escapes` of them escaped to `k2`-bit second-tier
    /// codes, `exceptions` of those escaped again to raw exponent bytes.
    TwoTier {
        /// First-tier code bits, 1..=[`MAX_TIER1_BITS`].
        k1: u8,
        /// Second-tier code bits, 1..=[`MAX_TIER2_BITS`].
        k2: u8,
        /// Values with the first-tier escape code (one second-tier code each).
        tier1_escapes: u32,
        /// Values with the second-tier escape code (one exponent byte each), at most
        /// `tier1_escapes`.
        exceptions: u32,
    },
}

impl ChunkMode {
    /// Bytes of a chunk of `n` values stored so (padding included).
    pub fn size(self, n: usize) -> usize {
        match self {
            ChunkMode::Raw => pad16(2 * n),
            ChunkMode::Coded { k, exceptions } => CodedLayout::new(k, n, exceptions as usize).size,
            ChunkMode::TwoTier {
                k1,
                k2,
                tier1_escapes,
                exceptions,
            } => TwoTierLayout::new(k1, k2, n, tier1_escapes as usize, exceptions as usize).size,
        }
    }
}

/// Where the sections of a coded chunk lie, relative to the chunk's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CodedLayout {
    pub table: Range<usize>,
    pub planes: Range<usize>,
    pub sign_mant: Range<usize>,
    pub exceptions: Range<usize>,
    pub size: usize,
}

impl CodedLayout {
    /// The layout of a chunk of `n <= MAX_CHUNK_VALUES` values, `k <= MAX_CODE_BITS` code bits
    /// and `e <= n` exceptions (no overflow for these ranges).
    pub fn new(k: u8, n: usize, e: usize) -> Self {
        let t = (1usize << k) - 1;
        let table = 0..t;
        let p0 = pad16(t);
        let planes = p0..p0 + 4 * n.div_ceil(GROUP) * usize::from(k);
        let s0 = pad16(planes.end);
        let sign_mant = s0..s0 + n;
        let e0 = pad16(sign_mant.end);
        let exceptions = e0..e0 + e;
        let size = pad16(exceptions.end);
        CodedLayout {
            table,
            planes,
            sign_mant,
            exceptions,
            size,
        }
    }
}

/// Where the sections of a two-tier chunk lie, relative to the chunk's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TwoTierLayout {
    /// The second-tier escape count (u32).
    pub count: Range<usize>,
    pub table1: Range<usize>,
    pub table2: Range<usize>,
    pub planes: Range<usize>,
    pub sign_mant: Range<usize>,
    pub tier2: Range<usize>,
    pub exceptions: Range<usize>,
    pub size: usize,
}

impl TwoTierLayout {
    /// The layout of a chunk of `n <= MAX_CHUNK_VALUES` values, `k1 <= MAX_TIER1_BITS` and
    /// `k2 <= MAX_TIER2_BITS` code bits, `e1 <= n` first-tier and `e2 <= e1` second-tier
    /// escapes (no overflow for these ranges).
    pub fn new(k1: u8, k2: u8, n: usize, e1: usize, e2: usize) -> Self {
        let (t1, t2) = ((1usize << k1) - 1, (1usize << k2) - 1);
        let count = 0..TIER2_COUNT_LEN;
        let table1 = count.end..count.end + t1;
        let table2 = table1.end..table1.end + t2;
        let p0 = pad16(table2.end);
        let planes = p0..p0 + 4 * n.div_ceil(GROUP) * usize::from(k1);
        let s0 = pad16(planes.end);
        let sign_mant = s0..s0 + n;
        let c0 = pad16(sign_mant.end);
        let tier2 = c0..c0 + (e1 * usize::from(k2)).div_ceil(8);
        let e0 = pad16(tier2.end);
        let exceptions = e0..e0 + e2;
        let size = pad16(exceptions.end);
        TwoTierLayout {
            count,
            table1,
            table2,
            planes,
            sign_mant,
            tier2,
            exceptions,
            size,
        }
    }
}

/// One directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub offset: u64,
    pub mode: ChunkMode,
}

impl Entry {
    pub fn write(&self, out: &mut [u8]) {
        let (exceptions, mode, k, k2) = match self.mode {
            ChunkMode::Raw => (0, 0, 0, 0),
            ChunkMode::Coded { k, exceptions } => (exceptions, 1, k, 0),
            ChunkMode::TwoTier {
                k1,
                k2,
                tier1_escapes,
                ..
            } => (tier1_escapes, 2, k1, k2),
        };
        let e = &mut out[..ENTRY_LEN];
        e[0..8].copy_from_slice(&self.offset.to_le_bytes());
        e[8..12].copy_from_slice(&exceptions.to_le_bytes());
        e[12] = mode;
        e[13] = k;
        e[14] = k2;
        e[15] = 0;
    }

    /// Reads entry `chunk` (of `n` values) from its 16 bytes and checks its fields; a two-tier
    /// chunk's second-tier escape count, which lies in its data, is read by `tier2_count` from
    /// `bytes` (the whole encoding) once the offset is known to be in bounds.
    fn parse(
        e: &[u8; ENTRY_LEN],
        chunk: u32,
        n: usize,
        tier2_count: impl FnOnce(u64) -> Result<u32>,
    ) -> Result<Entry> {
        let corrupt = |reason: String| CodecError::CorruptChunk {
            chunk: chunk.into(),
            reason,
        };
        let offset = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
        let exceptions = u32::from_le_bytes(e[8..12].try_into().expect("4 bytes"));
        if e[15] != 0 {
            return Err(corrupt("reserved entry byte is not 0".into()));
        }
        let mode = match (e[12], e[13], e[14]) {
            (0, 0, 0) if exceptions == 0 => ChunkMode::Raw,
            (0, _, _) => {
                return Err(corrupt("a raw chunk with code bits or exceptions".into()));
            }
            (1, _, k2 @ 1..) => {
                return Err(corrupt(format!(
                    "second-tier code bits {k2} in a one-tier chunk"
                )));
            }
            (1, k @ 1..=MAX_CODE_BITS, 0) if exceptions as usize <= n => {
                ChunkMode::Coded { k, exceptions }
            }
            (1, k @ 1..=MAX_CODE_BITS, 0) => {
                return Err(corrupt(format!(
                    "{exceptions} exceptions in a chunk of {n} values (k = {k})"
                )));
            }
            (1, k, _) => {
                return Err(corrupt(format!(
                    "code bits {k} outside 1..={MAX_CODE_BITS}"
                )));
            }
            (2, k1 @ 1..=MAX_TIER1_BITS, k2 @ 1..=MAX_TIER2_BITS) => {
                if exceptions as usize > n {
                    return Err(corrupt(format!(
                        "{exceptions} first-tier escapes in a chunk of {n} values"
                    )));
                }
                let e2 = tier2_count(offset)?;
                if e2 > exceptions {
                    return Err(corrupt(format!(
                        "{e2} second-tier escapes among {exceptions} first-tier ones"
                    )));
                }
                ChunkMode::TwoTier {
                    k1,
                    k2,
                    tier1_escapes: exceptions,
                    exceptions: e2,
                }
            }
            (2, k1, k2) => {
                return Err(corrupt(format!(
                    "two-tier code bits ({k1}, {k2}) outside 1..={MAX_TIER1_BITS} and 1..={MAX_TIER2_BITS}"
                )));
            }
            (m, _, _) => return Err(corrupt(format!("unknown mode {m}"))),
        };
        Ok(Entry { offset, mode })
    }
}

/// A parsed and fully checked encoding: its header and every directory entry are consistent
/// with each other and with the buffer, so each chunk's sections lie inside the buffer.
#[derive(Clone, Debug)]
pub struct Encoded<'a> {
    bytes: &'a [u8],
    header: Header,
}

/// One chunk of a checked encoding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk<'a> {
    /// Its index.
    pub index: u32,
    pub data: ChunkData<'a>,
}

/// A chunk's sections.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ChunkData<'a> {
    Raw(&'a [u8]),
    Coded {
        k: u8,
        table: &'a [u8],
        planes: &'a [u8],
        sign_mant: &'a [u8],
        exceptions: &'a [u8],
    },
    TwoTier {
        k1: u8,
        k2: u8,
        /// First-tier escapes (second-tier codes in `tier2`).
        tier1_escapes: usize,
        table1: &'a [u8],
        table2: &'a [u8],
        planes: &'a [u8],
        sign_mant: &'a [u8],
        tier2: &'a [u8],
        exceptions: &'a [u8],
    },
}

impl<'a> Encoded<'a> {
    /// Parses `bytes` and checks every field with checked arithmetic. Never panics and never
    /// reads past `bytes`: a truncated or corrupt buffer is an error. This checks the structure
    /// only; [`verify_with_threads`](Self::verify_with_threads) (or [`verify`](crate::verify))
    /// also checks that no byte changed since the encoding was written.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let header = Header::parse(bytes)?;
        let dir_end = header.data_offset();
        if dir_end > bytes.len() as u64 {
            return Err(CodecError::Truncated {
                what: "directory",
                needed: dir_end,
                len: bytes.len(),
            });
        }
        let encoded = Encoded { bytes, header };
        let mut expected = dir_end;
        for i in 0..header.n_chunks {
            let n = header.len_of(i);
            let entry = encoded.entry(i)?;
            if entry.offset != expected {
                return Err(CodecError::CorruptChunk {
                    chunk: i.into(),
                    reason: format!(
                        "offset {} where the previous chunks end at {expected}",
                        entry.offset
                    ),
                });
            }
            // No overflow: expected <= bytes.len() and a chunk is at most a few MiB.
            let end = expected + entry.mode.size(n) as u64;
            if end > bytes.len() as u64 {
                return Err(CodecError::Truncated {
                    what: "chunk data",
                    needed: end,
                    len: bytes.len(),
                });
            }
            expected = end;
        }
        if expected != bytes.len() as u64 {
            return Err(CodecError::CorruptHeader {
                field: "encoded_len",
                value: header.encoded_len,
                reason: "differs from where the last chunk ends",
            });
        }
        Ok(encoded)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Checks the stored checksum against the bytes, on `threads` threads (0: all available
    /// cores): [`CodecError::Checksum`] when any byte changed after the encoding was written.
    pub fn verify_with_threads(&self, threads: usize) -> Result<()> {
        let stored = stored_checksum(self.bytes);
        let computed = checksum_with_threads(self.bytes, threads);
        if stored == computed {
            Ok(())
        } else {
            Err(CodecError::Checksum { stored, computed })
        }
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Bytes the encoding decodes to.
    pub fn decoded_len(&self) -> usize {
        // Fits: Header::parse checked that n_values * 2 + 1 fits a usize.
        self.header.decoded_len() as usize
    }

    /// Entry `i`, read from the directory (which `parse` found inside the buffer).
    fn entry(&self, i: u32) -> Result<Entry> {
        let at = HEADER_LEN + ENTRY_LEN * i as usize;
        let e = self.bytes[at..at + ENTRY_LEN].try_into().expect("16 bytes");
        let bytes = self.bytes;
        Entry::parse(e, i, self.header.len_of(i), |offset| {
            let count = usize::try_from(offset)
                .ok()
                .and_then(|o| Some(o..o.checked_add(TIER2_COUNT_LEN)?))
                .and_then(|r| bytes.get(r));
            match count {
                Some(c) => Ok(u32::from_le_bytes(c.try_into().expect("4 bytes"))),
                None => Err(CodecError::Truncated {
                    what: "two-tier chunk's escape count",
                    needed: offset.saturating_add(TIER2_COUNT_LEN as u64),
                    len: bytes.len(),
                }),
            }
        })
    }

    /// Chunk `i < n_chunks`, its sections sliced out of the checked buffer.
    pub(crate) fn chunk(&self, i: u32) -> Chunk<'a> {
        let n = self.header.len_of(i);
        let entry = self.entry(i).expect("entries checked by parse");
        let start = entry.offset as usize;
        let data = match entry.mode {
            ChunkMode::Raw => ChunkData::Raw(&self.bytes[start..start + 2 * n]),
            ChunkMode::Coded { k, exceptions } => {
                let l = CodedLayout::new(k, n, exceptions as usize);
                let at = |r: Range<usize>| &self.bytes[start + r.start..start + r.end];
                ChunkData::Coded {
                    k,
                    table: at(l.table),
                    planes: at(l.planes),
                    sign_mant: at(l.sign_mant),
                    exceptions: at(l.exceptions),
                }
            }
            ChunkMode::TwoTier {
                k1,
                k2,
                tier1_escapes,
                exceptions,
            } => {
                let e1 = tier1_escapes as usize;
                let l = TwoTierLayout::new(k1, k2, n, e1, exceptions as usize);
                let at = |r: Range<usize>| &self.bytes[start + r.start..start + r.end];
                ChunkData::TwoTier {
                    k1,
                    k2,
                    tier1_escapes: e1,
                    table1: at(l.table1),
                    table2: at(l.table2),
                    planes: at(l.planes),
                    sign_mant: at(l.sign_mant),
                    tier2: at(l.tier2),
                    exceptions: at(l.exceptions),
                }
            }
        };
        Chunk { index: i, data }
    }

    /// Sizes and chunk modes of the encoding.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            raw_bytes: self.header.decoded_len(),
            encoded_bytes: self.header.encoded_len,
            chunks: self.header.n_chunks.into(),
            raw_chunks: 0,
            coded_chunks: 0,
            exceptions: 0,
            chunks_by_code_bits: [0; MAX_CODE_BITS as usize + 1],
            two_tier_chunks: 0,
            tier1_escapes: 0,
            chunks_by_tier_bits: [[0; MAX_TIER2_BITS as usize + 1]; MAX_TIER1_BITS as usize + 1],
        };
        for i in 0..self.header.n_chunks {
            match self.entry(i).expect("entries checked by parse").mode {
                ChunkMode::Raw => stats.raw_chunks += 1,
                ChunkMode::Coded { k, exceptions } => {
                    stats.coded_chunks += 1;
                    stats.exceptions += u64::from(exceptions);
                    stats.chunks_by_code_bits[usize::from(k)] += 1;
                    stats.tier1_escapes += u64::from(exceptions);
                }
                ChunkMode::TwoTier {
                    k1,
                    k2,
                    tier1_escapes,
                    exceptions,
                } => {
                    stats.two_tier_chunks += 1;
                    stats.exceptions += u64::from(exceptions);
                    stats.tier1_escapes += u64::from(tier1_escapes);
                    stats.chunks_by_tier_bits[usize::from(k1)][usize::from(k2)] += 1;
                }
            }
        }
        stats
    }
}

/// Sizes and chunk modes of an encoding ([`stats`](crate::stats)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Bytes the encoding decodes to.
    pub raw_bytes: u64,
    /// Bytes of the encoding.
    pub encoded_bytes: u64,
    /// Chunks.
    pub chunks: u64,
    /// Chunks stored raw (coding did not pay).
    pub raw_chunks: u64,
    /// Chunks stored coded with one tier of codes.
    pub coded_chunks: u64,
    /// Values whose exponent is stored as a raw byte (the escapes of one-tier chunks, the
    /// second-tier escapes of two-tier ones).
    pub exceptions: u64,
    /// Coded chunks by code bits k (index k; index 0 is unused).
    pub chunks_by_code_bits: [u64; MAX_CODE_BITS as usize + 1],
    /// Chunks stored with two tiers of codes.
    pub two_tier_chunks: u64,
    /// Values with a (first-tier) escape code, in one-tier and two-tier chunks.
    pub tier1_escapes: u64,
    /// Two-tier chunks by code bits: index `[k1][k2]` (index 0 unused).
    pub chunks_by_tier_bits: [[u64; MAX_TIER2_BITS as usize + 1]; MAX_TIER1_BITS as usize + 1],
}

impl Stats {
    /// Encoded bytes / raw bytes (1 for an empty input).
    pub fn ratio(&self) -> f64 {
        if self.raw_bytes == 0 {
            1.0
        } else {
            self.encoded_bytes as f64 / self.raw_bytes as f64
        }
    }
}

/// The largest encoding of `raw_len` input bytes in chunks of `chunk_values`: the input, the
/// header, a directory entry per chunk and the last chunk's padding. The encoder never exceeds
/// it, since it stores a chunk raw whenever coding would not make it smaller.
///
/// `None` when `chunk_values` is not one the encoder accepts (a multiple of 256 in
/// 256..=4194304) or the size does not fit a `usize`.
pub fn max_encoded_len(raw_len: usize, chunk_values: u32) -> Option<usize> {
    if !(MIN_CHUNK_VALUES..=MAX_CHUNK_VALUES).contains(&chunk_values)
        || !chunk_values.is_multiple_of(MIN_CHUNK_VALUES)
    {
        return None;
    }
    let n_values = raw_len / 2;
    let n_chunks = n_values.div_ceil(chunk_values as usize);
    let values = (2 * n_values).checked_add(ALIGN - 1)? & !(ALIGN - 1);
    ENTRY_LEN
        .checked_mul(n_chunks)?
        .checked_add(HEADER_LEN)?
        .checked_add(values)
}

/// The checksum stored in the header of `bytes` (at least [`HEADER_LEN`] bytes).
fn stored_checksum(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(
        bytes[CHECKSUM_AT..CHECKSUM_AT + 4]
            .try_into()
            .expect("4 bytes"),
    )
}

/// Bytes hashed per piece when the checksum is computed on several threads.
const CHECKSUM_PIECE: usize = 4 << 20;

/// The checksum of an encoding as the format defines it: CRC-32 (IEEE) of `bytes` without the
/// four checksum bytes of the header (`bytes` holds at least [`HEADER_LEN`] bytes). Pieces are
/// hashed on `threads` threads (0: all available cores) and combined.
pub(crate) fn checksum_with_threads(bytes: &[u8], threads: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..CHECKSUM_AT]);
    h.update(&bytes[CHECKSUM_AT + 4..HEADER_LEN]);
    let body = &bytes[HEADER_LEN..];
    let pieces: Vec<&[u8]> = body.chunks(CHECKSUM_PIECE).collect();
    let threads = crate::parallel::threads(threads, pieces.len());
    if threads <= 1 {
        h.update(body);
        return h.finalize();
    }
    let ranges = crate::parallel::split(pieces.len(), threads);
    let parts = crate::parallel::map_each(ranges, |range| {
        let mut p = crc32fast::Hasher::new();
        for piece in &pieces[range] {
            p.update(piece);
        }
        p
    });
    for p in parts {
        h.combine(&p);
    }
    h.finalize()
}

/// Writes the checksum of `bytes` (a complete encoding) into its header.
pub(crate) fn seal(bytes: &mut [u8], threads: usize) {
    let c = checksum_with_threads(bytes, threads);
    bytes[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&c.to_le_bytes());
}
