//! Data-parallel training on the tiny fixture: two peers (threads sharing
//! the CPU; two processes joined over TCP are melora-cli's `nodes.rs`)
//! take the steps one device takes on the whole batch, for LoRA, BLoB and
//! Me-LoRA under both scorings; a run stopped and resumed with two peers
//! ends where the uninterrupted one does; a non-finite loss or a failing
//! peer stops every peer with its message, and nobody hangs.
//!
//! Not bitwise: each peer's backward pass sums the gradient over its own
//! rows, and the all-reduce adds the peers' sums, so a gradient entry is a
//! sum of the same terms in another order (f32). After 5 steps the adapters
//! agree to 2e-4 of their largest entry (f32); in f64 (`parallel_f64.rs`) their
//! stored (f32) weights are the same bits. The noise draws and the replicas themselves
//! agree exactly.

mod common;

use burn::backend::{Autodiff, NdArray};
use common::parallel::*;
use common::Quiet;
use melora_core::SamplingMode;
use melora_llama::data::Scoring;
use melora_llama::error::LlamaError;
use melora_llama::train::{parallel, Cluster, Method, Progress};
use std::sync::Mutex;
use std::time::Instant;

type AD = Autodiff<NdArray<f32>>;

/// burn-collective keeps one collective per backend and process: the tests
/// of this file that use it take turns.
static COLLECTIVE: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    COLLECTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Relative to the adapter's largest entry, after 5 steps in f32 (see
/// `parallel_f64.rs` for why it is not 0).
const TOLERANCE: f64 = 5e-4;

#[test]
fn two_peers_take_the_steps_one_device_takes() {
    let _turn = lock();
    let mut report = Vec::new();
    for scoring in [Scoring::Label, Scoring::Answer] {
        let data = data(scoring);
        for method in [Method::Lora, Method::Blob, Method::MeLora] {
            // An even and an uneven split (2 + 2, 3 + 2 rows).
            for batch in [4, 5] {
                let name = format!("{scoring:?}-{method:?}-{batch}");
                let mut one = config(method, scoring, batch);
                if method != Method::Lora {
                    one.train_sampling = SamplingMode::PerExample;
                }
                let two = one.clone().with_devices(2);
                let (dir1, dir2) = (out(&format!("{name}-1")), out(&format!("{name}-2")));
                train(&one, &data, &dir1, false, &mut Quiet).unwrap();
                train(&two, &data, &dir2, false, &mut Quiet).unwrap();
                let diff = relative_diff(
                    &adapter(&dir1.join("checkpoints/last")),
                    &adapter(&dir2.join("checkpoints/last")),
                );
                let (n1, n2) = (nlls(&dir1), nlls(&dir2));
                assert_eq!(n1.len(), 5, "{name}");
                let nll_diff = n1.iter().zip(&n2).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                report.push(format!(
                    "{name}: adapter after 5 steps {diff:.1e} (relative), step NLLs {nll_diff:.1e}"
                ));
                assert!(diff < TOLERANCE, "{name}: 2 peers end {diff:e} from 1 device");
                assert!(nll_diff < 1e-3, "{name}: step NLLs differ by {nll_diff}");
                assert!((n1[0] - n1[4]).abs() > 1e-4, "{name}: the NLL did not move: {n1:?}");
                std::fs::remove_dir_all(&dir1).ok();
                std::fs::remove_dir_all(&dir2).ok();
            }
        }
    }
    println!("{}", report.join("\n"));
}

/// Stops the run after step `at`.
struct StopAt(usize, usize);
impl Progress for StopAt {
    fn step(&mut self, step: usize, _: usize, _: &str) {
        self.1 = step;
    }
    fn line(&mut self, _: &str) {}
    fn stop_requested(&mut self) -> bool {
        self.1 == self.0
    }
}

