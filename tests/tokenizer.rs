//! The tokenizer and the chat template: expected strings written from reference §3, id round
//! trips, template precedence, and hostile templates failing instead of hanging.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llada::hf::presets::preset_config;
use llada::hf::tiny::{write_tiny_tokenizer, TINY_VOCAB};
use llada::hf::tokenizer::Tokenizer;

use common::cli::TempDir;

/// The tokenizer of the folder `dir`, checked against the `tiny` preset.
fn load(dir: &Path) -> Tokenizer {
    Tokenizer::from_dir(dir, &preset_config("tiny").unwrap()).unwrap()
}

fn tiny(dir: &Path) -> Tokenizer {
    write_tiny_tokenizer(dir).unwrap();
    load(dir)
}

/// A temporary folder holding the tiny tokenizer files.
fn tiny_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    write_tiny_tokenizer(dir.path()).unwrap();
    dir
}

/// [`tiny_dir`] with tokenizer_config.json's `key` set to `value`, and its tokenizer.
fn tiny_with(tag: &str, key: &str, value: serde_json::Value) -> (TempDir, Tokenizer) {
    let dir = tiny_dir(tag);
    let t = set_config(dir.path(), key, value);
    (dir, t)
}

/// Rewrite tokenizer_config.json's `key` (null removes it) and load the folder again.
fn set_config(dir: &Path, key: &str, value: serde_json::Value) -> Tokenizer {
    let p = dir.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    if value.is_null() {
        v.as_object_mut().unwrap().remove(key);
    } else {
        v[key] = value;
    }
    std::fs::write(&p, v.to_string()).unwrap();
    load(dir)
}

const ASSISTANT_HEADER: &str = "<|start_header_id|>assistant<|end_header_id|>\n\n";

#[test]
fn chat_template_one_message() {
    let dir = TempDir::new("one");
    let t = tiny(dir.path());
    assert!(!t.template_is_fallback());
    let s = t
        .apply_chat_template(&[("user", "  Hello world \n")])
        .unwrap();
    // Reference §3: BOS, header, content|trim, eot, then always the assistant header.
    assert_eq!(
        s,
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHello world<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn chat_template_two_messages_has_one_bos() {
    let dir = TempDir::new("two");
    let t = tiny(dir.path());
    let msgs = [("system", "Be brief."), ("user", "What is 2+2?")];
    let s = t.apply_chat_template(&msgs).unwrap();
    assert_eq!(
        s,
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    assert_eq!(s.matches("<|startoftext|>").count(), 1);
    assert!(s.ends_with(ASSISTANT_HEADER));

    let ids = t.encode_chat(&msgs).unwrap();
    let v = TINY_VOCAB;
    assert_eq!(ids[0], v.bos);
    assert_eq!(ids.iter().filter(|&&i| i == v.bos).count(), 1);
    assert_eq!(ids.iter().filter(|&&i| i == v.eot).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == v.start_header).count(), 3);
    // "...<|start_header_id|>assistant<|end_header_id|>\n\n": the merge table builds
    // "assistant" as one token; "\n" is GPT-2 byte token 198 (as in LLaDA's vocabulary).
    let assistant = t.token_to_id("assistant").unwrap();
    assert_eq!(
        &ids[ids.len() - 5..],
        &[v.start_header, assistant, v.end_header, 198, 198]
    );
    assert_eq!(t.decode(&ids, false).unwrap(), s);
}

#[test]
fn special_ids_come_from_config_and_vocab() {
    let dir = TempDir::new("ids");
    let t = tiny(dir.path());
    let cfg = preset_config("tiny").unwrap();
    assert_eq!(t.special.mask, cfg.mask_token_id);
    assert_eq!(t.special.eos, cfg.eos_token_id);
    assert_eq!(t.special.pad, cfg.pad_token_id);
    assert_eq!(t.special.eot, t.token_to_id("<|eot_id|>"));
    assert_eq!(t.special.bos, t.token_to_id("<|startoftext|>"));
    assert_eq!(t.token_to_id("<|mdm_mask|>"), Some(cfg.mask_token_id));
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(cfg.eos_token_id));
    assert!(t.vocab_size() <= cfg.vocab_size);
}

#[test]
fn ids_round_trip() {
    let dir = TempDir::new("rt");
    let t = tiny(dir.path());
    for text in [
        "the user is the assistant",
        "héllo wörld, 世界 🙂\n\ttabs  and  spaces ",
        "<|startoftext|>a<|mdm_mask|><|mdm_mask|>b<|endoftext|>",
        "",
    ] {
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text, "{ids:?}");
        // The post-processor adds nothing (as LLaDA-Instruct's: no second BOS).
        assert_eq!(t.encode(text, true).unwrap(), ids);
    }
    // Merges apply; bytes outside the merges stay single byte tokens ('!' = 0 in GPT-2 order).
    let the = t.token_to_id("Ġthe").unwrap();
    assert!(the >= 256);
    assert_eq!(t.encode(" the!", false).unwrap(), vec![the, 0]);
    // Special tokens in the text are single ids; skip_special_tokens drops them.
    let ids = t.encode("a<|mdm_mask|>b", false).unwrap();
    assert!(ids.contains(&TINY_VOCAB.mask));
    assert_eq!(t.decode(&ids, true).unwrap(), "ab");
    // Embedding padding rows (ids past the vocabulary) are skipped, not an error.
    assert_eq!(t.decode(&[511], false).unwrap(), "");
}

