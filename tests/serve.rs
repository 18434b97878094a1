//! `llada serve` end to end: the binary is started on port 0 and driven over loopback by a
//! small std-only HTTP/1.1 client, by `curl` (when installed), and, when the `openai` Python
//! package is importable, by the unmodified OpenAI client in `tests/serve_openai.py`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use common::cli::{
    gen_flags, generate_json, llada, ok, ok_json, python_has, run, u64s as ids, words,
};
use serde_json::{json, Value};

/// The tiny preset written once as a folder (weights, tokenizer, chat template).
fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("llada-serve-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        ok(&run(llada().arg("init-tiny").arg(&d)));
        d
    })
}

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &[&str], extra: &[&str]) -> Server {
        let mut child = llada()
            .arg("serve")
            .args(model)
            .args(gen_flags())
            .args(["--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn llada serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("llada serve listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, addr }
    }

    fn folder(extra: &[&str]) -> Server {
        let d = tiny_dir().to_str().unwrap().to_string();
        Server::start(&["--model", &d], extra)
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        http(&self.addr, "POST", path, &body.to_string(), &[])
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    /// The `data:` payloads of a server-sent-events body.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn request_bytes(addr: &str, method: &str, path: &str, body: &str, headers: &[&str]) -> String {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

/// One request on a fresh connection; the whole response (chunked bodies decoded).
fn http(addr: &str, method: &str, path: &str, body: &str, headers: &[&str]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(request_bytes(addr, method, path, body, headers).as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header terminator");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut rest = &raw[split + 4..];
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            rest = &rest[nl + 2..];
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        body: String::from_utf8(body).unwrap(),
    }
}

fn cli_json(args: &[&str]) -> Value {
    ok_json(llada().args(args))
}

/// `llada generate` on the tiny folder with [`gen_flags`] and `extra`.
fn generate_cli(extra: &[&str]) -> Value {
    generate_json(tiny_dir(), &[gen_flags(), extra.to_vec()].concat())
}

/// Runs a Python script to the end and asserts it succeeded and printed `want`.
fn python_ok(cmd: &mut Command, want: &str) {
    let out = ok(&run(cmd));
    assert!(out.contains(want), "{out}");
}

fn check_usage(v: &Value, nfe: u64) {
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0, "{v}");
    assert!(u["completion_tokens"].as_u64().unwrap() <= 16, "{v}");
    assert_eq!(u["nfe"].as_u64(), Some(nfe), "{v}");
}

#[test]
fn completion_and_chat_equal_llada_generate() {
    let srv = Server::folder(&[]);
    let cli = generate_cli(&["--prompt", "Hello world"]);
    let r = srv.post("/v1/completions", &json!({"prompt": "Hello world"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&cli["ids"][0]));
    assert_eq!(v["choices"][0]["text"], cli["text"][0]);
    check_usage(&v, cli["nfe"].as_u64().unwrap());

    // The OpenAI names and the LLaDA extras map onto the CLI flags.
    let cli2 = generate_json(
        tiny_dir(),
        &words(concat!(
            "--device cpu --prompt abc --gen-length 8 --steps 4 --block-length 4",
            " --remasking random --seed 3 --temperature 0.7"
        )),
    );
    let v = srv
        .post(
            "/v1/completions",
            &json!({"prompt": "abc", "max_tokens": 8, "steps": 4, "block_length": 4,
                     "remasking": "random", "seed": 3, "temperature": 0.7}),
        )
        .json();
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&cli2["ids"][0]));
    assert_eq!(v["usage"]["nfe"].as_u64(), Some(4));

    let chat = generate_cli(&["--prompt", "Hi there", "--chat"]);
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"model": "ignored-if-absent-but-here-wrong", "messages": [{"role": "user", "content": "Hi there"}]}),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let models = http(&srv.addr, "GET", "/v1/models", "", &[]).json();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let r = srv.post(
        "/v1/chat/completions",
        &json!({"model": name, "messages": [{"role": "user", "content": "Hi there"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&chat["ids"][0]));
    assert_eq!(v["choices"][0]["message"]["content"], chat["text"][0]);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    check_usage(&v, 8);

    // n and a list of prompts: choice 0 of each prompt is the lone greedy result.
    let v = srv
        .post(
            "/v1/completions",
            &json!({"prompt": ["Hello world", "abc"], "n": 2}),
        )
        .json();
    let ch = v["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 4);
    assert_eq!(ids(&ch[0]["token_ids"]), ids(&cli["ids"][0]));
    assert_eq!(
        ids(&ch[1]["token_ids"]),
        ids(&cli["ids"][0]),
        "greedy: draws agree"
    );

    // A stop sequence cuts the text and sets finish_reason.
    let full = cli["text"][0].as_str().unwrap().to_string();
    if full.chars().count() >= 3 {
        let stop: String = full.chars().skip(1).take(2).collect();
        let v = srv
            .post(
                "/v1/completions",
                &json!({"prompt": "Hello world", "stop": [stop]}),
            )
            .json();
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, &full[..full.find(&stop).unwrap()]);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn preset_with_token_ids_equals_generate() {
    let srv = Server::start(&["--preset", "tiny"], &[]);
    let mut args = words("generate --preset tiny --prompt-ids 5,6,7,8 --format json");
    args.extend(gen_flags());
    let cli = cli_json(&args);
    let v = srv
        .post("/v1/completions", &json!({"prompt": [5, 6, 7, 8]}))
        .json();
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&cli["ids"][0]));
    // The preset serves text too (the tiny tokenizer).
    let r = srv.post("/v1/completions", &json!({"prompt": "hello"}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn stream_sends_a_chunk_per_block_and_done() {
    let srv = Server::folder(&[]);
    let whole = srv
        .post("/v1/completions", &json!({"prompt": "Hello world"}))
        .json();
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": "Hello world", "stream": true}),
    );
    assert_eq!(r.status, 200);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let last = chunks.last().unwrap();
    assert_eq!(last["usage"]["nfe"].as_u64(), Some(8));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));

    let r = srv.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}),
    );
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&ev[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // n = 2, streamed: every choice gets its role, then its text, equal to the plain answer.
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "n": 2, "temperature": 0.9, "seed": 4});
    let whole = srv.post("/v1/chat/completions", &body).json();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let ev = srv.post("/v1/chat/completions", &streamed).events();
    let mut text = [String::new(), String::new()];
    let mut roles = [0, 0];
    for e in &ev[..ev.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            if ch["delta"]["role"] == "assistant" {
                roles[i] += 1;
            }
            if let Some(t) = ch["delta"]["content"].as_str() {
                text[i].push_str(t);
            }
        }
    }
    assert_eq!(roles, [1, 1]);
    for (i, t) in text.iter().enumerate() {
        assert_eq!(
            t,
            whole["choices"][i]["message"]["content"].as_str().unwrap(),
            "choice {i}"
        );
    }
}

