//! Which tensor belongs to which block, and the byte layout of each block's buffer.

use crate::error::{Error, Result};
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use tch::{Device, Kind, Tensor};

/// Alignment of every tensor inside a block buffer, in bytes.
pub const ALIGN: usize = 256;

/// Rounds `n` up to a multiple of [`ALIGN`].
pub(crate) fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// One offloaded tensor: its name and where its bytes sit in its block's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    /// The tensor's full name (e.g. `blocks.3.attn.qkv.weight`).
    pub name: String,
    /// Byte offset in the block buffer (a multiple of [`ALIGN`]).
    pub offset: usize,
    /// Bytes of data (`numel * element size`).
    pub bytes: usize,
    /// Shape.
    pub shape: Vec<i64>,
    /// Strides in elements, as the original tensor had them (kept so outputs stay bit-identical).
    pub strides: Vec<i64>,
    /// Element type.
    pub kind: Kind,
    /// Position of the tensor in the source's list of named tensors.
    pub(crate) source_index: usize,
}

/// One block: its list, its index in that list, and its tensors' layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Index of the block list (in the order the lists were configured).
    pub list: usize,
    /// The list's attribute name (e.g. `double_blocks`).
    pub attr: String,
    /// Index of the block within its list.
    pub index: usize,
    /// The block's tensors, sorted by name.
    pub tensors: Vec<TensorLayout>,
    /// Size of the block's buffer in bytes (a multiple of [`ALIGN`]).
    pub bytes: usize,
}

/// The layout of every offloaded block, in loop order (list by list, index by index).
///
/// A tensor belongs to block `i` of list `attr` when its name matches
/// `(^|\.)<attr>\.(\d+)(\.|$)` with `i < num_blocks` (FastVideo's rule). Each block's tensors are
/// laid out back to back in one buffer at [`ALIGN`]-byte aligned offsets, sorted by name, so one
/// copy moves a whole block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Blocks in loop order.
    pub blocks: Vec<BlockLayout>,
    /// Positions (in the source's list) of the tensors that stay on the compute device.
    pub(crate) non_block: Vec<usize>,
}

impl Plan {
    /// The largest block buffer in bytes (the size of one GPU slot).
    pub fn max_block_bytes(&self) -> usize {
        self.blocks.iter().map(|l| l.bytes).max().unwrap_or(0)
    }

    /// Bytes of all block buffers together.
    pub fn total_bytes(&self) -> usize {
        self.blocks.iter().map(|l| l.bytes).sum()
    }
}

/// The regex that finds block `i` of list `attr` in a tensor name.
pub(crate) fn block_regex(attr: &str) -> Regex {
    Regex::new(&format!(r"(^|\.){}\.(\d+)(\.|$)", regex::escape(attr)))
        .expect("escaped attr makes a valid regex")
}

/// Whether a tensor with these sizes and strides covers exactly `numel` consecutive elements
/// (contiguous up to a permutation of its dimensions), so its bytes can be moved as one span.
pub(crate) fn is_dense(shape: &[i64], strides: &[i64]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut dims: Vec<(i64, i64)> = shape
        .iter()
        .zip(strides)
        .filter(|(s, _)| **s > 1)
        .map(|(s, st)| (*st, *s))
        .collect();
    dims.sort_unstable();
    let mut expected = 1i64;
    for (stride, size) in dims {
        if stride != expected {
            return false;
        }
        expected *= size;
    }
    true
}

/// The distinct paths in front of a numeric component ("blocks" for "blocks.0.attn.weight"),
/// or the first component where none has one: what a user may have meant by `module_list_attr`.
pub(crate) fn candidate_prefixes<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out = BTreeSet::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        match parts
            .iter()
            .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            Some(i) if i > 0 => out.insert(parts[..i].join(".")),
            _ => out.insert(parts[0].to_owned()),
        };
    }
    out.into_iter().collect()
}

/// The number of blocks of list `attr` among `names`: one more than the largest index `i` of a
/// name matching `(^|\.)<attr>\.(\d+)(\.|$)`. Gaps in the indices are left to the plan (an
/// [`Error::MissingBlocks`] naming them). No name matching is [`Error::NoMatch`], listing the
/// prefixes that do exist.
pub fn count_blocks<'a>(
    names: impl IntoIterator<Item = &'a str> + Clone,
    attr: &str,
) -> Result<usize> {
    let re = block_regex(attr);
    let max = names
        .clone()
        .into_iter()
        .filter_map(|n| re.captures(n).and_then(|c| c[2].parse::<usize>().ok()))
        .max();
    match max {
        Some(m) => Ok(m + 1),
        None => Err(Error::NoMatch {
            attr: attr.to_owned(),
            prefixes: candidate_prefixes(names.into_iter()),
        }),
    }
}

