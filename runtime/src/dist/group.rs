//! [`ProcessGroup`]: a c10d process group (Gloo or NCCL) owned by one dedicated thread.
//!
//! Every call is a message to that thread, answered when the collective finished, so the
//! C++ group sees one call at a time, in the order this process issued them (c10d requires
//! every rank to issue the same collectives in the same order; issuing them from several
//! threads at once would interleave them differently on different ranks).
//!
//! Failure policy: a collective that fails or times out marks the group broken; every
//! later call fails at once with the first error, and the C++ group is then leaked, not
//! destroyed, at drop (its destructor joins Gloo threads that may still wait on a dead
//! peer). The caller is expected to end the job with the error.

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;

use super::env::DistEnv;
use super::ffi;
use crate::error::{Error, Result};

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors, TCP.
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors (needs the `nccl` cargo feature).
    Nccl,
}

impl Backend {
    /// NCCL for a CUDA device, Gloo for the CPU.
    pub fn for_device(device: tch::Device) -> Self {
        match device {
            tch::Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// The reduction of an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    fn code(self) -> i32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        }
    }
}

/// How to build a [`ProcessGroup`].
#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub backend: Backend,
    /// Bound on the rendezvous (store connection, all ranks joining) and on every
    /// collective: a dead or stuck peer fails the call within it.
    pub timeout: Duration,
    /// Gloo: bind to this network interface (`GLOO_SOCKET_IFNAME`, as torch.distributed).
    /// Unset: loopback when the store host is a loopback address, else the address of this
    /// machine's host name.
    pub gloo_interface: Option<String>,
}

impl GroupOptions {
    /// `backend` with a timeout of 30 minutes (torch.distributed's default for Gloo),
    /// `LAVIT_DIST_TIMEOUT_S` overriding it, and `GLOO_SOCKET_IFNAME` read from the
    /// environment. A malformed `LAVIT_DIST_TIMEOUT_S` is an error naming it.
    pub fn from_env(backend: Backend) -> Result<Self> {
        let timeout = match std::env::var("LAVIT_DIST_TIMEOUT_S") {
            Err(_) => Duration::from_secs(1800),
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 && s <= 7.0 * 86400.0 => {
                    Duration::from_secs_f64(s)
                }
                _ => {
                    return Err(Error::config(
                        "environment",
                        "LAVIT_DIST_TIMEOUT_S",
                        format!("`{v}` is not a number of seconds in (0, 604800]"),
                    ))
                }
            },
        };
        Ok(Self {
            backend,
            timeout,
            gloo_interface: std::env::var("GLOO_SOCKET_IFNAME")
                .ok()
                .filter(|s| !s.is_empty()),
        })
    }
}

/// Counters of the collectives run so far (for the communication share of a step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Collective calls (all-reduce, broadcast, barrier).
    pub calls: u64,
    /// Tensor bytes sent into them.
    pub bytes: u64,
    /// Wall time spent waiting for them.
    pub seconds: f64,
}

enum Op {
    AllReduce(Tensor, ReduceOp),
    Broadcast(Tensor, usize),
    Barrier,
    SetGrad(Tensor, Tensor),
    StoreSet(String, Vec<u8>),
    StoreGet(String),
}

enum Reply {
    Done,
    Value(Vec<u8>),
}

struct Job {
    op: Op,
    reply: mpsc::Sender<std::result::Result<Reply, String>>,
}

/// A c10d process group on its own thread (see the module docs). World size 1 needs no
/// launcher and no C++ group: every collective is then the identity.
pub struct ProcessGroup {
    rank: usize,
    world_size: usize,
    backend: Backend,
    timeout: Duration,
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// The first failure, after which every call fails with it.
    broken: Arc<Mutex<Option<String>>>,
    calls: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("backend", &self.backend)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Raw C++ handles, moved into the group's thread.
struct Handles {
    stores: Vec<*mut c_void>,
    /// The store the group talks to: the last of `stores`.
    top: *mut c_void,
    group: *mut c_void,
}
// SAFETY: the handles are used by the one thread that owns them after the move; c10d
// objects are not tied to the thread that created them.
unsafe impl Send for Handles {}

impl ProcessGroup {
    /// A group of one (rank 0): collectives return their input unchanged.
    pub fn single() -> Self {
        Self::with_parts(0, 1, Backend::Gloo, Duration::from_secs(1800), None, None)
    }

