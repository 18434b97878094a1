//! The log-likelihood estimator (upstream `get_log_likelihood`, reference §5.1).
//!
//! References used, none of them the code under test:
//! - tests/fixtures/loglik/expected.json, written by tests/fixtures/make_loglik_fixture.py: a
//!   transliteration of upstream get_log_likelihood.py run on the independent PyTorch model of
//!   make_fixture.py (f32 and bf16), and the ELBO enumerated over every mask set in PyTorch;
//! - full-sequence logits from `Engine::forward_logits` with a host f64 log-softmax (the
//!   any-order chain rule below);
//! - fake scorers with known conditionals.

mod common;

use anyhow::Result;
use common::cli::{err_of, fixture, llada, ok_json, read_json, u32s as ids, words};
use llada::engine::device::DeviceChoice;
use llada::engine::predictor::{ScoreRequest, Scorer};
use llada::engine::{self, Engine, ModelSpec, Opened};
use llada::loglik::{self, LoglikParams};
use serde_json::Value;

fn expected() -> Value {
    read_json(&fixture("loglik/expected.json"))
}

fn engine(variant: &str) -> Box<dyn Engine> {
    let opened = Opened::open(&ModelSpec::Dir(fixture(&format!("parity/{variant}")))).unwrap();
    engine::load(&opened, DeviceChoice::Cpu).unwrap().0
}

fn params(mc_num: usize, batch_size: usize, cfg_scale: f64, seed: u64) -> LoglikParams {
    LoglikParams {
        mc_num,
        batch_size,
        cfg_scale,
        seed,
    }
}

fn ulp_bf16(x: f64) -> f64 {
    2f64.powi(x.abs().max(1e-30).log2().floor() as i32 - 7)
}

/// One-token answers: the estimate is exactly log p(token | prompt, MASK) whatever mc_num, and
/// equals upstream's value on the PyTorch model.
///
/// Tolerances: f32 — the logits agree with PyTorch to f32 accumulation-order noise (observed
/// ≤ 1e-5, model_parity allows 1e-4 of the logit scale); a log-softmax moves by at most twice
/// the largest logit change, so 1e-4 absolute is generous and 10× tighter than the 1e-3 the
/// issue asks for. bf16 — model_parity allows 4 bf16 ulps of the largest |logit| per logit, so
/// the log-probability may move by 8 such ulps, plus one ulp of the result, which both sides
/// round to bf16 (PyTorch's bf16 log_softmax output).
#[test]
fn one_token_answers_match_upstream_pytorch() {
    let exp = expected();
    let mut n = 0;
    for variant in ["f32", "bf16"] {
        let eng = engine(variant);
        for case in exp["one_token"].as_array().unwrap() {
            if case["variant"] != variant {
                continue;
            }
            let (prompt, answer) = (ids(&case["prompt"]), ids(&case["answer"]));
            let cfg = case["cfg_scale"].as_f64().unwrap();
            let want = case["loglik"].as_f64().unwrap();
            let mut scorer = eng.scorer();
            // Upstream's own (mc_num, batch) and others: all exact for T = 1.
            for (mc, b, seed) in [
                (
                    case["mc_num"].as_u64().unwrap() as usize,
                    case["batch_size"].as_u64().unwrap() as usize,
                    0,
                ),
                (1, 1, 7),
                (6, 3, 1),
            ] {
                let got =
                    loglik::estimate(scorer.as_mut(), &prompt, &answer, &params(mc, b, cfg, seed))
                        .unwrap();
                let tol = if variant == "f32" {
                    1e-4
                } else {
                    // 8 ulps of max|logit|; the fixture's logits stay below 8 in magnitude
                    // (model_parity prints the scale). Observed: 0 or one ulp of the result.
                    8.0 * 2f64.powi(-8) * 8.0 + ulp_bf16(want)
                };
                eprintln!(
                    "{variant} {answer:?} cfg {cfg}: |diff| {:e} (tol {tol:e})",
                    (got.loglik - want).abs()
                );
                assert!(
                    (got.loglik - want).abs() <= tol,
                    "{variant} {prompt:?}→{answer:?} cfg {cfg} mc {mc}/{b}: {} vs upstream {want} (tol {tol})",
                    got.loglik
                );
                assert!(got.mc_stderr.is_none());
                n += 1;
            }
        }
    }
    assert!(n >= 20, "only {n} cases ran");
}

