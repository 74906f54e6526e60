//! [`HostTier`](super::HostTier)'s tests, one or more per tier, without a manager.

use super::{HostTier, Staged, Transport};
use crate::accel::HostMemory;
use crate::checkpoint::{self, Checkpoint};
use crate::host::{HostBlock, HostStore};
use crate::manager::disk::DiskTier;
use crate::manager::weights::views;
use crate::plan::{self, BlockLayout};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

type R = anyhow::Result<()>;

/// One block of three tensors (odd sizes: alignment gaps between them) and its layout.
fn block() -> (Vec<(String, Tensor)>, BlockLayout) {
    let named: Vec<(String, Tensor)> = vec![
        (
            "blocks.0.a".into(),
            Tensor::arange(35, (Kind::Float, Device::Cpu)),
        ),
        (
            "blocks.0.b".into(),
            (Tensor::randn([17, 9], (Kind::Float, Device::Cpu)) * 0.02).to_kind(Kind::BFloat16),
        ),
        (
            "blocks.0.c".into(),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        ),
    ];
    let plan = plan::build(&named, &[("blocks".into(), 1)], &[Device::Cpu]).unwrap();
    (named, plan.blocks[0].clone())
}

/// The block's bytes in one buffer laid out as `layout` says, gaps zero.
fn raw(named: &[(String, Tensor)], layout: &BlockLayout) -> Tensor {
    let buf = Tensor::zeros([layout.bytes as i64], (Kind::Uint8, Device::Cpu));
    for (mut v, t) in views(&buf, layout)
        .unwrap()
        .into_iter()
        .zip(&layout.tensors)
    {
        v.copy_(&named[t.source_index].1);
    }
    buf
}

fn encoded(buf: &Tensor) -> HostBlock {
    let bytes = Vec::<u8>::try_from(buf).unwrap();
    let enc = layerwise_offload_codec::encode_segmented(&bytes, 4096).unwrap();
    HostBlock::encoded(Tensor::from_slice(&enc), bytes.len())
}

fn shares_memory(a: &Tensor, buf: &Tensor) -> bool {
    let (p, start) = (a.data_ptr() as usize, buf.data_ptr() as usize);
    start <= p && p < start + buf.numel()
}

/// Every value of the block, read through `tier`, is the model's.
fn reads_back(tier: &HostTier, named: &[(String, Tensor)], layout: &BlockLayout) -> R {
    for (j, t) in layout.tensors.iter().enumerate() {
        assert!(
            tier.tensor(0, layout, j, true)?
                .equal(&named[t.source_index].1)
        );
    }
    let fresh = tier.restore(0, layout, Device::Cpu)?;
    for (f, t) in fresh.iter().zip(&layout.tensors) {
        assert!(
            f.equal(&named[t.source_index].1),
            "{} restored changed",
            t.name
        );
    }
    Ok(())
}

#[test]
fn a_pinned_block_is_read_in_place_and_written_in_place() -> R {
    let (named, layout) = block();
    let buf = raw(&named, &layout);
    let mut tier = HostTier::Pinned(HostBlock::whole(buf.shallow_clone()));
    assert!(tier.is_offloaded() && !tier.is_read_only() && tier.encoding().is_none());
    assert_eq!(
        tier.transport(0, layout.bytes),
        Transport::Raw {
            bytes: layout.bytes
        }
    );
    reads_back(&tier, &named, &layout)?;
    // tensor() is a view of the host copy, restore() a copy of it.
    assert!(shares_memory(&tier.tensor(0, &layout, 1, true)?, &buf));
    assert!(!shares_memory(
        &tier.restore(0, &layout, Device::Cpu)?[1],
        &buf
    ));
    // An upload's bytes are the buffer's own.
    let staged = tier.stage(0, 256, layout.bytes - 256)?;
    assert_eq!(staged.pieces.len(), 1);
    let whole = staged.contiguous(layout.bytes - 256)?;
    assert!(
        shares_memory(&whole, &buf),
        "one piece is handed out as it is"
    );
    assert!(
        staged.pieces[0]
            .1
            .equal(&buf.narrow(0, 256, layout.bytes as i64 - 256))
    );
    staged.finish(None)?;
    // update writes the host copy; the encoder is not asked for a raw block.
    let value = Tensor::full([3], 7.0, (Kind::Float, Device::Cpu));
    let old = tier.update("blocks.0.c", &layout, 2, &value, |_| panic!("raw"))?;
    assert!(old.is_none());
    assert!(tier.tensor(0, &layout, 2, true)?.equal(&value));
    assert!(views(&buf, &layout)?[2].equal(&value), "written in place");
    // Dropped: views of the copy, or copies where others read it too.
    let own = tier.detach(&layout, false).unwrap();
    assert!(shares_memory(&own[0], &buf));
    let shared = tier.detach(&layout, true).unwrap();
    assert!(!shared.iter().any(|t| shares_memory(t, &buf)));
    assert!(shared[0].equal(&named[0].1));
    Ok(())
}

