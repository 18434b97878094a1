//! Chat templates, rendered in a sandbox: minijinja without file access, bounded instructions
//! (fuel), recursion, source size and nesting, output size, and (on Linux, in a forked child) memory
//! and time; plus the Python-method shims (`.strip()`, `.replace()`, `tojson`, ...) HF templates use.

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, Value as JValue, ValueKind};
use minijinja::{Environment, Error as JError, ErrorKind, State};
use serde_json::Value;

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

/// Render `template` with `ctx` in the sandboxed HF-style environment, within every bound of
/// the module documentation: source size and nesting ([`check_template_source`]), fuel,
/// recursion, and (on Linux) memory, time and output size (`render_bounded`).
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
