//! A user's program: asks tch about CUDA first (before any call into layerwise-offload), then
//! streams a small model through the manager and checks it against the resident model.
//! Prints one line per finding; exits non-zero if the streamed output differs, or if
//! `OFFLOAD_REQUIRE_CUDA=1` and no CUDA device is usable.

use layerwise_offload::accel;
use layerwise_offload_dependent::streamed_against_resident;
use tch::Device;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tch first: libtorch creates its CUDA hooks on the first question, so this only sees CUDA
    // if libtorch_cuda was loaded when the program started.
    let tch_devices = tch::Cuda::device_count();
    println!("tch sees {tch_devices} CUDA device(s)");
    println!("CUDA backend: {:?}", accel::cuda_backend());
    let device = if accel::cuda_is_available() {
        Device::Cuda(0)
    } else {
        println!(
            "no CUDA device: {}",
            accel::cuda_unavailable_reason().unwrap_or("")
        );
        if std::env::var("OFFLOAD_REQUIRE_CUDA").as_deref() == Ok("1") {
            return Err("OFFLOAD_REQUIRE_CUDA=1 but no CUDA device is usable".into());
        }
        Device::Cpu
    };
    let check = streamed_against_resident(device)?;
    println!("{check:?}");
    if !check.bit_exact || tch_devices != accel::cuda_device_count() as i64 {
        return Err(
            "streamed output differs from the resident one, or tch and the crate disagree on CUDA"
                .into(),
        );
    }
    Ok(())
}
