//! The CPU encoder: per chunk, an exponent histogram picks the code bits k, or two tiers of
//! code bits (k1, k2), or raw, then the chunk is written; chunks are planned and written in parallel. The input is one slice or
//! pieces of one (the bytes between them 0), read in place.

use crate::error::{CodecError, Result};
use crate::format::{
    ChunkMode, CodedLayout, ENTRY_LEN, Entry, GROUP, HEADER_LEN, Header, MAX_CHUNK_VALUES,
    MAX_CODE_BITS, MAX_TIER1_BITS, MAX_TIER2_BITS, MIN_CHUNK_VALUES, TwoTierLayout,
};
#[cfg(target_arch = "x86_64")]
use crate::simd;
use crate::{format, parallel};
use std::ops::{Range, RangeInclusive};

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
    /// The second-tier code widths to choose from; `None`: one tier only.
    tier2_bits: Option<RangeInclusive<u8>>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// The default options: [`DEFAULT_CHUNK_VALUES`], all available cores, per chunk the
    /// smallest of raw, one tier of k code bits for k in 1..=[`MAX_CODE_BITS`] and two tiers of
    /// (k1, k2) code bits for k1 in 1..=[`MAX_TIER1_BITS`], k2 in 1..=[`MAX_TIER2_BITS`].
    pub fn new() -> Self {
        Encoder {
            chunk_values: DEFAULT_CHUNK_VALUES,
            threads: 0,
            code_bits: Some(1..=MAX_CODE_BITS),
            tier2_bits: Some(1..=MAX_TIER2_BITS),
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
    /// not empty), which are also the first-tier code bits k1 of two-tier chunks (those of them
    /// up to [`MAX_TIER1_BITS`]); a chunk is stored raw when nothing in the ranges makes it
    /// smaller. A single k (`3..=3`) with [`single_tier`](Encoder::single_tier) fixes it, for
    /// measurements.
    pub fn with_code_bits(mut self, code_bits: RangeInclusive<u8>) -> Self {
        self.code_bits = Some(code_bits);
        self
    }

    /// The second-tier code bits k2 the encoder may choose from for two-tier chunks (within
    /// 1..=[`MAX_TIER2_BITS`], not empty; the default is all of them).
    pub fn with_tier2_bits(mut self, tier2_bits: RangeInclusive<u8>) -> Self {
        self.tier2_bits = Some(tier2_bits);
        self
    }

    /// Only one tier of codes: every chunk raw or coded with one k, the layout of format
    /// version 2's chunks (for measurements, and for the baseline GPU kernel, which decodes no
    /// two-tier chunk).
    pub fn single_tier(mut self) -> Self {
        self.tier2_bits = None;
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
        self.plan_input(Input::Whole(input))
    }

    /// [`plan`](Encoder::plan) of an input of `total_len` bytes given as pieces, each
    /// `(offset, bytes)`, in any order; bytes that no piece covers are 0. The encoding is byte
    /// for byte that of the assembled input, but nothing is assembled: a chunk that lies in one
    /// piece is read in place, and only chunks that straddle a piece's edge or a gap are put
    /// together, one at a time, in a buffer of each thread's (e.g. a block of tensors at aligned
    /// offsets, encoded without first copying them into one buffer).
    ///
    /// Errors on invalid options, and on a piece that ends past `total_len` or overlaps another
    /// (empty pieces are ignored).
    ///
    /// ```
    /// use layerwise_offload_codec::Encoder;
    /// let (a, b) = ([1u8, 0x3c, 2, 0x3c], [3u8, 0xbc]);
    /// let assembled = [1u8, 0x3c, 2, 0x3c, 0, 0, 0, 0, 3, 0xbc, 0];
    /// let plan = Encoder::new().plan_pieces(&[(8, &b[..]), (0, &a[..])], 11)?;
    /// let mut out = vec![0; plan.encoded_len()];
    /// plan.write(&mut out)?;
    /// assert_eq!(out, Encoder::new().encode(&assembled)?);
    /// # Ok::<(), layerwise_offload_codec::CodecError>(())
    /// ```
    pub fn plan_pieces<'a>(
        &self,
        pieces: &[(usize, &'a [u8])],
        total_len: usize,
    ) -> Result<EncodePlan<'a>> {
        let mut sorted: Vec<(usize, &'a [u8])> = pieces
            .iter()
            .copied()
            .filter(|(_, p)| !p.is_empty())
            .collect();
        sorted.sort_by_key(|&(o, _)| o);
        let mut end = 0usize;
        for &(o, p) in &sorted {
            let invalid = |reason| {
                Err(CodecError::InvalidOption {
                    option: "pieces",
                    value: format!("{} bytes at offset {o} (total_len {total_len})", p.len()),
                    reason,
                })
            };
            if o < end {
                return invalid("pieces must not overlap");
            }
            match o.checked_add(p.len()) {
                Some(e) if e <= total_len => end = e,
                _ => return invalid("a piece must end within total_len"),
            }
        }
        self.plan_input(Input::Pieces {
            pieces: sorted,
            len: total_len,
        })
    }

    fn plan_input<'a>(&self, input: Input<'a>) -> Result<EncodePlan<'a>> {
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
        if let Some(bits) = &self.tier2_bits
            && (bits.is_empty() || *bits.start() < 1 || *bits.end() > MAX_TIER2_BITS)
        {
            return Err(CodecError::InvalidOption {
                option: "tier2_bits",
                value: format!("{bits:?}"),
                reason: "must be a non-empty range within 1..=5",
            });
        }
        let len = input.len();
        let n_values = len / 2;
        if n_values.div_ceil(cv as usize) > u32::MAX as usize {
            return Err(CodecError::InvalidOption {
                option: "chunk_values",
                value: cv.to_string(),
                reason: "gives more than 2^32 - 1 chunks for this input",
            });
        }
        let tail = (len % 2 == 1).then(|| input.byte(len - 1));
        let header = Header::new(cv, n_values as u64, tail);
        let n_chunks = header.n_chunks() as usize;
        let threads = parallel::threads(self.threads, n_chunks);
        let chunks = Chunks {
            input,
            chunk_bytes: 2 * cv as usize,
            values_len: 2 * n_values,
        };
        let plans: Vec<Plan> = parallel::map_each(parallel::split(n_chunks, threads), |range| {
            let mut buf = Vec::new();
            range
                .map(|i| {
                    Plan::new(
                        chunks.get(i, &mut buf),
                        self.code_bits.clone(),
                        self.tier2_bits.clone(),
                    )
                })
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
            offset += plan.mode.size(chunks.range(i).len() / 2);
        }
        Ok(EncodePlan {
            chunks,
            header: header.with_encoded_len(offset as u64),
            plans,
            entries,
            threads,
        })
    }
}

/// The bytes an encoding is made of: one slice, or pieces of a longer input.
#[derive(Clone, Debug)]
enum Input<'a> {
    Whole(&'a [u8]),
    /// `(offset, bytes)`: sorted by offset, not empty, not overlapping, within `len`; the bytes
    /// between them are 0.
    Pieces {
        pieces: Vec<(usize, &'a [u8])>,
        len: usize,
    },
}

impl<'a> Input<'a> {
    fn len(&self) -> usize {
        match self {
            Input::Whole(w) => w.len(),
            Input::Pieces { len, .. } => *len,
        }
    }

    /// The index of the first piece that ends after `at` (`pieces.len()` if none does).
    fn first_after(pieces: &[(usize, &[u8])], at: usize) -> usize {
        pieces.partition_point(|(o, p)| o + p.len() <= at)
    }

    /// Byte `at` (< len).
    fn byte(&self, at: usize) -> u8 {
        match self {
            Input::Whole(w) => w[at],
            Input::Pieces { pieces, .. } => match pieces.get(Self::first_after(pieces, at)) {
                Some(&(o, p)) if o <= at => p[at - o],
                _ => 0,
            },
        }
    }

    /// Bytes `r` (within len): in place when one slice holds them all, else put together in
    /// `buf` (gaps 0).
    fn get<'b>(&'b self, r: Range<usize>, buf: &'b mut Vec<u8>) -> &'b [u8]
    where
        'a: 'b,
    {
        match self {
            Input::Whole(w) => &w[r],
            Input::Pieces { pieces, .. } => {
                let first = Self::first_after(pieces, r.start);
                if let Some(&(o, p)) = pieces.get(first)
                    && o <= r.start
                    && r.end <= o + p.len()
                {
                    return &p[r.start - o..r.end - o];
                }
                buf.clear();
                buf.resize(r.len(), 0);
                for &(o, p) in pieces[first..].iter().take_while(|(o, _)| *o < r.end) {
                    let (a, b) = (o.max(r.start), (o + p.len()).min(r.end));
                    buf[a - r.start..b - r.start].copy_from_slice(&p[a - o..b - o]);
                }
                buf
            }
        }
    }
}

/// An input's values in chunks.
#[derive(Clone, Debug)]
struct Chunks<'a> {
    input: Input<'a>,
    /// Bytes of a full chunk.
    chunk_bytes: usize,
    /// Bytes of the values (the input less an odd tail byte).
    values_len: usize,
}

impl Chunks<'_> {
    /// The byte range of chunk `i`.
    fn range(&self, i: usize) -> Range<usize> {
        i * self.chunk_bytes..((i + 1) * self.chunk_bytes).min(self.values_len)
    }

    /// The bytes of chunk `i`, in place or put together in `buf`.
    fn get<'b>(&'b self, i: usize, buf: &'b mut Vec<u8>) -> &'b [u8] {
        self.input.get(self.range(i), buf)
    }
}

