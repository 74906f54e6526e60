//! [`StagingRing`]: the device buffers an encoded block passes through on its way into a slot.
//! A block's encoding is a sequence of segments (`layerwise_offload_codec::segments`), each the
//! independent encoding of at most `compress_segment_bytes` raw bytes of the block. Segment by
//! segment, the copy stream moves its encoding into the next staging buffer of the ring (once
//! that buffer's previous decode is done: `free`) and records `ready`; the decode stream waits
//! for it and decodes it into the slot at the segment's raw offset, and records the buffer's
//! `free`. The slot's `free` is waited before the first decode, its `ready` recorded after the
//! last. The buffers are [`Fenced`], as the slots are.
//!
//! Two buffers by default (`OffloadConfig::compress_staging_buffers`): while one is decoded
//! from, the next segment is copied into the other. A segment's decode (about 40 us for 64 MiB
//! at the decoder's speed) is some twenty times shorter than its copy over PCIe (about 0.9 ms
//! for its 45 MiB encoding at 50 GiB/s), so the copy of segment i + 2 never waits for the
//! decode of segment i unless the decode stream itself waits, for the slot's previous block to
//! be released; a third buffer would let the copy run one more segment ahead only then, for one
//! more segment's encoding of device memory (on an H100 three and four buffers were no faster
//! than two: bench/RESULTS.md).
//! The ring turns on across blocks (the next block's first segment takes the buffer after the
//! last one used), so consecutive segments always alternate.

use crate::accel::Event;
use crate::error::Result;
use layerwise_offload_codec::Segment;
use tch::Tensor;

use super::fence::{Fence, Fenced};

/// The staging buffers, used in turn.
#[derive(Debug)]
pub(super) struct StagingRing<E: Fence = Event> {
    bufs: Vec<Fenced<E>>,
    next: usize,
}

impl<E: Fence> StagingRing<E> {
    /// A ring over `bufs` (at least one).
    pub(super) fn new(bufs: Vec<Fenced<E>>) -> StagingRing<E> {
        debug_assert!(!bufs.is_empty());
        StagingRing { bufs, next: 0 }
    }

    /// The index of the next buffer (round robin).
    pub(super) fn next(&mut self) -> usize {
        let k = self.next;
        self.next = (k + 1) % self.bufs.len();
        k
    }

    /// Buffer `k`.
    #[cfg(test)]
    pub(super) fn buffer(&self, k: usize) -> &Fenced<E> {
        &self.bufs[k]
    }

    /// The buffers.
    pub(super) fn buffers(&self) -> &[Fenced<E>] {
        &self.bufs
    }

    /// Replaces every buffer by `make()` (they grow), all or none: should one `make` fail,
    /// the old buffers stay. The caller waited for the streams.
    pub(super) fn replace(&mut self, mut make: impl FnMut() -> Result<Fenced<E>>) -> Result<()> {
        let new = (0..self.bufs.len())
            .map(|_| make())
            .collect::<Result<Vec<_>>>()?;
        self.bufs = new;
        Ok(())
    }

    /// Bytes of all the buffers together.
    pub(super) fn bytes(&self) -> usize {
        self.bufs.iter().map(Fenced::len).sum()
    }

