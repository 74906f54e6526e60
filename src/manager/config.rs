//! [`OffloadConfig`]: how a manager is set up, checked when it is built.

use crate::checkpoint::Checkpoint;
use crate::host::HostStore;
use crate::peer::PeerGroup;
use crate::placement::Budget;
use std::sync::Arc;

#[cfg(doc)]
use super::LayerwiseOffloadManager;
#[cfg(feature = "testing")]
use super::faults::Fault;
#[cfg(doc)]
use crate::error::Error;

/// How a manager is set up. Required values are positional in [`OffloadConfig::new`]; the rest
/// are options with FastVideo's defaults.
#[derive(Debug, Clone)]
pub struct OffloadConfig {
    pub(super) lists: Vec<(String, usize)>,
    pub(super) enabled: bool,
    pub(super) pin_cpu_memory: bool,
    pub(super) auto_initialize: bool,
    pub(super) prefetch_depth: usize,
    pub(super) device: usize,
    pub(super) cpu_test_mode: bool,
    pub(super) timing: bool,
    pub(super) budget: Option<Budget>,
    #[cfg(feature = "testing")]
    pub(super) faults: Vec<Fault>,
    pub(super) store: Option<Arc<HostStore>>,
    pub(super) shareable: bool,
    pub(super) shm: Option<std::path::PathBuf>,
    pub(super) peer: Option<(Arc<PeerGroup>, usize)>,
    pub(super) push_per_member: bool,
    pub(super) push_chunk: usize,
    pub(super) allow_cpu_fallback: bool,
    pub(super) checkpoint: Option<Arc<Checkpoint>>,
    pub(super) zero_copy: bool,
    pub(super) host_budget: Option<u64>,
    pub(super) allow_unexpected: bool,
    pub(super) convert_dtypes: bool,
    pub(super) compress: bool,
    /// None: every streamed block ([`OffloadConfig::compress_blocks`]).
    pub(super) compress_blocks: Option<usize>,
    pub(super) encoded_cache: Option<std::path::PathBuf>,
    /// None: the default ([`OffloadConfig::segment_bytes`]).
    pub(super) segment_bytes: Option<usize>,
    pub(super) two_tier: bool,
    pub(super) staging_buffers: usize,
    /// None: a full grid ([`OffloadConfig::compress_decode_blocks`]).
    pub(super) decode_blocks: Option<u32>,
    /// Pool stream indices not to take ([`OffloadConfig::avoid_pool_streams`]).
    pub(super) avoid_streams: Vec<usize>,
    pub(super) progress: Option<crate::progress::ProgressCallback>,
}

/// The default [`OffloadConfig::compress_segment_bytes`]: 64 MiB of raw bytes per segment.
pub const DEFAULT_SEGMENT_BYTES: usize = 64 << 20;

/// [`OffloadConfig::compress_segment_bytes`] must be a multiple of this: the codec's default
/// chunk (32 Ki bf16 values), so that segments keep every chunk whole.
pub const SEGMENT_BYTES_MULTIPLE: usize =
    2 * layerwise_offload_codec::DEFAULT_CHUNK_VALUES as usize;

/// The default [`OffloadConfig::compress_staging_buffers`].
pub const DEFAULT_STAGING_BUFFERS: usize = 2;

/// The most [`OffloadConfig::compress_staging_buffers`] accepted.
pub const MAX_STAGING_BUFFERS: usize = 8;

/// The largest [`OffloadConfig::prefetch_depth`] accepted.
pub const MAX_PREFETCH_DEPTH: usize = 1024;

