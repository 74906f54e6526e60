//! The CPU reference codec: every bf16 pattern, special values, odd lengths, skewed and flat
//! exponent distributions round-trip byte for byte; sizes stay within their bounds; encodings do
//! not depend on the thread count.

use codec_testkit as common;

use common::{Dist, Rng, bf16_bits, every_pattern, generate, values};
use layerwise_offload_codec::format::{ENTRY_LEN, HEADER_LEN, MAX_CODE_BITS};
use layerwise_offload_codec::{
    DEFAULT_CHUNK_VALUES, Encoded, Encoder, decode, decode_with_threads, decoded_len, encode,
    max_encoded_len, stats,
};
use proptest::prelude::*;

/// Encodes `input` with `encoder`, checks the size bound and the stats, decodes on 1 and on 3
/// threads and checks both outputs against the input. Returns the encoding.
fn round_trip(encoder: &Encoder, input: &[u8], chunk_values: u32) -> Vec<u8> {
    let encoded = encoder.encode(input).expect("valid options");
    // Planning then writing into a dirty buffer gives the same bytes: every byte is written.
    let plan = encoder.plan(input).expect("valid options");
    assert_eq!(plan.encoded_len(), encoded.len());
    let mut dirty = vec![0xAAu8; plan.encoded_len()];
    plan.write(&mut dirty).expect("right length");
    assert!(dirty == encoded, "plan + write differs from encode");
    assert!(plan.write(&mut vec![0u8; encoded.len() + 1]).is_err());
    assert!(
        encoded.len() <= max_encoded_len(input.len(), chunk_values).unwrap(),
        "{} bytes encoded to {}, over the bound {}",
        input.len(),
        encoded.len(),
        max_encoded_len(input.len(), chunk_values).unwrap()
    );
    assert_eq!(decoded_len(&encoded).expect("parses"), input.len());
    let st = stats(&encoded).expect("parses");
    assert_eq!(st.encoded_bytes, encoded.len() as u64);
    assert_eq!(st.raw_bytes, input.len() as u64);
    assert_eq!(
        st.raw_chunks + st.coded_chunks + st.two_tier_chunks,
        st.chunks
    );
    assert_eq!(
        st.chunks_by_tier_bits.iter().flatten().sum::<u64>(),
        st.two_tier_chunks
    );
    assert!(st.exceptions <= st.tier1_escapes);
    assert_eq!(
        st.chunks,
        (input.len() / 2).div_ceil(chunk_values as usize) as u64
    );
    assert_eq!(st.chunks_by_code_bits.iter().sum::<u64>(), st.coded_chunks);
    for threads in [1, 3] {
        let mut out = vec![0xA5u8; input.len()];
        decode_with_threads(&encoded, &mut out, threads).expect("decodes");
        assert!(
            out == input,
            "round trip differs ({} bytes, {threads} threads)",
            input.len()
        );
    }
    encoded
}

