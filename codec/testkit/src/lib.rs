//! Synthetic weights for the codec's examples and tests: seeded, reproducible, generated in
//! parallel. The tests and examples name it `common` (`use codec_testkit as common;`).
#![deny(missing_docs)]

/// A weight distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dist {
    /// N(0, 0.02) in bf16: the initialisation of Wan's and most transformers' linear layers.
    Normal,
    /// Trained-linear-layer-like: rows of 5120 values (Wan2.1-14B's hidden size), each N(0, s²)
    /// with its own s = 0.02·exp(0.5·z), z ~ N(0, 1): row norms that spread over about ±65%
    /// (one sigma), as output channels of trained layers do.
    RowScaled,
    /// Heavy-tailed: Student-t with 4 degrees of freedom scaled to standard deviation 0.02.
    StudentT,
    /// Xavier-uniform U(-a, a), a = sqrt(6 / (5120 + 5120)).
    Uniform,
    /// N(0, 0.02) as fp32 bytes (the codec sees half of every float as a "bf16").
    Fp32Normal,
    /// Uniformly random bits.
    RandomBits,
    /// The default initialisation of `torch.nn.Linear` (and so of diffusers' linear layers
    /// that no model code re-initialises): kaiming-uniform with a = sqrt(5), i.e.
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 5120. Not in [`Dist::ALL`] (whose
    /// encodings the golden tests pin); in [`Dist::EVERY`].
    KaimingUniform,
}

impl Dist {
    /// Every distribution, realistic first.
    pub const ALL: [Dist; 6] = [
        Dist::Normal,
        Dist::RowScaled,
        Dist::StudentT,
        Dist::Uniform,
        Dist::Fp32Normal,
        Dist::RandomBits,
    ];

    /// [`Dist::ALL`] and the distributions added since.
    pub const EVERY: [Dist; 7] = [
        Dist::Normal,
        Dist::RowScaled,
        Dist::StudentT,
        Dist::Uniform,
        Dist::KaimingUniform,
        Dist::Fp32Normal,
        Dist::RandomBits,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Dist::Normal => "normal-0.02",
            Dist::RowScaled => "row-scaled-normal",
            Dist::StudentT => "student-t4",
            Dist::Uniform => "xavier-uniform",
            Dist::Fp32Normal => "fp32-normal",
            Dist::RandomBits => "random-bits",
            Dist::KaimingUniform => "kaiming-uniform",
        }
    }

    /// The distribution of a name.
    pub fn from_name(name: &str) -> Option<Dist> {
        Dist::EVERY.into_iter().find(|d| d.name() == name)
    }
}

/// SplitMix64: small, fast, and good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and stream `stream` (independent streams for parallel blocks).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD134_2543_DE82_EF95));
        r.next_u64();
        r
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A pair of independent N(0, 1) draws (Box-Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.unit().ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * self.unit()).sin_cos();
        (r * c, r * s)
    }
}

/// The bf16 bits of `x`, rounded to nearest even as PyTorch rounds.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Values per generation block (each block has its own random stream).
const BLOCK: usize = 1 << 20;
/// Row length of [`Dist::RowScaled`].
const ROW: usize = 5120;

/// `bytes` bytes of `dist` for `seed`, generated on all cores; the same for any core count.
pub fn generate(dist: Dist, bytes: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; bytes];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let blocks: Vec<(usize, &mut [u8])> = out.chunks_mut(2 * BLOCK).enumerate().collect();
    let per = blocks.len().div_ceil(threads).max(1);
    let mut blocks = blocks.into_iter();
    std::thread::scope(|s| {
        loop {
            let mine: Vec<_> = blocks.by_ref().take(per).collect();
            if mine.is_empty() {
                break;
            }
            s.spawn(move || {
                for (b, dst) in mine {
                    fill(dist, seed, b, dst);
                }
            });
        }
    });
    out
}

