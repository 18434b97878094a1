//! [`Model::run_graphed`]: a pass's launches run eagerly, captured into a CUDA graph, or replayed
//! from one, as the workspace's [`super::graphs::GraphCache`] plans.

use anyhow::{Context, Result};

use super::graphs::{GraphKey, Plan};
use super::model::{KvCache, Model, Workspace};
use crate::backend::Backend;

/// The launches [`Model::run_graphed`] runs, captures or replays: device work on a workspace
/// (and a KV cache).
pub(crate) type GraphBody<'a, B> =
    dyn Fn(&mut Workspace<B>, Option<&mut KvCache<B>>) -> Result<()> + 'a;

impl<B: Backend> Model<B> {
    /// Run `body` on `ws` (and `cache`) as the launches of `key`: replayed from its graph when
    /// one was captured, captured (then replayed) on the key's second sighting, else run eagerly
    /// ([`super::graphs::GraphCache::plan`]; always eagerly while profiling or on a backend without graphs).
    /// `body` must be device work only (see [`Backend::graph_capture`]).
    pub(crate) fn run_graphed(
        &self,
        ws: &mut Workspace<B>,
        mut cache: Option<&mut KvCache<B>>,
        key: GraphKey,
        body: &GraphBody<'_, B>,
    ) -> Result<()> {
        let be = &self.backend;
        let plan = if be.graphs_supported() && !be.prof_enabled() {
            ws.graphs.plan(self.id, key)
        } else {
            Plan::Eager
        };
        match plan {
            Plan::Eager => body(ws, cache),
            Plan::Replay => {
                let g = ws
                    .graphs
                    .get(&key)
                    .context("forward: graph missing after planning a replay")?;
                be.graph_replay(g)?;
                ws.graphs.replays += 1;
                Ok(())
            }
            Plan::Capture => {
                let captured = {
                    let mut f = || body(ws, cache.as_deref_mut());
                    be.graph_capture(&mut f)
                };
                match captured {
                    Ok(g) => {
                        be.graph_replay(&g)?;
                        ws.graphs.insert(key, g);
                        Ok(())
                    }
                    Err(e) => {
                        // Nothing ran during the failed capture: run eagerly, and stay eager.
                        if !ws.graphs.warned {
                            eprintln!(
                                "warning: CUDA graph capture failed, running without graphs: {e:#}"
                            );
                            ws.graphs.warned = true;
                        }
                        ws.graphs.enabled = false;
                        body(ws, cache)
                    }
                }
            }
        }
    }
}