impl OffloadConfig {
    /// Offload blocks `0..num_blocks` of the list whose tensors are named
    /// `<module_list_attr>.<index>.…` (e.g. `"blocks"`, 40).
    pub fn new(module_list_attr: impl Into<String>, num_blocks: usize) -> OffloadConfig {
        OffloadConfig {
            lists: vec![(module_list_attr.into(), num_blocks)],
            enabled: true,
            pin_cpu_memory: true,
            auto_initialize: false,
            prefetch_depth: 1,
            device: 0,
            cpu_test_mode: false,
            timing: true,
            budget: None,
            #[cfg(feature = "testing")]
            faults: Vec::new(),
            store: None,
            shareable: false,
            shm: None,
            peer: None,
            push_per_member: false,
            push_chunk: super::share::PUSH_CHUNK_BYTES,
            allow_cpu_fallback: false,
            checkpoint: None,
            zero_copy: false,
            host_budget: None,
            allow_unexpected: false,
            convert_dtypes: false,
            compress: false,
            compress_blocks: None,
            encoded_cache: None,
            segment_bytes: None,
            two_tier: false,
            staging_buffers: DEFAULT_STAGING_BUFFERS,
            decode_blocks: None,
            avoid_streams: Vec::new(),
            progress: None,
        }
    }

    /// Make this manager member `rank` of `group`: each member uploads `1/n` of every block from
    /// the host over its own PCIe link and sends it to the other members device to device
    /// (NVLink or PCIe peer access), so each GPU receives every block while its host link
    /// carries only its share. For data-parallel inference on several GPUs of one host: one
    /// member per GPU, each driven by its own thread, all entering the same blocks in the same
    /// order (see [`PeerGroup`]). Usually combined with [`Self::host_store`] so the host holds
    /// one copy. The first block is uploaded at the first `enter`, not by `initialize`, since
    /// uploads need every member. With [`Self::compress`] the members split each block by
    /// whole segments, each decoding its own and sending the decoded bytes on.
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
    ///
    /// With [`Self::compress`] the file holds the blocks' encodings, and the manifest says so
    /// with the codec's format version: readers stream them encoded (whatever their own
    /// `compress` says) after `open_shared` checked every encoding's checksum.
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
    /// instead of one stream for all (the default). For measurements, with the `testing`
    /// feature; not part of the stable API.
    #[cfg(feature = "testing")]
    pub fn push_stream_per_member(mut self, on: bool) -> OffloadConfig {
        self.push_per_member = on;
        self
    }

    /// Peer groups, raw blocks: the most bytes of a member's share that arrive from the host
    /// before they go on to the other members (by default `usize::MAX`: each share whole, once
    /// it has arrived; 64 MiB is the size to measure). For an encoded block, the most raw
    /// bytes of a member's decoded segments that wait for the next segment's decode before
    /// they go on (whole runs of segments; by default the member's whole run, once decoded).
    /// For measurements and tests, with the `testing` feature; not part of the stable API.
    #[cfg(feature = "testing")]
    pub fn peer_push_chunk_bytes(mut self, bytes: usize) -> OffloadConfig {
        self.push_chunk = bytes;
        self
    }

    /// Makes an operation fail on purpose, to test error paths. With the `testing` feature;
    /// not part of the stable API.
    #[cfg(feature = "testing")]
    pub fn inject_fault(mut self, fault: Fault) -> OffloadConfig {
        self.faults.push(fault);
        self
    }

