//! LoRA: PEFT's adapter format both ways, merging at load and `llada merge-lora` against
//! PyTorch + PEFT (tests/fixtures/lora, made by tests/fixtures/make_lora_fixture.py), the LoRA
//! linear's backward by finite differences, adapter gradients against PEFT autograd, the
//! adapter optimizer, and hostile adapter folders.

use std::path::Path;
use std::sync::Arc;

use llada::engine::device::DeviceChoice;
use llada::engine::{self, ModelSpec, Opened};
use llada::hf::checkpoint::{Checkpoint, WeightSource};
use llada::hf::config::ModelConfig;
use llada::hf::dtype::DType;
use llada::hf::write::{write_safetensors, HostTensor};
use llada::lora::train::{
    init_adapter, lora_grads_from_dense, lora_linear, lora_linear_bwd, select_modules, Factors,
    LoraAdamW, LoraGrads,
};
use llada::lora::{Adapter, LoraConfig, ModuleKind, ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX};
use llada::rng::{bits, cell_key, uniform};
use llada::train::backend::{LinearBwd, MatMul};
use llada::train::optim::AdamWConfig;
mod common;

use common::cli::{
    err_of, f64s as floats, fixture, grad_on_fixture, llada_out as llada, ok, read_json, run,
    tmpdir, u32s as ints, words,
};
use common::fd::check_grad;
use serde_json::{json, Value};

fn expected() -> Value {
    read_json(&fixture("lora/expected.json"))
}

/// `llada merge-lora --model MODEL --lora ADAPTER --out OUT`.
fn merge_lora(model: &Path, adapter: &Path, out: &Path) -> std::process::Output {
    let mut c = common::cli::llada();
    c.arg("merge-lora").arg("--model").arg(model);
    c.arg("--lora").arg(adapter).arg("--out").arg(out);
    run(&mut c)
}

fn logits(opened: &Opened, ids: &[u32]) -> Vec<f32> {
    let (mut eng, _) = engine::load(opened, DeviceChoice::Cpu).unwrap();
    eng.forward_logits(ids).unwrap()
}

/// Deterministic values in [-scale, scale].
fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let k = cell_key(seed, 98, 0, 0, 0);
    (0..n)
        .map(|i| scale * (2.0 * uniform(bits(k, i as u64)) - 1.0))
        .collect()
}

/// Worst |got − want| and the largest |want|; fails on NaN.
fn worst(got: &[f32], want: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "length");
    let mut w = 0.0f64;
    for (&g, &x) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite value {g}");
        w = w.max((g as f64 - x).abs());
    }
    (w, want.iter().fold(0.0f64, |a, &b| a.max(b.abs())))
}

// ---------------------------------------------------------------------------------------------
// Against PyTorch + PEFT.

/// f32 logits with each PEFT-saved adapter merged at load equal PEFT's (unmerged) forward: as
/// in tests/model_parity.rs, both sides compute in f32 with different summation orders, so 1e-4
/// of the logit scale is far above the rounding noise; the adapters move logits by up to 6
/// (fixture), so a wrong scale, a transposed factor or a missed module fails by orders of
/// magnitude.
#[test]
fn merged_logits_match_peft() {
    let e = expected();
    let noisy = ints(&e["noisy"]);
    let model = fixture("parity/f32");
    let base = Opened::open(&ModelSpec::Dir(model.clone())).unwrap();
    let (w, scale) = worst(&logits(&base, &noisy), &floats(&e["base_logits"]));
    assert!(w <= 1e-4 * scale, "base: worst {w} (scale {scale})");
    for (dir, key, modules) in [("peft", "peft_logits", 15), ("rslora", "rslora_logits", 2)] {
        let mut o = Opened::open(&ModelSpec::Dir(model.clone())).unwrap();
        let summary = o.apply_lora(&fixture("lora").join(dir)).unwrap();
        assert!(summary.contains(&format!("{modules} modules")), "{summary}");
        let got = logits(&o, &noisy);
        let want = floats(&e[key]);
        let (w, scale) = worst(&got, &want);
        assert!(w <= 1e-4 * scale, "{dir}: worst {w} (scale {scale})");
        // The adapter matters: the base logits are far from these.
        let (moved, _) = worst(&got, &floats(&e["base_logits"]));
        assert!(
            moved > 1.0,
            "{dir}: the adapter moved logits by only {moved}"
        );
    }
    // PEFT's own merge agrees with its unmerged forward (sanity of the fixture).
    assert!(e["peft_merged_max_diff"].as_f64().unwrap() < 1e-4);
}

