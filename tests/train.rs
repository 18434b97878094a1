//! Training path: finite-difference checks of every op and of the whole model (f64), the
//! losses' masking rules, AdamW, data, and end-to-end runs (loss falls, save → load → generate,
//! resume equals an uninterrupted run).

use llada::config::ModelConfig;
use llada::rng::{bits, cell_key, uniform};
use llada::train::loss;
use llada::train::model::{forward_backward, Batch, Params};
use llada::train::ops::{self, AttnDims};

/// Deterministic values in [-scale, scale].
fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let k = cell_key(seed, 99, 0, 0, 0);
    (0..n)
        .map(|i| scale * (2.0 * uniform(bits(k, i as u64)) - 1.0))
        .collect()
}

/// Central differences in f64 with step 1e-5: truncation error ~h²·f''' ≈ 1e-10 and rounding
/// error ~ε·|f|/h ≈ 1e-11 for the O(1) losses here, so 1e-7 absolute plus 1e-6 relative to the
/// largest gradient is far above the numerical noise and far below any real mistake (a wrong
/// term changes gradients at the 1e-2 level).
fn check_grad(name: &str, x: &mut [f64], analytic: &[f64], f: &mut dyn FnMut(&[f64]) -> f64) {
    let h = 1e-5;
    let scale = analytic.iter().fold(0.0f64, |a, &b| a.max(b.abs())).max(1e-3);
    let mut worst = 0.0f64;
    for i in 0..x.len() {
        let x0 = x[i];
        x[i] = x0 + h;
        let fp = f(x);
        x[i] = x0 - h;
        let fm = f(x);
        x[i] = x0;
        let num = (fp - fm) / (2.0 * h);
        let err = (num - analytic[i]).abs();
        worst = worst.max(err);
        assert!(
            err <= 1e-7 + 1e-6 * scale,
            "{name}[{i}]: analytic {} numeric {num} (error {err}, max |grad| {scale})",
            analytic[i]
        );
    }
    eprintln!("{name}: {} elements, worst error {worst:.2e}", x.len());
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
    ops::linear_bwd(Some(&mut dx), &mut dw, &r, &x, &w, n, k, m);
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
    ops::linear_bwd(None, &mut dw2, &r, &x, &w, n, k, m);
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
    ops::rms_norm(&mut y, &mut inv, &x, &w, n, c, eps);
    let mut dx = vec![0.0; n * c];
    let mut dw = vec![0.0; c];
    ops::rms_norm_bwd(&mut dx, &mut dw, &r, &x, &inv, &w, n, c);
    let w0 = w.clone();
    check_grad("rms_norm dx", &mut x.clone(), &dx, &mut |xx| {
        let mut y = vec![0.0; n * c];
        let mut i = vec![0.0; n];
        ops::rms_norm(&mut y, &mut i, xx, &w0, n, c, eps);
        dotv(&y, &r)
    });
    check_grad("rms_norm dw", &mut w, &dw, &mut |ww| {
        let mut y = vec![0.0; n * c];
        let mut i = vec![0.0; n];
        ops::rms_norm(&mut y, &mut i, &x, ww, n, c, eps);
        dotv(&y, &r)
    });
}

#[test]
fn fd_rope_and_identity_at_zero() {
    let (n, heads, hd) = (4, 2, 6);
    let (cos, sin) = llada::backend::rope_tables(10000.0, hd, 8);
    let pos = vec![0usize, 3, 7, 1];
    let mut x = rand_vec(7, n * heads * hd, 1.0);
    let r = rand_vec(8, n * heads * hd, 1.0);
    let mut dx = r.clone();
    ops::rope(&mut dx, &pos, &cos, &sin, n, heads, hd, true);
    check_grad("rope", &mut x, &dx, &mut |xx| {
        let mut y = xx.to_vec();
        ops::rope(&mut y, &pos, &cos, &sin, n, heads, hd, false);
        dotv(&y, &r)
    });
    // Position 0 is the identity; rotate then inverse-rotate is the identity.
    let mut y = x.clone();
    ops::rope(&mut y, &pos, &cos, &sin, n, heads, hd, false);
    assert_eq!(&y[..heads * hd], &x[..heads * hd]);
    ops::rope(&mut y, &pos, &cos, &sin, n, heads, hd, true);
    for (a, b) in y.iter().zip(&x) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn fd_attention_gqa() {
    let d = AttnDims {
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
    ops::attention_bwd(&mut dq, &mut dk, &mut dv, &r, &q, &k, &v, &o, &lse, d);
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
    let l0 = ops::cross_entropy_fwd_bwd(&mut dz, &targets, &weights, v);
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
        ops::cross_entropy_fwd_bwd(&mut y, &targets, &weights, v)
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
    let batch = loss::pretrain_batch(&clean, b, t, cfg.mask_token_id, 3, 0, false, 1.0).unwrap();
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

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("llada-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn llada(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_llada"))
        .args(args)
        .output()
        .expect("run llada")
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
    assert!(scale > 0.0, "{name}: all-zero reference gradient tests nothing");
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
    let join = |k: &str| {
        exp[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let dir = tmpdir("grad");
    let out = dir.join("g.safetensors");
    let model = root.join("parity/f32");
    let o = llada(&[
        "grad",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &join("ids"),
        "--masked",
        &join("masked"),
        "--p-mask",
        &exp["p_mask"].to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = read_f32_tensors(&out);
    let loss = t["loss"][0] as f64;
    let want = exp["loss"].as_f64().unwrap();
    // The loss is a sum of 5 CE terms of O(5) in f32: 1e-5 relative.
    assert!((loss - want).abs() <= 1e-5 * want.abs(), "loss {loss} vs {want}");
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
    assert!(t["model.transformer.wte.weight"][199 * c..].iter().all(|&x| x == 0.0));
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
        let bt = loss::pretrain_batch(&clean, b, t, 99, 5, step, true, 0.5).unwrap();
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
        let bt = loss::sft_batch(&clean, &prompts, b, t, 99, 3, step, 1.0).unwrap();
        for (i, &r) in bt.rows.iter().enumerate() {
            let (row, pos) = (r as usize / t, r as usize % t);
            assert!(pos >= prompts[row], "step {step}: prompt position {pos} of row {row} masked");
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
    for p in 0..prompts[0] {
        other[p] = 5;
    }
    let a = loss::sft_batch(&clean, &prompts, b, t, 99, 3, 7, 1.0).unwrap();
    let c = loss::sft_batch(&other, &prompts, b, t, 99, 3, 7, 1.0).unwrap();
    assert_eq!(
        (&a.rows, &a.targets, &a.weights),
        (&c.rows, &c.targets, &c.weights)
    );
    assert!(loss::sft_batch(&clean, &[20, 3], b, t, 99, 3, 0, 1.0).is_err());
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
    assert!((p.data[1][0] as f64 - want[0]).abs() < 1e-6, "{} {}", p.data[1][0], want[0]);
    assert!((p.data[2][0] as f64 - want[1]).abs() < 1e-6, "{} {}", p.data[2][0], want[1]);
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
