//! The encoder's output bytes are pinned: hashes of the encodings of fixed inputs, recorded with
//! the first (straightforward) encoder, so that a faster encoder must write the very same bytes
//! (the same k, tables, planes, exceptions and padding), not just bytes that decode back.
//!
//! Format version 2 added a checksum to a 48-byte header. The version 1 hashes are kept: each
//! encoding rewritten in version 1's layout (`as_version1`: the old header, offsets 16 bytes
//! lower) must still hash to them, which shows that the change left every chunk's bytes as they
//! were. The version 2 hashes were recorded when the header changed, once that check passed.

use codec_testkit as common;

use common::{Dist, Rng, as_version1, every_pattern, generate, values};
use layerwise_offload_codec::Encoder;
use layerwise_offload_codec::format::MAX_CODE_BITS;

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

/// The encodings of every distribution (odd length: a tail byte and a short last chunk) with
/// the default options and a few others.
fn distributions() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for dist in Dist::ALL {
        let data = generate(dist, (3 << 20) + 2 * 1000 + 1, 3);
        out.push(Encoder::new().encode(&data).unwrap());
        out.push(
            Encoder::new()
                .with_chunk_values(4096)
                .with_code_bits(2..=4)
                .encode(&data)
                .unwrap(),
        );
        out.push(
            Encoder::new()
                .with_chunk_values(256)
                .with_threads(3)
                .encode(&data)
                .unwrap(),
        );
        out.push(Encoder::new().raw_only().encode(&data[..5001]).unwrap());
    }
    out
}

/// Every bf16 pattern, in order and shuffled, with every fixed code width.
fn patterns() -> Vec<Vec<u8>> {
    let [sequential, shuffled] = every_pattern();
    let mut out = Vec::new();
    for input in [&sequential, &shuffled] {
        out.push(Encoder::new().encode(input).unwrap());
        for k in 1..=MAX_CODE_BITS {
            for cv in [256, 1024] {
                out.push(
                    Encoder::new()
                        .with_chunk_values(cv)
                        .with_code_bits(k..=k)
                        .encode(input)
                        .unwrap(),
                );
            }
        }
    }
    out
}

/// Few exponents with escapes, and random bytes, at many lengths (odd ones too) and options.
fn small() -> Vec<Vec<u8>> {
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
        out.push(
            Encoder::new()
                .with_chunk_values(cv)
                .with_code_bits(lo..=hi)
                .with_threads(1 + (case % 3) as usize)
                .encode(&data)
                .unwrap(),
        );
    }
    out
}

#[test]
fn encodings_of_fixed_inputs_are_pinned() {
    let sets = [distributions(), patterns(), small()];
    let v1 = |set: &Vec<Vec<u8>>| fnv(&set.iter().map(|e| as_version1(e)).collect::<Vec<_>>());
    let got_v1 = [v1(&sets[0]), v1(&sets[1]), v1(&sets[2])];
    let expected_v1 = [
        0xe6de_f985_7208_8b80,
        0xbe51_a25b_f4ac_f108,
        0xb423_6e1e_b296_8b1e,
    ];
    assert_eq!(
        got_v1, expected_v1,
        "the chunks the encoder writes changed (hashes in version 1's layout of: distributions, patterns, small inputs)"
    );
    let got = [fnv(&sets[0]), fnv(&sets[1]), fnv(&sets[2])];
    let expected = [
        0x014d_da95_b58c_03d1,
        0x61bd_e7ba_783b_67c2,
        0x8d99_f7b5_fe1a_dc0c,
    ];
    assert_eq!(
        got, expected,
        "the encoder's output changed (hashes of: distributions, patterns, small inputs)"
    );
}
