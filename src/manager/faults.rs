//! Injected faults, for tests of the error paths (the `testing` feature): [`Fault`] names the
//! operation that fails, [`FaultInjector`] counts each kind of operation. Without the feature
//! the injector is empty and nothing fails.

use super::config::OffloadConfig;

/// A failure to inject, for tests of the error paths (the k-th such operation fails, counting
/// from 0). With the `testing` feature; not part of the stable API.
#[cfg(feature = "testing")]
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

/// Counts the operations that an injected [`Fault`] can make fail.
#[cfg(feature = "testing")]
#[derive(Debug, Default)]
pub(super) struct FaultInjector {
    faults: Vec<Fault>,
    slot_allocs: usize,
    uploads: usize,
    host_allocs: usize,
    restored_blocks: usize,
}

/// Counts one operation and returns the count before it.
#[cfg(feature = "testing")]
fn next(count: &mut usize) -> usize {
    *count += 1;
    *count - 1
}

#[cfg(feature = "testing")]
impl FaultInjector {
    /// An injector for the faults `config` asks for, every count at 0.
    pub(super) fn new(config: &OffloadConfig) -> FaultInjector {
        FaultInjector {
            faults: config.faults.clone(),
            ..FaultInjector::default()
        }
    }

    /// Counts one slot allocation; whether it fails.
    pub(super) fn slot_alloc(&mut self) -> bool {
        let k = next(&mut self.slot_allocs);
        self.faults.contains(&Fault::SlotAlloc(k))
    }

    /// Counts one upload; whether it fails.
    pub(super) fn upload(&mut self) -> bool {
        let k = next(&mut self.uploads);
        self.faults.contains(&Fault::Upload(k))
    }

    /// Counts one host buffer allocation; whether it fails.
    pub(super) fn host_alloc(&mut self) -> bool {
        let k = next(&mut self.host_allocs);
        self.faults.contains(&Fault::HostAlloc(k))
    }

    /// Counts one block that `restore` copies back; whether it fails.
    pub(super) fn restore(&mut self) -> bool {
        let k = next(&mut self.restored_blocks);
        self.faults.contains(&Fault::Restore(k))
    }
}

/// Without the `testing` feature: nothing is counted and nothing fails.
#[cfg(not(feature = "testing"))]
#[derive(Debug, Default)]
pub(super) struct FaultInjector;

#[cfg(not(feature = "testing"))]
impl FaultInjector {
    pub(super) fn new(_: &OffloadConfig) -> FaultInjector {
        FaultInjector
    }

    pub(super) fn slot_alloc(&mut self) -> bool {
        false
    }

    pub(super) fn upload(&mut self) -> bool {
        false
    }

    pub(super) fn host_alloc(&mut self) -> bool {
        false
    }

    pub(super) fn restore(&mut self) -> bool {
        false
    }
}