#[test]
fn errors_are_openai_shaped_4xx() {
    let srv = Server::folder(&["--max-body-bytes", "2000"]);
    let cases: Vec<(&str, String, u16)> = vec![
        ("/v1/completions", "{not json".into(), 400),
        ("/v1/completions", "".into(), 400),
        ("/v1/completions", json!({"prompt": 3}).to_string(), 400),
        (
            "/v1/completions",
            json!({"prompt": "a", "model": "gpt-4"}).to_string(),
            404,
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "steps": 3}).to_string(),
            400,
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 12, "block_length": 8}).to_string(),
            400,
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "temperature": -1}).to_string(),
            400,
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 99999]}).to_string(),
            400,
        ),
        (
            "/v1/completions",
            json!({"prompt": vec![1u32; 1500]}).to_string(),
            413,
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 1000000, "block_length": 1000000, "steps": 1})
                .to_string(),
            400,
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(),
            400,
        ),
        ("/v1/loglikelihood", json!({"prompt": "a"}).to_string(), 400),
        (
            "/v1/loglikelihood",
            json!({"prompt": "a", "continuation": " b", "mc_num": 3, "batch_size": 2}).to_string(),
            400,
        ),
        ("/v1/nothing", "{}".into(), 404),
    ];
    for (path, body, status) in cases {
        let r = http(&srv.addr, "POST", path, &body, &[]);
        assert_eq!(r.status, status, "{path} {body}: {}", r.body);
        let v = r.json();
        assert!(v["error"]["message"].as_str().unwrap().len() > 5, "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
    }
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": vec![5u32; 20], "max_tokens": 1024, "block_length": 1024, "steps": 1}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // The server still works.
    assert_eq!(
        srv.post("/v1/completions", &json!({"prompt": "ok"})).status,
        200
    );
}

