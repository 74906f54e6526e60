//! [`Phase`]: where a manager is in its life, holding what exists only then. `initialize`
//! builds a [`Runtime`] (the plan, the blocks, the slot ring, the host store, the disk tier,
//! the decoder, the claim on the model's tensors) and the manager is `Ready` with it; `restore`
//! gives the runtime up, keeping only the plan and the blocks' handles that describe the model.
//! No field of the manager is an `Option` that "exists once initialized".
//!
//! [`Loop`] is the block loop's view of a ready manager: the runtime and the other parts the
//! loop uses (configuration, backend, timer, counters, faults, peer link), each borrowed on its
//! own, so that a step of the loop can use two parts at once.

use crate::claims::Claim;
use crate::error::{Error, Result};
use crate::host::HostStore;
use crate::plan::{BlockLayout, Plan};
use crate::stats::OffloadStats;
use std::sync::Arc;

use super::config::OffloadConfig;
use super::decode::Decoding;
use super::device::Backend;
use super::disk::DiskTier;
use super::faults::FaultInjector;
use super::ring::SlotRing;
use super::share::PeerLink;
use super::timing::{Pair, Timer};
use super::weights::BlockState;

/// What an initialized manager holds.
#[derive(Debug)]
pub(super) struct Runtime {
    /// Which tensors form which block, and where each sits in the block's buffer.
    pub(super) plan: Plan,
    /// Per block, in loop order.
    pub(super) blocks: Vec<BlockState>,
    pub(super) ring: SlotRing,
    /// The host store this manager streams from (its own, or one shared with it).
    pub(super) store: Arc<HostStore>,
    /// The disk tier (a host budget below the streamed blocks).
    pub(super) disk: Option<Arc<DiskTier>>,
    /// Compressed transport: the staging buffers and the GPU decoder.
    pub(super) decoding: Option<Decoding>,
    /// This manager's hold on the model's block tensors, until `restore`.
    pub(super) claim: Claim,
}

impl Runtime {
    /// Block `block`'s layout.
    pub(super) fn layout(&self, block: usize) -> &BlockLayout {
        &self.plan.blocks[block]
    }

    /// Empties slot `s` for another block (its old block's tensors go back to placeholders).
    pub(super) fn evict(&mut self, s: usize, backend: &Backend) -> Result<()> {
        if let Some(old) = self.ring.evict(s, || backend.compute_stream())? {
            self.blocks[old].point_at_placeholders()?;
        }
        Ok(())
    }

    /// The blocks entered now.
    pub(super) fn in_use(&self) -> Vec<usize> {
        (0..self.blocks.len())
            .filter(|&i| self.blocks[i].in_use)
            .collect()
    }

    /// Whether the host copy is not this manager's alone: shared with other managers (or held
    /// by a caller of `host_store`), published to other processes, or a read-only mapping.
    pub(super) fn host_is_shared(&self) -> bool {
        let s = &self.store;
        Arc::strong_count(s) > 1 || s.read_only || s.owner_path.is_some()
    }
}

/// Where a manager is in its life.
#[derive(Debug, Default)]
pub(super) enum Phase {
    /// Built, not initialized (or an `initialize` failed and was rolled back).
    #[default]
    Configured,
    /// Initialized: the block loop runs.
    Ready(Runtime),
    /// A `restore` stopped part-way, after `restored` blocks: only `restore` goes on.
    Restoring { rt: Runtime, restored: usize },
    /// Restored: every weight is the model's again. The plan and the blocks' handles stay,
    /// for the reads that describe the model.
    Restored { plan: Plan, blocks: Vec<BlockState> },
}

impl Phase {
    /// The runtime, while there is one (ready, or part-way through a restore).
    pub(super) fn runtime(&self) -> Option<&Runtime> {
        match self {
            Phase::Ready(rt) | Phase::Restoring { rt, .. } => Some(rt),
            Phase::Configured | Phase::Restored { .. } => None,
        }
    }

    /// [`Self::runtime`], to change.
    pub(super) fn runtime_mut(&mut self) -> Option<&mut Runtime> {
        match self {
            Phase::Ready(rt) | Phase::Restoring { rt, .. } => Some(rt),
            Phase::Configured | Phase::Restored { .. } => None,
        }
    }

    /// The runtime of a ready manager, or why `op` cannot run now.
    pub(super) fn ready(&mut self, op: &'static str) -> Result<&mut Runtime> {
        match self {
            Phase::Ready(rt) => Ok(rt),
            other => Err(other.not_ready(op)),
        }
    }

    /// Why `op`, which needs a ready manager, cannot run in this phase.
    pub(super) fn not_ready(&self, op: &'static str) -> Error {
        match self {
            Phase::Restoring { rt, restored } => Error::PartlyRestored {
                op,
                restored: *restored,
                num_blocks: rt.blocks.len(),
            },
            _ => Error::NotInitialized { op },
        }
    }

    /// The plan, once initialized (also after a restore).
    pub(super) fn plan(&self) -> Option<&Plan> {
        match self {
            Phase::Ready(rt) | Phase::Restoring { rt, .. } => Some(&rt.plan),
            Phase::Restored { plan, .. } => Some(plan),
            Phase::Configured => None,
        }
    }

