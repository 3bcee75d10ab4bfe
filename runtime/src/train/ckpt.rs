//! Training checkpoints: everything exact resume needs, written so that a kill at any
//! moment never leaves a checkpoint that resume would pick half-written.
//!
//! Layout: `DIR/step-XXXXXXXX/` holding one safetensors file per part (`model`,
//! `optimizer`, `ema`, …; each written atomically with [`save_safetensors`]), `state.json`
//! ([`TrainState`]: step, seed, data cursor, NaN counters, free metadata) and last the
//! commit marker `COMMITTED`. [`latest`] only returns folders that hold the marker; the last
//! `keep` (≥ 2) committed checkpoints are kept, older ones and torn leftovers removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn;

use super::adamw::AdamW;
use crate::checkpoint::{self, atomic_write, save_safetensors, StateDict};
use crate::error::{Error, Result};

/// Name of the file written last into a checkpoint folder.
pub const COMMIT_MARKER: &str = "COMMITTED";
const STATE_FILE: &str = "state.json";

/// The non-tensor state of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TrainState {
    /// Steps completed: the next step to run is `step`.
    pub step: i64,
    /// The run seed ([`super::StepRng`] derives every step's seed from it).
    pub seed: u64,
    /// Epoch of the data order.
    pub epoch: u64,
    /// Position in the epoch's data order (samples or batches, as the trainer counts).
    pub data_cursor: u64,
    /// NaN/Inf steps skipped so far and in a row ([`super::NanGuard`]).
    pub skipped_total: u64,
    pub consecutive_skips: usize,
    /// Anything else the trainer wants back (config, data fingerprint, best loss…).
    pub metadata: serde_json::Value,
}

/// A committed checkpoint read back.
pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub state: TrainState,
    /// Tensors by part name (`model`, `optimizer`, …).
    pub parts: BTreeMap<String, StateDict>,
}

impl LoadedCheckpoint {
    /// Take a part out, or an error naming the checkpoint when it is absent.
    pub fn take(&mut self, part: &str) -> Result<StateDict> {
        self.parts.remove(part).ok_or_else(|| {
            Error::ckpt(
                &self.path,
                format!(
                    "checkpoint has no `{part}` part (has {:?})",
                    self.parts.keys()
                ),
            )
        })
    }
}

/// Writes and finds the checkpoints of one run folder.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    dir: PathBuf,
    keep: usize,
}

fn step_dir_name(step: i64) -> String {
    format!("step-{step:08}")
}

fn parse_step_dir(name: &str) -> Option<i64> {
    let s = name.strip_prefix("step-")?;
    if s.len() < 8 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn fsync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn valid_part(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Every `step-*` folder of `dir` as (step, path, committed), in step order.
fn step_dirs(dir: &Path) -> Result<Vec<(i64, PathBuf, bool)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = parse_step_dir(&name) {
            let p = e.path();
            // The entry's own type (not followed): a symlinked `step-*` is neither loaded,
            // written through nor pruned (its target may be anywhere).
            let ft = e.file_type().map_err(|e| Error::io(&p, e))?;
            if ft.is_symlink() {
                tracing::warn!(path = %p.display(), "ignoring a symlinked checkpoint folder");
                continue;
            }
            if ft.is_dir() {
                let committed = p.join(COMMIT_MARKER).is_file();
                v.push((step, p, committed));
            }
        }
    }
    v.sort_by_key(|(s, _, _)| *s);
    Ok(v)
}

/// The newest committed checkpoint folder of `dir` (torn ones, without the marker, are
/// ignored), or `None` when there is none (or `dir` does not exist).
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(step_dirs(dir)?
        .into_iter()
        .rev()
        .find(|(_, _, c)| *c)
        .map(|(_, p, _)| p))
}

