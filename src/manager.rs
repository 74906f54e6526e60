//! [`LayerwiseOffloadManager`]: keeps each block's weights in one host buffer and streams them
//! through a fixed ring of GPU slots, one block ahead of the compute.
//!
//! Data path of one block: host buffer (one allocation per block, tensors at 256-byte aligned
//! offsets) → one non-blocking copy on the copy stream into a free slot → the slot's `ready`
//! event → the compute stream waits on it when the block is entered → the block's tensors point
//! (`set_data`) at views of the slot → the block runs → release records the slot's `free` event
//! on the compute stream → the copy stream waits on that event before it overwrites the slot.
//! No host synchronization happens in the loop.
//!
//! A complete loop that runs anywhere (the CPU test mode stands in for the GPU; on a CUDA
//! machine drop `cpu_test_mode` and build the model on the CPU as here):
//!
//! ```
//! use layerwise_offload::{OffloadConfig, Result};
//! use tch::nn::{self, Module};
//! use tch::{Device, Kind, Tensor};
//!
//! fn main() -> Result<()> {
//!     let vs = nn::VarStore::new(Device::Cpu);
//!     let blocks: Vec<nn::Linear> =
//!         (0..4).map(|i| nn::linear(vs.root() / "blocks" / i, 8, 8, Default::default())).collect();
//!     let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
//!     let run = |m: Option<&mut layerwise_offload::LayerwiseOffloadManager>| -> Result<Tensor> {
//!         let mut m = m;
//!         let mut h = x.shallow_clone();
//!         for (i, b) in blocks.iter().enumerate() {
//!             let _guard = match m.as_deref_mut() {
//!                 Some(m) => Some(m.enter(i)?), // block i on the device, block i + 1 on its way
//!                 None => None,
//!             };
//!             h = b.forward(&h).relu();
//!         }
//!         Ok(h)
//!     };
//!     let resident = tch::no_grad(|| run(None))?;
//!
//!     let mut offload = OffloadConfig::new("blocks", 4).cpu_test_mode(true).build(&vs)?;
//!     offload.initialize()?;
//!     // The model's block tensors are empty placeholders now; the manager holds the values.
//!     assert_eq!(vs.variables()["blocks.2.weight"].numel(), 0);
//!     let streamed = tch::no_grad(|| run(Some(&mut offload)))?;
//!     assert!(streamed.equal(&resident)); // bit for bit
//!
//!     offload.restore()?; // every weight back in the model
//!     assert_eq!(vs.variables()["blocks.2.weight"].size(), vec![8, 8]);
//!     Ok(())
//! }
//! ```

use crate::accel::{self, Event, HostMemory, Stream};
use crate::claims::Claim;
use crate::error::{Error, Result};
use crate::host::HostStore;
use crate::peer::{self, PeerGroup, Post};
use crate::placement::{self, Budget};
use crate::plan::{self, LayerLayout, Plan};
use crate::source::WeightSource;
use crate::stats::{Lane, OffloadStats, TimelineSpan};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How a manager is set up. Required values are positional in [`OffloadConfig::new`]; the rest
/// are options with the seed's defaults.
#[derive(Debug, Clone)]
pub struct OffloadConfig {
    lists: Vec<(String, usize)>,
    enabled: bool,
    pin_cpu_memory: bool,
    auto_initialize: bool,
    prefetch_depth: usize,
    device: usize,
    cpu_test_mode: bool,
    timing: bool,
    budget: Option<Budget>,
    faults: Vec<Fault>,
    store: Option<Arc<HostStore>>,
    shareable: bool,
    shm: Option<std::path::PathBuf>,
    peer: Option<(Arc<PeerGroup>, usize)>,
    push_per_member: bool,
    allow_cpu_fallback: bool,
}

/// A failure to inject, for tests of the error paths (the k-th such operation fails, counting
/// from 0). Not part of the stable API.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The k-th slot allocation runs out of device memory.
    SlotAlloc(usize),
    /// The k-th upload fails.
    Upload(usize),
    /// The k-th host buffer allocation is refused.
    HostAlloc(usize),
    /// The k-th block that `restore` copies back from its host copy runs out of device memory.
    Restore(usize),
}

/// The largest [`OffloadConfig::prefetch_depth`] accepted.
pub const MAX_PREFETCH_DEPTH: usize = 1024;

impl OffloadConfig {
    /// Offload blocks `0..num_layers` of the list whose tensors are named
    /// `<module_list_attr>.<index>.…` (e.g. `"blocks"`, 40).
    pub fn new(module_list_attr: impl Into<String>, num_layers: usize) -> OffloadConfig {
        OffloadConfig {
            lists: vec![(module_list_attr.into(), num_layers)],
            enabled: true,
            pin_cpu_memory: true,
            auto_initialize: false,
            prefetch_depth: 1,
            device: 0,
            cpu_test_mode: false,
            timing: true,
            budget: None,
            faults: Vec::new(),
            store: None,
            shareable: false,
            shm: None,
            peer: None,
            push_per_member: false,
            allow_cpu_fallback: false,
        }
    }

    /// Make this manager member `rank` of `group`: each member uploads `1/n` of every block from
    /// the host over its own PCIe link and sends it to the other members device to device
    /// (NVLink or PCIe peer access), so each GPU receives every block while its host link
    /// carries only its share. For data-parallel inference on several GPUs of one host: one
    /// member per GPU, each driven by its own thread, all entering the same blocks in the same
    /// order (see [`PeerGroup`]). Usually combined with [`Self::host_store`] so the host holds
    /// one copy. The first block is uploaded at the first `enter`, not by `initialize`, since
    /// uploads need every member.
    pub fn peer_group(mut self, group: Arc<PeerGroup>, rank: usize) -> OffloadConfig {
        self.peer = Some((group, rank));
        self
    }

    /// Put the host copy in a file on a shared-memory file system (e.g.
    /// `/dev/shm/wan14b-blocks`, which must not exist yet) and publish it, with a manifest
    /// written last, so that managers in other processes of this machine (one per GPU) stream
    /// from the same physical memory: they open it with
    /// [`HostStore::open_shared`](crate::HostStore::open_shared). The file is removed when this
    /// manager's store is dropped; processes that mapped it keep their mapping. While
    /// published, `update_tensor` on block weights is refused.
    ///
    /// The file and its manifest are created with mode 0600, never over anything already at
    /// the path nor through a symbolic link (either is [`Error::SharedFile`]), and the file's
    /// space is reserved first: a file system too small for the store is
    /// [`Error::HostAlloc`] ("No space left on device"), with the file removed. Readers must
    /// run as the same user. Truncating the file while readers map it kills them with SIGBUS:
    /// leave it alone until the store is dropped.
    pub fn shared_memory(mut self, path: impl Into<std::path::PathBuf>) -> OffloadConfig {
        self.shm = Some(path.into());
        self
    }

    /// Keep a host copy of every block, the resident ones (under a VRAM budget) included, so
    /// that this manager's [`HostStore`] can serve managers with other budgets on other
    /// devices. Costs host memory for the resident blocks; without a budget it changes
    /// nothing. Off by default.
    pub fn shareable(mut self, on: bool) -> OffloadConfig {
        self.shareable = on;
        self
    }

    /// Stream from `store`, the host copy another manager of this process made (typically of
    /// the same model on another GPU), instead of copying this model's blocks into host memory
    /// of its own. The model's block tensors must have the store's names, shapes and dtypes;
    /// their values are not used (they become placeholders, freeing their memory). Non-block
    /// tensors come from this model. With a VRAM budget, this manager's resident blocks are
    /// filled from the store too (the store must hold every block: make it with no budget, or
    /// with [`Self::shareable`]).
    pub fn host_store(mut self, store: Arc<HostStore>) -> OffloadConfig {
        self.store = Some(store);
        self
    }

    /// Peer groups: send the shares to the other members on one stream per receiver (`true`)
    /// instead of one stream for all (the default). For measurements; not part of the stable
    /// API.
    #[doc(hidden)]
    pub fn push_stream_per_member(mut self, on: bool) -> OffloadConfig {
        self.push_per_member = on;
        self
    }

    /// Makes an operation fail on purpose, to test error paths. Not part of the stable API.
    #[doc(hidden)]
    pub fn inject_fault(mut self, fault: Fault) -> OffloadConfig {
        self.faults.push(fault);
        self
    }

    /// Adds another block list; the loop runs list by list in the order given (e.g. Flux's
    /// `double_blocks`, then `single_blocks`).
    pub fn with_list(
        mut self,
        module_list_attr: impl Into<String>,
        num_layers: usize,
    ) -> OffloadConfig {
        self.lists.push((module_list_attr.into(), num_layers));
        self
    }

    /// Off: every call is a no-op and the model is left as it is (default on).
    pub fn enabled(mut self, enabled: bool) -> OffloadConfig {
        self.enabled = enabled;
        self
    }

    /// Without a usable CUDA device, build a disabled manager (every call a no-op, the model
    /// left on the CPU as it is) instead of failing (default false: [`Self::build`] returns
    /// [`Error::NoDevice`] saying why CUDA is unusable). [`LayerwiseOffloadManager::is_enabled`]
    /// tells which one was built. [`LayerwiseOffloadManager::new`], the seed's constructor,
    /// turns this on and says so once on stderr.
    pub fn allow_cpu_fallback(mut self, allow: bool) -> OffloadConfig {
        self.allow_cpu_fallback = allow;
        self
    }

    /// Page-lock the host buffers (default true). Pageable buffers upload at about a third of
    /// the speed and the copies do not overlap compute.
    pub fn pin_cpu_memory(mut self, pin: bool) -> OffloadConfig {
        self.pin_cpu_memory = pin;
        self
    }

