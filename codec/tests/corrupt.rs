//! Truncated, extended and corrupted encodings are errors, never panics or out-of-bounds reads.

use codec_testkit as common;

use common::{Dist, as_version1, as_version2, generate, reseal};
use layerwise_offload_codec::format::{ENTRY_LEN, HEADER_LEN, MAGIC};
use layerwise_offload_codec::{CodecError, Encoded, Encoder, decode, decoded_len, stats};
use proptest::prelude::*;

/// A small encoding with two-tier chunks (with second-tier escapes), one-tier coded chunks (with
/// escapes), a raw chunk and an odd tail byte.
fn sample() -> (Vec<u8>, Vec<u8>) {
    let mut input = generate(Dist::Normal, 2 * 2048, 1);
    input.extend(generate(Dist::RandomBits, 2 * 1024, 2));
    // A chunk where one tier of k = 2 wins.
    input.extend(common::values((0..1024u16).map(|i| {
        // Three exponents equally often, and 2% escapes with distinct exponents (which a
        // second tier would not shorten).
        let e = if i % 50 == 7 {
            0x10 + i / 50
        } else {
            0x78 + i % 3
        };
        (e << 7) | (i.wrapping_mul(37) & 0x807f)
    })));
    input.extend(generate(Dist::StudentT, 2 * 700 + 1, 3));
    let encoded = Encoder::new()
        .with_chunk_values(1024)
        .encode(&input)
        .unwrap();
    let st = stats(&encoded).unwrap();
    assert!(
        st.raw_chunks > 0
            && st.coded_chunks > 0
            && st.two_tier_chunks > 0
            && st.exceptions > 0
            && st.tier1_escapes > st.exceptions,
        "{st:?}"
    );
    (input, encoded)
}

/// Decodes with every entry point; `Ok(output)` or the decode error. Never panics (the test
/// fails if it does).
fn try_decode(encoded: &[u8]) -> Result<Vec<u8>, CodecError> {
    let len = decoded_len(encoded)?;
    stats(encoded)?;
    let mut out = vec![0u8; len];
    decode(encoded, &mut out)?;
    Ok(out)
}

#[test]
fn every_truncation_and_extension_is_an_error() {
    let (input, encoded) = sample();
    assert_eq!(try_decode(&encoded).unwrap(), input);
    for len in 0..encoded.len() {
        assert!(
            try_decode(&encoded[..len]).is_err(),
            "truncated to {len} of {} bytes",
            encoded.len()
        );
    }
    let mut longer = encoded.clone();
    longer.push(0);
    assert!(try_decode(&longer).is_err());
}

#[test]
fn every_byte_flip_is_an_error() {
    let (_, encoded) = sample();
    for at in 0..encoded.len() {
        for mask in [0x01u8, 0x10, 0x80, 0xff] {
            let mut bad = encoded.clone();
            bad[at] ^= mask;
            // Header, directory, chunk data and padding: the checksum covers every byte.
            assert!(
                try_decode(&bad).is_err(),
                "flip {mask:#x} at byte {at} of {} accepted",
                encoded.len()
            );
        }
    }
}

#[test]
fn changed_bytes_are_a_checksum_error_and_verify_finds_them() {
    let (_, encoded) = sample();
    layerwise_offload_codec::verify(&encoded).unwrap();
    let data_offset = Encoded::parse(&encoded).unwrap().header().data_offset() as usize;
    // A chunk byte, the tail byte and n_values within the last chunk's padding parse but are
    // caught by the checksum; so is a change of the checksum itself.
    for at in [data_offset + 40, encoded.len() - 20, 7, 32, 35] {
        let mut bad = encoded.clone();
        bad[at] ^= 0x04;
        for r in [
            layerwise_offload_codec::verify(&bad),
            decode(&bad, &mut vec![0u8; decoded_len(&bad).unwrap()]),
        ] {
            assert!(
                matches!(r, Err(CodecError::Checksum { .. })),
                "byte {at}: {r:?}"
            );
        }
        // Sealed again (as a writer that means it would), the bytes decode.
        reseal(&mut bad);
        layerwise_offload_codec::verify(&bad).unwrap();
    }
}

