//! The model under test: the wan crate's `WanTransformer3DModel` with seeded random weights
//! drawn as scripts/bench_peers.py draws diffusers' own, one instance per GPU for the several-GPU
//! runs, and its forward with the block loop open to the manager.

use crate::flags::Dist;
use crate::progress;
use layerwise_offload::LayerwiseOffloadManager;
use tch::{Device, Kind, Tensor, nn};
use wan::WanTransformer3DModel;

/// A model and its named parameters (sharing their storage with the model's), in name order.
pub type Instance = (WanTransformer3DModel, Vec<(String, Tensor)>);

/// `shape` drawn from `dist` on `origin` in bf16 (after the caller's seed).
fn draw(shape: &[i64], origin: Device, dist: Dist) -> Tensor {
    let t = Tensor::randn(shape, (Kind::BFloat16, origin)) * 0.02;
    match (dist, shape.first()) {
        (Dist::RowScaled, Some(&rows)) if shape.len() > 1 => {
            let mut scale_shape = vec![rows];
            scale_shape.extend(std::iter::repeat_n(1, shape.len() - 1));
            let z = Tensor::randn(scale_shape.as_slice(), (Kind::Float, origin));
            (t.to_kind(Kind::Float) * (z * 0.5).exp()).to_kind(Kind::BFloat16)
        }
        _ => t,
    }
}

/// The variables of `vs`, sorted by name.
fn named_sorted(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The wan crate's WanTransformer3DModel with `config`, on the CPU, drawn as
/// scripts/bench_peers.py's wan mode draws diffusers' own: every parameter (in name order) N(0, 1)
/// in bf16 on `origin` after seed 1234, times 0.02 (in bf16), then converted to `kind`, or to
/// float32 where diffusers keeps it (`wan::keeps_fp32`). Returns the model and its named
/// parameters (handles sharing their storage with the model's). The model is made
/// uninitialized ([`empty_wan`]), without tch's own initialization, which every parameter's
/// draw overwrites (the values are those of a model made with it: a test checks).
/// Wan2.1-14B's weights took 106 s to build on an H100 host with the initialization; how much
/// of that it was is not measured yet.
pub fn build_wan(config: &wan::Config, origin: Device, kind: Kind, dist: Dist) -> Instance {
    let (model, named) = empty_wan(config, kind);
    draw_into(&named, origin, dist);
    (model, named)
}

/// Writes every tensor of `named` (in order) with a draw on `origin` after seed 1234.
fn draw_into(named: &[(String, Tensor)], origin: Device, dist: Dist) {
    let total: usize = named.iter().map(|(_, t)| tensor_bytes(t)).sum();
    let pb = progress::bytes(total as u64, "drawing the weights");
    tch::manual_seed(1234);
    tch::no_grad(|| {
        for (_, t) in named {
            let r = draw(&t.size(), origin, dist);
            t.shallow_clone().copy_(&r);
            pb.inc(tensor_bytes(t) as u64);
        }
    });
    pb.finish_and_clear();
}

/// The model with `config`, its tensors uninitialized on the CPU (`Tensor::empty` touches no
/// memory): a manager reading a checkpoint fills them.
pub fn empty_wan(config: &wan::Config, kind: Kind) -> Instance {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = WanTransformer3DModel::new_empty(vs.root(), config, kind);
    let named = named_sorted(&vs);
    (model, named)
}

/// The bytes of `t`'s elements.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// One GPU's own instance of the model for the several-GPU runs: the non-block weights copied
/// from `named` (another instance's) to `dev`, the block tensors uninitialized on the CPU
/// (`Tensor::empty` touches no memory): a manager over a shared host store makes them
/// placeholders, the store has the values.
pub fn wan_instance(
    config: &wan::Config,
    kind: Kind,
    named: &[(String, Tensor)],
    dev: Device,
) -> Instance {
    let (model, mut mine) = empty_wan(config, kind);
    let source: std::collections::HashMap<&str, &Tensor> =
        named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::no_grad(|| {
        for (n, t) in &mut mine {
            if !n.starts_with("blocks.") {
                let value = source
                    .get(n.as_str())
                    .unwrap_or_else(|| panic!("no weight {n} in the first instance"));
                t.set_data(&value.to_device(dev));
            }
        }
    });
    (model, mine)
}

/// The wan model's forward with its block loop open (as the dit_layer_loop example).
pub fn wan_forward(
    model: &WanTransformer3DModel,
    inputs: &[Tensor],
    mut mgr: Option<&mut LayerwiseOffloadManager>,
) -> Tensor {
    tch::no_grad(|| {
        let e = model
            .embed(&inputs[0], &inputs[1], &inputs[2])
            .expect("inputs of the model's shapes");
        let mut h = e.hidden.shallow_clone();
        for i in 0..model.blocks().len() {
            match mgr.as_deref_mut() {
                Some(m) => {
                    let _g = m.enter(i).expect("enter");
                    h = model.block(i, &h, &e);
                }
                None => h = model.block(i, &h, &e),
            }
        }
        model.head(&h, &e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_weights_are_drawn_as_bench_peers_draws_them() {
        let config = wan::Config {
            num_layers: 2,
            num_attention_heads: 4,
            attention_head_dim: 64,
            ffn_dim: 1024,
            text_dim: 128,
            ..wan::Config::wan2_1_t2v_1_3b()
        };
        let (model, named) = build_wan(&config, Device::Cpu, Kind::BFloat16, Dist::Normal);
        assert_eq!(model.blocks().len(), 2);
        for (name, t) in &named {
            let want = if wan::keeps_fp32(name) {
                Kind::Float
            } else {
                Kind::BFloat16
            };
            assert_eq!(t.kind(), want, "{name}");
            if t.numel() >= 4096 {
                let std = t.to_kind(Kind::Float).std(true).double_value(&[]);
                assert!((std - 0.02).abs() < 0.002, "{name}: std {std}");
            }
        }
        assert!(named.iter().any(|(n, _)| n == "blocks.0.norm2.weight"));
        assert!(named.iter().any(|(n, _)| n == "scale_shift_table"));
        // Seeded: a second build is equal.
        let (_, again) = build_wan(&config, Device::Cpu, Kind::BFloat16, Dist::Normal);
        for ((n, a), (_, b)) in named.iter().zip(&again) {
            assert!(a.equal(b), "{n}");
        }
        // The same parameters (names, shapes, kinds) and values as a model made with tch's
        // initialization and then diffusers' mixed precision, as the bench made it before.
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::BFloat16);
        let _initialized = WanTransformer3DModel::new(vs.root(), &config);
        wan::set_kind(&mut vs, Kind::BFloat16);
        let before = named_sorted(&vs);
        draw_into(&before, Device::Cpu, Dist::Normal);
        assert_eq!(before.len(), named.len());
        for ((n0, a), (n1, b)) in before.iter().zip(&named) {
            assert_eq!(n0, n1);
            assert_eq!((a.size(), a.kind()), (b.size(), b.kind()), "{n0}");
            assert!(a.equal(b), "{n0}");
        }
    }
}
