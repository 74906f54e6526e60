//! The CPU reference decoder: parses and checks the whole encoding first, then decodes chunks in
//! parallel, each into its own part of the output.

use crate::error::{CodecError, Result};
use crate::format::{Chunk, ChunkData, Encoded, GROUP, Stats};
use crate::parallel;

/// Bytes `encoded` decodes to. Checks the whole header and directory.
pub fn decoded_len(encoded: &[u8]) -> Result<usize> {
    Ok(Encoded::parse(encoded)?.decoded_len())
}

/// Sizes and chunk modes of `encoded`. Checks the whole header and directory.
pub fn stats(encoded: &[u8]) -> Result<Stats> {
    Ok(Encoded::parse(encoded)?.stats())
}

/// Checks that `encoded` is a well-formed encoding whose bytes are those its encoder wrote
/// (header, directory and the checksum of every byte), on all available cores, without
/// decoding it. Call it on bytes that crossed a process or file boundary before they are handed
/// to the GPU decoder, which checks the structure only.
pub fn verify(encoded: &[u8]) -> Result<()> {
    Encoded::parse(encoded)?.verify_with_threads(0)
}

/// Decodes `encoded` into `out`, whose length must be [`decoded_len`], on all available cores.
///
/// The encoding is verified first (see [`verify`]): a truncated, corrupt or changed encoding is
/// an error, never a panic and never other bytes; `out` is then left as it was (or partly
/// written when the checksum matches but a chunk is inconsistent, which only an encoding
/// written with a wrong checksum on purpose can be).
pub fn decode(encoded: &[u8], out: &mut [u8]) -> Result<()> {
    decode_with_threads(encoded, out, 0)
}

/// [`decode`] on `threads` threads (0: all available cores; 1: the calling thread only).
pub fn decode_with_threads(encoded: &[u8], out: &mut [u8], threads: usize) -> Result<()> {
    let encoded = Encoded::parse(encoded)?;
    let header = *encoded.header();
    if out.len() != encoded.decoded_len() {
        return Err(CodecError::OutputLength {
            expected: header.decoded_len(),
            got: out.len() as u64,
        });
    }
    encoded.verify_with_threads(threads)?;
    let values_len = 2 * header.n_values() as usize;
    let (values, tail) = out.split_at_mut(values_len);
    if let Some(b) = header.tail() {
        tail[0] = b;
    }
    let n_chunks = header.n_chunks() as usize;
    let chunk_bytes = 2 * header.chunk_values() as usize;
    let threads = parallel::threads(threads, n_chunks);
    let mut parts = Vec::with_capacity(threads);
    let mut rest = values;
    for range in parallel::split(n_chunks, threads) {
        let len = (range.len() * chunk_bytes).min(rest.len());
        let (part, r) = rest.split_at_mut(len);
        rest = r;
        parts.push((range, part));
    }
    let results = parallel::map_each(parts, |(range, part)| {
        for (i, dst) in range.zip(part.chunks_mut(chunk_bytes)) {
            decode_chunk(encoded.chunk(i as u32), dst)?;
        }
        Ok(())
    });
    results.into_iter().collect()
}

/// Decodes one checked chunk into `out` (2n bytes).
fn decode_chunk(chunk: Chunk<'_>, out: &mut [u8]) -> Result<()> {
    match chunk.data {
        ChunkData::Raw(bytes) => {
            out.copy_from_slice(bytes);
            Ok(())
        }
        ChunkData::Coded {
            k,
            table,
            planes,
            sign_mant,
            exceptions,
        } => {
            let s = Sections {
                table,
                planes,
                sign_mant,
                exceptions,
            };
            let used = s.decode_k(k, out);
            check_used(chunk.index, used, exceptions.len(), "")
        }
        ChunkData::TwoTier {
            k1,
            k2,
            tier1_escapes,
            table1,
            table2,
            planes,
            sign_mant,
            tier2,
            exceptions,
        } => {
            // The first-tier escapes' exponents, in value order, from their second-tier codes;
            // then the chunk decodes as a one-tier chunk of k1 bits with these as exceptions.
            let escaped = match tier2_exponents(k2, tier1_escapes, table2, tier2, exceptions) {
                Some(escaped) => escaped,
                None => {
                    return Err(CodecError::CorruptChunk {
                        chunk: chunk.index.into(),
                        reason: format!(
                            "more second-tier escape codes than the {} exceptions stored",
                            exceptions.len()
                        ),
                    });
                }
            };
            let s = Sections {
                table: table1,
                planes,
                sign_mant,
                exceptions: &escaped.0,
            };
            check_used(
                chunk.index,
                Some(escaped.1),
                exceptions.len(),
                "second-tier ",
            )?;
            let used = s.decode_k(k1, out);
            check_used(chunk.index, used, tier1_escapes, "first-tier ")
        }
    }
}

/// Ok when the escape codes of a chunk used exactly the `stored` exceptions (`used`: `None`
/// when they outnumber them).
fn check_used(chunk: u32, used: Option<usize>, stored: usize, tier: &str) -> Result<()> {
    match used {
        Some(used) if used == stored => Ok(()),
        found => Err(CodecError::CorruptChunk {
            chunk: chunk.into(),
            reason: match found {
                Some(used) => format!("{used} {tier}escape codes, {stored} exceptions stored"),
                None => format!("more {tier}escape codes than the {stored} exceptions stored"),
            },
        }),
    }
}

