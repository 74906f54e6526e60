//! layerwise-offload as a dependent crate meets it: built without the link flags that the
//! crate's build script gives its own binaries.

use layerwise_offload::accel::{self, CudaBackend};
use layerwise_offload::{Error, LayerwiseOffloadManager, OffloadConfig};
use layerwise_offload_dependent::{BLOCKS, Model, streamed_against_resident};
use std::path::PathBuf;
use std::process::Command;
use tch::Device;

/// CUDA device 0 if usable; otherwise `SKIP: no CUDA device` (or a panic under
/// `OFFLOAD_REQUIRE_CUDA=1`).
fn cuda() -> Option<usize> {
    if accel::cuda_is_available() {
        return Some(0);
    }
    if std::env::var("OFFLOAD_REQUIRE_CUDA").as_deref() == Ok("1") {
        panic!(
            "OFFLOAD_REQUIRE_CUDA=1 but no CUDA device is usable in a dependent crate: {:?}, {:?}",
            accel::cuda_backend(),
            accel::cuda_unavailable_reason()
        );
    }
    eprintln!("SKIP: no CUDA device");
    None
}

/// The crate's binary: where cargo built it, or, in a staged copy of the binaries carried to
/// another machine, in `bins/` beside the test binaries' `tests/`.
fn binary() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_layerwise-offload-dependent"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().unwrap();
    let staged = exe.parent().and_then(|d| d.parent()).unwrap();
    staged.join("bins/layerwise-offload-dependent")
}

/// The libtorch this crate was built against: torch-sys's LIBTORCH, as scripts/env.sh sets it.
fn libtorch_has_cuda() -> Option<bool> {
    let dir = std::env::var("LIBTORCH").ok()?;
    Some(
        std::path::Path::new(&dir)
            .join("lib/libtorch_cuda.so")
            .exists(),
    )
}

#[test]
fn the_crate_loads_libtorch_cuda_itself() {
    let backend = accel::cuda_backend();
    eprintln!("{backend:?}");
    match libtorch_has_cuda() {
        // This binary does not link libtorch_cuda (no flag reaches a dependent crate): the
        // crate must have loaded it, from libtorch's own directory.
        Some(true) => match backend {
            CudaBackend::Loaded(path) => {
                assert!(path.ends_with("/libtorch_cuda.so"), "{path}");
                assert!(accel::cuda_compiled());
            }
            other => panic!("expected the crate to load libtorch_cuda.so, got {other:?}"),
        },
        Some(false) => {
            assert!(matches!(backend, CudaBackend::Unavailable(why) if why.contains("CPU-only")));
        }
        None => eprintln!("note: LIBTORCH is not set; the backend's origin is not checked"),
    }
}

#[test]
fn a_streamed_loop_matches_the_resident_model() -> Result<(), Error> {
    let device = match cuda() {
        Some(d) => Device::Cuda(d),
        None => Device::Cpu,
    };
    let check = streamed_against_resident(device)?;
    eprintln!("{check:?}");
    assert!(check.enabled);
    assert!(check.uploads >= 2 * BLOCKS as u64, "{check:?}");
    assert!(check.bit_exact, "{check:?}");
    assert_eq!(check.max_abs_diff, 0.0);
    Ok(())
}

