//! TorchScript modules from Rust: [`ScriptModule`] and its method signatures.

mod ivalue;
mod optimize;
mod schema;

pub use optimize::{
    GraphOptimizationsGuard, graph_optimizations, set_graph_optimizations, with_graph_optimizations,
};
pub use schema::{Arg, MethodSchema};

use crate::accel::check;
use crate::error::{Error, Result, TorchMessage};
use crate::ffi;
use crate::source::WeightSource;
use ivalue::OwnedIValue;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::NonNull;
use tch::{Device, IValue, Tensor};
use torch_sys::CIValue;

/// A TorchScript module (or one of its submodules: a handle that shares the parent's state).
///
/// Load a scripted or traced module, reach its submodules by path (`blocks.3`,
/// `patch_embed`), call any of their methods with [`IValue`] arguments (positional or by name)
/// and read their signatures, and list parameters and buffers so the manager can take them
/// over. tch's `CModule` offers no submodules, buffers or signatures;
/// this wraps libtorch's `torch::jit::Module` directly.
///
/// Real exports are traced: `torch.jit.trace` orders (and names) a traced submodule's
/// arguments by first use, so a block declared `forward(hidden_states, encoder_hidden_states,
/// temb, rotary_emb)` may take them in another order. Read the order with
/// [`ScriptModule::method_schema`] or, better, pass arguments by name with
/// [`ScriptModule::call_named`]:
///
/// ```
/// # fn main() -> layerwise_offload::Result<()> {
/// use layerwise_offload::ScriptModule;
/// use tch::{IValue, Kind, Tensor};
/// let t = |shape: &[i64]| IValue::Tensor(Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)));
/// // Written by scripts/export_diffusers_block.py: diffusers' Wan blocks, traced one by one.
/// let blocks = ScriptModule::load("tests/fixtures/wan_blocks/wan_blocks_per_block.pt", tch::Device::Cpu)?;
/// let block = blocks.submodule("blocks.0")?;
/// // forward(hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
/// //         rotary_emb: Tuple[Tensor, Tensor]) -> Tensor
/// println!("{}", block.method_schema("forward")?);
/// let out = block.call_named(
///     "forward",
///     &[
///         ("temb", t(&[1, 6, 32])),
///         ("hidden_states", t(&[1, 32, 32])),
///         ("encoder_hidden_states", t(&[1, 8, 32])),
///         ("rotary_emb", IValue::Tuple(vec![t(&[1, 32, 1, 16]), t(&[1, 32, 1, 16])])),
///     ],
/// )?;
/// let h = Tensor::try_from(out)?; // tch's conversion error becomes this crate's Error
/// # let _ = h; Ok(()) }
/// ```
///
/// # `tch::CModule`
///
/// There is no conversion to or from tch's [`tch::CModule`]: tch 0.24 keeps the module pointer
/// of a `CModule` private (`pub(super)`) and has no constructor from one, so a `ScriptModule`
/// cannot share a `CModule`'s module, and copying through `save`/`load` would give the manager
/// weights the `CModule` does not use. Load the file with [`ScriptModule::load`] instead (the
/// same `torch.jit.save` files), or hand the `CModule` itself to the manager: it is a
/// [`WeightSource`] of its parameters (it cannot list buffers). Values move freely between the
/// two: both take and return tch's [`IValue`].
#[derive(Debug)]
pub struct ScriptModule {
    ptr: NonNull<c_void>,
}

// SAFETY: a torch::jit::Module handle is a reference-counted pointer to a module object without
// thread affinity; it may be moved to and dropped on another thread. Not `Sync`: calls on one
// module from several threads at once are not promised to be safe by libtorch.
unsafe impl Send for ScriptModule {}

fn cstring(op: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument {
        op,
        message: format!("{s:?} contains a NUL byte"),
    })
}

/// Adds the method's name to a libtorch failure inside a call.
fn in_method(e: Error, name: &str) -> Error {
    match e {
        Error::Torch { op, source } => Error::Torch {
            op,
            source: TorchMessage(format!("in {name}(): {source}")),
        },
        e => e,
    }
}

fn wrap(op: &'static str, p: *mut c_void) -> Result<ScriptModule> {
    NonNull::new(p)
        .map(|ptr| ScriptModule { ptr })
        .ok_or_else(|| Error::Torch {
            op,
            source: TorchMessage("the shim returned a null module".into()),
        })
}

