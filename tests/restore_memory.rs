//! `restore_to(Device::Cpu)` frees each block's host copy as soon as the block is restored, so
//! host memory never holds the model twice (it did: the manager's host store kept every buffer
//! until the last block was done, and a 10.6 GiB text encoder restored onto the CPU of a 24 GiB
//! machine was killed for lack of memory). Its own test binary: it reads the process's peak
//! resident memory, which other tests would move.

use layerwise_offload::OffloadConfig;
use tch::{Device, Kind, Tensor, nn};

const MIB: u64 = 1 << 20;

fn status_bytes(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn restoring_onto_the_cpu_does_not_hold_the_model_twice() -> anyhow::Result<()> {
    // Resetting the peak (Linux 4.0 and later): without it this test cannot measure anything.
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("SKIP: /proc/self/clear_refs cannot reset the peak resident memory here");
        return Ok(());
    }
    // 16 blocks of 32 MiB (512 MiB): a doubling would show far above the noise.
    let (blocks, per_block) = (16i64, 32 * MIB);
    let vs = nn::VarStore::new(Device::Cpu);
    let numel = (per_block / 4) as i64;
    let mut want = Vec::new();
    for i in 0..blocks {
        let t = (vs.root() / "blocks" / i).var_copy(
            "w",
            &Tensor::arange(numel, (Kind::Float, Device::Cpu)).fill_(i as f64 + 0.5),
        );
        want.push(t.sum(Kind::Double).double_value(&[]));
    }
    let mut m = OffloadConfig::new("blocks", blocks as usize)
        .cpu_test_mode(true)
        .build(&vs)?;
    m.initialize()?;
    std::fs::write("/proc/self/clear_refs", "5")?;
    let before = status_bytes("VmRSS:");
    m.restore_to(Device::Cpu)?;
    let peak = status_bytes("VmHWM:");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "restore_to(Cpu) of {} MiB: peak {} MiB above the start",
        blocks as u64 * per_block / MIB,
        growth / MIB
    );
    // One block restored while its host copy is still there, plus the allocator's slack; the
    // model twice would be 512 MiB.
    assert!(
        growth < 4 * per_block,
        "restoring grew host memory by {} MiB for {} MiB of blocks",
        growth / MIB,
        blocks as u64 * per_block / MIB
    );
    let vars = vs.variables();
    for (i, w) in want.iter().enumerate() {
        let t = &vars[&format!("blocks.{i}.w")];
        assert_eq!(t.device(), Device::Cpu);
        assert_eq!(t.sum(Kind::Double).double_value(&[]), *w, "block {i}");
    }
    Ok(())
}
