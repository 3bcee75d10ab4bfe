//! Typed configuration files: `configs/*.toml` (or `.json`) read with the `config` crate,
//! overridable from the environment as `LAVIT__SECTION__KEY=value`, deserialised into a
//! serde type and validated.
//!
//! Every failure names the origin (the file, or the environment variable that supplied the
//! value), the dotted key, and the bad value:
//! - a wrong type: `config configs/train.toml: key `train.lr`: invalid type: string "fast", expected f64`
//! - an unknown key (a typo never silently falls back to a default): `... key `train.lrr`: unknown key`
//! - a value out of range, from the type's [`Validate`] impl: `... key `train.batch_size`: must be positive, got -4`
//!
//! Environment variables apply to every config a process loads, so a variable whose
//! top-level section the loaded type does not have is ignored (it belongs to another
//! config); one inside a known section that names no field is refused like a typo in the
//! file.
//!
//! ```ignore
//! #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
//! #[serde(default)]
//! struct MyTrain { train: lavit_runtime::config::TrainLoopConfig, data: MyData }
//! impl Validate for MyTrain {
//!     fn validate(&self, origin: &str) -> Result<()> { self.train.validate(origin, "train") }
//! }
//! let cfg: MyTrain = lavit_runtime::config::load_config(Path::new("configs/demo.toml"))?;
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::LavitManifest;
use crate::train::{AdamWConfig, LrSchedule};

/// Prefix of overriding environment variables (`LAVIT__SECTION__KEY`).
pub const ENV_PREFIX: &str = "LAVIT";
/// Separator between the prefix and sections/keys in variable names.
pub const ENV_SEPARATOR: &str = "__";

/// Range checks a config type runs after deserialisation. Return [`Error::Config`] with
/// the dotted key; [`load_config`] replaces the origin with the file or the environment
/// variable that supplied that key.
pub trait Validate {
    fn validate(&self, origin: &str) -> Result<()> {
        let _ = origin;
        Ok(())
    }
}

impl Validate for LavitManifest {
    fn validate(&self, origin: &str) -> Result<()> {
        LavitManifest::validate(self, origin)
    }
}

/// Load `path` (TOML or JSON by extension) with `LAVIT__*` environment overrides into `T`,
/// refusing unknown keys and values of the wrong type, then run `T::validate`.
pub fn load_config<T>(path: &Path) -> Result<T>
where
    T: DeserializeOwned + Validate,
{
    load_config_with_env(Some(path), process_env())
}

/// [`load_config`] for a command whose config file is optional: without a file, the type's
/// own defaults (`#[serde(default)]`) with the `LAVIT__*` environment overrides, checked the
/// same way (so `LAVIT__SERVER__MAX_N=1 lavit serve --checkpoint DIR` needs no file).
pub fn load_optional_config<T>(path: Option<&Path>) -> Result<T>
where
    T: DeserializeOwned + Validate,
{
    load_config_with_env(path, process_env())
}

/// [`load_optional_config`] with an explicit set of environment variables (full names, e.g.
/// `LAVIT__TRAIN__LR`) instead of the process environment: for tests and embedding.
pub fn load_config_with_env<T>(path: Option<&Path>, env: BTreeMap<String, String>) -> Result<T>
where
    T: DeserializeOwned + Validate,
{
    let env_source = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .source(Some(env.clone().into_iter().collect()));
    let Some(path) = path else {
        let origins = Origins {
            file: "built-in defaults".into(),
            env: env_keys(&env),
            file_sections: Default::default(),
        };
        let value = config::Config::builder()
            .add_source(env_source)
            .build()
            .and_then(|c| c.try_deserialize::<serde_json::Value>())
            .map_err(|e| Error::config("environment", "-", e.to_string()))?;
        return from_value(value, &origins);
    };
    let file_origin = path.display().to_string();
    if !path.exists() {
        return Err(Error::config(&file_origin, "-", "no such config file"));
    }
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => config::FileFormat::Toml,
        Some("json") => config::FileFormat::Json,
        other => {
            return Err(Error::config(
                &file_origin,
                "-",
                format!("unsupported config format {other:?} (use .toml or .json)"),
            ))
        }
    };
    // Read through the capped reader (a regular file, size-checked first: never a FIFO or
    // a device), then parsed from memory.
    let text = crate::fsread::read_config(path)?;
    let file_source = config::File::from_str(&text, format);
    let to_json = |b: config::ConfigBuilder<config::builder::DefaultState>| {
        b.build()
            .and_then(|c| c.try_deserialize::<serde_json::Value>())
            .map_err(|e| Error::config(&file_origin, "-", e.to_string()))
    };
    let file_only = to_json(config::Config::builder().add_source(file_source.clone()))?;
    let value = to_json(
        config::Config::builder()
            .add_source(file_source)
            .add_source(env_source),
    )?;
    let origins = Origins {
        file: file_origin.clone(),
        env: env_keys(&env),
        file_sections: file_only
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    };
    from_value(value, &origins)
}

