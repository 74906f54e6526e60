//! Compiles the C++ shim in `csrc/` against the libtorch that torch-sys links, tells the shim
//! where that libtorch lives (it loads the CUDA backend from there at run time), and writes
//! libtorch's lib dir into this package's own binaries' rpath. Skips all of it when building
//! documentation only (`DOCS_RS` set, or the `doc-only` feature).
//!
//! tch is a range of releases (Cargo.toml); each accepts one libtorch. The libtorch version is
//! read from its headers, refused outside the range the shim is written for, and passed on to
//! the crate (`LO_LIBTORCH_VERSION`, for `layerwise_offload::LIBTORCH_VERSION`) and to the
//! build scripts of dependent crates (`DEP_LAYERWISE_OFFLOAD_SHIM_LIBTORCH_VERSION`).

use anyhow::{Context, Result, bail};
use std::env;
use std::path::PathBuf;

/// Reads an environment variable and tells cargo to rerun when it changes.
fn env_var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

/// The libtorch releases the shim is written for (major, minor): those of tch 0.24 to 0.26.
const SUPPORTED: std::ops::RangeInclusive<(u32, u32)> = (2, 11)..=(2, 13);

/// libtorch's version (major, minor, patch) from its headers under `include`:
/// `torch/headeronly/version.h` since 2.9, `torch/csrc/api/include/torch/version.h` before.
fn libtorch_version(include: &std::path::Path) -> Result<(u32, u32, u32)> {
    let candidates = [
        include.join("torch/headeronly/version.h"),
        include.join("torch/csrc/api/include/torch/version.h"),
    ];
    for header in &candidates {
        let Ok(text) = std::fs::read_to_string(header) else {
            continue;
        };
        let define = |name: &str| -> Option<u32> {
            text.lines().find_map(|l| {
                let rest = l.trim().strip_prefix("#define ")?.strip_prefix(name)?;
                rest.trim().parse().ok()
            })
        };
        if let (Some(major), Some(minor), Some(patch)) = (
            define("TORCH_VERSION_MAJOR"),
            define("TORCH_VERSION_MINOR"),
            define("TORCH_VERSION_PATCH"),
        ) {
            return Ok((major, minor, patch));
        }
    }
    bail!(
        "cannot read libtorch's version: none of {} defines TORCH_VERSION_MAJOR/MINOR/PATCH",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
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
    let (major, minor, patch) = libtorch_version(&includes[0])?;
    if !SUPPORTED.contains(&(major, minor)) {
        bail!(
            "libtorch {major}.{minor}.{patch} (at {}) is outside the releases layerwise-offload \
             supports, {}.{} to {}.{} (tch 0.24 to 0.26, each with its own libtorch): point \
             LIBTORCH at a supported libtorch and pin the matching tch in your Cargo.toml",
            root.display(),
            SUPPORTED.start().0,
            SUPPORTED.start().1,
            SUPPORTED.end().0,
            SUPPORTED.end().1,
        );
    }
    println!("cargo:rustc-env=LO_LIBTORCH_VERSION={major}.{minor}.{patch}");
    println!("cargo:libtorch_version={major}.{minor}.{patch}");
    // libtorch 2.13's headers use C++20 (default member initializers of bit-fields).
    let std = if (major, minor) >= (2, 13) {
        "-std=c++20"
    } else {
        "-std=c++17"
    };
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
        .flag(std)
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
