//! Finding libnvrtc at run time and compiling CUDA C to a cubin with it.
//!
//! PyTorch's CUDA wheels ship NVRTC (`site-packages/nvidia/cu13/lib/libnvrtc.so.13` for CUDA
//! 13, `site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12` for CUDA 12), next to the
//! `site-packages/torch/lib` that holds libtorch; a CUDA toolkit has it in `lib64`. The search
//! order is in [`candidates`].

use super::ffi::{NVRTC_SUCCESS, NvrtcApi, nvrtcProgram, nvrtcResult};
use crate::error::{CodecError, Result};
use libloading::Library;
use std::ffi::{CStr, CString, c_char};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The environment variable that names libnvrtc (a file) or a directory holding it.
pub const NVRTC_ENV: &str = "LAYERWISE_OFFLOAD_NVRTC";

/// NVRTC and the path it was loaded from, loaded once per process.
fn loaded() -> Result<&'static (NvrtcApi, PathBuf)> {
    static API: OnceLock<std::result::Result<(NvrtcApi, PathBuf), Vec<String>>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|searched| CodecError::LibraryNotFound {
            library: "libnvrtc",
            searched: searched.clone(),
        })
}

pub(crate) fn api() -> Result<&'static NvrtcApi> {
    Ok(&loaded()?.0)
}

/// The libnvrtc this process uses (a path, or a bare name the dynamic loader resolved); loads
/// it if needed.
pub fn library_path() -> Result<&'static Path> {
    Ok(&loaded()?.1)
}

/// The first candidate that loads and has every function, or what each candidate answered.
fn load() -> std::result::Result<(NvrtcApi, PathBuf), Vec<String>> {
    let mut tried = Vec::new();
    for candidate in candidates() {
        preload_builtins(&candidate);
        // SAFETY: loading a shared library runs its initialisers; libnvrtc's are sound to run
        // at any point of a process (it is built to be dlopen'ed, as PyTorch does).
        match unsafe { Library::new(&candidate) } {
            // SAFETY: a library named libnvrtc exports NVRTC's C API with nvrtc.h's signatures.
            Ok(lib) => match unsafe { NvrtcApi::load(lib) } {
                Ok(api) => return Ok((api, candidate)),
                Err(e) => tried.push(format!("{} ({e})", candidate.display())),
            },
            Err(e) => tried.push(format!("{} ({e})", candidate.display())),
        }
    }
    tried.push(format!("set {NVRTC_ENV} to libnvrtc's path to choose one"));
    Err(tried)
}

/// libnvrtc opens `libnvrtc-builtins.so.<version>` by name when it compiles, which the loader
/// finds only on its own search path; a pip wheel's directory is not on it. Opening the
/// builtins next to `nvrtc` first, by path, makes that later lookup by name find the loaded
/// copy. They stay loaded for the life of the process, as NVRTC itself does.
fn preload_builtins(nvrtc: &Path) {
    let Some(dir) = nvrtc.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return;
    };
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("libnvrtc-builtins.so")
        {
            // SAFETY: NVRTC's builtins library has no initialisers with preconditions; it is
            // the library libnvrtc itself would load.
            if let Ok(lib) = unsafe { Library::new(entry.path()) } {
                std::mem::forget(lib);
            }
        }
    }
}

/// Where libnvrtc is looked for, in order:
/// 1. `$LAYERWISE_OFFLOAD_NVRTC` (a file, or a directory searched as below);
/// 2. for each directory D of `LD_LIBRARY_PATH`, of a libtorch or libc10 mapped into this
///    process, of `$LIBTORCH/lib`, and of `$VIRTUAL_ENV`/`$CONDA_PREFIX`'s
///    `lib/python3*/site-packages/torch/lib`: D itself and D/../../nvidia/{cu13,cuda_nvrtc}/lib
///    (a pip wheel's layout), files named `libnvrtc.so*`, newest version first;
/// 3. `/usr/local/cuda/lib64`;
/// 4. the bare names `libnvrtc.so.13`, `libnvrtc.so.12`, `libnvrtc.so` through the dynamic
///    loader's own search.
pub fn candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os(NVRTC_ENV) {
        let p = PathBuf::from(v);
        if p.is_dir() {
            dirs.push(p)
        } else {
            files.push(p)
        }
    }
    let mut lib_dirs: Vec<PathBuf> = Vec::new();
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        lib_dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    lib_dirs.extend(mapped_torch_dirs());
    if let Some(t) = std::env::var_os("LIBTORCH") {
        lib_dirs.push(Path::new(&t).join("lib"));
    }
    for prefix in ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
    {
        let lib = Path::new(&prefix).join("lib");
        for entry in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("python3") {
                lib_dirs.push(entry.path().join("site-packages/torch/lib"));
            }
        }
    }
    for d in lib_dirs {
        dirs.push(d.join("../../nvidia/cu13/lib"));
        dirs.push(d.join("../../nvidia/cuda_nvrtc/lib"));
        dirs.push(d);
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    for d in dirs {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&d)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("libnvrtc.so"))
            .map(|e| e.path())
            .collect();
        // libnvrtc.so.13 before libnvrtc.so.12 before libnvrtc.so.
        found.sort_by(|a, b| b.cmp(a));
        for f in found {
            if !files.contains(&f) {
                files.push(f);
            }
        }
    }
    files.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(PathBuf::from));
    files
}

