//! Training data: loading, tokenizing, packing, and the deterministic order of samples.
//!
//! - Pretraining: a plain-text file is one document; a `.jsonl` file holds one document per
//!   line, either `{"text": …}` (tokenized without special tokens) or `{"ids": [token ids…]}`
//!   (used as given, so models without a tokenizer — random-weight presets — can train). Each
//!   document is followed by EOS; the token stream is packed into sequences of exactly
//!   `seq_len` (the last, partial sequence is dropped; a corpus shorter than one sequence is an
//!   error).
//! - SFT (`.jsonl`): `{"prompt", "response"}` or `{"messages": [{"role", "content"}, …]}` (the
//!   last message must be the assistant's answer). The prompt is the chat template over the
//!   messages before the answer with the generation prompt (`…assistant<end_id>\n`); the answer
//!   is the response tokens, then `<|eot_id|>` when the vocabulary has it, then EOS, then EOS
//!   padding to `seq_len` (reference §6.2 and open question 4). Examples longer than `seq_len`
//!   are an error naming the line.
//!
//! Sample order: global sample index `g` (over the whole run) is sample `perm_e[g mod N]` of
//! epoch `e = g / N`, where `perm_e` is a Fisher–Yates shuffle driven by
//! `bits(cell_key(seed, STREAM_TRAIN_DATA, e, 0, 0), i)`: a pure function of `(seed, g)`, so a
//! resumed run reads the same samples.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::loss::STREAM_TRAIN_DATA;
use crate::hf::tokenizer::Tokenizer;
use crate::rng::{bits, cell_key};

/// One training sequence: `seq_len` clean ids and the prompt length (0 for pretraining).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

/// Pack documents (already tokenized) into sequences of `seq_len`, EOS after each document.
pub fn pack(docs: &[Vec<u32>], eos: u32, seq_len: usize) -> Result<Vec<Sample>> {
    ensure!(seq_len > 0, "--seq-len must be positive");
    let mut stream = Vec::new();
    for d in docs {
        stream.extend_from_slice(d);
        stream.push(eos);
    }
    ensure!(
        stream.len() >= seq_len,
        "the corpus has {} tokens, fewer than one sequence of --seq-len {seq_len}",
        stream.len()
    );
    Ok(stream
        .chunks_exact(seq_len)
        .map(|c| Sample {
            ids: c.to_vec(),
            prompt_len: 0,
        })
        .collect())
}

/// Largest training data file accepted (it is read whole).
pub const MAX_DATA_BYTES: u64 = 16 << 30;

fn is_jsonl(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("jsonl")
}

fn json_lines(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = crate::hf::fsio::read_input_text(path, "--data", MAX_DATA_BYTES)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        out.push((i + 1, v));
    }
    ensure!(!out.is_empty(), "{}: no JSON lines", path.display());
    Ok(out)
}

/// Pretraining sequences from `path` (plain text, or JSONL `{"text"}` / `{"ids"}` lines).
pub fn load_pretrain(path: &Path, tok: &Tokenizer, seq_len: usize) -> Result<Vec<Sample>> {
    load_pretrain_with(path, Some(tok), tok.special.eos, seq_len)
}

/// [`load_pretrain`] with an optional tokenizer: without one, only JSONL `{"ids": [...]}`
/// lines are accepted (text is an error naming the line). `eos` ends every document. Ids are
/// checked to be non-negative 32-bit integers here and against the vocabulary by the trainer.
pub fn load_pretrain_with(
    path: &Path,
    tok: Option<&Tokenizer>,
    eos: u32,
    seq_len: usize,
) -> Result<Vec<Sample>> {
    let no_tok =
        "the model has no tokenizer.json; give token ids as JSONL `{\"ids\": [...]}` lines";
    let encode = |t: &str| match tok {
        Some(tok) => tok.encode(t, false),
        None => bail!("text needs a tokenizer: {no_tok}"),
    };
    let docs: Vec<Vec<u32>> = if is_jsonl(path) {
        json_lines(path)?
            .into_iter()
            .map(|(line, v)| {
                let at = || format!("{}:{line}", path.display());
                if let Some(ids) = v.get("ids") {
                    let ids = ids
                        .as_array()
                        .ok_or_else(|| anyhow::anyhow!("{}: `ids` must be an array", at()))?;
                    ids.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            x.as_u64()
                                .and_then(|x| u32::try_from(x).ok())
                                .ok_or_else(|| {
                                    anyhow::anyhow!(
                                        "{}: ids[{i}] = {x} is not a token id \
                                         (an integer in 0..2^32)",
                                        at()
                                    )
                                })
                        })
                        .collect()
                } else if let Some(t) = v.get("text").and_then(Value::as_str) {
                    encode(t).with_context(at)
                } else {
                    bail!(
                        "{}: expected an object with a string field `text` or an array `ids`",
                        at()
                    )
                }
            })
            .collect::<Result<_>>()?
    } else {
        let text = crate::hf::fsio::read_input_text(path, "--data", MAX_DATA_BYTES)?;
        vec![encode(&text).with_context(|| format!("{}: plain text", path.display()))?]
    };
    pack(&docs, eos, seq_len).with_context(|| format!("packing {}", path.display()))
}

