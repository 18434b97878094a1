//! The memory model of a training run: bytes per rank by category, before anything is
//! allocated (printed at the start of `llada train`, alone with `llada train --memory-plan`).
//!
//! With `P` parameters, `N` data-parallel ranks and shard `S` (the largest, rank 0's: `⌈P/N⌉`
//! rounded up to [`super::zero::SHARD_ALIGN`] values under ZeRO-1, else `S = P`):
//!
//! | category | f32 storage (`--storage f32`, the default) | bf16 storage (`--storage bf16`, [`super::mixed`]) |
//! |---|---|---|
//! | weights (whole model, every rank) | `4·P` | `2·P` |
//! | master weights (f32) | 0: the f32 weights are the master copy | `4·S` |
//! | AdamW moments (f32 `m`, `v`) | `8·S` | `8·S` |
//! | gradients (f32, whole model: ZeRO-1 does not shard them) | `4·P` | `4·P` |
//! | activations | `4·A` | `2·A + 2·S` |
//!
//! `A`, the activation values of one micro-batch of `n = B·T` tokens on one rank (the buffers of
//! [`super::model::forward_backward_on`]), counting every token as a loss row (`R = n`, an upper
//! bound: pretraining masks half the tokens on average, SFT only the response):
//! - kept for the backward pass, per layer: `n·(4C + 2·QW + 2·KW + NH + 2 + 3F)` (`x_in`, `r1`,
//!   `h1`, `q`, `k`, `v`, `lse`, `a`, `x_mid`, `r2`, `h2`, `g`, `u`, `m`), with `QW = NH·HD`,
//!   `KW = NKV·HD`;
//! - the residual stream and a projection output: `2·n·C`;
//! - the LM head on the loss rows: `R·(4C + 2 + V)` (`xr`, `hf`, their gradients, the norm's
//!   and loss rows' scalars, the logits, overwritten by their gradient);
//! - the backward pass's scratch: `n·(2C + 3F + 2·QW + 2·KW + NH)`.
//!
//! `S ⊂ A`, the per-row statistics that stay f32 in bf16 storage (norm scales, attention
//! log-sum-exps and `delta`, loss rows; [`super::model::stat_floats`]): `N·(2 + NH)` per kept
//! layer, `2R + N·NH` beside. Activation gradients are bf16 too ([`super::mixed`]).
//!
//! All layers kept: `A = L·layer + rest`; with per-layer recomputation (`--recompute`) only the
//! layers' inputs (`L·n·C`) stay, and one layer's activations beyond its input are rebuilt at a
//! time: `A = L·n·C + (layer − n·C) + rest`. The numbers are
//! [`super::model::activation_floats`]'s, the pass's own accounting.
//!
//! Not counted: the CUDA context and cuBLAS workspace (a few hundred MiB), allocator
//! fragmentation, the data and token ids (small), and rank 0's host memory while it saves.

use super::backend::Storage;
use super::zero::SHARD_ALIGN;
use crate::hf::checkpoint::expected_tensors;
use crate::hf::config::ModelConfig;
use anyhow::{ensure, Result};

/// Bytes per rank of one run, by category.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub storage: Storage,
    /// Parameters `P`.
    pub params: u64,
    pub world: u64,
    /// 0 or 1.
    pub zero: u8,
    /// Parameters whose master weights and moments this rank keeps (the largest shard).
    pub shard: u64,
    pub weights: u64,
    pub master: u64,
    pub moments: u64,
    pub gradients: u64,
    /// Activation values of one micro-batch with every layer's kept.
    pub activations_kept: u64,
    /// ... and with per-layer recomputation.
    pub activations_recompute: u64,
}

/// Activation values (not bytes) of one micro-batch of `b × t` tokens, every token a loss
/// row: (all layers kept, with per-layer recomputation), from
/// [`super::model::activation_floats`] (the buffers the pass allocates).
pub fn activation_values(cfg: &ModelConfig, b: usize, t: usize) -> (u64, u64) {
    let f = |r| super::model::activation_floats(cfg, b, t, b * t, r) as u64;
    (f(false), f(true))
}

