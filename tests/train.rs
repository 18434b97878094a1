//! Training path: finite-difference checks of every op and of the whole model (f64), the
//! losses' masking rules, AdamW, data, and end-to-end runs (loss falls, save → load → generate,
//! resume equals an uninterrupted run).

#[path = "common/cli.rs"]
mod cli;
#[path = "common/cmp.rs"]
mod cmp;
#[path = "common/fd.rs"]
mod fd;
#[path = "common/ranks.rs"]
mod ranks;

use cli::{llada_out as llada, tmpdir};
use fd::check_grad;
use llada::hf::config::ModelConfig;
use llada::rng::{bits, cell_key, uniform};
use llada::train::loss::{self, Draw};
use llada::train::model::{forward_backward, Batch, Params};
use llada::train::ops::{self, AttnShape, LinearBwd, MatMul, Rows};

/// Deterministic values in [-scale, scale].
fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let k = cell_key(seed, 99, 0, 0, 0);
    (0..n)
        .map(|i| scale * (2.0 * uniform(bits(k, i as u64)) - 1.0))
        .collect()
}

fn dotv(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn fd_linear() {
    let (n, k, m) = (3, 5, 4);
    let mut x = rand_vec(1, n * k, 1.0);
    let mut w = rand_vec(2, m * k, 1.0);
    let r = rand_vec(3, n * m, 1.0);
    let mut dx = vec![0.0; n * k];
    let mut dw = vec![0.0; m * k];
    let d = MatMul { n, k, m };
    ops::linear_bwd(Some(&mut dx), &mut dw, LinearBwd::new(&r, &x, &w, d));
    let w0 = w.clone();
    check_grad("linear dx", &mut x.clone(), &dx, &mut |xx| {
        let mut y = vec![0.0; n * m];
        ops::linear(&mut y, xx, &w0, n, k, m);
        dotv(&y, &r)
    });
    let x0 = x.clone();
    check_grad("linear dw", &mut w, &dw, &mut |ww| {
        let mut y = vec![0.0; n * m];
        ops::linear(&mut y, &x0, ww, n, k, m);
        dotv(&y, &r)
    });
    // dw accumulates.
    let mut dw2 = dw.clone();
    ops::linear_bwd(None, &mut dw2, LinearBwd::new(&r, &x, &w, d));
    for (a, b) in dw2.iter().zip(&dw) {
        assert!((a - 2.0 * b).abs() < 1e-12);
    }
    x[0] += 0.0;
}

#[test]
fn fd_rms_norm() {
    let (n, c) = (3, 6);
    let x = rand_vec(4, n * c, 2.0);
    let mut w = rand_vec(5, c, 1.0);
    let r = rand_vec(6, n * c, 1.0);
    let eps = 1e-5;
    let mut y = vec![0.0; n * c];
    let mut inv = vec![0.0; n];
    let d = Rows { n, c };
    ops::rms_norm(&mut y, &mut inv, &x, &w, d, eps);
    let mut dx = vec![0.0; n * c];
    let mut dw = vec![0.0; c];
    ops::rms_norm_bwd(&mut dx, &mut dw, &r, &x, &inv, &w, d);
    let w0 = w.clone();
    check_grad("rms_norm dx", &mut x.clone(), &dx, &mut |xx| {
        let mut y = vec![0.0; n * c];
        let mut i = vec![0.0; n];
        ops::rms_norm(&mut y, &mut i, xx, &w0, d, eps);
        dotv(&y, &r)
    });
    check_grad("rms_norm dw", &mut w, &dw, &mut |ww| {
        let mut y = vec![0.0; n * c];
        let mut i = vec![0.0; n];
        ops::rms_norm(&mut y, &mut i, &x, ww, d, eps);
        dotv(&y, &r)
    });
}

#[test]
fn fd_rope_and_identity_at_zero() {
    let (n, heads, hd) = (4, 2, 6);
    let (cos, sin) = llada::backend::rope_tables(10000.0, hd, 8);
    let pos = vec![0u32, 3, 7, 1];
    let mut x = rand_vec(7, n * heads * hd, 1.0);
    let r = rand_vec(8, n * heads * hd, 1.0);
    let mut dx = r.clone();
    ops::rope(&mut dx, &pos, (&cos, &sin), heads, hd, true);
    check_grad("rope", &mut x, &dx, &mut |xx| {
        let mut y = xx.to_vec();
        ops::rope(&mut y, &pos, (&cos, &sin), heads, hd, false);
        dotv(&y, &r)
    });
    // Position 0 is the identity; rotate then inverse-rotate is the identity.
    let mut y = x.clone();
    ops::rope(&mut y, &pos, (&cos, &sin), heads, hd, false);
    assert_eq!(&y[..heads * hd], &x[..heads * hd]);
    ops::rope(&mut y, &pos, (&cos, &sin), heads, hd, true);
    for (a, b) in y.iter().zip(&x) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn fd_attention_gqa() {
    let d = AttnShape {
        b: 2,
        t: 4,
        nh: 4,
        nkv: 2,
        hd: 3,
    };
    let n = d.b * d.t;
    let (qw, kw) = (d.nh * d.hd, d.nkv * d.hd);
    let q = rand_vec(9, n * qw, 1.5);
    let k = rand_vec(10, n * kw, 1.5);
    let v = rand_vec(11, n * kw, 1.0);
    let r = rand_vec(12, n * qw, 1.0);
    let mut o = vec![0.0; n * qw];
    let mut lse = vec![0.0; n * d.nh];
    ops::attention(&mut o, &mut lse, &q, &k, &v, d);
    let (mut dq, mut dk, mut dv) = (vec![0.0; n * qw], vec![0.0; n * kw], vec![0.0; n * kw]);
    ops::attention_bwd((&mut dq, &mut dk, &mut dv), (&r, &o, &lse), (&q, &k, &v), d);
    let run = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut o = vec![0.0; n * qw];
        let mut l = vec![0.0; n * d.nh];
        ops::attention(&mut o, &mut l, q, k, v, d);
        dotv(&o, &r)
    };
    check_grad("attention dq", &mut q.clone(), &dq, &mut |x| run(x, &k, &v));
    check_grad("attention dk", &mut k.clone(), &dk, &mut |x| run(&q, x, &v));
    check_grad("attention dv", &mut v.clone(), &dv, &mut |x| run(&q, &k, x));
}

#[test]
fn fd_swiglu_embedding_cross_entropy() {
    let len = 10;
    let g = rand_vec(13, len, 3.0);
    let u = rand_vec(14, len, 1.0);
    let r = rand_vec(15, len, 1.0);
    let (mut dg, mut du) = (vec![0.0; len], vec![0.0; len]);
    ops::swiglu_bwd(&mut dg, &mut du, &r, &g, &u);
    check_grad("swiglu dg", &mut g.clone(), &dg, &mut |x| {
        let mut m = vec![0.0; len];
        ops::swiglu(&mut m, x, &u);
        dotv(&m, &r)
    });
    check_grad("swiglu du", &mut u.clone(), &du, &mut |x| {
        let mut m = vec![0.0; len];
        ops::swiglu(&mut m, &g, x);
        dotv(&m, &r)
    });

    let (vocab, c) = (5, 3);
    let ids = [1u32, 4, 1, 0];
    let wte = rand_vec(16, vocab * c, 1.0);
    let r = rand_vec(17, ids.len() * c, 1.0);
    let mut dwte = vec![0.0; vocab * c];
    ops::embedding_bwd(&mut dwte, &r, &ids, c);
    check_grad("embedding", &mut wte.clone(), &dwte, &mut |w| {
        let mut x = vec![0.0; ids.len() * c];
        ops::embedding(&mut x, w, &ids, c);
        dotv(&x, &r)
    });

    let v = 7;
    let z = rand_vec(18, 3 * v, 4.0);
    let targets = [2u32, 6, 0];
    let weights = [0.5, 2.0, 1.25];
    let mut dz = z.clone();
    let l0 = ops::cross_entropy(&mut dz, &targets, &weights, v);
    // Loss against a direct evaluation.
    let mut direct = 0.0;
    for rr in 0..3 {
        let row = &z[rr * v..(rr + 1) * v];
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        direct += weights[rr] * (lse - row[targets[rr] as usize]);
    }
    assert!((l0 - direct).abs() < 1e-12, "{l0} vs {direct}");
    check_grad("cross_entropy", &mut z.clone(), &dz, &mut |x| {
        let mut y = x.to_vec();
        ops::cross_entropy(&mut y, &targets, &weights, v)
    });
}

fn fd_config() -> ModelConfig {
    ModelConfig {
        d_model: 8,
        n_heads: 2,
        n_kv_heads: 1,
        n_layers: 2,
        mlp_hidden_size: 12,
        vocab_size: 16,
        embedding_size: 16,
        max_sequence_length: 16,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        mask_token_id: 15,
        eos_token_id: 1,
        pad_token_id: 1,
    }
}

fn random_params(cfg: &ModelConfig, seed: u64) -> Params<f64> {
    let mut p = Params::<f64>::zeros(cfg);
    for (i, d) in p.data.iter_mut().enumerate() {
        let v = if p.shapes[i].len() == 1 {
            rand_vec(seed + i as u64, d.len(), 0.3)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect()
        } else {
            rand_vec(seed + i as u64, d.len(), 0.5)
        };
        *d = v;
    }
    p
}

#[test]
fn fd_whole_model() {
    let cfg = fd_config();
    let p = random_params(&cfg, 100);
    let (b, t) = (2, 5);
    let clean: Vec<u32> = (0..b * t).map(|i| (i * 7 % 15) as u32).collect();
    // Mask several positions in both rows; a repeated id exercises the embedding scatter.
    let batch =
        loss::pretrain_batch(&clean, b, t, false, Draw::new(cfg.mask_token_id, 3, 0, 1.0)).unwrap();
    let batch = if batch.rows.len() >= 2 {
        batch
    } else {
        Batch {
            ids: clean
                .iter()
                .enumerate()
                .map(|(i, &x)| if i % 2 == 0 { 15 } else { x })
                .collect(),
            b,
            t,
            rows: vec![0, 2, 4, 6, 8],
            targets: vec![0, 14, 13, 12, 11],
            weights: vec![0.1, 0.2, 0.3, 0.4, 0.5],
        }
    };
    assert!(!batch.rows.is_empty());
    let mut g = Params::<f64>::zeros(&cfg);
    let l0 = forward_backward(&cfg, &p, &batch, &mut g).unwrap();
    assert!(l0.is_finite() && l0 > 0.0);
    for i in 0..p.data.len() {
        let mut pp = p.clone();
        let mut x = pp.data[i].clone();
        check_grad(&p.names[i], &mut x, &g.data[i], &mut |xx| {
            pp.data[i].copy_from_slice(xx);
            let mut scratch = Params::<f64>::zeros(&cfg);
            forward_backward(&cfg, &pp, &batch, &mut scratch).unwrap()
        });
    }
}

// ---------------------------------------------------------------------------------------------
// PyTorch autograd parity, through the CLI.

/// `--data DATA --out OUT` and a small CPU run's batch (2 rows of 16 tokens).
fn cpu_train_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    let mut a = vec!["--data", data, "--out", out];
    a.extend("--batch-size 2 --seq-len 16 --device cpu".split_whitespace());
    a
}

