//! Shared by the GPU tests: the GPU probe, a tiny model with peaked logits, and a predictor that
//! runs the CPU reference and the GPU in lockstep.
#![allow(dead_code)]

pub mod cli;
pub mod cmp;
pub mod fd;
pub mod probe;
pub mod select;

use anyhow::Result;

use llada::backend::cpu::CpuBackend;
use llada::backend::cuda::CudaBackend;
use llada::backend::Backend;
use llada::engine::model::Model;
use llada::engine::model::Tokens;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{
    GenerateParams, PredictRequest, Predictor, SpanPredictor, SpanRequest,
};
use llada::hf::checkpoint::WeightSource;
use llada::hf::config::ModelConfig;
use llada::hf::dtype::DType;
use llada::hf::presets;
use llada::rng;
use std::sync::Arc;

/// The GPU, or `None` with a printed reason; `LLADA_REQUIRE_GPU=1` turns the skip into a panic.
pub fn gpu() -> Option<CudaBackend> {
    probe::device_or_skip(|| CudaBackend::new(0))
}

/// The `tiny` preset with its random weights from `seed` (bf16) on `b`.
pub fn tiny_model<B: Backend>(b: B, seed: u64) -> Model<B> {
    let cfg = presets::preset_config("tiny").unwrap();
    let ck = presets::preset_checkpoint("tiny", seed, DType::BF16).unwrap();
    Model::load(b, cfg, |n| ck.get(n).cloned()).unwrap()
}

/// Logits of `rows` (flat indices into the `b × l` tokens `x`) from one uncached forward.
pub fn forward_logits<B: Backend>(
    m: &Model<B>,
    x: &[u32],
    (b, l): (usize, usize),
    kv: Option<&[u8]>,
    rows: &[u32],
) -> Vec<f32> {
    let mut ws = m.workspace(b * l, b * l).unwrap();
    m.forward(&mut ws, Tokens::new(x, kv, rows), b, l).unwrap();
    m.logits(&ws, rows.len()).unwrap()
}

/// Greedy generation parameters for `cfg`'s model: its mask, EOS and pad ids, no EOT, bf16
/// logits, its max_sequence_length; upstream defaults otherwise.
pub fn gen_params(cfg: &ModelConfig, steps: usize, gen: usize, block: usize) -> GenerateParams {
    GenerateParams {
        steps,
        gen_length: gen,
        block_length: block,
        mask_id: cfg.mask_token_id,
        eos_id: cfg.eos_token_id,
        pad_id: cfg.pad_token_id,
        eot_id: None,
        logits_dtype: DType::BF16,
        max_sequence_length: Some(cfg.max_sequence_length),
        ..GenerateParams::default()
    }
}

/// Deterministic bf16-representable values uniform in [-scale, scale), distinct per `(salt,
/// tag)`.
pub fn rand_bf16(salt: u64, tag: u64, len: usize, scale: f32) -> Vec<f32> {
    let key = rng::cell_key(salt, 7, tag, 0, 0);
    (0..len)
        .map(|i| {
            let u = rng::uniform(rng::bits(key, i as u64)) as f32;
            DType::BF16.round(scale * (2.0 * u - 1.0))
        })
        .collect()
}

/// A bf16 host weight.
pub fn host_bf16(name: &str, shape: &[usize], data: Vec<f32>) -> WeightSource {
    WeightSource::Host {
        data: Arc::new(data),
        dtype: DType::BF16,
        shape: shape.to_vec(),
        name: name.to_string(),
    }
}

/// Free-running generations on two devices: a single near-tie flip changes everything after it
/// in its block, but a systematic error would leave almost nothing in common, so at least half
/// of the ids must agree.
pub fn assert_mostly_same(what: &str, cpu: &[Vec<u32>], gpu: &[Vec<u32>]) {
    let total: usize = cpu.iter().map(Vec::len).sum();
    let same: usize = cpu
        .iter()
        .zip(gpu)
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x == y).count())
        .sum();
    eprintln!("{what}: free-running {same}/{total} ids agree\n cpu {cpu:?}\n gpu {gpu:?}");
    assert!(
        same * 2 >= total,
        "{what}: only {same}/{total} ids agree free-running"
    );
}

