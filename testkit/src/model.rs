//! A small DiT-like model for tests: blocks with layer norms, self-attention and an MLP, with
//! weights and biases, in one or two block lists of different widths.

use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// One block: pre-norm self-attention and a GELU MLP, each with a residual.
pub struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    /// A block of width `dim`, MLP width `hidden`, `heads` attention heads, under `p`.
    pub fn new(p: nn::Path, dim: i64, hidden: i64, heads: i64) -> Block {
        Block {
            norm1: nn::layer_norm(&p / "norm1", vec![dim], Default::default()),
            qkv: nn::linear(&p / "qkv", dim, 3 * dim, Default::default()),
            proj: nn::linear(&p / "proj", dim, dim, Default::default()),
            norm2: nn::layer_norm(&p / "norm2", vec![dim], Default::default()),
            fc1: nn::linear(&p / "fc1", dim, hidden, Default::default()),
            fc2: nn::linear(&p / "fc2", hidden, dim, Default::default()),
            heads,
        }
    }

    /// The block on `x` `[batch, tokens, dim]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let h = self.norm1.forward(x);
        let qkv = self
            .qkv
            .forward(&h)
            .view([b, t, 3, self.heads, d / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let a = a.transpose(1, 2).reshape([b, t, d]);
        let x = x + self.proj.forward(&a);
        let h = self.fc1.forward(&self.norm2.forward(&x)).gelu("tanh");
        x + self.fc2.forward(&h)
    }
}

/// Model shape: lists of (attr, blocks, width multiplier of the MLP).
pub struct Model {
    /// Every parameter.
    pub vs: nn::VarStore,
    embed: nn::Linear,
    /// The block lists: attribute name and blocks.
    pub lists: Vec<(String, Vec<Block>)>,
    head: nn::Linear,
}

/// The model width.
pub const DIM: i64 = 64;

impl Model {
    /// One list `blocks` of `n` blocks, or two lists (`double_blocks` with n, `single_blocks`
    /// with n + 1 wider blocks).
    pub fn new(device: Device, n: usize, two_lists: bool, seed: i64) -> Model {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let embed = nn::linear(&root / "embed", 16, DIM, Default::default());
        let mut lists = Vec::new();
        let specs: Vec<(&str, usize, i64)> = if two_lists {
            vec![("double_blocks", n, 2), ("single_blocks", n + 1, 4)]
        } else {
            vec![("blocks", n, 4)]
        };
        for (attr, count, mult) in specs {
            let p = &root / attr;
            let blocks = (0..count)
                .map(|i| Block::new(&p / i, DIM, mult * DIM, 4))
                .collect();
            lists.push((attr.to_owned(), blocks));
        }
        let head = nn::linear(&root / "head", DIM, 16, Default::default());
        // Non-zero biases and norm weights, so every tensor matters.
        tch::no_grad(|| {
            for (_, mut t) in vs.variables() {
                let r = Tensor::randn(t.size(), (Kind::Float, device)) * 0.05;
                let _ = t.f_add_(&r).unwrap();
            }
        });
        Model {
            vs,
            embed,
            lists,
            head,
        }
    }

    /// Blocks over every list.
    pub fn num_blocks(&self) -> usize {
        self.lists.iter().map(|(_, b)| b.len()).sum()
    }

