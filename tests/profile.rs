//! The per-op-class profiling plumbing (`Backend::prof_mark` / `prof_take`, used by
//! `llada-bench --breakdown`) on the CPU backend, where intervals are wall-clock `Instant`s.

use std::time::{Duration, Instant};

use llada::backend::cpu::CpuBackend;
use llada::backend::{Backend, OpClass};
use llada::engine::fast::{generate_fast, CacheMode, Decode};
use llada::engine::model::Model;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{generate, GenerateParams};
use llada::hf::dtype::DType;

mod common;

fn tiny() -> Model<CpuBackend> {
    common::tiny_model(CpuBackend::new(DType::BF16), 3)
}

fn params(m: &Model<CpuBackend>) -> GenerateParams {
    common::gen_params(&m.cfg, 4, 16, 8)
}

#[test]
fn marks_charge_intervals_to_their_class_and_take_resets() {
    let be = CpuBackend::new(DType::BF16);
    // Off: marks are ignored.
    be.prof_mark(Some(OpClass::Gemm));
    be.prof_mark(None);
    assert!(be.prof_take().unwrap().is_empty());
    assert!(!be.prof_enabled());

    be.prof_enable(true);
    assert!(be.prof_enabled());
    be.prof_mark(Some(OpClass::Gemm));
    std::thread::sleep(Duration::from_millis(30));
    be.prof_mark(Some(OpClass::Attention));
    std::thread::sleep(Duration::from_millis(10));
    be.prof_mark(None);
    // Closed: this sleep is charged to nobody.
    std::thread::sleep(Duration::from_millis(40));
    let p = be.prof_take().unwrap();
    let get = |c| p.iter().find(|(k, _)| *k == c).map(|(_, ms)| *ms);
    let gemm = get(OpClass::Gemm).expect("gemm interval missing");
    let att = get(OpClass::Attention).expect("attention interval missing");
    assert_eq!(p.len(), 2, "{p:?}");
    // Sleeps last at least their duration; the closed 40 ms must not be charged anywhere.
    assert!((30.0..70.0).contains(&gemm), "gemm {gemm} ms");
    assert!((10.0..40.0).contains(&att), "attention {att} ms");
    assert!(be.prof_take().unwrap().is_empty(), "take did not reset");
}

/// Profile a whole generation: the classes add up to about the wall time of the generation
/// (everything between the first upload and the last read-back of each step is charged; the
/// sampler's host work between steps is not), and every class the forward runs shows up.
fn check_generation(mode: &str) {
    let m = tiny();
    let p = params(&m);
    let prompts = vec![(0..24u32).map(|i| i * 7 % 300).collect::<Vec<_>>()];
    m.backend.prof_enable(true);
    let t0 = Instant::now();
    let out = if mode == "none" {
        generate(&mut ModelPredictor::new(&m), &prompts, &p, None).unwrap()
    } else {
        let d = Decode {
            cache: mode.parse::<CacheMode>().unwrap(),
            ..Decode::default()
        };
        generate_fast(&mut ModelPredictor::new(&m), &prompts, &p, &d, None).unwrap()
    };
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let prof = m.backend.prof_take().unwrap();
    m.backend.prof_enable(false);
    assert!(out.nfe > 0);
    for c in OpClass::ALL {
        assert!(
            prof.iter().any(|(k, ms)| *k == c && *ms >= 0.0),
            "{mode}: class {c} missing from {prof:?}"
        );
    }
    let sum: f64 = prof.iter().map(|(_, ms)| ms).sum();
    // The charged intervals are disjoint sub-intervals of the generation: never more than the
    // wall time; the forward passes dominate a CPU generation, so at least 80% of it.
    assert!(
        sum <= wall * 1.001 + 0.1,
        "{mode}: classes sum to {sum} ms > wall {wall} ms"
    );
    assert!(
        sum >= 0.8 * wall,
        "{mode}: classes sum to {sum} ms, under 80% of the wall {wall} ms: {prof:?}"
    );
    eprintln!("{mode}: wall {wall:.2} ms, profiled {sum:.2} ms: {prof:?}");
}

#[test]
fn generation_breakdown_sums_to_the_wall_time() {
    check_generation("none");
}

#[test]
fn cached_generation_breakdown_sums_to_the_wall_time() {
    check_generation("dual");
}

#[test]
fn profiling_does_not_change_results() {
    let m = tiny();
    let p = params(&m);
    let prompts = vec![(0..20u32).map(|i| i * 11 % 300).collect::<Vec<_>>()];
    let plain = generate(&mut ModelPredictor::new(&m), &prompts, &p, None).unwrap();
    m.backend.prof_enable(true);
    let profiled = generate(&mut ModelPredictor::new(&m), &prompts, &p, None).unwrap();
    m.backend.prof_enable(false);
    assert_eq!(plain.ids, profiled.ids);
}
