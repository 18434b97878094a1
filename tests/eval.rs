//! Multiple-choice evaluation (lm-eval-harness scoring, reference §5.2): the context /
//! continuation split, acc and acc_norm, the standard error, the JSONL format, and the `llada
//! eval` command end to end on the tiny preset.

use std::collections::HashMap;

use anyhow::Result;
use llada::engine::predictor::{ScoreRequest, Scorer};
use llada::eval::{self, EvalParams, McItem};
use llada::loglik::LoglikParams;
mod common;

use common::cli::{err_of, llada, ok, ok_json, run, tmpdir};
use serde_json::Value;

/// A toy tokenizer: a space joins the following character into one token (" b"), every other
/// character is its own token; ids are the code point, + 1000 for a space-joined one.
fn toy_encode(s: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut space = false;
    for c in s.chars() {
        if c == ' ' && !space {
            space = true;
            continue;
        }
        out.push(c as u32 + if space { 1000 } else { 0 });
        space = false;
    }
    if space {
        out.push(' ' as u32);
    }
    Ok(out)
}

#[test]
fn encode_pair_moves_trailing_spaces_like_lm_eval() {
    let mut enc = toy_encode;
    // Context "Q: " + continuation "A": the space moves, so " A" is one continuation token.
    let (ctx, cont) = eval::encode_pair(&mut enc, "Q: ", "A").unwrap();
    assert_eq!(ctx, vec!['Q' as u32, ':' as u32]);
    assert_eq!(cont, vec!['A' as u32 + 1000]);
    // Without moving it, the context would end in a lone space token and the split by length
    // would eat the continuation: this is why lm-eval moves it.
    let whole = toy_encode("Q: A").unwrap();
    let naive_ctx = toy_encode("Q: ").unwrap();
    assert!(whole[naive_ctx.len()..].is_empty());
    // No trailing space: split by the context's token count.
    let (ctx, cont) = eval::encode_pair(&mut enc, "ab", " cd").unwrap();
    assert_eq!(ctx, vec!['a' as u32, 'b' as u32]);
    assert_eq!(cont, vec!['c' as u32 + 1000, 'd' as u32]);
    // Several trailing whitespace characters move together.
    let (ctx, cont) = eval::encode_pair(&mut enc, "x \n", "y").unwrap();
    assert_eq!(ctx, vec!['x' as u32]);
    assert_eq!(cont, toy_encode(" \ny").unwrap());
}

/// A fake scorer: the log-probability of a target depends only on the target id.
struct Table {
    lp: HashMap<u32, f32>,
    calls: usize,
}

impl Scorer for Table {
    fn score(&mut self, req: &ScoreRequest<'_>, out: &mut [f32]) -> Result<()> {
        self.calls += 1;
        for (o, t) in out.iter_mut().zip(req.targets) {
            *o = self.lp[t];
        }
        Ok(())
    }
    fn mask_id(&self) -> u32 {
        0
    }
}

fn p(mc_num: usize) -> EvalParams {
    EvalParams {
        loglik: LoglikParams {
            mc_num,
            batch_size: 1,
            cfg_scale: 0.0,
            seed: 0,
        },
        target_delimiter: " ".into(),
    }
}

#[test]
fn acc_and_acc_norm_follow_lm_eval() {
    // One-token choices " a", " b" score lp[a], lp[b] exactly; "cc" is two tokens " c", "c"
    // of equal log-probability −1, so every Monte-Carlo sample is (T/l)·l·(−1) = −2 exactly.
    let mut lp = HashMap::new();
    lp.insert('a' as u32 + 1000, -2.0);
    lp.insert('b' as u32 + 1000, -3.0);
    lp.insert('c' as u32 + 1000, -1.0);
    lp.insert('c' as u32, -1.0);
    let mut f = Table { lp, calls: 0 };
    let mut enc = toy_encode;
    // choices: "a" ll −2 (per char −2), "b" ll −3, "cc" ll −2 (per char −1).
    let item = McItem {
        context: "Q:".into(),
        choices: vec!["a".into(), "b".into(), "cc".into()],
        answer: 2,
    };
    let r = eval::score_item(&mut f, &mut enc, 0, &item, &p(4)).unwrap();
    assert_eq!(r.lls, vec![-2.0, -3.0, -2.0]);
    assert_eq!(r.tokens, vec![1, 1, 2]);
    // acc: the first maximum (np.argmax) is "a" (tie −2 vs −2) → wrong; acc_norm picks "cc".
    assert_eq!((r.pred, r.pred_norm), (0, 2));
    assert_eq!((r.acc(), r.acc_norm()), (0.0, 1.0));
    assert_eq!(r.forward_passes, 3 * 4);

    // Standard error: acc over [1, 0, 1, 1] = 0.75, sample std 0.5, stderr 0.5/√4 = 0.25.
    let items: Vec<McItem> = [0usize, 1, 0, 0]
        .iter()
        .map(|&a| McItem {
            context: "Q:".into(),
            choices: vec!["a".into(), "b".into()],
            answer: a,
        })
        .collect();
    let mut seen = 0;
    let (res, s) =
        eval::evaluate(&mut f, &mut enc, &items, &p(1), Some(&mut |d, _| seen = d)).unwrap();
    assert_eq!(seen, 4);
    assert_eq!(res.len(), 4);
    assert_eq!(s.n, 4);
    assert!((s.acc.mean - 0.75).abs() < 1e-12 && (s.acc.stderr - 0.25).abs() < 1e-12);
    assert_eq!(s.acc_norm.mean, s.acc.mean);
}

