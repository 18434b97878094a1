//! `llada-bench`: tokens/s per step count on the standard LLaDA workload.
//!
//! With no arguments: prompt 128, gen_length 256, block_length 32, steps 256/128/64/32, batch 1,
//! temperature 0, on the best device (the `llada-8b` random-weight preset on a GPU, `tiny` on a
//! CPU). Prints a table per configuration headed by device, driver and commit; `--json FILE`
//! writes the same as JSON. `--cache none,prefix,dual` and `--threshold 0.9` / `--factor 1`
//! add Fast-dLLM rows (reference §7); there "ms/step" is per forward pass (the median is a
//! cached pass when most passes are cached), and TFLOP/s is left out. `--breakdown` adds the time
//! per op class and each class against its floor (bench/floors.rs: GEMM and attention TFLOP/s
//! against the measured GEMM ceiling, bytes moved against the memory bandwidth). Each row names
//! where its commit selection ran (`select`: host, device, step-graph; the switches
//! `LLADA_DEVICE_SELECT=1` / `LLADA_STEP_GRAPH=1` are read from the environment).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;

use llada::engine::device::{self, DeviceChoice, Resolved};
use llada::engine::fast::{CacheMode, Decode};
use llada::engine::sampler::{GenerateParams, Hooks, Progress};
use llada::engine::stepgraph::selection_mode;
use llada::engine::{self, Engine, ModelSpec, Opened};
use llada::quant::WeightsMode;

mod floors;

#[derive(Parser)]
#[command(
    name = "llada-bench",
    version,
    about = "LLaDA generation throughput per step count"
)]
struct Args {
    /// A Hugging Face model folder (default: a random-weight preset).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// tiny | llada-8b (default: llada-8b on a GPU, tiny on the CPU).
    #[arg(long)]
    preset: Option<String>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Linear-layer weights, comma separated, one block of rows each in the same run:
    /// checkpoint (as stored) | fp8 (E4M3 per channel, activations per token; a bf16 model is
    /// quantized at load). E.g. `checkpoint,fp8`.
    #[arg(long, default_value = "checkpoint")]
    weights: String,
    /// Compute dtype: auto (the checkpoint's) | bf16 | f32 (CUDA computes in bf16 only).
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 256)]
    gen_length: usize,
    #[arg(long, default_value_t = 32)]
    block_length: usize,
    /// Step counts, comma separated.
    #[arg(long, default_value = "256,128,64,32")]
    steps: String,
    /// Batch sizes, comma separated.
    #[arg(long, default_value = "1")]
    batch: String,
    /// Untimed generations before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed generations per configuration (the median is reported).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Fast-dLLM cache modes to run, comma separated: none, prefix, dual.
    #[arg(long, default_value = "none")]
    cache: String,
    /// Fast-dLLM confidence thresholds, comma separated (each adds one row per cache mode, with
    /// steps = number of blocks, after the schedule rows).
    #[arg(long)]
    threshold: Option<String>,
    /// Fast-dLLM factors, comma separated (as --threshold).
    #[arg(long)]
    factor: Option<String>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// After each configuration, one more (profiled) generation: time per step split by op
    /// class (attention, GEMMs, norms+elementwise, LM head, sampler head, uploads), from device
    /// events on CUDA (graphs off while profiling) or wall clock on the CPU.
    #[arg(long)]
    breakdown: bool,
    /// Memory bandwidth in GB/s for the --breakdown floors (default: the vendor figure of a
    /// known GPU by name, e.g. 4800 for an H200; none on other devices).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Row {
    /// `checkpoint` or `fp8` (`--weights`).
    weights: String,
    /// Where each step's commit selection ran: `host`, `device` (`LLADA_DEVICE_SELECT=1`) or
    /// `step-graph` (whole steps on the device, `LLADA_STEP_GRAPH=1`; see
    /// `llada::engine::stepgraph::selection_mode`). Step-graph rows of plain `generate` queue
    /// their steps without waiting: their ms/step median, min and max are the mean.
    select: String,
    batch: usize,
    cache: String,
    threshold: Option<f64>,
    factor: Option<f64>,
    steps: usize,
    forward_passes: usize,
    tokens_per_s: f64,
    seconds: f64,
    ms_per_step_median: f64,
    ms_per_step_min: f64,
    ms_per_step_max: f64,
    /// Model FLOP/s; only for full-sequence passes (cache none).
    tflops: Option<f64>,
    gemm_ceiling_share: Option<f64>,
    peak_memory_bytes: Option<usize>,
    /// With --breakdown: (op class, ms per forward pass) of a profiled run.
    #[serde(skip_serializing_if = "Option::is_none")]
    breakdown_ms_per_step: Option<Vec<(String, f64)>>,
    /// With --breakdown: each class against its floor (bench/floors.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    floors: Option<Vec<floors::Floor>>,
}

