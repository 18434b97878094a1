//! [`DeviceParams`] and [`forward_backward`]: the whole model on the device, the same math and
//! order as [`crate::train::model::forward_backward`] (both are [`forward_backward_on`]).

use super::*;

/// Every parameter (or gradient, or moment) of a model on the device, in the order of
/// [`Params`].
pub struct DeviceParams {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub data: Vec<Buf>,
}

impl DeviceParams {
    pub fn upload(ops: &CudaOps, p: &Params<f32>) -> Result<DeviceParams> {
        let data = p
            .data
            .iter()
            .zip(&p.names)
            .map(|(d, n)| ops.upload(d).with_context(|| format!("uploading `{n}`")))
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceParams {
            names: p.names.clone(),
            shapes: p.shapes.clone(),
            data,
        })
    }

    /// Copy every tensor back into `p` (same layout).
    pub fn download_into(&self, ops: &CudaOps, p: &mut Params<f32>) -> Result<()> {
        ensure!(
            p.data.len() == self.data.len(),
            "download: {} tensors on the device, {} on the host",
            self.data.len(),
            p.data.len()
        );
        for (i, d) in p.data.iter_mut().enumerate() {
            *d = ops.download(&self.data[i], d.len())?;
        }
        Ok(())
    }

    pub fn download(&self, ops: &CudaOps) -> Result<Params<f32>> {
        let mut p = Params {
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            data: self
                .shapes
                .iter()
                .map(|s| vec![0f32; s.iter().product()])
                .collect(),
        };
        self.download_into(ops, &mut p)?;
        Ok(p)
    }

    pub fn fill_zero(&mut self, ops: &CudaOps) -> Result<()> {
        for d in &mut self.data {
            ops.zero_fill(d)?;
        }
        Ok(())
    }
}

/// Loss of `batch` under `p` on the GPU, with every parameter's gradient **added** to `grad`:
/// [`forward_backward_on`] over [`CudaOps`], f32 throughout. Activation buffers are allocated
/// per call (stream-ordered) and freed at the end.
pub fn forward_backward(
    ops: &CudaOps,
    cfg: &ModelConfig,
    p: &DeviceParams,
    batch: &Batch,
    grad: &mut DeviceParams,
) -> Result<f64> {
    forward_backward_on(ops, cfg, &p.data, batch, &mut grad.data)
}
