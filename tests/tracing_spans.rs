//! The `tracing` feature's spans, recorded by a small subscriber of this file: initialize, the
//! checkpoint load or the host copy, each encode, upload and decode, restore; and the library's
//! one warning as an event. In the CPU test mode. Run with `--features tracing`
//! (scripts/test.sh does).
#![cfg(feature = "tracing")]

use offload_testkit as common;

use common::model::{Block, DIM, Model};
use layerwise_offload::checkpoint::{Checkpoint, ShardedWriter};
use layerwise_offload::{LayerwiseOffloadManager, OffloadConfig, Result, empty};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tch::nn::{self, Module};
use tch::{Device, Kind};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// A span as recorded: its name, its fields, and the name of the span it was opened in.
#[derive(Debug, Clone)]
struct SpanRecord {
    name: &'static str,
    fields: BTreeMap<String, String>,
    parent: Option<&'static str>,
}

#[derive(Default)]
struct Inner {
    spans: Mutex<Vec<SpanRecord>>,
    events: Mutex<Vec<(Level, String)>>,
    /// The spans entered on this (single) thread, innermost last, by id.
    stack: Mutex<Vec<u64>>,
    next: AtomicU64,
}

/// Records every span and event of the thread it is the default of.
#[derive(Clone, Default)]
struct Recorder(Arc<Inner>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let parent = self.0.stack.lock().unwrap().last().copied();
        let mut spans = self.0.spans.lock().unwrap();
        let parent = parent.map(|p| spans[p as usize - 1].name);
        spans.push(SpanRecord {
            name: attrs.metadata().name(),
            fields,
            parent,
        });
        Id::from_u64(id)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        self.0
            .events
            .lock()
            .unwrap()
            .push((*event.metadata().level(), message));
    }

    fn enter(&self, span: &Id) {
        self.0.stack.lock().unwrap().push(span.into_u64());
    }

    fn exit(&self, span: &Id) {
        let mut stack = self.0.stack.lock().unwrap();
        if let Some(at) = stack.iter().rposition(|&s| s == span.into_u64()) {
            stack.remove(at);
        }
    }
}

impl Recorder {
    fn spans(&self, name: &str) -> Vec<SpanRecord> {
        self.0
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }
}

/// Runs a forward through `m` (entering every block) on `model`.
fn forward(model: &Model, m: &mut LayerwiseOffloadManager) {
    let x = model.input(4);
    let _ = model.forward(&x, Some(m));
}

