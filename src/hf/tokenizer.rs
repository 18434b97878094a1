//! `tokenizer.json` and the chat template.
//!
//! [`Tokenizer`] wraps a Hugging Face `tokenizer.json` (read with the `tokenizers` crate) and the
//! chat template of `tokenizer_config.json` (or `chat_template.jinja`), rendered with minijinja
//! in the environment `transformers` uses: `trim_blocks` and `lstrip_blocks` on, `loopcontrols`,
//! `raise_exception(msg)`, a `tojson` that writes like Python's `json.dumps(ensure_ascii=False)`,
//! and the variables `messages`, `bos_token`, `eos_token`, `pad_token`, `add_generation_prompt`.
//! The environment is a sandbox: no loader, so no `include`/`import`/`extends`, no file system;
//! a render is limited by fuel ([`TEMPLATE_FUEL`] instructions) and recursion depth, its source by
//! size and nesting ([`check_template_source`]), and on Linux it runs in a forked child under a
//! memory budget ([`TEMPLATE_MEMORY_BUDGET`]), a timeout and an output limit, so a hostile
//! template (a memory bomb, a stack bomb, an endless loop) fails with an error instead of
//! taking the process down or hanging. A few Python string/dict methods that HF templates call
//! (`strip`, `startswith`, `items`, ...) are provided.
//!
//! When no template is given, LLaDA-8B-Instruct's template ([`LLADA_INSTRUCT_TEMPLATE`],
//! reference §3) is used. Special ids come from the config (mask, eos, pad) and the vocabulary
//! (`<|eot_id|>`, the BOS string): nothing is hard-coded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind, State};
use serde_json::Value;

use crate::hf::checkpoint::{
    read_text_file, resolve_in_folder, MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES,
};
use crate::hf::config::ModelConfig;

/// LLaDA-8B-Instruct's chat template (reference §3), written for this engine: BOS before the
/// first message, each message as `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT|trim<|eot_id|>`,
/// and always the assistant header at the end (upstream ignores `add_generation_prompt`).
pub const LLADA_INSTRUCT_TEMPLATE: &str = "{% for message in messages %}\
{% if loop.first %}{{ bos_token }}{% endif %}\
{{ '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ (message['content'] | trim) ~ '<|eot_id|>' }}\
{% endfor %}\
{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}";

/// Instructions one template render may execute. The LLaDA template spends a few dozen per
/// message, so this allows conversations of tens of thousands of turns while stopping an
/// endless template after a fraction of a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Nesting depth allowed to a template (macros calling macros, nested blocks).
pub const TEMPLATE_RECURSION_LIMIT: usize = 100;

/// Special token ids the sampler and the CLI need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    /// `mask_token_id` of config.json (`<|mdm_mask|>`).
    pub mask: u32,
    /// `eos_token_id` of config.json (`<|endoftext|>`).
    pub eos: u32,
    /// `pad_token_id` of config.json.
    pub pad: u32,
    /// `<|eot_id|>`, when the vocabulary has it.
    pub eot: Option<u32>,
    /// The id of the BOS string, when there is one.
    pub bos: Option<u32>,
}

/// A tokenizer with its chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: String,
    template_is_fallback: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    /// Special ids (from the config and the vocabulary).
    pub special: SpecialIds,
    source: PathBuf,
    /// The file the chat template came from (`None`: the built-in one).
    template_source: Option<PathBuf>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("special", &self.special)
            .field("template_is_fallback", &self.template_is_fallback)
            .finish_non_exhaustive()
    }
}

/// A special-token field of tokenizer_config.json: a string, `{"content": ...}`, or null.
fn token_field(v: Option<&Value>, key: &str, file: &Path) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("{}: `{key}` object has no string `content`", file.display()),
        },
        Some(other) => bail!("{}: `{key}` = {other} is not a token", file.display()),
    }
}

/// What tokenizer_config.json contributes.
#[derive(Default)]
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
}