/// The acceptance check of the issue: `llada loglik --format json --device cpu --mc-num 1` with a
/// one-token answer equals upstream's log-probability to 1e-3 (here to 1e-4, see above).
#[test]
fn cli_one_token_matches_upstream() {
    let exp = expected();
    for case in exp["one_token"].as_array().unwrap() {
        if case["variant"] != "f32" || case["mc_num"] != 1 {
            continue;
        }
        let join = |v: &Value| {
            ids(v)
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let v = ok_json(
            llada()
                .args(["loglik", "--model"])
                .arg(fixture("parity/f32"))
                .args(["--prompt-ids", &join(&case["prompt"])])
                .args(["--answer-ids", &join(&case["answer"])])
                .args(["--mc-num", "1", "--device", "cpu", "--format", "json"])
                .args(["--cfg-scale", &case["cfg_scale"].to_string()]),
        );
        let got = v["loglik"].as_f64().unwrap();
        let want = case["loglik"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4, "{got} vs {want}");
    }
}

/// `elbo_exact` equals the ELBO PyTorch enumerates. Its weights sum to T, so the difference is
/// at most T times the per-token log-probability tolerance (1e-4, see above).
#[test]
fn exact_elbo_matches_pytorch_enumeration() {
    let eng = engine("f32");
    let mut scorer = eng.scorer();
    for case in expected()["elbo"].as_array().unwrap() {
        let (prompt, answer) = (ids(&case["prompt"]), ids(&case["answer"]));
        let cfg = case["cfg_scale"].as_f64().unwrap();
        let want = case["elbo"].as_f64().unwrap();
        let got = loglik::elbo_exact(scorer.as_mut(), &prompt, &answer, cfg, 3).unwrap();
        let tol = answer.len() as f64 * 1e-4;
        assert!(
            (got - want).abs() <= tol,
            "{prompt:?}→{answer:?} cfg {cfg}: {got} vs {want}"
        );
    }
}

/// log-softmax of one row, in f64.
fn log_softmax_at(row: &[f32], t: usize) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row[t] as f64 - m - z.ln()
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

/// The ELBO is the average over all T! decoding orders of the chain-rule log-likelihood
/// Σ_i log p(a_σ(i) | prompt, a_σ(<i) revealed, rest masked) (any-order autoregression): this
/// checks the enumeration weights 1/(|S|·C(T,|S|)) through an independent path (full logits,
/// f64 log-softmax). If the model's conditionals were those of one joint distribution, every
/// order would give log p(a | prompt) and the ELBO would equal it; this random tiny model is not
/// consistent (the orders disagree, asserted below), so "the exact log p" is not defined for it,
/// and all that holds is Jensen: ELBO = mean_σ log p_σ ≤ log mean_σ p_σ.
#[test]
fn exact_elbo_is_the_any_order_chain_rule_average() {
    let mut eng = engine("f32");
    let mask = eng.config().mask_token_id;
    let v = eng.config().embedding_size;
    let prompt = [5u32, 17, 42, 99];
    let answer = [7u32, 150, 33];
    let lp = prompt.len();
    let mut per_order = Vec::new();
    for order in permutations(answer.len()) {
        let mut x: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
        for i in 0..answer.len() {
            x[lp + i] = mask;
        }
        let mut ll = 0.0;
        for &i in &order {
            let logits = eng.forward_logits(&x).unwrap();
            let p = lp + i;
            ll += log_softmax_at(&logits[p * v..(p + 1) * v], answer[i] as usize);
            x[p] = answer[i];
        }
        per_order.push(ll);
    }
    let mean = per_order.iter().sum::<f64>() / per_order.len() as f64;
    let spread = per_order
        .iter()
        .fold(0.0f64, |m, &x| m.max((x - mean).abs()));
    assert!(
        spread > 1e-2,
        "orders agree ({per_order:?}): the model looks consistent"
    );
    let elbo = {
        let mut s = eng.scorer();
        loglik::elbo_exact(s.as_mut(), &prompt, &answer, 0.0, 4).unwrap()
    };
    assert!(
        (elbo - mean).abs() < 1e-4,
        "ELBO {elbo} vs any-order mean {mean}"
    );
    let mx = per_order.iter().cloned().fold(f64::MIN, f64::max);
    let log_mean_p =
        mx + (per_order.iter().map(|x| (x - mx).exp()).sum::<f64>() / per_order.len() as f64).ln();
    assert!(elbo <= log_mean_p + 1e-9);
}

/// Monte-Carlo estimates converge to the exact ELBO (with and without CFG): the estimator is
/// unbiased when the mini-batch has no round-half tie (b odd or b | T), so the mean of many
/// samples lies within a few standard errors (estimated from the mini-batch means; 4.5σ — the
/// seeds are fixed, so this is deterministic, and a wrong weight T/l or a biased count shifts the
/// mean by many σ, see the fake-scorer test).
#[test]
fn monte_carlo_converges_to_exact_elbo() {
    let eng = engine("f32");
    let mut scorer = eng.scorer();
    for (prompt, answer, cfg, b) in [
        (vec![5u32, 17, 42, 99], vec![7u32, 150], 0.0, 2usize),
        (vec![5, 17, 42, 99], vec![7, 150, 33], 0.0, 3),
        (vec![12, 70, 140], vec![6, 91, 8], 0.5, 1),
    ] {
        let exact = loglik::elbo_exact(scorer.as_mut(), &prompt, &answer, cfg, 4).unwrap();
        let out = loglik::estimate(
            scorer.as_mut(),
            &prompt,
            &answer,
            &params(b * 300, b, cfg, 11),
        )
        .unwrap();
        let se = out.mc_stderr.unwrap();
        eprintln!(
            "{answer:?} cfg {cfg} b {b}: MC {} ± {se}, exact {exact}",
            out.loglik
        );
        assert!(se > 0.0 && se < 0.5, "stderr {se}");
        assert!(
            (out.loglik - exact).abs() <= 4.5 * se,
            "{answer:?} cfg {cfg} b {b}: MC {} ± {se} vs exact ELBO {exact}",
            out.loglik
        );
        assert_eq!(out.forward_passes, 300);
    }
}

#[test]
fn deterministic_by_seed() {
    let eng = engine("f32");
    let mut s = eng.scorer();
    let (p, a) = ([5u32, 17, 42], [7u32, 150, 33, 8]);
    let run =
        |s: &mut dyn Scorer, seed| loglik::estimate(s, &p, &a, &params(8, 4, 0.0, seed)).unwrap();
    let x = run(s.as_mut(), 3);
    let y = run(s.as_mut(), 3);
    assert_eq!(x.loglik.to_bits(), y.loglik.to_bits());
    assert_eq!(x.batch_means, y.batch_means);
    let z = run(s.as_mut(), 4);
    assert_ne!(x.loglik, z.loglik);
    // A fresh engine (fresh workspace) gives the same bits.
    let eng2 = engine("f32");
    let mut s2 = eng2.scorer();
    assert_eq!(run(s2.as_mut(), 3).loglik.to_bits(), x.loglik.to_bits());
}

/// A fake whose log-probabilities are known: `c(pos, #masked in the row)`.
struct Fake {
    mask: u32,
    lp: usize,
    calls: usize,
    rows_seen: usize,
}

impl Fake {
    fn value(pos: usize, masked: usize) -> f32 {
        -0.5 - 0.25 * pos as f32 - 0.125 * masked as f32
    }
}

impl Scorer for Fake {
    fn score(&mut self, req: &ScoreRequest<'_>, out: &mut [f32]) -> Result<()> {
        self.calls += 1;
        self.rows_seen += req.b;
        for (i, &r) in req.rows.iter().enumerate() {
            let (b, pos) = (r as usize / req.t, r as usize % req.t);
            let row = &req.x[b * req.t..(b + 1) * req.t];
            assert!(pos >= self.lp, "a prompt position was scored");
            assert_eq!(row[pos], self.mask, "a scored position is not masked");
            assert!(
                row[..self.lp].iter().all(|&x| x != self.mask),
                "prompt masked"
            );
            let masked = row.iter().filter(|&&x| x == self.mask).count();
            out[i] = Self::value(pos - self.lp, masked);
        }
        Ok(())
    }
    fn mask_id(&self) -> u32 {
        999
    }
}

#[test]
fn fake_scorer_weights_and_batching() {
    let prompt = [1u32, 2];
    let answer = [3u32, 4, 5, 6];
    let mut f = Fake {
        mask: 999,
        lp: 2,
        calls: 0,
        rows_seen: 0,
    };
    // Exact ELBO of the fake: Σ_l (1/T)·(T/l)·E_S Σ_{i∈S} c(i, l) = Σ_l (1/l)·(l/T)·Σ_i c(i, l).
    let t = answer.len();
    let want: f64 = (1..=t)
        .map(|l| (0..t).map(|i| Fake::value(i, l) as f64).sum::<f64>() / t as f64)
        .sum();
    let exact = loglik::elbo_exact(&mut f, &prompt, &answer, 0.0, 5).unwrap();
    assert!((exact - want).abs() < 1e-9, "{exact} vs {want}");
    // b = T = 4: every count once per mini-batch; the MC mean converges to the ELBO.
    f.calls = 0;
    f.rows_seen = 0;
    let out = loglik::estimate(&mut f, &prompt, &answer, &params(4000, 4, 0.0, 5)).unwrap();
    assert_eq!((f.calls, f.rows_seen), (1000, 4000));
    let se = out.mc_stderr.unwrap();
    assert!(
        (out.loglik - want).abs() <= 4.5 * se,
        "{} ± {se} vs {want}",
        out.loglik
    );
    // The per-position spread only: with c independent of the position the value is exact.
    struct Const;
    impl Scorer for Const {
        fn score(&mut self, req: &ScoreRequest<'_>, out: &mut [f32]) -> Result<()> {
            assert_eq!(req.rows.len(), out.len());
            out.fill(-0.75);
            Ok(())
        }
        fn mask_id(&self) -> u32 {
            999
        }
    }
    // Each sample is (T/l)·l·(−0.75) = −0.75·T whatever l: exact for any seed and batch.
    for (mc, b, seed) in [(1, 1, 0), (6, 2, 3), (9, 9, 8)] {
        let o = loglik::estimate(&mut Const, &prompt, &answer, &params(mc, b, 0.0, seed)).unwrap();
        assert!((o.loglik + 0.75 * t as f64).abs() < 1e-12, "{}", o.loglik);
    }
}

#[test]
fn bad_input_is_rejected_with_a_reason() {
    let eng = engine("f32");
    let mut s = eng.scorer();
    let long = vec![5u32; 64];
    // (prompt, answer, parameters, what the error names)
    type Case<'a> = (&'a [u32], &'a [u32], LoglikParams, &'a [&'a str]);
    let cases: [Case; 7] = [
        (&[1, 2], &[], params(1, 1, 0.0, 0), &["answer is empty"]),
        (
            &[1],
            &[2],
            params(6, 4, 0.0, 0),
            &["not a multiple of batch_size"],
        ),
        (&[1], &[2], params(0, 1, 0.0, 0), &["mc_num"]),
        (&[1], &[126], params(1, 1, 0.0, 0), &["mask token"]),
        (&[1], &[2], params(1, 1, -1.0, 0), &["cfg_scale"]),
        (&long, &[2], params(1, 1, 0.0, 0), &["max_sequence_length"]),
        (&[1], &[500], params(1, 1, 0.0, 0), &["500", "vocabulary"]),
    ];
    for (prompt, answer, p, want) in cases {
        let e = format!(
            "{:#}",
            loglik::estimate(s.as_mut(), prompt, answer, &p).unwrap_err()
        );
        for w in want {
            assert!(e.contains(w), "{prompt:?}→{answer:?}: {e}");
        }
    }
    let e = format!(
        "{:#}",
        loglik::elbo_exact(s.as_mut(), &[1], &[2; 13], 0.0, 4).unwrap_err()
    );
    assert!(e.contains("at most 12"), "{e}");

    let cli = |args: &[&str]| {
        err_of(
            llada()
                .args(["loglik", "--model"])
                .arg(fixture("parity/f32"))
                .args(["--device", "cpu"])
                .args(args),
        )
    };
    let e = cli(&["--prompt-ids", "1,2", "--answer-ids", "3,x"]);
    assert!(e.contains("bad token id \"x\""), "{e}");
    let e = cli(&["--prompt-ids", "1,2", "--answer-ids", ""]);
    assert!(e.contains("no tokens"), "{e}");
    let e = cli(&["--prompt-ids", "1", "--answer-ids", "300"]);
    assert!(e.contains("300") && e.contains("out of range"), "{e}");
    let e = cli(&["--prompt", "hi", "--answer", " there"]);
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = cli(&["--prompt-ids", "1", "--answer-ids", "3", "--format", "xml"]);
    assert!(e.contains("--format"), "{e}");
    let e = cli(&words(
        "--prompt-ids 1 --answer-ids 3 --mc-num 10 --batch-size 4",
    ));
    assert!(e.contains("not a multiple"), "{e}");
}
