//! Fast-dLLM decoding (reference §7): KV-cached forward passes and `generate_fast`.
//!
//! - token-exact agreement with the upstream algorithms (`generate` baseline with a threshold,
//!   `generate_with_prefix_cache`, `generate_with_dual_cache`, fixed schedule / threshold /
//!   factor) recorded by tests/fixtures/make_fixture.py from an independent PyTorch model that
//!   caches keys BEFORE RoPE and re-rotates them on every call, as upstream does;
//! - the first call of every block equals the uncached step bit for bit;
//! - a cached span over unchanged tokens reproduces the full pass bit for bit (positions, cache
//!   rows and key masks are plumbed right);
//! - a threshold above 1 degenerates to one token per call;
//! - CPU/GPU agreement (skipped without a GPU; `LLADA_REQUIRE_GPU=1` makes that a failure).

use std::path::PathBuf;

use llada::backend::cpu::CpuBackend;
use llada::backend::Backend;
use llada::engine::fast::{generate_fast, CacheMode, Decode};
use llada::engine::model::Model;
use llada::engine::model::{Span, Tokens};
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{GenerateParams, Predictor, SpanPredictor, SpanRequest};
use llada::engine::{ModelSpec, Opened};
use llada::hf::dtype::DType;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    common::cli::fixture("parity")
}

fn fixture_model(variant: &str, dtype: DType) -> Model<CpuBackend> {
    let o = Opened::open(&ModelSpec::Dir(fixture_dir().join(variant))).expect("open fixture");
    Model::load(CpuBackend::new(dtype), o.cfg.clone(), |n| {
        o.ckpt.get(n).cloned()
    })
    .expect("load fixture")
}

fn expected() -> Value {
    common::cli::read_json(&fixture_dir().join("expected.json"))
}

use common::cli::u32s as ints;

fn params_for(
    cfg: &llada::hf::config::ModelConfig,
    steps: usize,
    gen: usize,
    blk: usize,
) -> GenerateParams {
    GenerateParams {
        logits_dtype: DType::F32,
        ..common::gen_params(cfg, steps, gen, blk)
    }
}

#[test]
fn fast_dllm_matches_upstream_fixture() {
    let model = fixture_model("f32", DType::F32);
    let exp = expected();
    let cases = exp["fast_dllm"].as_array().expect("fast_dllm cases");
    assert!(cases.len() >= 10, "expected the recorded Fast-dLLM cases");
    let mut modes = std::collections::HashSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompts: Vec<Vec<u32>> = case["prompt"]
            .as_array()
            .unwrap()
            .iter()
            .map(ints)
            .collect();
        let u = |k: &str| case[k].as_u64().unwrap() as usize;
        let mut p = params_for(&model.cfg, u("steps"), u("gen_length"), u("block_length"));
        p.mask_id = case["mask_id"].as_u64().unwrap() as u32;
        let decode = Decode {
            cache: case["cache"].as_str().unwrap().parse().unwrap(),
            threshold: case["threshold"].as_f64(),
            factor: case["factor"].as_f64(),
        };
        modes.insert((
            decode.cache,
            decode.threshold.is_some(),
            decode.factor.is_some(),
        ));
        let out = generate_fast(
            &mut ModelPredictor::new(&model),
            &prompts,
            &p,
            &decode,
            None,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let want: Vec<Vec<u32>> = case["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(ints)
            .collect();
        for (r, (w, g)) in want.iter().zip(&out.ids).enumerate() {
            let lp = prompts[r].len();
            assert_eq!(
                &w[lp..],
                g.as_slice(),
                "{name}: row {r} ids differ from upstream"
            );
        }
        assert_eq!(out.nfe, u("nfe"), "{name}: nfe differs from upstream");
    }
    for m in [CacheMode::Prefix, CacheMode::Dual] {
        for rule in [(false, false), (true, false), (false, true)] {
            assert!(
                modes.contains(&(m, rule.0, rule.1)),
                "fixture lacks {m} {rule:?}"
            );
        }
    }
}

/// Wraps the cached predictor; on every full-span call also runs the uncached predictor on the
/// same request and checks that (token, confidence) agree bit for bit.
struct FirstStepCheck<'m> {
    cached: ModelPredictor<'m, CpuBackend>,
    plain: ModelPredictor<'m, CpuBackend>,
    full_calls: usize,
    calls: usize,
    masks_before: Vec<usize>,
    mask_id: u32,
}