/// Builds the plan for `tensors` (name, tensor) and the lists `(attr, num_blocks)`.
///
/// `allowed` are the devices tensors may be on (the compute device and the CPU).
pub(crate) fn build(
    tensors: &[(String, Tensor)],
    lists: &[(String, usize)],
    allowed: &[Device],
) -> Result<Plan> {
    if lists.is_empty() {
        return Err(Error::InvalidArgument {
            op: "initialize",
            message: "no block list configured".into(),
        });
    }
    let mut seen_attrs = BTreeSet::new();
    for (attr, _) in lists {
        if attr.is_empty() || !seen_attrs.insert(attr.as_str()) {
            return Err(Error::InvalidArgument {
                op: "initialize",
                message: format!("module_list_attr {attr:?} is empty or given twice"),
            });
        }
    }
    // Devices: only the compute device and the CPU.
    let mut odd: Vec<(String, Device)> = Vec::new();
    for (name, t) in tensors {
        let d = t.device();
        if !allowed.contains(&d) {
            odd.push((name.clone(), d));
        }
    }
    if !odd.is_empty() {
        return Err(Error::MixedDevices {
            allowed: allowed.to_vec(),
            found: odd.into_iter().take(8).collect(),
        });
    }

    let mut owner: Vec<Option<(usize, usize)>> = vec![None; tensors.len()];
    let mut blocks = Vec::new();
    for (li, (attr, num_blocks)) in lists.iter().enumerate() {
        let re = block_regex(attr);
        let mut by_index: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (ti, (name, _)) in tensors.iter().enumerate() {
            let Some(c) = re.captures(name) else { continue };
            let Ok(idx) = c[2].parse::<usize>() else {
                continue;
            };
            if idx >= *num_blocks {
                continue;
            }
            if let Some((other, _)) = owner[ti] {
                return Err(Error::InvalidArgument {
                    op: "initialize",
                    message: format!(
                        "{name:?} matches both block lists {:?} and {attr:?}",
                        lists[other].0
                    ),
                });
            }
            owner[ti] = Some((li, idx));
            by_index.entry(idx).or_default().push(ti);
        }
        let found_any = tensors.iter().any(|(n, _)| re.is_match(n));
        if !found_any {
            return Err(Error::NoMatch {
                attr: attr.clone(),
                prefixes: candidate_prefixes(tensors.iter().map(|(n, _)| n.as_str())),
            });
        }
        let found = tensors
            .iter()
            .filter_map(|(n, _)| re.captures(n).and_then(|c| c[2].parse::<usize>().ok()))
            .max()
            .map_or(0, |m| m + 1);
        if *num_blocks > found {
            return Err(Error::TooFewBlocks {
                attr: attr.clone(),
                asked: *num_blocks,
                found,
            });
        }
        let missing: Vec<usize> = (0..*num_blocks)
            .filter(|i| !by_index.contains_key(i))
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingBlocks {
                attr: attr.clone(),
                missing,
            });
        }
        for (idx, mut members) in by_index {
            members.sort_by(|a, b| tensors[*a].0.cmp(&tensors[*b].0));
            let mut offset = 0usize;
            let mut out = Vec::with_capacity(members.len());
            for ti in members {
                let (name, t) = &tensors[ti];
                let shape = t.size();
                let strides = t.stride();
                if !is_dense(&shape, &strides) {
                    return Err(Error::NonContiguous {
                        name: name.clone(),
                        shape,
                        strides,
                    });
                }
                let kind = t.kind();
                let bytes = t.numel() * kind.elt_size_in_bytes();
                out.push(TensorLayout {
                    name: name.clone(),
                    offset,
                    bytes,
                    shape,
                    strides,
                    kind,
                    source_index: ti,
                });
                offset = align_up(offset + bytes);
            }
            blocks.push(BlockLayout {
                list: li,
                attr: attr.clone(),
                index: idx,
                tensors: out,
                bytes: align_up(offset.max(1)),
            });
        }
    }
    let non_block = (0..tensors.len()).filter(|i| owner[*i].is_none()).collect();
    Ok(Plan { blocks, non_block })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_follows_fastvideos_rule() {
        let re = block_regex("blocks");
        for (name, idx) in [
            ("blocks.0.attn.weight", Some("0")),
            ("model.blocks.12.norm.bias", Some("12")),
            ("blocks.3", Some("3")),
            ("single_blocks.0.weight", None),
            ("blocksx.0.weight", None),
            ("blocks.a.weight", None),
        ] {
            assert_eq!(
                re.captures(name).map(|c| c[2].to_owned()).as_deref(),
                idx,
                "{name}"
            );
        }
        // Dots in the attribute are literal.
        assert!(!block_regex("a.b").is_match("axb.0.w"));
        assert!(block_regex("a.b").is_match("a.b.0.w"));
    }

    #[test]
    fn block_counts_come_from_the_names() {
        let names = [
            "embed.weight",
            "double_blocks.0.w",
            "double_blocks.1.w",
            "single_blocks.0.w",
            "single_blocks.2.b",
            "model.blocks.11.norm.weight",
        ];
        assert_eq!(count_blocks(names, "double_blocks").unwrap(), 2);
        assert_eq!(count_blocks(names, "single_blocks").unwrap(), 3);
        assert_eq!(count_blocks(names, "blocks").unwrap(), 12);
        match count_blocks(names, "layers") {
            Err(Error::NoMatch { attr, prefixes }) => {
                assert_eq!(attr, "layers");
                assert!(
                    prefixes.contains(&"double_blocks".to_owned()),
                    "{prefixes:?}"
                );
            }
            r => panic!("expected NoMatch, got {r:?}"),
        }
    }

    #[test]
    fn density() {
        assert!(is_dense(&[4, 3], &[3, 1]));
        assert!(is_dense(&[4, 3], &[1, 4])); // a transpose
        assert!(is_dense(&[2, 1, 3], &[3, 99, 1])); // size-1 dims may have any stride
        assert!(is_dense(&[], &[]));
        assert!(is_dense(&[0, 5], &[5, 1]));
        assert!(!is_dense(&[4, 3], &[6, 1])); // every other row
        assert!(!is_dense(&[4, 3], &[0, 1])); // expanded
    }

    #[test]
    fn prefixes_name_the_lists_that_exist() {
        let names = [
            "transformer_blocks.0.w",
            "transformer_blocks.1.w",
            "single.3.x",
            "proj_out.weight",
        ];
        assert_eq!(
            candidate_prefixes(names.into_iter()),
            vec!["proj_out", "single", "transformer_blocks"]
        );
    }

    #[test]
    fn tensors_elsewhere_are_refused() {
        let named = vec![(
            "blocks.0.w".to_owned(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        )];
        match build(&named, &[("blocks".into(), 1)], &[Device::Cuda(0)]) {
            Err(Error::MixedDevices { found, .. }) => {
                assert_eq!(found, vec![("blocks.0.w".to_owned(), Device::Cpu)])
            }
            r => panic!("expected MixedDevices, got {r:?}"),
        }
    }

    #[test]
    fn layout_is_aligned_and_sorted() {
        let t = |n: i64, k: Kind| Tensor::zeros([n], (k, Device::Cpu));
        let named = vec![
            ("blocks.0.b".to_owned(), t(3, Kind::BFloat16)),
            ("blocks.0.a".to_owned(), t(5, Kind::Float)),
            ("blocks.1.a".to_owned(), t(100, Kind::Float)),
            ("head".to_owned(), t(1, Kind::Float)),
        ];
        let plan = build(&named, &[("blocks".into(), 2)], &[Device::Cpu]).unwrap();
        let l0 = &plan.blocks[0];
        assert_eq!(
            l0.tensors
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["blocks.0.a", "blocks.0.b"]
        );
        assert_eq!((l0.tensors[0].offset, l0.tensors[0].bytes), (0, 20));
        assert_eq!((l0.tensors[1].offset, l0.tensors[1].bytes), (256, 6));
        assert_eq!(l0.bytes, 512);
        assert_eq!(plan.blocks[1].bytes, 512);
        assert_eq!(plan.max_block_bytes(), 512);
        assert_eq!(plan.non_block, vec![3]);
    }
}
