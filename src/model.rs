//! The LLaDA forward pass, written once over [`crate::backend::Backend`].
//!
//! TODO(helper).
