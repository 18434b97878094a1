//! `--dtype auto|bf16|f32`: the compute dtype chosen at load, whatever the checkpoint's.

mod common;

use std::path::Path;

use common::cli::{llada, ok_run as ok, tmpdir};

/// `llada forward` logits of ids 1..=12 as f32 values.
fn logits(model: &[&str], dtype: &str, out: &Path) -> Vec<f32> {
    ok(llada()
        .arg("forward")
        .args(model)
        .args(["--ids", "1,2,3,4,5,6,7,8,9,10,11,12", "--device", "cpu"])
        .args(["--dtype", dtype, "--out"])
        .arg(out));
    let bytes = std::fs::read(out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    let v: Vec<f32> = t
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(v.iter().all(|x| x.is_finite()), "NaN/inf logits");
    v
}

#[test]
fn dtype_converts_at_load() {
    let d = tmpdir("out");
    let bf = d.join("bf16");
    let f32_dir = d.join("f32");
    ok(llada().arg("init-tiny").arg(&bf).args(["--dtype", "bf16"]));
    ok(llada()
        .arg("init-tiny")
        .arg(&f32_dir)
        .args(["--dtype", "f32"]));
    let bf_s = bf.to_str().unwrap();
    let f32_s = f32_dir.to_str().unwrap();
    let o = d.join("l.safetensors");

    // The f32 checkpoint's values rounded to bf16 are the bf16 checkpoint's: computing it in
    // bf16 gives the bf16 checkpoint's logits bit for bit.
    let bf_auto = logits(&["--model", bf_s], "auto", &o);
    let bf_bf = logits(&["--model", bf_s], "bf16", &o);
    let f32_as_bf = logits(&["--model", f32_s], "bf16", &o);
    assert_eq!(bf_auto, bf_bf);
    assert_eq!(f32_as_bf, bf_auto);

    // The bf16 checkpoint computed in f32: the preset (random weights, converted on the host)
    // and the folder (mapped, converted while uploading) agree bit for bit, and differ from the
    // bf16 computation by bf16 rounding only.
    let bf_as_f32 = logits(&["--model", bf_s], "f32", &o);
    let preset_as_f32 = logits(&["--preset", "tiny"], "f32", &o);
    assert_eq!(bf_as_f32, preset_as_f32);
    assert_ne!(bf_as_f32, bf_auto, "f32 compute must not round like bf16");
    let max_diff = bf_as_f32
        .iter()
        .zip(&bf_auto)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = bf_as_f32.iter().map(|x| x.abs()).fold(0f32, f32::max);
    // bf16 has 8 significant bits: a few ulps (2^-8 relative) of the largest logit, through
    // two layers of bf16-rounded activations.
    assert!(max_diff <= scale * 0.05, "{max_diff} vs scale {scale}");

    // The label and info report the compute dtype; bad values are refused.
    let info = ok(llada().args(["info", "--model", bf_s, "--dtype", "f32"]));
    assert!(info.contains("weights dtype: bf16"), "{info}");
    assert!(info.contains("compute dtype: f32"), "{info}");
    let j = ok(llada().args([
        "generate",
        "--model",
        bf_s,
        "--prompt-ids",
        "5,6",
        "--gen-length",
        "4",
        "--steps",
        "4",
        "--block-length",
        "4",
        "--device",
        "cpu",
        "--dtype",
        "f32",
        "--format",
        "json",
    ]));
    assert!(j.contains("f32 compute"), "{j}");
    let bad = llada()
        .args(["info", "--model", bf_s, "--dtype", "f64"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--dtype"));
    let train = llada()
        .args([
            "grad", "--preset", "tiny", "--dtype", "bf16", "--ids", "1,2", "--masked", "1",
            "--p-mask", "0.5",
        ])
        .args(["--out", o.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!train.status.success());
    assert!(String::from_utf8_lossy(&train.stderr).contains("computes in f32"));
}