    /// The blocks in loop order.
    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.lists.iter().flat_map(|(_, b)| b.iter())
    }

    /// A seeded input `[2, 8, 16]` on the CPU.
    pub fn input(&self, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([2, 8, 16], (Kind::Float, Device::Cpu))
    }

    /// Forward pass; with a manager, each block runs inside `enter`.
    pub fn forward(
        &self,
        x: &Tensor,
        mut mgr: Option<&mut layerwise_offload::LayerwiseOffloadManager>,
    ) -> Tensor {
        tch::no_grad(|| {
            let dev = self.head.ws.device();
            let mut h = self.embed.forward(&x.to_device(dev));
            for (i, b) in self.blocks().enumerate() {
                match mgr.as_deref_mut() {
                    Some(m) => {
                        let _g = m.enter(i).unwrap();
                        h = b.forward(&h);
                    }
                    None => h = b.forward(&h),
                }
            }
            self.head.forward(&h).to_device(Device::Cpu)
        })
    }

    /// A deep copy of every variable, on the CPU.
    pub fn snapshot(&self) -> Vec<(String, Tensor)> {
        snapshot(&self.vs)
    }

    /// The list attrs and block counts, for a config.
    pub fn list_spec(&self) -> Vec<(String, usize)> {
        self.lists
            .iter()
            .map(|(a, b)| (a.clone(), b.len()))
            .collect()
    }
}

/// A deep copy of every variable of `vs`, on the CPU, sorted by name.
pub fn snapshot(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu).copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Asserts two snapshots are equal bit for bit (values, shapes, strides, dtypes).
pub fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert_eq!(ta.size(), tb.size(), "{na}");
        assert_eq!(ta.kind(), tb.kind(), "{na}");
        assert!(bits_equal(ta, tb), "{na} differs");
    }
}

/// Bit-for-bit equality of two tensors of the same dtype (NaN-safe, tells -0.0 from 0.0).
pub fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    if a.size() != b.size() || a.kind() != b.kind() {
        return false;
    }
    let as_int = |t: &Tensor| {
        let t = t.to_device(Device::Cpu).contiguous();
        match t.kind().elt_size_in_bytes() {
            8 => t.view_dtype(Kind::Int64),
            4 => t.view_dtype(Kind::Int),
            2 => t.view_dtype(Kind::Int16),
            _ => t.view_dtype(Kind::Uint8),
        }
    };
    as_int(a).equal(&as_int(b))
}

/// Checks the bytes a compressed peer group moved (each member's stats, in rank order), every
/// block `raw_block` bytes raw: the members uploaded in step; each received the rest of every
/// block from the others (its own run of segments decoded, the others' sent on), so that
/// together they received `n - 1` raw blocks per upload; and between them they sent each
/// block's encoding once from the host, smaller than the raw block. `segment` is the raw size
/// of the blocks' segments: with several a block each member sent about `1/n` of it (each of
/// its run's two cuts lies within half a segment of an even split, so its share is within one
/// segment's worth); with one a block, one member sent it all (the member whose share holds its
/// middle byte).
pub fn assert_encoded_group_split(
    stats: &[layerwise_offload::OffloadStats],
    raw_block: u64,
    segment: u64,
) {
    let segments = raw_block.div_ceil(segment);
    let n = stats.len() as u64;
    let uploads = stats[0].uploads;
    assert!(uploads > 0);
    assert!(stats.iter().all(|st| st.uploads == uploads), "in step");
    let received: u64 = stats.iter().map(|st| st.peer_bytes).sum();
    assert_eq!(
        received,
        (n - 1) * uploads * raw_block,
        "the rest of each block from peers"
    );
    let sent: u64 = stats.iter().map(|st| st.bytes_uploaded).sum();
    let ratio = sent as f64 / (uploads * raw_block) as f64;
    assert!(ratio < 0.75, "the members sent {ratio:.3} of the raw bytes");
    let shares: Vec<f64> = stats
        .iter()
        .map(|st| st.bytes_uploaded as f64 / sent as f64)
        .collect();
    if segments > 1 {
        let (even, slack) = (1.0 / n as f64, 1.0 / segments as f64 + 0.02);
        assert!(
            shares.iter().all(|s| (s - even).abs() < slack),
            "shares of the encodings {shares:?}, not within {slack:.3} of {even:.3} each"
        );
    } else {
        let whole = shares.iter().filter(|&&s| s == 1.0).count();
        let none = shares.iter().filter(|&&s| s == 0.0).count();
        assert_eq!(
            (whole, none),
            (1, n as usize - 1),
            "one member sends a block of one segment: {shares:?}"
        );
    }
}
