//! The processes (ranks) of a run over several machines, as an MPI
//! launcher started them: this rank's place, the link to the others, and
//! the start-of-run agreement on the settings.

use crate::error::LlamaError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[cfg(feature = "mpi")]
pub use super::mpi_link::MpiLink as NodeLink;

/// Without the `mpi` feature there is no link between processes: this
/// type has no value, so a run is always on one process.
#[cfg(not(feature = "mpi"))]
#[derive(Debug)]
pub enum NodeLink {}

#[cfg(not(feature = "mpi"))]
impl NodeLink {
    /// `values` summed over the ranks (never called: there is no link).
    pub fn sum<T>(&mut self, _values: &mut [T]) -> crate::Result<()> {
        match *self {}
    }

    /// Rank 0's `bytes` on every rank (never called: there is no link).
    pub fn broadcast_bytes(&mut self, _bytes: &mut Vec<u8>) {
        match *self {}
    }
}

/// Environment variables an MPI launcher sets in each rank: Open MPI's
/// `mpirun`, and PMI / PMIx as MPICH's `mpiexec` and Slurm's `srun` use.
const LAUNCHER_VARIABLES: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"];

/// Whether this process was started by an MPI launcher.
pub fn launched_by_mpi() -> bool {
    LAUNCHER_VARIABLES.iter().any(|v| std::env::var_os(v).is_some())
}

/// This process's place in a run over several processes (machines).
#[derive(Debug, Clone)]
pub struct Nodes {
    /// The number of processes (ranks) in the run.
    pub count: u32,
    /// This process's rank, `0..count`; rank 0 leads (writes the run folder).
    pub rank: u32,
    link: Arc<Mutex<NodeLink>>,
}

impl Nodes {
    /// The ranks an MPI launcher started, this process among them; `None`
    /// when it was started alone (no launcher, or one rank). A rank waits
    /// `timeout` for the others in any sum before it gives up (and ends,
    /// which ends the job). Started by a launcher without the `mpi`
    /// feature, an error: the ranks would each train alone.
    pub fn from_launcher(timeout: Duration) -> crate::Result<Option<Self>> {
        if !launched_by_mpi() {
            return Ok(None);
        }
        Self::init(timeout)
    }

    #[cfg(feature = "mpi")]
    fn init(timeout: Duration) -> crate::Result<Option<Self>> {
        let link = NodeLink::init(timeout)?;
        if link.size() == 1 {
            return Ok(None);
        }
        Ok(Some(Self {
            count: link.size(),
            rank: link.rank(),
            link: Arc::new(Mutex::new(link)),
        }))
    }

    #[cfg(not(feature = "mpi"))]
    fn init(_timeout: Duration) -> crate::Result<Option<Self>> {
        Err(LlamaError::Peers(
            "this process was started by an MPI launcher, but this melora was built without MPI: build it with `--features mpi` (see the guide, \"Several machines\")"
                .into(),
        ))
    }

    /// The link to the other ranks.
    pub(crate) fn link(&self) -> Arc<Mutex<NodeLink>> {
        self.link.clone()
    }

    /// Every rank must train with rank 0's settings (`settings`, the run's
    /// configuration as JSON): rank 0's are sent to all, each rank compares
    /// them with its own, and if any differs every rank stops, the
    /// differing ones naming the first setting that differs.
    pub fn agree_on_settings(&self, settings: &serde_json::Value) -> crate::Result<()> {
        let mut link = self.link.lock().expect("the node link");
        let ours = serde_json::to_vec(settings).map_err(|e| LlamaError::serialize("the run configuration", e))?;
        let mut theirs = ours.clone();
        link.broadcast_bytes(&mut theirs);
        let leads: serde_json::Value = serde_json::from_slice(&theirs)
            .map_err(|e| LlamaError::Peers(format!("rank 0's settings did not arrive whole: {e}")))?;
        let difference = first_difference(&leads, settings);
        let mut differing = [f32::from(u8::from(difference.is_some()))];
        link.sum(&mut differing)?;
        match difference {
            Some(key) => {
                let show = |v: &serde_json::Value| lookup(v, &key).map_or("(absent)".into(), |v| v.to_string());
                Err(LlamaError::Peers(format!(
                    "rank {}'s settings differ from rank 0's in `{key}`: rank 0 has {}, rank {} has {}; every rank must run the same command",
                    self.rank,
                    show(&leads),
                    self.rank,
                    show(settings)
                )))
            }
            None if differing[0] > 0.0 => Err(LlamaError::Peers(format!(
                "{} rank(s) have settings that differ from rank 0's (their messages name the setting); every rank must run the same command",
                differing[0]
            ))),
            None => Ok(()),
        }
    }
}

/// The value at dotted `key` in `value`.
fn lookup<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    key.split('.').try_fold(value, |v, k| v.get(k))
}

/// The first setting (a dotted key, in key order) in which `theirs`
/// differs from `ours`, both a run's settings as JSON.
pub fn first_difference(ours: &serde_json::Value, theirs: &serde_json::Value) -> Option<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                keys.into_iter().find_map(|k| {
                    let key = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(a), Some(b)) => walk(&key, a, b),
                        _ => Some(key),
                    }
                })
            }
            _ if a == b => None,
            _ if path.is_empty() => Some("(the whole settings)".into()),
            _ => Some(path.into()),
        }
    }
    walk("", ours, theirs)
}

#[cfg(test)]
mod tests {
    use super::{first_difference, lookup};
    use serde_json::json;

    /// Started by a launcher, a build without MPI refuses to train instead
    /// of training alone in every rank; without a launcher it is one
    /// process. (No other test reads this variable.)
    #[cfg(not(feature = "mpi"))]
    #[test]
    fn a_launcher_without_the_mpi_feature_is_refused() {
        let timeout = std::time::Duration::from_secs(1);
        assert!(super::Nodes::from_launcher(timeout).unwrap().is_none());
        std::env::set_var("OMPI_COMM_WORLD_SIZE", "2");
        let refused = super::Nodes::from_launcher(timeout);
        std::env::remove_var("OMPI_COMM_WORLD_SIZE");
        let message = refused.unwrap_err().to_string();
        assert!(
            message.contains("built without MPI: build it with `--features mpi`"),
            "{message}"
        );
    }

    #[test]
    fn the_first_differing_setting_is_named_by_its_dotted_key() {
        let a = json!({"lr": 0.001, "prior": {"std": 0.2, "noise": false}, "seed": 0});
        assert_eq!(first_difference(&a, &a), None);
        let b = json!({"lr": 0.001, "prior": {"std": 0.1, "noise": false}, "seed": 0});
        assert_eq!(first_difference(&a, &b).as_deref(), Some("prior.std"));
        assert_eq!(lookup(&b, "prior.std"), Some(&json!(0.1)));
        let c = json!({"lr": 0.001, "prior": {"std": 0.2, "noise": false}});
        assert_eq!(first_difference(&a, &c).as_deref(), Some("seed"));
        assert_eq!(lookup(&c, "seed"), None);
        let targets = json!({"targets": ["q_proj", "v_proj"]});
        let more = json!({"targets": ["q_proj", "v_proj", "lm_head"]});
        assert_eq!(first_difference(&targets, &more).as_deref(), Some("targets"));
    }
}