#[test]
fn every_bf16_pattern_round_trips_with_every_code_width() {
    let [sequential, shuffled] = every_pattern();
    for input in [&sequential, &shuffled] {
        round_trip(&Encoder::new(), input, DEFAULT_CHUNK_VALUES);
        for k in 1..=MAX_CODE_BITS {
            round_trip(
                &Encoder::new().with_chunk_values(256).with_code_bits(k..=k),
                input,
                256,
            );
        }
    }
    // Sequential patterns: 128 values per exponent, so 256-value chunks code with k = 1.
    let st = stats(
        &Encoder::new()
            .with_chunk_values(256)
            .encode(&sequential)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(st.raw_chunks, 0);
}

#[test]
fn special_values_round_trip() {
    let specials: Vec<u16> = vec![
        0x0000, 0x8000, // +0, -0
        0x7f80, 0xff80, // +inf, -inf
        0x7fc0, 0xffc0, 0x7f81, 0xffff, 0x7fff, // NaNs, quiet and signalling payloads
        0x0001, 0x8001, 0x007f, 0x807f, // subnormals
        0x0080, 0x7f7f, 0xff7f, // smallest normal, largest finite
    ];
    let mut rng = Rng::new(3, 0);
    // Specials sprinkled into normal weights, so they are escapes of a coded chunk.
    let mut mixed: Vec<u16> = (0..5000)
        .map(|_| bf16_bits((0.02 * rng.normal_pair().0) as f32))
        .collect();
    for (i, &s) in specials.iter().cycle().take(300).enumerate() {
        mixed[(i * 16 + 5) % 5000] = s;
    }
    for k in 1..=MAX_CODE_BITS {
        let e = round_trip(
            &Encoder::new()
                .with_chunk_values(4096)
                .with_code_bits(k..=k)
                .single_tier(),
            &values(mixed.clone()),
            4096,
        );
        assert!(
            stats(&e).unwrap().coded_chunks > 0,
            "k = {k}: weights with a few specials are coded"
        );
    }
    for (k1, k2) in [(1, 1), (2, 3), (3, 2)] {
        let e = round_trip(
            &Encoder::new()
                .with_chunk_values(4096)
                .with_code_bits(k1..=k1)
                .with_tier2_bits(k2..=k2),
            &values(mixed.clone()),
            4096,
        );
        let st = stats(&e).unwrap();
        assert!(
            st.chunks_by_tier_bits[usize::from(k1)][usize::from(k2)] > 0 && st.exceptions > 0,
            "({k1}, {k2}): weights with a few specials are coded in two tiers: {st:?}"
        );
    }
    round_trip(
        &Encoder::new(),
        &values(specials.iter().copied().cycle().take(10_000)),
        DEFAULT_CHUNK_VALUES,
    );
    round_trip(&Encoder::new(), &values(specials), DEFAULT_CHUNK_VALUES);
}

#[test]
fn every_length_round_trips_including_odd_byte_counts() {
    let data = generate(Dist::Normal, 2 * 1500 + 1, 11);
    let encoder = Encoder::new().with_chunk_values(256);
    for len in 0..data.len() {
        round_trip(&encoder, &data[..len], 256);
    }
    // Lengths around the default chunk size.
    let big = generate(
        Dist::RowScaled,
        2 * (3 * DEFAULT_CHUNK_VALUES as usize) + 3,
        12,
    );
    let cv = 2 * DEFAULT_CHUNK_VALUES as usize;
    for len in [cv - 1, cv, cv + 1, cv + 2, 2 * cv + 17, big.len()] {
        round_trip(&Encoder::new(), &big[..len], DEFAULT_CHUNK_VALUES);
    }
}

#[test]
fn empty_input_is_a_header_and_round_trips() {
    let e = encode(&[]);
    assert_eq!(e.len(), HEADER_LEN);
    assert_eq!(decoded_len(&e).unwrap(), 0);
    decode(&e, &mut []).unwrap();
    let one = encode(&[0x42]);
    let mut out = [0u8];
    decode(&one, &mut out).unwrap();
    assert_eq!(out, [0x42]);
}

#[test]
fn realistic_weights_meet_the_ratio_target() {
    for dist in [Dist::Normal, Dist::RowScaled, Dist::StudentT, Dist::Uniform] {
        let data = generate(dist, 8 << 20, 5);
        let e = round_trip(&Encoder::new(), &data, DEFAULT_CHUNK_VALUES);
        let st = stats(&e).unwrap();
        assert!(
            st.ratio() <= 0.77,
            "{}: ratio {} over the 0.77 target",
            dist.name(),
            st.ratio()
        );
        assert_eq!(
            st.raw_chunks,
            0,
            "{}: every chunk pays to code",
            dist.name()
        );
        // The chosen k is never worse than any fixed one.
        for k in 1..=MAX_CODE_BITS {
            let fixed = Encoder::new().with_code_bits(k..=k).encode(&data).unwrap();
            assert!(
                e.len() <= fixed.len(),
                "{}: chosen k loses to k = {k}",
                dist.name()
            );
        }
        // ... nor any fixed pair of tiers.
        for k1 in 1..=4 {
            for k2 in 1..=5 {
                let fixed = Encoder::new()
                    .with_code_bits(k1..=k1)
                    .with_tier2_bits(k2..=k2)
                    .encode(&data)
                    .unwrap();
                assert!(
                    e.len() <= fixed.len(),
                    "{}: chosen modes lose to (k1, k2) = ({k1}, {k2})",
                    dist.name()
                );
            }
        }
    }
}

#[test]
fn incompressible_data_travels_raw_within_the_header_bound() {
    for (dist, len) in [
        (Dist::RandomBits, 1 << 20),
        (Dist::RandomBits, 1_000_001),
        (Dist::Fp32Normal, 1 << 20),
    ] {
        let data = generate(dist, len, 9);
        let e = round_trip(&Encoder::new(), &data, DEFAULT_CHUNK_VALUES);
        let st = stats(&e).unwrap();
        let chunks = st.chunks as usize;
        assert!(e.len() <= data.len() + HEADER_LEN + ENTRY_LEN * chunks + 16);
        if dist == Dist::RandomBits {
            assert_eq!(
                (st.coded_chunks, st.two_tier_chunks),
                (0, 0),
                "random bits never pay to code"
            );
        }
    }
    // Every chunk raw when asked.
    let data = generate(Dist::Normal, 1 << 20, 9);
    let e = round_trip(&Encoder::new().raw_only(), &data, DEFAULT_CHUNK_VALUES);
    let st = stats(&e).unwrap();
    assert_eq!((st.coded_chunks, st.two_tier_chunks), (0, 0));
}

#[test]
fn skewed_and_flat_exponent_distributions_round_trip() {
    let mut rng = Rng::new(21, 0);
    let n = 20_000;
    // One exponent: one table entry, no escapes, k = 1.
    let one: Vec<u16> = (0..n)
        .map(|_| 0x3c00 | (rng.next_u64() as u16 & 0x807f))
        .collect();
    let e = round_trip(&Encoder::new().with_chunk_values(4096), &values(one), 4096);
    let st = stats(&e).unwrap();
    assert_eq!((st.chunks_by_code_bits[1], st.exceptions), (st.chunks, 0));
    assert!(st.ratio() < 0.6);
    // Zeros.
    let e = round_trip(&Encoder::new(), &vec![0u8; 2 * n], DEFAULT_CHUNK_VALUES);
    assert!(stats(&e).unwrap().ratio() < 0.6);
    // Two exponents, 99.9% one of them: k1 = 1 with rare escapes, each one second-tier bit.
    let two: Vec<u16> =
        (0..n).map(|_| if rng.next_u64().is_multiple_of(1000) { 0x4000 } else { 0x3c00 } | (rng.next_u64() as u16 & 0x807f)).collect();
    let e = round_trip(&Encoder::new(), &values(two), DEFAULT_CHUNK_VALUES);
    let st = stats(&e).unwrap();
    assert_eq!(st.chunks_by_tier_bits[1][1], 1);
    assert!(st.tier1_escapes > 0 && st.exceptions == 0, "{st:?}");
    // Flat over all 256 exponents: nothing pays, chunks go raw.
    let flat: Vec<u16> = (0..n).map(|_| rng.next_u64() as u16).collect();
    let e = round_trip(&Encoder::new().with_chunk_values(4096), &values(flat), 4096);
    assert_eq!(stats(&e).unwrap().coded_chunks, 0);
    // Flat over 31 exponents: k = 5 with no escapes.
    let flat31: Vec<u16> = (0..n)
        .map(|_| ((0x60 + (rng.next_u64() % 31) as u16) << 7) | (rng.next_u64() as u16 & 0x807f))
        .collect();
    let e = round_trip(
        &Encoder::new().with_chunk_values(4096),
        &values(flat31),
        4096,
    );
    let st = stats(&e).unwrap();
    assert_eq!((st.chunks_by_code_bits[5], st.exceptions), (st.chunks, 0));
}

#[test]
fn encoding_does_not_depend_on_the_thread_count() {
    let data = generate(Dist::StudentT, 3 << 20, 4);
    let one = Encoder::new()
        .with_chunk_values(4096)
        .with_threads(1)
        .encode(&data)
        .unwrap();
    for threads in [2, 3, 7, 0] {
        assert!(
            Encoder::new()
                .with_chunk_values(4096)
                .with_threads(threads)
                .encode(&data)
                .unwrap()
                == one
        );
    }
}

#[test]
fn invalid_options_are_errors() {
    let data = [0u8; 100];
    for cv in [0, 100, 255, 257, (1 << 22) + 256, u32::MAX] {
        assert!(
            Encoder::new().with_chunk_values(cv).encode(&data).is_err(),
            "chunk_values {cv}"
        );
    }
    #[allow(clippy::reversed_empty_ranges)]
    for bits in [0..=3, 1..=8, 8..=8, 3..=2] {
        assert!(
            Encoder::new()
                .with_code_bits(bits.clone())
                .encode(&data)
                .is_err(),
            "code bits {bits:?}"
        );
    }
    #[allow(clippy::reversed_empty_ranges)]
    for bits in [0..=3, 1..=6, 6..=6, 3..=2] {
        assert!(
            Encoder::new()
                .with_tier2_bits(bits.clone())
                .encode(&data)
                .is_err(),
            "tier-2 bits {bits:?}"
        );
    }
}

#[test]
fn parsed_view_agrees_with_the_free_functions() {
    let data = generate(Dist::Normal, 100_001, 2);
    let e = Encoder::new()
        .with_chunk_values(1024)
        .encode(&data)
        .unwrap();
    let view = Encoded::parse(&e).unwrap();
    let h = view.header();
    assert_eq!(h.n_values(), 50_000);
    assert_eq!(h.tail(), Some(data[100_000]));
    assert_eq!(h.decoded_len() as usize, decoded_len(&e).unwrap());
    assert_eq!(h.n_chunks(), 50_000u32.div_ceil(1024));
    assert_eq!(view.stats(), stats(&e).unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_round_trip(
        data in proptest::collection::vec(any::<u8>(), 0..5000),
        cv in prop::sample::select(vec![256u32, 512, 1024, 32768]),
        lo in 1u8..=7,
        width in 0u8..7,
    ) {
        let hi = (lo + width).min(MAX_CODE_BITS);
        round_trip(&Encoder::new().with_chunk_values(cv).with_code_bits(lo..=hi), &data, cv);
    }

    #[test]
    fn narrow_exponents_round_trip(
        bits in proptest::collection::vec((0u16..12, any::<u16>()), 0..3000),
        cv in prop::sample::select(vec![256u32, 768, 4096]),
        k1 in 1u8..=4,
        k2 in 1u8..=5,
    ) {
        // Few exponents around 2^-6, sign and mantissa random: coded chunks with escapes.
        let v = values(bits.into_iter().map(|(e, r)| ((0x76 + e) << 7) | (r & 0x807f)));
        round_trip(&Encoder::new().with_chunk_values(cv), &v, cv);
        // Two tiers of fixed widths (wherever they make a chunk smaller than raw), with
        // first- and second-tier escapes.
        round_trip(
            &Encoder::new()
                .with_chunk_values(cv)
                .with_code_bits(k1..=k1)
                .with_tier2_bits(k2..=k2),
            &v,
            cv,
        );
    }
}
