//! What the manager reports: [`OffloadStats`] (counters and event timings) and the timeline
//! ([`TimelineSpan`], rendered as a Chrome trace by [`chrome_trace_json`]).

use std::fmt;

/// Counters of a manager's work so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OffloadStats {
    /// Block uploads queued.
    pub uploads: u64,
    /// Bytes uploaded from the host (in a [`PeerGroup`](crate::PeerGroup): this member's shares).
    pub bytes_uploaded: u64,
    /// Bytes received device to device from the other members of a
    /// [`PeerGroup`](crate::PeerGroup) (0 outside one).
    pub peer_bytes: u64,
    /// Blocks that stream through the slot ring.
    pub streamed_blocks: usize,
    /// Blocks kept permanently on the device (within the VRAM budget).
    pub resident_blocks: usize,
    /// Bytes of the resident blocks.
    pub resident_bytes: u64,
    /// Bytes of one GPU slot times the number of slots.
    pub slot_bytes: u64,
    /// Bytes of host buffers this manager allocated.
    pub host_bytes: u64,
    /// Bytes of host buffers it streams from that another manager allocated (a shared
    /// [`HostStore`](crate::HostStore)).
    pub shared_host_bytes: u64,
    /// Whether the host buffers are page-locked.
    pub pinned: bool,
    /// Seconds `initialize()` took.
    pub init_seconds: f64,
    /// Device milliseconds of the uploads timed so far (copy stream).
    pub upload_ms: f64,
    /// Uploads timed so far.
    pub timed_uploads: u64,
    /// Bytes of the uploads timed so far.
    pub timed_bytes: u64,
    /// Device milliseconds the compute stream spent waiting for uploads (the stall).
    pub stall_ms: f64,
    /// Per block (loop order): upload milliseconds, summed.
    pub block_upload_ms: Vec<f64>,
    /// Per block (loop order): stall milliseconds, summed.
    pub block_stall_ms: Vec<f64>,
    /// Peak bytes allocated on the compute device (libtorch's allocator, whole process) since
    /// the process started or the last `accel::reset_peak_memory_stats`; 0 on the CPU.
    pub peak_vram_bytes: u64,
    /// Blocks on the disk tier (read from the checkpoint at every upload; see
    /// [`OffloadConfig::host_budget`](crate::OffloadConfig::host_budget)).
    pub disk_blocks: usize,
    /// Blocks whose host copy is encoded ([`OffloadConfig::compress`](crate::OffloadConfig::compress)).
    pub encoded_blocks: usize,
    /// Bytes of those blocks' encodings (what their uploads carry).
    pub encoded_bytes: u64,
    /// Bytes of those blocks raw (what their decodes write).
    pub raw_encoded_bytes: u64,
    /// Milliseconds the GPU spent decoding blocks (summed over segments; timed decodes only).
    pub decode_ms: f64,
    /// Decode kernels timed so far (one per segment of a block's encoding).
    pub timed_decodes: u64,
    /// Bytes of the device staging buffers an encoded block's segments pass through (two, or
    /// `compress_staging_buffers`, of the longest segment encoding).
    pub staging_bytes: u64,
}

impl OffloadStats {
    /// Achieved upload bandwidth in GiB/s over the timed uploads (0 if none).
    pub fn upload_gib_s(&self) -> f64 {
        if self.upload_ms > 0.0 {
            self.timed_bytes as f64 / (1u64 << 30) as f64 / (self.upload_ms / 1e3)
        } else {
            0.0
        }
    }
}

impl fmt::Display for OffloadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        writeln!(f, "| statistic | value |")?;
        writeln!(f, "|---|---|")?;
        writeln!(f, "| streamed blocks | {} |", self.streamed_blocks)?;
        writeln!(
            f,
            "| resident blocks | {} ({:.3} GiB) |",
            self.resident_blocks,
            gib(self.resident_bytes)
        )?;
        writeln!(f, "| uploads | {} |", self.uploads)?;
        writeln!(
            f,
            "| bytes uploaded | {:.3} GiB |",
            gib(self.bytes_uploaded)
        )?;
        if self.peer_bytes > 0 {
            writeln!(
                f,
                "| bytes from peer GPUs | {:.3} GiB |",
                gib(self.peer_bytes)
            )?;
        }
        if self.timed_uploads > 0 {
            writeln!(
                f,
                "| upload time | {:.1} ms ({:.1} GiB/s) |",
                self.upload_ms,
                self.upload_gib_s()
            )?;
            writeln!(f, "| compute stall | {:.1} ms |", self.stall_ms)?;
        }
        writeln!(f, "| GPU slot ring | {:.3} GiB |", gib(self.slot_bytes))?;
        if self.staging_bytes > 0 {
            writeln!(
                f,
                "| GPU staging buffers | {:.3} GiB |",
                gib(self.staging_bytes)
            )?;
        }
        if self.peak_vram_bytes > 0 {
            writeln!(
                f,
                "| peak VRAM allocated | {:.3} GiB |",
                gib(self.peak_vram_bytes)
            )?;
        }
        writeln!(
            f,
            "| host buffers | {:.3} GiB ({}) |",
            gib(self.host_bytes),
            if self.pinned { "pinned" } else { "pageable" }
        )?;
        if self.encoded_blocks > 0 {
            writeln!(
                f,
                "| encoded blocks | {} ({:.3} of {:.3} GiB, ratio {:.4}) |",
                self.encoded_blocks,
                gib(self.encoded_bytes),
                gib(self.raw_encoded_bytes),
                self.encoded_bytes as f64 / self.raw_encoded_bytes.max(1) as f64
            )?;
            if self.timed_decodes > 0 {
                writeln!(
                    f,
                    "| decode time | {:.1} ms ({:.3} ms per segment) |",
                    self.decode_ms,
                    self.decode_ms / self.timed_decodes as f64
                )?;
            }
        }
        if self.shared_host_bytes > 0 {
            writeln!(
                f,
                "| shared host store | {:.3} GiB (allocated by another manager) |",
                gib(self.shared_host_bytes)
            )?;
        }
        write!(f, "| initialize | {:.2} s |", self.init_seconds)
    }
}