    fn with_parts(
        rank: usize,
        world_size: usize,
        backend: Backend,
        timeout: Duration,
        tx: Option<mpsc::Sender<Job>>,
        thread: Option<JoinHandle<()>>,
    ) -> Self {
        Self {
            rank,
            world_size,
            backend,
            timeout,
            tx,
            thread,
            broken: Arc::new(Mutex::new(None)),
            calls: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
        }
    }

    /// Join the job `env` describes: connect to (or, on rank 0 without an agent store,
    /// host) the TCPStore at `MASTER_ADDR:MASTER_PORT`, then build the backend's group.
    /// Blocks until every rank joined or `opts.timeout` passed. World size 1 builds nothing.
    pub fn new(env: &DistEnv, opts: &GroupOptions) -> Result<Self> {
        if env.world_size == 1 {
            let mut g = Self::single();
            g.backend = opts.backend;
            g.timeout = opts.timeout;
            return Ok(g);
        }
        if opts.backend == Backend::Nccl && !has_nccl() {
            return Err(Error::invalid(
                "process group: the NCCL backend needs lavit built with `--features lavit-runtime/nccl`",
            ));
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        let env2 = env.clone();
        let opts2 = opts.clone();
        let thread = std::thread::Builder::new()
            .name(format!("c10d-{}-rank{}", opts.backend.name(), env.rank))
            .spawn(move || {
                let handles = match connect(&env2, &opts2) {
                    Ok(h) => {
                        let _ = ready_tx.send(Ok(()));
                        h
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                serve(handles, rx, opts2.timeout);
            })
            .map_err(|e| Error::invalid(format!("process group: spawning its thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(Error::invalid(format!(
                    "process group ({} rank {} of {}, store {}:{}): {e}{}",
                    opts.backend.name(),
                    env.rank,
                    env.world_size,
                    env.master_addr,
                    env.master_port,
                    launcher_hint(env)
                )));
            }
            Err(_) => {
                return Err(Error::invalid(
                    "process group: its thread ended during the rendezvous",
                ))
            }
        }
        Ok(Self::with_parts(
            env.rank,
            env.world_size,
            opts.backend,
            opts.timeout,
            Some(tx),
            Some(thread),
        ))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    pub fn is_rank0(&self) -> bool {
        self.rank == 0
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The collectives run so far.
    pub fn stats(&self) -> CommStats {
        CommStats {
            calls: self.calls.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            seconds: self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// In place: `t` becomes the reduction of every rank's `t` (same shape, dtype and
    /// device kind on every rank). A non-contiguous `t` goes through a contiguous copy.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        self.in_place(t, "all_reduce", |buf| Op::AllReduce(buf, op))
    }

    /// In place: every rank's `t` becomes rank `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::invalid(format!(
                "broadcast: root {root} is not a rank of a world of {}",
                self.world_size
            )));
        }
        if self.world_size == 1 {
            return Ok(());
        }
        self.in_place(t, "broadcast", |buf| Op::Broadcast(buf, root))
    }

    /// Wait until every rank reached this point.
    pub fn barrier(&self) -> Result<()> {
        if self.world_size == 1 {
            return Ok(());
        }
        self.call("barrier", Op::Barrier, Some(0)).map(|_| ())
    }

