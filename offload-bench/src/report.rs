//! The report: a markdown table row and one `RESULT {json}` line per measurement. A
//! [`Measurement`] is what a `RESULT` line is made of (serde, keys in alphabetical order as
//! serde_json writes a map); the floors and ratios are derived here from what the runs measured.

use crate::flags::Args;
use crate::runs::{Bench, MODEL_NAME, MultiRuns, Streamed};
use crate::util::round2;
use serde::Serialize;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// One `RESULT` line: the fields every row has, and those of its kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// nvidia-smi's name of the device, or `cpu`.
    pub device: String,
    /// Always `layerwise-offload` (scripts/bench_peers.py writes its peers' names here).
    pub system: &'static str,
    /// The configuration (`stream d1`, `budget 14.5 GiB d1 compressed`, `peer split`, ...).
    pub mode: String,
    /// The model (`wan`).
    pub model: &'static str,
    /// The preset's name, or the checkpoint's directory.
    pub preset: String,
    pub layers: usize,
    pub dim: i64,
    pub ffn: i64,
    pub tokens: i64,
    /// Blocks uploaded ahead.
    pub depth: usize,
    /// Median ms per forward.
    pub ms: f64,
    /// The largest difference from the resident model's output (none without it).
    pub max_abs_diff: Option<f64>,
    /// CUDA's hardware work queues per device in this process
    /// (`layerwise_offload::accel::hardware_queues`).
    pub hardware_queues: u32,
    /// What the kind of run adds.
    #[serde(flatten)]
    pub detail: Detail,
}

/// The fields of a single-GPU configuration, or of one GPU of a several-GPU run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Detail {
    /// Full streaming or a VRAM budget, on one GPU.
    Single {
        resident_blocks: usize,
        /// Streamed blocks whose host copy is encoded (all of them with `--compress` alone,
        /// `--compress-blocks` of them otherwise; 0 raw).
        encoded_blocks: usize,
        /// Mean ms per forward, back to back.
        ms_sustained: f64,
        resident_ms: Option<f64>,
        /// The floor of the raw bytes (without compression: `floor_ms`).
        raw_floor_ms: f64,
        raw_streamed_bytes: u64,
        /// Streamed bytes over raw bytes.
        ratio: f64,
        decode_ms_per_forward: f64,
        /// The weights' distribution (`Normal`, `RowScaled`).
        dist: String,
        /// `default` or `high priority`.
        compute_stream: &'static str,
        /// The ids of the manager's copy and decode streams (libtorch's pool streams; none on
        /// the CPU, no decode stream without compression).
        copy_stream_id: Option<i64>,
        decode_stream_id: Option<i64>,
        /// max(resident, streamed bytes / pinned H2D bandwidth).
        floor_ms: f64,
        stall_ms: f64,
        peak_vram_bytes: u64,
        h2d_gib_s: f64,
        block_bytes: usize,
        streamed_bytes: u64,
        init_s: f64,
        host_peak_bytes: u64,
    },
    /// One GPU of several streaming from one host copy.
    SeveralGpus {
        gpus: usize,
        gpu: usize,
        /// Mean ms per forward of this GPU, back to back.
        ms_sustained: f64,
        /// Bytes every GPU receives per forward, over the slowest GPU's time.
        delivered_gib_s: f64,
        /// The shared host store's bytes.
        host_bytes: u64,
        /// A peer group's link floor: the busiest member's share of the store per forward over
        /// the measured rate (1/N raw; by whole segments compressed).
        link_floor_ms: Option<f64>,
        /// This GPU's part of what the GPUs of its mode uploaded from the host during the timed
        /// forwards (a peer group member's share: a compressed group splits blocks by whole
        /// segments, not exactly 1/N).
        host_share: f64,
        /// Peak bytes allocated on this GPU during the timed forwards.
        peak_vram_bytes: u64,
    },
}

