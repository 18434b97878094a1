//! Finite-difference gradient checks in f64, shared by the training and LoRA tests.

/// Central differences in f64 with step 1e-5: truncation error ~h²·f''' ≈ 1e-10 and rounding
/// error ~ε·|f|/h ≈ 1e-11 for the O(1) losses here, so 1e-7 absolute plus 1e-6 relative to the
/// largest gradient is far above the numerical noise and far below any real mistake (a wrong
/// term changes gradients at the 1e-2 level).
pub fn check_grad(name: &str, x: &mut [f64], analytic: &[f64], f: &mut dyn FnMut(&[f64]) -> f64) {
    let h = 1e-5;
    let scale = analytic
        .iter()
        .fold(0.0f64, |a, &b| a.max(b.abs()))
        .max(1e-3);
    let mut worst = 0.0f64;
    for i in 0..x.len() {
        let x0 = x[i];
        x[i] = x0 + h;
        let fp = f(x);
        x[i] = x0 - h;
        let fm = f(x);
        x[i] = x0;
        let num = (fp - fm) / (2.0 * h);
        let err = (num - analytic[i]).abs();
        worst = worst.max(err);
        assert!(
            err <= 1e-7 + 1e-6 * scale,
            "{name}[{i}]: analytic {} numeric {num} (error {err}, max |grad| {scale})",
            analytic[i]
        );
    }
    eprintln!("{name}: {} elements, worst error {worst:.2e}", x.len());
}
