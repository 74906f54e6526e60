//! The checkpoint's encoded cache for a compressed manager
//! ([`OffloadConfig::encoded_cache`](crate::OffloadConfig::encoded_cache)): each block's key,
//! the cache opened and checked, or written once from the checkpoint (the format and its checks
//! are [`crate::checkpoint::cache`]'s).

use crate::checkpoint::Checkpoint;
use crate::checkpoint::cache::{self, EncodedCache};
use crate::error::Result;
use crate::plan::Plan;
use crate::progress::{Reporter, Stage};
use std::sync::Arc;
use tch::Tensor;

use super::LayerwiseOffloadManager;
use super::compress::{encode_to_vec, zero_gaps};
use super::load::{Sources, read_block};

impl LayerwiseOffloadManager {
    /// With `compress` and `zero_copy`, `host_budget` or `encoded_cache`: the checkpoint's
    /// encoded cache, opened and checked, or (no file yet) written now from the checkpoint,
    /// every block encoded once (through `scratch`). None otherwise.
    pub(super) fn encoded_cache(
        &self,
        ckpt: &Checkpoint,
        sources: &Sources,
        plan: &Plan,
        scratch: &mut Option<Tensor>,
    ) -> Result<Option<Arc<EncodedCache>>> {
        let c = &self.config;
        if !c.compress || !(c.zero_copy || c.host_budget.is_some() || c.encoded_cache.is_some()) {
            return Ok(None);
        }
        let path = c
            .encoded_cache
            .clone()
            .unwrap_or_else(|| cache::default_path(ckpt));
        let keys: Vec<String> = plan
            .blocks
            .iter()
            .map(|l| {
                cache::block_key(
                    l.bytes,
                    l.tensors.iter().map(|t| {
                        format!(
                            "{}|{:?}|{:?}|{:?}|{}|{}|{}",
                            t.name,
                            t.kind,
                            t.shape,
                            t.strides,
                            t.offset,
                            t.bytes,
                            sources.stored_name(t.source_index)
                        )
                    }),
                )
            })
            .collect();
        // Each encoding is checked where it is read: reads into memory and the disk tier as
        // they read a block, zero-copy through its mapping (`fill_from_checkpoint`).
        if let Some(open) =
            EncodedCache::open(&path, ckpt, &keys, (c.segment_bytes(), c.two_tier), false)?
        {
            return Ok(Some(Arc::new(open)));
        }
        let sizes = plan.blocks.iter().map(|l| l.bytes as u64);
        let mut progress = Reporter::start(c.progress.as_ref(), Stage::CheckpointRead, sizes);
        let written =
            EncodedCache::write(&path, ckpt, &keys, (c.segment_bytes(), c.two_tier), |i| {
                let layout = &plan.blocks[i];
                let buf = super::fill::scratch_buffer(scratch, layout.bytes)?;
                read_block(ckpt, sources, layout, &buf)?;
                zero_gaps(&buf, layout)?;
                let out = encode_to_vec(&buf, c.encoding())?;
                progress.advance(layout.bytes as u64);
                Ok(out)
            })?;
        Ok(Some(Arc::new(written)))
    }
}
