//! Which model tensors a live manager has offloaded, process-wide.
//!
//! After `initialize()`, a block tensor is an empty placeholder and its value lives in the
//! manager's host copy. A second manager over the same model would plan from those
//! placeholders and, when dropped, point the weights at its own empty copies. So each manager
//! claims its block tensors (by `TensorImpl`, which every handle of a tensor shares) from
//! `initialize()` until `restore()` or drop, and a claim on a tensor another manager holds is
//! refused with [`Error::AlreadyOffloaded`].

use crate::accel;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

/// Claimed tensor identity -> the claim that holds it.
static CLAIMED: Mutex<BTreeMap<usize, u64>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

fn claimed() -> std::sync::MutexGuard<'static, BTreeMap<usize, u64>> {
    // Every update is one step under the lock: a panic elsewhere leaves the map consistent.
    CLAIMED.lock().unwrap_or_else(|e| e.into_inner())
}

/// One manager's claim on its block tensors; released when dropped.
#[derive(Debug)]
pub(crate) struct Claim {
    id: u64,
    /// The claimed tensors, held so that no other tensor can take their identity meanwhile.
    tensors: Vec<(usize, Tensor)>,
}

impl Claim {
    /// Claims every tensor of `tensors` (name, tensor), or none: fails with
    /// [`Error::AlreadyOffloaded`] naming the first one another live manager holds.
    pub(crate) fn take<'a>(
        tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    ) -> Result<Claim> {
        let mut keyed = Vec::new();
        let mut names = Vec::new();
        for (name, t) in tensors {
            keyed.push((accel::tensor_identity(t)?, t.shallow_clone()));
            names.push(name);
        }
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut map = claimed();
        if let Some(k) = keyed.iter().position(|(key, _)| map.contains_key(key)) {
            return Err(Error::AlreadyOffloaded {
                name: names[k].to_owned(),
            });
        }
        for (key, _) in &keyed {
            map.insert(*key, id);
        }
        Ok(Claim { id, tensors: keyed })
    }
}

/// Whether a live manager holds `t` (its value is then in the manager, and `t` itself an empty
/// placeholder or a view of a slot).
pub(crate) fn is_claimed(t: &Tensor) -> Result<bool> {
    let key = accel::tensor_identity(t)?;
    Ok(claimed().contains_key(&key))
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut map = claimed();
        for (key, _) in &self.tensors {
            if map.get(key) == Some(&self.id) {
                map.remove(key);
            }
        }
    }
}
