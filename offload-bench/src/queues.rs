//! `--probe-queues`: which of the device's streams share a hardware work queue.
//!
//! CUDA feeds a device through a fixed number of hardware work queues
//! (`CUDA_DEVICE_MAX_CONNECTIONS`, 8 unless set; the bench sets 32) and puts every stream on one
//! of them. A queue runs what it is given in order, whichever stream it came from, so a stream
//! that waits on an event stops every stream of its queue until the event's work is done: a
//! copy stream that shares a queue with a decode stream waits for the decodes' waits. Which
//! stream gets which queue is not documented. The probe finds out for the streams a run can
//! get: the thread's current (compute) stream and every stream of libtorch's pool at normal and
//! at high priority (the pool hands them out round robin, so the copy and decode streams of the
//! run's configurations are among them). Drawing the pool's 32 streams of a priority brings its
//! round robin back to where it was. [`probe`] says how streams are told apart.

use crate::runs::{Bench, Streamed};
use anyhow::{Context, Result, bail};
use layerwise_offload::accel::{self, Event, Stream};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Streams per priority in libtorch's pool (c10's kStreamsPerPool).
pub const POOL_STREAMS: usize = 32;

/// The streams that share a hardware queue with another: groups of stream ids (each sorted, in
/// order of their first id); a stream alone on its queue is in none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMap {
    pub groups: Vec<Vec<i64>>,
}

impl QueueMap {
    /// Groups from the probe's observations: `held[s]` lists the streams (indices into `ids`)
    /// whose event stayed behind stream `s`'s wait. Sharing a queue is symmetric and
    /// transitive, so every observation joins two groups.
    pub fn from_observations(ids: &[i64], held: &[Vec<usize>]) -> QueueMap {
        let mut parent: Vec<usize> = (0..ids.len()).collect();
        fn root(p: &mut [usize], mut i: usize) -> usize {
            while p[i] != i {
                p[i] = p[p[i]];
                i = p[i];
            }
            i
        }
        for (s, ts) in held.iter().enumerate() {
            for &t in ts {
                let (a, b) = (root(&mut parent, s), root(&mut parent, t));
                parent[a.max(b)] = a.min(b);
            }
        }
        let mut groups: Vec<Vec<i64>> = Vec::new();
        let mut of_root: Vec<Option<usize>> = vec![None; ids.len()];
        for (i, &id) in ids.iter().enumerate() {
            let r = root(&mut parent, i);
            match of_root[r] {
                Some(g) => groups[g].push(id),
                None => {
                    of_root[r] = Some(groups.len());
                    groups.push(vec![id]);
                }
            }
        }
        groups.retain(|g| g.len() > 1);
        for g in &mut groups {
            g.sort_unstable();
        }
        groups.sort_unstable_by_key(|g| g[0]);
        QueueMap { groups }
    }

    /// Whether streams `a` and `b` (ids) share a queue (a stream shares one with itself).
    pub fn share(&self, a: i64, b: i64) -> bool {
        a == b || self.groups.iter().any(|g| g.contains(&a) && g.contains(&b))
    }

    /// The pairs among `streams` (name, id) that share a queue, as `name and name`; a stream
    /// named twice (the same id) is not a pair.
    pub fn collisions(&self, streams: &[(&str, i64)]) -> Vec<String> {
        let mut out = Vec::new();
        for (i, (na, a)) in streams.iter().enumerate() {
            for (nb, b) in &streams[i + 1..] {
                if a != b && self.share(*a, *b) {
                    out.push(format!("{na} and {nb}"));
                }
            }
        }
        out
    }
}

/// A stream id as people read it: `default`, `pool p1 #5` (priority level 1, index 5 in its
/// pool of 32), or the raw id of a stream from elsewhere. c10 packs a pool stream's id as
/// index << 5 | level << 1 | 1 (level 1 the normal priority, higher levels higher priorities).
pub fn describe(id: i64) -> String {
    if id == 0 {
        return "default".into();
    }
    if id & 1 == 1 && id >> 10 == 0 {
        let level = (id >> 1) & 0xf;
        let index = (id >> 5) & 0x1f;
        return format!("pool p{level} #{index}");
    }
    format!("stream {id:#x}")
}

