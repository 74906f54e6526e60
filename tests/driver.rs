//! The `&self` driver: `SharedManager` and `OffloadedBlocks` run the block loop through a shared
//! reference, give the same output as the guard loop, and survive errors and panics inside a
//! block with every weight intact.

use offload_testkit as common;

use common::Mode;
use common::model::{Model, assert_same, bits_equal};
use layerwise_offload::{Error, Fault, OffloadedBlocks, SharedManager};
use rstest::rstest;
use std::panic::{AssertUnwindSafe, catch_unwind};
use tch::nn::{self, ModuleT};

#[rstest]
fn a_shared_manager_runs_blocks_from_a_shared_reference(
    #[values(Mode::Cpu, Mode::Cuda)] mode: Mode,
) -> anyhow::Result<()> {
    let Some(dev) = mode.device() else {
        return Ok(());
    };
    let model = Model::new(dev, 4, false, 21);
    let before = model.snapshot();
    let x = model.input(5);
    let want = model.forward(&x, None);
    let mut m = mode.config("blocks", 4).build(&model.vs)?;
    m.initialize()?;
    let shared = SharedManager::new(m);
    let run = |shared: &SharedManager| -> layerwise_offload::Result<tch::Tensor> {
        let mut h = tch::no_grad(|| x.to_device(dev).shallow_clone());
        // The model's own forward without the head, block by block through `&self`.
        let blocks: Vec<_> = model.blocks().collect();
        h = model_embed(&model, &h);
        for (i, b) in blocks.iter().enumerate() {
            h = shared.with_block(i, || tch::no_grad(|| b.forward(&h)))?;
        }
        Ok(model_head(&model, &h))
    };
    let got = run(&shared)?;
    assert!(bits_equal(&got, &want));
    let uploads = shared.stats().uploads;
    assert!(uploads >= 4, "{uploads} uploads");

    // An index past the last block: a typed error, nothing left entered.
    match shared.with_block(4, || ()) {
        Err(Error::BlockOutOfRange { .. }) => {}
        other => panic!("expected BlockOutOfRange, got {other:?}"),
    }
    // A panic inside a block poisons nothing: the block is released and the next forward is
    // exact.
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        shared.with_block(1, || panic!("deliberate panic inside block 1"))
    }));
    assert!(panicked.is_err());
    assert!(!shared.lock()?.is_entered(1));
    assert!(bits_equal(&run(&shared)?, &want));

    let mut m = shared.into_inner();
    m.restore()?;
    assert_same(&model.snapshot(), &before);
    Ok(())
}

