//! `tokenizer.json` and the chat template.
//!
//! TODO(helper).
