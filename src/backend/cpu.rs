//! CPU reference backend.
//!
//! TODO(helper).
