//! A user's `main` that returns the crate's `Result` and fails: asks for CUDA device 1000,
//! which no machine has. What `main` prints for the `Err` is the error's `Debug`, which must be
//! the helpful message (the `NoDevice` advice), not a struct dump.

use layerwise_offload::OffloadConfig;
use layerwise_offload_dependent::{BLOCKS, Model};

fn main() -> Result<(), layerwise_offload::Error> {
    let model = Model::new(1);
    OffloadConfig::new("blocks", BLOCKS)
        .device(1000)
        .build(&model.vs)?;
    Ok(())
}
