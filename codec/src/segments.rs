//! Segmented encodings: a long input encoded as a sequence of independent encodings
//! ("segments"), each of at most `segment_raw` input bytes, so that a reader can move and decode
//! one segment at a time through a small buffer instead of the whole encoding at once.
//!
//! ```text
//! segment 0: record (16 bytes) | encoding of input[0..S]     | zero padding to 16 bytes
//! segment 1: record (16 bytes) | encoding of input[S..2S]    | zero padding to 16 bytes
//! ...
//! last:      record (16 bytes) | encoding of input[(n-1)S..] | zero padding to 16 bytes
//! record: "LWSG" | raw length u32 LE | encoding length u64 LE
//! ```
//! Every record and every encoding starts at a 16-byte aligned offset; the buffer ends at the
//! last segment's padding. Each encoding is a whole encoding of this crate's format (its own
//! header, directory and checksum). An input of 0 bytes is one segment of an empty encoding.
//!
//! [`Segments::walk`] reads the records only (cheap: for encodings made in this process);
//! [`Segments::parse`] also parses every encoding and checks it decodes to its record's raw
//! length; [`verify_segmented`] also checks every checksum.
//!
//! ```
//! use layerwise_offload_codec::{Encoder, Segments, decode_segmented};
//! let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
//! let encoded = Encoder::new().encode_segmented(&input, 128 * 1024)?;
//! let segments = Segments::parse(&encoded)?;
//! assert_eq!(segments.len(), 3);
//! assert_eq!(segments.decoded_len(), input.len());
//! let mut out = vec![0; input.len()];
//! decode_segmented(&encoded, &mut out, 0)?;
//! assert_eq!(out, input);
//! # Ok::<(), layerwise_offload_codec::CodecError>(())
//! ```

use crate::error::{CodecError, Result};
use crate::{EncodePlan, Encoded, Encoder};
use std::ops::Range;

/// Magic bytes of a segment record.
pub const SEGMENT_MAGIC: [u8; 4] = *b"LWSG";
/// Bytes of a segment record.
pub const SEGMENT_RECORD_LEN: usize = 16;
/// Alignment of every record and encoding in a segmented encoding.
pub const SEGMENT_ALIGN: usize = 16;
/// Largest `segment_raw` (raw lengths are recorded in 32 bits).
pub const MAX_SEGMENT_RAW: usize = 1 << 31;

/// One segment of a segmented encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The input bytes it decodes to.
    pub raw: Range<usize>,
    /// Its encoding (after its record) in the segmented encoding.
    pub encoded: Range<usize>,
}

impl Segment {
    /// Bytes of its encoding.
    pub fn encoded_len(&self) -> usize {
        self.encoded.len()
    }
}

/// The segments of a segmented encoding, in order, checked: records at aligned offsets, zero
/// padding, raw ranges back to back from 0, the buffer ending with the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segments {
    segments: Vec<Segment>,
}

fn corrupt(field: &'static str, value: u64, reason: &'static str) -> CodecError {
    CodecError::CorruptHeader {
        field,
        value,
        reason,
    }
}

