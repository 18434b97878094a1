//! Data-parallel training on GPUs through NCCL.
//!
//! - one GPU: a run of world size 1 with its NCCL communicator and TCP group attached takes
//!   exactly the steps of a plain GPU run (an NCCL sum over one rank is the identity, so the
//!   whole data-parallel path — all-reduces of the statistics and of the device gradients — must
//!   leave every bit unchanged);
//! - two or more GPUs: `llada train --device cuda` as two processes equals one process with the
//!   global batch.
//!
//! Without a GPU the tests print `SKIP: <why>` (a failure under `LLADA_REQUIRE_GPU=1`); without
//! NCCL (`LLADA_NCCL_LIB` or `libnccl.so.2` on the library path) they print `SKIP` too, a failure
//! under `LLADA_REQUIRE_NCCL=1`. The multi-GPU test skips on machines with one GPU.

#[path = "common/cmp.rs"]
mod cmp;

use std::path::PathBuf;
use std::process::Command;

use llada::hf::config::ModelConfig;
use llada::train::cuda::{CudaOps, CudaTrainState, CudaZeroState};
use llada::train::data::Sample;
use llada::train::dist::{HostGroup, JobKey};
use llada::train::model::Params;
use llada::train::{nccl, StepStats, TrainOptions, Trainer};

fn skip_or_fail(var: &str, why: String) {
    if std::env::var(var).is_ok_and(|v| v == "1") {
        panic!("{var}=1 but {why}");
    }
    eprintln!("SKIP: {why}");
}

fn gpu() -> Option<CudaOps> {
    let r = llada::engine::device::cuda_available()
        .map_err(anyhow::Error::msg)
        .and_then(|()| CudaOps::new(0));
    match r {
        Ok(b) => Some(b),
        Err(e) => {
            skip_or_fail("LLADA_REQUIRE_GPU", format!("no usable GPU: {e:#}"));
            None
        }
    }
}

fn nccl_ok() -> bool {
    match nccl::version() {
        Ok((v, path)) => {
            eprintln!("NCCL {v} from {path}");
            true
        }
        Err(e) => {
            skip_or_fail("LLADA_REQUIRE_NCCL", format!("NCCL does not load: {e:#}"));
            false
        }
    }
}

fn tiny() -> ModelConfig {
    llada::hf::presets::preset_config("tiny").unwrap()
}

fn tiny_params(cfg: &ModelConfig) -> Params<f32> {
    let mut p = Params::<f32>::zeros(cfg);
    for (i, d) in p.data.iter_mut().enumerate() {
        let key = llada::rng::cell_key(0xD15, 1, i as u64, 0, 0);
        for (j, x) in d.iter_mut().enumerate() {
            let u = llada::rng::uniform(llada::rng::bits(key, j as u64)) as f32;
            *x = 0.2 * u - 0.1;
        }
        if p.shapes[i].len() == 1 {
            d.iter_mut().for_each(|x| *x += 1.0);
        }
    }
    p
}

fn samples() -> Vec<Sample> {
    (0..5)
        .map(|s| Sample {
            ids: (0..32).map(|i| ((s * 131 + i * 17) % 500) as u32).collect(),
            prompt_len: 0,
        })
        .collect()
}

fn opts() -> TrainOptions {
    TrainOptions {
        steps: 3,
        batch_size: 2,
        accum: 2,
        seq_len: 32,
        lr: 1e-3,
        warmup: 1,
        schedule: "constant".into(),
        weight_decay: 0.1,
        clip: 1.0,
        seed: 9,
        sft: false,
        truncate: false,
        world: 1,
    }
}

/// Three steps of the plain GPU run (no group): its statistics, and the trainer with the
/// weights and moments pulled back; `None` (a printed SKIP) without a GPU or NCCL.
fn plain_gpu_run() -> Option<(Vec<StepStats>, Trainer)> {
    let ops = gpu()?;
    if !nccl_ok() {
        return None;
    }
    let cfg = tiny();
    let mut plain = Trainer::new(cfg.clone(), tiny_params(&cfg), opts(), samples()).unwrap();
    let mut st = CudaTrainState::new(ops, &plain.params, &plain.opt.m, &plain.opt.v).unwrap();
    let a: Vec<_> = (0..3)
        .map(|_| plain.train_step_cuda(&mut st).unwrap())
        .collect();
    plain.pull_from_cuda(&st).unwrap();
    Some((a, plain))
}

/// The same run's trainer as rank 0 of 1, with its TCP group joined.
fn world_of_one() -> Trainer {
    let cfg = tiny();
    let mut dp = Trainer::new(cfg.clone(), tiny_params(&cfg), opts(), samples()).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let secs = std::time::Duration::from_secs(30);
    let key = JobKey::from_secret(b"a test job secret", None);
    let fp = dp.options_fingerprint().unwrap();
    let g = HostGroup::serve_on(vec![l], 1, fp, &key, secs, secs).unwrap();
    dp.join_group(g).unwrap();
    dp
}