/// Probes device 0's streams (`--probe-queues`, after the runs) and prints the groups that share
/// a queue, then each configuration whose compute, copy and decode streams share one, and a
/// `QUEUES {json}` line of both.
pub fn report(b: &Bench, rows: &[Streamed]) -> Result<()> {
    let Device::Cuda(d) = b.dev else {
        bail!("--probe-queues needs a CUDA device");
    };
    eprintln!(
        "probing which streams share one of the {} hardware queues...",
        accel::hardware_queues()
    );
    let t0 = Instant::now();
    let probed = probe(d)?;
    eprintln!(
        "  {} streams in {:.1} s",
        probed.streams,
        t0.elapsed().as_secs_f64()
    );
    let map = probed.map;
    for g in &map.groups {
        let names: Vec<String> = g.iter().map(|&id| describe(id)).collect();
        println!("one hardware queue: {}", names.join(", "));
    }
    if map.groups.is_empty() {
        // With one queue the probe finds every stream in one group; on an H100 with 32 it
        // found none: no probed stream's work waited behind another's.
        println!(
            "no two of the {} probed streams wait behind each other's work on {} hardware queues",
            probed.streams,
            accel::hardware_queues()
        );
    }
    let mut configurations = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for r in rows {
        // One entry per configuration (its rows of other token counts have the same streams).
        if !seen.insert(r.label.clone()) {
            continue;
        }
        let mut streams = Vec::new();
        if let Some(id) = b.compute_stream {
            streams.push(("compute", id));
        }
        if let Some(id) = r.copy_stream {
            streams.push(("copy", id));
        }
        if let Some(id) = r.decode_stream {
            streams.push(("decode", id));
        }
        let pairs = map.collisions(&streams);
        if !pairs.is_empty() {
            println!("{}: {} share a hardware queue", r.label, pairs.join("; "));
        }
        configurations.push(serde_json::json!({
            "mode": r.label,
            "streams": streams.iter().map(|(n, id)| serde_json::json!({"stream": n, "id": id, "name": describe(*id)})).collect::<Vec<_>>(),
            "sharing": pairs,
        }));
    }
    let json = serde_json::json!({
        "hardware_queues": accel::hardware_queues(),
        "streams": probed.streams,
        "groups": map.groups,
        "configurations": configurations,
    });
    println!("QUEUES {json}");
    Ok(())
}

/// The probe on CUDA device `d` (a few seconds): the current stream and every pool stream of
/// normal and high priority. For each stream S and gate stream G (three gates: the first two
/// normal pool streams drawn and the first high-priority one): G runs matrix products for a few
/// milliseconds, S waits on an event recorded after them, and every other stream T queues a
/// 4-byte device-to-device copy (copy engine work, no SM needed) and records an event. While G
/// still computes, T's event stays pending if T's work sits behind S's wait in one queue, or
/// behind G's products in G's queue: T is on S's queue where every run (with each gate other
/// than S and T) held it back. That is the hazard the manager's streams meet: a stream that
/// waits stops the others of its queue. (An event recorded on an idle stream alone is not
/// enough: it can complete whatever its queue holds, so T queues work first.)
pub fn probe(d: usize) -> Result<Probed> {
    let mut streams = vec![Stream::current(d)?];
    for high in [false, true] {
        for _ in 0..POOL_STREAMS {
            let s = if high {
                Stream::from_pool_high_priority(d)?
            } else {
                Stream::from_pool(d)?
            };
            if !streams.contains(&s) {
                streams.push(s);
            }
        }
    }
    let ids: Vec<i64> = streams.iter().map(|s| s.id()).collect();
    let n = streams.len();
    let opts = (Kind::Float, Device::Cuda(d));
    let a = Tensor::randn([4096, 4096], (Kind::BFloat16, Device::Cuda(d)));
    let src = Tensor::ones([1], opts);
    let dst: Vec<Tensor> = (0..n).map(|_| Tensor::zeros([1], opts)).collect();
    accel::synchronize_device(d)?;
    let gates: Vec<usize> = [1, 2, 1 + POOL_STREAMS]
        .into_iter()
        .filter(|&g| g < n)
        .collect();
    let mut held = Vec::with_capacity(n);
    for s in 0..n {
        let mut behind = vec![true; n];
        behind[s] = false;
        let mut runs = 0;
        for &g in gates.iter().filter(|&&g| g != s) {
            let now = work_held(
                &streams,
                &src,
                &dst,
                |products| {
                    let gate = busy(&streams[g], &a, products)?;
                    gate.wait(&streams[s])?;
                    Ok(gate)
                },
                &[s, g],
            )?;
            for (t, b) in behind.iter_mut().enumerate() {
                // A gate's own work is not queued in its run: the other runs decide.
                if t != g && !now[t] {
                    *b = false;
                }
            }
            runs += 1;
        }
        if runs < 2 {
            bail!("the queue probe needs three streams from the pool, it got {n}");
        }
        held.push((0..n).filter(|&t| behind[t]).collect::<Vec<_>>());
    }
    Ok(Probed {
        map: QueueMap::from_observations(&ids, &held),
        streams: n,
    })
}

/// What [`probe`] found.
pub struct Probed {
    pub map: QueueMap,
    /// Streams probed.
    pub streams: usize,
}

