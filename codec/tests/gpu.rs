//! The GPU decoder: the kernel compiles with NVRTC (no device needed), and where a CUDA device
//! is present it decodes the test patterns byte for byte as the CPU reference does. Without
//! NVRTC or a device these tests print `SKIP: …` and pass, unless OFFLOAD_REQUIRE_CUDA=1.
#![cfg(feature = "gpu")]

use codec_testkit as common;

use common::{Dist, Rng, generate, values};
use layerwise_offload_codec::format::{HEADER_LEN, VERSION};
use layerwise_offload_codec::gpu::{self, DecoderOptions, GpuDecoder, Kernel};
use layerwise_offload_codec::{CodecError, Encoder, decode};

fn require_cuda() -> bool {
    std::env::var("OFFLOAD_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

fn skip(why: &str) {
    assert!(!require_cuda(), "OFFLOAD_REQUIRE_CUDA=1 but {why}");
    eprintln!("SKIP: {why}");
}

/// Both kernels read the header with the format's constants (no NVRTC or device needed).
#[test]
fn kernels_read_the_format_this_build_writes() {
    for kernel in [Kernel::Current, Kernel::Baseline] {
        let source = gpu::kernel_source_of(kernel);
        assert!(
            source.contains(&format!("#define HEADER_BYTES {HEADER_LEN}\n")),
            "{kernel:?}: header length"
        );
        assert!(
            source.contains(&format!("#define FORMAT_VERSION {VERSION}u\n")),
            "{kernel:?}: format version"
        );
    }
}

#[test]
fn kernel_compiles_for_hopper_and_ampere() {
    if let Err(e) = gpu::nvrtc::version() {
        return skip(&format!("no libnvrtc ({e})"));
    }
    // The current kernel with its default tuning and with other settings (every k's loads
    // unrolled 4 times, 80 registers, exceptions read from global memory), and the baseline.
    let tuned = format!(
        "#define UNROLL 4\n#define UNROLL_WIDE 4\n#define MIN_BLOCKS 3\n#define EXC_SHARED 0\n{}",
        gpu::kernel_source()
    );
    let sources = [
        gpu::kernel_source(),
        tuned.as_str(),
        gpu::kernel_source_of(Kernel::Baseline),
    ];
    for arch in ["sm_80", "sm_90"] {
        for source in sources {
            let cubin = gpu::nvrtc::compile(source, "lwbc_decode.cu", arch).unwrap();
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{arch}: NVRTC returned no ELF cubin"
            );
        }
    }
}

/// The decoder of device 0, or `None` (after a loud skip) without one.
fn decoder() -> Option<GpuDecoder> {
    match gpu::device_count() {
        Ok(n) if n > 0 => Some(GpuDecoder::new(0).expect("a decoder for device 0")),
        Ok(_) => {
            skip("no CUDA device");
            None
        }
        Err(e) => {
            skip(&format!("no CUDA device ({e})"));
            None
        }
    }
}

/// Encodes `input`, decodes it on the GPU and on the CPU, and compares both with the input.
fn gpu_round_trip(decoder: &GpuDecoder, input: &[u8], encoder: &Encoder) -> Result<(), CodecError> {
    let encoded = encoder.encode(input)?;
    let mut cpu = vec![0u8; input.len()];
    decode(&encoded, &mut cpu)?;
    assert!(cpu == input, "CPU round trip");
    let device = decoder.device();
    let mut enc = device.alloc(encoded.len())?;
    enc.copy_from_host(&encoded)?;
    let mut out = device.alloc(input.len().max(1))?;
    out.fill(0xA5)?;
    let stream = device.stream()?;
    // SAFETY: both buffers are live device memory of the decoder's device, of the lengths
    // passed, and nothing else touches them until the stream is synchronised below.
    unsafe {
        decoder.decode_async(
            enc.device_ptr(),
            encoded.len(),
            out.device_ptr(),
            input.len(),
            stream.as_raw(),
        )?
    };
    stream.synchronize()?;
    decoder.synchronize_and_check()?;
    let mut back = vec![0u8; input.len()];
    out.copy_to_host(&mut back)?;
    assert!(
        back == input,
        "GPU output differs from the input ({} bytes)",
        input.len()
    );
    Ok(())
}

/// Copies `encoded` to the device and decodes it with `decoder` into a new buffer of
/// `out_len` bytes on the legacy default stream; what the status check says.
fn decode_on_device(
    decoder: &GpuDecoder,
    encoded: &[u8],
    out_len: usize,
) -> Result<(), CodecError> {
    let device = decoder.device();
    let mut enc = device.alloc(encoded.len())?;
    enc.copy_from_host(encoded)?;
    let out = device.alloc(out_len)?;
    // SAFETY: live buffers of the lengths passed; the legacy default stream (null), which
    // `synchronize_and_check` waits for before the buffers are dropped.
    unsafe {
        decoder.decode_async(
            enc.device_ptr(),
            encoded.len(),
            out.device_ptr(),
            out_len,
            std::ptr::null_mut(),
        )?
    };
    decoder.synchronize_and_check()
}

#[test]
fn gpu_decodes_every_pattern_like_the_cpu() {
    let Some(decoder) = decoder() else { return };
    let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    for k in 1..=7u8 {
        gpu_round_trip(
            &decoder,
            &all,
            &Encoder::new()
                .with_chunk_values(4096)
                .with_code_bits(k..=k)
                .single_tier(),
        )
        .unwrap();
    }
    let normal = generate(Dist::Normal, 3 << 20, 1);
    // Two tiers of every (k1, k2), with first- and second-tier escapes; and every pattern with
    // a few of them (where they make a chunk smaller than raw).
    let row_scaled = generate(Dist::RowScaled, 1 << 20, 6);
    let mut seen = [[0u64; 6]; 5];
    for k1 in 1..=4u8 {
        for k2 in 1..=5u8 {
            let fixed = Encoder::new()
                .with_code_bits(k1..=k1)
                .with_tier2_bits(k2..=k2);
            for (input, cv) in [(&normal[..(1 << 20) + 3], 4096), (&row_scaled, 2304)] {
                let encoder = fixed.clone().with_chunk_values(cv);
                let st = layerwise_offload_codec::stats(&encoder.encode(input).unwrap()).unwrap();
                seen[usize::from(k1)][usize::from(k2)] +=
                    st.chunks_by_tier_bits[usize::from(k1)][usize::from(k2)];
                gpu_round_trip(&decoder, input, &encoder).unwrap();
            }
            gpu_round_trip(&decoder, &all, &fixed.clone().with_chunk_values(4096)).unwrap();
        }
    }
    // 15 exponents for 95% of the values, 31 others for the rest: two tiers of (4, 4) and (4, 5)
    // (the shared-memory table path of k1 = 4), every second-tier code used.
    let mut rng = Rng::new(8, 0);
    let wide = values((0..1u32 << 20).map(|_| {
        let r = rng.next_u64();
        let e = if r % 100 < 95 {
            0x60 + (r >> 8) % 15
        } else {
            0x70 + (r >> 8) % 31
        };
        ((e as u16) << 7) | ((r >> 32) as u16 & 0x807f)
    }));
    for k2 in [4u8, 5] {
        let encoder = Encoder::new()
            .with_chunk_values(32768)
            .with_code_bits(4..=4)
            .with_tier2_bits(k2..=k2);
        let st = layerwise_offload_codec::stats(&encoder.encode(&wide).unwrap()).unwrap();
        seen[4][usize::from(k2)] += st.chunks_by_tier_bits[4][usize::from(k2)];
        gpu_round_trip(&decoder, &wide, &encoder).unwrap();
    }
    gpu_round_trip(&decoder, &wide, &Encoder::new()).unwrap();
    // Every k1 and every k2 decoded in some two-tier chunk.
    assert!(
        (1..=4).all(|k1| seen[k1].iter().sum::<u64>() > 0),
        "{seen:?}"
    );
    assert!(
        (1..=5).all(|k2| seen.iter().map(|r| r[k2]).sum::<u64>() > 0),
        "{seen:?}"
    );
    for len in [0, 1, 2, 3, 17, 4095, 65537, 1 << 20, (3 << 20) - 1] {
        gpu_round_trip(
            &decoder,
            &normal[..len],
            &Encoder::new().with_chunk_values(256),
        )
        .unwrap();
        gpu_round_trip(&decoder, &normal[..len], &Encoder::new()).unwrap();
    }
    gpu_round_trip(
        &decoder,
        &generate(Dist::RandomBits, 1 << 20, 2),
        &Encoder::new(),
    )
    .unwrap();
}

/// A grid capped below the SM count (down to one block) still decodes every chunk: the blocks
/// stride over the chunks. Blocks per SM capped at 1 together with a total cap too.
#[test]
fn gpu_decodes_with_a_grid_of_a_few_blocks() {
    let Some(decoder) = decoder() else { return };
    let full = decoder.max_blocks();
    let normal = generate(Dist::Normal, 6 << 20, 7);
    let encoder = Encoder::new();
    for (per_sm, cap) in [(None, 1), (None, 3), (None, 16), (Some(1), 40)] {
        let capped = GpuDecoder::with_options(
            decoder.device().clone(),
            DecoderOptions::default()
                .with_blocks_per_sm(per_sm)
                .with_max_blocks(Some(cap)),
        )
        .unwrap();
        assert_eq!(capped.max_blocks(), cap.min(full), "{per_sm:?} {cap}");
        gpu_round_trip(&capped, &normal, &encoder).unwrap();
    }
}

#[test]
fn gpu_baseline_kernel_decodes_like_the_cpu() {
    let Some(decoder) = decoder() else { return };
    let baseline = GpuDecoder::with_options(
        decoder.device().clone(),
        DecoderOptions::default().with_kernel(Kernel::Baseline),
    )
    .unwrap();
    let normal = generate(Dist::Normal, 1 << 20, 4);
    // The baseline kernel decodes one-tier chunks (format version 2's layout) only.
    for encoder in [Encoder::new(), Encoder::new().with_chunk_values(256)] {
        gpu_round_trip(&baseline, &normal, &encoder.single_tier()).unwrap();
    }
    // A two-tier chunk is refused as a chunk it does not know, never decoded to other bytes.
    let encoded = Encoder::new().encode(&normal).unwrap();
    assert!(
        layerwise_offload_codec::stats(&encoded)
            .unwrap()
            .two_tier_chunks
            > 0
    );
    match decode_on_device(&baseline, &encoded, normal.len()) {
        Err(CodecError::DeviceDecode { bits }) => assert_ne!(bits & gpu::status::CHUNK, 0),
        other => panic!("two-tier chunk not refused by the baseline kernel: {other:?}"),
    }
}

#[test]
fn gpu_reports_second_tier_escapes_that_disagree_with_the_exception_count() {
    let Some(decoder) = decoder() else { return };
    let input = generate(Dist::Normal, 1 << 20, 5);
    let mut encoded = Encoder::new()
        .with_chunk_values(4096)
        .with_code_bits(2..=2)
        .with_tier2_bits(3..=3)
        .encode(&input)
        .unwrap();
    let entry = HEADER_LEN; // chunk 0's directory entry
    let offset = u64::from_le_bytes(encoded[entry..entry + 8].try_into().unwrap()) as usize;
    assert_eq!(
        (
            encoded[entry + 12],
            encoded[entry + 13],
            encoded[entry + 14]
        ),
        (2, 2, 3),
        "chunk 0 two-tier with (k1, k2) = (2, 3)"
    );
    // The first 32 second-tier codes all become the escape: more second-tier escapes than the
    // chunk stores exceptions, with every size unchanged. Tables: 4 + 3 + 7 bytes, padded to
    // 16; planes: 128 groups of 2 words; sign and mantissa: 4096 bytes.
    let tier2 = offset + 16 + 1024 + 4096;
    encoded[tier2..tier2 + 12].fill(0xff);
    let mut cpu = vec![0u8; input.len()];
    assert!(
        decode(&encoded, &mut cpu).is_err(),
        "the CPU refuses it too"
    );
    match decode_on_device(&decoder, &encoded, input.len()) {
        Err(CodecError::DeviceDecode { bits }) => assert_eq!(bits, gpu::status::EXCEPTIONS),
        other => panic!("wrong second-tier escape count not reported: {other:?}"),
    }
}

#[test]
fn gpu_reports_escape_codes_that_disagree_with_the_exception_count() {
    let Some(decoder) = decoder() else { return };
    let input = generate(Dist::Normal, 1 << 20, 5);
    let mut encoded = Encoder::new()
        .with_chunk_values(4096)
        .with_code_bits(3..=3)
        .single_tier()
        .encode(&input)
        .unwrap();
    // Every value of chunk 0's first group gets the escape code (all plane bits set): more
    // escape codes than the chunk stores exceptions, with every size unchanged.
    let entry = HEADER_LEN; // chunk 0's directory entry
    let offset = u64::from_le_bytes(encoded[entry..entry + 8].try_into().unwrap()) as usize;
    assert_eq!(
        (encoded[entry + 12], encoded[entry + 13]),
        (1, 3),
        "chunk 0 coded with k = 3"
    );
    let planes = offset + 16; // the table of 7 bytes, padded to 16
    encoded[planes..planes + 12].fill(0xff);
    let mut cpu = vec![0u8; input.len()];
    assert!(
        decode(&encoded, &mut cpu).is_err(),
        "the CPU refuses it too"
    );
    let baseline = GpuDecoder::with_options(
        decoder.device().clone(),
        DecoderOptions::default().with_kernel(Kernel::Baseline),
    )
    .unwrap();
    for d in [&decoder, &baseline] {
        match decode_on_device(d, &encoded, input.len()) {
            Err(CodecError::DeviceDecode { bits }) => {
                assert_eq!(bits, gpu::status::EXCEPTIONS, "{:?}", d.options())
            }
            other => panic!("wrong escape count not reported: {other:?}"),
        }
    }
}

#[test]
fn gpu_refuses_a_corrupt_encoding_without_faulting() {
    let Some(decoder) = decoder() else { return };
    let input = generate(Dist::Normal, 1 << 20, 3);
    let mut encoded = Encoder::new()
        .with_chunk_values(4096)
        .encode(&input)
        .unwrap();
    // Chunk 1's offset points past the buffer.
    encoded[HEADER_LEN + 16..HEADER_LEN + 24].copy_from_slice(&u64::MAX.to_le_bytes());
    match decode_on_device(&decoder, &encoded, input.len()) {
        Err(CodecError::DeviceDecode { bits }) => assert_ne!(bits & gpu::status::CHUNK, 0),
        other => panic!("corrupt chunk not reported: {other:?}"),
    }
    decoder
        .synchronize_and_check()
        .expect("the status word is cleared after a check");
}
