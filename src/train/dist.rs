//! Data parallelism for `llada train`: one process per GPU (or per CPU process), every rank
//! holding the whole model, each computing the gradient of its own slice of the global batch;
//! gradients are summed across ranks before clipping and AdamW, so every rank takes the same
//! optimizer step and the weights stay identical.
//!
//! - [`DistEnv`]: who am I — ranks from `RANK` / `WORLD_SIZE` / `LOCAL_RANK` (torchrun style) or,
//!   under `srun`, `SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_LOCALID`; the rendezvous address
//!   from `MASTER_ADDR` / `MASTER_PORT` or the first host of the SLURM node list.
//! - [`HostGroup`]: a small TCP process group (rank 0 the hub): the rendezvous, a check that
//!   every rank runs the same options, data and weights, and host collectives (sum all-reduce,
//!   broadcast, barrier). The CPU backend reduces its gradients through it; the GPU path only
//!   uses it to hand out the NCCL id and to sum the loss statistics, the gradients go through
//!   NCCL on the device ([`super::nccl`]).
//!
//! The split of a global batch (see [`super::Trainer::micro_batch`]): with `B` sequences per
//! rank and `W` ranks, the global micro-batch has `B·W` rows; rank `r` takes global rows
//! `r·B .. (r+1)·B`, with the data index, mask draws and loss weights of those global rows (the
//! weights normalise by the global `B·W`). So the sum over ranks of their gradients is the
//! gradient of one process running `--batch-size B·W` — equal up to the order of f32 sums.
//!
//! Collectives are deterministic: rank 0 sums in rank order (in f64) and sends the result to
//! everyone, so all ranks see bit-identical values.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

/// Default rendezvous port (as torchrun), offset by the SLURM job id when there is one.
pub const DEFAULT_PORT: u16 = 29500;

const MAGIC: &[u8; 8] = b"LLADADP1";

/// Where this process sits in a data-parallel run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// Rank on this node: picks the GPU (`cuda` means `cuda:LOCAL_RANK mod device count`).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which variables gave the ranks (for messages).
    pub source: &'static str,
}

fn parse_num(get: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<Option<usize>> {
    match get(var) {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => {
            s.trim().parse::<usize>().map(Some).map_err(|_| {
                anyhow!("environment variable {var}={s:?} is not a non-negative integer")
            })
        }
    }
}

impl DistEnv {
    /// The run described by the process environment; `None` for a single process (no rank
    /// variables, or a world of one).
    pub fn from_env() -> Result<Option<DistEnv>> {
        DistEnv::from_vars(&|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup (tests).
    ///
    /// `WORLD_SIZE` + `RANK` (+ `LOCAL_RANK`, default `RANK`) win when set; otherwise an `srun`
    /// step's `SLURM_PROCID` of `SLURM_STEP_NUM_TASKS` (or `SLURM_NTASKS`), local rank
    /// `SLURM_LOCALID`. A batch script outside `srun` (no `SLURM_STEP_ID`) is one process.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let (rank, world, local, source) = if let Some(world) = parse_num(get, "WORLD_SIZE")? {
            let rank = parse_num(get, "RANK")?
                .ok_or_else(|| anyhow!("WORLD_SIZE={world} is set but RANK is not"))?;
            let local = parse_num(get, "LOCAL_RANK")?.unwrap_or(rank);
            (rank, world, local, "RANK/WORLD_SIZE")
        } else if get("SLURM_STEP_ID").is_some() {
            let world = match parse_num(get, "SLURM_STEP_NUM_TASKS")? {
                Some(n) => Some(n),
                None => parse_num(get, "SLURM_NTASKS")?,
            };
            match (parse_num(get, "SLURM_PROCID")?, world) {
                (Some(rank), Some(world)) => {
                    let local = parse_num(get, "SLURM_LOCALID")?.unwrap_or(0);
                    (rank, world, local, "SLURM_PROCID/SLURM_NTASKS")
                }
                _ => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        ensure!(world > 0, "{source}: the world size is 0");
        ensure!(
            rank < world,
            "{source}: rank {rank} is not below the world size {world}"
        );
        if world == 1 {
            return Ok(None);
        }
        let master_addr = match get("MASTER_ADDR").filter(|s| !s.trim().is_empty()) {
            Some(a) => a.trim().to_string(),
            None => {
                let list = get("SLURM_STEP_NODELIST")
                    .or_else(|| get("SLURM_JOB_NODELIST"))
                    .or_else(|| get("SLURM_NODELIST"));
                match list {
                    Some(l) => first_host(&l).with_context(|| {
                        format!("reading the first host of the SLURM node list {l:?}")
                    })?,
                    None => bail!(
                        "{source} says this is rank {rank} of {world}, but MASTER_ADDR is not set \
                         (the host of rank 0, reachable from every rank)"
                    ),
                }
            }
        };
        let master_port = match get("MASTER_PORT").filter(|s| !s.trim().is_empty()) {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| anyhow!("MASTER_PORT={p:?} is not a port number (1–65535)"))?,
            None => match parse_num(get, "SLURM_JOB_ID")? {
                // Jobs sharing a node get different ports.
                Some(id) => DEFAULT_PORT + (id % 2000) as u16,
                None => DEFAULT_PORT,
            },
        };
        ensure!(master_port != 0, "MASTER_PORT is 0: give a fixed port");
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank: local,
            master_addr,
            master_port,
            source,
        }))
    }
}

