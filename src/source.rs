//! Where weights come from: anything that can list its named tensors as shared handles.

use crate::error::{Context as _, Result};
use tch::Tensor;

/// A model whose weights the manager can take over: it lists `(name, tensor)` pairs whose
/// tensors share their storage with the model (tch's `shallow_clone`), so that re-pointing a
/// tensor's data re-points the model's.
pub trait WeightSource {
    /// The named tensors, in a stable order.
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>>;
}

impl WeightSource for tch::nn::VarStore {
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = self.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }
}

impl WeightSource for tch::CModule {
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_parameters().context("CModule::named_parameters")
    }
}

impl WeightSource for [(String, Tensor)] {
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect())
    }
}

impl WeightSource for Vec<(String, Tensor)> {
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.as_slice().named_tensors()
    }
}