impl<'m> FirstStepCheck<'m> {
    fn new(model: &'m Model<CpuBackend>) -> Self {
        FirstStepCheck {
            cached: ModelPredictor::new(model),
            plain: ModelPredictor::new(model),
            full_calls: 0,
            calls: 0,
            masks_before: Vec::new(),
            mask_id: model.cfg.mask_token_id,
        }
    }
}

impl SpanPredictor for FirstStepCheck<'_> {
    fn predict_span(
        &mut self,
        req: &SpanRequest<'_>,
        out: &mut [(u32, f32)],
    ) -> anyhow::Result<()> {
        self.calls += 1;
        self.masks_before
            .push(req.x.iter().filter(|&&v| v == self.mask_id).count());
        self.cached.predict_span(req, out)?;
        if req.q0 == 0 && req.q1 == req.t {
            self.full_calls += 1;
            let mut plain = vec![(0u32, 0f32); out.len()];
            self.plain.predict(&req.full, &mut plain)?;
            for (i, (a, b)) in out.iter().zip(&plain).enumerate() {
                assert!(
                    a.0 == b.0 && a.1.to_bits() == b.1.to_bits(),
                    "first step of a block: row {i} cached {a:?} vs uncached {b:?}"
                );
            }
        }
        Ok(())
    }
}

#[test]
fn first_step_of_every_block_equals_uncached_step() {
    for (variant, dt) in [("f32", DType::F32), ("bf16", DType::BF16)] {
        let model = fixture_model(variant, dt);
        let cfg = model.cfg.clone();
        // A left-padded batch, so the key mask takes part too.
        let prompts = vec![vec![9, 33, 61, 8, 5], vec![31, 4, 88]];
        for cache in [CacheMode::Prefix, CacheMode::Dual] {
            let mut p = params_for(&cfg, 8, 16, 4);
            p.logits_dtype = dt;
            let mut w = FirstStepCheck::new(&model);
            let d = Decode {
                cache,
                ..Decode::default()
            };
            let out = generate_fast(&mut w, &prompts, &p, &d, None).unwrap();
            assert_eq!(
                w.full_calls, 4,
                "{variant} {cache}: one full pass per block"
            );
            assert_eq!(out.nfe, w.calls);
            assert_eq!(
                out.nfe, 8,
                "{variant} {cache}: fixed schedule = steps calls"
            );
        }
    }
}

#[test]
fn threshold_above_one_commits_one_token_per_call() {
    let model = fixture_model("f32", DType::F32);
    let cfg = model.cfg.clone();
    let prompts = vec![vec![5, 17, 42, 99, 7, 150]];
    for cache in [CacheMode::None, CacheMode::Prefix, CacheMode::Dual] {
        let p = params_for(&cfg, 2, 12, 6);
        let mut w = FirstStepCheck::new(&model);
        let d = Decode {
            cache,
            threshold: Some(1.01),
            factor: None,
        };
        let out = generate_fast(&mut w, &prompts, &p, &d, None).unwrap();
        assert_eq!(out.nfe, 12, "{cache}: one call per token");
        let want: Vec<usize> = (1..=12).rev().collect();
        assert_eq!(w.masks_before, want, "{cache}: masks before each call");
        assert!(out.ids[0].iter().all(|&t| t != cfg.mask_token_id));
    }
}

fn span_ids(x: &[u32], l: usize, q0: usize, q1: usize) -> Vec<u32> {
    x.chunks_exact(l).flat_map(|r| r[q0..q1].to_vec()).collect()
}