/// Activation bytes of one micro-batch of `b × t` tokens stored as `storage` (all layers
/// kept, with per-layer recomputation): 4 bytes a value in f32 storage; in bf16 storage 2,
/// and 4 for the per-row statistics ([`super::model::stat_floats`]).
pub fn activation_bytes(cfg: &ModelConfig, b: usize, t: usize, storage: Storage) -> (u64, u64) {
    let (kept, rec) = activation_values(cfg, b, t);
    match storage {
        Storage::F32 => (4 * kept, 4 * rec),
        Storage::Bf16 => {
            let s = |r| super::model::stat_floats(cfg, b, t, b * t, r) as u64;
            (2 * kept + 2 * s(false), 2 * rec + 2 * s(true))
        }
    }
}

/// The plan of a run of `cfg` with micro-batches of `batch_size × seq_len` tokens per rank over
/// `world` ranks, ZeRO stage `zero` (0 or 1).
pub fn plan(
    cfg: &ModelConfig,
    batch_size: usize,
    seq_len: usize,
    world: usize,
    zero: u8,
    storage: Storage,
) -> Result<MemoryPlan> {
    ensure!(world >= 1, "a world of 0 ranks");
    ensure!(zero <= 1, "ZeRO stage {zero}: only 0 and 1 exist");
    ensure!(
        zero == 0 || world >= 2,
        "--zero 1 shards over data-parallel ranks: the world size (--world-size) must be 2 or more"
    );
    let p: u64 = expected_tensors(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let w = world as u64;
    let shard = if zero == 1 {
        p.div_ceil(w).div_ceil(SHARD_ALIGN as u64) * SHARD_ALIGN as u64
    } else {
        p
    }
    .min(p);
    let (wbytes, master) = match storage {
        Storage::F32 => (4, 0),
        Storage::Bf16 => (2, 4 * shard),
    };
    let (kept, rec) = activation_bytes(cfg, batch_size, seq_len, storage);
    Ok(MemoryPlan {
        storage,
        params: p,
        world: w,
        zero,
        shard,
        weights: wbytes * p,
        master,
        moments: 8 * shard,
        gradients: 4 * p,
        activations_kept: kept,
        activations_recompute: rec,
    })
}

impl MemoryPlan {
    /// Everything but the activations.
    pub fn state(&self) -> u64 {
        self.weights + self.master + self.moments + self.gradients
    }
    /// The total with all layers' activations kept, or with per-layer recomputation.
    pub fn total(&self, recompute: bool) -> u64 {
        self.state()
            + if recompute {
                self.activations_recompute
            } else {
                self.activations_kept
            }
    }
}

/// `x` bytes in GiB, two decimals.
pub fn gib(x: u64) -> String {
    format!("{:.2} GiB", x as f64 / (1u64 << 30) as f64)
}

/// `x` bytes in B, KiB, MiB or GiB (the largest unit it has one of), two decimals.
pub fn bytes(x: u64) -> String {
    match x {
        0..=1023 => format!("{x} B"),
        1024..=0xf_ffff => format!("{:.2} KiB", x as f64 / 1024.0),
        0x10_0000..=0x3fff_ffff => format!("{:.2} MiB", x as f64 / (1u64 << 20) as f64),
        _ => gib(x),
    }
}

/// A table of plans side by side (the same run in several storages), one line per category.
pub fn render(plans: &[MemoryPlan]) -> String {
    let Some(first) = plans.first() else {
        return String::new();
    };
    let sharded = if first.zero == 1 {
        format!("1/{} shard", first.world)
    } else {
        "unsharded".into()
    };
    type Row = (String, fn(&MemoryPlan) -> u64);
    let rows: [Row; 8] = [
        ("weights (whole model)".into(), |p| p.weights),
        (format!("master weights (f32, {sharded})"), |p| p.master),
        (format!("AdamW moments (f32, {sharded})"), |p| p.moments),
        ("gradients (f32, whole model)".into(), |p| p.gradients),
        ("activations, all layers kept".into(), |p| {
            p.activations_kept
        }),
        ("activations, --recompute".into(), |p| {
            p.activations_recompute
        }),
        ("total, all layers kept".into(), |p| p.total(false)),
        ("total, --recompute".into(), |p| p.total(true)),
    ];
    let mut s = format!("{:<40}", "bytes per rank");
    for p in plans {
        s += &format!("{:>16}", format!("{} storage", p.storage));
    }
    s.push('\n');
    for (name, f) in rows {
        s += &format!("{name:<40}");
        for p in plans {
            s += &format!("{:>16}", bytes(f(p)));
        }
        s.push('\n');
    }
    s
}
