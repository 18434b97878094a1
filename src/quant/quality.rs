//! FP8 quality, measured on the CPU reference: the same model run three ways — f32 weights and
//! math, bf16 (the checkpoint's weights rounded to bf16, PyTorch's bf16 rounding), and FP8
//! (bf16 activations, E4M3 linear layers, [`super::fp8`]) — compared pairwise on logits, greedy
//! generation and the Monte-Carlo log-likelihood. `llada quantize --report` prints it;
//! `tests/fp8.rs` bounds it.

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::backend::cpu::CpuBackend;
use crate::backend::head::Remasking;
use crate::backend::Backend;
use crate::engine::model::Model;
use crate::engine::model::Tokens;
use crate::engine::predictor::{ModelPredictor, ModelScorer};
use crate::engine::sampler::{self, GenerateParams};
use crate::hf::checkpoint::Checkpoint;
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use crate::loglik::{self, LoglikParams};

/// What the three models are run on.
#[derive(Clone, Debug)]
pub struct QualityInputs {
    /// Sequences whose logits are compared at every position (`[T]` each; some positions are
    /// the mask id, as in a denoising step).
    pub seqs: Vec<Vec<u32>>,
    /// Prompts for greedy generation (temperature 0, low-confidence remasking).
    pub prompts: Vec<Vec<u32>>,
    pub gen_length: usize,
    pub steps: usize,
    pub block_length: usize,
    /// (prompt, answer) pairs for the log-likelihood.
    pub pairs: Vec<(Vec<u32>, Vec<u32>)>,
    /// Monte-Carlo samples per log-likelihood (same seed, so the same masks, for every model).
    pub mc_num: usize,
}

impl QualityInputs {
    /// Inputs cut from a token stream (real text): `n` windows of `len` tokens spread over
    /// `tokens`; the logits sequences have their second half masked, the prompts are the
    /// windows' first halves, the log-likelihood answers their last 8 tokens.
    pub fn from_tokens(tokens: &[u32], cfg: &ModelConfig, n: usize, len: usize) -> Result<Self> {
        let len = len.min(cfg.max_sequence_length / 2).max(16);
        ensure!(
            tokens.len() >= len,
            "the text has {} tokens; at least {len} are needed",
            tokens.len()
        );
        let n = n.max(1);
        let span = tokens.len() - len;
        let windows: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                let s = if n == 1 { 0 } else { span * i / (n - 1) };
                tokens[s..s + len].to_vec()
            })
            .collect();
        Ok(Self::from_windows(&windows, cfg))
    }

    /// Pseudo-random ids below the special ids (models without a tokenizer or text).
    pub fn random(cfg: &ModelConfig, n: usize, len: usize, seed: u64) -> Self {
        let hi = (cfg
            .mask_token_id
            .min(cfg.eos_token_id)
            .min(cfg.embedding_size as u32))
        .max(2) as u64;
        let len = len.min(cfg.max_sequence_length / 2).max(16);
        let windows: Vec<Vec<u32>> = (0..n.max(1))
            .map(|r| {
                (0..len)
                    .map(|i| (crate::rng::mix64(seed ^ ((r * 1_000_003 + i) as u64)) % hi) as u32)
                    .collect()
            })
            .collect();
        Self::from_windows(&windows, cfg)
    }

    fn from_windows(windows: &[Vec<u32>], cfg: &ModelConfig) -> Self {
        let mask = cfg.mask_token_id;
        let len = windows[0].len();
        let half = len / 2;
        let seqs = windows
            .iter()
            .map(|w| {
                let mut s = w.clone();
                s[half..].fill(mask);
                s
            })
            .collect();
        let prompts = windows.iter().map(|w| w[..half].to_vec()).collect();
        let pairs = windows
            .iter()
            .map(|w| {
                let a = 8.min(len / 4);
                (w[..len - a].to_vec(), w[len - a..].to_vec())
            })
            .collect();
        QualityInputs {
            seqs,
            prompts,
            gen_length: 16,
            steps: 16,
            block_length: 16,
            pairs,
            mc_num: 8,
        }
    }
}

/// Logits of model `a` against model `b` over every position of every sequence.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LogitsDiff {
    /// `max |a − b|`.
    pub max_abs: f64,
    /// `‖a − b‖₂ / ‖b‖₂` over all logits.
    pub rel_rms: f64,
    /// Share of positions whose argmax agrees (lowest id on ties).
    pub argmax_agree: f64,
}

/// One comparison `a` vs `b`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairReport {
    pub logits: LogitsDiff,
    /// Share of generated tokens (greedy, position by position) that agree.
    pub greedy_agree: f64,
    /// Mean and max over the pairs of `|loglik_a − loglik_b|` (nats, same Monte-Carlo masks).
    pub loglik_abs_diff_mean: f64,
    pub loglik_abs_diff_max: f64,
}

/// The three comparisons and the scale of the quantities compared.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QualityReport {
    pub fp8_vs_bf16: PairReport,
    pub bf16_vs_f32: PairReport,
    pub fp8_vs_f32: PairReport,
    /// RMS of the f32 logits (the scale of `max_abs`).
    pub logits_rms_f32: f64,
    /// Mean |loglik| of the f32 model (the scale of the log-likelihood differences).
    pub loglik_mean_abs_f32: f64,
    pub positions: usize,
    pub generated_tokens: usize,
    pub loglik_pairs: usize,
}

/// Everything one model gives on the inputs.
struct Run {
    logits: Vec<Vec<f32>>,
    generated: Vec<Vec<u32>>,
    loglik: Vec<f64>,
}

