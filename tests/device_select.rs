//! The step's commit selection on the backend (`LLADA_DEVICE_SELECT=1`,
//! `Backend::commit_select`) against the sampler's host selection, on the CPU backend: both
//! run `backend::commit::commit_select`, so any difference is in the plumbing (segment offsets,
//! quotas, which requested rows are still candidates, the commits written back). The CUDA
//! kernel's own check is tests/cuda_parity.rs. Also the fused glue switch (`LLADA_FUSED=1`)
//! against the unfused ops.

mod common;

use llada::backend::commit::CommitRule;
use llada::backend::cpu::CpuBackend;
use llada::backend::Backend;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{Commits, PredictRequest, Predictor, SelectsCommits};
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
    let n = common::select::assert_paths_agree(&m, &prompts, &base);
    assert_eq!(n, common::select::cases(&base).len() * prompts.len() * 24);
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
    let req = |rows| PredictRequest {
        b: 1,
        t: 4,
        x: &x,
        uncond_x: None,
        key_valid: None,
        rows,
        select: &select,
        row_keys: None,
    };
    let mut out = [0i32; 3];
    let mut c = Commits {
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
    let n = common::select::assert_runs_agree((&plain, false), (&fused, true), &prompts(), &base);
    assert!(n > 0);
}
