//! The encoder's output bytes are pinned: hashes of the encodings of fixed inputs, so that a
//! faster encoder must write the very same bytes (the same modes, tables, planes, codes,
//! exceptions and padding), not just bytes that decode back.
//!
//! - One tier (`Encoder::single_tier`): format version 3 stores one-tier chunks exactly as
//!   version 2 did, so these encodings, relabelled as version 2 (`as_version2`), must hash to
//!   the version 2 values recorded by the first (straightforward) encoder, and rewritten in
//!   version 1's layout (`as_version1`: a 32-byte header, offsets 16 bytes lower) to the
//!   version 1 values.
//! - Two tiers (the default): the version 3 hashes were recorded with the first two-tier
//!   encoder, and each encoding is checked here against an independent reference: it decodes
//!   back bit-exactly, and every chunk's mode, (k1, k2) or k, and size are those a brute-force
//!   size computation over all candidates (written out in this file, from the format's
//!   description) picks.

use codec_testkit as common;

use common::{Dist, Rng, as_version1, as_version2, every_pattern, generate, values};
use layerwise_offload_codec::format::{MAX_CODE_BITS, MAX_TIER1_BITS, MAX_TIER2_BITS};
use layerwise_offload_codec::{Encoder, decode};
use std::ops::RangeInclusive;

