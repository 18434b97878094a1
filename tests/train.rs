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
