//! Offline batch generation (`llada batch`): JSONL requests in, JSONL results out, built to run
//! unattended on clusters.
//!
//! The pieces, each usable on its own:
//! - [`parse_input`]: one request per input line (`id` + one of `prompt` / `messages` /
//!   `prompt_ids`, optional generation overrides). A bad line becomes a [`LineError`] naming its
//!   line number; it never stops the others.
//! - [`Shard`]: which lines this process owns (`--shard I/N`, Slurm array or `srun` tasks), and
//!   the per-shard output file names.
//! - [`plan_batches`]: requests with identical generation parameters grouped, sorted by prompt
//!   length, and cut into batches (left-padded by the sampler, with a key-padding mask).
//! - [`OutputLog`]: the output file as an append-only log. Opening it reads the ids already done
//!   (resume) and cuts off a torn last line left by a killed run; every result is one `write`
//!   of a whole line, followed by a flush.
//! - [`run`]: drives an [`Engine`](crate::engine::Engine) over the plan, writes results, reports progress, and splits a
//!   failing batch in halves so one bad request (or an out-of-memory batch) fails alone.
//! - [`merge`]: joins shard outputs, checking that no id appears twice, in input order, written
//!   atomically (temporary file + rename).
//!
//! ## When a batch equals each prompt alone
//! Every request draws its random numbers (Gumbel noise at `temperature > 0`, `remasking =
//! random` confidences) from its own stream: the sampler keys them by the request's
//! [`rng_row_key`] (a hash of its `id`) and its own positions counted from its first real token
//! ([`GenerateParams::row_keys`](crate::engine::sampler::GenerateParams::row_keys)), and with Fast-dLLM decoding by the call within the block. So a
//! request's result depends neither on its batch row, nor on the padding its neighbours bring,
//! nor on how many forward passes they need: it is the same in a batch, alone, in another shard
//! or after a resume. (A sampled result differs from `llada generate` with the same seed, which
//! keys by batch row; results that draw no random numbers are equal.)
//! What padding still changes is rounding: it moves the RoPE positions of a prompt, so the
//! rotated q·k products round differently: equal in exact arithmetic, not always in the last bit.
//! On the CPU in f32 this has not changed a result on the test models; in bf16 a last-ulp change
//! can flip an argmax or a confidence order (on the bf16 parity fixture, 3 of 9 padded prompts
//! came out different). [`plan_batches`] with `same_length` (`--same-length`) never pads, which
//! makes CPU batches bit-identical to single prompts in every dtype (see `tests/batch.rs`).

mod merge;
pub mod openai;
mod output;
mod plan;
mod request;
mod run;
mod shard;

pub use merge::*;
pub use output::*;
pub use plan::*;
pub use request::*;
pub use run::*;
pub use shard::*;

#[cfg(test)]
mod tests {
    use super::request::{fnv1a64, GenOptions};
    use super::*;
    use crate::engine::fast::{CacheMode, Decode};
    use crate::rng::mix64;
    use serde_json::{json, Value};
    use std::collections::HashSet;
    use std::path::Path;

    fn req(line: usize, len: usize, opts: GenOptions) -> Request {
        Request {
            line,
            id: json!(line),
            id_key: line.to_string(),
            rng_key: rng_row_key(&line.to_string()),
            prompt_ids: vec![1; len],
            opts,
        }
    }