impl Measurement {
    /// The `RESULT` line's JSON: keys in alphabetical order (serde_json's map), floats that are
    /// not finite as null.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a measurement serializes")
    }
}

/// `v` to 4 decimals (shares).
fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

/// ms to move `bytes` at `bw` GiB/s (0 without a measured link).
fn link_ms(bytes: u64, bw: f64) -> f64 {
    if bw > 0.0 {
        bytes as f64 / (1u64 << 30) as f64 / bw * 1e3
    } else {
        0.0
    }
}

/// A peer group's link floor: the ms its busiest member's link takes for its share of the
/// store's `host_bytes` per forward at `bw` GiB/s. The share is the largest of the members'
/// uploads `sents` (a compressed group cuts blocks at whole segments, so a member can carry up
/// to half a segment more than 1/N), or 1/N where nothing was counted. None without a link.
fn peer_link_floor(host_bytes: u64, sents: &[u64], bw: f64) -> Option<f64> {
    let total: u64 = sents.iter().sum();
    let share = match sents.iter().max() {
        Some(&max) if total > 0 => max as f64 / total as f64,
        _ => 1.0 / sents.len().max(1) as f64,
    };
    (bw > 0.0).then(|| host_bytes as f64 * share / (1u64 << 30) as f64 / bw * 1e3)
}

/// The largest absolute difference between two outputs, in float32 on the CPU.
fn max_abs_diff(want: &Tensor, got: &Tensor) -> f64 {
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Float);
    (cpu(want) - cpu(got)).abs().max().double_value(&[])
}

