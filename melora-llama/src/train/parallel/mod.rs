//! Data-parallel training: one model replica per device (a
//! *peer*), each computing its share of every batch; the data gradients are
//! summed over the peers with burn-collective's all-reduce, then every peer
//! takes the same optimiser step, so the replicas stay equal.
//!
//! - In one process the peers are threads, one per device: on the CPU
//!   backend they share the CPU (Burn's own collective tests run that way),
//!   on CUDA peer `d` takes GPU `d`.
//! - Across processes and machines each process is a *rank* that an MPI
//!   launcher started (`mpirun -np N melora train ...`, `srun` on Slurm;
//!   the `mpi` feature), with its own peers. In a process,
//!   burn-collective's local all-reduce sums over the devices, then local
//!   peer 0 sums over the ranks through MPI ([`NodeLink`]: a reduce to rank
//!   0 and a broadcast, so every rank gets the same bits) and the result
//!   goes back to the other local peers (a second local all-reduce to which
//!   they add zeros). burn-collective's own multi-node path (its global
//!   orchestrator) is not used: in 0.21.0 its nodes hang in their second
//!   collective operation (`SyncService::sync` in `global/node/sync.rs`
//!   clears a copy of the list of nodes that have synced, not the list, so
//!   the next sync never sees it complete), and later Burn releases dropped
//!   it.
//!
//! What is summed and what is not: each peer scores rows `share` of the
//! batch and weights its mean NLL by `|share| / batch`, so the all-reduced
//! sum of the peers' gradients is the whole batch's gradient for any split,
//! also an uneven one. The KL term depends on the parameters only; every
//! replica computes the same KL gradient itself and it is not all-reduced.
//! The noise of each example is drawn from `(seed, step, example index)`
//! ([`melora_core::RowNoise`]), so a split draws what one device draws.
//!
//! Failures: a non-finite loss is seen by every peer (the summed NLL is
//! non-finite), and all stop with the same error. Any other error of a peer
//! (the lead's validation or checkpoint, a panic) is told to the others at
//! the end-of-step agreement ([`Peer::agree`]); a peer thread that fails
//! also resets the process's collective, which turns the other threads'
//! waits into errors. Between ranks, MPI ends the job when a rank dies
//! (the launcher names it), and a rank whose sum does not complete in the
//! timeout ends itself with a message, which ends the job.

#[cfg(feature = "mpi")]
pub mod mpi_link;
mod nodes;

pub use nodes::{first_difference, launched_by_mpi, NodeLink, Nodes};

use crate::error::LlamaError;
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_collective::{
    all_reduce, finish_collective, register, reset_collective, CollectiveConfig, PeerId, ReduceOperation,
};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where the peers of a run are.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Peers (devices) in this process.
    pub devices: usize,
    /// The processes of a multi-node run (`None`: this process only).
    pub nodes: Option<Nodes>,
}

impl Cluster {
    /// The peers of the whole run.
    pub fn peers(&self) -> usize {
        self.devices * self.nodes.as_ref().map_or(1, |n| n.count as usize)
    }

    /// Whether the run has more than one peer.
    pub fn is_parallel(&self) -> bool {
        self.peers() > 1
    }

    fn check(&self, batch_size: usize) -> crate::Result<()> {
        let bad = |message: String| Err(LlamaError::Peers(message));
        if self.devices == 0 {
            return bad("devices must be at least 1".into());
        }
        if let Some(n) = &self.nodes {
            if n.count == 0 || n.rank >= n.count {
                return bad(format!("rank {} is not below the rank count {}", n.rank, n.count));
            }
        }
        if self.peers() > batch_size {
            return bad(format!(
                "{} peers for a batch of {batch_size}: every peer needs at least one example",
                self.peers()
            ));
        }
        Ok(())
    }

    fn collective(&self) -> CollectiveConfig {
        CollectiveConfig::default().with_num_devices(self.devices)
    }
}

/// One peer of a data-parallel run, as its training loop sees it.
#[derive(Debug)]
pub struct Peer {
    /// The peer's index over the whole run (`node * devices + device`).
    pub rank: usize,
    /// The peers of the run.
    pub peers: usize,
    /// The peer's index in this process (its device).
    pub local: usize,
    id: PeerId,
    /// Peers in this process.
    devices: usize,
    /// Whether the run spans several nodes.
    multi_node: bool,
    /// The link to the other nodes (local peer 0 of a multi-node run).
    link: Option<Arc<Mutex<NodeLink>>>,
    /// Set when any peer of this process failed (the others stop waiting).
    failed: Arc<AtomicBool>,
}

/// What the peers agreed at the end of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    /// Every peer goes on.
    Continue,
    /// The lead asked to stop (its checkpoint is written).
    Stop,
    /// A peer failed: every peer stops (the failed one with its error).
    Failed,
}

