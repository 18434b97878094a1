//! Op-level checks of the CPU reference backend with hand-checkable values.
//!
//! Expected values come from closed forms evaluated in f64 here (or worked out by hand in the
//! comments), never from the implementation under test.

#[path = "common/cmp.rs"]
mod cmp;

use std::io::Write;
use std::sync::Arc;

use llada::backend::cpu::{CpuBackend, CpuWeight};
use llada::backend::head::{Remasking, SelectParams};
use llada::backend::SelectIo;
use llada::backend::{rope_tables, AttnShape, Backend, Gather, HeadDims, MatMul, Norm, Rope, Rows};
use llada::engine::model::Model;
use llada::engine::model::Tokens;
use llada::hf::checkpoint::WeightSource;
use llada::hf::config::ModelConfig;
use llada::hf::dtype::DType;

/// An f32 host weight of `shape` loaded on `be`.
fn weight(be: &CpuBackend, shape: &[usize], data: Vec<f32>) -> CpuWeight {
    let shape = shape.to_vec();
    let w = WeightSource::Host {
        data: Arc::new(data),
        dtype: DType::F32,
        shape,
        name: "w".into(),
    };
    be.load_weight(&[w]).unwrap()
}

/// Deterministic pseudo-random values in [-1, 1) (an LCG; any spread of values will do).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

// ---------------------------------------------------------------- RoPE

/// An f32 backend, the fused QKV row width of `(nh, nkv, hd)` and RoPE tables of `positions`.
fn rope_setup(
    theta: f32,
    (nh, nkv, hd): (usize, usize, usize),
    positions: usize,
) -> (CpuBackend, usize, Vec<f32>, Vec<f32>) {
    let (cos, sin) = rope_tables(theta, hd, positions);
    (CpuBackend::new(DType::F32), (nh + 2 * nkv) * hd, cos, sin)
}

#[test]
fn rope_at_position_zero_is_identity() {
    let (nh, nkv, hd) = (2, 1, 8);
    let (be, w, cos, sin) = rope_setup(10000.0, (nh, nkv, hd), 4);
    let orig = values(2 * w, 1);
    let mut qkv = orig.clone();
    be.rope(
        &mut qkv,
        Rope::new(&vec![0, 0], &cos, &sin),
        AttnShape::new(1, 2, nh, nkv, hd),
    )
    .unwrap();
    assert_eq!(qkv, orig);
}

/// theta 5e5, HD 128 (LLaDA-8B): reference §8.3 gives inv_freq[1] = 0.8146172338565447 and
/// inv_freq[63] = 2.4551e-06. At position 1 the angle of pair j is inv_freq[j], and the
/// half-split convention pairs column j with column j + 64 (not j + 1):
/// e_j ↦ cos·e_j + sin·e_{j+64}, e_{j+64} ↦ −sin·e_j + cos·e_{j+64}.
#[test]
fn rope_half_split_convention_with_unit_vectors() {
    let (nh, nkv, hd) = (1, 1, 128);
    let (be, w, cos, sin) = rope_setup(500000.0, (nh, nkv, hd), 2);
    for (j, f) in [(1usize, 0.8146172338565447f64), (63, 2.4551e-06)] {
        // q = e_j, k = e_{j+64}, v = e_j (v must not move).
        let mut qkv = vec![0.0f32; w];
        qkv[j] = 1.0;
        qkv[hd + j + 64] = 1.0;
        qkv[2 * hd + j] = 1.0;
        be.rope(
            &mut qkv,
            Rope::new(&vec![1], &cos, &sin),
            AttnShape::new(1, 1, nh, nkv, hd),
        )
        .unwrap();
        let (c, s) = (f.cos(), f.sin());
        // f32 tables: cos/sin of an f32 angle, error a few f32 ulps; inv_freq[63] is only given
        // to 5 digits, hence the relative 1e-4 on the tiny sine.
        let close = |got: f32, want: f64, what: &str| {
            let tol = 1e-6f64.max(1e-4 * want.abs());
            assert!(
                (got as f64 - want).abs() <= tol,
                "j={j} {what}: {got} vs {want}"
            );
        };
        close(qkv[j], c, "q[j]");
        close(qkv[j + 64], s, "q[j+64]");
        close(qkv[hd + j], -s, "k[j]");
        close(qkv[hd + j + 64], c, "k[j+64]");
        for (i, &v) in qkv.iter().enumerate() {
            if ![j, j + 64, hd + j, hd + j + 64, 2 * hd + j].contains(&i) {
                assert_eq!(
                    v, 0.0,
                    "j={j}: column {i} should stay 0 (interleaved pairing?)"
                );
            }
        }
        assert_eq!(qkv[2 * hd + j], 1.0, "v must not be rotated");
    }
}