    /// Adds another block list; the loop runs list by list in the order given (e.g. Flux's
    /// `double_blocks`, then `single_blocks`).
    pub fn with_list(
        mut self,
        module_list_attr: impl Into<String>,
        num_blocks: usize,
    ) -> OffloadConfig {
        self.lists.push((module_list_attr.into(), num_blocks));
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
    /// tells which one was built. [`LayerwiseOffloadManager::new`], FastVideo's constructor,
    /// turns this on (with the `tracing` feature it says so in a warning event).
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

    /// Take the weights from a safetensors checkpoint ([`Checkpoint::open`]: a file or a
    /// sharded directory) instead of the model's tensors. At `initialize()` the model's tensors
    /// are matched with the checkpoint's by name (rename them with [`Checkpoint::rename`]);
    /// every difference is one [`Error::CheckpointMismatch`] naming each tensor, before
    /// anything changes. Then block tensors are read in parallel straight into their pinned
    /// block buffers (or, with [`Self::zero_copy`], the file's own pages are the store;
    /// with [`Self::host_budget`], blocks past the budget stay in the file), and non-block
    /// tensors and resident blocks go to the compute device.
    ///
    /// The model's own values are never read: build it with uninitialized tensors
    /// (`Tensor::empty`, which touch no memory until written) so the host never holds the model
    /// twice. They are kept until `initialize()` succeeds (an error puts them back) and freed
    /// then; `restore()` gives back the checkpoint's values.
    pub fn checkpoint(mut self, checkpoint: impl Into<Arc<Checkpoint>>) -> OffloadConfig {
        self.checkpoint = Some(checkpoint.into());
        self
    }

    /// With [`Self::checkpoint`]: the host store is the checkpoint files' own pages, mapped
    /// read-only and page-locked in place (`cudaHostRegister`, read-only), instead of a copy in
    /// pinned buffers: `initialize()` costs page-ins and registration only, and processes of
    /// one machine that open the same checkpoint share one page cache. A block whose tensors
    /// lie in several runs of the files (safetensors orders tensors by dtype, then name, so a
    /// block with fp32 norms and bf16 weights is two runs) uploads with one copy per run; the
    /// slot places each run at a 256-byte boundary, tensors within a run keep the file's
    /// relative alignment. The store is read-only: `update_tensor` on a block tensor is
    /// refused, `tensor(name)` of a block tensor is a copy, and dropping the manager without
    /// `restore()` copies every block into memory the model owns (the pages are never left in
    /// the model, where an in-place write would be SIGSEGV and a later truncation SIGBUS).
    ///
    /// The files must not be truncated or rewritten while the manager holds them: the mapping
    /// cannot turn that into an error. `initialize()` and `restore()` check each file's length
    /// before reading through the mapping, but a truncation between that check and a read
    /// kills the process with SIGBUS (copies the GPU makes go on from the pinned pages).
    pub fn zero_copy(mut self, on: bool) -> OffloadConfig {
        self.zero_copy = on;
        self
    }

    /// With [`Self::checkpoint`]: keep at most `bytes` of streamed blocks in host memory; the
    /// others (spread evenly through the loop, so their reads overlap the uploads of the
    /// blocks in memory) are read from the checkpoint at every forward by a background thread
    /// (`pread`, several threads per block) into a ring of three pinned staging buffers of the
    /// largest block, ahead of the loop, and uploaded from there; their pages are dropped from
    /// the page cache once read, so the disk tier does not fill host memory after all. For models larger than host
    /// memory. A forward then takes at least the largest of: disk-tier bytes / read bandwidth,
    /// streamed bytes / PCIe bandwidth, compute.
    ///
    /// `restore()` reads the disk-tier blocks back (host memory for the whole model); dropping
    /// the manager without `restore` leaves their tensors empty (their values stay in the
    /// checkpoint).
    ///
    /// The files must stay as they are while the manager uses them. What is guaranteed: every
    /// block the disk tier uploads (or `tensor`, `restore` read) was read from files whose
    /// length, modification time and change time (`fstat` of the open descriptor, checked after
    /// each block's reads; about 1 µs) are those of when `initialize()` began reading; a file
    /// changed in place since (a rewrite of the same inode, even of the same length and with
    /// its modification time put back: the change time cannot be set back) makes that read,
    /// hence the forward, fail with [`Error::Checkpoint`] naming the file and what changed,
    /// instead of serving a mix of old and new weights. The disk-tier blocks' old weights are
    /// gone with the old contents, so `restore()` then refuses the same way before changing
    /// anything; dropping the manager gives back the blocks held in host memory. A file
    /// replaced by a new one (written elsewhere and renamed over the path) is no change at all:
    /// the manager reads the old file through its open descriptor. Limits: timestamps have the
    /// file system's granularity (nanoseconds on Linux 6.13+ for ext4, xfs, btrfs and tmpfs; a
    /// clock tick of a few milliseconds before), and writes through another process's shared
    /// writable mapping of the file set its times only when the kernel writes the pages back.
    pub fn host_budget(mut self, bytes: u64) -> OffloadConfig {
        self.host_budget = Some(bytes);
        self
    }

    /// With [`Self::checkpoint`]: accept checkpoint tensors the model does not have (left
    /// unread) instead of refusing them (default off).
    pub fn allow_unexpected(mut self, on: bool) -> OffloadConfig {
        self.allow_unexpected = on;
        self
    }

    /// With [`Self::checkpoint`]: convert tensors stored in another floating-point type (f16,
    /// bf16, f32, f64) to the model's (default off: a different type is an error, no silent
    /// conversion; integer and boolean tensors are never converted). Converted
    /// tensors are read through a temporary; not with [`Self::zero_copy`] or
    /// [`Self::host_budget`], which stream the file's bytes as they are.
    pub fn convert_dtypes(mut self, on: bool) -> OffloadConfig {
        self.convert_dtypes = on;
        self
    }

    /// Compressed transport (default off): each streamed block's host copy is encoded once at
    /// `initialize()` with a lossless bf16 codec (the sign and mantissa byte of each value kept,
    /// the exponent byte coded with a few bits per value and escapes; chunks that do not shrink,
    /// such as fp32 or random bits, stay raw; see the `layerwise-offload-codec` crate), only the
    /// encoding stays in pinned host memory, uploads carry the encoding, and a GPU kernel
    /// (compiled at run time with NVRTC) decodes it into the slot on a decode stream before the
    /// block's `ready` event. Outputs stay bit-identical. Reads (`tensor`, `restore`) decode on the
    /// CPU; the CPU test mode decodes with the CPU reference decoder.
    ///
    /// In a peer group each member uploads and decodes its share of every block's segments and
    /// sends the decoded bytes on to the others, device to device: each member's host link
    /// carries its share of the encoding, and each GPU decodes only its share.
    ///
    /// Each block's encoding is a sequence of segments of at most
    /// [`Self::compress_segment_bytes`] raw bytes each, encoded independently: an upload moves
    /// one segment at a time into one of two small device staging buffers and decodes it into
    /// its place in the slot, so compression costs two buffers of the largest segment's
    /// encoding (about 90 MiB by default) of device memory beyond the slots.
    ///
    /// Composes with every host tier. With [`Self::shared_memory`] the published store holds
    /// the encodings (its manifest says so, with the codec's format version; processes that
    /// open it stream them encoded whatever their own `compress` says). With a checkpoint and
    /// [`Self::zero_copy`] or [`Self::host_budget`], the encodings come from the checkpoint's
    /// encoded cache ([`Self::encoded_cache`]), written at the first `initialize()`: zero-copy
    /// maps the cache's pages, and the disk tier reads encodings from it (fewer bytes from
    /// the disk as well as over PCIe). `update_tensor` on an encoded block decodes it on the
    /// CPU, writes the value and encodes the block again (refused on the disk tier).
    pub fn compress(mut self, on: bool) -> OffloadConfig {
        self.compress = on;
        self
    }

    /// With [`Self::compress`]: encode only `n` of the streamed blocks (default: all of them),
    /// spread evenly over the loop; the others stream raw. Where the model's compute covers
    /// the raw upload of some blocks, those need no decode: a decode reads the encoding and
    /// writes the block through device memory beside the model's kernels, which costs the
    /// compute-bound sizes time. The raw blocks keep their raw host copy, so host memory grows
    /// with each block not encoded. Measured on an H100 with Wan2.1-14B (one process per size):
    /// fully streamed at 16384 tokens 1309.1 ms with every block encoded, 1298.2 with none (raw:
    /// 1294.5; resident: 1289.2); a 20 GiB budget at 4096 tokens 262.7 ms with its 12 streamed
    /// blocks encoded, 258.8 with none. Where the link needs some blocks encoded, the count
    /// matters: a 13 GiB budget at 4096 tokens (23 streamed) took 269.1 ms with all encoded and
    /// 278.4 with the 6 that [`LayerwiseOffloadManager::encoded_blocks_needed`](crate::LayerwiseOffloadManager::encoded_blocks_needed)
    /// answered for the compute measured with all 23 encoded (see there).
    /// [`LayerwiseOffloadManager::encoded_blocks_needed`](crate::LayerwiseOffloadManager::encoded_blocks_needed)
    /// tells how many blocks the link needs encoded for a measured compute time, and
    /// [`LayerwiseOffloadManager::set_encoded_blocks`](crate::LayerwiseOffloadManager::set_encoded_blocks)
    /// changes the count of a built manager in place. With `n` at
    /// least the number of streamed blocks, every one is encoded; 0 streams every block raw.
    /// Resident blocks with a host copy ([`Self::shareable`]) are encoded as `compress` says.
    ///
    /// Not with [`Self::shared_memory`], [`Self::zero_copy`], [`Self::host_budget`], the
    /// encoded cache or a peer group, whose stores hold every block in one form, nor on a
    /// manager reading another's store ([`Self::host_store`]): the build says so. Managers
    /// built over this one's store stream each block as it holds it.
    pub fn compress_blocks(mut self, n: usize) -> OffloadConfig {
        self.compress_blocks = Some(n);
        self
    }

    /// With [`Self::checkpoint`] and [`Self::compress`]: the file that keeps every block's
    /// encoding (default with `zero_copy` or `host_budget`: beside the checkpoint,
    /// `<file>.encoded`, or `<dir>/layerwise-offload.encoded` for a directory; without them
    /// the cache is used only when this is given). Written once, at the first `initialize()`
    /// that finds no file there (to a temporary name, then renamed); every later start checks
    /// it and uses it instead of encoding: read into pinned memory, or mapped and page-locked
    /// in place with `zero_copy` (ready without encoding or copying), or read block by block
    /// by the disk tier with `host_budget`.
    ///
    /// The cache is tied to the checkpoint it was made from (each file's name, size,
    /// modification time and a hash of its safetensors header) and to the model's blocks
    /// (their layouts and the names they are read from); its header has a hash and every
    /// encoding a CRC-32, checked when it is opened and at every disk-tier read. A cache made
    /// from another version of the checkpoint, for other blocks, or whose bytes changed is
    /// [`Error::EncodedCache`](crate::Error::EncodedCache) at `initialize()` (delete the file
    /// to have it written again); it is never served stale. As with `zero_copy`, a mapped
    /// cache must not be truncated while in use (SIGBUS).
    pub fn encoded_cache(mut self, path: impl Into<std::path::PathBuf>) -> OffloadConfig {
        self.encoded_cache = Some(path.into());
        self
    }

    /// With [`Self::compress`]: the raw bytes of a block encoded as one segment (default
    /// [`DEFAULT_SEGMENT_BYTES`], 64 MiB, and in a peer group of `n` members `1/n` of it; a
    /// positive multiple of [`SEGMENT_BYTES_MULTIPLE`], 64 KiB, up to 2 GiB). The two device
    /// staging buffers hold one segment's encoding each: smaller segments cost less device
    /// memory and more decode launches per block (one per segment, a few tens of microseconds
    /// each). A peer group splits each block between its members by whole segments, so that
    /// more segments per block split it more evenly. An encoded cache records its segment size
    /// and is refused when it differs; a shared-memory store is read with whatever segments it
    /// was published with.
    pub fn compress_segment_bytes(mut self, bytes: usize) -> OffloadConfig {
        self.segment_bytes = Some(bytes);
        self
    }

    /// The segment size encodings are made with: [`Self::compress_segment_bytes`] if given,
    /// else [`DEFAULT_SEGMENT_BYTES`] divided by the peer group's size (a multiple of
    /// [`SEGMENT_BYTES_MULTIPLE`]).
    pub(super) fn segment_bytes(&self) -> usize {
        let members = self.peer.as_ref().map_or(1, |(g, _)| g.size());
        self.segment_bytes.unwrap_or_else(|| {
            (DEFAULT_SEGMENT_BYTES / members / SEGMENT_BYTES_MULTIPLE).max(1)
                * SEGMENT_BYTES_MULTIPLE
        })
    }

    /// With [`Self::compress`]: let the encoder code a chunk in two tiers where that is smaller
    /// (default off: one tier of codes per chunk). N(0, 0.02) bf16 weights then encode to
    /// 0.679 of their size instead of 0.699, but a two-tier chunk takes about twice the GPU
    /// time to decode (on an H100: 590 against 1255 GB/s of output), time the model's kernels
    /// lose where they run beside the decode, and time the next segment's copy may wait for
    /// its staging buffer. Measured on an H100 with Wan2.1-14B (ms per forward, one tier
    /// against two): a 20 GiB budget at 1024 tokens 113.7 against 110.8 (two tiers faster),
    /// at 4096 tokens 257.4 against 262.5, full streaming at 1024 tokens 356.6 against 363.9
    /// (two tiers slower). The encoded cache records the choice; a cache made with the other
    /// one is refused as stale.
    pub fn compress_two_tier(mut self, on: bool) -> OffloadConfig {
        self.two_tier = on;
        self
    }

    /// With [`Self::compress`]: how many device staging buffers (each one segment's encoding,
    /// about 45 MiB with the default segments) an upload's segments go through in turn, so that
    /// the copy of a segment can run that many minus one segments ahead of the decodes (default
    /// [`DEFAULT_STAGING_BUFFERS`], 2..=[`MAX_STAGING_BUFFERS`]).
    pub fn compress_staging_buffers(mut self, n: usize) -> OffloadConfig {
        self.staging_buffers = n;
        self
    }

    /// With [`Self::compress`]: at most `blocks` thread blocks in the decode kernel's grid
    /// (`None`, the default: as many as fill every SM). Fewer blocks than SMs decode on that
    /// many SMs only, leaving the rest to the model's kernels that run beside the decode; a
    /// segment's decode then takes longer, but it has a segment's copy to finish in. Measured
    /// on an H100 with Wan2.1-14B, grids of 132, 33 and 16 blocks were slower than the full
    /// grid everywhere (16384 tokens streamed: +2.0-2.8% over the resident time against +1.5%;
    /// a 20 GiB budget at 1024 tokens: +6.9-18% over the floor against +0.8%). For
    /// measurements on other cards, with the `testing` feature; not part of the stable API.
    #[cfg(feature = "testing")]
    pub fn compress_decode_blocks(mut self, blocks: Option<u32>) -> OffloadConfig {
        self.decode_blocks = blocks;
        self
    }

    /// CUDA: the indices (0..32) of libtorch's normal-priority pool streams not to take for the
    /// copy, decode and push streams: a stream drawn from the pool's round robin at one of them
    /// is passed over for the next. On an H100 with 32 hardware queues one compressed
    /// configuration ran 6.6-8.5% over its floor in two runs where its copy stream was pool
    /// stream #8; a sweep of the same configuration over every pool index found no index
    /// slower than the others, and passing over #0, #8, #16 and #24 made it no faster (11
    /// builds each: 3.3-10.0% and 4.0-12.2% over the floor, in a process whose link ran at
    /// 45 GiB/s instead of 51). With the `testing` feature, for measurements; not part of the
    /// stable API.
    #[cfg(feature = "testing")]
    pub fn avoid_pool_streams(mut self, indices: impl IntoIterator<Item = usize>) -> OffloadConfig {
        self.avoid_streams = indices.into_iter().collect();
        self
    }

    /// The encoder's choices for this configuration.
    pub(super) fn encoding(&self) -> super::compress::Encoding {
        super::compress::Encoding {
            segment: self.segment_bytes(),
            two_tier: self.two_tier,
        }
    }

    /// Calls `f` with the progress of `initialize()`'s long steps (copying blocks into host
    /// memory, reading a checkpoint, moving weights to the device; see
    /// [`Progress`](crate::Progress)), on the thread that runs `initialize()`. Nothing by
    /// default: the library prints nothing.
    pub fn on_progress(
        mut self,
        f: impl Fn(&crate::progress::Progress) + Send + Sync + 'static,
    ) -> OffloadConfig {
        self.progress = Some(crate::progress::ProgressCallback::new(f));
        self
    }
}
