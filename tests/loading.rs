//! Loading Hugging Face model folders: config.json, single-file and sharded safetensors, and the
//! errors a bad folder must produce (each naming the file, tensor or field at fault).

mod common;

use std::path::Path;

use llada::hf::checkpoint::{block_tensor, expected_tensors, Checkpoint, LN_F, WTE};
use llada::hf::config::ModelConfig;
use llada::hf::dtype::DType;
use llada::hf::init::write_preset_folder;
use llada::hf::presets::{preset_checkpoint, preset_config};
use llada::hf::write::{write_hf_folder, write_safetensors, HostTensor};

use common::cli::TempDir;

fn tiny_tensors(dtype: DType) -> (ModelConfig, Vec<HostTensor>) {
    let cfg = preset_config("tiny").unwrap();
    let ck = preset_checkpoint("tiny", 11, dtype).unwrap();
    let t = expected_tensors(&cfg)
        .into_iter()
        .map(|(n, s)| {
            let v = ck.read_f32(&n).unwrap();
            (n, dtype, s, v)
        })
        .collect();
    (cfg, t)
}

fn open_err(dir: &Path) -> String {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    format!("{:#}", Checkpoint::open(dir, &cfg).unwrap_err())
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error message lacks {p:?}: {msg}");
    }
}

#[test]
fn single_and_sharded_folders_load_identical_tensors() {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let preset = preset_checkpoint("tiny", 5, dtype).unwrap();
        let mut loaded = Vec::new();
        for shards in [1, 3] {
            let dir = TempDir::new("roundtrip");
            write_preset_folder("tiny", dir.path(), 5, dtype, shards).unwrap();
            let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
            assert_eq!(cfg, preset_config("tiny").unwrap());
            let ck = Checkpoint::open(dir.path(), &cfg).unwrap();
            assert_eq!(ck.dtype(), dtype);
            assert_eq!(ck.files().len(), shards);
            assert!(ck.ignored().is_empty(), "{:?}", ck.ignored());
            if shards > 1 {
                assert!(dir.path().join("model.safetensors.index.json").exists());
                assert!(dir.path().join("model-00002-of-00003.safetensors").exists());
                assert!(!dir.path().join("model.safetensors").exists());
            }
            let all: Vec<(String, Vec<f32>)> = expected_tensors(&cfg)
                .into_iter()
                .map(|(n, shape)| {
                    let t = ck.get(&n).unwrap();
                    assert_eq!(t.shape(), shape.as_slice(), "{n}");
                    assert!(matches!(
                        t,
                        llada::hf::checkpoint::WeightSource::Mapped { .. }
                    ));
                    let v = ck.read_f32(&n).unwrap();
                    // Preset values are already representable in `dtype`: storing is exact.
                    assert_eq!(v, preset.read_f32(&n).unwrap(), "{n} ({dtype})");
                    (n, v)
                })
                .collect();
            loaded.push(all);
        }
        assert_eq!(loaded[0], loaded[1]);
    }
}

#[test]
fn writer_layout_matches_the_safetensors_format() {
    // Checked by hand against the format, independent of the reader: u64 LE header length,
    // JSON header padded to 8 bytes, little-endian data in order.
    let dir = TempDir::new("layout");
    let p = dir.path().join("x.safetensors");
    write_safetensors(
        &p,
        &[
            ("a".into(), DType::BF16, vec![2], vec![1.5, -2.0]),
            ("b".into(), DType::F32, vec![1], vec![0.1]),
        ],
    )
    .unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["a"]["dtype"], "BF16");
    assert_eq!(header["a"]["data_offsets"], serde_json::json!([0, 4]));
    assert_eq!(header["b"]["data_offsets"], serde_json::json!([4, 8]));
    // bf16(1.5) = 0x3FC0, bf16(-2.0) = 0xC000, f32(0.1) = 0x3DCCCCCD.
    assert_eq!(
        &bytes[8 + n..],
        &[0xC0, 0x3F, 0x00, 0xC0, 0xCD, 0xCC, 0xCC, 0x3D]
    );
}

