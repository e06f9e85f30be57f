//! `melora train` over several processes started by Open MPI's `mpirun` on
//! localhost (the `mpi` feature; `mpirun` on the PATH): two ranks take the
//! steps one process takes, with one device each and with two; a 2-rank run
//! killed after a checkpoint and resumed ends with the uninterrupted 2-rank
//! run's bytes (a rank without the lead's checkpoint is refused); ranks with
//! different settings stop at the start naming the setting; rank 0 alone
//! writes the run folder; a non-finite loss stops every rank with the same
//! message; a killed rank ends the job with a message naming it; a rank
//! that stops answering is given up after `--peer-timeout`. The binary runs
//! the tiny fixture model on ARC-Easy data in the real format.

#[path = "../../melora-llama/tests/common/mod.rs"]
mod common;

use common::fake_data::{tiny_home, TinyHome};
use common::parallel::*;
use melora_llama::data::Scoring;
use melora_llama::train::Method;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Relative to the adapter's largest entry, after 5 steps in f32 (see
/// melora-llama's `parallel_f64.rs` for why it is not 0).
const TOLERANCE: f64 = 5e-4;

struct Setup {
    root: PathBuf,
    home: PathBuf,
    config: PathBuf,
}

fn setup(name: &str, steps: usize) -> Setup {
    let TinyHome { root, home, model } = tiny_home(name);
    let mut config = config(Method::MeLora, Scoring::Answer, 4).with_max_validation(Some(4));
    config.model = model.display().to_string();
    config.steps = steps;
    let path = root.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    Setup {
        root,
        home,
        config: path,
    }
}

/// `melora train` on the setup's config with `args`, as one process.
fn alone(setup: &Setup, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(["train", "--plain", "--config"])
        .arg(&setup.config)
        .args(args)
        .env("MELORA_HOME", &setup.home)
        .output()
        .unwrap()
}

/// `mpirun` with each of `ranks` a `melora train` on the setup's config
/// with those arguments (one `-np 1` block per rank).
fn mpirun(setup: &Setup, ranks: &[Vec<String>]) -> Child {
    let mut command = Command::new("mpirun");
    // Root in a container, two cores: both allowed explicitly; no
    // cross-memory attach between the ranks (containers often forbid it).
    command.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--mca",
        "btl_vader_single_copy_mechanism",
        "none",
        "-x",
        "MELORA_HOME",
    ]);
    for (k, args) in ranks.iter().enumerate() {
        if k > 0 {
            command.arg(":");
        }
        command
            .args(["-np", "1", env!("CARGO_BIN_EXE_melora"), "train", "--plain", "--config"])
            .arg(&setup.config)
            .args(args);
    }
    command
        .env("MELORA_HOME", &setup.home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (Open MPI: apt install openmpi-bin libopenmpi-dev)")
}

fn same(args: &[&str], ranks: usize) -> Vec<Vec<String>> {
    vec![args.iter().map(|a| a.to_string()).collect(); ranks]
}

fn out_arg(dir: &Path) -> String {
    dir.display().to_string()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The rank processes `mpirun` started (its children, from /proc).
fn ranks_of(mpirun: &Child) -> Vec<u32> {
    let parent = mpirun.id().to_string();
    let mut ranks: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            after.split_whitespace().nth(1) == Some(parent.as_str())
        })
        .collect();
    ranks.sort();
    ranks
}

/// Sends `signal` (`-9`, `-STOP`) to `pid` through the shell's `kill`.
fn signal(signal: &str, pid: u32) {
    Command::new("sh")
        .args(["-c", &format!("kill {signal} {pid}")])
        .status()
        .unwrap();
}

fn wait_for(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended before {}",
            path.display()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no {} in 120 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_ranks_take_the_steps_one_process_takes() {
    let setup = setup("mpi-steps", 5);
    let one = setup.root.join("one");
    let output = alone(&setup, &["--out", &out_arg(&one)]);
    assert!(output.status.success(), "{}", text(&output));
    let reference = adapter(&one.join("checkpoints/last"));
    for devices in ["1", "2"] {
        let two = setup.root.join(format!("two-ranks-{devices}-devices"));
        let output = mpirun(&setup, &same(&["--out", &out_arg(&two), "--devices", devices], 2))
            .wait_with_output()
            .unwrap();
        assert!(output.status.success(), "{}", text(&output));
        let diff = relative_diff(&reference, &adapter(&two.join("checkpoints/last")));
        println!("2 ranks x {devices} device(s) vs 1 process: adapter after 5 steps {diff:.1e} (relative)");
        assert!(diff < TOLERANCE, "2 ranks x {devices}: {diff:e} from 1 process");
    }
    std::fs::remove_dir_all(&setup.root).ok();
}

#[test]
fn a_two_rank_run_killed_and_resumed_ends_with_the_uninterrupted_bytes() {
    let setup = setup("mpi-resume", 6);
    let (whole, killed) = (setup.root.join("whole"), setup.root.join("killed"));
    let output = mpirun(&setup, &same(&["--out", &out_arg(&whole)], 2))
        .wait_with_output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    // Killed (every process, as a lost job is) once step 2's checkpoint is
    // written, then resumed by the same command with --resume.
    let mut job = mpirun(&setup, &same(&["--out", &out_arg(&killed)], 2));
    wait_for(&killed.join("checkpoints/last/state.json"), &mut job);
    for pid in ranks_of(&job) {
        signal("-9", pid);
    }
    job.kill().ok();
    job.wait().unwrap();
    // A rank that cannot see the lead's checkpoint would start at step 0:
    // refused.
    let elsewhere = setup.root.join("elsewhere");
    let ranks = vec![
        vec!["--out".to_string(), out_arg(&killed), "--resume".into()],
        vec!["--out".to_string(), out_arg(&elsewhere), "--resume".into()],
    ];
    let output = mpirun(&setup, &ranks).wait_with_output().unwrap();
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("the peers start at different steps"), "{said}");
    let output = mpirun(&setup, &same(&["--out", &out_arg(&killed), "--resume"], 2))
        .wait_with_output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    for file in ["adapter_model.safetensors", "state.json"] {
        let a = std::fs::read(whole.join("checkpoints/last").join(file)).unwrap();
        let b = std::fs::read(killed.join("checkpoints/last").join(file)).unwrap();
        assert!(a == b, "{file} differs after the resume");
    }
    std::fs::remove_dir_all(&setup.root).ok();
}