    /// Run [`LayerwiseOffloadManager::initialize`] inside `build` (default false).
    pub fn auto_initialize(mut self, auto: bool) -> OffloadConfig {
        self.auto_initialize = auto;
        self
    }

    /// How many blocks are uploaded ahead of the one computing (default 1, from 1 to
    /// [`MAX_PREFETCH_DEPTH`]). The GPU holds `prefetch_depth + 1` slots of the largest block's
    /// size, never more slots than there are streamed blocks.
    pub fn prefetch_depth(mut self, depth: usize) -> OffloadConfig {
        self.prefetch_depth = depth;
        self
    }

    /// The CUDA device that computes (default 0).
    pub fn device(mut self, index: usize) -> OffloadConfig {
        self.device = index;
        self
    }

    /// Run everything with the CPU as the compute device: plain host buffers, CPU slots,
    /// synchronous copies, no streams. For testing the manager's logic without a GPU; it saves
    /// no memory. Off by default.
    pub fn cpu_test_mode(mut self, on: bool) -> OffloadConfig {
        self.cpu_test_mode = on;
        self
    }

    /// Let the manager hold up to `bytes` of device memory for block weights: the slot ring
    /// plus as many whole blocks kept permanently resident as fit next to it, spread evenly
    /// through the loop so that uploads proceed while resident blocks compute. Only the other
    /// blocks stream. A budget that holds every block makes the manager keep all of them
    /// resident, with no slot ring and no uploads. Without a budget every block streams.
    /// Non-block weights and activations are not counted.
    pub fn vram_budget(mut self, bytes: u64) -> OffloadConfig {
        self.budget = Some(Budget::Bytes(bytes));
        self
    }

    /// [`Self::vram_budget`] of all but `reserve` bytes of what the device has free when
    /// `initialize()` runs (after the non-block weights are on it), e.g. `8 << 30` to leave
    /// 8 GiB for activations. Needs a CUDA device.
    pub fn vram_budget_all_but(mut self, reserve: u64) -> OffloadConfig {
        self.budget = Some(Budget::AllBut(reserve));
        self
    }

    /// Time every upload and every compute-stream wait with CUDA events (default on; two events
    /// per upload and per entered block, read back without blocking). Off: the statistics count
    /// bytes and uploads only.
    pub fn timing(mut self, on: bool) -> OffloadConfig {
        self.timing = on;
        self
    }

    /// Builds the manager over `model`'s weights (and initializes it if `auto_initialize`).
    ///
    /// Without a usable CUDA device (outside the CPU test mode and unless disabled) this fails
    /// with [`Error::NoDevice`], whose reason says what is missing: a CPU-only libtorch, a CUDA
    /// backend that could not be loaded, no driver or no GPU, or a device index out of range.
    /// [`Self::allow_cpu_fallback`] builds a disabled manager instead.
    pub fn build(self, model: &(impl WeightSource + ?Sized)) -> Result<LayerwiseOffloadManager> {
        if self.prefetch_depth == 0 {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::prefetch_depth",
                message: "prefetch_depth must be at least 1".into(),
            });
        }
        if self.prefetch_depth > MAX_PREFETCH_DEPTH {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::prefetch_depth",
                message: format!(
                    "prefetch_depth {} is out of range: pass 1..={MAX_PREFETCH_DEPTH} (each step holds one more slot of the largest block on the GPU; more than the number of blocks gains nothing)",
                    self.prefetch_depth
                ),
            });
        }
        if self.enabled
            && let Some((attr, _)) = self.lists.iter().find(|(_, n)| *n == 0)
        {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::new",
                message: format!(
                    "num_layers is 0 for {attr:?}: pass the number of blocks to offload (at least 1), or build with enabled(false) to offload nothing"
                ),
            });
        }
        if let Some((group, rank)) = &self.peer
            && *rank >= group.size()
        {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::peer_group",
                message: format!(
                    "rank {rank} is out of range for a group of {} (ranks 0..{})",
                    group.size(),
                    group.size()
                ),
            });
        }
        let named = model.named_tensors()?;
        let backend = if !self.enabled {
            Backend::Disabled
        } else if self.cpu_test_mode {
            Backend::Cpu
        } else {
            match accel::require_device("OffloadConfig::build", self.device) {
                Ok(()) => Backend::Cuda {
                    device: self.device,
                    copy: None,
                },
                Err(_) if self.allow_cpu_fallback => Backend::Disabled,
                Err(Error::NoDevice { op, reason }) => {
                    return Err(Error::NoDevice {
                        op,
                        reason: format!(
                            "{reason} (allow_cpu_fallback(true) builds a disabled manager instead)"
                        ),
                    });
                }
                Err(e) => return Err(e),
            }
        };
        let auto = self.auto_initialize;
        let mut m = LayerwiseOffloadManager {
            config: self,
            backend,
            named,
            phase: Phase::Configured,
            plan: None,
            layers: Vec::new(),
            slots: Vec::new(),
            tick: 0,
            stats: OffloadStats::default(),
            pending: Vec::new(),
            open_compute: Vec::new(),
            timeline: None,
            spare: Vec::new(),
            counts: [0; 4],
            claim: None,
            restored: 0,
            store: None,
            push: Vec::new(),
            peer_round: 0,
            joined: false,
        };
        if auto {
            m.initialize()?;
        }
        Ok(m)
    }
}