/// Where each key came from, for error messages.
struct Origins {
    file: String,
    /// Dotted lower-case key → variable name.
    env: BTreeMap<String, String>,
    /// Top-level keys the file itself has.
    file_sections: std::collections::BTreeSet<String>,
}

impl Origins {
    /// The environment variable that set `key` (or one of its parents, or — for a
    /// section — one of its children), else the file.
    fn of(&self, key: &str) -> String {
        let mut k = key.to_string();
        loop {
            if let Some(var) = self.env.get(&k) {
                return format!("environment {var}");
            }
            match k.rfind('.') {
                Some(i) => k.truncate(i),
                None => break,
            }
        }
        let child = format!("{key}.");
        match self.env.iter().find(|(k, _)| k.starts_with(&child)) {
            Some((_, var)) if !self.in_file(key) => format!("environment {var}"),
            _ => self.file.clone(),
        }
    }
    fn in_file(&self, key: &str) -> bool {
        let top = key.split('.').next().unwrap_or(key);
        self.file_sections.contains(top)
    }
}

fn process_env() -> BTreeMap<String, String> {
    let pre = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    std::env::vars()
        .filter(|(k, _)| k.to_ascii_uppercase().starts_with(&pre))
        .collect()
}

fn env_keys(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let pre = format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase();
    env.keys()
        .filter_map(|var| {
            let low = var.to_lowercase();
            low.strip_prefix(&pre)
                .map(|k| (k.replace(ENV_SEPARATOR, "."), var.clone()))
        })
        .collect()
}

fn from_value<T>(value: serde_json::Value, origins: &Origins) -> Result<T>
where
    T: DeserializeOwned + Validate,
{
    let mut ignored = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(&value, &mut track);
    let parsed: std::result::Result<T, _> =
        serde_ignored::deserialize(de, |p| ignored.push(p.to_string()));
    let t = match parsed {
        Ok(t) => t,
        Err(e) => {
            let key = track.path().to_string();
            let key = if key == "." { "-".to_string() } else { key };
            return Err(Error::config(origins.of(&key), key, e.to_string()));
        }
    };
    for key in ignored {
        // A variable for a section this type does not have belongs to another config.
        if !key.contains('.') && !origins.in_file(&key) {
            tracing::debug!(key, "environment override for another config ignored");
            continue;
        }
        let shown = lookup(&value, &key)
            .map(|v| format!(" (value {v})"))
            .unwrap_or_default();
        return Err(Error::config(
            origins.of(&key),
            &key,
            format!("unknown key{shown}"),
        ));
    }
    match t.validate("") {
        Ok(()) => Ok(t),
        Err(Error::Config { key, msg, .. }) => Err(Error::config(origins.of(&key), key, msg)),
        Err(e) => Err(e),
    }
}

fn lookup<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    key.split('.').try_fold(v, |v, k| match v {
        serde_json::Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => v.get(k),
    })
}

/// The model preset: `configs/lavit-7b-v2.toml` (official sizes) or `configs/tiny.toml`
/// (CPU). Same sections as a checkpoint folder's `manifest.json`.
pub fn load_model_config(path: &Path) -> Result<LavitManifest> {
    load_config(path)
}

