//! `melora-bench allreduce`, under an MPI launcher (`mpirun -np 2`): the
//! time of one sum of a gradient vector over the ranks through MPI (reduce
//! to rank 0, then broadcast: what training does) beside the TCP node link
//! (`--nodes`), in the same run, alternating, the median of the rounds.

use anyhow::{bail, Result};
use melora_llama::train::parallel::mpi_link::MpiLink;
use melora_llama::train::parallel::NodeLink;
use melora_llama::train::Nodes;
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
    /// Median seconds of one sum through MPI.
    pub mpi_seconds: f64,
    /// Median seconds of one sum through the TCP node link.
    pub node_link_seconds: f64,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Each of `sizes` summed `rounds` times by each link, alternating; the
/// rows on rank 0 (the other ranks return none).
pub fn run(sizes: &[usize], rounds: usize) -> Result<Vec<Row>> {
    let timeout = Duration::from_secs(120);
    let mut mpi = MpiLink::init(timeout)?;
    let (rank, ranks) = (mpi.rank(), mpi.size());
    if ranks < 2 {
        bail!("run it under an MPI launcher with two or more ranks: mpirun -np 2 melora-bench allreduce");
    }
    // Rank 0 picks a free port for the node link and tells the others.
    let mut port = Vec::new();
    if rank == 0 {
        let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        port = free.to_le_bytes().to_vec();
    }
    mpi.broadcast_bytes(&mut port);
    let port = u16::from_le_bytes([port[0], port[1]]);
    let nodes = Nodes {
        count: ranks,
        rank,
        lead: format!("127.0.0.1:{port}"),
        timeout_seconds: timeout.as_secs(),
    };
    let mut link = NodeLink::connect(&nodes, 1)?;
    let mut rows = Vec::new();
    for &n in sizes {
        let mut values: Vec<f32> = (0..n).map(|i| ((i + rank as usize) % 97) as f32 * 1e-3).collect();
        let (mut by_mpi, mut by_link) = (Vec::new(), Vec::new());
        // One untimed round of each, then the timed ones.
        for round in 0..=rounds {
            let mut barrier = [0f32];
            mpi.sum(&mut barrier)?;
            let start = Instant::now();
            mpi.sum(&mut values)?;
            let mpi_time = start.elapsed().as_secs_f64();
            mpi.sum(&mut barrier)?;
            let start = Instant::now();
            link.sum(&mut values)?;
            let link_time = start.elapsed().as_secs_f64();
            if round > 0 {
                by_mpi.push(mpi_time);
                by_link.push(link_time);
            }
            // Keeps the values finite and the same on every rank.
            values.iter_mut().for_each(|v| *v /= 2.0 * ranks as f32);
        }
        rows.push(Row {
            values: n,
            megabytes: 4.0 * n as f64 / 1e6,
            ranks,
            mpi_seconds: median(by_mpi),
            node_link_seconds: median(by_link),
        });
    }
    Ok(if rank == 0 { rows } else { Vec::new() })
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| values (f32) | MB | ranks | MPI (reduce + broadcast), ms | TCP node link, ms | node link / MPI |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.1} | {} | {:.2} | {:.2} | {:.2} |\n",
            r.values,
            r.megabytes,
            r.ranks,
            1e3 * r.mpi_seconds,
            1e3 * r.node_link_seconds,
            r.node_link_seconds / r.mpi_seconds
        ));
    }
    out
}