#[test]
fn version_1_and_2_encodings_are_refused_by_their_version() {
    let (input, _) = sample();
    let one_tier = Encoder::new()
        .with_chunk_values(1024)
        .single_tier()
        .encode(&input)
        .unwrap();
    let v2 = as_version2(&one_tier).expect("one-tier chunks only");
    let v1 = as_version1(&v2);
    for (old, found) in [(v1, 1u16), (v2, 2)] {
        let mut out = vec![0u8; input.len()];
        for r in [
            layerwise_offload_codec::verify(&old).map(|_| 0),
            decoded_len(&old),
            decode(&old, &mut out).map(|_| 0),
        ] {
            match r {
                Err(
                    e @ CodecError::UnsupportedVersion {
                        found: f,
                        supported: 3,
                    },
                ) if f == found => {
                    assert!(e.to_string().contains("encode the data again"), "{e}")
                }
                r => panic!("version {found}: expected UnsupportedVersion, got {r:?}"),
            }
        }
    }
}

#[test]
fn header_fields_are_checked() {
    let (_, encoded) = sample();
    let set = |at: usize, bytes: &[u8]| {
        let mut bad = encoded.clone();
        bad[at..at + bytes.len()].copy_from_slice(bytes);
        try_decode(&bad).unwrap_err()
    };
    assert!(matches!(set(0, b"XXXX"), CodecError::BadMagic { expected, .. } if expected == MAGIC));
    for old_or_new in [0u16, 1, 2, 4] {
        assert!(matches!(
            set(4, &old_or_new.to_le_bytes()),
            CodecError::UnsupportedVersion { found, .. } if found == old_or_new
        ));
    }
    assert!(matches!(
        set(40, &[1]),
        CodecError::CorruptHeader {
            field: "reserved",
            ..
        }
    ));
    assert!(matches!(
        set(6, &[2]),
        CodecError::CorruptHeader {
            field: "tail_len",
            ..
        }
    ));
    assert!(matches!(
        set(8, &100u32.to_le_bytes()),
        CodecError::CorruptHeader {
            field: "chunk_values",
            ..
        }
    ));
    assert!(matches!(
        set(8, &512u32.to_le_bytes()),
        CodecError::CorruptHeader {
            field: "n_chunks",
            ..
        }
    ));
    assert!(matches!(
        set(16, &u64::MAX.to_le_bytes()),
        CodecError::CorruptHeader {
            field: "n_values",
            ..
        }
    ));
    assert!(matches!(
        set(24, &1u64.to_le_bytes()),
        CodecError::CorruptHeader {
            field: "encoded_len",
            ..
        }
    ));
    // A directory that claims more chunks than the buffer holds.
    let mut huge = encoded[..HEADER_LEN].to_vec();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    huge[16..24].copy_from_slice(&(u64::from(u32::MAX) * 1024).to_le_bytes());
    huge[24..32].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
    assert!(matches!(
        try_decode(&huge).unwrap_err(),
        CodecError::Truncated {
            what: "directory",
            ..
        }
    ));
}

