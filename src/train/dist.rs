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
//!   broadcast, barrier; reduce-scatter, all-gather and gather of sharded tensors for ZeRO-1 in
//!   `dist/shard.rs`). The CPU backend reduces its gradients through it; the GPU path only
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
//!
//! ## The job secret and what it protects
//!
//! Rank 0 listens on a TCP port; anything that can reach it could otherwise take a rank's slot,
//! receive the NCCL id and add arbitrary gradients, or abort the job with one bad hello. Every
//! job therefore has a secret key ([`JobKey::from_env`]): `LLADA_DIST_SECRET` (at least 16
//! bytes), or the file `LLADA_DIST_SECRET_FILE`, or under SLURM (`SLURM_JOB_ID` set) the per-user
//! file `~/.llada/dist-secret`; a secret file must be a regular file of the current user that
//! nobody else may read or write (mode `0600`/`0400`). Under SLURM the key is derived from the
//! file and the job id, so every rank of a job computes the same key without talking to the
//! others, and each job has its own. Before anything else is exchanged both ends prove they know
//! the key: rank 0 sends a fresh 32-byte nonce, the peer answers with its own nonce, its hello
//! and HMAC-SHA256(key, both nonces, hello); rank 0 checks it and answers with its own HMAC over
//! the nonces, the hello and its verdict, which the peer checks. A peer that fails, says nothing
//! or is too slow is dropped and logged; handshakes run in parallel (at most
//! [`MAX_PENDING_HANDSHAKES`] at a time, the oldest cut off beyond), each bounded by
//! [`HANDSHAKE_TIMEOUT`] and by the rendezvous deadline, so strangers can neither abort the job
//! nor delay rank 0 past its deadline. Rank 0 listens only on the addresses `MASTER_ADDR`
//! resolves to (`LLADA_DIST_BIND` overrides, e.g. `0.0.0.0`); peers try every address it
//! resolves to, IPv6 included.
//!
//! Not protected: after the handshake, frames are neither encrypted nor authenticated, so an
//! attacker who can read and rewrite the TCP stream between two ranks (on the path, not merely
//! able to connect) can still see and alter the host collectives; the NCCL traffic itself is
//! NCCL's. Anyone who can read the secret (the environment of the processes, the file) is a
//! member of the job. Run multi-node jobs on a network you trust.

use super::dist_auth::{hmac, hmac_verify, nonce};
// Reduce-scatter, all-gather and gather of sharded tensors (ZeRO-1).
mod shard;
pub use super::dist_auth::{JobKey, MIN_SECRET_BYTES};
pub use super::dist_env::{first_host, timeouts, DistEnv, DEFAULT_PORT};
pub use shard::{check_bounds, WINDOW as SHARD_WINDOW};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};

const MAGIC: &[u8; 8] = b"LLADADP2";

