//! Each cause is reported once in an error's chain: the errors that wrap another (an I/O error,
//! libtorch's message, the codec's error) return it from `source()`, where its type and, for
//! I/O, its `ErrorKind` can be matched, and do not repeat it in their own message. `{:?}`, what
//! `main` prints for an `Err`, is the message with every cause below it. No GPU needed.

use layerwise_offload::accel::{self, HostMemory};
use layerwise_offload::checkpoint::Checkpoint;
use layerwise_offload::{Error, TorchMessage};
use std::error::Error as _;
use std::io::ErrorKind;

/// The messages of `e`'s chain, `e` first.
fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    std::iter::successors(Some(e), |&e| e.source())
        .map(|e| e.to_string())
        .collect()
}

/// Checks that no message of the chain repeats the one below it (a cause printed twice when
/// the chain is printed), and that `{:?}` holds each message exactly once.
fn each_cause_once(e: &Error) {
    let messages = chain(e);
    for pair in messages.windows(2) {
        assert!(
            !pair[0].contains(&pair[1]),
            "{:?} repeats its source {:?}",
            pair[0],
            pair[1]
        );
    }
    let debug = format!("{e:?}");
    for m in &messages {
        assert_eq!(debug.matches(m.as_str()).count(), 1, "{m:?} in:\n{debug}");
    }
}

#[test]
fn a_missing_checkpoint_is_an_io_error_whose_kind_is_not_found() {
    let dir = std::env::temp_dir().join(format!("lo-errors-{}", std::process::id()));
    let missing = dir.join("no-such-checkpoint.safetensors");
    let e = Checkpoint::open(&missing).expect_err("a missing file opens");
    match &e {
        Error::Io { path, .. } => assert_eq!(path, &missing),
        other => panic!("expected Error::Io, got {other:?}"),
    }
    let io = e
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("the io::Error is the source");
    assert_eq!(io.kind(), ErrorKind::NotFound);
    assert!(
        e.to_string().contains("no-such-checkpoint.safetensors"),
        "{e}"
    );
    assert!(e.to_string().contains("cannot open"), "{e}");
    each_cause_once(&e);
}

#[test]
fn an_unreadable_checkpoint_is_an_io_error_whose_kind_is_permission_denied() {
    // root reads any file: the kind cannot be produced by file modes there.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let e = Error::Io {
            op: "cannot open".into(),
            path: "x.safetensors".into(),
            source: std::io::Error::from(ErrorKind::PermissionDenied),
        };
        let io = e
            .source()
            .unwrap()
            .downcast_ref::<std::io::Error>()
            .unwrap();
        assert_eq!(io.kind(), ErrorKind::PermissionDenied);
        each_cause_once(&e);
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("lo-errors-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("locked.safetensors");
    std::fs::write(&file, b"x").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    let e = Checkpoint::open(&file).expect_err("an unreadable file opens");
    let _ = std::fs::remove_dir_all(&dir);
    let io = e
        .source()
        .unwrap()
        .downcast_ref::<std::io::Error>()
        .unwrap();
    assert_eq!(io.kind(), ErrorKind::PermissionDenied);
    each_cause_once(&e);
}

#[test]
fn a_libtorch_failure_keeps_the_message_as_its_source_once() {
    let e = Error::from(("upload", tch::TchError::Torch("shape mismatch".into())));
    assert!(matches!(e, Error::Torch { op: "upload", .. }), "{e:?}");
    assert!(!e.to_string().contains("shape mismatch"), "{e}");
    let source = e.source().expect("libtorch's message is the source");
    let message = source
        .downcast_ref::<TorchMessage>()
        .expect("a TorchMessage");
    assert!(message.0.ends_with("shape mismatch"), "{message}"); // tch's words around it
    assert!(source.source().is_none());
    assert_eq!(chain(&e).len(), 2);
    each_cause_once(&e);
    // Out of memory is classified the same way and keeps its source too.
    let e = Error::from((
        "alloc",
        tch::TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into()),
    ));
    assert!(e.is_out_of_memory());
    assert!(
        e.source()
            .unwrap()
            .to_string()
            .ends_with("CUDA out of memory. Tried to allocate 2.00 GiB")
    );
    each_cause_once(&e);
}

#[test]
fn a_failed_host_allocation_keeps_the_system_message_as_its_source_once() {
    // More than any machine's address space: mmap refuses it.
    let e = accel::alloc_host(1 << 60, HostMemory::Pageable).expect_err("2^60 bytes allocated");
    match &e {
        Error::HostAlloc { bytes, kind, .. } => {
            assert_eq!(*bytes, 1 << 60);
            assert_eq!(*kind, "pageable");
        }
        other => panic!("expected HostAlloc, got {other:?}"),
    }
    let source = e
        .source()
        .and_then(|s| s.downcast_ref::<TorchMessage>())
        .expect("the system's message is the source");
    assert!(!source.0.is_empty());
    each_cause_once(&e);
}

#[test]
fn a_codec_failure_is_the_source_once() {
    let refused = layerwise_offload_codec::decode(b"not an encoding", &mut [0u8; 16])
        .expect_err("garbage decodes");
    let text = refused.to_string();
    let e = Error::Codec {
        op: "decoding a block",
        source: refused,
    };
    let source = e
        .source()
        .and_then(|s| s.downcast_ref::<layerwise_offload_codec::CodecError>())
        .expect("the codec's error is the source");
    assert_eq!(source.to_string(), text);
    assert!(!e.to_string().contains(&text), "{e}");
    each_cause_once(&e);
}

#[test]
fn debug_is_the_message_with_its_causes_so_main_prints_the_advice() {
    // What `fn main() -> Result<(), Error>` prints is "Error: " and this Debug text.
    let e = Error::NoDevice {
        op: "OffloadConfig::build",
        reason: "libtorch has no CUDA support".into(),
    };
    let debug = format!("{e:?}");
    assert_eq!(debug, e.to_string(), "no cause: the message alone");
    assert!(
        debug.contains("run it on a machine with a CUDA GPU, or use the CPU test mode"),
        "{debug}"
    );
    assert!(!debug.contains("NoDevice {"), "{debug}");
    // With causes: each on its own line below the message.
    let e = Error::Io {
        op: "cannot open".into(),
        path: "model.safetensors".into(),
        source: std::io::Error::from(ErrorKind::NotFound),
    };
    let debug = format!("{e:?}");
    assert!(
        debug.starts_with("model.safetensors: cannot open\n\nCaused by:\n    "),
        "{debug}"
    );
    assert!(debug.ends_with("entity not found"), "{debug}");
}