/// After a full span, re-running any span over the same tokens recomputes identical K/V, so the
/// logits equal the full pass exactly; this pins positions, cache rows and the key mask.
fn check_spans_reproduce_full<B: Backend>(m: &Model<B>, exact: bool) -> f32 {
    let (b, l) = (2usize, 19usize);
    let v = m.cfg.vocab_size as u64;
    let x: Vec<u32> = (0..b * l)
        .map(|i| (llada::rng::mix64(i as u64 + 77) % v) as u32)
        .collect();
    let kv: Vec<u8> = (0..b * l).map(|i| u8::from(i >= 3)).collect();
    let mut worst = 0f32;
    for mask in [None, Some(kv.as_slice())] {
        let mut ws = m.workspace(b * l, b * l).unwrap();
        let mut cache = m.kv_cache(b * l).unwrap();
        let all: Vec<u32> = (0..(b * l) as u32).collect();
        let full = Span::new(b, l, 0, l);
        m.forward_span(&mut ws, &mut cache, Tokens::new(&x, mask, &all), full)
            .unwrap();
        for (q0, q1) in [(5usize, 19usize), (5, 9), (0, 4), (18, 19)] {
            let tq = q1 - q0;
            // The span's rows in the full pass: (batch row r, position p) at r·l + p.
            let rows: Vec<u32> = (0..b)
                .flat_map(|r| (q0..q1).map(move |p| (r * l + p) as u32))
                .collect();
            let want = common::forward_logits(m, &x, (b, l), mask, &rows);
            let flat: Vec<u32> = (0..(b * tq) as u32).collect();
            let (ids, part) = (span_ids(&x, l, q0, q1), Span::new(b, l, q0, q1));
            m.forward_span(&mut ws, &mut cache, Tokens::new(&ids, mask, &flat), part)
                .unwrap();
            let got = m.logits(&ws, flat.len()).unwrap();
            for (i, (a, g)) in want.iter().zip(&got).enumerate() {
                let d = common::cmp::abs_diff(*g, *a);
                worst = common::cmp::nan_max(worst, d);
                if exact {
                    assert!(
                        a.to_bits() == g.to_bits(),
                        "span [{q0},{q1}) masked={} elem {i}: full {a} span {g}",
                        mask.is_some()
                    );
                }
            }
        }
    }
    worst
}

#[test]
fn cached_spans_over_unchanged_tokens_reproduce_the_full_pass() {
    check_spans_reproduce_full(&fixture_model("f32", DType::F32), true);
    check_spans_reproduce_full(&fixture_model("bf16", DType::BF16), true);
}

#[test]
fn bad_spans_are_named() {
    let m = fixture_model("f32", DType::F32);
    let mut ws = m.workspace(8, 8).unwrap();
    // (KV cache capacity, span, what the error names)
    for (cap, (q0, q1), want) in [(8, (7, 9), "span [7, 9)"), (4, (0, 2), "KV cache capacity")] {
        let mut cache = m.kv_cache(cap).unwrap();
        let e = m
            .forward_span(
                &mut ws,
                &mut cache,
                Tokens::new(&[1, 2], None, &[0]),
                Span::new(1, 8, q0, q1),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    let p = params_for(&m.cfg, 4, 8, 4);
    let d = Decode {
        cache: CacheMode::Dual,
        threshold: Some(0.9),
        factor: Some(1.0),
    };
    let e = generate_fast(&mut ModelPredictor::new(&m), &[vec![1, 2]], &p, &d, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("either a threshold or a factor"), "{e}");
    assert!("lru"
        .parse::<CacheMode>()
        .unwrap_err()
        .to_string()
        .contains("lru"));
}

mod common;

fn tiny<B: Backend>(b: B) -> Model<B> {
    common::tiny_model(b, 7)
}

#[test]
fn gpu_cached_spans_reproduce_the_full_pass() {
    let Some(g) = common::gpu() else { return };
    // Same kernels for the full and the cached attention, so exact on the GPU too.
    check_spans_reproduce_full(&tiny(g), true);
}

/// Cached generation on both devices in lockstep (see tests/common/mod.rs), every mode.
#[test]
fn gpu_fast_dllm_generation_agrees_with_cpu() {
    let Some((gm, cm)) = common::sharp_pair() else {
        return;
    };
    let cfg = cm.cfg.clone();
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n)
            .map(|i| (llada::rng::mix64(i as u64 ^ (salt << 32)) % 400) as u32)
            .collect()
    };
    let prompts = vec![ids(20, 1), ids(13, 2)];
    for cache in [CacheMode::None, CacheMode::Prefix, CacheMode::Dual] {
        for (threshold, steps) in [(None, 16), (Some(0.5), 4)] {
            let mut p = params_for(&cfg, steps, 32, 8);
            p.logits_dtype = DType::BF16;
            let d = Decode {
                cache,
                threshold,
                factor: None,
            };
            let what = format!("{cache} thr {threshold:?}");
            let mut ls = common::Lockstep::new(&cm, &gm);
            let out = generate_fast(&mut ls, &prompts, &p, &d, None).unwrap();
            ls.assert_agree(&what);
            let gg = generate_fast(&mut ModelPredictor::new(&gm), &prompts, &p, &d, None).unwrap();
            eprintln!("{what}: nfe cpu {} gpu {}", out.nfe, gg.nfe);
            common::assert_mostly_same(&what, &out.ids, &gg.ids);
        }
    }
}
