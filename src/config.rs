//! The Hugging Face LLaDA `config.json`.
//!
//! TODO(helper): parsing and validation (reference §1).

/// The parts of `config.json` this engine uses, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// Effective key/value heads (`n_kv_heads`, or `n_heads` when absent).
    pub n_kv_heads: usize,
    pub n_layers: usize,
    /// MLP width `F` (`mlp_hidden_size`, or `mlp_ratio · d_model` when absent).
    pub mlp_hidden_size: usize,
    /// Tokenizer vocabulary size (`vocab_size`).
    pub vocab_size: usize,
    /// Rows of the embedding and of the LM head: `V` (`embedding_size`, or `vocab_size`).
    pub embedding_size: usize,
    pub max_sequence_length: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub mask_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}
