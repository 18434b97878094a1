//! The collectives of sharded optimizer state ([`super::super::zero`]) over the TCP group:
//! reduce-scatter, all-gather and gather of f32 tensors split into contiguous per-rank ranges.
//!
//! A tensor of `n` values is split by `bounds` (`world + 1` ascending offsets, `bounds[0] = 0`,
//! `bounds[world] = n`): rank `r` owns `bounds[r]..bounds[r + 1]` (possibly empty). Like
//! [`HostGroup::all_reduce_f32`], everything goes through rank 0 in windows of [`WINDOW`]
//! values, and sums are taken by rank 0 in rank order in f64 and rounded once to f32, so a
//! reduce-scatter gives every rank exactly the bits the all-reduce gives on its range.

use anyhow::{ensure, Result};

use super::{recv_frame, send_frame, tag_name, HostGroup, T_GATHER, T_SCATTER};
use std::net::TcpStream;

/// Values per exchanged window (4 MiB of f32).
pub const WINDOW: usize = 1 << 20;

/// Check that `bounds` splits `n` values over `world` ranks.
pub fn check_bounds(bounds: &[usize], world: usize, n: usize) -> Result<()> {
    ensure!(
        bounds.len() == world + 1,
        "shard bounds: {} offsets for a world of {world} (expected {})",
        bounds.len(),
        world + 1
    );
    ensure!(
        bounds[0] == 0 && bounds[world] == n && bounds.windows(2).all(|w| w[0] <= w[1]),
        "shard bounds {bounds:?} do not split {n} values into ascending ranges"
    );
    Ok(())
}

/// `a..b ∩ c..d`; when empty, `a..a` (so it indexes a window starting at `a`).
fn overlap(a: usize, b: usize, c: usize, d: usize) -> std::ops::Range<usize> {
    let (lo, hi) = (a.max(c), b.min(d));
    if lo < hi {
        lo..hi
    } else {
        a..a
    }
}

/// Receive one frame of `tag` from `peer` that must hold exactly `n` f32 values.
fn recv_f32s(s: &mut TcpStream, tag: u8, buf: &mut Vec<u8>, peer: usize, n: usize) -> Result<()> {
    recv_frame(s, tag, buf, peer, 4 * n)?;
    ensure!(
        buf.len() == 4 * n,
        "{}: rank {peer} sent {} values where {n} were expected",
        tag_name(tag),
        buf.len() / 4
    );
    Ok(())
}

fn f32_bytes(out: &mut Vec<u8>, x: &[f32]) {
    out.clear();
    out.extend(x.iter().flat_map(|v| v.to_le_bytes()));
}