/// The first host of a SLURM node list: `gpu[003-010,017],login2` → `gpu003`;
/// `rack[1-2]-n[07-09]` → `rack1-n07`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    ensure!(!list.is_empty(), "the node list is empty");
    let mut out = String::new();
    let mut chars = list.chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some(']') => break,
                        Some(x) => inner.push(x),
                        None => bail!("unclosed `[` in {list:?}"),
                    }
                }
                let first = inner.split(',').next().unwrap_or("");
                let lo = first.split('-').next().unwrap_or("").trim();
                ensure!(
                    !lo.is_empty() && lo.chars().all(|d| d.is_ascii_digit()),
                    "cannot read the range [{inner}] in {list:?}"
                );
                out.push_str(lo);
            }
            ']' => bail!("unmatched `]` in {list:?}"),
            _ => out.push(c),
        }
    }
    ensure!(!out.is_empty(), "no host in {list:?}");
    Ok(out)
}

/// Seconds a collective waits for the slowest rank before giving up (`LLADA_DIST_TIMEOUT`,
/// default 1800: a rank may be busy with a long step), and the rendezvous wait (default 300).
pub fn timeouts() -> Result<(Duration, Duration)> {
    let get = |var: &str, default: u64| -> Result<Duration> {
        match std::env::var(var) {
            Ok(s) => {
                let v: f64 = s
                    .trim()
                    .parse()
                    .map_err(|_| anyhow!("{var}={s:?} is not a number of seconds"))?;
                ensure!(v > 0.0 && v.is_finite(), "{var}={s:?} must be positive");
                Ok(Duration::from_secs_f64(v))
            }
            Err(_) => Ok(Duration::from_secs(default)),
        }
    };
    Ok((
        get("LLADA_DIST_TIMEOUT", 1800)?,
        get("LLADA_DIST_CONNECT_TIMEOUT", 300)?,
    ))
}

// Frame tags: every collective checks that all ranks are in the same one.
const T_REDUCE: u8 = 1;
const T_BCAST: u8 = 2;
const T_CHECK: u8 = 3;
/// Largest message (an error text) and broadcast (an NCCL id, options) a rank accepts.
const MAX_MSG: usize = 1 << 16;
const MAX_BCAST: usize = 1 << 24;

fn tag_name(t: u8) -> &'static str {
    match t {
        T_REDUCE => "all-reduce",
        T_BCAST => "broadcast",
        T_CHECK => "consistency check",
        _ => "unknown",
    }
}

/// A rank's view of the TCP group.
pub struct HostGroup {
    pub rank: usize,
    pub world: usize,
    /// On rank 0: the connection to rank `i + 1` at index `i`. Elsewhere: one, to rank 0.
    conns: Vec<TcpStream>,
    scratch: Vec<u8>,
}

