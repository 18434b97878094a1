//! End-to-end tests of `llada batch` on tiny checkpoints on the CPU: bad lines, padded batches
//! against single prompts, kill -9 and resume, sharding and merge, Fast-dLLM flags, sampled
//! requests in any batch.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::cli::{fixture, ids_arg, llada, ok, ok_json, run, stderr, tiny, tmpdir, u64s};
use serde_json::{json, Value};

fn parity_f32() -> PathBuf {
    fixture("parity/f32")
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

/// `llada batch EXTRA --model MODEL --input INPUT --output OUT`, for the caller to add flags.
fn batch(extra: &[&str], model: &Path, input: &Path, out: &Path) -> Command {
    let mut c = llada();
    c.arg("batch").args(extra).arg("--model").arg(model);
    c.arg("--input").arg(input).arg("--output").arg(out);
    c
}

/// Some line of `err` names input line `line` and says `what`.
fn assert_line_error(err: &str, line: usize, what: &str) {
    let needle = format!("line {line}");
    assert!(
        err.lines().any(|l| l.contains(&needle) && l.contains(what)),
        "stderr lacks `{needle}` with `{what}`:\n{err}"
    );
}

/// Every line of a results file, parsed; panics on a line that is not whole JSON.
fn results(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends in a partial line",
        path.display()
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// id (as JSON text) → generated ids.
fn by_id(rs: &[Value]) -> HashMap<String, Vec<u64>> {
    let mut m = HashMap::new();
    for r in rs {
        let ids = u64s(&r["ids"]);
        assert!(
            m.insert(r["id"].to_string(), ids).is_none(),
            "id {} written twice",
            r["id"]
        );
    }
    m
}

fn gen_flags(gen: usize, steps: usize, block: usize) -> Vec<String> {
    format!("--device cpu --gen-length {gen} --steps {steps} --block-length {block}")
        .split(' ')
        .map(String::from)
        .collect()
}

/// Each kind of bad line is reported with its line number on stderr and in the errors file,
/// the good lines all produce a result, and the exit status says that lines failed. `--strict`
/// stops before generating anything.
#[test]
fn bad_lines_are_reported_and_skipped() {
    let d = tmpdir("bad");
    let model = tiny(&d);
    let long: Vec<u32> = vec![10; 1020]; // + gen_length 16 > max_sequence_length 1024
    let lines = [
        json!({"id": "text", "prompt": "hello there"}).to_string(), // 1
        json!({"id": "chat", "messages": [{"role": "user", "content": "hi"}]}).to_string(), // 2
        json!({"id": 3, "prompt_ids": [5, 6, 7], "seed": 4, "steps": 8}).to_string(), // 3
        "{\"id\": \"torn\", \"prompt_ids\": [1, 2".to_string(),     // 4 invalid JSON
        json!({"prompt_ids": [1, 2]}).to_string(),                  // 5 no id
        json!({"id": "noprompt"}).to_string(),                      // 6 no prompt
        json!({"id": "unknown", "prompt_ids": [1], "top_p": 0.9}).to_string(), // 7 unknown key
        json!({"id": "long", "prompt_ids": long}).to_string(),      // 8 too long
        json!({"id": "text", "prompt_ids": [9]}).to_string(),       // 9 duplicate id
        json!({"id": "range", "prompt_ids": [1, 99999]}).to_string(), // 10 id out of range
        json!({"id": "two", "prompt": "a", "prompt_ids": [1]}).to_string(), // 11 two prompts
        json!({"id": "plan", "prompt_ids": [1], "steps": 3}).to_string(), // 12 bad schedule
        "[1, 2]".to_string(),                                       // 13 not an object
        String::new(),                                              // 14 blank: ignored
        json!({"id": "last", "prompt_ids": [4, 4, 4, 4, 4]}).to_string(), // 15
    ];
    let bad: HashMap<usize, &str> = HashMap::from([
        (4, "invalid JSON"),
        (5, "missing field `id`"),
        (6, "give one of"),
        (7, "unknown key `top_p`"),
        (8, "prompt too long"),
        (9, "duplicate id (first on line 1)"),
        (10, "out of range"),
        (11, "only one of"),
        (12, "not a multiple"),
        (13, "expected a JSON object"),
    ]);
    let input = d.join("in.jsonl");
    write_lines(&input, &lines);
    let out = d.join("out.jsonl");
    let o = run(batch(&[], &model, &input, &out).args(gen_flags(16, 16, 8)));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "exit status; stderr:\n{err}");
    for (line, what) in &bad {
        assert_line_error(&err, *line, what);
    }
    // The errors file: one line per bad line, nothing else.
    let errs = results(&d.join("out.errors.jsonl"));
    let got: HashSet<u64> = errs.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    let want: HashSet<u64> = bad.keys().map(|&l| l as u64).collect();
    assert_eq!(got, want);
    assert_eq!(errs.len(), bad.len());
    // Every good line produced one result, with the fields the issue asks for.
    let rs = results(&out);
    let ids: HashSet<String> = rs.iter().map(|r| r["id"].to_string()).collect();
    let want: HashSet<String> = ["\"text\"", "\"chat\"", "3", "\"last\""]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(ids, want);
    for r in &rs {
        assert_eq!(r["ids"].as_array().unwrap().len(), 16);
        assert!(r["text"].is_string(), "tiny has a tokenizer: {r}");
        assert_eq!(
            r["nfe"].as_u64(),
            Some(if r["id"] == json!(3) { 8 } else { 16 })
        );
        assert!(r["seconds"].as_f64().unwrap() > 0.0);
        assert_eq!(r["params"]["gen_length"], json!(16));
    }
    let three = rs.iter().find(|r| r["id"] == json!(3)).unwrap();
    assert_eq!(three["params"]["seed"], json!(4));
    assert_eq!(three["params"]["steps"], json!(8));
    // The chat prompt went through the template: longer than the bare text.
    let chat = rs.iter().find(|r| r["id"] == json!("chat")).unwrap();
    assert!(chat["prompt_tokens"].as_u64().unwrap() > 3);

    // --strict: the bad lines stop the run before anything is generated.
    let out2 = d.join("strict.jsonl");
    let o = run(batch(&["--strict"], &model, &input, &out2).args(gen_flags(16, 16, 8)));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--strict"));
    assert!(std::fs::read_to_string(&out2)
        .unwrap_or_default()
        .is_empty());

    // All good: exit 0, and a rerun has nothing left to do.
    let good = d.join("good.jsonl");
    write_lines(&good, &[lines[2].clone(), lines[14].clone()]);
    for _ in 0..2 {
        let o =
            run(batch(&[], &model, &good, &d.join("good-out.jsonl")).args(gen_flags(16, 16, 8)));
        ok(&o);
    }
    assert_eq!(results(&d.join("good-out.jsonl")).len(), 2);
}

/// A left-padded batch gives each prompt exactly the ids it gets alone (`llada generate` with
/// one prompt, and `llada batch --batch-size 1`), on the f32 parity model on the CPU.
///
/// Why f32 and greedy: padding shifts a prompt's RoPE positions by the pad count. Attention
/// depends only on position differences in exact arithmetic, but the rotated q and k are
/// rounded at their absolute positions, so scores can differ in the last bit. In f32 those
/// differences are ~1e-7 relative, far below the gaps between this model's top logits and
/// confidences, so the ids match exactly (asserted). In bf16 every op rounds to 8 mantissa
/// bits and a last-ulp change can flip an argmax or a confidence tie, so bf16 batches are not
/// promised to be bit-identical. Sampling is covered by `sampled_requests_do_not_depend_on_the_batch`.
#[test]
fn padded_batch_equals_each_prompt_alone() {
    let d = tmpdir("padded");
    let model = parity_f32();
    // Prompt lengths 1..=9 so every batch is padded; plus a CFG group and an EOS-rule group.
    let mut lines = Vec::new();
    let mut prompts = HashMap::new();
    for i in 0..9u32 {
        let p: Vec<u32> = (0..=i).map(|j| 3 + (i * 7 + j * 13) % 120).collect();
        prompts.insert(format!("\"p{i}\""), (p.clone(), json!({})));
        lines.push(json!({"id": format!("p{i}"), "prompt_ids": p}).to_string());
    }
    for i in 0..4u32 {
        let p: Vec<u32> = (0..2 + 2 * i)
            .map(|j| 5 + (i * 11 + j * 17) % 110)
            .collect();
        let extra = if i % 2 == 0 {
            json!({"cfg_scale": 1.5})
        } else {
            json!({"confidence_eos_eot_inf": true, "logits_eos_inf": true})
        };
        let mut o = extra.clone();
        o["id"] = json!(format!("q{i}"));
        o["prompt_ids"] = json!(p);
        prompts.insert(format!("\"q{i}\""), (p, extra));
        lines.push(o.to_string());
    }
    let input = d.join("in.jsonl");
    write_lines(&input, &lines);
    let flags = gen_flags(16, 8, 8);
    let go = |bs: usize, name: &str| {
        let out = d.join(name);
        let o = run(batch(&[], &model, &input, &out)
            .args(["--batch-size", &bs.to_string()])
            .args(&flags));
        ok(&o);
        results(&out)
    };
    let batched = go(8, "b8.jsonl");
    let single = go(1, "b1.jsonl");
    // The batched run really batched and padded.
    assert!(batched
        .iter()
        .any(|r| r["batch_size"].as_u64().unwrap() == 8));
    assert!(batched
        .iter()
        .any(|r| r["padded_prompt_tokens"].as_u64() > r["prompt_tokens"].as_u64()));
    assert!(single.iter().all(|r| r["batch_size"] == json!(1)));
    let (b, s) = (by_id(&batched), by_id(&single));
    assert_eq!(b.len(), lines.len());
    assert_eq!(b, s, "padded batches differ from single prompts");

    // And against `llada generate` with one prompt, for a few of them.
    for key in ["\"p0\"", "\"p8\"", "\"q0\"", "\"q1\""] {
        let (p, extra) = &prompts[key];
        let mut f = flags.clone();
        if let Some(c) = extra.get("cfg_scale") {
            f.extend(["--cfg-scale".to_string(), c.to_string()]);
        }
        if extra.get("logits_eos_inf").is_some() {
            f.extend(strings(&["--logits-eos-inf", "--confidence-eos-eot-inf"]));
        }
        let ids = generate_ids(&model, p, &f);
        assert_eq!(b[key], ids, "{key}: batch vs llada generate");
    }
}

/// `kill -9` in the middle of a run, plus a torn last line (what a kill during a write leaves),
/// then the same command again: every good line appears exactly once, with the same ids as an
/// uninterrupted run, and the torn line is cut off and redone.
#[test]
fn kill_and_resume_writes_every_line_once() {
    let d = tmpdir("resume");
    let model = tiny(&d);
    let n = 120u32;
    let n_us = n as usize;
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            let p: Vec<u32> = (0..1 + i % 4).map(|j| 5 + (i * 3 + j * 7) % 60).collect();
            json!({"id": format!("r{i}"), "prompt_ids": p}).to_string()
        })
        .collect();
    lines.insert(40, "{broken".to_string());
    let input = d.join("in.jsonl");
    write_lines(&input, &lines);
    let flags = gen_flags(32, 32, 16);
    let cmd = |out: &Path| {
        let mut c = batch(&["--batch-size", "2"], &model, &input, out);
        c.args(&flags);
        c
    };
    let out = d.join("out.jsonl");
    let mut child = cmd(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut killed_early = false;
    loop {
        let have = std::fs::read_to_string(&out)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if have >= 6 && child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed_early = true;
            break;
        }
        if child.try_wait().unwrap().is_some() || t0.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    let before = results(&out);
    eprintln!(
        "killed: {killed_early}, {} of {n} results written before the kill",
        before.len()
    );
    // The test is only worth something if the kill came mid-run: it must have been sent while
    // the child was still running (not after it exited), and fewer than all lines written.
    assert!(
        killed_early,
        "the run ended (or took > 120 s) before it could be killed mid-run; {} lines written",
        before.len()
    );
    assert!(
        before.len() < n_us,
        "the kill came after the end: {} of {n} lines written",
        before.len()
    );
    // A torn last line: the first half of a real result line, no newline.
    let torn = {
        let mut r = before[0].clone();
        r["id"] = json!("r119");
        let s = r.to_string();
        s[..s.len() / 2].to_string()
    };
    std::fs::OpenOptions::new()
        .append(true)
        .open(&out)
        .unwrap()
        .write_all(torn.as_bytes())
        .unwrap();

    let o = run(&mut cmd(&out));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o)); // the broken line
    assert!(stderr(&o).contains("line 41"), "{}", stderr(&o));
    assert!(stderr(&o).contains("torn last line"), "{}", stderr(&o));
    let after = results(&out);
    assert_eq!(after.len(), n_us);
    let got = by_id(&after); // panics on a duplicate
    for i in 0..n {
        assert!(got.contains_key(&format!("\"r{i}\"")), "r{i} missing");
    }
    // Lines written before the kill are kept as they were.
    assert_eq!(&after[..before.len()], &before[..]);

    // Same ids as one uninterrupted run.
    let clean = d.join("clean.jsonl");
    let o = run(&mut cmd(&clean));
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(by_id(&results(&clean)), got);
}

