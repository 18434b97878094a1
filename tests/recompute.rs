//! Per-layer activation recomputation (`llada train --recompute`): the same loss and gradients
//! bit for bit as keeping every activation (full model in f32 and f64, LoRA, whole training
//! steps), and the pass's counted activation memory against the hand formula; a frozen base
//! (`PassOptions::frozen_base`) skips its weight gradients and keeps the adapters' bits.

use llada::hf::config::ModelConfig;
use llada::hf::dtype::DType;
use llada::hf::presets::{preset_checkpoint, preset_config};
use llada::lora::train::{init_adapter, LoraGrads};
use llada::train::data::Sample;
use llada::train::lora::{lora_forward_backward_with, LoraStep};
use llada::train::loss::{pretrain_batch, Draw};
use llada::train::model::{
    activation_floats, forward_backward, forward_backward_host, layer_activation_floats, Batch,
    Params, PassOptions, PassStats,
};
use llada::train::optim::AdamWConfig;
use llada::train::{TrainOptions, Trainer};

mod common;

use common::cli::{llada, ok_run, TempDir};

const KEEP: PassOptions = PassOptions::recomputing(false);
const RECOMPUTE: PassOptions = PassOptions::recomputing(true);

fn tiny() -> (ModelConfig, Params<f32>) {
    let cfg = preset_config("tiny").unwrap();
    let ck = preset_checkpoint("tiny", 7, DType::F32).unwrap();
    let mut p = Params::<f32>::from_checkpoint(&cfg, &ck).unwrap();
    // The preset's norms are all ones: give them structure so their gradients test something.
    for (i, d) in p.data.iter_mut().enumerate() {
        if p.shapes[i].len() == 1 {
            for (j, x) in d.iter_mut().enumerate() {
                *x = 1.0 + 0.01 * ((j * 7 + i) % 13) as f32;
            }
        }
    }
    (cfg, p)
}

/// A pretraining batch of `b × t` tokens (ids 1..500, about half masked).
fn batch(cfg: &ModelConfig, b: usize, t: usize, step: u64) -> Batch {
    let clean: Vec<u32> = (0..b * t)
        .map(|i| 1 + ((i * 37 + 11) % 499) as u32)
        .collect();
    pretrain_batch(
        &clean,
        b,
        t,
        false,
        Draw::new(cfg.mask_token_id, 5, step, 1.0),
    )
    .unwrap()
}

/// Equal bit patterns (so a NaN on one side, or both, fails unless both are the same NaN —
/// and then the finiteness check below catches it).
fn same_bits<T: Copy + Into<f64>>(what: &str, a: &[T], b: &[T]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (x, y): (f64, f64) = (x.into(), y.into());
        assert!(x.is_finite(), "{what}[{i}] = {x}");
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}[{i}]: {x:e} kept vs {y:e} recomputed"
        );
    }
}

fn pass<T: llada::train::ops::Real>(
    cfg: &ModelConfig,
    p: &Params<T>,
    b: &Batch,
    o: PassOptions,
) -> (PassStats, Params<T>) {
    let mut g = Params::<T>::zeros(cfg);
    let s = forward_backward_host(cfg, p, b, &mut g, o).unwrap();
    (s, g)
}

#[test]
fn recompute_is_bit_identical_f32_tiny() {
    let (cfg, p) = tiny();
    let b = batch(&cfg, 2, 24, 3);
    assert!(b.rows.len() > 4, "the batch masks something");
    let (keep, gk) = pass(&cfg, &p, &b, KEEP);
    let (rec, gr) = pass(&cfg, &p, &b, RECOMPUTE);
    assert!(
        keep.loss.is_finite() && keep.loss > 0.0,
        "loss {}",
        keep.loss
    );
    assert_eq!(keep.loss.to_bits(), rec.loss.to_bits(), "loss");
    for (i, name) in gk.names.iter().enumerate() {
        same_bits(name, &gk.data[i], &gr.data[i]);
    }
    // Every layer's weights got a gradient (the comparison is not of zeros).
    for (i, name) in gk.names.iter().enumerate() {
        assert!(
            gk.data[i].iter().any(|&x| x != 0.0),
            "{name}: all-zero gradient"
        );
    }
    // The default entry point is the kept path.
    let mut g0 = Params::<f32>::zeros(&cfg);
    let l0 = forward_backward(&cfg, &p, &b, &mut g0).unwrap();
    assert_eq!(l0.to_bits(), keep.loss.to_bits());
    same_bits("wte via forward_backward", &g0.data[0], &gk.data[0]);
    // Accumulation: a second recomputed pass onto the same gradients equals a second kept one.
    let mut gk2 = gk.clone();
    let mut gr2 = gr.clone();
    forward_backward_host(&cfg, &p, &b, &mut gk2, KEEP).unwrap();
    forward_backward_host(&cfg, &p, &b, &mut gr2, RECOMPUTE).unwrap();
    for (i, name) in gk2.names.iter().enumerate() {
        same_bits(name, &gk2.data[i], &gr2.data[i]);
    }
}