#[test]
fn rope_rejects_positions_outside_the_table() {
    let be = CpuBackend::new(DType::F32);
    let (cos, sin) = rope_tables(10000.0, 4, 3);
    let mut qkv = vec![0.0; 12];
    let e = be
        .rope(
            &mut qkv,
            Rope::new(&vec![3], &cos, &sin),
            AttnShape::new(1, 1, 1, 1, 4),
        )
        .unwrap_err();
    assert!(e.to_string().contains("pos[0] = 3"), "{e}");
}

// ---------------------------------------------------------------- RMSNorm

#[test]
fn rms_norm_known_values_f32() {
    let be = CpuBackend::new(DType::F32);
    let w = weight(&be, &[4], vec![1.0, 2.0, 0.5, -1.0]);
    let x = vec![1.0f32, 2.0, 3.0, 4.0];
    let mut out = vec![0.0; 4];
    be.rms_norm(&mut out, &x, &w, Norm::new(1, 4, 1e-5))
        .unwrap();
    // mean(x²) = 30/4 = 7.5
    let r = 1.0 / (7.5f64 + 1e-5).sqrt();
    for (i, (&o, (&xv, &wv))) in out
        .iter()
        .zip(x.iter().zip(&[1.0f64, 2.0, 0.5, -1.0]))
        .enumerate()
    {
        let e = wv * xv as f64 * r;
        assert!((o as f64 - e).abs() <= 1e-6 * e.abs(), "[{i}] {o} vs {e}");
    }
}

/// PyTorch order (reference §2.4): round the normalised value to bf16, THEN multiply by the
/// weight and round again. x = [1, 2]: mean(x²) = 2.5, y₀ = 1/√2.5 = 0.632454…
/// bf16(y₀) = 162/256 = 0.6328125 (ulp 2⁻⁸ in [0.5, 1); 0.632454·256 = 161.9).
/// w₀ = 1.015625 (= 1 + 2⁻⁶, exact in bf16):
///   round-first: 1.015625 · 0.6328125 = 0.6427002 → ·256 = 164.53 → 165/256 = 0.64453125
///   round-after: 1.015625 · 0.632454 = 0.6423364 → ·256 = 164.44 → 164/256 = 0.640625
/// y₁ = 2/√2.5 = 1.264911 → ulp 2⁻⁷: 161.9 → 162/128 = 1.265625; w₁ = 1 leaves it.
#[test]
fn rms_norm_bf16_rounds_before_the_weight() {
    let be = CpuBackend::new(DType::BF16);
    let w = weight(&be, &[2], vec![1.015625, 1.0]);
    let mut out = vec![0.0; 2];
    be.rms_norm(&mut out, &vec![1.0, 2.0], &w, Norm::new(1, 2, 1e-5))
        .unwrap();
    assert_eq!(out, vec![0.64453125, 1.265625]);
    // add_rms_norm: x = round(x + d) first; the same numbers through a residual.
    let mut x = vec![0.5f32, 1.5];
    let mut out2 = vec![0.0; 2];
    be.add_rms_norm(
        &mut out2,
        &mut x,
        &vec![0.5, 0.5],
        &w,
        Norm::new(1, 2, 1e-5),
    )
    .unwrap();
    assert_eq!(x, vec![1.0, 2.0]);
    assert_eq!(out2, out);
}

