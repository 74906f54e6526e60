//! One call to offload a model: [`offload`] and [`offload_with`].

use crate::error::Result;
use crate::manager::{LayerwiseOffloadManager, OffloadConfig};
use crate::plan::count_blocks;
use crate::source::WeightSource;

/// The block lists of a model, by the attribute that names them (`"blocks"`, or Flux's
/// `["double_blocks", "single_blocks"]`), in loop order. Implemented for a name (`&str`,
/// `String`) and for arrays, slices and vectors of names.
pub trait BlockLists {
    /// The names, in loop order.
    fn names(&self) -> Vec<String>;
}

impl BlockLists for str {
    fn names(&self) -> Vec<String> {
        vec![self.to_owned()]
    }
}

impl BlockLists for String {
    fn names(&self) -> Vec<String> {
        vec![self.clone()]
    }
}

impl<S: AsRef<str>> BlockLists for [S] {
    fn names(&self) -> Vec<String> {
        self.iter().map(|s| s.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>, const N: usize> BlockLists for [S; N] {
    fn names(&self) -> Vec<String> {
        self.as_slice().names()
    }
}

impl<S: AsRef<str>> BlockLists for Vec<S> {
    fn names(&self) -> Vec<String> {
        self.as_slice().names()
    }
}

impl<T: BlockLists + ?Sized> BlockLists for &T {
    fn names(&self) -> Vec<String> {
        (**self).names()
    }
}

impl OffloadConfig {
    /// The builder for every block of each list in `lists` (in loop order), each list's number
    /// of blocks read from `model`'s tensor names (`<list>.<index>.…`: one more than the largest
    /// index). A list that matches no name is [`Error::NoMatch`](crate::Error::NoMatch), listing
    /// the prefixes that exist; no list at all is [`Error::InvalidArgument`](crate::Error::InvalidArgument).
    /// Gaps in a list's indices are reported by `initialize()`
    /// ([`Error::MissingBlocks`](crate::Error::MissingBlocks)).
    pub fn from_model(
        model: &(impl WeightSource + ?Sized),
        lists: impl BlockLists,
    ) -> Result<OffloadConfig> {
        let lists = lists.names();
        let named = model.named_tensors()?;
        let names = named.iter().map(|(n, _)| n.as_str());
        let mut config: Option<OffloadConfig> = None;
        for attr in &lists {
            let n = count_blocks(names.clone(), attr)?;
            config = Some(match config {
                None => OffloadConfig::new(attr.clone(), n),
                Some(c) => c.with_list(attr.clone(), n),
            });
        }
        config.ok_or_else(|| crate::Error::InvalidArgument {
            op: "OffloadConfig::from_model",
            message: "no block list given: name at least one, e.g. \"blocks\"".into(),
        })
    }
}

/// Offloads every block of `lists` (`"blocks"`, or `["double_blocks", "single_blocks"]`) in
/// `model` with the default options: finds each list's number of blocks from the tensor names,
/// builds the manager on CUDA device 0 and initializes it (blocks into pinned host memory,
/// every other weight onto the GPU). Build the model on the CPU: it never has to fit on the
/// GPU.
///
/// Without a usable CUDA device this is [`Error::NoDevice`](crate::Error::NoDevice) saying
/// why; [`offload_with`] takes options (`|c| c.cpu_test_mode(true)` to run on the CPU,
/// `allow_cpu_fallback(true)` for a disabled manager instead of the error, a VRAM budget,
/// compression, a checkpoint, a progress callback).
pub fn offload(
    model: &(impl WeightSource + ?Sized),
    lists: impl BlockLists,
) -> Result<LayerwiseOffloadManager> {
    offload_with(model, lists, |config| config)
}

/// [`offload`] with options: `configure` gets the builder ([`OffloadConfig::from_model`]) and
/// returns it with the options set, e.g. `|c| c.prefetch_depth(2).vram_budget(20 << 30)`.
/// The manager is built and initialized before it is returned; an error leaves the model as
/// it was.
///
/// Hand the manager and the model's blocks to
/// [`OffloadedBlocks`](crate::OffloadedBlocks), a tch `nn::Module`, and `forward` streams:
///
/// ```
/// use layerwise_offload::{OffloadedBlocks, Result, offload_with};
/// use tch::nn::{self, Module};
/// use tch::{Device, Kind, Tensor};
///
/// fn main() -> Result<()> {
///     let vs = nn::VarStore::new(Device::Cpu);
///     let blocks: Vec<nn::Linear> =
///         (0..4).map(|i| nn::linear(vs.root() / "blocks" / i, 8, 8, Default::default())).collect();
///     let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
///     let resident = tch::no_grad(|| blocks.iter().fold(x.shallow_clone(), |h, b| b.forward(&h)));
///
///     // On a CUDA machine: `layerwise_offload::offload(&vs, "blocks")?`.
///     let manager = offload_with(&vs, "blocks", |c| c.cpu_test_mode(true))?;
///     let model = OffloadedBlocks::new(blocks, manager)?;
///     let y = tch::no_grad(|| model.forward(&x)); // blocks stream in, one ahead
///     assert!(y.equal(&resident));
///     Ok(())
/// }
/// ```
///
/// The explicit builder ([`OffloadConfig::new`]`(list, num_blocks)`) stays for those who want to
/// say how many blocks (the first `n` of a list) or to call `initialize()` themselves;
/// [`OffloadConfig::from_model`] gives it with the counts found.
pub fn offload_with(
    model: &(impl WeightSource + ?Sized),
    lists: impl BlockLists,
    configure: impl FnOnce(OffloadConfig) -> OffloadConfig,
) -> Result<LayerwiseOffloadManager> {
    let mut manager = configure(OffloadConfig::from_model(model, lists)?).build(model)?;
    manager.initialize()?;
    Ok(manager)
}
