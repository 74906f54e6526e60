//! The CPU encoder: per chunk, an exponent histogram picks the code bits k (or raw), then the
//! chunk is written; chunks are planned and written in parallel.

use crate::error::{CodecError, Result};
use crate::format::{
    ChunkMode, CodedLayout, ENTRY_LEN, Entry, GROUP, HEADER_LEN, Header, MAX_CHUNK_VALUES,
    MAX_CODE_BITS, MIN_CHUNK_VALUES,
};
use crate::parallel;
use std::ops::RangeInclusive;

/// Values per chunk unless [`Encoder::with_chunk_values`] says otherwise: 32 Ki values, 64 KiB of
/// bf16 (see the README for the measurements behind it).
pub const DEFAULT_CHUNK_VALUES: u32 = 32 * 1024;

/// Encodes `input` (bf16 values, little-endian; an odd last byte travels as it is) with the
/// default options and all available cores.
///
/// ```
/// let weights: Vec<u8> = [0.02f32, -0.013, 0.0007, 0.031]
///     .iter()
///     .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
///     .collect();
/// let encoded = layerwise_offload_codec::encode(&weights);
/// let mut out = vec![0; layerwise_offload_codec::decoded_len(&encoded)?];
/// layerwise_offload_codec::decode(&encoded, &mut out)?;
/// assert_eq!(out, weights);
/// # Ok::<(), layerwise_offload_codec::CodecError>(())
/// ```
pub fn encode(input: &[u8]) -> Vec<u8> {
    Encoder::new()
        .encode(input)
        .expect("the default options are valid")
}

/// Encoder options; [`encode`](Encoder::encode) is the finishing call.
#[derive(Clone, Debug)]
pub struct Encoder {
    chunk_values: u32,
    threads: usize,
    /// The code widths to choose from; `None`: every chunk raw.
    code_bits: Option<RangeInclusive<u8>>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// The default options: [`DEFAULT_CHUNK_VALUES`], all available cores, k chosen per chunk
    /// from 1..=[`MAX_CODE_BITS`].
    pub fn new() -> Self {
        Encoder {
            chunk_values: DEFAULT_CHUNK_VALUES,
            threads: 0,
            code_bits: Some(1..=MAX_CODE_BITS),
        }
    }

    /// Values per chunk: a multiple of 256 in 256..=4194304. Smaller chunks give a GPU more
    /// blocks and follow local statistics; larger ones spend less on headers.
    pub fn with_chunk_values(mut self, chunk_values: u32) -> Self {
        self.chunk_values = chunk_values;
        self
    }

    /// Threads that plan and write chunks; 0 (the default) takes
    /// [`std::thread::available_parallelism`]. 1 encodes on the calling thread, for callers that
    /// run several encodes in parallel themselves.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// The code bits k the encoder may choose from for a chunk (within 1..=[`MAX_CODE_BITS`],
    /// not empty); a chunk is stored raw when no k in the range makes it smaller. A single k
    /// (`3..=3`) fixes it, for measurements.
    pub fn with_code_bits(mut self, code_bits: RangeInclusive<u8>) -> Self {
        self.code_bits = Some(code_bits);
        self
    }

    /// Stores every chunk raw: the encoding is the input plus the header and directory (for
    /// measurements, and for data known not to compress).
    pub fn raw_only(mut self) -> Self {
        self.code_bits = None;
        self
    }

    /// Encodes `input`. Errors only on invalid options.
    pub fn encode(&self, input: &[u8]) -> Result<Vec<u8>> {
        let plan = self.plan(input)?;
        let mut out = vec![0u8; plan.encoded_len()];
        plan.write(&mut out)?;
        Ok(out)
    }