fn read_f32_tensors(path: &std::path::Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{n}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, v)
        })
        .collect()
}

/// f32 against f32 autograd with different summation orders: each value passes through a few
/// hundred f32 operations (depth 2 layers, widths ≤ 96), so relative differences of ~1e-6
/// are expected; 2e-4 of the tensor's largest gradient leaves margin while a wrong or missing
/// term (all of which change gradients by O(1) relative) is caught.
fn assert_close(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    assert!(
        scale > 0.0,
        "{name}: all-zero reference gradient tests nothing"
    );
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 2e-4 * scale + 1e-7,
            "{name}[{i}]: got {g}, PyTorch {w} (max |grad| {scale})"
        );
    }
}

#[test]
fn grad_matches_pytorch_autograd() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("grad/expected.json")).unwrap())
            .unwrap();
    let dir = tmpdir("grad");
    let out = dir.join("g.safetensors");
    let o = cli::grad_on_fixture(&root.join("parity/f32"), &exp, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = read_f32_tensors(&out);
    let loss = t["loss"][0] as f64;
    let want = exp["loss"].as_f64().unwrap();
    // The loss is a sum of 5 CE terms of O(5) in f32: 1e-5 relative.
    assert!(cmp::rel_close(loss, want, 1e-5), "loss {loss} vs {want}");
    let f = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (name, g) in exp["grads"].as_object().unwrap() {
        assert_close(name, &t[name], &f(g));
    }
    let c = 64;
    for (key, tensor) in [
        ("wte_rows", "model.transformer.wte.weight"),
        ("lm_head_rows", "model.transformer.ff_out.weight"),
    ] {
        for (id, g) in exp[key].as_object().unwrap() {
            let id: usize = id.parse().unwrap();
            assert_close(
                &format!("{tensor}[{id}]"),
                &t[tensor][id * c..(id + 1) * c],
                &f(g),
            );
        }
    }
    // Every checkpoint tensor has a gradient, and unused embedding rows get none.
    assert_eq!(t.len(), 1 + 3 + 9 * 2);
    assert!(t["model.transformer.wte.weight"][199 * c..]
        .iter()
        .all(|&x| x == 0.0));
}

