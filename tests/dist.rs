//! Data-parallel training plumbing: ranks from the environment, the TCP process group
//! (rendezvous, collectives, failures that must be errors rather than hangs), NCCL loading, and
//! `llada train` as two processes against one.
//!
//! The equivalence of a data-parallel step with one process over the global batch is tested in
//! `tests/train.rs` (`data_parallel_*`); the NCCL all-reduce on GPUs in `tests/cuda_train.rs`.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/cmp.rs"]
mod cmp;
#[path = "common/ranks.rs"]
mod ranks;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cli::{text_corpus, tmpdir};
use llada::train::dist::{first_host, DistEnv, HostGroup, JobKey};
use ranks::{free_port, in_ranks, key, listener, rank_env};

/// Rank, world, local rank, rendezvous address and port.
fn placement(e: &DistEnv) -> (usize, usize, usize, &str, u16) {
    let addr = e.master_addr.as_str();
    (e.rank, e.world, e.local_rank, addr, e.master_port)
}

fn env_of(pairs: &[(&str, &str)]) -> anyhow::Result<Option<DistEnv>> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    DistEnv::from_vars(&|k| m.get(k).cloned())
}

#[test]
fn ranks_come_from_torchrun_or_srun_variables() {
    assert_eq!(env_of(&[]).unwrap(), None);
    let e = env_of(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.7"),
        ("MASTER_PORT", "12345"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(placement(&e), (3, 4, 1, "10.0.0.7", 12345));
    // An srun step: ranks from SLURM, rendezvous at the first node, port from the job id.
    let e = env_of(&[
        ("SLURM_STEP_ID", "0"),
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_STEP_NUM_TASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_ID", "4242"),
        ("SLURM_JOB_NODELIST", "gpu[017-018,020],login1"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(placement(&e), (5, 8, 1, "gpu017", 29500 + 4242 % 2000));
    // torchrun variables win over SLURM's.
    let e = env_of(&[
        ("SLURM_STEP_ID", "0"),
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "h"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(
        (e.rank, e.world, e.local_rank, e.master_port),
        (1, 2, 1, 29500)
    );
    // A batch script outside srun (no step) and a world of one are single processes.
    assert_eq!(
        env_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]).unwrap(),
        None
    );
    assert_eq!(env_of(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap(), None);
}

#[test]
fn bad_rank_variables_are_named_errors() {
    let err = |pairs: &[(&str, &str)]| env_of(pairs).unwrap_err().to_string();
    assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
    assert!(
        err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h")])
            .contains("rank 2 is not below the world size 2")
    );
    assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE=\"two\""));
    assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_ADDR is not set"));
    assert!(err(&[
        ("WORLD_SIZE", "2"),
        ("RANK", "0"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "70000")
    ])
    .contains("MASTER_PORT=\"70000\""));
}

#[test]
fn the_first_host_of_a_slurm_node_list() {
    assert_eq!(first_host("node07").unwrap(), "node07");
    assert_eq!(first_host("a,b,c").unwrap(), "a");
    assert_eq!(first_host("gpu[003-010,017]").unwrap(), "gpu003");
    assert_eq!(first_host("gpu[5,7-9],cpu1").unwrap(), "gpu5");
    assert_eq!(first_host("rack[1-2]-n[07-09]").unwrap(), "rack1-n07");
    assert!(first_host("gpu[003-").is_err());
    assert!(first_host("gpu[x-y]").is_err());
    assert!(first_host("").is_err());
}

const T: Duration = Duration::from_secs(30);

/// `world` ranks in threads, each running `f` on its joined group.
fn with_group<R: Send + 'static>(
    world: usize,
    f: impl Fn(&mut HostGroup) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    in_ranks(world, 7, move |_, mut g| f(&mut g))
}

#[test]
fn collectives_give_every_rank_the_same_sums() {
    let out = with_group(3, |g| {
        let r = g.rank as f64;
        let mut a = [r + 0.1, 1e16 * (r - 1.0), 1.0 + r];
        g.all_reduce_f64(&mut a).unwrap();
        // Over a chunk boundary (1 Mi values).
        let n = (1 << 20) + 5;
        let mut b: Vec<f32> = (0..n)
            .map(|i| (i % 97) as f32 * (g.rank as f32 + 1.0))
            .collect();
        g.all_reduce_f32(&mut b).unwrap();
        let mut msg = if g.rank == 0 {
            b"hello".to_vec()
        } else {
            vec![1, 2]
        };
        g.broadcast(&mut msg).unwrap();
        g.barrier().unwrap();
        (a, b, msg)
    });
    for (a, b, msg) in &out {
        assert_eq!(a, &out[0].0, "all-reduce bits differ between ranks");
        // Rank order: (0.1 + 1.1) + 2.1 in f64.
        assert_eq!(a[0], (0.1 + 1.1) + 2.1);
        assert_eq!(a[1], 0.0);
        assert_eq!(a[2], 6.0);
        assert_eq!(b.len(), (1 << 20) + 5);
        for (i, v) in b.iter().enumerate() {
            assert_eq!(*v, (i % 97) as f32 * 6.0, "element {i}");
        }
        assert_eq!(msg, b"hello");
    }
}

#[test]
fn a_value_that_differs_between_ranks_fails_on_every_rank() {
    let out = with_group(3, |g| {
        let v = if g.rank == 2 { 9 } else { 4 };
        g.check_same("weights", v).map_err(|e| e.to_string())
    });
    for r in out {
        let e = r.unwrap_err();
        assert!(e.contains("ranks 2 have different weights"), "{e}");
    }
    let ok = with_group(2, |g| g.check_same("weights", 4).is_ok());
    assert_eq!(ok, vec![true, true]);
}

#[test]
fn the_rendezvous_refuses_mismatched_ranks() {
    let try_pair = |w0: usize, r1: usize, w1: usize, fp1: u64| {
        let (l, port) = listener();
        let h = std::thread::spawn(move || {
            HostGroup::serve_on(vec![l], w0, 7, &key(), T, Duration::from_secs(10))
                .err()
                .map(|e| e.to_string())
        });
        let c = HostGroup::connect(&rank_env(r1, w1, port), fp1, &key(), T, T)
            .err()
            .map(|e| e.to_string());
        (h.join().unwrap(), c)
    };
    let (s, c) = try_pair(2, 1, 3, 7);
    assert!(s.unwrap().contains("world size is 3, rank 0 says 2"));
    assert!(c.unwrap().contains("refused"));
    let (s, c) = try_pair(2, 1, 2, 8);
    assert!(s.unwrap().contains("different options, data or weights"));
    assert!(c.unwrap().contains("different options"));
}

#[test]
fn a_rank_that_dies_is_an_error_not_a_hang() {
    let (l, port) = listener();
    let h = std::thread::spawn(move || {
        let mut g = HostGroup::serve_on(vec![l], 2, 7, &key(), T, T).unwrap();
        let t0 = Instant::now();
        let e = g.all_reduce_f64(&mut [1.0]).unwrap_err().to_string();
        (e, t0.elapsed())
    });
    let g = HostGroup::connect(&rank_env(1, 2, port), 7, &key(), T, T).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(g); // rank 1 stops
    let (e, took) = h.join().unwrap();
    assert!(e.contains("rank 1 closed the connection"), "{e}");
    assert!(
        took < Duration::from_secs(10),
        "noticed only after {took:?}"
    );
}

#[test]
fn missing_ranks_time_out_with_a_message() {
    let (l, port) = listener();
    // A stranger connects and says nothing useful: ignored, not a rank.
    let stranger = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n-------------");
        std::thread::sleep(Duration::from_millis(500));
    });
    let e = HostGroup::serve_on(vec![l], 3, 7, &key(), T, Duration::from_millis(400))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("ranks 1, 2 did not connect"), "{e}");
    stranger.join().unwrap();
    // Nobody listening: the connecting rank gives up with the address it tried.
    let port = free_port();
    let e = HostGroup::connect(
        &rank_env(1, 2, port),
        7,
        &key(),
        T,
        Duration::from_millis(300),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains(&format!("cannot reach rank 0 at 127.0.0.1:{port}")),
        "{e}"
    );
}

