//! Compiles the C++ shim in `csrc/` against the libtorch that torch-sys links, tells the shim
//! where that libtorch lives (it loads the CUDA backend from there at run time), and writes
//! libtorch's lib dir into this package's own binaries' rpath. Skips all of it when building
//! documentation only (`DOCS_RS` set, or the `doc-only` feature).

use anyhow::{Context, Result, bail};
use std::env;
use std::path::PathBuf;

/// Reads an environment variable and tells cargo to rerun when it changes.
fn env_var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn main() -> Result<()> {
    // Documentation builds without libtorch (docs.rs, or the `doc-only` feature): torch-sys then
    // reports no libtorch, and nothing is compiled against it.
    if env_var("DOCS_RS").is_some() || env_var("CARGO_FEATURE_DOC_ONLY").is_some() {
        return Ok(());
    }
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
        // Where the shim looks for libtorch_cuda.so if it finds no libtorch among the loaded
        // objects at run time.
        .define(
            "LO_LIBTORCH_LIB",
            Some(format!("{:?}", lib_dir.display().to_string()).as_str()),
        )
        // libtorch's headers are noisy under -Wall; the shim's own code is kept warning-free.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .files(&files)
        .compile("layerwise_offload_shim");

    // libtorch_cuda is not linked here: the shim loads it at start-up (csrc/shim.cpp,
    // `load_cuda_backend`), the same way in this package's binaries as in every crate that
    // depends on this one, where link arguments from this script do not reach.
    // torch-sys's rpath flag does not reach downstream binaries.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // For the build scripts of crates that depend on this one (`links` makes it
    // DEP_LAYERWISE_OFFLOAD_SHIM_LIBTORCH_LIB there): where libtorch is, to put in their rpath.
    println!("cargo:libtorch_lib={}", lib_dir.display());
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dl");
    Ok(())
}