impl Segments {
    /// Walks the segment records of `bytes`: each record's magic, the encoding inside the
    /// buffer, zero padding after it, raw ranges back to back, the buffer ending at the last
    /// segment. The encodings themselves are not parsed (see [`Self::parse`]).
    pub fn walk(bytes: &[u8]) -> Result<Segments> {
        let mut segments = Vec::new();
        let (mut at, mut raw_at) = (0usize, 0usize);
        loop {
            let Some(rec) = bytes
                .get(at..)
                .and_then(|b| b.first_chunk::<SEGMENT_RECORD_LEN>())
            else {
                return Err(CodecError::Truncated {
                    what: "segment record",
                    needed: at as u64 + SEGMENT_RECORD_LEN as u64,
                    len: bytes.len(),
                });
            };
            if rec[..4] != SEGMENT_MAGIC {
                return Err(CodecError::BadMagic {
                    found: rec[..4].try_into().expect("4 bytes"),
                    expected: SEGMENT_MAGIC,
                });
            }
            let raw = u32::from_le_bytes(rec[4..8].try_into().expect("4 bytes")) as usize;
            let len = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
            let start = at + SEGMENT_RECORD_LEN;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|&e| e <= bytes.len())
                .ok_or(CodecError::Truncated {
                    what: "segment",
                    needed: (start as u64).saturating_add(len),
                    len: bytes.len(),
                })?;
            let next = end.next_multiple_of(SEGMENT_ALIGN);
            let pad = bytes.get(end..next).ok_or(CodecError::Truncated {
                what: "segment padding",
                needed: next as u64,
                len: bytes.len(),
            })?;
            if pad.iter().any(|&b| b != 0) {
                return Err(corrupt(
                    "segment padding",
                    end as u64,
                    "the bytes between segments are not zero",
                ));
            }
            let raw_end = raw_at.checked_add(raw).ok_or(corrupt(
                "segment raw length",
                raw as u64,
                "the raw lengths overflow",
            ))?;
            segments.push(Segment {
                raw: raw_at..raw_end,
                encoded: start..end,
            });
            (at, raw_at) = (next, raw_end);
            if at == bytes.len() {
                return Ok(Segments { segments });
            }
        }
    }

    /// [`Self::walk`], then parses every segment's encoding (its header and directory, not its
    /// checksum) and checks it decodes to its record's raw length.
    pub fn parse(bytes: &[u8]) -> Result<Segments> {
        let segments = Segments::walk(bytes)?;
        for s in &segments.segments {
            let e = Encoded::parse(&bytes[s.encoded.clone()])?;
            if e.decoded_len() != s.raw.len() {
                return Err(corrupt(
                    "segment raw length",
                    s.raw.len() as u64,
                    "the segment's encoding decodes to another length",
                ));
            }
        }
        Ok(segments)
    }

    /// The segments, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Segment> {
        self.segments.iter()
    }

    /// The segments, in order, as a slice (a run of them is then a subslice).
    pub fn as_slice(&self) -> &[Segment] {
        &self.segments
    }

    /// How many segments there are (at least 1).
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Always false: a segmented encoding has at least one segment.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Bytes the whole encoding decodes to.
    pub fn decoded_len(&self) -> usize {
        self.segments.last().map_or(0, |s| s.raw.end)
    }

    /// The longest segment encoding (what a buffer holding one segment at a time needs).
    pub fn largest_encoded(&self) -> usize {
        self.segments
            .iter()
            .map(Segment::encoded_len)
            .max()
            .unwrap_or(0)
    }

    /// The longest raw range of a segment.
    pub fn largest_raw(&self) -> usize {
        self.segments.iter().map(|s| s.raw.len()).max().unwrap_or(0)
    }
}

impl<'s> IntoIterator for &'s Segments {
    type Item = &'s Segment;
    type IntoIter = std::slice::Iter<'s, Segment>;
    fn into_iter(self) -> Self::IntoIter {
        self.segments.iter()
    }
}

/// A segmented encoding planned ([`Encoder::plan_segmented`]): its exact length is known before
/// [`write`](SegmentedPlan::write) fills a buffer of that length.
#[derive(Clone, Debug)]
pub struct SegmentedPlan<'a> {
    plans: Vec<EncodePlan<'a>>,
    /// Where each segment's record starts.
    at: Vec<usize>,
    len: usize,
    raw: usize,
}