/// An input with every chunk's mode chosen ([`Encoder::plan`]): its encoded length is known, and
/// [`write`](EncodePlan::write) produces the encoding.
#[derive(Clone, Debug)]
pub struct EncodePlan<'a> {
    chunks: Chunks<'a>,
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
            let mut buf = Vec::new();
            for i in range {
                let values = self.chunks.get(i, &mut buf);
                let at = self.entries[i].offset as usize - base;
                let dst = &mut part[at..at + self.plans[i].mode.size(values.len() / 2)];
                self.plans[i].write(values, dst);
            }
        });
        format::seal(out, self.threads);
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
    /// Counts the exponents of `values` (2n bytes) and picks the smallest of raw, the coded
    /// sizes for k in `code_bits` (`None`: raw) and the two-tier sizes for k1 in `code_bits`
    /// (up to [`MAX_TIER1_BITS`]) and k2 in `tier2_bits` (`None`: none); on a tie the first of
    /// raw, one tier by k, two tiers by (k1, k2).
    fn new(
        values: &[u8],
        code_bits: Option<RangeInclusive<u8>>,
        tier2_bits: Option<RangeInclusive<u8>>,
    ) -> Plan {
        let n = values.len() / 2;
        let counts = histogram(values);
        let mut order: [u8; 256] = std::array::from_fn(|e| e as u8);
        // Most frequent first; ties by exponent, so the table does not depend on sort stability.
        order.sort_unstable_by_key(|&e| (std::cmp::Reverse(counts[usize::from(e)]), e));
        // covered[j]: values whose exponent is among the j most frequent.
        let mut covered = [0usize; 257];
        for j in 0..256 {
            covered[j + 1] = covered[j] + counts[usize::from(order[j])] as usize;
        }
        let mut best = ChunkMode::Raw;
        let mut best_size = ChunkMode::Raw.size(n);
        let mut consider = |mode: ChunkMode| {
            let size = mode.size(n);
            if size < best_size {
                best = mode;
                best_size = size;
            }
        };
        for k in code_bits.clone().into_iter().flatten() {
            let t = (1usize << k) - 1;
            consider(ChunkMode::Coded {
                k,
                exceptions: (n - covered[t]) as u32,
            });
        }
        for k1 in code_bits.into_iter().flatten() {
            for k2 in tier2_bits.clone().into_iter().flatten() {
                if k1 > MAX_TIER1_BITS {
                    continue;
                }
                let (t1, t2) = ((1usize << k1) - 1, (1usize << k2) - 1);
                consider(ChunkMode::TwoTier {
                    k1,
                    k2,
                    tier1_escapes: (n - covered[t1]) as u32,
                    exceptions: (n - covered[t1 + t2]) as u32,
                });
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
                    table: &self.table[..t],
                    code_of: &code_of,
                    planes,
                    sign_mant,
                    exceptions: Exceptions { out: exc, x: 0 },
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
            ChunkMode::TwoTier {
                k1,
                k2,
                tier1_escapes,
                exceptions,
            } => {
                let n = values.len() / 2;
                let (e1, e2) = (tier1_escapes as usize, exceptions as usize);
                let layout = TwoTierLayout::new(k1, k2, n, e1, e2);
                let (t1, t2) = (layout.table1.len(), layout.table2.len());
                out.fill(0);
                out[layout.count.clone()].copy_from_slice(&exceptions.to_le_bytes());
                out[layout.table1.clone()].copy_from_slice(&self.table[..t1]);
                out[layout.table2.clone()].copy_from_slice(&self.table[t1..t1 + t2]);
                // The first tier is a one-tier chunk of k1 bits whose exceptions are the
                // first-tier escapes' exponents, which the second tier then codes.
                let mut code_of = [t1 as u8; 256];
                for (c, &e) in self.table[..t1].iter().enumerate() {
                    code_of[usize::from(e)] = c as u8;
                }
                let mut code2_of = [t2 as u8; 256];
                for (d, &e) in self.table[t1..t1 + t2].iter().enumerate() {
                    code2_of[usize::from(e)] = d as u8;
                }
                let (_, rest) = out.split_at_mut(layout.planes.start);
                let (planes, rest) = rest.split_at_mut(layout.planes.len());
                let (_, rest) = rest.split_at_mut(layout.sign_mant.start - layout.planes.end);
                let (sign_mant, rest) = rest.split_at_mut(n);
                let (_, rest) = rest.split_at_mut(layout.tier2.start - layout.sign_mant.end);
                let (tier2, rest) = rest.split_at_mut(layout.tier2.len());
                let (_, rest) = rest.split_at_mut(layout.exceptions.start - layout.tier2.end);
                let exc = &mut rest[..e2];
                // The first tier is a one-tier chunk of k1 bits whose escaped values' exponents
                // go to the second tier, coded as they come, in value order.
                let sink = SecondTier {
                    code2_of: &code2_of,
                    k2: u32::from(k2),
                    escape: (1u8 << k2) - 1,
                    acc: 0,
                    bits: 0,
                    codes: tier2,
                    at: 0,
                    exceptions: Exceptions { out: exc, x: 0 },
                };
                let sections = Sections {
                    values,
                    table: &self.table[..t1],
                    code_of: &code_of,
                    planes,
                    sign_mant,
                    exceptions: sink,
                };
                match k1 {
                    1 => sections.write::<1>(),
                    2 => sections.write::<2>(),
                    3 => sections.write::<3>(),
                    _ => sections.write::<4>(),
                }
            }
        }
    }
}

