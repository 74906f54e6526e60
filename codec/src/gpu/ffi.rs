//! The C functions of the CUDA driver API and NVRTC that the GPU decoder calls, as tables of
//! function pointers resolved with `dlsym` from libraries opened at run time. Declarations only:
//! [`super::driver`] and [`super::nvrtc`] check the status codes and own the handles.
#![allow(non_snake_case, non_camel_case_types)]

use crate::error::{CodecError, Result};
use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, c_void};

pub type CUresult = c_int;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type CUcontext = *mut c_void;
pub type CUmodule = *mut c_void;
pub type CUfunction = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;
pub type nvrtcResult = c_int;
pub type nvrtcProgram = *mut c_void;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: c_int = 75;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: c_int = 76;
pub const CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: c_int = 82;
pub const CU_FUNC_ATTRIBUTE_NUM_REGS: c_int = 4;
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
pub const NVRTC_SUCCESS: nvrtcResult = 0;

/// Declares a table of functions of one library: the struct (which keeps the library open, so
/// the pointers stay valid) and its loader. Each function may list other symbol names to try
/// (the unversioned names of `_v2` entry points).
macro_rules! api {
    ($table:ident, $library:literal, {
        $( $name:ident $(or $alt:ident)* : fn($($arg:ty),*) -> $ret:ty; )*
    }) => {
        pub struct $table {
            $( pub $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
            _lib: Library,
        }

        impl $table {
            /// Resolves every function of the table in `lib`.
            ///
            /// # Safety
            /// `lib` must be the library named above, whose functions have the signatures
            /// declared here (those of its C headers).
            pub unsafe fn load(lib: Library) -> Result<Self> {
                Ok($table {
                    $( $name: {
                        let names: &[&'static str] = &[stringify!($name) $(, stringify!($alt))*];
                        let mut found = None;
                        for name in names {
                            // SAFETY: the caller vouches that the symbol has this signature; the
                            // pointer is copied out and stays valid while `_lib` is open.
                            if let Ok(f) = unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(name.as_bytes()) } {
                                found = Some(*f);
                                break;
                            }
                        }
                        found.ok_or(CodecError::MissingSymbol { library: $library, symbol: names[0] })?
                    }, )*
                    _lib: lib,
                })
            }
        }
    };
}

api!(DriverApi, "libcuda", {
    cuInit: fn(c_uint) -> CUresult;
    cuGetErrorName: fn(CUresult, *mut *const c_char) -> CUresult;
    cuGetErrorString: fn(CUresult, *mut *const c_char) -> CUresult;
    cuDeviceGetCount: fn(*mut c_int) -> CUresult;
    cuDeviceGet: fn(*mut CUdevice, c_int) -> CUresult;
    cuDeviceGetAttribute: fn(*mut c_int, c_int, CUdevice) -> CUresult;
    cuDeviceGetName: fn(*mut c_char, c_int, CUdevice) -> CUresult;
    cuDevicePrimaryCtxRetain: fn(*mut CUcontext, CUdevice) -> CUresult;
    cuDevicePrimaryCtxRelease_v2 or cuDevicePrimaryCtxRelease: fn(CUdevice) -> CUresult;
    cuCtxPushCurrent_v2 or cuCtxPushCurrent: fn(CUcontext) -> CUresult;
    cuCtxPopCurrent_v2 or cuCtxPopCurrent: fn(*mut CUcontext) -> CUresult;
    cuCtxSynchronize: fn() -> CUresult;
    cuModuleLoadData: fn(*mut CUmodule, *const c_void) -> CUresult;
    cuModuleUnload: fn(CUmodule) -> CUresult;
    cuModuleGetFunction: fn(*mut CUfunction, CUmodule, *const c_char) -> CUresult;
    cuOccupancyMaxActiveBlocksPerMultiprocessor: fn(*mut c_int, CUfunction, c_int, usize) -> CUresult;
    cuFuncGetAttribute: fn(*mut c_int, c_int, CUfunction) -> CUresult;
    cuLaunchKernel: fn(
        CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream,
        *mut *mut c_void, *mut *mut c_void
    ) -> CUresult;
    cuMemAlloc_v2: fn(*mut CUdeviceptr, usize) -> CUresult;
    cuMemFree_v2: fn(CUdeviceptr) -> CUresult;
    cuMemcpyHtoD_v2: fn(CUdeviceptr, *const c_void, usize) -> CUresult;
    cuMemcpyDtoH_v2: fn(*mut c_void, CUdeviceptr, usize) -> CUresult;
    cuMemsetD8_v2: fn(CUdeviceptr, u8, usize) -> CUresult;
    cuStreamCreate: fn(*mut CUstream, c_uint) -> CUresult;
    cuStreamDestroy_v2: fn(CUstream) -> CUresult;
    cuStreamSynchronize: fn(CUstream) -> CUresult;
    cuEventCreate: fn(*mut CUevent, c_uint) -> CUresult;
    cuEventDestroy_v2: fn(CUevent) -> CUresult;
    cuEventRecord: fn(CUevent, CUstream) -> CUresult;
    cuEventSynchronize: fn(CUevent) -> CUresult;
    cuEventElapsedTime_v2 or cuEventElapsedTime: fn(*mut f32, CUevent, CUevent) -> CUresult;
});

api!(NvrtcApi, "libnvrtc", {
    nvrtcVersion: fn(*mut c_int, *mut c_int) -> nvrtcResult;
    nvrtcGetErrorString: fn(nvrtcResult) -> *const c_char;
    nvrtcCreateProgram: fn(
        *mut nvrtcProgram, *const c_char, *const c_char, c_int, *const *const c_char,
        *const *const c_char
    ) -> nvrtcResult;
    nvrtcCompileProgram: fn(nvrtcProgram, c_int, *const *const c_char) -> nvrtcResult;
    nvrtcGetProgramLogSize: fn(nvrtcProgram, *mut usize) -> nvrtcResult;
    nvrtcGetProgramLog: fn(nvrtcProgram, *mut c_char) -> nvrtcResult;
    nvrtcGetCUBINSize: fn(nvrtcProgram, *mut usize) -> nvrtcResult;
    nvrtcGetCUBIN: fn(nvrtcProgram, *mut c_char) -> nvrtcResult;
    nvrtcDestroyProgram: fn(*mut nvrtcProgram) -> nvrtcResult;
});
