//! TorchScript modules from Rust: load a scripted or traced module, reach its submodules by
//! path (`blocks.3`, `patch_embed`) and call their `forward`, and list its parameters and
//! buffers so the manager can take them over. tch's `CModule` offers no submodules or buffers;
//! this wraps libtorch's `torch::jit::Module` directly.

use crate::accel::last_error;
use crate::error::{Error, Result, TorchMessage};
use crate::ffi;
use crate::source::WeightSource;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::NonNull;
use tch::{Device, Tensor};

/// A TorchScript module (or one of its submodules: a handle that shares the parent's state).
#[derive(Debug)]
pub struct ScriptModule {
    ptr: NonNull<c_void>,
}

// SAFETY: a torch::jit::Module handle is a reference-counted pointer to a module object without
// thread affinity; it may be moved to and dropped on another thread. Not `Sync`: calls on one
// module from several threads at once are not promised to be safe by libtorch.
unsafe impl Send for ScriptModule {}

fn check(op: &'static str, rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::from_torch(op, 0, last_error()))
    }
}

fn cstring(op: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument {
        op,
        message: format!("{s:?} contains a NUL byte"),
    })
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

/// Turns libtorch's graph-executor optimizations (profiling, fusion) on or off for the whole
/// process. With them off a scripted module runs its ops one by one, exactly as calling its
/// submodules one at a time does, so a layer loop over submodules reproduces the module's own
/// `forward` bit for bit.
pub fn set_graph_optimizations(enabled: bool) -> Result<()> {
    // SAFETY: plain value argument.
    check("set_graph_optimizations", unsafe {
        ffi::lo_jit_set_optimize(enabled as c_int)
    })
}
