//! What a Hugging Face model folder holds, read defensively (folders come from strangers):
//! [`config`] (`config.json`, validated and bounded), [`checkpoint`] (safetensors, single or
//! sharded, memory-mapped and checked against the config), [`tokenizer`] (`tokenizer.json` and the
//! sandboxed chat template), [`presets`] (random-weight models that need no download), [`init`]
//! (freshly initialised folders, written streamed), [`dtype`] (element types) and [`fsio`]
//! (bounded, FIFO-safe reads and non-clobbering writes).

pub mod checkpoint;
pub mod config;
pub mod dtype;
pub mod fsio;
pub mod init;
pub mod lowrank;
pub mod presets;
pub mod safetensors;
pub mod template;
pub mod tiny;
pub mod tokenizer;
pub mod write;
