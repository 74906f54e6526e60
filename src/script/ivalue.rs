//! tch's [`IValue`] to and from libtorch's `c10::IValue`, through torch-sys's `ati_*` C
//! functions. tch converts the same way, but its `to_c`/`from_c` are private to tch; torch-sys's
//! functions are public and build `torch::jit::IValue*` handles that the shim reads directly.
//!
//! Every `ati_*` call reports failure through torch-sys's own thread-local error slot (not the
//! shim's), read and freed by [`ati`] after each call.

use crate::error::{Error, Result, TorchMessage};
use crate::ffi;
use std::ffi::{CStr, CString, c_char, c_int};
use std::ptr::NonNull;
use tch::{Device, IValue, Tensor};
use torch_sys::{C_tensor, CIValue};

const OP: &str = "IValue conversion";

/// How deeply tuples, lists and dicts may nest in an argument or a result: the conversion
/// recurses once per level, and a value nested hundreds deep would overflow the thread's stack
/// (an abort, not an error). Block calls pass a few levels at most.
pub(crate) const MAX_DEPTH: usize = 64;

/// The error for a value nested deeper than [`MAX_DEPTH`].
fn too_deep(what: &str) -> Error {
    Error::InvalidArgument {
        op: OP,
        message: format!(
            "{what} is nested more than {MAX_DEPTH} deep (tuples, lists or dicts inside each other): pass a flatter value"
        ),
    }
}

/// A `torch::jit::IValue*` made by torch-sys (`ati_*`) or returned by the shim; freed once, on
/// drop, with `ati_free`.
#[derive(Debug)]
pub(crate) struct OwnedIValue(NonNull<CIValue>);

impl OwnedIValue {
    /// Takes ownership of `p`, which must be null (then the error is `what` returned null) or a
    /// live `IValue*` that nothing else frees.
    fn new(p: *mut CIValue, what: &str) -> Result<OwnedIValue> {
        NonNull::new(p)
            .map(OwnedIValue)
            .ok_or_else(|| Error::Torch {
                op: OP,
                source: TorchMessage(format!("{what} returned a null IValue")),
            })
    }

    /// Takes ownership of an `IValue*` the shim allocated for the caller.
    pub(crate) fn from_shim(p: *mut CIValue) -> Result<OwnedIValue> {
        OwnedIValue::new(p, "the shim")
    }

    /// The handle, borrowed for a call.
    pub(crate) fn as_ptr(&self) -> *mut CIValue {
        self.0.as_ptr()
    }
}

impl Drop for OwnedIValue {
    fn drop(&mut self) {
        // SAFETY: the pointer is a live IValue* owned by this value alone (see `new`); ati_free
        // is a plain `delete` that cannot throw.
        unsafe { torch_sys::ati_free(self.0.as_ptr()) }
    }
}

/// Calls one torch-sys `ati_*` function and checks torch-sys's error slot:
/// `ati!(ati_tuple(ptrs.as_ptr(), n))` is a `Result` of what the function returns. Callers pass
/// plain values, or pointers to live tensors, IValues, C strings and arrays of the length they
/// give, that outlive the call.
macro_rules! ati {
    ($f:ident($($arg:expr),* $(,)?)) => {
        // SAFETY: torch-sys's ati_* functions catch every C++ exception and report it in the
        // error slot that `ati` reads; the callers keep the pointer contract stated above, and
        // torch-sys copies whatever it keeps (tensor handles, elements, strings).
        ati(|| unsafe { torch_sys::$f($($arg),*) })
    };
}

/// Runs one `ati_*` call and turns torch-sys's thread-local error slot into an `Err`.
fn ati<T>(call: impl FnOnce() -> T) -> Result<T> {
    let v = call();
    // SAFETY: get_and_reset_last_err returns null or a strdup'ed string that this thread now
    // owns; it is copied, then freed once with the C library's free.
    let err = unsafe {
        let p = torch_sys::get_and_reset_last_err();
        if p.is_null() {
            None
        } else {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            ffi::free(p.cast());
            Some(s)
        }
    };
    match err {
        None => Ok(v),
        Some(message) => Err(Error::from_torch(OP, 0, message)),
    }
}

fn len(n: usize) -> Result<c_int> {
    c_int::try_from(n).map_err(|_| Error::InvalidArgument {
        op: OP,
        message: format!("a list or tuple of {n} elements is too long to pass to libtorch"),
    })
}

fn unsupported(what: &str) -> Error {
    Error::InvalidArgument {
        op: OP,
        message: what.to_owned(),
    }
}

