//! Splitting chunk ranges over scoped threads (std only).

use std::ops::Range;

/// Threads to use for `items` chunks: `requested`, or all available cores for 0, never more
/// than there are chunks and at least 1.
pub(crate) fn threads(requested: usize, items: usize) -> usize {
    let wanted = if requested == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        requested
    };
    wanted.min(items).max(1)
}

/// `items` split into `parts` contiguous ranges of nearly equal length, in order.
pub(crate) fn split(items: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    (0..parts)
        .map(|p| items * p / parts..items * (p + 1) / parts)
        .collect()
}

/// `f` of each work item, one scoped thread per item (the first on the calling thread),
/// results in item order.
pub(crate) fn map_each<W: Send, T: Send>(work: Vec<W>, f: impl Fn(W) -> T + Sync) -> Vec<T> {
    let mut work = work.into_iter();
    let Some(first) = work.next() else {
        return Vec::new();
    };
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = work.map(|w| s.spawn(move || f(w))).collect();
        let mut out = vec![f(first)];
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))),
        );
        out
    })
}