#[test]
fn bf16_writer_rounds_to_nearest_even() {
    let dir = TempDir::new("round");
    let (cfg, mut t) = tiny_tensors(DType::BF16);
    // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even gives 1.0.
    // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even gives 1 + 2^-6.
    let ln_f = t.iter_mut().find(|x| x.0 == LN_F).unwrap();
    ln_f.3[0] = 1.0 + 1.0 / 256.0;
    ln_f.3[1] = 1.0 + 3.0 / 256.0;
    write_hf_folder(dir.path(), &cfg, &t, 1).unwrap();
    let ck = Checkpoint::open(dir.path(), &cfg).unwrap();
    let v = ck.read_f32(LN_F).unwrap();
    assert_eq!(v[0], 1.0);
    assert_eq!(v[1], 1.0 + 1.0 / 64.0);
}

#[test]
fn extra_tensors_are_ignored_and_listed() {
    let dir = TempDir::new("extra");
    let (cfg, mut t) = tiny_tensors(DType::BF16);
    t.push((
        "model.transformer.blocks.0.rotary_emb.inv_freq".into(),
        DType::F32,
        vec![8],
        vec![1.0; 8],
    ));
    write_hf_folder(dir.path(), &cfg, &t, 2).unwrap();
    let ck = Checkpoint::open(dir.path(), &cfg).unwrap();
    assert_eq!(
        ck.ignored(),
        ["model.transformer.blocks.0.rotary_emb.inv_freq"]
    );
    assert_eq!(ck.dtype(), DType::BF16);
}

#[test]
fn gqa_shapes_follow_n_kv_heads() {
    let mut cfg = preset_config("tiny").unwrap();
    cfg.n_kv_heads = 1;
    let shapes = expected_tensors(&cfg);
    let k = shapes
        .iter()
        .find(|(n, _)| *n == block_tensor(1, "k_proj"))
        .unwrap();
    assert_eq!(k.1, vec![64, 128]);
    let dir = TempDir::new("gqa");
    let text = cfg.to_json();
    let path = dir.path().join("config.json");
    std::fs::write(&path, &text).unwrap();
    assert_eq!(ModelConfig::from_file(&path).unwrap().n_kv_heads, 1);
    // A tiny-preset checkpoint (2 kv heads) does not fit this config.
    write_preset_folder("tiny", dir.path(), 1, DType::BF16, 1).unwrap();
    let e = format!("{:#}", Checkpoint::open(dir.path(), &cfg).unwrap_err());
    assert_has(
        &e,
        &[
            "model.transformer.blocks.0.k_proj.weight",
            "[128, 128]",
            "[64, 128]",
        ],
    );
}

#[test]
fn truncated_safetensors_is_reported_with_the_file() {
    let dir = TempDir::new("trunc");
    write_preset_folder("tiny", dir.path(), 1, DType::BF16, 1).unwrap();
    let p = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);
    let e = open_err(dir.path());
    assert_has(&e, &["model.safetensors", "truncated"]);

    // Cut inside the header: the header length no longer fits the file.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(20).unwrap();
    drop(f);
    let e = open_err(dir.path());
    assert_has(&e, &["model.safetensors", "header length", "truncated"]);

    // Not even the 8-byte length.
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    let e = open_err(dir.path());
    assert_has(&e, &["model.safetensors", "truncated"]);
}

#[test]
fn wrong_shape_names_tensor_and_file() {
    let dir = TempDir::new("shape");
    let (cfg, mut t) = tiny_tensors(DType::BF16);
    let q = block_tensor(1, "q_proj");
    let x = t.iter_mut().find(|x| x.0 == q).unwrap();
    x.2 = vec![32, 128];
    x.3.truncate(32 * 128);
    write_hf_folder(dir.path(), &cfg, &t, 1).unwrap();
    let e = open_err(dir.path());
    assert_has(&e, &[&q, "model.safetensors", "[32, 128]", "[128, 128]"]);
}