/// Directories of a libtorch or libc10 mapped into this process (a tch program's).
fn mapped_torch_dirs() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let p = Path::new(path);
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if (name.starts_with("libtorch") || name.starts_with("libc10"))
            && let Some(d) = p.parent()
            && !dirs.iter().any(|x| x == d)
        {
            dirs.push(d.to_path_buf());
        }
    }
    dirs
}

fn check(api: &NvrtcApi, call: &'static str, code: nvrtcResult) -> Result<()> {
    if code == NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
    let message = unsafe { CStr::from_ptr((api.nvrtcGetErrorString)(code)) }
        .to_string_lossy()
        .into_owned();
    Err(CodecError::Nvrtc {
        call,
        code,
        message,
    })
}

/// NVRTC's version, (major, minor).
pub fn version() -> Result<(i32, i32)> {
    let api = api()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    check(api, "nvrtcVersion", unsafe {
        (api.nvrtcVersion)(&mut major, &mut minor)
    })?;
    Ok((major, minor))
}

/// A program being compiled; destroyed on drop.
struct Program<'a> {
    api: &'a NvrtcApi,
    handle: nvrtcProgram,
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        unsafe { (self.api.nvrtcDestroyProgram)(&mut self.handle) };
    }
}

impl Program<'_> {
    fn log(&self) -> String {
        let mut size = 0usize;
        // SAFETY: valid program and out-pointer.
        if unsafe { (self.api.nvrtcGetProgramLogSize)(self.handle, &mut size) } != NVRTC_SUCCESS
            || size == 0
        {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds the `size` bytes NVRTC asked for.
        unsafe { (self.api.nvrtcGetProgramLog)(self.handle, buf.as_mut_ptr().cast::<c_char>()) };
        String::from_utf8_lossy(&buf)
            .trim_end_matches('\0')
            .trim()
            .to_string()
    }
}

/// Compiles CUDA C `source` (named `name` in messages) to a cubin for `arch` (`sm_90`).
pub fn compile(source: &str, name: &str, arch: &str) -> Result<Vec<u8>> {
    let api = api()?;
    let nul = |s: &str| CString::new(s).expect("no NUL inside the source, its name or options");
    let (src, cname) = (nul(source), nul(name));
    let mut handle: nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NUL-terminated source and name; no headers (0 and null arrays).
    let code = unsafe {
        (api.nvrtcCreateProgram)(
            &mut handle,
            src.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    check(api, "nvrtcCreateProgram", code)?;
    let program = Program { api, handle };
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ]
    .map(|o| nul(&o));
    let ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: `ptrs` holds options.len() NUL-terminated strings that outlive the call.
    let code =
        unsafe { (api.nvrtcCompileProgram)(program.handle, ptrs.len() as i32, ptrs.as_ptr()) };
    if code != NVRTC_SUCCESS {
        return Err(CodecError::Compile {
            arch: arch.to_string(),
            log: program.log(),
        });
    }
    let mut size = 0usize;
    // SAFETY: a compiled program and a valid out-pointer.
    check(api, "nvrtcGetCUBINSize", unsafe {
        (api.nvrtcGetCUBINSize)(program.handle, &mut size)
    })?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds the `size` bytes NVRTC reported.
    check(api, "nvrtcGetCUBIN", unsafe {
        (api.nvrtcGetCUBIN)(program.handle, cubin.as_mut_ptr().cast::<c_char>())
    })?;
    Ok(cubin)
}