#[test]
fn rms_norm_const_weight_is_a_scalar() {
    let be = CpuBackend::new(DType::BF16);
    let two = WeightSource::Const {
        value: 2.0,
        dtype: DType::BF16,
        shape: vec![2],
        name: "ln".into(),
    };
    let w = be.load_weight(&[two]).unwrap();
    let mut out = vec![0.0; 2];
    be.rms_norm(&mut out, &vec![1.0, 2.0], &w, Norm::new(1, 2, 1e-5))
        .unwrap();
    // 2 · bf16(y): exact doubling of 0.6328125 and 1.265625.
    assert_eq!(out, vec![1.265625, 2.53125]);
}

// ---------------------------------------------------------------- matmul

fn naive(x: &[f32], w: &[f32], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut o = vec![0.0f64; n * m];
    for i in 0..n {
        for j in 0..m {
            o[i * m + j] = (0..k)
                .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                .sum();
        }
    }
    o
}

#[test]
fn matmul_matches_naive_f32_and_bf16() {
    let (n, k, m) = (7, 53, 11);
    for dt in [DType::F32, DType::BF16] {
        let be = CpuBackend::new(dt);
        let mut x = values(n * k, 2);
        let mut wv = values(m * k, 3);
        dt.round_slice(&mut x);
        dt.round_slice(&mut wv);
        let w = weight(&be, &[m, k], wv.clone());
        let mut out = vec![f32::NAN; n * m];
        be.matmul(&mut out, &x, &w, MatMul { n, k, m }).unwrap();
        let e = naive(&x, &wv, n, k, m);
        for (i, (&o, &ev)) in out.iter().zip(&e).enumerate() {
            // f32 accumulation of 53 products of |·| ≤ 1: error ≤ 53 · 2⁻²⁴ · Σ|x·w| ≲ 2e-4
            // absolute, rounded once to the dtype (half an ulp of the result).
            let tol = match dt {
                DType::F32 => 1e-5 * (1.0 + ev.abs()),
                _ => ev.abs() * 2f64.powi(-8) + 1e-5,
            };
            assert!((o as f64 - ev).abs() <= tol, "{dt} [{i}] {o} vs {ev}");
            assert_eq!(o, dt.round(o), "{dt} output not representable");
        }
    }
}