#[test]
fn world_of_one_through_nccl_equals_a_plain_gpu_run() {
    let Some((a, plain)) = plain_gpu_run() else {
        return;
    };
    // The same run as rank 0 of 1, with the TCP group and NCCL attached.
    let mut dp = world_of_one();
    let mut st =
        CudaTrainState::new(CudaOps::new(0).unwrap(), &dp.params, &dp.opt.m, &dp.opt.v).unwrap();
    st.attach_nccl(&nccl::unique_id().unwrap(), 0, 1).unwrap();
    let b: Vec<_> = (0..3)
        .map(|_| dp.train_step_cuda(&mut st).unwrap())
        .collect();
    dp.pull_from_cuda(&st).unwrap();
    assert_eq!(a, b, "step statistics differ");
    assert_eq!(plain.params.data, dp.params.data, "weights differ");
    assert_eq!(plain.opt.m.data, dp.opt.m.data, "first moments differ");
}

fn llada_bin() -> PathBuf {
    // The GPU bundle runs test binaries away from the build tree: it points LLADA_BIN at its copy.
    std::env::var_os("LLADA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_llada")))
}

#[test]
fn two_gpus_train_like_one_with_the_global_batch() {
    if gpu().is_none() || !nccl_ok() {
        return;
    }
    let n = llada::backend::cuda::device_count().unwrap_or(0);
    if n < 2 {
        eprintln!("SKIP: data parallel over GPUs needs 2 GPUs, this machine has {n}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("llada-cuda-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("corpus.jsonl");
    let text: String = (0..24)
        .map(|i| format!("{{\"text\": \"the gpu {i} sums its gradients. \"}}\n"))
        .collect();
    std::fs::write(&data, text).unwrap();
    let run = |out: &str, batch: &str, env: &[(&str, String)], zero: &str| {
        let mut c = Command::new(llada_bin());
        c.args("train --preset tiny --steps 3 --warmup 1 --lr 3e-3 --seq-len 16".split(' '))
            .args("--no-truncate --device cuda --batch-size".split(' '))
            .args([batch, "--zero", zero, "--data"])
            .arg(&data)
            .arg("--out")
            .arg(dir.join(out));
        for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID"] {
            c.env_remove(v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let one = run("one", "4", &[], "0").wait_with_output().unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let env = |r: usize| {
        vec![
            ("RANK", r.to_string()),
            ("LOCAL_RANK", r.to_string()),
            ("WORLD_SIZE", "2".to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.clone()),
            ("LLADA_DIST_SECRET", "a test job secret".to_string()),
        ]
    };
    // Unsharded, and with the optimizer state sharded over the two GPUs (--zero 1).
    for (out, zero) in [("two", "0"), ("two-zero", "1")] {
        let ranks = [run(out, "2", &env(0), zero), run(out, "2", &env(1), zero)];
        let outs = ranks.map(|p| p.wait_with_output().unwrap());
        for o in &outs {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let log = String::from_utf8_lossy(&outs[0].stderr);
        assert!(log.contains("gradients summed on the GPUs"), "{log}");
        let a = llada::train::checkpoint::load(&dir.join("one")).unwrap();
        let b = llada::train::checkpoint::load(&dir.join(out)).unwrap();
        // NaN-aware: a NaN weight in either run is an infinite difference.
        let worst = (a.params.data.iter().zip(&b.params.data))
            .map(|(x, y)| cmp::max_abs_diff(y, x))
            .fold(0f32, cmp::nan_max);
        // As on the CPU (tests/dist.rs): f32 summation order only; a wrong split (or a shard
        // updated twice or not at all) moves weights by ~lr = 3e-3.
        assert!(
            worst < 3e-5,
            "two GPUs (--zero {zero}) vs one: weights differ by {worst}"
        );
    }
}

#[test]
fn zero1_world_of_one_through_nccl_equals_a_plain_gpu_run() {
    // One rank's shard is the whole model, so the sharded step (per-piece sumsq_f32 and
    // adamw_f32 at offsets, NCCL reduce and broadcast over one rank: identities) must take
    // exactly the plain GPU run's steps.
    let Some((a, plain)) = plain_gpu_run() else {
        return;
    };
    let mut zt = world_of_one();
    let ops = CudaOps::new(0).unwrap();
    let mut z = CudaZeroState::new(ops, &zt.params, &zt.opt, 1, 0).unwrap();
    z.store
        .gpu
        .attach_nccl(&nccl::unique_id().unwrap(), 0, 1)
        .unwrap();
    let b: Vec<_> = (0..3).map(|_| zt.train_step_on(&mut z).unwrap()).collect();
    assert_eq!(a, b, "step statistics differ");
    let (p, m, _) = z.download().unwrap();
    assert_eq!(plain.params.data, p.data, "weights differ");
    let flat: Vec<f32> = plain.opt.m.data.concat();
    assert_eq!(flat, m, "first moments differ");
}
