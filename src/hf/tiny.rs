//! The `tiny` preset's tokenizer: a small byte-level BPE vocabulary written as a complete
//! `tokenizer.json` + `tokenizer_config.json`, so tests and the tiny preset speak text.

use super::template::LLADA_INSTRUCT_TEMPLATE;
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

/// Ids of the special tokens of the tiny tokenizer ([`write_tiny_tokenizer`]), at the top of a
/// 512-row vocabulary like LLaDA's (ordinary tokens first, specials after, padding rows last).
#[derive(Clone, Copy, Debug)]
pub struct TinyVocab {
    pub bos: u32,
    pub eos: u32,
    pub mask: u32,
    pub start_header: u32,
    pub end_header: u32,
    pub eot: u32,
    /// Number of merged tokens (ids 256 ..).
    pub merges: u32,
}

/// The tiny tokenizer's layout: bytes 0..256 (GPT-2 order), merges 256..256+merges, specials
/// 500..506; ids 506..512 are embedding padding rows.
pub const TINY_VOCAB: TinyVocab = TinyVocab {
    bos: 500,
    eos: 501,
    mask: 502,
    start_header: 503,
    end_header: 504,
    eot: 505,
    merges: TINY_MERGES.len() as u32,
};

/// Merges of the tiny BPE, as pieces in the GPT-2 byte alphabet (`Ġ` = space). There is no
/// newline merge, so `"\n\n"` is two tokens 198 as in LLaDA's chat prompts.
const TINY_MERGES: [(&str, &str); 23] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("Ġ", "a"),
    ("o", "n"),
    ("r", "e"),
    ("u", "s"),
    ("us", "er"),
    ("s", "s"),
    ("a", "ss"),
    ("s", "t"),
    ("i", "st"),
    ("ass", "ist"),
    ("a", "n"),
    ("an", "t"),
    ("assist", "ant"),
    ("Ġ", "s"),
    ("Ġ", "w"),
    ("o", "r"),
    ("l", "l"),
    ("Ġ", "h"),
];

/// GPT-2's byte → printable character map, in vocabulary order: entry `i` is the byte whose
/// token id is `i` (printable bytes first, as in GPT-2 and LLaDA: `!` = 0, `Ġ` = 220, `Ċ` = 198).
pub fn gpt2_byte_alphabet() -> Vec<(u8, char)> {
    let mut bytes: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap_or('?')))
        .collect()
}

/// Write a tiny GPT-2-style byte-level BPE `tokenizer.json` (256 byte tokens, the merges of
/// [`TINY_VOCAB`], LLaDA's special tokens at its ids) and a `tokenizer_config.json` with
/// LLaDA-Instruct's chat template and special-token strings, into `dir`.
pub fn write_tiny_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut vocab = serde_json::Map::new();
    for (i, (_, c)) in gpt2_byte_alphabet().into_iter().enumerate() {
        vocab.insert(c.to_string(), Value::from(i));
    }
    let mut merges = Vec::new();
    for (i, (a, b)) in TINY_MERGES.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), Value::from(256 + i));
        merges.push(serde_json::json!([a, b]));
    }
    let v = TINY_VOCAB;
    let specials = [
        (v.bos, "<|startoftext|>"),
        (v.eos, "<|endoftext|>"),
        (v.mask, "<|mdm_mask|>"),
        (v.start_header, "<|start_header_id|>"),
        (v.end_header, "<|end_header_id|>"),
        (v.eot, "<|eot_id|>"),
    ];
    let mut added = Vec::new();
    for (id, s) in specials {
        // In the model vocabulary too, so the ids are exactly these whatever the loader does
        // with gaps between the merges and the specials.
        vocab.insert(s.to_string(), Value::from(id));
        added.push(serde_json::json!({
            "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                           "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    let config = serde_json::json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1e30,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LLADA_INSTRUCT_TEMPLATE,
    });
    crate::hf::write::write_text_atomic(
        &dir.join("tokenizer.json"),
        &(serde_json::to_string_pretty(&tok)? + "\n"),
    )?;
    crate::hf::write::write_text_atomic(
        &dir.join("tokenizer_config.json"),
        &(serde_json::to_string_pretty(&config)? + "\n"),
    )?;
    Ok(())
}