#[test]
fn missing_tensor_is_named() {
    for shards in [1, 2] {
        let dir = TempDir::new("missing");
        let (cfg, mut t) = tiny_tensors(DType::BF16);
        t.retain(|x| x.0 != LN_F);
        write_hf_folder(dir.path(), &cfg, &t, shards).unwrap();
        let e = open_err(dir.path());
        assert_has(&e, &["missing tensor", LN_F]);
        if shards == 2 {
            assert_has(&e, &["model.safetensors.index.json"]);
        } else {
            assert_has(&e, &["model.safetensors"]);
        }
    }
}

#[test]
fn unsupported_dtype_names_tensor_file_and_dtype() {
    let dir = TempDir::new("dtype");
    let (cfg, mut t) = tiny_tensors(DType::BF16);
    // Store wte as F32, then relabel it I32 in the header (same element size).
    let w = t.iter_mut().find(|x| x.0 == WTE).unwrap();
    w.1 = DType::F32;
    write_hf_folder(dir.path(), &cfg, &t, 1).unwrap();
    let p = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().to_string();
    assert_eq!(header.matches("\"F32\"").count(), 1);
    let patched = header.replace("\"F32\"", "\"I32\"");
    bytes[8..8 + n].copy_from_slice(patched.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = open_err(dir.path());
    assert_has(&e, &[WTE, "model.safetensors", "I32"]);
}

#[test]
fn data_offsets_out_of_range_are_reported() {
    let dir = TempDir::new("offsets");
    let p = dir.path().join("model.safetensors");
    let mut h = br#"{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#.to_vec();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(&[0u8; 8]); // only 8 of the 16 data bytes
    std::fs::write(&p, &bytes).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        preset_config("tiny").unwrap().to_json(),
    )
    .unwrap();
    let e = open_err(dir.path());
    assert_has(&e, &["model.safetensors", "`t`", "data_offsets"]);
}

#[test]
fn no_weights_in_folder() {
    let dir = TempDir::new("empty");
    std::fs::write(
        dir.path().join("config.json"),
        preset_config("tiny").unwrap().to_json(),
    )
    .unwrap();
    let e = open_err(dir.path());
    assert_has(&e, &["model.safetensors"]);
}

fn edit_index(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v["weight_map"].as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn shard_paths_may_not_leave_the_folder() {
    let outer = TempDir::new("escape");
    let dir = outer.path().join("model");
    write_preset_folder("tiny", &dir, 1, DType::BF16, 2).unwrap();
    // A copy of a real shard outside the model folder.
    std::fs::copy(
        dir.join("model-00001-of-00002.safetensors"),
        outer.path().join("outside.safetensors"),
    )
    .unwrap();
    for bad in [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/model-00001-of-00002.safetensors",
        "..",
    ] {
        edit_index(&dir, |m| {
            m.insert(WTE.into(), bad.into());
        });
        let e = open_err(&dir);
        assert_has(
            &e,
            &["not a plain file name", "model.safetensors.index.json"],
        );
    }
    // A symlink inside the folder that points outside it.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(
            outer.path().join("outside.safetensors"),
            dir.join("model-evil.safetensors"),
        )
        .unwrap();
        edit_index(&dir, |m| {
            m.insert(WTE.into(), "model-evil.safetensors".into());
        });
        let e = open_err(&dir);
        assert_has(&e, &["model-evil.safetensors", "leaves the model folder"]);
    }
}

#[test]
fn hub_cache_symlinks_into_blobs_are_allowed() {
    // transformers' cache: <repo>/snapshots/<rev>/file -> ../../blobs/<sha>.
    #[cfg(unix)]
    {
        let repo = TempDir::new("hub");
        let src = repo.path().join("src");
        write_preset_folder("tiny", &src, 2, DType::BF16, 1).unwrap();
        let blobs = repo.path().join("blobs");
        let snap = repo.path().join("snapshots").join("abc123");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::rename(src.join("model.safetensors"), blobs.join("deadbeef")).unwrap();
        std::os::unix::fs::symlink("../../blobs/deadbeef", snap.join("model.safetensors")).unwrap();
        std::fs::copy(src.join("config.json"), snap.join("config.json")).unwrap();
        let cfg = ModelConfig::from_file(&snap.join("config.json")).unwrap();
        let ck = Checkpoint::open(&snap, &cfg).unwrap();
        assert_eq!(ck.files().len(), 1);
    }
}

