//! Where this process sits in a data-parallel run: ranks from torchrun's or SLURM's variables,
//! the rendezvous address, and the group's timeouts (re-exported by [`super::dist`]).

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::time::Duration;

/// Default rendezvous port (as torchrun), offset by the SLURM job id when there is one.
pub const DEFAULT_PORT: u16 = 29500;

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
