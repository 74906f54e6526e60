//! Timing: device events around uploads, compute-stream waits and (while a timeline is
//! captured) block computes, read back into [`OffloadStats`] without blocking.

use crate::accel::{Event, Stream};
use crate::error::{Error, Result};
use crate::stats::{Lane, OffloadStats, TimelineSpan};

use super::LayerwiseOffloadManager;

/// The timed intervals of one manager.
#[derive(Debug, Default)]
pub(super) struct Timer {
    /// Timed intervals queued on the device and not yet read back.
    pending: Vec<Timed>,
    /// Compute intervals of entered blocks, closed at release (while capturing a timeline).
    open_compute: Vec<(usize, Event, Event)>,
    /// The timeline being captured, if any.
    timeline: Option<Timeline>,
    /// Timing events ready for reuse.
    spare: Vec<(Event, Event)>,
}

/// A device interval being timed: an upload on the copy stream, a wait on the compute stream
/// or a block's compute.
#[derive(Debug)]
struct Timed {
    block: usize,
    /// Bytes moved (uploads).
    bytes: u64,
    lane: Lane,
    start: Event,
    end: Event,
    /// Recorded while a timeline was being captured.
    traced: bool,
    /// Counted as one timed upload or decode (false for a block's segment copies after the
    /// first, [`Timer::time_part`]).
    counted: bool,
}

/// A timeline capture: an origin event on the compute stream and the spans read back so far.
#[derive(Debug)]
struct Timeline {
    origin: Event,
    spans: Vec<TimelineSpan>,
}

/// A pair of events taken from the [`Timer`] before an interval is queued.
pub(super) type Pair = Option<(Event, Event)>;

impl Timer {
    /// Whether a timeline is being captured.
    pub(super) fn is_tracing(&self) -> bool {
        self.timeline.is_some()
    }

    /// Starts a timeline at a point of `compute`.
    pub(super) fn start_timeline(&mut self, compute: &Stream) -> Result<()> {
        let mut origin = Event::with_timing()?;
        origin.record(compute)?;
        self.timeline = Some(Timeline {
            origin,
            spans: Vec::new(),
        });
        Ok(())
    }

    /// Ends the capture: its spans, sorted by start (read back what has finished first).
    pub(super) fn finish_timeline(&mut self) -> Vec<TimelineSpan> {
        let mut spans = self.timeline.take().map(|t| t.spans).unwrap_or_default();
        spans.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
        spans
    }

    /// Reads back every finished timed interval into `stats` and recycles its events.
    pub(super) fn harvest(&mut self, stats: &mut OffloadStats) {
        let mut i = 0;
        while i < self.pending.len() {
            if !self.pending[i].end.query().unwrap_or(true) {
                i += 1;
                continue;
            }
            let t = self.pending.swap_remove(i);
            if let Ok(ms) = t.start.elapsed_ms(&t.end) {
                match t.lane {
                    Lane::Upload => {
                        stats.upload_ms += ms;
                        stats.timed_uploads += u64::from(t.counted);
                        stats.timed_bytes += t.bytes;
                        stats.block_upload_ms[t.block] += ms;
                    }
                    Lane::Stall => {
                        stats.stall_ms += ms;
                        stats.block_stall_ms[t.block] += ms;
                    }
                    Lane::Decode => {
                        stats.decode_ms += ms;
                        stats.timed_decodes += 1;
                    }
                    Lane::Compute => {}
                }
                if let (true, Some(tl)) = (t.traced, self.timeline.as_mut())
                    && let (Ok(a), Ok(b)) =
                        (tl.origin.elapsed_ms(&t.start), tl.origin.elapsed_ms(&t.end))
                {
                    tl.spans.push(TimelineSpan {
                        lane: t.lane,
                        block: t.block,
                        start_ms: a,
                        end_ms: b,
                    });
                }
            }
            self.spare.push((t.start, t.end));
        }
    }

    /// A pair of timing events, recycled when possible (reading back finished intervals into
    /// `stats` first); None when `on` is false.
    pub(super) fn pair(&mut self, on: bool, stats: &mut OffloadStats) -> Result<Pair> {
        if !on {
            return Ok(None);
        }
        self.harvest(stats);
        match self.spare.pop() {
            Some(p) => Ok(Some(p)),
            None => Ok(Some((Event::with_timing()?, Event::with_timing()?))),
        }
    }

    /// Keeps an unused `pair` for reuse.
    pub(super) fn put_back(&mut self, pair: Pair) {
        self.spare.extend(pair);
    }

