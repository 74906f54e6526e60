//! Lossless bf16 weight codec (work in progress).
