//! Integrity of encodings that cross a process or file boundary, and the public size helpers on
//! extreme arguments: a corrupted encoding is a typed error, never other bytes and never a panic.

use codec_testkit as common;

use common::{Dist, Rng, generate};
use layerwise_offload_codec::{CodecError, Encoder, decode, decoded_len, max_encoded_len, verify};

/// An encoding with two-tier and one-tier coded chunks of several widths (with escapes), raw
/// chunks and a tail byte.
fn sample() -> (Vec<u8>, Vec<u8>) {
    let mut input = generate(Dist::Normal, 2 * 4096, 1);
    input.extend(generate(Dist::RandomBits, 2 * 1024, 2));
    input.extend(generate(Dist::StudentT, 2 * 3000, 3));
    input.extend(generate(Dist::Fp32Normal, 2 * 1024 + 1, 4));
    let encoded = Encoder::new()
        .with_chunk_values(1024)
        .encode(&input)
        .unwrap();
    let st = layerwise_offload_codec::stats(&encoded).unwrap();
    assert!(
        st.two_tier_chunks > 0 && st.coded_chunks > 0 && st.raw_chunks > 0,
        "{st:?}"
    );
    (input, encoded)
}

/// Decodes `bad`; the test fails when it decodes to anything (the corruption went unnoticed) or
/// panics.
fn assert_detected(bad: &[u8], what: &str) {
    let result = std::panic::catch_unwind(|| {
        let len = decoded_len(bad)?;
        let mut out = vec![0u8; len];
        decode(bad, &mut out).map(|()| out)
    });
    match result {
        Err(_) => panic!("{what}: the decoder panicked"),
        Ok(Ok(_)) => panic!("{what}: decoded silently"),
        Ok(Err(e)) => {
            // verify, without decoding, finds it too.
            assert!(
                verify(bad).is_err(),
                "{what}: decode refused it ({e}) but verify did not"
            );
        }
    }
}

#[test]
fn every_corruption_is_detected() {
    let (input, encoded) = sample();
    let mut out = vec![0u8; input.len()];
    decode(&encoded, &mut out).unwrap();
    assert_eq!(out, input);
    let mut rng = Rng::new(22, 11);
    for case in 0..4000 {
        let mut bad = encoded.clone();
        let at = (rng.next_u64() % bad.len() as u64) as usize;
        let what = if case % 2 == 0 {
            let bit = rng.next_u64() % 8;
            bad[at] ^= 1 << bit;
            format!("case {case}: bit {bit} of byte {at} flipped")
        } else {
            let b = bad[at].wrapping_add(1 + (rng.next_u64() % 255) as u8);
            bad[at] = b;
            format!("case {case}: byte {at} set to {b:#x}")
        };
        assert_detected(&bad, &what);
        // A change that parses is named as a checksum error.
        if layerwise_offload_codec::Encoded::parse(&bad).is_ok() {
            assert!(
                matches!(verify(&bad), Err(CodecError::Checksum { .. })),
                "{what}: {:?}",
                verify(&bad)
            );
        }
    }
    // Several changes at once, far apart.
    for case in 0..500 {
        let mut bad = encoded.clone();
        for _ in 0..2 + case % 5 {
            let at = (rng.next_u64() % bad.len() as u64) as usize;
            bad[at] ^= 1 << (rng.next_u64() % 8);
        }
        if bad != encoded {
            assert_detected(&bad, &format!("multi-flip case {case}"));
        }
    }
}

#[test]
fn size_helpers_do_not_overflow_on_extreme_arguments() {
    for raw in [
        0usize,
        1,
        2,
        511,
        512,
        usize::MAX / 4,
        usize::MAX / 2,
        usize::MAX - 1,
        usize::MAX,
    ] {
        // Chunk sizes the encoder refuses have no bound.
        for cv in [0u32, 1, 255, 257, (1 << 22) + 256, u32::MAX] {
            assert_eq!(
                max_encoded_len(raw, cv),
                None,
                "raw {raw}, chunk_values {cv}"
            );
        }
        for cv in [256u32, 32768, 1 << 22] {
            let got = max_encoded_len(raw, cv);
            // The bound in 128-bit arithmetic: header, an entry per chunk, the values padded.
            let n_values = raw as u128 / 2;
            let exact =
                48 + 16 * n_values.div_ceil(u128::from(cv)) + (2 * n_values).div_ceil(16) * 16;
            match got {
                Some(b) => assert_eq!(b as u128, exact, "raw {raw}, chunk_values {cv}"),
                None => assert!(
                    exact > usize::MAX as u128,
                    "raw {raw}, chunk_values {cv}: {exact} fits"
                ),
            }
        }
    }
    // An empty input is the header alone.
    assert_eq!(
        max_encoded_len(0, 256),
        Some(layerwise_offload_codec::format::HEADER_LEN)
    );
}

#[test]
fn chunk_len_past_the_last_chunk_is_none() {
    let (input, encoded) = sample();
    let view = layerwise_offload_codec::Encoded::parse(&encoded).unwrap();
    let h = view.header();
    let lens: Vec<usize> = (0..h.n_chunks()).map(|i| h.chunk_len(i).unwrap()).collect();
    assert_eq!(lens.iter().sum::<usize>(), input.len() / 2);
    assert!(lens[..lens.len() - 1].iter().all(|&n| n == 1024));
    for i in [h.n_chunks(), h.n_chunks() + 1, u32::MAX] {
        assert_eq!(h.chunk_len(i), None, "chunk {i} of {}", h.n_chunks());
    }
    // And on an empty encoding, which has no chunk at all.
    let empty = layerwise_offload_codec::encode(&[]);
    let view = layerwise_offload_codec::Encoded::parse(&empty).unwrap();
    assert_eq!(view.header().chunk_len(0), None);
}