/// FNV-1a, 64 bits, over `parts` in order (each part's length first).
fn fnv(parts: &[Vec<u8>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for p in parts {
        for b in (p.len() as u64).to_le_bytes() {
            eat(b);
        }
        for &b in p {
            eat(b);
        }
    }
    h
}

/// An input and the options it is encoded with: chunk values, code bits (`None`: raw only),
/// threads.
struct Case {
    input: Vec<u8>,
    chunk_values: u32,
    code_bits: Option<RangeInclusive<u8>>,
    threads: usize,
}

impl Case {
    fn new(input: Vec<u8>, chunk_values: u32, code_bits: Option<RangeInclusive<u8>>) -> Case {
        Case {
            input,
            chunk_values,
            code_bits,
            threads: 0,
        }
    }

    fn encoder(&self) -> Encoder {
        let e = Encoder::new()
            .with_chunk_values(self.chunk_values)
            .with_threads(self.threads);
        match &self.code_bits {
            Some(bits) => e.with_code_bits(bits.clone()),
            None => e.raw_only(),
        }
    }
}

/// Every distribution (odd length: a tail byte and a short last chunk) with the default
/// options and a few others.
fn distributions() -> Vec<Case> {
    let mut out = Vec::new();
    for dist in Dist::ALL {
        let data = generate(dist, (3 << 20) + 2 * 1000 + 1, 3);
        out.push(Case::new(data.clone(), 32768, Some(1..=MAX_CODE_BITS)));
        out.push(Case::new(data.clone(), 4096, Some(2..=4)));
        let mut c = Case::new(data.clone(), 256, Some(1..=MAX_CODE_BITS));
        c.threads = 3;
        out.push(c);
        out.push(Case::new(data[..5001].to_vec(), 32768, None));
    }
    out
}

/// Every bf16 pattern, in order and shuffled, with every fixed code width.
fn patterns() -> Vec<Case> {
    let [sequential, shuffled] = every_pattern();
    let mut out = Vec::new();
    for input in [&sequential, &shuffled] {
        out.push(Case::new(input.clone(), 32768, Some(1..=MAX_CODE_BITS)));
        for k in 1..=MAX_CODE_BITS {
            for cv in [256, 1024] {
                out.push(Case::new(input.clone(), cv, Some(k..=k)));
            }
        }
    }
    out
}

/// Few exponents with escapes, and random bytes, at many lengths (odd ones too) and options.
fn small() -> Vec<Case> {
    let mut rng = Rng::new(11, 0);
    let mut out = Vec::new();
    for case in 0..400u64 {
        let len = (rng.next_u64() % 6000) as usize;
        let narrow = case % 2 == 0;
        let data: Vec<u8> = if narrow {
            let mut v = values((0..len / 2).map(|_| {
                let r = rng.next_u64();
                // Exponents 0x76.. with a spread of 1..=14 values, a few far ones.
                let spread = 1 + (case % 14) as u16;
                let e = if r.is_multiple_of(97) {
                    (r >> 8) as u16 & 0xff
                } else {
                    0x76 + (r >> 16) as u16 % spread
                };
                (e << 7) | ((r >> 32) as u16 & 0x807f)
            }));
            if len % 2 == 1 {
                v.push(rng.next_u64() as u8);
            }
            v
        } else {
            (0..len).map(|_| rng.next_u64() as u8).collect()
        };
        let cv = [256u32, 512, 768, 1024, 32768][(case % 5) as usize];
        let lo = 1 + (rng.next_u64() % 7) as u8;
        let hi = (lo + (rng.next_u64() % 7) as u8).min(MAX_CODE_BITS);
        let mut c = Case::new(data, cv, Some(lo..=hi));
        c.threads = 1 + (case % 3) as usize;
        out.push(c);
    }
    out
}

fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// The reference choice for one chunk of `vals` (2n bytes): `(mode, k, k2, size)` of the
/// smallest of raw, one tier of k bits (k in `code_bits`) and two tiers of (k1, k2) bits (k1
/// in `code_bits` and 1..=4, k2 in 1..=5), the first of them on a tie in that order; sizes from
/// the format's description.
fn reference_choice(vals: &[u8], code_bits: &Option<RangeInclusive<u8>>) -> (u8, u8, u8, usize) {
    let n = vals.len() / 2;
    let mut counts = [0usize; 256];
    for v in vals.chunks_exact(2) {
        counts[usize::from(u16::from_le_bytes([v[0], v[1]]) >> 7 & 0xff)] += 1;
    }
    counts.sort_unstable_by(|a, b| b.cmp(a));
    // Values not among the j most frequent exponents.
    let rest = |j: usize| n - counts[..j].iter().sum::<usize>();
    let g = n.div_ceil(32);
    let mut best = (0u8, 0u8, 0u8, pad16(2 * n));
    let Some(bits) = code_bits else { return best };
    for k in bits.clone() {
        let t = (1usize << k) - 1;
        let size = pad16(t) + pad16(4 * g * usize::from(k)) + pad16(n) + pad16(rest(t));
        if size < best.3 {
            best = (1, k, 0, size);
        }
    }
    for k1 in bits.clone().filter(|&k| k <= MAX_TIER1_BITS) {
        for k2 in 1..=MAX_TIER2_BITS {
            let (t1, t2) = ((1usize << k1) - 1, (1usize << k2) - 1);
            let size = pad16(4 + t1 + t2)
                + pad16(4 * g * usize::from(k1))
                + pad16(n)
                + pad16((rest(t1) * usize::from(k2)).div_ceil(8))
                + pad16(rest(t1 + t2));
            if size < best.3 {
                best = (2, k1, k2, size);
            }
        }
    }
    best
}

/// Checks `encoded` (of `case`) against the reference: it decodes to the input, and each
/// directory entry's mode and code bits, and its chunk's size, are the reference choice.
/// Returns the number of two-tier chunks.
fn check_against_reference(case: &Case, encoded: &[u8]) -> usize {
    let mut out = vec![0u8; case.input.len()];
    decode(encoded, &mut out).unwrap();
    assert!(out == case.input, "decodes back bit-exactly");
    let cv = 2 * case.chunk_values as usize;
    let values = &case.input[..case.input.len() / 2 * 2];
    let n_chunks = values.len().div_ceil(cv);
    assert_eq!(
        u32::from_le_bytes(encoded[12..16].try_into().unwrap()) as usize,
        n_chunks
    );
    let mut two_tier = 0;
    for (i, vals) in values.chunks(cv).enumerate() {
        let e = &encoded[48 + 16 * i..48 + 16 * i + 16];
        let offset = u64::from_le_bytes(e[..8].try_into().unwrap()) as usize;
        let end = if i + 1 < n_chunks {
            u64::from_le_bytes(encoded[64 + 16 * i..72 + 16 * i].try_into().unwrap()) as usize
        } else {
            encoded.len()
        };
        let (mode, k, k2, size) = reference_choice(vals, &case.code_bits);
        assert_eq!(
            (e[12], e[13], e[14], end - offset),
            (mode, k, k2, size),
            "chunk {i}: (mode, k, k2, size) against the reference"
        );
        two_tier += usize::from(mode == 2);
    }
    two_tier
}

#[test]
fn one_tier_encodings_are_pinned_as_versions_1_and_2() {
    let sets = [distributions(), patterns(), small()];
    let encode = |set: &Vec<Case>| -> Vec<Vec<u8>> {
        set.iter()
            .map(|c| {
                let e = c.encoder().single_tier().encode(&c.input).unwrap();
                as_version2(&e).expect("one tier only")
            })
            .collect()
    };
    let v2: Vec<Vec<Vec<u8>>> = sets.iter().map(encode).collect();
    let v1 = |set: &Vec<Vec<u8>>| fnv(&set.iter().map(|e| as_version1(e)).collect::<Vec<_>>());
    let got_v1 = [v1(&v2[0]), v1(&v2[1]), v1(&v2[2])];
    let expected_v1 = [
        0xe6de_f985_7208_8b80,
        0xbe51_a25b_f4ac_f108,
        0xb423_6e1e_b296_8b1e,
    ];
    assert_eq!(
        got_v1, expected_v1,
        "the one-tier chunks the encoder writes changed (hashes in version 1's layout of: distributions, patterns, small inputs)"
    );
    let got_v2 = [fnv(&v2[0]), fnv(&v2[1]), fnv(&v2[2])];
    let expected_v2 = [
        0x014d_da95_b58c_03d1,
        0x61bd_e7ba_783b_67c2,
        0x8d99_f7b5_fe1a_dc0c,
    ];
    assert_eq!(
        got_v2, expected_v2,
        "the one-tier encodings changed (hashes as version 2 of: distributions, patterns, small inputs)"
    );
}

#[test]
fn two_tier_encodings_match_the_reference_and_are_pinned() {
    let sets = [distributions(), patterns(), small()];
    let mut two_tier = [0usize; 3];
    let encodings: Vec<Vec<Vec<u8>>> = sets
        .iter()
        .zip(&mut two_tier)
        .map(|(set, n)| {
            set.iter()
                .map(|c| {
                    let e = c.encoder().encode(&c.input).unwrap();
                    *n += check_against_reference(c, &e);
                    e
                })
                .collect()
        })
        .collect();
    // The default options pick two tiers for weight-like data and for some small inputs.
    assert!(two_tier[0] > 0 && two_tier[2] > 0, "{two_tier:?}");
    let got = [fnv(&encodings[0]), fnv(&encodings[1]), fnv(&encodings[2])];
    let expected = [
        0x6be0_44b5_2128_7821,
        0x03b9_652a_ffbe_8374,
        0x6da5_9d2f_030c_53e1,
    ];
    assert_eq!(
        got, expected,
        "the encoder's output changed (version 3 hashes of: distributions, patterns, small inputs)"
    );
}
