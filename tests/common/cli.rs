//! Shared by the tests that drive the binaries or write model folders: the binaries as
//! `Command`s, temporary folders, fixture paths, the `tiny` preset folder, JSON-lines files and
//! the checks on a finished run (success with JSON on stdout, or a clean error).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// `llada`, with the Slurm variables removed so that a test run under Slurm never shards by
/// accident.
pub fn llada() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llada"));
    for k in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
    ] {
        c.env_remove(k);
    }
    c
}

/// `llada-bench`.
pub fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llada-bench"))
}

/// `llada ARGS`, run to the end.
pub fn llada_out(args: &[&str]) -> Output {
    run(llada().args(args))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn the binary")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the run succeeded (its stderr in the message) and returns its stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "run failed ({:?}): {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts the run succeeded and returns its stderr (a training run's log).
pub fn ok_stderr(o: &Output) -> String {
    let e = stderr(o);
    assert!(o.status.success(), "run failed ({:?}): {e}", o.status);
    e
}

/// `p` as a command-line argument (panics on a non-UTF-8 path).
pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The bytes of the file at `p` (panics naming it).
pub fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs `cmd`, asserts it succeeded and returns its stdout.
pub fn ok_run(cmd: &mut Command) -> String {
    ok(&run(cmd))
}

/// Runs `cmd`, asserts it succeeded and parses its stdout as one JSON value.
pub fn ok_json(cmd: &mut Command) -> Value {
    serde_json::from_str(&ok_run(cmd)).expect("stdout is one JSON value")
}

/// Runs `cmd`, asserts it failed without a panic and returns its stderr.
pub fn err_of(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        !o.status.success(),
        "expected failure, got {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "panic instead of an error: {e}");
    e
}

/// A fresh, empty folder under the system temp dir named after the test binary, the process
/// and `name` (kept after the run, for inspection).
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "llada-{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        TempDir(tmpdir(&format!(
            "{tag}-{}",
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tests/fixtures/REL`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The `tiny` preset (tokenizer and chat template included) as an f32 folder `DIR/tiny`.
pub fn tiny(dir: &Path) -> PathBuf {
    let m = dir.join("tiny");
    llada::hf::init::write_preset_folder("tiny", &m, 3, llada::hf::dtype::DType::F32, 1).unwrap();
    m
}

/// Copies the files of `from` into a fresh `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Rewrites the JSON object in `path` through `f`.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, v.to_string()).unwrap();
}

/// The JSON file at `path`.
pub fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// Write a JSON-lines corpus `{"text": line(i)}`, `i < n`, to `path`; returns `path`.
pub fn text_corpus(path: &Path, n: usize, line: impl Fn(usize) -> String) -> PathBuf {
    let text: String = (0..n)
        .map(|i| format!("{}\n", serde_json::json!({ "text": line(i) })))
        .collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// The setup of a CLI training run: a fresh [`tmpdir`] `name` holding a [`text_corpus`]
/// `corpus.jsonl` of `n` lines; returns the folder, the corpus and the output folder `ck` in it
/// (not created).
pub fn train_dir(
    name: &str,
    n: usize,
    line: impl Fn(usize) -> String,
) -> (PathBuf, PathBuf, PathBuf) {
    let dir = tmpdir(name);
    let data = text_corpus(&dir.join("corpus.jsonl"), n, line);
    let ck = dir.join("ck");
    (dir, data, ck)
}

/// The non-blank lines of a JSON-lines file, parsed.
pub fn json_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// The elements of a JSON array through `item`; panics on a non-array or a bad element.
fn array<T>(v: &Value, item: impl Fn(&Value) -> Option<T>) -> Vec<T> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| item(x).unwrap_or_else(|| panic!("bad element {x} in {v}")))
        .collect()
}

/// A JSON array of unsigned integers.
pub fn u64s(v: &Value) -> Vec<u64> {
    array(v, Value::as_u64)
}

/// Ids as a `--prompt-ids` / `--ids` argument: `1,2,3`.
pub fn ids_arg<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// `llada grad --model MODEL ... --out OUT` on the batch of a gradient fixture (`ids`,
/// `masked` and `p_mask` of its `expected.json`), run to the end.
pub fn grad_on_fixture(model: &Path, exp: &Value, out: &Path) -> Output {
    let ids = |k: &str| ids_arg(&u64s(&exp[k]));
    llada_out(&[
        "grad",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &ids("ids"),
        "--masked",
        &ids("masked"),
        "--p-mask",
        &exp["p_mask"].to_string(),
        "--out",
        out.to_str().unwrap(),
    ])
}

/// A JSON array of token ids.
pub fn u32s(v: &Value) -> Vec<u32> {
    u64s(v).into_iter().map(|x| x as u32).collect()
}

/// A JSON array of numbers.
pub fn f64s(v: &Value) -> Vec<f64> {
    array(v, Value::as_f64)
}

/// Generation flags shared by tests that compare `generate`, `batch` and `serve`: 16 tokens in
/// blocks of 8, 8 steps, on the CPU.
pub fn gen_flags() -> Vec<&'static str> {
    words("--gen-length 16 --steps 8 --block-length 8 --device cpu")
}

/// The words of a command line without quoting (`"--steps 8"` → `["--steps", "8"]`).
pub fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// `llada generate --model MODEL --format json FLAGS`, asserted to succeed, its JSON.
pub fn generate_json(model: &Path, flags: &[&str]) -> Value {
    ok_json(
        llada()
            .args(["generate", "--format", "json", "--model"])
            .arg(model)
            .args(flags),
    )
}

/// The printed losses of a `llada train` log ([`logged_losses`]), as numbers.
pub fn losses(log: &str) -> Vec<f64> {
    let v = logged_losses(log);
    v.iter().map(|(_, l)| l.parse().unwrap()).collect()
}

/// The `step I/N loss X` lines of a `llada train` log: (I, X as printed).
pub fn logged_losses(log: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter_map(|l| {
            let step = l.split("step ").nth(1)?.split('/').next()?.parse().ok()?;
            let loss = l.split(" loss ").nth(1)?.split_whitespace().next()?;
            Some((step, loss.to_string()))
        })
        .collect()
}

/// Whether `python3` can import `module`; without it the caller skips (printing why), unless
/// `LLADA_REQUIRE_PY=1` (CI), which turns the skip into a failure.
pub fn python_has(module: &str) -> bool {
    let require = std::env::var("LLADA_REQUIRE_PY").is_ok_and(|v| v == "1");
    let probe = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "`import {module}` fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("no python3: {e}"),
    };
    assert!(!require, "LLADA_REQUIRE_PY=1 but {why}");
    eprintln!("SKIP: {why}");
    false
}
