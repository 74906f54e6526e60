//! `offload-bench` end to end on the CPU (the manager's CPU test mode): full streaming and two
//! budgets on the tiny preset, with results equal to the resident model's.

use std::path::PathBuf;
use std::process::Command;

/// The binary cargo built; or, where the tests were copied to another machine without the
/// build tree, the copy next to them (`<dir>/tests/<test>` and `<dir>/bins/offload-bench`).
fn bench() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_offload-bench"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("bins/offload-bench"))
        .filter(|p| p.exists())
        .unwrap_or(built)
}

#[test]
fn offload_bench_runs_in_cpu_test_mode() {
    let out = Command::new(bench())
        .args([
            "--cpu",
            "--preset",
            "tiny",
            "--layers",
            "4",
            "--tokens",
            "32",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--budgets",
            "0.01,1",
            "--gpus",
            "2",
        ])
        .output()
        .expect("offload-bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "offload-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|j| serde_json::from_str(j).expect("RESULT lines are JSON"))
        .collect();
    let (multi, rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| !r["gpus"].is_null());
    assert_eq!(rows.len(), 3, "full streaming and two budgets:\n{stdout}");
    // --gpus 2 (two CPU "devices" here): one row per device and mode (each GPU uploading every
    // block, then a peer group), one host copy, exact outputs.
    assert_eq!(multi.len(), 4, "{stdout}");
    for (i, r) in multi.iter().enumerate() {
        let mode = if i < 2 { "shared host copy" } else { "peer split" };
        assert_eq!(r["mode"], mode, "{r}");
        assert_eq!(r["gpu"], i % 2);
        assert!(r["delivered_gib_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["max_abs_diff"].as_f64(), Some(0.0), "{r}");
        assert_eq!(
            r["host_bytes"], rows[0]["streamed_bytes"],
            "the block bytes, held once"
        );
    }
    for r in &rows {
        assert_eq!(
            r["max_abs_diff"].as_f64(),
            Some(0.0),
            "streamed output differs from resident: {r}"
        );
        assert!(r["ms"].as_f64().unwrap() > 0.0);
        for key in [
            "device",
            "preset",
            "tokens",
            "floor_ms",
            "peak_vram_bytes",
            "init_s",
            "host_peak_bytes",
            "resident_blocks",
        ] {
            assert!(!r[key].is_null(), "missing {key}: {r}");
        }
    }
    assert_eq!(
        rows[0]["resident_blocks"], 0,
        "no budget: everything streams"
    );
    assert_eq!(
        rows[2]["resident_blocks"], 4,
        "a 1 GiB budget holds the tiny stack"
    );
    assert_eq!(rows[2]["streamed_bytes"], 0);
    assert!(
        stdout.contains("| device | preset | tokens |"),
        "markdown table header"
    );
    // Bad input: a readable error, not a panic.
    let bad = Command::new(bench())
        .args(["--preset", "huge"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown preset"));
}
