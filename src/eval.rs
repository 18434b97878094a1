//! Multiple-choice evaluation as lm-eval-harness scores it with upstream's `llada_dist` model
//! (reference §5.2): each choice is a `loglikelihood(context, delimiter + choice)` request,
//! estimated by [`crate::loglik::estimate`]; the prediction is the choice with the highest
//! log-likelihood (`acc`) or the highest log-likelihood per character of the choice
//! (`acc_norm`); metrics are means over items with the standard error `sample std / √n`.
//!
//! Details kept from lm-eval:
//! - `_encode_pair`: trailing whitespace of the context moves onto the continuation; the whole
//!   string and the context are tokenized separately (default special tokens) and the
//!   continuation is `whole[len(context_ids):]` ([`encode_pair`]).
//! - `acc_norm` divides by `len(choice)` in Python, i.e. the number of Unicode code points of the
//!   choice **without** the delimiter (lm-eval's `completion_len`; equal to the byte length for
//!   ASCII, which is why it is often described as byte-length normalisation).
//! - `np.argmax`: the first maximum wins (and a NaN, if any, is the maximum).
//!
//! Input format (JSON lines): `{"context": str, "choices": [str, …], "answer": int | str}`;
//! `answer` is the index of the correct choice or the correct choice's text.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::engine::predictor::Scorer;
pub use crate::loglik::mean_stderr;
use crate::loglik::{self, LoglikParams};

/// One multiple-choice item.
#[derive(Clone, Debug, PartialEq)]
pub struct McItem {
    pub context: String,
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub answer: usize,
}

/// Parse JSON lines of items; errors name `source` and the line. Blank lines are skipped.
pub fn parse_items(text: &str, source: &str) -> Result<Vec<McItem>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{source}:{ln}: not valid JSON"))?;
        let obj = v
            .as_object()
            .with_context(|| format!("{source}:{ln}: expected a JSON object"))?;
        let context = obj
            .get("context")
            .and_then(Value::as_str)
            .with_context(|| format!("{source}:{ln}: field `context` (a string) is missing"))?
            .to_string();
        let choices: Vec<String> = obj
            .get("choices")
            .and_then(Value::as_array)
            .with_context(|| format!("{source}:{ln}: field `choices` (an array) is missing"))?
            .iter()
            .enumerate()
            .map(|(j, c)| {
                c.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{source}:{ln}: choices[{j}] is not a string"))
            })
            .collect::<Result<_>>()?;
        ensure!(!choices.is_empty(), "{source}:{ln}: `choices` is empty");
        let answer = match obj.get("answer") {
            Some(Value::Number(n)) => {
                let a = n.as_u64().with_context(|| {
                    format!("{source}:{ln}: `answer` {n} is not a non-negative integer")
                })? as usize;
                ensure!(
                    a < choices.len(),
                    "{source}:{ln}: `answer` {a} is out of range for {} choices",
                    choices.len()
                );
                a
            }
            Some(Value::String(s)) => choices.iter().position(|c| c == s).with_context(|| {
                format!("{source}:{ln}: `answer` {s:?} is not one of the choices")
            })?,
            _ => bail!("{source}:{ln}: field `answer` (an index or a choice) is missing"),
        };
        items.push(McItem {
            context,
            choices,
            answer,
        });
    }
    ensure!(!items.is_empty(), "{source}: no items");
    Ok(items)
}

/// lm-eval's `_encode_pair`: move the context's trailing whitespace onto the continuation,
/// encode `context + continuation` and `context`, split the whole by the context's length.
pub fn encode_pair(
    encode: &mut dyn FnMut(&str) -> Result<Vec<u32>>,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let (ctx, cont) = if trimmed.len() < context.len() {
        (
            trimmed,
            format!("{}{continuation}", &context[trimmed.len()..]),
        )
    } else {
        (context, continuation.to_string())
    };
    let whole = encode(&format!("{ctx}{cont}"))?;
    let ctx_ids = encode(ctx)?;
    let cont_ids = whole.get(ctx_ids.len()..).unwrap_or(&[]).to_vec();
    Ok((ctx_ids, cont_ids))
}

