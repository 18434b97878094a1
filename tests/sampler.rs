//! Tests of `sampler::generate` (upstream LLaDA `generate`, reference §4) with fake predictors.
//!
//! The strongest test compares `generate` against `reference_generate` below: a direct
//! transliteration of the upstream loop (full-sequence tensors, whole-vocab logits for every
//! position, −∞ confidences, top-k over the whole row) on random settings. The fake models turn
//! logits into (token, confidence) with `head::cfg_mix` / `head::select_one`, as the real model
//! does.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use anyhow::{bail, Result};
use llada::backend::head::{self, Remasking, SelectParams};
use llada::engine::sampler::{
    generate, num_transfer_tokens, GenerateOutput, GenerateParams, PredictRequest, Predictor,
    Progress,
};
use llada::hf::dtype::DType;
use llada::rng;

// ---------------------------------------------------------------------------------------------
// Allocation counting (per thread, so parallel tests do not disturb each other).

struct CountingAlloc;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn count_alloc() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocs() -> usize {
    ALLOCS.with(|c| c.get())
}

// ---------------------------------------------------------------------------------------------
// A tiny vocabulary: ordinary tokens 0..12, EOS 12 (also the pad, as in LLaDA), EOT 13, 14
// unused, MASK 15.

const V: usize = 16;
const EOS: u32 = 12;
const EOT: u32 = 13;
const MASK: u32 = 15;
const PAD: u32 = EOS;

fn params(steps: usize, gen_length: usize, block_length: usize) -> GenerateParams {
    GenerateParams {
        steps,
        gen_length,
        block_length,
        mask_id: MASK,
        eos_id: EOS,
        eot_id: Some(EOT),
        pad_id: PAD,
        ..GenerateParams::default()
    }
}

/// Small deterministic generator for test settings.
struct TestRng(u64);

impl TestRng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        rng::mix64(self.0.wrapping_mul(0x2545_F491_4F6C_DD1D))
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.next() % den < num
    }
}

// ---------------------------------------------------------------------------------------------
// Fake models.

/// Logits of one position: (row tokens `[T]`, key-valid row, position) → `[V]`.
type LogitFn = dyn Fn(&[u32], Option<&[u8]>, usize) -> Vec<f32>;

/// A hash "transformer": the logits at `p` are a sum over every valid key `q` of pseudo-random
/// contributions keyed by (token at q, q − p). Shift invariant and blind to padded keys, like
/// LLaDA with RoPE and a key-padding mask; every committed token changes every prediction.
fn hash_logits(scale: f32, mask_bias: f32, dtype: DType) -> Box<LogitFn> {
    Box::new(move |x: &[u32], kv: Option<&[u8]>, p: usize| {
        let mut l = [0f32; V];
        for (q, &tok) in x.iter().enumerate() {
            if kv.is_some_and(|kv| kv[q] == 0) {
                continue;
            }
            let d = q as i64 - p as i64;
            let h = rng::mix64(((tok as u64) << 32) ^ (d as u64).wrapping_mul(0x9E37_79B9));
            for (v, lv) in l.iter_mut().enumerate() {
                *lv += rng::uniform(rng::bits(h, v as u64)) as f32 - 0.5;
            }
        }
        l[MASK as usize] += mask_bias;
        l.iter().map(|&v| dtype.round(scale * v)).collect()
    })
}

/// A model made of a logit function: mixes CFG and selects with the head's CPU reference,
/// exactly as the real model's head does.
struct LogitModel {
    f: Box<LogitFn>,
}

impl Predictor for LogitModel {
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
        if out.len() != req.rows.len() {
            bail!("out has {} entries for {} rows", out.len(), req.rows.len());
        }
        let t = req.t;
        let cfg = req.select.cfg_scale > 0.0;
        match (cfg, req.uncond_x.is_some()) {
            (true, false) => bail!("cfg_scale > 0 but no uncond_x"),
            (false, true) => bail!("uncond_x sent with cfg_scale 0"),
            _ => {}
        }
        for (o, &(r, p)) in out.iter_mut().zip(req.rows) {
            let (r, p) = (r as usize, p as usize);
            let kv = req.key_valid.map(|kv| &kv[r * t..(r + 1) * t]);
            let mut l = (self.f)(&req.x[r * t..(r + 1) * t], kv, p);
            if let Some(u) = req.uncond_x {
                let ul = (self.f)(&u[r * t..(r + 1) * t], kv, p);
                head::cfg_mix(&mut l, &ul, req.select.cfg_scale, req.select.dtype);
            }
            let (kr, kp) = req.rng_key(r as u32, p as u32)?;
            *o = head::select_one(&mut l, kr, kp, req.select);
        }
        Ok(())
    }
}

/// Scripted (token, confidence) per (row, position, step), no logits at all.
struct Scripted<F: FnMut(u32, u32, u64) -> (u32, f32)> {
    f: F,
}

impl<F: FnMut(u32, u32, u64) -> (u32, f32)> Predictor for Scripted<F> {
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
        for (o, &(r, p)) in out.iter_mut().zip(req.rows) {
            *o = (self.f)(r, p, req.select.step);
        }
        Ok(())
    }
}

