//! The encoder's inner loop for one full group of 32 values with k <= 4 (every realistic weight
//! distribution's k, see the README) in SSE2, which every x86-64 processor has: sign and
//! mantissa, exponents, codes (each exponent compared with the 2^k - 1 table entries, 16 values
//! at a time, instead of one table lookup per value), bit planes and the escape mask, each with
//! a few vector instructions per 16 values. The scalar path in `encode.rs` is the reference:
//! both write the same bytes (tests/golden.rs pins them).

use crate::format::GROUP;
use std::arch::x86_64::{
    __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
    _mm_packus_epi16, _mm_set1_epi8, _mm_set1_epi16, _mm_slli_epi16, _mm_srli_epi16,
    _mm_storeu_si128, _mm_sub_epi8,
};

/// The largest k this path handles.
pub(crate) const MAX_K: usize = 4;

/// A chunk's code table as broadcast vectors: entry c is the exponent of code c in every byte,
/// with t - c (what a match takes off the escape code t) beside it.
#[derive(Clone, Copy)]
pub(crate) struct Table {
    entries: [(__m128i, __m128i); (1 << MAX_K) - 1],
    t: __m128i,
    len: usize,
}

impl Table {
    /// The table of exponents `table` (2^k - 1 of them, k <= [`MAX_K`]).
    pub(crate) fn new(table: &[u8]) -> Table {
        assert!(table.len() < 1 << MAX_K, "k <= MAX_K");
        let t = table.len() as u8;
        // SAFETY: register-only intrinsics of SSE2, part of every x86-64 target's baseline.
        unsafe {
            let mut entries = [(_mm_set1_epi8(0), _mm_set1_epi8(0)); (1 << MAX_K) - 1];
            for (c, &e) in table.iter().enumerate() {
                entries[c] = (_mm_set1_epi8(e as i8), _mm_set1_epi8((t - c as u8) as i8));
            }
            Table {
                entries,
                t: _mm_set1_epi8(t as i8),
                len: table.len(),
            }
        }
    }
}

/// One full group: writes its sign and mantissa bytes into `sign_mant`; returns its K bit planes
/// (bit l of plane b: bit b of value l's code) and its escape mask (bit l: value l escapes).
#[inline]
pub(crate) fn group<const K: usize>(
    vals: &[u8; 2 * GROUP],
    table: &Table,
    sign_mant: &mut [u8; GROUP],
) -> ([u32; K], u32) {
    debug_assert!(K <= MAX_K && table.len == (1 << K) - 1);
    let mut planes = [0u32; K];
    let mut escaped = 0u32;
    // SAFETY: SSE2 is part of every x86-64 target's baseline. The loads read bytes 32h..32h+32
    // of `vals` (64 bytes) and the store writes bytes 16h..16h+16 of `sign_mant` (32 bytes), for
    // h in 0..2: in bounds; `loadu`/`storeu` need no alignment.
    unsafe {
        let low7 = _mm_set1_epi16(0x7f);
        let sign = _mm_set1_epi16(0x80);
        let byte = _mm_set1_epi16(0xff);
        for h in 0..2 {
            let at = vals.as_ptr().add(32 * h);
            let a = _mm_loadu_si128(at.cast::<__m128i>()); // values 16h..16h+8, one per u16
            let b = _mm_loadu_si128(at.add(16).cast::<__m128i>()); // values 16h+8..16h+16
            // Per value: sign << 7 | mantissa, and the exponent, each in the low byte of its
            // u16 lane, then packed to 16 bytes (every lane is <= 0xff, so no saturation).
            let sm = |v| {
                _mm_or_si128(
                    _mm_and_si128(v, low7),
                    _mm_and_si128(_mm_srli_epi16::<8>(v), sign),
                )
            };
            let ex = |v| _mm_and_si128(_mm_srli_epi16::<7>(v), byte);
            _mm_storeu_si128(
                sign_mant.as_mut_ptr().add(16 * h).cast::<__m128i>(),
                _mm_packus_epi16(sm(a), sm(b)),
            );
            let e = _mm_packus_epi16(ex(a), ex(b));
            // Code t (the escape) unless the exponent is table entry c: then t - (t - c) = c.
            // The table's exponents are distinct, so at most one entry matches.
            let mut codes = table.t;
            for &(x, d) in &table.entries[..table.len] {
                codes = _mm_sub_epi8(codes, _mm_and_si128(_mm_cmpeq_epi8(e, x), d));
            }
            let esc = _mm_movemask_epi8(_mm_cmpeq_epi8(codes, table.t)) as u32 & 0xffff;
            escaped |= esc << (16 * h);
            // Plane b: bit b of every byte moved to its top bit (a 16-bit shift left by 7 takes
            // the high byte's bit 0 to bit 15 and the low byte's to bit 7), gathered by movemask;
            // a shift right by 1 brings the next bit down (what crosses into a low byte's bit 7
            // is shifted out again).
            let mut y = codes;
            for p in &mut planes {
                let bits = _mm_movemask_epi8(_mm_slli_epi16::<7>(y)) as u32 & 0xffff;
                *p |= bits << (16 * h);
                y = _mm_srli_epi16::<1>(y);
            }
        }
    }
    (planes, escaped)
}
