//! FP8 (E4M3) inference on the CPU reference: the format at its edges and against ml_dtypes, the
//! per-channel / per-token quantized matmul against exact math with a derived bound, quantized
//! checkpoints (write, load, every validation error), `--weights fp8` at load, and the quality
//! of FP8 against bf16 and f32 on the tiny parity model.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use llada::backend::cpu::CpuBackend;
use llada::backend::{Backend, MatMul};
use llada::engine::device::DeviceChoice;
use llada::engine::{self, ModelSpec, Opened};
use llada::hf::checkpoint::{block_tensor, WeightSource, WTE};
use llada::hf::dtype::DType;
use llada::quant::fp8::{
    amax, e4m3_to_f32, f32_to_e4m3, matmul, quantize_row_values, round_e4m3, Fp8Weight, E4M3_MAX,
    E4M3_MIN_NORMAL, E4M3_MIN_SUBNORMAL,
};
use llada::quant::quality::{self, QualityInputs};
use llada::quant::{self, WeightsMode};

use common::cli::{
    bench, copy_dir, edit_json, err_of, fixture, llada, llada_out, ok, ok_json, read_json, run,
    TempDir,
};

// ---------------------------------------------------------------------------------------------
// The format.

#[test]
fn e4m3_zero_sign_max_and_saturation() {
    assert_eq!(f32_to_e4m3(0.0), 0x00);
    assert_eq!(f32_to_e4m3(-0.0), 0x80);
    assert_eq!(e4m3_to_f32(0x00).to_bits(), 0.0f32.to_bits());
    assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    assert_eq!(f32_to_e4m3(448.0), 0x7E);
    assert_eq!(f32_to_e4m3(-448.0), 0xFE);
    assert_eq!(e4m3_to_f32(0x7E), E4M3_MAX);
    // Saturation: beyond 448 (where round-to-nearest would reach 480 = the NaN pattern from
    // 464 on) and ±∞ clamp to ±448.
    for x in [448.5f32, 463.99, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
        assert_eq!(f32_to_e4m3(x), 0x7E, "{x}");
        assert_eq!(f32_to_e4m3(-x), 0xFE, "-{x}");
    }
}

#[test]
fn e4m3_nan() {
    assert_eq!(f32_to_e4m3(f32::NAN) & 0x7F, 0x7F);
    assert_eq!(f32_to_e4m3(-f32::NAN), 0xFF);
    assert!(e4m3_to_f32(0x7F).is_nan());
    assert!(e4m3_to_f32(0xFF).is_nan());
    // Exactly two NaN codes; everything else is finite.
    let nans = (0..=255u8).filter(|&c| e4m3_to_f32(c).is_nan()).count();
    assert_eq!(nans, 2);
    assert!(round_e4m3(f32::NAN).is_nan());
}

#[test]
fn e4m3_subnormals() {
    assert_eq!(E4M3_MIN_SUBNORMAL, 2f32.powi(-9));
    assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
    assert_eq!(e4m3_to_f32(0x08), E4M3_MIN_NORMAL);
    assert_eq!(f32_to_e4m3(2f32.powi(-9)), 0x01);
    // Half the smallest subnormal is a tie between 0 and 2^-9: to even, 0.
    assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
    assert_eq!(f32_to_e4m3(-(2f32.powi(-10))), 0x80);
    assert_eq!(f32_to_e4m3(2f32.powi(-10) * 1.0001), 0x01);
    // 1.5·2^-9 ties between codes 1 and 2: to even (2); 2.5·2^-9 between 2 and 3: 2.
    assert_eq!(f32_to_e4m3(1.5 * 2f32.powi(-9)), 0x02);
    assert_eq!(f32_to_e4m3(2.5 * 2f32.powi(-9)), 0x02);
    // 7.5·2^-9 ties between the largest subnormal (7) and the smallest normal (8): 8.
    assert_eq!(f32_to_e4m3(7.5 * 2f32.powi(-9)), 0x08);
    // f32 subnormals and tiny normals flush to (signed) zero.
    assert_eq!(f32_to_e4m3(1e-40), 0x00);
    assert_eq!(f32_to_e4m3(-1e-30), 0x80);
}

