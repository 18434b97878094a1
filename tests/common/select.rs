//! Host-select against device-select (`LLADA_DEVICE_SELECT`) and whole steps on the device
//! (`LLADA_STEP_GRAPH`), and fused glue against unfused (`LLADA_FUSED`): the same model
//! generates with the commit selection on the host and on its backend (`Backend::commit_select`,
//! one call per step or in whole device steps); the outputs must be identical, every step, in
//! every decoding mode. Shared by tests/device_select.rs (CPU
//! backend, runs everywhere) and tests/cuda_parity.rs (the CUDA kernel, needs a GPU).

use llada::backend::head::Remasking;
use llada::backend::Backend;
use llada::engine::fast::{generate_fast_hooked, CacheMode, Decode};
use llada::engine::model::Model;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{generate_hooked, GenerateOutput, GenerateParams, Hooks};
use llada::engine::sampler::{PredictRequest, Predictor, SpanPredictor};
use llada::engine::sampler::{SpanRequest, StepsOnDevice};

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

/// Where a generation makes each step's commit selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Select {
    /// The sampler, on the host (the default).
    Host,
    /// The backend, one call per step (`LLADA_DEVICE_SELECT=1`).
    Device,
    /// Whole steps on the backend (`LLADA_STEP_GRAPH=1`); the predictor is wrapped so that a
    /// plain per-step call fails where a whole-step path exists (no KV cache).
    StepGraph,
}

/// A model predictor whose per-step calls panic, except the full pass that opens each block of
/// Fast-dLLM with a KV cache (`cached`; counted in `per_step`, answered on the host): a
/// generation through it must run every other call as whole device steps.
pub struct OnlySteps<'p, 'm, B: Backend> {
    pub inner: &'p mut ModelPredictor<'m, B>,
    pub cached: bool,
    pub per_step: usize,
}

impl<B: Backend> Predictor for OnlySteps<'_, '_, B> {
    fn predict(&mut self, _: &PredictRequest<'_>, _: &mut [(u32, f32)]) -> anyhow::Result<()> {
        panic!("a per-step predict call in step-graph mode")
    }
    fn steps_on_device(&mut self) -> Option<&mut dyn StepsOnDevice> {
        Predictor::steps_on_device(self.inner)
    }
}

impl<B: Backend> SpanPredictor for OnlySteps<'_, '_, B> {
    fn predict_span(&mut self, q: &SpanRequest<'_>, o: &mut [(u32, f32)]) -> anyhow::Result<()> {
        assert!(
            self.cached && (q.q0, q.q1) == (0, q.t),
            "a per-step predict_span over [{}, {}) in step-graph mode (cached: {})",
            q.q0,
            q.q1,
            self.cached
        );
        self.per_step += 1;
        self.inner.predict_span(q, o)
    }
    fn steps_on_device(&mut self) -> Option<&mut dyn StepsOnDevice> {
        SpanPredictor::steps_on_device(self.inner)
    }
}

/// Runs one case with the selection `sel`, with `hooks`.
pub fn run_hooked<B: Backend>(
    m: &Model<B>,
    prompts: &[Vec<u32>],
    (p, d): (&GenerateParams, &Decode),
    sel: Select,
    hooks: Hooks<'_>,
) -> GenerateOutput {
    let mut pred = ModelPredictor::new(m);
    pred.set_device_select(sel == Select::Device);
    pred.set_step_graph(sel == Select::StepGraph);
    let out = if sel == Select::StepGraph {
        let cached = d.cache != CacheMode::None;
        let mut only = OnlySteps {
            inner: &mut pred,
            cached,
            per_step: 0,
        };
        let out = if d.is_plain() {
            generate_hooked(&mut only, prompts, p, hooks)
        } else {
            generate_fast_hooked(&mut only, prompts, p, d, hooks)
        };
        // With a cache, only each block's opening full pass is a per-step call.
        let blocks = p.gen_length / p.block_length;
        assert_eq!(only.per_step, if cached { blocks } else { 0 }, "{d:?}");
        out
    } else if d.is_plain() {
        generate_hooked(&mut pred, prompts, p, hooks)
    } else {
        generate_fast_hooked(&mut pred, prompts, p, d, hooks)
    };
    out.unwrap()
}

/// Runs one case with the selection `sel`.
pub fn run<B: Backend>(
    m: &Model<B>,
    prompts: &[Vec<u32>],
    p: &GenerateParams,
    d: &Decode,
    sel: Select,
) -> GenerateOutput {
    run_hooked(m, prompts, (p, d), sel, Hooks::default())
}

/// Asserts host-select and `sel` agree on every case (ids, forward passes, rows); returns how
/// many generated tokens were compared, so a caller can check the run did real work.
pub fn assert_paths_agree<B: Backend>(
    m: &Model<B>,
    prompts: &[Vec<u32>],
    base: &GenerateParams,
    sel: Select,
) -> usize {
    assert_runs_agree((m, Select::Host), (m, sel), prompts, base)
}

/// Asserts two (model, selection) runs agree on every case: the same model selecting on the
/// host and the device, or a model with fused glue (`Model::set_fused`) against one without.
pub fn assert_runs_agree<B: Backend>(
    a: (&Model<B>, Select),
    b: (&Model<B>, Select),
    prompts: &[Vec<u32>],
    base: &GenerateParams,
) -> usize {
    let mut compared = 0;
    for (what, p, d) in cases(base) {
        let host = run(a.0, prompts, &p, &d, a.1);
        let dev = run(b.0, prompts, &p, &d, b.1);
        assert_eq!(
            host, dev,
            "{what}: the two runs differ ({:?} vs {:?})",
            a.1, b.1
        );
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