/// Shards from `--shard I/N` and from Slurm variables partition the input; `batch merge` finds
/// them, restores input order and refuses overlapping or incomplete sets.
#[test]
fn shards_and_merge() {
    let d = tmpdir("shards");
    let model = tiny(&d);
    let n = 11;
    let lines: Vec<String> = (0..n)
        .map(|i| json!({"id": i, "prompt_ids": [3 + i, 4, 5]}).to_string())
        .collect();
    let input = d.join("in.jsonl");
    write_lines(&input, &lines);
    let base = d.join("res.jsonl");
    let flags = gen_flags(8, 8, 8);
    let shard_run = |c: &mut Command, extra: &[&str]| {
        c.arg("batch")
            .args(extra)
            .arg("--model")
            .arg(&model)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&base)
            .args(&flags);
        let o = run(c);
        ok(&o);
        stderr(&o)
    };
    let e0 = shard_run(&mut llada(), &["--shard", "0/3"]);
    assert!(e0.contains("shard 0/3"), "{e0}");
    shard_run(
        llada()
            .env("SLURM_ARRAY_TASK_ID", "2")
            .env("SLURM_ARRAY_TASK_MIN", "1")
            .env("SLURM_ARRAY_TASK_COUNT", "3"),
        &[],
    );
    let e2 = shard_run(
        llada().env("SLURM_PROCID", "2").env("SLURM_NTASKS", "3"),
        &[],
    );
    assert!(e2.contains("SLURM_PROCID"), "{e2}");
    let mut all = HashSet::new();
    for i in 0..3 {
        let p = d.join(format!("res.shard-{i:05}-of-00003.jsonl"));
        for r in results(&p) {
            let id = r["id"].as_u64().unwrap();
            assert_eq!(id as usize % 3, i, "line {} in shard {i}", id + 1);
            assert!(all.insert(id));
        }
    }
    assert_eq!(all.len(), n as usize);

    let o = run(llada().args(["batch", "merge", "--output"]).arg(&base));
    ok(&o);
    let merged = results(&base);
    let order: Vec<u64> = merged.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>());

    // The merged results equal one unsharded run's.
    let one = d.join("one.jsonl");
    let o = run(batch(&["--shard", "0/1"], &model, &input, &one).args(&flags));
    ok(&o);
    assert_eq!(by_id(&results(&one)), by_id(&merged));

    // Overlap: the same shard twice.
    let s0 = d.join("res.shard-00000-of-00003.jsonl");
    let o = run(llada()
        .args(["batch", "merge", "--output"])
        .arg(d.join("x.jsonl"))
        .arg(&s0)
        .arg(&s0));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("shards overlap"), "{}", stderr(&o));
    assert!(
        !d.join("x.jsonl").exists(),
        "a failed merge wrote its output"
    );
    // Incomplete set.
    std::fs::remove_file(d.join("res.shard-00001-of-00003.jsonl")).unwrap();
    let o = run(llada().args(["batch", "merge", "--output"]).arg(&base));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing"), "{}", stderr(&o));
}

