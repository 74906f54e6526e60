//! The zero-copy layout ([`OffloadConfig::zero_copy`](crate::OffloadConfig::zero_copy)): a
//! block laid out as its runs in the checkpoint's files, so that each run is one piece of the
//! host copy and one copy of an upload.

use crate::checkpoint::CheckpointTensor;
use crate::plan::{ALIGN, BlockLayout};

/// A stretch of a checkpoint file holding consecutive tensors of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) file: usize,
    /// Byte offset in the file.
    pub(super) offset: u64,
    pub(super) bytes: usize,
    /// Byte offset in the block's layout.
    pub(super) at: usize,
}

/// Row-major strides of `shape`.
pub(super) fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1].max(1);
    }
    strides
}

/// Lays block `l` out as its runs in the files (`src` by source index): tensors adjacent in
/// one file stay adjacent, each run starts at an [`ALIGN`] boundary. Returns the runs.
pub(super) fn relayout(l: &mut BlockLayout, src: &[CheckpointTensor]) -> Vec<Run> {
    let mut idx: Vec<usize> = (0..l.tensors.len()).collect();
    idx.sort_by_key(|&j| {
        let c = &src[l.tensors[j].source_index];
        (c.file, c.offset)
    });
    let mut runs: Vec<Run> = Vec::new();
    let mut end = 0usize;
    for j in idx {
        let c = &src[l.tensors[j].source_index];
        match runs.last_mut() {
            Some(r) if r.file == c.file && r.offset + r.bytes as u64 == c.offset => {
                l.tensors[j].offset = r.at + r.bytes;
                r.bytes += c.bytes;
            }
            _ => {
                let at = end.next_multiple_of(ALIGN);
                runs.push(Run {
                    file: c.file,
                    offset: c.offset,
                    bytes: c.bytes,
                    at,
                });
                l.tensors[j].offset = at;
            }
        }
        end = runs.last().map_or(0, |r| r.at + r.bytes);
    }
    l.bytes = end.next_multiple_of(ALIGN).max(ALIGN);
    runs
}

#[cfg(test)]
mod tests {
    use super::{Run, contiguous_strides, relayout};
    use crate::checkpoint::CheckpointTensor;
    use crate::plan::{ALIGN, BlockLayout, TensorLayout};
    use tch::Kind;

    fn ct(file: usize, offset: u64, bytes: usize) -> CheckpointTensor {
        CheckpointTensor {
            stored_name: String::new(),
            file,
            dtype: "BF16".into(),
            kind: Some(Kind::BFloat16),
            shape: vec![(bytes / 2) as i64],
            offset,
            bytes,
        }
    }

    fn tl(name: &str, src: usize, bytes: usize) -> TensorLayout {
        TensorLayout {
            name: name.into(),
            offset: 0,
            bytes,
            shape: vec![(bytes / 2) as i64],
            strides: vec![1],
            kind: Kind::BFloat16,
            source_index: src,
        }
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[5]), vec![1]);
        assert_eq!(contiguous_strides(&[]), Vec::<i64>::new());
    }

    #[test]
    fn adjacent_tensors_make_one_run_and_others_start_aligned() {
        // Tensors 0 and 1 adjacent in file 0 (in the file's order 1 then 0), tensor 2 elsewhere
        // in file 0, tensor 3 in file 1.
        let src = vec![
            ct(0, 1000, 100),
            ct(0, 900, 100),
            ct(0, 5000, 10),
            ct(1, 8, 6),
        ];
        let mut l = BlockLayout {
            list: 0,
            attr: "blocks".into(),
            index: 0,
            tensors: vec![
                tl("a", 0, 100),
                tl("b", 1, 100),
                tl("c", 2, 10),
                tl("d", 3, 6),
            ],
            bytes: 0,
        };
        let runs = relayout(&mut l, &src);
        assert_eq!(
            runs,
            vec![
                Run {
                    file: 0,
                    offset: 900,
                    bytes: 200,
                    at: 0
                },
                Run {
                    file: 0,
                    offset: 5000,
                    bytes: 10,
                    at: ALIGN
                },
                Run {
                    file: 1,
                    offset: 8,
                    bytes: 6,
                    at: 2 * ALIGN
                },
            ]
        );
        let offsets: Vec<usize> = l.tensors.iter().map(|t| t.offset).collect();
        assert_eq!(offsets, vec![100, 0, ALIGN, 2 * ALIGN]);
        assert_eq!(l.bytes, 3 * ALIGN);
        // Every tensor lies inside its run, at the file's relative position.
        for t in &l.tensors {
            let c = &src[t.source_index];
            let r = runs
                .iter()
                .find(|r| r.at <= t.offset && t.offset < r.at + r.bytes.max(1))
                .unwrap();
            assert_eq!(c.offset - r.offset, (t.offset - r.at) as u64);
        }
    }
}
