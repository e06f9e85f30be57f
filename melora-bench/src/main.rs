//! `melora-bench`: parameter tables and benchmarks for melora.

use melora_cli::backend;
#[cfg(feature = "mpi")]
mod allreduce;
mod compare;
mod params;
mod questions;
mod scoring;
mod step;

use anyhow::Result;
use clap::{Parser, Subcommand};
use melora_llama::model::Target;

/// Parameter tables, step-time benchmarks and comparisons for melora.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Under an MPI launcher (`mpirun -np 2 melora-bench allreduce`): one
    /// sum of a gradient vector over the ranks as training makes it (reduce
    /// and broadcast) beside MPI_Allreduce, the median of the rounds (the
    /// `mpi` feature).
    #[cfg(feature = "mpi")]
    Allreduce {
        /// Vector sizes in f32 values (default: SmolLM2-135M's and
        /// Llama-2-7B's LoRA gradients at r = 8 on q, v: 1.8 and 17 MB).
        #[arg(long, value_delimiter = ',', default_value = "460800,4194304")]
        values: Vec<usize>,
        /// Timed rounds per size.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Trainable parameters and adapter sizes (the paper's Table 1), counted
    /// from the built adapters.
    Params {
        /// Ranks to tabulate.
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        ranks: Vec<usize>,
        /// Adapted projections.
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        /// JSON instead of a Markdown table.
        #[arg(long)]
        json: bool,
    },
    /// Median training-step (or inference) time after warm-up, tokens per
    /// second, peak memory.
    Step {
        /// A preset (smollm2-135m; llama2-7b and llama2-13b with random weights), a folder or a GGUF file.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// lora, blob or melora.
        #[arg(long, default_value = "melora")]
        method: String,
        /// Sequences per step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Adapter rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Adapted projections.
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        /// Time a forward pass instead of a training step.
        #[arg(long)]
        inference: bool,
        /// Samples per example in inference mode (each example repeated S times, one draw each).
        #[arg(long, default_value_t = 1)]
        samples: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// f32, or bf16 / f16 on a GPU backend.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Data-parallel peers of a training step (threads sharing the CPU on
        /// ndarray, one per GPU on CUDA): the batch split over them, the
        /// gradients all-reduced (burn-collective).
        #[arg(long, default_value_t = 1)]
        peers: usize,
        /// Cut a random-weights preset to this many layers (same shapes;
        /// e.g. to warm an autotune cache).
        #[arg(long)]
        layers: Option<usize>,
        /// JSON instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// Our step and the PyTorch + PEFT peer's (peers/peft_step.py), alternating, with ratios.
    Compare {
        /// The peer's Python (with torch, transformers, peft: peers/setup.sh).
        #[arg(long, default_value = ".melora-cache/peer-venv/bin/python")]
        python: std::path::PathBuf,
        /// A preset, a folder or a GGUF file.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// Sequences per step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed steps per round.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Alternating rounds.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// Reading and checking a question file of one's own (`melora train
    /// --data`): the same seeded questions as JSONL, CSV and snappy
    /// Parquet, the fastest of the rounds.
    Questions {
        /// Questions in the file.
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        /// Timed reads of each file.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Answer scoring against label scoring on the same ARC-Easy questions
    /// (SmolLM2-135M, LoRA r = 8 on q and v): tokens and seconds per
    /// question of training steps and of an evaluation pass, alternating.
    Scoring {
        /// Questions (a seeded subset of the validation split).
        #[arg(long, default_value_t = 64)]
        questions: usize,
        /// Questions per step / evaluation pass.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Alternating rounds.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// JSON instead of Markdown tables.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    backend::tune_process();
    match Cli::parse().command {
        #[cfg(feature = "mpi")]
        Command::Allreduce { values, rounds } => {
            let rows = allreduce::run(&values, rounds)?;
            if !rows.is_empty() {
                print!("{}", allreduce::markdown(&rows));
            }
        }
        Command::Questions { n, rounds, json } => {
            let timings = questions::run(n, rounds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&timings)?);
            } else {
                println!("| format | {n} questions, MB | seconds | questions/s |\n|---|---:|---:|---:|");
                for t in timings {
                    println!(
                        "| {} | {:.1} | {:.3} | {:.0} |",
                        t.format,
                        t.bytes as f64 / 1e6,
                        t.seconds,
                        t.questions_per_second
                    );
                }
            }
        }
        Command::Params { ranks, targets, json } => {
            let targets = Target::parse_list(&targets)?;
            let rows = params::table(&ranks, &targets)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", params::markdown(&rows));
            }
        }
        Command::Compare {
            python,
            model,
            batch,
            seq,
            steps,
            rounds,
        } => {
            let args = step::StepArgs {
                model,
                method: melora_core::AdapterKind::Lora,
                batch,
                seq,
                steps,
                warmup: 2,
                rank: 8,
                targets: "q_proj,v_proj".into(),
                inference: false,
                samples: 1,
                seed: 0,
                dtype: "f32".into(),
                peers: 1,
                layers: None,
            };
            let results = compare::compare(&python, &args, rounds)?;
            print!("{}", compare::markdown(&results));
        }
        Command::Scoring {
            questions,
            batch,
            rounds,
            json,
        } => {
            let rows = scoring::run(&scoring::ScoringArgs {
                questions,
                batch,
                rounds,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", scoring::markdown(&rows));
            }
        }
        Command::Step {
            model,
            method,
            batch,
            seq,
            steps,
            warmup,
            rank,
            targets,
            inference,
            samples,
            seed,
            dtype,
            peers,
            layers,
            json,
        } => {
            let method = method.parse().map_err(anyhow::Error::msg)?;
            let report = step::run(&step::StepArgs {
                model,
                method,
                batch,
                seq,
                steps,
                warmup,
                rank,
                targets,
                inference,
                samples,
                seed,
                dtype,
                peers,
                layers,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} {} {} on {} ({}): batch {} x seq {} (S = {}), {} peer(s): median {:.3} s (min {:.3}), {:.0} tokens/s, peak RSS {}",
                    report.model,
                    report.method,
                    report.mode,
                    report.backend,
                    report.dtype,
                    report.batch,
                    report.seq,
                    report.samples,
                    report.peers,
                    report.median_seconds,
                    report.min_seconds,
                    report.tokens_per_second,
                    report.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.0} MiB"))
                );
            }
        }
    }
    Ok(())
}