impl Peer {
    /// Whether this peer leads: it validates, logs and writes checkpoints.
    pub fn lead(&self) -> bool {
        self.rank == 0
    }

    /// The rows of a batch of `size` examples this peer computes: a
    /// contiguous block, the first `size % peers` peers one row more.
    pub fn share(&self, size: usize) -> Range<usize> {
        share(self.rank, self.peers, size)
    }

    /// Sums `values` over the peers (in f32).
    pub fn sum<B: Backend>(&self, values: &[f64], device: &B::Device) -> crate::Result<Vec<f64>> {
        let data = TensorData::new(values.iter().map(|&v| v as f32).collect::<Vec<f32>>(), [values.len()]);
        let summed = self.all_sum(Tensor::<B, 1>::from_data(data, device))?;
        Ok(summed.into_data().convert::<f64>().to_vec().expect("f64 values"))
    }

    /// `tensor` summed over every peer of the run: over this process's
    /// devices (burn-collective), then over the ranks (local peer 0 through
    /// the [`NodeLink`]), then back to this process's other peers.
    fn all_sum<B: Backend>(&self, tensor: Tensor<B, 1>) -> crate::Result<Tensor<B, 1>> {
        let device = tensor.device();
        let local = self.local_sum(tensor)?;
        if !self.multi_node {
            return Ok(local);
        }
        let global = match &self.link {
            Some(link) => {
                // In the tensors' own precision: an f64 run sums in f64.
                let data = local.into_data();
                let n = data.num_elements();
                let mut link = link.lock().expect("the node link");
                let summed = if data.dtype == DType::F64 {
                    let mut values: Vec<f64> = data.to_vec().expect("f64 values");
                    self.guard(link.sum(&mut values))?;
                    TensorData::new(values, [n])
                } else {
                    let mut values: Vec<f32> = data.convert::<f32>().to_vec().expect("f32 values");
                    self.guard(link.sum(&mut values))?;
                    TensorData::new(values, [n])
                };
                Tensor::from_data(summed, &device)
            }
            None => local.zeros_like(),
        };
        // Local peer 0 gives the total, the others zeros.
        self.local_sum(global)
    }

    fn local_sum<B: Backend>(&self, tensor: Tensor<B, 1>) -> crate::Result<Tensor<B, 1>> {
        if self.devices == 1 {
            return Ok(tensor);
        }
        let summed = self.wait(|| all_reduce::<B>(self.id, tensor.into_primitive().tensor(), ReduceOperation::Sum))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
    }

    /// The data gradients of `ids` (matrices, as the adapters' parameters
    /// are) summed over the peers, in one all-reduce: the gradients are
    /// laid end to end in id order, summed, and cut back (burn-optim's
    /// `GradientsParams::all_reduce` makes one all-reduce per parameter,
    /// 60 to 240 per step for SmolLM2's adapters, each a round trip).
    /// Every peer must give the same ids; a gradient
    /// missing on one peer makes the lengths differ, which the all-reduce
    /// refuses.
    pub fn sum_grads<B: AutodiffBackend>(
        &self,
        mut grads: GradientsParams,
        ids: &[ParamId],
    ) -> crate::Result<GradientsParams> {
        let mut ids = ids.to_vec();
        ids.sort();
        let mut parts = Vec::new();
        let mut flat = Vec::new();
        for id in ids {
            if let Some(g) = grads.remove::<B::InnerBackend, 2>(id) {
                parts.push((id, g.dims()));
                flat.push(g.flatten::<1>(0, 1));
            }
        }
        if flat.is_empty() {
            return Ok(grads);
        }
        let all = Tensor::cat(flat, 0);
        let length = all.dims()[0];
        let summed = self.all_sum(all)?;
        let mut offset = 0;
        for (id, [rows, cols]) in parts {
            grads.register(
                id,
                summed.clone().slice(offset..offset + rows * cols).reshape([rows, cols]),
            );
            offset += rows * cols;
        }
        debug_assert_eq!(offset, length);
        Ok(grads)
    }

    /// The end-of-step agreement: every peer says whether it failed, the
    /// lead whether the run should stop.
    pub fn agree<B: Backend>(&self, failed: bool, stop: bool, device: &B::Device) -> crate::Result<Agreement> {
        let flags = self.sum::<B>(
            &[f64::from(u8::from(failed)), f64::from(u8::from(stop && self.lead()))],
            device,
        )?;
        Ok(if flags[0] > 0.0 {
            Agreement::Failed
        } else if flags[1] > 0.0 {
            Agreement::Stop
        } else {
            Agreement::Continue
        })
    }

    /// A link error, once this process has failed already, is that failure.
    fn guard<T>(&self, result: crate::Result<T>) -> crate::Result<T> {
        result.map_err(|e| {
            if self.failed.load(Ordering::SeqCst) {
                LlamaError::Peers("another peer failed".into())
            } else {
                e
            }
        })
    }