fn io_err(e: std::io::Error, what: &str, peer: usize) -> anyhow::Error {
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            anyhow!("{what}: rank {peer} closed the connection (it stopped; see its log)")
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
            "{what}: rank {peer} did not answer within LLADA_DIST_TIMEOUT (is it stuck, or much \
             slower?)"
        ),
        _ => anyhow!("{what}: connection to rank {peer}: {e}"),
    }
}

fn send_frame(s: &mut TcpStream, tag: u8, payload: &[u8], peer: usize) -> Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)
        .and_then(|_| s.write_all(payload))
        .map_err(|e| io_err(e, tag_name(tag), peer))
}

/// Receive one frame of `tag`, at most `max` bytes (a corrupt or hostile length is an error,
/// not an allocation).
fn recv_frame(
    s: &mut TcpStream,
    tag: u8,
    buf: &mut Vec<u8>,
    peer: usize,
    max: usize,
) -> Result<()> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)
        .map_err(|e| io_err(e, tag_name(tag), peer))?;
    ensure!(
        head[0] == tag,
        "rank {peer} is in a {} while this rank is in a {}: the ranks run different code or options",
        tag_name(head[0]),
        tag_name(tag)
    );
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or([0; 8]));
    ensure!(
        len <= max as u64,
        "rank {peer} sent a {} of {len} bytes, more than the {max} expected",
        tag_name(tag)
    );
    let len = len as usize;
    buf.clear();
    buf.resize(len, 0);
    s.read_exact(buf)
        .map_err(|e| io_err(e, tag_name(tag), peer))
}

impl HostGroup {
    /// Join the group of `env`: rank 0 listens on `MASTER_PORT` (all interfaces), the others
    /// connect to `MASTER_ADDR:MASTER_PORT`, retrying until `connect_timeout`. `fingerprint`
    /// (a hash of the run's options and data) must agree on every rank.
    pub fn join(env: &DistEnv, fingerprint: u64) -> Result<HostGroup> {
        let (op, connect) = timeouts()?;
        if env.rank == 0 {
            let l = TcpListener::bind(("0.0.0.0", env.master_port)).with_context(|| {
                format!(
                    "rank 0 cannot listen on port {} (MASTER_PORT): another run may hold it",
                    env.master_port
                )
            })?;
            HostGroup::serve(l, env.world, fingerprint, op, connect)
        } else {
            HostGroup::connect(env, fingerprint, op, connect)
        }
    }

