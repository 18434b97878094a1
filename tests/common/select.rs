//! Host-select against device-select (`LLADA_DEVICE_SELECT`), and fused glue against unfused
//! (`LLADA_FUSED`): the same model generates with the
//! commit selection on the host and on its backend (`Backend::commit_select`); the outputs must
//! be identical, every step, in every decoding mode. Shared by tests/device_select.rs (CPU
//! backend, runs everywhere) and tests/cuda_parity.rs (the CUDA kernel, needs a GPU).

use llada::backend::head::Remasking;
use llada::backend::Backend;
use llada::engine::fast::{generate_fast, CacheMode, Decode};
use llada::engine::model::Model;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{generate, GenerateOutput, GenerateParams};

/// Every decoding the sampler has, as (name, params change, decode): plain `generate` with and
/// without CFG, sampling and random remasking (the plain path keeps committed rows in the request,
/// so the device must skip them), then Fast-dLLM with each cache and each rule.
pub fn cases(base: &GenerateParams) -> Vec<(String, GenerateParams, Decode)> {
    // Plain generate: (cfg_scale, temperature, remasking).
    let plain = [
        (0.0, 0.0, Remasking::LowConfidence),
        (1.5, 0.0, Remasking::LowConfidence),
        (0.0, 0.8, Remasking::LowConfidence),
        (0.0, 0.0, Remasking::Random),
    ];
    let mut out: Vec<_> = plain
        .into_iter()
        .map(|(cfg_scale, temperature, remasking)| {
            let name = format!("generate cfg {cfg_scale} temp {temperature} {remasking:?}");
            let mut p = base.clone();
            (p.cfg_scale, p.temperature, p.remasking, p.seed) =
                (cfg_scale, temperature, remasking, 5);
            (name, p, Decode::default())
        })
        .collect();
    for cache in [CacheMode::None, CacheMode::Prefix, CacheMode::Dual] {
        for (threshold, factor) in [(None, None), (Some(0.3), None), (None, Some(1.0))] {
            let d = Decode {
                cache,
                threshold,
                factor,
            };
            let name = format!("fast {cache} threshold {threshold:?} factor {factor:?}");
            out.push((name, base.clone(), d));
        }
    }
    out
}

/// Runs one case with the selection on the host (`device = false`) or the backend.
pub fn run<B: Backend>(
    m: &Model<B>,
    prompts: &[Vec<u32>],
    p: &GenerateParams,
    d: &Decode,
    device: bool,
) -> GenerateOutput {
    let mut pred = ModelPredictor::new(m);
    pred.set_device_select(device);
    if d.is_plain() {
        generate(&mut pred, prompts, p, None).unwrap()
    } else {
        generate_fast(&mut pred, prompts, p, d, None).unwrap()
    }
}

/// Asserts host-select and device-select agree on every case (ids, forward passes, rows); returns
/// how many generated tokens were compared, so a caller can check the run did real work.
pub fn assert_paths_agree<B: Backend>(
    m: &Model<B>,
    prompts: &[Vec<u32>],
    base: &GenerateParams,
) -> usize {
    assert_runs_agree((m, false), (m, true), prompts, base)
}

/// Asserts two (model, device-select) runs agree on every case: the same model selecting on the
/// host and the device, or a model with fused glue (`Model::set_fused`) against one without.
pub fn assert_runs_agree<B: Backend>(
    a: (&Model<B>, bool),
    b: (&Model<B>, bool),
    prompts: &[Vec<u32>],
    base: &GenerateParams,
) -> usize {
    let mut compared = 0;
    for (what, p, d) in cases(base) {
        let host = run(a.0, prompts, &p, &d, a.1);
        let dev = run(b.0, prompts, &p, &d, b.1);
        assert_eq!(host, dev, "{what}: the two runs differ");
        // The model may predict the mask id itself (the sampler then leaves it), so count the
        // real tokens: most of them must be.
        let total: usize = host.ids.iter().map(Vec::len).sum();
        let real = host
            .ids
            .iter()
            .flatten()
            .filter(|&&t| t != p.mask_id)
            .count();
        assert!(
            2 * real > total,
            "{what}: only {real} of {total} tokens were filled"
        );
        compared += total;
    }
    compared
}