    /// Runs `op`, which queues work on `stream`, between the two events of `pair` (if any), and
    /// keeps the interval for [`Self::harvest`] as `lane` of `block`, `bytes` moved.
    pub(super) fn time<R>(
        &mut self,
        pair: Pair,
        stream: &Stream,
        key: (usize, u64, Lane),
        op: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        self.time_part(pair, stream, key, true, op)
    }

    /// [`Self::time`] for one part of an interval timed in parts (a block's segment copies):
    /// its time and bytes are summed as the others', but it counts as a timed upload or decode
    /// only if `counted` (the first part).
    pub(super) fn time_part<R>(
        &mut self,
        pair: Pair,
        stream: &Stream,
        (block, bytes, lane): (usize, u64, Lane),
        counted: bool,
        op: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        let Some((mut start, mut end)) = pair else {
            return op();
        };
        start.record(stream)?;
        let out = op()?;
        end.record(stream)?;
        let traced = self.timeline.is_some();
        self.pending.push(Timed {
            block,
            bytes,
            lane,
            start,
            end,
            traced,
            counted,
        });
        Ok(out)
    }

    /// Opens an interval on `stream` with `pair` (if any): its start is recorded now, its end
    /// by [`Self::close`] once its work is queued (work queued by closures that borrow the
    /// timer, which [`Self::time`] cannot wrap).
    pub(super) fn open(pair: Pair, stream: &Stream) -> Result<Pair> {
        let Some((mut start, end)) = pair else {
            return Ok(None);
        };
        start.record(stream)?;
        Ok(Some((start, end)))
    }

    /// Closes an interval opened by [`Self::open`] at this point of `stream`, and keeps it for
    /// [`Self::harvest`] as `lane` of `block`, `bytes` moved.
    pub(super) fn close(
        &mut self,
        opened: Pair,
        stream: &Stream,
        (block, bytes, lane): (usize, u64, Lane),
    ) -> Result<()> {
        let Some((start, mut end)) = opened else {
            return Ok(());
        };
        end.record(stream)?;
        let traced = self.timeline.is_some();
        self.pending.push(Timed {
            block,
            bytes,
            lane,
            start,
            end,
            traced,
            counted: true,
        });
        Ok(())
    }

    /// Opens the compute interval of `block` at this point of `compute`.
    pub(super) fn open_compute(
        &mut self,
        block: usize,
        compute: &Stream,
        pair: (Event, Event),
    ) -> Result<()> {
        let (mut start, end) = pair;
        start.record(compute)?;
        self.open_compute.push((block, start, end));
        Ok(())
    }

    /// Closes the compute interval of `block`, if one is open, at this point of the compute
    /// stream (`compute` gives it, asked only when an interval is open).
    pub(super) fn close_compute(
        &mut self,
        block: usize,
        compute: impl FnOnce() -> Result<Option<Stream>>,
    ) -> Result<()> {
        if let Some(k) = self.open_compute.iter().position(|(b, ..)| *b == block) {
            let (_, start, mut end) = self.open_compute.swap_remove(k);
            if let Some(compute) = compute()? {
                end.record(&compute)?;
                self.pending.push(Timed {
                    block,
                    bytes: 0,
                    lane: Lane::Compute,
                    start,
                    end,
                    traced: true,
                    counted: true,
                });
            }
        }
        Ok(())
    }
}

impl LayerwiseOffloadManager {
    /// Counters so far. Timings are read back without blocking, so the most recent intervals
    /// appear once the device has finished them (synchronize first for a complete account).
    pub fn stats(&mut self) -> &OffloadStats {
        self.timer.harvest(&mut self.stats);
        if let Some(peak) = self.backend.peak_memory() {
            self.stats.peak_vram_bytes = peak;
        }
        &self.stats
    }

    /// Starts capturing a timeline: from now on every upload, compute-stream wait and block
    /// compute is kept as a [`TimelineSpan`] (three pairs of events per block). Needs a CUDA
    /// device and `timing(true)`.
    pub fn start_timeline(&mut self) -> Result<()> {
        let compute = match self.backend.compute_stream()? {
            Some(c) if self.config.timing => c,
            _ => {
                return Err(Error::InvalidArgument {
                    op: "start_timeline",
                    message: "a timeline needs a CUDA device and timing(true)".into(),
                });
            }
        };
        self.timer.start_timeline(&compute)
    }

    /// Stops the capture and returns its spans, sorted by start. Waits (on the host) for the
    /// device to finish the work queued so far. Empty if no capture was running.
    pub fn finish_timeline(&mut self) -> Result<Vec<TimelineSpan>> {
        if !self.timer.is_tracing() {
            return Ok(Vec::new());
        }
        self.backend.synchronize()?;
        self.timer.harvest(&mut self.stats);
        Ok(self.timer.finish_timeline())
    }
}