#[derive(Debug)]
enum Backend {
    /// No CUDA device (or disabled): every call is a no-op.
    Disabled,
    /// Compute on the CPU, synchronous copies (the CPU test mode).
    Cpu,
    /// Compute on CUDA device `device`; uploads on `copy`.
    Cuda { device: usize, copy: Option<Stream> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Configured,
    Ready,
    /// A `restore` stopped part-way: only `restore` goes on from here.
    Restoring,
    Restored,
}

/// What `initialize` changed so far, to put the model back as it was should a later step fail.
#[derive(Debug, Default)]
struct Undo {
    /// The device of every source tensor before `initialize`.
    devices: Vec<Device>,
    /// Tensors re-pointed whose old value has no host copy of this manager's (moved to the
    /// device, or given placeholders or fresh tensors from a shared store), each with an alias
    /// of its old data.
    repointed: Vec<(usize, Tensor)>,
    /// The shared-memory file this `initialize` created.
    created: Option<std::path::PathBuf>,
}

/// Runtime state of one block.
#[derive(Debug)]
struct LayerRt {
    /// The block's host buffer (uint8), once filled.
    host: Option<Tensor>,
    /// Handles of the model's tensors (same order as the layout's tensors).
    params: Vec<Tensor>,
    /// Empty tensors the params point at while the block is not on the device.
    placeholders: Vec<Tensor>,
    /// The slot holding the block's weights, if any.
    slot: Option<usize>,
    /// Entered and not yet released.
    in_use: bool,
    /// Kept on the compute device for good (within the VRAM budget): never streams.
    resident: bool,
}

/// One GPU slot of the ring.
#[derive(Debug)]
struct SlotRt {
    buf: Tensor,
    layer: Option<usize>,
    /// Recorded on the copy stream after the upload into this slot.
    ready: Option<Event>,
    /// Recorded on the compute stream when the block using this slot was released.
    free: Option<Event>,
    free_recorded: bool,
    /// The block now in the slot was released since its upload (so `free` covers its reads).
    released: bool,
    last_used: u64,
    /// Peer groups, by receiving rank: recorded on the push stream to that member after this
    /// slot's share went there.
    pushed: Vec<Event>,
    pushed_recorded: bool,
    /// Peer groups: the other members' shares of the block now in the slot have arrived once
    /// these have completed.
    incoming: Vec<Arc<Event>>,
}

/// Streams a model's per-block weights between host memory and the GPU, one block ahead of the
/// compute, with the API of FastVideo's `LayerwiseOffloadManager` plus a guard-based layer loop.
///
/// Blocks are numbered in loop order across all lists (list by list); [`Self::layer_index`]
/// maps `(list, index)` to that number.
///
/// After [`Self::initialize`], a block's tensors are empty placeholders except while the block
/// is on the device; non-block tensors stay on the compute device. [`Self::restore`] puts every
/// weight back on the compute device. Dropping the manager without `restore` points each block
/// tensor at its host copy (CPU memory), so no weight is ever lost.
///
/// Inference only: autograd must be off (`tch::no_grad`) while the loop runs, since slot
/// memory is reused.
///
/// The manager is `Send` but not `Sync`: it may move to another thread, and every call uses the
/// calling thread's current CUDA stream as the compute stream.
#[derive(Debug)]
pub struct LayerwiseOffloadManager {
    config: OffloadConfig,
    backend: Backend,
    named: Vec<(String, Tensor)>,
    phase: Phase,
    plan: Option<Plan>,
    layers: Vec<LayerRt>,
    slots: Vec<SlotRt>,
    tick: u64,
    stats: OffloadStats,
    /// Timed intervals queued on the device and not yet read back.
    pending: Vec<Timed>,
    /// Compute intervals of entered blocks, closed at release (while capturing a timeline).
    open_compute: Vec<(usize, Event, Event)>,
    /// The timeline being captured, if any.
    timeline: Option<Timeline>,
    /// Timing events ready for reuse.
    spare: Vec<(Event, Event)>,
    /// Slot allocations, uploads, host allocations and restored blocks so far (for injected
    /// faults).
    counts: [usize; 4],
    /// This manager's hold on the model's block tensors, from `initialize` until `restore`.
    claim: Option<Claim>,
    /// Blocks back in the model during the latest `restore`.
    restored: usize,
    /// The host store this manager streams from (its own, or one shared with it).
    store: Option<Arc<HostStore>>,
    /// Peer groups, by receiving rank: the stream this member's shares go out on to that member
    /// (CUDA; the same stream for all unless `push_stream_per_member`).
    push: Vec<Stream>,
    /// Peer groups: uploads done so far (the k-th is the same block on every member).
    peer_round: u64,
    /// Peer groups: joined and not yet left.
    joined: bool,
}

/// A device interval being timed: an upload on the copy stream or a wait on the compute stream.
#[derive(Debug)]
struct Timed {
    layer: usize,
    /// Bytes moved (uploads).
    bytes: u64,
    lane: Lane,
    start: Event,
    end: Event,
    /// Recorded while a timeline was being captured.
    traced: bool,
}

/// A timeline capture: an origin event on the compute stream and the spans read back so far.
#[derive(Debug)]
struct Timeline {
    origin: Event,
    spans: Vec<TimelineSpan>,
}

impl LayerwiseOffloadManager {
    /// The seed's constructor: `new(model, module_list_attr, num_layers, enabled,
    /// pin_cpu_memory, auto_initialize)`. As in the seed, disabled (all no-ops) without a usable
    /// CUDA device; it then says why once per process on stderr, and [`Self::is_enabled`] is
    /// false. [`OffloadConfig::build`] fails instead unless asked to fall back.
    pub fn new(
        model: &(impl WeightSource + ?Sized),
        module_list_attr: &str,
        num_layers: usize,
        enabled: bool,
        pin_cpu_memory: bool,
        auto_initialize: bool,
    ) -> Result<LayerwiseOffloadManager> {
        let m = OffloadConfig::new(module_list_attr, num_layers)
            .enabled(enabled)
            .pin_cpu_memory(pin_cpu_memory)
            .auto_initialize(auto_initialize)
            .allow_cpu_fallback(true)
            .build(model)?;
        if enabled && !m.is_enabled() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                eprintln!(
                    "layerwise-offload: the manager is disabled (every call is a no-op): {}",
                    accel::cuda_unavailable_reason().unwrap_or("no CUDA device")
                )
            });
        }
        Ok(m)
    }

    /// Whether the manager does anything: false when disabled or without a CUDA device (outside
    /// the CPU test mode).
    pub fn is_enabled(&self) -> bool {
        !matches!(self.backend, Backend::Disabled)
    }

    /// Whether `initialize()` has run (and `restore()` has not).
    pub fn is_initialized(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The device blocks compute on.
    pub fn compute_device(&self) -> Device {
        match self.backend {
            Backend::Cuda { device, .. } => Device::Cuda(device),
            _ => Device::Cpu,
        }
    }

    /// The plan (which tensors form which block), once initialized.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Number of offloaded blocks over all lists (0 before `initialize`).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The loop index of block `index` of list `module_list_attr`.
    pub fn layer_index(&self, module_list_attr: &str, index: usize) -> Option<usize> {
        self.plan
            .as_ref()?
            .layers
            .iter()
            .position(|l| l.attr == module_list_attr && l.index == index)
    }

    /// The host copy of the streamed blocks, to share with managers of the same model on other
    /// devices of this process ([`OffloadConfig::host_store`]). None before `initialize`.
    pub fn host_store(&self) -> Option<Arc<HostStore>> {
        self.store.clone()
    }

    /// Counters so far. Timings are read back without blocking, so the most recent intervals
    /// appear once the device has finished them (synchronize first for a complete account).
    pub fn stats(&mut self) -> &OffloadStats {
        self.harvest();
        if let Backend::Cuda { device, .. } = self.backend
            && let Ok(m) = accel::memory_stats(device)
        {
            self.stats.peak_vram_bytes = m.peak_allocated;
        }
        &self.stats
    }

    /// Starts capturing a timeline: from now on every upload, compute-stream wait and block
    /// compute is kept as a [`TimelineSpan`] (three pairs of events per block). Needs a CUDA
    /// device and `timing(true)`.
    pub fn start_timeline(&mut self) -> Result<()> {
        let compute = match self.compute_stream()? {
            Some(c) if self.config.timing => c,
            _ => {
                return Err(Error::InvalidArgument {
                    op: "start_timeline",
                    message: "a timeline needs a CUDA device and timing(true)".into(),
                });
            }
        };
        let mut origin = Event::with_timing()?;
        origin.record(&compute)?;
        self.timeline = Some(Timeline {
            origin,
            spans: Vec::new(),
        });
        Ok(())
    }

    /// Stops the capture and returns its spans, sorted by start. Waits (on the host) for the
    /// device to finish the work queued so far. Empty if no capture was running.
    pub fn finish_timeline(&mut self) -> Result<Vec<TimelineSpan>> {
        if self.timeline.is_none() {
            return Ok(Vec::new());
        }
        if let Backend::Cuda { device, .. } = self.backend {
            accel::synchronize_device(device)?;
        }
        self.harvest();
        let mut spans = self.timeline.take().map(|t| t.spans).unwrap_or_default();
        spans.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
        Ok(spans)
    }

    /// Reads back every finished timed interval into the statistics and recycles its events.
    fn harvest(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            if !self.pending[i].end.query().unwrap_or(true) {
                i += 1;
                continue;
            }
            let t = self.pending.swap_remove(i);
            if let Ok(ms) = t.start.elapsed_ms(&t.end) {
                let bytes = t.bytes;
                match t.lane {
                    Lane::Upload => {
                        self.stats.upload_ms += ms;
                        self.stats.timed_uploads += 1;
                        self.stats.timed_bytes += bytes;
                        self.stats.layer_upload_ms[t.layer] += ms;
                    }
                    Lane::Stall => {
                        self.stats.stall_ms += ms;
                        self.stats.layer_stall_ms[t.layer] += ms;
                    }
                    Lane::Compute => {}
                }
                if let (true, Some(tl)) = (t.traced, self.timeline.as_mut())
                    && let (Ok(a), Ok(b)) =
                        (tl.origin.elapsed_ms(&t.start), tl.origin.elapsed_ms(&t.end))
                {
                    tl.spans.push(TimelineSpan {
                        lane: t.lane,
                        layer: t.layer,
                        start_ms: a,
                        end_ms: b,
                    });
                }
            }
            self.spare.push((t.start, t.end));
        }
    }

    /// A pair of timing events, recycled when possible; None when timing is off or on the CPU.
    fn timing_pair(&mut self) -> Result<Option<(Event, Event)>> {
        if !self.config.timing || !matches!(self.backend, Backend::Cuda { .. }) {
            return Ok(None);
        }
        self.harvest();
        match self.spare.pop() {
            Some(p) => Ok(Some(p)),
            None => Ok(Some((Event::with_timing()?, Event::with_timing()?))),
        }
    }

    /// Offloads every block tensor into its host buffer, leaves rank-preserving empty
    /// placeholders in the model, moves non-block tensors to the compute device, allocates the
    /// slot ring and uploads the first block synchronously. A no-op when disabled or already
    /// initialized.
    ///
    /// Works from a model on the CPU (block tensors go straight to their host buffers and each
    /// CPU tensor is freed once copied, so the model never has to fit on the GPU) or one
    /// already on the compute device. An error leaves the model as it was: every tensor back on
    /// its device with its value (block tensors in fresh tensors filled from their host copies;
    /// should the device have no memory left for one, it points at its host copy on the CPU),
    /// nothing published, the peer group rank free again, and calling `initialize()` again
    /// starts over. If only the final upload of the first block fails, that error is returned
    /// with the manager initialized: the block is uploaded again when it is entered.
    ///
    /// Refused with [`Error::AlreadyOffloaded`] while another manager holds the model's blocks.
    pub fn initialize(&mut self) -> Result<()> {
        if !self.is_enabled() || self.phase == Phase::Ready {
            return Ok(());
        }
        match self.phase {
            Phase::Restored => {
                return Err(Error::InvalidArgument {
                    op: "initialize",
                    message: "the manager was restored; build a new manager to offload again"
                        .into(),
                });
            }
            Phase::Restoring => return Err(self.partly_restored("initialize")),
            Phase::Configured | Phase::Ready => {}
        }
        let started = Instant::now();
        let mut undo = Undo {
            devices: self.named.iter().map(|(_, t)| t.device()).collect(),
            ..Undo::default()
        };
        let first = match self.offload(&mut undo) {
            Ok(first) => first,
            Err(e) => {
                self.roll_back(undo);
                return Err(e);
            }
        };
        drop(undo); // frees the old storage of the tensors moved to the device
        self.phase = Phase::Ready;
        self.stats.init_seconds = started.elapsed().as_secs_f64();

        // 5. The first streamed block on the device, synchronously (as the seed does). Not in a
        //    peer group: an upload needs every member there.
        if let (Some(first), None) = (first, &self.config.peer) {
            self.prefetch_layer(first, false)?;
        }
        Ok(())
    }

    /// Steps 0 to 4 of [`Self::initialize`]; returns the first streamed block. Records in
    /// `undo` what [`Self::roll_back`] needs to put the model back should a step fail.
    fn offload(&mut self, undo: &mut Undo) -> Result<Option<usize>> {
        let compute = self.compute_device();
        let allowed = if compute == Device::Cpu {
            vec![Device::Cpu]
        } else {
            vec![compute, Device::Cpu]
        };
        let plan = plan::build(&self.named, &self.config.lists, &allowed)?;
        if let Some(store) = &self.config.store {
            store.check_plan(&plan)?;
        }
        // No other manager may hold these tensors: it would have left placeholders in them.
        self.claim = Some(Claim::take(plan.layers.iter().flat_map(|l| {
            l.tensors
                .iter()
                .map(|t| (t.name.as_str(), &self.named[t.source_index].1))
        }))?);

        // 0. Which blocks stay resident (a VRAM budget), which stream.
        let resident = self.choose_resident(&plan)?;
        let streamed: Vec<usize> = (0..plan.layers.len()).filter(|&i| !resident[i]).collect();

        // 1. The slot ring and its events first: running out of device memory here changes
        //    nothing.
        let slot_bytes = streamed
            .iter()
            .map(|&i| plan.layers[i].bytes)
            .max()
            .unwrap_or(0);
        let n_slots = self
            .config
            .prefetch_depth
            .saturating_add(1)
            .min(streamed.len());
        let mut slots = Vec::with_capacity(n_slots);
        for _ in 0..n_slots {
            if self.injected(0) {
                return Err(Error::OutOfMemory {
                    op: format!(
                        "allocating {n_slots} GPU slots of {slot_bytes} bytes (prefetch_depth + 1)"
                    ),
                    bytes: (slot_bytes * n_slots) as u64,
                    source: crate::error::TorchMessage("injected fault".into()),
                });
            }
            let buf = match self.backend {
                Backend::Cuda { device, .. } => accel::alloc_device(slot_bytes, device).map_err(|e| match e {
                    Error::OutOfMemory { source, .. } => Error::OutOfMemory {
                        op: format!("allocating {n_slots} GPU slots of {slot_bytes} bytes (prefetch_depth + 1)"),
                        bytes: (slot_bytes * n_slots) as u64,
                        source,
                    },
                    e => e,
                })?,
                _ => Tensor::f_empty([slot_bytes as i64], (Kind::Uint8, Device::Cpu))
                    .map_err(|e| Error::from(("allocating CPU slots", e)))?,
            };
            let (ready, free) = match self.backend {
                Backend::Cuda { .. } => (Some(Event::new()?), Some(Event::new()?)),
                _ => (None, None),
            };
            let pushed = match (&self.backend, &self.config.peer) {
                (Backend::Cuda { .. }, Some((group, _))) => (0..group.size())
                    .map(|_| Event::new())
                    .collect::<Result<_>>()?,
                _ => Vec::new(),
            };
            slots.push(SlotRt {
                buf,
                layer: None,
                ready,
                free,
                free_recorded: false,
                released: false,
                last_used: 0,
                pushed,
                pushed_recorded: false,
                incoming: Vec::new(),
            });
        }
        if let Backend::Cuda { device, copy } = &mut self.backend
            && copy.is_none()
        {
            *copy = Some(Stream::from_pool(*device)?);
        }
        if let Some((group, rank)) = &self.config.peer {
            if let Backend::Cuda { device, .. } = self.backend
                && self.push.is_empty()
            {
                let one = Stream::from_pool(device)?;
                self.push = (0..group.size())
                    .map(|_| {
                        if self.config.push_per_member {
                            Stream::from_pool(device)
                        } else {
                            Ok(one)
                        }
                    })
                    .collect::<Result<_>>()?;
            }
            group.join(*rank, slots.iter().map(|s| s.buf.shallow_clone()).collect())?;
            self.joined = true;
        }

        // 2. Runtime state per block: handles and placeholders.
        let mut layers = Vec::with_capacity(plan.layers.len());
        for l in &plan.layers {
            let mut params = Vec::with_capacity(l.tensors.len());
            let mut placeholders = Vec::with_capacity(l.tensors.len());
            for t in &l.tensors {
                params.push(self.named[t.source_index].1.shallow_clone());
                let shape = vec![0i64; t.shape.len().max(1)];
                placeholders.push(
                    Tensor::f_empty(shape, (t.kind, compute))
                        .map_err(|e| Error::from(("creating placeholders", e)))?,
                );
            }
            layers.push(LayerRt {
                host: None,
                params,
                placeholders,
                slot: None,
                in_use: false,
                resident: false,
            });
        }
        for (rt, &r) in layers.iter_mut().zip(&resident) {
            rt.resident = r;
        }

        // 3. Non-block tensors and resident blocks to the compute device.
        // (With a shared store, resident blocks get their values from the store below.)
        let from_store = self.config.store.is_some();
        let resident_tensors = plan
            .layers
            .iter()
            .zip(&resident)
            .filter(|(_, r)| **r && !from_store)
            .flat_map(|(l, _)| l.tensors.iter().map(|t| t.source_index));
        let to_move: Vec<usize> = plan
            .resident
            .iter()
            .copied()
            .chain(resident_tensors)
            .collect();
        for i in to_move {
            let t = &mut self.named[i].1;
            if t.device() != compute {
                let moved = tch::no_grad(|| t.f_to_device(compute)).map_err(|e| {
                    Error::from_torch(
                        "moving non-block tensors to the compute device",
                        0,
                        e.to_string(),
                    )
                })?;
                let old = t
                    .f_detach()
                    .map_err(|e| Error::from(("moving non-block tensors", e)))?;
                undo.repointed.push((i, old));
                t.f_set_data(&moved)
                    .map_err(|e| Error::from(("moving non-block tensors", e)))?;
            }
        }

        self.slots = slots;
        self.layers = layers;
        self.stats = OffloadStats {
            streamed_layers: streamed.len(),
            resident_layers: plan.layers.len() - streamed.len(),
            resident_bytes: plan
                .layers
                .iter()
                .zip(&resident)
                .filter(|(_, r)| **r)
                .map(|(l, _)| l.bytes as u64)
                .sum(),
            slot_bytes: (slot_bytes * n_slots) as u64,
            pinned: self.host_memory() == HostMemory::Pinned,
            layer_upload_ms: vec![0.0; plan.layers.len()],
            layer_stall_ms: vec![0.0; plan.layers.len()],
            ..OffloadStats::default()
        };
        self.plan = Some(plan);

        // 4. Streamed blocks into their host buffers, one at a time, freeing each source as it
        //    goes.
        if let Some(store) = self.config.store.clone() {
            // The model's own block values are not used, but they are kept until initialize
            // succeeds, to be put back should it fail.
            for &i in &streamed {
                let sources: Vec<usize> = self
                    .layout(i)
                    .tensors
                    .iter()
                    .map(|t| t.source_index)
                    .collect();
                let rt = &mut self.layers[i];
                rt.host = store.buffers[i].as_ref().map(|b| b.shallow_clone());
                for ((p, ph), src) in rt.params.iter_mut().zip(&rt.placeholders).zip(sources) {
                    let old = p
                        .f_detach()
                        .map_err(|e| Error::from(("placing placeholders", e)))?;
                    undo.repointed.push((src, old));
                    p.f_set_data(ph)
                        .map_err(|e| Error::from(("placing placeholders", e)))?;
                }
            }
            // Resident blocks: fresh device tensors filled from the store.
            for i in (0..self.layers.len()).filter(|&i| resident[i]) {
                let buf = store.buffers[i]
                    .as_ref()
                    .expect("check_plan: every block is in the store");
                let layout = self.layout(i).clone();
                let views = Self::views(buf, &layout)?;
                for ((t, v), p) in layout
                    .tensors
                    .iter()
                    .zip(&views)
                    .zip(self.layers[i].params.iter_mut())
                {
                    let mut fresh = Tensor::f_empty_strided(
                        t.shape.as_slice(),
                        t.strides.as_slice(),
                        (t.kind, compute),
                    )
                    .map_err(|e| {
                        Error::from_torch(
                            "filling resident blocks from the shared store",
                            t.bytes as u64,
                            e.to_string(),
                        )
                    })?;
                    tch::no_grad(|| fresh.f_copy_(v))
                        .map_err(|e| Error::from(("filling resident blocks", e)))?;
                    let old = p
                        .f_detach()
                        .map_err(|e| Error::from(("filling resident blocks", e)))?;
                    undo.repointed.push((t.source_index, old));
                    p.f_set_data(&fresh)
                        .map_err(|e| Error::from(("filling resident blocks", e)))?;
                }
            }
            self.stats.shared_host_bytes = store.bytes();
            self.store = Some(store);
        } else {
            let n = self.layers.len();
            let with_host: Vec<usize> = (0..n)
                .filter(|&i| !resident[i] || self.config.shareable)
                .collect();
            // A shared-memory file: one mapping, each block at a 4 KiB aligned offset.
            let sizes: Vec<Option<usize>> = (0..n)
                .map(|i| with_host.contains(&i).then(|| self.layout(i).bytes))
                .collect();
            let (offsets, total) = crate::host::file_offsets(&sizes);
            let file = match &self.config.shm {
                Some(path) if total > 0 => {
                    let f = accel::map_host_file(
                        path,
                        total,
                        accel::FileMapping::Create,
                        self.host_memory(),
                    )?;
                    undo.created = Some(path.clone());
                    Some(f)
                }
                Some(_) => {
                    return Err(Error::InvalidArgument {
                        op: "OffloadConfig::shared_memory",
                        message: "every block stays resident on the device under the VRAM budget, so there is no host copy to publish; build with .shareable(true) to publish the resident blocks too, or lower the budget".into(),
                    });
                }
                None => None,
            };
            for &i in &with_host {
                let buffer = match &file {
                    Some(f) => Some(
                        f.f_narrow(0, offsets[i] as i64, self.layout(i).bytes as i64)
                            .map_err(|e| {
                                Error::from(("mapping a block in the shared-memory file", e))
                            })?,
                    ),
                    None => None,
                };
                self.fill_host(i, !resident[i], buffer)?;
            }
            let plan = self.plan.as_ref().expect("plan set above");
            self.store = Some(Arc::new(HostStore::own(
                plan.layers.clone(),
                self.layers
                    .iter()
                    .map(|l| l.host.as_ref().map(|h| h.shallow_clone()))
                    .collect(),
                self.host_memory() == HostMemory::Pinned,
                self.config.shm.clone().filter(|_| file.is_some()),
            )));
            if let (Some(path), Some(store)) = (&self.config.shm, &self.store)
                && file.is_some()
            {
                // Last: readers see the manifest only once every block is in place. Should
                // writing it fail, the caller rolls back (the model gets its blocks back).
                store.write_manifest(path, &offsets, total)?;
            }
        }
        Ok(streamed.first().copied())
    }

    /// Undoes a failed [`Self::offload`]: own host copies go back into fresh tensors on their
    /// old devices (or, without memory there, stay as host views), re-pointed tensors get their
    /// old data back, and the slot ring, the plan, the store, the claim, the peer group rank
    /// and the shared-memory file this call created are given up.
    fn roll_back(&mut self, undo: Undo) {
        self.sync_copies();
        if self.config.store.is_none() && self.plan.is_some() {
            for i in 0..self.layers.len() {
                if self.layers[i].resident {
                    continue; // moved to the device in step 3: in `undo.repointed`
                }
                let Some(host) = self.layers[i].host.take() else {
                    continue; // not copied yet: untouched
                };
                let layout = self.layout(i).clone();
                let Ok(views) = Self::views(&host, &layout) else {
                    continue;
                };
                for ((t, v), p) in layout
                    .tensors
                    .iter()
                    .zip(&views)
                    .zip(self.layers[i].params.iter_mut())
                {
                    let device = undo.devices[t.source_index];
                    let fresh = Tensor::f_empty_strided(
                        t.shape.as_slice(),
                        t.strides.as_slice(),
                        (t.kind, device),
                    )
                    .and_then(|mut f| tch::no_grad(|| f.f_copy_(v)).map(|_| f));
                    let _ = match fresh {
                        Ok(f) => p.f_set_data(&f),
                        Err(_) => p.f_set_data(v),
                    };
                }
            }
        }
        for (i, old) in undo.repointed.into_iter().rev() {
            let _ = self.named[i].1.f_set_data(&old);
        }
        if self.joined
            && let Some((group, rank)) = &self.config.peer
        {
            group.unjoin(*rank);
        }
        self.joined = false;
        self.layers.clear();
        self.slots.clear();
        self.plan = None;
        self.store = None; // a published store removes its file and manifest when dropped
        self.claim = None;
        self.stats = OffloadStats::default();
        if let Some(path) = undo.created {
            // The file this call created (the manifest's own writer removes its temporary).
            let _ = std::fs::remove_file(path);
        }
    }

    /// Marks the blocks that stay on the device for good: as many as fit in the budget next to
    /// the slot ring, spread evenly through the loop. All of them if everything fits.
    fn choose_resident(&self, plan: &Plan) -> Result<Vec<bool>> {
        let n = plan.layers.len();
        let Some(budget) = self.config.budget else {
            return Ok(vec![false; n]);
        };
        let budget = match (budget, &self.backend) {
            (Budget::Bytes(b), _) => b,
            (Budget::AllBut(reserve), Backend::Cuda { device, .. }) => {
                // Non-block weights still on the CPU will take their share of what is free.
                let pending: u64 = plan
                    .resident
                    .iter()
                    .map(|&i| &self.named[i].1)
                    .filter(|t| t.device() == Device::Cpu)
                    .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                    .sum();
                let (free, _) = accel::memory_info(*device)?;
                free.saturating_sub(pending).saturating_sub(reserve)
            }
            (Budget::AllBut(_), _) => {
                return Err(Error::InvalidArgument {
                    op: "vram_budget_all_but",
                    message: "a budget relative to free device memory needs a CUDA device; use vram_budget(bytes) in the CPU test mode".into(),
                });
            }
        };
        let sizes: Vec<u64> = plan.layers.iter().map(|l| l.bytes as u64).collect();
        placement::resident_blocks(&sizes, Some(budget), self.config.prefetch_depth)
    }

    /// Counts one operation of kind `which` (0 slot, 1 upload, 2 host, 3 restored block) and
    /// says whether an injected fault makes it fail.
    fn injected(&mut self, which: usize) -> bool {
        let k = self.counts[which];
        self.counts[which] += 1;
        self.config.faults.iter().any(|f| match (which, f) {
            (0, Fault::SlotAlloc(n))
            | (1, Fault::Upload(n))
            | (2, Fault::HostAlloc(n))
            | (3, Fault::Restore(n)) => *n == k,
            _ => false,
        })
    }

    fn host_memory(&self) -> HostMemory {
        match self.backend {
            Backend::Cuda { .. } if self.config.pin_cpu_memory => HostMemory::Pinned,
            _ => HostMemory::Pageable,
        }
    }

    fn layout(&self, layer: usize) -> &LayerLayout {
        &self
            .plan
            .as_ref()
            .expect("plan exists once layers exist")
            .layers[layer]
    }

    /// Typed views of a block buffer (host buffer or slot), one per tensor, with the original
    /// shapes and strides.
    fn views(buf: &Tensor, layout: &LayerLayout) -> Result<Vec<Tensor>> {
        layout
            .tensors
            .iter()
            .map(|t| {
                buf.f_narrow(0, t.offset as i64, t.bytes as i64)
                    .and_then(|v| v.f_view_dtype(t.kind))
                    .and_then(|v| v.f_as_strided(t.shape.as_slice(), t.strides.as_slice(), None))
                    .map_err(|e| Error::from(("making views of a block buffer", e)))
            })
            .collect()
    }

    /// Copies block `i`'s tensors into `buffer` (or a new host buffer) and, if `release`,
    /// points them at placeholders.
    fn fill_host(&mut self, i: usize, release: bool, buffer: Option<Tensor>) -> Result<()> {
        let layout = self.layout(i).clone();
        if self.injected(2) {
            return Err(Error::HostAlloc {
                kind: "pinned",
                bytes: layout.bytes as u64,
                source: crate::error::TorchMessage("injected fault".into()),
            });
        }
        let host = match buffer {
            Some(b) => b,
            None => accel::alloc_host(layout.bytes, self.host_memory())?,
        };
        let views = Self::views(&host, &layout)?;
        let rt = &mut self.layers[i];
        tch::no_grad(|| -> Result<()> {
            for (mut v, p) in views.into_iter().zip(&rt.params) {
                v.f_copy_(p)
                    .map_err(|e| Error::from(("copying a block into its host buffer", e)))?;
            }
            Ok(())
        })?;
        self.stats.host_bytes += layout.bytes as u64;
        rt.host = Some(host);
        if !release {
            return Ok(());
        }
        // Point at placeholders: frees the original storage unless the caller holds it elsewhere.
        for (p, ph) in rt.params.iter_mut().zip(&rt.placeholders) {
            p.f_set_data(ph)
                .map_err(|e| Error::from(("placing placeholders", e)))?;
        }
        Ok(())
    }

    /// Points every filled block's tensors at their host copies (CPU memory) and forgets the
    /// slots: the state after drop.
    fn detach_to_host(&mut self) {
        self.sync_copies();
        if self.plan.is_none() {
            return;
        }
        for i in 0..self.layers.len() {
            if self.layers[i].resident {
                continue; // real device tensors, not placeholders
            }
            let Some(host) = self.layers[i].host.as_ref().map(|h| h.shallow_clone()) else {
                continue;
            };
            let Ok(views) = Self::views(&host, self.layout(i)) else {
                continue;
            };
            for (p, v) in self.layers[i].params.iter_mut().zip(&views) {
                let _ = p.f_set_data(v);
            }
            self.layers[i].slot = None;
            self.layers[i].in_use = false;
        }
        for s in &mut self.slots {
            s.layer = None;
        }
    }

    /// Waits on the host until every queued upload has finished.
    fn sync_copies(&self) {
        if let Backend::Cuda {
            copy: Some(copy), ..
        } = &self.backend
        {
            let _ = copy.synchronize();
        }
    }

    fn compute_stream(&self) -> Result<Option<Stream>> {
        match self.backend {
            Backend::Cuda { device, .. } => Ok(Some(Stream::current(device)?)),
            _ => Ok(None),
        }
    }

    fn check_ready(&self, op: &'static str) -> Result<()> {
        match self.phase {
            Phase::Ready => Ok(()),
            Phase::Restoring => Err(self.partly_restored(op)),
            Phase::Configured | Phase::Restored => Err(Error::NotInitialized { op }),
        }
    }

    fn partly_restored(&self, op: &'static str) -> Error {
        Error::PartlyRestored {
            op,
            restored: self.restored,
            num_layers: self.layers.len(),
        }
    }

    fn check_range(&self, op: &'static str, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(Error::LayerOutOfRange {
                op,
                layer,
                num_layers: self.layers.len(),
            });
        }
        Ok(())
    }

    /// A slot that holds no entered block and none of `protect`: empty ones first, then the
    /// least recently used.
    fn pick_slot(&self, protect: &[usize]) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| match s.layer {
                None => true,
                Some(l) => !self.layers[l].in_use && !protect.contains(&l),
            })
            .min_by_key(|(_, s)| (s.layer.is_some(), s.last_used))
            .map(|(i, _)| i)
    }

    /// Forgets the block held by slot `s` (its tensors go back to placeholders).
    fn evict(&mut self, s: usize) -> Result<()> {
        if self.slots[s].layer.is_some() && !self.slots[s].released {
            // The block may have been read without an enter/release pair (the seed's
            // `prefetch_layer` points its tensors at the slot): order the slot's next upload
            // after all compute work queued so far.
            if let Some(compute) = self.compute_stream()? {
                let slot = &mut self.slots[s];
                slot.free
                    .as_mut()
                    .expect("CUDA slots have events")
                    .record(&compute)?;
                slot.free_recorded = true;
            }
        }
        if let Some(old) = self.slots[s].layer.take() {
            let rt = &mut self.layers[old];
            rt.slot = None;
            for (p, ph) in rt.params.iter_mut().zip(&rt.placeholders) {
                p.f_set_data(ph)
                    .map_err(|e| Error::from(("placing placeholders", e)))?;
            }
        }
        Ok(())
    }

    /// Queues the upload of block `layer` into slot `s`.
    fn upload(&mut self, layer: usize, s: usize) -> Result<()> {
        let r = self.upload_inner(layer, s);
        // In a peer group the others wait for this member's part of the upload: a failure here
        // breaks the group, so that they get an error now instead of at the timeout.
        if let (Err(e), Some((group, rank))) = (&r, &self.config.peer)
            && !matches!(e, Error::PeerGroup { .. })
        {
            group.fail(*rank, &e.to_string());
        }
        r
    }

    fn upload_inner(&mut self, layer: usize, s: usize) -> Result<()> {
        self.evict(s)?;
        if self.injected(1) {
            return Err(Error::Torch {
                op: "upload",
                source: crate::error::TorchMessage("injected fault".into()),
            });
        }
        if let Some((group, rank)) = self.config.peer.clone() {
            return self.upload_peer(&group, rank, layer, s);
        }
        let bytes = self.layout(layer).bytes;
        let timing = self.timing_pair()?;
        let host = self.layers[layer]
            .host
            .as_ref()
            .expect("initialized blocks have host buffers");
        let slot = &mut self.slots[s];
        let mut dst = slot
            .buf
            .f_narrow(0, 0, bytes as i64)
            .map_err(|e| Error::from(("upload", e)))?;
        match &self.backend {
            Backend::Cuda {
                copy: Some(copy), ..
            } => {
                if slot.free_recorded {
                    // The compute stream released the slot's previous block: wait for that work.
                    slot.free
                        .as_ref()
                        .expect("CUDA slots have events")
                        .wait(copy)?;
                }
                let timing = match timing {
                    Some((mut start, end)) => {
                        start.record(copy)?;
                        Some((start, end))
                    }
                    None => None,
                };
                // SAFETY: `host` and the slot live in the manager until Drop or restore, both of
                // which synchronize the copy stream first; nothing writes the host buffer while
                // an upload may read it (update_tensor synchronizes first), and the compute
                // stream reads the slot only after waiting on `ready`.
                unsafe { accel::copy_async(&mut dst, host, Some(copy))? };
                slot.ready
                    .as_mut()
                    .expect("CUDA slots have events")
                    .record(copy)?;
                if let Some((start, mut end)) = timing {
                    end.record(copy)?;
                    let traced = self.timeline.is_some();
                    self.pending.push(Timed {
                        layer,
                        bytes: bytes as u64,
                        lane: Lane::Upload,
                        start,
                        end,
                        traced,
                    });
                }
            }
            _ => {
                tch::no_grad(|| dst.f_copy_(host)).map_err(|e| Error::from(("upload", e)))?;
            }
        }
        slot.layer = Some(layer);
        slot.released = false;
        self.layers[layer].slot = Some(s);
        self.stats.uploads += 1;
        self.stats.bytes_uploaded += bytes as u64;
        Ok(())
    }

    /// [`Self::upload`] in a peer group: this member's share from the host into its slot, then
    /// from there into the other members' slots; their shares arrive in this slot the same way.
    fn upload_peer(
        &mut self,
        group: &PeerGroup,
        rank: usize,
        layer: usize,
        s: usize,
    ) -> Result<()> {
        let n = group.size();
        let bytes = self.layout(layer).bytes;
        let round = self.peer_round;
        self.peer_round += 1;
        let copy = match &self.backend {
            Backend::Cuda { copy, .. } => *copy,
            _ => None,
        };
        let timing = self.timing_pair()?;
        let slot = &mut self.slots[s];
        // 1. The slot may be written once compute released its previous block and this member's
        //    share of that block has gone out to the others.
        let writable = match copy {
            Some(c) => {
                if slot.free_recorded {
                    slot.free
                        .as_ref()
                        .expect("CUDA slots have events")
                        .wait(&c)?;
                }
                if slot.pushed_recorded {
                    for (o, e) in slot.pushed.iter().enumerate() {
                        if o != rank {
                            e.wait(&c)?;
                        }
                    }
                }
                let mut e = Event::new()?;
                e.record(&c)?;
                Some(Arc::new(e))
            }
            None => None,
        };
        slot.incoming.clear();
        let dst = slot
            .buf
            .f_narrow(0, 0, bytes as i64)
            .map_err(|e| Error::from(("upload", e)))?;
        let posts = group.post(
            round,
            rank,
            Post {
                layer,
                bytes,
                buf: dst.shallow_clone(),
                writable,
            },
        )?;
        // 2. This member's share: host -> own slot -> every other member's slot.
        let (off, len) = peer::share(bytes, n, rank);
        let narrow = |t: &Tensor| {
            t.f_narrow(0, off as i64, len as i64)
                .map_err(|e| Error::from(("upload", e)))
        };
        let host = self.layers[layer]
            .host
            .as_ref()
            .expect("initialized blocks have host buffers");
        let src = narrow(host)?;
        let mut mine = narrow(&dst)?;
        let slot = &mut self.slots[s];
        let mut delivered: Vec<Option<Arc<Event>>> = vec![None; n];
        match copy {
            Some(c) => {
                let timing = match timing {
                    Some((mut start, end)) => {
                        start.record(&c)?;
                        Some((start, end))
                    }
                    None => None,
                };
                // SAFETY: the host buffer and the slot live until restore or Drop, which wait for
                // the copy stream; the slot was made writable above (its previous block's compute
                // and outgoing copies are done), and the compute stream reads it only after
                // `ready` and the incoming events.
                unsafe { accel::copy_async(&mut mine, &src, Some(&c))? };
                let ready = slot.ready.as_mut().expect("CUDA slots have events");
                ready.record(&c)?;
                if let Some((start, mut end)) = timing {
                    end.record(&c)?;
                    let traced = self.timeline.is_some();
                    self.pending.push(Timed {
                        layer,
                        bytes: len as u64,
                        lane: Lane::Upload,
                        start,
                        end,
                        traced,
                    });
                }
                let ready = slot.ready.as_ref().expect("CUDA slots have events");
                for (o, post) in posts.iter().enumerate().filter(|(o, _)| *o != rank) {
                    let p = self.push[o];
                    ready.wait(&p)?;
                    if let Some(w) = &post.writable {
                        w.wait(&p)?;
                    }
                    let theirs = narrow(&post.buf)?;
                    // SAFETY: the peer's slot stays allocated until every member has left the
                    // group, and each member waits for its push streams before leaving; this
                    // stream waited above for the peer's `writable` (nothing reads or writes that
                    // part of its slot until our event below, which its compute waits for), and
                    // for our own share's upload into `mine`, which nothing overwrites before
                    // `pushed` (waited by this slot's next upload).
                    unsafe { accel::copy_peer_async(&theirs, &mine, &p)? };
                    let mut e = Event::new()?;
                    e.record(&p)?;
                    delivered[o] = Some(Arc::new(e));
                    slot.pushed[o].record(&p)?;
                }
                slot.pushed_recorded = true;
            }
            _ => {
                tch::no_grad(|| mine.f_copy_(&src)).map_err(|e| Error::from(("upload", e)))?;
                for (_, post) in posts.iter().enumerate().filter(|(o, _)| *o != rank) {
                    let mut theirs = narrow(&post.buf)?;
                    tch::no_grad(|| theirs.f_copy_(&mine))
                        .map_err(|e| Error::from(("upload", e)))?;
                }
            }
        }
        let incoming = group.deliver(round, rank, delivered)?;
        let slot = &mut self.slots[s];
        slot.incoming = incoming;
        slot.layer = Some(layer);
        slot.released = false;
        self.layers[layer].slot = Some(s);
        self.stats.uploads += 1;
        self.stats.bytes_uploaded += len as u64;
        self.stats.peer_bytes += (bytes - len) as u64;
        Ok(())
    }

    /// Waits for this member's outgoing peer copies and leaves the group. Copies into this
    /// member's slots need no wait here: the group keeps every ring until each member has left,
    /// and each one waits for its own outgoing copies first.
    fn leave_group(&mut self) {
        if !self.joined {
            return;
        }
        for p in &self.push {
            let _ = p.synchronize();
        }
        if let Some((group, rank)) = &self.config.peer {
            group.leave(*rank);
        }
        self.joined = false;
    }

    /// Points block `layer`'s tensors at views of its slot.
    fn point_at_slot(&mut self, layer: usize) -> Result<()> {
        let s = self.layers[layer].slot.expect("block is in a slot");
        let views = Self::views(&self.slots[s].buf, self.layout(layer))?;
        for (p, v) in self.layers[layer].params.iter_mut().zip(&views) {
            p.f_set_data(v)
                .map_err(|e| Error::from(("pointing a block at its slot", e)))?;
        }
        Ok(())
    }

    /// Makes block `layer` usable by the compute stream: uploads it if no slot holds it, makes
    /// the compute stream wait for its upload, points its tensors at the slot.
    fn activate(&mut self, layer: usize) -> Result<()> {
        if self.layers[layer].in_use {
            return Ok(());
        }
        self.activate_inner(layer)?;
        if self.timeline.is_some()
            && let (Some(compute), Some((mut start, end))) =
                (self.compute_stream()?, self.timing_pair()?)
        {
            start.record(&compute)?;
            self.open_compute.push((layer, start, end));
        }
        Ok(())
    }

    fn activate_inner(&mut self, layer: usize) -> Result<()> {
        if self.layers[layer].resident {
            self.layers[layer].in_use = true;
            return Ok(());
        }
        let s = match self.layers[layer].slot {
            Some(s) => s,
            None => {
                let s = self.pick_slot(&[layer]).ok_or_else(|| Error::NoFreeSlot {
                    layer,
                    in_use: self.in_use(),
                })?;
                self.upload(layer, s)?;
                s
            }
        };
        if let Some(compute) = self.compute_stream()? {
            let timing = self.timing_pair()?;
            let ready = self.slots[s]
                .ready
                .as_ref()
                .expect("CUDA slots have events");
            match timing {
                Some((mut start, mut end)) => {
                    start.record(&compute)?;
                    ready.wait(&compute)?;
                    for e in &self.slots[s].incoming {
                        e.wait(&compute)?;
                    }
                    end.record(&compute)?;
                    let traced = self.timeline.is_some();
                    self.pending.push(Timed {
                        layer,
                        bytes: 0,
                        lane: Lane::Stall,
                        start,
                        end,
                        traced,
                    });
                }
                None => {
                    ready.wait(&compute)?;
                    for e in &self.slots[s].incoming {
                        e.wait(&compute)?;
                    }
                }
            }
        }
        self.point_at_slot(layer)?;
        self.tick += 1;
        self.slots[s].last_used = self.tick;
        self.layers[layer].in_use = true;
        Ok(())
    }

    /// Queues the uploads of the `prefetch_depth` blocks after `layer` in loop order, wrapping
    /// from the last block to the first. Stops quietly when no slot is free.
    fn prefetch_ahead(&mut self, layer: usize) -> Result<()> {
        let n = self.layers.len();
        let upcoming: Vec<usize> = (1..n)
            .map(|k| (layer + k) % n)
            .filter(|&i| !self.layers[i].resident)
            .take(self.config.prefetch_depth)
            .collect();
        for &next in &upcoming {
            if self.layers[next].slot.is_some() {
                continue;
            }
            let Some(s) = self.pick_slot(&upcoming) else {
                break;
            };
            self.upload(next, s)?;
        }
        Ok(())
    }

    /// Releases block `layer` if entered: the compute stream records the slot's `free` event
    /// and the block's tensors go back to placeholders. The slot keeps the block's bytes until
    /// another block needs it, so re-entering it soon costs no upload.
    fn release(&mut self, layer: usize) -> Result<()> {
        if !self.layers[layer].in_use {
            return Ok(());
        }
        self.layers[layer].in_use = false;
        if let Some(k) = self.open_compute.iter().position(|(l, ..)| *l == layer) {
            let (_, start, mut end) = self.open_compute.swap_remove(k);
            if let Some(compute) = self.compute_stream()? {
                end.record(&compute)?;
                self.pending.push(Timed {
                    layer,
                    bytes: 0,
                    lane: Lane::Compute,
                    start,
                    end,
                    traced: true,
                });
            }
        }
        if self.layers[layer].resident {
            return Ok(());
        }
        let s = self.layers[layer]
            .slot
            .expect("an entered block is in a slot");
        if let Some(compute) = self.compute_stream()? {
            let slot = &mut self.slots[s];
            slot.free
                .as_mut()
                .expect("CUDA slots have events")
                .record(&compute)?;
            slot.free_recorded = true;
        }
        self.slots[s].released = true;
        let rt = &mut self.layers[layer];
        for (p, ph) in rt.params.iter_mut().zip(&rt.placeholders) {
            p.f_set_data(ph)
                .map_err(|e| Error::from(("placing placeholders", e)))?;
        }
        Ok(())
    }

    fn in_use(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&i| self.layers[i].in_use)
            .collect()
    }

    /// Enters block `layer` for computing: waits (on the device) for its upload, loading it at
    /// once if nothing prefetched it, and queues the uploads of the next `prefetch_depth`
    /// blocks. Dropping the guard releases the block. A disabled manager returns a guard that
    /// does nothing.
    pub fn enter(&mut self, layer: usize) -> Result<LayerGuard<'_>> {
        if self.is_enabled() {
            self.before_layer(layer)?;
        }
        Ok(LayerGuard {
            manager: self,
            layer,
            armed: true,
        })
    }

    /// [`Self::enter`] without a guard, for drivers that cannot hold one; pair it with
    /// [`Self::after_layer`].
    pub fn before_layer(&mut self, layer: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.check_ready("before_layer")?;
        self.check_range("before_layer", layer)?;
        self.activate(layer)?;
        if let Err(e) = self.prefetch_ahead(layer) {
            // The caller gets no guard: leave the block released, not entered forever.
            let _ = self.release(layer);
            return Err(e);
        }
        Ok(())
    }

    /// Releases block `layer` after its compute (no-op if it is not entered).
    pub fn after_layer(&mut self, layer: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.check_ready("after_layer")?;
        self.check_range("after_layer", layer)?;
        self.release(layer)
    }

    /// The seed's `prefetch_layer`: queues the upload of block `layer` on the copy stream and
    /// points its tensors at the slot. A no-op when disabled, out of range or already on the
    /// device. With `non_blocking == false` it waits (on the host) for the upload; otherwise
    /// the compute stream waits for it when the block is entered (`enter`, `before_layer` or
    /// `layer_scope`).
    pub fn prefetch_layer(&mut self, layer: usize, non_blocking: bool) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.check_ready("prefetch_layer")?;
        if layer >= self.layers.len()
            || self.layers[layer].slot.is_some()
            || self.layers[layer].resident
        {
            return Ok(());
        }
        let s = self.pick_slot(&[layer]).ok_or_else(|| Error::NoFreeSlot {
            layer,
            in_use: self.in_use(),
        })?;
        self.upload(layer, s)?;
        self.point_at_slot(layer)?;
        if !non_blocking && let Some(ready) = &self.slots[s].ready {
            ready.synchronize()?;
            for e in &self.slots[s].incoming {
                e.synchronize()?;
            }
        }
        Ok(())
    }

    /// The seed's `release_layer`: takes block `layer` off the device (releasing it if
    /// entered). A no-op when disabled, out of range or not on the device. Blocks kept resident
    /// under a VRAM budget stay on the device (they are released, not evicted).
    pub fn release_layer(&mut self, layer: usize) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.check_ready("release_layer")?;
        if layer >= self.layers.len() {
            return Ok(());
        }
        self.release(layer)?;
        if let Some(s) = self.layers[layer].slot {
            self.evict(s)?;
        }
        Ok(())
    }

    /// The seed's `release_all`: takes every block off the device.
    pub fn release_all(&mut self) -> Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        self.check_ready("release_all")?;
        for i in 0..self.layers.len() {
            self.release_layer(i)?;
        }
        Ok(())
    }

    /// The seed's `layer_scope(prefetch, release)` around one block: makes block `release`
    /// usable (it is the block about to run), queues the upload of `prefetch`, runs `f`, then
    /// releases `release` (also if `f` panics).
    pub fn layer_scope<R>(
        &mut self,
        prefetch: Option<usize>,
        release: Option<usize>,
        f: impl FnOnce() -> R,
    ) -> Result<R> {
        if !self.is_enabled() {
            return Ok(f());
        }
        self.check_ready("layer_scope")?;
        let release = release.filter(|&r| r < self.layers.len());
        let entered_here = release.filter(|&r| !self.layers[r].in_use);
        if let Some(r) = release {
            self.activate(r)?;
        }
        if let Some(p) = prefetch
            && let Err(e) = self.prefetch_layer(p, true)
        {
            // `f` does not run: leave the block released, not entered forever.
            if let Some(r) = entered_here {
                let _ = self.release(r);
            }
            return Err(e);
        }
        let guard = LayerGuard {
            manager: self,
            layer: release.unwrap_or(usize::MAX),
            armed: release.is_some(),
        };
        let out = f();
        guard.finish()?;
        Ok(out)
    }

    /// Whether block `layer`'s weights are on the device now (resident, or in a slot uploaded
    /// or queued).
    pub fn is_on_device(&self, layer: usize) -> bool {
        self.layers
            .get(layer)
            .is_some_and(|l| l.slot.is_some() || l.resident)
    }

    /// Whether block `layer` stays on the device for good (within the VRAM budget).
    pub fn is_resident(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(|l| l.resident)
    }

    /// Whether block `layer` is entered.
    pub fn is_entered(&self, layer: usize) -> bool {
        self.layers.get(layer).is_some_and(|l| l.in_use)
    }

    /// The blocks held by the slot ring now, slot by slot.
    pub fn slot_contents(&self) -> Vec<Option<usize>> {
        self.slots.iter().map(|s| s.layer).collect()
    }

    /// Finds a managed tensor: `Ok(Some((layer, position)))` for a block tensor, `Ok(None)`
    /// for a non-block tensor.
    fn locate(&self, name: &str) -> Result<(usize, Option<(usize, usize)>)> {
        let src = self
            .named
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::UnknownTensor {
                name: name.to_owned(),
            })?;
        if let Some(plan) = &self.plan {
            for (li, l) in plan.layers.iter().enumerate() {
                if let Some(j) = l.tensors.iter().position(|t| t.source_index == src)
                    && self.layers[li].host.is_some()
                {
                    return Ok((src, Some((li, j))));
                }
            }
        }
        Ok((src, None))
    }

    /// The current value of tensor `name`: for an offloaded block tensor a view of its host
    /// copy (CPU; read it, do not write it: use [`Self::update_tensor`]), otherwise the model's
    /// tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let (src, at) = self.locate(name)?;
        match at {
            Some((li, j)) => {
                self.sync_copies();
                let host = self.layers[li]
                    .host
                    .as_ref()
                    .expect("located blocks have host buffers");
                let mut views = Self::views(host, self.layout(li))?;
                Ok(views.swap_remove(j))
            }
            None => Ok(self.named[src].1.shallow_clone()),
        }
    }

    /// Every managed tensor's current value, in the source's order (see [`Self::tensor`]).
    /// Saving the model's own `VarStore` while offloaded would write the placeholders; save
    /// these instead (or use [`Self::save_safetensors`]).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named
            .iter()
            .map(|(n, _)| Ok((n.clone(), self.tensor(n)?)))
            .collect()
    }

    /// Writes every weight (block tensors from their host copies) to a safetensors file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()?
            .into_iter()
            .map(|(n, t)| (n, if t.is_contiguous() { t } else { t.contiguous() }))
            .collect();
        Tensor::write_safetensors(&tensors, path).map_err(|e| Error::from(("save_safetensors", e)))
    }

    /// Replaces the value of tensor `name` (e.g. after merging a LoRA): for a block tensor the
    /// host copy is overwritten and the next upload carries the new value; for a non-block
    /// tensor the model's tensor is overwritten in place. Shape and dtype must match. Waits for
    /// queued uploads first; refused while the block is entered.
    pub fn update_tensor(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let (src, at) = self.locate(name)?;
        let (shape, kind) = match at {
            Some((li, j)) => {
                let t = &self.layout(li).tensors[j];
                (t.shape.clone(), t.kind)
            }
            None => (self.named[src].1.size(), self.named[src].1.kind()),
        };
        if value.size() != shape || value.kind() != kind {
            return Err(Error::Mismatch {
                name: name.to_owned(),
                expected: format!("{shape:?} {kind:?}"),
                got: format!("{:?} {:?}", value.size(), value.kind()),
            });
        }
        match at {
            Some((li, j)) => {
                if self.layers[li].in_use {
                    return Err(Error::LayerInUse {
                        op: "update_tensor",
                        layer: li,
                    });
                }
                if self.config.peer.is_some() {
                    return Err(Error::InvalidArgument {
                        op: "update_tensor",
                        message: format!(
                            "{name:?} is a block weight of a peer group member, whose blocks are assembled from every member's host copy; update the model before building the group"
                        ),
                    });
                }
                if self.store.as_ref().is_some_and(|s| {
                    Arc::strong_count(s) > 1 || s.read_only || s.owner_path.is_some()
                }) {
                    return Err(Error::InvalidArgument {
                        op: "update_tensor",
                        message: format!(
                            "the host copy of {name:?} is shared with other managers or processes; update it before sharing or publishing the store, or restore the others first"
                        ),
                    });
                }
                self.sync_copies();
                let host = self.layers[li]
                    .host
                    .as_ref()
                    .expect("located blocks have host buffers")
                    .shallow_clone();
                let mut view = Self::views(&host, self.layout(li))?.swap_remove(j);
                tch::no_grad(|| view.f_copy_(value))
                    .map_err(|e| Error::from(("update_tensor", e)))?;
                if self.layers[li].resident {
                    // A resident block with a host copy (shareable): the device tensor too.
                    let p = &mut self.layers[li].params[j];
                    tch::no_grad(|| p.f_copy_(value))
                        .map_err(|e| Error::from(("update_tensor", e)))?;
                }
                if let Some(s) = self.layers[li].slot {
                    self.evict(s)?;
                }
            }
            None => {
                let t = &mut self.named[src].1;
                tch::no_grad(|| t.f_copy_(value)).map_err(|e| Error::from(("update_tensor", e)))?;
            }
        }
        Ok(())
    }

    /// Puts every block tensor back on the compute device (fresh tensors with the original
    /// shapes and strides, bit-identical), frees the slots and host buffers, and leaves the
    /// model usable without the manager. Needs device memory for the whole model; if it runs
    /// out, blocks restored so far stay restored and calling it again (after freeing memory)
    /// or [`Self::restore_to`] the CPU finishes the job. Once a restore has started the layer
    /// loop is over, also if it fails: loop calls return [`Error::PartlyRestored`] until a
    /// restore finishes, while [`Self::tensor`], [`Self::stats`] and the other reads work.
    pub fn restore(&mut self) -> Result<()> {
        let device = self.compute_device();
        self.restore_to(device)
    }

    /// [`Self::restore`] onto `device` (e.g. `Device::Cpu` for a model that does not fit).
    pub fn restore_to(&mut self, device: Device) -> Result<()> {
        if self.phase == Phase::Restored || self.plan.is_none() {
            return Ok(());
        }
        self.sync_copies();
        // The loop is over from here, also if a block below fails: loop calls are refused and
        // the other members of a peer group learn at once that this one left.
        self.phase = Phase::Restoring;
        self.leave_group();
        self.restored = 0;
        for i in 0..self.layers.len() {
            if self.layers[i].resident {
                for p in &mut self.layers[i].params {
                    if p.device() != device {
                        let moved = tch::no_grad(|| p.f_to_device(device))
                            .map_err(|e| Error::from_torch("restore", 0, e.to_string()))?;
                        p.f_set_data(&moved)
                            .map_err(|e| Error::from(("restore", e)))?;
                    }
                }
                self.layers[i].in_use = false;
                if self.layers[i].host.take().is_some() {
                    let bytes = self.layout(i).bytes as u64;
                    self.stats.host_bytes = self.stats.host_bytes.saturating_sub(bytes);
                }
                self.restored += 1;
                continue;
            }
            let Some(host) = self.layers[i].host.as_ref().map(|h| h.shallow_clone()) else {
                self.restored += 1; // restored by an earlier call
                continue;
            };
            let layout = self.layout(i).clone();
            if self.injected(3) {
                return Err(Error::OutOfMemory {
                    op: format!("restoring block {i}"),
                    bytes: layout.bytes as u64,
                    source: crate::error::TorchMessage("injected fault".into()),
                });
            }
            let views = Self::views(&host, &layout)?;
            let mut fresh = Vec::with_capacity(views.len());
            for (t, v) in layout.tensors.iter().zip(&views) {
                let mut f = Tensor::f_empty_strided(
                    t.shape.as_slice(),
                    t.strides.as_slice(),
                    (t.kind, device),
                )
                .map_err(|e| Error::from_torch("restore", t.bytes as u64, e.to_string()))?;
                tch::no_grad(|| f.f_copy_(v))
                    .map_err(|e| Error::from_torch("restore", t.bytes as u64, e.to_string()))?;
                fresh.push(f);
            }
            let rt = &mut self.layers[i];
            for (p, f) in rt.params.iter_mut().zip(&fresh) {
                p.f_set_data(f).map_err(|e| Error::from(("restore", e)))?;
            }
            rt.in_use = false;
            if let Some(s) = rt.slot.take() {
                self.slots[s].layer = None;
            }
            self.stats.host_bytes = self.stats.host_bytes.saturating_sub(layout.bytes as u64);
            self.layers[i].host = None;
            self.restored += 1;
        }
        if let Backend::Cuda { device, .. } = self.backend {
            accel::synchronize_device(device)?;
        }
        self.slots.clear();
        self.store = None;
        self.claim = None;
        self.stats.shared_host_bytes = 0;
        self.phase = Phase::Restored;
        Ok(())
    }
}