/// Builds a libtorch IValue from tch's. Tensors are shared (handles are copied, not data).
/// A value nested deeper than [`MAX_DEPTH`] is an `InvalidArgument` error.
pub(crate) fn to_c(v: &IValue) -> Result<OwnedIValue> {
    to_c_at(v, 0)
}

/// [`to_c`] of a value inside `depth` containers.
fn to_c_at(v: &IValue, depth: usize) -> Result<OwnedIValue> {
    if depth > MAX_DEPTH {
        return Err(too_deep("an argument"));
    }
    let child = |x: &IValue| to_c_at(x, depth + 1);
    // Every branch ends in a fresh IValue* (or an error), owned by `OwnedIValue::new` below.
    let p = match v {
        IValue::None => ati!(ati_none())?,
        IValue::Tensor(t) => ati!(ati_tensor(t.as_ptr() as *mut C_tensor))?,
        IValue::Double(d) => ati!(ati_double(*d))?,
        IValue::Int(i) => ati!(ati_int(*i))?,
        IValue::Bool(b) => ati!(ati_bool(c_int::from(*b)))?,
        IValue::String(s) => {
            let c = CString::new(s.as_str())
                .map_err(|_| unsupported("a string argument contains a NUL byte"))?;
            ati!(ati_string(c.as_ptr()))?
        }
        IValue::Tuple(items) | IValue::GenericList(items) => {
            let owned = items.iter().map(child).collect::<Result<Vec<_>>>()?;
            let ptrs: Vec<*mut CIValue> = owned.iter().map(OwnedIValue::as_ptr).collect();
            let n = len(ptrs.len())?;
            if matches!(v, IValue::Tuple(_)) {
                ati!(ati_tuple(ptrs.as_ptr(), n))?
            } else {
                ati!(ati_generic_list(ptrs.as_ptr(), n))?
            }
        }
        IValue::GenericDict(pairs) => {
            let mut owned = Vec::with_capacity(2 * pairs.len());
            for (k, v) in pairs {
                owned.push(child(k)?);
                owned.push(child(v)?);
            }
            let ptrs: Vec<*mut CIValue> = owned.iter().map(OwnedIValue::as_ptr).collect();
            let n = len(pairs.len())?;
            ati!(ati_generic_dict(ptrs.as_ptr(), n))?
        }
        IValue::IntList(xs) => {
            let n = len(xs.len())?;
            ati!(ati_int_list(xs.as_ptr(), n))?
        }
        IValue::DoubleList(xs) => {
            let n = len(xs.len())?;
            ati!(ati_double_list(xs.as_ptr(), n))?
        }
        IValue::BoolList(xs) => {
            let bytes: Vec<c_char> = xs.iter().map(|&b| b as c_char).collect();
            let n = len(bytes.len())?;
            ati!(ati_bool_list(bytes.as_ptr(), n))?
        }
        IValue::StringList(xs) => {
            let cs = xs
                .iter()
                .map(|s| CString::new(s.as_str()))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| unsupported("a string in a list argument contains a NUL byte"))?;
            let ptrs: Vec<*const c_char> = cs.iter().map(|c| c.as_ptr()).collect();
            let n = len(ptrs.len())?;
            ati!(ati_string_list(ptrs.as_ptr(), n))?
        }
        IValue::TensorList(ts) => {
            let ptrs: Vec<*mut C_tensor> = ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
            let n = len(ptrs.len())?;
            ati!(ati_tensor_list(ptrs.as_ptr(), n))?
        }
        IValue::Device(d) => {
            let code = match *d {
                Device::Cpu => -1,
                Device::Cuda(i) => c_int::try_from(i)
                    .map_err(|_| unsupported("a CUDA device index is out of range"))?,
                Device::Mps => -2,
                Device::Vulkan => -3,
            };
            ati!(ati_device(code))?
        }
        IValue::Object(_) => {
            return Err(unsupported(
                "a TorchScript object (IValue::Object) cannot be passed: tch keeps its handle private",
            ));
        }
        _ => return Err(unsupported("this kind of IValue is not supported")),
    };
    OwnedIValue::new(p, "torch-sys")
}

/// Reads `n` child IValues that `fill` writes into an array, taking ownership of each; they sit
/// inside `depth` containers.
fn children(
    n: c_int,
    depth: usize,
    fill: impl FnOnce(*mut *mut CIValue) -> Result<()>,
) -> Result<Vec<IValue>> {
    let mut raw = vec![std::ptr::null_mut::<CIValue>(); n.max(0) as usize];
    let filled = fill(raw.as_mut_ptr());
    // Own whatever was written, even on error, so that nothing leaks.
    let owned: Vec<Option<OwnedIValue>> = raw
        .into_iter()
        .map(|p| NonNull::new(p).map(OwnedIValue))
        .collect();
    filled?;
    owned
        .into_iter()
        .map(|o| {
            o.ok_or_else(|| unsupported("torch-sys returned a null element"))
                .and_then(|v| from_c_at(v, depth))
        })
        .collect()
}

