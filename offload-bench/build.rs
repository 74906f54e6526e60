//! libtorch's lib dir (reported by layerwise-offload's build script) into this binary's rpath,
//! so that it runs without LD_LIBRARY_PATH, as the README tells users' crates to do.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LAYERWISE_OFFLOAD_SHIM_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_LAYERWISE_OFFLOAD_SHIM_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