/// `np.argmax`: index of the first maximum; a NaN counts as the maximum (first NaN wins).
pub fn argmax_first(v: &[f64]) -> usize {
    if let Some(i) = v.iter().position(|x| x.is_nan()) {
        return i;
    }
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[derive(Clone, Debug)]
pub struct EvalParams {
    pub loglik: LoglikParams,
    /// Put between the context and each choice (lm-eval's `target_delimiter`, default " ").
    pub target_delimiter: String,
}

/// The scored item.
#[derive(Clone, Debug)]
pub struct ItemResult {
    /// Log-likelihood estimate of each choice.
    pub lls: Vec<f64>,
    /// Continuation token counts of each choice.
    pub tokens: Vec<usize>,
    /// The item's index, and its right choice.
    pub index: usize,
    pub answer: usize,
    /// The choice with the highest `lls`, and with the highest `lls` per character.
    pub pred: usize,
    pub pred_norm: usize,
    pub forward_passes: usize,
}

impl ItemResult {
    /// 1 when `pred` is the answer, else 0.
    pub fn acc(&self) -> f64 {
        (self.pred == self.answer) as u8 as f64
    }

    /// 1 when `pred_norm` is the answer, else 0.
    pub fn acc_norm(&self) -> f64 {
        (self.pred_norm == self.answer) as u8 as f64
    }
}

/// Score one item: one log-likelihood estimate per choice.
pub fn score_item(
    scorer: &mut dyn Scorer,
    encode: &mut dyn FnMut(&str) -> Result<Vec<u32>>,
    index: usize,
    item: &McItem,
    p: &EvalParams,
) -> Result<ItemResult> {
    let mut lls = Vec::with_capacity(item.choices.len());
    let mut tokens = Vec::with_capacity(item.choices.len());
    let mut passes = 0;
    for (j, choice) in item.choices.iter().enumerate() {
        let cont = format!("{}{choice}", p.target_delimiter);
        let (ctx, ans) = encode_pair(encode, &item.context, &cont)
            .with_context(|| format!("item {index}, choice {j}: tokenizing"))?;
        let out = loglik::estimate(scorer, &ctx, &ans, &p.loglik)
            .with_context(|| format!("item {index}, choice {j} ({choice:?})"))?;
        lls.push(out.loglik);
        tokens.push(ans.len());
        passes += out.forward_passes;
    }
    let norm: Vec<f64> = lls
        .iter()
        .zip(&item.choices)
        .map(|(ll, c)| ll / c.chars().count() as f64)
        .collect();
    let pred = argmax_first(&lls);
    let pred_norm = argmax_first(&norm);
    Ok(ItemResult {
        lls,
        tokens,
        index,
        answer: item.answer,
        pred,
        pred_norm,
        forward_passes: passes,
    })
}

/// A metric's mean and standard error over items.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub mean: f64,
    pub stderr: f64,
}

#[derive(Clone, Debug)]
pub struct EvalSummary {
    pub n: usize,
    pub acc: Metric,
    pub acc_norm: Metric,
    pub forward_passes: usize,
}

pub fn summarize(results: &[ItemResult]) -> EvalSummary {
    let m = |f: fn(&ItemResult) -> f64| {
        let xs: Vec<f64> = results.iter().map(f).collect();
        let (mean, stderr) = mean_stderr(&xs);
        Metric { mean, stderr }
    };
    EvalSummary {
        n: results.len(),
        acc: m(ItemResult::acc),
        acc_norm: m(ItemResult::acc_norm),
        forward_passes: results.iter().map(|r| r.forward_passes).sum(),
    }
}

/// Score every item, calling `progress(done, total)` after each.
pub fn evaluate(
    scorer: &mut dyn Scorer,
    encode: &mut dyn FnMut(&str) -> Result<Vec<u32>>,
    items: &[McItem],
    p: &EvalParams,
    mut progress: Option<&mut dyn FnMut(usize, usize)>,
) -> Result<(Vec<ItemResult>, EvalSummary)> {
    let mut results = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        results.push(score_item(scorer, encode, i, item, p)?);
        if let Some(f) = progress.as_mut() {
            f(i + 1, items.len());
        }
    }
    let s = summarize(&results);
    Ok((results, s))
}
