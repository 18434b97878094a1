//! GPU parity of the FP8 path (`kernels/fp8_quant.cu`, `src/backend/cuda/fp8.rs`) against the CPU
//! reference `llada::quant::fp8`. **Never run yet: no GPU was available when it was written.**
//!
//! Tolerances:
//! - `fp8_quant_bf16`: **bit-exact** codes and scales (same IEEE division, same RNE saturating
//!   conversion); a NaN code may differ in its sign bit (0x7F on the GPU), both decode to NaN.
//! - FP8 GEMM: both sides multiply the same E4M3 values (exact in f32) and scale by the same f32
//!   scales; they differ in the accumulation. The CPU sums in f32 (≤ K·2^-24·Σ|t| from exact);
//!   Hopper's FP8 tensor cores keep about 14 mantissa bits in the accumulator between cuBLASLt's
//!   promotions to f32 (DeepSeek-V3 report §3.3.2), ≤ 2^-13·Σ|t|. With each side's bf16 output
//!   rounding (half an ulp): **|Δ| ≤ ulp(out) + (2^-13 + K·2^-24)·s_x·s_w·Σ_k |x̂_k ŵ_k|**.
//! - Whole tiny model, FP8 on the GPU vs FP8 on the CPU: every kernel is within its own parity
//!   bound, but a 1-ulp difference before an activation quantization can move an E4M3 rounding
//!   (2^-3 relative), so elementwise bounds do not compose; the test requires the GPU's FP8
//!   logits to be no farther from the CPU's FP8 logits than the CPU's FP8 logits are from its
//!   bf16 logits (relative RMS) — the flash-attention rule "at most the error of the low
//!   precision itself".
//!
//! Without a usable GPU every test prints `SKIP: <why>` and passes (`LLADA_REQUIRE_GPU=1` makes
//! that a failure). On a GPU that is neither sm_89 nor sm_90 the tests check the error instead.

mod common;

use llada::backend::cpu::CpuBackend;
use llada::backend::cuda::fp8 as cuda_fp8;
use llada::backend::cuda::CudaBackend;
use llada::backend::{Backend, MatMul};
use llada::engine::model::Model;
use llada::engine::model::Tokens;
use llada::hf::dtype::DType;
use llada::hf::presets;
use llada::quant::fp8::{self, e4m3_table, quantize_row_codes, Fp8Weight};

use common::{gpu, host_bf16 as host};

/// The GPU if it runs FP8; otherwise checks the refusal names the arch and returns `None`.
fn fp8_gpu() -> Option<CudaBackend> {
    let g = gpu()?;
    match cuda_fp8::check_arch(&g) {
        Ok(()) => Some(g),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("sm_89") && msg.contains("sm_90"), "{msg}");
            let w = Fp8Weight::quantize(&host("w", &[16, 16], rand_vec(1, 256, 1.0))).unwrap();
            let err = format!("{:#}", g.load_weight_fp8(&[w]).err().unwrap());
            assert!(err.contains("sm_89"), "{err}");
            eprintln!("SKIP: {msg}");
            None
        }
    }
}

fn rand_vec(tag: u64, len: usize, scale: f32) -> Vec<f32> {
    common::rand_bf16(0xF8, tag, len, scale)
}

fn upload(g: &CudaBackend, v: &[f32]) -> cudarc::driver::CudaSlice<half::bf16> {
    let b: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
    g.stream().clone_htod(&b).unwrap()
}

#[test]
fn fp8_quant_matches_cpu_bit_for_bit() {
    let Some(g) = fp8_gpu() else { return };
    for &(n, k) in &[(1usize, 16usize), (7, 1000), (33, 4096), (3, 5)] {
        let mut x = rand_vec(n as u64 * 31 + k as u64, n * k, 3.0);
        // Row 1 zero, row 2 with a NaN, row 0 with a huge value (saturation path).
        if n >= 3 {
            x[k..2 * k].fill(0.0);
            x[2 * k + k / 2] = f32::NAN;
            x[0] = 1e30;
        }
        let xd = upload(&g, &x);
        let (q, s) = cuda_fp8::quantize_act(&g, &xd, n, k).unwrap();
        for i in 0..n {
            let mut want = vec![0u8; k];
            let ws = quantize_row_codes(&x[i * k..(i + 1) * k], &mut want);
            assert!(
                s[i].to_bits() == ws.to_bits() || (s[i].is_nan() && ws.is_nan()),
                "[{n}, {k}] scale[{i}]: GPU {} vs CPU {ws}",
                s[i]
            );
            for j in 0..k {
                let (a, b) = (q[i * k + j], want[j]);
                let t = e4m3_table();
                assert!(
                    a == b || (t[a as usize].is_nan() && t[b as usize].is_nan()),
                    "[{n}, {k}] code[{i}, {j}]: GPU {a:#04x} vs CPU {b:#04x} (x = {})",
                    x[i * k + j]
                );
            }
        }
    }
}

