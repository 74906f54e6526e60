//! Compiles the C++ shim in `csrc/` against the libtorch that torch-sys links, links libtorch's
//! CUDA backend so that it registers, and writes libtorch's lib dir into the binaries' rpath.

use anyhow::{Context, Result, bail};
use std::env;
use std::path::PathBuf;

/// Reads an environment variable and tells cargo to rerun when it changes.
fn env_var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn main() -> Result<()> {
    // torch-sys (links = "tch") prints `cargo:libtorch_lib=<dir>`.
    let lib_dir = PathBuf::from(env_var("DEP_TCH_LIBTORCH_LIB").context(
        "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not report its libtorch lib dir \
         (is torch-sys a direct dependency?)",
    )?);
    let root = lib_dir.parent().context("libtorch lib dir has no parent")?;
    let includes = [
        root.join("include"),
        root.join("include/torch/csrc/api/include"),
    ];
    for dir in &includes {
        if !dir.is_dir() {
            bail!(
                "libtorch include dir {} does not exist (LIBTORCH={:?})",
                dir.display(),
                env_var("LIBTORCH")
            );
        }
    }
    let abi = env_var("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".to_owned());

    let mut files = Vec::new();
    for entry in std::fs::read_dir("csrc").context("reading csrc/")? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("cpp") | Some("h")) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        if ext == Some("cpp") {
            files.push(path);
        }
    }
    files.sort();
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .includes(&includes)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // libtorch's headers are noisy under -Wall; the shim's own code is kept warning-free.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .files(&files)
        .compile("layerwise_offload_shim");

    // Without --no-as-needed the linker drops libtorch_cuda (nothing references it directly),
    // CUDA's backend never registers and every CUDA call fails.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    // torch-sys's rpath flag does not reach downstream binaries.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dl");
    Ok(())
}