/// bf16: `--same-length` batches never pad, so each prompt gets bit-for-bit what it gets alone
/// even though bf16 rounds every op (padded bf16 batches are not promised to; see above).
#[test]
fn same_length_batches_are_exact_in_bf16() {
    let d = tmpdir("same-length");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bf16");
    let lines: Vec<String> = (0..12u32)
        .map(|i| {
            let len = if i % 2 == 0 { 3 } else { 6 };
            let p: Vec<u32> = (0..len).map(|j| 3 + (i * 19 + j * 7) % 120).collect();
            json!({"id": i, "prompt_ids": p}).to_string()
        })
        .collect();
    let input = d.join("in.jsonl");
    write_lines(&input, &lines);
    let go = |bs: usize, name: &str| {
        let out = d.join(name);
        let o = run(batch(&["--same-length"], &model, &input, &out)
            .args(["--batch-size", &bs.to_string()])
            .args(gen_flags(16, 8, 8)));
        ok(&o);
        results(&out)
    };
    let batched = go(8, "b8.jsonl");
    assert!(batched.iter().all(|r| r["batch_size"] == json!(6)));
    assert!(batched
        .iter()
        .all(|r| r["padded_prompt_tokens"] == r["prompt_tokens"]));
    assert_eq!(by_id(&batched), by_id(&go(1, "b1.jsonl")));
}

