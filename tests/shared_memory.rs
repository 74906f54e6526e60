//! A host copy published in a shared-memory file and streamed by a manager of another process
//! (here: a second mapping in this process, and a child process that maps it too).

mod common;

use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::accel::HostMemory;
use layerwise_offload::{Error, HostStore, OffloadConfig};
use std::path::PathBuf;
use std::process::Command;
use tch::{Device, Kind};

fn shm_path(tag: &str) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("lo-test-{tag}-{}", std::process::id()))
}

fn checksum(store: &HostStore) -> i64 {
    (0..store.num_layers())
        .filter_map(|i| store.block(i))
        .map(|b| b.sum(Kind::Int64).int64_value(&[]))
        .sum()
}

#[test]
fn a_published_store_serves_another_mapping_and_another_process() -> anyhow::Result<()> {
    let path = shm_path("pub");
    let model0 = Model::new(Device::Cpu, 4, false, 51);
    let mut model1 = Model::new(Device::Cpu, 4, false, 52);
    model1.vs.copy(&model0.vs)?;
    let before = model0.snapshot();
    let x = model0.input(3);
    let want = model0.forward(&x, None);

    let mut m0 = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .shared_memory(&path)
        .build(&model0.vs)?;
    m0.initialize()?;
    assert!(path.exists(), "the shared-memory file is there");
    let published = m0.host_store().unwrap();
    // Publishing the same path twice is refused (the file exists).
    let model2 = Model::new(Device::Cpu, 4, false, 53);
    let r = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .shared_memory(&path)
        .build(&model2.vs)?
        .initialize();
    assert!(matches!(r, Err(Error::HostAlloc { .. })), "{r:?}");

    // Another mapping of the same file, read-only, drives a second manager.
    let opened = HostStore::open_shared(&path, HostMemory::Pageable)?;
    assert!(opened.is_read_only());
    assert_eq!(opened.bytes(), published.bytes());
    assert_eq!(checksum(&opened), checksum(&published));
    let mut m1 = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .host_store(opened.clone())
        .build(&model1.vs)?;
    m1.initialize()?;
    assert!(bits_equal(&model1.forward(&x, Some(&mut m1)), &want));
    assert_eq!(m1.stats().host_bytes, 0);

    // A child process maps it as well and sees the same bytes.
    let out = Command::new(std::env::current_exe()?)
        .args([
            "--ignored",
            "--exact",
            "child_maps_the_published_store",
            "--nocapture",
        ])
        .env("LO_SHM_CHILD_PATH", &path)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let child: i64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHECKSUM "))
        .expect("child checksum")
        .trim()
        .parse()?;
    assert_eq!(child, checksum(&published));

    // Writes are refused while published (other processes read the pages) and in a reader.
    let w = m0.tensor("blocks.1.fc1.weight")?.copy();
    assert!(matches!(
        m0.update_tensor("blocks.1.fc1.weight", &w),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        m1.update_tensor("blocks.1.fc1.weight", &w),
        Err(Error::InvalidArgument { .. })
    ));

    // The publisher lets go: the file disappears, the reader's mapping stays valid.
    drop(published);
    m0.restore()?;
    assert!(!path.exists());
    assert_same(&model0.snapshot(), &before);
    assert!(bits_equal(&model1.forward(&x, Some(&mut m1)), &want));
    drop(opened);
    m1.restore()?;
    assert_same(&model1.snapshot(), &before);
    // Opening a store that is gone says so.
    match HostStore::open_shared(&path, HostMemory::Pageable) {
        Err(e) => assert!(e.to_string().contains("manifest"), "{e}"),
        Ok(_) => panic!("the store was removed"),
    }
    Ok(())
}

/// Run as a child process by the test above (with LO_SHM_CHILD_PATH set).
#[test]
#[ignore = "run as a child process by a_published_store_serves_another_mapping_and_another_process"]
fn child_maps_the_published_store() {
    let path = std::env::var("LO_SHM_CHILD_PATH").expect("LO_SHM_CHILD_PATH");
    let store =
        HostStore::open_shared(&path, HostMemory::Pageable).expect("open the published store");
    println!("CHECKSUM {}", checksum(&store));
}
