//! The manifest of a shared-memory host store: a JSON document (as the header of a
//! safetensors file) that says where each block sits in the store's file and how its tensors
//! are laid out in it. Written by the publishing process, parsed and validated by every reader
//! with checked arithmetic before any byte of the file is viewed as a tensor: every span lies
//! inside the file or its block, no two blocks and no two tensors of a block overlap, every
//! tensor's bytes are exactly its dense shape's, names are unique.
//!
//! ```json
//! {"format": "layerwise-offload host store", "version": 4, "bytes": 8192,
//!  "layers": [{"attr": "blocks", "index": 0, "offset": 0, "bytes": 1024, "encoding": null,
//!              "tensors": [{"name": "blocks.0.w", "dtype": "Float", "offset": 0,
//!                           "bytes": 1024, "shape": [16, 16], "strides": [16, 1]}]}]}
//! ```
//! A block without a host copy (kept resident by its publisher) has `"offset": null`. A block
//! held encoded (compressed transport) has `"encoding": {"bytes": 700, "codec_version": 3}`:
//! its span in the file is its encoding's `bytes`, which decodes to the block's `bytes`
//! (`null` for a raw block). An encoding is a segmented one (`layerwise_offload_codec::segments`)
//! since version 4: a store of version 3 (whole encodings) is refused by its version.

use crate::plan::{ALIGN, BlockLayout, TensorLayout, is_dense};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use tch::Kind;

/// The `format` field.
const FORMAT: &str = "layerwise-offload host store";
/// The `version` field this crate writes and reads (3: blocks may be encoded; 4: encodings are
/// segmented).
const VERSION: u32 = 4;
/// Alignment of each block inside the file.
pub(crate) const FILE_ALIGN: usize = 4096;
/// Most dimensions a tensor may have.
const MAX_DIMS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorEntry {
    name: String,
    dtype: String,
    offset: u64,
    bytes: u64,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// A block held encoded: its encoding's length and the codec's format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncodingEntry {
    bytes: u64,
    codec_version: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockEntry {
    attr: String,
    index: u64,
    /// Where the block sits in the file; `None` for a block the store holds no copy of.
    offset: Option<u64>,
    bytes: u64,
    /// The block is held encoded; `None` for a raw block.
    encoding: Option<EncodingEntry>,
    tensors: Vec<TensorEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    format: String,
    version: u32,
    bytes: u64,
    #[serde(rename = "layers")]
    blocks: Vec<BlockEntry>,
}

/// A validated manifest: the file's size and, per block in loop order, its layout and where
/// its copy sits in the file (if the store holds one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    /// Size of the store's file in bytes.
    pub(crate) bytes: usize,
    /// Per block: its layout and the offset of its copy in the file.
    pub(crate) blocks: Vec<(BlockLayout, Option<usize>)>,
    /// Per block: the length of its encoding, for a block held encoded (its span in the file).
    pub(crate) encoded: Vec<Option<usize>>,
}

/// Why a manifest is refused (the caller adds the path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid(pub(crate) String);

fn invalid<T>(message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(message.into()))
}

/// The element type named as `format!("{kind:?}")` writes it.
fn kind_from_name(name: &str) -> Option<Kind> {
    use Kind::*;
    [
        Uint8,
        Int8,
        Int16,
        Int,
        Int64,
        Half,
        Float,
        Double,
        ComplexHalf,
        ComplexFloat,
        ComplexDouble,
        Bool,
        QInt8,
        QUInt8,
        QInt32,
        BFloat16,
        Float8e5m2,
        Float8e4m3fn,
        Float8e5m2fnuz,
        Float8e4m3fnuz,
    ]
    .into_iter()
    .find(|k| format!("{k:?}") == name)
}

impl Manifest {
    /// The manifest of blocks `blocks`, block `i` at `offsets[i]` of a `bytes`-byte file (or
    /// nowhere).
    pub(crate) fn new(bytes: usize, blocks: Vec<(BlockLayout, Option<usize>)>) -> Manifest {
        let encoded = vec![None; blocks.len()];
        Manifest {
            bytes,
            blocks,
            encoded,
        }
    }

    /// The same manifest with block `i` held as an encoding of `encoded[i]` bytes (where Some).
    pub(crate) fn with_encoded(mut self, encoded: Vec<Option<usize>>) -> Manifest {
        assert_eq!(encoded.len(), self.blocks.len());
        self.encoded = encoded;
        self
    }

