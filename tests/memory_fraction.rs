//! A per-process memory fraction makes an over-large allocation fail with a typed error. In its
//! own test binary: the cap must be set before the process's first CUDA allocation.

use offload_testkit as common;

use layerwise_offload::Error;
use layerwise_offload::accel;

#[test]
fn memory_fraction_caps_allocations() -> anyhow::Result<()> {
    let Some(d) = common::cuda() else {
        assert!(matches!(
            accel::set_memory_fraction(0.25),
            Err(Error::NoDevice { .. })
        ));
        return Ok(());
    };
    let (_, total) = accel::memory_info(d)?;
    accel::set_memory_fraction(0.25)?;
    // A third of the card is more than a quarter: refused, typed, and the process goes on.
    let asked = (total / 3) as usize;
    match accel::alloc_device(asked, d) {
        Err(e @ Error::OutOfMemory { .. }) => {
            assert!(e.is_out_of_memory());
            assert!(e.to_string().contains(&asked.to_string()), "{e}");
        }
        other => panic!("expected OutOfMemory for {asked} bytes under a 0.25 cap, got {other:?}"),
    }
    // Below the cap works.
    let ok = accel::alloc_device((total / 8) as usize, d)?;
    drop(ok);
    // Once the allocator runs, the cap cannot change.
    assert!(matches!(
        accel::set_memory_fraction(0.5),
        Err(Error::AllocatorStarted { .. })
    ));
    Ok(())
}