/// The settings every training loop shares; trainers embed it as their `[train]` section
/// (and call [`TrainLoopConfig::validate`] with that section name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainLoopConfig {
    /// Optimiser steps to run in all.
    pub steps: i64,
    /// Samples per optimiser step (summed over accumulation).
    pub batch_size: i64,
    /// Micro-batches accumulated per step.
    pub grad_accum: i64,
    /// Run seed (data order, dropout, sampling).
    pub seed: u64,
    /// Global gradient-norm clip; 0 disables.
    pub max_grad_norm: f64,
    /// Consecutive NaN/Inf steps that stop the run.
    pub max_nan_skips: usize,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_every: i64,
    /// Committed checkpoints kept (at least 2).
    pub keep_checkpoints: usize,
    /// Log a line every this many steps.
    pub log_every: i64,
    /// Run folder: `checkpoints/`, `metrics.jsonl`, `metrics.html`, `loss.png`.
    pub out_dir: PathBuf,
    /// `cpu`, `cuda`, `cuda:N` (see [`crate::device`]).
    pub device: String,
    /// `f32`, `bf16`, `f16`.
    pub dtype: String,
    pub schedule: LrSchedule,
    pub optimizer: AdamWConfig,
}

impl Default for TrainLoopConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 8,
            grad_accum: 1,
            seed: 0,
            max_grad_norm: 1.0,
            max_nan_skips: 5,
            save_every: 200,
            keep_checkpoints: 3,
            log_every: 10,
            out_dir: PathBuf::from("out/train"),
            device: "cpu".into(),
            dtype: "f32".into(),
            schedule: LrSchedule::default(),
            optimizer: AdamWConfig::default(),
        }
    }
}