impl SegmentedPlan<'_> {
    /// Bytes of the segmented encoding.
    pub fn encoded_len(&self) -> usize {
        self.len
    }

    /// Bytes of the input.
    pub fn decoded_len(&self) -> usize {
        self.raw
    }

    /// The longest segment encoding (without its record).
    pub fn largest_encoded(&self) -> usize {
        self.plans
            .iter()
            .map(EncodePlan::encoded_len)
            .max()
            .unwrap_or(0)
    }

    /// Writes the segmented encoding into `out`, which must be
    /// [`encoded_len`](Self::encoded_len) bytes long; every byte is written.
    pub fn write(&self, out: &mut [u8]) -> Result<()> {
        if out.len() != self.len {
            return Err(CodecError::OutputLength {
                expected: self.len as u64,
                got: out.len() as u64,
            });
        }
        for (plan, &at) in self.plans.iter().zip(&self.at) {
            let len = plan.encoded_len();
            let raw = plan.header().decoded_len() as u32;
            let start = at + SEGMENT_RECORD_LEN;
            let end = start + len;
            out[at..at + 4].copy_from_slice(&SEGMENT_MAGIC);
            out[at + 4..at + 8].copy_from_slice(&raw.to_le_bytes());
            out[at + 8..start].copy_from_slice(&(len as u64).to_le_bytes());
            plan.write(&mut out[start..end])?;
            out[end..end.next_multiple_of(SEGMENT_ALIGN)].fill(0);
        }
        Ok(())
    }
}

impl Encoder {
    /// Plans the segmented encoding of `input` (see the [module](crate::segments)): one
    /// encoding per `segment_raw` bytes of it, each planned with these options. `segment_raw`
    /// must be a positive multiple of [`SEGMENT_ALIGN`] up to [`MAX_SEGMENT_RAW`]; a multiple of
    /// the chunk's bytes keeps every chunk whole (the same ratio as one encoding).
    pub fn plan_segmented<'a>(
        &self,
        input: &'a [u8],
        segment_raw: usize,
    ) -> Result<SegmentedPlan<'a>> {
        check_segment_raw(segment_raw)?;
        let plans = segment_ranges(input.len(), segment_raw)
            .map(|r| self.plan(&input[r]))
            .collect::<Result<Vec<_>>>()?;
        Ok(lay_out(plans, input.len()))
    }

    /// [`plan_segmented`](Self::plan_segmented) of an input of `total_len` bytes given as
    /// pieces, each `(offset, bytes)`, as [`plan_pieces`](Self::plan_pieces) takes them (bytes
    /// no piece covers are 0): the same bytes as the segmented encoding of the assembled input.
    pub fn plan_pieces_segmented<'a>(
        &self,
        pieces: &[(usize, &'a [u8])],
        total_len: usize,
        segment_raw: usize,
    ) -> Result<SegmentedPlan<'a>> {
        check_segment_raw(segment_raw)?;
        for &(o, p) in pieces {
            if !p.is_empty() && o.checked_add(p.len()).is_none_or(|end| end > total_len) {
                return Err(CodecError::InvalidOption {
                    option: "pieces",
                    value: format!("{} bytes at {o}", p.len()),
                    reason: "a piece ends past the input's total length",
                });
            }
        }
        let mut plans = Vec::new();
        for r in segment_ranges(total_len, segment_raw) {
            // Each piece's part inside the segment (overlaps stay overlaps: `plan_pieces` refuses
            // them).
            let inside: Vec<(usize, &'a [u8])> = pieces
                .iter()
                .filter_map(|&(o, p)| {
                    let (a, b) = (o.max(r.start), (o + p.len()).min(r.end));
                    (a < b).then(|| (a - r.start, &p[a - o..b - o]))
                })
                .collect();
            plans.push(self.plan_pieces(&inside, r.len())?);
        }
        Ok(lay_out(plans, total_len))
    }

    /// The segmented encoding of `input` (see [`plan_segmented`](Self::plan_segmented)).
    pub fn encode_segmented(&self, input: &[u8], segment_raw: usize) -> Result<Vec<u8>> {
        let plan = self.plan_segmented(input, segment_raw)?;
        let mut out = vec![0u8; plan.encoded_len()];
        plan.write(&mut out)?;
        Ok(out)
    }
}

/// The segmented encoding of `input` with the default options and all available cores (see
/// [`Encoder::plan_segmented`]); errors only on an invalid `segment_raw`.
pub fn encode_segmented(input: &[u8], segment_raw: usize) -> Result<Vec<u8>> {
    Encoder::new().encode_segmented(input, segment_raw)
}