#[test]
fn a_checkpoint_load_with_compression_records_every_span() -> Result<()> {
    let source = Model::new(Device::Cpu, 3, false, 1);
    let dir = std::env::temp_dir().join(format!("lo-tracing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    ShardedWriter::new(&dir, 1 << 20).write(&source.vs)?;
    let (vs, (embed, blocks, head)) = empty::build(Device::Cpu, Kind::Float, |root| {
        let embed = nn::linear(root / "embed", 16, DIM, Default::default());
        let blocks: Vec<Block> = (0..3)
            .map(|i| Block::new(root / "blocks" / i, DIM, 4 * DIM, 4))
            .collect();
        let head = nn::linear(root / "head", DIM, 16, Default::default());
        (embed, blocks, head)
    })?;
    let x = source.input(4);
    let want = source.forward(&x, None);
    let rec = Recorder::default();
    let (uploads, blocks) = tracing::subscriber::with_default(rec.clone(), || -> Result<_> {
        let mut m = OffloadConfig::from_model(&vs, "blocks")?
            .cpu_test_mode(true)
            .compress(true)
            .checkpoint(Checkpoint::open(&dir)?)
            .build(&vs)?;
        m.initialize()?;
        let got = tch::no_grad(|| -> Result<_> {
            let mut h = embed.forward(&x);
            for (i, b) in blocks.iter().enumerate() {
                let _g = m.enter(i)?;
                h = b.forward(&h);
            }
            Ok(head.forward(&h))
        })?;
        assert!(common::model::bits_equal(&got, &want));
        let uploads = m.stats().uploads;
        let n = m.num_blocks();
        m.restore()?;
        Ok((uploads, n))
    })?;
    std::fs::remove_dir_all(&dir).unwrap();

    let init = rec.spans("initialize");
    assert_eq!(init.len(), 1, "{init:?}");
    assert_eq!(init[0].fields["checkpoint"], "true");
    let load = rec.spans("load");
    assert_eq!(load.len(), 1, "{load:?}");
    assert_eq!(load[0].parent, Some("initialize"));
    assert_eq!(load[0].fields["blocks"], "3");
    assert!(rec.spans("host_copy").is_empty());
    // One encode per block, inside the load.
    let encode = rec.spans("encode");
    assert_eq!(encode.len(), blocks, "{encode:?}");
    assert!(
        encode.iter().all(|s| s.parent == Some("load")),
        "{encode:?}"
    );
    // One upload span per upload the statistics count, each with its block; one decode per
    // segment in each (these blocks are one segment each; the CPU test mode decodes as it
    // uploads).
    let upload = rec.spans("upload");
    assert_eq!(upload.len() as u64, uploads, "{upload:?}");
    assert!(uploads >= blocks as u64);
    let mut uploaded: Vec<String> = upload.iter().map(|s| s.fields["block"].clone()).collect();
    uploaded.dedup();
    assert_eq!(uploaded[..blocks], ["0", "1", "2"]);
    let decode = rec.spans("decode");
    assert_eq!(decode.len(), upload.len(), "{decode:?}");
    assert!(decode.iter().all(|s| s.parent == Some("upload")));
    let restore = rec.spans("restore");
    assert_eq!(restore.len(), 1);
    assert_eq!(restore[0].fields["blocks"], "3");
    Ok(())
}

/// `set_encoded_blocks` records one `convert` span with the count asked for and the blocks it
/// converted, and an `encode` span inside it per block it encoded.
#[test]
fn converting_block_forms_records_a_convert_span() -> Result<()> {
    let model = Model::new(Device::Cpu, 4, false, 3);
    let rec = Recorder::default();
    tracing::subscriber::with_default(rec.clone(), || -> Result<()> {
        let mut m = OffloadConfig::new("blocks", 4)
            .cpu_test_mode(true)
            .compress(true)
            .compress_blocks(0)
            .build(&model.vs)?;
        m.initialize()?;
        m.set_encoded_blocks(3)?;
        forward(&model, &mut m);
        m.restore()?;
        Ok(())
    })?;
    let convert = rec.spans("convert");
    assert_eq!(convert.len(), 1, "{convert:?}");
    assert_eq!(convert[0].fields["encoded"], "3");
    assert_eq!(convert[0].fields["blocks"], "3");
    let encodes = rec.spans("encode");
    assert_eq!(encodes.len(), 3, "{encodes:?}");
    assert!(
        encodes.iter().all(|e| e.parent == Some("convert")),
        "{encodes:?}"
    );
    Ok(())
}

#[test]
fn a_copy_from_the_model_records_host_copy_and_the_warning_is_an_event() -> Result<()> {
    let model = Model::new(Device::Cpu, 2, false, 2);
    let rec = Recorder::default();
    tracing::subscriber::with_default(rec.clone(), || -> Result<()> {
        let mut m = OffloadConfig::new("blocks", 2)
            .cpu_test_mode(true)
            .build(&model.vs)?;
        m.initialize()?;
        forward(&model, &mut m);
        m.restore()?;
        // FastVideo's constructor without CUDA: disabled, saying why through tracing only.
        let seed = LayerwiseOffloadManager::new(&model.vs, "blocks", 2, true, true, false)?;
        assert_eq!(
            seed.is_enabled(),
            layerwise_offload::accel::cuda_is_available()
        );
        Ok(())
    })?;
    let host = rec.spans("host_copy");
    assert_eq!(host.len(), 1, "{host:?}");
    assert!(rec.spans("convert").is_empty());
    assert_eq!(host[0].parent, Some("initialize"));
    assert_eq!(host[0].fields["blocks"], "2");
    assert_eq!(rec.spans("initialize")[0].fields["checkpoint"], "false");
    assert!(rec.spans("encode").is_empty() && rec.spans("decode").is_empty());
    assert!(rec.spans("upload").len() >= 2);
    let events = rec.0.events.lock().unwrap().clone();
    if layerwise_offload::accel::cuda_is_available() {
        assert!(events.is_empty(), "{events:?}");
    } else {
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0, Level::WARN);
        assert!(events[0].1.contains("disabled"), "{events:?}");
    }
    Ok(())
}

#[test]
fn on_cuda_every_upload_has_its_span() -> Result<()> {
    let Some(_) = common::cuda() else {
        return Ok(());
    };
    let model = Model::new(Device::Cpu, 3, false, 3);
    let rec = Recorder::default();
    let uploads = tracing::subscriber::with_default(rec.clone(), || -> Result<u64> {
        let mut m = layerwise_offload::offload(&model.vs, "blocks")?;
        forward(&model, &mut m);
        forward(&model, &mut m);
        let uploads = m.stats().uploads;
        m.restore()?;
        Ok(uploads)
    })?;
    let upload = rec.spans("upload");
    assert_eq!(upload.len() as u64, uploads);
    assert!(uploads >= 6, "{uploads}");
    assert_eq!(rec.spans("host_copy").len(), 1);
    assert_eq!(rec.spans("restore").len(), 1);
    assert!(
        rec.spans("decode").is_empty(),
        "raw transport decodes nothing"
    );
    Ok(())
}
