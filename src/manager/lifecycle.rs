//! Setting up: `initialize`, a short sequence of named steps (plan and claim, residency, slot
//! ring, peer group, block states, device tensors, host copies), each recorded in [`Undo`] so
//! that a failure puts the model back (`restore.rs`).

use crate::accel::HostMemory;
use crate::claims::Claim;
use crate::error::Context;
use crate::error::{Error, Result};
use crate::host::HostStore;
use crate::placement::{self, Budget};
use crate::plan::{self, Plan};
use crate::progress::{Reporter, Stage};
use crate::stats::OffloadStats;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

use super::LayerwiseOffloadManager;
use super::decode::Decoding;
use super::disk::DiskTier;
use super::phase::{Phase, Runtime};
use super::ring::SlotRing;
use super::weights::BlockState;

/// What `initialize` changed so far, to put the model back as it was should a later step fail.
#[derive(Debug, Default)]
pub(super) struct Undo {
    /// The device of every source tensor before `initialize`.
    pub(super) devices: Vec<Device>,
    /// Tensors re-pointed whose old value has no host copy of this manager's (moved to the
    /// device, or given placeholders or fresh tensors from a shared store), each with an alias
    /// of its old data.
    pub(super) repointed: Vec<(usize, Tensor)>,
    /// The shared-memory file this `initialize` created.
    pub(super) created: Option<std::path::PathBuf>,
    /// The runtime built so far, once its blocks exist (their host copies give the model its
    /// values back).
    pub(super) building: Option<Building>,
}

/// A [`Runtime`] being built by `initialize`: what exists before the host store.
#[derive(Debug)]
pub(super) struct Building {
    pub(super) plan: Plan,
    pub(super) blocks: Vec<BlockState>,
    pub(super) ring: SlotRing,
    pub(super) claim: Claim,
    pub(super) disk: Option<Arc<DiskTier>>,
    /// Per block: whether its host copy is its encoding (compressed transport, and not one of
    /// the streamed blocks [`OffloadConfig::compress_blocks`] leaves raw).
    pub(super) encode: Vec<bool>,
}

impl Building {
    /// Points block `i`'s tensors at their placeholders (the block streams from a host store it
    /// did not fill from them), their old data kept in `undo`.
    pub(super) fn place_placeholders(&mut self, i: usize, undo: &mut Undo) -> Result<()> {
        let b = &mut self.blocks[i];
        let sources = self.plan.blocks[i].tensors.iter().map(|t| t.source_index);
        for ((p, ph), src) in b.params.iter_mut().zip(&b.placeholders).zip(sources) {
            undo.repoint(src, p, ph, "placing placeholders")?;
        }
        Ok(())
    }

    /// The runtime, with the host `store` and the decoder.
    fn finish(self, store: Arc<HostStore>, decoding: Option<Decoding>) -> Runtime {
        Runtime {
            plan: self.plan,
            blocks: self.blocks,
            ring: self.ring,
            store,
            disk: self.disk,
            decoding,
            claim: self.claim,
        }
    }
}

impl Undo {
    /// Points `t` (the source's tensor `i`) at `value`, keeping an alias of its old data to put
    /// back should `initialize` fail.
    pub(super) fn repoint(
        &mut self,
        i: usize,
        t: &mut Tensor,
        value: &Tensor,
        op: &'static str,
    ) -> Result<()> {
        let old = t.f_detach().map_err(|e| Error::from((op, e)))?;
        self.repointed.push((i, old));
        t.f_set_data(value).map_err(|e| Error::from((op, e)))
    }
}

impl LayerwiseOffloadManager {
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
        if !self.is_enabled() {
            return Ok(());
        }
        match &self.phase {
            Phase::Ready(_) => return Ok(()),
            Phase::Restored { .. } => {
                return Err(Error::InvalidArgument {
                    op: "initialize",
                    message: "the manager was restored; build a new manager to offload again"
                        .into(),
                });
            }
            Phase::Restoring { .. } => return Err(self.phase.not_ready("initialize")),
            Phase::Configured => {}
        }
        let started = Instant::now();
        let _span = crate::observe::initialize(self.config.checkpoint.is_some());
        let mut undo = Undo {
            devices: self.named.iter().map(|(_, t)| t.device()).collect(),
            ..Undo::default()
        };
        let (rt, first) = match self.offload(&mut undo) {
            Ok(built) => built,
            Err(e) => {
                self.roll_back(undo);
                return Err(e);
            }
        };
        drop(undo); // frees the old storage of the tensors moved to the device
        self.phase = Phase::Ready(rt);
        self.stats.init_seconds = started.elapsed().as_secs_f64();
        if self.backend.cuda().is_some()
            && let Some(w) = crate::accel::few_queues_warning(crate::accel::hardware_queues())
        {
            crate::observe::warn(&w);
        }

