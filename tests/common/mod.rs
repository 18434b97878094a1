//! Shared by the GPU tests: the GPU probe, a tiny model with peaked logits, and a predictor that
//! runs the CPU reference and the GPU in lockstep.
#![allow(dead_code)]

use anyhow::Result;

use llada::backend::cpu::CpuBackend;
use llada::backend::cuda::CudaBackend;
use llada::backend::Backend;
use llada::checkpoint::WeightSource;
use llada::dtype::DType;
use llada::model::{Model, ModelPredictor};
use llada::presets;
use llada::sampler::{PredictRequest, Predictor, SpanPredictor, SpanRequest};

/// The GPU, or `None` with a printed reason; `LLADA_REQUIRE_GPU=1` turns the skip into a panic.
pub fn gpu() -> Option<CudaBackend> {
    let require = std::env::var("LLADA_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let r = llada::device::cuda_available()
        .map_err(anyhow::Error::msg)
        .and_then(|()| CudaBackend::new(0));
    match r {
        Ok(b) => Some(b),
        Err(e) if require => panic!("LLADA_REQUIRE_GPU=1 but no usable GPU: {e:#}"),
        Err(e) => {
            eprintln!("SKIP: {e:#}");
            None
        }
    }
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
/// see the same tokens at every step and a near-tie cannot cascade), and records how far the
/// GPU's answers are from the CPU's.
pub struct Lockstep<'a, G: Backend = CudaBackend> {
    pub cpu: ModelPredictor<'a, CpuBackend>,
    pub gpu: ModelPredictor<'a, G>,
    pub predictions: usize,
    pub token_mismatches: usize,
    /// Mismatches NOT explained by the two devices' logits (see `record`).
    pub unexplained: usize,
    /// Largest |CPU − GPU| logit difference seen at a mismatch, relative to the row's scale.
    pub worst_logit_diff: f32,
    /// Relative confidence differences where the tokens agree.
    pub conf_rel: Vec<f32>,
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
            worst_logit_diff: 0.0,
            conf_rel: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Compare the two devices' answers. A token mismatch is *explained* when, in the logits
    /// both heads saw (read back from each device), the CPU's token beats the GPU's by no more
    /// than twice the largest |CPU − GPU| logit difference of that row (plus the Gumbel terms,
    /// identical on both devices, which cancel), and that difference is within the logits
    /// tolerance of tests/cuda_model.rs (16 bf16 ulps of the row's largest logit): a near-tie
    /// that bf16 rounding may flip. Anything else is a real disagreement.
    fn record(&mut self, c: &[(u32, f32)]) -> Result<()> {
        let mut mism = Vec::new();
        for (i, (&(ct, cc), &(gt, gc))) in c.iter().zip(&self.scratch).enumerate() {
            self.predictions += 1;
            if ct != gt {
                self.token_mismatches += 1;
                mism.push((i, ct as usize, gt as usize));
            } else if cc != gc {
                let d = (cc - gc).abs() - ulp_bf16(cc.max(gc));
                self.conf_rel.push(d.max(0.0) / cc.abs().max(gc.abs()));
            } else {
                self.conf_rel.push(0.0);
            }
        }
        if mism.is_empty() {
            return Ok(());
        }
        let r = c.len();
        let lc = self.cpu.last_logits(r)?;
        let lg = self.gpu.last_logits(r)?;
        let v = lc.len() / r;
        for (i, ct, gt) in mism {
            let (rc, rg) = (&lc[i * v..(i + 1) * v], &lg[i * v..(i + 1) * v]);
            let scale = rc
                .iter()
                .filter(|x| x.is_finite())
                .fold(0f32, |m, x| m.max(x.abs()));
            let diff = rc
                .iter()
                .zip(rg)
                .filter(|(a, b)| a.is_finite() || b.is_finite())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            self.worst_logit_diff = self
                .worst_logit_diff
                .max(diff / scale.max(f32::MIN_POSITIVE));
            let gap = rc[ct] - rc[gt];
            let explained =
                diff <= 16.0 * scale * 2f32.powi(-8) && gap <= 2.0 * diff + ulp_bf16(scale);
            if !explained {
                eprintln!(
                    "unexplained mismatch at row {i}: cpu token {ct} gpu token {gt}, cpu logits {} vs {} (gap {gap}), max |cpu-gpu| {diff}, scale {scale}",
                    rc[ct], rc[gt]
                );
                self.unexplained += 1;
            }
        }
        Ok(())
    }

    /// Asserts the agreement: every token mismatch is explained by a bf16 near-tie (see
    /// `record`) and at most 5% of the tokens differ at all; where the tokens agree the
    /// confidences agree to one bf16 ulp plus a relative 2⁻⁴ for 99% of them and 2⁻² for all.
    /// Why: the logits agree to a few bf16 ulps (tests/cuda_model.rs) — at logits of magnitude
    /// 8–16 one ulp is 0.0625 — and a softmax probability moves by a factor e^{±2Δ} when the
    /// logits move by Δ.
    pub fn assert_agree(&mut self, what: &str) {
        self.conf_rel.sort_by(f32::total_cmp);
        let n = self.conf_rel.len();
        let p99 = if n > 0 {
            self.conf_rel[(n * 99) / 100]
        } else {
            0.0
        };
        let max = self.conf_rel.last().copied().unwrap_or(0.0);
        eprintln!(
            "{what}: {} predictions, {} token mismatches ({} unexplained, worst logit diff at a mismatch {:.2e} of the scale), confidence rel. diff p99 {p99:.2e} max {max:.2e}",
            self.predictions, self.token_mismatches, self.unexplained, self.worst_logit_diff
        );
        assert!(self.predictions > 0);
        assert_eq!(
            self.unexplained, 0,
            "{what}: token mismatches not explained by a near-tie"
        );
        assert!(
            self.token_mismatches * 20 <= self.predictions,
            "{what}: too many token mismatches"
        );
        assert!(
            p99 <= 2f32.powi(-4) && max <= 2f32.powi(-2),
            "{what}: confidences differ"
        );
    }
}

impl<G: Backend> Predictor for Lockstep<'_, G> {
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
        self.scratch.resize(out.len(), (0, 0.0));
        let mut s = std::mem::take(&mut self.scratch);
        self.gpu.predict(req, &mut s)?;
        self.scratch = s;
        self.cpu.predict(req, out)?;
        self.record(out)
    }
}

impl<G: Backend> SpanPredictor for Lockstep<'_, G> {
    fn predict_span(&mut self, req: &SpanRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
        self.scratch.resize(out.len(), (0, 0.0));
        let mut s = std::mem::take(&mut self.scratch);
        self.gpu.predict_span(req, &mut s)?;
        self.scratch = s;
        self.cpu.predict_span(req, out)?;
        self.record(out)
    }
}
