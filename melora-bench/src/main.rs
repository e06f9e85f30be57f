//! `melora-bench`: parameter tables and benchmarks for melora.

mod params;

use anyhow::Result;
use clap::{Parser, Subcommand};
use melora_llama::weights::Target;

/// Parameter tables, step-time benchmarks and comparisons for melora.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Params { ranks, targets, json } => {
            let targets = Target::parse_list(&targets)?;
            let rows = params::table(&ranks, &targets)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", params::markdown(&rows));
            }
        }
    }
    Ok(())
}