        // The first streamed block on the device, synchronously (as FastVideo does). Not in a
        // peer group: an upload needs every member there.
        if let (Some(first), None) = (first, &self.config.peer) {
            self.prefetch_layer(first, false)?;
        }
        Ok(())
    }

    /// The steps of [`Self::initialize`] that change the model; returns the runtime and the
    /// first streamed block. Records in `undo` what [`Self::roll_back`] needs to put the model
    /// back should a step fail.
    fn offload(&mut self, undo: &mut Undo) -> Result<(Runtime, Option<usize>)> {
        let (mut plan, claim) = self.plan_and_claim()?;
        // With a checkpoint: what comes from where, before anything changes.
        let checkpoint = self.config.checkpoint.clone();
        let sources = match &checkpoint {
            Some(c) => Some(self.match_checkpoint(c, &mut plan)?),
            None => None,
        };
        // Which blocks stay resident (a VRAM budget), which stream.
        let resident = self.choose_resident(&plan)?;
        let streamed: Vec<usize> = (0..plan.blocks.len()).filter(|&i| !resident[i]).collect();
        // The slot ring first: running out of device memory here changes nothing.
        let (ring, slot_bytes) = self.alloc_ring(&plan, &streamed)?;
        self.join_group(&ring)?;
        let blocks = self.block_states(&plan, &resident)?;
        let to_device = self.device_tensors(&plan, &resident);
        match (&checkpoint, &sources) {
            (Some(c), Some(s)) => self.load_to_device(c, s, &to_device, undo)?,
            _ => self.move_to_device(&to_device, undo)?,
        }
        self.stats = OffloadStats {
            streamed_blocks: streamed.len(),
            resident_blocks: plan.blocks.len() - streamed.len(),
            resident_bytes: plan
                .blocks
                .iter()
                .zip(&resident)
                .filter(|(_, r)| **r)
                .map(|(l, _)| l.bytes as u64)
                .sum(),
            slot_bytes: (slot_bytes * ring.len()) as u64,
            pinned: self.host_memory() == HostMemory::Pinned,
            block_upload_ms: vec![0.0; plan.blocks.len()],
            block_stall_ms: vec![0.0; plan.blocks.len()],
            ..OffloadStats::default()
        };
        let encode = super::forms::encoded_blocks(
            self.config.compress,
            self.config.compress_blocks,
            &streamed,
            plan.blocks.len(),
        );
        let mut b = Building {
            plan,
            blocks,
            ring,
            claim,
            disk: None,
            encode,
        };
        // Streamed blocks into their host buffers, one at a time, freeing each source as it
        // goes.
        let filled = match (self.config.store.clone(), checkpoint, &sources) {
            (Some(store), _, _) => self.fill_from_store(&mut b, store, &streamed, &resident, undo),
            (None, Some(c), Some(s)) => self.fill_from_checkpoint(&mut b, c, s, &resident, undo),
            _ => self.fill_own_store(&mut b, &resident, undo),
        };
        // Encoded blocks (compress, or a shared store of them) decode on the GPU.
        let built = filled.and_then(|store| Ok((store, self.start_decoding(&b.blocks)?)));
        match built {
            Ok((store, decoding)) => Ok((b.finish(store, decoding), streamed.first().copied())),
            Err(e) => {
                undo.building = Some(b);
                Err(e)
            }
        }
    }

    /// The plan of the model's blocks, checked against a shared store, and this manager's claim
    /// on their tensors.
    fn plan_and_claim(&mut self) -> Result<(Plan, Claim)> {
        let compute = self.compute_device();
        let allowed = if compute == Device::Cpu {
            vec![Device::Cpu]
        } else {
            vec![compute, Device::Cpu]
        };
        let mut plan = plan::build(&self.named, &self.config.lists, &allowed)?;
        if let Some(store) = &self.config.store {
            store.adopt_plan(&mut plan)?;
            // A store streams its blocks as it holds them: an encoded one whatever `compress`
            // says here; a raw one cannot honour `compress(true)`.
            if self.config.compress && !store.is_encoded() {
                return Err(Error::InvalidArgument {
                    op: "OffloadConfig::compress",
                    message: "the shared host store holds raw blocks, which stream as they are; build without compress(true), or have the store's publisher build with compress(true)".into(),
                });
            }
        }
        // No other manager may hold these tensors: it would have left placeholders in them.
        let claim = Claim::take(plan.blocks.iter().flat_map(|l| {
            l.tensors
                .iter()
                .map(|t| (t.name.as_str(), &self.named[t.source_index].1))
        }))?;
        Ok((plan, claim))
    }

    /// The slot ring ([`SlotRing::size`]) and the copy stream; returns the ring and the size
    /// of a slot.
    fn alloc_ring(&mut self, plan: &Plan, streamed: &[usize]) -> Result<(SlotRing, usize)> {
        let sizes: Vec<usize> = streamed.iter().map(|&i| plan.blocks[i].bytes).collect();
        let (n, slot_bytes) = SlotRing::size(self.config.prefetch_depth, &sizes);
        let peer = self.config.peer.as_ref().map(|(g, r)| (g.size(), *r));
        let faults = &mut self.faults;
        let ring = SlotRing::alloc(&self.backend, (n, slot_bytes), peer, || faults.slot_alloc())?;
        self.backend.take_copy_stream()?;
        Ok((ring, slot_bytes))
    }

    /// Peer groups: the push streams, and this member's ring joins the group.
    fn join_group(&mut self, ring: &SlotRing) -> Result<()> {
        if let Some((group, rank)) = &self.config.peer {
            if self.peer.push.is_empty() {
                self.peer.push = self
                    .backend
                    .push_streams(group.size(), self.config.push_per_member)?;
            }
            group.join(*rank, ring.buffers())?;
            self.peer.joined = true;
        }
        Ok(())
    }

    /// Per block: handles of the model's tensors and placeholders on the compute device.
    fn block_states(&self, plan: &Plan, resident: &[bool]) -> Result<Vec<BlockState>> {
        let compute = self.compute_device();
        let mut blocks = Vec::with_capacity(plan.blocks.len());
        for (l, &r) in plan.blocks.iter().zip(resident) {
            let mut params = Vec::with_capacity(l.tensors.len());
            let mut placeholders = Vec::with_capacity(l.tensors.len());
            for t in &l.tensors {
                params.push(self.named[t.source_index].1.shallow_clone());
                let shape = vec![0i64; t.shape.len().max(1)];
                placeholders.push(
                    Tensor::f_empty(shape, (t.kind, compute)).context("creating placeholders")?,
                );
            }
            blocks.push(BlockState::new(params, placeholders, r));
        }
        Ok(blocks)
    }

    /// The tensors that go to the compute device for good: non-block tensors and resident
    /// blocks' (with a shared store, resident blocks get their values from the store instead).
    fn device_tensors(&self, plan: &Plan, resident: &[bool]) -> Vec<usize> {
        let from_store = self.config.store.is_some();
        let resident_tensors = plan
            .blocks
            .iter()
            .zip(resident)
            .filter(|(_, r)| **r && !from_store)
            .flat_map(|(l, _)| l.tensors.iter().map(|t| t.source_index));
        plan.non_block
            .iter()
            .copied()
            .chain(resident_tensors)
            .collect()
    }

    /// Tensors `to_move` (source indices) to the compute device.
    fn move_to_device(&mut self, to_move: &[usize], undo: &mut Undo) -> Result<()> {
        let compute = self.compute_device();
        let sizes = to_move
            .iter()
            .map(|&i| &self.named[i].1)
            .filter(|t| t.device() != compute);
        let sizes = sizes.map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64);
        let mut progress = Reporter::start(self.config.progress.as_ref(), Stage::ToDevice, sizes);
        for &i in to_move {
            let t = &mut self.named[i].1;
            if t.device() != compute {
                let moved = tch::no_grad(|| t.f_to_device(compute)).map_err(|e| {
                    Error::from_torch(
                        "moving non-block tensors to the compute device",
                        0,
                        e.to_string(),
                    )
                })?;
                undo.repoint(i, t, &moved, "moving non-block tensors")?;
                progress.advance((moved.numel() * moved.kind().elt_size_in_bytes()) as u64);
            }
        }
        Ok(())
    }

    /// Marks the blocks that stay on the device for good: as many as fit in the budget next to
    /// the slot ring, spread evenly through the loop. All of them if everything fits.
    fn choose_resident(&self, plan: &Plan) -> Result<Vec<bool>> {
        let n = plan.blocks.len();
        let Some(budget) = self.config.budget else {
            return Ok(vec![false; n]);
        };
        let budget = match (budget, self.backend.free_memory()?) {
            (Budget::Bytes(b), _) => b,
            (Budget::AllBut(reserve), Some(free)) => {
                // Non-block weights still on the CPU will take their share of what is free.
                let pending: u64 = plan
                    .non_block
                    .iter()
                    .map(|&i| &self.named[i].1)
                    .filter(|t| t.device() == Device::Cpu)
                    .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                    .sum();
                free.saturating_sub(pending).saturating_sub(reserve)
            }
            (Budget::AllBut(_), _) => {
                return Err(Error::InvalidArgument {
                    op: "vram_budget_all_but",
                    message: "a budget relative to free device memory needs a CUDA device; use vram_budget(bytes) in the CPU test mode".into(),
                });
            }
        };
        let sizes: Vec<u64> = plan.blocks.iter().map(|l| l.bytes as u64).collect();
        placement::resident_blocks(&sizes, Some(budget), self.config.prefetch_depth)
    }
}
