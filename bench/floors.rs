//! Each op class of `llada-bench --breakdown` against its own floor: the work a generation does
//! per class (model arithmetic, counted from the shapes of the forward passes it ran), the rate
//! the measured time gives, and the time that work takes at the device's ceiling (GEMM TFLOP/s,
//! memory bandwidth). Pure functions of the shapes and the measurements, tested on the CPU.
//!
//! Counted work (bf16 activations, 2 bytes; weights at `weight_bytes` per parameter):
//! - gemm: `2 · tokens · P` FLOPs, `P = L·(C·(NH+2·NKV)·HD + NH·HD·C + 3·C·F)` the layer
//!   parameters; bytes = the layer weights read once per pass. Floor = max(FLOPs / ceiling,
//!   bytes / bandwidth).
//! - attention: `4 · TQ · Lk · NH · HD` FLOPs per batch row and layer (QKᵀ and PV); floor =
//!   FLOPs / GEMM ceiling (tensor-core work, no faster than the GEMMs).
//! - norm+elementwise: bytes each glue op must read and write once per token and layer (two
//!   residual-add + RMSNorm passes `2·4·C`, RoPE `2·(NH+NKV)·HD`, SwiGLU `3·F`, elements of 2
//!   bytes); floor = bytes / bandwidth.
//! - lm_head: `2 · C · V` FLOPs per requested row; the `V × C` head read once per pass.
//! - sampler/head: the `R × V` logits read once; floor = bytes / bandwidth.
//! - io: host uploads, no floor.

use serde::Serialize;

/// The model dimensions the work is counted from.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub layers: f64,
    pub d: f64,
    pub nh: f64,
    pub nkv: f64,
    pub hd: f64,
    pub f: f64,
    pub v: f64,
}

impl Dims {
    pub fn of(c: &llada::hf::config::ModelConfig) -> Dims {
        Dims {
            layers: c.n_layers as f64,
            d: c.d_model as f64,
            nh: c.n_heads as f64,
            nkv: c.n_kv_heads as f64,
            hd: c.head_dim() as f64,
            f: c.mlp_hidden_size as f64,
            v: c.embedding_size as f64,
        }
    }

    /// Parameters of the layer GEMMs (all layers).
    pub fn layer_params(&self) -> f64 {
        let qkv = self.d * (self.nh + 2.0 * self.nkv) * self.hd;
        self.layers * (qkv + self.nh * self.hd * self.d + 3.0 * self.d * self.f)
    }
}

/// One kind of forward pass: `count` passes over `b` batch rows of `tq` query tokens attending to
/// `lk` keys each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pass {
    pub count: f64,
    pub b: f64,
    pub tq: f64,
    pub lk: f64,
}

/// The passes of one generation: `nfe` forward passes over `b` rows of `t = lp + gen` tokens,
/// in blocks of `block`; `cache` is "none", "prefix" or "dual". The first pass of every block
/// is a full pass; later ones run the block (dual) or the block and everything after it
/// (prefix), spread evenly over the blocks (exact for the fixed schedule, the average for the
/// threshold / factor rules, whose passes per block vary).
pub fn passes(cache: &str, nfe: usize, b: usize, lp: usize, gen: usize, block: usize) -> Vec<Pass> {
    let (b, t) = (b as f64, (lp + gen) as f64);
    let full = |count: f64| Pass {
        count,
        b,
        tq: t,
        lk: t,
    };
    let blocks = gen.checked_div(block).unwrap_or(0).max(1);
    if cache == "none" || nfe <= blocks {
        return vec![full(nfe as f64)];
    }
    let cached = (nfe - blocks) as f64 / blocks as f64;
    let mut out = vec![full(blocks as f64)];
    for k in 0..blocks {
        let s = (lp + k * block) as f64;
        let tq = if cache == "dual" { block as f64 } else { t - s };
        out.push(Pass {
            count: cached,
            b,
            tq,
            lk: t,
        });
    }
    out
}

/// Work per op class of a set of passes (totals).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub gemm_flops: f64,
    pub gemm_bytes: f64,
    pub attn_flops: f64,
    pub glue_bytes: f64,
    pub head_flops: f64,
    pub head_bytes: f64,
    pub select_bytes: f64,
}

