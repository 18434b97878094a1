//! A LoRA SFT run on real English text lowers the held-out loss: the tiny preset (random
//! frozen base, its byte-level BPE tokenizer), a rank-8 adapter on every linear and the LM head,
//! trained with the trainer's step (`llada train --lora-rank`'s [`LoraStep`]) on the first 80 %
//! of a text shipped with the machine, evaluated on the last 20 %.

use std::path::{Path, PathBuf};

use llada::hf::tokenizer::Tokenizer;
use llada::lora::train::{init_adapter, LoraGrads};
use llada::lora::Adapter;
use llada::train::data::Sample;
use llada::train::lora::{lora_forward_backward, LoraStep};
use llada::train::loss::{sft_batch, Draw};
use llada::train::model::Params;
use llada::train::optim::AdamWConfig;
use llada::train::{TrainOptions, Trainer};

mod common;

use common::cli::{tiny, TempDir};

/// Debian's GPL-3 text (package base-files: on every Debian machine, CI's included), else this
/// repository's README: real text either way, nothing downloaded.
fn text() -> (PathBuf, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let p = [PathBuf::from("/usr/share/common-licenses/GPL-3"), repo]
        .into_iter()
        .find(|p| p.is_file())
        .expect("the repository's README.md");
    let s = std::fs::read_to_string(&p).unwrap();
    (p, s)
}

const T: usize = 64;
/// Tokens of context each sample keeps unmasked (its SFT prompt); the other 48 are the answer.
const PROMPT: usize = 16;

/// Non-overlapping `T`-token windows of `ids`, each `PROMPT` tokens of prompt then answer (no
/// padding, so every answer token is text).
fn windows(ids: &[u32]) -> Vec<Sample> {
    ids.chunks_exact(T)
        .map(|w| Sample {
            ids: w.to_vec(),
            prompt_len: PROMPT,
        })
        .collect()
}

/// Mean SFT loss of `held` under the adapter, over 4 fixed mask draws (seeds 900..904).
fn held_out_loss(
    cfg: &llada::hf::config::ModelConfig,
    p: &Params<f32>,
    ad: &Adapter,
    held: &[Sample],
) -> f64 {
    let clean: Vec<u32> = held.iter().flat_map(|s| s.ids.clone()).collect();
    let prompts: Vec<usize> = held.iter().map(|s| s.prompt_len).collect();
    let mut total = 0.0;
    for seed in 900..904 {
        let b = sft_batch(
            &clean,
            &prompts,
            held.len(),
            T,
            Draw::new(cfg.mask_token_id, seed, 0, 1.0),
        );
        let mut g = LoraGrads::zeros_like(ad);
        total += lora_forward_backward(cfg, p, ad, &b.unwrap(), &mut g).unwrap();
    }
    total / 4.0
}

#[test]
fn lora_sft_on_real_text_lowers_the_held_out_loss() {
    let (path, text) = text();
    let dir = TempDir::new("lora-sft-text");
    let m = tiny(dir.path());
    let opened = llada::engine::Opened::open(&llada::engine::ModelSpec::Dir(m.clone())).unwrap();
    let cfg = opened.cfg.clone();
    let params = Params::<f32>::from_checkpoint(&cfg, &opened.ckpt).unwrap();
    let tok = Tokenizer::from_dir(&m, &cfg).unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let cut = ids.len() * 4 / 5;
    let (train, held) = (windows(&ids[..cut]), windows(&ids[cut..]));
    assert!(train.len() >= 40 && held.len() >= 8, "{} tokens", ids.len());
    let held = &held[..held.len().min(24)];

    let targets: Vec<String> = [
        "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out",
    ]
    .map(String::from)
    .to_vec();
    let ad = init_adapter(&cfg, &targets, 8, 16.0, false, 0).unwrap();
    let before = held_out_loss(&cfg, &params, &ad, held);
    let opts = TrainOptions {
        steps: 80,
        batch_size: 4,
        accum: 1,
        seq_len: T,
        lr: 3e-3,
        warmup: 8,
        schedule: "wsd".into(),
        weight_decay: 0.0,
        clip: 1.0,
        seed: 1,
        sft: true,
        truncate: false,
        world: 1,
    };
    let n_train = train.len();
    let mut st = LoraStep::new(params, ad, AdamWConfig::default());
    let mut t = Trainer::new(cfg.clone(), Params::default(), opts, train).unwrap();
    let mut first = Vec::new();
    let mut last = Vec::new();
    while t.step < t.opts.steps {
        let s = t.train_step_on(&mut st).unwrap();
        assert!(s.loss.is_finite(), "step {}: loss {}", s.step, s.loss);
        if s.step <= 10 {
            first.push(s.loss);
        } else if s.step > 70 {
            last.push(s.loss);
        }
    }
    let after = held_out_loss(&cfg, &st.params, &st.adapter, held);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "LoRA SFT on {} ({} tokens; {n_train} training windows, {} held out): train loss \
         {:.3} (steps 1-10) → {:.3} (71-80); held-out loss {before:.3} → {after:.3}",
        path.display(),
        ids.len(),
        held.len(),
        mean(&first),
        mean(&last)
    );
    // `!(a < b)`-style: NaN fails. A random base predicts about uniformly over 512 rows
    // (ln 512 = 6.24); the adapter must take a real bite out of that on text it never saw.
    assert!(before.is_finite() && after.is_finite());
    assert!(
        after < before - 0.5,
        "held-out loss {before:.3} → {after:.3}: did not fall by 0.5 nats"
    );
}