#[test]
fn read_only_pages_are_copied_out_and_never_written() -> R {
    let (named, layout) = block();
    let buf = raw(&named, &layout);
    for mut tier in [
        HostTier::FilePages(HostBlock::pieces(vec![(0, buf.shallow_clone())])),
        HostTier::SharedMemory {
            host: HostBlock::whole(buf.shallow_clone()),
            opened: true,
        },
    ] {
        assert!(tier.is_read_only());
        reads_back(&tier, &named, &layout)?;
        assert!(
            !shares_memory(&tier.tensor(0, &layout, 0, true)?, &buf),
            "owned"
        );
        assert!(
            shares_memory(&tier.tensor(0, &layout, 0, false)?, &buf),
            "for reads"
        );
        let value = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        assert!(
            tier.update("blocks.0.c", &layout, 2, &value, |_| panic!())
                .is_err()
        );
        assert!(views(&buf, &layout)?[2].equal(&named[2].1), "unchanged");
        let dropped = tier.detach(&layout, true).unwrap();
        assert!(!dropped.iter().any(|t| shares_memory(t, &buf)));
    }
    // The publisher's own pages may be written (when nobody else holds them).
    let published = HostTier::SharedMemory {
        host: HostBlock::whole(buf.shallow_clone()),
        opened: false,
    };
    assert!(!published.is_read_only());
    Ok(())
}

#[test]
fn an_encoded_block_decodes_on_the_way_out_and_is_encoded_again_on_update() -> R {
    let (named, layout) = block();
    let buf = raw(&named, &layout);
    let mut tier = HostTier::Pinned(encoded(&buf));
    assert_eq!(tier.encoding().map(|(_, n)| n), Some(layout.bytes));
    // An upload moves the encoding.
    let enc = tier.encoding().unwrap().0.shallow_clone();
    let n = enc.numel();
    assert_eq!(
        tier.transport(0, layout.bytes),
        Transport::Encoded {
            len: n,
            raw: layout.bytes
        }
    );
    let staged = tier.stage(0, 3, n - 3)?;
    assert!(
        staged
            .contiguous(n - 3)?
            .equal(&enc.narrow(0, 3, n as i64 - 3))
    );
    staged.finish(None)?;
    reads_back(&tier, &named, &layout)?;
    let value = Tensor::full([3], -2.5, (Kind::Float, Device::Cpu));
    let mut asked = None;
    let old = tier.update("blocks.0.c", &layout, 2, &value, |raw| {
        asked = Some(raw.copy());
        Ok(encoded(raw))
    })?;
    let old = old.expect("the old encoding comes back");
    assert!(old.encoding().is_some());
    // The encoder got the raw block with the value written and its gaps zero.
    let mut want = named
        .iter()
        .map(|(n, t)| (n.clone(), t.copy()))
        .collect::<Vec<_>>();
    want[2].1 = value.copy();
    assert!(asked.unwrap().equal(&raw(&want, &layout)));
    assert!(tier.tensor(0, &layout, 2, true)?.equal(&value));
    assert!(tier.tensor(0, &layout, 0, true)?.equal(&named[0].1));
    Ok(())
}

#[test]
fn a_block_in_the_model_has_no_host_bytes() {
    let (_, layout) = block();
    let tier = HostTier::Model;
    assert!(!tier.is_offloaded());
    assert!(tier.stage(0, 0, 16).is_err());
    assert!(tier.read(0, layout.bytes).is_err());
    assert!(tier.detach(&layout, false).is_none());
}

#[test]
fn a_store_gives_each_block_the_tier_of_its_pages() {
    let (named, layout) = block();
    let store = |f: &dyn Fn(&mut HostStore)| {
        let mut s = HostStore::own(
            vec![layout.clone(), layout.clone()],
            vec![Some(HostBlock::whole(raw(&named, &layout))), None],
            false,
            None,
        );
        f(&mut s);
        s
    };
    let own = store(&|_| {});
    assert!(matches!(HostTier::from_store(&own, 0), HostTier::Pinned(_)));
    assert!(matches!(HostTier::from_store(&own, 1), HostTier::Model));
    let mut published = store(&|_| {});
    published.owner_path = Some("/nonexistent/never-created".into());
    assert!(matches!(
        HostTier::from_store(&published, 0),
        HostTier::SharedMemory { opened: false, .. }
    ));
    published.owner_path = None; // Drop would remove the path
    let opened = store(&|s| s.read_only = true);
    assert!(matches!(
        HostTier::from_store(&opened, 0),
        HostTier::SharedMemory { opened: true, .. }
    ));
    let pages = store(&|s| {
        s.read_only = true;
        s.file_pages = true;
    });
    assert!(matches!(
        HostTier::from_store(&pages, 0),
        HostTier::FilePages(_)
    ));
}