#[test]
fn a_run_stopped_and_resumed_with_two_peers_ends_where_the_whole_run_does() {
    let _turn = lock();
    let data = data(Scoring::Answer);
    let two = config(Method::MeLora, Scoring::Answer, 4).with_devices(2);
    let (whole, resumed) = (out("whole"), out("resumed"));
    train(&two, &data, &whole, false, &mut Quiet).unwrap();
    let summary = train(&two, &data, &resumed, false, &mut StopAt(3, 0)).unwrap();
    assert!(summary.stopped && summary.steps_run == 3, "{summary:?}");
    let summary = train(&two, &data, &resumed, true, &mut Quiet).unwrap();
    assert!(!summary.stopped && summary.steps_run == 2, "{summary:?}");
    // The same process, the same peers: the same bits.
    for file in [
        "checkpoints/last/adapter_model.safetensors",
        "checkpoints/last/adamw.bin",
        "checkpoints/best/adapter_model.safetensors",
        "metrics.jsonl",
    ] {
        assert_eq!(
            std::fs::read(whole.join(file)).unwrap(),
            std::fs::read(resumed.join(file)).unwrap(),
            "{file}"
        );
    }
    // A one-device run resumes the two peers' checkpoint, and the other way.
    let one = config(Method::MeLora, Scoring::Answer, 4);
    let mixed = out("mixed");
    train(&two, &data, &mixed, false, &mut StopAt(2, 0)).unwrap();
    train(&one, &data, &mixed, true, &mut Quiet).unwrap();
    let diff = relative_diff(
        &adapter(&whole.join("checkpoints/last")),
        &adapter(&mixed.join("checkpoints/last")),
    );
    assert!(diff < TOLERANCE, "2 peers then 1 device: {diff:e}");
}

#[test]
fn a_non_finite_kl_stops_every_peer_with_the_message() {
    let _turn = lock();
    let data = data(Scoring::Label);
    // sigma_p = 1e-30: sigma_p^2 is 0 in f32 and the KL infinite, on every peer.
    let mut config = config(Method::Blob, Scoring::Label, 4).with_devices(2);
    config.prior.std = 1e-30;
    let dir = out("nan");
    let started = Instant::now();
    let err = train(&config, &data, &dir, false, &mut Quiet).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("training stopped at step 1: the KL is inf"),
        "{message}"
    );
    assert!(started.elapsed().as_secs() < 60);
}

#[test]
fn a_failing_peer_stops_the_others_with_its_error() {
    let _turn = lock();
    let device = Default::default();
    let cluster = Cluster {
        devices: 3,
        nodes: None,
    };
    // Peer 2 fails (an error, then a panic) while the others are in an
    // all-reduce: they wake up, and the error returned is peer 2's.
    for panic in [false, true] {
        let started = Instant::now();
        let body = |peer: parallel::Peer,
                    device: <AD as burn::tensor::backend::BackendTypes>::Device|
         -> melora_llama::Result<usize> {
            for round in 0..10 {
                if peer.local == 2 && round == 3 {
                    if panic {
                        panic!("peer 2 broke");
                    }
                    return Err(LlamaError::Peers("peer 2 could not read its batch".into()));
                }
                peer.sum::<NdArray<f32>>(&[1.0], &device)?;
            }
            Ok(peer.local)
        };
        let err = parallel::run_peers::<AD, usize>(&cluster, 4, &device, &body, &body)
            .unwrap_err()
            .to_string();
        let expected = if panic {
            "peer 2 panicked: peer 2 broke"
        } else {
            "peer 2 could not read its batch"
        };
        assert!(err.contains(expected), "{err}");
        assert!(started.elapsed().as_secs() < 30, "the peers waited");
    }
    // A good run after a failed one: the collective starts afresh.
    let sums = parallel::run_peers::<AD, Vec<f64>>(
        &cluster,
        4,
        &device,
        |p, d| p.sum::<NdArray<f32>>(&[p.local as f64, 1.0], &d),
        &|p, d| p.sum::<NdArray<f32>>(&[p.local as f64, 1.0], &d),
    )
    .unwrap();
    assert_eq!(sums, vec![3.0, 3.0]);
    // More peers than a batch has rows: refused before anything starts.
    let err = parallel::run_peers::<AD, ()>(
        &Cluster {
            devices: 5,
            nodes: None,
        },
        4,
        &device,
        |_, _| Ok(()),
        &|_, _| Ok(()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("5 peers for a batch of 4"), "{err}");
}
