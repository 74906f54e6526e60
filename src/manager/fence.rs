//! [`Fenced`]: a device buffer that owns the events ordering its use, as cudarc's `CudaSlice`
//! owns its read and write events. `ready` is recorded after the write into the buffer (an
//! upload, or a decode) and waited by its readers; `free` is recorded after the last read of it
//! (compute releasing a slot's block, or a decode out of a staging buffer) and waited before the
//! next write; in a peer group `pushed` (one per receiving member) is recorded after this
//! member's share went out of the buffer to that member and waited before the next write too.
//! The slots of the ring ([`super::ring`]) and compression's staging buffers
//! ([`super::staging`]) are both made of it.
//!
//! The events are a [`Fence`]: [`Event`] on CUDA; the tests use a fake that logs what was
//! recorded and waited. Without device events (the CPU test mode) a buffer has none, and every
//! copy into it is done when queued: the waits do nothing.

use crate::accel::{Event, Stream};
use crate::error::Context;
use crate::error::{Error, Result};
use tch::Tensor;

/// An event a [`Fenced`] buffer records on streams and makes streams wait on.
pub(super) trait Fence: Sized {
    /// The stream kind the event is recorded on.
    type Stream;
    /// A new event, not recorded.
    fn create() -> Result<Self>;
    /// Records the event at the current end of `stream`.
    fn record(&mut self, stream: &Self::Stream) -> Result<()>;
    /// Makes `stream` wait until the event's last recording has completed.
    fn wait(&self, stream: &Self::Stream) -> Result<()>;
    /// Waits on the host until the event's last recording has completed.
    fn synchronize(&self) -> Result<()>;
}

impl Fence for Event {
    type Stream = Stream;
    fn create() -> Result<Event> {
        Event::new()
    }
    fn record(&mut self, stream: &Stream) -> Result<()> {
        Event::record(self, stream)
    }
    fn wait(&self, stream: &Stream) -> Result<()> {
        Event::wait(self, stream)
    }
    fn synchronize(&self) -> Result<()> {
        Event::synchronize(self)
    }
}

/// The events of one [`Fenced`] buffer.
#[derive(Debug)]
struct Events<E> {
    ready: E,
    free: E,
    /// `free` was recorded at least once (before that, nothing has read the buffer).
    free_recorded: bool,
    /// Peer groups, by receiving rank.
    pushed: Vec<E>,
    pushed_recorded: bool,
}

/// A buffer and the events that order its writes and reads.
#[derive(Debug)]
pub(super) struct Fenced<E: Fence = Event> {
    buf: Tensor,
    /// None without device events (the CPU test mode).
    events: Option<Events<E>>,
    /// Peer groups: this member's rank (its own `pushed` event is never recorded).
    rank: usize,
}

impl<E: Fence> Fenced<E> {
    /// `buf` with events if `events` (device buffers on CUDA); `peers` is the group's size and
    /// this member's rank in a peer group.
    pub(super) fn new(buf: Tensor, events: bool, peers: Option<(usize, usize)>) -> Result<Self> {
        let events = match events {
            true => Some(Events {
                ready: E::create()?,
                free: E::create()?,
                free_recorded: false,
                pushed: (0..peers.map_or(0, |(n, _)| n))
                    .map(|_| E::create())
                    .collect::<Result<_>>()?,
                pushed_recorded: false,
            }),
            false => None,
        };
        Ok(Fenced {
            buf,
            events,
            rank: peers.map_or(0, |(_, r)| r),
        })
    }

    /// The whole buffer.
    pub(super) fn buf(&self) -> &Tensor {
        &self.buf
    }

    /// The buffer's size in bytes.
    pub(super) fn len(&self) -> usize {
        self.buf.numel()
    }

    /// The first `bytes` bytes of the buffer.
    pub(super) fn head(&self, bytes: usize) -> Result<Tensor> {
        self.buf.f_narrow(0, 0, bytes as i64).context("upload")
    }