/// `llada generate` on one prompt with `flags`; its generated ids.
fn generate_ids(model: &Path, prompt: &[u32], flags: &[String]) -> Vec<u64> {
    let v = ok_json(
        llada()
            .args(["generate", "--format", "json", "--model"])
            .arg(model)
            .args(["--prompt-ids", &ids_arg(prompt)])
            .args(flags),
    );
    u64s(&v["ids"][0])
}

/// `llada batch` over `input` into `out` with `flags`; the results.
fn batch_results(model: &Path, input: &Path, out: &Path, flags: &[String]) -> Vec<Value> {
    let o = run(batch(&[], model, input, out).args(flags));
    ok(&o);
    results(out)
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

/// Fast-dLLM flags: `llada batch --cache dual --threshold 0.5` (batches of 8 equal-length prompts)
/// gives each prompt what `llada generate --cache dual --threshold 0.5` gives it, per-line
/// `cache` / `threshold` / `factor` overrides run in their own batches with their own settings,
/// and every output line records them. Greedy, so the keyed RNG plays no part.
#[test]
fn fast_dllm_flags_match_generate() {
    let d = tmpdir("fast");
    let model = parity_f32();
    let prompt = |i: u32| -> Vec<u32> { (0..4).map(|j| 3 + (i * 7 + j * 13) % 120).collect() };
    // (override, flags of the equivalent `llada generate`)
    let overrides: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec!["--cache", "dual", "--threshold", "0.5"]),
        (
            json!({"cache": "prefix", "threshold": 0.02}),
            vec!["--cache", "prefix", "--threshold", "0.02"],
        ),
        (
            json!({"threshold": null, "factor": 0.5}),
            vec!["--cache", "dual", "--factor", "0.5"],
        ),
        (json!({"cache": "none", "threshold": null}), vec![]),
    ];
    let mut lines = Vec::new();
    let mut want_flags = HashMap::new();
    for i in 0..20u32 {
        let (extra, gflags) = &overrides[if i < 9 { 0 } else { 1 + (i as usize % 3) }];
        let mut o = extra.clone();
        o["id"] = json!(i);
        o["prompt_ids"] = json!(prompt(i));
        lines.push(o.to_string());
        want_flags.insert(i, gflags.clone());
    }
    let input = d.join("in.jsonl");
    write_lines(&input, &lines);
    let mut flags = gen_flags(16, 8, 8);
    flags.extend(strings(&["--cache", "dual", "--threshold", "0.5"]));
    flags.extend(strings(&["--batch-size", "8"]));
    let rs = batch_results(&model, &input, &d.join("out.jsonl"), &flags);
    assert_eq!(rs.len(), 20);
    assert!(rs.iter().any(|r| r["batch_size"] == json!(8)));
    let mut fewer_passes = false;
    for r in &rs {
        let i = r["id"].as_u64().unwrap() as u32;
        let gflags = &want_flags[&i];
        let p = &r["params"];
        let flag = |k: &str| gflags.iter().position(|f| *f == k).map(|j| gflags[j + 1]);
        assert_eq!(p["cache"], json!(flag("--cache").unwrap_or("none")), "{r}");
        let num = |k| flag(k).map_or(Value::Null, |v: &str| json!(v.parse::<f64>().unwrap()));
        assert_eq!(p["threshold"], num("--threshold"), "{r}");
        assert_eq!(p["factor"], num("--factor"), "{r}");
        fewer_passes |= r["nfe"].as_u64().unwrap() < 16;
        let mut g = gen_flags(16, 8, 8);
        g.extend(strings(gflags));
        let ids = u64s(&r["ids"]);
        assert_eq!(
            ids,
            generate_ids(&model, &prompt(i), &g),
            "id {i}: batch vs llada generate {gflags:?}"
        );
    }
    // The threshold / factor rules committed several tokens in some passes.
    assert!(fewer_passes, "every request took one pass per token");
}