#[test]
fn e4m3_ties_to_even_in_normals() {
    assert_eq!(f32_to_e4m3(1.0), 0x38);
    // 1.0625 between 1.0 (m 0) and 1.125 (m 1): 1.0; 1.1875 between m 1 and m 2: 1.25.
    assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0);
    assert_eq!(e4m3_to_f32(f32_to_e4m3(1.1875)), 1.25);
    // 1.9375 between 1.875 (m 7) and 2.0: carries into the exponent, 2.0.
    assert_eq!(f32_to_e4m3(1.9375), 0x40);
    // Top binade: 400 between 384 (m 4) and 416 (m 5): 384; 432 between 416 and 448: 448.
    assert_eq!(e4m3_to_f32(f32_to_e4m3(400.0)), 384.0);
    assert_eq!(e4m3_to_f32(f32_to_e4m3(432.0)), 448.0);
    // Just off a tie goes to the nearer value.
    assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625f32.next_up())), 1.125);
    assert_eq!(e4m3_to_f32(f32_to_e4m3(1.1875f32.next_down())), 1.125);
}

#[test]
fn e4m3_every_code_round_trips() {
    for c in 0..=255u8 {
        let v = e4m3_to_f32(c);
        if v.is_nan() {
            continue;
        }
        assert_eq!(f32_to_e4m3(v), c, "code {c:#04x} = {v}");
    }
}