    fn events(&self) -> Result<&Events<E>> {
        self.events.as_ref().ok_or_else(no_events)
    }

    fn events_mut(&mut self) -> Result<&mut Events<E>> {
        self.events.as_mut().ok_or_else(no_events)
    }

    /// Makes `stream` wait until the buffer may be written: its last reader is done (`free`)
    /// and (peer groups) this member's share of it went out to the others (`pushed`).
    pub(super) fn wait_writable(&self, stream: &E::Stream) -> Result<()> {
        let Some(ev) = &self.events else {
            return Ok(());
        };
        if ev.free_recorded {
            ev.free.wait(stream)?;
        }
        if ev.pushed_recorded {
            for (o, e) in ev.pushed.iter().enumerate() {
                if o != self.rank {
                    e.wait(stream)?;
                }
            }
        }
        Ok(())
    }

    /// Records `ready` on `stream`, after the write into the buffer was queued there.
    pub(super) fn mark_ready(&mut self, stream: &E::Stream) -> Result<()> {
        self.events_mut()?.ready.record(stream)
    }

    /// Makes `stream` wait for the latest write into the buffer.
    pub(super) fn wait_ready(&self, stream: &E::Stream) -> Result<()> {
        self.events()?.ready.wait(stream)
    }

    /// Waits on the host for the latest write into the buffer (at once without events).
    pub(super) fn synchronize_ready(&self) -> Result<()> {
        match &self.events {
            Some(ev) => ev.ready.synchronize(),
            None => Ok(()),
        }
    }

    /// Records `free` on `stream`, after the reads of the buffer were queued there: the next
    /// write waits for them.
    pub(super) fn mark_free(&mut self, stream: &E::Stream) -> Result<()> {
        let ev = self.events_mut()?;
        ev.free.record(stream)?;
        ev.free_recorded = true;
        Ok(())
    }

    /// Records `pushed[to]` on `stream`, after this member's share was queued there for member
    /// `to`.
    pub(super) fn mark_pushed(&mut self, to: usize, stream: &E::Stream) -> Result<()> {
        self.events_mut()?.pushed[to].record(stream)
    }

    /// Every outgoing share is queued: the next write waits for them.
    pub(super) fn shares_pushed(&mut self) {
        if let Some(ev) = &mut self.events {
            ev.pushed_recorded = true;
        }
    }
}

