//! Whole-model CPU/GPU agreement: the same bf16 checkpoint on the CPU reference and on CUDA.
//!
//! Without a GPU every test prints why it skipped; `LLADA_REQUIRE_GPU=1` makes that a failure.
//!
//! Tolerance for logits: both backends round every op to bf16 but sum in different orders
//! (cuBLAS/flash tiles vs the CPU's fixed 8-lane order), so an intermediate may differ by one bf16
//! ulp (2⁻⁸ relative) and that difference propagates through the layers. For the tiny preset
//! (2 layers) the observed error stays within a few ulps of the largest logit; we allow 16 ulps
//! (16·2⁻⁸ of the logit scale) and require the argmax to agree on all but near-tie rows.

use llada::backend::cpu::CpuBackend;
use llada::backend::head::Remasking;
use llada::backend::Backend;
use llada::engine::model::Model;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{generate, GenerateParams};
use llada::hf::dtype::DType;
use llada::hf::presets;

mod common;

fn load<B: Backend>(b: B) -> Model<B> {
    common::tiny_model(b, 7)
}

fn logits<B: Backend>(
    m: &Model<B>,
    ids: &[u32],
    b: usize,
    t: usize,
    kv: Option<&[u8]>,
) -> Vec<f32> {
    let rows: Vec<u32> = (0..(b * t) as u32).collect();
    common::forward_logits(m, ids, (b, t), kv, &rows)
}

fn ids(n: usize, salt: u64, vocab: u32) -> Vec<u32> {
    (0..n)
        .map(|i| (llada::rng::mix64(i as u64 ^ (salt << 32)) % vocab as u64) as u32)
        .collect()
}

#[test]
fn tiny_logits_agree_with_cpu() {
    let Some(g) = common::gpu() else { return };
    let gm = load(g);
    let cm = load(CpuBackend::new(DType::BF16));
    let v = cm.cfg.embedding_size;
    for &(b, t, padded) in &[(1usize, 37usize, false), (2, 130, true), (1, 384, false)] {
        let x = ids(b * t, t as u64, 500);
        let kv: Option<Vec<u8>> = padded.then(|| {
            (0..b * t)
                .map(|i| u8::from(i % t >= 3 || i / t == 1))
                .collect()
        });
        let c = logits(&cm, &x, b, t, kv.as_deref());
        let gl = logits(&gm, &x, b, t, kv.as_deref());
        let scale = common::cmp::max_abs(&c);
        assert!(scale.is_finite(), "the CPU reference has a NaN");
        // Derivation: both devices round the same intermediates to bf16 (relative step 2^-8)
        // and differ only in f32 summation order, which moves a sum by ~K·2^-24 relative — far
        // below a bf16 step — except where it tips a rounding to the neighbouring bf16 value.
        // Each such tip is one ulp of that intermediate; in this 2-layer model ~7 rounded
        // tensors per layer (norm outputs, q/k/v, attention, MLP in/out, residual) plus the
        // head can each tip, and RMSNorm keeps the gain of a perturbation through a layer
        // around 1, so a logit moves by at most ~15 ulps of the logit scale in the worst case
        // (all tips aligned): 16 ulps of the scale, 2^-4 relative. A wrong kernel (index,
        // mask, transposition) moves logits by O(scale).
        let tol = 16.0 * scale * 2f32.powi(-8);
        let mut worst = (0f32, 0usize);
        let mut argmax_diff = 0;
        for r in 0..b * t {
            if kv.as_ref().is_some_and(|k| k[r] == 0) {
                continue; // padded query rows are garbage by definition
            }
            let cr = &c[r * v..(r + 1) * v];
            let gr = &gl[r * v..(r + 1) * v];
            for j in 0..v {
                let d = (cr[j] - gr[j]).abs();
                if d > worst.0 || d.is_nan() {
                    worst = (d, r * v + j);
                }
            }
            let am = |x: &[f32]| {
                x.iter()
                    .enumerate()
                    .fold(0, |bi, (i, &y)| if y > x[bi] { i } else { bi })
            };
            let (ca, ga) = (am(cr), am(gr));
            if ca != ga && (cr[ca] - cr[ga]).abs() > tol {
                argmax_diff += 1;
            }
        }
        eprintln!(
            "b={b} t={t} padded={padded}: worst |cpu-gpu| {} at {} (scale {scale}, tol {tol})",
            worst.0, worst.1
        );
        assert!(
            worst.0 <= tol,
            "b={b} t={t}: worst {} > {tol} at flat {} (cpu {} gpu {})",
            worst.0,
            worst.1,
            c[worst.1],
            gl[worst.1]
        );
        assert_eq!(argmax_diff, 0, "argmax differs beyond a near-tie");
    }
}