/// [`sharp_tiny`] on the GPU and on the bf16 CPU reference, or `None` (skipped) without a GPU.
pub fn sharp_pair() -> Option<(Model<CudaBackend>, Model<CpuBackend>)> {
    let g = gpu()?;
    Some((sharp_tiny(g), sharp_tiny(CpuBackend::new(DType::BF16))))
}

/// The `tiny` preset's shapes with random matrices of std 0.2 instead of 0.02: logits spread
/// over several units, so argmax and top-k decisions are rarely decided by a bf16 near-tie
/// (the std-0.02 preset gives nearly uniform logits, where every decision is a near-tie).
pub fn sharp_tiny<B: Backend>(b: B) -> Model<B> {
    let cfg = presets::preset_config("tiny").unwrap();
    let ck = presets::preset_checkpoint("tiny", 7, DType::BF16).unwrap();
    Model::load(b, cfg, |n| {
        Ok(match ck.get(n)?.clone() {
            WeightSource::Random {
                seed,
                dtype,
                shape,
                name,
                ..
            } => WeightSource::Random {
                seed,
                std: 0.2,
                dtype,
                shape,
                name,
            },
            other => other,
        })
    })
    .unwrap()
}

fn ulp_bf16(x: f32) -> f32 {
    let e = x.abs().max(f32::MIN_POSITIVE).log2().floor();
    2f32.powf(e - 7.0)
}

/// Runs every request on the CPU reference and on the GPU, returns the CPU's answer (so both
/// see the same tokens at every step and a near-tie cannot cascade), and checks that every
/// difference between the devices' answers is explained by the difference between the logits
/// the two heads saw (read back from each device after each prediction).
pub struct Lockstep<'a, G: Backend = CudaBackend> {
    pub cpu: ModelPredictor<'a, CpuBackend>,
    pub gpu: ModelPredictor<'a, G>,
    pub predictions: usize,
    pub token_mismatches: usize,
    /// Token mismatches that are not a near-tie in the CPU's logits (see `record`).
    pub unexplained: usize,
    /// Confidence differences larger than the logits' difference allows.
    pub conf_unexplained: usize,
    /// Rows whose logits differ by more than the logits tolerance.
    pub logit_violations: usize,
    /// Largest row-max |CPU − GPU| logit difference, relative to the row's largest logit.
    pub worst_logit_diff: f32,
    /// Largest relative confidence difference where the tokens agree.
    pub worst_conf_rel: f32,
    scratch: Vec<(u32, f32)>,
}

impl<'a, G: Backend> Lockstep<'a, G> {
    pub fn new(c: &'a Model<CpuBackend>, g: &'a Model<G>) -> Self {
        Lockstep {
            cpu: ModelPredictor::new(c),
            gpu: ModelPredictor::new(g),
            predictions: 0,
            token_mismatches: 0,
            unexplained: 0,
            conf_unexplained: 0,
            logit_violations: 0,
            worst_logit_diff: 0.0,
            worst_conf_rel: 0.0,
            scratch: Vec::new(),
        }
    }