fn read_f32s(dst: &mut [f32], bytes: &[u8]) {
    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

impl HostGroup {
    /// Sum `x` over all ranks; afterwards this rank's range `bounds[rank]..bounds[rank + 1]`
    /// holds the sum (the bits [`HostGroup::all_reduce_f32`] would give there), the rest of
    /// `x` is left as it was.
    pub fn reduce_scatter_f32(&mut self, x: &mut [f32], bounds: &[usize]) -> Result<()> {
        check_bounds(bounds, self.world, x.len())?;
        if self.world == 1 {
            return Ok(());
        }
        let mut acc: Vec<f64> = Vec::new();
        for w0 in (0..x.len()).step_by(WINDOW) {
            let w1 = (w0 + WINDOW).min(x.len());
            let len = w1 - w0;
            if self.rank == 0 {
                acc.clear();
                acc.extend(x[w0..w1].iter().map(|&v| v as f64));
                for (i, c) in self.conns.iter_mut().enumerate() {
                    recv_f32s(c, T_SCATTER, &mut self.scratch, i + 1, len)?;
                    for (a, b) in acc.iter_mut().zip(self.scratch.chunks_exact(4)) {
                        *a += f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64;
                    }
                }
                for (i, c) in self.conns.iter_mut().enumerate() {
                    let r = overlap(w0, w1, bounds[i + 1], bounds[i + 2]);
                    self.scratch.clear();
                    self.scratch.extend(
                        acc[r.start - w0..r.end - w0]
                            .iter()
                            .flat_map(|&v| (v as f32).to_le_bytes()),
                    );
                    send_frame(c, T_SCATTER, &self.scratch, i + 1)?;
                }
                let own = overlap(w0, w1, bounds[0], bounds[1]);
                for j in own {
                    x[j] = acc[j - w0] as f32;
                }
            } else {
                let own = overlap(w0, w1, bounds[self.rank], bounds[self.rank + 1]);
                let c = &mut self.conns[0];
                f32_bytes(&mut self.scratch, &x[w0..w1]);
                send_frame(c, T_SCATTER, &self.scratch, 0)?;
                recv_f32s(c, T_SCATTER, &mut self.scratch, 0, own.len())?;
                read_f32s(&mut x[own], &self.scratch);
            }
        }
        Ok(())
    }

    /// Every rank's range of `x` (`bounds[r]..bounds[r + 1]` from rank `r`) to every rank:
    /// afterwards `x` is the same on all ranks.
    pub fn all_gather_f32(&mut self, x: &mut [f32], bounds: &[usize]) -> Result<()> {
        check_bounds(bounds, self.world, x.len())?;
        self.gather_windows(x, bounds, true)
    }

    /// Every rank's range of a tensor of `bounds[world]` values to rank 0: `mine` is this
    /// rank's range (`bounds[rank + 1] − bounds[rank]` values); on rank 0 `out` (the whole
    /// tensor) receives every range, elsewhere `out` is unused (pass an empty slice).
    pub fn gather_f32(&mut self, mine: &[f32], bounds: &[usize], out: &mut [f32]) -> Result<()> {
        let n = bounds.last().copied().unwrap_or(0);
        check_bounds(bounds, self.world, n)?;
        let own = bounds[self.rank]..bounds[self.rank + 1];
        ensure!(
            mine.len() == own.len(),
            "gather: this rank holds {} values, its range {own:?} has {}",
            mine.len(),
            own.len()
        );
        if self.rank == 0 {
            ensure!(
                out.len() == n,
                "gather: rank 0's output holds {}, the tensor {n}",
                out.len()
            );
            out[own].copy_from_slice(mine);
            self.gather_windows(out, bounds, false)
        } else {
            // A stand-in of the whole tensor would cost its size; send the windows directly.
            for w0 in (0..n).step_by(WINDOW) {
                let w1 = (w0 + WINDOW).min(n);
                let r = overlap(w0, w1, own.start, own.end);
                let part = if r.is_empty() {
                    &[][..]
                } else {
                    &mine[r.start - own.start..r.end - own.start]
                };
                f32_bytes(&mut self.scratch, part);
                send_frame(&mut self.conns[0], T_GATHER, &self.scratch, 0)?;
            }
            Ok(())
        }
    }

    /// Rank 0 collects every rank's part of each window of `x`; with `to_all` it then sends
    /// the window to everyone.
    fn gather_windows(&mut self, x: &mut [f32], bounds: &[usize], to_all: bool) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        for w0 in (0..x.len()).step_by(WINDOW) {
            let w1 = (w0 + WINDOW).min(x.len());
            if self.rank == 0 {
                for (i, c) in self.conns.iter_mut().enumerate() {
                    let r = overlap(w0, w1, bounds[i + 1], bounds[i + 2]);
                    recv_f32s(c, T_GATHER, &mut self.scratch, i + 1, r.len())?;
                    read_f32s(&mut x[r], &self.scratch);
                }
                if to_all {
                    f32_bytes(&mut self.scratch, &x[w0..w1]);
                    for (i, c) in self.conns.iter_mut().enumerate() {
                        send_frame(c, T_GATHER, &self.scratch, i + 1)?;
                    }
                }
            } else {
                let r = overlap(w0, w1, bounds[self.rank], bounds[self.rank + 1]);
                let c = &mut self.conns[0];
                f32_bytes(&mut self.scratch, &x[r]);
                send_frame(c, T_GATHER, &self.scratch, 0)?;
                if to_all {
                    recv_f32s(c, T_GATHER, &mut self.scratch, 0, w1 - w0)?;
                    read_f32s(&mut x[w0..w1], &self.scratch);
                }
            }
        }
        Ok(())
    }
}