#[test]
fn escape_count_must_match_the_stored_exceptions() {
    let (_, encoded) = sample();
    let view = Encoded::parse(&encoded).unwrap();
    let n_chunks = view.header().n_chunks() as usize;
    let mut checked = 0;
    for i in 0..n_chunks {
        let at = HEADER_LEN + ENTRY_LEN * i;
        let e = u32::from_le_bytes(encoded[at + 8..at + 12].try_into().unwrap());
        // Changing the count within the same 16-byte padding keeps every offset valid, so only
        // the count of escape codes can tell.
        if encoded[at + 12] == 1 && e % 16 != 0 && e % 16 != 15 {
            for delta in [1i64, -1] {
                let mut bad = encoded.clone();
                bad[at + 8..at + 12]
                    .copy_from_slice(&((i64::from(e) + delta) as u32).to_le_bytes());
                // With a matching checksum (a writer's bug, not a changed byte), the decoder's
                // own count of escape codes finds it.
                reseal(&mut bad);
                assert!(
                    matches!(try_decode(&bad).unwrap_err(), CodecError::CorruptChunk { chunk, .. } if chunk == i as u64),
                    "chunk {i}: exceptions {e} -> {}",
                    i64::from(e) + delta
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
}

#[test]
fn two_tier_escape_counts_must_match_the_codes() {
    let (_, encoded) = sample();
    let view = Encoded::parse(&encoded).unwrap();
    let n_chunks = view.header().n_chunks() as usize;
    let (mut checked_e1, mut checked_e2) = (0, 0);
    for i in 0..n_chunks {
        let at = HEADER_LEN + ENTRY_LEN * i;
        if encoded[at + 12] != 2 {
            continue;
        }
        let offset = u64::from_le_bytes(encoded[at..at + 8].try_into().unwrap()) as usize;
        // The first-tier escape count (directory) and the second-tier one (the chunk's first
        // four bytes), each one more and one less.
        for (field, is_e1) in [(at + 8, true), (offset, false)] {
            let e = u32::from_le_bytes(encoded[field..field + 4].try_into().unwrap());
            for delta in [1i64, -1] {
                let mut bad = encoded.clone();
                bad[field..field + 4]
                    .copy_from_slice(&((i64::from(e) + delta) as u32).to_le_bytes());
                reseal(&mut bad);
                let err = try_decode(&bad).unwrap_err();
                // Where the sizes still line up (the count moved within its section's padding),
                // only the decoder's count of escape codes can tell, and it names the chunk.
                if Encoded::parse(&bad).is_ok() {
                    assert!(
                        matches!(err, CodecError::CorruptChunk { chunk, .. } if chunk == i as u64),
                        "chunk {i}: {err:?}"
                    );
                    if is_e1 {
                        checked_e1 += 1;
                    } else {
                        checked_e2 += 1;
                    }
                }
            }
        }
    }
    assert!(
        checked_e1 > 0 && checked_e2 > 0,
        "{checked_e1} {checked_e2}"
    );
}

#[test]
fn two_tier_entry_fields_are_checked() {
    let (_, encoded) = sample();
    let view = Encoded::parse(&encoded).unwrap();
    let n_chunks = view.header().n_chunks() as usize;
    let (first_coded, first_two_tier) = (
        (0..n_chunks)
            .find(|i| encoded[HEADER_LEN + ENTRY_LEN * i + 12] == 1)
            .unwrap(),
        (0..n_chunks)
            .find(|i| encoded[HEADER_LEN + ENTRY_LEN * i + 12] == 2)
            .unwrap(),
    );
    let set = |chunk: usize, at: usize, b: u8| {
        let mut bad = encoded.clone();
        bad[HEADER_LEN + ENTRY_LEN * chunk + at] = b;
        reseal(&mut bad);
        try_decode(&bad).unwrap_err()
    };
    // k1 outside 1..=4, k2 outside 1..=5, k2 in a one-tier chunk, the reserved byte, a mode 3.
    for (chunk, at, b) in [
        (first_two_tier, 13, 0),
        (first_two_tier, 13, 5),
        (first_two_tier, 14, 0),
        (first_two_tier, 14, 6),
        (first_coded, 14, 1),
        (first_two_tier, 15, 1),
        (first_two_tier, 12, 3),
    ] {
        let err = set(chunk, at, b);
        assert!(
            matches!(err, CodecError::CorruptChunk { chunk: c, .. } if c == chunk as u64),
            "entry {chunk} byte {at} = {b}: {err:?}"
        );
    }
}

#[test]
fn output_of_the_wrong_length_is_an_error() {
    let (input, encoded) = sample();
    for len in [0, input.len() - 1, input.len() + 1] {
        let mut out = vec![0u8; len];
        assert!(matches!(
            decode(&encoded, &mut out),
            Err(CodecError::OutputLength { .. })
        ));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn garbage_after_a_valid_prefix_never_panics(
        cut in 0usize..200,
        garbage in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let (_, encoded) = sample();
        let mut bad = encoded[..cut.min(encoded.len())].to_vec();
        bad.extend(garbage);
        let _ = try_decode(&bad);
    }

    #[test]
    fn random_bit_flips_never_panic(flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..6)) {
        let (_, encoded) = sample();
        let mut bad = encoded.clone();
        for (at, bit) in flips {
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
        }
        let _ = try_decode(&bad);
    }
}