    /// Compare one prediction call. Per row, with Δ the largest |CPU − GPU| difference of the
    /// (finite) logits both heads saw and S the row's largest |logit|:
    /// - the logits must agree: Δ ≤ 16 bf16 ulps of S (the tolerance of tests/cuda_model.rs);
    /// - a token mismatch must be a near-tie: the CPU's token beats the GPU's in the CPU's
    ///   logits by at most 2Δ + ulp(S) (the Gumbel terms are bit-identical and cancel);
    /// - where the tokens agree, the confidences (softmax probabilities, rounded to bf16) may
    ///   differ by a factor e^{±2Δ} plus two bf16 roundings: |c − g| ≤ (e^{2Δ} − 1)·max + 2 ulp.
    fn record(&mut self, c: &[(u32, f32)]) -> Result<()> {
        let r = c.len();
        let lc = self.cpu.last_logits(r)?;
        let lg = self.gpu.last_logits(r)?;
        let v = lc.len() / r.max(1);
        for (i, (&(ct, cc), &(gt, gc))) in c.iter().zip(&self.scratch).enumerate() {
            self.predictions += 1;
            let (rc, rg) = (&lc[i * v..(i + 1) * v], &lg[i * v..(i + 1) * v]);
            let scale = rc
                .iter()
                .filter(|x| x.is_finite())
                .fold(0f32, |m, x| m.max(x.abs()));
            // A NaN (or an infinity) where the CPU has a finite logit counts as an infinite
            // difference (cmp::abs_diff, never NaN): an all-NaN GPU output cannot pass.
            let diff = cmp::max_abs_diff(rg, rc);
            self.worst_logit_diff =
                cmp::nan_max(self.worst_logit_diff, diff / scale.max(f32::MIN_POSITIVE));
            if diff > 16.0 * scale * 2f32.powi(-8) + ulp_bf16(scale) {
                self.logit_violations += 1;
            }
            if ct != gt {
                self.token_mismatches += 1;
                let (ct, gt) = (ct as usize, gt as usize);
                let gap = rc[ct] - rc[gt];
                if gap > 2.0 * diff + ulp_bf16(scale) {
                    eprintln!(
                        "unexplained mismatch at row {i}: cpu token {ct} gpu token {gt}, cpu logits {} vs {} (gap {gap}), max |cpu-gpu| {diff}, scale {scale}",
                        rc[ct], rc[gt]
                    );
                    self.unexplained += 1;
                }
            } else {
                let m = cc.abs().max(gc.abs());
                let d = cmp::abs_diff(gc, cc);
                if m > 0.0 || d.is_infinite() {
                    self.worst_conf_rel = cmp::nan_max(self.worst_conf_rel, d / m);
                }
                if d > ((2.0 * diff).exp() - 1.0) * m + 2.0 * ulp_bf16(m) {
                    eprintln!(
                        "unexplained confidence at row {i}: cpu {cc} gpu {gc} with max logit diff {diff}"
                    );
                    self.conf_unexplained += 1;
                }
            }
        }
        Ok(())
    }

    /// Asserts the agreement: every row's logits within tolerance, every token mismatch and
    /// every confidence difference explained by the logits (see `record`), and at most 5% of the
    /// tokens differing at all (at logits of magnitude 8–16 one bf16 ulp is 0.0625, so exact
    /// ties and near-ties are common on a small vocabulary).
    pub fn assert_agree(&mut self, what: &str) {
        eprintln!(
            "{what}: {} predictions, {} token mismatches ({} unexplained), {} unexplained confidences, {} rows beyond the logits tolerance; worst logit diff {:.2e} of the scale, worst confidence diff {:.2e} relative",
            self.predictions,
            self.token_mismatches,
            self.unexplained,
            self.conf_unexplained,
            self.logit_violations,
            self.worst_logit_diff,
            self.worst_conf_rel
        );
        assert!(self.predictions > 0);
        assert_eq!(
            self.logit_violations, 0,
            "{what}: logits differ beyond the tolerance"
        );
        assert_eq!(
            self.unexplained, 0,
            "{what}: token mismatches that are not near-ties"
        );
        assert_eq!(
            self.conf_unexplained, 0,
            "{what}: confidences differ beyond what the logits allow"
        );
        assert!(
            self.token_mismatches * 20 <= self.predictions,
            "{what}: too many token mismatches"
        );
    }
}

impl<'a, G: Backend> Lockstep<'a, G> {
    /// Runs one request on the GPU into the scratch, then on the CPU into `out`, and records.
    fn both(
        &mut self,
        out: &mut [(u32, f32)],
        gpu: impl FnOnce(&mut ModelPredictor<'a, G>, &mut [(u32, f32)]) -> Result<()>,
        cpu: impl FnOnce(&mut ModelPredictor<'a, CpuBackend>, &mut [(u32, f32)]) -> Result<()>,
    ) -> Result<()> {
        self.scratch.resize(out.len(), (0, 0.0));
        let mut s = std::mem::take(&mut self.scratch);
        gpu(&mut self.gpu, &mut s)?;
        self.scratch = s;
        cpu(&mut self.cpu, out)?;
        self.record(out)
    }
}

impl<G: Backend> Predictor for Lockstep<'_, G> {
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
        self.both(out, |g, o| g.predict(req, o), |c, o| c.predict(req, o))
    }
}

impl<G: Backend> SpanPredictor for Lockstep<'_, G> {
    fn predict_span(&mut self, req: &SpanRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
        self.both(
            out,
            |g, o| g.predict_span(req, o),
            |c, o| c.predict_span(req, o),
        )
    }
}