/// What a predictor was asked, call by call.
#[derive(Clone, Debug)]
struct Call {
    b: usize,
    t: usize,
    x: Vec<u32>,
    uncond_x: Option<Vec<u32>>,
    key_valid: Option<Vec<u8>>,
    rows: Vec<(u32, u32)>,
    select: SelectParams,
}

/// Wraps a predictor and records every request.
struct Recorder<P: Predictor> {
    inner: P,
    calls: Vec<Call>,
}

impl<P: Predictor> Recorder<P> {
    fn new(inner: P) -> Self {
        Recorder {
            inner,
            calls: Vec::new(),
        }
    }
}

impl<P: Predictor> Predictor for Recorder<P> {
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
        assert_eq!(req.x.len(), req.b * req.t);
        assert_eq!(out.len(), req.rows.len());
        self.calls.push(Call {
            b: req.b,
            t: req.t,
            x: req.x.to_vec(),
            uncond_x: req.uncond_x.map(<[u32]>::to_vec),
            key_valid: req.key_valid.map(<[u8]>::to_vec),
            rows: req.rows.to_vec(),
            select: req.select.clone(),
        });
        self.inner.predict(req, out)
    }
}

/// Full final sequences `[B·T]`: the last call's prompt part plus the generated ids (a prompt
/// [MASK] filled by the last step is not seen).
fn final_x(calls: &[Call], out: &GenerateOutput) -> Vec<u32> {
    let last = calls.last().expect("at least one call");
    let lp = out.prompt_len_padded;
    let mut x = last.x.clone();
    for (r, ids) in out.ids.iter().enumerate() {
        x[r * last.t + lp..(r + 1) * last.t].copy_from_slice(ids);
    }
    x
}