/// The comma-separated values of `--what` (blanks skipped), or an error naming the bad one.
fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("bad {what} {x:?} in {s:?}: {e}"))
        })
        .collect()
}

fn list(s: &str, what: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = parse_list(s, what)?;
    if v.is_empty() || v.contains(&0) {
        bail!("--{what} needs positive integers, got {s:?}");
    }
    Ok(v)
}

/// Model FLOPs of one full-sequence forward: GEMMs over all tokens, attention, and the LM head
/// over the rows the sampler asks for.
fn step_flops(e: &dyn Engine, b: usize, t: usize, rows: usize) -> f64 {
    let c = e.config();
    let (d, hd, f, v) = (
        c.d_model as f64,
        c.head_dim() as f64,
        c.mlp_hidden_size as f64,
        c.embedding_size as f64,
    );
    let qkv = d * (c.n_heads as f64 + 2.0 * c.n_kv_heads as f64) * hd;
    let per_tok = 2.0 * (qkv + d * d + 3.0 * d * f);
    let attn = 4.0 * (t as f64) * (t as f64) * (c.n_heads as f64) * hd;
    c.n_layers as f64 * (per_tok * (b * t) as f64 + attn * b as f64) + 2.0 * d * v * rows as f64
}

/// The commit being measured: `LLADA_COMMIT` (the GPU bundle sets it), else `git rev-parse` in
/// the current directory, else "unknown".
fn commit() -> String {
    if let Ok(c) = std::env::var("LLADA_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// Run the workload once per `--weights` mode (e.g. `checkpoint,fp8`: FP8 rows beside bf16 in
/// the same run) and write one JSON with every row (each names its `weights`).
fn run(a: Args) -> Result<()> {
    if let Some(bw) = a.bandwidth_gbs.filter(|bw| !(bw.is_finite() && *bw > 0.0)) {
        bail!("--bandwidth-gbs must be a positive number of GB/s, got {bw}");
    }
    let modes: Vec<WeightsMode> = parse_list(&a.weights, "weights")?;
    if modes.is_empty() {
        bail!("--weights needs at least one of checkpoint, fp8");
    }
    let mut all_rows = Vec::new();
    let mut head = None;
    for (i, &mode) in modes.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let (h, rows) = run_one(&a, mode)?;
        head.get_or_insert(h);
        all_rows.extend(rows);
    }
    if let (Some(path), Some(mut v)) = (&a.json, head) {
        v["rows"] = serde_json::to_value(&all_rows)?;
        v["weights"] = serde_json::json!(a.weights);
        llada::hf::write::write_text_atomic(path, &serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// One engine (`mode`) through every configuration: the JSON header fields and the rows.
fn run_one(a: &Args, mode: WeightsMode) -> Result<(serde_json::Value, Vec<Row>)> {
    let choice: DeviceChoice = a.device.parse()?;
    let (dev, _) = device::resolve(choice)?;
    let spec = match (&a.model, &a.preset) {
        (Some(d), _) => ModelSpec::Dir(d.clone()),
        (None, Some(p)) => ModelSpec::Preset {
            name: p.clone(),
            seed: 0,
        },
        (None, None) => {
            let name = if dev == Resolved::Cpu {
                "tiny"
            } else {
                "llada-8b"
            };
            if dev == Resolved::Cpu {
                eprintln!("note: no usable GPU, benchmarking the `tiny` preset on the CPU (use --preset/--model to choose)");
            }
            ModelSpec::Preset {
                name: name.into(),
                seed: 0,
            }
        }
    };
    let steps_list = list(&a.steps, "steps")?;
    let caches: Vec<CacheMode> = parse_list(&a.cache, "cache")?;
    // (threshold, factor) rules; (None, None) = the steps schedule.
    let mut rules: Vec<(Option<f64>, Option<f64>)> = vec![(None, None)];
    if let Some(t) = &a.threshold {
        rules.extend(
            parse_list::<f64>(t, "threshold")?
                .into_iter()
                .map(|t| (Some(t), None)),
        );
    }
    if let Some(f) = &a.factor {
        rules.extend(
            parse_list::<f64>(f, "factor")?
                .into_iter()
                .map(|f| (None, Some(f))),
        );
    }
    let batches = list(&a.batch, "batch")?;
    let mut opened = Opened::open(&spec)?;
    opened.weights = mode;
    opened.compute = engine::parse_compute_dtype(&a.dtype)?;
    let t_load = Instant::now();
    let (mut eng, notice) = engine::load(&opened, choice)?;
    if let Some(n) = notice {
        eprintln!("note: {n}");
    }
    eng.synchronize()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let ceiling = eng.gemm_ceiling_tflops()?;
    let cfg = eng.config().clone();
    let dims = floors::Dims::of(&cfg);
    let bandwidth = a
        .bandwidth_gbs
        .or_else(|| floors::known_bandwidth_gbs(&eng.device()));
    let vocab_hi = (cfg.mask_token_id.min(cfg.eos_token_id)).max(2);

    println!(
        "# llada-bench  device: {}  driver: {}  commit: {}",
        eng.device(),
        eng.driver(),
        commit()
    );
    println!(
        "# model: {}  weights {}  prompt {}  gen_length {}  block_length {}  temperature 0  low_confidence  (load {:.1}s)",
        opened.label, opened.weights, a.prompt_len, a.gen_length, a.block_length, load_s
    );
    println!(
        "# commit selection: {} (LLADA_STEP_GRAPH / LLADA_DEVICE_SELECT)",
        selection_mode()
    );
    if let Some(c) = ceiling {
        println!(
            "# GEMM ceiling on this device (bf16 4096x4096x8192 via the backend): {c:.1} TFLOP/s"
        );
    }
    let mut rows = Vec::new();
    for &b in &batches {
        // Deterministic pseudo-random prompts below the special ids.
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                (0..a.prompt_len)
                    .map(|i| {
                        (llada::rng::mix64((r * 1_000_003 + i) as u64) % vocab_hi as u64) as u32
                    })
                    .collect()
            })
            .collect();
        println!();
        println!("batch {b}");
        println!(
            "{:>7} {:>9} {:>6} {:>5} {:>10} {:>9} {:>9} {:>9} {:>8} {:>7} {:>10}",
            "cache",
            "rule",
            "steps",
            "fwd",
            "tokens/s",
            "ms/step",
            "min",
            "max",
            "TFLOP/s",
            "ceil%",
            "mem GiB"
        );
        let num_blocks = a.gen_length / a.block_length.max(1);
        let mut configs = Vec::new();
        for &cache in &caches {
            for &(threshold, factor) in &rules {
                let decode = Decode {
                    cache,
                    threshold,
                    factor,
                };
                if threshold.is_some() || factor.is_some() {
                    configs.push((decode, num_blocks.max(1)));
                } else {
                    configs.extend(steps_list.iter().map(|&s| (decode, s)));
                }
            }
        }
        for &(decode, steps) in &configs {
            // Greedy, low-confidence remasking; the model's ids from `apply_ids`.
            let mut p = GenerateParams {
                steps,
                gen_length: a.gen_length,
                block_length: a.block_length,
                ..GenerateParams::default()
            };
            opened.apply_ids(&mut p);
            p.block_plan()?;
            for _ in 0..a.warmup {
                eng.generate(&prompts, &p, &decode, Hooks::default())?;
            }
            let mut runs = Vec::new();
            let mut step_ms: Vec<f64> = Vec::new();
            for _ in 0..a.repeats.max(1) {
                let mut last = Instant::now();
                let mut cb = |_: Progress| {
                    let now = Instant::now();
                    step_ms.push((now - last).as_secs_f64() * 1e3);
                    last = now;
                };
                let t0 = Instant::now();
                let out = eng.generate(&prompts, &p, &decode, Hooks::on_progress(&mut cb))?;
                eng.synchronize()?;
                runs.push((t0.elapsed().as_secs_f64(), out.nfe));
            }
            runs.sort_by(|x, y| x.0.total_cmp(&y.0));
            let (secs, nfe) = runs[runs.len() / 2];
            step_ms.sort_by(|x, y| x.total_cmp(y));
            let select = selection_mode();
            if select == "step-graph" && decode.is_plain() {
                // Whole steps are queued without waiting (the tokens come back once per block),
                // so a step's own time is not observable: every step counts the mean.
                let mean = secs * 1e3 / nfe.max(1) as f64;
                step_ms.iter_mut().for_each(|m| *m = mean);
            }
            let med = step_ms[step_ms.len() / 2];
            let t = a.prompt_len + a.gen_length;
            let tflops = (decode.cache == CacheMode::None).then(|| {
                step_flops(eng.as_ref(), b, t, b * a.block_length) * nfe as f64 / secs / 1e12
            });
            let row = Row {
                weights: opened.weights.to_string(),
                select: select.to_string(),
                batch: b,
                cache: decode.cache.to_string(),
                threshold: decode.threshold,
                factor: decode.factor,
                steps,
                forward_passes: nfe,
                tokens_per_s: (b * a.gen_length) as f64 / secs,
                seconds: secs,
                ms_per_step_median: med,
                ms_per_step_min: step_ms[0],
                ms_per_step_max: step_ms[step_ms.len() - 1],
                tflops,
                gemm_ceiling_share: tflops.zip(ceiling).map(|(f, c)| f / c),
                peak_memory_bytes: eng.memory_used(),
                breakdown_ms_per_step: None,
                floors: None,
            };
            println!(
                "{:>7} {:>9} {:>6} {:>5} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>7} {:>10}",
                row.cache,
                match (row.threshold, row.factor) {
                    (Some(t), _) => format!("thr {t}"),
                    (_, Some(f)) => format!("fac {f}"),
                    _ => "schedule".to_string(),
                },
                row.steps,
                row.forward_passes,
                row.tokens_per_s,
                row.ms_per_step_median,
                row.ms_per_step_min,
                row.ms_per_step_max,
                row.tflops
                    .map(|f| format!("{f:.1}"))
                    .unwrap_or_else(|| "-".into()),
                row.gemm_ceiling_share
                    .map(|s| format!("{:.0}%", s * 100.0))
                    .unwrap_or_else(|| "-".into()),
                row.peak_memory_bytes
                    .map(|m| format!("{:.2}", m as f64 / (1u64 << 30) as f64))
                    .unwrap_or_else(|| "-".into()),
            );
            let mut row = row;
            if a.breakdown {
                eng.synchronize()?;
                eng.set_profiling(true);
                let _ = eng.take_profile()?;
                let t0 = Instant::now();
                let out = eng.generate(&prompts, &p, &decode, Hooks::default());
                eng.synchronize()?;
                let wall = t0.elapsed().as_secs_f64() * 1e3;
                let prof = eng.take_profile();
                eng.set_profiling(false);
                let (out, prof) = (out?, prof?);
                let per = out.nfe.max(1) as f64;
                let total: f64 = prof.iter().map(|(_, ms)| ms).sum();
                println!(
                    "        breakdown ({} passes, profiled {:.2} ms/step, wall {:.2} ms/step):",
                    out.nfe,
                    total / per,
                    wall / per
                );
                let measured: Vec<(String, f64)> = prof
                    .iter()
                    .map(|(c, ms)| (c.name().to_string(), ms / per))
                    .collect();
                let passes = floors::passes(
                    &row.cache,
                    out.nfe,
                    b,
                    a.prompt_len,
                    a.gen_length,
                    a.block_length,
                );
                let wb = if mode == WeightsMode::Fp8 { 1.0 } else { 2.0 };
                let work = floors::work(&dims, &passes, out.rows_predicted as f64, wb);
                let fl = floors::floors(&measured, &work, per, ceiling, bandwidth);
                let opt = |x: Option<f64>, unit: &str| {
                    x.map(|v| format!("{v:.3} {unit}"))
                        .unwrap_or_else(|| "-".into())
                };
                for f in &fl {
                    println!(
                        "        {:>18} {:>9.3} ms/step {:>6.1}%  {:>14} {:>12}  floor {:>9}  {:>5}",
                        f.class,
                        f.ms,
                        if total > 0.0 { 100.0 * f.ms * per / total } else { 0.0 },
                        opt(f.tflops, "TFLOP/s"),
                        opt(f.gbs, "GB/s"),
                        opt(f.floor_ms, "ms"),
                        f.of_floor
                            .map(|x| format!("{:.0}%", 100.0 * x))
                            .unwrap_or_else(|| "-".into()),
                    );
                }
                row.breakdown_ms_per_step = Some(measured);
                row.floors = Some(fl);
            }
            rows.push(row);
        }
    }
    let v = serde_json::json!({
        "engine": "llada",
        "device": eng.device(),
        "driver": eng.driver(),
        "commit": commit(),
        "model": opened.label,
        "weights": opened.weights.to_string(),
        "prompt_len": a.prompt_len,
        "gen_length": a.gen_length,
        "block_length": a.block_length,
        "gemm_ceiling_tflops": ceiling,
        "bandwidth_gbs": bandwidth,
    });
    Ok((v, rows))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
