//! `Encoder::plan_pieces`: an input given as pieces at offsets (the bytes between them 0)
//! encodes byte for byte as the assembled input does, whatever the layout: odd offsets and
//! lengths, pieces across chunk edges, gaps, adjacent and empty pieces, an odd total length.

use codec_testkit as common;

use common::{Dist, generate};
use layerwise_offload_codec::{CodecError, Encoder};
use proptest::prelude::*;

/// The input of `total_len` bytes with `pieces` in place and 0 elsewhere.
fn assemble(pieces: &[(usize, &[u8])], total_len: usize) -> Vec<u8> {
    let mut out = vec![0u8; total_len];
    for &(o, p) in pieces {
        out[o..o + p.len()].copy_from_slice(p);
    }
    out
}

/// Encodes `pieces` with `plan_pieces` + `write` (into a dirty buffer) and checks the bytes
/// against `encode` of the assembled input.
fn check(encoder: &Encoder, pieces: &[(usize, &[u8])], total_len: usize) {
    let expected = encoder
        .encode(&assemble(pieces, total_len))
        .expect("valid options");
    let plan = encoder
        .plan_pieces(pieces, total_len)
        .expect("valid pieces");
    assert_eq!(plan.encoded_len(), expected.len());
    let mut out = vec![0x5Au8; plan.encoded_len()];
    plan.write(&mut out).expect("right length");
    assert!(
        out == expected,
        "plan_pieces differs from plan of the assembled input ({} pieces, {total_len} bytes)",
        pieces.len()
    );
}

/// Bytes that make coded chunks with escapes (a few exponents, some far ones) or raw ones.
fn source(len: usize, narrow: bool, seed: u64) -> Vec<u8> {
    let mut rng = common::Rng::new(seed, 0);
    if !narrow {
        return (0..len).map(|_| rng.next_u64() as u8).collect();
    }
    (0..len.div_ceil(2))
        .flat_map(|_| {
            let r = rng.next_u64();
            let e = if r.is_multiple_of(53) {
                (r >> 8) as u16 & 0xff
            } else {
                0x76 + (r >> 16) as u16 % 6
            };
            ((e << 7) | ((r >> 32) as u16 & 0x807f)).to_le_bytes()
        })
        .take(len)
        .collect()
}

/// A layout from `(gap before, length)` pairs placed one after another from offset 0, then
/// `extra` bytes; the pieces are cut from `data` in order.
fn layout<'a>(
    spec: &[(usize, usize)],
    extra: usize,
    data: &'a [u8],
) -> (Vec<(usize, &'a [u8])>, usize) {
    let mut pieces = Vec::with_capacity(spec.len());
    let (mut at, mut src) = (0usize, 0usize);
    for &(gap, len) in spec {
        at += gap;
        pieces.push((at, &data[src..src + len]));
        at += len;
        src += len;
    }
    (pieces, at + extra)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn pieces_encode_as_the_assembled_input(
        spec in proptest::collection::vec(
            (
                prop_oneof![Just(0usize), 0usize..8, 0usize..1200],
                prop_oneof![Just(0usize), 1usize..8, 0usize..3000],
            ),
            0..12,
        ),
        extra in prop_oneof![Just(0usize), 0usize..5, 0usize..900],
        cv in prop::sample::select(vec![256u32, 512, 1024]),
        narrow in any::<bool>(),
        threads in 1usize..4,
        order in any::<u64>(),
        seed in any::<u64>(),
    ) {
        let total: usize = spec.iter().map(|s| s.1).sum();
        let data = source(total, narrow, seed);
        let (mut pieces, total_len) = layout(&spec, extra, &data);
        // Any order.
        let n = pieces.len();
        if n > 1 {
            for i in 0..n {
                pieces.swap(i, (order.rotate_left(i as u32 * 5) as usize) % n);
            }
        }
        let encoder = Encoder::new().with_chunk_values(cv).with_threads(threads);
        check(&encoder, &pieces, total_len);
    }
}

#[test]
fn one_piece_of_the_whole_input_is_plan() {
    let data = generate(Dist::Normal, 3 * 65536 + 7, 5);
    check(&Encoder::new(), &[(0, &data[..])], data.len());
    // And with the default chunks: many chunks inside one piece, one across two, a gap.
    let (a, b) = data.split_at(65536 + 1001);
    check(
        &Encoder::new().with_threads(2),
        &[(0, a), (a.len() + 300, b)],
        data.len() + 300 + 5,
    );
    check(&Encoder::new(), &[], 0);
    check(&Encoder::new(), &[], 1001);
    check(&Encoder::new(), &[(1000, &data[..1])], 1001);
}

#[test]
fn overlapping_or_outside_pieces_are_errors() {
    let data = [1u8; 100];
    let bad = |pieces: &[(usize, &[u8])], total_len| {
        matches!(
            Encoder::new().plan_pieces(pieces, total_len),
            Err(CodecError::InvalidOption {
                option: "pieces",
                ..
            })
        )
    };
    assert!(bad(&[(0, &data[..10]), (9, &data[..10])], 100));
    assert!(bad(&[(50, &data[..10]), (0, &data[..51])], 100));
    assert!(bad(&[(95, &data[..10])], 100));
    assert!(bad(&[(usize::MAX, &data[..1])], 100));
    // Empty pieces are ignored wherever they are; touching pieces are fine.
    assert!(!bad(
        &[(0, &data[..10]), (10, &data[..10]), (500, &[])],
        100
    ));
}