    /// Store `value` under `key` in the job's TCPStore (visible to every rank).
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        if self.world_size == 1 {
            return Err(Error::invalid("store_set: a group of one has no store"));
        }
        self.call("store set", Op::StoreSet(key.into(), value.to_vec()), None)
            .map(|_| ())
    }

    /// The value under `key`, waiting (at most the timeout) until some rank set it.
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>> {
        if self.world_size == 1 {
            return Err(Error::invalid("store_get: a group of one has no store"));
        }
        match self.call("store get", Op::StoreGet(key.into()), None)? {
            Reply::Value(v) => Ok(v),
            Reply::Done => Ok(Vec::new()),
        }
    }

    /// `param.grad = grad` (tch has no setter), run on the group's thread like the rest.
    pub(crate) fn set_grad(&self, param: &Tensor, grad: Tensor) -> Result<()> {
        if self.tx.is_none() {
            return set_grad_now(param.shallow_clone(), grad).map_err(Error::invalid);
        }
        self.call("set grad", Op::SetGrad(param.shallow_clone(), grad), None)
            .map(|_| ())
    }

    fn in_place(&self, t: &mut Tensor, what: &str, op: impl FnOnce(Tensor) -> Op) -> Result<()> {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if t.is_contiguous() {
            self.call(what, op(t.shallow_clone()), Some(bytes))
                .map(|_| ())
        } else {
            let buf = t
                .f_contiguous()
                .map_err(|e| Error::invalid(format!("{what}: contiguous copy: {e}")))?;
            self.call(what, op(buf.shallow_clone()), Some(bytes))?;
            let _g = tch::no_grad_guard();
            t.f_copy_(&buf)
                .map_err(|e| Error::invalid(format!("{what}: copying the result back: {e}")))
        }
    }

    /// Run `op` on the group's thread; `bytes` is `Some` for a collective (counted in
    /// [`CommStats`]).
    fn call(&self, what: &str, op: Op, bytes: Option<u64>) -> Result<Reply> {
        if let Some(first) = self.broken.lock().map(|b| b.clone()).unwrap_or(None) {
            return Err(Error::invalid(format!(
                "{what}: the process group failed earlier ({first}); the job must stop"
            )));
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{what}: no process group")))?;
        let (reply_tx, reply_rx) = mpsc::channel();
        let t0 = Instant::now();
        tx.send(Job {
            op,
            reply: reply_tx,
        })
        .map_err(|_| Error::invalid(format!("{what}: the process group's thread is gone")))?;
        let out = reply_rx
            .recv()
            .map_err(|_| Error::invalid(format!("{what}: the process group's thread is gone")))?;
        if let Some(bytes) = bytes {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
            self.nanos
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        out.map_err(|e| {
            let msg = format!(
                "{} rank {} of {}: {e}",
                self.backend.name(),
                self.rank,
                self.world_size
            );
            if let Ok(mut b) = self.broken.lock() {
                b.get_or_insert_with(|| msg.clone());
            }
            Error::Collective {
                op: what.to_string(),
                msg,
            }
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; it frees the C++ group unless a
        // collective failed (then it leaks it, see the module docs).
        drop(self.tx.take());
        let broken = self.broken.lock().map(|b| b.is_some()).unwrap_or(true);
        if let Some(t) = self.thread.take() {
            if !broken {
                let _ = t.join();
            }
        }
    }
}

/// Whether this build has ProcessGroupNCCL (the `nccl` feature).
pub fn has_nccl() -> bool {
    // SAFETY: a plain query without arguments.
    unsafe { ffi::lvd_has_nccl() != 0 }
}

fn launcher_hint(env: &DistEnv) -> String {
    use super::env::Launcher;
    match env.launcher {
        Launcher::Slurm => format!(
            " (launched by Slurm with SLURM_NTASKS={}: are all ranks started by srun?)",
            env.world_size
        ),
        Launcher::Torchrun => format!(
            " (are all {} ranks started, and can this host reach {}:{}?)",
            env.world_size, env.master_addr, env.master_port
        ),
        Launcher::Single => String::new(),
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false)
}

fn cstring(what: &str, s: &str) -> std::result::Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} `{s}` contains a NUL byte"))
}

/// Rendezvous: the store (server on rank 0 unless the agent hosts it), then the group.
fn connect(env: &DistEnv, opts: &GroupOptions) -> std::result::Result<Handles, String> {
    let timeout_ms = opts.timeout.as_millis().min(i64::MAX as u128) as i64;
    let host = cstring("MASTER_ADDR", &env.master_addr)?;
    let is_server = !env.agent_store && env.rank == 0;
    let mut stores = Vec::new();
    let mut store: *mut c_void = std::ptr::null_mut();
    // SAFETY: valid NUL-terminated host; `store` receives an owned handle or stays NULL.
    ffi::take_error(unsafe {
        ffi::lvd_store_tcp(
            host.as_ptr(),
            env.master_port,
            i32::from(is_server),
            env.world_size as i64,
            i32::from(!env.agent_store),
            timeout_ms,
            &mut store,
        )
    })?;
    stores.push(store);
    let mut top = store;
    if env.agent_store {
        // torch.distributed's key space for an elastic attempt; the agent's own keys stay apart.
        let prefix = cstring("prefix", &format!("/worker/attempt_{}", env.restart_count))?;
        let mut prefixed: *mut c_void = std::ptr::null_mut();
        // SAFETY: `store` is a live handle; `prefixed` receives an owned handle.
        let r = ffi::take_error(unsafe {
            ffi::lvd_store_prefix(store, prefix.as_ptr(), &mut prefixed)
        });
        if let Err(e) = r {
            free_stores(&stores);
            return Err(e);
        }
        stores.push(prefixed);
        top = prefixed;
    }
    let mut group: *mut c_void = std::ptr::null_mut();
    let r = match opts.backend {
        Backend::Gloo => {
            let iface = cstring(
                "GLOO_SOCKET_IFNAME",
                opts.gloo_interface.as_deref().unwrap_or(""),
            )?;
            let hostname = if opts.gloo_interface.is_none() && is_loopback(&env.master_addr) {
                "127.0.0.1"
            } else {
                ""
            };
            let hostname = cstring("host", hostname)?;
            // SAFETY: live store handle, valid C strings; `group` receives an owned handle.
            ffi::take_error(unsafe {
                ffi::lvd_pg_gloo(
                    top,
                    env.rank as i32,
                    env.world_size as i32,
                    iface.as_ptr(),
                    hostname.as_ptr(),
                    timeout_ms,
                    &mut group,
                )
            })
        }
        Backend::Nccl => {
            // SAFETY: live store handle; `group` receives an owned handle.
            ffi::take_error(unsafe {
                ffi::lvd_pg_nccl(
                    top,
                    env.rank as i32,
                    env.world_size as i32,
                    timeout_ms,
                    &mut group,
                )
            })
        }
    };
    if let Err(e) = r {
        free_stores(&stores);
        return Err(e);
    }
    Ok(Handles { stores, top, group })
}

fn free_stores(stores: &[*mut c_void]) {
    for &s in stores.iter().rev() {
        // SAFETY: each is a live handle from lvd_store_*, freed once.
        unsafe { ffi::lvd_store_free(s) };
    }
}

fn set_grad_now(mut param: Tensor, mut grad: Tensor) -> std::result::Result<(), String> {
    // SAFETY: both are live at::Tensor handles owned by this frame.
    ffi::take_error(unsafe {
        ffi::lvd_set_grad(param.as_mut_ptr().cast(), grad.as_mut_ptr().cast())
    })
}

/// The group's thread: one job at a time, in arrival order, until the channel closes.
fn serve(h: Handles, rx: mpsc::Receiver<Job>, timeout: Duration) {
    let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as i64;
    let store = h.top;
    let mut failed = false;
    for Job { op, reply } in rx {
        // SAFETY (all arms): `h.group` / `store` are live handles owned by this thread;
        // tensors are live tch tensors held by this frame for the call's duration.
        let out = match op {
            Op::AllReduce(mut t, op) => ffi::take_error(unsafe {
                ffi::lvd_pg_allreduce(h.group, t.as_mut_ptr().cast(), op.code(), timeout_ms)
            })
            .map(|_| Reply::Done),
            Op::Broadcast(mut t, root) => ffi::take_error(unsafe {
                ffi::lvd_pg_broadcast(h.group, t.as_mut_ptr().cast(), root as i32, timeout_ms)
            })
            .map(|_| Reply::Done),
            Op::Barrier => ffi::take_error(unsafe { ffi::lvd_pg_barrier(h.group, timeout_ms) })
                .map(|_| Reply::Done),
            Op::SetGrad(p, g) => set_grad_now(p, g).map(|_| Reply::Done),
            Op::StoreSet(k, v) => cstring("key", &k).and_then(|k| {
                ffi::take_error(unsafe {
                    ffi::lvd_store_set(store, k.as_ptr(), v.as_ptr(), v.len())
                })
                .map(|_| Reply::Done)
            }),
            Op::StoreGet(k) => cstring("key", &k).and_then(|k| {
                let mut data: *mut u8 = std::ptr::null_mut();
                let mut len = 0usize;
                ffi::take_error(unsafe {
                    ffi::lvd_store_get(store, k.as_ptr(), &mut data, &mut len)
                })
                .map(|_| {
                    let v = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
                    unsafe { ffi::lvd_free(data.cast()) };
                    Reply::Value(v)
                })
            }),
        };
        failed |= out.is_err();
        let _ = reply.send(out);
    }
    if failed {
        // Leak: destroying a group whose peer died can block in its destructor.
        return;
    }
    // SAFETY: live handles, freed once, group before its store.
    unsafe { ffi::lvd_pg_free(h.group) };
    free_stores(&h.stores);
}
