//! Two MPI ranks in f64 take the one-process step: this test starts itself
//! again as the two ranks of `mpirun -np 2` (Open MPI on the PATH, the `mpi`
//! feature), each training the tiny fixture with one device, and compares
//! rank 0's adapter with one process's. In f64 the sums between ranks are
//! made in f64, so the adapters agree to the f32 they are stored in (as
//! `parallel_f64.rs` shows for two devices of one process).

mod common;

use burn::backend::{Autodiff, NdArray};
use common::parallel::*;
use common::Quiet;
use melora_llama::data::Scoring;
use melora_llama::train::{Method, Nodes, TrainConfig};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

type AD64 = Autodiff<NdArray<f64>>;

/// Set in the ranks: where rank 0 writes its run.
const RANK_OUT: &str = "MELORA_TEST_RANK_OUT";

fn settings() -> TrainConfig {
    config(Method::MeLora, Scoring::Answer, 4)
}

#[test]
fn in_f64_two_ranks_take_the_one_process_step() {
    if let Some(dir) = std::env::var_os(RANK_OUT) {
        // A rank of the mpirun below.
        let nodes = Nodes::from_launcher(Duration::from_secs(120))
            .unwrap()
            .expect("two ranks");
        let data = data(Scoring::Answer);
        train_as_node::<AD64>(&settings(), &data, Path::new(&dir), false, &mut Quiet, Some(&nodes)).unwrap();
        return;
    }
    let one = out("mpi-f64-one");
    train_on::<AD64>(&settings(), &data(Scoring::Answer), &one, false, &mut Quiet).unwrap();
    let two = out("mpi-f64-two");
    let output = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", RANK_OUT])
        // No cross-memory attach between the ranks (containers often forbid it).
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "in_f64_two_ranks_take_the_one_process_step", "--nocapture"])
        .env(RANK_OUT, &two)
        .output()
        .expect("mpirun (Open MPI: apt install openmpi-bin libopenmpi-dev)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let diff = relative_diff(
        &adapter(&one.join("checkpoints/last")),
        &adapter(&two.join("checkpoints/last")),
    );
    println!("f64, 2 ranks vs 1 process: adapter after 5 steps {diff:.1e} (relative)");
    assert!(diff < 1e-9, "2 ranks end {diff:e} from 1 process in f64");
    std::fs::remove_dir_all(&one).ok();
    std::fs::remove_dir_all(&two).ok();
}