/// Where the exponents of a coded chunk's escaped values go, in value order.
trait EscapeSink {
    /// The next escaped value's exponent.
    fn push(&mut self, e: u8);
    /// After the last one: writes what is buffered, checks (in debug builds) that the counts
    /// planned were written.
    fn finish(self);
}

/// A section of raw exponent bytes, `x` of them written.
struct Exceptions<'a> {
    out: &'a mut [u8],
    x: usize,
}

impl EscapeSink for Exceptions<'_> {
    #[inline(always)]
    fn push(&mut self, e: u8) {
        self.out[self.x] = e;
        self.x += 1;
    }

    fn finish(self) {
        debug_assert_eq!(
            self.x,
            self.out.len(),
            "exception count planned and written"
        );
    }
}

/// The second tier of a two-tier chunk: each first-tier escape's `k2`-bit code, appended to the
/// little-endian bitstream `codes` (zeroed, its exact length), and the exponents whose code is
/// the escape `2^k2 - 1` to `exceptions`.
struct SecondTier<'a> {
    code2_of: &'a [u8; 256],
    k2: u32,
    escape: u8,
    /// Bits not yet written (the low `bits` of `acc`).
    acc: u32,
    bits: u32,
    codes: &'a mut [u8],
    /// Bytes of `codes` written.
    at: usize,
    exceptions: Exceptions<'a>,
}

