//! `llada init` / `llada::hf::init`: presets written as folders with the presets' weights or
//! upstream's (mitchell) initialisation, streamed and sharded; `init-tiny` is `init --preset
//! tiny`. A mid-size config stands in for `llada-1b` (the same code path, 21 M parameters
//! instead of 1.2 B).

use llada::engine::device::DeviceChoice;
use llada::engine::{self, ModelSpec, Opened};
use llada::hf::checkpoint::{block_tensor, expected_tensors, Checkpoint, LM_HEAD, LN_F, WTE};
use llada::hf::config::ModelConfig;
use llada::hf::dtype::DType;
use llada::hf::init::{write_init_folder, InitFn, InitOptions};
use llada::hf::presets::{preset_checkpoint, preset_config};

mod common;

use common::cli::{err_of, llada, ok_run, TempDir};

/// Standard deviation of a normal cut at ±3σ, in units of σ: √(1 − 6φ(3)/(Φ(3) − Φ(−3))).
const TRUNC3_STD: f64 = 0.986_578_4;
/// P(|z| > 2) for z normal cut at ±3: 2(Φ(3) − Φ(2)) / (Φ(3) − Φ(−3)).
const TRUNC3_BEYOND_2: f64 = 0.042_916_3;

fn mid_config() -> ModelConfig {
    ModelConfig {
        d_model: 512,
        n_heads: 4,
        n_kv_heads: 4,
        n_layers: 4,
        mlp_hidden_size: 1408,
        vocab_size: 8192,
        embedding_size: 8192,
        mask_token_id: 8000,
        eos_token_id: 8001,
        pad_token_id: 8001,
        ..preset_config("llada-1b").unwrap()
    }
}

/// `llada init --preset tiny` writes exactly what `init-tiny` writes, whose tensors are the
/// `--preset tiny` weights; with `--init mitchell` the same uniform draws go through the
/// normal quantile, so every element keeps its sign.
#[test]
fn init_is_init_tiny_and_the_preset() {
    let d = TempDir::new("init");
    let (a, b, m) = (d.path().join("a"), d.path().join("b"), d.path().join("m"));
    ok_run(
        llada()
            .arg("init-tiny")
            .arg(&a)
            .args(["--dtype", "f32", "--seed", "4"]),
    );
    ok_run(
        llada()
            .args([
                "init", "--preset", "tiny", "--dtype", "f32", "--seed", "4", "--out",
            ])
            .arg(&b),
    );
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let cfg = preset_config("tiny").unwrap();
    let written = Checkpoint::open(&b, &cfg).unwrap();
    let preset = preset_checkpoint("tiny", 4, DType::F32).unwrap();
    for (name, _) in expected_tensors(&cfg) {
        assert_eq!(
            written.read_f32(&name).unwrap(),
            preset.read_f32(&name).unwrap(),
            "{name}"
        );
    }
    ok_run(
        llada()
            .args(["init", "--preset", "tiny", "--dtype", "f32", "--seed", "4"])
            .args(["--init", "mitchell", "--out"])
            .arg(&m),
    );
    let mitchell = Checkpoint::open(&m, &cfg).unwrap();
    let (u, n) = (
        preset.read_f32(WTE).unwrap(),
        mitchell.read_f32(WTE).unwrap(),
    );
    assert_ne!(u, n);
    assert!(u.iter().zip(&n).all(|(x, y)| (*x < 0.0) == (*y < 0.0)));
}

