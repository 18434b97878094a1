//! Unit tests of the CPU backend (matmul, argument checks).

use std::sync::Arc;

use super::*;

fn host(name: &str, shape: &[usize], data: Vec<f32>) -> WeightSource {
    WeightSource::Host {
        data: Arc::new(data),
        dtype: DType::F32,
        shape: shape.to_vec(),
        name: name.into(),
    }
}

#[test]
fn matmul_matches_naive_and_merges_parts() {
    let be = CpuBackend::new(DType::F32);
    let (n, k, m1, m2) = (5, 19, 3, 4);
    let wa: Vec<f32> = (0..m1 * k)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.25)
        .collect();
    let wb: Vec<f32> = (0..m2 * k)
        .map(|i| ((i * 3 % 13) as f32 - 6.0) * 0.5)
        .collect();
    let w = be
        .load_weight(&[
            host("a", &[m1, k], wa.clone()),
            host("b", &[m2, k], wb.clone()),
        ])
        .unwrap();
    let x: Vec<f32> = (0..n * k)
        .map(|i| ((i * 5 % 9) as f32 - 4.0) * 0.125)
        .collect();
    let m = m1 + m2;
    let mut out = vec![f32::NAN; n * m];
    be.matmul(&mut out, &x, &w, MatMul { n, k, m }).unwrap();
    let wall: Vec<f32> = wa.into_iter().chain(wb).collect();
    for i in 0..n {
        for j in 0..m {
            // Small dyadic values: every partial sum is exact, so the order does not matter.
            let e: f32 = (0..k).map(|l| x[i * k + l] * wall[j * k + l]).sum();
            assert_eq!(out[i * m + j], e, "({i},{j})");
        }
    }
    assert!(be
        .matmul(&mut out, &x, &w, MatMul { n, k: k + 1, m })
        .is_err());
}

#[test]
fn ops_reject_short_buffers() {
    let be = CpuBackend::new(DType::BF16);
    let w = be
        .load_weight(&[WeightSource::Const {
            value: 1.0,
            dtype: DType::BF16,
            shape: vec![4],
            name: "ln".into(),
        }])
        .unwrap();
    let mut out = vec![0.0; 7];
    let e = be
        .rms_norm(&mut out, &vec![0.0; 8], &w, Norm::new(2, 4, 1e-5))
        .unwrap_err();
    assert!(
        e.to_string().contains("rms_norm") && e.to_string().contains("out"),
        "{e}"
    );
}