fn read_tokenizer_config(path: &Path) -> Result<TokenizerConfig> {
    let text = read_text_file(path, MAX_CONFIG_BYTES)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: malformed JSON: {e}", path.display()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
    let chat_template = match obj.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        // Newer transformers: a list of {"name", "template"}; use "default", else the first.
        Some(Value::Array(list)) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first());
            match pick.and_then(|t| t.get("template")).and_then(Value::as_str) {
                Some(s) => Some(s.to_string()),
                None => bail!(
                    "{}: `chat_template` list has no entry with a string `template`",
                    path.display()
                ),
            }
        }
        Some(other) => bail!(
            "{}: `chat_template` = {other} is neither a string nor a list",
            path.display()
        ),
    };
    Ok(TokenizerConfig {
        chat_template,
        bos_token: token_field(obj.get("bos_token"), "bos_token", path)?,
        eos_token: token_field(obj.get("eos_token"), "eos_token", path)?,
        pad_token: token_field(obj.get("pad_token"), "pad_token", path)?,
    })
}

impl Tokenizer {
    /// Load `tokenizer.json` from a model folder, plus `tokenizer_config.json` and
    /// `chat_template.jinja` when present (the latter wins, as in `transformers`).
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Tokenizer> {
        // Every file must stay inside the folder (symlinks included): folders come from strangers.
        let json = resolve_in_folder(dir, "tokenizer.json", dir)?;
        let conf = dir.join("tokenizer_config.json");
        let conf = match conf.exists() {
            true => Some(resolve_in_folder(dir, "tokenizer_config.json", dir)?),
            false => None,
        };
        let mut t = Self::from_files(&json, conf.as_deref(), cfg)?;
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let jinja = resolve_in_folder(dir, "chat_template.jinja", dir)?;
            t.chat_template = read_text_file(&jinja, MAX_CONFIG_BYTES)?;
            t.template_is_fallback = false;
            t.template_source = Some(jinja);
        }
        Ok(t)
    }

    /// Load a `tokenizer.json` and an optional `tokenizer_config.json`.
    ///
    /// Without a `bos_token` in the config, `<|startoftext|>` is used when the vocabulary has it
    /// (LLaDA's BOS). Errors when the vocabulary has ids outside the model's embedding, or when
    /// it has `<|mdm_mask|>` at an id other than the config's `mask_token_id`.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        cfg: &ModelConfig,
    ) -> Result<Tokenizer> {
        let file = tokenizer_json.display();
        let text = read_text_file(tokenizer_json, MAX_TOKENIZER_BYTES)
            .with_context(|| format!("cannot read {file}"))?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| anyhow!("{file}: not a valid tokenizer.json: {e}"))?;
        let tc = match tokenizer_config {
            Some(p) => read_tokenizer_config(p)?,
            None => TokenizerConfig::default(),
        };

        let vocab = inner.get_vocab(true);
        if let Some((tok, &max)) = vocab.iter().max_by_key(|(_, &id)| id) {
            if max as usize >= cfg.embedding_size {
                bail!(
                    "{file}: token {tok:?} has id {max}, outside the model's embedding \
                     (embedding_size = {} in config.json)",
                    cfg.embedding_size
                );
            }
        }
        if let Some(&m) = vocab.get("<|mdm_mask|>") {
            if m != cfg.mask_token_id {
                bail!(
                    "{file}: `<|mdm_mask|>` has id {m} but config.json says mask_token_id = {}",
                    cfg.mask_token_id
                );
            }
        }
        let bos_token = tc.bos_token.or_else(|| {
            vocab
                .contains_key("<|startoftext|>")
                .then(|| "<|startoftext|>".into())
        });
        let special = SpecialIds {
            mask: cfg.mask_token_id,
            eos: cfg.eos_token_id,
            pad: cfg.pad_token_id,
            eot: vocab.get("<|eot_id|>").copied(),
            bos: bos_token.as_ref().and_then(|b| vocab.get(b).copied()),
        };
        let (chat_template, template_is_fallback, template_source) = match tc.chat_template {
            Some(t) => (t, false, tokenizer_config.map(Path::to_path_buf)),
            None => (LLADA_INSTRUCT_TEMPLATE.to_string(), true, None),
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            template_is_fallback,
            bos_token,
            eos_token: tc.eos_token,
            pad_token: tc.pad_token,
            special,
            source: tokenizer_json.to_path_buf(),
            template_source,
        })
    }

    /// Token ids of `text`. `add_special_tokens` runs the tokenizer's post-processor (which may
    /// add BOS/EOS, depending on tokenizer.json); special tokens written in the text are always
    /// recognised, as in `transformers`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("{}: cannot encode text: {e}", self.source.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; ids the vocabulary does not know (the embedding's padding rows) are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("{}: cannot decode ids: {e}", self.source.display()))
    }

    /// The id of a token string, if the vocabulary (added tokens included) has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template in use.
    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    /// Whether [`LLADA_INSTRUCT_TEMPLATE`] is used because the folder had no template.
    pub fn template_is_fallback(&self) -> bool {
        self.template_is_fallback
    }

    /// Render the chat template over `(role, content)` messages with
    /// `add_generation_prompt = true`, as `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template<R: AsRef<str>, C: AsRef<str>>(
        &self,
        messages: &[(R, C)],
    ) -> Result<String> {
        let msgs: Vec<BTreeMap<&str, &str>> = messages
            .iter()
            .map(|(r, c)| BTreeMap::from([("role", r.as_ref()), ("content", c.as_ref())]))
            .collect();
        let mut ctx: BTreeMap<&str, JValue> = BTreeMap::new();
        ctx.insert("messages", JValue::from_serialize(&msgs));
        ctx.insert("add_generation_prompt", JValue::from(true));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = v {
                ctx.insert(k, JValue::from(v.as_str()));
            }
        }
        render_chat_template(&self.chat_template, &ctx).map_err(|e| {
            let what = if self.template_is_fallback {
                "the built-in LLaDA-Instruct chat template".to_string()
            } else {
                let file = self.template_source.as_deref().unwrap_or(&self.source);
                format!("the chat template of {}", file.display())
            };
            anyhow!("cannot render {what}: {e:#}")
        })
    }

    /// Render the chat template and tokenize the text with `add_special_tokens = false`, as
    /// `apply_chat_template(..., tokenize=True)` does: the template carries the one BOS.
    pub fn encode_chat<R: AsRef<str>, C: AsRef<str>>(
        &self,
        messages: &[(R, C)],
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages)?;
        self.encode(&text, false)
    }
}

