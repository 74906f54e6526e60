//! [`OffloadConfig::build`]: the options checked together, the backend chosen, the manager
//! made (and initialized with `auto_initialize`).

use crate::error::{Error, Result};
use crate::source::WeightSource;

use super::LayerwiseOffloadManager;
use super::config::{
    DEFAULT_SEGMENT_BYTES, MAX_PREFETCH_DEPTH, MAX_STAGING_BUFFERS, OffloadConfig,
    SEGMENT_BYTES_MULTIPLE,
};
use super::device::{Backend, POOL_STREAMS};

impl OffloadConfig {
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
        let segment = self.segment_bytes();
        if segment == 0
            || !segment.is_multiple_of(SEGMENT_BYTES_MULTIPLE)
            || segment > layerwise_offload_codec::segments::MAX_SEGMENT_RAW
        {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::compress_segment_bytes",
                message: format!(
                    "{} bytes is out of range: pass a positive multiple of {SEGMENT_BYTES_MULTIPLE} (64 KiB) up to 2 GiB, e.g. {DEFAULT_SEGMENT_BYTES} (the default)",
                    segment
                ),
            });
        }
        if let Some(&bad) = self.avoid_streams.iter().find(|&&i| i >= POOL_STREAMS) {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::avoid_pool_streams",
                message: format!(
                    "pool stream index {bad} is out of range: libtorch's pool has {POOL_STREAMS} streams a priority, pass indices in 0..{POOL_STREAMS}"
                ),
            });
        }
        // Every index is below POOL_STREAMS (above): all of them avoided is POOL_STREAMS
        // distinct ones.
        let avoided: std::collections::BTreeSet<_> = self.avoid_streams.iter().collect();
        if avoided.len() == POOL_STREAMS {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::avoid_pool_streams",
                message: format!(
                    "all {POOL_STREAMS} pool stream indices avoided: leave at least one for the copy and decode streams"
                ),
            });
        }
        if self.decode_blocks == Some(0) {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::compress_decode_blocks",
                message: "a decode grid of 0 blocks: pass Some(1) or more, or None for a grid that fills every SM".into(),
            });
        }
        if !(2..=MAX_STAGING_BUFFERS).contains(&self.staging_buffers) {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::compress_staging_buffers",
                message: format!(
                    "{} staging buffers is out of range: pass 2..={MAX_STAGING_BUFFERS} (one copies while the other is decoded; each costs one segment's encoding of device memory)",
                    self.staging_buffers
                ),
            });
        }
        if self.enabled
            && let Some((attr, _)) = self.lists.iter().find(|(_, n)| *n == 0)
        {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::new",
                message: format!(
                    "num_blocks is 0 for {attr:?}: pass the number of blocks to offload (at least 1), or build with enabled(false) to offload nothing"
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
        if self.push_chunk == 0 {
            return Err(Error::InvalidArgument {
                op: "OffloadConfig::peer_push_chunk_bytes",
                message: "a share cannot be sent in chunks of 0 bytes: pass at least 1 (usize::MAX sends it whole)".into(),
            });
        }
        self.check_checkpoint_options()?;
        let named = model.named_tensors()?;
        let backend = Backend::select(
            self.enabled,
            self.cpu_test_mode,
            self.device,
            self.allow_cpu_fallback,
            &self.avoid_streams,
        )?;
        let auto = self.auto_initialize;
        let mut m = LayerwiseOffloadManager::configured(self, backend, named);
        if auto {
            m.initialize()?;
        }
        Ok(m)
    }

    /// Why this configuration's streamed blocks cannot be held some raw and some encoded
    /// ([`Self::compress_blocks`], [`LayerwiseOffloadManager::set_encoded_blocks`]): without
    /// compression, or with a store that holds every block in one form. None where they can.
    pub(super) fn unmixed_store(&self) -> Option<&'static str> {
        if !self.compress {
            Some(
                "only compressed transport encodes blocks, so choosing which streamed blocks are encoded needs .compress(true) too",
            )
        } else if self.shm.is_some() {
            Some(
                "a published store holds every block in one form, and choosing which blocks are encoded mixes raw and encoded blocks; publish with every block encoded (no compress_blocks) or without compression",
            )
        } else if self.zero_copy || self.host_budget.is_some() || self.encoded_cache.is_some() {
            Some(
                "the encoded cache (which zero_copy and host_budget stream from) holds every block encoded; build without the encoded cache, zero_copy and host_budget to choose which blocks are encoded",
            )
        } else if self.store.is_some() {
            Some(
                "a shared host store streams its blocks in the form its publisher gave them; choose which blocks are encoded on the publisher instead",
            )
        } else if self.peer.is_some() {
            Some(
                "the members of a peer group split every block's encoding between them, so every block is encoded; build the group without compress_blocks",
            )
        } else {
            None
        }
    }

    /// The checkpoint and compression options fit together.
    fn check_checkpoint_options(&self) -> Result<()> {
        let refuse = |op, message: &str| {
            Err(Error::InvalidArgument {
                op,
                message: message.into(),
            })
        };
        if let (Some(n), Some(message)) = (self.compress_blocks, self.unmixed_store()) {
            return refuse(
                "OffloadConfig::compress_blocks",
                &format!("{message} (compress_blocks({n}) was given)"),
            );
        }
        if self.encoded_cache.is_some() && (!self.compress || self.checkpoint.is_none()) {
            return refuse(
                "OffloadConfig::encoded_cache",
                "an encoded cache holds a checkpoint's blocks encoded for compressed transport; give it with .checkpoint(..) and .compress(true)",
            );
        }
        if self.checkpoint.is_none() {
            if self.zero_copy {
                return refuse(
                    "OffloadConfig::zero_copy",
                    "zero_copy maps a checkpoint's files; give one with .checkpoint(Checkpoint::open(path)?)",
                );
            }
            if self.host_budget.is_some() {
                return refuse(
                    "OffloadConfig::host_budget",
                    "host_budget reads the blocks past the budget from a checkpoint; give one with .checkpoint(Checkpoint::open(path)?)",
                );
            }
            return Ok(());
        }
        if self.store.is_some() {
            return refuse(
                "OffloadConfig::checkpoint",
                "a shared host store already holds the weights; give either a checkpoint or a host store",
            );
        }
        if self.shm.is_some() && (self.zero_copy || self.host_budget.is_some()) {
            return refuse(
                "OffloadConfig::shared_memory",
                "zero_copy and host_budget stream from the checkpoint's files, which other processes share through the page cache already; open the same checkpoint there instead of publishing a store",
            );
        }
        if self.zero_copy && self.host_budget.is_some() {
            return refuse(
                "OffloadConfig::host_budget",
                "zero_copy pins every page of the checkpoint; host_budget keeps part of it out of memory: choose one",
            );
        }
        if self.host_budget.is_some() && self.peer.is_some() {
            return refuse(
                "OffloadConfig::host_budget",
                "a peer group member uploads its share of every block from host memory; the disk tier does not serve groups yet, so give the group a host budget that holds every block",
            );
        }
        if self.convert_dtypes && (self.zero_copy || self.host_budget.is_some()) {
            return refuse(
                "OffloadConfig::convert_dtypes",
                "zero_copy and host_budget stream the checkpoint's bytes as stored; convert the checkpoint once instead",
            );
        }
        Ok(())
    }
}