#[test]
fn recompute_is_bit_identical_f64() {
    let (cfg, p32) = tiny();
    let p = Params::<f64> {
        names: p32.names.clone(),
        shapes: p32.shapes.clone(),
        data: p32
            .data
            .iter()
            .map(|d| d.iter().map(|&x| x as f64).collect())
            .collect(),
    };
    let b = batch(&cfg, 1, 16, 8);
    let (keep, gk) = pass(&cfg, &p, &b, KEEP);
    let (rec, gr) = pass(&cfg, &p, &b, RECOMPUTE);
    assert_eq!(keep.loss.to_bits(), rec.loss.to_bits(), "loss");
    for (i, name) in gk.names.iter().enumerate() {
        same_bits(name, &gk.data[i], &gr.data[i]);
    }
}

/// The pass's counted activation floats equal the formula written out here from the buffers
/// of `forward_backward_with` (and the library's [`activation_floats`]); recomputation holds
/// every layer's input plus one layer instead of every layer.
#[test]
fn activation_count_matches_the_hand_formula() {
    let (cfg, p) = tiny();
    // tiny: C = 128, NH = NKV = 2, HD = 64, F = 320, V = 512, L = 2.
    let (c, qw, kw, nh, f, v, l) = (128, 128, 128, 2, 320, 512, 2);
    for (bb, t, step) in [(2, 24, 3), (1, 40, 1), (3, 8, 2)] {
        let b = batch(&cfg, bb, t, step);
        let (n, r) = (bb * t, b.rows.len());
        // One layer: r1, h1, q, k, v, lse, a, x_mid, r2, h2, g, u, m.
        let layer =
            n + n * c + n * qw + 2 * n * kw + n * nh + n * qw + n * c + n + n * c + 3 * n * f;
        assert_eq!(layer, layer_activation_floats(&cfg, n));
        // x, tmp_c; the inputs x_in of every layer; head: xr, rf, hf, logits, loss_rows;
        // backward: dhf, dxr, dx, dm, dg, du, dh, da, dq, dk, dv, delta.
        let common = 2 * n * c
            + l * n * c
            + (r * c + r + r * c + r * v + r)
            + (2 * r * c + n * c + 3 * n * f + n * c + 2 * n * qw + 2 * n * kw + n * nh);
        let (keep, _) = pass(&cfg, &p, &b, KEEP);
        let (rec, _) = pass(&cfg, &p, &b, RECOMPUTE);
        assert_eq!(keep.activation_floats, common + l * layer, "kept, {bb}×{t}");
        assert_eq!(
            rec.activation_floats,
            common + layer,
            "recomputed, {bb}×{t}"
        );
        assert_eq!(
            keep.activation_floats,
            activation_floats(&cfg, bb, t, r, false)
        );
        assert_eq!(
            rec.activation_floats,
            activation_floats(&cfg, bb, t, r, true)
        );
    }
    // At the 8B shape the saving is most of the activations (32 layers, one kept).
    let big = preset_config("llada-8b").unwrap();
    let (keep, rec) = (
        activation_floats(&big, 1, 2048, 1024, false),
        activation_floats(&big, 1, 2048, 1024, true),
    );
    assert!(rec * 5 < keep, "8B, 2048 tokens: {rec} vs {keep} floats");
}

/// A rank-`rank` adapter of `targets` (alpha 2·rank) from `seed`, with `B` set: PEFT starts
/// `B` at zero (then dA = 0), so both factors' gradients count.
fn adapter(cfg: &ModelConfig, targets: &[&str], rank: usize, seed: u64) -> llada::lora::Adapter {
    let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    let alpha = 2.0 * rank as f64;
    let mut ad = init_adapter(cfg, &targets, rank, alpha, false, seed).unwrap();
    for (k, m) in ad.modules.values_mut().enumerate() {
        for (j, x) in m.b.iter_mut().enumerate() {
            *x = 0.01 * (((j * 31 + k * 7) % 17) as f32 - 8.0);
        }
    }
    ad
}