    /// The JSON text.
    pub(crate) fn to_json(&self) -> String {
        let doc = Document {
            format: FORMAT.into(),
            version: VERSION,
            bytes: self.bytes as u64,
            blocks: self
                .blocks
                .iter()
                .zip(&self.encoded)
                .map(|((l, offset), enc)| BlockEntry {
                    attr: l.attr.clone(),
                    index: l.index as u64,
                    offset: offset.map(|o| o as u64),
                    bytes: l.bytes as u64,
                    encoding: enc.map(|e| EncodingEntry {
                        bytes: e as u64,
                        codec_version: layerwise_offload_codec::format::VERSION,
                    }),
                    tensors: l
                        .tensors
                        .iter()
                        .map(|t| TensorEntry {
                            name: t.name.clone(),
                            dtype: format!("{:?}", t.kind),
                            offset: t.offset as u64,
                            bytes: t.bytes as u64,
                            shape: t.shape.clone(),
                            strides: t.strides.clone(),
                        })
                        .collect(),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&doc).expect("a manifest always serializes")
    }

    /// Parses and validates a manifest.
    pub(crate) fn parse(text: &[u8]) -> Result<Manifest, Invalid> {
        let doc: Document = match serde_json::from_slice(text) {
            Ok(d) => d,
            Err(e) => return invalid(format!("is not a host store manifest ({e})")),
        };
        if doc.format != FORMAT || doc.version != VERSION {
            return invalid(format!(
                "is {:?} version {}, not {FORMAT:?} version {VERSION}; publish and open with the same version of this crate",
                doc.format, doc.version
            ));
        }
        let total = match usize::try_from(doc.bytes) {
            Ok(t) if t <= i64::MAX as usize => t,
            _ => return invalid(format!("gives a file size of {} bytes", doc.bytes)),
        };
        let mut names = HashSet::new();
        let mut blocks = HashSet::new();
        let mut attrs: Vec<String> = Vec::new();
        let mut spans: Vec<(usize, usize, usize)> = Vec::new(); // (start, end, block)
        let mut parsed = Vec::with_capacity(doc.blocks.len());
        let mut encoded = Vec::with_capacity(doc.blocks.len());
        for (i, l) in doc.blocks.into_iter().enumerate() {
            let at = |what: String| Invalid(format!("block {i} ({}.{}): {what}", l.attr, l.index));
            if l.attr.is_empty() {
                return Err(at("an empty attribute".into()));
            }
            let index = usize::try_from(l.index).map_err(|_| at("index too large".into()))?;
            if !blocks.insert((l.attr.clone(), index)) {
                return Err(at("appears twice".into()));
            }
            let bytes = usize::try_from(l.bytes)
                .ok()
                .filter(|&b| b > 0 && b <= i64::MAX as usize)
                .ok_or_else(|| at(format!("a size of {} bytes", l.bytes)))?;
            let enc = match &l.encoding {
                None => None,
                Some(e) if e.codec_version != layerwise_offload_codec::format::VERSION => {
                    return Err(at(format!(
                        "encoded with codec format version {}, this build reads {}; publish and open with the same version of this crate",
                        e.codec_version,
                        layerwise_offload_codec::format::VERSION
                    )));
                }
                Some(e) => Some(
                    usize::try_from(e.bytes)
                        .ok()
                        .filter(|&b| b > 0 && b <= i64::MAX as usize)
                        .ok_or_else(|| at(format!("an encoding of {} bytes", e.bytes)))?,
                ),
            };
            // The block's span in the file: its encoding, or the raw block.
            let span = enc.unwrap_or(bytes);
            let offset = match l.offset {
                None => None,
                Some(o) => {
                    let start = usize::try_from(o).ok().filter(|s| s % FILE_ALIGN == 0);
                    let end = start.and_then(|s| s.checked_add(span));
                    match (start, end) {
                        (Some(s), Some(e)) if e <= total => {
                            spans.push((s, e, i));
                            Some(s)
                        }
                        _ => {
                            return Err(at(format!(
                                "bytes {o}..{o}+{span} are not a {FILE_ALIGN}-aligned span of the {total}-byte file"
                            )));
                        }
                    }
                }
            };
            let list = match attrs.iter().position(|a| *a == l.attr) {
                Some(p) => p,
                None => {
                    attrs.push(l.attr.clone());
                    attrs.len() - 1
                }
            };
            let mut tensors = Vec::with_capacity(l.tensors.len());
            let mut tspans: Vec<(usize, usize)> = Vec::new();
            for t in l.tensors {
                let tensor = validate_tensor(&t, bytes)
                    .map_err(|Invalid(why)| at(format!("tensor {:?}: {why}", t.name)))?;
                if !names.insert(t.name.clone()) {
                    return Err(at(format!("tensor {:?} appears twice", t.name)));
                }
                if tensor.bytes > 0 {
                    tspans.push((tensor.offset, tensor.offset + tensor.bytes));
                }
                tensors.push(tensor);
            }
            tspans.sort_unstable();
            if tspans.windows(2).any(|w| w[1].0 < w[0].1) {
                return Err(at("two tensors overlap".into()));
            }
            parsed.push((
                BlockLayout {
                    list,
                    attr: l.attr,
                    index,
                    tensors,
                    bytes,
                },
                offset,
            ));
            encoded.push(enc);
        }
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return invalid(format!(
                "blocks {} and {} overlap in the file",
                w[0].2, w[1].2
            ));
        }
        Ok(Manifest {
            bytes: total,
            blocks: parsed,
            encoded,
        })
    }
}

/// Checks one tensor entry against its block's size.
fn validate_tensor(t: &TensorEntry, block_bytes: usize) -> Result<TensorLayout, Invalid> {
    let Some(kind) = kind_from_name(&t.dtype) else {
        return invalid(format!("unknown dtype {:?}", t.dtype));
    };
    if t.shape.len() != t.strides.len() || t.shape.len() > MAX_DIMS {
        return invalid(format!(
            "shape {:?} and strides {:?} (at most {MAX_DIMS} dimensions, one stride each)",
            t.shape, t.strides
        ));
    }
    if t.shape.iter().chain(&t.strides).any(|&d| d < 0) {
        return invalid(format!(
            "negative shape {:?} or strides {:?}",
            t.shape, t.strides
        ));
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1i64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Invalid(format!("shape {:?} has too many elements", t.shape)))?;
    let want = (numel as u64).checked_mul(kind.elt_size_in_bytes() as u64);
    if want != Some(t.bytes) {
        return invalid(format!(
            "{} bytes, but shape {:?} of {kind:?} needs {}",
            t.bytes,
            t.shape,
            want.map_or("more than 2^64".into(), |w| w.to_string())
        ));
    }
    if !is_dense(&t.shape, &t.strides) {
        return invalid(format!(
            "strides {:?} do not lay shape {:?} out densely",
            t.strides, t.shape
        ));
    }
    let (offset, bytes) = (t.offset as usize, t.bytes as usize);
    let end = usize::try_from(t.offset)
        .ok()
        .filter(|o| o % ALIGN == 0)
        .and_then(|o| o.checked_add(bytes));
    if !matches!(end, Some(e) if e <= block_bytes) {
        return invalid(format!(
            "bytes {}..{}+{} are not a {ALIGN}-aligned span of the {block_bytes}-byte block",
            t.offset, t.offset, t.bytes
        ));
    }
    Ok(TensorLayout {
        name: t.name.clone(),
        offset,
        bytes,
        shape: t.shape.clone(),
        strides: t.strides.clone(),
        kind,
        source_index: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Independent of `parse`: what every accepted manifest must satisfy, in u128 arithmetic.
    fn assert_consistent(m: &Manifest) {
        let mut spans = Vec::new();
        for ((l, offset), enc) in m.blocks.iter().zip(&m.encoded) {
            let span = enc.unwrap_or(l.bytes) as u128;
            if let Some(o) = offset {
                assert!(*o as u128 + span <= m.bytes as u128);
                spans.push((*o as u128, *o as u128 + span));
            }
            for t in &l.tensors {
                assert!(t.offset as u128 + t.bytes as u128 <= l.bytes as u128);
                let numel: u128 = t.shape.iter().map(|&d| d as u128).product();
                assert_eq!(numel * t.kind.elt_size_in_bytes() as u128, t.bytes as u128);
                assert!(t.shape.iter().chain(&t.strides).all(|&d| d >= 0));
            }
        }
        spans.sort_unstable();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
    }

    /// A valid manifest of `blocks` blocks: tensors of the given shapes (contiguous, f32 or
    /// bf16), laid out as the plan and the publisher lay them out.
    fn valid(blocks: Vec<Vec<(Vec<i64>, bool)>>, names: &[String]) -> Manifest {
        let mut laid_out = Vec::new();
        let mut file = 0usize;
        let mut n = 0;
        for (index, tensors) in blocks.into_iter().enumerate() {
            let mut offset = 0;
            let mut out = Vec::new();
            for (shape, bf16) in tensors {
                let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
                let mut strides = vec![1i64; shape.len()];
                for d in (0..shape.len().saturating_sub(1)).rev() {
                    strides[d] = strides[d + 1] * shape[d + 1];
                }
                let bytes = shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes();
                out.push(TensorLayout {
                    name: format!("blocks.{index}.{}", names[n % names.len()]) + &n.to_string(),
                    offset,
                    bytes,
                    shape,
                    strides,
                    kind,
                    source_index: 0,
                });
                n += 1;
                offset = (offset + bytes).div_ceil(ALIGN) * ALIGN;
            }
            let bytes = offset.max(1).div_ceil(ALIGN) * ALIGN;
            let at = (index % 3 != 2).then_some(file); // every third block without a copy
            if at.is_some() {
                file += bytes.div_ceil(FILE_ALIGN) * FILE_ALIGN;
            }
            laid_out.push((
                BlockLayout {
                    list: 0,
                    attr: "blocks".into(),
                    index,
                    tensors: out,
                    bytes,
                },
                at,
            ));
        }
        Manifest::new(file, laid_out)
    }

    fn blocks_strategy() -> impl Strategy<Value = Vec<Vec<(Vec<i64>, bool)>>> {
        prop::collection::vec(
            prop::collection::vec((prop::collection::vec(0i64..9, 0..4), any::<bool>()), 0..4),
            1..5,
        )
    }

    /// Every number in a JSON value, as a path of keys and indices.
    fn number_paths(v: &serde_json::Value, at: Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            serde_json::Value::Number(_) => out.push(at),
            serde_json::Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| {
                let mut p = at.clone();
                p.push(i.to_string());
                number_paths(x, p, out)
            }),
            serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| {
                let mut p = at.clone();
                p.push(k.clone());
                number_paths(x, p, out)
            }),
            _ => {}
        }
    }