    /// Plans the encoding of `input` (one pass over it: every chunk's exponent histogram and
    /// mode), so that its exact length is known before [`EncodePlan::write`] fills a buffer of
    /// that length, e.g. page-locked memory. Errors only on invalid options.
    pub fn plan<'a>(&self, input: &'a [u8]) -> Result<EncodePlan<'a>> {
        let cv = self.chunk_values;
        if !(MIN_CHUNK_VALUES..=MAX_CHUNK_VALUES).contains(&cv)
            || !cv.is_multiple_of(MIN_CHUNK_VALUES)
        {
            return Err(CodecError::InvalidOption {
                option: "chunk_values",
                value: cv.to_string(),
                reason: "must be a multiple of 256 in 256..=4194304",
            });
        }
        if let Some(bits) = &self.code_bits
            && (bits.is_empty() || *bits.start() < 1 || *bits.end() > MAX_CODE_BITS)
        {
            return Err(CodecError::InvalidOption {
                option: "code_bits",
                value: format!("{bits:?}"),
                reason: "must be a non-empty range within 1..=7",
            });
        }
        let n_values = input.len() / 2;
        if n_values.div_ceil(cv as usize) > u32::MAX as usize {
            return Err(CodecError::InvalidOption {
                option: "chunk_values",
                value: cv.to_string(),
                reason: "gives more than 2^32 - 1 chunks for this input",
            });
        }
        let tail = (input.len() % 2 == 1).then(|| input[input.len() - 1]);
        let values = &input[..2 * n_values];
        let header = Header::new(cv, n_values as u64, tail);
        let n_chunks = header.n_chunks() as usize;
        let threads = parallel::threads(self.threads, n_chunks);
        let chunk = |i: usize| chunk_of(values, cv as usize, i);
        let plans: Vec<Plan> = parallel::map_each(parallel::split(n_chunks, threads), |range| {
            range
                .map(|i| Plan::new(chunk(i), self.code_bits.clone()))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect();
        let mut offset = header.data_offset() as usize;
        let mut entries = Vec::with_capacity(n_chunks);
        for (i, plan) in plans.iter().enumerate() {
            entries.push(Entry {
                offset: offset as u64,
                mode: plan.mode,
            });
            offset += plan.mode.size(chunk(i).len() / 2);
        }
        Ok(EncodePlan {
            values,
            header: header.with_encoded_len(offset as u64),
            plans,
            entries,
            threads,
        })
    }
}

/// The bytes of chunk `i` of `values`, in chunks of `cv` values.
fn chunk_of(values: &[u8], cv: usize, i: usize) -> &[u8] {
    &values[i * 2 * cv..((i + 1) * 2 * cv).min(values.len())]
}

/// An input with every chunk's mode chosen ([`Encoder::plan`]): its encoded length is known, and
/// [`write`](EncodePlan::write) produces the encoding.
#[derive(Clone, Debug)]
pub struct EncodePlan<'a> {
    values: &'a [u8],
    header: Header,
    plans: Vec<Plan>,
    entries: Vec<Entry>,
    threads: usize,
}

impl EncodePlan<'_> {
    /// Bytes of the encoding.
    pub fn encoded_len(&self) -> usize {
        self.header.encoded_len() as usize
    }

    /// The encoding's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Writes the encoding into `out`, which must be [`encoded_len`](EncodePlan::encoded_len)
    /// bytes long; every byte is written, so `out` need not be zeroed. Chunks are written in
    /// parallel, each thread into its own contiguous part of `out`.
    pub fn write(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.encoded_len() {
            return Err(CodecError::OutputLength {
                expected: self.encoded_len() as u64,
                got: out.len() as u64,
            });
        }
        let cv = self.header.chunk_values() as usize;
        let data_offset = self.header.data_offset() as usize;
        let (head, mut body) = out.split_at_mut(data_offset);
        self.header.write(head);
        for (i, entry) in self.entries.iter().enumerate() {
            entry.write(&mut head[HEADER_LEN + ENTRY_LEN * i..]);
        }
        let n_chunks = self.entries.len();
        let mut parts = Vec::with_capacity(self.threads);
        let mut start = data_offset;
        for range in parallel::split(n_chunks, self.threads)
            .into_iter()
            .filter(|r| !r.is_empty())
        {
            let end = self
                .entries
                .get(range.end)
                .map_or(self.encoded_len(), |e| e.offset as usize);
            let (part, rest) = body.split_at_mut(end - start);
            body = rest;
            parts.push((range, start, part));
            start = end;
        }
        parallel::map_each(parts, |(range, base, part)| {
            for i in range {
                let values = chunk_of(self.values, cv, i);
                let at = self.entries[i].offset as usize - base;
                let dst = &mut part[at..at + self.plans[i].mode.size(values.len() / 2)];
                self.plans[i].write(values, dst);
            }
        });
        Ok(())
    }
}

