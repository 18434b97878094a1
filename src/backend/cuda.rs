//! CUDA backend.
//!
//! TODO(helper).
