//! Data-parallel training on PyTorch's own collective library (c10d): Gloo on CPUs, NCCL on
//! GPUs, launched by `torchrun`, `srun` or Kubeflow's PyTorchJob, with no Python involved.
//!
//! - [`DistEnv`]: this process's rank, local rank, world size and rendezvous address, from
//!   torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`,
//!   `TORCHELASTIC_USE_AGENT_STORE`), else Slurm's (`SLURM_PROCID`, `SLURM_LOCALID`,
//!   `SLURM_NTASKS`, first host of `SLURM_JOB_NODELIST`), else a single process. Bad values
//!   are errors naming the variable.
//! - [`ProcessGroup`]: a `c10d::TCPStore` + `c10d::ProcessGroupGloo` (or `ProcessGroupNCCL`
//!   with the `nccl` cargo feature) behind a small C++ shim (`runtime/cpp/dist_shim.cpp`),
//!   owned by one dedicated thread so collectives run one at a time in the order issued.
//!   Every call is bounded by the group's timeout (`LAVIT_DIST_TIMEOUT_S`, default 1800 s): a
//!   rank that dies makes the others' next collective fail (at once when its sockets close,
//!   within the timeout when it hangs), never hang. C++ exceptions come back as errors.
//! - [`ddp`]: broadcast from rank 0, bucketed gradient averaging ([`GradSync`]), sums of
//!   statistics, the per-rank slice of a global batch.
//!
//! # What the training driver calls, in order
//!
//! ```no_run
//! use lavit_runtime::dist::{self, DistEnv, GradSync, GroupOptions, ProcessGroup};
//! use lavit_runtime::train::{AdamW, AdamWConfig};
//! # fn data_order(_epoch: usize) -> Vec<usize> { (0..1024).collect() }
//! # fn build_model(_vs: &tch::nn::Path) {}
//! # fn loss_on(_items: &[usize]) -> tch::Tensor { tch::Tensor::from(0.0) }
//! # fn main() -> lavit_runtime::Result<()> {
//! // 1. Who am I? (torchrun / srun / nothing). Pick the device from it.
//! let env = DistEnv::from_env()?;
//! let device = env.device()?; // cuda:LOCAL_RANK when CUDA is present, else cpu
//! // 2. Join the group (blocks until every rank joined; world size 1 builds nothing).
//! let opts = GroupOptions::from_env(dist::Backend::for_device(device))?;
//! let pg = ProcessGroup::new(&env, &opts)?;
//! // 3. Build the model the same way on every rank, then resume from the newest committed
//! //    checkpoint (every rank reads it), then make rank 0's weights everyone's.
//! let vs = tch::nn::VarStore::new(device);
//! build_model(&vs.root());
//! let mut opt = AdamW::from_var_store(&vs, |_| true, AdamWConfig::default())?;
//! dist::broadcast_var_store(&pg, &vs)?;
//! let grads = GradSync::new(&pg, opt.params(), dist::DEFAULT_BUCKET_BYTES)?;
//! let per_rank_batch = 32;
//! for step in 0..1000 {
//!     // 4. The same global order on every rank (same seed), each rank its slice.
//!     let order = data_order(0);
//!     let global = &order[step * per_rank_batch * pg.world_size()..][..per_rank_batch * pg.world_size()];
//!     let mine = dist::local_slice(global, &pg)?;
//!     let loss = loss_on(mine);
//!     opt.zero_grad();
//!     loss.backward();
//!     // 5. Average gradients before clipping and the optimiser step.
//!     grads.average(&pg)?;
//!     // EMA codebook statistics: sum them over ranks before the EMA update, e.g.
//!     // dist::all_reduce_tensors(&pg, &[counts, sums], dist::ReduceOp::Sum)?;
//!     opt.clip_grad_norm(1.0)?;
//!     opt.step(1e-4)?;
//!     // 6. Metrics and checkpoints from rank 0 only (the NaN guard sees the global loss).
//!     let global_loss = dist::mean_scalar(&pg, loss.double_value(&[]))?;
//!     if pg.is_rank0() {
//!         println!("step {step} loss {global_loss}");
//!     }
//! }
//! // 7. Let rank 0 finish writing before anyone exits.
//! pg.barrier()?;
//! # Ok(()) }
//! ```
//!
//! Every rank must make the same collective calls in the same order: skip a step (NaN
//! guard) only on a value every rank shares, such as the global loss above. Anything random
//! that must agree across ranks (data order, dropout seeds per global item) comes from the
//! shared seed, not from the rank.

pub mod ddp;
mod env;
mod ffi;
mod group;

pub use ddp::{
    all_gather_rows, all_reduce_mean, all_reduce_tensors, broadcast_named, broadcast_var_store,
    local_slice, mean_scalar, mean_scalars, var_store_tensors, GradSync, DEFAULT_BUCKET_BYTES,
};
pub use env::{expand_hostlist, first_host, shard_range, DistEnv, Launcher};
pub use group::{has_nccl, Backend, CommStats, GroupOptions, ProcessGroup, ReduceOp};
