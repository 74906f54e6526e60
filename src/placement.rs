//! Residency under a VRAM budget: which blocks stay on the compute device for good and which
//! stream through the slot ring. A pure function of the block sizes, the budget and the ring's
//! depth; the manager resolves a budget relative to free device memory before calling it.

use crate::error::{Error, Result};

/// How much device memory the manager may hold for block weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    /// At most this many bytes.
    Bytes(u64),
    /// All but this many bytes of what the device has free at `initialize()`.
    AllBut(u64),
}

/// Marks the blocks (of `sizes` bytes each, in loop order) that stay on the device for good
/// under a budget of `budget` bytes: all of them if everything fits, otherwise as many as fit
/// next to a ring of `prefetch_depth + 1` slots of the largest block, spread evenly through
/// the loop so that uploads proceed while resident blocks compute. No budget: none.
///
/// Fails with [`Error::InvalidArgument`] when the budget cannot hold the ring.
pub(crate) fn resident_blocks(
    sizes: &[u64],
    budget: Option<u64>,
    prefetch_depth: usize,
) -> Result<Vec<bool>> {
    let n = sizes.len();
    let Some(budget) = budget else {
        return Ok(vec![false; n]);
    };
    if sizes.iter().sum::<u64>() <= budget {
        return Ok(vec![true; n]);
    }
    let ring = (prefetch_depth as u64)
        .saturating_add(1)
        .saturating_mul(sizes.iter().copied().max().unwrap_or(0));
    if budget < ring {
        return Err(Error::InvalidArgument {
            op: "vram_budget",
            message: format!(
                "a budget of {budget} bytes cannot hold the slot ring of {ring} bytes ({} slots of the largest block); raise the budget or lower prefetch_depth",
                prefetch_depth + 1
            ),
        });
    }
    let avail = budget - ring;
    for k in (1..n).rev() {
        let picks = spread(n, k);
        if picks.iter().map(|&i| sizes[i]).sum::<u64>() <= avail {
            let mut r = vec![false; n];
            for i in picks {
                r[i] = true;
            }
            return Ok(r);
        }
    }
    Ok(vec![false; n])
}

/// Marks the streamed blocks (of `sizes` bytes each, in loop order) whose host copy fits in a
/// host budget of `budget` bytes: all if they fit, otherwise as many as fit, spread evenly
/// through the loop (the others are read from the checkpoint at each forward, and spreading
/// them lets their reads overlap the uploads of the blocks in memory).
pub(crate) fn host_blocks(sizes: &[u64], budget: u64) -> Vec<bool> {
    let n = sizes.len();
    for k in (1..=n).rev() {
        let picks = spread(n, k);
        if picks.iter().map(|&i| sizes[i]).sum::<u64>() <= budget {
            let mut r = vec![false; n];
            for i in picks {
                r[i] = true;
            }
            return r;
        }
    }
    vec![false; n]
}

/// `k` of `n` positions spread evenly (the middle of each of `k` equal stretches).
fn spread(n: usize, k: usize) -> Vec<usize> {
    (0..k)
        .map(|j| ((2 * j + 1) * n / (2 * k)).min(n - 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{host_blocks, resident_blocks, spread};
    use crate::error::Error;

    #[test]
    fn host_blocks_fill_the_budget_evenly() {
        let sizes = vec![10u64; 40];
        assert_eq!(host_blocks(&sizes, 400), vec![true; 40]);
        assert_eq!(host_blocks(&sizes, 9), vec![false; 40]);
        let half = host_blocks(&sizes, 200);
        assert_eq!(half.iter().filter(|h| **h).count(), 20);
        // Alternating: no two disk-tier blocks in a row.
        assert!(half.windows(2).all(|w| w[0] || w[1]));
        let some = host_blocks(&sizes, 105);
        assert_eq!(some.iter().filter(|h| **h).count(), 10);
        // Unequal sizes: what is kept fits.
        let sizes: Vec<u64> = (1..=12).collect();
        for budget in 0..80 {
            let kept: u64 = host_blocks(&sizes, budget)
                .iter()
                .zip(&sizes)
                .filter(|(h, _)| **h)
                .map(|(_, s)| s)
                .sum();
            assert!(kept <= budget);
        }
    }

    #[test]
    fn spread_is_even_and_distinct() {
        assert_eq!(
            spread(40, 20),
            (0..20).map(|j| 2 * j + 1).collect::<Vec<_>>()
        );
        assert_eq!(spread(10, 2), vec![2, 7]);
        assert_eq!(spread(5, 4), vec![0, 1, 3, 4]);
        for n in 1..50 {
            for k in 1..=n {
                let v = spread(n, k);
                assert!(v.windows(2).all(|w| w[0] < w[1]), "{n} {k} {v:?}");
                assert!(*v.last().unwrap() < n);
            }
        }
    }

    #[test]
    fn no_budget_streams_everything() {
        assert_eq!(resident_blocks(&[10; 4], None, 1).unwrap(), vec![false; 4]);
    }

    #[test]
    fn a_budget_that_holds_everything_keeps_everything() {
        assert_eq!(
            resident_blocks(&[10; 4], Some(40), 1).unwrap(),
            vec![true; 4]
        );
    }

    #[test]
    fn a_budget_below_the_ring_is_refused() {
        let e = resident_blocks(&[10; 4], Some(19), 1).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    op: "vram_budget",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn resident_blocks_fit_next_to_the_ring_and_spread() {
        // Ring of 2 slots = 20 bytes, 20 left: two of ten blocks, spread evenly.
        let r = resident_blocks(&[10; 10], Some(40), 1).unwrap();
        let picked: Vec<usize> = (0..10).filter(|&i| r[i]).collect();
        assert_eq!(picked, vec![2, 7]);
        // Exactly the ring: nothing resident.
        assert_eq!(
            resident_blocks(&[10; 10], Some(20), 1).unwrap(),
            vec![false; 10]
        );
        // Every budget keeps the ring plus the resident blocks within it.
        let sizes = [7u64, 13, 5, 9, 11, 3];
        for budget in 26..48 {
            let r = resident_blocks(&sizes, Some(budget), 1).unwrap();
            let kept: u64 = (0..6).filter(|&i| r[i]).map(|i| sizes[i]).sum();
            assert!(kept + 26 <= budget, "{budget}: {r:?}");
        }
    }
}