/// Render `template` with `ctx` in the sandboxed HF-style environment, within every bound of
/// the module documentation: source size and nesting ([`check_template_source`]), fuel,
/// recursion, and (on Linux) memory, time and output size ([`render_bounded`]).
pub fn render_chat_template<S: serde::Serialize>(template: &str, ctx: &S) -> Result<String> {
    check_template_source(template)?;
    let ctx = JValue::from_serialize(ctx);
    render_bounded(template, &ctx)
}

/// Largest `tojson` indent accepted (templates use 2 or 4).
pub const TOJSON_MAX_INDENT: usize = 64;

/// Largest chat template accepted (real ones are a few KiB; the longest on the Hub ~30 KiB).
pub const TEMPLATE_MAX_BYTES: usize = 1 << 20;
/// Deepest nesting of brackets inside one tag, and of blocks (`if`, `for`, `macro`, ...).
pub const TEMPLATE_MAX_NESTING: usize = 64;
/// Most operators in one `{{ }}` or `{% %}` tag: minijinja parses and compiles an operator
/// chain recursively, so 30 000 `+ 1` terms would overflow the stack.
pub const TEMPLATE_MAX_OPERATORS: usize = 1000;
/// Memory a render may take beyond what the process already uses (Linux: an address-space
/// limit on the rendering child process).
pub const TEMPLATE_MEMORY_BUDGET: u64 = 256 << 20;
/// Longest rendered text.
pub const TEMPLATE_MAX_OUTPUT: usize = 16 << 20;
/// Wall-clock time a render may take.
pub const TEMPLATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Check the template's source before minijinja parses it: its size, and in every tag the
/// nesting of brackets and the number of operators; and the nesting of blocks. What it
/// refuses, no chat template on the Hub comes near.
pub fn check_template_source(template: &str) -> Result<()> {
    if template.len() > TEMPLATE_MAX_BYTES {
        bail!(
            "the template has {} bytes, more than the {TEMPLATE_MAX_BYTES} accepted",
            template.len()
        );
    }
    let b = template.as_bytes();
    let mut i = 0;
    let mut blocks = 0usize;
    while i + 1 < b.len() {
        let close: &[u8] = match (b[i], b[i + 1]) {
            (b'{', b'{') => b"}}",
            (b'{', b'%') => b"%}",
            (b'{', b'#') => {
                // A comment: skip to its end.
                match template[i + 2..].find("#}") {
                    Some(k) => i += 2 + k + 2,
                    None => break,
                }
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        let start = i + 2;
        let (mut j, mut depth, mut ops) = (start, 0usize, 0usize);
        let mut quote: Option<u8> = None;
        let mut words = String::new();
        while j < b.len() {
            let c = b[j];
            if let Some(q) = quote {
                if c == b'\\' {
                    j += 2;
                    continue;
                }
                if c == q {
                    quote = None;
                }
                j += 1;
                continue;
            }
            if depth == 0 && b[j..].starts_with(close) {
                break;
            }
            match c {
                b'\'' | b'"' => quote = Some(c),
                b'(' | b'[' | b'{' => {
                    depth += 1;
                    ops += 1;
                    if depth > TEMPLATE_MAX_NESTING {
                        bail!(
                            "brackets nested deeper than {TEMPLATE_MAX_NESTING} in the tag at byte {i}"
                        );
                    }
                }
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                b'+' | b'-' | b'*' | b'/' | b'%' | b'~' | b'|' | b'.' | b',' | b'<' | b'>'
                | b'=' | b'!' => ops += 1,
                _ => {}
            }
            if words.len() < 16 {
                words.push(c as char);
            }
            if ops > TEMPLATE_MAX_OPERATORS {
                bail!(
                    "the tag at byte {i} has more than {TEMPLATE_MAX_OPERATORS} operators \
                     (an expression that long would exhaust the parser's stack)"
                );
            }
            j += 1;
        }
        if close == b"%}" {
            let kw = words
                .trim_start_matches(['-', '+'])
                .split_whitespace()
                .next()
                .unwrap_or("");
            match kw {
                "if" | "for" | "macro" | "call" | "filter" | "with" | "block" => {
                    blocks += 1;
                    if blocks > TEMPLATE_MAX_NESTING {
                        bail!("blocks nested deeper than {TEMPLATE_MAX_NESTING} at byte {i}");
                    }
                }
                "endif" | "endfor" | "endmacro" | "endcall" | "endfilter" | "endwith"
                | "endblock" => blocks = blocks.saturating_sub(1),
                _ => {}
            }
        }
        i = j + 2;
    }
    Ok(())
}

/// Render in a child process (Linux): `fork`, then in the child an address-space limit of the
/// current size plus [`TEMPLATE_MEMORY_BUDGET`], stderr to `/dev/null`, the render, and the
/// result back through a pipe. Whatever a template does (doubling strings with `~`,
/// `.replace('', s)`, materialising `[0] * 10**8`, `tojson(indent=3e9)`, deep recursion), the
/// child runs out of its budget, its stack or [`TEMPLATE_TIMEOUT`] and ends; the parent reports
/// an error and is untouched. The child only runs minijinja and this module's code on the
/// forking thread's copy of memory (no locks of other threads are taken: its output goes
/// through `libc::write`), and leaves with `_exit`. If `fork` itself fails (a system that
/// refuses to duplicate a large process), the render runs in-process, bounded by the source
/// checks and the fuel only.
#[cfg(target_os = "linux")]
fn render_bounded(template: &str, ctx: &JValue) -> Result<String> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors that we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("cannot create a pipe: {}", std::io::Error::last_os_error());
    }
    let (rd, wr) = (fds[0], fds[1]);
    let budget = vm_size_bytes().saturating_add(TEMPLATE_MEMORY_BUDGET);
    // SAFETY: the child only calls async-signal-safe libc functions, the allocator (glibc's
    // malloc is fork-safe) and minijinja on this thread's data, then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        // SAFETY: closing our own descriptors.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
        // No child (e.g. strict overcommit refusing to duplicate a large process): render
        // here, with the source checks and the fuel but without the memory budget.
        return render_in_env(template, ctx).map_err(|e| anyhow!(e));
    }
    if pid == 0 {
        // The child.
        unsafe {
            libc::close(rd);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, 2);
            }
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_AS, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_cur.min(budget as libc::rlim_t);
                libc::setrlimit(libc::RLIMIT_AS, &lim);
            }
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            render_in_env(template, ctx)
        }));
        let (tag, body) = match res {
            Ok(Ok(s)) if s.len() > TEMPLATE_MAX_OUTPUT => (
                1u8,
                format!(
                    "the rendered text has {} bytes, more than the {TEMPLATE_MAX_OUTPUT} accepted",
                    s.len()
                ),
            ),
            Ok(Ok(s)) => (0u8, s),
            Ok(Err(e)) => (1u8, e),
            Err(_) => (1u8, "the template engine panicked".to_string()),
        };
        let mut off = 0;
        let mut msg = Vec::with_capacity(body.len() + 1);
        msg.push(tag);
        msg.extend_from_slice(body.as_bytes());
        while off < msg.len() {
            // SAFETY: writing our own buffer to our own descriptor.
            let n = unsafe { libc::write(wr, msg[off..].as_ptr().cast(), msg.len() - off) };
            if n <= 0 {
                break;
            }
            off += n as usize;
        }
        // SAFETY: leaving the child without running the parent's exit handlers.
        unsafe { libc::_exit(0) }
    }
    // The parent.
    // SAFETY: closing the child's end; `rd` becomes an owned File.
    unsafe { libc::close(wr) };
    let mut f = unsafe { std::fs::File::from_raw_fd(rd) };
    let deadline = std::time::Instant::now() + TEMPLATE_TIMEOUT;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd: rd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r == 0 {
            timed_out = true;
            break;
        }
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if out.len() + n <= TEMPLATE_MAX_OUTPUT + 4096 => {
                out.extend_from_slice(&buf[..n])
            }
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut status = 0;
    // SAFETY: signalling and reaping our own child.
    unsafe {
        if timed_out {
            libc::kill(pid, libc::SIGKILL);
        }
        while libc::waitpid(pid, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
    if timed_out {
        bail!(
            "the render took more than {} s (a template must render in well under a second)",
            TEMPLATE_TIMEOUT.as_secs()
        );
    }
    let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    match out.split_first() {
        Some((0, text)) if clean => String::from_utf8(text.to_vec())
            .map_err(|_| anyhow!("the template rendered invalid UTF-8")),
        Some((1, msg)) if clean => Err(anyhow!("{}", String::from_utf8_lossy(msg))),
        _ => bail!(
            "the render exceeded its memory budget of {} MiB or its stack (the template builds \
             values too large or recurses too deep)",
            TEMPLATE_MEMORY_BUDGET >> 20
        ),
    }
}

/// Elsewhere: fuel and recursion limits only.
#[cfg(not(target_os = "linux"))]
fn render_bounded(template: &str, ctx: &JValue) -> Result<String> {
    render_in_env(template, ctx).map_err(|e| anyhow!(e))
}

/// The process's current address-space size (`VmSize` of /proc/self/status), 0 if unknown.
#[cfg(target_os = "linux")]
fn vm_size_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The render itself: the HF-style environment with fuel and recursion limits.
fn render_in_env(template: &str, ctx: &JValue) -> std::result::Result<String, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
    env.add_function("raise_exception", |msg: String| -> Result<JValue, JError> {
        Err(JError::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_filter("tojson", tojson);
    env.set_unknown_method_callback(python_method);
    env.render_str(template, ctx).map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        msg
    })
}

/// `tojson` as `transformers` defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`
/// (separators `", "`/`": "`; with `indent`, `","` and newlines). Keys come out sorted.
fn tojson(value: JValue, indent: Option<usize>, kwargs: Kwargs) -> Result<String, JError> {
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    if let Some(i) = indent.filter(|&i| i > TOJSON_MAX_INDENT) {
        return Err(JError::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent {i} is more than the {TOJSON_MAX_INDENT} accepted"),
        ));
    }
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value)
        .map_err(|e| JError::new(ErrorKind::BadSerialization, e.to_string()))?;
    let mut out = String::new();
    python_json(&v, indent, 0, &mut out);
    Ok(out)
}