#[test]
fn fp8_gemm_matches_cpu_reference() {
    let Some(g) = fp8_gpu() else { return };
    for &(n, k, m) in &[
        (1usize, 64usize, 48usize),
        (37, 4096, 1024),
        (300, 1024, 2 * 1376),
    ] {
        let parts = [
            host("a", &[m / 2, k], rand_vec(10 + k as u64, m / 2 * k, 0.05)),
            host(
                "b",
                &[m - m / 2, k],
                rand_vec(20 + k as u64, (m - m / 2) * k, 0.5),
            ),
        ];
        let w: Vec<Fp8Weight> = parts
            .iter()
            .map(|p| Fp8Weight::quantize(p).unwrap())
            .collect();
        let x = rand_vec(30 + n as u64, n * k, 2.0);
        let mut want = vec![0.0f32; n * m];
        fp8::matmul(DType::BF16, &mut want, &x, &w, MatMul { n, k, m }).unwrap();
        let gw = g.load_weight_fp8(&w).unwrap();
        let xd = upload(&g, &x);
        let mut od = g.alloc_act(n * m).unwrap();
        g.matmul(&mut od, &xd, &gw, MatMul { n, k, m }).unwrap();
        let got = g.read_act(&od, n * m).unwrap();
        let t = e4m3_table();
        let (mut worst, mut at) = (0.0f64, 0);
        for i in 0..n {
            let mut xq = vec![0u8; k];
            let sx = quantize_row_codes(&x[i * k..(i + 1) * k], &mut xq);
            let mut row = 0;
            for p in &w {
                for jl in 0..p.rows {
                    let j = row + jl;
                    let wc = &p.codes()[jl * k..(jl + 1) * k];
                    let abs: f64 = (0..k)
                        .map(|kk| (t[xq[kk] as usize] as f64 * t[wc[kk] as usize] as f64).abs())
                        .sum::<f64>()
                        * sx as f64
                        * p.scale()[jl] as f64;
                    let o = want[i * m + j] as f64;
                    let ulp = 2f64.powi(o.abs().max(1e-30).log2().floor() as i32 - 7);
                    let tol = ulp + (2f64.powi(-13) + k as f64 * 2f64.powi(-24)) * abs;
                    let d = (got[i * m + j] as f64 - o).abs();
                    assert!(
                        got[i * m + j].is_finite() && d <= tol,
                        "[{n},{k},{m}] out[{i}, {j}]: GPU {} vs CPU {o}, |Δ| {d:e} > {tol:e}",
                        got[i * m + j]
                    );
                    if d / tol > worst {
                        (worst, at) = (d / tol, i * m + j);
                    }
                }
                row += p.rows;
            }
        }
        eprintln!("[{n},{k},{m}] worst |Δ|/tol = {worst:.3} at {at}");
    }
}

#[test]
fn fp8_tiny_model_gpu_vs_cpu() {
    let Some(g) = fp8_gpu() else { return };
    let cfg = presets::preset_config("tiny").unwrap();
    let ck = presets::preset_checkpoint("tiny", 5, DType::BF16).unwrap();
    let get = |n: &str| ck.get(n).cloned();
    let get8 = |n: &str| llada::quant::fp8_weight(&ck, n);
    let ids: Vec<u32> = (0..48u32)
        .map(|i| {
            if i < 24 {
                i * 7 % 500
            } else {
                cfg.mask_token_id
            }
        })
        .collect();
    let t = ids.len();
    let rows: Vec<u32> = (0..t as u32).collect();
    let cpu8 = Model::load_fp8(CpuBackend::new(DType::BF16), cfg.clone(), get, get8).unwrap();
    let cpu16 = Model::load(CpuBackend::new(DType::BF16), cfg.clone(), get).unwrap();
    let gpu8 = Model::load_fp8(g, cfg.clone(), get, get8).unwrap();
    let run_cpu = |m: &Model<CpuBackend>| {
        let mut ws = m.workspace(t, t).unwrap();
        m.forward(&mut ws, Tokens::new(&ids, None, &rows), 1, t)
            .unwrap();
        m.logits(&ws, t).unwrap()
    };
    let a = run_cpu(&cpu8);
    let b = run_cpu(&cpu16);
    let mut ws = gpu8.workspace(t, t).unwrap();
    gpu8.forward(&mut ws, Tokens::new(&ids, None, &rows), 1, t)
        .unwrap();
    let c = gpu8.logits(&ws, t).unwrap();
    let rel = |x: &[f32], y: &[f32]| {
        let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    assert!(c.iter().all(|v| v.is_finite()));
    let (gpu_err, fp8_err) = (rel(&c, &a), rel(&a, &b));
    eprintln!("GPU FP8 vs CPU FP8 rel RMS {gpu_err:.4}; CPU FP8 vs CPU bf16 {fp8_err:.4}");
    assert!(gpu_err <= fp8_err, "{gpu_err} > {fp8_err}");
}