impl ScriptModule {
    /// Loads a module saved with `torch.jit.save` (scripted or traced) onto `device`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<ScriptModule> {
        let path = path.as_ref();
        let c = cstring("ScriptModule::load", &path.to_string_lossy())?;
        let (ty, idx) = match device {
            Device::Cpu => (0, 0),
            Device::Cuda(i) => {
                crate::accel::require_device("ScriptModule::load", i)?;
                (1, i as c_int)
            }
            other => {
                return Err(Error::InvalidArgument {
                    op: "ScriptModule::load",
                    message: format!(
                        "device {other:?} is not supported; use Device::Cpu or Device::Cuda"
                    ),
                });
            }
        };
        let mut p = std::ptr::null_mut();
        // SAFETY: `c` is a NUL-terminated string alive for the call; the out-pointer is a local.
        check("ScriptModule::load", unsafe {
            ffi::lo_jit_load(c.as_ptr(), ty, idx, &mut p)
        })
        .map_err(|e| match e {
            Error::Torch { source, .. } => Error::Torch {
                op: "ScriptModule::load",
                source: TorchMessage(format!("{}: {source}", path.display())),
            },
            e => e,
        })?;
        wrap("ScriptModule::load", p)
    }

    /// The submodule at `path`, dot-separated (`"blocks.3"`, `"head"`).
    pub fn submodule(&self, path: &str) -> Result<ScriptModule> {
        let c = cstring("ScriptModule::submodule", path)?;
        let mut p = std::ptr::null_mut();
        // SAFETY: self.ptr is a live module; `c` is NUL-terminated; the out-pointer is a local.
        check("ScriptModule::submodule", unsafe {
            ffi::lo_jit_submodule(self.ptr.as_ptr(), c.as_ptr(), &mut p)
        })?;
        wrap("ScriptModule::submodule", p)
    }

    /// Calls the module's `forward` with tensor arguments; it must return one tensor.
    pub fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let ptrs: Vec<*mut torch_sys::C_tensor> =
            inputs.iter().map(|t| t.as_ptr() as *mut _).collect();
        let mut out = std::ptr::null_mut();
        // SAFETY: self.ptr is a live module; `ptrs` holds live tensor pointers for the call
        // (the shim copies the handles); the out-pointer is a local.
        check("ScriptModule::forward", unsafe {
            ffi::lo_jit_forward(
                self.ptr.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                &mut out,
            )
        })?;
        // SAFETY: on success `out` is a fresh heap-allocated at::Tensor owned by the caller.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Calls the method `name` with positional arguments in schema order (see
    /// [`method_schema`](Self::method_schema)) and returns its result: a tensor, a tuple
    /// (`IValue::Tuple`, as a Flux double block returns), a list, a scalar or `None`. Arguments
    /// may be tuples (a rotary `(cos, sin)`), lists (`IValue::TensorList` for `List[Tensor]`:
    /// tch's `GenericList` builds a list of `Any`, which a typed list argument refuses), scalars
    /// and `IValue::None` for an `Optional` argument. libtorch checks the types and fills
    /// trailing defaults; a mismatch is an [`Error::Torch`] naming the argument. An argument or
    /// a result nested more than 64 deep (tuples, lists or dicts inside each other) is
    /// [`Error::InvalidArgument`]: converting it would overflow the stack.
    pub fn call_method(&self, name: &str, args: &[IValue]) -> Result<IValue> {
        self.call(name, args, &[])
    }

    /// `forward` with [`IValue`] arguments and result: [`call_method`](Self::call_method)`("forward", args)`.
    pub fn forward_is(&self, args: &[IValue]) -> Result<IValue> {
        self.call("forward", args, &[])
    }

    /// Calls the method `name` with every argument given by name, in any order. An unknown
    /// name is [`Error::UnknownArgument`] and a missing argument without a default
    /// [`Error::MissingArgument`], both listing the method's real arguments; a method that does
    /// not exist is [`Error::UnknownMethod`]. Arguments with defaults may be left out. Values
    /// nested more than 64 deep are refused as by [`call_method`](Self::call_method).
    pub fn call_named(&self, name: &str, args: &[(&str, IValue)]) -> Result<IValue> {
        self.method_schema(name)?.check_named(args)?;
        self.call(name, &[], args)
    }

    fn call(&self, name: &str, args: &[IValue], kwargs: &[(&str, IValue)]) -> Result<IValue> {
        const OP: &str = "ScriptModule::call_method";
        let method = cstring(OP, name)?;
        let pos = args.iter().map(ivalue::to_c).collect::<Result<Vec<_>>>()?;
        let kw = kwargs
            .iter()
            .map(|(_, v)| ivalue::to_c(v))
            .collect::<Result<Vec<_>>>()?;
        let kw_names = kwargs
            .iter()
            .map(|(n, _)| cstring(OP, n))
            .collect::<Result<Vec<_>>>()?;
        let pos_ptrs: Vec<*mut CIValue> = pos.iter().map(OwnedIValue::as_ptr).collect();
        let kw_ptrs: Vec<*mut CIValue> = kw.iter().map(OwnedIValue::as_ptr).collect();
        let name_ptrs: Vec<*const c_char> = kw_names.iter().map(|c| c.as_ptr()).collect();
        let (mut found, mut out) = (0, std::ptr::null_mut());
        // SAFETY: self.ptr is a live module; the argument arrays hold live IValue*s and C
        // strings that outlive the call (the shim copies the values) with the lengths given;
        // the out-pointers are locals.
        check(OP, unsafe {
            ffi::lo_jit_call(
                self.ptr.as_ptr(),
                method.as_ptr(),
                pos_ptrs.as_ptr(),
                pos_ptrs.len() as c_int,
                name_ptrs.as_ptr(),
                kw_ptrs.as_ptr(),
                kw_ptrs.len() as c_int,
                &mut found,
                &mut out,
            )
        })
        .map_err(|e| in_method(e, name))?;
        if found == 0 {
            return Err(self.unknown_method(name));
        }
        ivalue::from_c(OwnedIValue::from_shim(out)?)
    }

    fn unknown_method(&self, name: &str) -> Error {
        Error::UnknownMethod {
            name: name.to_owned(),
            methods: self.method_names().unwrap_or_default(),
        }
    }

    /// The names of the module's methods (`forward` and any other exported method).
    pub fn method_names(&self) -> Result<Vec<String>> {
        unsafe extern "C" fn push(ctx: *mut c_void, name: *const c_char) {
            // SAFETY: ctx is the &mut Vec passed below, alive for the call; name is a
            // NUL-terminated string valid during the callback.
            unsafe {
                let v = &mut *(ctx as *mut Vec<String>);
                v.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
        }
        let mut v: Vec<String> = Vec::new();
        // SAFETY: self.ptr is a live module; `push` matches the callback type and `v` outlives
        // the call.
        check("ScriptModule::method_names", unsafe {
            ffi::lo_jit_method_names(self.ptr.as_ptr(), &mut v as *mut _ as *mut c_void, push)
        })?;
        Ok(v)
    }

    /// The signature of the method `name`: its arguments (names, TorchScript types, defaults)
    /// in the order a positional call passes them, and its return types. For a traced module
    /// this is the order the trace used, which may differ from the Python declaration.
    pub fn method_schema(&self, name: &str) -> Result<MethodSchema> {
        unsafe extern "C" fn push(
            ctx: *mut c_void,
            is_return: c_int,
            name: *const c_char,
            type_str: *const c_char,
            default: *const c_char,
        ) {
            // SAFETY: ctx is the &mut MethodSchema passed below, alive for the call; name and
            // type_str are NUL-terminated strings valid during the callback, default is one or
            // null.
            unsafe {
                let s = &mut *(ctx as *mut MethodSchema);
                let text = |p: *const c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
                let arg = Arg {
                    name: text(name),
                    type_str: text(type_str),
                    default: (!default.is_null()).then(|| text(default)),
                };
                if is_return != 0 {
                    s.returns.push(arg)
                } else {
                    s.args.push(arg)
                }
            }
        }
        let c = cstring("ScriptModule::method_schema", name)?;
        let mut schema = MethodSchema {
            name: name.to_owned(),
            args: Vec::new(),
            returns: Vec::new(),
        };
        let mut found = 0;
        // SAFETY: self.ptr is a live module; `c` is NUL-terminated; `push` matches the callback
        // type and `schema` outlives the call.
        check("ScriptModule::method_schema", unsafe {
            ffi::lo_jit_method_schema(
                self.ptr.as_ptr(),
                c.as_ptr(),
                &mut found,
                &mut schema as *mut _ as *mut c_void,
                push,
            )
        })?;
        if found == 0 {
            return Err(self.unknown_method(name));
        }
        Ok(schema)
    }

    /// Switches the module (and its submodules) to evaluation mode.
    pub fn eval(&self) -> Result<()> {
        // SAFETY: self.ptr is a live module.
        check("ScriptModule::eval", unsafe {
            ffi::lo_jit_eval(self.ptr.as_ptr())
        })
    }

    fn named(&self, buffers: bool) -> Result<Vec<(String, Tensor)>> {
        unsafe extern "C" fn push(
            ctx: *mut c_void,
            name: *const c_char,
            t: *mut torch_sys::C_tensor,
        ) {
            // SAFETY: ctx is the &mut Vec passed below, alive for the call; name is a
            // NUL-terminated string valid during the callback; t is a fresh at::Tensor* whose
            // ownership passes here. Nothing in here can panic but an allocation failure,
            // which aborts.
            unsafe {
                let v = &mut *(ctx as *mut Vec<(String, Tensor)>);
                v.push((
                    CStr::from_ptr(name).to_string_lossy().into_owned(),
                    Tensor::from_ptr(t),
                ));
            }
        }
        let mut v: Vec<(String, Tensor)> = Vec::new();
        // SAFETY: self.ptr is a live module; `push` matches the callback type and `v` outlives
        // the call.
        check("ScriptModule::named_tensors", unsafe {
            ffi::lo_jit_named_tensors(
                self.ptr.as_ptr(),
                buffers as c_int,
                &mut v as *mut _ as *mut c_void,
                push,
            )
        })?;
        Ok(v)
    }

    /// Parameters, recursively, with their full names (`blocks.3.attn.qkv.weight`). The tensors
    /// share their storage with the module.
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(false)
    }

    /// Buffers, recursively, with their full names. The tensors share their storage with the
    /// module.
    pub fn named_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(true)
    }
}

impl Drop for ScriptModule {
    fn drop(&mut self) {
        // SAFETY: self.ptr came from the shim and is freed once, here.
        unsafe { ffi::lo_jit_free(self.ptr.as_ptr()) }
    }
}

/// Parameters then buffers: everything FastVideo's manager would offload.
impl WeightSource for ScriptModule {
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = self.named_parameters()?;
        v.extend(self.named_buffers()?);
        Ok(v)
    }
}
