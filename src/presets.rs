//! Random-weight presets (`tiny`, `llada-8b`) for smoke tests and benchmarks.
//!
//! TODO(helper).
