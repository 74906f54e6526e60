//! Progress bars of the examples and `offload-bench` for their long loops (building weights,
//! writing shards, sampling steps, forwards): indicatif on stderr, drawn on a terminal and hidden
//! otherwise (indicatif's default), so logs and pipes get no control characters. The library has
//! none.

use indicatif::{ProgressBar, ProgressStyle};
use std::borrow::Cow;
use std::time::Duration;

/// A bar over `total` bytes, labelled `msg`.
pub fn bytes(total: u64, msg: impl Into<Cow<'static, str>>) -> ProgressBar {
    styled(
        ProgressBar::new(total),
        "{msg} [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {elapsed}, eta {eta})",
    )
    .with_message(msg)
}

/// A bar over `total` steps, labelled `msg`.
pub fn steps(total: u64, msg: impl Into<Cow<'static, str>>) -> ProgressBar {
    styled(
        ProgressBar::new(total),
        "{msg} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})",
    )
    .with_message(msg)
}

/// A spinner for one step of unknown length (ticking on its own), labelled `msg`.
pub fn spinner(msg: impl Into<Cow<'static, str>>) -> ProgressBar {
    let pb = styled(ProgressBar::new_spinner(), "{spinner} {msg} ({elapsed})").with_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn styled(pb: ProgressBar, template: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(template)
        .expect("a valid template")
        .progress_chars("=> ");
    pb.with_style(style)
}

/// A bar over the bytes of `initialize()`'s stages, and the callback that drives it from the
/// manager's reports (`OffloadConfig::on_progress`): labelled `label: <stage> (blocks done of
/// total)`, reset at each stage. Finish it (`finish_and_clear`) once `initialize()` returns.
pub fn offload(
    label: impl Into<String>,
) -> (
    ProgressBar,
    impl Fn(&layerwise_offload::Progress) + Send + Sync + 'static,
) {
    let label = label.into();
    let pb = bytes(0, format!("{label}: initializing"));
    let bar = pb.clone();
    let stage = std::sync::Mutex::new(None);
    let report = move |p: &layerwise_offload::Progress| {
        let mut current = stage.lock().unwrap_or_else(|e| e.into_inner());
        if *current != Some(p.stage) {
            *current = Some(p.stage);
            bar.reset();
            bar.set_length(p.total);
        }
        bar.set_message(format!(
            "{label}: {} ({}/{})",
            p.stage, p.blocks_done, p.blocks_total
        ));
        bar.set_position(p.done);
    };
    (pb, report)
}