/// `llada merge-lora` onto the bf16 model equals PEFT's `merge_and_unload()` there: both compute
/// `bf16(W + f32(Σ_k B·A)·scale)`, one rounding; only the order of the 4-term f32 sum may
/// differ, which can move a result by one bf16 ulp when the sum sits on a rounding boundary. At
/// most one ulp anywhere, and (as measured) exact almost everywhere.
#[test]
fn merge_lora_matches_peft_merge_and_unload_in_bf16() {
    let e = expected();
    let out = tmpdir("merge-bf16");
    let merged = out.join("m");
    ok(&merge_lora(
        &fixture("parity/bf16"),
        &fixture("lora/peft"),
        &merged,
    ));
    let cfg = ModelConfig::from_file(&merged.join("config.json")).unwrap();
    let ck = Checkpoint::open(&merged, &cfg).unwrap();
    assert_eq!(ck.dtype(), DType::BF16);
    let (mut total, mut exact) = (0, 0);
    for (name, want) in e["bf16_merged"].as_object().unwrap() {
        let want = floats(want);
        let got = ck.read_f32(name).unwrap();
        for (i, &w) in want.iter().enumerate() {
            let w = DType::BF16.round(w as f32);
            let g = got[i];
            let ulp = (w.abs().max(f32::MIN_POSITIVE)).log2().floor();
            let ulp = 2f32.powf(ulp - 7.0);
            assert!(
                (g - w).abs() <= ulp,
                "{name}[{i}]: llada {g}, PEFT {w} (more than one bf16 ulp apart)"
            );
            total += 1;
            exact += (g == w) as usize;
        }
    }
    assert!(
        total >= 2048 && exact * 100 >= total * 99,
        "{exact} of {total} exact"
    );
    // The merged folder runs like the adapter applied at load: the same rounded weights.
    let ids = [5u32, 17, 42, 126, 99, 126, 7, 150];
    let m = Opened::open(&ModelSpec::Dir(merged.clone())).unwrap();
    let mut on_load = Opened::open(&ModelSpec::Dir(fixture("parity/bf16"))).unwrap();
    on_load.apply_lora(&fixture("lora/peft")).unwrap();
    assert_eq!(logits(&m, &ids), logits(&on_load, &ids));
    let _ = std::fs::remove_dir_all(&out);
}

/// f32 against f32 autograd with different summation orders, as tests/train.rs: 2e-4 of the
/// tensor's largest gradient.
fn assert_close(name: &str, got: &[f32], want: &[f64]) {
    let (w, scale) = worst(got, want);
    assert!(
        scale > 0.0,
        "{name}: all-zero reference gradient tests nothing"
    );
    assert!(
        w <= 2e-4 * scale + 1e-7,
        "{name}: worst |diff| {w} (max |grad| {scale})"
    );
}

/// Adapter gradients equal PyTorch + PEFT autograd: `llada grad` on the merged f32 checkpoint
/// gives the dense gradient G of every merged weight, and dA = s·Bᵀ·G, dB = s·G·Aᵀ
/// ([`lora_grads_from_dense`], the identity behind `lora_linear_bwd`; checked against it below).
#[test]
fn adapter_gradients_match_peft_autograd() {
    let e = expected();
    let out = tmpdir("grad");
    let merged = out.join("m");
    let model = fixture("parity/f32");
    let adir = fixture("lora/peft");
    ok(&merge_lora(&model, &adir, &merged));
    let g_path = out.join("g.safetensors");
    ok(&grad_on_fixture(&merged, &e, &g_path));
    let sources = llada::hf::checkpoint::open_safetensors(&g_path).unwrap();
    let read = |name: &str| -> Vec<f32> {
        let s = sources.iter().find(|s| s.name() == name).unwrap();
        let mut v = vec![0.0; s.numel()];
        s.read_range(0, s.numel(), &mut v);
        v
    };
    let loss = read("loss")[0] as f64;
    let want_loss = e["loss"].as_f64().unwrap();
    assert!(
        common::cmp::rel_close(loss, want_loss, 1e-5),
        "loss {loss} vs PEFT {want_loss}"
    );
    let cfg = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let ad = Adapter::open(&adir, &cfg).unwrap();
    let grads = e["lora_grads"].as_object().unwrap();
    assert_eq!(grads.len(), 10);
    let mut checked = 0;
    for (module, m) in &ad.modules {
        let a_name = format!("{PEFT_PREFIX}{module}.lora_A.weight");
        let Some(want_a) = grads.get(&a_name) else {
            continue;
        };
        let want_b = &grads[&format!("{PEFT_PREFIX}{module}.lora_B.weight")];
        let g = read(&format!("{module}.weight"));
        let [rows, cols] = m.base_shape;
        let s = m.scale(ad.config.use_rslora) as f32;
        let mut da = vec![0.0f32; m.a.len()];
        let mut db = vec![0.0f32; m.b.len()];
        let f = Factors {
            a: &m.a,
            b: &m.b,
            s,
            r: m.rank,
        };
        lora_grads_from_dense((&mut da, &mut db), &g, f, cols, rows);
        assert_close(&a_name, &da, &floats(want_a));
        assert_close(&format!("{module}.lora_B"), &db, &floats(want_b));
        checked += 2;
    }
    assert_eq!(checked, grads.len());
    let _ = std::fs::remove_dir_all(&out);
}

// ---------------------------------------------------------------------------------------------
// The LoRA linear: finite differences in f64.