/// How long one peer may take over its half of the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes rank 0 runs at once (each on a thread with a small stack); when a new
/// connection arrives with this many running, the oldest is cut off.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Read exactly `buf.len()` bytes before `deadline` (each read's timeout is the time left, so
/// a peer that trickles bytes cannot stretch it).
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::from(ErrorKind::TimedOut));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[off..]) {
            Ok(0) => return Err(std::io::Error::from(ErrorKind::UnexpectedEof)),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The addresses `host:port` resolves to (all of them, IPv4 and IPv6).
fn resolve_all(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    // `host` may be a bare IPv6 address (`::1`): `(host, port)` handles it, `"host:port"` not.
    let mut v: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    v.dedup();
    Ok(v)
}

/// What the client's and the server's MACs cover.
const CLIENT_LABEL: &[u8] = b"llada-dp2 client";
const SERVER_LABEL: &[u8] = b"llada-dp2 server";

/// A peer's authenticated hello.
struct Hello {
    rank: usize,
    world: usize,
    fingerprint: u64,
    fields: [u8; 24],
    server_nonce: [u8; 32],
    client_nonce: [u8; 32],
}

/// Rank 0's half of the handshake with one connection: nonce out, authenticated hello in.
fn authenticate_peer(
    s: &mut TcpStream,
    key: &JobKey,
    deadline: Instant,
) -> std::result::Result<Hello, String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let ns = nonce().map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(40);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&ns);
    s.write_all(&out)
        .map_err(|e| format!("sending the challenge: {e}"))?;
    let mut msg = [0u8; 8 + 32 + 24 + 32];
    read_exact_by(s, &mut msg, deadline).map_err(|e| match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => {
            "said nothing (or too little) within the handshake time".to_string()
        }
        ErrorKind::UnexpectedEof => "closed the connection during the handshake".to_string(),
        _ => format!("handshake: {e}"),
    })?;
    if &msg[..8] != MAGIC {
        return Err("is not a llada rank of this version (bad magic)".into());
    }
    let mut nc = [0u8; 32];
    nc.copy_from_slice(&msg[8..40]);
    let mut fields = [0u8; 24];
    fields.copy_from_slice(&msg[40..64]);
    if !hmac_verify(&key.key, &[CLIENT_LABEL, &ns, &nc, &fields], &msg[64..96]) {
        return Err("failed authentication (a different or missing job secret)".into());
    }
    let word = |i: usize| u64::from_le_bytes(fields[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
    Ok(Hello {
        rank: usize::try_from(word(0)).unwrap_or(usize::MAX),
        world: usize::try_from(word(1)).unwrap_or(usize::MAX),
        fingerprint: word(2),
        fields,
        server_nonce: ns,
        client_nonce: nc,
    })
}

/// Rank 0's answer to an authenticated hello: its MAC over the nonces, the hello and the
/// verdict (empty: accepted), then the verdict as a frame.
fn answer_peer(s: &mut TcpStream, key: &JobKey, h: &Hello, verdict: &str) -> Result<()> {
    let mac = hmac(
        &key.key,
        &[
            SERVER_LABEL,
            &h.client_nonce,
            &h.server_nonce,
            &h.fields,
            verdict.as_bytes(),
        ],
    );
    s.write_all(&mac)
        .map_err(|e| io_err(e, "rendezvous", h.rank))?;
    send_frame(s, T_CHECK, verdict.as_bytes(), h.rank)
}

const T_REDUCE: u8 = 1;
const T_BCAST: u8 = 2;
const T_CHECK: u8 = 3;
const T_SCATTER: u8 = 4;
const T_GATHER: u8 = 5;
/// Largest message (an error text) and broadcast (an NCCL id, options) a rank accepts.
const MAX_MSG: usize = 1 << 16;
const MAX_BCAST: usize = 1 << 24;

fn tag_name(t: u8) -> &'static str {
    match t {
        T_REDUCE => "all-reduce",
        T_BCAST => "broadcast",
        T_CHECK => "consistency check",
        T_SCATTER => "reduce-scatter",
        T_GATHER => "gather",
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
    /// Join the group of `env` with the job's key ([`JobKey::from_env`]): rank 0 listens on
    /// `MASTER_PORT` at the addresses `MASTER_ADDR` resolves to (or `LLADA_DIST_BIND`), the
    /// others connect to `MASTER_ADDR:MASTER_PORT`, retrying until `connect_timeout`.
    /// `fingerprint` (a hash of the run's options and data) must agree on every rank.
    pub fn join(env: &DistEnv, fingerprint: u64) -> Result<HostGroup> {
        let (op, connect) = timeouts()?;
        let key = JobKey::from_env()?;
        if env.rank == 0 {
            let bind = std::env::var("LLADA_DIST_BIND")
                .ok()
                .filter(|s| !s.trim().is_empty());
            let host = bind.as_deref().unwrap_or(&env.master_addr).trim();
            let addrs = resolve_all(host, env.master_port).with_context(|| {
                format!("rank 0 cannot resolve {host:?} (MASTER_ADDR or LLADA_DIST_BIND)")
            })?;
            let mut listeners = Vec::new();
            let mut errors = Vec::new();
            for a in &addrs {
                match TcpListener::bind(a) {
                    Ok(l) => listeners.push(l),
                    Err(e) => errors.push(format!("{a}: {e}")),
                }
            }
            ensure!(
                !listeners.is_empty(),
                "rank 0 cannot listen on port {} at {host:?} ({}): another run may hold the \
                 port, or the address is not one of this host's (set LLADA_DIST_BIND to the \
                 local address, or 0.0.0.0 for every interface)",
                env.master_port,
                errors.join("; ")
            );
            eprintln!(
                "rendezvous: rank 0 listening on {} (job secret from {})",
                listeners
                    .iter()
                    .filter_map(|l| l.local_addr().ok())
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                key.source
            );
            HostGroup::serve_on(listeners, env.world, fingerprint, &key, op, connect)
        } else {
            HostGroup::connect(env, fingerprint, &key, op, connect)
        }
    }

    /// Rank 0 on bound listeners (tests bind port 0): accept until every rank has joined or `connect_timeout`
    /// passes. Every connection is authenticated on its own thread (see the module
    /// documentation); strangers are dropped and logged, never fatal. An authenticated rank
    /// that runs other options, claims a taken rank or another world size stops the job.
    pub fn serve_on(
        listeners: Vec<TcpListener>,
        world: usize,
        fingerprint: u64,
        key: &JobKey,
        op_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<HostGroup> {
        ensure!(world >= 1, "world size 0");
        ensure!(!listeners.is_empty(), "rendezvous: no listener");
        for l in &listeners {
            l.set_nonblocking(true)
                .context("rendezvous: setting the listener non-blocking")?;
        }
        let deadline = Instant::now() + connect_timeout;
        let key = Arc::new(key.clone());
        let mut conns: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let mut joined = 0;
        type Done = (
            u64,
            SocketAddr,
            TcpStream,
            std::result::Result<Hello, String>,
        );
        let (tx, rx) = mpsc::channel::<Done>();
        // Running handshakes, oldest first: (id, a handle to cut it off).
        let mut pending: std::collections::VecDeque<(u64, TcpStream)> = Default::default();
        let mut next_id = 0u64;
        let mut cut_off = 0usize;
        while joined < world - 1 {
            let mut idle = true;
            for l in &listeners {
                match l.accept() {
                    Ok((s, addr)) => {
                        idle = false;
                        if pending.len() >= MAX_PENDING_HANDSHAKES {
                            // A flood: cut off the oldest handshake (a real rank finishes its
                            // own in milliseconds), log a count now and then.
                            if let Some((_, old)) = pending.pop_front() {
                                let _ = old.shutdown(std::net::Shutdown::Both);
                            }
                            cut_off += 1;
                            if cut_off.is_power_of_two() {
                                eprintln!(
                                    "rendezvous: {cut_off} handshakes cut off so far \
                                     ({MAX_PENDING_HANDSHAKES} running at once)"
                                );
                            }
                        }
                        let Ok(handle) = s.try_clone() else {
                            continue;
                        };
                        let id = next_id;
                        next_id += 1;
                        let (tx, key) = (tx.clone(), key.clone());
                        let hs_deadline = (Instant::now() + HANDSHAKE_TIMEOUT).min(deadline);
                        let spawned = std::thread::Builder::new()
                            .name("llada-rendezvous".into())
                            .stack_size(256 << 10)
                            .spawn(move || {
                                let mut s = s;
                                let r = s
                                    .set_nonblocking(false)
                                    .map_err(|e| e.to_string())
                                    .and_then(|_| authenticate_peer(&mut s, &key, hs_deadline));
                                let _ = tx.send((id, addr, s, r));
                            });
                        match spawned {
                            Ok(_) => pending.push_back((id, handle)),
                            Err(e) => {
                                eprintln!("rendezvous: dropped a connection from {addr}: {e}")
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        // E.g. out of file descriptors under a flood: not fatal, try again.
                        eprintln!("rendezvous: accepting a connection: {e}");
                    }
                }
            }
            while let Ok((id, addr, mut s, r)) = rx.try_recv() {
                idle = false;
                pending.retain(|(p, _)| *p != id);
                let h = match r {
                    Ok(h) => h,
                    Err(why) => {
                        eprintln!("rendezvous: dropped a connection from {addr}: it {why}");
                        continue;
                    }
                };
                let r = h.rank;
                let refuse = if h.world != world {
                    Some(format!(
                        "rank {r} says the world size is {}, rank 0 says {world}",
                        h.world
                    ))
                } else if r == 0 || r >= world {
                    Some(format!("a process claims rank {r} in a world of {world}"))
                } else if conns[r - 1].is_some() {
                    Some(format!("two processes claim rank {r}"))
                } else if h.fingerprint != fingerprint {
                    Some(format!(
                        "rank {r} runs different options, data or weights than rank 0 \
                         (fingerprint {:016x} vs {fingerprint:016x})",
                        h.fingerprint
                    ))
                } else {
                    None
                };
                match refuse {
                    Some(msg) => {
                        let _ = answer_peer(&mut s, &key, &h, &msg);
                        bail!("rendezvous: {msg}");
                    }
                    None => {
                        s.set_write_timeout(Some(op_timeout))?;
                        if let Err(e) = answer_peer(&mut s, &key, &h, "") {
                            eprintln!(
                                "rendezvous: rank {r} from {addr} left during the handshake: {e:#}"
                            );
                            continue;
                        }
                        s.set_read_timeout(Some(op_timeout))?;
                        conns[r - 1] = Some(s);
                        joined += 1;
                    }
                }
            }
            if joined == world - 1 {
                break;
            }
            if Instant::now() > deadline {
                let missing: Vec<String> = conns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_none())
                    .map(|(i, _)| (i + 1).to_string())
                    .collect();
                bail!(
                    "rendezvous: ranks {} did not connect within {:.0} s \
                     (LLADA_DIST_CONNECT_TIMEOUT); were they started, with the same job secret, \
                     and can they reach this host at the MASTER_ADDR they were given?",
                    missing.join(", "),
                    connect_timeout.as_secs_f64()
                );
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(HostGroup {
            rank: 0,
            world,
            conns: conns.into_iter().flatten().collect(),
            scratch: Vec::new(),
        })
    }

    /// Rank `env.rank > 0`: connect to rank 0 (every address `MASTER_ADDR` resolves to, in
    /// turn, until `connect_timeout`), then the mutual authentication.
    pub fn connect(
        env: &DistEnv,
        fingerprint: u64,
        key: &JobKey,
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
        // Try every address in turn: the first that answers with a challenge is rank 0.
        let try_once = || -> std::result::Result<(TcpStream, [u8; 32]), String> {
            let addrs =
                resolve_all(&env.master_addr, env.master_port).map_err(|e| e.to_string())?;
            let mut last = String::from("no address");
            for a in addrs {
                let mut s = match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                    Ok(s) => s,
                    Err(e) => {
                        last = format!("{a}: {e}");
                        continue;
                    }
                };
                let mut c = [0u8; 40];
                let by = Instant::now() + HANDSHAKE_TIMEOUT;
                if let Err(e) = read_exact_by(&mut s, &mut c, by) {
                    last = format!("{a}: no challenge from rank 0: {e}");
                    continue;
                }
                if &c[..8] != MAGIC {
                    last = format!("{a}: not a llada rank 0 of this version");
                    continue;
                }
                let mut ns = [0u8; 32];
                ns.copy_from_slice(&c[8..]);
                return Ok((s, ns));
            }
            Err(last)
        };
        let (mut s, ns) = loop {
            let last = match try_once() {
                Ok(x) => break x,
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
        s.set_write_timeout(Some(op_timeout))?;
        let nc = nonce()?;
        let mut fields = [0u8; 24];
        fields[..8].copy_from_slice(&(env.rank as u64).to_le_bytes());
        fields[8..16].copy_from_slice(&(env.world as u64).to_le_bytes());
        fields[16..24].copy_from_slice(&fingerprint.to_le_bytes());
        let mac = hmac(&key.key, &[CLIENT_LABEL, &ns, &nc, &fields]);
        let mut hello = Vec::with_capacity(96);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&nc);
        hello.extend_from_slice(&fields);
        hello.extend_from_slice(&mac);
        s.write_all(&hello)
            .map_err(|e| io_err(e, "rendezvous", 0))?;
        let mut server_mac = [0u8; 32];
        read_exact_by(&mut s, &mut server_mac, Instant::now() + op_timeout).map_err(|e| {
            if e.kind() == ErrorKind::UnexpectedEof {
                anyhow!(
                    "rank {}: rank 0 at {target} closed the connection during the handshake: the \
                     job secret differs between the ranks ({} here), or it is not this job's rank 0",
                    env.rank,
                    key.source
                )
            } else {
                io_err(e, "rendezvous", 0)
            }
        })?;
        s.set_read_timeout(Some(op_timeout))?;
        let mut verdict = Vec::new();
        recv_frame(&mut s, T_CHECK, &mut verdict, 0, MAX_MSG)?;
        ensure!(
            hmac_verify(
                &key.key,
                &[SERVER_LABEL, &nc, &ns, &fields, &verdict],
                &server_mac
            ),
            "rank {}: the process at {target} failed to prove it knows the job secret: not this \
             job's rank 0",
            env.rank
        );
        ensure!(
            verdict.is_empty(),
            "rendezvous refused by rank 0: {}",
            String::from_utf8_lossy(&verdict)
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