fn no_events() -> Error {
    Error::InvalidArgument {
        op: "upload",
        message: "a stream-ordered copy into a buffer without device events: this is a bug".into(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::{Fence, Fenced};
    use crate::error::Result;
    use std::cell::RefCell;
    use std::rc::Rc;
    use tch::{Device, Kind, Tensor};

    /// A stream that logs what is recorded on it and what it waits for.
    #[derive(Debug, Default)]
    pub(crate) struct FakeStream {
        pub(crate) log: RefCell<Vec<String>>,
    }

    /// An event: a number, and how many times it was recorded.
    #[derive(Debug)]
    pub(crate) struct FakeEvent {
        id: usize,
        recorded: usize,
        host_waits: Rc<RefCell<usize>>,
    }

    thread_local! {
        static NEXT: RefCell<usize> = const { RefCell::new(0) };
    }

    impl Fence for FakeEvent {
        type Stream = FakeStream;
        fn create() -> Result<FakeEvent> {
            let id = NEXT.with(|n| {
                let mut n = n.borrow_mut();
                *n += 1;
                *n
            });
            Ok(FakeEvent {
                id,
                recorded: 0,
                host_waits: Rc::default(),
            })
        }
        fn record(&mut self, s: &FakeStream) -> Result<()> {
            self.recorded += 1;
            s.log
                .borrow_mut()
                .push(format!("record {}#{}", self.id, self.recorded));
            Ok(())
        }
        fn wait(&self, s: &FakeStream) -> Result<()> {
            s.log
                .borrow_mut()
                .push(format!("wait {}#{}", self.id, self.recorded));
            Ok(())
        }
        fn synchronize(&self) -> Result<()> {
            *self.host_waits.borrow_mut() += 1;
            Ok(())
        }
    }

    fn buffer(events: bool, peers: Option<(usize, usize)>) -> Fenced<FakeEvent> {
        let buf = Tensor::zeros([64], (Kind::Uint8, Device::Cpu));
        Fenced::new(buf, events, peers).unwrap()
    }

    pub(crate) fn ids(f: &Fenced<FakeEvent>) -> (usize, usize, Vec<usize>) {
        let ev = f.events.as_ref().unwrap();
        (
            ev.ready.id,
            ev.free.id,
            ev.pushed.iter().map(|e| e.id).collect(),
        )
    }

    pub(crate) fn take(s: &FakeStream) -> Vec<String> {
        std::mem::take(&mut *s.log.borrow_mut())
    }

    /// A buffer never read is written at once; after a reader recorded `free`, every write
    /// waits on that recording (the latest one).
    #[test]
    fn a_write_waits_for_the_last_reader_once_there_was_one() -> Result<()> {
        let (copy, compute) = (FakeStream::default(), FakeStream::default());
        let mut f = buffer(true, None);
        let (ready, free, _) = ids(&f);
        f.wait_writable(&copy)?;
        assert!(take(&copy).is_empty(), "a fresh buffer waits for nothing");
        f.mark_ready(&copy)?;
        assert_eq!(take(&copy), [format!("record {ready}#1")]);
        f.wait_ready(&compute)?;
        f.mark_free(&compute)?;
        assert_eq!(
            take(&compute),
            [format!("wait {ready}#1"), format!("record {free}#1")]
        );
        f.wait_writable(&copy)?;
        assert_eq!(take(&copy), [format!("wait {free}#1")]);
        f.mark_free(&compute)?;
        f.wait_writable(&copy)?;
        assert_eq!(take(&copy), [format!("wait {free}#2")]);
        Ok(())
    }

    /// In a peer group a write waits for this member's outgoing shares of the last contents
    /// (every other member's `pushed`, never its own), once they were pushed.
    #[test]
    fn a_write_waits_for_the_shares_pushed_to_the_other_members() -> Result<()> {
        let (copy, push) = (FakeStream::default(), FakeStream::default());
        let mut f = buffer(true, Some((3, 1)));
        let (_, _, pushed) = ids(&f);
        f.mark_pushed(0, &push)?;
        f.mark_pushed(2, &push)?;
        f.wait_writable(&copy)?;
        assert!(take(&copy).is_empty(), "not yet declared pushed");
        f.shares_pushed();
        f.wait_writable(&copy)?;
        assert_eq!(
            take(&copy),
            [
                format!("wait {}#1", pushed[0]),
                format!("wait {}#1", pushed[2])
            ]
        );
        Ok(())
    }

    /// Without device events the waits are no-ops, and a stream-ordered record is an error
    /// (there is no stream without events), not a silent success.
    #[test]
    fn without_events_waits_do_nothing_and_records_are_refused() -> Result<()> {
        let s = FakeStream::default();
        let mut f = buffer(false, Some((2, 0)));
        f.wait_writable(&s)?;
        f.synchronize_ready()?;
        f.shares_pushed();
        assert!(f.mark_ready(&s).is_err());
        assert!(f.mark_free(&s).is_err());
        assert!(f.wait_ready(&s).is_err());
        assert!(s.log.borrow().is_empty());
        assert_eq!(f.len(), 64);
        assert_eq!(f.head(10)?.numel(), 10);
        Ok(())
    }

    /// `synchronize_ready` waits on the host for `ready`.
    #[test]
    fn synchronize_ready_waits_on_the_host() -> Result<()> {
        let f = buffer(true, None);
        f.synchronize_ready()?;
        assert_eq!(*f.events.as_ref().unwrap().ready.host_waits.borrow(), 1);
        Ok(())
    }
}