#[test]
fn index_entry_missing_from_its_shard() {
    let dir = TempDir::new("indexmiss");
    write_preset_folder("tiny", dir.path(), 1, DType::BF16, 2).unwrap();
    edit_index(dir.path(), |m| {
        m.insert(LN_F.into(), "model-00001-of-00002.safetensors".into());
    });
    // ln_f is in shard 2; the index now claims shard 1.
    let e = open_err(dir.path());
    assert_has(
        &e,
        &[LN_F, "model-00001-of-00002.safetensors", "does not contain"],
    );
}

#[test]
fn malformed_config_reports_line_and_column() {
    let text = "{\n  \"d_model\": 64,\n  \"n_heads\": 4\n  \"n_layers\": 2\n}\n";
    let e = format!(
        "{:#}",
        ModelConfig::from_json_str(text, "dir/config.json").unwrap_err()
    );
    assert_has(&e, &["dir/config.json", "line 4", "column"]);
}

fn tiny_json_with(field: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&preset_config("tiny").unwrap().to_json()).unwrap();
    if value.is_null() {
        v.as_object_mut().unwrap().remove(field);
    } else {
        v[field] = value;
    }
    v.to_string()
}

#[test]
fn unsupported_settings_name_field_value_and_file() {
    use serde_json::json;
    let cases = [
        ("block_type", json!("sequential"), "\"sequential\""),
        ("activation_type", json!("swiglu"), "\"swiglu\""),
        ("layer_norm_type", json!("default"), "\"default\""),
        ("weight_tying", json!(true), "true"),
        ("include_bias", json!(true), "true"),
        ("include_qkv_bias", json!(true), "true"),
        ("bias_for_layer_norm", json!(true), "true"),
        ("alibi", json!(true), "true"),
        ("rope", json!(false), "false"),
        ("attention_layer_norm", json!(true), "true"),
        ("input_emb_norm", json!(true), "true"),
        ("scale_logits", json!(true), "true"),
    ];
    for (field, value, shown) in cases {
        let e = format!(
            "{:#}",
            ModelConfig::from_json_str(&tiny_json_with(field, value), "m/config.json").unwrap_err()
        );
        assert_has(&e, &["m/config.json", field, shown, "unsupported"]);
    }
    // Absent switches take upstream's defaults, which this engine does not implement.
    let e = format!(
        "{:#}",
        ModelConfig::from_json_str(&tiny_json_with("block_type", serde_json::Value::Null), "c")
            .unwrap_err()
    );
    assert_has(&e, &["block_type", "sequential", "default"]);
}

#[test]
fn inconsistent_sizes_are_rejected() {
    use serde_json::json;
    let cases = [
        ("n_heads", json!(3), "multiple of `n_heads`"),
        ("n_kv_heads", json!(3), "`n_kv_heads` = 3 must divide"),
        ("d_model", json!(66), "must be even"), // 66 / 2 = 33
        ("mask_token_id", json!(512), "mask_token_id"),
        ("n_layers", json!(0), "`n_layers` must be > 0"),
        ("d_model", json!("wide"), "`d_model`"),
        ("rope_theta", json!(-1.0), "rope_theta"),
    ];
    for (field, value, want) in cases {
        let e = format!(
            "{:#}",
            ModelConfig::from_json_str(&tiny_json_with(field, value.clone()), "x/config.json")
                .unwrap_err()
        );
        assert_has(&e, &["x/config.json", want]);
    }
}

