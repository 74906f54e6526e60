//! A host copy published in a shared-memory file and streamed by a manager of another process
//! (here: a second mapping in this process, and a child process that maps it too).

use offload_testkit as common;

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
    (0..store.num_blocks())
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
    assert!(
        matches!(&r, Err(e @ Error::SharedFile { .. }) if e.to_string().contains("already exists")),
        "{r:?}"
    );

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

/// A store of `n` blocks of `side x side` f32 weights, as a list of named tensors.
fn square_blocks(n: usize, side: i64) -> Vec<(String, tch::Tensor)> {
    tch::manual_seed(11);
    (0..n)
        .map(|i| {
            (
                format!("blocks.{i}.w"),
                tch::Tensor::randn([side, side], (Kind::Float, Device::Cpu)),
            )
        })
        .collect()
}

/// Publishes a small store at `path` (CPU test mode); returns the manager that holds it.
fn publish(path: &std::path::Path) -> layerwise_offload::LayerwiseOffloadManager {
    let named = square_blocks(2, 16);
    let mut m = OffloadConfig::new("blocks", 2)
        .cpu_test_mode(true)
        .shared_memory(path)
        .build(&named)
        .expect("build");
    m.initialize().expect("publish");
    m
}

fn manifest_of(path: &std::path::Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".manifest");
    PathBuf::from(p)
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A copy of a published store (file and manifest) at `to`, owned by this user, mode 0600.
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    std::fs::copy(from, to).unwrap();
    std::fs::copy(manifest_of(from), manifest_of(to)).unwrap();
    set_mode(to, 0o600);
    set_mode(&manifest_of(to), 0o600);
}

fn remove_store(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(manifest_of(path));
}

/// The refusal `open_shared` gives for `path`, which must name `why`.
fn assert_refused(path: &std::path::Path, why: &str) {
    match HostStore::open_shared(path, HostMemory::Pageable) {
        Err(e) => {
            assert!(matches!(e, Error::SharedFile { .. }), "{e:?}");
            assert!(e.to_string().contains(why), "{e}");
        }
        Ok(_) => panic!("{} was mapped; it must be refused ({why})", path.display()),
    }
}

#[test]
fn the_manifest_is_private_and_a_private_copy_opens() {
    use std::os::unix::fs::PermissionsExt;
    let path = shm_path("private");
    let m = publish(&path);
    for p in [path.clone(), manifest_of(&path)] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }
    // The refusals below are about the files, not the format: a private copy opens.
    let copy = shm_path("private-copy");
    copy_store(&path, &copy);
    let opened = HostStore::open_shared(&copy, HostMemory::Pageable).expect("a private copy opens");
    assert_eq!(checksum(&opened), checksum(&m.host_store().unwrap()));
    remove_store(&copy);
}

#[test]
fn a_symlink_is_refused() {
    let path = shm_path("symlink-target");
    let _m = publish(&path);
    // The data file is a symbolic link to a real store.
    let link = shm_path("symlink");
    std::fs::copy(manifest_of(&path), manifest_of(&link)).unwrap();
    set_mode(&manifest_of(&link), 0o600);
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert_refused(&link, "symbolic link");
    remove_store(&link);
    // The manifest is a symbolic link.
    let link = shm_path("symlink-manifest");
    std::fs::copy(&path, &link).unwrap();
    set_mode(&link, 0o600);
    std::os::unix::fs::symlink(manifest_of(&path), manifest_of(&link)).unwrap();
    assert_refused(&link, "symbolic link");
    remove_store(&link);
}

#[test]
fn a_file_writable_by_others_is_refused() {
    let path = shm_path("mode-source");
    let _m = publish(&path);
    let copy = shm_path("mode-0666");
    copy_store(&path, &copy);
    set_mode(&copy, 0o666);
    assert_refused(&copy, "writable by group or others");
    set_mode(&copy, 0o600);
    set_mode(&manifest_of(&copy), 0o620);
    assert_refused(&copy, "writable by group or others");
    remove_store(&copy);
}