#[test]
fn template_from_tokenizer_config_wins_over_fallback() {
    let tpl = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}";
    let (dir, t) = tiny_with("custom", "chat_template", tpl.into());
    assert!(!t.template_is_fallback());
    assert_eq!(
        t.apply_chat_template(&[("user", "hi")]).unwrap(),
        "[user:hi]"
    );

    // chat_template.jinja wins over tokenizer_config.json, as in transformers.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "J{{ messages|length }}",
    )
    .unwrap();
    let t = load(dir.path());
    assert_eq!(t.apply_chat_template(&[("user", "hi")]).unwrap(), "J1");
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();

    // No template at all: the built-in LLaDA-Instruct one.
    let t = set_config(dir.path(), "chat_template", serde_json::Value::Null);
    assert!(t.template_is_fallback());
    assert_eq!(
        t.apply_chat_template(&[("user", "hi")]).unwrap(),
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );

    // No tokenizer_config.json either: BOS falls back to <|startoftext|> from the vocabulary.
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let t = load(dir.path());
    assert_eq!(t.encode_chat(&[("user", "hi")]).unwrap()[0], TINY_VOCAB.bos);
}

#[test]
fn special_tokens_as_content_objects() {
    let bos = serde_json::json!({"content": "<|endoftext|>", "lstrip": false});
    let (_dir, t) = tiny_with("objs", "bos_token", bos);
    assert_eq!(t.special.bos, Some(TINY_VOCAB.eos));
    assert!(t
        .apply_chat_template(&[("user", "x")])
        .unwrap()
        .starts_with("<|endoftext|><|start_header_id|>"));
}

#[test]
fn hf_environment_features() {
    let dir = tiny_dir("env");
    let render = |tpl: &str| {
        set_config(dir.path(), "chat_template", tpl.into())
            .apply_chat_template(&[("user", "  Hi  ")])
    };
    // trim_blocks + lstrip_blocks: block tags leave no newline / indentation behind.
    assert_eq!(
        render("{% for m in messages %}\n    {% if true %}\n{{ m['role'] }}\n    {% endif %}\n{% endfor %}")
            .unwrap(),
        "user\n"
    );
    // Python methods and loop controls.
    assert_eq!(
        render("{% for m in messages %}{{ m['content'].strip() }}|{{ m.content.startswith('  H') }}{% break %}{% endfor %}")
            .unwrap(),
        "Hi|True"
    );
    // tojson writes like Python's json.dumps (", " and ": " separators, no HTML escaping).
    assert_eq!(
        render("{{ [1, 'a<b', {'k': none}] | tojson }}").unwrap(),
        "[1, \"a<b\", {\"k\": null}]"
    );
    // add_generation_prompt is true (rendered the Python way, as Jinja2 does).
    assert_eq!(render("{{ add_generation_prompt }}").unwrap(), "True");
    // raise_exception surfaces its message.
    let e = format!(
        "{:#}",
        render("{{ raise_exception('roles must alternate') }}").unwrap_err()
    );
    assert!(e.contains("roles must alternate"), "{e}");
    // No file system: include has nothing to load.
    assert!(render("{% include '/etc/passwd' %}").is_err());
}

#[test]
fn hostile_templates_fail_instead_of_hanging() {
    let dir = tiny_dir("hostile");
    for tpl in [
        // 10^10 iterations: only the fuel limit stops it.
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        // Unbounded recursion.
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ] {
        let t = set_config(dir.path(), "chat_template", tpl.into());
        let start = Instant::now();
        let e = format!("{:#}", t.apply_chat_template(&[("user", "x")]).unwrap_err());
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "took {:?}",
            start.elapsed()
        );
        assert!(e.contains("chat template"), "{e}");
        assert!(e.contains("fuel") || e.contains("recursion"), "{e}");
    }
}