// ---------------------------------------------------------------------------------------------
// Losses.

#[test]
fn pretrain_masking_rules() {
    let (b, t) = (3, 50);
    let clean: Vec<u32> = (0..b * t).map(|i| (i % 40) as u32).collect();
    let mut frac_err = 0.0;
    let mut truncs = 0;
    for step in 0..200u64 {
        let bt = loss::pretrain_batch(&clean, b, t, true, Draw::new(99, 5, step, 0.5)).unwrap();
        let l = bt.t;
        if l != t {
            truncs += 1;
        }
        for row in 0..b {
            let p = loss::mask_prob(5, step, row as u64);
            assert!((1e-3..=1.0).contains(&p));
            let rows: Vec<usize> = bt
                .rows
                .iter()
                .enumerate()
                .filter(|(_, &r)| r as usize / l == row)
                .map(|(i, _)| i)
                .collect();
            for &i in &rows {
                let r = bt.rows[i] as usize;
                assert_eq!(bt.ids[r], 99);
                assert_eq!(bt.targets[i], clean[row * t + r % l]);
                // weight = scale / (p · B · L)
                let w = 0.5 / (p * (b * l) as f64);
                assert!((bt.weights[i] - w).abs() <= 1e-15 * w);
            }
            frac_err += rows.len() as f64 / l as f64 - p;
        }
        // Unmasked tokens are the clean ones.
        let masked: std::collections::HashSet<u32> = bt.rows.iter().copied().collect();
        for r in 0..b * l {
            if !masked.contains(&(r as u32)) {
                assert_eq!(bt.ids[r], clean[(r / l) * t + r % l]);
            }
        }
    }
    // Mean of (fraction − p) over 600 rows: each term has std ≤ √(0.25/50) ≈ 0.07 (less after
    // truncation is rare), so the mean's std is ≈ 0.003; 0.02 is ~7 sigma.
    assert!((frac_err / 600.0).abs() < 0.02, "{}", frac_err / 600.0);
    // 1 % truncation: over 20 000 steps expect 200 ± 14.
    let n = (0..20_000u64)
        .filter(|&s| loss::truncated_len(1, s, 4096) != 4096)
        .count();
    assert!((140..=260).contains(&n), "{n} truncations in 20000 batches");
    let _ = truncs;
}

