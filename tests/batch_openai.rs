//! `llada batch` on OpenAI batch files: results equal `llada generate`, bad lines land in the
//! errors file in OpenAI's shape, reruns resume, shards merge.

mod common;

use std::path::Path;

use common::cli::{gen_flags, generate_json, json_lines as lines, llada, ok, run, stderr, tmpdir};
use serde_json::{json, Value};

fn generate(model: &Path, extra: &[&str]) -> Value {
    generate_json(model, &[gen_flags(), extra.to_vec()].concat())
}

fn batch(model: &Path, input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    llada()
        .args(["batch", "--model", model.to_str().unwrap(), "--same-length"])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(gen_flags())
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn openai_batch_file_round_trip() {
    let d = tmpdir("rt");
    let model = d.join("tiny");
    assert!(llada()
        .arg("init-tiny")
        .arg(&model)
        .status()
        .unwrap()
        .success());
    let rows = [
        json!({"custom_id": "a", "method": "POST", "url": "/v1/completions",
               "body": {"model": "tiny", "prompt": "Hello world"}}),
        json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 16}}),
        json!({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
        json!({"custom_id": "d", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": [5, 6, 7], "max_tokens": 8, "steps": 4, "block_length": 4}}),
        json!({"custom_id": "a", "method": "POST", "url": "/v1/completions",
               "body": {"prompt": "dup"}}),
    ];
    let input = d.join("in.jsonl");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let output = d.join("out.jsonl");
    let out = batch(&model, &input, &output, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let got = lines(&output);
    let by: std::collections::HashMap<String, &Value> = got
        .iter()
        .map(|v| (v["custom_id"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(got.len(), 3);
    let a = generate(&model, &["--prompt", "Hello world"]);
    let ra = &by["a"]["response"];
    assert_eq!(ra["status_code"], 200);
    assert_eq!(ra["body"]["object"], "text_completion");
    assert_eq!(ra["body"]["choices"][0]["text"], a["text"][0]);
    assert_eq!(ra["body"]["choices"][0]["token_ids"], a["ids"][0]);
    assert_eq!(ra["body"]["model"], "tiny");
    assert_eq!(ra["body"]["usage"]["nfe"], 8);
    assert!(by["a"]["error"].is_null());
    assert_eq!(by["a"]["id"], "batch_req_a");
    let b = generate(&model, &["--prompt", "Hi there", "--chat"]);
    let rb = &by["b"]["response"]["body"];
    assert_eq!(rb["object"], "chat.completion");
    assert_eq!(rb["choices"][0]["message"]["content"], b["text"][0]);
    let dd = generate_json(
        &model,
        &[
            &["--prompt-ids", "5,6,7", "--gen-length", "8", "--steps", "4"][..],
            &["--block-length", "4", "--device", "cpu"],
        ]
        .concat(),
    );
    assert_eq!(
        by["d"]["response"]["body"]["choices"][0]["token_ids"],
        dd["ids"][0]
    );

    let errs = lines(&d.join("out.errors.jsonl"));
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_eq!(errs[0]["custom_id"], "c");
    assert_eq!(errs[0]["error"]["line"], 3);
    assert_eq!(errs[0]["error"]["code"], "invalid_request");
    assert!(errs[0]["response"].is_null());
    assert!(errs[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("duplicate"));

    // Rerunning resumes: nothing is generated twice.
    let out = batch(&model, &input, &output, &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("3 already done, 0 to generate"));
    assert_eq!(lines(&output).len(), 3);

    // Shards cover every line once and merge into the same results.
    let sharded = d.join("sh.jsonl");
    for i in 0..2 {
        let out = batch(&model, &input, &sharded, &["--shard", &format!("{i}/2")]);
        // Shard 0 owns lines 1, 3, 5 (two bad ones); shard 1 owns lines 2 and 4.
        assert_eq!(out.status.code(), Some(if i == 0 { 3 } else { 0 }));
    }
    let merged = d.join("merged.jsonl");
    ok(&run(llada()
        .args(["batch", "merge", "--output"])
        .arg(&merged)
        .arg(d.join("sh.shard-00000-of-00002.jsonl"))
        .arg(d.join("sh.shard-00001-of-00002.jsonl"))));
    let mut m: Vec<Value> = lines(&merged);
    m.sort_by_key(|v| v["custom_id"].as_str().unwrap().to_string());
    let mut g = got.clone();
    g.sort_by_key(|v| v["custom_id"].as_str().unwrap().to_string());
    for (x, y) in m.iter().zip(&g) {
        assert_eq!(
            x["response"]["body"]["choices"],
            y["response"]["body"]["choices"]
        );
    }
    assert_eq!(m.len(), 3);
}