/// Prints the table and the `RESULT` lines of every run: the single-GPU configurations, the
/// several-GPU rows with one summary row per mode and token count, then the resident rows.
pub fn print(
    a: &Args,
    b: &Bench,
    streamed: &[Streamed],
    multi: &MultiRuns,
    resident: &HashMap<i64, (f64, Tensor)>,
) {
    let s = &a.shape;
    let device_name = &b.device_name;
    let bw = b.bw;
    // The preset column names the model (the block stack's rows, before, named none).
    let preset_cell = format!("{} ({MODEL_NAME})", s.preset);
    let common =
        |mode: &str, tokens: i64, ms: f64, max_abs_diff: Option<f64>, detail| Measurement {
            device: device_name.clone(),
            system: "layerwise-offload",
            mode: mode.to_owned(),
            model: MODEL_NAME,
            preset: s.preset.clone(),
            layers: s.layers,
            dim: s.dim,
            ffn: s.ffn,
            tokens,
            depth: a.depth,
            ms: round2(ms),
            max_abs_diff,
            hardware_queues: layerwise_offload::accel::hardware_queues(),
            detail,
        };
    println!(
        "| device | preset | tokens | mode | ms/forward | sustained ms | floor ms | floor/measured | raw floor ms | stall ms | peak VRAM GiB | init s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in streamed {
        let res = resident.get(&r.tokens);
        let res_ms = res.map_or(0.0, |x| x.0);
        let floor = link_ms(r.streamed_bytes, bw).max(res_ms);
        // The floor of the raw bytes (without compression: the same).
        let raw_floor = link_ms(r.raw_bytes, bw).max(res_ms);
        let diff = res.map(|(_, out)| max_abs_diff(out, &r.out));
        let gib = r.peak as f64 / (1u64 << 30) as f64;
        println!(
            "| {device_name} | {preset_cell} | {} | {} | {:.1} | {:.1} | {floor:.1} | {:.3} | {raw_floor:.1} | {:.1} | {gib:.2} | {:.2} |",
            r.tokens,
            r.label,
            r.ms,
            r.ms_sustained,
            if r.ms > 0.0 { floor / r.ms } else { 0.0 },
            r.stall,
            r.init_s
        );
        let m = common(
            &r.label,
            r.tokens,
            r.ms,
            diff,
            Detail::Single {
                resident_blocks: r.resident_blocks,
                encoded_blocks: r.encoded_blocks,
                ms_sustained: round2(r.ms_sustained),
                resident_ms: res.map(|x| round2(x.0)),
                raw_floor_ms: round2(raw_floor),
                raw_streamed_bytes: r.raw_bytes,
                ratio: r.streamed_bytes as f64 / r.raw_bytes.max(1) as f64,
                decode_ms_per_forward: round2(r.decode_ms),
                dist: format!("{:?}", a.dist),
                compute_stream: if a.high_priority_compute {
                    "high priority"
                } else {
                    "default"
                },
                copy_stream_id: r.copy_stream,
                decode_stream_id: r.decode_stream,
                floor_ms: round2(floor),
                stall_ms: round2(r.stall),
                peak_vram_bytes: r.peak,
                h2d_gib_s: round2(bw),
                block_bytes: b.block_bytes,
                streamed_bytes: r.streamed_bytes,
                init_s: (r.init_s * 1e3).round() / 1e3,
                host_peak_bytes: r.host_peak,
            },
        );
        println!("RESULT {}", m.to_json());
    }
    for (&mode, &tokens) in multi
        .modes
        .iter()
        .flat_map(|m| a.tokens.iter().map(move |t| (m, t)))
    {
        let rows_t: Vec<_> = multi
            .rows
            .iter()
            .filter(|r| r.mode == mode && r.tokens == tokens)
            .collect();
        if rows_t.is_empty() {
            continue;
        }
        // Bytes every GPU receives per forward (from the host, or in a peer group from the host
        // and its peers), over the slowest GPU's time.
        let host_bytes = multi.host_bytes[mode];
        let streamed = rows_t.iter().map(|_| host_bytes as f64).sum::<f64>();
        let sents: Vec<u64> = rows_t.iter().map(|r| r.sent).collect();
        let link_floor = mode
            .starts_with("peer split")
            .then(|| peer_link_floor(host_bytes, &sents, bw))
            .flatten();
        let slowest = rows_t.iter().map(|r| r.ms).fold(0.0, f64::max);
        let sent: u64 = sents.iter().sum();
        let aggregate = streamed / (1u64 << 30) as f64 / (slowest / 1e3);
        for r in &rows_t {
            let diff = resident
                .get(&tokens)
                .map(|(_, out)| max_abs_diff(out, &r.out));
            let floor = link_floor.map_or(String::new(), |f| format!("{f:.1}"));
            let ratio = link_floor
                .filter(|_| r.ms_sustained > 0.0)
                .map_or(String::new(), |f| format!("{:.3}", f / r.ms_sustained));
            println!(
                "| {device_name} | {preset_cell} | {tokens} | stream d{}, {mode}, GPU {} of {} | {:.1} | {:.1} | {floor} | {ratio} | | | {:.2} | |",
                a.depth,
                r.gpu,
                a.gpus,
                r.ms,
                r.ms_sustained,
                r.peak_vram as f64 / (1u64 << 30) as f64
            );
            let m = common(
                mode,
                tokens,
                r.ms,
                diff,
                Detail::SeveralGpus {
                    gpus: a.gpus,
                    gpu: r.gpu,
                    ms_sustained: round2(r.ms_sustained),
                    delivered_gib_s: round2(aggregate),
                    host_bytes,
                    link_floor_ms: link_floor.map(round2),
                    host_share: round4(r.sent as f64 / sent.max(1) as f64),
                    peak_vram_bytes: r.peak_vram,
                },
            );
            println!("RESULT {}", m.to_json());
        }
        println!(
            "| {device_name} | {preset_cell} | {tokens} | {} GPUs, {mode}: {aggregate:.1} GiB/s of blocks delivered | {slowest:.1} (slowest) | | | | | |",
            a.gpus
        );
    }
    let mut res: Vec<_> = resident.iter().collect();
    res.sort_by_key(|(t, _)| **t);
    for (tokens, (ms, _)) in res {
        println!("| {device_name} | {preset_cell} | {tokens} | resident | {ms:.1} | | | | | |");
    }
}