/// What a timeline interval shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// A block's upload on the copy stream.
    Upload,
    /// The compute stream waiting for a block's upload.
    Stall,
    /// A block's compute, from the end of its wait to its release.
    Compute,
    /// A compressed block's decode into its slot, on the decode stream.
    Decode,
}

impl Lane {
    pub(crate) fn thread(self) -> (u32, &'static str) {
        match self {
            Lane::Upload => (1, "copy stream"),
            Lane::Stall | Lane::Compute => (2, "compute stream"),
            Lane::Decode => (3, "decode stream"),
        }
    }
}

/// One interval of a captured timeline, in milliseconds from the start of the capture.
#[derive(Debug, Clone, PartialEq)]
pub struct TimelineSpan {
    /// What happened.
    pub lane: Lane,
    /// The block (loop index).
    pub block: usize,
    /// Start, ms after the capture began.
    pub start_ms: f64,
    /// End, ms after the capture began.
    pub end_ms: f64,
}

/// The compute time of a captured timeline ([`LayerwiseOffloadManager::finish_timeline`](crate::LayerwiseOffloadManager::finish_timeline)):
/// from the capture's start to its last span's end, less the compute stream's waits for
/// uploads (the stalls); 0 for no spans. What to give
/// [`LayerwiseOffloadManager::encoded_blocks_needed`](crate::LayerwiseOffloadManager::encoded_blocks_needed)
/// after capturing one forward.
pub fn compute_ms(spans: &[TimelineSpan]) -> f64 {
    let end = spans
        .iter()
        .map(|s| s.end_ms)
        .filter(|t| t.is_finite())
        .fold(0.0, f64::max);
    let stalls: f64 = spans
        .iter()
        .filter(|s| s.lane == Lane::Stall && s.end_ms.is_finite() && s.start_ms.is_finite())
        .map(|s| s.end_ms - s.start_ms)
        .sum();
    (end - stalls).max(0.0)
}

/// Renders spans as a Chrome trace (the JSON that chrome://tracing and ui.perfetto.dev open):
/// one track for the copy stream, one for the compute stream, one for the decode stream.
pub fn chrome_trace_json(spans: &[TimelineSpan]) -> String {
    use serde_json::json;
    // The decode stream's track only where something was decoded.
    let decoded = spans.iter().any(|s| s.lane == Lane::Decode);
    let tracks = [Lane::Upload, Lane::Compute]
        .into_iter()
        .chain(decoded.then_some(Lane::Decode));
    let mut events: Vec<serde_json::Value> = tracks
        .map(Lane::thread)
        .map(|(tid, name)| {
            json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}})
        })
        .collect();
    // Microseconds with nanosecond resolution; a non-finite time (never recorded) becomes null
    // through serde_json, so the file stays valid JSON.
    let us = |ms: f64| (ms * 1e6).round() / 1e3;
    events.extend(spans.iter().map(|s| {
        let (tid, _) = s.lane.thread();
        let what = match s.lane {
            Lane::Upload => "upload",
            Lane::Stall => "stall",
            Lane::Compute => "block",
            Lane::Decode => "decode",
        };
        json!({
            "ph": "X",
            "name": format!("{what} {}", s.block),
            "cat": what,
            "pid": 1,
            "tid": tid,
            "ts": us(s.start_ms),
            "dur": us(s.end_ms - s.start_ms).max(0.0),
            "args": {"block": s.block},
        })
    }));
    json!({"displayTimeUnit": "ms", "traceEvents": events}).to_string()
}

#[cfg(test)]
mod tests {
    use super::{Lane, TimelineSpan, compute_ms};

    fn span(lane: Lane, start_ms: f64, end_ms: f64) -> TimelineSpan {
        TimelineSpan {
            lane,
            block: 0,
            start_ms,
            end_ms,
        }
    }

    /// The capture's length to its last end, less the stalls; uploads and decodes beside the
    /// compute take nothing off; spans never recorded (non-finite) count for nothing.
    #[test]
    fn compute_time_is_the_timeline_less_its_stalls() {
        assert_eq!(compute_ms(&[]), 0.0);
        let spans = [
            span(Lane::Upload, 0.0, 4.0),
            span(Lane::Stall, 0.5, 4.0),
            span(Lane::Compute, 4.0, 9.0),
            span(Lane::Decode, 5.0, 7.0),
            span(Lane::Upload, 4.0, 12.0),
            span(Lane::Stall, 9.0, 12.0),
            span(Lane::Compute, 12.0, 20.0),
            span(Lane::Stall, f64::NAN, f64::NAN),
        ];
        assert_eq!(compute_ms(&spans), 20.0 - 3.5 - 3.0);
    }
}