#[test]
fn sft_never_masks_the_prompt() {
    let (b, t) = (2, 20);
    let clean: Vec<u32> = (0..b * t).map(|i| (i % 13) as u32).collect();
    let prompts = [7usize, 12];
    let mut seen_answer = [0usize; 2];
    for step in 0..300u64 {
        let bt = loss::sft_batch(&clean, &prompts, b, t, Draw::new(99, 3, step, 1.0)).unwrap();
        for (i, &r) in bt.rows.iter().enumerate() {
            let (row, pos) = (r as usize / t, r as usize % t);
            assert!(
                pos >= prompts[row],
                "step {step}: prompt position {pos} of row {row} masked"
            );
            seen_answer[row] += 1;
            let p = loss::mask_prob(3, step, row as u64);
            let w = 1.0 / (p * (t - prompts[row]) as f64 * b as f64);
            assert!((bt.weights[i] - w).abs() <= 1e-15 * w);
        }
        for row in 0..b {
            for pos in 0..prompts[row] {
                assert_eq!(bt.ids[row * t + pos], clean[row * t + pos]);
            }
        }
    }
    assert!(seen_answer.iter().all(|&n| n > 100));
    // The prompt's tokens never enter the loss: changing them changes no target and no weight.
    let mut other = clean.clone();
    other[..prompts[0]].fill(5);
    let a = loss::sft_batch(&clean, &prompts, b, t, Draw::new(99, 3, 7, 1.0)).unwrap();
    let c = loss::sft_batch(&other, &prompts, b, t, Draw::new(99, 3, 7, 1.0)).unwrap();
    assert_eq!(
        (&a.rows, &a.targets, &a.weights),
        (&c.rows, &c.targets, &c.weights)
    );
    assert!(loss::sft_batch(&clean, &[20, 3], b, t, Draw::new(99, 3, 0, 1.0)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Optimizer.

#[test]
fn adamw_matches_the_pytorch_update_rule() {
    use llada::train::optim::{AdamW, AdamWConfig, Schedule};
    let cfg = fd_config();
    let mut p = Params::<f32>::zeros(&cfg);
    p.data[1] = vec![0.5; 8]; // attn_norm: not decayed
    p.data[2] = vec![0.5; 64]; // q_proj: decayed
    let mut g = Params::<f32>::zeros(&cfg);
    let mut opt = AdamW::new(AdamWConfig::default(), &p);
    // Hand-unrolled torch.optim.AdamW for two steps with gradients 0.2 then -0.1, lr 0.01:
    let (b1, b2, eps, wd, lr) = (0.9f64, 0.999f64, 1e-8f64, 0.1f64, 0.01f64);
    let mut want = [0.5f64, 0.5f64]; // [norm weight, matrix weight]
    let (mut m, mut v) = (0.0f64, 0.0f64);
    for (t, gv) in [(1, 0.2f64), (2, -0.1f64)] {
        g.data[1].fill(gv as f32);
        g.data[2].fill(gv as f32);
        opt.step(&mut p, &g, lr);
        m = b1 * m + (1.0 - b1) * gv;
        v = b2 * v + (1.0 - b2) * gv * gv;
        let upd = lr * (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
        want[0] -= upd;
        want[1] = want[1] * (1.0 - lr * wd) - upd;
    }
    assert!(
        (p.data[1][0] as f64 - want[0]).abs() < 1e-6,
        "{} {}",
        p.data[1][0],
        want[0]
    );
    assert!(
        (p.data[2][0] as f64 - want[1]).abs() < 1e-6,
        "{} {}",
        p.data[2][0],
        want[1]
    );
    assert_eq!(p.data[3][0], 0.0, "zero gradient and zero weight stay zero");

    // Schedules.
    let s = Schedule::parse("wsd", 100).unwrap();
    assert_eq!(s.lr(1.0, 10, 0, 100), 0.1);
    assert_eq!(s.lr(1.0, 10, 9, 100), 1.0);
    assert_eq!(s.lr(1.0, 10, 50, 100), 1.0);
    assert_eq!(s.lr(1.0, 10, 89, 100), 1.0);
    assert!((s.lr(1.0, 10, 95, 100) - 0.55).abs() < 1e-12);
    let c = Schedule::parse("constant", 100).unwrap();
    assert_eq!(c.lr(2.0, 0, 99, 100), 2.0);
    assert!(Schedule::parse("cosine", 10).is_err());

    // Clipping.
    let mut g2 = Params::<f32>::zeros(&cfg);
    g2.data[0][0] = 3.0;
    g2.data[5][0] = 4.0;
    let n = llada::train::optim::clip_grad_norm(&mut g2, 1.0);
    assert!((n - 5.0).abs() < 1e-9);
    assert!((llada::train::optim::grad_norm(&g2) - 1.0).abs() < 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Runs.

use llada::train::data::Sample;
use llada::train::{StepStats, TrainOptions, Trainer};
use ranks::{in_ranks, options_fp};

fn run_config() -> ModelConfig {
    ModelConfig {
        d_model: 32,
        n_heads: 2,
        n_kv_heads: 2,
        n_layers: 2,
        mlp_hidden_size: 64,
        vocab_size: 40,
        embedding_size: 40,
        max_sequence_length: 64,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        mask_token_id: 39,
        eos_token_id: 0,
        pad_token_id: 0,
    }
}

fn run_params(cfg: &ModelConfig) -> Params<f32> {
    let p64 = random_params(cfg, 7);
    let mut p = Params::<f32>::zeros(cfg);
    for (d, s) in p.data.iter_mut().zip(&p64.data) {
        *d = s.iter().map(|&x| (x * 0.2) as f32).collect();
    }
    for (i, d) in p.data.iter_mut().enumerate() {
        if p.shapes[i].len() == 1 {
            d.fill(1.0);
        }
    }
    p
}

/// Sequences counting up from a random start (mod 38, ids 1..=38): every masked token is
/// predictable from its neighbours.
fn counting_samples(n: usize, t: usize) -> Vec<Sample> {
    (0..n)
        .map(|s| Sample {
            ids: (0..t).map(|i| 1 + ((s * 5 + i) % 38) as u32).collect(),
            prompt_len: 0,
        })
        .collect()
}

fn eval_loss(cfg: &ModelConfig, p: &Params<f32>, samples: &[Sample]) -> f64 {
    // Fixed masks (p = 0.5 per token, seed 1234), same for every call.
    let mut total = 0.0;
    for (i, s) in samples.iter().enumerate() {
        let t = s.ids.len();
        let mut rows = Vec::new();
        for pos in 0..t {
            if loss::is_masked(1234, i as u64, 0, pos as u64, 0.5) {
                rows.push(pos);
            }
        }
        let b = loss::fixed_mask_batch(&s.ids, &rows, 0.5, cfg.mask_token_id).unwrap();
        let mut g = Params::<f32>::zeros(cfg);
        total += forward_backward(cfg, p, &b, &mut g).unwrap();
    }
    total / samples.len() as f64
}

fn opts(steps: u64) -> TrainOptions {
    TrainOptions {
        steps,
        batch_size: 4,
        accum: 2,
        seq_len: 24,
        lr: 1e-2,
        warmup: 5,
        schedule: "wsd".into(),
        weight_decay: 0.1,
        clip: 1.0,
        seed: 11,
        sft: false,
        truncate: true,
        world: 1,
    }
}

#[test]
fn loss_falls_on_a_small_corpus() {
    let cfg = run_config();
    let samples = counting_samples(16, 24);
    let p = run_params(&cfg);
    let before = eval_loss(&cfg, &p, &samples);
    let mut tr = Trainer::new(cfg.clone(), p, opts(150), samples.clone()).unwrap();
    while tr.step < 150 {
        let s = tr.train_step().unwrap();
        assert!(s.loss.is_finite() && s.grad_norm.is_finite());
    }
    let after = eval_loss(&cfg, &tr.params, &samples);
    eprintln!("eval loss {before:.4} -> {after:.4}");
    // At init the loss is ≈ ln(40)·(#masked/T)/0.5 ≈ 3.7; learning the counting rule must
    // cut it well below 60 % (a broken gradient leaves it near the start or makes it grow).
    assert!(after < 0.6 * before, "eval loss {before} -> {after}");
}

#[test]
fn resume_equals_an_uninterrupted_run() {
    let cfg = run_config();
    let samples = counting_samples(7, 24);
    let mut full = Trainer::new(cfg.clone(), run_params(&cfg), opts(6), samples.clone()).unwrap();
    let mut part = Trainer::new(cfg.clone(), run_params(&cfg), opts(6), samples.clone()).unwrap();
    for _ in 0..6 {
        full.train_step().unwrap();
    }
    for _ in 0..3 {
        part.train_step().unwrap();
    }
    let dir = tmpdir("resume");
    llada::train::checkpoint::save(
        &dir,
        &cfg,
        &part.params,
        &part.opt,
        &part.state().unwrap(),
        None,
        false,
    )
    .unwrap();
    drop(part);
    let r = llada::train::checkpoint::load(&dir).unwrap();
    assert_eq!(r.state.step, 3);
    let o: TrainOptions = serde_json::from_value(r.state.options.clone()).unwrap();
    assert_eq!(o, opts(6));
    let mut resumed =
        Trainer::with_state(r.cfg, r.params, r.opt, r.state.step, o, samples).unwrap();
    for _ in 0..3 {
        resumed.train_step().unwrap();
    }
    assert_eq!(resumed.step, 6);
    assert_eq!(resumed.opt.t, full.opt.t);
    // Bit-identical: same data, masks, and f32 arithmetic in the same order.
    assert_eq!(resumed.params.data, full.params.data);
    assert_eq!(resumed.opt.m.data, full.opt.m.data);
    assert_eq!(resumed.opt.v.data, full.opt.v.data);
}

/// `o.world` ranks, each a thread with its own [`Trainer`] joined over a localhost
/// [`HostGroup`](llada::train::dist::HostGroup), run `steps` optimizer steps. Returns every
/// rank's step statistics and final parameters.
fn run_ranks(
    cfg: &ModelConfig,
    o: &TrainOptions,
    samples: &[Sample],
    steps: u64,
) -> Vec<(Vec<StepStats>, Params<f32>)> {
    let (cfg, o2, samples) = (cfg.clone(), o.clone(), samples.to_vec());
    in_ranks(o.world, options_fp(o), move |_, g| {
        let (cfg, o, samples) = (cfg.clone(), o2.clone(), samples.clone());
        let mut tr = Trainer::new(cfg.clone(), run_params(&cfg), o, samples).unwrap();
        tr.join_group(g).unwrap();
        let stats: Vec<StepStats> = (0..steps).map(|_| tr.train_step().unwrap()).collect();
        (stats, tr.params)
    })
}

/// Data parallel over `world` ranks of `b` sequences each equals one process with `b·world`.
fn check_data_parallel(o: TrainOptions, samples: Vec<Sample>, steps: u64) {
    let cfg = run_config();
    let world = o.world;
    let ranks = run_ranks(&cfg, &o, &samples, steps);
    let one_opts = TrainOptions {
        batch_size: o.batch_size * world,
        world: 1,
        ..o.clone()
    };
    let mut one = Trainer::new(cfg.clone(), run_params(&cfg), one_opts, samples).unwrap();
    let one_stats: Vec<StepStats> = (0..steps).map(|_| one.train_step().unwrap()).collect();
    // Every rank took the same steps: identical weights, bit for bit (the sums are rank 0's,
    // sent to all).
    for (r, (stats, p)) in ranks.iter().enumerate().skip(1) {
        assert_eq!(
            stats, &ranks[0].0,
            "rank {r}'s statistics differ from rank 0's"
        );
        assert_eq!(
            p.data, ranks[0].1.data,
            "rank {r}'s weights differ from rank 0's"
        );
    }
    let (stats, p) = &ranks[0];
    for (a, b) in stats.iter().zip(&one_stats) {
        assert_eq!((a.step, a.tokens, a.masked), (b.step, b.tokens, b.masked));
        // The same terms summed in another grouping (per rank, then across ranks): f32/f64
        // rounding only, ~1e-7 relative; a wrong split (other rows, masks or normaliser) moves
        // the loss by whole percents.
        let msg = format!("step {}: {a:?} vs one process {b:?}", a.step);
        assert!(cmp::rel_close(a.loss, b.loss, 1e-5), "{msg}");
        assert!(cmp::rel_close(a.grad_norm, b.grad_norm, 1e-4), "{msg}");
        assert!(cmp::rel_close(a.flops, b.flops, 1e-9), "{msg}");
    }
    // NaN-aware: a NaN weight on a rank is an infinite difference.
    let mut worst = 0f32;
    for (x, y) in p.data.iter().zip(&one.params.data) {
        worst = cmp::nan_max(worst, cmp::max_abs_diff(x, y));
    }
    // AdamW moves each weight by at most ~lr per step; gradients that differ by f32 rounding
    // (~1e-6 relative) move the weights apart by far less than lr/100 over a few steps, while
    // one wrong row in a batch moves them by ~lr.
    let lr = o.lr as f32;
    eprintln!("data parallel x{world}: worst weight difference {worst:e} (lr {lr})");
    assert!(
        worst < 1e-2 * lr,
        "weights differ by {worst} from one process"
    );
}

#[test]
fn data_parallel_pretraining_equals_one_process_with_the_global_batch() {
    let o = TrainOptions {
        batch_size: 2,
        world: 2,
        ..opts(4)
    };
    check_data_parallel(o, counting_samples(11, 24), 4);
}

#[test]
fn data_parallel_sft_over_three_ranks_equals_one_process() {
    let samples: Vec<Sample> = counting_samples(9, 24)
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            s.prompt_len = 3 + i % 7;
            s
        })
        .collect();
    let o = TrainOptions {
        batch_size: 1,
        accum: 1,
        world: 3,
        sft: true,
        ..opts(3)
    };
    check_data_parallel(o, samples, 3);
}

#[test]
fn a_global_batch_resplits_over_another_number_of_ranks() {
    let mut o = TrainOptions {
        batch_size: 4,
        world: 2,
        ..opts(4)
    };
    o.rescale_world(4).unwrap();
    assert_eq!((o.batch_size, o.world), (2, 4));
    o.rescale_world(1).unwrap();
    assert_eq!((o.batch_size, o.world), (8, 1));
    let e = o.rescale_world(3).unwrap_err().to_string();
    assert!(e.contains("does not split over 3 ranks"), "{e}");
}

#[test]
fn ranks_with_different_data_refuse_to_train() {
    let cfg = run_config();
    let o = TrainOptions {
        batch_size: 2,
        world: 2,
        ..opts(2)
    };
    let fp = options_fp(&o);
    let mut e = in_ranks(2, fp, move |rank, g| {
        let samples = counting_samples(8 + rank, 24);
        let mut tr = Trainer::new(cfg.clone(), run_params(&cfg), o.clone(), samples).unwrap();
        tr.join_group(g).unwrap_err().to_string()
    });
    let (eb, ea) = (e.pop().unwrap(), e.pop().unwrap());
    assert!(ea.contains("different training data"), "{ea}");
    assert!(eb.contains("different training data"), "{eb}");
}

#[test]
fn cli_train_saves_a_folder_generate_loads_and_resume_continues() {
    let (_, data, out) = cli::train_dir("cli", 30, |i| format!("the cat sat on mat number {i}. "));
    let base = cpu_train_args(data.to_str().unwrap(), out.to_str().unwrap());
    let mut a = vec!["train", "--preset", "tiny", "--steps", "4"];
    a.extend_from_slice(&base);
    let o = llada(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The folder is a model `llada generate` loads.
    let mut a = vec!["generate", "--model", out.to_str().unwrap()];
    a.extend(
        "--prompt-ids 5,6,7 --gen-length 8 --steps 8 --block-length 8 --device cpu"
            .split_whitespace(),
    );
    a.extend(["--format", "json"]);
    let o = llada(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ids"][0].as_array().unwrap().len(), 8, "generated ids");
    // Its bf16 weights are the rounded master weights, and training moved them.
    let r = llada::train::checkpoint::load(&out).unwrap();
    let init =
        llada::hf::presets::preset_checkpoint("tiny", 0, llada::hf::dtype::DType::BF16).unwrap();
    let w0 = init.read_f32(llada::hf::checkpoint::WTE).unwrap();
    assert_ne!(
        w0,
        r.params.data[0]
            .iter()
            .map(|&x| llada::hf::dtype::DType::BF16.round(x))
            .collect::<Vec<_>>()
    );
    // Resume to 6 steps.
    let mut a = vec!["train", "--steps", "6", "--resume", out.to_str().unwrap()];
    a.extend_from_slice(&base[..4]);
    let o = llada(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(llada::train::checkpoint::load(&out).unwrap().state.step, 6);
    // CUDA training: runs where a GPU is usable, otherwise a clear error saying why.
    let mut a = vec!["train", "--preset", "tiny", "--steps", "1"];
    a.extend_from_slice(&base[..8]);
    a.extend_from_slice(&["--device", "cuda"]);
    let o = llada(&a);
    match llada::engine::device::cuda_available() {
        Ok(()) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => {
            assert!(!o.status.success());
            assert!(String::from_utf8_lossy(&o.stderr).contains("CUDA unavailable"));
        }
    }
}

#[test]
fn data_loading_packing_and_sft_format() {
    use llada::train::data;
    let dir = tmpdir("data");
    llada::hf::tiny::write_tiny_tokenizer(&dir).unwrap();
    let cfg = llada::hf::presets::preset_config("tiny").unwrap();
    let tok = llada::hf::tokenizer::Tokenizer::from_dir(&dir, &cfg).unwrap();
    let eos = tok.special.eos;
    // Packing: EOS after each document, exact chunks, remainder dropped.
    let packed = data::pack(&[vec![5, 6, 7], vec![8, 9]], eos, 3).unwrap();
    assert_eq!(packed.len(), 2);
    assert_eq!(packed[0].ids, vec![5, 6, 7]);
    assert_eq!(packed[1].ids, vec![eos, 8, 9]);
    assert!(data::pack(&[vec![5]], eos, 3).is_err());

    let f = dir.join("sft.jsonl");
    std::fs::write(
        &f,
        "{\"prompt\": \"hi\", \"response\": \"ok\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"ok\"}]}\n",
    )
    .unwrap();
    let s = data::load_sft(&f, &tok, 64).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0], s[1], "both formats give the same sample");
    let prompt = tok.encode_chat(&[("user", "hi")]).unwrap();
    let ans = tok.encode("ok", false).unwrap();
    assert_eq!(s[0].prompt_len, prompt.len());
    assert_eq!(&s[0].ids[..prompt.len()], &prompt[..]);
    assert_eq!(&s[0].ids[prompt.len()..prompt.len() + ans.len()], &ans[..]);
    let after = prompt.len() + ans.len();
    assert_eq!(s[0].ids[after], tok.special.eot.unwrap());
    assert!(s[0].ids[after + 1..].iter().all(|&x| x == eos));
    // Errors name the line.
    std::fs::write(&f, "{\"prompt\": \"hi\"}\n").unwrap();
    let e = format!("{:#}", data::load_sft(&f, &tok, 64).unwrap_err());
    assert!(e.contains("sft.jsonl:1"), "{e}");
    std::fs::write(
        &f,
        "{\"prompt\": \"hi\", \"response\": \"a long answer\"}\n",
    )
    .unwrap();
    let e = format!("{:#}", data::load_sft(&f, &tok, 8).unwrap_err());
    assert!(e.contains("exceeds --seq-len"), "{e}");
    // Sample order: every sample once per epoch, and a pure function of (seed, g).
    let mut cache = None;
    let mut seen: Vec<usize> = (0..10)
        .map(|g| data::sample_index(4, g, 10, &mut cache))
        .collect();
    let again: Vec<usize> = (0..10)
        .map(|g| data::sample_index(4, g, 10, &mut None))
        .collect();
    assert_eq!(seen, again);
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

/// The CPU model of a bf16 GEMM: inputs rounded to bf16 (RNE), exact sums.
#[test]
fn linear_bf16_rounds_inputs_and_sums_exactly() {
    use llada::hf::dtype::DType;
    let (n, k, m) = (3, 5, 4);
    // 1 + 2^-10 is not a bf16 (8 significand bits): it rounds to 1.
    let x = vec![1.0 + 1.0 / 1024.0; n * k];
    let w = vec![1.0 - 1.0 / 1024.0; m * k];
    let mut y = vec![0f32; n * m];
    ops::linear_bf16(&mut y, &x, &w, n, k, m);
    assert!(y.iter().all(|&v| v == k as f32), "{y:?}");
    let mut y32 = vec![0f32; n * m];
    ops::linear(&mut y32, &x, &w, n, k, m);
    assert!(y32.iter().all(|&v| v != k as f32));
    // Random inputs: equal to the f64 GEMM of the rounded inputs, rounded once.
    let (n, k, m) = (7, 33, 5);
    let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let x = to32(rand_vec(81, n * k, 1.0));
    let w = to32(rand_vec(82, m * k, 1.0));
    let dy = to32(rand_vec(83, n * m, 1.0));
    let dw0 = to32(rand_vec(84, m * k, 1.0));
    let r = |v: &[f32]| {
        v.iter()
            .map(|&a| DType::BF16.round(a) as f64)
            .collect::<Vec<f64>>()
    };
    let (xr, wr, dyr) = (r(&x), r(&w), r(&dy));
    let mut y = vec![0f32; n * m];
    ops::linear_bf16(&mut y, &x, &w, n, k, m);
    let mut dx = vec![0f32; n * k];
    let mut dw = dw0.clone();
    let d = MatMul { n, k, m };
    ops::linear_bwd_bf16(Some(&mut dx), &mut dw, LinearBwd::new(&dy, &x, &w, d));
    for i in 0..n {
        for j in 0..m {
            let s: f64 = (0..k).map(|t| xr[i * k + t] * wr[j * k + t]).sum();
            assert!((y[i * m + j] as f64 - s).abs() <= 1e-6 * s.abs().max(1e-3));
        }
        for c in 0..k {
            let s: f64 = (0..m).map(|j| dyr[i * m + j] * wr[j * k + c]).sum();
            assert!((dx[i * k + c] as f64 - s).abs() <= 1e-6 * s.abs().max(1e-3));
        }
    }
    for j in 0..m {
        for c in 0..k {
            let s: f64 =
                dw0[j * k + c] as f64 + (0..n).map(|i| dyr[i * m + j] * xr[i * k + c]).sum::<f64>();
            assert!((dw[j * k + c] as f64 - s).abs() <= 1e-6 * s.abs().max(1e-3));
        }
    }
}

#[test]
fn pretrain_token_id_lines() {
    use llada::train::data;
    let dir = tmpdir("ids");
    let f = dir.join("ids.jsonl");
    std::fs::write(&f, "{\"ids\": [5, 6, 7]}\n\n{\"ids\": [8, 9]}\n").unwrap();
    // Without a tokenizer: the documents as given, EOS after each, packed.
    let s = data::load_pretrain_with(&f, None, 2, 3).unwrap();
    let want = data::pack(&[vec![5, 6, 7], vec![8, 9]], 2, 3).unwrap();
    assert_eq!(s, want);
    // With one: the same (ids lines are not tokenized), and text lines mix in.
    llada::hf::tiny::write_tiny_tokenizer(&dir).unwrap();
    let cfg = llada::hf::presets::preset_config("tiny").unwrap();
    let tok = llada::hf::tokenizer::Tokenizer::from_dir(&dir, &cfg).unwrap();
    let eos = tok.special.eos;
    assert_eq!(
        data::load_pretrain(&f, &tok, 3).unwrap(),
        data::pack(&[vec![5, 6, 7], vec![8, 9]], eos, 3).unwrap()
    );
    std::fs::write(&f, "{\"ids\": [5, 6]}\n{\"text\": \"the cat\"}\n").unwrap();
    let mixed = data::load_pretrain(&f, &tok, 2).unwrap();
    let cat = tok.encode("the cat", false).unwrap();
    let mut stream = vec![5, 6, eos];
    stream.extend_from_slice(&cat);
    stream.push(eos);
    let flat: Vec<u32> = mixed.iter().flat_map(|s| s.ids.clone()).collect();
    assert_eq!(flat, stream[..stream.len() / 2 * 2]);
    // Errors name the file, the line and the problem.
    let e = format!(
        "{:#}",
        data::load_pretrain_with(&f, None, 2, 2).unwrap_err()
    );
    assert!(
        e.contains("ids.jsonl:2") && e.contains("no tokenizer"),
        "{e}"
    );
    for (bad, what) in [
        ("{\"ids\": [1, -2]}", "ids[1] = -2"),
        ("{\"ids\": [1, 2.5]}", "ids[1] = 2.5"),
        ("{\"ids\": [4294967296]}", "ids[0]"),
        ("{\"ids\": \"1 2\"}", "must be an array"),
        ("{\"tokens\": [1]}", "`text` or an array `ids`"),
    ] {
        std::fs::write(&f, format!("{{\"ids\": [1]}}\n{bad}\n")).unwrap();
        let e = format!(
            "{:#}",
            data::load_pretrain_with(&f, None, 2, 1).unwrap_err()
        );
        assert!(e.contains("ids.jsonl:2") && e.contains(what), "{bad}: {e}");
    }
    let txt = dir.join("plain.txt");
    std::fs::write(&txt, "the cat").unwrap();
    let e = format!(
        "{:#}",
        data::load_pretrain_with(&txt, None, 2, 1).unwrap_err()
    );
    assert!(e.contains("plain.txt") && e.contains("no tokenizer"), "{e}");
}

/// `llada train` on a model without a tokenizer (the tiny folder minus its tokenizer, as the
/// `llada-1b` / `llada-8b` presets are): token-id data trains and resumes, text is refused;
/// `--no-save` writes no checkpoint; `--precision` is checked.
#[test]
fn cli_train_token_ids_no_save_and_precision() {
    let dir = tmpdir("cli-ids");
    let model = dir.join("model");
    let o = llada(&["init-tiny", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let _ = std::fs::remove_file(model.join(f));
    }
    let data = dir.join("ids.jsonl");
    let mut text = String::new();
    for i in 0..20u32 {
        let ids: Vec<String> = (0..13)
            .map(|j| ((i * 13 + j) % 400 + 10).to_string())
            .collect();
        text.push_str(&format!("{{\"ids\": [{}]}}\n", ids.join(", ")));
    }
    std::fs::write(&data, text).unwrap();
    let out = dir.join("ck");
    let (m, d, o_) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let common = cpu_train_args(d, o_);
    // `llada train HEAD FLAGS… COMMON` (HEAD: arguments that may hold paths).
    let run = |head: &[&str], flags: &str| {
        let mut a: Vec<&str> = vec!["train"];
        a.extend_from_slice(head);
        a.extend(flags.split_whitespace());
        a.extend_from_slice(&common);
        llada(&a)
    };
    // The run fails with `want` in its error.
    let fails = |head: &[&str], flags: &str, want: &str| {
        let o = run(head, flags);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{err}");
    };
    let (model, tiny) = (["--model", m], ["--preset", "tiny"]);
    // --no-save: trains, writes nothing.
    let o = run(&model, "--steps 2 --no-save");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("step 2/2") && err.contains("--no-save"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());
    assert!(!out.join("optimizer.safetensors").exists());
    // Saved, then resumed (the checkpoint has no tokenizer either).
    let o = run(&model, "--steps 2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
    assert!(!out.join("tokenizer.json").exists());
    let o = run(&["--resume", o_], "--steps 3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(llada::train::checkpoint::load(&out).unwrap().state.step, 3);
    // Text needs a tokenizer; SFT too.
    let txt = dir.join("corpus.txt");
    std::fs::write(&txt, "the cat sat on the mat ".repeat(20)).unwrap();
    let mut a = vec![
        "train",
        "--model",
        m,
        "--data",
        txt.to_str().unwrap(),
        "--out",
        o_,
    ];
    a.extend("--steps 1 --seq-len 16 --device cpu --no-save".split_whitespace());
    let o = llada(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no tokenizer.json"),
        "{err}"
    );
    fails(&model, "--steps 1 --sft --no-save", "--sft");
    // --no-save and --save-every exclude each other.
    fails(&model, "--steps 1 --no-save --save-every 1", "");
    // Precision: bf16 is GPU-only; anything else is not a precision.
    let want = "--precision bf16 needs --device cuda: the CPU reference trains in f32";
    fails(&tiny, "--steps 1 --precision bf16 --no-save", want);
    fails(
        &tiny,
        "--steps 1 --precision fp16 --no-save",
        "expected f32 or bf16",
    );
    let o = run(&tiny, "--steps 1 --precision f32 --no-save");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
