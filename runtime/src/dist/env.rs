//! Who am I in the job: the launcher's environment contract, read once at start.
//!
//! - **torchrun** (and anything speaking its `env://` contract: Kubeflow's PyTorchJob,
//!   `torch.distributed.launch`): `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//!   `MASTER_PORT`; `TORCHELASTIC_USE_AGENT_STORE=True` means torchrun's agent already hosts
//!   the TCPStore at `MASTER_ADDR:MASTER_PORT`, so every rank (rank 0 too) is a client, and
//!   keys go under `/worker/attempt_<TORCHELASTIC_RESTART_COUNT>` as torch.distributed does.
//! - **Slurm** (`srun`), when no `RANK`/`WORLD_SIZE` is set: `SLURM_PROCID`, `SLURM_LOCALID`,
//!   `SLURM_NTASKS`; the store host is `MASTER_ADDR` when set, else the first host of
//!   `SLURM_JOB_NODELIST` (or `SLURM_NODELIST`), in Slurm's compressed form (`gpu[01-04,07]`);
//!   the port is `MASTER_PORT` when set, else `20000 + SLURM_JOB_ID % 20000` (so two jobs
//!   sharing a node do not collide).
//! - Neither: a single process (world size 1).

use std::ops::Range;

use crate::error::{Error, Result};

/// Where the rank's identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `RANK`/`WORLD_SIZE`/... (torchrun, Kubeflow PyTorchJob, a hand-written launch).
    Torchrun,
    /// `SLURM_PROCID`/`SLURM_NTASKS`/... (`srun`).
    Slurm,
    /// No launcher: one process.
    Single,
}

/// This process's place in the job (see the module docs for the variables read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Rank on this node; picks the GPU (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Host of the rendezvous TCPStore.
    pub master_addr: String,
    /// Port of the rendezvous TCPStore.
    pub master_port: u16,
    /// The launcher's agent hosts the store: every rank is a client.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT` (0 when unset): which elastic attempt this is.
    pub restart_count: u64,
    pub launcher: Launcher,
}

