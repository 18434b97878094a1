//! No allocation inside the denoising loop: the whole generation through the real model on the
//! CPU backend allocates (almost) the same number of times for 8 and for 32 steps — the work
//! per step differs, the buffers do not. "Almost": rayon's job injector allocates one block of
//! queue slots per ~63 parallel calls it receives, so the count grows by a few over hundreds of
//! ops; one allocation per step anywhere in our code would add at least 24.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use llada::backend::cpu::CpuBackend;
use llada::engine::model::Model;
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::generate;
use llada::hf::dtype::DType;
use llada::hf::presets;

mod common;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarding to the system allocator with the caller's layout.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` above with the same layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The tests count allocations process-wide, so they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes the lock and pins rayon to one thread: its pool would otherwise allocate on its own
/// schedule.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .ok();
    g
}

#[test]
fn generation_allocates_the_same_for_8_and_32_steps() {
    let _g = serial();
    check_steps(&common::tiny_model(CpuBackend::new(DType::BF16), 3), false);
}

/// The same with whole steps on the device (`LLADA_STEP_GRAPH=1`): the step buffers are made
/// once per workspace, a block's tables are staged in storage grown once.
#[test]
fn step_graph_generation_allocates_the_same_for_8_and_32_steps() {
    let _g = serial();
    check_steps(&common::tiny_model(CpuBackend::new(DType::BF16), 3), true);
}

/// The same with FP8 linear layers (activations quantized per token into thread-local scratch).
#[test]
fn fp8_generation_allocates_the_same_for_8_and_32_steps() {
    let _g = serial();
    let cfg = presets::preset_config("tiny").unwrap();
    let ck = presets::preset_checkpoint("tiny", 3, DType::BF16).unwrap();
    let m = Model::load_fp8(
        CpuBackend::new(DType::BF16),
        cfg.clone(),
        |n| ck.get(n).cloned(),
        |n| llada::quant::fp8_weight(&ck, n),
    )
    .unwrap();
    check_steps(&m, false);
}

fn check_steps(m: &Model<CpuBackend>, step_graph: bool) {
    let cfg = &m.cfg;
    let prompts = vec![(1..20).collect::<Vec<u32>>()];
    let run = |steps: usize| {
        let p = common::gen_params(cfg, steps, 32, 8);
        let mut pred = ModelPredictor::new(m);
        pred.set_step_graph(step_graph);
        let before = ALLOCS.load(Ordering::Relaxed);
        let out = generate(&mut pred, &prompts, &p, None).unwrap();
        let n = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(out.nfe, steps);
        n
    };
    run(8); // warm anything lazily initialised
    let a = run(8);
    let b = run(32);
    eprintln!("allocations: 8 steps {a}, 32 steps {b}");
    assert!(
        b < a + (32 - 8) / 3,
        "allocations grow with the number of steps: {a} for 8 steps, {b} for 32"
    );
}
