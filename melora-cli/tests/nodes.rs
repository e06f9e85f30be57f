//! Two `melora train` processes joined over TCP (`--nodes 2`) take the
//! steps one device takes on the whole batch; a node alone gives up
//! waiting for the other with a message; a node killed mid-run stops the
//! other, which does not hang. The binary runs the tiny fixture model on
//! ARC-Easy data in the real format (as the chaos test runs it).

#[path = "../../melora-llama/tests/common/mod.rs"]
mod common;

use common::fake_data::{tiny_home, TinyHome};
use common::parallel::*;
use melora_llama::data::Scoring;
use melora_llama::train::Method;
use std::time::Instant;

/// Relative to the adapter's largest entry, after 5 steps in f32 (see
/// melora-llama's `parallel_f64.rs` for why it is not 0).
const TOLERANCE: f64 = 5e-4;

/// A free TCP port on localhost.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn two_processes_take_the_steps_one_device_takes_and_stop_when_one_dies() {
    // The binary on the tiny model with a word tokenizer and ARC-Easy data
    // in the real format (as the chaos test runs it).
    let TinyHome { root, home, model } = tiny_home("parallel-nodes");
    let mut config = config(Method::MeLora, Scoring::Answer, 4).with_max_validation(Some(4));
    config.model = model.display().to_string();
    let config_path = root.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let melora = env!("CARGO_BIN_EXE_melora");
    let run = |args: &[String]| {
        std::process::Command::new(melora)
            .arg("train")
            .arg("--config")
            .arg(&config_path)
            .arg("--plain")
            .args(args)
            .env("MELORA_HOME", &home)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let one = root.join("one");
    let status = run(&["--out".into(), one.display().to_string()])
        .wait_with_output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));

    let lead = format!("127.0.0.1:{}", free_port());
    let two = root.join("two");
    let node = |rank: u32, timeout: &str| {
        run(&[
            "--out".into(),
            two.display().to_string(),
            "--nodes".into(),
            "2".into(),
            "--node-rank".into(),
            rank.to_string(),
            "--lead".into(),
            lead.clone(),
            "--peer-timeout".into(),
            timeout.into(),
        ])
    };
    let nodes = vec![node(0, "120"), node(1, "120")];
    let outputs: Vec<_> = nodes.into_iter().map(|n| n.wait_with_output().unwrap()).collect();
    for (rank, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success(),
            "node {rank}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let diff = relative_diff(
        &adapter(&one.join("checkpoints/last")),
        &adapter(&two.join("checkpoints/last")),
    );
    println!("2 processes vs 1: adapter after 5 steps {diff:.1e} (relative)");
    assert!(diff < TOLERANCE, "2 nodes end {diff:e} from 1 device");

    // Node 0 alone: it gives up waiting for node 1, with a message.
    let started = Instant::now();
    std::fs::remove_dir_all(&two).ok();
    let alone = node(0, "3").wait_with_output().unwrap();
    let message = String::from_utf8_lossy(&alone.stderr);
    assert!(
        !alone.status.success() && message.contains("nodes 1 did not connect in 3 s"),
        "{message}"
    );
    assert!(started.elapsed().as_secs() < 60);
    // Node 1 killed mid-run: node 0 stops with an error, it does not hang.
    std::fs::remove_dir_all(&two).ok();
    let mut steps = config.clone();
    steps.steps = 100_000;
    steps.eval_every = 0;
    std::fs::write(&config_path, serde_json::to_string_pretty(&steps).unwrap()).unwrap();
    let (lead_node, mut member) = (node(0, "60"), node(1, "60"));
    std::thread::sleep(std::time::Duration::from_secs(3));
    member.kill().unwrap();
    member.wait().unwrap();
    let started = Instant::now();
    let output = lead_node.wait_with_output().unwrap();
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && message.contains("node 1: the connection closed"),
        "{message}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "node 0 waited {} s",
        started.elapsed().as_secs()
    );
    println!("node 1 killed: node 0 said {:?}", message.lines().last().unwrap_or(""));
    std::fs::remove_dir_all(&root).ok();
}