/// Turns a libtorch IValue into tch's, consuming (freeing) the handle. A value nested deeper
/// than [`MAX_DEPTH`] is an `InvalidArgument` error (the handle is freed all the same).
pub(crate) fn from_c(v: OwnedIValue) -> Result<IValue> {
    from_c_at(v, 0)
}

/// [`from_c`] of a value inside `depth` containers.
fn from_c_at(v: OwnedIValue, depth: usize) -> Result<IValue> {
    if depth > MAX_DEPTH {
        return Err(too_deep("the method's result"));
    }
    let p = v.as_ptr();
    // `p` stays alive (owned by `v`) for the whole function; each output array has exactly the
    // length torch-sys is told.
    let tag = ati!(ati_tag(p))?;
    Ok(match tag {
        0 => IValue::None,
        1 => {
            let t = ati!(ati_to_tensor(p))?;
            if t.is_null() {
                return Err(unsupported("torch-sys returned a null tensor"));
            }
            // SAFETY: `t` is a fresh, non-null at::Tensor* whose ownership passes to the Tensor.
            IValue::Tensor(unsafe { Tensor::from_ptr(t) })
        }
        2 => IValue::Double(ati!(ati_to_double(p))?),
        3 => IValue::Int(ati!(ati_to_int(p))?),
        4 => IValue::Bool(ati!(ati_to_bool(p))? != 0),
        5 => {
            let n = ati!(ati_tuple_length(p))?;
            IValue::Tuple(children(n, depth + 1, |out| ati!(ati_to_tuple(p, out, n)))?)
        }
        6 => {
            let n = ati!(ati_length(p))?;
            let mut xs = vec![0i64; n.max(0) as usize];
            ati!(ati_to_int_list(p, xs.as_mut_ptr(), n))?;
            IValue::IntList(xs)
        }
        7 => {
            let n = ati!(ati_length(p))?;
            let mut xs = vec![0f64; n.max(0) as usize];
            ati!(ati_to_double_list(p, xs.as_mut_ptr(), n))?;
            IValue::DoubleList(xs)
        }
        8 => {
            let n = ati!(ati_length(p))?;
            let mut xs = vec![0 as c_char; n.max(0) as usize];
            ati!(ati_to_bool_list(p, xs.as_mut_ptr(), n))?;
            IValue::BoolList(xs.into_iter().map(|b| b != 0).collect())
        }
        9 => {
            let s = ati!(ati_to_string(p))?;
            if s.is_null() {
                return Err(unsupported("torch-sys returned a null string"));
            }
            // SAFETY: `s` is a strdup'ed NUL-terminated string now owned here; copied, then
            // freed once.
            let text = unsafe {
                let text = CStr::from_ptr(s).to_string_lossy().into_owned();
                ffi::free(s.cast());
                text
            };
            IValue::String(text)
        }
        10 => {
            let n = ati!(ati_length(p))?;
            let mut raw = vec![std::ptr::null_mut::<C_tensor>(); n.max(0) as usize];
            let filled = ati!(ati_to_tensor_list(p, raw.as_mut_ptr(), n));
            let ts: Vec<Option<Tensor>> = raw
                .into_iter()
                // SAFETY: each non-null entry is a fresh at::Tensor* that passes to the Tensor.
                .map(|t| (!t.is_null()).then(|| unsafe { Tensor::from_ptr(t) }))
                .collect();
            filled?;
            IValue::TensorList(
                ts.into_iter()
                    .map(|t| t.ok_or_else(|| unsupported("torch-sys returned a null tensor")))
                    .collect::<Result<_>>()?,
            )
        }
        12 => {
            let n = ati!(ati_length(p))?;
            IValue::GenericList(children(n, depth + 1, |out| {
                ati!(ati_to_generic_list(p, out, n))
            })?)
        }
        13 => {
            let n = ati!(ati_length(p))?;
            let flat = children(n.saturating_mul(2), depth + 1, |out| {
                ati!(ati_to_generic_dict(p, out, n))
            })?;
            let mut it = flat.into_iter();
            let mut pairs = Vec::with_capacity(n.max(0) as usize);
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            IValue::GenericDict(pairs)
        }
        14 => {
            return Err(unsupported(
                "the method returned a TorchScript object; tch's IValue::Object can only be made inside tch, so return tensors, tuples or lists instead",
            ));
        }
        other => {
            return Err(unsupported(&format!(
                "unknown IValue tag {other} from torch-sys"
            )));
        }
    })
}