#[test]
fn argmax_and_stderr_helpers() {
    assert_eq!(eval::argmax_first(&[1.0, 3.0, 3.0]), 1);
    assert_eq!(eval::argmax_first(&[1.0, f64::NAN, 5.0]), 1);
    assert_eq!(
        eval::argmax_first(&[f64::NEG_INFINITY, f64::NEG_INFINITY]),
        0
    );
    let (m, se) = eval::mean_stderr(&[1.0]);
    assert_eq!(m, 1.0);
    assert!(se.is_nan());
    let (m, se) = eval::mean_stderr(&[1.0, 2.0, 3.0]);
    assert!((m - 2.0).abs() < 1e-12 && (se - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
}

#[test]
fn jsonl_parsing_names_file_and_line() {
    let ok = "{\"context\": \"c\", \"choices\": [\"x\", \"y\"], \"answer\": 1}\n\n\
              {\"context\": \"d\", \"choices\": [\"x\", \"y\"], \"answer\": \"x\"}\n";
    let items = eval::parse_items(ok, "t.jsonl").unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!((items[0].answer, items[1].answer), (1, 0));
    let bad = |text: &str, want: &str| {
        let e = format!("{:#}", eval::parse_items(text, "t.jsonl").unwrap_err());
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    };
    bad(
        "{\"choices\": [\"x\"], \"answer\": 0}",
        "t.jsonl:1: field `context`",
    );
    bad(
        "{\"context\": \"c\", \"choices\": [\"x\"], \"answer\": 0}\n{\"context\": \"c\", \"answer\": 0}",
        "t.jsonl:2: field `choices`",
    );
    bad(
        "{\"context\": \"c\", \"choices\": [\"x\"], \"answer\": 3}",
        "out of range",
    );
    bad(
        "{\"context\": \"c\", \"choices\": [\"x\"], \"answer\": \"z\"}",
        "not one of the choices",
    );
    bad(
        "{\"context\": \"c\", \"choices\": [], \"answer\": 0}",
        "`choices` is empty",
    );
    bad(
        "{\"context\": \"c\", \"choices\": [1], \"answer\": 0}",
        "choices[0] is not a string",
    );
    bad("not json", "t.jsonl:1: not valid JSON");
    bad(
        "{\"context\": \"c\", \"choices\": [\"x\"]}",
        "field `answer`",
    );
    bad("\n\n", "no items");
}

/// `llada eval` on the tiny preset folder (with its tokenizer): metrics in range, per-item
/// file, deterministic, and the per-item log-likelihoods equal `llada loglik --prompt/--answer`
/// on the same split.
#[test]
fn cli_eval_end_to_end() {
    let dir = tmpdir("model");
    ok(&run(llada()
        .args(["init-tiny"])
        .arg(&dir)
        .args(["--dtype", "f32"])));
    let tasks = dir.join("tasks.jsonl");
    std::fs::write(
        &tasks,
        "{\"context\": \"the cat sat on the\", \"choices\": [\"mat\", \"dog\", \"hat\"], \"answer\": 0}\n\
         {\"context\": \"one two \", \"choices\": [\"three\", \"four\"], \"answer\": \"three\"}\n\
         {\"context\": \"a b c\", \"choices\": [\"d\", \"e f\"], \"answer\": 1}\n",
    )
    .unwrap();
    const FLAGS: [&str; 8] = [
        "--mc-num",
        "4",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--format",
        "json",
    ];
    let run_eval = |out: &std::path::Path| -> Value {
        ok_json(
            llada()
                .args(["eval", "--model"])
                .arg(&dir)
                .arg("--tasks")
                .arg(&tasks)
                .args(FLAGS)
                .arg("--output")
                .arg(out),
        )
    };
    let (o1, o2) = (dir.join("r1.jsonl"), dir.join("r2.jsonl"));
    let v = run_eval(&o1);
    assert_eq!(v["n"], 3);
    let acc = v["acc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(v["acc_stderr"].as_f64().is_some());
    assert_eq!(v["forward_passes"], 7 * 2);
    let lines1 = std::fs::read_to_string(&o1).unwrap();
    assert_eq!(lines1.lines().count(), 3);
    run_eval(&o2);
    assert_eq!(
        lines1,
        std::fs::read_to_string(&o2).unwrap(),
        "not deterministic"
    );
    // Item 1, choice 0: context "one two " → the trailing space moves onto " three".
    let item: Value = serde_json::from_str(lines1.lines().nth(1).unwrap()).unwrap();
    let ll = ok_json(
        llada()
            .args(["loglik", "--model"])
            .arg(&dir)
            .args(["--prompt", "one two ", "--answer", " three"])
            .args(FLAGS),
    );
    assert_eq!(ll["loglik"].as_f64(), item["lls"][0].as_f64());
    // A bad task file names the line.
    std::fs::write(
        &tasks,
        "{\"context\": \"x\", \"choices\": [\"a\"], \"answer\": 0}\n{oops\n",
    )
    .unwrap();
    let e = err_of(
        llada()
            .args(["eval", "--model"])
            .arg(&dir)
            .arg("--tasks")
            .arg(&tasks)
            .args(["--device", "cpu"]),
    );
    assert!(e.contains("tasks.jsonl:2"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