impl TrainLoopConfig {
    /// Range checks, with keys under `section` (e.g. `train`).
    pub fn validate(&self, origin: &str, section: &str) -> Result<()> {
        let key = |k: &str| format!("{section}.{k}");
        let positive = |k: &str, v: i64| {
            if v > 0 {
                Ok(())
            } else {
                Err(Error::config(
                    origin,
                    key(k),
                    format!("must be positive, got {v}"),
                ))
            }
        };
        positive("steps", self.steps)?;
        positive("batch_size", self.batch_size)?;
        positive("grad_accum", self.grad_accum)?;
        positive("save_every", self.save_every)?;
        positive("log_every", self.log_every)?;
        if self.batch_size % self.grad_accum != 0 {
            return Err(Error::config(
                origin,
                key("grad_accum"),
                format!(
                    "batch_size {} is not a multiple of grad_accum {}",
                    self.batch_size, self.grad_accum
                ),
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(Error::config(
                origin,
                key("max_grad_norm"),
                format!("must be finite and >= 0, got {}", self.max_grad_norm),
            ));
        }
        if self.max_nan_skips == 0 {
            return Err(Error::config(
                origin,
                key("max_nan_skips"),
                "must be at least 1",
            ));
        }
        if self.keep_checkpoints < 2 {
            return Err(Error::config(
                origin,
                key("keep_checkpoints"),
                format!("must be at least 2, got {}", self.keep_checkpoints),
            ));
        }
        crate::device::parse_device(&self.device)
            .map_err(|e| Error::config(origin, key("device"), e.to_string()))?;
        crate::device::parse_dtype(&self.dtype)
            .map_err(|e| Error::config(origin, key("dtype"), e.to_string()))?;
        self.schedule
            .validate(origin, &format!("{section}.schedule"))?;
        let o = &self.optimizer;
        let in01 = |k: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::config(
                    origin,
                    key(&format!("optimizer.{k}")),
                    format!("must lie in [0, 1), got {v}"),
                ))
            }
        };
        in01("beta1", o.beta1)?;
        in01("beta2", o.beta2)?;
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(Error::config(
                origin,
                key("optimizer.eps"),
                format!("must be positive, got {}", o.eps),
            ));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(Error::config(
                origin,
                key("optimizer.weight_decay"),
                format!("must be >= 0, got {}", o.weight_decay),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct T {
        train: TrainLoopConfig,
    }
    impl Validate for T {
        fn validate(&self, origin: &str) -> Result<()> {
            self.train.validate(origin, "train")
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err(p: &Path, e: &[(&str, &str)]) -> String {
        load_config_with_env::<T>(Some(p), env(e))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn loads_and_overrides_from_env() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "t.toml",
            "[train]\nsteps = 50\n[train.schedule]\nlr = 0.001\n",
        );
        let t: T = load_config_with_env(Some(&p), env(&[])).unwrap();
        assert_eq!(t.train.steps, 50);
        assert_eq!(t.train.schedule.lr, 0.001);
        assert_eq!(t.train.batch_size, TrainLoopConfig::default().batch_size);
        let t: T = load_config_with_env(
            Some(&p),
            env(&[
                ("LAVIT__TRAIN__STEPS", "7"),
                ("LAVIT__TRAIN__SCHEDULE__LR", "2e-4"),
                // Another config's section: ignored here.
                ("LAVIT__SERVE__BIND", "127.0.0.1:1"),
            ]),
        )
        .unwrap();
        assert_eq!(t.train.steps, 7);
        assert_eq!(t.train.schedule.lr, 2e-4);
    }

    #[test]
    fn no_file_gives_defaults_with_env_overrides() {
        let t: T = load_config_with_env(None, env(&[])).unwrap();
        assert_eq!(t, T::default());
        let t: T = load_config_with_env(None, env(&[("LAVIT__TRAIN__STEPS", "7")])).unwrap();
        assert_eq!(t.train.steps, 7);
        let e = load_config_with_env::<T>(None, env(&[("LAVIT__TRAIN__STEPZ", "7")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LAVIT__TRAIN__STEPZ") && e.contains("train.stepz"),
            "{e}"
        );
        let e = load_config_with_env::<T>(None, env(&[("LAVIT__TRAIN__STEPS", "-2")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("LAVIT__TRAIN__STEPS") && e.contains("must be positive"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_names_file_key_and_value() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.toml", "[train]\nsteps = \"many\"\n");
        let e = err(&p, &[]);
        assert!(
            e.contains("bad.toml") && e.contains("train.steps") && e.contains("many"),
            "{e}"
        );
        let p = write(d.path(), "ok.toml", "[train]\n");
        let e = err(&p, &[("LAVIT__TRAIN__BATCH_SIZE", "lots")]);
        assert!(
            e.contains("LAVIT__TRAIN__BATCH_SIZE")
                && e.contains("train.batch_size")
                && e.contains("lots"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "typo.toml", "[train]\nstepz = 3\n");
        let e = err(&p, &[]);
        assert!(e.contains("typo.toml") && e.contains("stepz"), "{e}");
        let p = write(d.path(), "top.toml", "[trian]\nsteps = 3\n");
        let e = err(&p, &[]);
        assert!(e.contains("trian") && e.contains("unknown key"), "{e}");
        let p = write(d.path(), "ok.toml", "");
        let e = err(&p, &[("LAVIT__TRAIN__SCHEDULE__LRR", "1")]);
        assert!(
            e.contains("LAVIT__TRAIN__SCHEDULE__LRR") && e.contains("lrr"),
            "{e}"
        );
    }

    #[test]
    fn negative_sizes_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "neg.toml", "[train]\nbatch_size = -4\n");
        let e = err(&p, &[]);
        assert!(
            e.contains("neg.toml") && e.contains("train.batch_size") && e.contains("-4"),
            "{e}"
        );
        let p = write(d.path(), "ok.toml", "[train]\n");
        let e = err(&p, &[("LAVIT__TRAIN__SCHEDULE__WARMUP_STEPS", "-1")]);
        assert!(
            e.contains("environment LAVIT__TRAIN__SCHEDULE__WARMUP_STEPS"),
            "{e}"
        );
        // A model preset with a negative size.
        let p = write(d.path(), "m.toml", "[tokenizer]\nn_code = -16\n");
        let e = load_model_config(&p).unwrap_err().to_string();
        assert!(
            e.contains("m.toml") && e.contains("tokenizer.n_code") && e.contains("-16"),
            "{e}"
        );
    }

    #[test]
    fn malformed_or_missing_files() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "broken.toml", "[train\nsteps = 1\n");
        let e = err(&p, &[]);
        assert!(e.contains("broken.toml"), "{e}");
        let e = err(&d.path().join("absent.toml"), &[]);
        assert!(e.contains("absent.toml") && e.contains("no such"), "{e}");
    }

    #[test]
    fn presets_match_the_manifest() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let official = load_model_config(&root.join("lavit-7b-v2.toml")).unwrap();
        assert_eq!(official, LavitManifest::official());
        let tiny = load_model_config(&root.join("tiny.toml")).unwrap();
        assert!(tiny.tokenizer.encoder_width < 256 && tiny.llm.vocab_size < 1000);
    }
}