/// A memory-mapped bf16 weight is decoded on the fly; a mapped f32 weight in a bf16 backend is
/// rounded to bf16 first (as `torch_dtype=bfloat16` loading would).
#[test]
fn matmul_with_mapped_weights() {
    let (n, k, m) = (3, 10, 5);
    let wv = values(m * k, 4);
    let x = {
        let mut x = values(n * k, 5);
        DType::BF16.round_slice(&mut x);
        x
    };
    let dir = std::env::temp_dir().join(format!("llada-cpu-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut results = Vec::new();
    for (file_dt, be_dt) in [(DType::BF16, DType::F32), (DType::F32, DType::BF16)] {
        let path = dir.join(format!("w-{file_dt}.bin"));
        let mut f = std::fs::File::create(&path).unwrap();
        let pad = [0u8; 6]; // a non-zero start offset
        f.write_all(&pad).unwrap();
        for &v in &wv {
            match file_dt {
                DType::BF16 => f.write_all(&half::bf16::from_f32(v).to_le_bytes()).unwrap(),
                _ => f.write_all(&v.to_le_bytes()).unwrap(),
            }
        }
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test's own temp file, not modified while mapped.
        let mmap = Arc::new(unsafe { memmap2::Mmap::map(&file).unwrap() });
        let src = WeightSource::Mapped {
            mmap,
            start: 6,
            end: 6 + m * k * file_dt.size(),
            dtype: file_dt,
            shape: vec![m, k],
            name: "mapped".into(),
        };
        let be = CpuBackend::new(be_dt);
        let w = be.load_weight(&[src]).unwrap();
        let mut out = vec![0.0; n * m];
        be.matmul(&mut out, &x, &w, MatMul { n, k, m }).unwrap();
        let mut wr = wv.clone();
        DType::BF16.round_slice(&mut wr);
        let e = naive(&x, &wr, n, k, m);
        for (&o, &ev) in out.iter().zip(&e) {
            let tol = if be_dt == DType::F32 {
                1e-5
            } else {
                ev.abs() * 2f64.powi(-8) + 1e-5
            };
            assert!(
                (o as f64 - ev).abs() <= tol,
                "{file_dt}->{be_dt}: {o} vs {ev}"
            );
        }
        results.push(out);
        // Bad byte range: an error naming the tensor.
        let bad = WeightSource::Mapped {
            mmap: Arc::new(unsafe {
                memmap2::Mmap::map(&std::fs::File::open(&path).unwrap()).unwrap()
            }),
            start: 6,
            end: 6 + m * k * file_dt.size() + 2,
            dtype: file_dt,
            shape: vec![m, k],
            name: "short".into(),
        };
        let err = be.load_weight(&[bad]).unwrap_err();
        assert!(err.to_string().contains("short"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- attention

/// Three tokens of one head with HD 2: queries [2,0], [0,0], [0,0]; keys [1,0], [0,0],
/// [−1,0]; values `v`.
fn attn_qkv(v: &[[f32; 2]; 3]) -> Vec<f32> {
    let q = [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]];
    let k = [[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]];
    q.iter()
        .zip(&k)
        .zip(v)
        .flat_map(|((a, b), c)| a.iter().chain(b).chain(c).copied())
        .collect()
}

/// `b` rows of three tokens, one head of HD 2.
fn attn_shape(b: usize) -> AttnShape {
    AttnShape::new(b, 3, 1, 1, 2)
}

/// One head, HD 2, three tokens. Query 0 = [2, 0]; keys [1,0], [0,0], [−1,0]: scores
/// 2/√2·[1, 0, −1] = [√2, 0, −√2]; values [1,0], [0,1], [0,0].
#[test]
fn attention_is_bidirectional_with_known_values() {
    let be = CpuBackend::new(DType::F32);
    let s = attn_shape(1);
    let qkv = attn_qkv(&[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]);
    let mut out = vec![0.0; 6];
    be.attention(&mut out, &qkv, None, s).unwrap();
    let r2 = 2f64.sqrt();
    let z = r2.exp() + 1.0 + (-r2).exp();
    let e0 = [r2.exp() / z, 1.0 / z];
    assert!(
        (out[0] as f64 - e0[0]).abs() < 1e-6 && (out[1] as f64 - e0[1]).abs() < 1e-6,
        "{out:?} vs {e0:?}"
    );
    // Query 1 = 0: uniform weights, mean of the values.
    assert!((out[2] - 1.0 / 3.0).abs() < 1e-6 && (out[3] - 1.0 / 3.0).abs() < 1e-6);
    // Not causal: a later key's value changes query 0's output.
    let qkv2 = attn_qkv(&[[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]]);
    let mut out2 = vec![0.0; 6];
    be.attention(&mut out2, &qkv2, None, s).unwrap();
    let want = e0[0] + 5.0 * (-r2).exp() / z;
    assert!(
        (out2[0] as f64 - want).abs() < 1e-6,
        "{} vs {want}",
        out2[0]
    );
}

#[test]
fn attention_key_mask_and_fully_masked_rows() {
    let be = CpuBackend::new(DType::F32);
    let s = attn_shape(2);
    let row = attn_qkv(&[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]);
    let qkv: Vec<f32> = row.iter().chain(&row).copied().collect();
    // Batch row 0: key 2 masked; batch row 1: all keys masked.
    let kv = vec![1, 1, 0, 0, 0, 0];
    let mut out = vec![f32::NAN; 12];
    be.attention(&mut out, &qkv, Some(&kv), s).unwrap();
    let r2 = 2f64.sqrt();
    let z = r2.exp() + 1.0;
    assert!((out[0] as f64 - r2.exp() / z).abs() < 1e-6 && (out[1] as f64 - 1.0 / z).abs() < 1e-6);
    assert_eq!(
        &out[6..],
        &[0.0; 6],
        "fully masked key set is defined as a zero output"
    );
}

/// Grouped heads: NH 2 sharing one KV head see the same keys.
#[test]
fn attention_gqa_shares_kv_heads() {
    let be = CpuBackend::new(DType::F32);
    let (t, nh, nkv, hd) = (4, 2, 1, 4);
    let w = (nh + 2 * nkv) * hd;
    let mut qkv = values(t * w, 9);
    for i in 0..t {
        let (a, b) = qkv[i * w..].split_at_mut(hd);
        b[..hd].copy_from_slice(&a[..hd]); // head 1 query = head 0 query
    }
    let mut out = vec![0.0; t * nh * hd];
    be.attention(&mut out, &qkv, None, AttnShape::new(1, t, nh, nkv, hd))
        .unwrap();
    for i in 0..t {
        assert_eq!(
            out[i * 2 * hd..i * 2 * hd + hd],
            out[i * 2 * hd + hd..(i + 1) * 2 * hd]
        );
    }
}

// ---------------------------------------------------------------- SwiGLU, embedding, gather

/// silu(1.5) = 1.5/(1+e^−1.5) = 1.2263617 → bf16 (ulp 2⁻⁷) 157/128 = 1.2265625;
/// ·3 = 3.6796875 = 235.5 ulps of 2⁻⁶ → ties to even 236 → 3.6875.
/// Without the intermediate rounding: 3.6790851 → 235.46 → 3.671875.
#[test]
fn swiglu_rounds_silu_before_the_product() {
    let be = CpuBackend::new(DType::BF16);
    let mut out = vec![0.0; 2];
    // gate_up row: [gate (F = 2) | up (F = 2)]
    be.swiglu(&mut out, &vec![1.5, 0.0, 3.0, 9.0], Rows { n: 1, c: 2 })
        .unwrap();
    assert_eq!(out, vec![3.6875, 0.0]);
    let be32 = CpuBackend::new(DType::F32);
    be32.swiglu(&mut out, &vec![1.5, -2.0, 3.0, 0.5], Rows { n: 1, c: 2 })
        .unwrap();
    let silu = |g: f64| g / (1.0 + (-g).exp());
    assert!((out[0] as f64 - 3.0 * silu(1.5)).abs() < 1e-6);
    assert!((out[1] as f64 - 0.5 * silu(-2.0)).abs() < 1e-6);
}

#[test]
fn embedding_and_gather_rows() {
    let be = CpuBackend::new(DType::F32);
    let wte = weight(&be, &[3, 2], vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    let mut x = vec![0.0; 8];
    be.embedding(&mut x, &wte, Gather::new(&vec![2, 0, 1, 2], 4, 2))
        .unwrap();
    assert_eq!(x, vec![20.0, 21.0, 0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
    let mut g = vec![0.0; 4];
    be.gather_rows(&mut g, &x, Gather::new(&vec![2, 0], 2, 2))
        .unwrap();
    assert_eq!(g, vec![10.0, 11.0, 20.0, 21.0]);
    let e = be
        .embedding(&mut x, &wte, Gather::new(&vec![3, 0, 0, 0], 4, 2))
        .unwrap_err();
    assert!(e.to_string().contains("ids[0] = 3"), "{e}");
    let e = be
        .gather_rows(&mut g, &x, Gather::new(&vec![4, 0], 2, 2))
        .unwrap_err();
    assert!(e.to_string().contains("rows[0] = 4"), "{e}");
}

// ---------------------------------------------------------------- select

#[test]
fn select_greedy_and_cfg() {
    let be = CpuBackend::new(DType::F32);
    let v = 4;
    // Row 0 conditional [1, 1.5, 0, 0], row 1 [0, 0, 3, 0].
    let cond = [1.0f32, 1.5, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0];
    let p = SelectParams {
        remasking: Remasking::LowConfidence,
        ..Default::default()
    };
    // Token and confidence of the 2 rows (keys (0, 5), (0, 6)).
    let select = |logits: &mut Vec<f32>, p: &SelectParams| {
        let (mut tok, mut conf) = (vec![0; 2], vec![0.0; 2]);
        let r = be.select(
            SelectIo::new(&mut tok, &mut conf, logits, &vec![0, 5, 0, 6]),
            HeadDims { r: 2, v },
            p,
        );
        r.map(|()| (tok, conf))
    };
    let (tok, conf) = select(&mut cond.to_vec(), &p).unwrap();
    assert_eq!(tok, vec![1, 2]);
    let z0 = 1f64.exp() + 1.5f64.exp() + 2.0;
    assert!((conf[0] as f64 - 1.5f64.exp() / z0).abs() < 1e-6);
    let z1 = 3f64.exp() + 3.0;
    assert!((conf[1] as f64 - 3f64.exp() / z1).abs() < 1e-6);

    // CFG scale 1: logits = un + 2·(cond − un). Row 0 uncond [0, 1.5, 0, 0] → [2, 1.5, 0, 0]:
    // guidance flips the winner to token 0.
    let pc = SelectParams {
        cfg_scale: 1.0,
        ..p.clone()
    };
    let mut logits: Vec<f32> = cond
        .iter()
        .chain(&[0.0, 1.5, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0])
        .copied()
        .collect();
    let (tok, conf) = select(&mut logits, &pc).unwrap();
    assert_eq!(tok, vec![0, 2]);
    let z0 = 2f64.exp() + 1.5f64.exp() + 2.0;
    assert!(
        (conf[0] as f64 - 2f64.exp() / z0).abs() < 1e-6,
        "{}",
        conf[0]
    );
    assert!((conf[1] as f64 - 3f64.exp() / z1).abs() < 1e-6);
    // CFG needs 2R rows of logits.
    assert!(select(&mut cond.to_vec(), &pc).is_err());
}

// ---------------------------------------------------------------- padding invariance

fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        d_model: 32,
        n_heads: 4,
        n_kv_heads: 2,
        n_layers: 2,
        mlp_hidden_size: 48,
        vocab_size: 50,
        embedding_size: 50,
        max_sequence_length: 32,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        mask_token_id: 49,
        eos_token_id: 1,
        pad_token_id: 1,
    }
}

fn tiny_model(dtype: DType) -> Model<CpuBackend> {
    let cfg = tiny_cfg();
    Model::load(CpuBackend::new(dtype), cfg, |name| {
        let seed = name
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(131).wrapping_add(b as u64));
        let shape = match name.rsplit('.').nth(1).unwrap_or("") {
            "wte" | "ff_out" if !name.contains("blocks") => vec![50, 32],
            "attn_norm" | "ff_norm" | "ln_f" => {
                return Ok(WeightSource::Const {
                    value: 1.0,
                    dtype,
                    shape: vec![32],
                    name: name.into(),
                })
            }
            "q_proj" => vec![32, 32],
            "k_proj" | "v_proj" => vec![16, 32],
            "attn_out" => vec![32, 32],
            "ff_proj" | "up_proj" => vec![48, 32],
            "ff_out" => vec![32, 48],
            other => anyhow::bail!("unexpected tensor {name} ({other})"),
        };
        let std = if name.contains("wte") { 1.0 } else { 0.3 };
        Ok(WeightSource::Random {
            seed,
            std,
            dtype,
            shape,
            name: name.into(),
        })
    })
    .unwrap()
}

/// The real tokens of a left-padded batch row give the same logits as the unpadded sequence.
///
/// Why not bit-exact: positions are absolute (padding not compensated), so the padded row's
/// tokens sit 3 positions later and RoPE uses different table entries. The scores depend on
/// the relative offset only in exact arithmetic; in f32 each rotated q, k element carries
/// ≤ ~2 ulp (2⁻²³ relative) of rounding from its own cos/sin, so scores and everything after
/// differ at the 1e-6 relative level. We allow 1e-4 of the logit scale in f32. In bf16 the
/// rotated values are rounded to bf16 (2⁻⁹ relative) at different positions, so a rounding
/// flip can propagate through two layers: we allow 0.1 of the logit scale and require equal
/// argmax. A padding key that leaks into attention changes logits at the O(1) level and fails
/// both. Replacing the pad ids must change nothing at all (masked keys are skipped exactly).
#[test]
fn left_padding_invariance() {
    for (dt, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 0.1)] {
        let m = tiny_model(dt);
        let v = 50;
        let seq = [5u32, 17, 42, 49, 3];
        let mut ws = m.workspace(16, 16).unwrap();
        m.forward(&mut ws, Tokens::new(&seq, None, &[0, 1, 2, 3, 4]), 1, 5)
            .unwrap();
        let base = m.logits(&ws, 5).unwrap();
        let scale = base.iter().fold(0f32, |a, x| a.max(x.abs()));
        let run = |pad: u32, mask: bool, ws: &mut llada::engine::model::Workspace<CpuBackend>| {
            // Row 0: 3 pads + seq; row 1: an unrelated full-length sequence.
            let ids: Vec<u32> = [pad, pad, pad]
                .iter()
                .chain(&seq)
                .chain(&[9, 8, 7, 6, 5, 4, 3, 2])
                .copied()
                .collect();
            let kv: Vec<u8> = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1].to_vec();
            m.forward(
                ws,
                Tokens::new(&ids, mask.then_some(kv.as_slice()), &[3, 4, 5, 6, 7]),
                2,
                8,
            )
            .unwrap();
            m.logits(ws, 5).unwrap()
        };
        let padded = run(1, true, &mut ws);
        let worst = cmp::max_abs_diff(&padded, &base);
        eprintln!("{dt}: padded vs unpadded worst |diff| {worst}, logit scale {scale}");
        assert!(worst <= tol * scale, "{dt}: worst {worst} > {tol}·{scale}");
        for r in 0..5 {
            let am = |l: &[f32]| {
                (0..v)
                    .max_by(|&i, &j| l[i].total_cmp(&l[j]).then(j.cmp(&i)))
                    .unwrap()
            };
            assert_eq!(
                am(&padded[r * v..(r + 1) * v]),
                am(&base[r * v..(r + 1) * v]),
                "{dt} row {r}"
            );
        }
        let other_pad = run(30, true, &mut ws);
        assert_eq!(
            other_pad, padded,
            "{dt}: pad ids leaked through the key mask"
        );
        let unmasked = run(30, false, &mut ws);
        let leak = unmasked
            .iter()
            .zip(&padded)
            .fold(0f32, |a, (x, y)| cmp::nan_max(a, cmp::abs_diff(*x, *y)));
        eprintln!("{dt}: unmasked pads change logits by {leak}");
        assert!(
            leak > 2.0 * tol * scale,
            "{dt}: without the mask pads should matter ({leak})"
        );
    }
}

/// The comparison helpers every parity test uses (tests/common/cmp.rs): a NaN or an infinity
/// where the reference is finite fails any tolerance, where `f32::max` folds let it pass.
#[test]
fn comparison_helpers_fail_on_nan() {
    let want = [1.0f32, -2.0, 3.5, f32::NEG_INFINITY];
    let all_nan = [f32::NAN; 4];
    // What the old folds computed: NaN differences dropped, an all-NaN output "matches".
    let old = all_nan
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert_eq!(old, 0.0, "f32::max drops NaN (the reason for cmp)");
    assert_eq!(cmp::max_abs_diff(&all_nan, &want), f32::INFINITY);
    assert!(cmp::max_abs_diff(&all_nan, &want) > 1e30);
    let one_nan = [1.0f32, f32::NAN, 3.5, f32::NEG_INFINITY];
    assert_eq!(cmp::max_abs_diff(&one_nan, &want), f32::INFINITY);
    // A finite value where the reference masks (−∞), and +∞ for a finite reference.
    assert_eq!(cmp::abs_diff(0.0, f32::NEG_INFINITY), f32::INFINITY);
    assert_eq!(cmp::abs_diff(f32::INFINITY, 1.0), f32::INFINITY);
    // Equal masks and equal values are no difference; ordinary differences are exact.
    assert_eq!(cmp::max_abs_diff(&want, &want), 0.0);
    assert_eq!(cmp::abs_diff(1.5, 1.0), 0.5);
    assert_eq!(cmp::nan_max(0.25, f32::NAN), f32::INFINITY);
    assert_eq!(cmp::nan_max(f32::NAN, 0.0), f32::INFINITY);
    assert_eq!(cmp::max_abs(&[1.0, f32::NAN]), f32::INFINITY);
    assert_eq!(cmp::max_abs_diff(&[1.0], &[1.0, 2.0]), f32::INFINITY);
    assert_eq!(cmp::abs_diff64(f64::NAN, 0.0), f64::INFINITY);
}
