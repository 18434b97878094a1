//! Device selection: `auto | cpu | cuda`.
//!
//! TODO.
