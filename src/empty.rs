//! Models with uninitialized weights, to load a checkpoint into without holding random weights
//! beside it.
//!
//! [`OffloadConfig::checkpoint`](crate::OffloadConfig::checkpoint) never reads the model's own
//! values: it needs the names, shapes and types. tch's layers (`nn::linear`, `nn::conv2d`, …)
//! draw their weights as they create them and have no switch to skip it; two ways around that:
//!
//! - [`build`] runs any model's constructor on a new `VarStore` and then replaces every
//!   variable's values with uninitialized memory ([`free_values`]): the random values exist
//!   only while the constructor runs, so the host holds the model once, not twice, when the
//!   checkpoint is read. The constructor's drawing still costs its time.
//! - [`var`] and [`linear`] create parameters uninitialized from the start (`Tensor::empty`,
//!   whose pages are not touched until written, so they cost neither time nor memory): use them
//!   in your model's constructor for the large weights, as the `wan` crate's `new_empty`
//!   constructors do for all of theirs.
//!
//! ```
//! use layerwise_offload::{Result, empty};
//! use tch::{Device, Kind, nn};
//!
//! fn main() -> Result<()> {
//!     let (vs, blocks) = empty::build(Device::Cpu, Kind::BFloat16, |root| {
//!         (0..4)
//!             .map(|i| nn::linear(root / "blocks" / i, 64, 64, Default::default()))
//!             .collect::<Vec<_>>()
//!     })?;
//!     assert_eq!(vs.variables().len(), 8);
//!     assert_eq!(blocks[0].ws.kind(), Kind::BFloat16);
//!     // With a checkpoint: OffloadConfig::new("blocks", 4).checkpoint(Checkpoint::open(dir)?)
//!     Ok(())
//! }
//! ```

use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor, nn};

/// Builds a model with `build` on a new `VarStore` on `device` whose floating-point variables
/// are created in `kind`, then frees their values ([`free_values`]). Returns the `VarStore`
/// and the model, whose tensors are the `VarStore`'s (their values uninitialized: load a
/// checkpoint before using them).
pub fn build<M>(
    device: Device,
    kind: Kind,
    build: impl FnOnce(&nn::Path) -> M,
) -> Result<(nn::VarStore, M)> {
    let mut vs = nn::VarStore::new(device);
    vs.set_kind(kind);
    let model = build(&vs.root());
    free_values(&vs)?;
    Ok((vs, model))
}

/// Replaces the values of every variable of `vs` with uninitialized memory of the same shape,
/// strides, type and device (`Tensor::empty_strided`, whose pages are not touched until
/// written), freeing the old values unless something else holds them. The model's tensors are
/// the same handles as before (their data re-pointed), so a model built on `vs` sees the change.
pub fn free_values(vs: &nn::VarStore) -> Result<()> {
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            let fresh = Tensor::f_empty_strided(t.size(), t.stride(), (t.kind(), t.device()))
                .map_err(|e| {
                    Error::from_torch(
                        "empty::free_values",
                        (t.numel() * t.kind().elt_size_in_bytes()) as u64,
                        format!("{name}: {e}"),
                    )
                })?;
            t.f_set_data(&fresh)
                .map_err(|e| Error::from(("empty::free_values", e)))?;
        }
        Ok(())
    })
}

/// A trainable variable `name` of shape `dims` under `path`, of the path's default kind and on
/// its device, uninitialized (`Tensor::empty`). The counterpart of `path.var(name, dims, init)`.
pub fn var(path: &nn::Path, name: &str, dims: &[i64]) -> Result<Tensor> {
    let t = Tensor::f_empty(dims, (path.kind(), path.device())).map_err(|e| {
        Error::from_torch(
            "empty::var",
            (dims.iter().product::<i64>().max(0) as usize * path.kind().elt_size_in_bytes()) as u64,
            format!("{name}: {e}"),
        )
    })?;
    Ok(path.add(name, t, true))
}

/// tch's `nn::linear(path, in_dim, out_dim, config)` with its weight (`weight`, `[out_dim,
/// in_dim]`) and bias (`bias`, `[out_dim]`, if `config.bias`) uninitialized: the same names and
/// shapes, so a checkpoint of a model built with `nn::linear` loads into it.
pub fn linear(
    path: &nn::Path,
    in_dim: i64,
    out_dim: i64,
    config: nn::LinearConfig,
) -> Result<nn::Linear> {
    let ws = var(path, "weight", &[out_dim, in_dim])?;
    let bs = if config.bias {
        Some(var(path, "bias", &[out_dim])?)
    } else {
        None
    };
    Ok(nn::Linear { ws, bs })
}