/// The exponents of a two-tier chunk's `e1` first-tier escapes from their `k2`-bit codes in
/// `tier2` (a little-endian bitstream of at least `e1 * k2` bits) and the second-tier table
/// and exceptions, with the number of exceptions used; `None` when the second-tier escape codes
/// outnumber the exceptions.
fn tier2_exponents(
    k2: u8,
    e1: usize,
    table2: &[u8],
    tier2: &[u8],
    exceptions: &[u8],
) -> Option<(Vec<u8>, usize)> {
    let k2 = usize::from(k2);
    let escape = (1usize << k2) - 1;
    let mut out = Vec::with_capacity(e1);
    let mut x = 0;
    for j in 0..e1 {
        // Code j: bits j*k2 .. j*k2 + k2 - 1, at most two bytes since k2 <= 5 < 8.
        let bit = j * k2;
        let lo = usize::from(tier2[bit / 8]);
        let hi = tier2.get(bit / 8 + 1).map_or(0, |&b| usize::from(b));
        let d = ((lo | hi << 8) >> (bit % 8)) & escape;
        if d == escape {
            out.push(*exceptions.get(x)?);
            x += 1;
        } else {
            out.push(table2[d]);
        }
    }
    Some((out, x))
}

/// The input sections of one coded chunk (lengths checked by the parser).
struct Sections<'a> {
    table: &'a [u8],
    planes: &'a [u8],
    sign_mant: &'a [u8],
    exceptions: &'a [u8],
}

impl Sections<'_> {
    /// [`decode`](Self::decode) with `k` (1..=7) code bits.
    fn decode_k(&self, k: u8, out: &mut [u8]) -> Option<usize> {
        match k {
            1 => self.decode::<1>(out),
            2 => self.decode::<2>(out),
            3 => self.decode::<3>(out),
            4 => self.decode::<4>(out),
            5 => self.decode::<5>(out),
            6 => self.decode::<6>(out),
            _ => self.decode::<7>(out),
        }
    }

    /// Decodes into `out`; the number of exceptions used, or `None` when the escape codes
    /// outnumber the stored exceptions.
    fn decode<const K: usize>(&self, out: &mut [u8]) -> Option<usize> {
        // Each code's exponent where it sits in the value (bits 7..14); the escape's slot
        // (0) is overwritten.
        let mut shifted = [0u16; 128];
        for (t, &e) in shifted.iter_mut().zip(self.table) {
            *t = u16::from(e) << 7;
        }
        let mut x = 0;
        let groups = out
            .chunks_mut(2 * GROUP)
            .zip(self.planes.chunks_exact(4 * K));
        for (g, (dst, plane_bytes)) in groups.enumerate() {
            let planes: [u32; K] = std::array::from_fn(|b| {
                u32::from_le_bytes(plane_bytes[4 * b..4 * b + 4].try_into().expect("4 bytes"))
            });
            let sm = &self.sign_mant[g * GROUP..g * GROUP + dst.len() / 2];
            // Byte l % 8 of codes[l / 8] is the code of value l of the group.
            let codes: [u64; GROUP / 8] = std::array::from_fn(|q| {
                planes
                    .iter()
                    .enumerate()
                    .fold(0, |c, (b, p)| c | spread_bits(p >> (8 * q)) << b)
            });
            // Every value from the table (an escaped one's entry is patched below): one table
            // read and one two-byte store per value, no branch.
            let n = dst.len() / 2;
            let value = |l: usize, e: u16| {
                let s = u16::from(sm[l]);
                (e | (s & 0x7f) | (s & 0x80) << 8).to_le_bytes()
            };
            for l in 0..n {
                let c = ((codes[l / 8] >> (8 * (l % 8))) & 0x7f) as usize;
                dst[2 * l..2 * l + 2].copy_from_slice(&value(l, shifted[c]));
            }
            // The escape code is every bit set: the AND of the planes flags the escaped values
            // (bits past the chunk's last value are ignored), which take the next exceptions.
            let mut escaped = planes.iter().fold(u32::MAX, |a, &p| a & p) & (u32::MAX >> (32 - n));
            while escaped != 0 {
                let l = escaped.trailing_zeros() as usize;
                escaped &= escaped - 1;
                let e = u16::from(*self.exceptions.get(x)?) << 7;
                x += 1;
                dst[2 * l..2 * l + 2].copy_from_slice(&value(l, e));
            }
        }
        Some(x)
    }
}

/// Bit i of the low byte of `p`, as bit 0 of byte i (the inverse of the encoder's gather).
#[inline(always)]
fn spread_bits(p: u32) -> u64 {
    const LSB: u64 = 0x0101_0101_0101_0101;
    // Byte i keeps bit i of the broadcast byte; then every non-zero byte becomes 1.
    let y = (u64::from(p & 0xff).wrapping_mul(LSB)) & 0x8040_2010_0804_0201;
    ((((y & !(LSB << 7)) + !(LSB << 7)) | y) >> 7) & LSB
}
