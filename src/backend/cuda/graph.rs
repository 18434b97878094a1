//! CUDA graphs (capture, replay), device timers and per-op-class profiling.

use super::*;

/// A captured sequence of launches, replayed with [`CudaBackend::replay`].
pub struct Graph(pub(crate) CudaGraph);

// SAFETY: the graph holds driver handles (valid in any thread once the context is bound, which
// `CudaGraph::launch` does) and an `Arc<CudaStream>`; it is only launched through the backend
// that captured it, like `CudaBackend` itself (Send).
unsafe impl Send for Graph {}

/// Per-op-class device timing ([`Backend::prof_mark`]): timing events recorded on the stream in
/// order, each opening the interval of its class; folded into totals on `prof_take` or when many
/// are pending (events are recycled, so a long profile does not grow without bound).
#[derive(Default)]
pub(crate) struct CudaProf {
    pub(crate) on: bool,
    pub(crate) pool: Vec<CudaEvent>,
    pub(crate) marks: Vec<(Option<OpClass>, CudaEvent)>,
    pub(crate) totals: [f64; OpClass::ALL.len()],
    pub(crate) seen: [bool; OpClass::ALL.len()],
}

/// Pending marks that trigger a fold (a stream synchronize) at the next interval close.
pub(crate) const PROF_FOLD: usize = 4096;

/// Device-side timer: two timing events around queued work.
pub struct Timer {
    start: CudaEvent,
    stop: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Timer {
    /// Record the start event on the backend's stream.
    pub fn start(&self) -> Result<()> {
        self.start
            .record(&self.stream)
            .context("recording the start event")
    }
    /// Record the stop event, wait for it, and return the milliseconds since [`Timer::start`].
    pub fn stop_ms(&self) -> Result<f32> {
        self.stop
            .record(&self.stream)
            .context("recording the stop event")?;
        self.start
            .elapsed_ms(&self.stop)
            .context("reading the event timer")
    }
}

impl CudaBackend {
    /// A timer whose events are recorded on this backend's stream (timing-enabled events).
    pub fn timer(&self) -> Result<Timer> {
        let mk = || {
            self.ctx
                .new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))
        };
        Ok(Timer {
            start: mk().map_err(|e| anyhow!("creating a timing event: {e:?}"))?,
            stop: mk().map_err(|e| anyhow!("creating a timing event: {e:?}"))?,
            stream: self.stream.clone(),
        })
    }

    /// Capture every launch `f` queues on this backend into a CUDA graph (nothing executes
    /// during capture). `f` must not read back, synchronize, allocate or copy from host memory:
    /// buffers are allocated and host inputs written before capture, and the graph replays on
    /// exactly the captured buffers and sizes. Scalars (sizes, `SelectParams.step`, ...) are baked
    /// in. Replay with [`CudaBackend::replay`].
    pub fn capture(&self, f: impl FnOnce(&Self) -> Result<()>) -> Result<Graph> {
        self.stream
            .begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow!("beginning graph capture: {e:?}"))?;
        let body = f(self);
        // Always end the capture, so the stream is usable again even when `f` failed.
        let ended = self.stream.end_capture(dsys::CUgraphInstantiate_flags(0));
        body.context("while capturing a CUDA graph")?;
        match ended {
            Ok(Some(g)) => Ok(Graph(g)),
            Ok(None) => bail!("graph capture produced an empty graph"),
            Err(e) => bail!("ending graph capture: {e:?} (a captured op synchronized or copied from pageable memory?)"),
        }
    }

    /// Fold the recorded marks into per-class totals (ms); the last mark stays (its interval
    /// may still be open), the others go back to the pool.
    pub(crate) fn prof_fold(&self, p: &mut CudaProf) -> Result<()> {
        if p.marks.len() < 2 {
            return Ok(());
        }
        self.synchronize()?;
        for i in 0..p.marks.len() - 1 {
            if let Some(c) = p.marks[i].0 {
                let ms = p.marks[i]
                    .1
                    .elapsed_ms(&p.marks[i + 1].1)
                    .map_err(|e| anyhow!("reading a profiling event: {e:?}"))?;
                p.totals[c as usize] += ms as f64;
                p.seen[c as usize] = true;
            }
        }
        let last = p.marks.pop();
        let done = std::mem::take(&mut p.marks);
        p.pool.extend(done.into_iter().map(|(_, e)| e));
        p.marks.extend(last);
        Ok(())
    }

    /// Launch a captured graph on this backend's stream (asynchronous).
    pub fn replay(&self, g: &Graph) -> Result<()> {
        g.0.launch()
            .map_err(|e| driver_err("launching a CUDA graph".into(), e))
    }
}
