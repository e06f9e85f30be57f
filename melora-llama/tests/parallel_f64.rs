//! Data-parallel training in f64, in a test process of its own:
//! Burn keeps one default float type per device, fixed by the first tensor
//! made on it, and the CPU device of `NdArray<f32>` and `NdArray<f64>` is
//! the same device, so after an f32 test in the same process these runs
//! would compute in f32.

mod common;

use burn::backend::{Autodiff, NdArray};
use common::parallel::*;
use common::Quiet;
use melora_llama::data::Scoring;
use melora_llama::train::Method;

/// The same comparison in f64: the adapters of 1 and 2 peers agree to the
/// f32 they are stored in (the checkpoints are the same bits), so the split
/// computes the one-device step, and the f32 runs' differences (up to 2e-4
/// of the largest entry) are f32 rounding in the gradient sums, grown by
/// AdamW on entries whose gradient is near 0 (the update is m / sqrt(v)).
#[test]
fn in_f64_two_peers_take_the_one_device_step() {
    type AD64 = Autodiff<NdArray<f64>>;
    let mut report = Vec::new();
    for scoring in [Scoring::Label, Scoring::Answer] {
        let data = data(scoring);
        for method in [Method::Lora, Method::Blob, Method::MeLora] {
            let name = format!("f64-{scoring:?}-{method:?}-5");
            let one = config(method, scoring, 5);
            let two = one.clone().with_devices(2);
            let (dir1, dir2) = (out(&format!("{name}-1")), out(&format!("{name}-2")));
            train_on::<AD64>(&one, &data, &dir1, false, &mut Quiet).unwrap();
            train_on::<AD64>(&two, &data, &dir2, false, &mut Quiet).unwrap();
            let diff = relative_diff(
                &adapter(&dir1.join("checkpoints/last")),
                &adapter(&dir2.join("checkpoints/last")),
            );
            report.push(format!("{name}: {diff:.1e}"));
            assert!(diff < 1e-9, "{name}: 2 peers end {diff:e} from 1 device in f64");
            std::fs::remove_dir_all(&dir1).ok();
            std::fs::remove_dir_all(&dir2).ok();
        }
    }
    println!("{}", report.join("\n"));
}