#[test]
fn api_key_is_required_on_v1() {
    let srv = Server::folder(&["--api-key", "sekret"]);
    let body = json!({"prompt": "a"}).to_string();
    let r = http(&srv.addr, "POST", "/v1/completions", &body, &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = http(
        &srv.addr,
        "POST",
        "/v1/completions",
        &body,
        &["Authorization: Bearer wrong"],
    );
    assert_eq!(r.status, 401);
    let r = http(
        &srv.addr,
        "POST",
        "/v1/completions",
        &body,
        &["Authorization: Bearer sekret"],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(http(&srv.addr, "GET", "/v1/models", "", &[]).status, 401);
    assert_eq!(http(&srv.addr, "GET", "/health", "", &[]).status, 200);
}

#[test]
fn loglikelihood_equals_llada_loglik() {
    let srv = Server::folder(&[]);
    let cli = ok_json(
        llada()
            .args(["loglik", "--prompt", "The capital is", "--answer", " Paris"])
            .args(words("--mc-num 8 --seed 2 --device cpu --format json"))
            .arg("--model")
            .arg(tiny_dir()),
    );
    let v = srv
        .post(
            "/v1/loglikelihood",
            &json!({"prompt": "The capital is", "continuation": " Paris", "mc_num": 8, "seed": 2}),
        )
        .json();
    assert_eq!(v["loglikelihood"].as_f64(), cli["loglik"].as_f64(), "{v}");
    assert!(v["loglikelihood"].as_f64().unwrap().is_finite());
    assert!(v["usage"]["nfe"].as_u64().unwrap() > 0);
    let many = srv
        .post(
            "/v1/loglikelihood",
            &json!({"requests": [{"prompt": "The capital is", "continuation": " Paris"},
                                   {"prompt": [5, 6], "continuation": [7]}],
                    "mc_num": 8, "seed": 2}),
        )
        .json();
    assert_eq!(
        many["results"][0]["loglikelihood"].as_f64(),
        cli["loglik"].as_f64()
    );
    assert!(many["results"][1]["loglikelihood"]
        .as_f64()
        .unwrap()
        .is_finite());
}

/// 32 clients × 4 requests: plain, streamed, abandoned mid-stream and malformed. Nothing is
/// lost, every answer is 2xx or 4xx, and the server is healthy and idle afterwards.
#[test]
fn concurrent_clients_lose_nothing() {
    let srv = Server::folder(&["--max-queue", "256"]);
    let reference = srv
        .post("/v1/completions", &json!({"prompt": "client 0"}))
        .json();
    let addr = srv.addr.clone();
    let threads: Vec<_> = (0..32)
        .map(|c| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut answered = Vec::new();
                for k in 0..4 {
                    let prompt = format!("client {}", c % 4);
                    match (c + k) % 4 {
                        0 => {
                            let r = http(
                                &addr,
                                "POST",
                                "/v1/completions",
                                &json!({"prompt": prompt}).to_string(),
                                &[],
                            );
                            assert_eq!(r.status, 200, "{}", r.body);
                            let v = r.json();
                            assert_eq!(v["choices"][0]["token_ids"].as_array().unwrap().len(), 16);
                            answered.push((prompt, Some(v["choices"][0]["token_ids"].clone())));
                        }
                        1 => {
                            let r = http(
                                &addr,
                                "POST",
                                "/v1/completions",
                                &json!({"prompt": prompt, "stream": true}).to_string(),
                                &[],
                            );
                            assert_eq!(r.status, 200);
                            assert_eq!(
                                r.events().last().map(String::as_str),
                                Some("[DONE]"),
                                "{}",
                                r.body
                            );
                            answered.push((prompt, None));
                        }
                        2 => {
                            // Abandon a stream after its headers.
                            let mut s = TcpStream::connect(&addr).unwrap();
                            let body = json!({"prompt": prompt, "stream": true}).to_string();
                            s.write_all(
                                request_bytes(&addr, "POST", "/v1/completions", &body, &[])
                                    .as_bytes(),
                            )
                            .unwrap();
                            let mut buf = [0u8; 64];
                            let _ = s.read(&mut buf).unwrap();
                            drop(s);
                            answered.push((prompt, None));
                        }
                        _ => {
                            let r = http(&addr, "POST", "/v1/completions", "{\"prompt\":", &[]);
                            assert!((400..500).contains(&r.status), "{}", r.status);
                            assert!(r.json()["error"]["message"].is_string());
                            answered.push((prompt, None));
                        }
                    }
                }
                answered
            })
        })
        .collect();
    let mut total = 0;
    for t in threads {
        let answered = t.join().expect("a client thread panicked");
        for (prompt, ids) in &answered {
            // Batching does not change a greedy result.
            if let (Some(ids), "client 0") = (ids, prompt.as_str()) {
                assert_eq!(ids, &reference["choices"][0]["token_ids"]);
            }
        }
        total += answered.len();
    }
    assert_eq!(total, 128);
    assert_eq!(http(&addr, "GET", "/health", "", &[]).status, 200);
    // Every slot comes back (abandoned streams included).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = http(&addr, "GET", "/metrics", "", &[]).body;
        let depth = m
            .lines()
            .find_map(|l| l.strip_prefix("llada_queue_depth "))
            .unwrap()
            .trim()
            .to_string();
        if depth == "0" {
            let batches: f64 = m
                .lines()
                .find_map(|l| l.strip_prefix("llada_batches_total "))
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                batches < 97.0,
                "requests were not batched: {batches} batches"
            );
            assert!(m.contains("llada_responses_total{class=\"5xx\"} 0"), "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "queue never drained:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client that goes away frees its slot: with room for one request, the next one gets in.
#[test]
fn disconnect_frees_the_slot() {
    let srv = Server::folder(&["--max-queue", "1"]);
    let body = json!({"prompt": "x", "stream": true, "max_tokens": 256, "steps": 256,
                      "block_length": 8})
    .to_string();
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.write_all(request_bytes(&srv.addr, "POST", "/v1/completions", &body, &[]).as_bytes())
        .unwrap();
    let mut buf = [0u8; 256];
    let _ = s.read(&mut buf).unwrap();
    // While it runs, a second request is refused with 429.
    let r = srv.post("/v1/completions", &json!({"prompt": "y"}));
    assert!(r.status == 429 || r.status == 200, "{}", r.body);
    if r.status == 429 {
        assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = srv.post("/v1/completions", &json!({"prompt": "y"}));
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.body);
        assert!(
            Instant::now() < deadline,
            "the abandoned request kept its slot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A plain (non-streamed) request abandoned mid-generation: its batch is aborted between
    // forward passes and the slot comes back.
    let cancelled = |srv: &Server| -> f64 {
        http(&srv.addr, "GET", "/metrics", "", &[])
            .body
            .lines()
            .find_map(|l| l.strip_prefix("llada_cancelled_batches_total "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = cancelled(&srv);
    let body =
        json!({"prompt": "z", "max_tokens": 512, "steps": 512, "block_length": 512}).to_string();
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.write_all(request_bytes(&srv.addr, "POST", "/v1/completions", &body, &[]).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = cancelled(&srv);
        if now > before && srv.post("/v1/completions", &json!({"prompt": "y"})).status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned batch was not cancelled ({before} -> {now})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM lets a request in flight finish, then the server exits cleanly.
#[cfg(unix)]
#[test]
fn sigterm_drains_in_flight() {
    let mut srv = Server::folder(&[]);
    let addr = srv.addr.clone();
    let (started, wait_started) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        let body = json!({"prompt": "x", "stream": true, "max_tokens": 256, "steps": 256,
                          "block_length": 8})
        .to_string();
        s.write_all(request_bytes(&addr, "POST", "/v1/completions", &body, &[]).as_bytes())
            .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if !told && raw.windows(5).any(|w| w == b"data:") {
                started.send(()).unwrap();
                told = true;
            }
        }
        parse_response(&raw)
    });
    wait_started.recv().unwrap();
    let ok = Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let r = t.join().unwrap();
    assert_eq!(r.status, 200);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(last["usage"]["nfe"].as_u64(), Some(256), "{last}");
    let st = srv.child.wait().unwrap();
    assert!(st.success(), "{st:?}");
    // New connections are refused after the drain.
    assert!(TcpStream::connect(&srv.addr).is_err());
}

/// lm-evaluation-harness through the `llada` model (python/llada_lm_eval) on local tasks: a
/// multiple-choice task equals `llada eval`, a generation task equals `llada generate`.
#[test]
fn lm_eval_harness_equals_cli() {
    if !python_has("lm_eval") {
        return;
    }
    let srv = Server::folder(&[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = std::env::temp_dir().join(format!("llada-serve-lmeval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    python_ok(
        Command::new("python3")
            .arg(root.join("tests/lm_eval_local.py"))
            .arg(env!("CARGO_BIN_EXE_llada"))
            .arg(tiny_dir())
            .arg(format!("http://{}", srv.addr))
            .arg(&work),
        "lm-eval: ok",
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// The unmodified `openai` Python client: complete, chat and stream.
#[test]
fn openai_python_client() {
    if !python_has("openai") {
        return;
    }
    let srv = Server::folder(&["--api-key", "k"]);
    let cli = generate_cli(&["--prompt", "Hello world"]);
    let chat = generate_cli(&["--prompt", "Hi there", "--chat"]);
    python_ok(
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py"))
            .arg(format!("http://{}/v1", srv.addr))
            .arg(cli["text"][0].as_str().unwrap())
            .arg(chat["text"][0].as_str().unwrap()),
        "openai client: ok",
    );
}

/// `curl` as a user types it: POST a JSON body, read the answer (or the SSE stream) from stdout.
fn curl(addr: &str, path: &str, body: &Value) -> String {
    ok(&run(Command::new("curl").args([
        "-sS",
        "--fail-with-body",
        "--max-time",
        "120",
        "-H",
        "Content-Type: application/json",
        "-d",
        &body.to_string(),
        &format!("http://{addr}{path}"),
    ])))
}

/// `curl` completes, chats and streams against `llada serve --model DIR` and `--preset tiny`,
/// with greedy results equal to `llada generate` (skipped, with a reason, where `curl` is absent).
#[test]
fn curl_completes_chats_and_streams() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIP: curl is not installed");
        return;
    }
    let srv = Server::folder(&[]);
    let cli = generate_cli(&["--prompt", "Hello world"]);
    let v: Value = serde_json::from_str(&curl(
        &srv.addr,
        "/v1/completions",
        &json!({"prompt": "Hello world"}),
    ))
    .unwrap();
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&cli["ids"][0]));
    assert_eq!(v["choices"][0]["text"], cli["text"][0]);

    let chat = generate_cli(&["--prompt", "Hi there", "--chat"]);
    let body = json!({"messages": [{"role": "user", "content": "Hi there"}]});
    let v: Value = serde_json::from_str(&curl(&srv.addr, "/v1/chat/completions", &body)).unwrap();
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&chat["ids"][0]));
    assert_eq!(v["choices"][0]["message"]["content"], chat["text"][0]);

    // The stream's deltas add up to the same chat answer, and it ends with [DONE].
    let mut body = body;
    body["stream"] = json!(true);
    let sse = curl(&srv.addr, "/v1/chat/completions", &body);
    let events: Vec<&str> = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last().copied(), Some("[DONE]"), "{sse}");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, chat["text"][0].as_str().unwrap());

    // The preset serves token ids the same way `llada generate --preset tiny` does.
    let srv = Server::start(&["--preset", "tiny"], &[]);
    let cli = cli_json(
        &[
            vec!["generate", "--preset", "tiny", "--format", "json"],
            gen_flags(),
            vec!["--prompt-ids", "5,6,7"],
        ]
        .concat(),
    );
    let v: Value = serde_json::from_str(&curl(
        &srv.addr,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7]}),
    ))
    .unwrap();
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&cli["ids"][0]));
}