/// LoRA training runs the same pass over its own ops: the adapter gradients are bit-identical
/// with recomputation (the adapters' `u` is recomputed too, to the same values).
#[test]
fn recompute_is_bit_identical_for_lora() {
    let (cfg, p) = tiny();
    let targets = ["q_proj", "v_proj", "attn_out", "ff_proj", "ff_out"];
    let ad = adapter(&cfg, &targets, 4, 3);
    let b = batch(&cfg, 2, 16, 4);
    let run = |o: PassOptions| {
        let mut g = LoraGrads::zeros_like(&ad);
        let s = lora_forward_backward_with(&cfg, &p, &ad, &b, &mut g, o).unwrap();
        (s, g)
    };
    let (keep, gk) = run(KEEP);
    let (rec, gr) = run(RECOMPUTE);
    assert!(keep.loss.is_finite());
    assert_eq!(keep.loss.to_bits(), rec.loss.to_bits(), "loss");
    assert_eq!(gk.modules.len(), 5 * cfg.n_layers + 1);
    for (m, (da, db)) in &gk.modules {
        assert!(da.iter().any(|&x| x != 0.0), "{m}: zero dA");
        same_bits(&format!("{m} dA"), da, &gr.modules[m].0);
        same_bits(&format!("{m} dB"), db, &gr.modules[m].1);
    }
    assert!(rec.activation_floats < keep.activation_floats);
}

/// [`PassOptions::frozen_base`]: the LoRA linears over the same base with and without it give
/// the same loss and adapter gradients bit for bit; with it the base's gradient buffers are
/// never written (no norm, embedding or linear `dw` work), without it the norms and the
/// embedding get gradients (so the option is what skips them). The plain host ops take it too:
/// same loss, and an empty gradient list is accepted.
#[test]
fn a_frozen_base_skips_its_weight_gradients_and_keeps_the_adapters_bits() {
    use llada::train::lora::{LoraLinear, LoraOps};
    use llada::train::model::forward_backward_with;
    let (cfg, p) = tiny();
    let ad = adapter(&cfg, &["q_proj", "ff_out"], 2, 5);
    let b = batch(&cfg, 2, 16, 9);
    let run = |o: PassOptions| {
        let mut g = LoraGrads::zeros_like(&ad);
        let mut base = Params::<f32>::zeros(&cfg);
        let ops = LoraOps::with_linear(LoraLinear::new(&p, &ad, &mut g).unwrap());
        let s = forward_backward_with(&ops, &cfg, o, &p.data, &b, &mut base.data).unwrap();
        drop(ops);
        (s, g, base)
    };
    let (frozen, gf, base_f) = run(KEEP.frozen());
    let (open, go, base_o) = run(KEEP);
    assert!(frozen.loss.is_finite());
    assert_eq!(frozen.loss.to_bits(), open.loss.to_bits(), "loss");
    for (m, (da, db)) in &gf.modules {
        assert!(da.iter().any(|&x| x != 0.0), "{m}: zero dA");
        same_bits(&format!("{m} dA"), da, &go.modules[m].0);
        same_bits(&format!("{m} dB"), db, &go.modules[m].1);
    }
    assert!(
        base_f.data.iter().flatten().all(|&x| x.to_bits() == 0),
        "a frozen base's gradients were written"
    );
    for (i, name) in base_o.names.iter().enumerate() {
        let nonzero = base_o.data[i].iter().any(|&x| x != 0.0);
        if base_o.shapes[i].len() == 1 || name.contains("wte") {
            assert!(nonzero, "{name}: no gradient without the option");
        }
    }
    // The plain host ops: the same loss frozen (with no gradient buffers) as training.
    let ops = llada::train::backend::HostOps::<f32>::new();
    let mut none: Vec<Vec<f32>> = Vec::new();
    let fl = forward_backward_with(&ops, &cfg, KEEP.frozen(), &p.data, &b, &mut none).unwrap();
    let (full, g) = pass(&cfg, &p, &b, KEEP);
    assert!(g.data.iter().flatten().any(|&x| x != 0.0));
    assert_eq!(fl.loss.to_bits(), full.loss.to_bits(), "plain ops loss");
    // Without the option an empty gradient list is an error, not a panic.
    assert!(forward_backward_with(&ops, &cfg, KEEP, &p.data, &b, &mut none).is_err());
}