/// `named` written as a checkpoint in a directory of its own (`name` and the process id), and
/// where each tensor of `layout` is read from in it: the directory, the checkpoint and the
/// disk tier's reads for one block.
#[allow(clippy::type_complexity)]
fn in_a_checkpoint(
    name: &str,
    named: &[(String, Tensor)],
    layout: &BlockLayout,
) -> anyhow::Result<(
    std::path::PathBuf,
    Arc<Checkpoint>,
    Vec<Vec<(checkpoint::CheckpointTensor, usize)>>,
)> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    Tensor::write_safetensors(named, &path)?;
    let ckpt = Arc::new(Checkpoint::open(&path)?);
    let model: Vec<(&str, Vec<i64>, Kind)> = named
        .iter()
        .map(|(n, t)| (n.as_str(), t.size(), t.kind()))
        .collect();
    let found = checkpoint::match_tensors(&ckpt, &model, false, false)?;
    let reads = vec![
        layout
            .tensors
            .iter()
            .map(|t| (found[t.source_index].clone(), t.offset))
            .collect(),
    ];
    Ok((dir, ckpt, reads))
}

/// A disk-tier block is read from the checkpoint into a staging buffer for each upload,
/// given back after it, read fresh for `tensor` and `restore`, and never written.
#[test]
fn a_disk_block_is_read_from_the_checkpoint_at_each_use() -> R {
    let (named, layout) = block();
    let (dir, ckpt, reads) = in_a_checkpoint("tier-disk", &named, &layout)?;
    let stamps = ckpt.stamps()?;
    let disk = DiskTier::new(
        ckpt.clone(),
        reads,
        vec![layout.bytes],
        HostMemory::Pageable,
        stamps,
    )?;
    let mut tier = HostTier::Disk(Arc::new(disk));
    assert!(tier.is_offloaded() && tier.encoding().is_none());
    let want = raw(&named, &layout);
    for _ in 0..3 {
        let staged: Staged = tier.stage(0, 0, layout.bytes)?;
        for t in &layout.tensors {
            let got = staged.pieces[0]
                .1
                .narrow(0, t.offset as i64, t.bytes as i64);
            assert!(got.equal(&want.narrow(0, t.offset as i64, t.bytes as i64)));
        }
        staged.finish(None)?; // else the next stage would wait for the buffer forever
    }
    reads_back(&tier, &named, &layout)?;
    let value = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    assert!(
        tier.update("blocks.0.c", &layout, 2, &value, |_| panic!())
            .is_err()
    );
    assert!(
        tier.detach(&layout, false).is_none(),
        "its values stay in the file"
    );
    drop(tier);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A disk-tier block read from the checkpoint's encoded cache: uploads move its encoding
/// (staged from the cache at each upload, given back after), `tensor` and `restore` read the
/// checkpoint raw.
#[test]
fn an_encoded_disk_block_stages_its_encoding_and_reads_back_raw() -> R {
    use crate::checkpoint::cache::{EncodedCache, block_key};
    let (named, layout) = block();
    let (dir, ckpt, reads) = in_a_checkpoint("tier-disk-enc", &named, &layout)?;
    let want = raw(&named, &layout);
    let enc = layerwise_offload_codec::encode_segmented(&Vec::<u8>::try_from(&want)?, 4096)?;
    let keys = vec![block_key(layout.bytes, [])];
    let cache = EncodedCache::write(&dir.join("c.encoded"), &ckpt, &keys, (4096, false), |_| {
        Ok((enc.clone(), layout.bytes))
    })?;
    let disk = DiskTier::encoded(
        ckpt.clone(),
        reads,
        HostMemory::Pageable,
        ckpt.stamps()?,
        Arc::new(cache),
    )?;
    let tier = HostTier::Disk(Arc::new(disk));
    assert_eq!(
        tier.transport(0, layout.bytes),
        Transport::Encoded {
            len: enc.len(),
            raw: layout.bytes
        }
    );
    for _ in 0..3 {
        let staged = tier.stage(0, 0, enc.len())?;
        assert_eq!(Vec::<u8>::try_from(&staged.contiguous(enc.len())?)?, enc);
        staged.finish(None)?;
    }
    reads_back(&tier, &named, &layout)?;
    drop(tier);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
