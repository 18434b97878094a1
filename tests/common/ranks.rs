//! Ranks for the data-parallel tests: placements, in-process ranks over a real localhost TCP
//! group, and `llada train` as rank processes.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use llada::train::dist::{DistEnv, HostGroup, JobKey};

/// Rank `rank` of `world` on this machine, rendezvous at 127.0.0.1:`port`.
pub fn rank_env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        source: "test",
    }
}

/// The job secret of the tests' groups and rank processes.
pub const SECRET: &str = "the secret of this test job";

/// The job key of [`SECRET`].
pub fn key() -> JobKey {
    JobKey::from_secret(SECRET.as_bytes(), None)
}

/// A listener on a free loopback port, and the port.
pub fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    listener().1
}

/// `world` ranks as threads over a real localhost TCP group (rendezvous fingerprint `fp`, job
/// key [`key`], 60 s timeouts); rank `r` runs `f(r, group)`. The results in rank order.
pub fn in_ranks<R: Send + 'static>(
    world: usize,
    fp: u64,
    f: impl Fn(usize, HostGroup) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let t = Duration::from_secs(60);
    let (l, port) = listener();
    let mut hub = Some(l);
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let (f, hub) = (f.clone(), hub.take());
            std::thread::spawn(move || {
                let g = match hub {
                    Some(l) => HostGroup::serve_on(vec![l], world, fp, &key(), t, t).unwrap(),
                    None => {
                        HostGroup::connect(&rank_env(rank, world, port), fp, &key(), t, t).unwrap()
                    }
                };
                f(rank, g)
            })
        })
        .collect();
    threads.into_iter().map(|h| h.join().unwrap()).collect()
}

/// `llada train ARGS` as one process: none of the caller's rank variables (torchrun's or
/// Slurm's) or secret file, the tests' job secret [`SECRET`] and a 60 s connect timeout (for
/// [`as_rank`], or variables the test sets).
pub fn train_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llada"));
    c.arg("train").args(args);
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_STEP_ID",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_LOCALID",
        "SLURM_JOB_ID",
        "SLURM_JOB_NODELIST",
        "SLURM_STEP_NODELIST",
        "SLURM_NODELIST",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "LLADA_DIST_SECRET_FILE",
    ] {
        c.env_remove(v);
    }
    c.env("LLADA_DIST_CONNECT_TIMEOUT", "60")
        .env("LLADA_DIST_SECRET", SECRET);
    c
}

/// `c` as rank `rank` of `world` (torchrun's variables), rendezvous at 127.0.0.1:`port`.
pub fn as_rank(c: &mut Command, rank: usize, world: usize, port: u16) -> &mut Command {
    c.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
}

/// `world` ranks of `llada train ARGS` ([`train_cmd`], [`as_rank`]) run to the end, stdout
/// discarded and stderr kept: their outputs in rank order.
pub fn train_ranks(args: &[&str], world: usize) -> Vec<Output> {
    let port = free_port();
    let kids: Vec<_> = (0..world)
        .map(|r| {
            as_rank(&mut train_cmd(args), r, world, port)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    kids.into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect()
}

/// Asserts every rank of `outs` succeeded (naming the rank and its stderr); returns `outs`.
pub fn ok_ranks(outs: Vec<Output>) -> Vec<Output> {
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    outs
}

/// A rendezvous fingerprint of in-process ranks training with `o`: the hash of the options alone
/// (`Trainer::options_fingerprint` also hashes the storage; these ranks compare it only with
/// each other).
pub fn options_fp(o: &llada::train::TrainOptions) -> u64 {
    use llada::train::dist::{fnv1a, FNV_START};
    fnv1a(FNV_START, &serde_json::to_vec(o).unwrap())
}
