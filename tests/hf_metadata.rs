//! The real `GSAI-ML/LLaDA-8B-Instruct` metadata files (tests/fixtures/llada-8b-instruct):
//! `config.json` parses to exactly the `llada-8b` preset, and the repository's own chat template
//! (from its `tokenizer_config.json`, including its 1e30 `model_max_length`) renders exactly like
//! the built-in fallback template and like Hugging Face's `apply_chat_template`.

mod common;

use std::path::PathBuf;

use llada::hf::config::ModelConfig;
use llada::hf::presets;
use llada::hf::tiny::write_tiny_tokenizer;
use llada::hf::tokenizer::Tokenizer;

fn fixture(name: &str) -> PathBuf {
    common::cli::fixture("llada-8b-instruct").join(name)
}

#[test]
fn real_config_is_the_8b_preset() {
    let cfg = ModelConfig::from_file(&fixture("config.json")).unwrap();
    assert_eq!(cfg, presets::preset_config("llada-8b").unwrap());
    assert_eq!(cfg.head_dim(), 128);
}

#[test]
fn real_chat_template_renders_like_hugging_face() {
    // The template only renders text; a tiny tokenizer.json stands in for the 126k-entry one.
    let dir = std::env::temp_dir().join(format!("llada-hf-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_tiny_tokenizer(&dir).unwrap();
    let cfg = presets::preset_config("tiny").unwrap();
    let real = Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&fixture("tokenizer_config.json")),
        &cfg,
    )
    .unwrap();
    assert!(!real.template_is_fallback());
    let fallback = Tokenizer::from_files(&dir.join("tokenizer.json"), None, &cfg).unwrap();
    assert!(fallback.template_is_fallback());

    let one = [("user", "  What is 2+2?\n")];
    let want_one =
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(real.apply_chat_template(&one).unwrap(), want_one);
    assert_eq!(fallback.apply_chat_template(&one).unwrap(), want_one);

    let two = [
        ("system", "Be brief."),
        ("user", "Hi"),
        ("assistant", " Hello! "),
        ("user", "Bye"),
    ];
    let want_two =
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
                    <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
                    <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
                    <|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(real.apply_chat_template(&two).unwrap(), want_two);
    assert_eq!(fallback.apply_chat_template(&two).unwrap(), want_two);
}