#[test]
fn bad_tokenizer_files_are_named() {
    let cfg = preset_config("tiny").unwrap();
    let dir = TempDir::new("bad");
    let e = format!("{:#}", Tokenizer::from_dir(dir.path(), &cfg).unwrap_err());
    assert!(e.contains("tokenizer.json"), "{e}");

    write_tiny_tokenizer(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        "{\n\"chat_template\": 1,,\n}",
    )
    .unwrap();
    let e = format!("{:#}", Tokenizer::from_dir(dir.path(), &cfg).unwrap_err());
    assert!(
        e.contains("tokenizer_config.json") && e.contains("line 2"),
        "{e}"
    );

    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = format!("{:#}", Tokenizer::from_dir(dir.path(), &cfg).unwrap_err());
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn tokenizer_must_agree_with_config() {
    let dir = tiny_dir("agree");
    let mut cfg = preset_config("tiny").unwrap();
    cfg.mask_token_id = 7;
    let e = format!("{:#}", Tokenizer::from_dir(dir.path(), &cfg).unwrap_err());
    assert!(
        e.contains("<|mdm_mask|>") && e.contains("mask_token_id = 7"),
        "{e}"
    );

    let mut cfg = preset_config("tiny").unwrap();
    cfg.embedding_size = 300;
    cfg.vocab_size = 300;
    cfg.mask_token_id = 0;
    cfg.eos_token_id = 0;
    cfg.pad_token_id = 0;
    let e = format!("{:#}", Tokenizer::from_dir(dir.path(), &cfg).unwrap_err());
    assert!(e.contains("embedding_size = 300"), "{e}");
}

/// Reference §3's test vector, which needs the real LLaDA-8B-Instruct tokenizer.json
/// (sha256 071eb20f…). Point `LLADA_TOKENIZER_JSON` at it to run; its folder's
/// tokenizer_config.json is used when present, the built-in template otherwise.
#[test]
fn llada_instruct_test_vector() {
    let Some(path) = std::env::var_os("LLADA_TOKENIZER_JSON") else {
        eprintln!("skipped: set LLADA_TOKENIZER_JSON to LLaDA-8B-Instruct's tokenizer.json");
        return;
    };
    let path = PathBuf::from(path);
    let conf = path.with_file_name("tokenizer_config.json");
    let cfg = preset_config("llada-8b").unwrap();
    let t = Tokenizer::from_files(&path, conf.exists().then_some(conf.as_path()), &cfg).unwrap();
    let prompt = "Lily can run 12 kilometers per hour for 4 hours. After that, she runs 6 \
                  kilometers per hour. How many kilometers can she run in 8 hours?";
    let expected: Vec<u32> = vec![
        126080, 126346, 3840, 126347, 198, 198, 86059, 560, 2001, 220, 16, 17, 44137, 854, 6984,
        352, 220, 19, 3871, 13, 4474, 378, 11, 1285, 9660, 220, 21, 44137, 854, 6984, 13, 2071,
        1494, 44137, 560, 1285, 2001, 296, 220, 23, 3871, 30, 126348, 126346, 598, 10450, 126347,
        198, 198,
    ];
    assert_eq!(t.encode_chat(&[("user", prompt)]).unwrap(), expected);
    // The HF scripts tokenize the rendered text with add_special_tokens=True: still one BOS.
    let text = t.apply_chat_template(&[("user", prompt)]).unwrap();
    assert_eq!(t.encode(&text, true).unwrap(), expected);
    assert_eq!(t.special.bos, Some(126080));
    assert_eq!(t.special.eot, Some(126348));
    assert_eq!(t.special.mask, 126336);
    assert_eq!(t.vocab_size(), 126349);
}

#[test]
fn llama3_style_template_syntax_renders_like_the_fallback() {
    // The Llama-3-style form chat templates of this family are written in (`set` inside the
    // loop, `+` concatenation, `loop.index0`); it must render the same text as the built-in one.
    let dir = tiny_dir("l3");
    let tpl = "{% set loop_messages = messages %}{% for message in loop_messages %}\
        {% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + \
        message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}\
        {% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
        {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}";
    let fallback = {
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        load(dir.path())
    };
    assert!(fallback.template_is_fallback());
    write_tiny_tokenizer(dir.path()).unwrap();
    let custom = set_config(dir.path(), "chat_template", tpl.into());
    for msgs in [
        vec![("user", " a ")],
        vec![
            ("system", "s"),
            ("user", "u\n"),
            ("assistant", "x"),
            ("user", "y"),
        ],
    ] {
        assert_eq!(
            custom.apply_chat_template(&msgs).unwrap(),
            fallback.apply_chat_template(&msgs).unwrap()
        );
    }
}