/// Per step, the (row, position) pairs that stopped being [MASK] during that step.
fn commits(calls: &[Call], out: &GenerateOutput) -> Vec<Vec<(usize, usize)>> {
    let fin = final_x(calls, out);
    let t = calls[0].t;
    (0..calls.len())
        .map(|s| {
            let before = &calls[s].x;
            let after = calls.get(s + 1).map_or(&fin, |c| &c.x);
            (0..before.len())
                .filter(|&i| before[i] == MASK && after[i] != MASK)
                .map(|i| (i / t, i % t))
                .collect()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The reference: upstream `generate` transliterated onto full [B][T] vectors.

struct RefOut {
    x: Vec<Vec<u32>>,
    nfe: usize,
}

// Index loops on purpose: this mirrors upstream's tensor indexing line by line.
#[allow(clippy::needless_range_loop)]
fn reference_generate(f: &LogitFn, prompts: &[Vec<u32>], p: &GenerateParams) -> RefOut {
    let lp = prompts.iter().map(Vec::len).max().unwrap();
    let t = lp + p.gen_length;
    let bsz = prompts.len();
    // x = full(mask); x[:, :Lp] = left-padded prompt; attention mask only if padding exists.
    let mut x: Vec<Vec<u32>> = prompts
        .iter()
        .map(|pr| {
            let mut row = vec![p.pad_id; lp - pr.len()];
            row.extend_from_slice(pr);
            row.resize(t, p.mask_id);
            row
        })
        .collect();
    let am: Option<Vec<Vec<u8>>> = prompts.iter().any(|pr| pr.len() != lp).then(|| {
        prompts
            .iter()
            .map(|pr| (0..t).map(|i| u8::from(i >= lp - pr.len())).collect())
            .collect()
    });
    let prompt_index: Vec<Vec<bool>> = x
        .iter()
        .map(|row| row.iter().map(|&v| v != p.mask_id).collect())
        .collect();
    assert_eq!(p.gen_length % p.block_length, 0);
    let num_blocks = p.gen_length / p.block_length;
    assert_eq!(p.steps % num_blocks, 0);
    let steps = p.steps / num_blocks;
    let mut nfe = 0;
    for nb in 0..num_blocks {
        let blk = lp + nb * p.block_length..lp + (nb + 1) * p.block_length;
        let ntt: Vec<Vec<usize>> = x
            .iter()
            .map(|row| {
                let n = row[blk.clone()].iter().filter(|&&v| v == p.mask_id).count();
                let mut s = vec![n / steps; steps];
                for v in s.iter_mut().take(n % steps) {
                    *v += 1;
                }
                s
            })
            .collect();
        for i in 0..steps {
            let mask_index: Vec<Vec<bool>> = x
                .iter()
                .map(|row| row.iter().map(|&v| v == p.mask_id).collect())
                .collect();
            let kv = |j: usize| am.as_ref().map(|a| a[j].as_slice());
            // logits [B][T][V] for every position.
            let mut logits: Vec<Vec<Vec<f32>>> = (0..bsz)
                .map(|j| (0..t).map(|q| f(&x[j], kv(j), q)).collect())
                .collect();
            nfe += 1;
            if p.cfg_scale > 0.0 {
                let un_x: Vec<Vec<u32>> = (0..bsz)
                    .map(|j| {
                        (0..t)
                            .map(|q| {
                                if prompt_index[j][q] {
                                    p.mask_id
                                } else {
                                    x[j][q]
                                }
                            })
                            .collect()
                    })
                    .collect();
                for j in 0..bsz {
                    for q in 0..t {
                        let un = f(&un_x[j], kv(j), q);
                        head::cfg_mix(&mut logits[j][q], &un, p.cfg_scale, p.logits_dtype);
                    }
                }
            }
            if p.logits_eos_inf {
                for row in logits.iter_mut() {
                    for l in row.iter_mut() {
                        l[p.eos_id as usize] = f32::NEG_INFINITY;
                    }
                }
            }
            // x0 = argmax(logits + τ·gumbel), confidence from the softmax (or random), with EOS
            // and EOT excluded from the confidence softmax under confidence_eos_eot_inf.
            let sel = SelectParams {
                temperature: p.temperature,
                cfg_scale: 0.0,
                remasking: p.remasking,
                seed: p.seed,
                step: (nb * steps + i) as u64,
                forbid: None,
                conf_suppress: if p.confidence_eos_eot_inf {
                    [Some(p.eos_id), p.eot_id]
                } else {
                    [None, None]
                },
                dtype: p.logits_dtype,
            };
            for j in 0..bsz {
                let mut x0 = vec![0u32; t];
                let mut x0_p = vec![0f32; t];
                for q in 0..t {
                    let mut l = logits[j][q].clone();
                    (x0[q], x0_p[q]) = head::select_one(&mut l, j as u32, q as u32, &sel);
                }
                for c in x0_p.iter_mut().skip(blk.end) {
                    *c = f32::NEG_INFINITY;
                }
                let x0: Vec<u32> = (0..t)
                    .map(|q| if mask_index[j][q] { x0[q] } else { x[j][q] })
                    .collect();
                let conf: Vec<f32> = (0..t)
                    .map(|q| {
                        if mask_index[j][q] {
                            x0_p[q]
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                // torch.topk over the whole row, ties to the lowest position.
                let mut order: Vec<usize> = (0..t).collect();
                order.sort_by(|&a, &b| head::conf_order((conf[a], a), (conf[b], b)));
                for &q in order.iter().take(ntt[j][i]) {
                    x[j][q] = x0[q];
                }
            }
        }
    }
    RefOut { x, nfe }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn schedule_examples_and_properties() {
    assert_eq!(num_transfer_tokens(10, 4), vec![3, 3, 2, 2]);
    assert_eq!(num_transfer_tokens(32, 32), vec![1; 32]);
    assert_eq!(num_transfer_tokens(2, 4), vec![1, 1, 0, 0]);
    assert_eq!(num_transfer_tokens(0, 2), vec![0, 0]);
    for n in 0..40 {
        for s in 1..12 {
            let v = num_transfer_tokens(n, s);
            assert_eq!(v.len(), s);
            assert_eq!(v.iter().sum::<usize>(), n, "n={n} s={s}");
            // The extra tokens go to the first steps: non-increasing, spread at most 1.
            assert!(v.windows(2).all(|w| w[0] >= w[1]), "n={n} s={s} {v:?}");
            assert!(v[0] - v[s - 1] <= 1, "n={n} s={s} {v:?}");
        }
    }
}

#[test]
fn matches_upstream_transliteration_on_random_settings() {
    let mut g = TestRng(20240611);
    for case in 0..250 {
        let bsz = g.range(1, 3);
        let mut prompts: Vec<Vec<u32>> = (0..bsz)
            .map(|_| (0..g.range(1, 6)).map(|_| g.below(14) as u32).collect())
            .collect();
        if g.chance(1, 2) {
            // Same lengths: no padding mask.
            let l = prompts[0].len();
            for pr in prompts.iter_mut() {
                pr.resize(l, 3);
            }
        }
        if g.chance(1, 5) {
            // A [MASK] inside a prompt: upstream fills it too.
            let j = g.below(bsz);
            let q = g.below(prompts[j].len());
            prompts[j][q] = MASK;
        }
        let num_blocks = g.range(1, 4);
        let block_length = g.range(1, 6);
        // steps ≤ gen_length (the engine's rule): at most block_length steps per block.
        let steps_per_block = g.range(1, block_length);
        let mut p = params(
            num_blocks * steps_per_block,
            num_blocks * block_length,
            block_length,
        );
        p.temperature = [0.0, 0.0, 0.7, 2.0][g.below(4)];
        p.cfg_scale = [0.0, 0.0, 0.5, 2.0][g.below(4)];
        p.remasking = if g.chance(1, 4) {
            Remasking::Random
        } else {
            Remasking::LowConfidence
        };
        p.seed = g.next();
        p.logits_eos_inf = g.chance(1, 3);
        p.confidence_eos_eot_inf = g.chance(1, 3);
        p.eot_id = if g.chance(1, 5) { None } else { Some(EOT) };
        p.logits_dtype = if g.chance(1, 2) {
            DType::BF16
        } else {
            DType::F32
        };
        // Sometimes the fake may predict [MASK] itself: leftovers must carry over like upstream.
        let mask_bias = if g.chance(1, 4) { 0.0 } else { -30.0 };
        let scale = [0.5, 3.0, 12.0][g.below(3)];

        let want = reference_generate(
            &*hash_logits(scale, mask_bias, p.logits_dtype),
            &prompts,
            &p,
        );
        let mut model = Recorder::new(LogitModel {
            f: hash_logits(scale, mask_bias, p.logits_dtype),
        });
        let got = generate(&mut model, &prompts, &p, None)
            .unwrap_or_else(|e| panic!("case {case}: {e:#}"));
        let lp = got.prompt_len_padded;
        let want_ids: Vec<Vec<u32>> = want.x.iter().map(|r| r[lp..].to_vec()).collect();
        assert_eq!(
            got.ids, want_ids,
            "case {case}: prompts {prompts:?} params {p:?} scale {scale} mask_bias {mask_bias}"
        );
        assert_eq!(got.nfe, want.nfe, "case {case}");
        assert_eq!(got.nfe, p.steps, "case {case}");
        assert_eq!(model.calls.len(), p.steps, "case {case}");
        // Prompt tokens and padding are never touched (a prompt [MASK] may be filled).
        let t = lp + p.gen_length;
        let x0 = &model.calls[0].x;
        for (j, row) in want.x.iter().enumerate() {
            for q in (0..lp).filter(|&q| x0[j * t + q] != MASK) {
                assert_eq!(row[q], x0[j * t + q], "case {case} row {j} q {q}");
            }
        }
    }
}

#[test]
fn block_boundaries_schedule_and_nfe() {
    // Confidences from a fixed pseudo-random table, so the commit order is scrambled.
    let conf = |r: u32, p: u32| rng::uniform(rng::cell_key(9, 0, 0, r as u64, p as u64)) as f32;
    let fake = Scripted {
        f: |r, p, _| ((r + p) % 10, conf(r, p)),
    };
    let mut rec = Recorder::new(fake);
    let prompts = vec![vec![1, 2, 3], vec![4, 5, 6, 7, 8]];
    let (gen_length, block_length, steps) = (12, 4, 9); // 3 blocks, 3 steps each.
    let p = params(steps, gen_length, block_length);
    let mut seen: Vec<Progress> = Vec::new();
    let mut cb = |pr: Progress| seen.push(pr);
    let out = generate(&mut rec, &prompts, &p, Some(&mut cb)).unwrap();
    let lp = 5;
    let t = lp + gen_length;
    assert_eq!(out.prompt_len_padded, lp);
    assert_eq!(out.nfe, steps);
    assert_eq!(rec.calls.len(), steps);
    assert_eq!(seen.len(), steps);
    for (i, pr) in seen.iter().enumerate() {
        let want = Progress {
            step: i + 1,
            total_steps: steps,
            block: i / 3,
            num_blocks: 3,
        };
        assert_eq!(*pr, want);
    }
    let per_step = commits(&rec.calls, &out);
    let sched = num_transfer_tokens(block_length, 3); // [2, 1, 1]
    assert_eq!(sched, vec![2, 1, 1]);
    for (s, call) in rec.calls.iter().enumerate() {
        let block = s / 3;
        let blk = lp + block * block_length..lp + (block + 1) * block_length;
        assert_eq!((call.b, call.t), (2, t));
        assert_eq!(call.select.step, s as u64);
        // Rows: exactly the current block of each row (everything before it is filled), the
        // same set at every step of the block.
        let want_rows: Vec<(u32, u32)> = (0..2u32)
            .flat_map(|r| blk.clone().map(move |q| (r, q as u32)))
            .collect();
        assert_eq!(call.rows, want_rows, "step {s}");
        // At the start of a block, everything before it is filled and everything from it on is
        // still [MASK].
        if s % 3 == 0 {
            for r in 0..2 {
                for q in lp..t {
                    assert_eq!(
                        call.x[r * t + q] == MASK,
                        q >= blk.start,
                        "step {s} row {r} q {q}"
                    );
                }
            }
        }
        // Each row commits sched[i] tokens, all in the current block, the most confident ones.
        for r in 0..2 {
            let c: Vec<usize> = per_step[s]
                .iter()
                .filter(|c| c.0 == r)
                .map(|c| c.1)
                .collect();
            assert_eq!(c.len(), sched[s % 3], "step {s} row {r}");
            assert!(c.iter().all(|q| blk.contains(q)), "step {s} row {r} {c:?}");
            let worst = c
                .iter()
                .map(|&q| conf(r as u32, q as u32))
                .fold(f32::INFINITY, f32::min);
            for q in blk.clone() {
                if call.x[r * t + q] == MASK && !c.contains(&q) {
                    assert!(conf(r as u32, q as u32) < worst, "step {s} row {r} q {q}");
                }
            }
        }
    }
    for (r, ids) in out.ids.iter().enumerate() {
        let want: Vec<u32> = (lp..t).map(|q| ((r + q) % 10) as u32).collect();
        assert_eq!(ids, &want);
    }
}

#[test]
fn more_steps_than_tokens_is_refused() {
    // steps per block (6) > block_length (4): upstream would run 2 passes per block that
    // commit nothing; `--steps 100000 --gen-length 8` would run for minutes. The engine refuses
    // steps > gen_length before any forward pass.
    let mut rec = Recorder::new(Scripted {
        f: |_, p, _| (p % 7, 0.5),
    });
    let e = generate(&mut rec, &[vec![1, 2]], &params(12, 8, 4), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("steps 12 is more than gen_length 8"), "{e}");
    assert!(rec.calls.is_empty(), "a forward pass ran before the check");
    // gen_length itself is bounded, so no schedule is allocated from a hostile one.
    let e = generate(&mut rec, &[vec![1, 2]], &params(8, 1 << 62, 8), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gen_length 4611686018427387904 is more than"),
        "{e}"
    );
    // steps = gen_length (one token per step) still runs.
    let out = generate(&mut rec, &[vec![1, 2]], &params(8, 8, 4), None).unwrap();
    assert_eq!(out.nfe, 8);
}

#[test]
fn equal_confidences_commit_lowest_position_first() {
    let mut rec = Recorder::new(Scripted {
        f: |_, p, _| (p % 10, 0.25),
    });
    let out = generate(&mut rec, &[vec![3, 3, 3]], &params(8, 8, 8), None).unwrap();
    let order: Vec<usize> = commits(&rec.calls, &out)
        .iter()
        .map(|c| {
            assert_eq!(c.len(), 1);
            c[0].1
        })
        .collect();
    assert_eq!(order, (3..11).collect::<Vec<_>>());

    // Higher confidence first: confidence rising with position commits right to left, and a
    // NaN confidence ranks last.
    let mut rec = Recorder::new(Scripted {
        f: |_, p, _| (p % 10, if p == 9 { f32::NAN } else { p as f32 }),
    });
    let out = generate(&mut rec, &[vec![3, 3, 3]], &params(8, 8, 8), None).unwrap();
    let order: Vec<usize> = commits(&rec.calls, &out).iter().map(|c| c[0].1).collect();
    assert_eq!(order, vec![10, 8, 7, 6, 5, 4, 3, 9]);
}

/// Token 1 wins the conditional logits; token 2 gains from the prompt (a 7 among the valid,
/// unmasked keys): with guidance the mixed logits un + (s+1)(cond − un) pick 2 once s is large
/// enough.
fn cfg_logits(x: &[u32], kv: Option<&[u8]>, _p: usize) -> Vec<f32> {
    let conditional = x
        .iter()
        .enumerate()
        .any(|(q, &v)| v == 7 && kv.map_or(true, |kv| kv[q] == 1));
    let mut l = vec![0f32; V];
    l[1] = 1.0;
    l[2] = if conditional { 0.9 } else { 0.0 };
    l[MASK as usize] = -30.0;
    l
}

#[test]
fn cfg_mixes_with_prompt_masked_uncond() {
    let prompts = vec![vec![7, 7], vec![7, 5, 5, 7]];
    let run = |scale: f64| {
        let mut rec = Recorder::new(LogitModel {
            f: Box::new(cfg_logits),
        });
        let mut p = params(4, 4, 2);
        p.cfg_scale = scale;
        let out = generate(&mut rec, &prompts, &p, None).unwrap();
        (out, rec.calls)
    };
    let (out, calls) = run(0.0);
    assert!(out.ids.iter().flatten().all(|&v| v == 1), "{:?}", out.ids);
    assert!(calls.iter().all(|c| c.uncond_x.is_none()));
    // s = 0.05: 1 vs 1.05·0.9 = 0.945 → still token 1.
    let (out, _) = run(0.05);
    assert!(out.ids.iter().flatten().all(|&v| v == 1), "{:?}", out.ids);
    // s = 1: 1 vs 2·0.9 = 1.8 → token 2.
    let (out, calls) = run(1.0);
    assert!(out.ids.iter().flatten().all(|&v| v == 2), "{:?}", out.ids);
    let lp = 4;
    for c in &calls {
        let u = c.uncond_x.as_ref().expect("uncond_x with cfg");
        for (i, (&uv, &xv)) in u.iter().zip(&c.x).enumerate() {
            // Prompt and its left padding masked, the generated part equal to x.
            let want = if i % c.t < lp { MASK } else { xv };
            assert_eq!(uv, want, "index {i}");
        }
        assert_eq!(
            c.key_valid.as_deref(),
            Some(&[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1][..])
        );
    }
}

#[test]
fn logits_eos_inf_never_emits_eos() {
    let eos_lover = || -> Box<LogitFn> {
        Box::new(|_x: &[u32], _kv: Option<&[u8]>, p: usize| {
            let mut l = vec![0f32; V];
            l[EOS as usize] = 8.0;
            l[MASK as usize] = -30.0;
            l[p % 10] = 1.0;
            l
        })
    };
    for temperature in [0.0, 1.0] {
        let mut p = params(8, 16, 8);
        p.temperature = temperature;
        let out = generate(&mut LogitModel { f: eos_lover() }, &[vec![1]], &p, None).unwrap();
        assert!(
            out.ids[0].iter().filter(|&&v| v == EOS).count() > 8,
            "{:?}",
            out.ids
        );
        p.logits_eos_inf = true;
        let out = generate(&mut LogitModel { f: eos_lover() }, &[vec![1]], &p, None).unwrap();
        assert!(
            out.ids[0].iter().all(|&v| v != EOS && v != MASK),
            "{:?}",
            out.ids
        );
    }
}

#[test]
fn confidence_eos_eot_inf_delays_eos_and_eot_to_block_end() {
    // Every third position is sure of EOS, the next of EOT; the rest are unsure of a word.
    let f = || -> Box<LogitFn> {
        Box::new(|_x: &[u32], _kv: Option<&[u8]>, p: usize| {
            let mut l = vec![0f32; V];
            match p % 3 {
                0 => l[EOS as usize] = 10.0,
                1 => l[EOT as usize] = 10.0,
                _ => l[p % 10] = 8.0,
            }
            l[MASK as usize] = -30.0;
            l
        })
    };
    let prompts = [vec![4, 4]];
    let (lp, bl) = (2, 6);
    for temperature in [0.0, 0.5] {
        let mut p = params(18, 18, bl);
        p.temperature = temperature;
        let special = |q: usize| q % 3 != 2;
        let mut rec = Recorder::new(LogitModel { f: f() });
        let out = generate(&mut rec, &prompts, &p, None).unwrap();
        let order: Vec<usize> = commits(&rec.calls, &out).iter().map(|c| c[0].1).collect();
        // Without the rule the sure EOS/EOT positions go first in each block.
        for block in order.chunks(bl) {
            assert!(block[..4].iter().all(|&q| special(q)), "{order:?}");
        }
        p.confidence_eos_eot_inf = true;
        let mut rec = Recorder::new(LogitModel { f: f() });
        let out = generate(&mut rec, &prompts, &p, None).unwrap();
        let order: Vec<usize> = commits(&rec.calls, &out).iter().map(|c| c[0].1).collect();
        for (b, block) in order.chunks(bl).enumerate() {
            let mut sorted = block.to_vec();
            sorted.sort();
            assert_eq!(sorted, (lp + b * bl..lp + (b + 1) * bl).collect::<Vec<_>>());
            // Words first, then EOS/EOT (confidence 0, so by position).
            assert!(block[..2].iter().all(|&q| !special(q)), "{order:?}");
            assert!(block[2..].iter().all(|&q| special(q)), "{order:?}");
            assert!(block[2..].windows(2).all(|w| w[0] < w[1]), "{order:?}");
        }
        // Delayed, not forbidden.
        for (i, &v) in out.ids[0].iter().enumerate() {
            let want = match (lp + i) % 3 {
                0 => EOS,
                1 => EOT,
                _ => ((lp + i) % 10) as u32,
            };
            assert_eq!(v, want, "position {}", lp + i);
        }
    }
}

#[test]
fn random_remasking_commits_in_rng_order() {
    let g = 10;
    let lp = 2;
    let mut orders = Vec::new();
    for seed in [1u64, 2, 1] {
        let mut p = params(g, g, g);
        p.remasking = Remasking::Random;
        p.seed = seed;
        let mut rec = Recorder::new(LogitModel {
            f: hash_logits(3.0, -30.0, DType::F32),
        });
        let out = generate(&mut rec, &[vec![5, 6]], &p, None).unwrap();
        let order: Vec<usize> = commits(&rec.calls, &out).iter().map(|c| c[0].1).collect();
        // Step s commits the still-masked position with the largest uniform keyed by
        // (seed, random-confidence stream, step, row 0, position).
        let mut masked: Vec<usize> = (lp..lp + g).collect();
        for (s, &q) in order.iter().enumerate() {
            let u = |q: usize| {
                let key = rng::cell_key(seed, rng::STREAM_RANDOM_CONF, s as u64, 0, q as u64);
                rng::uniform(rng::bits(key, 0)) as f32
            };
            let best = *masked
                .iter()
                .max_by(|&&a, &&b| head::conf_order((u(b), b), (u(a), a)))
                .unwrap();
            assert_eq!(q, best, "seed {seed} step {s}");
            masked.retain(|&m| m != q);
        }
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1]);
    assert_eq!(orders[0], orders[2]);
}

#[test]
fn temperature_sampling_is_seeded() {
    let run = |temperature: f64, seed: u64| {
        let mut p = params(8, 16, 8);
        p.temperature = temperature;
        p.seed = seed;
        let mut m = LogitModel {
            f: hash_logits(0.5, -30.0, DType::BF16),
        };
        p.logits_dtype = DType::BF16;
        generate(&mut m, &[vec![1, 2, 3], vec![4]], &p, None)
            .unwrap()
            .ids
    };
    assert_eq!(run(1.0, 7), run(1.0, 7));
    assert_ne!(run(1.0, 7), run(1.0, 8));
    assert_eq!(run(0.0, 7), run(0.0, 8));
    assert_ne!(run(0.0, 7), run(1.0, 7));
}

/// Prompts of different lengths (the longest, 6, sets the padded length), so a batch of them
/// is left-padded.
fn ragged_prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 2, 3],
        vec![4, 5, 6, 7, 8, 9],
        vec![10],
        vec![2, 2, 2, 2, 2, 2],
    ]
}

#[test]
fn left_padded_batch_rows_equal_single_prompts() {
    let prompts = ragged_prompts();
    for (cfg_scale, conf_rule) in [(0.0, false), (1.5, false), (0.0, true)] {
        let mut p = params(12, 12, 4);
        p.cfg_scale = cfg_scale;
        p.confidence_eos_eot_inf = conf_rule;
        let mut rec = Recorder::new(LogitModel {
            f: hash_logits(4.0, -30.0, DType::F32),
        });
        let batch = generate(&mut rec, &prompts, &p, None).unwrap();
        assert_eq!(batch.prompt_len_padded, 6);
        let kv = rec.calls[0].key_valid.as_ref().expect("padding mask");
        let t = 18;
        for (r, pr) in prompts.iter().enumerate() {
            for q in 0..t {
                assert_eq!(kv[r * t + q], u8::from(q >= 6 - pr.len()), "row {r} q {q}");
                if q < 6 - pr.len() {
                    assert_eq!(rec.calls[0].x[r * t + q], PAD);
                }
            }
        }
        for (r, pr) in prompts.iter().enumerate() {
            let mut rec = Recorder::new(LogitModel {
                f: hash_logits(4.0, -30.0, DType::F32),
            });
            let alone = generate(&mut rec, std::slice::from_ref(pr), &p, None).unwrap();
            assert!(rec.calls.iter().all(|c| c.key_valid.is_none()));
            assert_eq!(
                batch.ids[r], alone.ids[0],
                "row {r} cfg {cfg_scale} rule {conf_rule}"
            );
        }
    }
}

/// With per-prompt row keys, sampling (Gumbel noise, random remasking, CFG) gives each prompt
/// of a left-padded batch exactly what it gets alone with the same key, in any row; without
/// them the default keys (batch row, padded position) make the batch differ (so the test can
/// fail), and `row_keys: None` equals keying each row by its index with no padding.
#[test]
fn row_keys_make_sampling_independent_of_the_batch() {
    let mut prompts = ragged_prompts();
    prompts.push(vec![7, 3]);
    let keys = [17u32, 5, 0x7fff_ffff, 3, 40];
    let model = || LogitModel {
        f: hash_logits(4.0, -30.0, DType::F32),
    };
    let settings = [
        (0.8, 0.0, Remasking::LowConfidence),
        (0.0, 0.0, Remasking::Random),
        (1.3, 1.5, Remasking::Random),
    ];
    for (temp, cfg_scale, remasking) in settings {
        let mut p = params(12, 12, 4);
        p.temperature = temp;
        p.cfg_scale = cfg_scale;
        p.remasking = remasking;
        p.seed = 9;
        let what = format!("temp {temp} cfg {cfg_scale} {remasking:?}");
        let mut keyed = p.clone();
        keyed.row_keys = Some(keys.to_vec());
        let batch = generate(&mut model(), &prompts, &keyed, None).unwrap();
        // Reversed order: each prompt lands in another row with other padding.
        let rev: Vec<Vec<u32>> = prompts.iter().rev().cloned().collect();
        let mut rkeyed = p.clone();
        rkeyed.row_keys = Some(keys.iter().rev().copied().collect());
        let rbatch = generate(&mut model(), &rev, &rkeyed, None).unwrap();
        let plain = generate(&mut model(), &prompts, &p, None).unwrap();
        let mut differs = false;
        for (r, pr) in prompts.iter().enumerate() {
            let mut one = p.clone();
            one.row_keys = Some(vec![keys[r]]);
            let alone = generate(&mut model(), std::slice::from_ref(pr), &one, None).unwrap();
            assert_eq!(batch.ids[r], alone.ids[0], "row {r} {what}");
            assert_eq!(
                rbatch.ids[prompts.len() - 1 - r],
                alone.ids[0],
                "row {r} reversed {what}"
            );
            differs |= plain.ids[r] != alone.ids[0];
        }
        assert!(differs, "default keys gave the keyed results too ({what})");
        // Row 0 of an unpadded batch: row key 0 is the default key.
        let mut zero = p.clone();
        zero.row_keys = Some(vec![0]);
        assert_eq!(
            generate(&mut model(), &prompts[..1], &zero, None).unwrap(),
            generate(&mut model(), &prompts[..1], &p, None).unwrap(),
            "{what}"
        );
    }
    // Keys that do not fit: a clear error, not a panic.
    let mut p = params(4, 4, 4);
    p.row_keys = Some(vec![1]);
    let e = generate(&mut model(), &prompts, &p, None).unwrap_err();
    assert!(
        format!("{e:#}").contains("row_keys holds 1 keys for 5 prompts"),
        "{e:#}"
    );
    p.row_keys = Some(vec![1u32 << 31]);
    let e = generate(&mut model(), &prompts[..1], &p, None).unwrap_err();
    assert!(format!("{e:#}").contains("not below 2^31"), "{e:#}");
}

#[test]
fn select_params_follow_generate_params() {
    let mut rec = Recorder::new(Scripted {
        f: |_, p, _| (p % 10, 0.5),
    });
    let mut p = params(4, 4, 2);
    p.temperature = 0.3;
    p.seed = 99;
    p.logits_eos_inf = true;
    p.confidence_eos_eot_inf = true;
    p.logits_dtype = DType::BF16;
    p.remasking = Remasking::Random;
    generate(&mut rec, &[vec![1]], &p, None).unwrap();
    for (s, c) in rec.calls.iter().enumerate() {
        let sp = &c.select;
        assert_eq!(sp.step, s as u64);
        assert_eq!(sp.temperature, 0.3);
        assert_eq!(sp.seed, 99);
        assert_eq!(sp.forbid, Some(EOS));
        assert_eq!(sp.conf_suppress, [Some(EOS), Some(EOT)]);
        assert_eq!(sp.dtype, DType::BF16);
        assert_eq!(sp.remasking, Remasking::Random);
    }
    let mut rec = Recorder::new(Scripted {
        f: |_, p, _| (p % 10, 0.5),
    });
    generate(&mut rec, &[vec![1]], &params(4, 4, 2), None).unwrap();
    assert_eq!(rec.calls[0].select.forbid, None);
    assert_eq!(rec.calls[0].select.conf_suppress, [None, None]);
}

#[test]
fn mask_inside_prompt_is_filled() {
    let mut rec = Recorder::new(Scripted {
        f: |_, p, _| (p % 10, 1.0 / (1.0 + p as f32)),
    });
    let out = generate(&mut rec, &[vec![1, MASK, 3]], &params(4, 4, 4), None).unwrap();
    // The prompt [MASK] is a candidate from step 0 and, being most confident, goes first; the
    // block's schedule counts only the block's 4 masks, so one block position is left over…
    assert!(rec.calls[0].rows.contains(&(0, 1)));
    let fin = final_x(&rec.calls, &out);
    assert_eq!(fin[1], 1);
    // …and with one block it remains masked, exactly as upstream would leave it.
    assert_eq!(out.ids[0], vec![3, 4, 5, MASK]);
}

#[test]
fn impossible_settings_are_clear_errors() {
    let mut m = Scripted {
        f: |_, p, _| (p % 10, 0.5),
    };
    let err = |m: &mut dyn Predictor, prompts: &[Vec<u32>], p: &GenerateParams| {
        format!("{:#}", generate(m, prompts, p, None).unwrap_err())
    };
    let one = vec![vec![1, 2]];
    let e = err(&mut m, &one, &params(10, 10, 4));
    assert!(
        e.contains("gen_length 10") && e.contains("block_length 4"),
        "{e}"
    );
    let e = err(&mut m, &one, &params(5, 12, 4));
    assert!(e.contains("steps 5") && e.contains("blocks 3"), "{e}");
    let e = err(&mut m, &one, &params(0, 12, 4));
    assert!(e.contains("steps"), "{e}");
    let e = err(&mut m, &one, &params(4, 12, 0));
    assert!(e.contains("block_length"), "{e}");
    let e = err(&mut m, &one, &params(4, 0, 4));
    assert!(e.contains("gen_length"), "{e}");
    let e = err(&mut m, &[], &params(4, 4, 4));
    assert!(e.contains("no prompts"), "{e}");
    let e = err(&mut m, &[vec![1], vec![]], &params(4, 4, 4));
    assert!(e.contains("prompt 1 is empty"), "{e}");
    let mut p = params(4, 4, 4);
    p.pad_id = MASK;
    let e = err(&mut m, &one, &p);
    assert!(e.contains("pad_id 15") && e.contains("mask_id"), "{e}");
    let mut p = params(4, 16, 4);
    p.max_sequence_length = Some(20);
    let e = err(&mut m, &[vec![1; 8], vec![1; 5]], &p);
    assert!(
        e.contains("prompt length 8") && e.contains("gen_length 16") && e.contains("20"),
        "{e}"
    );
    p.max_sequence_length = Some(24);
    assert!(generate(&mut m, &[vec![1; 8]], &p, None).is_ok());

    // A failing forward pass names the step.
    struct Failing;
    impl Predictor for Failing {
        fn predict(&mut self, req: &PredictRequest<'_>, _: &mut [(u32, f32)]) -> Result<()> {
            if req.select.step == 2 {
                bail!("device lost");
            }
            Ok(())
        }
    }
    let e = err(&mut Failing, &one, &params(4, 4, 4));
    assert!(e.contains("step 2") && e.contains("device lost"), "{e}");
}

#[test]
fn no_allocation_per_step() {
    struct NoAlloc;
    impl Predictor for NoAlloc {
        fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()> {
            for (o, &(r, p)) in out.iter_mut().zip(req.rows) {
                let key = rng::cell_key(1, 0, req.select.step, r as u64, p as u64);
                *o = (p % 10, rng::uniform(key) as f32);
            }
            Ok(())
        }
    }
    let prompts = vec![vec![1, 2, 3], vec![4, 5]];
    let count = |steps: usize, cfg_scale: f64| {
        let mut p = params(steps, 32, 8);
        p.cfg_scale = cfg_scale;
        let mut calls = 0usize;
        let mut cb = |_: Progress| calls += 1;
        let before = allocs();
        let out = generate(&mut NoAlloc, &prompts, &p, Some(&mut cb));
        let n = allocs() - before;
        drop(out);
        assert_eq!(calls, steps);
        n
    };
    // 4 steps vs 32 steps: the same allocations (all before the loop, plus the outputs).
    assert_eq!(count(4, 0.0), count(32, 0.0));
    assert_eq!(count(4, 2.0), count(32, 2.0));
}
