//! The GPU probe of every device test: the device `open` gives, or `None` with a printed
//! `SKIP:` reason; `LLADA_REQUIRE_GPU=1` turns the skip into a panic.

pub fn device_or_skip<T>(open: impl FnOnce() -> anyhow::Result<T>) -> Option<T> {
    let require = std::env::var("LLADA_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let r = llada::engine::device::cuda_available()
        .map_err(anyhow::Error::msg)
        .and_then(|()| open());
    match r {
        Ok(b) => Some(b),
        Err(e) if require => panic!("LLADA_REQUIRE_GPU=1 but no usable GPU: {e:#}"),
        Err(e) => {
            eprintln!("SKIP: {e:#}");
            None
        }
    }
}