fn run(model: &Model<CpuBackend>, inp: &QualityInputs) -> Result<Run> {
    let mut logits = Vec::with_capacity(inp.seqs.len());
    for s in &inp.seqs {
        let t = s.len();
        let mut ws = model.workspace(t, t)?;
        let rows: Vec<u32> = (0..t as u32).collect();
        model.forward(&mut ws, Tokens::new(s, None, &rows), 1, t)?;
        logits.push(model.logits(&ws, t)?);
    }
    let cfg = &model.cfg;
    let p = GenerateParams {
        steps: inp.steps,
        gen_length: inp.gen_length,
        block_length: inp.block_length,
        temperature: 0.0,
        remasking: Remasking::LowConfidence,
        mask_id: cfg.mask_token_id,
        eos_id: cfg.eos_token_id,
        pad_id: cfg.pad_token_id,
        logits_dtype: model.backend.compute_dtype(),
        max_sequence_length: Some(cfg.max_sequence_length),
        ..GenerateParams::default()
    };
    let mut generated = Vec::new();
    for pr in &inp.prompts {
        let mut pred = ModelPredictor::new(model);
        let out = sampler::generate(&mut pred, std::slice::from_ref(pr), &p, None)?;
        generated.extend(out.ids);
    }
    let lp = LoglikParams {
        mc_num: inp.mc_num,
        batch_size: LoglikParams::default_batch_size(inp.mc_num),
        cfg_scale: 0.0,
        seed: 0,
    };
    let mut ll = Vec::new();
    for (q, a) in &inp.pairs {
        let mut sc = ModelScorer::new(model);
        ll.push(loglik::estimate(&mut sc, q, a, &lp)?.loglik);
    }
    Ok(Run {
        logits,
        generated,
        loglik: ll,
    })
}

fn compare(a: &Run, b: &Run, v: usize) -> PairReport {
    let (mut max_abs, mut num, mut den) = (0.0f64, 0.0f64, 0.0f64);
    let (mut agree, mut pos) = (0usize, 0usize);
    let argmax = |r: &[f32]| {
        let mut best = 0;
        for (i, &x) in r.iter().enumerate() {
            // NaN never wins; ties keep the lowest id.
            if x > r[best] || r[best].is_nan() {
                best = i;
            }
        }
        best
    };
    for (la, lb) in a.logits.iter().zip(&b.logits) {
        for (x, y) in la.iter().zip(lb) {
            let d = (*x as f64 - *y as f64).abs();
            // NaN must not hide: it makes the error NaN.
            max_abs = if d.is_nan() || max_abs.is_nan() {
                f64::NAN
            } else {
                max_abs.max(d)
            };
            num += d * d;
            den += (*y as f64) * (*y as f64);
        }
        for (ra, rb) in la.chunks(v).zip(lb.chunks(v)) {
            pos += 1;
            agree += (argmax(ra) == argmax(rb)) as usize;
        }
    }
    let (mut same, mut total) = (0usize, 0usize);
    for (ga, gb) in a.generated.iter().zip(&b.generated) {
        for (x, y) in ga.iter().zip(gb) {
            total += 1;
            same += (x == y) as usize;
        }
    }
    let diffs: Vec<f64> = a
        .loglik
        .iter()
        .zip(&b.loglik)
        .map(|(x, y)| (x - y).abs())
        .collect();
    PairReport {
        logits: LogitsDiff {
            max_abs,
            rel_rms: (num / den.max(f64::MIN_POSITIVE)).sqrt(),
            argmax_agree: agree as f64 / pos.max(1) as f64,
        },
        greedy_agree: same as f64 / total.max(1) as f64,
        loglik_abs_diff_mean: diffs.iter().sum::<f64>() / diffs.len().max(1) as f64,
        loglik_abs_diff_max: diffs.iter().fold(0.0, |m: f64, &d| {
            if d.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(d)
            }
        }),
    }
}

/// Run the f32, bf16 and FP8 models of `ckpt` on `inp` (CPU reference) and compare them.
pub fn measure(cfg: &ModelConfig, ckpt: &Checkpoint, inp: &QualityInputs) -> Result<QualityReport> {
    ensure!(
        !ckpt.has_fp8(),
        "the quality report needs the unquantized (bf16/f32) model as its reference"
    );
    let get = |n: &str| ckpt.get(n).cloned();
    let m32 = Model::load(CpuBackend::new(DType::F32), cfg.clone(), get)?;
    let r32 = run(&m32, inp)?;
    drop(m32);
    let m16 = Model::load(CpuBackend::new(DType::BF16), cfg.clone(), get)?;
    let r16 = run(&m16, inp)?;
    drop(m16);
    let m8 = Model::load_fp8(CpuBackend::new(DType::BF16), cfg.clone(), get, |n| {
        super::fp8_weight(ckpt, n)
    })?;
    let r8 = run(&m8, inp)?;
    let v = cfg.embedding_size;
    let all: Vec<f32> = r32.logits.iter().flatten().copied().collect();
    let rms =
        (all.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / all.len().max(1) as f64).sqrt();
    Ok(QualityReport {
        fp8_vs_bf16: compare(&r8, &r16, v),
        bf16_vs_f32: compare(&r16, &r32, v),
        fp8_vs_f32: compare(&r8, &r32, v),
        logits_rms_f32: rms,
        loglik_mean_abs_f32: r32.loglik.iter().map(|x| x.abs()).sum::<f64>()
            / r32.loglik.len().max(1) as f64,
        positions: r32.logits.iter().map(|l| l.len() / v).sum(),
        generated_tokens: r32.generated.iter().map(Vec::len).sum(),
        loglik_pairs: r32.loglik.len(),
    })
}