#[test]
fn a_file_of_another_user_is_refused() {
    let path = shm_path("owner-source");
    let _m = publish(&path);
    let copy = shm_path("owner-65534");
    copy_store(&path, &copy);
    if let Err(e) = std::os::unix::fs::chown(&copy, Some(65534), Some(65534)) {
        eprintln!("SKIP: cannot chown a file to uid 65534 to stand for another user ({e})");
        remove_store(&copy);
        return;
    }
    assert_refused(&copy, "owned by uid 65534");
    // The manifest of another user, too.
    std::os::unix::fs::chown(&copy, Some(my_uid()), None).unwrap();
    std::os::unix::fs::chown(manifest_of(&copy), Some(65534), Some(65534)).unwrap();
    assert_refused(&copy, "owned by uid 65534");
    remove_store(&copy);
}

/// This process's effective uid, as the owner of a file it just created.
fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    let probe = shm_path("uid-probe");
    std::fs::write(&probe, b"").unwrap();
    let uid = std::fs::metadata(&probe).unwrap().uid();
    std::fs::remove_file(&probe).unwrap();
    uid
}

#[test]
fn a_squatted_path_is_a_typed_error_for_the_publisher() {
    let named = square_blocks(2, 16);
    let try_publish = |path: &std::path::Path| {
        OffloadConfig::new("blocks", 2)
            .cpu_test_mode(true)
            .shared_memory(path)
            .build(&named)
            .expect("build")
            .initialize()
    };
    // A file another user planted at the path (or a stale one).
    let path = shm_path("squat-file");
    std::fs::write(&path, b"planted").unwrap();
    set_mode(&path, 0o666);
    let _ = std::os::unix::fs::chown(&path, Some(65534), Some(65534));
    match try_publish(&path) {
        Err(e @ Error::SharedFile { .. }) => assert!(e.to_string().contains("exists"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"planted", "left as it was");
    std::fs::remove_file(&path).unwrap();

    // A symbolic link planted at the path: refused, its target untouched.
    let victim = shm_path("squat-victim");
    std::fs::write(&victim, b"victim").unwrap();
    let path = shm_path("squat-link");
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    match try_publish(&path) {
        Err(e @ Error::SharedFile { .. }) => {
            assert!(e.to_string().contains("symbolic link"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    std::fs::remove_file(&path).unwrap();

    // A symbolic link planted at the manifest's temporary name: the manifest is not written
    // through it, and the half-published store is removed (by the time the manager is gone).
    let path = shm_path("squat-manifest");
    let mut tmp = manifest_of(&path).into_os_string();
    tmp.push(".tmp");
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    match try_publish(&path) {
        Err(e @ Error::SharedFile { .. }) => {
            assert!(e.to_string().contains("symbolic link"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"victim",
        "not written through the link"
    );
    assert!(!path.exists(), "the half-published store is removed");
    assert!(!manifest_of(&path).exists());
    let _ = std::fs::remove_file(&tmp); // the link (the failed publish may have removed it)
    std::fs::remove_file(&victim).unwrap();
}

#[test]
fn a_file_system_without_room_is_an_error_not_sigbus() {
    // The child mounts a 1 MiB tmpfs in a mount namespace of its own (nothing leaks to the
    // machine's mounts) and publishes a 4 MiB store there.
    let dir = std::env::temp_dir().join(format!("lo-small-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new("unshare")
        .arg("-m")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_publishes_into_a_small_tmpfs",
            "--nocapture",
        ])
        .env("LO_SMALL_TMPFS_DIR", &dir)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: cannot mount a small tmpfs: `unshare -m` does not start ({e})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.contains("SKIP:"))
    {
        eprintln!("{line}");
        return;
    }
    if !out.status.success() && stderr.contains("unshare failed") {
        eprintln!("SKIP: cannot mount a small tmpfs: {stderr}");
        return;
    }
    assert!(
        out.status.success(),
        "the child died ({:?}): publishing into a full file system must be an error, not a signal\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("NO_ROOM_REPORTED"), "{stdout}\n{stderr}");
}

/// Run as a child process in a mount namespace of its own by the test above.
#[test]
#[ignore = "run as a child process by a_file_system_without_room_is_an_error_not_sigbus"]
fn child_publishes_into_a_small_tmpfs() {
    let dir = PathBuf::from(std::env::var("LO_SMALL_TMPFS_DIR").expect("LO_SMALL_TMPFS_DIR"));
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(&dir)
        .output()
        .expect("mount starts");
    if !mounted.status.success() {
        println!(
            "SKIP: cannot mount a small tmpfs: {}",
            String::from_utf8_lossy(&mounted.stderr).trim()
        );
        return;
    }
    let path = dir.join("store");
    let named = square_blocks(4, 512); // 4 MiB of blocks
    let before: Vec<tch::Tensor> = named.iter().map(|(_, t)| t.copy()).collect();
    let mut m = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .shared_memory(&path)
        .build(&named)
        .unwrap();
    let r = m.initialize();
    match &r {
        Err(e @ Error::HostAlloc { .. }) => {
            // The system's message is the source, printed once below the error's own.
            let cause = std::error::Error::source(e).expect("a source").to_string();
            assert!(cause.contains("No space left"), "{e:?}");
            assert!(!e.to_string().contains("No space left"), "{e:?}");
        }
        other => panic!("expected HostAlloc (no space), got {other:?}"),
    }
    assert!(!path.exists(), "the half-created file is removed");
    assert!(!manifest_of(&path).exists());
    m.restore().unwrap();
    for ((_, t), b) in named.iter().zip(&before) {
        assert!(bits_equal(t, b), "the model is untouched");
    }
    println!("NO_ROOM_REPORTED {}", r.unwrap_err());
}

#[test]
fn names_with_spaces_and_newlines_round_trip() {
    let path = shm_path("odd-names");
    let odd = [
        "blocks.0.a weight with spaces",
        "blocks.0.b\nlayer blocks 9 0 4096 1",
        "blocks.1.\"quoted\"\ttab\\",
        "blocks.1.unicode\u{e9}\u{2603}",
    ];
    tch::manual_seed(3);
    let named: Vec<(String, tch::Tensor)> = odd
        .iter()
        .map(|n| {
            (
                n.to_string(),
                tch::Tensor::randn([8, 4], (Kind::Float, Device::Cpu)),
            )
        })
        .collect();
    let want: Vec<tch::Tensor> = named.iter().map(|(_, t)| t.copy()).collect();
    let mut m = OffloadConfig::new("blocks", 2)
        .cpu_test_mode(true)
        .shared_memory(&path)
        .build(&named)
        .unwrap();
    m.initialize().unwrap();
    let opened = HostStore::open_shared(&path, HostMemory::Pageable).expect("the manifest parses");
    assert_eq!(opened.num_blocks(), 2, "no line was injected");
    assert_eq!(checksum(&opened), checksum(&m.host_store().unwrap()));
    // A second model of the same names streams from the opened store, with the same values.
    let named2: Vec<(String, tch::Tensor)> = odd
        .iter()
        .map(|n| {
            (
                n.to_string(),
                tch::Tensor::zeros([8, 4], (Kind::Float, Device::Cpu)),
            )
        })
        .collect();
    let mut m2 = OffloadConfig::new("blocks", 2)
        .cpu_test_mode(true)
        .host_store(opened)
        .build(&named2)
        .unwrap();
    m2.initialize().unwrap();
    for (n, w) in odd.iter().zip(&want) {
        assert!(bits_equal(&m2.tensor(n).unwrap(), w), "{n:?}");
    }
}

#[test]
fn crafted_manifests_are_refused_not_panics() {
    let path = shm_path("crafted-source");
    let _m = publish(&path); // two blocks of 16x16 f32: 1 KiB each, at 0 and 4096
    let copy = shm_path("crafted");
    copy_store(&path, &copy);
    let total = std::fs::metadata(&copy).unwrap().len();
    let tensor = |offset: u64, bytes: u64, shape: &str, strides: &str| {
        format!(
            r#"{{"name":"blocks.0.w","dtype":"Float","offset":{offset},"bytes":{bytes},"shape":{shape},"strides":{strides}}}"#
        )
    };
    let layer = |index: u64, offset: &str, bytes: u64, tensors: &str| {
        format!(
            r#"{{"attr":"blocks","index":{index},"offset":{offset},"bytes":{bytes},"tensors":[{tensors}]}}"#
        )
    };
    let store = |layers: &[String]| {
        format!(
            r#"{{"format":"layerwise-offload host store","version":2,"bytes":{total},"layers":[{}]}}"#,
            layers.join(",")
        )
    };
    let ok_tensor = tensor(0, 1024, "[16,16]", "[16,1]");
    let cases: Vec<(&str, String)> = vec![
        (
            "the old line format, an offset + bytes that overflows",
            format!(
                "layerwise-offload host store 1\nbytes {total}\nlayer blocks 0 9223372036854775807 18446744073709551615 1\n"
            ),
        ),
        (
            "offset + bytes overflows",
            store(&[layer(0, "18446744073709551615", 1024, &ok_tensor)]),
        ),
        (
            "a block past the end of the file",
            store(&[layer(0, "4096", 8192, &ok_tensor)]),
        ),
        (
            "two blocks that overlap",
            store(&[
                layer(0, "0", 4096, &ok_tensor),
                layer(1, "0", 4096, &ok_tensor.replace("blocks.0", "blocks.1")),
            ]),
        ),
        (
            "a tensor past the end of its block",
            store(&[layer(
                0,
                "0",
                4096,
                &tensor(3584, 1024, "[16,16]", "[16,1]"),
            )]),
        ),
        (
            "a tensor offset that overflows",
            store(&[layer(
                0,
                "0",
                4096,
                &tensor(u64::MAX, 1024, "[16,16]", "[16,1]"),
            )]),
        ),
        (
            "strides that reach outside the tensor's bytes",
            store(&[layer(0, "0", 4096, &tensor(0, 1024, "[16,16]", "[1000,1]"))]),
        ),
        (
            "bytes that do not match the shape",
            store(&[layer(
                0,
                "0",
                4096,
                &tensor(0, 1024, "[4611686018427387904,4]", "[4,1]"),
            )]),
        ),
        (
            "a negative dimension",
            store(&[layer(0, "0", 4096, &tensor(0, 1024, "[-16,-16]", "[16,1]"))]),
        ),
        (
            "an unknown dtype",
            store(&[layer(0, "0", 4096, &ok_tensor.replace("Float", "Quux"))]),
        ),
        ("not JSON at all", "\u{0}\u{1}garbage".to_owned()),
        (
            "a total that is not the file's size",
            store(&[]).replace(&format!("{total}"), "1"),
        ),
    ];
    for (what, text) in cases {
        std::fs::write(manifest_of(&copy), &text).unwrap();
        set_mode(&manifest_of(&copy), 0o600);
        let r = std::panic::catch_unwind(|| HostStore::open_shared(&copy, HostMemory::Pageable));
        match r {
            Ok(Err(Error::SharedFile { reason, .. })) => {
                assert!(!reason.is_empty(), "{what}")
            }
            Ok(Err(e)) => panic!("{what}: expected SharedFile, got {e:?}"),
            Ok(Ok(_)) => panic!("{what}: accepted:\n{text}"),
            Err(_) => panic!("{what}: open_shared panicked on:\n{text}"),
        }
    }
    remove_store(&copy);
}

#[test]
fn blocks_published_without_a_host_copy_are_not_read_from_another_block() {
    // Under a VRAM budget without shareable(true), the publisher keeps some blocks resident with
    // no host copy: the store holds no bytes for them, and a reader must not map any.
    let path = shm_path("partial");
    let named = square_blocks(4, 32); // 4 KiB blocks
    let zeros: Vec<(String, tch::Tensor)> = named
        .iter()
        .map(|(n, t)| (n.clone(), t.zeros_like()))
        .collect();
    let block = 4096; // 32 x 32 f32
    let mut m = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .vram_budget(3 * block) // a ring of two slots and one resident block
        .shared_memory(&path)
        .build(&named)
        .unwrap();
    m.initialize().unwrap();
    let kept = m.stats().resident_blocks;
    assert!(
        kept > 0 && kept < 4,
        "some blocks resident, some streamed: {kept}"
    );
    let opened = HostStore::open_shared(&path, HostMemory::Pageable).unwrap();
    let held = (0..4).filter(|&i| opened.block(i).is_some()).count();
    assert_eq!(
        held,
        4 - kept,
        "only the streamed blocks have bytes in the file"
    );
    assert_eq!(opened.bytes(), m.host_store().unwrap().bytes());
    // A reader that needs every block is told why it cannot have them.
    match OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .host_store(opened)
        .build(&zeros)
        .unwrap()
        .initialize()
    {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("shareable"), "{e}")
        }
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
}

/// `path` with `suffix` appended (`.manifest`, `.manifest.tmp`).
fn with_suffix(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// A new shared-memory file whose page-locking (`cudaHostRegister`) fails is removed, with
/// its manifest and the manifest's temporary: the publisher gets a typed error and the model
/// is as it was. The failure is injected with the `testing` knob
/// `HostMemory::fail_next_registration`; registration only happens with CUDA (pinned host
/// memory), so the CPU test mode shows the knob is never consumed there and the real check
/// runs on a CUDA device (SKIP without one, unless OFFLOAD_REQUIRE_CUDA=1).
#[test]
fn a_failed_registration_of_a_new_file_removes_it() -> anyhow::Result<()> {
    let leftovers = |path: &std::path::Path| -> Vec<PathBuf> {
        [
            path.to_owned(),
            manifest_of(path),
            with_suffix(path, ".manifest.tmp"),
        ]
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
    };

    // CPU test mode: host memory is pageable, nothing is registered, the knob stays armed.
    let path = shm_path("register-cpu");
    remove_store(&path);
    let model = Model::new(Device::Cpu, 3, false, 61);
    let mut m = OffloadConfig::new("blocks", 3)
        .cpu_test_mode(true)
        .shared_memory(&path)
        .build(&model.vs)?;
    HostMemory::fail_next_registration();
    let r = m.initialize();
    let still_armed = HostMemory::clear_registration_failure();
    r?;
    assert!(
        still_armed,
        "the CPU test mode registered host memory: this test must then run in it too"
    );
    drop(m);
    remove_store(&path);

    let Some(dev) = common::cuda() else {
        return Ok(());
    };
    let path = shm_path("register-cuda");
    remove_store(&path);
    let model = Model::new(Device::Cuda(dev), 3, false, 62);
    let before = model.snapshot();
    let x = model.input(4);
    let want = model.forward(&x, None);
    let mut m = OffloadConfig::new("blocks", 3)
        .pin_cpu_memory(true)
        .shared_memory(&path)
        .build(&model.vs)?;
    HostMemory::fail_next_registration();
    let r = m.initialize();
    let still_armed = HostMemory::clear_registration_failure();
    assert!(!still_armed, "initialize registered no host memory");
    match &r {
        Err(e @ Error::HostAlloc { .. }) => {
            let text = format!("{e:?}"); // the message and its source
            assert!(
                text.contains("shared pinned") && text.contains("injected"),
                "the error of the shared file's registration: {text}"
            );
        }
        other => panic!("expected HostAlloc from the failed registration, got {other:?}"),
    }
    let left = leftovers(&path);
    remove_store(&path);
    let _ = std::fs::remove_file(with_suffix(&path, ".manifest.tmp"));
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!m.is_initialized());
    assert_same(&model.snapshot(), &before);

    // Nothing stale is in the way: initialize() again publishes, and the forward is exact.
    m.initialize()?;
    assert!(path.exists() && manifest_of(&path).exists());
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    drop(m);
    remove_store(&path);
    Ok(())
}

/// A reader of a published store (a manager over `HostStore::open_shared`) dropped without
/// `restore()` leaves its model's block tensors in memory the model owns: in-place writes work
/// (they were views of the read-only mapping: SIGSEGV), truncating the file afterwards does
/// not reach them (SIGBUS), and `HostStore::block` of a read-only store is a copy to write.
#[test]
fn a_dropped_reader_leaves_writable_weights() -> anyhow::Result<()> {
    let path = shm_path("reader-drop");
    let model0 = Model::new(Device::Cpu, 4, false, 61);
    // The reader's model: the publisher's other tensors, zeros in its blocks (their values come
    // from the store).
    let mut model1 = Model::new(Device::Cpu, 4, false, 62);
    model1.vs.copy(&model0.vs)?;
    for (n, mut t) in model1.vs.variables() {
        if n.starts_with("blocks.") {
            tch::no_grad(|| {
                let _ = t.zero_();
            });
        }
    }
    let before = model0.snapshot();
    let x = model0.input(3);
    let want = model0.forward(&x, None);
    let mut m0 = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .shared_memory(&path)
        .build(&model0.vs)?;
    m0.initialize()?;
    // Kept open to truncate the file once the publisher has let go of it.
    let file = std::fs::OpenOptions::new().write(true).open(&path)?;

    let opened = HostStore::open_shared(&path, HostMemory::Pageable)?;
    let mut m1 = OffloadConfig::new("blocks", 4)
        .cpu_test_mode(true)
        .host_store(opened.clone())
        .build(&model1.vs)?;
    m1.initialize()?;
    assert!(bits_equal(&model1.forward(&x, Some(&mut m1)), &want));
    drop(m1);

    // The reader's model holds the published values, in memory of its own.
    assert_same(&model1.snapshot(), &before);
    for (n, t) in model1.vs.variables() {
        if !n.starts_with("blocks.") {
            continue;
        }
        let mut t = t.shallow_clone();
        tch::no_grad(|| {
            let _ = t.fill_(2.5);
        });
        assert!(bits_equal(&t, &t.full_like(2.5)), "{n}: fill_");
        let old = before
            .iter()
            .find(|(b, _)| *b == n)
            .unwrap()
            .1
            .shallow_clone();
        tch::no_grad(|| t.copy_(&old));
    }
    assert_same(&model1.snapshot(), &before);

    // HostStore::block of the read-only store: a copy, which may be written.
    let mut block = opened.block(0).expect("one buffer per block");
    tch::no_grad(|| {
        let _ = block.fill_(0);
    });
    assert_eq!(
        checksum(&opened),
        checksum(&m0.host_store().unwrap()),
        "writing HostStore::block's copy changed the store"
    );
    drop(opened);
    // So is accel::map_host_file's read-only open of the file.
    let len = std::fs::metadata(&path)?.len() as usize;
    let mut mapped = layerwise_offload::accel::map_host_file(
        &path,
        len,
        layerwise_offload::accel::FileMapping::OpenReadOnly,
        HostMemory::Pageable,
    )?;
    let sum = |t: &tch::Tensor| t.sum(Kind::Int64).int64_value(&[]);
    let published_sum = checksum(&m0.host_store().unwrap());
    tch::no_grad(|| {
        let _ = mapped.fill_(1);
    });
    assert_eq!(sum(&mapped), len as i64);
    assert_eq!(checksum(&m0.host_store().unwrap()), published_sum);

    // The publisher restores (its file is removed), then the file is truncated.
    m0.restore()?;
    assert!(!path.exists());
    file.set_len(0)?;
    assert_same(&model1.snapshot(), &before);
    assert!(bits_equal(&model1.forward(&x, None), &want));
    Ok(())
}

/// A model with `source`'s non-block weights and zeros in its blocks (which a store fills).
fn blank_blocks(source: &Model, seed: i64) -> Model {
    let from: Vec<(String, tch::Tensor)> = source.vs.variables().into_iter().collect();
    blank_blocks_from(&from, seed)
}

/// A model with the non-block weights of `from` (name, value) and zeros in its blocks.
fn blank_blocks_from(from: &[(String, tch::Tensor)], seed: i64) -> Model {
    let m = Model::new(Device::Cpu, 2, true, seed);
    tch::no_grad(|| {
        for (n, mut t) in m.vs.variables() {
            if n.contains("_blocks.") {
                let _ = t.zero_();
            } else {
                let v = &from
                    .iter()
                    .find(|(f, _)| *f == n)
                    .expect("a non-block weight")
                    .1;
                t.copy_(v);
            }
        }
    });
    m
}

/// Publishes a compressed store of a two-list model (seed 61) at `path`, in the CPU test mode.
fn publish_encoded(
    path: &std::path::Path,
    model: &Model,
) -> layerwise_offload::LayerwiseOffloadManager {
    let mut m = OffloadConfig::new("double_blocks", 2)
        .with_list("single_blocks", 3)
        .cpu_test_mode(true)
        .compress(true)
        .shared_memory(path)
        .build(&model.vs)
        .expect("build");
    m.initialize().expect("publish");
    m
}

/// A compressed publisher's store holds the encodings: its manifest says so with the codec's
/// format version; a reader (with or without `compress`) and a child process stream them
/// bit-exact; a raw store refuses `compress(true)` saying what to change; a corrupted
/// encoding is refused at `open_shared`; every `restore` gives the weights back.
#[test]
fn an_encoded_store_serves_other_processes() -> anyhow::Result<()> {
    let path = shm_path("encoded");
    let model0 = Model::new(Device::Cpu, 2, true, 61);
    let before = model0.snapshot();
    let x = model0.input(3);
    let want = model0.forward(&x, None);
    let mut m0 = publish_encoded(&path, &model0);
    let published = m0.host_store().unwrap();
    assert!(published.is_encoded());
    assert_eq!(m0.stats().encoded_blocks, 5);
    let manifest = std::fs::read_to_string(manifest_of(&path))?;
    assert!(manifest.contains("\"codec_version\""), "{manifest}");
    assert!(bits_equal(&model0.forward(&x, Some(&mut m0)), &want));

    let opened = HostStore::open_shared(&path, HostMemory::Pageable)?;
    assert!(opened.is_read_only() && opened.is_encoded());
    assert_eq!(opened.bytes(), published.bytes());
    for compress in [false, true] {
        let model1 = blank_blocks(&model0, 62);
        let mut m1 = OffloadConfig::new("double_blocks", 2)
            .with_list("single_blocks", 3)
            .cpu_test_mode(true)
            .compress(compress)
            .host_store(opened.clone())
            .build(&model1.vs)?;
        m1.initialize()?;
        for round in 0..2 {
            assert!(
                bits_equal(&model1.forward(&x, Some(&mut m1)), &want),
                "compress {compress}, forward {round}"
            );
        }
        let mut got = m1.named_tensors()?;
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_same(&got, &before);
        m1.restore()?;
        assert_same(&model1.snapshot(), &before);
    }

    // A child process streams from it as well: it gets the weights, the input and the
    // expected output in a file (other tests of this process reseed the global generator, so
    // it could not rebuild them from the seed).
    let expect =
        std::env::temp_dir().join(format!("lo-enc-child-{}.safetensors", std::process::id()));
    let mut saved: Vec<(String, tch::Tensor)> = before
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    saved.push(("__x".into(), x.shallow_clone()));
    saved.push(("__want".into(), want.shallow_clone()));
    tch::Tensor::write_safetensors(&saved, &expect)?;
    let out = Command::new(std::env::current_exe()?)
        .args([
            "--ignored",
            "--exact",
            "child_streams_the_encoded_store",
            "--nocapture",
        ])
        .env("LO_SHM_CHILD_PATH", &path)
        .env("LO_SHM_CHILD_EXPECT", &expect)
        .output()?;
    std::fs::remove_file(&expect)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("BIT-EXACT"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A damaged copy of the store is refused when opened.
    let copy = shm_path("encoded-copy");
    copy_store(&path, &copy);
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&copy)?;
        let mut b = [0u8];
        f.read_exact_at(&mut b, 200)?;
        f.write_all_at(&[b[0] ^ 1], 200)?;
    }
    assert_refused(&copy, "is corrupt");
    remove_store(&copy);

    drop((published, opened));
    m0.restore()?;
    assert!(!path.exists());
    assert_same(&model0.snapshot(), &before);

    // A raw store and compress(true): refused, naming what to change; the model is untouched.
    let raw_path = shm_path("raw-for-compress");
    let raw = publish(&raw_path);
    let named = square_blocks(2, 16);
    let snapshot: Vec<tch::Tensor> = named.iter().map(|(_, t)| t.copy()).collect();
    let r = OffloadConfig::new("blocks", 2)
        .cpu_test_mode(true)
        .compress(true)
        .host_store(raw.host_store().unwrap())
        .build(&named)?
        .initialize();
    match r {
        Err(e @ Error::InvalidArgument { .. }) => {
            assert!(e.to_string().contains("without compress(true)"), "{e}")
        }
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    for ((n, t), s) in named.iter().zip(&snapshot) {
        assert!(bits_equal(t, s), "{n}");
    }
    drop(raw);
    Ok(())
}

/// Run as a child process by the test above (with LO_SHM_CHILD_PATH set): streams the
/// published encoded store and compares with the resident model it was made from.
#[test]
#[ignore = "run as a child process by an_encoded_store_serves_other_processes"]
fn child_streams_the_encoded_store() {
    let path = std::env::var("LO_SHM_CHILD_PATH").expect("LO_SHM_CHILD_PATH");
    let store =
        HostStore::open_shared(&path, HostMemory::Pageable).expect("open the published store");
    let expect = std::env::var("LO_SHM_CHILD_EXPECT").expect("LO_SHM_CHILD_EXPECT");
    let mut saved = tch::Tensor::read_safetensors(expect).expect("the expected values");
    saved.sort_by(|a, b| a.0.cmp(&b.0));
    let take = |name: &str| {
        saved
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .shallow_clone()
    };
    let (x, want) = (take("__x"), take("__want"));
    saved.retain(|(n, _)| !n.starts_with("__"));
    let model = blank_blocks_from(&saved, 63);
    let mut m = OffloadConfig::new("double_blocks", 2)
        .with_list("single_blocks", 3)
        .cpu_test_mode(true)
        .host_store(store)
        .build(&model.vs)
        .expect("build");
    m.initialize().expect("initialize");
    assert!(bits_equal(&model.forward(&x, Some(&mut m)), &want));
    m.restore().expect("restore");
    assert_same(&model.snapshot(), &saved);
    println!("BIT-EXACT");
}

/// A compressed publish that fails half-way leaves the model as it was and no file behind.
#[test]
fn a_failed_encoded_publish_rolls_back() -> anyhow::Result<()> {
    let path = shm_path("encoded-fail");
    let model = Model::new(Device::Cpu, 2, true, 64);
    let before = model.snapshot();
    let mut m = OffloadConfig::new("double_blocks", 2)
        .with_list("single_blocks", 3)
        .cpu_test_mode(true)
        .compress(true)
        .shared_memory(&path)
        .inject_fault(layerwise_offload::Fault::HostAlloc(3))
        .build(&model.vs)?;
    assert!(matches!(m.initialize(), Err(Error::HostAlloc { .. })));
    assert_same(&model.snapshot(), &before);
    assert!(!path.exists() && !manifest_of(&path).exists());
    Ok(())
}
