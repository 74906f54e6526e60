//! Matching a model's tensors with a checkpoint's, by name: every difference is collected, so
//! that one error says everything that has to change.

use super::{Checkpoint, CheckpointTensor};
use crate::error::{Error, Result};
use std::fmt;
use tch::Kind;

/// A tensor whose shape differs between the model and the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeDifference {
    /// The model's name.
    pub name: String,
    /// Its shape in the model.
    pub model: Vec<i64>,
    /// Its shape in the checkpoint.
    pub checkpoint: Vec<i64>,
}

/// A tensor whose element type differs between the model and the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtypeDifference {
    /// The model's name.
    pub name: String,
    /// Its element type in the model.
    pub model: Kind,
    /// Its element type in the checkpoint, as safetensors spells it.
    pub checkpoint: String,
}

/// Every difference between a model's tensors and a checkpoint's
/// ([`Error::CheckpointMismatch`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointMismatch {
    /// The checkpoint.
    pub path: std::path::PathBuf,
    /// Model tensors the checkpoint does not have.
    pub missing: Vec<String>,
    /// Checkpoint tensors the model does not have (refused unless
    /// [`OffloadConfig::allow_unexpected`](crate::OffloadConfig::allow_unexpected)).
    pub unexpected: Vec<String>,
    /// Tensors of another shape.
    pub shape: Vec<ShapeDifference>,
    /// Tensors of another element type: refused unless both are floating-point types and
    /// [`OffloadConfig::convert_dtypes`](crate::OffloadConfig::convert_dtypes) is on (an
    /// integer, boolean or 8-bit float tensor where the model has another type is always
    /// refused).
    pub dtype: Vec<DtypeDifference>,
}

impl CheckpointMismatch {
    fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.shape.is_empty()
            && self.dtype.is_empty()
    }
}

/// The first few items of a list, and how many more there are.
fn some<T>(items: &[T], show: impl Fn(&T) -> String) -> String {
    const SHOWN: usize = 8;
    let mut s: Vec<String> = items.iter().take(SHOWN).map(show).collect();
    if items.len() > SHOWN {
        s.push(format!("and {} more", items.len() - SHOWN));
    }
    s.join(", ")
}

impl fmt::Display for CheckpointMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the model and checkpoint {} do not match:",
            self.path.display()
        )?;
        if !self.missing.is_empty() {
            write!(
                f,
                " {} model tensors are not in the checkpoint ({});",
                self.missing.len(),
                some(&self.missing, |n| format!("{n:?}"))
            )?;
        }
        if !self.unexpected.is_empty() {
            write!(
                f,
                " {} checkpoint tensors are not in the model ({}; leave them out with allow_unexpected(true) or Checkpoint::rename);",
                self.unexpected.len(),
                some(&self.unexpected, |n| format!("{n:?}"))
            )?;
        }
        if !self.shape.is_empty() {
            write!(
                f,
                " {} shapes differ ({});",
                self.shape.len(),
                some(&self.shape, |d| format!(
                    "{:?}: model {:?}, checkpoint {:?}",
                    d.name, d.model, d.checkpoint
                ))
            )?;
        }
        if !self.dtype.is_empty() {
            write!(
                f,
                " {} element types differ ({}; convert on load with convert_dtypes(true));",
                self.dtype.len(),
                some(&self.dtype, |d| format!(
                    "{:?}: model {:?}, checkpoint {}",
                    d.name, d.model, d.checkpoint
                ))
            )?;
        }
        write!(
            f,
            " a prefix or naming scheme that differs is fixed with Checkpoint::strip_prefix or Checkpoint::rename"
        )
    }
}

/// Whether `k` is a floating-point type (the types `convert_dtypes` converts between).
fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

/// The checkpoint tensor of each model tensor (`model[i]` is `(name, shape, kind)`), in the
/// model's order; every difference at once as [`Error::CheckpointMismatch`]. A dtype
/// difference between floating-point types is allowed with `convert`; checkpoint
/// tensors the model lacks are allowed with `allow_unexpected`.
pub(crate) fn match_tensors<'c>(
    ckpt: &'c Checkpoint,
    model: &[(&str, Vec<i64>, Kind)],
    allow_unexpected: bool,
    convert: bool,
) -> Result<Vec<&'c CheckpointTensor>> {
    let mut m = CheckpointMismatch {
        path: ckpt.path().to_owned(),
        ..CheckpointMismatch::default()
    };
    let mut found = Vec::with_capacity(model.len());
    for (name, shape, kind) in model {
        let Some(t) = ckpt.get(name) else {
            m.missing.push((*name).to_owned());
            continue;
        };
        if &t.shape != shape {
            m.shape.push(ShapeDifference {
                name: (*name).to_owned(),
                model: shape.clone(),
                checkpoint: t.shape.clone(),
            });
        }
        let convertible = t.kind.is_some_and(|k| is_float(k) && is_float(*kind));
        if t.kind != Some(*kind) && !(convert && convertible) {
            m.dtype.push(DtypeDifference {
                name: (*name).to_owned(),
                model: *kind,
                checkpoint: t.dtype.clone(),
            });
        }
        found.push(t);
    }
    if !allow_unexpected {
        let names: std::collections::HashSet<&str> = model.iter().map(|(n, _, _)| *n).collect();
        m.unexpected = ckpt
            .tensors()
            .keys()
            .filter(|n| !names.contains(n.as_str()))
            .cloned()
            .collect();
    }
    if m.is_empty() {
        Ok(found)
    } else {
        Err(Error::CheckpointMismatch(Box::new(m)))
    }
}