fn python_json(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                python_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(x, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Python `str`/`dict` methods that HF chat templates call.
fn python_method(
    state: &State,
    value: &JValue,
    method: &str,
    args: &[JValue],
) -> Result<JValue, JError> {
    let arg_str = |i: usize| -> Result<Option<&str>, JError> {
        match args.get(i) {
            None => Ok(None),
            Some(a) if a.is_none() => Ok(None),
            Some(a) => a.as_str().map(Some).ok_or_else(|| {
                JError::new(
                    ErrorKind::InvalidOperation,
                    format!("{method}: expected a string argument"),
                )
            }),
        }
    };
    match (value.kind(), method) {
        (ValueKind::String, _) => {
            let s = value.as_str().unwrap_or_default();
            let chars: Option<Vec<char>> = arg_str(0)?.map(|c| c.chars().collect());
            let strip = |t: &str, left: bool, right: bool| -> String {
                let f = |c: char| match &chars {
                    Some(set) => set.contains(&c),
                    None => c.is_whitespace(),
                };
                let t = if left { t.trim_start_matches(f) } else { t };
                let t = if right { t.trim_end_matches(f) } else { t };
                t.to_string()
            };
            match method {
                "strip" => Ok(strip(s, true, true).into()),
                "lstrip" => Ok(strip(s, true, false).into()),
                "rstrip" => Ok(strip(s, false, true).into()),
                "startswith" => Ok(s.starts_with(arg_str(0)?.unwrap_or_default()).into()),
                "endswith" => Ok(s.ends_with(arg_str(0)?.unwrap_or_default()).into()),
                "upper" => Ok(s.to_uppercase().into()),
                "lower" => Ok(s.to_lowercase().into()),
                "replace" => match (arg_str(0)?, arg_str(1)?) {
                    (Some(a), Some(b)) => {
                        // The result's size before building it: `''` matches between every
                        // character (s.len() + 1 times), any other pattern at most
                        // s.len() / a.len() times.
                        let hits = if a.is_empty() {
                            s.chars().count() + 1
                        } else {
                            s.len() / a.len()
                        };
                        let size = hits.saturating_mul(b.len()).saturating_add(s.len());
                        if size > TEMPLATE_MAX_OUTPUT {
                            return Err(JError::new(
                                ErrorKind::InvalidOperation,
                                format!(
                                    "replace would build up to {size} bytes, more than the \
                                     {TEMPLATE_MAX_OUTPUT} a template value may have"
                                ),
                            ));
                        }
                        Ok(s.replace(a, b).into())
                    }
                    _ => Err(JError::new(
                        ErrorKind::InvalidOperation,
                        "replace needs two strings",
                    )),
                },
                "split" => {
                    let parts: Vec<JValue> = match arg_str(0)? {
                        Some(sep) if !sep.is_empty() => s.split(sep).map(JValue::from).collect(),
                        Some(_) => {
                            return Err(JError::new(ErrorKind::InvalidOperation, "empty separator"))
                        }
                        None => s.split_whitespace().map(JValue::from).collect(),
                    };
                    Ok(JValue::from(parts))
                }
                _ => Err(JError::from(ErrorKind::UnknownMethod)),
            }
        }
        (ValueKind::Map, "items") => state.apply_filter("items", std::slice::from_ref(value)),
        (ValueKind::Map, "keys") => Ok(JValue::from(value.try_iter()?.collect::<Vec<_>>())),
        (ValueKind::Map, "values") => {
            let vals = value
                .try_iter()?
                .map(|k| value.get_item(&k))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(JValue::from(vals))
        }
        (ValueKind::Map, "get") => {
            let key = args.first().cloned().unwrap_or_default();
            let v = value.get_item(&key)?;
            Ok(if v.is_undefined() {
                args.get(1).cloned().unwrap_or(JValue::from(()))
            } else {
                v
            })
        }
        _ => Err(JError::from(ErrorKind::UnknownMethod)),
    }
}

/// Ids of the special tokens of the tiny tokenizer ([`write_tiny_tokenizer`]), at the top of a
/// 512-row vocabulary like LLaDA's (ordinary tokens first, specials after, padding rows last).
#[derive(Clone, Copy, Debug)]
pub struct TinyVocab {
    pub bos: u32,
    pub eos: u32,
    pub mask: u32,
    pub start_header: u32,
    pub end_header: u32,
    pub eot: u32,
    /// Number of merged tokens (ids 256 ..).
    pub merges: u32,
}

/// The tiny tokenizer's layout: bytes 0..256 (GPT-2 order), merges 256..256+merges, specials
/// 500..506; ids 506..512 are embedding padding rows.
pub const TINY_VOCAB: TinyVocab = TinyVocab {
    bos: 500,
    eos: 501,
    mask: 502,
    start_header: 503,
    end_header: 504,
    eot: 505,
    merges: TINY_MERGES.len() as u32,
};

/// Merges of the tiny BPE, as pieces in the GPT-2 byte alphabet (`Ġ` = space). There is no
/// newline merge, so `"\n\n"` is two tokens 198 as in LLaDA's chat prompts.
const TINY_MERGES: [(&str, &str); 23] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("Ġ", "a"),
    ("o", "n"),
    ("r", "e"),
    ("u", "s"),
    ("us", "er"),
    ("s", "s"),
    ("a", "ss"),
    ("s", "t"),
    ("i", "st"),
    ("ass", "ist"),
    ("a", "n"),
    ("an", "t"),
    ("assist", "ant"),
    ("Ġ", "s"),
    ("Ġ", "w"),
    ("o", "r"),
    ("l", "l"),
    ("Ġ", "h"),
];

/// GPT-2's byte → printable character map, in vocabulary order: entry `i` is the byte whose
/// token id is `i` (printable bytes first, as in GPT-2 and LLaDA: `!` = 0, `Ġ` = 220, `Ċ` = 198).
pub fn gpt2_byte_alphabet() -> Vec<(u8, char)> {
    let mut bytes: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap_or('?')))
        .collect()
}

