//! Checks of the binaries' output, for the tests that run the example and offload-bench.

use std::process::Output;

/// The `RESULT {json}` lines of a successful run, parsed; panics with the output otherwise.
pub fn result_rows(what: &str, out: &Output) -> Vec<serde_json::Value> {
    json_lines(what, out, "RESULT")
}

/// The `<tag> {json}` lines of a successful run (`RESULT`, `QUEUES`), parsed; panics with the
/// output otherwise.
pub fn json_lines(what: &str, out: &Output, tag: &str) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = format!("{tag} ");
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("{tag} line not JSON: {e}")))
        .collect()
}

/// Asserts that a run with `args` was refused cleanly: a non-zero exit, no panic, not killed,
/// and stderr starting with an error line. Returns stderr.
pub fn assert_refused(args: &[&str], out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{args:?} was accepted:\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_ne!(out.status.code(), Some(101), "{args:?} panicked:\n{stderr}");
    assert!(
        !stderr.contains("panicked") && out.status.code().is_some(),
        "{args:?} panicked or was killed ({:?}):\n{stderr}",
        out.status
    );
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with("Error:") || first.starts_with("error:"),
        "{args:?}: stderr must start with an error:\n{stderr}"
    );
    stderr
}