#[test]
fn llada_8b_config_parses_to_the_preset() {
    // The fields of reference §1.1, written out independently of `to_json`.
    let text = r#"{
      "activation_type": "silu", "alibi": false, "alibi_bias_max": 8.0,
      "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
      "attention_layer_norm": false, "attention_layer_norm_with_affine": true,
      "bias_for_layer_norm": false, "block_group_size": 1, "block_type": "llama",
      "d_model": 4096, "embedding_dropout": 0.0, "embedding_size": 126464,
      "eos_token_id": 126081, "flash_attention": false, "include_bias": false,
      "include_qkv_bias": false, "init_cutoff_factor": null, "init_device": "meta",
      "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": false,
      "layer_norm_type": "rms", "layer_norm_with_affine": true, "mask_token_id": 126336,
      "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4,
      "model_type": "llada", "multi_query_attention": null, "n_heads": 32, "n_kv_heads": 32,
      "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
      "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": true,
      "rope_full_precision": true, "rope_theta": 500000.0, "scale_logits": false,
      "transformers_version": "4.46.3", "use_cache": false, "vocab_size": 126464,
      "weight_tying": false
    }"#;
    let cfg = ModelConfig::from_json_str(text, "llada/config.json").unwrap();
    assert_eq!(cfg, preset_config("llada-8b").unwrap());
    assert_eq!(cfg.head_dim(), 128);
    // to_json reproduces every field of that file with the same values.
    let ours: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
    for (k, v) in theirs.as_object().unwrap() {
        assert_eq!(&ours[k], v, "field {k}");
    }
}

#[test]
fn llada_8b_preset_is_lazy() {
    let ck = preset_checkpoint("llada-8b", 0, DType::BF16).unwrap();
    let w = ck.get(WTE).unwrap();
    assert_eq!(w.shape(), [126464, 4096]);
    assert!(matches!(
        w,
        llada::hf::checkpoint::WeightSource::Random { .. }
    ));
    let mut row = vec![0.0; 4096];
    w.read_range(126336 * 4096, 126337 * 4096, &mut row);
    assert!(row.iter().all(|x| x.abs() <= 0.02 * 3f32.sqrt() + 1e-3));
    assert!(ck.get("model.transformer.nope").is_err());
}

/// Folders come from strangers: a FIFO where a JSON file should be would block a naive reader
/// forever, a symlink could read files outside the folder, a huge "config" could exhaust memory.
#[test]
fn hostile_metadata_files_are_refused_without_hanging() {
    use llada::engine::{ModelSpec, Opened};
    let open = |dir: &std::path::Path| -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.to_path_buf();
        std::thread::spawn(move || {
            let r = Opened::open(&ModelSpec::Dir(d))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(r) => r.expect_err("a hostile folder must not load"),
            Err(_) => panic!("loading {} hung", dir.display()),
        }
    };
    // config.json is a FIFO.
    let dir = TempDir::new("fifo");
    write_preset_folder("tiny", dir.path(), 1, DType::BF16, 1).unwrap();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(dir.path().join("config.json"))
        .status();
    if st.is_ok_and(|s| s.success()) {
        let e = open(dir.path());
        assert_has(&e, &["config.json", "not a regular file"]);
    } else {
        eprintln!("SKIP (fifo part): mkfifo unavailable");
    }
    // tokenizer.json is a symlink leaving the folder.
    let dir = TempDir::new("symlink-tok");
    write_preset_folder("tiny", dir.path(), 1, DType::BF16, 1).unwrap();
    let outside = TempDir::new("outside");
    std::fs::copy(
        dir.path().join("tokenizer.json"),
        outside.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let e = open(dir.path());
    assert_has(&e, &["tokenizer.json", "leaves the model folder"]);
    // A 17 MiB config.json (sparse: no disk used).
    let dir = TempDir::new("huge");
    write_preset_folder("tiny", dir.path(), 1, DType::BF16, 1).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("config.json"))
        .unwrap();
    f.set_len(17 << 20).unwrap();
    let e = open(dir.path());
    assert_has(&e, &["config.json", "bytes"]);
}