/// Fills block `b` (starting at value `b * BLOCK`).
fn fill(dist: Dist, seed: u64, b: usize, dst: &mut [u8]) {
    let mut rng = Rng::new(seed, b as u64);
    let first = b * BLOCK;
    match dist {
        Dist::RandomBits => {
            for w in dst.chunks_mut(8) {
                let r = rng.next_u64().to_le_bytes();
                w.copy_from_slice(&r[..w.len()]);
            }
        }
        Dist::Fp32Normal => {
            for w in dst.chunks_mut(4) {
                let x = (0.02 * rng.normal_pair().0) as f32;
                w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
            }
        }
        _ => {
            let mut row_sigma = (usize::MAX, 0.0);
            for (i, w) in dst.chunks_mut(2).enumerate() {
                let x = match dist {
                    Dist::Normal => 0.02 * rng.normal_pair().0,
                    Dist::RowScaled => {
                        let row = (first + i) / ROW;
                        if row_sigma.0 != row {
                            let z = Rng::new(seed ^ 0x5EED, row as u64).normal_pair().0;
                            row_sigma = (row, 0.02 * (0.5 * z).exp());
                        }
                        row_sigma.1 * rng.normal_pair().0
                    }
                    Dist::StudentT => {
                        // t_4 = z / sqrt(chi2_4 / 4), chi2_4 = -2 ln(u1 u2); variance 2.
                        let chi2 = -2.0 * (rng.unit() * rng.unit()).ln();
                        0.02 / 2f64.sqrt() * rng.normal_pair().0 / (chi2 / 4.0).sqrt()
                    }
                    Dist::KaimingUniform => {
                        let a = 1.0 / 5120f64.sqrt();
                        a * (2.0 * rng.unit() - 1.0)
                    }
                    _ => {
                        let a = (6.0f64 / (5120.0 + 5120.0)).sqrt();
                        a * (2.0 * rng.unit() - 1.0)
                    }
                };
                w.copy_from_slice(&bf16_bits(x as f32).to_le_bytes()[..w.len()]);
            }
        }
    }
}

/// Shannon entropy (bits) of the bf16 exponents of `values`, over the whole buffer.
pub fn exponent_entropy(values: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for v in values.chunks_exact(2) {
        counts[usize::from((v[1] << 1) | (v[0] >> 7))] += 1;
    }
    entropy(&counts)
}

/// Shannon entropy (bits per symbol) of a histogram.
pub fn entropy(counts: &[u64; 256]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.log2()
        })
        .sum()
}

/// bf16 bit patterns as little-endian bytes.
pub fn values(bits: impl IntoIterator<Item = u16>) -> Vec<u8> {
    bits.into_iter().flat_map(u16::to_le_bytes).collect()
}

/// Every bf16 bit pattern twice: in order, and shuffled (seed 7).
pub fn every_pattern() -> [Vec<u8>; 2] {
    let mut shuffled: Vec<u16> = (0..=u16::MAX).collect();
    let mut rng = Rng::new(7, 0);
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    [values(0..=u16::MAX), values(shuffled)]
}

/// `encoded` (format version 3, one tier: `Encoder::single_tier`) as format version 2 wrote it:
/// version 2 had the same header, directory and one-tier chunks (its entries' byte 14, now k2,
/// was reserved and 0), so only the version field and the checksum differ. `None` when a chunk
/// is two-tier, which version 2 had no way to store. For the tests that pin the one-tier chunk
/// bytes across the version change and check that old encodings are refused by their version.
pub fn as_version2(encoded: &[u8]) -> Option<Vec<u8>> {
    let n_chunks = u32::from_le_bytes(encoded[12..16].try_into().unwrap()) as usize;
    if (0..n_chunks).any(|i| encoded[48 + 16 * i + 12] > 1) {
        return None;
    }
    let mut v2 = encoded.to_vec();
    v2[4..6].copy_from_slice(&2u16.to_le_bytes());
    reseal(&mut v2);
    Some(v2)
}

/// `encoded` (format version 2, or 3 with one tier) rewritten in version 1's layout: the 32-byte header without
/// checksum, every chunk 16 bytes earlier. For the tests that pin the chunk bytes across the
/// header change and check that old encodings are refused by their version.
pub fn as_version1(encoded: &[u8]) -> Vec<u8> {
    const V2_HEADER: usize = 48;
    const V1_HEADER: usize = 32;
    let n_chunks = u32::from_le_bytes(encoded[12..16].try_into().unwrap()) as usize;
    let mut v1 = Vec::with_capacity(encoded.len() - 16);
    v1.extend_from_slice(&encoded[..V1_HEADER]);
    v1.extend_from_slice(&encoded[V2_HEADER..]);
    v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    let len = v1.len() as u64;
    v1[24..32].copy_from_slice(&len.to_le_bytes());
    for i in 0..n_chunks {
        let at = V1_HEADER + 16 * i;
        let offset = u64::from_le_bytes(v1[at..at + 8].try_into().unwrap()) - 16;
        v1[at..at + 8].copy_from_slice(&offset.to_le_bytes());
    }
    v1
}

/// Writes the checksum of `encoded`'s bytes into its header (CRC-32 of every byte but the four
/// at 32..36, as the format defines it), so that a test can change bytes on purpose and reach
/// the structural checks behind the checksum.
pub fn reseal(encoded: &mut [u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&encoded[..32]);
    h.update(&encoded[36..]);
    let c = h.finalize();
    encoded[32..36].copy_from_slice(&c.to_le_bytes());
}