/// How one chunk will be stored.
#[derive(Clone, Debug)]
struct Plan {
    mode: ChunkMode,
    /// The exponents of codes 0..2^k-1, most frequent first (coded chunks).
    table: [u8; 1 << MAX_CODE_BITS],
}

impl Plan {
    /// Counts the exponents of `values` (2n bytes) and picks the smallest of raw and the coded
    /// sizes for k in `code_bits` (`None`: raw).
    fn new(values: &[u8], code_bits: Option<RangeInclusive<u8>>) -> Plan {
        let n = values.len() / 2;
        let counts = histogram(values);
        let mut order: [u8; 256] = std::array::from_fn(|e| e as u8);
        // Most frequent first; ties by exponent, so the table does not depend on sort stability.
        order.sort_unstable_by_key(|&e| (std::cmp::Reverse(counts[usize::from(e)]), e));
        let mut best = ChunkMode::Raw;
        let mut best_size = ChunkMode::Raw.size(n);
        let mut covered = 0usize;
        let mut next = 0usize;
        for k in code_bits.into_iter().flatten() {
            let t = (1usize << k) - 1;
            while next < t {
                covered += counts[usize::from(order[next])] as usize;
                next += 1;
            }
            let mode = ChunkMode::Coded {
                k,
                exceptions: (n - covered) as u32,
            };
            let size = mode.size(n);
            if size < best_size {
                best = mode;
                best_size = size;
            }
        }
        let mut table = [0u8; 1 << MAX_CODE_BITS];
        table.copy_from_slice(&order[..1 << MAX_CODE_BITS]);
        Plan { mode: best, table }
    }

    /// Writes the chunk of `values` into `out` (its exact size); every byte is written.
    fn write(&self, values: &[u8], out: &mut [u8]) {
        match self.mode {
            ChunkMode::Raw => {
                out[..values.len()].copy_from_slice(values);
                out[values.len()..].fill(0);
            }
            ChunkMode::Coded { k, exceptions } => {
                let n = values.len() / 2;
                let layout = CodedLayout::new(k, n, exceptions as usize);
                let t = layout.table.len();
                out[layout.table.clone()].copy_from_slice(&self.table[..t]);
                // The padding after each section (the sections themselves are written in full).
                out[t..layout.planes.start].fill(0);
                out[layout.planes.end..layout.sign_mant.start].fill(0);
                out[layout.sign_mant.end..layout.exceptions.start].fill(0);
                out[layout.exceptions.end..].fill(0);
                let mut code_of = [t as u8; 256];
                for (c, &e) in self.table[..t].iter().enumerate() {
                    code_of[usize::from(e)] = c as u8;
                }
                let (_, rest) = out.split_at_mut(layout.planes.start);
                let (planes, rest) = rest.split_at_mut(layout.planes.len());
                let (_, rest) = rest.split_at_mut(layout.sign_mant.start - layout.planes.end);
                let (sign_mant, rest) = rest.split_at_mut(n);
                let (_, rest) = rest.split_at_mut(layout.exceptions.start - layout.sign_mant.end);
                let exc = &mut rest[..exceptions as usize];
                let sections = Sections {
                    values,
                    code_of: &code_of,
                    planes,
                    sign_mant,
                    exceptions: exc,
                };
                match k {
                    1 => sections.write::<1>(),
                    2 => sections.write::<2>(),
                    3 => sections.write::<3>(),
                    4 => sections.write::<4>(),
                    5 => sections.write::<5>(),
                    6 => sections.write::<6>(),
                    _ => sections.write::<7>(),
                }
            }
        }
    }
}

/// The exponent counts of `values` (pairs of bytes, low byte first).
fn histogram(values: &[u8]) -> [u32; 256] {
    // Four sub-histograms, so that runs of one exponent do not serialise on one counter.
    let mut h = [[0u32; 256]; 4];
    let mut quads = values.chunks_exact(8);
    for q in &mut quads {
        for j in 0..4 {
            h[j][usize::from(exponent(q[2 * j], q[2 * j + 1]))] += 1;
        }
    }
    for v in quads.remainder().chunks_exact(2) {
        h[0][usize::from(exponent(v[0], v[1]))] += 1;
    }
    std::array::from_fn(|e| h[0][e] + h[1][e] + h[2][e] + h[3][e])
}