/// Generation on both devices in lockstep (every step's predictions compared on the same
/// tokens; the CPU's decisions drive, so one near-tie cannot cascade), then free-running.
#[test]
fn tiny_greedy_generation_agrees_with_cpu() {
    let Some((gm, cm)) = common::sharp_pair() else {
        return;
    };
    let cfg = cm.cfg.clone();
    let prompts = vec![ids(20, 1, 400), ids(13, 2, 400)];
    for (cfg_scale, temp, remasking) in [
        (0.0, 0.0, Remasking::LowConfidence),
        (1.0, 0.0, Remasking::LowConfidence),
        (0.0, 0.7, Remasking::LowConfidence),
        (0.0, 0.0, Remasking::Random),
    ] {
        let p = GenerateParams {
            temperature: temp,
            cfg_scale,
            remasking,
            seed: 3,
            ..common::gen_params(&cfg, 16, 32, 8)
        };
        let what = format!("cfg {cfg_scale} temp {temp} {remasking:?}");
        let mut ls = common::Lockstep::new(&cm, &gm);
        generate(&mut ls, &prompts, &p, None).unwrap();
        ls.assert_agree(&what);

        let c = generate(&mut ModelPredictor::new(&cm), &prompts, &p, None).unwrap();
        let gg = generate(&mut ModelPredictor::new(&gm), &prompts, &p, None).unwrap();
        assert_eq!(c.nfe, gg.nfe);
        common::assert_mostly_same(&what, &c.ids, &gg.ids);
    }
}

/// The lockstep harness itself, CPU against CPU (runs everywhere): identical backends must give
/// zero mismatches, and a perturbed second model must be caught.
#[test]
fn lockstep_harness_detects_differences() {
    let a = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let b = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let cfg = a.cfg.clone();
    let p = common::gen_params(&cfg, 8, 16, 8);
    let prompts = vec![ids(12, 5, 400)];
    let mut ls = common::Lockstep::new(&a, &b);
    generate(&mut ls, &prompts, &p, None).unwrap();
    assert_eq!(ls.token_mismatches, 0);
    assert_eq!(ls.worst_conf_rel, 0.0);
    assert_eq!(ls.worst_logit_diff, 0.0);
    ls.assert_agree("cpu vs cpu");
    // A model with other weights disagrees almost everywhere.
    let other = common::tiny_model(CpuBackend::new(DType::BF16), 99);
    let mut ls = common::Lockstep::new(&a, &other);
    generate(&mut ls, &prompts, &p, None).unwrap();
    assert!(
        ls.token_mismatches * 2 > ls.predictions,
        "{} of {}",
        ls.token_mismatches,
        ls.predictions
    );
    // ... and the harness does not excuse them: the logits are beyond the tolerance.
    assert!(
        ls.logit_violations * 2 > ls.predictions,
        "{} of {}",
        ls.logit_violations,
        ls.predictions
    );
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ls.assert_agree("other")));
    assert!(r.is_err(), "assert_agree must fail for a different model");
    // A model whose every logit is NaN (a NaN final norm) must fail too: the harness counts a
    // NaN where the reference is finite as an infinite difference.
    let ck = presets::preset_checkpoint("tiny", 7, DType::BF16).unwrap();
    let nan = Model::load(CpuBackend::new(DType::BF16), cfg.clone(), |n| {
        match ck.get(n)?.clone() {
            llada::hf::checkpoint::WeightSource::Const {
                dtype, shape, name, ..
            } if n == llada::hf::checkpoint::LN_F => {
                Ok(llada::hf::checkpoint::WeightSource::Const {
                    value: f32::NAN,
                    dtype,
                    shape,
                    name,
                })
            }
            other => Ok(other),
        }
    })
    .unwrap();
    let mut ls = common::Lockstep::new(&a, &nan);
    let _ = generate(&mut ls, &prompts, &p, None);
    assert!(ls.predictions > 0);
    assert_eq!(
        ls.logit_violations, ls.predictions,
        "every all-NaN row must violate the logits tolerance"
    );
    assert!(ls.worst_logit_diff.is_infinite());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ls.assert_agree("nan")));
    assert!(r.is_err(), "assert_agree must fail for an all-NaN model");
}