/// Write a tiny GPT-2-style byte-level BPE `tokenizer.json` (256 byte tokens, the merges of
/// [`TINY_VOCAB`], LLaDA's special tokens at its ids) and a `tokenizer_config.json` with
/// LLaDA-Instruct's chat template and special-token strings, into `dir`.
pub fn write_tiny_tokenizer(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut vocab = serde_json::Map::new();
    for (i, (_, c)) in gpt2_byte_alphabet().into_iter().enumerate() {
        vocab.insert(c.to_string(), Value::from(i));
    }
    let mut merges = Vec::new();
    for (i, (a, b)) in TINY_MERGES.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), Value::from(256 + i));
        merges.push(serde_json::json!([a, b]));
    }
    let v = TINY_VOCAB;
    let specials = [
        (v.bos, "<|startoftext|>"),
        (v.eos, "<|endoftext|>"),
        (v.mask, "<|mdm_mask|>"),
        (v.start_header, "<|start_header_id|>"),
        (v.end_header, "<|end_header_id|>"),
        (v.eot, "<|eot_id|>"),
    ];
    let mut added = Vec::new();
    for (id, s) in specials {
        // In the model vocabulary too, so the ids are exactly these whatever the loader does
        // with gaps between the merges and the specials.
        vocab.insert(s.to_string(), Value::from(id));
        added.push(serde_json::json!({
            "id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    }
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                           "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    let config = serde_json::json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1e30,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LLADA_INSTRUCT_TEMPLATE,
    });
    crate::hf::checkpoint::write_text_atomic(
        &dir.join("tokenizer.json"),
        &(serde_json::to_string_pretty(&tok)? + "\n"),
    )?;
    crate::hf::checkpoint::write_text_atomic(
        &dir.join("tokenizer_config.json"),
        &(serde_json::to_string_pretty(&config)? + "\n"),
    )?;
    Ok(())
}