/// Bad Fast-dLLM values are bad lines with their line numbers; the others run.
#[test]
fn bad_fast_dllm_values_are_bad_lines() {
    let d = tmpdir("fast-bad");
    let model = parity_f32();
    let lines = [
        json!({"id": "ok", "prompt_ids": [5, 6, 7]}).to_string(), // 1
        json!({"id": "lru", "prompt_ids": [5, 6, 7], "cache": "lru"}).to_string(), // 2
        json!({"id": "both", "prompt_ids": [5, 6, 7], "factor": 1.0}).to_string(), // 3: + default threshold
        json!({"id": "zero", "prompt_ids": [5, 6, 7], "threshold": null, "factor": 0}).to_string(), // 4
        json!({"id": "num", "prompt_ids": [5, 6, 7], "cache": 2}).to_string(), // 5
        json!({"id": "cfg", "prompt_ids": [5, 6, 7], "cfg_scale": 1.0}).to_string(), // 6
        json!({"id": "fine", "prompt_ids": [5, 6, 7], "threshold": null, "factor": 1.0})
            .to_string(), // 7
    ];
    let input = d.join("in.jsonl");
    write_lines(&input, &lines);
    let out = d.join("out.jsonl");
    let mut flags = gen_flags(8, 8, 8);
    flags.extend(strings(&["--threshold", "0.9"]));
    let o = run(batch(&[], &model, &input, &out).args(&flags));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    for (line, what) in [
        (2, "lru"),
        (3, "not both"),
        (4, "`factor` must be a finite number > 0"),
        (5, "`cache` must be a string"),
        (6, "cfg_scale"),
    ] {
        assert_line_error(&err, line, what);
    }
    let errs = results(&d.join("out.errors.jsonl"));
    let got: HashSet<u64> = errs.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(got, HashSet::from([2, 3, 4, 5, 6]));
    let ids: HashSet<String> = results(&out).iter().map(|r| r["id"].to_string()).collect();
    assert_eq!(
        ids,
        HashSet::from(["\"ok\"".to_string(), "\"fine\"".to_string()])
    );
    // Both rules as command-line defaults: refused before anything runs.
    let mut both = gen_flags(8, 8, 8);
    both.extend(strings(&["--threshold", "0.9", "--factor", "1"]));
    let o = run(batch(&[], &model, &input, &d.join("both.jsonl")).args(&both));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o)); // clap: conflicting flags
}

