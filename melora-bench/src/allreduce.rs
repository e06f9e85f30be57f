//! `melora-bench allreduce`, under an MPI launcher (`mpirun -np 2`): the
//! time of one sum of a gradient vector over the ranks as training makes
//! it (`MpiLink::sum`: a reduce to rank 0, then a broadcast, so every rank
//! gets the same bits) beside `MPI_Allreduce`, alternating, the median of
//! the rounds.

use crate::step::median;
use anyhow::{bail, Result};
use melora_llama::train::parallel::mpi_link::MpiLink;
use std::time::{Duration, Instant};

/// One vector size's timings, as rank 0 measured them.
#[derive(Debug, serde::Serialize)]
pub struct Row {
    /// f32 values summed.
    pub values: usize,
    /// Their size in MB.
    pub megabytes: f64,
    /// Ranks.
    pub ranks: u32,
    /// Median seconds of one sum as training makes it.
    pub reduce_broadcast_seconds: f64,
    /// Median seconds of one `MPI_Allreduce`.
    pub allreduce_seconds: f64,
}

/// Each of `sizes` summed `rounds` times each way, alternating, after an
/// untimed round; the rows on rank 0 (the other ranks return none).
pub fn run(sizes: &[usize], rounds: usize) -> Result<Vec<Row>> {
    let mut link = MpiLink::init(Duration::from_secs(120))?;
    let (rank, ranks) = (link.rank(), link.size());
    if ranks < 2 {
        bail!("run it under an MPI launcher with two or more ranks: mpirun -np 2 melora-bench allreduce");
    }
    let mut rows = Vec::new();
    for &n in sizes {
        let mut values: Vec<f32> = (0..n).map(|i| ((i + rank as usize) % 97) as f32 * 1e-3).collect();
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..=rounds {
            let mut barrier = [0f32];
            link.sum(&mut barrier)?;
            let start = Instant::now();
            link.sum(&mut values)?;
            let reduce_broadcast = start.elapsed().as_secs_f64();
            link.sum(&mut barrier)?;
            let start = Instant::now();
            link.all_reduce_sum(&mut values);
            let allreduce = start.elapsed().as_secs_f64();
            if round > 0 {
                ours.push(reduce_broadcast);
                theirs.push(allreduce);
            }
            // Keeps the values finite.
            values.iter_mut().for_each(|v| *v /= (ranks * ranks) as f32);
        }
        rows.push(Row {
            values: n,
            megabytes: 4.0 * n as f64 / 1e6,
            ranks,
            reduce_broadcast_seconds: median(ours),
            allreduce_seconds: median(theirs),
        });
    }
    Ok(if rank == 0 { rows } else { Vec::new() })
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| values (f32) | MB | ranks | reduce + broadcast (training's), ms | MPI_Allreduce, ms |\n|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} | {} | {:.2} | {:.2} |\n",
            r.values,
            r.megabytes,
            r.ranks,
            1e3 * r.reduce_broadcast_seconds,
            1e3 * r.allreduce_seconds
        ));
    }
    out
}
