//! The inputs of the [`Backend`] ops that always travel together (buffers of the backend's
//! types, by reference), one struct per op family: the RoPE positions and tables, a row gather's
//! index, the head's buffers, the commit selection's inputs.

use super::Backend;

/// A row gather: `out[i, :] = table[idx[i], :]` for `i < n`, rows of `c` elements
/// ([`Backend::embedding`]: `idx` are token ids into the embedding weight;
/// [`Backend::gather_rows`]: `idx` are rows of an activation).
pub struct Gather<'a, B: Backend + ?Sized> {
    pub idx: &'a B::Ints,
    pub n: usize,
    pub c: usize,
}

/// The inputs of a RoPE ([`Backend::rope`], [`Backend::rope_kv_store`]): row `i` is rotated to
/// position `pos[i]` with the tables of [`super::rope_tables`] (`cos`, `sin`: `[max_pos, HD/2]`).
pub struct Rope<'a, B: Backend + ?Sized> {
    pub pos: &'a B::Ints,
    pub cos: &'a B::F32s,
    pub sin: &'a B::F32s,
}

/// The buffers of one [`Backend::select`] call: outputs `tok`, `conf` `[R]`, the logits `[R, V]`
/// (`[2R, V]` with CFG; may be overwritten) and the row keys `[2R]`; `step`: a step graph's state
/// ([`super::step`]), whose step counter replaces `SelectParams::step` ([`SelectIo::at_step`]).
pub struct SelectIo<'a, B: Backend + ?Sized> {
    pub tok: &'a mut B::Ints,
    pub conf: &'a mut B::F32s,
    pub logits: &'a mut B::Act,
    pub keys: &'a B::Ints,
    pub step: Option<&'a B::Ints>,
}

/// The inputs of one [`Backend::step_advance`] call: [`Backend::commit_select`]'s output
/// `commit` `[R]`, the requested rows `rows` `[R]` (token indices into the pass) and the block's
/// schedule `sched` `[B·steps]` (row-major by batch row).
pub struct StepIn<'a, B: Backend + ?Sized> {
    pub commit: &'a B::Ints,
    pub rows: &'a B::Ints,
    pub sched: &'a B::Ints,
}

/// The inputs of one [`Backend::commit_select`] call: the head's `tok`, `conf` `[R]`, the requested
/// rows `rows` `[R]` into the pass's tokens `ids` `[N]`, and the `plan` `[2B + 1]`.
pub struct CommitIn<'a, B: Backend + ?Sized> {
    pub tok: &'a B::Ints,
    pub conf: &'a B::F32s,
    pub rows: &'a B::Ints,
    pub ids: &'a B::Ints,
    pub plan: &'a B::Ints,
}

impl<'a, B: Backend + ?Sized> Gather<'a, B> {
    pub fn new(idx: &'a B::Ints, n: usize, c: usize) -> Self {
        Gather { idx, n, c }
    }
}

impl<'a, B: Backend + ?Sized> Rope<'a, B> {
    pub fn new(pos: &'a B::Ints, cos: &'a B::F32s, sin: &'a B::F32s) -> Self {
        Rope { pos, cos, sin }
    }
}

impl<'a, B: Backend + ?Sized> SelectIo<'a, B> {
    pub fn new(
        tok: &'a mut B::Ints,
        conf: &'a mut B::F32s,
        logits: &'a mut B::Act,
        keys: &'a B::Ints,
    ) -> Self {
        SelectIo {
            tok,
            conf,
            logits,
            keys,
            step: None,
        }
    }

    /// The RNG step read from the step state `state` ([`super::step::rng_step`]).
    pub fn at_step(self, state: &'a B::Ints) -> Self {
        SelectIo {
            step: Some(state),
            ..self
        }
    }
}

// Manual impls: a derive would ask `B: Clone` of the backend itself.
impl<B: Backend + ?Sized> Clone for Gather<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for Gather<'_, B> {}
impl<B: Backend + ?Sized> Clone for Rope<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for Rope<'_, B> {}