#[test]
fn nccl_loads_and_makes_ids_when_installed() {
    use llada::train::nccl;
    let e = nccl::UniqueId::from_bytes(&[0u8; 12])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("128 bytes"), "{e}");
    match nccl::version() {
        Err(e) => {
            assert!(
                std::env::var("LLADA_REQUIRE_NCCL").is_err(),
                "LLADA_REQUIRE_NCCL is set but NCCL does not load: {e}"
            );
            let e = e.to_string();
            assert!(e.contains("LLADA_NCCL_LIB"), "{e}");
            eprintln!("SKIP nccl: {e}");
        }
        Ok((v, path)) => {
            eprintln!("NCCL {v} from {path}");
            assert!((20000..100000).contains(&v), "NCCL version code {v}");
            // A unique id needs no GPU; two are different, and survive the byte round trip
            // the TCP group sends them through.
            let (a, b) = (nccl::unique_id().unwrap(), nccl::unique_id().unwrap());
            assert_ne!(a.to_bytes(), b.to_bytes());
            let back = nccl::UniqueId::from_bytes(&a.to_bytes()).unwrap();
            assert_eq!(back.to_bytes(), a.to_bytes());
            if llada::engine::device::cuda_available().is_err() {
                // No GPU: making a communicator must fail with NCCL's error, not crash.
                let e = nccl::NcclComm::init(&a, 0, 1).err().unwrap().to_string();
                eprintln!("without a GPU: {e}");
                assert!(
                    e.contains("ncclCommInitRank (rank 0 of 1) failed: NCCL error"),
                    "{e}"
                );
            }
            assert!(nccl::NcclComm::init(&a, 1, 1).is_err());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `llada train` as processes.

/// `llada train FLAGS… PATHS…` (PATHS: the arguments that hold paths) with `env` set.
fn train_cmd(paths: &[&str], flags: &str, env: &[(&str, String)]) -> Command {
    let mut c = ranks::train_cmd(&flags.split_whitespace().collect::<Vec<_>>());
    c.args(paths).envs(env.iter().map(|(k, v)| (k, v)));
    c
}

fn corpus(dir: &std::path::Path) -> PathBuf {
    text_corpus(&dir.join("corpus.jsonl"), 24, |i| {
        format!("a dog ran to the park {i} times. ")
    })
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn two_processes_train_like_one_with_the_global_batch() {
    let dir = tmpdir("cli");
    let data = corpus(&dir);
    let data = data.to_str().unwrap();
    let flags = |b: &str| {
        "--preset tiny --steps 3 --warmup 1 --lr 3e-3 --seq-len 16 --accum 2 --no-truncate \
         --device cpu --batch-size "
            .to_string()
            + b
    };
    let one = dir.join("one");
    let paths = ["--data", data, "--out", one.to_str().unwrap()];
    ok(&train_cmd(&paths, &flags("4"), &[]).output().unwrap());

    let two = dir.join("two");
    let port = free_port().to_string();
    let spawn = |rank: usize| {
        train_cmd(
            &["--data", data, "--out", two.to_str().unwrap()],
            &flags("2"),
            &[
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", "2".into()),
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", port.clone()),
            ],
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (r0, r1) = (spawn(0), spawn(1));
    let (o0, o1) = (
        r0.wait_with_output().unwrap(),
        r1.wait_with_output().unwrap(),
    );
    ok(&o0);
    ok(&o1);
    let log0 = String::from_utf8_lossy(&o0.stderr);
    assert!(
        log0.contains("data parallel: 2 ranks (RANK/WORLD_SIZE)"),
        "{log0}"
    );
    assert!(log0.contains("global batch 4"), "{log0}");
    // Only rank 0 reports progress.
    assert!(!String::from_utf8_lossy(&o1.stderr).contains("step 1/3"));

    let a = llada::train::checkpoint::load(&one).unwrap();
    let b = llada::train::checkpoint::load(&two).unwrap();
    assert_eq!(a.state.step, 3);
    assert_eq!(b.state.step, 3);
    // NaN-aware: a NaN weight in either run is an infinite difference.
    let mut worst = 0f32;
    for (x, y) in a.params.data.iter().zip(&b.params.data) {
        worst = cmp::nan_max(worst, cmp::max_abs_diff(y, x));
    }
    // Equal up to f32 summation order (see tests/train.rs: ~1e-7 after a few steps); a wrong
    // batch split moves weights by ~lr (3e-3).
    assert!(
        worst < 3e-5,
        "two ranks vs one process: weights differ by {worst}"
    );
    // The two-rank checkpoint records its split; a one-process resume re-splits it.
    let o = &b.state.options;
    assert_eq!(
        (o["batch_size"].as_u64(), o["world"].as_u64()),
        (Some(2), Some(2))
    );
    let resumed = dir.join("resumed");
    let (two, resumed) = (two.to_str().unwrap(), resumed.to_str().unwrap());
    let r = train_cmd(
        &["--resume", two, "--data", data, "--out", resumed],
        "--steps 4 --device cpu",
        &[],
    )
    .output()
    .unwrap();
    ok(&r);
    let log = String::from_utf8_lossy(&r.stderr);
    assert!(
        log.contains("splits the same global batch over 1 ranks × 4"),
        "{log}"
    );
}

#[test]
fn a_rank_without_peers_fails_instead_of_waiting_forever() {
    let dir = tmpdir("alone");
    let data = corpus(&dir);
    let out = dir.join("o");
    let paths = [
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let o = train_cmd(
        &paths,
        "--preset tiny --steps 1 --seq-len 16 --device cpu",
        &[
            ("RANK", "0".into()),
            ("WORLD_SIZE", "2".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", free_port().to_string()),
            ("LLADA_DIST_CONNECT_TIMEOUT", "1".into()),
        ],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("ranks 1 did not connect within 1 s"), "{e}");
    assert!(!dir.join("o").join("model.safetensors").exists());
    // --no-dist ignores the variables.
    let o = train_cmd(
        &paths,
        "--preset tiny --steps 1 --seq-len 16 --device cpu --no-dist",
        &[("RANK", "0".into()), ("WORLD_SIZE", "2".into())],
    )
    .output()
    .unwrap();
    ok(&o);
}

#[test]
fn srun_variables_launch_a_data_parallel_run() {
    // What `srun --ntasks=2` gives each task: no MASTER_ADDR/PORT, so the rendezvous is at the
    // first node of the job (here this machine) on 29500 + SLURM_JOB_ID mod 2000.
    let dir = tmpdir("srun");
    let data = corpus(&dir);
    // Under SLURM the key comes from the per-user secret file and the job id: no variable to
    // share, no network round trip.
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".llada")).unwrap();
    let secret = home.join(".llada").join("dist-secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let job = (0..2000u16)
        .map(|i| (i + std::process::id() as u16 % 2000) % 2000)
        .find(|&i| TcpListener::bind(("0.0.0.0", 29500 + i)).is_ok())
        .expect("a free port in 29500..31500");
    let spawn = |rank: usize| {
        let out = dir.join("o");
        train_cmd(
            &[
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            "--preset tiny --steps 1 --seq-len 16 --batch-size 1 --device cpu",
            &[
                ("SLURM_STEP_ID", "0".into()),
                ("SLURM_PROCID", rank.to_string()),
                ("SLURM_NTASKS", "2".into()),
                ("SLURM_LOCALID", rank.to_string()),
                ("SLURM_JOB_ID", job.to_string()),
                ("SLURM_JOB_NODELIST", "127.0.0.1".into()),
                ("HOME", home.to_str().unwrap().into()),
                // No LLADA_DIST_SECRET: the file is the only source.
                ("LLADA_DIST_SECRET", String::new()),
            ],
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn(0), spawn(1));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    ok(&a);
    ok(&b);
    let log = String::from_utf8_lossy(&a.stderr);
    let want = format!(
        "data parallel: 2 ranks (SLURM_PROCID/SLURM_NTASKS), rendezvous at 127.0.0.1:{}",
        29500 + job
    );
    assert!(log.contains(&want), "{log}");
    assert!(dir.join("o").join("model.safetensors").is_file());
}

#[test]
fn a_peer_announcing_a_huge_message_is_refused_not_allocated() {
    use std::io::{Read, Write};
    let (l, port) = listener();
    let h = std::thread::spawn(move || {
        let mut g = HostGroup::serve_on(vec![l], 2, 7, &key(), T, T).unwrap();
        g.all_reduce_f64(&mut [1.0, 2.0]).unwrap_err().to_string()
    });
    // A hand-made rank 1 that knows the secret: a valid authenticated hello, then a reduce
    // frame that claims 2^60 bytes.
    let mut s = hand_made_peer(port, ranks::SECRET.as_bytes(), [1, 2, 7]);
    let mut ack = [0u8; 32 + 9];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(
        ack[32..],
        [3, 0, 0, 0, 0, 0, 0, 0, 0],
        "rank 0 accepts the hello"
    );
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(1u64 << 60).to_le_bytes());
    s.write_all(&frame).unwrap();
    let e = h.join().unwrap();
    assert!(e.contains("more than the 16 expected"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The job secret: strangers cannot join, disturb or delay the rendezvous.

/// A peer speaking the rendezvous protocol by hand with `secret` (the key derivation and the
/// MACs as the module documentation of `llada::train::dist` specifies them): reads the
/// challenge, sends its authenticated hello `[rank, world, fingerprint]`, returns the stream.
fn hand_made_peer(port: u16, secret: &[u8], fields: [u64; 3]) -> std::net::TcpStream {
    use hmac::{Hmac, Mac};
    use std::io::{Read, Write};
    type H = Hmac<sha2::Sha256>;
    let mac = |key: &[u8], parts: &[&[u8]]| -> Vec<u8> {
        let mut m = <H as Mac>::new_from_slice(key).unwrap();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    };
    let key = mac(secret, &[b"llada data-parallel job key v1\0", b""]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = [0u8; 40];
    s.read_exact(&mut c).unwrap();
    assert_eq!(&c[..8], b"LLADADP2");
    let nc = [7u8; 32];
    let mut f = Vec::new();
    for v in fields {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let tag = mac(&key, &[b"llada-dp2 client", &c[8..], &nc, &f]);
    let mut hello = b"LLADADP2".to_vec();
    hello.extend_from_slice(&nc);
    hello.extend_from_slice(&f);
    hello.extend_from_slice(&tag);
    s.write_all(&hello).unwrap();
    s
}

/// The collectives of the undisturbed-run comparison.
fn some_collectives(g: &mut HostGroup) -> (Vec<f64>, Vec<u8>) {
    let mut a = vec![g.rank as f64 + 0.25, 3.0 * g.rank as f64];
    g.all_reduce_f64(&mut a).unwrap();
    let mut m = if g.rank == 0 {
        b"id".to_vec()
    } else {
        Vec::new()
    };
    g.broadcast(&mut m).unwrap();
    (a, m)
}

#[test]
fn strangers_without_the_secret_cannot_join_abort_or_delay_the_job() {
    use std::io::{Read, Write};
    let undisturbed = with_group(3, some_collectives);

    let (l, port) = listener();
    let t0 = Instant::now();
    let rank0 = std::thread::spawn(move || {
        let mut g = HostGroup::serve_on(vec![l], 3, 7, &key(), T, Duration::from_secs(60)).unwrap();
        let joined = t0.elapsed();
        (some_collectives(&mut g), joined)
    });
    // Before the real ranks: a flood of connections that stay silent (more than the handshakes
    // rank 0 runs at once), one more silent peer, a peer that speaks the old unauthenticated
    // hello (no secret at all), and one with a wrong secret claiming rank 1 with the right
    // fingerprint.
    let flood: Vec<_> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut no_secret = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut hello = b"LLADADP1".to_vec();
    for v in [1u64, 3, 7] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    let _ = no_secret.write_all(&hello);
    let mut wrong = hand_made_peer(port, b"a guessed secret, not the job's", [1, 3, 7]);
    // The impostor learns nothing: rank 0 closes without an answer.
    let mut buf = [0u8; 1];
    assert_eq!(
        wrong.read(&mut buf).unwrap_or(0),
        0,
        "the impostor got an answer"
    );
    // The real ranks, after the strangers.
    let hs: Vec<_> = (1..3)
        .map(|r| {
            std::thread::spawn(move || {
                let mut g = HostGroup::connect(&rank_env(r, 3, port), 7, &key(), T, T).unwrap();
                some_collectives(&mut g)
            })
        })
        .collect();
    let mut out = vec![];
    let (r0, joined) = rank0.join().unwrap();
    out.push(r0);
    out.extend(hs.into_iter().map(|h| h.join().unwrap()));
    assert_eq!(
        out, undisturbed,
        "the disturbed job computed something else"
    );
    // Silent peers hold a handshake for at most HANDSHAKE_TIMEOUT (10 s) each, in parallel:
    // the real ranks joined long before that.
    assert!(
        joined < Duration::from_secs(8),
        "the strangers delayed the rendezvous to {joined:?}"
    );
    drop((flood, silent, no_secret));
}

#[test]
fn a_rank_with_another_secret_is_refused_with_a_clear_error() {
    let (l, port) = listener();
    let rank0 = std::thread::spawn(move || {
        HostGroup::serve_on(vec![l], 2, 7, &key(), T, Duration::from_secs(2))
            .err()
            .unwrap()
            .to_string()
    });
    let other = JobKey::from_secret(b"the secret of another job", None);
    let e = HostGroup::connect(&rank_env(1, 2, port), 7, &other, T, Duration::from_secs(1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("job secret differs"), "{e}");
    // Rank 0 was not aborted by it: it timed out waiting for a real rank 1.
    let e0 = rank0.join().unwrap();
    assert!(e0.contains("ranks 1 did not connect"), "{e0}");
}

#[test]
fn a_fake_rank_0_without_the_secret_is_detected() {
    use std::io::{Read, Write};
    // A stranger squats the port and plays rank 0: sends a challenge, reads the hello, and
    // answers "accepted" without knowing the key.
    let (l, port) = listener();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut c = b"LLADADP2".to_vec();
        c.extend_from_slice(&[1u8; 32]);
        s.write_all(&c).unwrap();
        let mut hello = [0u8; 96];
        s.read_exact(&mut hello).unwrap();
        let mut answer = vec![0u8; 32];
        answer.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0, 0]);
        s.write_all(&answer).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = HostGroup::connect(&rank_env(1, 2, port), 7, &key(), T, T)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("failed to prove it knows the job secret"), "{e}");
    fake.join().unwrap();
}

#[test]
fn the_job_key_comes_from_the_environment_or_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let from = |pairs: &[(&str, &str)]| {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        JobKey::from_vars(&|k| m.get(k).cloned())
    };
    let e = from(&[]).unwrap_err().to_string();
    assert!(e.contains("LLADA_DIST_SECRET"), "{e}");
    let e = from(&[("LLADA_DIST_SECRET", "short")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 16"), "{e}");
    assert!(from(&[("LLADA_DIST_SECRET", "sixteen bytes ok")]).is_ok());

    let dir = tmpdir("secret");
    let f = dir.join("s");
    std::fs::write(&f, "0123456789abcdef-secret\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = format!(
        "{:#}",
        from(&[("LLADA_DIST_SECRET_FILE", f.to_str().unwrap())]).unwrap_err()
    );
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k = from(&[("LLADA_DIST_SECRET_FILE", f.to_str().unwrap())]).unwrap();
    assert!(k.source.contains("LLADA_DIST_SECRET_FILE"), "{}", k.source);

    // Under SLURM: ~/.llada/dist-secret and the job id; the same on every rank of a job,
    // different between jobs (checked through a handshake: keys are opaque).
    std::fs::create_dir_all(dir.join(".llada")).unwrap();
    std::fs::rename(&f, dir.join(".llada/dist-secret")).unwrap();
    let home = dir.to_str().unwrap();
    let job = |id: &str| from(&[("SLURM_JOB_ID", id), ("HOME", home)]).unwrap();
    let pair_joins = |k0: JobKey, k1: JobKey| {
        let (l, port) = listener();
        let h = std::thread::spawn(move || {
            HostGroup::serve_on(vec![l], 2, 7, &k0, T, Duration::from_secs(2)).is_ok()
        });
        let c = HostGroup::connect(&rank_env(1, 2, port), 7, &k1, T, Duration::from_secs(1));
        c.is_ok() && h.join().unwrap()
    };
    assert!(
        pair_joins(job("41"), job("41")),
        "two ranks of one job disagree"
    );
    assert!(!pair_joins(job("41"), job("42")), "two jobs share a key");
    let e = format!(
        "{:#}",
        from(&[("SLURM_JOB_ID", "1"), ("HOME", "/nonexistent")]).unwrap_err()
    );
    assert!(e.contains("dist-secret"), "{e}");
}

#[test]
fn master_addr_may_be_an_ipv6_address() {
    // `MASTER_ADDR=::1`: resolved as a host, not pasted into "host:port" (which IPv6 breaks).
    let Ok(l) = TcpListener::bind("[::1]:0") else {
        eprintln!("note: no IPv6 loopback here; the IPv6 rendezvous is not exercised");
        return;
    };
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let mut g = HostGroup::serve_on(vec![l], 2, 7, &key(), T, T).unwrap();
        some_collectives(&mut g)
    });
    let mut env = rank_env(1, 2, port);
    env.master_addr = "::1".into();
    let mut g = HostGroup::connect(&env, 7, &key(), T, T).unwrap();
    let b = some_collectives(&mut g);
    assert_eq!(h.join().unwrap(), b);
    assert_eq!(b.0, vec![0.25 + 1.25, 3.0]);
}