#[test]
fn three_lines_with_the_one_call_and_module_forward() -> Result<(), Error> {
    use layerwise_offload::{OffloadedBlocks, offload_with};
    use tch::nn::Module;
    let cuda = cuda().is_some();
    let device = if cuda { Device::Cuda(0) } else { Device::Cpu };
    let x = Model::input(device, 11);
    let mut resident = Model::new(21);
    resident.vs.set_device(device);
    let want = tch::no_grad(|| resident.forward(&x));

    let Model { vs, embed, blocks } = Model::new(21); // built on the CPU
    // The three lines: offload (the block count read from the names), wrap, forward.
    let manager = offload_with(&vs, "blocks", |c| c.cpu_test_mode(!cuda))?;
    let model = OffloadedBlocks::new(blocks, manager)?;
    let got = tch::no_grad(|| model.forward(&embed.forward(&x)));

    assert!(layerwise_offload_dependent::bits_equal(&got, &want));
    assert_eq!(got.device(), device);
    let stats = model.manager().stats();
    assert_eq!(stats.streamed_blocks, BLOCKS);
    assert!(stats.uploads >= BLOCKS as u64, "{stats:?}");
    // The weights come back bit for bit.
    let (_, mut manager) = model.into_parts();
    manager.restore_to(Device::Cpu)?;
    let fresh = Model::new(21);
    for (name, t) in fresh.vs.variables() {
        assert!(
            layerwise_offload_dependent::bits_equal(&vs.variables()[&name], &t),
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn no_device_is_an_error_unless_a_fallback_is_asked_for() -> Result<(), Error> {
    let model = Model::new(3);
    let before: Vec<_> = model
        .vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.copy()))
        .collect();
    let check_unchanged = || {
        for (name, v) in &before {
            assert!(model.vs.variables()[name].equal(v), "{name} changed");
        }
    };
    // A device index past the last one fails everywhere, with or without a GPU.
    match OffloadConfig::new("blocks", BLOCKS)
        .device(1000)
        .build(&model.vs)
    {
        Err(Error::NoDevice { reason, .. }) => {
            assert!(reason.contains("allow_cpu_fallback"), "{reason}");
            if accel::cuda_is_available() {
                assert!(reason.contains("out of range"), "{reason}");
            }
        }
        other => panic!("expected NoDevice, got {other:?}"),
    }
    let mut m = OffloadConfig::new("blocks", BLOCKS)
        .device(1000)
        .allow_cpu_fallback(true)
        .build(&model.vs)?;
    assert!(!m.is_enabled());
    m.initialize()?;
    check_unchanged();
    if cuda().is_none() {
        // Without a device the default build says why (the driver's own words where it gave some).
        let err = OffloadConfig::new("blocks", BLOCKS)
            .build(&model.vs)
            .expect_err("no CUDA device, no fallback asked for: build must fail");
        eprintln!("{err}");
        assert!(matches!(err, Error::NoDevice { .. }));
        // The seed's constructor keeps the seed's meaning: disabled.
        let mut seed = LayerwiseOffloadManager::new(&model.vs, "blocks", BLOCKS, true, true, true)?;
        assert!(!seed.is_enabled());
        seed.restore()?;
        check_unchanged();
    }
    Ok(())
}

#[test]
fn the_binary_sees_cuda_through_tch_before_calling_the_crate() {
    let out = Command::new(binary())
        .output()
        .expect("run the dependent crate's binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("bit_exact: true"), "{stdout}");
    if cuda().is_some() {
        // tch asked first, so CUDA was registered before main ran.
        assert!(!stdout.contains("tch sees 0 CUDA"), "{stdout}");
    }
}

#[test]
fn the_readme_rpath_line_finds_libtorch_without_ld_library_path() {
    let Some(lib) = option_env!("RPATH_LIBTORCH_LIB") else {
        panic!("the build script did not see DEP_LAYERWISE_OFFLOAD_SHIM_LIBTORCH_LIB");
    };
    if !std::path::Path::new(lib).is_dir() {
        // Built on another machine (the binaries were carried here): the rpath names a
        // directory that does not exist here, so only LD_LIBRARY_PATH can work.
        eprintln!("note: {lib} does not exist on this machine; the rpath recipe is not checked");
        return;
    }
    let out = Command::new(binary())
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LD_PRELOAD")
        .output()
        .expect("run the dependent crate's binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("bit_exact: true"), "{stdout}");
    // The CUDA backend came from the crate, not from a link flag.
    if libtorch_has_cuda() == Some(true) {
        assert!(stdout.contains("CUDA backend: Loaded("), "{stdout}");
    }
}
