//! End-to-end tests of the `llada` binary on the committed parity fixture (expected outputs
//! recorded by the independent PyTorch implementation in `tests/fixtures/make_fixture.py`) and
//! on the `tiny` preset written as a Hugging Face folder.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::cli::{err_of, f64s, ids_arg, llada, ok, ok_json, run, tmpdir, u64s};
use common::cmp;
use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    common::cli::fixture(&format!("parity/{p}"))
}

/// `llada generate --format json --device cpu --temperature 0` gives exactly the ids the
/// PyTorch reference recorded, for every recorded setting (steps/blocks, CFG, EOS rules, a
/// left-padded batch of two).
#[test]
fn generate_matches_pytorch_reference() {
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let cases = exp["generate"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let gen = case["gen_length"].as_u64().unwrap() as usize;
        let mut cmd = llada();
        cmd.args([
            "generate",
            "--format",
            "json",
            "--device",
            "cpu",
            "--temperature",
            "0",
        ])
        .arg("--model")
        .arg(fixture("f32"))
        .args(["--gen-length", &gen.to_string()])
        .args(["--steps", &case["steps"].to_string()])
        .args(["--block-length", &case["block_length"].to_string()])
        .args(["--cfg-scale", &case["cfg_scale"].to_string()]);
        if case["logits_eos_inf"].as_bool().unwrap() {
            cmd.arg("--logits-eos-inf");
        }
        if case["confidence_eos_eot_inf"].as_bool().unwrap() {
            cmd.arg("--confidence-eos-eot-inf");
        }
        let prompts = case["prompt"].as_array().unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let p = u64s(p);
            // Strip the left padding: the CLI pads (and masks) itself.
            let keep: Vec<u64> = match case["attention_mask"].as_array() {
                Some(m) => p
                    .iter()
                    .zip(m[i].as_array().unwrap())
                    .filter(|(_, k)| k.as_u64() == Some(1))
                    .map(|(x, _)| *x)
                    .collect(),
                None => p,
            };
            cmd.args(["--prompt-ids", &ids_arg(&keep)]);
        }
        let got = ok_json(&mut cmd);
        let want: Vec<Vec<u64>> = case["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let r = u64s(r);
                r[r.len() - gen..].to_vec()
            })
            .collect();
        let got_ids: Vec<Vec<u64>> = got["ids"].as_array().unwrap().iter().map(u64s).collect();
        assert_eq!(got_ids, want, "case {name}");
        let steps = case["steps"].as_u64().unwrap();
        assert_eq!(got["nfe"].as_u64().unwrap(), steps, "case {name}: nfe");
        assert_eq!(got["text"].as_array().unwrap().len(), prompts.len());
    }
}

/// Reads the `logits` tensor of a safetensors file written by `llada forward`.
fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header["logits"];
    assert_eq!(t["dtype"], "F32");
    let shape: Vec<usize> = u64s(&t["shape"]).iter().map(|&x| x as usize).collect();
    let off = t["data_offsets"].as_array().unwrap();
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    let data = &bytes[8 + n + a..8 + n + b];
    let v = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, v)
}