/// One line about the steady forward of a three-forward timeline: the second forward's period
/// (its first block's compute start to the third forward's), split on the compute stream into
/// block time, stalls and the rest (work outside blocks, gaps), the copy and decode streams'
/// busy time within it (overlapping spans counted once), the copy stream's longest idle gaps
/// (ms into the period, length, the block computing then) and the longest stalls.
pub fn timeline_summary(spans: &[layerwise_offload::TimelineSpan]) -> String {
    use layerwise_offload::Lane;
    let mut starts: Vec<f64> = spans
        .iter()
        .filter(|s| s.lane == Lane::Compute && s.block == 0)
        .map(|s| s.start_ms)
        .collect();
    starts.sort_by(f64::total_cmp);
    let (from, to) = match starts[..] {
        [_, a, b, ..] => (a, b),
        _ => return format!("{} spans, fewer than three forwards", spans.len()),
    };
    let within = |lane: Lane| -> Vec<(f64, f64, usize)> {
        let mut v: Vec<(f64, f64, usize)> = spans
            .iter()
            .filter(|s| s.lane == lane && s.end_ms > from && s.start_ms < to)
            .map(|s| (s.start_ms.max(from), s.end_ms.min(to), s.block))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let sum = |v: &[(f64, f64, usize)]| v.iter().map(|(a, b, _)| b - a).sum::<f64>();
    // Busy time of overlapping spans, and the gaps between them (start, length).
    let union = |v: &[(f64, f64, usize)]| {
        let (mut total, mut end, mut gaps) = (0.0, from, Vec::new());
        for &(a, b, _) in v {
            if a > end {
                gaps.push((end, a - end));
            }
            let a = a.max(end);
            if b > a {
                total += b - a;
            }
            end = end.max(b);
        }
        if to > end {
            gaps.push((end, to - end));
        }
        (total, gaps)
    };
    let period = to - from;
    let compute_spans = within(Lane::Compute);
    let compute = sum(&compute_spans);
    let stall_spans = within(Lane::Stall);
    let stall = sum(&stall_spans);
    let (copy, mut gaps) = union(&within(Lane::Upload));
    let (decode, _) = union(&within(Lane::Decode));
    gaps.sort_by(|a, b| b.1.total_cmp(&a.1));
    let computing = |t: f64| {
        compute_spans
            .iter()
            .find(|(a, b, _)| *a <= t && t < *b)
            .map_or("-".to_string(), |s| s.2.to_string())
    };
    let gaps: Vec<String> = gaps
        .iter()
        .filter(|g| g.1 > 0.05)
        .take(6)
        .map(|(at, len)| format!("{:.1}+{len:.2}@{}", at - from, computing(*at)))
        .collect();
    let mut stalls: Vec<(usize, f64)> = stall_spans
        .iter()
        .filter(|s| s.1 - s.0 > 0.05)
        .map(|s| (s.2, s.1 - s.0))
        .collect();
    stalls.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<String> = stalls
        .iter()
        .take(6)
        .map(|(b, ms)| format!("{b}:{ms:.2}"))
        .collect();
    format!(
        "period {period:.2} ms = blocks {compute:.2} + stalls {stall:.2} + other {:.2}; copy stream busy {copy:.2} (idle {:.2}: [{}]), decode busy {decode:.2}; longest stalls (block:ms) [{}]",
        period - compute - stall,
        period - copy,
        gaps.join(", "),
        top.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn measurement(detail: Detail) -> Measurement {
        Measurement {
            device: "NVIDIA H100 80GB HBM3".into(),
            system: "layerwise-offload",
            mode: "stream d1 compressed".into(),
            model: "wan",
            preset: "wan-14b".into(),
            layers: 40,
            dim: 5120,
            ffn: 13824,
            tokens: 1024,
            depth: 1,
            ms: 357.91,
            max_abs_diff: Some(0.0),
            hardware_queues: 32,
            detail,
        }
    }

    /// The keys and values of a single-GPU `RESULT` line are those scripts read: the line as it
    /// was written key by key (json!) before the measurement type, with every key present.
    #[test]
    fn a_single_gpu_measurement_has_the_result_lines_keys() {
        let m = measurement(Detail::Single {
            resident_blocks: 0,
            encoded_blocks: 40,
            ms_sustained: 358.02,
            resident_ms: None,
            raw_floor_ms: 512.6,
            raw_streamed_bytes: 28_991_029_248,
            ratio: 0.6987,
            decode_ms_per_forward: 12.5,
            dist: "Normal".into(),
            compute_stream: "default",
            copy_stream_id: Some(67),
            decode_stream_id: Some(99),
            floor_ms: 358.1,
            stall_ms: 0.25,
            peak_vram_bytes: 7 << 30,
            h2d_gib_s: 51.1,
            block_bytes: 28_991_029_248,
            streamed_bytes: 20_256_030_720,
            init_s: 4.2,
            host_peak_bytes: 30 << 30,
        });
        let want = json!({
            "device": "NVIDIA H100 80GB HBM3",
            "system": "layerwise-offload",
            "mode": "stream d1 compressed",
            "model": "wan",
            "preset": "wan-14b",
            "layers": 40,
            "dim": 5120,
            "ffn": 13824,
            "tokens": 1024,
            "depth": 1,
            "resident_blocks": 0,
            "encoded_blocks": 40,
            "ms": 357.91,
            "ms_sustained": 358.02,
            "resident_ms": null,
            "raw_floor_ms": 512.6,
            "raw_streamed_bytes": 28_991_029_248u64,
            "ratio": 0.6987,
            "decode_ms_per_forward": 12.5,
            "dist": "Normal",
            "compute_stream": "default",
            "copy_stream_id": 67,
            "decode_stream_id": 99,
            "floor_ms": 358.1,
            "stall_ms": 0.25,
            "peak_vram_bytes": 7u64 << 30,
            "h2d_gib_s": 51.1,
            "block_bytes": 28_991_029_248u64,
            "streamed_bytes": 20_256_030_720u64,
            "init_s": 4.2,
            "host_peak_bytes": 30u64 << 30,
            "hardware_queues": 32,
            "max_abs_diff": 0.0,
        });
        assert_eq!(m.to_json(), want);
        // Keys sorted, nulls kept: the line's text is the map's.
        let text = m.to_json().to_string();
        assert!(text.starts_with(r#"{"block_bytes":28991029248,"#), "{text}");
        assert!(text.contains(r#""resident_ms":null"#), "{text}");
    }

    #[test]
    fn a_several_gpu_measurement_has_the_result_lines_keys() {
        let mut m = measurement(Detail::SeveralGpus {
            gpus: 2,
            gpu: 1,
            ms_sustained: 356.4,
            delivered_gib_s: 98.5,
            host_bytes: 20_256_030_720,
            link_floor_ms: None,
            host_share: 0.5012,
            peak_vram_bytes: 2_233_466_880,
        });
        m.mode = "peer split compressed".into();
        m.max_abs_diff = None;
        let want = json!({
            "device": "NVIDIA H100 80GB HBM3",
            "system": "layerwise-offload",
            "mode": "peer split compressed",
            "model": "wan",
            "gpus": 2,
            "gpu": 1,
            "preset": "wan-14b",
            "layers": 40,
            "dim": 5120,
            "ffn": 13824,
            "tokens": 1024,
            "depth": 1,
            "ms": 357.91,
            "ms_sustained": 356.4,
            "hardware_queues": 32,
            "delivered_gib_s": 98.5,
            "host_bytes": 20_256_030_720u64,
            "link_floor_ms": null,
            "host_share": 0.5012,
            "peak_vram_bytes": 2_233_466_880u64,
            "max_abs_diff": null,
        });
        assert_eq!(m.to_json(), want);
    }

    /// NaN (a run of zero forwards' median over nothing, a 0/0 rate) is written as null, as
    /// json! wrote it.
    #[test]
    fn non_finite_numbers_are_null() {
        let mut m = measurement(Detail::SeveralGpus {
            gpus: 2,
            gpu: 0,
            ms_sustained: 1.0,
            delivered_gib_s: f64::NAN,
            host_bytes: 0,
            link_floor_ms: Some(f64::INFINITY),
            host_share: 0.0,
            peak_vram_bytes: 0,
        });
        m.ms = f64::NAN;
        let v = m.to_json();
        assert!(v["ms"].is_null() && v["delivered_gib_s"].is_null(), "{v}");
        assert!(v["link_floor_ms"].is_null(), "{v}");
        assert_eq!(v["gpu"], 0);
    }

    #[test]
    fn link_floors_are_bytes_over_the_measured_rate() {
        assert_eq!(link_ms(1 << 30, 50.0), 20.0);
        assert_eq!(link_ms(1 << 30, 0.0), 0.0, "no link measured (the CPU)");
    }

    #[test]
    fn a_peer_groups_link_floor_is_its_busiest_members_share() {
        let gib = 1u64 << 30;
        // An even split of 4 GiB over two members at 50 GiB/s: 2 GiB each, 40 ms.
        assert_eq!(peer_link_floor(4 * gib, &[10, 10], 50.0), Some(40.0));
        // Segment cuts: one member uploads 3/5 of the bytes, the floor is its link's time.
        assert_eq!(peer_link_floor(5 * gib, &[3, 2], 50.0), Some(60.0));
        assert_eq!(peer_link_floor(5 * gib, &[2, 3], 50.0), Some(60.0));
        // Nothing counted: 1/N.
        assert_eq!(peer_link_floor(4 * gib, &[0, 0], 50.0), Some(40.0));
        assert_eq!(
            peer_link_floor(4 * gib, &[1, 1], 0.0),
            None,
            "no link measured"
        );
    }

    fn span(
        lane: layerwise_offload::Lane,
        block: usize,
        start_ms: f64,
        end_ms: f64,
    ) -> layerwise_offload::TimelineSpan {
        layerwise_offload::TimelineSpan {
            lane,
            block,
            start_ms,
            end_ms,
        }
    }

    /// The summary covers the second forward's period only, counts overlapping uploads once,
    /// finds the copy stream's idle gaps and names the longest stall.
    #[test]
    fn a_timeline_summary_measures_the_second_forward() {
        use layerwise_offload::Lane::*;
        let spans = vec![
            span(Compute, 0, 0.0, 5.0),
            span(Compute, 1, 5.0, 10.0),
            // Second forward: 20..40.
            span(Compute, 0, 20.0, 25.0),
            span(Upload, 1, 18.0, 26.0),
            span(Upload, 1, 24.0, 30.0),
            span(Stall, 1, 25.0, 30.0),
            span(Compute, 1, 30.0, 38.0),
            span(Decode, 1, 26.0, 29.0),
            span(Upload, 1, 33.0, 45.0),
            span(Compute, 0, 40.0, 45.0),
        ];
        let s = timeline_summary(&spans);
        assert!(
            s.starts_with("period 20.00 ms = blocks 13.00 + stalls 5.00 + other 2.00"),
            "{s}"
        );
        assert!(
            s.contains("copy stream busy 17.00 (idle 3.00: [10.0+3.00@1]), decode busy 3.00"),
            "{s}"
        );
        assert!(s.contains("[1:5.00]"), "{s}");
        assert!(timeline_summary(&spans[..3]).contains("fewer than three forwards"));
    }
}
