//! `offload-bench` end to end on the CPU (the manager's CPU test mode): the wan crate's model on
//! the tiny preset, full streaming, budgets and the several-"GPU" modes, with results equal to
//! the resident model's.

use offload_testkit as common;

use std::path::PathBuf;
use std::process::Command;

/// The binary of the `offload-bench` workspace member, which `cargo build` / `cargo test` at the
/// workspace root build: in cargo's target dir next to `deps/` (this test is in `deps/`), or,
/// where the tests were copied to another machine without the build tree, the copy next to them
/// (`<dir>/tests/<test>` and `<dir>/bins/offload-bench`).
fn bench() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("a target dir");
    [dir.join("offload-bench"), dir.join("bins/offload-bench")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "offload-bench is not built in {}: run `cargo build -p offload-bench` (or test from the workspace root)",
                dir.display()
            )
        })
}

/// The CPU test mode on four tiny blocks, 32 tokens, one timed forward: the runs' common flags.
const TINY: [&str; 13] = [
    "--cpu", "--preset", "tiny", "--layers", "4", "--tokens", "32", "--ctx", "16", "--reps", "1",
    "--warmup", "0",
];

/// The tiny CPU run with `extra` flags.
fn tiny_run(extra: &[&str]) -> std::process::Output {
    Command::new(bench())
        .args(TINY)
        .args(extra)
        .output()
        .expect("offload-bench starts")
}