/// One SFT sample from prompt ids and answer ids: `prompt | answer | eot? | EOS…` to `seq_len`.
pub fn sft_sample(
    prompt: &[u32],
    answer: &[u32],
    eot: Option<u32>,
    eos: u32,
    seq_len: usize,
) -> Result<Sample> {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(answer);
    ids.extend(eot);
    ids.push(eos);
    ensure!(
        ids.len() <= seq_len,
        "example of {} tokens (prompt {}) exceeds --seq-len {seq_len}",
        ids.len(),
        prompt.len()
    );
    ids.resize(seq_len, eos);
    Ok(Sample {
        ids,
        prompt_len: prompt.len(),
    })
}

/// SFT samples from a JSONL file.
pub fn load_sft(path: &Path, tok: &Tokenizer, seq_len: usize) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (line, v) in json_lines(path)? {
        let at = || format!("{}:{line}", path.display());
        let (msgs, answer): (Vec<(String, String)>, String) =
            if let Some(m) = v.get("messages").and_then(Value::as_array) {
                let mut msgs = Vec::new();
                for (i, e) in m.iter().enumerate() {
                    let role = e.get("role").and_then(Value::as_str);
                    let content = e.get("content").and_then(Value::as_str);
                    match (role, content) {
                        (Some(r), Some(c)) => msgs.push((r.to_string(), c.to_string())),
                        _ => bail!("{}: messages[{i}] needs string `role` and `content`", at()),
                    }
                }
                match msgs.pop() {
                    Some((r, c)) if r == "assistant" && !msgs.is_empty() => (msgs, c),
                    _ => bail!(
                    "{}: the last message must be the assistant's answer, after at least one other",
                    at()
                ),
                }
            } else {
                match (
                    v.get("prompt").and_then(Value::as_str),
                    v.get("response").and_then(Value::as_str),
                ) {
                    (Some(p), Some(r)) => (vec![("user".into(), p.into())], r.to_string()),
                    _ => bail!(
                        "{}: expected string fields `prompt` and `response`, or `messages`",
                        at()
                    ),
                }
            };
        let prompt = tok.encode_chat(&msgs).with_context(at)?;
        let ans = tok.encode(&answer, false).with_context(at)?;
        out.push(
            sft_sample(&prompt, &ans, tok.special.eot, tok.special.eos, seq_len)
                .with_context(at)?,
        );
    }
    Ok(out)
}

/// The shuffled order of epoch `epoch` over `n` samples (see the module docs).
pub fn epoch_perm(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let key = cell_key(seed, STREAM_TRAIN_DATA, epoch, 0, 0);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (bits(key, i as u64) % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// The sample index of global sample `g` among `n` samples, with the current epoch's order
/// cached in `cache`.
pub fn sample_index(seed: u64, g: u64, n: usize, cache: &mut Option<(u64, Vec<usize>)>) -> usize {
    let epoch = g / n as u64;
    if cache.as_ref().map(|c| c.0) != Some(epoch) {
        *cache = Some((epoch, epoch_perm(seed, epoch, n)));
    }
    match cache {
        Some((_, perm)) => perm[(g % n as u64) as usize],
        None => unreachable!("cache filled above"),
    }
}
