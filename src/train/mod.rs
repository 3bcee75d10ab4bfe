//! Training jobs, one module per stage; they drive the same stages as inference, through
//! the one loop of `lavit_runtime::train::drive`.
//!
//! Every `lavit train …` command joins the data-parallel group its launcher describes
//! (torchrun's `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/…, or Slurm's), so
//! `torchrun --nproc_per_node=N --no-python lavit train …` and `srun lavit train …` run it
//! as N ranks over c10d (Gloo on CPUs, NCCL on GPUs); alone it is one rank.

use std::sync::Arc;

use lavit_runtime::dist::{Backend, DistEnv, GroupOptions, ProcessGroup};

pub mod decoder;
pub mod llm;
pub mod tokenizer;

/// This process's rank in the job its launcher describes: the joined group, and the device
/// the rank trains on when it is one of several on a CUDA node (`cuda:LOCAL_RANK`; `None`:
/// the config's device).
pub struct Rank {
    pub pg: Arc<ProcessGroup>,
    pub device: Option<String>,
}

/// Join the launcher's group (blocks until every rank joined, bounded by
/// `LAVIT_DIST_TIMEOUT_S`); a single process when no launcher variables are set.
pub fn join_group() -> anyhow::Result<Rank> {
    let env = DistEnv::from_env()?;
    if !env.is_distributed() {
        return Ok(Rank {
            pg: Arc::new(ProcessGroup::single()),
            device: None,
        });
    }
    let device = env.device()?;
    let opts = GroupOptions::from_env(Backend::for_device(device))?;
    let pg = ProcessGroup::new(&env, &opts)?;
    tracing::info!(
        rank = pg.rank(),
        world = pg.world_size(),
        backend = pg.backend().name(),
        "joined the data-parallel group"
    );
    let device = match device {
        tch::Device::Cuda(i) => Some(format!("cuda:{i}")),
        _ => None,
    };
    Ok(Rank {
        pg: Arc::new(pg),
        device,
    })
}