fn check_segment_raw(segment_raw: usize) -> Result<()> {
    if segment_raw == 0
        || !segment_raw.is_multiple_of(SEGMENT_ALIGN)
        || segment_raw > MAX_SEGMENT_RAW
    {
        return Err(CodecError::InvalidOption {
            option: "segment_raw",
            value: segment_raw.to_string(),
            reason: "a positive multiple of 16 up to 2^31",
        });
    }
    Ok(())
}

/// The raw ranges of the segments of an input of `len` bytes (one empty range for 0 bytes).
fn segment_ranges(len: usize, segment_raw: usize) -> impl Iterator<Item = Range<usize>> {
    let n = len.div_ceil(segment_raw).max(1);
    (0..n).map(move |i| i * segment_raw..((i + 1) * segment_raw).min(len))
}

fn lay_out(plans: Vec<EncodePlan<'_>>, raw: usize) -> SegmentedPlan<'_> {
    let mut at = Vec::with_capacity(plans.len());
    let mut len = 0usize;
    for p in &plans {
        at.push(len);
        len = (len + SEGMENT_RECORD_LEN + p.encoded_len()).next_multiple_of(SEGMENT_ALIGN);
    }
    SegmentedPlan {
        plans,
        at,
        len,
        raw,
    }
}

/// Checks every segment of `encoded` ([`Segments::parse`]) and its checksum, on `threads`
/// threads (0: all available cores); returns the segments.
pub fn verify_segmented(encoded: &[u8], threads: usize) -> Result<Segments> {
    let segments = Segments::parse(encoded)?;
    for s in &segments {
        Encoded::parse(&encoded[s.encoded.clone()])?.verify_with_threads(threads)?;
    }
    Ok(segments)
}

/// Decodes segmented encoding `encoded` into `out` (its [`Segments::decoded_len`] bytes)
/// segment by segment, each verified first, on `threads` threads (0: all available cores).
pub fn decode_segmented(encoded: &[u8], out: &mut [u8], threads: usize) -> Result<()> {
    let segments = Segments::walk(encoded)?;
    if out.len() != segments.decoded_len() {
        return Err(CodecError::OutputLength {
            expected: segments.decoded_len() as u64,
            got: out.len() as u64,
        });
    }
    for s in &segments {
        crate::decode_with_threads(
            &encoded[s.encoded.clone()],
            &mut out[s.raw.clone()],
            threads,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16ish(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed);
                if i % 2 == 1 {
                    0x3c ^ (x >> 29) as u8
                } else {
                    (x >> 8) as u8
                }
            })
            .collect()
    }

    #[test]
    fn segments_tile_the_input_and_decode_back() {
        let seg = 64 * 1024;
        for n in [0, 1, 17, seg - 1, seg, seg + 1, 3 * seg, 5 * seg + 333] {
            let input = bf16ish(n, n as u32);
            let enc = Encoder::new().encode_segmented(&input, seg).unwrap();
            assert_eq!(enc.len() % SEGMENT_ALIGN, 0);
            let s = verify_segmented(&enc, 1).unwrap();
            assert_eq!(s.len(), n.div_ceil(seg).max(1), "{n} bytes");
            assert_eq!(s.decoded_len(), n);
            for (i, g) in s.iter().enumerate() {
                assert_eq!(g.raw, i * seg..((i + 1) * seg).min(n));
                assert_eq!(g.encoded.start % SEGMENT_ALIGN, 0);
                // Each segment is the plain encoding of its raw range.
                assert_eq!(
                    &enc[g.encoded.clone()],
                    &crate::encode(&input[g.raw.clone()])[..]
                );
            }
            let mut out = vec![0xa5; n];
            decode_segmented(&enc, &mut out, 2).unwrap();
            assert_eq!(out, input);
        }
    }

    #[test]
    fn pieces_give_the_bytes_of_the_assembled_input() {
        let seg = 1024;
        let total = 5000;
        let (a, b, c) = (bf16ish(700, 1), bf16ish(1000, 2), bf16ish(900, 3));
        let pieces = [(3000usize, &b[..]), (0, &a[..]), (4096, &c[..])];
        let mut assembled = vec![0u8; total];
        for (o, p) in pieces {
            assembled[o..o + p.len()].copy_from_slice(p);
        }
        let plan = Encoder::new()
            .with_chunk_values(256)
            .plan_pieces_segmented(&pieces, total, seg)
            .unwrap();
        let mut out = vec![0u8; plan.encoded_len()];
        plan.write(&mut out).unwrap();
        let want = Encoder::new()
            .with_chunk_values(256)
            .encode_segmented(&assembled, seg)
            .unwrap();
        assert_eq!(out, want);
        assert_eq!(
            plan.largest_encoded(),
            Segments::walk(&want).unwrap().largest_encoded()
        );
        // A piece past the end is refused, as by `plan_pieces`.
        let long = bf16ish(10, 4);
        assert!(
            Encoder::new()
                .plan_pieces_segmented(&[(4995, &long[..])], total, seg)
                .is_err()
        );
    }

    #[test]
    fn bad_segment_sizes_are_refused() {
        for s in [0, 8, 100, MAX_SEGMENT_RAW + 16] {
            assert!(matches!(
                Encoder::new().plan_segmented(&[0u8; 64], s),
                Err(CodecError::InvalidOption { .. })
            ));
        }
    }

    /// Truncation, a changed record, non-zero padding, trailing bytes and a changed encoding
    /// byte are each refused, never misread.
    #[test]
    fn damaged_segmentations_are_refused() {
        let input = bf16ish(3000, 9);
        let enc = Encoder::new()
            .with_chunk_values(256)
            .encode_segmented(&input, 1024)
            .unwrap();
        let s = Segments::walk(&enc).unwrap();
        assert_eq!(s.len(), 3);
        assert!(Segments::walk(&enc[..enc.len() - 16]).is_err(), "truncated");
        let mut extra = enc.clone();
        extra.extend_from_slice(&[0; 16]);
        assert!(Segments::walk(&extra).is_err(), "trailing bytes");
        let mut bad = enc.clone();
        bad[0] ^= 1;
        assert!(matches!(
            Segments::walk(&bad),
            Err(CodecError::BadMagic { .. })
        ));
        // The second record's raw length: walks, but parse sees the encoding disagree.
        let mut bad = enc.clone();
        let second = s.iter().nth(1).unwrap().encoded.start - SEGMENT_RECORD_LEN;
        bad[second + 4] ^= 1;
        assert!(Segments::parse(&bad).is_err());
        // The first record's encoded length.
        let mut bad = enc.clone();
        bad[8] ^= 1;
        assert!(Segments::walk(&bad).is_err());
        // Padding: the format's encodings are whole multiples of 16 bytes, so a record that
        // claims one byte more leaves 15 bytes of padding; walked while they are zero (parse
        // then refuses the encoding's length), refused once one is not.
        let one = crate::encode(&input[..1000]);
        let mut padded = Vec::from(SEGMENT_MAGIC);
        padded.extend_from_slice(&1000u32.to_le_bytes());
        padded.extend_from_slice(&(one.len() as u64 + 1).to_le_bytes());
        padded.extend_from_slice(&one);
        padded.extend_from_slice(&[0; 16]);
        assert_eq!(Segments::walk(&padded).unwrap().len(), 1);
        assert!(Segments::parse(&padded).is_err());
        let last = padded.len() - 1;
        padded[last] = 1;
        assert!(matches!(
            Segments::walk(&padded),
            Err(CodecError::CorruptHeader {
                field: "segment padding",
                ..
            })
        ));
        // A byte of the last encoding's data: structure fine, checksum not.
        let mut bad = enc.clone();
        let last = s.iter().last().unwrap().encoded.end - 1;
        bad[last] ^= 0x10;
        assert!(verify_segmented(&bad, 1).is_err());
        let mut out = vec![0u8; input.len()];
        assert!(decode_segmented(&bad, &mut out, 1).is_err());
    }
}