impl Checkpointer {
    /// Checkpoints go to `dir` (created), the last `keep` are kept (at least 2).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self {
            dir,
            keep: keep.max(2),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest committed checkpoint of this run.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        latest(&self.dir)
    }

    /// Committed checkpoints as (step, folder), oldest first.
    pub fn committed(&self) -> Result<Vec<(i64, PathBuf)>> {
        Ok(step_dirs(&self.dir)?
            .into_iter()
            .filter(|(_, _, c)| *c)
            .map(|(s, p, _)| (s, p))
            .collect())
    }

    /// Save `parts` (each a state dict written as `<name>.safetensors`) and `state` into
    /// `step-<state.step>/`, commit it, and prune. Returns the folder.
    pub fn save(&self, state: &TrainState, parts: &[(&str, &StateDict)]) -> Result<PathBuf> {
        let path = self.dir.join(step_dir_name(state.step));
        for (name, _) in parts {
            if !valid_part(name) || *name == "state" {
                return Err(Error::invalid(format!(
                    "checkpoint part name `{name}` must be [A-Za-z0-9_-]+ and not `state`"
                )));
            }
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
            return Err(Error::ckpt(
                &path,
                "exists and is not a plain folder (a symlink or a file): refusing to write a checkpoint through it",
            ));
        }
        if path.exists() {
            // Re-saving a step: uncommit first so a crash mid-way leaves a torn folder.
            let marker = path.join(COMMIT_MARKER);
            if marker.exists() {
                std::fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
                fsync_dir(&path);
            }
        } else {
            std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            fsync_dir(&self.dir);
        }
        let mut files = Vec::new();
        for (name, sd) in parts {
            let f = format!("{name}.safetensors");
            let mut meta = BTreeMap::new();
            meta.insert("step".to_string(), state.step.to_string());
            save_safetensors(&path.join(&f), sd, Some(meta))?;
            files.push(f);
        }
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::ckpt(&path, format!("state.json: {e}")))?;
        atomic_write(&path.join(STATE_FILE), &json)?;
        files.push(STATE_FILE.to_string());
        let marker = serde_json::json!({ "step": state.step, "files": files });
        atomic_write(&path.join(COMMIT_MARKER), marker.to_string().as_bytes())?;
        fsync_dir(&self.dir);
        tracing::info!(step = state.step, path = %path.display(), "checkpoint saved");
        self.prune(&path)?;
        Ok(path)
    }

    /// Save a model's variables (`model`) and an optimiser's state (`optimizer`).
    pub fn save_training(
        &self,
        state: &TrainState,
        vs: &nn::VarStore,
        opt: &AdamW,
    ) -> Result<PathBuf> {
        let model = var_store_state_dict(vs);
        let optim = opt.state_dict()?;
        self.save(state, &[("model", &model), ("optimizer", &optim)])
    }

    /// Keep the newest `keep` committed checkpoints; remove older ones and torn folders
    /// (except `current`).
    fn prune(&self, current: &Path) -> Result<()> {
        let all = step_dirs(&self.dir)?;
        let committed: Vec<&PathBuf> = all.iter().filter(|x| x.2).map(|x| &x.1).collect();
        let n_drop = committed.len().saturating_sub(self.keep);
        let mut drop: Vec<&PathBuf> = committed[..n_drop].to_vec();
        drop.extend(
            all.iter()
                .filter(|x| !x.2 && x.1.as_path() != current)
                .map(|x| &x.1),
        );
        for p in drop {
            // Uncommit before deleting, so a crash mid-delete leaves a torn (ignored) folder.
            let _ = std::fs::remove_file(p.join(COMMIT_MARKER));
            std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        fsync_dir(&self.dir);
        Ok(())
    }

    /// Load the newest committed checkpoint into `vs` (strictly) and `opt`; returns its
    /// state, or `None` when the run has no checkpoint yet.
    pub fn resume(&self, vs: &nn::VarStore, opt: &mut AdamW) -> Result<Option<TrainState>> {
        let Some(path) = self.latest()? else {
            return Ok(None);
        };
        let mut ck = load(&path)?;
        let model = ck.take("model")?;
        let src = path.join("model.safetensors").display().to_string();
        checkpoint::load_into(vs, "", &model, &src, &Default::default())?;
        let optim = ck.take("optimizer")?;
        let src = path.join("optimizer.safetensors").display().to_string();
        opt.load_state_dict(&optim, &src)?;
        tracing::info!(step = ck.state.step, path = %path.display(), "resumed");
        Ok(Some(ck.state))
    }
}

/// Read a committed checkpoint folder (refused without its marker or with a file missing).
pub fn load(path: &Path) -> Result<LoadedCheckpoint> {
    let marker = path.join(COMMIT_MARKER);
    let text = crate::fsread::read_config(&marker).map_err(|_| {
        Error::ckpt(
            path,
            "not a committed checkpoint (no COMMITTED marker: the save was interrupted)",
        )
    })?;
    let m: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::ckpt(&marker, format!("invalid marker: {e}")))?;
    let files: Vec<String> = m
        .get("files")
        .and_then(|f| serde_json::from_value(f.clone()).ok())
        .ok_or_else(|| Error::ckpt(&marker, "marker lists no files"))?;
    let state_path = path.join(STATE_FILE);
    let state_text = crate::fsread::read_config(&state_path)?;
    let state: TrainState = serde_json::from_str(&state_text)
        .map_err(|e| Error::ckpt(&state_path, format!("invalid state: {e}")))?;
    let mut parts = BTreeMap::new();
    for f in files {
        let Some(name) = f.strip_suffix(".safetensors") else {
            continue;
        };
        if !valid_part(name) {
            return Err(Error::ckpt(&marker, format!("bad part file name `{f}`")));
        }
        let p = path.join(&f);
        parts.insert(name.to_string(), checkpoint::load_safetensors(&p)?);
    }
    Ok(LoadedCheckpoint {
        path: path.to_path_buf(),
        state,
        parts,
    })
}

/// All variables of `vs` by name (shallow: saving copies the bytes).
pub fn var_store_state_dict(vs: &nn::VarStore) -> StateDict {
    vs.variables().into_iter().collect()
}

/// A 64-bit FNV-1a hash of keys, dtypes, shapes and bytes: equal hashes ⇔ (practically)
/// identical state dicts. For exact-resume tests.
pub fn hash_state_dict(sd: &StateDict) -> Result<u64> {
    const PRIME: u64 = 0x100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(PRIME);
        }
    };
    for (k, t) in sd {
        eat(k.as_bytes());
        eat(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        let t = t
            .f_to_device(tch::Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .map_err(|e| Error::invalid(format!("hashing `{k}`: {e}")))?;
        let n = t.numel();
        let mut buf = vec![0u8; n * checkpoint::pickle::kind_size(t.kind()) as usize];
        if n > 0 {
            t.f_copy_data_u8(&mut buf, n)
                .map_err(|e| Error::invalid(format!("hashing `{k}`: {e}")))?;
        }
        eat(&buf);
    }
    Ok(h)
}