/// Upstream's initialisation on a mid-size model, bf16, three shards: every matrix has the
/// truncated normal's standard deviation (σ = 1/√fan-in, output projections of layer l over
/// √(2(l+1))), no value beyond 3σ, the normal's tail mass beyond 2σ; norms are 1; the folder
/// loads and its logits are finite.
#[test]
fn mitchell_mid_size_statistics_and_load() {
    let d = TempDir::new("mitchell");
    let cfg = mid_config();
    let o = InitOptions {
        seed: 9,
        dtype: DType::BF16,
        shards: 3,
        init: InitFn::Mitchell,
    };
    write_init_folder(d.path(), &cfg, &o).unwrap();
    assert!(d.path().join("model-00003-of-00003.safetensors").is_file());
    let ck = Checkpoint::open(d.path(), &cfg).unwrap();
    let (c, f) = (cfg.d_model as f64, cfg.mlp_hidden_size as f64);
    let mut firsts = Vec::new();
    for (name, shape) in expected_tensors(&cfg) {
        let x = ck.read_f32(&name).unwrap();
        assert!(x.iter().all(|v| v.is_finite()), "{name}: not finite");
        if shape.len() == 1 {
            assert!(x.iter().all(|&v| v == 1.0), "{name}: norm weights are 1");
            continue;
        }
        let layer = (0..cfg.n_layers)
            .find(|&l| name == block_tensor(l, "attn_out") || name == block_tensor(l, "ff_out"));
        let fan_in = if name.ends_with("ff_out.weight") && name != LM_HEAD {
            f
        } else {
            c
        };
        let sigma = 1.0 / fan_in.sqrt() / layer.map_or(1.0, |l| (2.0 * (l as f64 + 1.0)).sqrt());
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let beyond = x
            .iter()
            .filter(|&&v| (v as f64).abs() > 2.0 * sigma)
            .count() as f64
            / n;
        let max = x.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
        // n ≥ 262 144: the sample std is within 0.2 % (1/√(2n)) of its expectation, bf16
        // rounding adds 2⁻⁹ relative at most; the tail fraction within 3 % (its binomial error
        // is under 1 %); the mean within 5 standard errors.
        assert!(
            (std / (sigma * TRUNC3_STD) - 1.0).abs() < 0.01,
            "{name}: std {std} vs {}",
            sigma * TRUNC3_STD
        );
        assert!(
            max <= 3.0 * sigma * (1.0 + 1.0 / 256.0),
            "{name}: max {max} > 3σ"
        );
        assert!(
            (beyond / TRUNC3_BEYOND_2 - 1.0).abs() < 0.03,
            "{name}: {beyond} beyond 2σ"
        );
        assert!(mean.abs() < 5.0 * sigma / n.sqrt(), "{name}: mean {mean}");
        firsts.push(x[..8].to_vec());
    }
    // Every matrix draws its own values.
    for (i, a) in firsts.iter().enumerate() {
        assert!(
            firsts[i + 1..].iter().all(|b| b != a),
            "two matrices share values"
        );
    }
    assert_eq!(ck.read_f32(LN_F).unwrap().len(), cfg.d_model);
    let opened = Opened::open(&ModelSpec::Dir(d.path().to_path_buf())).unwrap();
    let (mut eng, _) = engine::load(&opened, DeviceChoice::Cpu).unwrap();
    let logits = eng.forward_logits(&[5, 6, 7, 8000]).unwrap();
    assert_eq!(logits.len(), 4 * cfg.embedding_size);
    assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits");
}

/// Bad presets, flags and folders are refused before anything is written.
#[test]
fn init_errors_are_clear() {
    let d = TempDir::new("init-err");
    let out = d.path().join("o");
    let init = |args: &[&str]| {
        let mut c = llada();
        c.arg("init").args(args).arg("--out").arg(&out);
        err_of(&mut c)
    };
    let e = init(&["--preset", "llada-2b"]);
    assert!(e.contains("llada-2b") && e.contains("llada-1b"), "{e}");
    let e = init(&["--preset", "tiny", "--init", "normal"]);
    assert!(e.contains("--init") && e.contains("mitchell"), "{e}");
    let e = init(&["--preset", "tiny", "--dtype", "f8"]);
    assert!(e.contains("dtype"), "{e}");
    let e = init(&["--preset", "tiny", "--shards", "0"]);
    assert!(e.contains("0 shards"), "{e}");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"x").unwrap();
    // Refused before the 16 GB preset is generated.
    let e = init(&["--preset", "llada-8b"]);
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), b"x");
    let e = err_of(llada().arg("init-tiny").arg(&out));
    assert!(e.contains("not empty"), "{e}");
}