impl EscapeSink for SecondTier<'_> {
    #[inline(always)]
    fn push(&mut self, e: u8) {
        let d = self.code2_of[usize::from(e)];
        if d == self.escape {
            self.exceptions.push(e);
        }
        self.acc |= u32::from(d) << self.bits;
        self.bits += self.k2;
        // bits < 8 before, k2 <= 5: at most one whole byte.
        if self.bits >= 8 {
            self.codes[self.at] = self.acc as u8;
            self.at += 1;
            self.acc >>= 8;
            self.bits -= 8;
        }
    }

    fn finish(mut self) {
        if self.bits > 0 {
            self.codes[self.at] = self.acc as u8;
            self.at += 1;
        }
        debug_assert_eq!(
            self.at,
            self.codes.len(),
            "second-tier bytes planned and written"
        );
        self.exceptions.finish();
    }
}

/// The exponent counts of `values` (pairs of bytes, low byte first).
fn histogram(values: &[u8]) -> [u32; 256] {
    // Four sub-histograms, so that runs of one exponent do not serialise on one counter; the
    // values read 4 at a time as one word.
    let mut h = [[0u32; 256]; 4];
    let mut quads = values.chunks_exact(8);
    for q in &mut quads {
        let w = u64::from_le_bytes(q.try_into().expect("8 bytes"));
        for (j, h) in h.iter_mut().enumerate() {
            h[(w >> (16 * j + 7)) as usize & 0xff] += 1;
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

/// The output sections of one coded chunk being written (of a two-tier chunk's first tier, whose
/// escapes go to its second tier).
struct Sections<'a, S: EscapeSink> {
    values: &'a [u8],
    /// The exponents of codes 0..2^k - 1.
    table: &'a [u8],
    /// The code of each exponent.
    code_of: &'a [u8; 256],
    planes: &'a mut [u8],
    sign_mant: &'a mut [u8],
    exceptions: S,
}

impl<S: EscapeSink> Sections<'_, S> {
    fn write<const K: usize>(mut self) {
        let x = &mut self.exceptions;
        let full = self.values.chunks_exact(2 * GROUP);
        let last = full.remainder();
        let groups = full
            .zip(self.sign_mant.chunks_exact_mut(GROUP))
            .zip(self.planes.chunks_exact_mut(4 * K));
        #[cfg(target_arch = "x86_64")]
        let simd_table = (K <= simd::MAX_K).then(|| simd::Table::new(self.table));
        for ((vals, sm), planes_out) in groups {
            let vals: &[u8; 2 * GROUP] = vals.try_into().expect("a full group");
            let sm: &mut [u8; GROUP] = sm.try_into().expect("a full group");
            #[cfg(target_arch = "x86_64")]
            if let Some(table) = &simd_table {
                let (planes, escaped) = simd::group::<K>(vals, table, sm);
                emit(vals, &planes, escaped, planes_out, x);
                continue;
            }
            let (planes, escaped) = scalar_group::<K>(vals, self.code_of, sm);
            emit(vals, &planes, escaped, planes_out, x);
        }
        if !last.is_empty() {
            let n = last.len() / 2;
            let start = self.sign_mant.len() - n;
            // Codes past the last value stay 0: their plane bits are 0 and they never escape.
            let mut words = [0u64; GROUP / 8];
            let sm = self.sign_mant[start..].iter_mut();
            for (l, (s, v)) in sm.zip(last.chunks_exact(2)).enumerate() {
                *s = (v[1] & 0x80) | (v[0] & 0x7f);
                let c = self.code_of[usize::from(exponent(v[0], v[1]))];
                words[l / 8] |= u64::from(c) << (8 * (l % 8));
            }
            let at = 4 * K * (self.values.len() / (2 * GROUP));
            let planes = bit_planes::<K>(&words);
            let out = &mut self.planes[at..at + 4 * K];
            emit(last, &planes, escapes(&planes), out, x);
        }
        self.exceptions.finish();
    }
}

/// One full group: writes its sign and mantissa bytes into `sign_mant`; returns its K bit planes
/// and its escape mask (bit l: value l escapes), with one table lookup per value.
#[inline(always)]
fn scalar_group<const K: usize>(
    vals: &[u8; 2 * GROUP],
    code_of: &[u8; 256],
    sign_mant: &mut [u8; GROUP],
) -> ([u32; K], u32) {
    // Sign and mantissa: a plain map the compiler vectorises.
    for (s, v) in sign_mant.iter_mut().zip(vals.chunks_exact(2)) {
        *s = (v[1] & 0x80) | (v[0] & 0x7f);
    }
    // The values 4 at a time, value l at bits 16 * (l % 4) of word l / 4.
    let v: [u64; GROUP / 4] = std::array::from_fn(|i| {
        u64::from_le_bytes(vals[8 * i..8 * i + 8].try_into().expect("8 bytes"))
    });
    // The codes, byte l % 8 of word l / 8 for value l, built in registers (bytes stored one by
    // one and read back as words would stall on store forwarding).
    let words: [u64; GROUP / 8] = std::array::from_fn(|q| {
        (0..8).fold(0u64, |w, j| {
            let e = (v[2 * q + j / 4] >> (16 * (j % 4) + 7)) as usize & 0xff;
            w | u64::from(code_of[e]) << (8 * j)
        })
    });
    let planes = bit_planes::<K>(&words);
    (planes, escapes(&planes))
}

/// The values that escape (all K bits of the code set), from a group's K bit planes.
#[inline(always)]
fn escapes<const K: usize>(planes: &[u32; K]) -> u32 {
    planes.iter().fold(u32::MAX, |m, p| m & p)
}

/// Writes a group's bit `planes` into `out` (4K bytes) and the exponents of its escaped values
/// (`vals`, 2 bytes each; bit l of `escaped` for value l) to `exceptions`, in value order.
#[inline(always)]
fn emit<const K: usize, S: EscapeSink>(
    vals: &[u8],
    planes: &[u32; K],
    mut escaped: u32,
    out: &mut [u8],
    exceptions: &mut S,
) {
    for (p, out) in planes.iter().zip(out.chunks_exact_mut(4)) {
        out.copy_from_slice(&p.to_le_bytes());
    }
    while escaped != 0 {
        let l = escaped.trailing_zeros() as usize;
        exceptions.push(exponent(vals[2 * l], vals[2 * l + 1]));
        escaped &= escaped - 1;
    }
}

/// The K bit planes of 32 codes (byte l % 8 of word l / 8 for value l): bit l of plane b is
/// bit b of code l.
#[inline(always)]
fn bit_planes<const K: usize>(words: &[u64; GROUP / 8]) -> [u32; K] {
    std::array::from_fn(|b| {
        words
            .iter()
            .enumerate()
            .fold(0u32, |p, (q, &w)| p | gather_bits(w >> b) << (8 * q))
    })
}

/// Bit 0 of each byte of `w`, as 8 bits (byte i's bit at bit i).
#[inline(always)]
pub(crate) fn gather_bits(w: u64) -> u32 {
    // The products of the 8 bits with the multiplier's bytes land on distinct bits, so there is
    // no carry; the ones with byte index + multiplier byte index = 7 fall in bits 56..63.
    ((w & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{GROUP, scalar_group, simd};

    /// The SSE2 group kernel and the scalar one agree on every output, for every k it handles,
    /// on values whose exponents hit the table, miss it, and take every byte value.
    #[test]
    fn simd_group_matches_the_scalar_group() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        fn check<const K: usize>(vals: &[u8; 2 * GROUP], table: &[u8]) {
            let t = (1usize << K) - 1;
            let mut code_of = [t as u8; 256];
            for (c, &e) in table[..t].iter().enumerate() {
                code_of[usize::from(e)] = c as u8;
            }
            let (mut sm_a, mut sm_b) = ([0u8; GROUP], [0xAAu8; GROUP]);
            let a = scalar_group::<K>(vals, &code_of, &mut sm_a);
            let b = simd::group::<K>(vals, &simd::Table::new(&table[..t]), &mut sm_b);
            assert_eq!(a, b, "planes and escapes, k = {K}");
            assert_eq!(sm_a, sm_b, "sign and mantissa, k = {K}");
        }
        for round in 0..4000 {
            // A table of distinct exponents: a random permutation's first 15.
            let mut perm: [u8; 256] = std::array::from_fn(|i| i as u8);
            for i in (1..256).rev() {
                perm.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            // Random bytes, or exponents drawn from the table's first 20 entries (hits for k = 4,
            // misses for smaller k) with random sign and mantissa.
            let mut vals = [0u8; 2 * GROUP];
            for v in vals.chunks_exact_mut(2) {
                let r = next();
                let bits = if round % 3 == 2 {
                    r as u16
                } else {
                    (u16::from(perm[(r >> 16) as usize % 20]) << 7) | (r as u16 & 0x807f)
                };
                v.copy_from_slice(&bits.to_le_bytes());
            }
            check::<1>(&vals, &perm);
            check::<2>(&vals, &perm);
            check::<3>(&vals, &perm);
            check::<4>(&vals, &perm);
        }
    }
}