impl Drop for LayerwiseOffloadManager {
    fn drop(&mut self) {
        // Queued uploads read host buffers and write slots that are freed below: wait for them.
        // Compute work that still reads a slot is ordered by libtorch's allocator (the slot was
        // allocated on the compute stream). Then leave every block tensor pointing at its host
        // copy, so the model keeps its weights.
        if self.phase != Phase::Restored {
            if let Backend::Cuda { device, .. } = self.backend {
                let _ = accel::synchronize_device(device);
            }
            self.detach_to_host();
        }
        self.leave_group();
    }
}

/// A block entered with [`LayerwiseOffloadManager::enter`]; dropping it releases the block
/// (also during a panic's unwinding).
#[must_use = "the block is released when the guard drops"]
#[derive(Debug)]
pub struct LayerGuard<'a> {
    manager: &'a mut LayerwiseOffloadManager,
    layer: usize,
    armed: bool,
}

impl LayerGuard<'_> {
    /// The block's loop index.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Releases the block now and reports an error, which `Drop` cannot.
    pub fn finish(mut self) -> Result<()> {
        self.armed = false;
        if self.manager.is_enabled()
            && self.manager.phase == Phase::Ready
            && self.layer < self.manager.layers.len()
        {
            self.manager.release(self.layer)
        } else {
            Ok(())
        }
    }
}

impl Drop for LayerGuard<'_> {
    fn drop(&mut self) {
        if self.armed
            && self.manager.is_enabled()
            && self.manager.phase == Phase::Ready
            && self.layer < self.manager.layers.len()
        {
            let _ = self.manager.release(self.layer);
        }
    }
}