#[test]
fn ranks_with_different_settings_stop_at_the_start_naming_the_setting() {
    let setup = setup("mpi-settings", 5);
    let out = out_arg(&setup.root.join("run"));
    let ranks = vec![
        vec!["--out".to_string(), out.clone()],
        vec!["--out".to_string(), out, "--set".into(), "lr=0.5".into()],
    ];
    let start = Instant::now();
    let output = mpirun(&setup, &ranks).wait_with_output().unwrap();
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("rank 1's settings differ from rank 0's in `lr`: rank 0 has 0.01, rank 1 has 0.5"),
        "{said}"
    );
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(!setup.root.join("run/checkpoints").exists(), "nothing was trained");
    std::fs::remove_dir_all(&setup.root).ok();
}

#[test]
fn a_killed_rank_ends_the_job_and_a_silent_one_is_given_up() {
    let setup = setup("mpi-failures", 100_000);
    // Rank killed: the launcher ends the job and names the rank.
    let run = setup.root.join("killed");
    let mut job = mpirun(&setup, &same(&["--out", &out_arg(&run)], 2));
    wait_for(&run.join("checkpoints/last/state.json"), &mut job);
    let ranks = ranks_of(&job);
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    signal("-9", ranks[1]);
    let start = Instant::now();
    let output = job.wait_with_output().unwrap();
    let said = text(&output);
    println!("a rank killed: mpirun said {said:?}");
    assert!(!output.status.success());
    assert!(said.contains("rank") && said.contains("signal 9"), "{said}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the job waited {:?}",
        start.elapsed()
    );
    // A rank stopped (SIGSTOP): the other gives up after --peer-timeout.
    let run = setup.root.join("stopped");
    let mut job = mpirun(&setup, &same(&["--out", &out_arg(&run), "--peer-timeout", "3"], 2));
    wait_for(&run.join("checkpoints/last/state.json"), &mut job);
    let ranks = ranks_of(&job);
    signal("-STOP", ranks[1]);
    let start = Instant::now();
    let output = job.wait_with_output().unwrap();
    let said = text(&output);
    assert!(!output.status.success());
    assert!(
        said.contains("the other ranks did not answer in 3 s (--peer-timeout)"),
        "{said}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the job waited {:?}",
        start.elapsed()
    );
    for pid in ranks {
        signal("-9", pid);
    }
    std::fs::remove_dir_all(&setup.root).ok();
}

#[test]
fn rank_0_alone_writes_and_a_non_finite_loss_stops_every_rank() {
    let setup = setup("mpi-lead", 3);
    // Each rank told another folder: only rank 0's is written.
    let (lead, other) = (setup.root.join("lead"), setup.root.join("other"));
    let ranks = vec![
        vec!["--out".to_string(), out_arg(&lead)],
        vec!["--out".to_string(), out_arg(&other)],
    ];
    let output = mpirun(&setup, &ranks).wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    assert!(lead.join("checkpoints/last/adapter_model.safetensors").exists());
    assert!(!other.exists(), "rank 1 wrote {}", other.display());
    // A KL that is infinite on every rank (prior std 1e-30: its square is 0
    // in f32): each stops at step 1 with the same message.
    let run = out_arg(&setup.root.join("non-finite"));
    let args = ["--out", &run, "--method", "blob", "--set", "prior.std=1e-30"];
    let output = mpirun(&setup, &same(&args, 2)).wait_with_output().unwrap();
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    for rank in 0..2 {
        assert!(
            said.contains(&format!(
                "Error: rank {rank}: training stopped at step 1: the KL is inf"
            )),
            "{said}"
        );
    }
    std::fs::remove_dir_all(&setup.root).ok();
}
