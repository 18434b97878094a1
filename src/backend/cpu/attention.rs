//! The attention reference shared by `attention` and `attention_cached`.

use super::*;

/// Row `r` of a row-major matrix stored at column offset `off` with row stride `stride`.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a> {
    pub(super) data: &'a [f32],
    pub(super) off: usize,
    pub(super) stride: usize,
}

impl<'a> Strided<'a> {
    pub(super) fn new(data: &'a [f32], off: usize, stride: usize) -> Self {
        Strided { data, off, stride }
    }

    pub(super) fn row(&self, r: usize, len: usize) -> &'a [f32] {
        &self.data[r * self.stride + self.off..][..len]
    }
}

/// The attention reference shared by [`Backend::attention`] and [`Backend::attention_cached`]:
/// query row `bi·TQ + i` (head `h` at columns `h·HD` of `q`) attends to key/value rows
/// `bi·L .. (bi+1)·L` (kv head `h / (NH/NKV)`), scores in f32, exact softmax in f32, output
/// rounded once. A query with no valid key gets zeros. Shapes are checked by the callers.
pub(super) fn attend_rows(
    dt: DType,
    out: &mut [f32],
    q: Strided<'_>,
    k: Strided<'_>,
    v: Strided<'_>,
    key_valid: Option<&[i32]>,
    s: CachedAttnShape,
) {
    let (b, tq, l, nh, nkv, hd) = s.dims();
    let n = b * tq;
    if n == 0 || nh == 0 || hd == 0 {
        return;
    }
    let scale = 1.0f32 / (hd as f32).sqrt();
    let group = nh / nkv;
    // One task per query row (b, i); all heads of that row.
    out[..n * nh * hd]
        .par_chunks_mut(nh * hd)
        .enumerate()
        .for_each(|(qi, orow)| {
            let bi = qi / tq;
            let keys = bi * l..(bi + 1) * l;
            let valid = |j: usize| key_valid.map_or(true, |kv| kv[j] != 0);
            with_scratch(l + hd, |scr| {
                let (sc, acc) = scr.split_at_mut(l);
                for h in 0..nh {
                    let kvh = h / group;
                    let qr = &q.row(qi, nh * hd)[h * hd..(h + 1) * hd];
                    let mut mx = f32::NEG_INFINITY;
                    for (jj, j) in keys.clone().enumerate() {
                        if valid(j) {
                            let kr = &k.row(j, nkv * hd)[kvh * hd..(kvh + 1) * hd];
                            let sv = dot(qr, kr) * scale;
                            sc[jj] = sv;
                            if sv > mx {
                                mx = sv;
                            }
                        } else {
                            sc[jj] = f32::NEG_INFINITY;
                        }
                    }
                    let o = &mut orow[h * hd..(h + 1) * hd];
                    if mx == f32::NEG_INFINITY {
                        // No valid key (or all scores −∞): defined as a zero output.
                        o.fill(0.0);
                        continue;
                    }
                    acc.fill(0.0);
                    let mut sum = 0.0f32;
                    for (jj, j) in keys.clone().enumerate() {
                        if !valid(j) {
                            continue;
                        }
                        let e = (sc[jj] - mx).exp();
                        sum += e;
                        let vr = &v.row(j, nkv * hd)[kvh * hd..(kvh + 1) * hd];
                        for (a, &vv) in acc.iter_mut().zip(vr) {
                            *a += e * vv;
                        }
                    }
                    for (ov, &a) in o.iter_mut().zip(acc.iter()) {
                        *ov = dt.round(a / sum);
                    }
                }
            })
        });
}