    /// Runs a local collective operation; its error is an error.
    fn wait<T, E: std::fmt::Debug>(&self, op: impl FnOnce() -> Result<T, E>) -> crate::Result<T> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(LlamaError::Peers("another peer failed".into()));
        }
        op().map_err(|e| {
            if self.failed.load(Ordering::SeqCst) {
                LlamaError::Peers("another peer failed".into())
            } else {
                LlamaError::Peers(format!("the all-reduce failed: {e:?}"))
            }
        })
    }
}

/// Rows `share` of a batch of `size` for peer `rank` of `peers`.
pub fn share(rank: usize, peers: usize, size: usize) -> Range<usize> {
    let (base, extra) = (size / peers, size % peers);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The device of local peer `d`: device `d` of the backend's kind (the
/// same CPU for every peer on ndarray).
pub fn peer_device<B: Backend>(first: &B::Device, d: usize) -> B::Device {
    use burn::prelude::DeviceOps;
    let mut id = first.to_id();
    id.index_id += u16::try_from(d).expect("fewer than 65536 devices");
    <B::Device as DeviceOps>::from_id(id)
}

/// Runs the local peers of `cluster`: local peer 0 (`lead`) on this
/// thread, the others (`others`) on threads of their own, each with its
/// device; returns local peer 0's result, or the error that says what went
/// wrong (not "another peer failed") when any peer failed.
pub fn run_peers<B: AutodiffBackend, T: Send>(
    cluster: &Cluster,
    batch_size: usize,
    first: &B::Device,
    lead: impl FnOnce(Peer, B::Device) -> crate::Result<T>,
    others: &(dyn Fn(Peer, B::Device) -> crate::Result<T> + Sync),
) -> crate::Result<T> {
    cluster.check(batch_size)?;
    let collective = cluster.collective();
    let peers = cluster.peers();
    let node = cluster.nodes.as_ref().map_or(0, |n| n.rank as usize);
    let link = cluster.nodes.as_ref().map(Nodes::link);
    let failed = Arc::new(AtomicBool::new(false));
    reset_collective::<B::InnerBackend>();
    let run_one = |d: usize, body: &mut dyn FnMut(Peer, B::Device) -> crate::Result<T>| -> crate::Result<T> {
        let peer = Peer {
            rank: node * cluster.devices + d,
            local: d,
            peers,
            id: PeerId::from(d),
            devices: cluster.devices,
            multi_node: cluster.nodes.is_some(),
            link: if d == 0 { link.clone() } else { None },
            failed: failed.clone(),
        };
        let device = peer_device::<B>(first, d);
        let id = peer.id;
        let registered = if cluster.devices > 1 {
            peer.wait(|| register::<B::InnerBackend>(id, device.clone(), collective.clone()))
        } else {
            Ok(())
        };
        let result = registered.and_then(|()| {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(peer, device))) {
                Ok(result) => result,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                    Err(LlamaError::Peers(format!(
                        "peer {d} panicked: {}",
                        message.unwrap_or_default()
                    )))
                }
            }
        });
        match &result {
            Ok(_) if cluster.devices == 1 => {}
            Ok(_) => {
                let _ = finish_collective::<B::InnerBackend>(id);
            }
            // Wakes the peers still waiting in an all-reduce.
            Err(_) if !failed.swap(true, Ordering::SeqCst) => reset_collective::<B::InnerBackend>(),
            Err(_) => {}
        }
        result
    };
    let (lead_result, other_errors) = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..cluster.devices)
            .map(|d| {
                let run_one = &run_one;
                scope.spawn(move || run_one(d, &mut |peer, device| others(peer, device)))
            })
            .collect();
        let mut lead = Some(lead);
        let lead_result = run_one(0, &mut |peer, device| {
            (lead.take().expect("the lead runs once"))(peer, device)
        });
        let errors: Vec<LlamaError> = handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(LlamaError::Peers("a peer thread panicked".into())))
                    .err()
            })
            .collect();
        (lead_result, errors)
    });
    let secondary = |e: &LlamaError| matches!(e, LlamaError::Peers(m) if m == "another peer failed");
    match lead_result {
        Ok(value) => match other_errors.into_iter().next() {
            None => Ok(value),
            Some(e) => Err(e),
        },
        Err(e) if secondary(&e) => Err(other_errors.into_iter().find(|e| !secondary(e)).unwrap_or(e)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_batch_in_order() {
        for size in 1..12 {
            for peers in 1..=size {
                let shares: Vec<_> = (0..peers).map(|r| share(r, peers, size)).collect();
                assert_eq!(shares[0].start, 0);
                assert_eq!(shares[peers - 1].end, size);
                for w in shares.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<_> = shares.iter().map(|s| s.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1, "{lens:?}");
            }
        }
    }
}
