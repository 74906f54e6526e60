//! The optional rpath line the README gives users: with it, the binary finds libtorch without
//! LD_LIBRARY_PATH. CUDA does not depend on it (layerwise-offload loads libtorch_cuda itself).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LAYERWISE_OFFLOAD_SHIM_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_LAYERWISE_OFFLOAD_SHIM_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // For this crate's test of the recipe: the directory the rpath names.
        println!("cargo:rustc-env=RPATH_LIBTORCH_LIB={lib}");
    }
}