#[test]
fn fd_lora_linear() {
    let (n, k, m, r) = (3, 5, 4, 2);
    let d = MatMul { n, k, m };
    let s = 1.7f64;
    let mut x = rand_vec(1, n * k, 1.0);
    let w = rand_vec(2, m * k, 1.0);
    let mut a = rand_vec(3, r * k, 1.0);
    let mut b = rand_vec(4, m * r, 1.0);
    let rr = rand_vec(5, n * m, 1.0);
    // loss = Σ y ⊙ R
    let loss = |x: &[f64], a: &[f64], b: &[f64]| {
        let mut y = vec![0.0; n * m];
        let mut u = vec![0.0; n * r];
        lora_linear(&mut y, &mut u, x, &w, Factors { a, b, s, r }, d);
        y.iter().zip(&rr).map(|(p, q)| p * q).sum::<f64>()
    };
    let mut y = vec![0.0; n * m];
    let mut u = vec![0.0; n * r];
    let f = Factors { a: &a, b: &b, s, r };
    lora_linear(&mut y, &mut u, &x, &w, f, d);
    // The forward is x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
    for i in 0..n {
        for j in 0..m {
            let mut want = 0.0;
            for q in 0..k {
                let mut wd = w[j * k + q];
                for t in 0..r {
                    wd += s * b[j * r + t] * a[t * k + q];
                }
                want += x[i * k + q] * wd;
            }
            assert!((y[i * m + j] - want).abs() < 1e-12, "y[{i},{j}]");
        }
    }
    let mut dx = vec![0.0; n * k];
    let mut da = vec![0.0; r * k];
    let mut db = vec![0.0; m * r];
    let io = LinearBwd {
        dy: &rr,
        x: &x,
        w: &w,
        d,
    };
    lora_linear_bwd(Some(&mut dx), (&mut da, &mut db), &u, f, io);
    let (a0, b0) = (a.clone(), b.clone());
    check_grad("dx", &mut x, &dx, &mut |x| loss(x, &a0, &b0));
    let x0 = x.clone();
    check_grad("dA", &mut a, &da, &mut |a| loss(&x0, a, &b0));
    check_grad("dB", &mut b, &db, &mut |b| loss(&x0, &a0, b));
    // (The factors and inputs again, now that the checks have let go of them.)
    let f = Factors { a: &a, b: &b, s, r };
    let io = LinearBwd {
        dy: &rr,
        x: &x,
        w: &w,
        d,
    };
    // The dense-gradient identity gives the same dA, dB: G = dyᵀ·x.
    let mut g = vec![0.0; m * k];
    for i in 0..n {
        for j in 0..m {
            for q in 0..k {
                g[j * k + q] += rr[i * m + j] * x[i * k + q];
            }
        }
    }
    let mut da2 = vec![0.0; r * k];
    let mut db2 = vec![0.0; m * r];
    lora_grads_from_dense((&mut da2, &mut db2), &g, f, k, m);
    for (p, q) in da.iter().zip(&da2).chain(db.iter().zip(&db2)) {
        assert!((p - q).abs() < 1e-12, "{p} vs {q}");
    }
    // Gradients accumulate.
    let before = da.clone();
    lora_linear_bwd(None, (&mut da, &mut db), &u, f, io);
    for (p, q) in da.iter().zip(&before) {
        assert!((p - 2.0 * q).abs() < 1e-12);
    }
}

/// A LoRA linear trained with [`LoraAdamW`] fits a rank-1 change of a frozen weight: the loss
/// falls by orders of magnitude while W stays untouched, and the optimizer state round-trips.
#[test]
fn lora_adamw_fits_a_low_rank_change() {
    let cfg = llada::hf::presets::preset_config("tiny").unwrap();
    let targets = vec!["model.transformer.blocks.0.q_proj".to_string()];
    let mut ad = init_adapter(&cfg, &targets, 2, 4.0, false, 7).unwrap();
    assert_eq!(ad.modules.len(), 1);
    let (name, m) = ad.modules.iter().next().unwrap();
    let name = name.clone();
    let [mm, k] = m.base_shape;
    assert!(m.b.iter().all(|&x| x == 0.0), "PEFT initialises B to zero");
    let bound = 1.0 / (k as f32).sqrt();
    assert!(m.a.iter().all(|x| x.abs() <= bound) && m.a.iter().any(|&x| x != 0.0));
    let n = 16;
    let x: Vec<f32> = rand_vec(11, n * k, 1.0).iter().map(|&v| v as f32).collect();
    let w: Vec<f32> = rand_vec(12, mm * k, 0.1)
        .iter()
        .map(|&v| v as f32)
        .collect();
    // Target: y* = x·(W + p·qᵀ)ᵀ.
    let p = rand_vec(13, mm, 0.5);
    let q = rand_vec(14, k, 0.5);
    let mut target = vec![0.0f32; n * mm];
    for i in 0..n {
        for j in 0..mm {
            let mut t = 0.0f64;
            for c in 0..k {
                t += x[i * k + c] as f64 * (w[j * k + c] as f64 + p[j] * q[c]);
            }
            target[i * mm + j] = t as f32;
        }
    }
    let mut opt = LoraAdamW::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        &ad,
    );
    let mut g = LoraGrads::zeros_like(&ad);
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..300 {
        let md = &ad.modules[&name];
        let s = md.scale(false) as f32;
        let mut y = vec![0.0f32; n * mm];
        let mut u = vec![0.0f32; n * 2];
        let f = Factors {
            a: &md.a,
            b: &md.b,
            s,
            r: 2,
        };
        let d = MatMul { n, k, m: mm };
        lora_linear(&mut y, &mut u, &x, &w, f, d);
        let dy: Vec<f32> = y
            .iter()
            .zip(&target)
            .map(|(a, b)| 2.0 * (a - b) / n as f32)
            .collect();
        last = y
            .iter()
            .zip(&target)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / n as f64;
        first.get_or_insert(last);
        g.fill_zero();
        let (da, db) = g.modules.get_mut(&name).unwrap();
        let io = LinearBwd {
            dy: &dy,
            x: &x,
            w: &w,
            d,
        };
        lora_linear_bwd(None, (da, db), &u, f, io);
        assert!(g.norm().is_finite());
        g.clip(10.0);
        opt.step(&mut ad, &g, 1e-2).unwrap();
    }
    let first = first.unwrap();
    assert!(last < first * 1e-2, "loss {first} -> {last}");
    // Optimizer state round trip.
    let t = opt.tensors(&ad);
    assert_eq!(t.len(), 4);
    let back = LoraAdamW::load(opt.cfg, &ad, opt.t, |n| {
        Ok(t.iter().find(|x| x.0 == n).unwrap().3.clone())
    })
    .unwrap();
    assert_eq!(back, opt);
}