    #[test]
    fn rng_row_keys_are_stable_31_bit_hashes_of_the_id() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            rng_row_key("\"a\""),
            (mix64(fnv1a64(b"\"a\"")) >> 33) as u32
        );
        // Below 2^31 (the head takes non-negative i32 keys) and distinct for distinct ids.
        let keys: HashSet<u32> = (0..10_000)
            .map(|i| rng_row_key(&json!(format!("r{i}")).to_string()))
            .collect();
        assert_eq!(keys.len(), 10_000);
        assert!(keys.iter().all(|&k| k < 1 << 31));
        // A string id and the integer with the same digits are different ids.
        assert_ne!(rng_row_key("7"), rng_row_key("\"7\""));
    }

    #[test]
    fn fast_dllm_options_parse_group_and_check() {
        let mut o = GenOptions::default();
        o.decode.threshold = Some(0.9);
        let obj = |v: Value| v.as_object().unwrap().clone();
        o.apply(&obj(json!({"cache": "dual", "threshold": 0.5})))
            .unwrap();
        assert_eq!(
            (o.decode.cache, o.decode.threshold, o.decode.factor),
            (CacheMode::Dual, Some(0.5), None)
        );
        assert!(o.check().is_ok());
        assert_eq!(o.to_json()["cache"], json!("dual"));
        assert_eq!(o.to_json()["threshold"], json!(0.5));
        // A factor on top of a default threshold: refused unless the threshold is cleared.
        let mut both = o.clone();
        both.apply(&obj(json!({"factor": 1.0}))).unwrap();
        assert!(both.check().unwrap_err().contains("not both"));
        both.apply(&obj(json!({"threshold": null}))).unwrap();
        assert!(both.check().is_ok());
        assert!(o
            .clone()
            .apply(&obj(json!({"cache": "lru"})))
            .unwrap_err()
            .contains("lru"));
        assert!(o.clone().apply(&obj(json!({"factor": 0}))).is_err());
        assert!(o.clone().apply(&obj(json!({"threshold": "x"}))).is_err());
        let mut cfg = o.clone();
        cfg.apply(&obj(json!({"cfg_scale": 1.0}))).unwrap();
        assert!(cfg.check().unwrap_err().contains("cfg_scale"));
        // Each Fast-dLLM setting splits the batch groups.
        let base = GenOptions::default();
        let none = Decode::default();
        let variants = [
            (CacheMode::Prefix, None, None),
            (CacheMode::Dual, None, None),
            (none.cache, Some(0.5), None),
            (none.cache, Some(0.6), None),
            (none.cache, None, Some(0.5)),
        ]
        .map(|(cache, threshold, factor)| GenOptions {
            decode: Decode {
                cache,
                threshold,
                factor,
            },
            ..base.clone()
        });
        let mut reqs = vec![req(1, 3, base.clone())];
        for (i, v) in variants.iter().enumerate() {
            reqs.push(req(i + 2, 3, v.clone()));
        }
        assert_eq!(
            plan_batches(&reqs, false, |_, _| 8).len(),
            1 + variants.len()
        );
    }

    #[test]
    fn shard_from_env_combines_array_and_tasks() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        let s = Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.index, s.count), (2, 4));
        let s = Shard::from_env(env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]))
            .unwrap()
            .unwrap();
        assert_eq!((s.index, s.count), (1, 2));
        // One task: no sharding.
        assert_eq!(
            Shard::from_env(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap(),
            None
        );
        let s = Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.index, s.count), (3, 6));
        assert!(Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]))
        .is_err());
        assert!(Shard::parse("4/4").is_err());
        assert!(Shard::parse("x/4").is_err());
    }

    #[test]
    fn shards_partition_the_lines() {
        let n = 3;
        for line in 1..=20 {
            let owners = (0..n)
                .filter(|&i| Shard::new(i, n, "t").unwrap().owns(line))
                .count();
            assert_eq!(owners, 1, "line {line}");
        }
        let s = Shard::new(2, 8, "t").unwrap();
        assert_eq!(
            s.output_path(Path::new("/x/res.jsonl")),
            Path::new("/x/res.shard-00002-of-00008.jsonl")
        );
        assert_eq!(
            errors_path(Path::new("/x/res.jsonl")),
            Path::new("/x/res.errors.jsonl")
        );
    }

    #[test]
    fn plan_groups_by_params_and_sorts_by_length() {
        let a = GenOptions::default();
        let mut b = GenOptions::default();
        b.params.seed = 5;
        let reqs = vec![
            req(1, 9, a.clone()),
            req(2, 3, b.clone()),
            req(3, 1, a.clone()),
            req(4, 5, a.clone()),
            req(5, 2, b.clone()),
        ];
        let plan = plan_batches(&reqs, false, |_, _| 2);
        assert_eq!(plan, vec![vec![2, 3], vec![0], vec![4, 1]]);
        // A cap that shrinks with length closes a batch early.
        let plan = plan_batches(&reqs, false, |_, len| if len >= 5 { 1 } else { 8 });
        assert_eq!(plan, vec![vec![2], vec![3], vec![0], vec![4, 1]]);
        // Same length only: every batch holds one prompt length.
        let mut more = reqs.clone();
        more.push(req(6, 9, a.clone()));
        let plan = plan_batches(&more, true, |_, _| 8);
        assert_eq!(plan, vec![vec![0, 5], vec![1], vec![2], vec![3], vec![4]]);
        // Every request planned exactly once.
        let mut all: Vec<usize> = plan_batches(&reqs, false, |_, _| 3).concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn auto_batch_shrinks_with_length_and_cfg() {
        let cfg = crate::hf::presets::preset_config("llada-8b").unwrap();
        let mut o = GenOptions::default();
        o.params.gen_length = 256;
        o.params.block_length = 32;
        let free = 40usize << 30;
        let short = auto_batch_size(&cfg, 2, free, 0.9, &o, 64, 1024);
        let long = auto_batch_size(&cfg, 2, free, 0.9, &o, 1024, 1024);
        assert!(short > long && long >= 1, "{short} {long}");
        let mut cfg_o = o.clone();
        cfg_o.params.cfg_scale = 1.0;
        let with_cfg = auto_batch_size(&cfg, 2, free, 0.9, &cfg_o, 64, 1024);
        assert_eq!(with_cfg, short / 2);
        // The chosen batch fits the budget; one more would not (unless capped).
        let per = bytes_per_sequence(&cfg, 2, 64 + 256, 32, false);
        assert!(short * per <= (free as f64 * 0.9) as usize);
        assert!((short + 1) * per > (free as f64 * 0.9) as usize);
        assert_eq!(auto_batch_size(&cfg, 2, 0, 0.9, &o, 64, 1024), 1);
        // Fast-dLLM decoding also holds a KV cache and a head row per token.
        let mut dual = o.clone();
        dual.decode.cache = CacheMode::Dual;
        let fast = auto_batch_size(&cfg, 2, free, 0.9, &dual, 64, 1024);
        let per_fast = bytes_per_sequence(&cfg, 2, 320, 320, false)
            + kv_cache_bytes_per_sequence(&cfg, 2, 320);
        assert!(fast < short && fast * per_fast <= (free as f64 * 0.9) as usize);
        assert!((fast + 1) * per_fast > (free as f64 * 0.9) as usize);
    }
}