    fn at_path<'a>(v: &'a mut serde_json::Value, path: &[String]) -> &'a mut serde_json::Value {
        path.iter().fold(v, |v, k| match v {
            serde_json::Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
            serde_json::Value::Object(o) => o.get_mut(k).unwrap(),
            _ => unreachable!(),
        })
    }

    #[test]
    fn an_encoded_store_round_trips_and_other_codec_versions_are_refused() {
        let m = valid(
            vec![vec![(vec![64, 64], false)], vec![(vec![8], true)]],
            &["w".into()],
        )
        .with_encoded(vec![Some(1000), None]);
        let text = m.to_json();
        let version = layerwise_offload_codec::format::VERSION;
        let current = format!("\"codec_version\": {version}");
        assert!(text.contains(&current), "{text}");
        assert_eq!(Manifest::parse(text.as_bytes()), Ok(m.clone()));
        for old in 1..version {
            let other = text.replace(&current, &format!("\"codec_version\": {old}"));
            let err = Manifest::parse(other.as_bytes()).unwrap_err();
            assert!(
                err.0.contains(&format!("codec format version {old}")),
                "{}",
                err.0
            );
        }
        // An encoding longer than the file holds is refused.
        let long = text.replace("\"bytes\": 1000", "\"bytes\": 1000000000");
        assert!(Manifest::parse(long.as_bytes()).is_err());
        // A store of version 3 (whole encodings) is refused by its version, with what to do.
        let old = text.replace("\"version\": 4", "\"version\": 3");
        assert_ne!(old, text);
        let err = Manifest::parse(old.as_bytes()).unwrap_err();
        assert!(err.0.contains("version 3"), "{}", err.0);
    }

    #[test]
    fn a_published_layout_round_trips() {
        let m = valid(
            vec![
                vec![(vec![16, 16], false), (vec![3], true)],
                vec![(vec![], false)],
            ],
            &["a b\nlayer x".into(), "\"q\"".into()],
        );
        assert_eq!(Manifest::parse(m.to_json().as_bytes()), Ok(m));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = Manifest::parse(&bytes) {
                assert_consistent(&m);
            }
        }

        #[test]
        fn valid_manifests_round_trip(
            blocks in blocks_strategy(),
            names in prop::collection::vec(".*", 1..4),
        ) {
            let m = valid(blocks, &names);
            assert_consistent(&m);
            prop_assert_eq!(Manifest::parse(m.to_json().as_bytes()), Ok(m));
        }

        #[test]
        fn mutated_bytes_parse_to_something_valid_or_fail(
            blocks in blocks_strategy(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut text = valid(blocks, &["w".into()]).to_json().into_bytes();
            for (at, byte) in edits {
                let i = at.index(text.len());
                text[i] = byte;
            }
            if let Ok(m) = Manifest::parse(&text) {
                assert_consistent(&m);
            }
        }

        #[test]
        fn mutated_numbers_parse_to_something_valid_or_fail(
            blocks in blocks_strategy(),
            which in any::<prop::sample::Index>(),
            value in prop_oneof![
                any::<u64>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                (0u64..10_000).prop_map(serde_json::Value::from),
                Just(serde_json::Value::from(u64::MAX)),
                Just(serde_json::Value::from(i64::MAX)),
                Just(serde_json::Value::Null),
                Just(serde_json::Value::from(1.5)),
            ],
        ) {
            let m = valid(blocks, &["w".into()]);
            let mut doc: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
            let mut paths = Vec::new();
            number_paths(&doc, Vec::new(), &mut paths);
            let path = &paths[which.index(paths.len())];
            *at_path(&mut doc, path) = value;
            if let Ok(m) = Manifest::parse(doc.to_string().as_bytes()) {
                assert_consistent(&m);
            }
        }
    }
}
