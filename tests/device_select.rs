//! The step's commit selection on the backend (`LLADA_DEVICE_SELECT=1`,
//! `Backend::commit_select`) and whole steps on the backend (`LLADA_STEP_GRAPH=1`: the schedule,
//! the step counter and the tokens in device memory, `Backend::step_advance`) against the
//! sampler's host selection, on the CPU backend: all run `backend::commit::commit_select`, so any
//! difference is in the plumbing (segment offsets, quotas, the schedule table, the RNG step,
//! which requested rows are still candidates, the commits written back, the masks counted). The
//! CUDA kernels' own checks are in tests/cuda_parity.rs. Also the fused glue switch
//! (`LLADA_FUSED=1`) against the unfused ops.

mod common;

use common::select::Select;

use llada::backend::commit::CommitRule;
use llada::backend::cpu::CpuBackend;
use llada::backend::head::{Remasking, SelectParams};
use llada::backend::Backend;
use llada::engine::fast::Decode;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{BlockPlan, Commits, Hooks, MasksLeft, PredictRequest, Predictor};
use llada::engine::sampler::{Progress, SelectsCommits};
use llada::hf::dtype::DType;

fn prompts() -> Vec<Vec<u32>> {
    // Different lengths: left padding and a key mask; a [MASK] inside the first prompt, which
    // the plain path must fill too.
    vec![
        vec![5, 17, 3, 9, 250, 12, 40],
        vec![31, 8, 77],
        vec![2, 4, 6, 8, 10, 12, 14, 16, 18],
    ]
}

#[test]
fn device_select_equals_host_select_in_every_mode() {
    let m = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let mut prompts = prompts();
    prompts[0][2] = m.cfg.mask_token_id;
    let base = common::gen_params(&m.cfg, 12, 24, 8);
    let n = common::select::assert_paths_agree(&m, &prompts, &base, Select::Device);
    assert_eq!(n, common::select::cases(&base).len() * prompts.len() * 24);
}

/// A request over the one batch row `x`, asking for `rows`.
fn one_row<'a>(
    x: &'a [u32],
    rows: &'a [(u32, u32)],
    select: &'a SelectParams,
) -> PredictRequest<'a> {
    PredictRequest {
        b: 1,
        t: x.len(),
        x,
        uncond_x: None,
        key_valid: None,
        rows,
        select,
        row_keys: None,
    }
}

#[test]
fn device_select_refuses_unsorted_rows_and_short_quotas() {
    let m = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let mask = m.cfg.mask_token_id;
    let mut pred = ModelPredictor::new(&m);
    pred.set_device_select(true);
    assert!(pred.commit_selector().is_some());
    let x = vec![1, mask, mask, mask];
    let select = common::gen_params(&m.cfg, 1, 1, 1).select_params(0);
    let req = |rows| one_row(&x, rows, &select);
    let mut out = [0i32; 3];
    let mut c = Commits {
        seg: &[0, 3],
        quota: &[2],
        rule: CommitRule::Quota,
        mask_id: mask,
        out: &mut out,
    };
    let e = pred
        .predict_commit(&req(&[(0, 2), (0, 1), (0, 3)]), &mut c)
        .unwrap_err();
    assert!(format!("{e:#}").contains("sorted"), "{e:#}");
    c.quota = &[];
    let e = pred
        .predict_commit(&req(&[(0, 1), (0, 2), (0, 3)]), &mut c)
        .unwrap_err();
    assert!(format!("{e:#}").contains("quotas"), "{e:#}");
    // A good request commits exactly the quota among the three masks.
    c.quota = &[2];
    pred.predict_commit(&req(&[(0, 1), (0, 2), (0, 3)]), &mut c)
        .unwrap();
    assert_eq!(out.iter().filter(|&&c| c >= 0).count(), 2, "{out:?}");
    let v = m.cfg.embedding_size as i32;
    assert!(out.iter().all(|&c| c < v), "{out:?}");
    let _ = m.backend.name();
}

/// `LLADA_FUSED=1` (`Model::set_fused`): the cached steps run RoPE and the cache store as one
/// op (`Backend::rope_kv_store`; on the CPU its default, the two ops in turn) and skip the
/// separate store: generation must not change, in any mode (the plain ones have no cache and
/// must be untouched too). Would fail if the fused path forgot the store.
#[test]
fn fused_glue_equals_unfused_in_every_mode() {
    let plain = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let mut fused = common::sharp_tiny(CpuBackend::new(DType::BF16));
    fused.set_fused(true);
    let base = common::gen_params(&plain.cfg, 12, 24, 8);
    let n = common::select::assert_runs_agree(
        (&plain, Select::Host),
        (&fused, Select::Device),
        &prompts(),
        &base,
    );
    assert!(n > 0);
}