#[test]
fn offload_bench_runs_in_cpu_test_mode() {
    let out = tiny_run(&["--budgets", "0.015,1", "--gpus", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = common::cli::result_rows("offload-bench", &out);
    let (multi, rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| !r["gpus"].is_null());
    assert_eq!(rows.len(), 3, "full streaming and two budgets:\n{stdout}");
    // --gpus 2 (two CPU "devices" here, each with its own instance of the model): one row per
    // device and mode (each GPU uploading every block, then a peer group), one host copy, exact
    // outputs.
    assert_eq!(multi.len(), 4, "{stdout}");
    for (i, r) in multi.iter().enumerate() {
        assert_eq!(r["model"], "wan", "{r}");
        assert_eq!(r["layers"], 4, "{r}");
        let mode = if i < 2 {
            "shared host copy"
        } else {
            "peer split"
        };
        assert_eq!(r["mode"], mode, "{r}");
        assert_eq!(r["gpu"], i % 2);
        assert!(r["delivered_gib_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ms_sustained"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["max_abs_diff"].as_f64(), Some(0.0), "{r}");
        assert_eq!(
            r["host_bytes"], rows[0]["streamed_bytes"],
            "the block bytes, held once"
        );
    }
    for r in &rows {
        assert_eq!(r["model"], "wan", "{r}");
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
    let held = rows[1]["resident_blocks"].as_u64().unwrap();
    assert!(
        (1..4).contains(&held),
        "0.015 GiB holds some of the 4 tiny blocks (4 MiB each, beside the slot ring), not all: {}",
        rows[1]
    );
    assert_eq!(
        rows[2]["resident_blocks"], 4,
        "a 1 GiB budget holds the tiny model"
    );
    assert_eq!(rows[2]["streamed_bytes"], 0);
    assert!(
        stdout.contains("| device | preset | tokens |"),
        "markdown table header"
    );
}

/// Runs the tiny CPU run with `extra` flags and asserts its rows' modes, in order, and that
/// every output equals the resident model's.
fn assert_exact_rows(extra: &[&str], modes: &[&str]) {
    let out = tiny_run(extra);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = common::cli::result_rows("offload-bench", &out);
    let got: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(got, modes, "{extra:?}:\n{stdout}");
    for r in &rows {
        assert_eq!(r["max_abs_diff"].as_f64(), Some(0.0), "{r}");
    }
}

/// `--no-full-streaming` leaves the budgets only, and `--staging-buffers 2,3` measures each
/// compressed configuration once per count, labelled with it, every output exact.
#[test]
fn budgets_alone_and_one_compressed_row_per_staging_count() {
    assert_exact_rows(
        &[
            "--budgets",
            "0.015",
            "--no-full-streaming",
            "--compress",
            "--staging-buffers",
            "2,3",
        ],
        &[
            "budget 0.015 GiB d1",
            "budget 0.015 GiB d1 compressed sb2",
            "budget 0.015 GiB d1 compressed sb3",
        ],
    );
}

/// `--decode-blocks 0,16` measures each compressed configuration with a full decode grid and
/// with one of 16 blocks, labelled with it; one value other than 0 is labelled too.
#[test]
fn one_compressed_row_per_decode_grid() {
    assert_exact_rows(
        &["--compress", "--decode-blocks", "0,16"],
        &[
            "stream d1",
            "stream d1 compressed grid full",
            "stream d1 compressed grid16",
        ],
    );
    assert_exact_rows(
        &["--compress", "--no-raw", "--decode-blocks", "4"],
        &["stream d1 compressed grid4"],
    );
}

/// `--compress-blocks 0,2,auto` measures each compressed configuration with no block, two
/// blocks and the count `encoded_blocks_needed` answers encoded, labelled with it, every
/// output exact: with none encoded the compressed row streams the raw row's bytes, with two
/// fewer, and every row records the raw bytes it stands for.
#[test]
fn one_compressed_row_per_encoded_block_count() {
    let extra = ["--compress", "--compress-blocks", "0,2,auto"];
    assert_exact_rows(
        &extra,
        &[
            "stream d1",
            "stream d1 compressed enc0",
            "stream d1 compressed enc2",
            "stream d1 compressed enc auto",
        ],
    );
    let out = tiny_run(&extra);
    let rows = common::cli::result_rows("offload-bench", &out);
    let bytes = |i: usize| rows[i]["streamed_bytes"].as_u64().unwrap();
    let raw = |i: usize| rows[i]["raw_streamed_bytes"].as_u64().unwrap();
    let encoded = |i: usize| rows[i]["encoded_blocks"].as_u64().unwrap();
    assert_eq!([encoded(0), encoded(1), encoded(2)], [0, 0, 2]);
    assert_eq!(bytes(1), bytes(0), "enc0 streams raw");
    assert!(
        bytes(2) < bytes(0),
        "enc2 streams less: {} / {}",
        bytes(2),
        bytes(0)
    );
    for i in 0..4 {
        assert_eq!(raw(i), bytes(0), "row {i}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("streamed blocks encoded"),
        "auto says what it chose:\n{stderr}"
    );
}

/// `--sizing-rounds 3`: auto sizes again on a build with its last answer until the answer
/// repeats. The tiny CPU run's fp32 blocks do not shrink, so on a link of 0.001 GiB/s (16 s for
/// the raw bytes) every block must be encoded: the second round repeats the first's answer and
/// ends the sizing.
#[test]
fn auto_sizing_runs_again_until_its_answer_repeats() {
    let extra = [
        "--compress",
        "--no-raw",
        "--compress-blocks",
        "auto",
        "--sizing-rounds",
        "3",
        "--sizing-link-gib-s",
        "0.001",
    ];
    assert_exact_rows(&extra, &["stream d1 compressed enc auto r3"]);
    let out = tiny_run(&extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rounds: Vec<&str> = stderr.lines().filter(|l| l.contains(", round ")).collect();
    assert_eq!(rounds.len(), 2, "{stderr}");
    assert!(rounds[0].contains("round 1 (4 encoded)"), "{}", rounds[0]);
    assert!(rounds[1].contains("round 2 (4 encoded)"), "{}", rounds[1]);
    assert!(
        rounds[1].contains("needs 4 of 4 streamed blocks encoded"),
        "{}",
        rounds[1]
    );
    let rows = common::cli::result_rows("offload-bench", &out);
    assert_eq!(rows[0]["encoded_blocks"].as_u64(), Some(4), "{stderr}");
}

/// `--compress-blocks auto` converts the manager it measures in place: where the link needs
/// none encoded (a link of 10^4 GiB/s), the row streams raw bytes from the manager built with
/// every block encoded, and its outputs stay exact.
#[test]
fn auto_sizing_converts_the_measured_manager() {
    let extra = [
        "--compress",
        "--compress-blocks",
        "auto",
        "--sizing-link-gib-s",
        "10000",
    ];
    assert_exact_rows(&extra, &["stream d1", "stream d1 compressed enc auto"]);
    let out = tiny_run(&extra);
    let rows = common::cli::result_rows("offload-bench", &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("round 1 (4 encoded)") && stderr.contains("needs 0 of 4"),
        "{stderr}"
    );
    assert!(stderr.contains("sized in place in"), "{stderr}");
    assert_eq!(rows[1]["encoded_blocks"].as_u64(), Some(0), "{stderr}");
    assert_eq!(
        rows[1]["streamed_bytes"], rows[0]["streamed_bytes"],
        "{stderr}"
    );
}

/// Pool streams to pass over and to draw before each configuration act on CUDA only; on the
/// CPU they are accepted and the rows stay exact.
#[test]
fn the_pool_stream_flags_are_accepted_on_the_cpu() {
    assert_exact_rows(
        &[
            "--compress",
            "--avoid-pool-streams",
            "0,8,16,24",
            "--skip-streams",
            "1",
        ],
        &["stream d1", "stream d1 compressed"],
    );
}

/// `--no-raw` leaves the compressed rows alone (the first configuration of the process is a
/// compressed one), and `--repeat 2` runs each twice in a row, the second labelled `run2`.
#[test]
fn no_raw_runs_the_compressed_rows_only_and_repeat_runs_each_again() {
    assert_exact_rows(
        &[
            "--budgets",
            "0.015",
            "--compress",
            "--no-raw",
            "--repeat",
            "2",
        ],
        &[
            "stream d1 compressed",
            "stream d1 compressed run2",
            "budget 0.015 GiB d1 compressed",
            "budget 0.015 GiB d1 compressed run2",
        ],
    );
}

/// offload-bench opens CUDA's recommended 32 hardware work queues when the environment does not
/// choose (its first statement), keeps the environment's choice otherwise, and records the
/// process's value in every `RESULT` line.
#[test]
fn result_lines_record_the_hardware_queues_the_bench_set() {
    const VAR: &str = layerwise_offload::accel::HARDWARE_QUEUES_VAR;
    for (env, want) in [(None, 32), (Some("16"), 16)] {
        let mut cmd = Command::new(bench());
        cmd.args(TINY).args(["--gpus", "2", "--modes", "peer"]);
        match env {
            Some(v) => cmd.env(VAR, v),
            None => cmd.env_remove(VAR),
        };
        let out = cmd.output().expect("offload-bench starts");
        let rows = common::cli::result_rows("offload-bench", &out);
        assert_eq!(rows.len(), 3, "full streaming and two peer members");
        for r in &rows {
            assert_eq!(r["hardware_queues"], want, "{VAR}={env:?}: {r}");
        }
    }
}

/// The peer group's rows record each member's share of the uploads from the host (about half
/// each, together the whole) and the peak VRAM (none on the CPU).
#[test]
fn peer_rows_record_each_members_host_bytes() {
    let out = tiny_run(&["--gpus", "2", "--modes", "peer"]);
    let rows = common::cli::result_rows("offload-bench", &out);
    let members: Vec<_> = rows.iter().filter(|r| r["gpus"] == 2).collect();
    assert_eq!(members.len(), 2, "{rows:?}");
    let shares: Vec<f64> = members
        .iter()
        .map(|r| r["host_share"].as_f64().unwrap())
        .collect();
    assert!(
        (shares.iter().sum::<f64>() - 1.0).abs() < 1e-3,
        "shares {shares:?} add up to the whole"
    );
    assert!(
        shares.iter().all(|s| (s - 0.5).abs() < 0.05),
        "each about half: {shares:?}"
    );
    assert!(members.iter().all(|r| r["peak_vram_bytes"] == 0), "the CPU");
}

/// Runs offload-bench with `args`; it must exit non-zero with an error naming `flag` (and no
/// panic).
fn assert_refused(args: &[&str], flag: &str) {
    let out = Command::new(bench())
        .args(args)
        .output()
        .expect("offload-bench starts");
    let stderr = common::cli::assert_refused(args, &out);
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.contains(flag),
        "{args:?}: the first line of stderr must name {flag}:\n{stderr}"
    );
}

#[test]
fn bad_values_are_errors_naming_the_flag() {
    let cpu = ["--cpu", "--preset", "tiny", "--reps", "1", "--warmup", "0"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        cpu.iter().chain(extra).copied().collect()
    };
    assert_refused(&with(&["--preset", "huge"]), "--preset");
    assert_refused(&with(&["--heads", "0"]), "--heads");
    assert_refused(&with(&["--heads", "-4"]), "--heads");
    assert_refused(&with(&["--dim", "-256"]), "--dim");
    assert_refused(&with(&["--dim", "0"]), "--dim");
    assert_refused(&with(&["--dim", "100", "--heads", "3"]), "--dim");
    assert_refused(&with(&["--tokens", "-32"]), "--tokens");
    assert_refused(&with(&["--tokens", "32,0"]), "--tokens");
    assert_refused(&with(&["--ctx", "-1"]), "--ctx");
    assert_refused(&with(&["--no-raw"]), "--no-raw");
    assert_refused(&with(&["--repeat", "0"]), "--repeat");
    assert_refused(&with(&["--ffn", "0"]), "--ffn");
    assert_refused(&with(&["--layers", "0"]), "--layers");
    assert_refused(&with(&["--reps", "0"]), "--reps");
    assert_refused(&with(&["--depth", "0"]), "--depth");
    assert_refused(&with(&["--gpus", "0"]), "--gpus");
    assert_refused(&with(&["--budgets", "NaN"]), "--budgets");
    assert_refused(&with(&["--budgets", "1,-1"]), "--budgets");
    assert_refused(&with(&["--modes", "shared,foo"]), "--modes");
    assert_refused(&with(&["--staging-buffers", "2,1"]), "--staging-buffers");
    assert_refused(&with(&["--decode-blocks", "-1"]), "--decode-blocks");
    assert_refused(&with(&["--compress-blocks", "-1"]), "--compress-blocks");
    assert_refused(&with(&["--compress-blocks", "some"]), "--compress-blocks");
    assert_refused(&with(&["--sizing-rounds", "0"]), "--sizing-rounds");
    assert_refused(&with(&["--sizing-link-gib-s", "0"]), "--sizing-link-gib-s");
    assert_refused(
        &with(&[
            "--compress",
            "--compress-blocks",
            "auto",
            "--tokens",
            "32,64",
        ]),
        "--compress-blocks",
    );
    assert_refused(&with(&["--skip-streams", "65"]), "--skip-streams");
    assert_refused(
        &with(&["--avoid-pool-streams", "0,32"]),
        "--avoid-pool-streams",
    );
    assert_refused(&with(&["--push-chunk-mib", "-1"]), "--push-chunk-mib");
    // One model: the block stack is gone.
    assert_refused(&with(&["--model", "stack"]), "--model");
    // A timeline needs a CUDA device; without one (or with --cpu) --trace is an error, and a
    // trace file in a directory that does not exist is one everywhere.
    assert_refused(
        &with(&["--trace", "/nonexistent-dir/trace.json"]),
        "--trace",
    );
    assert_refused(&["--trace", "/nonexistent-dir/trace.json"], "--trace");
    // The same for --trace-dir, whose directory must exist.
    assert_refused(&with(&["--trace-dir", "/tmp"]), "--trace-dir");
    assert_refused(&["--trace-dir", "/nonexistent-dir"], "--trace-dir");
    // The queue probe times events on a GPU.
    assert_refused(&with(&["--probe-queues"]), "--probe-queues");
    // --help lists every flag with its range.
    let help = Command::new(bench()).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--preset",
        "--heads",
        "--tokens",
        "--budgets",
        "--trace",
        "--trace-dir",
        "--gpus",
        "--cpu",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

/// `--model wan`, the only model, stays accepted (scripts pass it), also with several GPUs.
#[test]
fn offload_bench_runs_the_wan_model_in_cpu_test_mode() {
    let out = Command::new(bench())
        .args([
            "--cpu",
            "--model",
            "wan",
            "--preset",
            "tiny",
            "--tokens",
            "64",
            "--ctx",
            "16",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--budgets",
            "1",
        ])
        .output()
        .expect("offload-bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = common::cli::result_rows("offload-bench --model wan", &out);
    assert_eq!(rows.len(), 2, "full streaming and one budget:\n{stdout}");
    for r in &rows {
        assert_eq!(r["model"], "wan", "{r}");
        assert_eq!(r["preset"], "tiny", "{r}");
        assert_eq!(r["layers"], 6, "{r}");
        assert_eq!(r["dim"], 256, "{r}");
        assert_eq!(r["tokens"], 64, "{r}");
        assert_eq!(
            r["max_abs_diff"].as_f64(),
            Some(0.0),
            "streamed output differs from resident: {r}"
        );
        assert!(r["ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(
        rows[0]["resident_blocks"], 0,
        "no budget: everything streams"
    );
    assert_eq!(rows[1]["resident_blocks"], 6, "1 GiB holds the tiny model");
    assert!(stdout.contains("| tiny (wan) |"), "{stdout}");
    // Several GPUs run the same model: a peer group, raw and compressed, exact on every member,
    // the compressed store smaller.
    let out = Command::new(bench())
        .args([
            "--cpu",
            "--model",
            "wan",
            "--preset",
            "tiny",
            "--layers",
            "2",
            "--tokens",
            "16",
            "--ctx",
            "8",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--gpus",
            "2",
            "--modes",
            "peer",
            "--multi-only",
            "--compress",
        ])
        .output()
        .expect("offload-bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let multi = common::cli::result_rows("offload-bench --model wan --gpus 2", &out);
    let modes: Vec<&str> = multi.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(
        modes,
        [
            "peer split",
            "peer split",
            "peer split compressed",
            "peer split compressed"
        ],
        "--multi-only: only the several-GPU rows:\n{stdout}"
    );
    for r in &multi {
        assert_eq!(r["model"], "wan", "{r}");
        assert_eq!(r["gpus"], 2, "{r}");
        assert_eq!(r["max_abs_diff"].as_f64(), Some(0.0), "{r}");
    }
    let (raw, encoded) = (&multi[0]["host_bytes"], &multi[2]["host_bytes"]);
    assert!(
        encoded.as_u64().unwrap() < raw.as_u64().unwrap(),
        "the compressed host copy is smaller: {encoded} of {raw}"
    );
    // A patch grid wider than the rotary tables.
    assert_refused(
        &[
            "--cpu", "--model", "wan", "--preset", "tiny", "--tokens", "1031",
        ],
        "--tokens",
    );
}

/// `--checkpoint DIR` whose config.json has sizes no Wan model has: a readable error naming the
/// key, a non-zero exit, no panic (was: the model built from it, an allocation panic).
#[test]
fn a_checkpoint_config_with_huge_sizes_is_refused_naming_the_key() {
    for (key, body) in [
        ("ffn_dim", r#"{"ffn_dim": 1125899906842624}"#),
        (
            "attention_head_dim",
            r#"{"attention_head_dim": 1099511627776}"#,
        ),
        ("patch_size", r#"{"patch_size": [1, 2, 1099511627776]}"#),
        ("rope_max_seq_len", r#"{"rope_max_seq_len": 1099511627776}"#),
        (
            "parameters",
            r#"{"num_attention_heads": 512, "ffn_dim": 500000, "num_layers": 1000}"#,
        ),
    ] {
        let dir =
            std::env::temp_dir().join(format!("lo-bench-config-{key}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), body).unwrap();
        // A weights file that opens, so that only the config can stop the run.
        let t = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
        tch::Tensor::write_safetensors(
            &[("proj_out.bias", &t)],
            dir.join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let args = [
            "--cpu",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--checkpoint",
            dir.to_str().unwrap(),
        ];
        assert_refused(&args, key);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The `QUEUES {json}` line of a run with `--probe-queues`.
fn queues_line(out: &std::process::Output) -> serde_json::Value {
    let mut lines = common::cli::json_lines("offload-bench --probe-queues", out, "QUEUES");
    assert_eq!(lines.len(), 1, "one QUEUES line: {lines:?}");
    lines.remove(0)
}

/// The queue probe on a GPU. With one hardware queue (`CUDA_DEVICE_MAX_CONNECTIONS=1`) every
/// stream shares it: the probe must find one group of all the streams it probed (the current
/// stream and 32 pool streams of each priority), and the run's copy stream shares it with the
/// compute stream. With the bench's 32 queues: no stream in two groups, every group of two or
/// more, and each configuration names its streams. (On an H100 with 32 queues the probe found no
/// group at all: 65 streams, none of whose work waited behind another's, so the test does not
/// assume that streams beyond the queue count must share.)
#[test]
fn the_queue_probe_finds_the_streams_that_share_a_hardware_queue() {
    if common::cuda().is_none() {
        return;
    }
    const VAR: &str = layerwise_offload::accel::HARDWARE_QUEUES_VAR;
    // The tiny run on the GPU (TINY without --cpu).
    let args: Vec<&str> = TINY[1..]
        .iter()
        .copied()
        .chain(["--no-resident", "--probe-queues"])
        .collect();
    let one = Command::new(bench())
        .args(&args)
        .env(VAR, "1")
        .output()
        .expect("offload-bench starts");
    let q = queues_line(&one);
    assert_eq!(q["hardware_queues"], 1, "{q}");
    let streams = q["streams"].as_u64().unwrap();
    assert_eq!(
        streams, 65,
        "the current stream and 2 x 32 pool streams: {q}"
    );
    let groups = q["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "one queue, one group: {q}");
    assert_eq!(groups[0].as_array().unwrap().len() as u64, streams, "{q}");
    let full = &q["configurations"][0];
    assert_eq!(full["mode"], "stream d1", "{q}");
    assert_eq!(
        full["sharing"],
        serde_json::json!(["compute and copy"]),
        "{q}"
    );

    let many = Command::new(bench())
        .args(&args)
        .env_remove(VAR)
        .output()
        .expect("offload-bench starts");
    let q = queues_line(&many);
    assert_eq!(q["hardware_queues"], 32, "{q}");
    let mut seen = std::collections::HashSet::new();
    for g in q["groups"].as_array().unwrap() {
        let g = g.as_array().unwrap();
        assert!(g.len() >= 2, "a group is streams that share: {q}");
        for id in g {
            assert!(seen.insert(id.as_i64().unwrap()), "{id} in two groups: {q}");
        }
    }
    let names: Vec<&str> = q["configurations"][0]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["compute", "copy"], "{q}");
}