    /// Queues the upload of an encoded block whose `segments` go into `slot`: per segment,
    /// `copy_in(segment, staging)` queues the copy of its encoding into the first bytes of the
    /// next staging buffer on `copy` (once the buffer's last decode is done), and
    /// `decode_out(segment, staging)` the decode of those bytes into the slot on `decode` (once
    /// the copy is done, and for the first segment once the slot's last reader is done). Records
    /// each buffer's `ready` (copy) and `free` (decode), and the slot's `ready` after the last
    /// decode. `decoded(segment, slot)` is called after each segment's decode is queued (a
    /// peer group sends decoded bytes on from there). Without `streams` (the CPU test mode:
    /// each copy and decode is done when it returns) the same buffers are used in the same
    /// order, and no event is waited or recorded.
    pub(super) fn upload(
        &mut self,
        segments: &[Segment],
        slot: &mut Fenced<E>,
        streams: Option<(&E::Stream, &E::Stream)>,
        mut copy_in: impl FnMut(&Segment, &Tensor) -> Result<()>,
        mut decode_out: impl FnMut(&Segment, &Tensor) -> Result<()>,
        mut decoded: impl FnMut(&Segment, &mut Fenced<E>) -> Result<()>,
    ) -> Result<()> {
        for (i, seg) in segments.iter().enumerate() {
            let k = self.next();
            let buf = &mut self.bufs[k];
            let staged = buf.head(seg.encoded_len())?;
            if let Some((copy, _)) = streams {
                buf.wait_writable(copy)?;
            }
            copy_in(seg, &staged)?;
            if let Some((copy, decode)) = streams {
                buf.mark_ready(copy)?;
                buf.wait_ready(decode)?;
                if i == 0 {
                    slot.wait_writable(decode)?;
                }
            }
            decode_out(seg, &staged)?;
            if let Some((_, decode)) = streams {
                buf.mark_free(decode)?;
            }
            decoded(seg, slot)?;
        }
        match streams {
            Some((_, decode)) => slot.mark_ready(decode),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StagingRing;
    use crate::error::Result;
    use crate::manager::fence::Fenced;
    use crate::manager::fence::tests::{FakeEvent, FakeStream, ids, take};
    use layerwise_offload_codec::Segments;
    use tch::{Device, Kind, Tensor};

    /// The segments of `input` encoded in segments of 1024 raw bytes (chunks of 256 values).
    fn segments_of(input: &[u8]) -> Segments {
        let encoded = layerwise_offload_codec::Encoder::new()
            .with_chunk_values(256)
            .encode_segmented(input, 1024)
            .unwrap();
        Segments::walk(&encoded).unwrap()
    }

    fn buffer(bytes: i64) -> Fenced<FakeEvent> {
        Fenced::new(
            Tensor::zeros([bytes], (Kind::Uint8, Device::Cpu)),
            true,
            None,
        )
        .unwrap()
    }

    /// Five segments through a ring of two buffers, then a second block of two: segment i of
    /// the run takes buffer i % 2; each copy waits for the buffer's last decode (from the third
    /// segment on) and records its `ready`; each decode waits for that `ready`, the first one
    /// also for the slot's `free`, and records the buffer's `free`, after which the `decoded`
    /// hook runs; the slot's `ready` follows the last decode. Each staged view is the first
    /// bytes of its buffer, as long as the segment's encoding.
    #[test]
    fn segments_take_the_buffers_in_turn_with_their_waits() -> Result<()> {
        let input: Vec<u8> = (0..5 * 1024 - 100).map(|i| (i % 13) as u8).collect();
        let segments = segments_of(&input);
        assert_eq!(segments.len(), 5);
        let largest = segments.largest_encoded() as i64;
        let mut ring = StagingRing::new(vec![buffer(largest), buffer(largest)]);
        let bufs: Vec<_> = (0..2).map(|k| ids(ring.buffer(k))).collect();
        let mut slot = buffer(input.len() as i64);
        // The slot was read by a block before: its `free` was recorded once.
        slot.mark_free(&FakeStream::default())?;
        let (slot_ready, slot_free, _) = ids(&slot);
        let (copy, decode) = (FakeStream::default(), FakeStream::default());
        let ptr = |t: &Tensor| t.data_ptr() as usize;
        let starts: Vec<usize> = (0..2).map(|k| ptr(ring.buffer(k).buf())).collect();
        let mut copied = Vec::new();
        let mut decoded = Vec::new();
        ring.upload(
            segments.as_slice(),
            &mut slot,
            Some((&copy, &decode)),
            |seg, staged| {
                assert_eq!(staged.numel(), seg.encoded_len());
                let k = starts.iter().position(|&s| s == ptr(staged)).unwrap();
                copy.log
                    .borrow_mut()
                    .push(format!("copy {}", seg.raw.start));
                copied.push(k);
                Ok(())
            },
            |seg, staged| {
                let k = starts.iter().position(|&s| s == ptr(staged)).unwrap();
                decode
                    .log
                    .borrow_mut()
                    .push(format!("decode {} from {k}", seg.raw.start));
                decoded.push(k);
                Ok(())
            },
            |seg, _| {
                decode
                    .log
                    .borrow_mut()
                    .push(format!("decoded {}", seg.raw.start));
                Ok(())
            },
        )?;
        assert_eq!(copied, [0, 1, 0, 1, 0]);
        assert_eq!(decoded, copied);
        let (r0, f0, _) = &bufs[0];
        let (r1, f1, _) = &bufs[1];
        assert_eq!(
            take(&copy),
            [
                "copy 0".to_string(),
                format!("record {r0}#1"),
                "copy 1024".to_string(),
                format!("record {r1}#1"),
                format!("wait {f0}#1"),
                "copy 2048".to_string(),
                format!("record {r0}#2"),
                format!("wait {f1}#1"),
                "copy 3072".to_string(),
                format!("record {r1}#2"),
                format!("wait {f0}#2"),
                "copy 4096".to_string(),
                format!("record {r0}#3"),
            ]
        );
        assert_eq!(
            take(&decode),
            [
                format!("wait {r0}#1"),
                format!("wait {slot_free}#1"),
                "decode 0 from 0".to_string(),
                format!("record {f0}#1"),
                "decoded 0".to_string(),
                format!("wait {r1}#1"),
                "decode 1024 from 1".to_string(),
                format!("record {f1}#1"),
                "decoded 1024".to_string(),
                format!("wait {r0}#2"),
                "decode 2048 from 0".to_string(),
                format!("record {f0}#2"),
                "decoded 2048".to_string(),
                format!("wait {r1}#2"),
                "decode 3072 from 1".to_string(),
                format!("record {f1}#2"),
                "decoded 3072".to_string(),
                format!("wait {r0}#3"),
                "decode 4096 from 0".to_string(),
                format!("record {f0}#3"),
                "decoded 4096".to_string(),
                format!("record {slot_ready}#1"),
            ]
        );
        // The next block's first segment takes the buffer after the last one used.
        let two = segments_of(&input[..2000]);
        copied.clear();
        ring.upload(
            two.as_slice(),
            &mut slot,
            Some((&copy, &decode)),
            |_, staged| {
                copied.push(starts.iter().position(|&s| s == ptr(staged)).unwrap());
                Ok(())
            },
            |_, _| Ok(()),
            |_, _| Ok(()),
        )?;
        assert_eq!(copied, [1, 0]);
        assert_eq!(
            take(&copy),
            [
                format!("wait {f1}#2"),
                format!("record {r1}#3"),
                format!("wait {f0}#3"),
                format!("record {r0}#4"),
            ]
        );
        assert_eq!(ring.bytes(), 2 * largest as usize);
        Ok(())
    }

    /// Without streams (the CPU test mode) the buffers are used in the same order and no event
    /// is waited or recorded (buffers without events would refuse a record).
    #[test]
    fn without_streams_the_same_buffers_are_used_and_nothing_is_recorded() -> Result<()> {
        let input = vec![3u8; 3500];
        let segments = segments_of(&input);
        let largest = segments.largest_encoded() as i64;
        let plain = |n: i64| {
            Fenced::<FakeEvent>::new(Tensor::zeros([n], (Kind::Uint8, Device::Cpu)), false, None)
                .unwrap()
        };
        let mut ring = StagingRing::new(vec![plain(largest), plain(largest)]);
        let starts: Vec<usize> = (0..2)
            .map(|k| ring.buffer(k).buf().data_ptr() as usize)
            .collect();
        let mut slot = plain(3500);
        let mut used = Vec::new();
        ring.upload(
            segments.as_slice(),
            &mut slot,
            None,
            |_, staged| {
                used.push(
                    starts
                        .iter()
                        .position(|&s| s == staged.data_ptr() as usize)
                        .unwrap(),
                );
                Ok(())
            },
            |_, _| Ok(()),
            |_, _| Ok(()),
        )?;
        assert_eq!(used, [0, 1, 0, 1]);
        Ok(())
    }

    /// A failed copy stops the upload before anything is recorded for that segment: the slot's
    /// `ready` is not recorded (the block is not marked there).
    #[test]
    fn a_failed_copy_records_nothing_after_it() -> Result<()> {
        let input = vec![7u8; 3000];
        let segments = segments_of(&input);
        let largest = segments.largest_encoded() as i64;
        let mut ring = StagingRing::new(vec![buffer(largest), buffer(largest)]);
        let mut slot = buffer(3000);
        let (slot_ready, _, _) = ids(&slot);
        let (copy, decode) = (FakeStream::default(), FakeStream::default());
        let mut n = 0;
        let r = ring.upload(
            segments.as_slice(),
            &mut slot,
            Some((&copy, &decode)),
            |_, _| {
                n += 1;
                match n {
                    2 => Err(crate::Error::InvalidArgument {
                        op: "test",
                        message: "copy failed".into(),
                    }),
                    _ => Ok(()),
                }
            },
            |_, _| Ok(()),
            |_, _| Ok(()),
        );
        assert!(r.is_err());
        assert!(
            !take(&decode).contains(&format!("record {slot_ready}#1")),
            "no slot ready after a failed copy"
        );
        Ok(())
    }

    /// Three buffers: segment i takes buffer i % 3, and a copy first waits for a buffer's last
    /// decode at the fourth segment (two copies may run ahead of the decodes).
    #[test]
    fn three_buffers_let_the_copies_run_two_segments_ahead() -> Result<()> {
        let input: Vec<u8> = (0..5 * 1024 - 100).map(|i| (i % 11) as u8).collect();
        let segments = segments_of(&input);
        let largest = segments.largest_encoded() as i64;
        let mut ring = StagingRing::new((0..3).map(|_| buffer(largest)).collect());
        let bufs: Vec<_> = (0..3).map(|k| ids(ring.buffer(k))).collect();
        let mut slot = buffer(input.len() as i64);
        let (copy, decode) = (FakeStream::default(), FakeStream::default());
        let ptr = |t: &Tensor| t.data_ptr() as usize;
        let starts: Vec<usize> = (0..3).map(|k| ptr(ring.buffer(k).buf())).collect();
        let mut copied = Vec::new();
        ring.upload(
            segments.as_slice(),
            &mut slot,
            Some((&copy, &decode)),
            |seg, staged| {
                copied.push(starts.iter().position(|&s| s == ptr(staged)).unwrap());
                copy.log
                    .borrow_mut()
                    .push(format!("copy {}", seg.raw.start));
                Ok(())
            },
            |_, _| Ok(()),
            |_, _| Ok(()),
        )?;
        assert_eq!(copied, [0, 1, 2, 0, 1]);
        let waits: Vec<String> = take(&copy)
            .into_iter()
            .filter(|l| l.starts_with("wait") || l.starts_with("copy"))
            .collect();
        let (_, f0, _) = &bufs[0];
        let (_, f1, _) = &bufs[1];
        assert_eq!(
            waits,
            [
                "copy 0".to_string(),
                "copy 1024".to_string(),
                "copy 2048".to_string(),
                format!("wait {f0}#1"),
                "copy 3072".to_string(),
                format!("wait {f1}#1"),
                "copy 4096".to_string(),
            ]
        );
        Ok(())
    }
}