    /// Rank 0 on an already bound listener (tests bind port 0).
    pub fn serve(
        l: TcpListener,
        world: usize,
        fingerprint: u64,
        op_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<HostGroup> {
        ensure!(world >= 1, "world size 0");
        l.set_nonblocking(true)
            .context("rendezvous: setting the listener non-blocking")?;
        let deadline = Instant::now() + connect_timeout;
        let mut conns: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let mut joined = 0;
        while joined < world - 1 {
            match l.accept() {
                Ok((mut s, addr)) => {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    // A stranger that connects and says nothing must not stall the rendezvous.
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    s.set_write_timeout(Some(op_timeout))?;
                    let mut hello = [0u8; 32];
                    if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                        eprintln!("rendezvous: ignoring a connection from {addr} that is not a llada rank");
                        continue;
                    }
                    let word = |i: usize| {
                        u64::from_le_bytes(
                            hello[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0; 8]),
                        )
                    };
                    let (r, w, fp) = (word(0) as usize, word(1) as usize, word(2));
                    let refuse = if w != world {
                        Some(format!(
                            "rank {r} says the world size is {w}, rank 0 says {world}"
                        ))
                    } else if r == 0 || r >= world {
                        Some(format!("a process claims rank {r} in a world of {world}"))
                    } else if conns[r - 1].is_some() {
                        Some(format!("two processes claim rank {r}"))
                    } else if fp != fingerprint {
                        Some(format!(
                            "rank {r} runs different options, data or weights than rank 0 \
                             (fingerprint {fp:016x} vs {fingerprint:016x})"
                        ))
                    } else {
                        None
                    };
                    match refuse {
                        Some(msg) => {
                            let _ = send_frame(&mut s, T_CHECK, msg.as_bytes(), r);
                            bail!("rendezvous: {msg}");
                        }
                        None => {
                            send_frame(&mut s, T_CHECK, b"", r)?;
                            s.set_read_timeout(Some(op_timeout))?;
                            conns[r - 1] = Some(s);
                            joined += 1;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = conns
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| c.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        bail!(
                            "rendezvous: ranks {} did not connect within {:.0} s \
                             (LLADA_DIST_CONNECT_TIMEOUT); were they started, and can they reach \
                             this host at the MASTER_ADDR they were given?",
                            missing.join(", "),
                            connect_timeout.as_secs_f64()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(anyhow!("rendezvous: accepting a connection: {e}")),
            }
        }
        Ok(HostGroup {
            rank: 0,
            world,
            conns: conns.into_iter().flatten().collect(),
            scratch: Vec::new(),
        })
    }

    /// Rank `env.rank > 0`: connect to rank 0.
    pub fn connect(
        env: &DistEnv,
        fingerprint: u64,
        op_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<HostGroup> {
        ensure!(
            env.rank > 0 && env.rank < env.world,
            "connect: rank {} of {}",
            env.rank,
            env.world
        );
        let deadline = Instant::now() + connect_timeout;
        let target = format!("{}:{}", env.master_addr, env.master_port);
        let mut s = loop {
            let attempt = target
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
                .and_then(|a| {
                    TcpStream::connect_timeout(&a, Duration::from_secs(5))
                        .map_err(|e| e.to_string())
                });
            let last = match attempt {
                Ok(s) => break s,
                Err(e) => e,
            };
            if Instant::now() > deadline {
                bail!(
                    "rank {}: cannot reach rank 0 at {target} (MASTER_ADDR:MASTER_PORT) within \
                     {:.0} s: {last}",
                    env.rank,
                    connect_timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(op_timeout))?;
        s.set_write_timeout(Some(op_timeout))?;
        let mut hello = [0u8; 32];
        hello[..8].copy_from_slice(MAGIC);
        hello[8..16].copy_from_slice(&(env.rank as u64).to_le_bytes());
        hello[16..24].copy_from_slice(&(env.world as u64).to_le_bytes());
        hello[24..32].copy_from_slice(&fingerprint.to_le_bytes());
        s.write_all(&hello)
            .map_err(|e| io_err(e, "rendezvous", 0))?;
        let mut reply = Vec::new();
        recv_frame(&mut s, T_CHECK, &mut reply, 0, MAX_MSG)?;
        ensure!(
            reply.is_empty(),
            "rendezvous refused by rank 0: {}",
            String::from_utf8_lossy(&reply)
        );
        Ok(HostGroup {
            rank: env.rank,
            world: env.world,
            conns: vec![s],
            scratch: Vec::new(),
        })
    }

    /// Sum `x` over all ranks, in place; every rank gets the same bits (rank 0 adds in rank
    /// order, in f64).
    pub fn all_reduce_f64(&mut self, x: &mut [f64]) -> Result<()> {
        self.reduce_with(x)
    }

    /// Sum `x` over all ranks in place (f64 sums, rounded once to f32), in chunks so the f64
    /// scratch stays small.
    pub fn all_reduce_f32(&mut self, x: &mut [f32]) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut acc = Vec::with_capacity(CHUNK.min(x.len()));
        for part in x.chunks_mut(CHUNK) {
            acc.clear();
            acc.extend(part.iter().map(|&v| v as f64));
            self.reduce_with(&mut acc)?;
            for (d, s) in part.iter_mut().zip(&acc) {
                *d = *s as f32;
            }
        }
        Ok(())
    }

    fn reduce_with(&mut self, acc: &mut [f64]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let n = acc.len();
        if self.rank == 0 {
            for (i, c) in self.conns.iter_mut().enumerate() {
                recv_frame(c, T_REDUCE, &mut self.scratch, i + 1, 8 * n)?;
                ensure!(
                    self.scratch.len() == 8 * n,
                    "all-reduce: rank {} sent {} values, rank 0 has {n}",
                    i + 1,
                    self.scratch.len() / 8
                );
                for (a, b) in acc.iter_mut().zip(self.scratch.chunks_exact(8)) {
                    *a += f64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                }
            }
            self.scratch.clear();
            self.scratch
                .extend(acc.iter().flat_map(|v| v.to_le_bytes()));
            for (i, c) in self.conns.iter_mut().enumerate() {
                send_frame(c, T_REDUCE, &self.scratch, i + 1)?;
            }
        } else {
            self.scratch.clear();
            self.scratch
                .extend(acc.iter().flat_map(|v| v.to_le_bytes()));
            let c = &mut self.conns[0];
            send_frame(c, T_REDUCE, &self.scratch, 0)?;
            recv_frame(c, T_REDUCE, &mut self.scratch, 0, 8 * n)?;
            ensure!(
                self.scratch.len() == 8 * n,
                "all-reduce: rank 0 sent {} values, this rank has {n}",
                self.scratch.len() / 8
            );
            for (a, b) in acc.iter_mut().zip(self.scratch.chunks_exact(8)) {
                *a = f64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            }
        }
        Ok(())
    }

    /// Rank 0's `data` (at most 16 MiB) replaces everyone's.
    pub fn broadcast(&mut self, data: &mut Vec<u8>) -> Result<()> {
        if self.rank == 0 {
            ensure!(
                data.len() <= MAX_BCAST,
                "broadcast: {} bytes, more than {MAX_BCAST}",
                data.len()
            );
            for (i, c) in self.conns.iter_mut().enumerate() {
                send_frame(c, T_BCAST, data, i + 1)?;
            }
        } else if self.world > 1 {
            recv_frame(&mut self.conns[0], T_BCAST, data, 0, MAX_BCAST)?;
        }
        Ok(())
    }

    /// Fail on every rank unless all ranks pass the same `value` (`what` names it).
    pub fn check_same(&mut self, what: &str, value: u64) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            let mut bad = Vec::new();
            for (i, c) in self.conns.iter_mut().enumerate() {
                recv_frame(c, T_CHECK, &mut self.scratch, i + 1, 8)?;
                let v = u64::from_le_bytes(self.scratch[..].try_into().unwrap_or([0; 8]));
                if self.scratch.len() != 8 || v != value {
                    bad.push(i + 1);
                }
            }
            let msg = if bad.is_empty() {
                String::new()
            } else {
                format!(
                    "ranks {} have different {what} than rank 0",
                    bad.iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            for (i, c) in self.conns.iter_mut().enumerate() {
                send_frame(c, T_CHECK, msg.as_bytes(), i + 1)?;
            }
            ensure!(msg.is_empty(), "{msg}");
        } else {
            let c = &mut self.conns[0];
            send_frame(c, T_CHECK, &value.to_le_bytes(), 0)?;
            recv_frame(c, T_CHECK, &mut self.scratch, 0, MAX_MSG)?;
            ensure!(
                self.scratch.is_empty(),
                "{}",
                String::from_utf8_lossy(&self.scratch)
            );
        }
        Ok(())
    }

    /// Wait until every rank gets here.
    pub fn barrier(&mut self) -> Result<()> {
        self.all_reduce_f64(&mut [0.0])
    }
}

/// FNV-1a over bytes, continuing from `h` (fingerprints of options, data and weights).
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The FNV-1a offset basis.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A fast checksum of f32 tensors (the weights every rank starts from): every value's bits,
/// mixed with its position.
pub fn checksum_f32(tensors: &[Vec<f32>]) -> u64 {
    let mut h = FNV_START;
    for t in tensors {
        let mut acc = 0u64;
        for (i, v) in t.iter().enumerate() {
            acc = acc.wrapping_add(crate::rng::mix64(((i as u64) << 32) ^ v.to_bits() as u64));
        }
        h = fnv1a(h, &acc.to_le_bytes());
        h = fnv1a(h, &(t.len() as u64).to_le_bytes());
    }
    h
}