/// `LLADA_STEP_GRAPH=1` (`ModelPredictor::set_step_graph`) against the host selection in every
/// mode (plain `generate` with CFG, sampling, random remasking; Fast-dLLM without a cache, and
/// with the prefix and dual caches from each block's second call on), for schedules that do
/// and do not divide the block (odd lengths), with sampling in the Fast-dLLM modes too (the
/// RNG step comes from device memory) and with per-prompt row keys (the per-block step counter).
/// The predictor panics on a per-step call where whole steps apply without a cache, so the
/// device path is the one compared.
#[test]
fn step_graph_equals_host_select_in_every_mode() {
    let m = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let mut prompts = prompts();
    prompts[0][2] = m.cfg.mask_token_id;
    let mut compared = 0;
    // (steps, gen_length, block_length): 3 per block of 8; 3 per block of 8 as [3, 3, 2];
    // 3 per block of 7 as [3, 2, 2].
    for (i, (steps, gen, block)) in [(12, 24, 8), (9, 24, 8), (6, 14, 7)]
        .into_iter()
        .enumerate()
    {
        let mut base = common::gen_params(&m.cfg, steps, gen, block);
        if i == 1 {
            (base.temperature, base.seed) = (0.7, 11);
            base.row_keys = Some(vec![3, 9, 4]);
        }
        if i == 2 {
            (base.remasking, base.seed) = (Remasking::Random, 12);
        }
        compared += common::select::assert_paths_agree(&m, &prompts, &base, Select::StepGraph);
    }
    assert!(compared > 0);
}

/// With an observer, the step graph reads the tokens back before every step: the observer sees
/// exactly what it sees on the host path, step by step, and the progress reports agree.
#[test]
fn step_graph_observer_and_progress_see_every_step() {
    let m = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let base = common::gen_params(&m.cfg, 9, 24, 8);
    let fast = Decode {
        threshold: Some(0.3),
        ..Decode::default()
    };
    for d in [Decode::default(), fast] {
        let trace = |sel| {
            let mut seen: Vec<Vec<u32>> = Vec::new();
            let mut steps: Vec<Progress> = Vec::new();
            let mut observe = |x: &[u32], _: usize, _: usize| {
                seen.push(x.to_vec());
                Ok(())
            };
            let mut progress = |p: Progress| steps.push(p);
            let hooks = Hooks {
                progress: Some(&mut progress),
                observe: Some(&mut observe),
            };
            let out = common::select::run_hooked(&m, &prompts(), (&base, &d), sel, hooks);
            (out, seen, steps)
        };
        let host = trace(Select::Host);
        let dev = trace(Select::StepGraph);
        assert!(host.1.len() > 3 && host.1[0] != host.1[2], "weak trace");
        assert_eq!(host.1, dev.1, "{d:?}: the observer saw different tokens");
        assert_eq!(host.2, dev.2, "{d:?}: the progress reports differ");
        assert_eq!(host.0, dev.0, "{d:?}: the outputs differ");
    }
}

/// A block whose requested rows are not sorted, or whose segments do not match them, or whose
/// schedule does not fit the batch, is refused with an error naming the problem.
#[test]
fn step_graph_refuses_bad_blocks() {
    let m = common::sharp_tiny(CpuBackend::new(DType::BF16));
    let mut pred = ModelPredictor::new(&m);
    pred.set_step_graph(true);
    let mask = m.cfg.mask_token_id;
    assert!(
        pred.commit_selector().is_some(),
        "step graphs imply device select"
    );
    let dev = Predictor::steps_on_device(&mut pred).expect("step graphs on");
    let x = vec![1, mask, mask, mask];
    let select = common::gen_params(&m.cfg, 1, 1, 1).select_params(0);
    let req = |rows| one_row(&x, rows, &select);
    let plan = |seg, sched| BlockPlan {
        seg,
        sched,
        steps: 2,
        first: 0,
        rule: CommitRule::Quota,
        mask_id: mask,
        block: 1..4,
    };
    let e = dev.begin_block(&req(&[(0, 2), (0, 1), (0, 3)]), &plan(&[0, 3], &[2, 1]));
    assert!(format!("{:#}", e.unwrap_err()).contains("sorted"));
    let e = dev.begin_block(&req(&[(0, 1), (0, 2), (0, 3)]), &plan(&[0, 2], &[2, 1]));
    assert!(format!("{:#}", e.unwrap_err()).contains("segment offsets"));
    let e = dev.begin_block(&req(&[(0, 1), (0, 2), (0, 3)]), &plan(&[0, 3], &[2]));
    assert!(format!("{:#}", e.unwrap_err()).contains("schedule"));
    assert!(dev.step(false).is_err(), "a step without a block must fail");
    // A good block: two steps commit 2 then 1 token; the counts say so.
    dev.begin_block(&req(&[(0, 1), (0, 2), (0, 3)]), &plan(&[0, 3], &[2, 1]))
        .unwrap();
    let left = dev.step(true).unwrap().unwrap();
    assert_eq!(left, MasksLeft { block: 1, rows: 1 });
    let left = dev.step(true).unwrap().unwrap();
    assert_eq!(left, MasksLeft { block: 0, rows: 0 });
    let mut got = vec![0u32; 4];
    dev.read_tokens(&mut got).unwrap();
    assert_eq!(got[0], 1);
    assert!(got[1..].iter().all(|&t| t != mask), "{got:?}");
}