const TORCHRUN_VARS: [&str; 5] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl DistEnv {
    /// One process, no launcher.
    pub fn single() -> Self {
        Self {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            agent_store: false,
            restart_count: 0,
            launcher: Launcher::Single,
        }
    }

    /// Read the process environment (torchrun's variables, else Slurm's, else one process).
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`DistEnv::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            return Self::torchrun(&get);
        }
        if get("SLURM_PROCID").is_some() || get("SLURM_NTASKS").is_some() {
            return Self::slurm(&get);
        }
        Ok(Self::single())
    }

    fn torchrun(get: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let missing: Vec<&str> = TORCHRUN_VARS
            .iter()
            .copied()
            .filter(|k| get(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(env_err(
                missing[0],
                format!(
                    "not set, but RANK or WORLD_SIZE is: a torchrun-style launch sets all of {} (missing: {})",
                    TORCHRUN_VARS.join(", "),
                    missing.join(", ")
                ),
            ));
        }
        let world_size = parse_count(get, "WORLD_SIZE")?;
        let rank = parse_index(get, "RANK", world_size, "WORLD_SIZE")?;
        let local_rank = parse_index(get, "LOCAL_RANK", world_size, "WORLD_SIZE")?;
        let master_addr = parse_host(get, "MASTER_ADDR")?;
        let master_port = parse_port(get, "MASTER_PORT")?;
        let agent_store = match get("TORCHELASTIC_USE_AGENT_STORE") {
            None => false,
            Some(v) => parse_bool("TORCHELASTIC_USE_AGENT_STORE", &v)?,
        };
        let restart_count = match get("TORCHELASTIC_RESTART_COUNT") {
            None => 0,
            Some(v) => v.trim().parse::<u64>().map_err(|_| {
                env_err(
                    "TORCHELASTIC_RESTART_COUNT",
                    format!("`{v}` is not a non-negative integer"),
                )
            })?,
        };
        Ok(Self {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
            agent_store,
            restart_count,
            launcher: Launcher::Torchrun,
        })
    }

    fn slurm(get: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        for k in ["SLURM_PROCID", "SLURM_NTASKS"] {
            if get(k).is_none() {
                return Err(env_err(
                    k,
                    "not set, but another SLURM_ task variable is (run the ranks with srun)",
                ));
            }
        }
        let world_size = parse_count(get, "SLURM_NTASKS")?;
        let rank = parse_index(get, "SLURM_PROCID", world_size, "SLURM_NTASKS")?;
        let local_rank = match get("SLURM_LOCALID") {
            Some(_) => parse_index(get, "SLURM_LOCALID", world_size, "SLURM_NTASKS")?,
            None if world_size == 1 => 0,
            None => {
                return Err(env_err(
                    "SLURM_LOCALID",
                    "not set (run the ranks with srun)",
                ))
            }
        };
        let master_addr = if get("MASTER_ADDR").is_some() {
            parse_host(get, "MASTER_ADDR")?
        } else {
            let (var, list) = ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]
                .iter()
                .find_map(|k| get(k).map(|v| (*k, v)))
                .ok_or_else(|| {
                    env_err(
                        "SLURM_JOB_NODELIST",
                        "not set (nor SLURM_NODELIST, nor MASTER_ADDR): cannot tell which host runs rank 0",
                    )
                })?;
            first_host(&list).map_err(|e| env_err(var, format!("`{list}`: {e}")))?
        };
        let master_port = if get("MASTER_PORT").is_some() {
            parse_port(get, "MASTER_PORT")?
        } else {
            match get("SLURM_JOB_ID") {
                Some(id) => {
                    let id: u64 = id.trim().parse().map_err(|_| {
                        env_err("SLURM_JOB_ID", format!("`{id}` is not a job number"))
                    })?;
                    (20000 + id % 20000) as u16
                }
                None => 29500,
            }
        };
        Ok(Self {
            rank,
            local_rank,
            world_size,
            master_addr,
            master_port,
            agent_store: false,
            restart_count: 0,
            launcher: Launcher::Slurm,
        })
    }

    /// More than one process.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// Rank 0 writes checkpoints and metrics.
    pub fn is_rank0(&self) -> bool {
        self.rank == 0
    }

    /// This rank's device: `cuda:LOCAL_RANK` when libtorch sees CUDA, else the CPU. A
    /// local rank past the GPUs on this node is an error naming the variable.
    pub fn device(&self) -> Result<tch::Device> {
        if !tch::Cuda::is_available() {
            return Ok(tch::Device::Cpu);
        }
        let n = tch::Cuda::device_count() as usize;
        if self.local_rank >= n {
            let var = match self.launcher {
                Launcher::Slurm => "SLURM_LOCALID",
                _ => "LOCAL_RANK",
            };
            return Err(env_err(
                var,
                format!(
                    "{} but this node has {n} CUDA device(s): start at most {n} ranks per node",
                    self.local_rank
                ),
            ));
        }
        Ok(tch::Device::Cuda(self.local_rank))
    }

    /// This rank's contiguous part of a global batch of `global_len` items, the same global
    /// order on every rank: rank r takes `[r·B, (r+1)·B)` with `B = global_len / world_size`,
    /// so the union over ranks is exactly the batch one rank would take. `global_len` must
    /// be a multiple of the world size (equal shards keep the gradient average exact).
    pub fn shard(&self, global_len: usize) -> Result<Range<usize>> {
        shard_range(global_len, self.rank, self.world_size)
    }
}

/// Rank `rank`'s slice `[r·B, (r+1)·B)` of a global batch of `global_len` over `world` ranks.
pub fn shard_range(global_len: usize, rank: usize, world: usize) -> Result<Range<usize>> {
    if world == 0 || rank >= world {
        return Err(Error::invalid(format!(
            "shard: rank {rank} is not in a world of {world}"
        )));
    }
    if !global_len.is_multiple_of(world) {
        return Err(Error::invalid(format!(
            "shard: a global batch of {global_len} does not split evenly over {world} ranks (use a per-rank batch × {world})"
        )));
    }
    let b = global_len / world;
    Ok(rank * b..(rank + 1) * b)
}

fn env_err(var: &str, msg: impl Into<String>) -> Error {
    Error::config("environment", var, msg)
}

fn parse_count(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<usize> {
    let v = get(var).unwrap_or_default();
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=1 << 20).contains(&n) => Ok(n),
        _ => Err(env_err(
            var,
            format!("`{v}` is not a process count (an integer ≥ 1)"),
        )),
    }
}

fn parse_index(
    get: &impl Fn(&str) -> Option<String>,
    var: &str,
    world: usize,
    world_var: &str,
) -> Result<usize> {
    let v = get(var).unwrap_or_default();
    match v.trim().parse::<usize>() {
        Ok(i) if i < world => Ok(i),
        Ok(i) => Err(env_err(
            var,
            format!("{i} is out of range: {world_var} is {world} (ranks 0..{world})"),
        )),
        Err(_) => Err(env_err(var, format!("`{v}` is not a non-negative integer"))),
    }
}

fn parse_port(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<u16> {
    let v = get(var).unwrap_or_default();
    match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(env_err(var, format!("`{v}` is not a TCP port (1..65535)"))),
    }
}

fn parse_host(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<String> {
    let v = get(var).unwrap_or_default();
    let h = v.trim();
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(h.to_string())
    } else {
        Err(env_err(var, format!("`{v}` is not a host name or address")))
    }
}

fn parse_bool(var: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(env_err(var, format!("`{v}` is not True/False/1/0"))),
    }
}

/// The first host of a Slurm host list (`a[01-04,07],b3` → `a01`).
pub fn first_host(list: &str) -> std::result::Result<String, String> {
    let hosts = expand_hostlist(list, 1)?;
    hosts
        .into_iter()
        .next()
        .ok_or_else(|| "empty host list".to_string())
}

/// Expand a Slurm host list (`node[01-04,07],gpu-a[1-2]-x[1-2]`) into host names, in order,
/// stopping after `limit` names. Zero-padding follows each range's lower bound (`[08-10]` →
/// `08 09 10`). Unbalanced brackets, empty ranges and reversed ranges are errors.
pub fn expand_hostlist(list: &str, limit: usize) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in split_top_level(list)? {
        if out.len() >= limit {
            break;
        }
        if item.is_empty() {
            return Err("empty entry between commas".into());
        }
        expand_item(&item, limit, &mut out)?;
    }
    Ok(out)
}

/// Split at the commas outside brackets.
fn split_top_level(list: &str) -> std::result::Result<Vec<String>, String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    for c in list.trim().chars() {
        match c {
            '[' => {
                if depth > 0 {
                    return Err("nested `[`".into());
                }
                depth += 1;
                cur.push(c);
            }
            ']' => {
                if depth == 0 {
                    return Err("`]` without `[`".into());
                }
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => items.push(std::mem::take(&mut cur)),
            c if c.is_whitespace() => return Err("white space in a host list".into()),
            c => cur.push(c),
        }
    }
    if depth != 0 {
        return Err("`[` without `]`".into());
    }
    items.push(cur);
    Ok(items)
}

/// One entry: literal parts and bracket groups, expanded as their cartesian product.
fn expand_item(item: &str, limit: usize, out: &mut Vec<String>) -> std::result::Result<(), String> {
    // Parts: each a list of alternatives (a literal is a list of one).
    let mut parts: Vec<Vec<String>> = Vec::new();
    let mut rest = item;
    while !rest.is_empty() {
        if let Some(body) = rest.strip_prefix('[') {
            let end = body.find(']').ok_or("`[` without `]`")?;
            parts.push(expand_ranges(&body[..end], limit)?);
            rest = &body[end + 1..];
        } else {
            let end = rest.find('[').unwrap_or(rest.len());
            parts.push(vec![rest[..end].to_string()]);
            rest = &rest[end..];
        }
    }
    let mut idx = vec![0usize; parts.len()];
    loop {
        if out.len() >= limit {
            return Ok(());
        }
        out.push(
            idx.iter()
                .zip(&parts)
                .map(|(&i, p)| p[i].as_str())
                .collect(),
        );
        // Odometer, last part fastest (Slurm's order).
        let mut k = parts.len();
        loop {
            if k == 0 {
                return Ok(());
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < parts[k].len() {
                break;
            }
            idx[k] = 0;
        }
    }
}

/// `01-04,07` → `01 02 03 04 07` (at most `limit` values).
fn expand_ranges(body: &str, limit: usize) -> std::result::Result<Vec<String>, String> {
    let mut vals = Vec::new();
    for r in body.split(',') {
        let (lo, hi) = r.split_once('-').unwrap_or((r, r));
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(format!("`[{body}]`: `{r}` is not a number or a range a-b"));
        }
        let (a, b): (u64, u64) = (
            lo.parse().map_err(|_| format!("`{lo}`"))?,
            hi.parse().map_err(|_| format!("`{hi}`"))?,
        );
        if b < a {
            return Err(format!("`[{body}]`: range `{r}` runs backwards"));
        }
        let width = lo.len();
        for v in a..=b {
            if vals.len() >= limit {
                break;
            }
            vals.push(format!("{v:0width$}"));
        }
    }
    Ok(vals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    const TORCHRUN: [(&str, &str); 5] = [
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node01"),
        ("MASTER_PORT", "29400"),
    ];

    #[test]
    fn nothing_set_is_one_process() {
        let e = env(&[]).unwrap();
        assert_eq!(e, DistEnv::single());
        assert!(!e.is_distributed() && e.is_rank0());
    }

    #[test]
    fn torchrun_contract() {
        let e = env(&TORCHRUN).unwrap();
        assert_eq!((e.rank, e.local_rank, e.world_size), (3, 1, 4));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node01", 29400));
        assert_eq!(e.launcher, Launcher::Torchrun);
        assert!(!e.agent_store && !e.is_rank0());
        let mut v = TORCHRUN.to_vec();
        v.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        v.push(("TORCHELASTIC_RESTART_COUNT", "2"));
        let e = env(&v).unwrap();
        assert!(e.agent_store);
        assert_eq!(e.restart_count, 2);
        // torchrun wins over Slurm when both are present (torchrun inside an sbatch job).
        v.push(("SLURM_PROCID", "0"));
        v.push(("SLURM_NTASKS", "1"));
        assert_eq!(env(&v).unwrap().launcher, Launcher::Torchrun);
    }

    fn err_of(pairs: &[(&str, &str)]) -> String {
        env(pairs).unwrap_err().to_string()
    }

    #[test]
    fn bad_torchrun_values_name_the_variable() {
        let with = |k: &str, v: &str| {
            let mut p: Vec<(&str, String)> =
                TORCHRUN.iter().map(|(a, b)| (*a, b.to_string())).collect();
            for e in &mut p {
                if e.0 == k {
                    e.1 = v.to_string();
                }
            }
            let pairs: Vec<(&str, &str)> = p.iter().map(|(a, b)| (*a, b.as_str())).collect();
            err_of(&pairs)
        };
        let e = with("RANK", "4");
        assert!(e.contains("`RANK`") && e.contains("out of range"), "{e}");
        let e = with("RANK", "-1");
        assert!(e.contains("`RANK`") && e.contains("`-1`"), "{e}");
        let e = with("WORLD_SIZE", "0");
        assert!(e.contains("`WORLD_SIZE`"), "{e}");
        let e = with("MASTER_PORT", "70000");
        assert!(e.contains("`MASTER_PORT`") && e.contains("70000"), "{e}");
        let e = with("MASTER_ADDR", "a b");
        assert!(e.contains("`MASTER_ADDR`"), "{e}");
        let e = with("LOCAL_RANK", "x");
        assert!(e.contains("`LOCAL_RANK`"), "{e}");
        let e = err_of(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
        assert!(
            e.contains("`LOCAL_RANK`") && e.contains("MASTER_PORT"),
            "{e}"
        );
        let mut v = TORCHRUN.to_vec();
        v.push(("TORCHELASTIC_USE_AGENT_STORE", "maybe"));
        assert!(err_of(&v).contains("`TORCHELASTIC_USE_AGENT_STORE`"));
    }

    #[test]
    fn slurm_fallback() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_NODELIST", "gpu[07-09,12],cpu1"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.local_rank, e.world_size), (5, 1, 8));
        assert_eq!(e.master_addr, "gpu07");
        assert_eq!(e.master_port, 20000 + (123456 % 20000) as u16);
        assert_eq!(e.launcher, Launcher::Slurm);
        // MASTER_ADDR / MASTER_PORT override the node list and the job-derived port.
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_NODELIST", "x[1-2]"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((e.master_addr.as_str(), e.master_port), ("10.0.0.1", 1234));
        let e = err_of(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_NODELIST", "x1"),
        ]);
        assert!(
            e.contains("`SLURM_PROCID`") && e.contains("SLURM_NTASKS is 2"),
            "{e}"
        );
        let e = err_of(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "x[1-"),
        ]);
        assert!(
            e.contains("`SLURM_JOB_NODELIST`") && e.contains("x[1-"),
            "{e}"
        );
        let e = err_of(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]);
        assert!(e.contains("`SLURM_LOCALID`"), "{e}");
    }

    #[test]
    fn hostlists() {
        let ex = |s: &str| expand_hostlist(s, 100);
        assert_eq!(ex("a").unwrap(), ["a"]);
        assert_eq!(
            ex("node[01-04,07]").unwrap(),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(ex("n[8-10]").unwrap(), ["n8", "n9", "n10"]);
        assert_eq!(ex("n[08-10]").unwrap(), ["n08", "n09", "n10"]);
        assert_eq!(
            ex("r[1-2]-n[1-2],x").unwrap(),
            ["r1-n1", "r1-n2", "r2-n1", "r2-n2", "x"]
        );
        assert_eq!(ex("a[1-3]b,c").unwrap(), ["a1b", "a2b", "a3b", "c"]);
        assert_eq!(
            expand_hostlist("n[1-100000]", 3).unwrap(),
            ["n1", "n2", "n3"]
        );
        assert_eq!(
            first_host("gpu-a100-[003-010],gpu-h100-1").unwrap(),
            "gpu-a100-003"
        );
        for bad in [
            "n[1-2", "n]1", "n[2-1]", "n[a]", "n[1-2]]", "a,,b", "n[[1]]", "n[]", "",
        ] {
            assert!(expand_hostlist(bad, 100).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn shards_tile_the_global_batch() {
        assert_eq!(shard_range(8, 0, 2).unwrap(), 0..4);
        assert_eq!(shard_range(8, 1, 2).unwrap(), 4..8);
        assert_eq!(shard_range(6, 2, 3).unwrap(), 4..6);
        assert!(shard_range(7, 0, 2)
            .unwrap_err()
            .to_string()
            .contains("evenly"));
        assert!(shard_range(8, 2, 2).is_err());
    }
}