/// `llada forward` writes `logits` [1, T, V] equal to the reference: within 1e-4 relative error
/// (max |diff| / max |ref|) in f32; in bf16 within 4 ulps of the largest logit (different f32
/// summation order may flip a rounding; the fixture's own test measures 0).
#[test]
fn forward_matches_pytorch_reference() {
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let dir = tmpdir("forward");
    let mut checked = 0;
    for case in exp["logits"].as_array().unwrap() {
        if !case["key_valid"].is_null() || case["b"].as_u64() != Some(1) {
            continue;
        }
        let variant = case["variant"].as_str().unwrap();
        let ids = u64s(&case["ids"]);
        let t = ids.len();
        let out = dir.join(format!("{variant}.safetensors"));
        let o = run(llada()
            .args(["forward", "--device", "cpu", "--ids", &ids_arg(&ids)])
            .arg("--model")
            .arg(fixture(variant))
            .arg("--out")
            .arg(&out));
        ok(&o);
        let (shape, got) = read_logits(&out);
        let v = exp["config"]["embedding_size"].as_u64().unwrap() as usize;
        assert_eq!(shape, vec![1, t, v]);
        let rows: Vec<usize> = u64s(&case["rows"]).iter().map(|&x| x as usize).collect();
        let want: Vec<f32> = f64s(&case["logits"]).iter().map(|&x| x as f32).collect();
        let scale = cmp::max_abs(&want);
        assert!(scale.is_finite(), "{variant}: the reference has a NaN");
        let mut worst = 0f32;
        for (ri, &r) in rows.iter().enumerate() {
            // A NaN where the reference has none is an infinite difference (cmp).
            worst = cmp::nan_max(
                worst,
                cmp::max_abs_diff(&got[r * v..(r + 1) * v], &want[ri * v..(ri + 1) * v]),
            );
        }
        let tol = if variant == "f32" {
            1e-4 * scale
        } else {
            4.0 * scale * 2f32.powi(-8)
        };
        assert!(
            worst <= tol,
            "{variant}: worst |diff| {worst} > {tol} (scale {scale})"
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "expected one f32 and one bf16 unpadded case");
}

/// The tiny preset written as a sharded and as a single-file folder generates the same ids, from
/// text through the chat template, and decodes to text.
#[test]
fn tiny_folder_single_and_sharded_agree() {
    let d1 = tmpdir("tiny1");
    let d3 = tmpdir("tiny3");
    assert!(run(llada().arg("init-tiny").arg(&d1)).status.success());
    assert!(
        run(llada().arg("init-tiny").arg(&d3).args(["--shards", "3"]))
            .status
            .success()
    );
    assert!(d3.join("model.safetensors.index.json").is_file());
    let gen = |d: &Path| {
        ok_json(
            llada()
                .args([
                    "generate", "--device", "cpu", "--format", "json", "--chat", "--prompt",
                    "hi there",
                ])
                .args(["--gen-length", "16", "--steps", "8", "--block-length", "8"])
                .arg("--model")
                .arg(d),
        )
    };
    let a = gen(&d1);
    let b = gen(&d3);
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(a["ids"][0].as_array().unwrap().len(), 16);
    assert!(a["text"][0].is_string());
    // The chat prompt starts with BOS and ends with the assistant header + "\n\n".
    let p = a["prompt_ids"][0].as_array().unwrap();
    assert_eq!(p[p.len() - 2], 198);
    assert_eq!(p[p.len() - 1], 198);
}

#[test]
fn bad_input_is_a_clear_error() {
    let f = fixture("f32");
    let missing = tmpdir("missing");
    let gen = |model: &Path, args: &str| {
        err_of(
            llada()
                .args(["generate", "--model"])
                .arg(model)
                .args(args.split(' ')),
        )
    };
    // Bad generation flags on a valid prompt, and what the error names.
    for (flags, want) in [
        (
            "--gen-length 10 --block-length 4 --steps 4",
            &["gen_length", "10"][..],
        ),
        ("--gen-length 8 --block-length 4 --steps 3", &["steps", "3"]),
        ("--remasking sideways", &["sideways"]),
    ] {
        let e = gen(&f, &format!("--device cpu --prompt-ids 5,6,7 {flags}"));
        for w in want {
            assert!(e.contains(w), "{flags}: {e}");
        }
    }
    // Bad prompts and folders.
    for (model, args, want) in [
        (&f, "--device cpu --prompt-ids 5,x", "\"x\""),
        (&f, "--device cpu --prompt-ids 5,100000", "100000"),
        (&missing, "--prompt-ids 5", "config.json"),
        // --prompt text on a folder without tokenizer.json
        (&f, "--device cpu --prompt hi", "tokenizer"),
    ] {
        let e = gen(model, args);
        assert!(e.contains(want), "{args}: {e}");
    }
    let e = gen(
        &f,
        "--device cpu --prompt-ids 5,6,7 --gen-length 64 --block-length 64 --steps 64",
    );
    assert!(e.contains("max_sequence_length") || e.contains("64"), "{e}");
    // A forward output is never left half-written when the input is bad.
    let d = tmpdir("fwd-bad");
    let out = d.join("x.safetensors");
    let _ = err_of(
        llada()
            .args(["forward", "--device", "cpu", "--ids", "1,999999"])
            .arg("--model")
            .arg(&f)
            .arg("--out")
            .arg(&out),
    );
    assert!(!out.exists());
}

/// `llada grad` takes `--device` like every command: `cpu` equals the default (the CPU
/// reference), and `cuda` without a usable GPU is a clear error, not a silent CPU run.
#[test]
fn grad_takes_device() {
    let dir = tmpdir("grad-device");
    let model = fixture("f32");
    let grad = |device: Option<&str>, out: &str| -> Output {
        let mut c = llada();
        c.args([
            "grad",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "5,17,42,99",
        ])
        .args(["--masked", "1,3", "--p-mask", "0.5", "--out"])
        .arg(dir.join(out));
        if let Some(d) = device {
            c.args(["--device", d]);
        }
        run(&mut c)
    };
    assert!(grad(None, "a.st").status.success());
    assert!(grad(Some("cpu"), "b.st").status.success());
    assert_eq!(
        std::fs::read(dir.join("a.st")).unwrap(),
        std::fs::read(dir.join("b.st")).unwrap()
    );
    if llada::engine::device::cuda_available().is_err() {
        let o = grad(Some("cuda"), "c.st");
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("--device cuda"), "{e}");
    } else {
        eprintln!(
            "note: a GPU is present; `llada grad --device cuda` is compared in tests/cuda_train.rs"
        );
    }
    let o = grad(Some("tpu"), "d.st");
    assert!(!o.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