#[test]
fn offloaded_blocks_checks_the_block_count() -> anyhow::Result<()> {
    let model = Model::new(tch::Device::Cpu, 3, false, 2);
    let mut m = Mode::Cpu.config("blocks", 3).build(&model.vs)?;
    m.initialize()?;
    match OffloadedBlocks::new(vec![(); 2], m) {
        Err(Error::InvalidArgument { message, .. }) => {
            assert!(
                message.contains("2 blocks") && message.contains("streams 3"),
                "{message}"
            )
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    Ok(())
}

fn model_embed(model: &Model, x: &tch::Tensor) -> tch::Tensor {
    let vars = model.vs.variables();
    tch::no_grad(|| x.linear(&vars["embed.weight"], Some(&vars["embed.bias"])))
}

fn model_head(model: &Model, h: &tch::Tensor) -> tch::Tensor {
    let vars = model.vs.variables();
    tch::no_grad(|| {
        h.linear(&vars["head.weight"], Some(&vars["head.bias"]))
            .to_device(tch::Device::Cpu)
    })
}

/// `n` linear blocks under `blocks`, with non-zero weights, and their input.
fn linear_stack(seed: i64, n: usize) -> (nn::VarStore, Vec<nn::Linear>, tch::Tensor) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let blocks = (0..n)
        .map(|i| nn::linear(vs.root() / "blocks" / i, 32, 32, Default::default()))
        .collect();
    let x = tch::Tensor::randn([4, 32], (tch::Kind::Float, tch::Device::Cpu));
    (vs, blocks, x)
}

fn sorted_snapshot(vs: &nn::VarStore) -> Vec<(String, tch::Tensor)> {
    let mut v: Vec<_> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The text of a caught panic.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// The blocks' output on `x` without a manager.
fn resident(blocks: &[nn::Linear], x: &tch::Tensor) -> tch::Tensor {
    tch::no_grad(|| {
        blocks
            .iter()
            .fold(x.shallow_clone(), |h, b| b.forward_t(&h, false))
    })
}

fn no_block_entered<B>(stack: &OffloadedBlocks<B>) -> bool {
    let m = stack.manager().lock().expect("not held by this thread");
    (0..stack.blocks().len()).all(|i| !m.is_entered(i))
}

#[test]
fn forward_t_before_initialize_is_a_typed_error_and_a_named_panic() -> anyhow::Result<()> {
    let (vs, blocks, x) = linear_stack(7, 3);
    let before = sorted_snapshot(&vs);
    let want = resident(&blocks, &x);
    let m = Mode::Cpu.config("blocks", 3).build(&vs)?;
    let stack = OffloadedBlocks::new(blocks, m)?;

    match tch::no_grad(|| stack.f_forward_t(&x, false)) {
        Err(Error::NotInitialized { .. }) => {}
        other => panic!("expected NotInitialized, got {other:?}"),
    }
    let caught = catch_unwind(AssertUnwindSafe(|| {
        tch::no_grad(|| stack.forward_t(&x, false))
    }));
    let text = panic_text(caught.expect_err("forward_t panics on a manager error"));
    assert!(
        text.contains("called before initialize()"),
        "names the error: {text}"
    );
    assert!(
        text.contains("f_forward_t"),
        "points to the fallible method: {text}"
    );

    // The manager still works: initialize it, and the forward is exact; restore gives every
    // weight back bit for bit.
    stack.manager().lock()?.initialize()?;
    let got = tch::no_grad(|| stack.forward_t(&x, false));
    assert!(bits_equal(&got, &want));
    assert!(no_block_entered(&stack));
    let (_, mut m) = stack.into_parts();
    m.restore()?;
    assert_same(&sorted_snapshot(&vs), &before);
    Ok(())
}

#[test]
fn a_block_count_mismatch_found_at_the_first_forward_is_a_typed_error() -> anyhow::Result<()> {
    let (vs, mut blocks, x) = linear_stack(8, 3);
    let before = sorted_snapshot(&vs);
    blocks.truncate(2);
    // Not initialized yet: the count cannot be checked at construction.
    let m = Mode::Cpu.config("blocks", 3).build(&vs)?;
    let stack = OffloadedBlocks::new(blocks, m)?;
    stack.manager().lock()?.initialize()?;

    match tch::no_grad(|| stack.f_forward_t(&x, false)) {
        Err(Error::InvalidArgument { message, .. }) => {
            assert!(
                message.contains("2 blocks") && message.contains("streams 3"),
                "{message}"
            )
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(no_block_entered(&stack));
    let uploads = stack.manager().stats().uploads;
    let caught = catch_unwind(AssertUnwindSafe(|| {
        tch::no_grad(|| stack.forward_t(&x, false))
    }));
    let text = panic_text(caught.expect_err("forward_t panics on a manager error"));
    assert!(
        text.contains("2 blocks") && text.contains("f_forward_t"),
        "{text}"
    );
    // Nothing ran: no block entered, no upload queued, and every weight comes back.
    assert!(no_block_entered(&stack));
    assert_eq!(stack.manager().stats().uploads, uploads);
    let (_, mut m) = stack.into_parts();
    m.restore()?;
    assert_same(&sorted_snapshot(&vs), &before);
    Ok(())
}

#[test]
fn a_failure_inside_the_loop_leaves_no_block_entered() -> anyhow::Result<()> {
    let (vs, blocks, x) = linear_stack(9, 4);
    let before = sorted_snapshot(&vs);
    let want = resident(&blocks, &x);
    let mut m = Mode::Cpu
        .config("blocks", 4)
        .inject_fault(Fault::Upload(2))
        .build(&vs)?;
    m.initialize()?;
    let stack = OffloadedBlocks::new(blocks, m)?;

    let caught = catch_unwind(AssertUnwindSafe(|| {
        tch::no_grad(|| stack.forward_t(&x, false))
    }));
    let text = panic_text(caught.expect_err("the injected upload failure panics forward_t"));
    assert!(text.contains("f_forward_t"), "{text}");
    assert!(no_block_entered(&stack), "a block was left entered");
    // The manager still works (the fault is one-shot): the next forward is exact.
    let got = tch::no_grad(|| stack.f_forward_t(&x, false))?;
    assert!(bits_equal(&got, &want));
    assert!(no_block_entered(&stack));
    let (_, mut m) = stack.into_parts();
    m.restore()?;
    assert_same(&sorted_snapshot(&vs), &before);
    Ok(())
}

/// Runs `f` on its own thread and returns its result; fails (instead of hanging the test run)
/// when it has not returned within `secs` seconds.
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::sync::mpsc::{RecvTimeoutError, channel};
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {secs} s: the manager waits for itself")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what} panicked (see above)"),
    }
}

#[test]
fn calls_from_inside_a_block_of_the_same_shared_manager_never_hang() {
    within(
        60,
        "calls from inside with_block",
        || -> anyhow::Result<()> {
            let (vs, blocks, x) = linear_stack(11, 4);
            let before = sorted_snapshot(&vs);
            let want = resident(&blocks, &x);
            let mut m = Mode::Cpu.config("blocks", 4).build(&vs)?;
            m.initialize()?;
            let stack = OffloadedBlocks::new(blocks, m)?;
            let shared = stack.manager();

            // stats() inside a block: the counters as of the block's entry (its prefetch of block
            // 1 included), without waiting for the lock this thread holds.
            let inside = shared.with_block(0, || shared.stats())?;
            let after = shared.stats();
            assert_eq!(
                inside.uploads, after.uploads,
                "the snapshot is taken after entry"
            );
            assert!(inside.uploads >= 2, "{} uploads", inside.uploads);
            // From another thread the block waits for: the same snapshot, without waiting.
            let other = shared.with_block(1, || {
                std::thread::scope(|s| s.spawn(|| shared.stats()).join().unwrap())
            })?;
            assert_eq!(other.uploads, shared.stats().uploads);

            // A block entered from inside a block of the same manager: a typed error, its closure
            // not run, the outer block released normally.
            let mut ran = false;
            let nested = shared.with_block(0, || shared.with_block(1, || ran = true))?;
            match nested {
                Err(Error::InvalidArgument { op, message }) => {
                    assert_eq!(op, "SharedManager::with_block");
                    assert!(
                        message.contains("this thread holds the manager"),
                        "{message}"
                    );
                }
                other => panic!("expected InvalidArgument, got {other:?}"),
            }
            assert!(!ran, "the nested closure must not run");

            // The whole stack run from inside one of its blocks: the same error.
            let nested_run = shared.with_block(2, || stack.run((), |_, ()| ()))?;
            assert!(
                matches!(nested_run, Err(Error::InvalidArgument { .. })),
                "{nested_run:?}"
            );
            assert!(no_block_entered(&stack));

            // The lock itself from inside a block: refused, not waited for.
            match shared.with_block(3, || shared.lock().map(|_| ()))? {
                Err(Error::InvalidArgument { op, .. }) => assert_eq!(op, "SharedManager::lock"),
                other => panic!("expected InvalidArgument, got {other:?}"),
            }
            // While this thread holds the lock's guard, stats() answers from the snapshot and the
            // loop is refused; once the guard drops, both work again.
            {
                let mut guard = shared.lock()?;
                assert_eq!(shared.stats().uploads, guard.stats().uploads);
                assert!(matches!(
                    shared.with_block(0, || ()),
                    Err(Error::InvalidArgument { .. })
                ));
                assert!(shared.lock().is_err());
            }
            shared.with_block(0, || ())?;
            assert!(no_block_entered(&stack));

            // Everything works afterwards: the forward is exact, restore gives every weight back.
            let got = tch::no_grad(|| stack.f_forward_t(&x, false))?;
            assert!(bits_equal(&got, &want));
            let (_, mut m) = stack.into_parts();
            m.restore()?;
            assert_same(&sorted_snapshot(&vs), &before);
            Ok(())
        },
    )
    .unwrap();
}
