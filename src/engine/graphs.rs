//! CUDA-graph bookkeeping of [`super::model::Model`]: one captured layers pass (or whole
//! denoising step, [`super::stepgraph`]) per launch shape (`GraphKey`), bounded in number,
//! replayed instead of re-launching (`Model::run_graphed`, `replay.rs`).

use crate::backend::step::StepShape;
use crate::backend::{CachedAttnShape, GraphExec};
use std::collections::HashMap;

/// Whatever fixes the launches of a layers pass besides the workspace's own buffers: the
/// attention shape (sizes and the span start of kv_store), whether a key mask is passed, which
/// KV cache (0: none), and for a whole step graph the scalars of its head and selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GraphKey {
    pub(crate) shape: CachedAttnShape,
    pub(crate) masked: bool,
    pub(crate) cache: u64,
    pub(crate) step: Option<StepKey>,
}

/// The scalars a step graph bakes in after the layers pass: the sizes of the selection and the
/// advance, the commit rule (mode, parameter bits) and the head's parameters (temperature and
/// CFG scale bits, remasking, seed, forbidden and suppressed tokens, −1 for none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StepKey {
    pub(crate) shape: StepShape,
    pub(crate) rule: (i32, u64),
    pub(crate) head: [u64; 7],
}

pub(crate) enum Plan {
    Eager,
    Capture,
    Replay,
}

pub(crate) enum GraphEntry {
    /// Seen this many times, not captured yet (shapes used once are never captured).
    Seen(u32),
    Ready(GraphExec),
}

/// Captured layer passes of one [`super::model::Workspace`], keyed by `GraphKey`. A workspace's buffers never
/// move, and a new KV cache or model has a new id, so a stale graph is never replayed (entries of
/// a replaced cache or model are dropped when the new one shows up).
pub struct GraphCache {
    pub(crate) enabled: bool,
    pub(crate) warned: bool,
    model: u64,
    pub(crate) map: HashMap<GraphKey, GraphEntry>,
    pub(crate) captures: usize,
    pub(crate) replays: usize,
}

/// At most this many shapes are tracked (and graphs kept) per workspace; others run eagerly.
const MAX_GRAPH_SHAPES: usize = 256;

impl GraphCache {
    pub(crate) fn new() -> Self {
        GraphCache {
            enabled: std::env::var("LLADA_NO_GRAPHS").map_or(true, |v| v != "1"),
            warned: false,
            model: 0,
            map: HashMap::new(),
            captures: 0,
            replays: 0,
        }
    }

    pub(crate) fn plan(&mut self, model: u64, key: GraphKey) -> Plan {
        if !self.enabled {
            return Plan::Eager;
        }
        if self.model != model {
            self.map.clear();
            self.model = model;
        }
        if key.cache != 0
            && self
                .map
                .keys()
                .any(|k| k.cache != 0 && k.cache != key.cache)
        {
            self.map.retain(|k, _| k.cache == 0 || k.cache == key.cache);
        }
        if self.map.len() >= MAX_GRAPH_SHAPES && !self.map.contains_key(&key) {
            return Plan::Eager;
        }
        match self.map.entry(key).or_insert(GraphEntry::Seen(0)) {
            GraphEntry::Ready(_) => Plan::Replay,
            GraphEntry::Seen(k) if *k == 0 => {
                *k += 1;
                Plan::Eager
            }
            GraphEntry::Seen(_) => Plan::Capture,
        }
    }

    pub(crate) fn get(&self, key: &GraphKey) -> Option<&GraphExec> {
        match self.map.get(key) {
            Some(GraphEntry::Ready(g)) => Some(g),
            _ => None,
        }
    }

    pub(crate) fn insert(&mut self, key: GraphKey, g: GraphExec) {
        self.map.insert(key, GraphEntry::Ready(g));
        self.captures += 1;
        self.replays += 1;
    }
}