/// The work of `passes` plus `rows` LM-head rows in total (the generation's `rows_predicted`).
pub fn work(dims: &Dims, passes: &[Pass], rows: f64, weight_bytes: f64) -> Work {
    let mut w = Work::default();
    let n_passes: f64 = passes.iter().map(|p| p.count).sum();
    let per_tok_glue = 2.0 * (8.0 * dims.d + 2.0 * (dims.nh + dims.nkv) * dims.hd + 3.0 * dims.f);
    for p in passes {
        let tokens = p.count * p.b * p.tq;
        w.gemm_flops += 2.0 * tokens * dims.layer_params();
        w.attn_flops += p.count * p.b * dims.layers * 4.0 * p.tq * p.lk * dims.nh * dims.hd;
        w.glue_bytes += tokens * dims.layers * per_tok_glue;
    }
    w.gemm_bytes = n_passes * dims.layer_params() * weight_bytes;
    w.head_flops = 2.0 * dims.d * dims.v * rows;
    w.head_bytes = n_passes * dims.v * dims.d * 2.0;
    w.select_bytes = rows * dims.v * 2.0;
    w
}

/// One class against its floor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Floor {
    pub class: String,
    /// Measured, ms per pass.
    pub ms: f64,
    /// Achieved TFLOP/s (compute classes), else `None`.
    pub tflops: Option<f64>,
    /// Achieved GB/s of the counted bytes.
    pub gbs: Option<f64>,
    /// Time the counted work takes at the ceilings, ms per pass (`None`: no ceiling known).
    pub floor_ms: Option<f64>,
    /// `floor_ms / ms`: 1 = at the floor.
    pub of_floor: Option<f64>,
}