    /// The blocks, once initialized (also after a restore); none before.
    pub(super) fn blocks(&self) -> &[BlockState] {
        match self {
            Phase::Ready(rt) | Phase::Restoring { rt, .. } => &rt.blocks,
            Phase::Restored { blocks, .. } => blocks,
            Phase::Configured => &[],
        }
    }
}

/// The block loop's view of a ready manager: each part borrowed on its own.
pub(super) struct Loop<'a> {
    pub(super) rt: &'a mut Runtime,
    pub(super) config: &'a OffloadConfig,
    pub(super) backend: &'a Backend,
    pub(super) timer: &'a mut Timer,
    pub(super) stats: &'a mut OffloadStats,
    pub(super) faults: &'a mut FaultInjector,
    pub(super) peer: &'a mut PeerLink,
}

impl Loop<'_> {
    /// A pair of timing events, recycled when possible; None when timing is off or without
    /// device events.
    pub(super) fn timing_pair(&mut self) -> Result<Pair> {
        let on = self.config.timing && self.backend.has_events();
        self.timer.pair(on, self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::{Phase, Runtime};
    use crate::claims::Claim;
    use crate::host::HostStore;
    use crate::manager::ring::SlotRing;
    use crate::manager::weights::BlockState;
    use crate::{Error, plan};
    use std::sync::Arc;
    use tch::{Device, Kind, Tensor};

    fn runtime(named: &[(String, Tensor)]) -> Runtime {
        let plan = plan::build(named, &[("blocks".into(), 2)], &[Device::Cpu]).unwrap();
        let blocks = plan
            .blocks
            .iter()
            .map(|_| BlockState::new(Vec::new(), Vec::new(), false))
            .collect();
        let claim = Claim::take(named.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
        Runtime {
            store: Arc::new(HostStore::own(
                plan.blocks.clone(),
                vec![None, None],
                false,
                None,
            )),
            plan,
            blocks,
            ring: SlotRing::default(),
            disk: None,
            decoding: None,
            claim,
        }
    }

    fn model() -> Vec<(String, Tensor)> {
        (0..2)
            .map(|i| {
                (
                    format!("blocks.{i}.w"),
                    Tensor::zeros([4], (Kind::Float, Device::Cpu)),
                )
            })
            .collect()
    }

    #[test]
    fn only_a_ready_manager_runs_its_loop_and_each_phase_says_why_not() {
        let named = model();
        let mut p = Phase::Configured;
        assert!(matches!(
            p.ready("enter"),
            Err(Error::NotInitialized { op: "enter" })
        ));
        assert!(p.plan().is_none() && p.blocks().is_empty() && p.runtime().is_none());

        p = Phase::Ready(runtime(&named));
        assert_eq!(p.ready("enter").unwrap().blocks.len(), 2);
        assert!(p.runtime().is_some() && p.plan().is_some());

        let Phase::Ready(rt) = std::mem::take(&mut p) else {
            unreachable!()
        };
        p = Phase::Restoring { rt, restored: 1 };
        assert!(matches!(
            p.ready("enter"),
            Err(Error::PartlyRestored {
                op: "enter",
                restored: 1,
                num_blocks: 2
            })
        ));
        assert!(p.runtime_mut().is_some(), "reads and restore go on");

        let Phase::Restoring { rt, .. } = std::mem::take(&mut p) else {
            unreachable!()
        };
        p = Phase::Restored {
            plan: rt.plan,
            blocks: rt.blocks,
        };
        assert!(matches!(
            p.ready("enter"),
            Err(Error::NotInitialized { .. })
        ));
        assert!(p.runtime().is_none());
        assert_eq!(p.blocks().len(), 2, "the blocks still describe the model");
        assert_eq!(p.plan().unwrap().blocks.len(), 2);
    }

    /// The manager may move to another thread with its runtime (the disk tier is shared by
    /// the blocks on it).
    #[test]
    fn a_manager_with_its_runtime_is_send() {
        fn send<T: Send>() {}
        send::<Runtime>();
        send::<crate::LayerwiseOffloadManager>();
    }

    #[test]
    fn the_runtime_holds_the_claim_until_it_is_dropped() {
        let named = model();
        let rt = runtime(&named);
        assert!(Claim::take(named.iter().map(|(n, t)| (n.as_str(), t))).is_err());
        drop(rt);
        assert!(Claim::take(named.iter().map(|(n, t)| (n.as_str(), t))).is_ok());
    }

    #[test]
    fn a_store_held_elsewhere_or_published_is_shared() {
        let named = model();
        let mut rt = runtime(&named);
        assert!(!rt.host_is_shared());
        let other = rt.store.clone();
        assert!(rt.host_is_shared());
        drop(other);
        Arc::get_mut(&mut rt.store).unwrap().read_only = true;
        assert!(rt.host_is_shared());
        assert_eq!(rt.layout(1).index, 1);
        assert!(rt.in_use().is_empty());
    }
}