/// Sampled requests (temperature 0.7; random remasking; sampling with the dual cache and a
/// threshold) give identical ids at batch sizes 1 and 8, since each draws from a stream keyed by
/// its id and its own positions (and, with Fast-dLLM, the call within the block) rather than its
/// batch row. Equal-length prompts, and padded ones too (f32: padding changes no result here, see
/// `padded_batch_equals_each_prompt_alone`). The sampling really matters: another seed changes
/// the ids of every group. (Keying by batch row, or the Fast-dLLM step by the batch's pass
/// count, makes this test fail.)
#[test]
fn sampled_requests_do_not_depend_on_the_batch() {
    let d = tmpdir("sampled");
    let model = parity_f32();
    let groups: [(&str, Value); 3] = [
        ("t", json!({"temperature": 0.7})),
        ("r", json!({"remasking": "random"})),
        (
            "f",
            json!({"temperature": 0.7, "cache": "dual", "threshold": 0.02}),
        ),
    ];
    for padded in [false, true] {
        let mut lines = Vec::new();
        for (name, extra) in &groups {
            for i in 0..10u32 {
                let len = if padded { 1 + i % 5 } else { 4 };
                let p: Vec<u32> = (0..len).map(|j| 3 + (i * 7 + j * 13) % 120).collect();
                let mut o = extra.clone();
                o["id"] = json!(format!("{name}{i}"));
                o["prompt_ids"] = json!(p);
                lines.push(o.to_string());
            }
        }
        let input = d.join(format!("in-{padded}.jsonl"));
        write_lines(&input, &lines);
        let go = |bs: usize, seed: u64, extra: &[&str], name: &str| {
            let mut f = gen_flags(16, 8, 8);
            f.extend(strings(&[
                "--batch-size",
                &bs.to_string(),
                "--seed",
                &seed.to_string(),
            ]));
            f.extend(strings(extra));
            batch_results(
                &model,
                &input,
                &d.join(format!("{name}-{padded}.jsonl")),
                &f,
            )
        };
        let b8 = go(8, 1, &[], "b8");
        let b1 = go(1, 1, &[], "b1");
        assert!(b8.iter().any(|r| r["batch_size"] == json!(8)));
        assert!(b1.iter().all(|r| r["batch_size"] == json!(1)));
        if padded {
            assert!(b8
                .iter()
                .any(|r| r["padded_prompt_tokens"].as_u64() > r["prompt_tokens"].as_u64()));
        }
        let (m8, m1) = (by_id(&b8), by_id(&b1));
        assert_eq!(m8.len(), 30);
        assert_eq!(m8, m1, "batch 8 vs batch 1 (padded: {padded})");
        // --batch-sampling is accepted and changes nothing.
        let bs = by_id(&go(8, 1, &["--batch-sampling"], "bs"));
        assert_eq!(bs, m8);
        let other_seed = by_id(&go(8, 2, &[], "seed2"));
        for (name, _) in &groups {
            let n = |m: &HashMap<String, Vec<u64>>| -> Vec<Vec<u64>> {
                (0..10)
                    .map(|i| m[&format!("\"{name}{i}\"")].clone())
                    .collect()
            };
            assert_ne!(
                n(&m8),
                n(&other_seed),
                "group {name}: the seed changed nothing"
            );
        }
    }
}