/// The exponent of the bf16 value with bytes `lo`, `hi`.
#[inline(always)]
pub(crate) fn exponent(lo: u8, hi: u8) -> u8 {
    (hi << 1) | (lo >> 7)
}

/// The output sections of one coded chunk being written.
struct Sections<'a> {
    values: &'a [u8],
    code_of: &'a [u8; 256],
    planes: &'a mut [u8],
    sign_mant: &'a mut [u8],
    exceptions: &'a mut [u8],
}

impl Sections<'_> {
    fn write<const K: usize>(self) {
        let escape = ((1usize << K) - 1) as u8;
        let mut x = 0;
        let full = self.values.chunks_exact(2 * GROUP);
        let last = full.remainder();
        let groups = full
            .zip(self.sign_mant.chunks_exact_mut(GROUP))
            .zip(self.planes.chunks_exact_mut(4 * K));
        for ((vals, sm), planes_out) in groups {
            let vals: &[u8; 2 * GROUP] = vals.try_into().expect("a full group");
            let sm: &mut [u8; GROUP] = sm.try_into().expect("a full group");
            // Sign and mantissa: a plain map the compiler vectorises.
            for (s, v) in sm.iter_mut().zip(vals.chunks_exact(2)) {
                *s = (v[1] & 0x80) | (v[0] & 0x7f);
            }
            let mut escaped = [0u8; GROUP];
            let mut n_escaped = 0;
            let codes = code_group(vals, self.code_of, escape, &mut escaped, &mut n_escaped);
            self.exceptions[x..x + n_escaped].copy_from_slice(&escaped[..n_escaped]);
            x += n_escaped;
            write_planes::<K>(&codes, planes_out);
        }
        if !last.is_empty() {
            let n = last.len() / 2;
            let start = self.sign_mant.len() - n;
            for (s, v) in self.sign_mant[start..].iter_mut().zip(last.chunks_exact(2)) {
                *s = (v[1] & 0x80) | (v[0] & 0x7f);
            }
            let mut escaped = [0u8; GROUP];
            let mut n_escaped = 0;
            let codes = code_group(last, self.code_of, escape, &mut escaped, &mut n_escaped);
            self.exceptions[x..x + n_escaped].copy_from_slice(&escaped[..n_escaped]);
            x += n_escaped;
            let at = 4 * K * (self.values.len() / (2 * GROUP));
            write_planes::<K>(&codes, &mut self.planes[at..at + 4 * K]);
        }
        debug_assert_eq!(
            x,
            self.exceptions.len(),
            "exception count planned and written"
        );
    }
}

/// The codes of up to 32 values (`vals`, 2 bytes each), byte `l % 8` of word `l / 8` for value
/// `l`; their escaped exponents go to `escaped[..*n_escaped]` in order (branch-free: every
/// exponent is written, the count only moves on an escape).
#[inline(always)]
fn code_group(
    vals: &[u8],
    code_of: &[u8; 256],
    escape: u8,
    escaped: &mut [u8; GROUP],
    n_escaped: &mut usize,
) -> [u64; GROUP / 8] {
    let mut codes = [0u64; GROUP / 8];
    let mut n = 0;
    for (l, v) in vals.chunks_exact(2).enumerate() {
        let e = exponent(v[0], v[1]);
        let c = code_of[usize::from(e)];
        escaped[n & (GROUP - 1)] = e;
        n += usize::from(c == escape);
        codes[l / 8] |= u64::from(c) << (8 * (l % 8));
    }
    *n_escaped = n;
    codes
}

/// Writes the K bit planes of a group's codes.
#[inline(always)]
fn write_planes<const K: usize>(codes: &[u64; GROUP / 8], out: &mut [u8]) {
    for (b, out) in out.chunks_exact_mut(4).enumerate().take(K) {
        let p = codes
            .iter()
            .enumerate()
            .fold(0u32, |p, (q, &w)| p | gather_bits(w >> b) << (8 * q));
        out.copy_from_slice(&p.to_le_bytes());
    }
}

/// Bit 0 of each byte of `w`, as 8 bits (byte i's bit at bit i).
#[inline(always)]
pub(crate) fn gather_bits(w: u64) -> u32 {
    // The products of the 8 bits with the multiplier's bytes land on distinct bits, so there is
    // no carry; the ones with byte index + multiplier byte index = 7 fall in bits 56..63.
    ((w & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32
}
