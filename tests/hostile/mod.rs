//! Hostile checkpoint folders, configs and files (issue 14): each case is a one-file change
//! to a copy of the tiny fixture (or a crafted weight file) given to the real `lavit` CLI,
//! which must exit 1 with a message naming the file and the key — never a panic (exit 101),
//! never a hang, never unbounded memory.

use crate::common::{fixture_dir, write_images};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod checkpoints;
mod inputs;

/// A copy of the tiny fixture in a temp folder.
pub fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("ckpt");
    copy_dir(&fixture_dir(), &dst);
    (tmp, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "reference" {
                copy_dir(&e.path(), &to);
            }
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// Change one JSON file in place.
fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Run `lavit ARGS` with a 60 s limit: (exit code, stderr).
pub fn lavit(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lavit"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lavit");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("lavit {args:?} ran for more than 60 s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Exit 1, no panic, and a message naming each of `needles`.
fn assert_refused(case: &str, (code, err): (i32, String), needles: &[&str]) {
    assert!(!err.contains("panicked"), "{case}: lavit panicked:\n{err}");
    assert_eq!(code, 1, "{case}: exit code {code}, stderr:\n{err}");
    for n in needles {
        assert!(
            err.contains(n),
            "{case}: the error does not name `{n}`:\n{err}"
        );
    }
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `lavit tokenize --checkpoint DIR IMAGE`.
fn tokenize(dir: &Path, image: &Path) -> (i32, String) {
    lavit(&[
        os("tokenize"),
        os("--checkpoint"),
        dir.as_os_str(),
        image.as_os_str(),
    ])
}

/// `lavit caption --checkpoint DIR IMAGE --max-new-tokens 2`.
fn caption(dir: &Path, image: &Path) -> (i32, String) {
    lavit(&[
        os("caption"),
        os("--checkpoint"),
        dir.as_os_str(),
        image.as_os_str(),
        os("--max-new-tokens"),
        os("2"),
    ])
}

/// `lavit generate --checkpoint DIR "a cat" --steps 1 --pixel-decoding RES -o OUT`.
fn generate(dir: &Path, res: &str) -> (i32, String) {
    let out = dir.join("out.png");
    lavit(&[
        os("generate"),
        os("--checkpoint"),
        dir.as_os_str(),
        os("a cat"),
        os("--steps"),
        os("1"),
        os("--pixel-decoding"),
        os(res),
        os("-o"),
        out.as_os_str(),
    ])
}

fn one_image(dir: &Path) -> PathBuf {
    let imgs = dir.join("imgs");
    write_images(&imgs, 1);
    imgs.join("img00.png")
}

// ---------------------------------------------------------------------------------------
// Crafted `torch.save` archives: a minimal pickle writer (protocol 2).

/// Pickle opcodes for a protocol-2 `torch.save` state dict.
#[derive(Default)]
pub struct Pkl(pub Vec<u8>);

impl Pkl {
    pub fn new() -> Self {
        Self(vec![0x80, 2])
    }
    pub fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub fn int(&mut self, i: i64) -> &mut Self {
        self.0.push(0x8a);
        self.0.push(8);
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    pub fn global(&mut self, m: &str, n: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
        self
    }
    pub fn put(&mut self, i: u32) -> &mut Self {
        self.0.push(b'r');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    pub fn get(&mut self, i: u32) -> &mut Self {
        self.0.push(b'j');
        self.0.extend_from_slice(&i.to_le_bytes());
        self
    }
    pub fn tuple(&mut self, items: &[i64]) -> &mut Self {
        self.0.push(b'(');
        for &i in items {
            self.int(i);
        }
        self.0.push(b't');
        self
    }
    /// `_rebuild_tensor_v2(storage(key, numel floats), 0, size, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, key: &str, numel: i64, size: &[i64], stride: &[i64]) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b"(");
        self.op(b"(").str("storage").global("torch", "FloatStorage");
        self.str(key).str("cpu").int(numel).op(b"t").op(b"Q");
        self.int(0).tuple(size).tuple(stride).op(&[0x89]);
        self.global("collections", "OrderedDict").op(b")R");
        self.op(b"tR")
    }
    pub fn end(&mut self) -> Vec<u8> {
        self.0.push(b'.');
        std::mem::take(&mut self.0)
    }
}

/// Write a `torch.save`-layout zip: `archive/data.pkl` + `archive/data/<key>` records.
pub fn write_torch_zip(path: &Path, pkl: &[u8], records: &[(&str, Vec<u8>, bool)]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(1))
        .large_file(true);
    z.start_file("archive/data.pkl", stored).unwrap();
    z.write_all(pkl).unwrap();
    for (k, bytes, deflate) in records {
        z.start_file(
            format!("archive/data/{k}"),
            if *deflate { deflated } else { stored },
        )
        .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

/// A 180 KB-class pickle whose memo references double a 100 KB string 40 times.
pub fn memo_bomb() -> Vec<u8> {
    let mut p = Pkl::new();
    p.str(&"A".repeat(100_000)).put(0);
    for i in 0..40u32 {
        p.get(i).get(i).op(&[0x86]).put(i + 1);
    }
    p.end()
}

/// One tensor under 60 nested dicts whose keys are 4 KB each, repeated 20,000 times at the
/// bottom: 80 MB of key bytes per… the flattened keys would take 4.8 GB.
pub fn nested_key_bomb() -> Vec<u8> {
    let mut p = Pkl::new();
    let key = "k".repeat(4096);
    for _ in 0..60 {
        p.op(b"}").str(&key);
    }
    p.op(b"}");
    p.tensor("0", 1, &[1], &[1]).put(0).op(b"0");
    p.op(b"(");
    for i in 0..20_000 {
        p.str(&format!("t{i}")).get(0);
    }
    p.op(b"u");
    for _ in 0..60 {
        p.op(b"s");
    }
    p.end()
}

fn inspect(path: &Path) -> (i32, String) {
    lavit(&[os("inspect"), path.as_os_str()])
}

// ---------------------------------------------------------------------------------------
// SentencePiece: a normaliser rule that ends inside a UTF-8 character.

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

/// A darts-clone trie with one rule: the single byte `0xC3` (the first byte of "é") →
/// "X". A broken (or hostile) charsmap like this splits UTF-8 characters.
fn split_utf8_charsmap() -> Vec<u8> {
    let mut units = vec![0u32; 452];
    units[0] = 256 << 10; // root: offset 256
    let node = 256 ^ 0xC3;
    units[node] = (1 << 10) | (1 << 8) | 0xC3; // label 0xC3, has a leaf, offset 1
    units[node ^ 1] = 0; // leaf value: offset 0 into the replacements
    let mut blob = ((units.len() * 4) as u32).to_le_bytes().to_vec();
    for u in units {
        blob.extend_from_slice(&u.to_le_bytes());
    }
    blob.extend_from_slice(b"X\0");
    blob
}

/// A BPE `tokenizer.model` with `<unk>`, `<s>`, `</s>`, a few byte pieces and a few pieces,
/// whose normaliser carries `charsmap`.
pub fn sentencepiece_model(charsmap: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    let piece = |s: &str, score: f32, kind: u64| {
        let mut p = Vec::new();
        field_bytes(&mut p, 1, s.as_bytes());
        varint(&mut p, 2 << 3 | 5);
        p.extend_from_slice(&score.to_le_bytes());
        field_varint(&mut p, 3, kind);
        p
    };
    for (s, k) in [("<unk>", 2), ("<s>", 3), ("</s>", 3)] {
        field_bytes(&mut m, 1, &piece(s, 0.0, k));
    }
    // Byte fallback for the bytes of "é" and U+FFFD only (the fixture's LLM reads 200 text ids).
    for b in [0xC3u8, 0xA9, 0xEF, 0xBF, 0xBD] {
        field_bytes(&mut m, 1, &piece(&format!("<0x{b:02X}>"), 0.0, 6));
    }
    for (i, s) in ["▁", "c", "a", "f", "é", "X", "ca", "▁c", "▁ca", "▁caf"]
        .iter()
        .enumerate()
    {
        field_bytes(&mut m, 1, &piece(s, -(i as f32), 1));
    }
    let mut trainer = Vec::new();
    field_varint(&mut trainer, 3, 2); // BPE
    field_varint(&mut trainer, 35, 1); // byte_fallback
    field_bytes(&mut m, 2, &trainer);
    let mut norm = Vec::new();
    field_bytes(&mut norm, 1, b"custom");
    field_bytes(&mut norm, 2, charsmap);
    field_bytes(&mut m, 3, &norm);
    m
}

// ---------------------------------------------------------------------------------------
// Training safety: SIGKILL at random moments of checkpointing.

mod kill {
    use super::*;
    use lavit_runtime::train::{
        hash_state_dict, latest, load, var_store_state_dict, AdamW, AdamWConfig, Checkpointer,
        TrainState,
    };
    use tch::{nn, nn::Module, Device, Kind, Tensor};

    /// A deterministic run (no random draws after init): two 256-wide layers, AdamW.
    pub struct Run {
        pub vs: nn::VarStore,
        net: nn::Sequential,
        pub opt: AdamW,
    }

    pub fn tiny_run() -> Run {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let net = nn::seq()
            .add(nn::linear(&root / "fc1", 64, 256, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "fc2", 256, 256, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "fc3", 256, 1, Default::default()));
        // Weights from a closed form, not the global generator: every process agrees.
        tch::no_grad(|| {
            let mut vars: Vec<_> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (i, (_, mut v)) in vars.into_iter().enumerate() {
                let n = v.numel() as i64;
                let w = Tensor::arange(n, (Kind::Float, Device::Cpu))
                    .f_mul_scalar(0.618 + i as f64)
                    .unwrap()
                    .sin()
                    .f_mul_scalar(0.05)
                    .unwrap()
                    .reshape(v.size());
                v.copy_(&w);
            }
        });
        let opt = AdamW::from_var_store(&vs, |_| true, AdamWConfig::default()).unwrap();
        Run { vs, net, opt }
    }

    /// One step on batch `step` (a closed-form batch of 32 rows).
    pub fn step(r: &mut Run, step: i64) {
        let x = Tensor::arange(32 * 64, (Kind::Float, Device::Cpu))
            .reshape([32, 64])
            .f_add_scalar(step as f64 * 0.37)
            .unwrap()
            .cos();
        let y = x.sum_dim_intlist(-1, true, Kind::Float).sin();
        let loss = (r.net.forward(&x) - y).square().mean(Kind::Float);
        r.opt.zero_grad();
        loss.backward();
        r.opt.step(1e-3).unwrap();
    }

    pub fn hash(r: &Run) -> u64 {
        hash_state_dict(&var_store_state_dict(&r.vs)).unwrap()
    }

    /// Hashes of the straight run after 0, 1, … `n` steps.
    pub fn straight(n: i64) -> Vec<u64> {
        let mut r = tiny_run();
        let mut h = vec![hash(&r)];
        for s in 0..n {
            step(&mut r, s);
            h.push(hash(&r));
        }
        h
    }

    /// The child: resume from the newest committed checkpoint of `$LAVIT_KILL_DIR` (if any),
    /// say READY, then step and checkpoint (keep 2) forever; the parent kills it.
    #[test]
    #[ignore]
    fn ckpt_kill_child() {
        let Ok(dir) = std::env::var("LAVIT_KILL_DIR") else {
            return;
        };
        let ck = Checkpointer::new(&dir, 2).unwrap();
        let mut r = tiny_run();
        let mut state = ck.resume(&r.vs, &mut r.opt).unwrap().unwrap_or_default();
        println!("READY {}", state.step);
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        loop {
            step(&mut r, state.step);
            state.step += 1;
            ck.save_training(&state, &r.vs, &r.opt).unwrap();
        }
    }

    /// Kill the child at random moments (most of its time is spent saving), `trials` times
    /// on one run folder; after each kill the newest committed checkpoint loads, holds the
    /// straight run's exact parameters for its step, and resuming from it then stepping
    /// gives the straight run's parameters again.
    pub fn kill_trials(trials: usize, seed: u64) -> (usize, i64) {
        use std::io::BufRead;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let mut rng = crate::fuzz::Rng::new(seed);
        let mut hashes = straight(0);
        let mut torn_seen = 0;
        let mut last_step = 0;
        for t in 0..trials {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "hostile::kill::ckpt_kill_child",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("LAVIT_KILL_DIR", &dir)
                .env("RUST_LOG", "off")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            loop {
                line.clear();
                assert!(
                    out.read_line(&mut line).unwrap() > 0,
                    "trial {t}: the child ended early"
                );
                if line.contains("READY") {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(rng.below(800_000) as u64));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            // Torn folders (no marker) may be left; `latest` must skip them.
            let torn = std::fs::read_dir(&dir)
                .unwrap()
                .filter(|e| {
                    let p = e.as_ref().unwrap().path();
                    !p.join(lavit_runtime::train::COMMIT_MARKER).exists()
                })
                .count();
            torn_seen += torn;
            let Some(newest) = latest(&dir).unwrap() else {
                continue; // killed before the first commit
            };
            let mut ck = load(&newest).unwrap_or_else(|e| panic!("trial {t}: {e}"));
            let s = ck.state.step;
            if hashes.len() as i64 <= s + 3 {
                hashes = straight(s + 50);
            }
            let model = ck.take("model").unwrap();
            assert_eq!(
                hash_state_dict(&model).unwrap(),
                hashes[s as usize],
                "trial {t}: checkpoint at step {s} differs from the straight run"
            );
            // Resume in this process, 3 more steps: still the straight run.
            let mut r = tiny_run();
            let c = Checkpointer::new(&dir, 2).unwrap();
            let st: TrainState = c.resume(&r.vs, &mut r.opt).unwrap().unwrap();
            assert_eq!(st.step, s);
            for k in 0..3 {
                step(&mut r, s + k);
            }
            assert_eq!(
                hash(&r),
                hashes[(s + 3) as usize],
                "trial {t}: resume is not exact"
            );
            last_step = s;
        }
        eprintln!(
            "checkpoint kill test: {trials} SIGKILLs, newest committed step {last_step}, {torn_seen} torn folders seen and skipped"
        );
        (trials, last_step)
    }

    #[test]
    fn sigkill_during_checkpointing_leaves_a_loadable_exact_checkpoint() {
        // 100 trials take ~1 min on a 2-core machine: `LAVIT_KILL_TRIALS=100` for the full run.
        let trials = std::env::var("LAVIT_KILL_TRIALS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12);
        let (_, last) = kill_trials(trials, 42);
        assert!(last > 0, "no checkpoint was ever committed");
    }

    /// A `step-*` symlink (to a folder elsewhere that looks committed) is not loaded, not
    /// written through and not pruned.
    #[cfg(unix)]
    #[test]
    fn symlinked_step_folders_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let ck = Checkpointer::new(&run, 2).unwrap();
        let mut r = tiny_run();
        let state = |s| TrainState {
            step: s,
            ..Default::default()
        };
        ck.save_training(&state(1), &r.vs, &r.opt).unwrap();
        // Elsewhere: a committed-looking folder, linked in as a newer and an older step.
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join(lavit_runtime::train::COMMIT_MARKER), "{}").unwrap();
        std::fs::write(outside.join("keep.txt"), "precious").unwrap();
        std::os::unix::fs::symlink(&outside, run.join("step-00000009")).unwrap();
        std::os::unix::fs::symlink(&outside, run.join("step-00000000")).unwrap();
        assert_eq!(latest(&run).unwrap(), Some(run.join("step-00000001")));
        // Writing step 9 through the link is refused.
        step(&mut r, 1);
        let e = ck
            .save_training(&state(9), &r.vs, &r.opt)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain folder"), "{e}");
        // Pruning (keep 2) after more saves leaves the links and their target alone.
        for s in 2..5 {
            ck.save_training(&state(s), &r.vs, &r.opt).unwrap();
        }
        assert_eq!(
            ck.committed()
                .unwrap()
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert!(run.join("step-00000000").symlink_metadata().is_ok());
        assert_eq!(
            std::fs::read_to_string(outside.join("keep.txt")).unwrap(),
            "precious"
        );
        assert!(outside.join(lavit_runtime::train::COMMIT_MARKER).exists());
    }
}