/// Each measured class (`(name, ms per pass)`, names of `OpClass::name`) against its floor, for
/// `work` spread over `n_passes`; `ceiling_tflops` (GEMM) and `bandwidth_gbs` where known.
pub fn floors(
    measured: &[(String, f64)],
    w: &Work,
    n_passes: f64,
    ceiling_tflops: Option<f64>,
    bandwidth_gbs: Option<f64>,
) -> Vec<Floor> {
    let per = n_passes.max(1.0);
    // ms per pass at the ceilings; None when a needed ceiling is unknown.
    let compute = |flops: f64| ceiling_tflops.map(|c| flops / per / (c * 1e12) * 1e3);
    let memory = |bytes: f64| bandwidth_gbs.map(|b| bytes / per / (b * 1e9) * 1e3);
    let both = |flops: f64, bytes: f64| match (compute(flops), memory(bytes)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    measured
        .iter()
        .map(|(class, ms)| {
            let (flops, bytes, floor_ms) = match class.as_str() {
                "gemm" => (
                    Some(w.gemm_flops),
                    w.gemm_bytes,
                    both(w.gemm_flops, w.gemm_bytes),
                ),
                "attention" => (Some(w.attn_flops), 0.0, compute(w.attn_flops)),
                "norm+elementwise" => (None, w.glue_bytes, memory(w.glue_bytes)),
                "lm_head" => (
                    Some(w.head_flops),
                    w.head_bytes,
                    both(w.head_flops, w.head_bytes),
                ),
                "sampler/head" => (None, w.select_bytes, memory(w.select_bytes)),
                _ => (None, 0.0, None),
            };
            let s = ms / 1e3 * per;
            let rate = |x: f64| (s > 0.0 && x > 0.0).then(|| x / s);
            Floor {
                class: class.clone(),
                ms: *ms,
                tflops: flops.and_then(rate).map(|r| r / 1e12),
                gbs: rate(bytes).map(|r| r / 1e9),
                floor_ms,
                of_floor: floor_ms.filter(|_| *ms > 0.0).map(|f| f / ms),
            }
        })
        .collect()
}

/// Peak memory bandwidth in GB/s of a device by its name (the vendor's figure), for the floors
/// when `--bandwidth-gbs` is not given.
pub fn known_bandwidth_gbs(device: &str) -> Option<f64> {
    let d = device.to_ascii_uppercase();
    [
        ("H200", 4800.0),
        ("H100 PCIE", 2000.0),
        ("H100", 3350.0),
        ("A100-SXM4-80GB", 2039.0),
        ("A100", 1555.0),
        ("L40S", 864.0),
        ("RTX 4090", 1008.0),
    ]
    .iter()
    .find(|(k, _)| d.contains(k))
    .map(|&(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LLaDA-8B: d 4096, 32 layers, 32 heads of 128, MLP 12288, vocab 126464.
    fn llada8b() -> Dims {
        Dims {
            layers: 32.0,
            d: 4096.0,
            nh: 32.0,
            nkv: 32.0,
            hd: 128.0,
            f: 12288.0,
            v: 126464.0,
        }
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn full_step_matches_the_documented_llada8b_figures() {
        // performance.md: 5.48 TFLOP per full 384-token step (layers + head on 32 rows) is
        // 6.9 ms at 800 TFLOP/s; the 16 GB of weights at 4.8 TB/s are 3.4 ms.
        let d = llada8b();
        assert!(
            close(d.layer_params(), 6.98e9, 0.01),
            "{}",
            d.layer_params()
        );
        let p = passes("none", 1, 1, 128, 256, 32);
        assert_eq!(
            p,
            vec![Pass {
                count: 1.0,
                b: 1.0,
                tq: 384.0,
                lk: 384.0
            }]
        );
        let w = work(&d, &p, 32.0, 2.0);
        let total = w.gemm_flops + w.attn_flops + w.head_flops;
        assert!(close(total, 5.48e12, 0.01), "{total:e}");
        // Attention: 4·T²·NH·HD per layer = 2.4 GFLOP at T = 384.
        assert!(close(w.attn_flops / 32.0, 2.42e9, 0.01), "{}", w.attn_flops);
        let meas = vec![("gemm".to_string(), 8.0), ("io".to_string(), 0.1)];
        let f = floors(&meas, &w, 1.0, Some(800.0), Some(4800.0));
        assert!(close(
            f[0].floor_ms.unwrap(),
            w.gemm_flops / 800e12 * 1e3,
            1e-12
        ));
        assert!(close(
            f[0].tflops.unwrap(),
            w.gemm_flops / 8e-3 / 1e12,
            1e-12
        ));
        assert!(close(
            f[0].of_floor.unwrap(),
            f[0].floor_ms.unwrap() / 8.0,
            1e-12
        ));
        assert_eq!((f[1].floor_ms, f[1].tflops, f[1].gbs), (None, None, None));
    }

    #[test]
    fn cached_passes_are_weight_read_bound() {
        // Dual cache, 8 blocks of 32, 256 passes: 8 full + 248 of 32 tokens over 384 keys.
        let d = llada8b();
        let p = passes("dual", 256, 1, 128, 256, 32);
        assert_eq!(p[0].count, 8.0);
        assert!(p[1..]
            .iter()
            .all(|q| q.tq == 32.0 && q.lk == 384.0 && q.count == 31.0));
        let w = work(&d, &p, 256.0 * 4.0, 2.0);
        let f = floors(
            &[("gemm".to_string(), 3.0)],
            &w,
            256.0,
            Some(800.0),
            Some(4800.0),
        );
        // Per pass the weights (14 GB of layer weights) read at 4.8 TB/s dominate the FLOPs.
        let bytes_ms = d.layer_params() * 2.0 / 4800e9 * 1e3;
        assert!(close(f[0].floor_ms.unwrap(), bytes_ms, 1e-9), "{:?}", f[0]);
        assert!(close(
            f[0].gbs.unwrap(),
            d.layer_params() * 2.0 / 3e-3 / 1e9,
            1e-9
        ));
        // Prefix: the cached span runs from the block start to the end.
        let p = passes("prefix", 16, 2, 128, 256, 128);
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[1].tq, p[2].tq, p[1].count, p[1].b),
            (256.0, 128.0, 7.0, 2.0)
        );
    }

    #[test]
    fn unknown_ceilings_give_no_floor_and_zero_time_no_rate() {
        let w = work(&llada8b(), &passes("none", 2, 1, 8, 8, 8), 8.0, 2.0);
        let meas = vec![
            ("norm+elementwise".to_string(), 0.5),
            ("attention".to_string(), 0.0),
        ];
        let f = floors(&meas, &w, 2.0, None, None);
        assert_eq!(f[0].floor_ms, None);
        assert!(f[0].gbs.unwrap() > 0.0);
        assert_eq!((f[1].tflops, f[1].of_floor), (None, None));
        assert_eq!(known_bandwidth_gbs("NVIDIA H200"), Some(4800.0));
        assert_eq!(known_bandwidth_gbs("NVIDIA H100 80GB HBM3"), Some(3350.0));
        assert_eq!(known_bandwidth_gbs("cpu"), None);
    }
}
