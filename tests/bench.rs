//! `llada-bench` output on the `tiny` preset on the CPU: the table and the JSON.

use std::process::Command;

use serde_json::Value;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llada-bench"))
}

/// Runs `llada-bench` on the CPU's `tiny` preset with `args` and `--json` into a fresh file;
/// returns its stdout and the JSON (the run must succeed). `tag` names the temporary folder.
fn run_json(tag: &str, args: &[&str]) -> (String, Value) {
    run_json_env(tag, args, &[])
}

/// [`run_json`] with the environment variables `env` set for the run.
fn run_json_env(tag: &str, args: &[&str], env: &[(&str, &str)]) -> (String, Value) {
    let dir = std::env::temp_dir().join(format!("llada-bench-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let out = bench()
        .args(["--device", "cpu", "--preset", "tiny", "--prompt-len", "8"])
        .args(["--gen-length", "16", "--block-length", "8", "--warmup", "0"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{stdout}");
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stdout, v)
}

#[test]
fn table_and_json_on_tiny_cpu() {
    let (stdout, v) = run_json("test", &["--steps", "16,4", "--batch", "1,2"]);
    assert!(stdout.starts_with("# llada-bench  device: cpu"), "{stdout}");
    assert!(stdout.contains("commit: "), "{stdout}");
    let header = stdout
        .lines()
        .find(|l| l.contains("tokens/s"))
        .expect("a table header");
    for col in ["steps", "fwd", "ms/step", "min", "max", "TFLOP/s"] {
        assert!(header.contains(col), "missing column {col}: {header}");
    }
    // One row per (batch, steps): "none schedule 16 16 ..." and "... 4 4 ..." twice.
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.len() >= 8 && w[2].parse::<usize>().is_ok() && w[3].parse::<usize>().is_ok())
        .collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for r in &rows {
        assert_eq!((r[0], r[1]), ("none", "schedule"), "{r:?}");
        assert_eq!(r[2], r[3], "forward passes = steps without a cache: {r:?}");
        assert!(r[4].parse::<f64>().unwrap() > 0.0);
    }

    assert!(v["device"].as_str().unwrap().starts_with("cpu"));
    let jr = v["rows"].as_array().unwrap();
    assert_eq!(jr.len(), 4);
    let steps: Vec<u64> = jr.iter().map(|r| r["steps"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![16, 4, 16, 4]);
    for r in jr {
        let tps = r["tokens_per_s"].as_f64().unwrap();
        let secs = r["seconds"].as_f64().unwrap();
        let b = r["batch"].as_u64().unwrap() as f64;
        assert!(tps > 0.0);
        // tokens/s is batch · gen_length / seconds.
        assert!((tps * secs - 16.0 * b).abs() < 1e-6 * tps * secs, "{r}");
        assert_eq!(r["forward_passes"], r["steps"]);
        assert!(
            r["ms_per_step_min"].as_f64().unwrap() <= r["ms_per_step_median"].as_f64().unwrap()
        );
        assert!(
            r["ms_per_step_median"].as_f64().unwrap() <= r["ms_per_step_max"].as_f64().unwrap()
        );
    }
}

#[test]
fn bad_flags_are_clear_errors() {
    for (args, want) in [
        (vec!["--steps", "8,x"], "x"),
        (vec!["--steps", "0"], "steps"),
        (
            vec!["--gen-length", "16", "--block-length", "5", "--steps", "4"],
            "gen_length",
        ),
        (vec!["--preset", "huge"], "huge"),
        (vec!["--bandwidth-gbs", "0"], "bandwidth"),
    ] {
        let out = bench()
            .args(["--device", "cpu"])
            .args(&args)
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(e.contains(want) && !e.contains("panicked"), "{args:?}: {e}");
    }
}

/// `--breakdown` with a given bandwidth: each class's rate and floor in the JSON, the GEMM's
/// TFLOP/s consistent with its measured time (the arithmetic itself is unit-tested in
/// bench/floors.rs).
#[test]
fn breakdown_reports_floors() {
    let (stdout, v) = run_json(
        "floors",
        &[
            "--steps",
            "4",
            "--cache",
            "dual",
            "--breakdown",
            "--bandwidth-gbs",
            "50",
        ],
    );
    assert!(
        stdout.contains("GB/s") && stdout.contains("floor"),
        "{stdout}"
    );
    assert_eq!(v["bandwidth_gbs"].as_f64(), Some(50.0));
    let floors = v["rows"][0]["floors"].as_array().expect("floors");
    let gemm = floors.iter().find(|f| f["class"] == "gemm").expect("gemm");
    let (ms, gbs) = (gemm["ms"].as_f64().unwrap(), gemm["gbs"].as_f64().unwrap());
    let floor = gemm["floor_ms"].as_f64().unwrap();
    assert!(ms > 0.0 && gbs > 0.0 && floor > 0.0, "{gemm}");
    // On the CPU no GEMM ceiling is known: the floor is the weight read at 50 GB/s, so the
    // achieved GB/s over the bandwidth is the share of the floor.
    let share = gemm["of_floor"].as_f64().unwrap();
    assert!((share - gbs / 50.0).abs() < 1e-9 * share.max(1.0), "{gemm}");
}

/// Each row records where its commit selection ran: `host` by default, `step-graph` with
/// `LLADA_STEP_GRAPH=1` (whole steps on the device, with and without a cache); the step-graph
/// rows still generate (forward passes as the host's).
#[test]
fn rows_record_the_selection_mode() {
    let args = ["--steps", "4", "--cache", "none,dual", "--threshold", "0.5"];
    let off = [("LLADA_STEP_GRAPH", "0"), ("LLADA_DEVICE_SELECT", "0")];
    let (_, host) = run_json_env("sel-host", &args, &off);
    let on = [("LLADA_STEP_GRAPH", "1")];
    let (stdout, graph) = run_json_env("sel-graph", &args, &on);
    assert!(
        stdout.contains("# commit selection: step-graph"),
        "{stdout}"
    );
    let rows = |v: &Value| v["rows"].as_array().unwrap().clone();
    let (h, g) = (rows(&host), rows(&graph));
    assert_eq!((h.len(), g.len()), (4, 4));
    for (h, g) in h.iter().zip(&g) {
        assert_eq!(h["select"], "host", "{h}");
        assert_eq!(g["select"], "step-graph", "{g}");
        assert_eq!(h["forward_passes"], g["forward_passes"], "{h} vs {g}");
    }
}