/// ml_dtypes' `float8_e4m3fn` (an independent implementation), recorded by
/// `tests/fixtures/make_fp8_fixture.py`: all 256 decodings and 4 030 conversions (every value,
/// every tie, one f32 ulp either side of each tie, random values of both signs, below 464).
#[test]
fn e4m3_matches_ml_dtypes() {
    let text = std::fs::read_to_string(fixture("fp8_e4m3.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let decode = v["decode"].as_array().unwrap();
    assert_eq!(decode.len(), 256);
    for (c, bits) in decode.iter().enumerate() {
        let want = f32::from_bits(bits.as_u64().unwrap() as u32);
        let got = e4m3_to_f32(c as u8);
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "decode {c:#04x}: {got} vs ml_dtypes {want}"
        );
    }
    let encode = v["encode"].as_array().unwrap();
    assert!(encode.len() > 4000);
    for e in encode {
        let x = f32::from_bits(e[0].as_u64().unwrap() as u32);
        let want = e[1].as_u64().unwrap() as u8;
        assert_eq!(
            f32_to_e4m3(x),
            want,
            "encode {x:e} ({:#010x}): ml_dtypes gives {want:#04x}",
            x.to_bits()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Scales and the quantized matmul.

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[test]
fn row_quantization_uses_the_whole_range() {
    let x = [0.5f32, -3.0, 0.001, 2.0, 0.0];
    let mut q = [0.0f32; 5];
    let s = quantize_row_values(&x, &mut q);
    assert_eq!(s, 3.0 / 448.0);
    assert_eq!(
        q[1], -448.0,
        "the amax element maps to the format's maximum"
    );
    // A zero row gets scale 1 and zero values; a NaN makes the scale NaN.
    let s0 = quantize_row_values(&[0.0; 4], &mut q[..4]);
    assert_eq!((s0, q[..4].iter().all(|&v| v == 0.0)), (1.0, true));
    assert!(amax(&[1.0, f32::NAN, 2.0]).is_nan());
}

fn host_weight(name: &str, rows: usize, cols: usize, seed: u64, scale_rows: bool) -> WeightSource {
    let mut r = lcg(seed);
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| {
            // Rows of very different magnitudes: per-channel scales must follow them.
            let m = if scale_rows {
                10f32.powi((i / cols) as i32 % 5 - 2)
            } else {
                1.0
            };
            DType::BF16.round(r() * m)
        })
        .collect();
    WeightSource::Host {
        data: Arc::new(data),
        dtype: DType::BF16,
        shape: vec![rows, cols],
        name: name.into(),
    }
}

/// The FP8 matmul against the exact product of the unquantized inputs, with a bound derived
/// from the format: an E4M3 value has relative error at most 2^-4 (half an ulp of a 3-bit
/// mantissa) when normal, absolute error at most 2^-10 (half the smallest subnormal) in units
/// of its scale when subnormal, so `|x̂ − x| ≤ e_x = max(2^-4·|x|, 2^-10·s_x)` (likewise `w`),
/// and `|x̂ŵ − xw| ≤ e_x·(|w| + e_w) + |x|·e_w`. Summed over K and plus the f32 accumulation
/// (≤ K·2^-24·Σ|x̂ŵ|) and the bf16 output rounding (half an ulp of an 8-bit significand, 2^-8
/// relative: ≤ 2^-8·(|exact| + bound)).
/// Also checks the same math computed in f64 on the quantized values (accumulation order only).
#[test]
fn matmul_fp8_within_the_derived_bound() {
    let (n, k) = (5, 67);
    let parts = [
        host_weight("a", 7, k, 1, true),
        host_weight("b", 9, k, 2, false),
    ];
    let m = 16;
    let w: Vec<Fp8Weight> = parts
        .iter()
        .map(|p| Fp8Weight::quantize(p).unwrap())
        .collect();
    let mut r = lcg(3);
    let mut x: Vec<f32> = (0..n * k).map(|_| DType::BF16.round(r() * 4.0)).collect();
    x[3] = 0.0;
    let mut out = vec![0.0f32; n * m];
    matmul(DType::BF16, &mut out, &x, &w, MatMul { n, k, m }).unwrap();
    let wv: Vec<f32> = parts
        .iter()
        .flat_map(|p| {
            let mut v = vec![0.0; p.numel()];
            p.read_range(0, p.numel(), &mut v);
            v
        })
        .collect();
    let mut wdq = vec![0.0f32; m * k];
    let mut row = 0;
    for p in &w {
        for j in 0..p.rows {
            p.dequant_row(j, &mut wdq[(row + j) * k..(row + j + 1) * k]);
        }
        row += p.rows;
    }
    let sw: Vec<f32> = w.iter().flat_map(|p| p.scale().to_vec()).collect();
    let mut worst = 0.0f64;
    for i in 0..n {
        let xr = &x[i * k..(i + 1) * k];
        let mut xq = vec![0.0f32; k];
        let sx = quantize_row_values(xr, &mut xq);
        for j in 0..m {
            let wr = &wv[j * k..(j + 1) * k];
            let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mut bound = 0.0f64;
            let mut abs_q = 0.0f64;
            let mut same = 0.0f64;
            for kk in 0..k {
                let (a, b) = (xr[kk] as f64, wr[kk] as f64);
                let ex = (a.abs() / 16.0).max(sx as f64 / 1024.0);
                let ew = (b.abs() / 16.0).max(sw[j] as f64 / 1024.0);
                bound += ex * (b.abs() + ew) + a.abs() * ew;
                let xqv = xq[kk] as f64 * sx as f64;
                abs_q += (xqv * wdq[j * k + kk] as f64).abs();
                same += xq[kk] as f64 * (wdq[j * k + kk] as f64 / sw[j] as f64);
            }
            bound += k as f64 * 2f64.powi(-24) * abs_q;
            bound += 2f64.powi(-8) * (exact.abs() + bound);
            let got = out[i * m + j] as f64;
            assert!(got.is_finite(), "out[{i}, {j}] = {got}");
            let err = (got - exact).abs();
            worst = worst.max(err / bound);
            assert!(
                err <= bound,
                "out[{i}, {j}] = {got}, exact {exact}: error {err:e} > derived bound {bound:e}"
            );
            // The same quantized math in f64: only the f32 accumulation order and the final
            // rounding differ (K·2^-24 relative to Σ|terms|, plus 2^-8 of the value).
            let same = same * sx as f64 * sw[j] as f64;
            let tol = k as f64 * 2f64.powi(-24) * abs_q + 2f64.powi(-8) * same.abs() + 1e-30;
            assert!(
                (got - same).abs() <= tol,
                "out[{i}, {j}] = {got}, f64 of the quantized values {same}: > {tol:e}"
            );
        }
    }
    assert!(worst > 0.0);
}

#[test]
fn matmul_fp8_propagates_nan_per_token() {
    let (n, k, m) = (3, 16, 4);
    let w = vec![Fp8Weight::quantize(&host_weight("w", m, k, 5, false)).unwrap()];
    let mut x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
    x[k + 3] = f32::NAN;
    let mut out = vec![0.0f32; n * m];
    matmul(DType::BF16, &mut out, &x, &w, MatMul { n, k, m }).unwrap();
    assert!(out[..m].iter().all(|v| v.is_finite()));
    assert!(
        out[m..2 * m].iter().all(|v| v.is_nan()),
        "{:?}",
        &out[m..2 * m]
    );
    assert!(out[2 * m..].iter().all(|v| v.is_finite()));
    // An infinite activation is not representable either: its token is NaN too.
    x[k + 3] = f32::INFINITY;
    matmul(DType::BF16, &mut out, &x, &w, MatMul { n, k, m }).unwrap();
    assert!(out[m..2 * m].iter().all(|v| v.is_nan()));
}

#[test]
fn quantize_refuses_non_finite_weights_and_checks_shapes() {
    let mut data = vec![0.5f32; 12];
    data[7] = f32::INFINITY;
    let src = WeightSource::Host {
        data: Arc::new(data),
        dtype: DType::F32,
        shape: vec![3, 4],
        name: "blk.w".into(),
    };
    let e = format!("{:#}", Fp8Weight::quantize(&src).unwrap_err());
    assert!(e.contains("`blk.w`") && e.contains("[1, 3]"), "{e}");
    let w = Fp8Weight::quantize(&host_weight("w", 4, 8, 1, false)).unwrap();
    let mut out = vec![0.0f32; 10];
    let e = format!(
        "{:#}",
        matmul(
            DType::BF16,
            &mut out,
            &[0.0; 16],
            &[w],
            MatMul { n: 2, k: 8, m: 5 }
        )
        .unwrap_err()
    );
    assert!(e.contains("M = 5"), "{e}");
}

#[test]
fn cpu_backend_fp8_weight_matches_the_reference_and_other_backends_refuse() {
    let be = CpuBackend::new(DType::BF16);
    let parts = [
        host_weight("q", 6, 32, 7, true),
        host_weight("k", 2, 32, 8, false),
    ];
    let w: Vec<Fp8Weight> = parts
        .iter()
        .map(|p| Fp8Weight::quantize(p).unwrap())
        .collect();
    let bw = be.load_weight_fp8(&w).unwrap();
    let x: Vec<f32> = (0..3 * 32)
        .map(|i| DType::BF16.round((i as f32).cos()))
        .collect();
    let mut a = vec![0.0f32; 3 * 8];
    let mut b = vec![0.0f32; 3 * 8];
    be.matmul(&mut a, &x, &bw, MatMul { n: 3, k: 32, m: 8 })
        .unwrap();
    matmul(DType::BF16, &mut b, &x, &w, MatMul { n: 3, k: 32, m: 8 }).unwrap();
    assert_eq!(a, b);
    // A column mismatch between parts names the tensors.
    let bad = [
        w[0].clone(),
        Fp8Weight::quantize(&host_weight("z", 2, 16, 9, false)).unwrap(),
    ];
    let e = format!("{:#}", be.load_weight_fp8(&bad).unwrap_err());
    assert!(e.contains("`z`") && e.contains("`q`"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Quantized checkpoints.

/// The tiny preset as a bf16 folder and its FP8 copy.
fn tiny_pair() -> (TempDir, PathBuf, PathBuf) {
    let t = TempDir::new("pair");
    let src = t.path().join("bf16");
    let out = t.path().join("fp8");
    engine::init_tiny(&src, 3, DType::BF16, 1).unwrap();
    let opened = Opened::open(&ModelSpec::Dir(src.clone())).unwrap();
    let s = quant::quantize_folder(&opened.ckpt, &opened.cfg, Some(&src), &out).unwrap();
    assert_eq!((s.quantized, s.kept), (2 * 7, 2 * 2 + 3));
    (t, src, out)
}

#[test]
fn quantized_folder_loads_and_equals_quantizing_at_load() {
    let (_t, src, out) = tiny_pair();
    let q = Opened::open(&ModelSpec::Dir(out.clone())).unwrap();
    assert!(q.ckpt.has_fp8());
    assert!(q.ckpt.ignored().is_empty(), "{:?}", q.ckpt.ignored());
    assert!(out.join("tokenizer.json").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "fp8");
    assert_eq!(cfg["quantization_config"]["activation_scheme"], "dynamic");
    // The folder is smaller: 1 byte + 4/K bytes per linear weight instead of 2.
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&out) < size(&src) * 3 / 4,
        "{} vs {}",
        size(&out),
        size(&src)
    );

    let ids: Vec<u32> = vec![1, 2, 3, 4, 5, 502, 502, 502];
    let (mut e_q, _) = engine::load(&q, DeviceChoice::Cpu).unwrap();
    assert!(e_q.device().contains("fp8"), "{}", e_q.device());
    let mut o = Opened::open(&ModelSpec::Dir(src.clone())).unwrap();
    o.weights = WeightsMode::Fp8;
    let (mut e_l, _) = engine::load(&o, DeviceChoice::Cpu).unwrap();
    let a = e_q.forward_logits(&ids).unwrap();
    let b = e_l.forward_logits(&ids).unwrap();
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(
        a, b,
        "stored FP8 and FP8 quantized at load must be bit-identical"
    );
    o.weights = WeightsMode::Checkpoint;
    let (mut e_b, _) = engine::load(&o, DeviceChoice::Cpu).unwrap();
    let c = e_b.forward_logits(&ids).unwrap();
    assert_ne!(a, c, "FP8 must actually change the math");
    // Commands that need the unquantized tensors say why they cannot read them.
    let e = format!("{:#}", q.ckpt.get(&block_tensor(1, "ff_out")).unwrap_err());
    assert!(e.contains("F8_E4M3") && e.contains("bf16 folder"), "{e}");
    // A quantized folder cannot be quantized again.
    let e = format!(
        "{:#}",
        quant::quantize_folder(&q.ckpt, &q.cfg, Some(&out), &out.join("x")).unwrap_err()
    );
    assert!(e.contains("already"), "{e}");
}

/// A safetensors entry: name, dtype, shape, bytes.
type Tensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrite `dir/model.safetensors` through `f(name, dtype, shape, bytes)`, which returns the
/// new entry or `None` to drop it.
fn rewrite(dir: &Path, f: impl Fn(&str, safetensors::Dtype, &[usize], &[u8]) -> Option<Tensor>) {
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, v) in st.tensors() {
        if let Some(e) = f(&name, v.dtype(), v.shape(), v.data()) {
            out.push(e);
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None).unwrap();
    std::fs::write(&p, data).unwrap();
}

fn open_err(dir: &Path) -> String {
    match Opened::open(&ModelSpec::Dir(dir.to_path_buf())) {
        Ok(o) => match engine::load(&o, DeviceChoice::Cpu) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => format!("{e:#}"),
        },
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn quantized_folder_errors_name_the_tensor() {
    let (t, _src, out) = tiny_pair();
    let q0 = block_tensor(0, "q_proj");
    let scale = format!("{q0}_scale");
    let case = |tag: &str| {
        let d = t.path().join(tag);
        copy_dir(&out, &d);
        d
    };
    let keep = |n: &str, d: safetensors::Dtype, s: &[usize], b: &[u8]| {
        Some((n.to_string(), d, s.to_vec(), b.to_vec()))
    };

    // Each case rewrites the quantized tensors; the error names the tensor and the fault.
    type Edit<'a> = Box<dyn Fn(&str, safetensors::Dtype, &[usize], &[u8]) -> Option<Tensor> + 'a>;
    let set_scale = |bad: f32| -> Edit {
        let scale = &scale;
        Box::new(move |n, dt, s, b| {
            let mut b = b.to_vec();
            if n == scale {
                b[4..8].copy_from_slice(&bad.to_le_bytes());
            }
            keep(n, dt, s, &b)
        })
    };
    let scale_named = format!("`{scale}`");
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        // A negative, a zero, a NaN and an infinite scale.
        ("neg", set_scale(-1.0), vec![&scale_named, "scale[1]"]),
        ("zero", set_scale(0.0), vec![&scale_named, "scale[1]"]),
        ("nan", set_scale(f32::NAN), vec![&scale_named, "scale[1]"]),
        (
            "inf",
            set_scale(f32::INFINITY),
            vec![&scale_named, "scale[1]"],
        ),
        // A missing scale.
        (
            "noscale",
            Box::new(|n, dt, s, b| (n != scale).then(|| keep(n, dt, s, b)).flatten()),
            vec![&scale_named, "missing"],
        ),
        // A scale of the wrong shape.
        (
            "scaleshape",
            Box::new(|n, dt, s, b| {
                let s = if n == scale {
                    vec![1, s[0]]
                } else {
                    s.to_vec()
                };
                keep(n, dt, &s, b)
            }),
            vec![&scale_named, "[128, 1]"],
        ),
    ];
    // An E4M3 NaN code inside a weight.
    let q0_named = format!("`{q0}`");
    let nan_code: Edit = Box::new(|n, dt, s, b| {
        let mut b = b.to_vec();
        if n == q0 {
            b[130] = 0x7F;
        }
        keep(n, dt, s, &b)
    });
    // The embedding in FP8: not allowed.
    let wte_named = format!("`{WTE}`");
    let fp8_wte: Edit = Box::new(|n, dt, s, b| {
        if n == WTE {
            let codes: Vec<u8> = b.chunks(2).map(|_| 0x38).collect();
            keep(n, safetensors::Dtype::F8_E4M3, s, &codes)
        } else {
            keep(n, dt, s, b)
        }
    });
    let cases = cases.into_iter().chain([
        ("nancode", nan_code, vec![&q0_named, "NaN", "row 1"]),
        ("wte", fp8_wte, vec![&wte_named, "only the linear layers"]),
    ]);
    for (tag, edit, want) in cases {
        let d = case(tag);
        rewrite(&d, &*edit);
        let e = open_err(&d);
        for w in want {
            assert!(e.contains(w), "{tag}: {e}");
        }
    }
    // FP8 tensors without a quantization_config, and a config naming another method.
    let d = case("nocfg");
    edit_json(&d.join("config.json"), |o| {
        o.remove("quantization_config");
    });
    let e = open_err(&d);
    assert!(e.contains("no `quantization_config`"), "{e}");
    for (key, val, needle) in [
        (
            "quant_method",
            serde_json::json!("gptq"),
            "quant_method = \"gptq\"",
        ),
        (
            "weight_block_size",
            serde_json::json!([128, 128]),
            "weight_block_size",
        ),
        (
            "activation_scheme",
            serde_json::json!("static"),
            "activation_scheme = \"static\"",
        ),
        ("fmt", serde_json::json!("e5m2"), "fmt = \"e5m2\""),
    ] {
        let d = case(&format!("cfg-{key}"));
        edit_json(&d.join("config.json"), |o| {
            o["quantization_config"][key] = val;
        });
        let e = open_err(&d);
        assert!(e.contains(needle), "{key}: {e}");
    }
    // A bf16 folder that claims to be quantized.
    let d = case("claims");
    let src_cfg = std::fs::read_to_string(_src.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&src_cfg).unwrap();
    cfg["quantization_config"] = serde_json::from_str(quant::QUANTIZATION_CONFIG).unwrap();
    std::fs::copy(_src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = open_err(&d);
    assert!(e.contains("0 of the 14 linear"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Quality on the tiny parity model (random weights, 2 layers, C 64, F 96, V 200).

/// FP8 against bf16 and f32 on the committed parity model, f32 weights as the reference.
///
/// Bounds, derived:
/// - Logits, relative RMS error of FP8 vs f32. E4M3 rounding has relative error ≤ 2^-4, for a
///   uniform rounding error RMS 2^-4/√3 ≈ 0.036 per operand, so ≈ √2·0.036 ≈ 0.051 per product
///   and, errors being independent across K, the same relative RMS for a dot product. The model
///   runs 4 linear layers in series per block (qkv, attn_out, gate_up, down) and L = 2 blocks;
///   adding the per-layer errors linearly (no cancellation, no damping by the residual stream)
///   gives at most 4·L·0.051 ≈ 0.41. Measured: see the README (CPU) — well under.
/// - bf16 vs f32: the same argument with 2^-8 (bf16's unit roundoff) is ≈ 0.026 for the chain; FP8 must
///   be worse than bf16 (else the FP8 path did not run) and at most 0.41.
/// - Argmax flips: a position's argmax can change only where the reference's top-2 margin is at
///   most 2·max|Δlogit| (each of the two logits moves by at most max|Δ|). Checked exactly on the
///   logits inside `flips_only_at_near_ties`.
/// - Log-likelihood: upstream's estimate is a mean over samples of (T/l)·Σ_masked log p; a
///   log-softmax moves by at most 2·‖Δlogits‖∞ per position, so |Δ loglik| ≤ 2·T·max|Δlogit|
///   per pair, T the answer length (8). max|Δlogit| is measured on other inputs of the same
///   length and distribution, so a factor 2 of slack is allowed on it.
#[test]
fn fp8_quality_on_the_parity_model() {
    let dir = fixture("parity/f32");
    let o = Opened::open(&ModelSpec::Dir(dir)).unwrap();
    let inp = QualityInputs::random(&o.cfg, 4, 32, 7);
    let r = quality::measure(&o.cfg, &o.ckpt, &inp).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    let l = o.cfg.n_layers as f64;
    let per_matmul = 2f64.sqrt() * 2f64.powi(-4) / 3f64.sqrt();
    let bound = 4.0 * l * per_matmul;
    for (what, p) in [
        ("fp8_vs_f32", &r.fp8_vs_f32),
        ("fp8_vs_bf16", &r.fp8_vs_bf16),
    ] {
        assert!(
            p.logits.rel_rms.is_finite() && p.logits.rel_rms <= bound,
            "{what}: logits relative RMS error {} > derived bound {bound}",
            p.logits.rel_rms
        );
        let ll_bound = 2.0 * 8.0 * 2.0 * p.logits.max_abs;
        assert!(
            p.loglik_abs_diff_max.is_finite() && p.loglik_abs_diff_max <= ll_bound,
            "{what}: |Δ loglik| {} > {ll_bound}",
            p.loglik_abs_diff_max
        );
        assert!((0.0..=1.0).contains(&p.greedy_agree));
    }
    assert!(r.bf16_vs_f32.logits.rel_rms < r.fp8_vs_f32.logits.rel_rms);
    assert!(r.bf16_vs_f32.logits.rel_rms <= 4.0 * l * 2f64.sqrt() * 2f64.powi(-8) / 3f64.sqrt());
    assert_eq!(r.positions, 4 * 32);
}

/// Every argmax that FP8 changes is a near-tie of the bf16 logits (margin ≤ 2·max|Δ|).
#[test]
fn flips_only_at_near_ties() {
    let dir = fixture("parity/bf16");
    let mut o = Opened::open(&ModelSpec::Dir(dir)).unwrap();
    let inp = QualityInputs::random(&o.cfg, 4, 32, 11);
    let (mut b16, _) = engine::load(&o, DeviceChoice::Cpu).unwrap();
    o.weights = WeightsMode::Fp8;
    let (mut f8, _) = engine::load(&o, DeviceChoice::Cpu).unwrap();
    let v = o.cfg.embedding_size;
    let mut flips = 0;
    for s in &inp.seqs {
        let a = b16.forward_logits(s).unwrap();
        let b = f8.forward_logits(s).unwrap();
        let max_d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(b.iter().all(|x| x.is_finite()));
        for (ra, rb) in a.chunks(v).zip(b.chunks(v)) {
            let am = |r: &[f32]| (0..v).fold(0, |bi, i| if r[i] > r[bi] { i } else { bi });
            let (ia, ib) = (am(ra), am(rb));
            if ia != ib {
                flips += 1;
                let margin = ra[ia] - ra[ib];
                assert!(
                    margin <= 2.0 * max_d,
                    "argmax {ia} -> {ib} with bf16 margin {margin} > 2·max|Δ| = {}",
                    2.0 * max_d
                );
            }
        }
    }
    eprintln!("argmax flips: {flips} of {} positions", 4 * 32);
}

// ---------------------------------------------------------------------------------------------
// The command line.

#[test]
fn cli_quantize_generate_and_bench() {
    let t = TempDir::new("cli");
    let (src, out) = (t.path().join("bf16"), t.path().join("fp8"));
    let (s, so) = (src.to_str().unwrap(), out.to_str().unwrap());
    ok(&llada_out(&["init-tiny", s]));
    ok(&llada_out(&[
        "quantize", "--model", s, "--out", so, "--scheme", "fp8",
    ]));
    let e = err_of(llada().args(["quantize", "--model", s, "--out", so, "--scheme", "int4"]));
    assert!(e.contains("only fp8"), "{e}");
    let gen = |model: &str, weights: &str| {
        let v = ok_json(
            llada()
                .args(["generate", "--model", model, "--weights", weights])
                .args(["--prompt-ids", "1,2,3", "--gen-length", "8", "--steps", "8"])
                .args(["--block-length", "8", "--device", "cpu", "--format", "json"]),
        );
        (v["ids"].clone(), v["device"].as_str().unwrap().to_string())
    };
    let (a, da) = gen(so, "checkpoint");
    let (b, db) = gen(s, "fp8");
    assert_eq!(a, b, "the FP8 folder and FP8 at load generate the same ids");
    assert!(da.contains("fp8") && db.contains("fp8"), "{da} / {db}");
    let e = err_of(
        llada()
            .args(["generate", "--model", s, "--weights", "int8"])
            .args(["--prompt-ids", "1", "--device", "cpu"]),
    );
    assert!(e.contains("--weights \"int8\""), "{e}");

    let json = t.path().join("bench.json");
    let stdout = ok(&run(bench()
        .args(["--device", "cpu", "--preset", "tiny", "--prompt-len", "8"])
        .args(["--gen-length", "8", "--block-length", "8", "--steps", "8"])
        .args(["--warmup", "0", "--weights", "checkpoint,fp8", "--json"])
        .arg(&json)));
    assert!(stdout.contains("weights fp8"), "{stdout}");
    let v = read_json(&json);
    let w: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["weights"].as_str().unwrap())
        .collect();
    assert_eq!(w, ["checkpoint", "fp8"]);
}