fn samples(n: usize, t: usize) -> Vec<Sample> {
    (0..n)
        .map(|s| Sample {
            ids: (0..t)
                .map(|i| 1 + ((s * 13 + i * 3) % 499) as u32)
                .collect(),
            prompt_len: 0,
        })
        .collect()
}

fn opts(steps: u64) -> TrainOptions {
    TrainOptions {
        steps,
        batch_size: 2,
        accum: 2,
        seq_len: 16,
        lr: 3e-3,
        warmup: 1,
        schedule: "constant".into(),
        weight_decay: 0.1,
        clip: 1.0,
        seed: 2,
        sft: false,
        truncate: false,
        world: 1,
    }
}

/// Whole optimizer steps (accumulation, clipping, AdamW): the weights after three steps are
/// bit-identical, for full training and for a LoRA step state.
#[test]
fn training_steps_are_bit_identical_with_recompute() {
    let (cfg, p) = tiny();
    let run = |recompute: bool| {
        let mut t = Trainer::new(cfg.clone(), p.clone(), opts(3), samples(6, 16)).unwrap();
        t.recompute = recompute;
        let losses: Vec<f64> = (0..3).map(|_| t.train_step().unwrap().loss).collect();
        (losses, t.params)
    };
    let (lk, pk) = run(false);
    let (lr, pr) = run(true);
    assert!(lk.iter().all(|l| l.is_finite()), "{lk:?}");
    assert_eq!(lk, lr);
    for (i, name) in pk.names.iter().enumerate() {
        same_bits(name, &pk.data[i], &pr.data[i]);
    }
    assert!(pk.data[1] != p.data[1], "the steps changed the weights");

    let targets: Vec<String> = ["q_proj", "ff_out"].map(String::from).to_vec();
    let ad = init_adapter(&cfg, &targets, 2, 4.0, false, 9).unwrap();
    let lora = |recompute: bool| {
        let mut st = LoraStep::new(p.clone(), ad.clone(), AdamWConfig::default());
        let mut t = Trainer::new(cfg.clone(), Params::default(), opts(3), samples(6, 16)).unwrap();
        t.recompute = recompute;
        let losses: Vec<f64> = (0..3)
            .map(|_| t.train_step_on(&mut st).unwrap().loss)
            .collect();
        (losses, st.adapter)
    };
    let (lk, ak) = lora(false);
    let (lr, ar) = lora(true);
    assert_eq!(lk, lr);
    for (m, mk) in &ak.modules {
        same_bits(&format!("{m}.A"), &mk.a, &ar.modules[m].a);
        same_bits(&format!("{m}.B"), &mk.b, &ar.modules[m].b);
    }
}

/// The CLI flags: `llada grad --recompute` writes the same file byte for byte, and `llada
/// train --recompute` saves the same weights and optimizer state.
#[test]
fn cli_recompute_gives_identical_files() {
    let dir = TempDir::new("recompute-cli");
    let d = dir.path();
    let grad = |out: &str, extra: &[&str]| {
        let o = d.join(out);
        let args = ["grad", "--preset", "tiny", "--ids", "5,17,42,99,3,150,17,8"];
        let rest = ["--masked", "1,4,6", "--p-mask", "0.4", "--out"];
        ok_run(llada().args(args).args(rest).arg(&o).args(extra));
        std::fs::read(o).unwrap()
    };
    let (a, b) = (
        grad("a.safetensors", &[]),
        grad("b.safetensors", &["--recompute"]),
    );
    assert!(a.len() > 1000);
    assert!(a == b, "llada grad --recompute wrote different gradients");

    let data = d.join("d.jsonl");
    let docs: Vec<String> = (0..6)
        .map(|i| {
            format!(
                "{{\"ids\": [{}]}}",
                (1..30)
                    .map(|j| ((i * 11 + j) % 400).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    std::fs::write(&data, docs.join("\n")).unwrap();
    let train = |out: &str, extra: &[&str]| {
        let o = d.join(out);
        let args = [
            "train",
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--batch-size",
            "2",
        ];
        let rest = ["--seq-len", "16", "--no-dist", "--data"];
        ok_run(
            llada()
                .args(args)
                .args(rest)
                .arg(&data)
                .arg("--out")
                .arg(&o)
                .args(extra),
        );
        ["model.safetensors", "optimizer.safetensors"].map(|f| std::fs::read(o.join(f)).unwrap())
    };
    let (a, b) = (train("ta", &[]), train("tb", &["--recompute"]));
    assert!(
        a == b,
        "llada train --recompute saved different weights or moments"
    );
}
