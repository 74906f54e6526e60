//! `tracing` spans and the library's one warning, with the `tracing` feature; without it every
//! function here is empty and the library prints nothing.
//!
//! Spans (target `layerwise_offload`): `initialize` (info, field `checkpoint`), `host_copy`
//! and `load` (info: the blocks copied into host memory, or read from a checkpoint, with
//! `blocks` and `bytes`), `restore` (info, field `blocks`), `convert` (info:
//! `set_encoded_blocks`, with the count asked for as `encoded` and the converted `blocks` and
//! their raw `bytes`), and per block `encode`, `upload` and `decode` (debug, fields `block` and
//! `bytes`; `block` is left out where the span sits inside its block's `upload` or inside
//! `host_copy`/`load`/`convert`). A span times the host's work: on CUDA an
//! upload's or a decode's span ends once the copy or the kernel is queued (the statistics and
//! the timeline time them on the device); in the CPU test mode it covers the copy itself.

/// An entered span; it ends when dropped.
#[cfg(feature = "tracing")]
pub(crate) type Span = tracing::span::EnteredSpan;

/// Nothing (the `tracing` feature is off).
#[cfg(not(feature = "tracing"))]
#[derive(Debug)]
pub(crate) struct Span;

/// `initialize()`, from a checkpoint or not.
pub(crate) fn initialize(checkpoint: bool) -> Span {
    #[cfg(feature = "tracing")]
    return tracing::info_span!(target: "layerwise_offload", "initialize", checkpoint).entered();
    #[cfg(not(feature = "tracing"))]
    {
        let _ = checkpoint;
        Span
    }
}

/// A stage of `initialize()` over `blocks` blocks of `bytes` bytes: `host_copy` (from the model)
/// or `load` (from a checkpoint).
pub(crate) fn stage(checkpoint: bool, blocks: usize, bytes: u64) -> Span {
    #[cfg(feature = "tracing")]
    return if checkpoint {
        tracing::info_span!(target: "layerwise_offload", "load", blocks, bytes).entered()
    } else {
        tracing::info_span!(target: "layerwise_offload", "host_copy", blocks, bytes).entered()
    };
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (checkpoint, blocks, bytes);
        Span
    }
}

/// `restore()` of `blocks` blocks.
pub(crate) fn restore(blocks: usize) -> Span {
    #[cfg(feature = "tracing")]
    return tracing::info_span!(target: "layerwise_offload", "restore", blocks).entered();
    #[cfg(not(feature = "tracing"))]
    {
        let _ = blocks;
        Span
    }
}

/// `set_encoded_blocks(encoded)` changing the form of `blocks` blocks of `bytes` raw bytes.
pub(crate) fn convert(encoded: usize, blocks: usize, bytes: u64) -> Span {
    #[cfg(feature = "tracing")]
    return tracing::info_span!(target: "layerwise_offload", "convert", encoded, blocks, bytes)
        .entered();
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (encoded, blocks, bytes);
        Span
    }
}

/// Encoding a block of `bytes` raw bytes (`block`: its loop index, when known).
pub(crate) fn encode(block: Option<usize>, bytes: usize) -> Span {
    #[cfg(feature = "tracing")]
    return tracing::debug_span!(target: "layerwise_offload", "encode", block, bytes).entered();
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (block, bytes);
        Span
    }
}

/// The upload of block `block` (`bytes` raw bytes).
pub(crate) fn upload(block: usize, bytes: usize) -> Span {
    #[cfg(feature = "tracing")]
    return tracing::debug_span!(target: "layerwise_offload", "upload", block, bytes).entered();
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (block, bytes);
        Span
    }
}

/// The decode of an encoded block into `bytes` raw bytes (`block`: its loop index, when known).
pub(crate) fn decode(block: Option<usize>, bytes: usize) -> Span {
    #[cfg(feature = "tracing")]
    return tracing::debug_span!(target: "layerwise_offload", "decode", block, bytes).entered();
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (block, bytes);
        Span
    }
}

/// A warning: a `tracing` event at level WARN with the feature, nothing without it.
pub(crate) fn warn(message: &str) {
    #[cfg(feature = "tracing")]
    tracing::warn!(target: "layerwise_offload", "{message}");
    #[cfg(not(feature = "tracing"))]
    let _ = message;
}