// ---------------------------------------------------------------------------------------------
// Writing adapters.

fn tiny_cfg() -> ModelConfig {
    llada::hf::presets::preset_config("tiny").unwrap()
}

/// An adapter on `targets` with random non-zero factors.
fn random_adapter(cfg: &ModelConfig, targets: &[&str], seed: u64) -> Adapter {
    let t: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
    let mut ad = init_adapter(cfg, &t, 3, 6.0, false, seed).unwrap();
    for (i, m) in ad.modules.values_mut().enumerate() {
        m.b = rand_vec(seed * 100 + i as u64, m.b.len(), 0.05)
            .iter()
            .map(|&v| v as f32)
            .collect();
    }
    ad
}

/// What llada writes reads back identically, with PEFT's names and a config PEFT's rules turn
/// into exactly the same modules (list form when the suffixes select exactly these modules,
/// else a regex that must match whole names).
#[test]
fn adapter_round_trip_and_target_modules() {
    let cfg = tiny_cfg();
    let dir = tmpdir("roundtrip");
    let all = select_modules(&cfg, &["q_proj".into(), "ff_out".into()]).unwrap();
    // `ff_out` selects the LM head too, as in PEFT.
    assert!(all.contains(&"model.transformer.ff_out".to_string()));
    assert_eq!(all.len(), 2 * cfg.n_layers + 1);
    let mut ad = random_adapter(&cfg, &["q_proj", "ff_out"], 3);
    // One module of another rank and alpha: rank_pattern / alpha_pattern entries.
    let odd = ad
        .modules
        .get_mut("model.transformer.blocks.1.q_proj")
        .unwrap();
    odd.rank = 1;
    odd.alpha = 2.5;
    odd.a.truncate(odd.base_shape[1]);
    odd.b = vec![0.25; odd.base_shape[0]];
    ad.save(&dir, &cfg).unwrap();
    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["r"], 3);
    assert_eq!(v["lora_alpha"], 6);
    assert_eq!(v["target_modules"], json!(["ff_out", "q_proj"]));
    assert_eq!(
        v["rank_pattern"],
        json!({"model\\.transformer\\.blocks\\.1\\.q_proj": 1})
    );
    assert_eq!(
        v["alpha_pattern"],
        json!({"model\\.transformer\\.blocks\\.1\\.q_proj": 2.5})
    );
    let back = Adapter::open(&dir, &cfg).unwrap();
    assert_eq!(back.modules, ad.modules);
    let names: Vec<String> = llada::hf::checkpoint::open_safetensors(&dir.join(ADAPTER_WEIGHTS))
        .unwrap()
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    assert!(names
        .contains(&"base_model.model.model.transformer.blocks.0.q_proj.lora_A.weight".to_string()));
    assert!(names.contains(&"base_model.model.model.transformer.ff_out.lora_B.weight".to_string()));

    // Blocks only, without the head: a regex over every block.
    let mut blocks = random_adapter(&cfg, &["q_proj", "ff_out"], 4);
    blocks.modules.remove("model.transformer.ff_out");
    let t = blocks.config_json(&cfg)["target_modules"].clone();
    assert_eq!(
        t,
        json!("model\\.transformer\\.blocks\\.\\d+\\.(ff_out|q_proj)")
    );
    // Some layers only: the exact names.
    let mut one = random_adapter(&cfg, &["v_proj"], 5);
    one.modules.remove("model.transformer.blocks.0.v_proj");
    let t = one.config_json(&cfg)["target_modules"].clone();
    let re = regex::Regex::new(&format!("^(?:{})$", t.as_str().unwrap())).unwrap();
    for m in llada::lora::adaptable_modules(&cfg).keys() {
        assert_eq!(
            re.is_match(m),
            one.modules.contains_key(m),
            "{m} against {t}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Merged on read: any chunking of `read_range` (the CUDA loader reads in chunks) gives the same
/// values as a whole read, equal to W + s·B·A computed independently; the embedding's update is
/// (B·A)ᵀ; a whole replaced tensor (PEFT modules_to_save, or an embedding saved as
/// `<module>.base_layer.weight`) replaces the base, under the module's LoRA update.
#[test]
fn merge_on_read_linear_embedding_and_replaced() {
    let cfg = tiny_cfg();
    let ck0 = llada::hf::presets::preset_checkpoint("tiny", 1, DType::F32).unwrap();
    let c = cfg.d_model;
    let v = cfg.embedding_size;
    let r = 2;
    let q = "model.transformer.blocks.1.q_proj";
    let [qm, qk] = [cfg.n_heads * cfg.head_dim(), c];
    let host = |name: String, shape: Vec<usize>, vals: Vec<f64>| WeightSource::Host {
        data: Arc::new(vals.iter().map(|&x| x as f32).collect()),
        dtype: DType::F32,
        shape,
        name,
    };
    let qa = rand_vec(21, r * qk, 0.5);
    let qb = rand_vec(22, qm * r, 0.5);
    let ea = rand_vec(23, r * v, 0.5);
    let eb = rand_vec(24, c * r, 0.5);
    let ln = rand_vec(25, c, 1.0);
    let wrep = rand_vec(26, v * c, 0.5);
    let wte = "model.transformer.wte";
    let sources: Vec<WeightSource> = [
        (format!("{q}.lora_A.weight"), vec![r, qk], &qa),
        (format!("{q}.lora_B.weight"), vec![qm, r], &qb),
        (format!("{wte}.lora_embedding_A"), vec![r, v], &ea),
        (format!("{wte}.lora_embedding_B"), vec![c, r], &eb),
        ("model.transformer.ln_f.weight".into(), vec![c], &ln),
        // The embedding saved whole too (save_embedding_layers): the new base under the LoRA.
        (format!("{wte}.base_layer.weight"), vec![v, c], &wrep),
    ]
    .into_iter()
    .map(|(n, shape, vals)| host(format!("{PEFT_PREFIX}{n}"), shape, vals.clone()))
    .collect();
    let ad = Adapter::from_sources(LoraConfig::new(r, 3.0, false), &sources, &cfg).unwrap();
    assert_eq!(
        ad.modules["model.transformer.wte"].kind,
        ModuleKind::Embedding
    );
    let mut ck = ck0.clone();
    ad.apply(&mut ck).unwrap();
    let s = 3.0 / r as f64;
    let wq = ck0.read_f32(&format!("{q}.weight")).unwrap();
    let got = ck.read_f32(&format!("{q}.weight")).unwrap();
    for i in 0..qm {
        for j in 0..qk {
            let d: f64 = (0..r)
                .map(|t| qb[i * r + t] as f32 as f64 * qa[t * qk + j] as f32 as f64)
                .sum();
            let want = wq[i * qk + j] as f64 + s * d;
            assert!((got[i * qk + j] as f64 - want).abs() < 1e-5, "q[{i},{j}]");
        }
    }
    let src = ck.get(&format!("{q}.weight")).unwrap();
    let n = src.numel();
    let mut chunked = vec![0.0f32; n];
    let mut from = 0;
    for step in [1usize, 7, 64, 1000, 5].iter().cycle() {
        if from >= n {
            break;
        }
        let to = (from + step).min(n);
        src.read_range(from, to, &mut chunked[from..to]);
        from = to;
    }
    assert_eq!(chunked, got);
    let we: Vec<f32> = wrep.iter().map(|&x| x as f32).collect();
    let ge = ck.read_f32(llada::hf::checkpoint::WTE).unwrap();
    for tok in [0usize, 3, v - 1] {
        for j in [0usize, 5, c - 1] {
            let d: f64 = (0..r)
                .map(|t| eb[j * r + t] as f32 as f64 * ea[t * v + tok] as f32 as f64)
                .sum();
            let want = we[tok * c + j] as f64 + s * d;
            assert!(
                (ge[tok * c + j] as f64 - want).abs() < 1e-5,
                "wte[{tok},{j}]"
            );
        }
    }
    let gl = ck.read_f32(llada::hf::checkpoint::LN_F).unwrap();
    assert_eq!(gl, ln.iter().map(|&x| x as f32).collect::<Vec<_>>());
    // Untouched tensors are untouched.
    let k = "model.transformer.blocks.0.k_proj.weight";
    assert_eq!(ck.read_f32(k).unwrap(), ck0.read_f32(k).unwrap());
}

/// `llada merge-lora` writes a complete folder (tokenizer and other files copied) that runs
/// exactly like `--lora` on the base, and refuses to overwrite its input.
#[test]
fn merge_lora_folder_runs_like_lora_at_load() {
    let dir = tmpdir("merge-folder");
    let base = dir.join("base");
    ok(&llada(&[
        "init-tiny",
        base.to_str().unwrap(),
        "--seed",
        "3",
    ]));
    let cfg = ModelConfig::from_file(&base.join("config.json")).unwrap();
    let ad = random_adapter(&cfg, &["q_proj", "v_proj", "up_proj"], 9);
    let adir = dir.join("adapter");
    ad.save(&adir, &cfg).unwrap();
    let merged = dir.join("merged");
    let stdout = ok(&merge_lora(&base, &adir, &merged));
    assert!(stdout.contains("wrote"), "{stdout}");
    for f in std::fs::read_dir(&base).unwrap() {
        let name = f.unwrap().file_name().into_string().unwrap();
        assert!(
            merged.join(&name).is_file(),
            "{name} not in the merged folder"
        );
    }
    let (bs, ads, ms) = (
        base.to_str().unwrap(),
        adir.to_str().unwrap(),
        merged.to_str().unwrap(),
    );
    let with_lora = ["--model", bs, "--lora", ads];
    let on_merged = ["--model", ms];
    let gen = |args: &[&str]| -> Value {
        let mut a = vec!["generate", "--prompt", "hello world"];
        a.extend(words(
            "--gen-length 8 --steps 4 --block-length 8 --format json --device cpu",
        ));
        a.extend_from_slice(args);
        serde_json::from_str(&ok(&llada(&a))).unwrap()
    };
    let on_load = gen(&with_lora);
    let from_merged = gen(&on_merged);
    let plain = gen(&["--model", bs]);
    assert_eq!(on_load["ids"], from_merged["ids"]);
    assert_eq!(on_load["text"], from_merged["text"]);
    // Logits through both paths are bit-identical; the adapter changes them.
    let ids = "5,17,42,99";
    let out = |name: &str, args: &[&str]| -> Vec<f32> {
        let p = dir.join(name);
        let mut a = vec!["forward", "--ids", ids, "--device", "cpu", "--out"];
        a.push(p.to_str().unwrap());
        a.extend_from_slice(args);
        ok(&llada(&a));
        let s = llada::hf::checkpoint::open_safetensors(&p).unwrap();
        let mut v = vec![0.0; s[0].numel()];
        s[0].read_range(0, v.len(), &mut v);
        v
    };
    let l1 = out("a.st", &with_lora);
    let l2 = out("b.st", &on_merged);
    let l0 = out("c.st", &["--model", bs]);
    assert_eq!(l1, l2);
    assert_ne!(l1, l0);
    let _ = plain;
    // loglik, eval and batch with --lora give what they give on the merged folder.
    let loglik = |m: &[&str]| -> Value {
        let mut a = words("loglik --prompt-ids 5,17 --answer-ids 42,7 --mc-num 4");
        a.extend(words("--format json --device cpu"));
        a.extend_from_slice(m);
        serde_json::from_str(&ok(&llada(&a))).unwrap()
    };
    let (x, y) = (loglik(&with_lora), loglik(&on_merged));
    assert!(x["loglik"].as_f64().unwrap().is_finite());
    assert_eq!(x["loglik"], y["loglik"]);
    let tasks = dir.join("tasks.jsonl");
    std::fs::write(
        &tasks,
        "{\"context\": \"hello\", \"choices\": [\"world\", \"there\"], \"answer\": 0}\n",
    )
    .unwrap();
    let eval = |m: &[&str], name: &str| -> String {
        let o = dir.join(name);
        let mut a = vec!["eval", "--tasks", tasks.to_str().unwrap()];
        a.extend(["--mc-num", "2", "--device", "cpu", "--output"]);
        a.push(o.to_str().unwrap());
        a.extend_from_slice(m);
        ok(&llada(&a));
        std::fs::read_to_string(&o).unwrap()
    };
    let (x, y) = (eval(&with_lora, "e1.jsonl"), eval(&on_merged, "e2.jsonl"));
    assert!(x.contains("lls"), "{x}");
    assert_eq!(x, y);
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "{\"id\": \"a\", \"prompt_ids\": [5, 17, 42]}\n").unwrap();
    let batch = |m: &[&str], name: &str| -> Value {
        let o = dir.join(name);
        let mut a = vec!["batch", "--input", input.to_str().unwrap(), "--output"];
        a.push(o.to_str().unwrap());
        a.extend(words(
            "--gen-length 8 --steps 4 --block-length 8 --device cpu",
        ));
        a.extend_from_slice(m);
        ok(&llada(&a));
        serde_json::from_str(std::fs::read_to_string(&o).unwrap().lines().next().unwrap()).unwrap()
    };
    let (x, y) = (batch(&with_lora, "b1.jsonl"), batch(&on_merged, "b2.jsonl"));
    assert!(x["ids"].is_array(), "{x}");
    assert_eq!(x["ids"], y["ids"]);
    // Sharded output (a tiny shard limit) holds the same tensors as the single file.
    let sharded = dir.join("sharded");
    let cfg = ModelConfig::from_file(&base.join("config.json")).unwrap();
    let mut o = Opened::open(&ModelSpec::Dir(base.clone())).unwrap();
    o.apply_lora(&adir).unwrap();
    llada::lora::write_merged_folder(&base, &cfg, &o.ckpt, &sharded, 100_000).unwrap();
    assert!(sharded.join("model.safetensors.index.json").is_file());
    assert!(!sharded.join("model.safetensors").exists());
    let a = Checkpoint::open(&sharded, &cfg).unwrap();
    let b = Checkpoint::open(&merged, &cfg).unwrap();
    assert!(a.files().len() > 2, "{} shards", a.files().len());
    for (name, _) in llada::hf::checkpoint::expected_tensors(&cfg) {
        assert_eq!(
            a.read_f32(&name).unwrap(),
            b.read_f32(&name).unwrap(),
            "{name}"
        );
    }
    // Refuses to write into its input, and names a bad adapter.
    assert!(!merge_lora(&base, &adir, &base).status.success());
    let e = err_of(
        common::cli::llada()
            .args(["forward", "--ids", "1", "--model"])
            .arg(&base)
            .arg("--lora")
            .arg(dir.join("nope"))
            .arg("--out")
            .arg(dir.join("x")),
    );
    assert!(e.contains("not a folder"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Hostile adapter folders.

fn good_config() -> Value {
    json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
}

fn q_tensors(cfg: &ModelConfig, r: usize) -> Vec<HostTensor> {
    let m = "model.transformer.blocks.0.q_proj";
    let (out, inp) = (cfg.n_heads * cfg.head_dim(), cfg.d_model);
    vec![
        (
            format!("{PEFT_PREFIX}{m}.lora_A.weight"),
            DType::F32,
            vec![r, inp],
            vec![0.1; r * inp],
        ),
        (
            format!("{PEFT_PREFIX}{m}.lora_B.weight"),
            DType::F32,
            vec![out, r],
            vec![0.1; out * r],
        ),
    ]
}

fn write_adapter(dir: &Path, config: &Value, tensors: &[HostTensor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(ADAPTER_CONFIG), config.to_string()).unwrap();
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), tensors).unwrap();
}

fn open_err(dir: &Path, cfg: &ModelConfig) -> String {
    match Adapter::open(dir, cfg) {
        Ok(_) => panic!("{} was accepted", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn hostile_adapters_get_clear_errors() {
    let cfg = tiny_cfg();
    let root = tmpdir("hostile");
    let mut n = 0;
    let mut case = |config: Value, tensors: Vec<HostTensor>, want: &[&str]| {
        n += 1;
        let d = root.join(format!("c{n}"));
        write_adapter(&d, &config, &tensors);
        let e = open_err(&d, &cfg);
        for w in want {
            assert!(e.contains(w), "case {n}: {e:?} does not say {w:?}");
        }
    };
    // The good one opens.
    let d = root.join("good");
    write_adapter(&d, &good_config(), &q_tensors(&cfg, 2));
    assert_eq!(Adapter::open(&d, &cfg).unwrap().modules.len(), 1);

    let with = |k: &str, v: Value| {
        let mut c = good_config();
        c[k] = v;
        c
    };
    case(
        with("peft_type", json!("PREFIX_TUNING")),
        q_tensors(&cfg, 2),
        &["peft_type", "PREFIX_TUNING"],
    );
    case(
        with("r", json!(0)),
        q_tensors(&cfg, 2),
        &["r = 0", "at least 1"],
    );
    case(with("r", json!(2.5)), q_tensors(&cfg, 2), &["r = 2.5"]);
    case(
        with("r", json!(1u64 << 40)),
        q_tensors(&cfg, 2),
        &["largest rank"],
    );
    case(
        with("lora_alpha", json!("x")),
        q_tensors(&cfg, 2),
        &["lora_alpha"],
    );
    case(with("use_dora", json!(true)), q_tensors(&cfg, 2), &["DoRA"]);
    case(with("bias", json!("some")), q_tensors(&cfg, 2), &["bias"]);
    case(
        with("rank_pattern", json!({"q_proj(": 2})),
        q_tensors(&cfg, 2),
        &["rank_pattern", "q_proj("],
    );
    // The config's rank disagrees with the tensors.
    case(
        with("r", json!(4)),
        q_tensors(&cfg, 2),
        &["lora_A.weight", "rank 2", "rank 4"],
    );
    case(
        with("rank_pattern", json!({"blocks.0.q_proj": 3})),
        q_tensors(&cfg, 2),
        &["rank 3"],
    );
    // Shapes.
    let mut t = q_tensors(&cfg, 2);
    t[0].2 = vec![2, cfg.d_model - 1];
    t[0].3.truncate(2 * (cfg.d_model - 1));
    case(
        good_config(),
        t,
        &["blocks.0.q_proj.lora_A.weight", "has shape"],
    );
    let mut t = q_tensors(&cfg, 2);
    t[1].2 = vec![cfg.d_model, 3];
    t[1].3 = vec![0.0; cfg.d_model * 3];
    case(good_config(), t, &["lora_B.weight", "expected"]);
    let mut t = q_tensors(&cfg, 0);
    t[0].2 = vec![0, cfg.d_model];
    case(good_config(), t, &["rank 0"]);
    // Names.
    let mut t = q_tensors(&cfg, 2);
    t[0].0 = t[0].0.replace("blocks.0", "blocks.9");
    case(good_config(), t, &["unknown module", "blocks.9.q_proj"]);
    let mut t = q_tensors(&cfg, 2);
    t[0].0 = t[0].0.replace(PEFT_PREFIX, "");
    case(good_config(), t, &["not a PEFT tensor name"]);
    let mut t = q_tensors(&cfg, 2);
    t[0].0 = t[0].0.replace(".lora_A.weight", ".lora_A.default.weight");
    case(good_config(), t, &["lora_A.default.weight"]);
    let mut t = q_tensors(&cfg, 2);
    t.pop();
    case(good_config(), t, &["lora_B.weight` is missing"]);
    let mut t = q_tensors(&cfg, 2);
    t[0].0 = format!("{PEFT_PREFIX}model.transformer.wte.lora_A.weight");
    case(good_config(), t, &["embedding", "lora_embedding_A"]);
    // Values.
    let mut t = q_tensors(&cfg, 2);
    t[1].3[5] = f32::NAN;
    case(good_config(), t, &["lora_B.weight", "element 5", "NaN"]);
    case(good_config(), vec![], &["no LoRA tensors"]);

    // Files: missing, pickle only, truncated, malformed, a symlink out of the folder.
    let d = root.join("empty");
    std::fs::create_dir_all(&d).unwrap();
    assert!(open_err(&d, &cfg).contains(ADAPTER_CONFIG));
    let d = root.join("pickle");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(ADAPTER_CONFIG), good_config().to_string()).unwrap();
    std::fs::write(d.join("adapter_model.bin"), b"PK").unwrap();
    assert!(open_err(&d, &cfg).contains("pickle"));
    let d = root.join("trunc");
    write_adapter(&d, &good_config(), &q_tensors(&cfg, 2));
    let bytes = std::fs::read(d.join(ADAPTER_WEIGHTS)).unwrap();
    std::fs::write(d.join(ADAPTER_WEIGHTS), &bytes[..bytes.len() - 10]).unwrap();
    assert!(open_err(&d, &cfg).contains("outside the data section"));
    let d = root.join("badjson");
    write_adapter(&d, &good_config(), &q_tensors(&cfg, 2));
    std::fs::write(
        d.join(ADAPTER_CONFIG),
        "{\"peft_type\": \"LORA\", \"r\": NaN}",
    )
    .unwrap();
    assert!(open_err(&d, &cfg).contains("malformed JSON"));
    std::fs::write(
        d.join(ADAPTER_CONFIG),
        "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 1e999}",
    )
    .unwrap();
    let e = open_err(&d, &cfg);
    assert!(
        e.contains(ADAPTER_CONFIG) && e.contains("out of range"),
        "{e}"
    );
    let d = root.join("link");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(ADAPTER_CONFIG), good_config().to_string()).unwrap();
    write_safetensors(&root.join("outside.safetensors"), &q_tensors(&cfg, 2)).unwrap();
    std::os::unix::fs::symlink(root.join("outside.safetensors"), d.join(ADAPTER_WEIGHTS)).unwrap();
    assert!(open_err(&d, &cfg).contains("leaves the model folder"));
    let _ = std::fs::remove_dir_all(&root);
}

// ---------------------------------------------------------------------------------------------
// PEFT reads what llada writes.

/// The adapter llada writes into tests/fixtures/lora/llada: every block linear except the LM
/// head (so `target_modules` is a regex), rank 3 with one rank-1 module (a `rank_pattern`
/// entry), rsLoRA, random non-zero factors.
fn llada_written_adapter(cfg: &ModelConfig) -> Adapter {
    let parts: Vec<String> = llada::lora::LINEAR_PARTS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut ad = init_adapter(cfg, &parts, 3, 5.0, true, 42).unwrap();
    ad.modules.remove("model.transformer.ff_out");
    for (i, m) in ad.modules.values_mut().enumerate() {
        m.b = rand_vec(4200 + i as u64, m.b.len(), 0.3)
            .iter()
            .map(|&v| v as f32)
            .collect();
    }
    let odd = ad
        .modules
        .get_mut("model.transformer.blocks.1.attn_out")
        .unwrap();
    odd.rank = 1;
    odd.a.truncate(odd.base_shape[1]);
    odd.b = rand_vec(4299, odd.base_shape[0], 0.3)
        .iter()
        .map(|&v| v as f32)
        .collect();
    ad
}

/// The committed tests/fixtures/lora/llada adapter is byte for byte what llada writes today
/// (regenerate with LLADA_UPDATE_FIXTURES=1, then rerun make_lora_fixture.py), and PyTorch +
/// PEFT, loading it with `PeftModel.from_pretrained`, computes the logits llada computes with
/// it (tolerance as in `merged_logits_match_peft`).
#[test]
fn peft_loads_what_llada_writes() {
    let model = fixture("parity/f32");
    let cfg = ModelConfig::from_file(&model.join("config.json")).unwrap();
    let ad = llada_written_adapter(&cfg);
    let committed = fixture("lora/llada");
    if std::env::var("LLADA_UPDATE_FIXTURES").as_deref() == Ok("1") {
        ad.save(&committed, &cfg).unwrap();
    }
    let dir = tmpdir("written");
    ad.save(&dir, &cfg).unwrap();
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        assert!(
            std::fs::read(dir.join(f)).unwrap() == std::fs::read(committed.join(f)).unwrap(),
            "{f} differs from tests/fixtures/lora/llada: the format changed (see the doc comment)"
        );
    }
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert!(cfg_json["target_modules"].is_string());
    let e = expected();
    let noisy = ints(&e["noisy"]);
    let mut o = Opened::open(&ModelSpec::Dir(model)).unwrap();
    o.apply_lora(&committed).unwrap();
    let got = logits(&o, &noisy);
    let (w, scale) = worst(&got, &floats(&e["llada_adapter_peft_logits"]));
    assert!(w <= 1e-4 * scale, "worst {w} (scale {scale})");
    let (moved, _) = worst(&got, &floats(&e["base_logits"]));
    assert!(moved > 1.0, "the adapter moved logits by only {moved}");
    let _ = std::fs::remove_dir_all(&dir);
}