/// Keeps `g` busy with `products` products of `a`; an event after them.
fn busy(g: &Stream, a: &Tensor, products: usize) -> Result<Event> {
    let mut done = Event::new()?;
    accel::with_stream(g, || {
        for _ in 0..products {
            let _ = a.matmul(a);
        }
    })?;
    done.record(g)?;
    Ok(done)
}

/// Starts `work` (which returns an event after its busy part), queues a 4-byte copy and an
/// event on every stream but `skip`, and after a millisecond answers, per stream, whether its
/// event has not completed while the busy part still ran. More products where the busy part
/// ended first.
fn work_held(
    streams: &[Stream],
    src: &Tensor,
    dst: &[Tensor],
    work: impl Fn(usize) -> Result<Event>,
    skip: &[usize],
) -> Result<Vec<bool>> {
    let d = streams[0].device_index();
    for products in [16, 64, 256] {
        let gate = work(products)?;
        let mut evs = Vec::with_capacity(streams.len());
        for (t, st) in streams.iter().enumerate() {
            let mut ev = Event::new()?;
            if !skip.contains(&t) {
                let mut to = dst[t].shallow_clone();
                accel::with_stream(st, || to.f_copy_(src))?.context("a probe copy")?;
                ev.record(st)?;
            }
            evs.push(ev);
        }
        std::thread::sleep(Duration::from_millis(1));
        let mut out = Vec::with_capacity(streams.len());
        for (t, ev) in evs.iter().enumerate() {
            out.push(!skip.contains(&t) && !ev.query().context("querying a probe event")?);
        }
        let still_busy = !gate.query()?;
        accel::synchronize_device(d)?;
        if still_busy {
            return Ok(out);
        }
    }
    bail!(
        "256 products of 4096 x 4096 finished within a millisecond: the probe cannot tell queues apart"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids 10, 20, ... on queues given by `queue_of`: what a probe of such a device observes.
    fn observe(queue_of: &[usize]) -> (Vec<i64>, Vec<Vec<usize>>) {
        let ids = (0..queue_of.len()).map(|i| 10 * (i as i64 + 1)).collect();
        let held = (0..queue_of.len())
            .map(|s| {
                (0..queue_of.len())
                    .filter(|&t| t != s && queue_of[t] == queue_of[s])
                    .collect()
            })
            .collect();
        (ids, held)
    }

    #[test]
    fn streams_on_one_queue_form_one_group_and_lone_streams_none() {
        // Eight queues, streams on queues 0..7 and again 0, 1: two pairs share.
        let (ids, held) = observe(&[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]);
        let map = QueueMap::from_observations(&ids, &held);
        assert_eq!(map.groups, vec![vec![10, 90], vec![20, 100]]);
        assert!(map.share(10, 90) && map.share(90, 10) && map.share(30, 30));
        assert!(!map.share(10, 20) && !map.share(30, 40));
        // One queue for all: one group of every stream.
        let (ids, held) = observe(&[0; 5]);
        assert_eq!(
            QueueMap::from_observations(&ids, &held).groups,
            vec![vec![10, 20, 30, 40, 50]]
        );
    }

    #[test]
    fn a_one_sided_observation_still_joins_the_two_streams() {
        // Stream 0 saw 2 behind it, 2 did not see 0 (and 1 saw 2): one group of three.
        let ids = [5, 6, 7, 8];
        let held = vec![vec![2], vec![2], vec![], vec![]];
        let map = QueueMap::from_observations(&ids, &held);
        assert_eq!(map.groups, vec![vec![5, 6, 7]]);
    }

    #[test]
    fn collisions_name_the_pairs_that_share_a_queue() {
        let map = QueueMap {
            groups: vec![vec![0, 35], vec![3, 67]],
        };
        let streams = [("compute", 0), ("copy", 35), ("decode", 67), ("push", 3)];
        assert_eq!(
            map.collisions(&streams),
            vec![
                "compute and copy".to_string(),
                "decode and push".to_string()
            ]
        );
        assert!(map.collisions(&[("copy", 35), ("decode", 35)]).is_empty());
        assert!(map.collisions(&[("copy", 35), ("decode", 3)]).is_empty());
    }

    #[test]
    fn pool_stream_ids_read_as_level_and_index() {
        assert_eq!(describe(0), "default");
        // c10: index << 5 | level << 1 | 1.
        assert_eq!(describe(3), "pool p1 #0");
        assert_eq!(describe(5 << 5 | 1 << 1 | 1), "pool p1 #5");
        assert_eq!(describe(31 << 5 | 4 << 1 | 1), "pool p4 #31");
        assert_eq!(describe(0x7f00_1000), "stream 0x7f001000");
    }
}
