//! Integration tests: checkpoint. Every fixture file loads with the keys, shapes and dtypes
//! PyTorch sees (tests/data/fixture-tensors.json, listed once with torch by
//! scripts/dev/fixture_tensors.py); `lavit inspect` prints them; and malformed or hostile
//! files (built here byte by byte) are refused with an error naming what and where — by
//! the library and by `lavit inspect`, which exits non-zero without a panic.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use lavit_runtime::checkpoint::{self, StateDict};
use tch::{Kind, Tensor};

use crate::common::fixture_dir;

// ---- the fixture ---------------------------------------------------------------------

/// key → (shape, dtype) per fixture file, as PyTorch lists them.
type Listing = BTreeMap<String, BTreeMap<String, (Vec<i64>, String)>>;

fn torch_listing() -> Listing {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixture-tensors.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut out = Listing::new();
    for (file, tensors) in v.as_object().unwrap() {
        let m = out.entry(file.clone()).or_default();
        for (k, t) in tensors.as_object().unwrap() {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            m.insert(k.clone(), (shape, t["dtype"].as_str().unwrap().to_string()));
        }
    }
    out
}

fn listing_of(sd: &StateDict) -> BTreeMap<String, (Vec<i64>, String)> {
    sd.iter()
        .map(|(k, t)| (k.clone(), (t.size(), format!("{:?}", t.kind()))))
        .collect()
}

#[test]
fn every_fixture_file_loads_as_pytorch_sees_it() {
    let want = torch_listing();
    assert!(
        want.len() >= 10,
        "the listing covers the fixture's weight files"
    );
    for (rel, tensors) in &want {
        let sd = checkpoint::load_path(&fixture_dir().join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(&listing_of(&sd), tensors, "{rel}");
    }
    // The sharded folder = the union of its shards, through the index.
    let lm = checkpoint::load_path(&fixture_dir().join("language_model")).unwrap();
    let mut union = BTreeMap::new();
    for (rel, t) in &want {
        if rel.starts_with("language_model/model-") {
            union.extend(t.clone());
        }
    }
    assert_eq!(listing_of(&lm), union);
}

/// Parse `lavit inspect` output: `key\t[shape]\tKind` lines (comments start with `#`).
fn run_inspect(path: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lavit"))
        .arg("inspect")
        .arg(path)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run lavit");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        format!("{stderr}[exit: {}]", out.status),
    )
}

fn parse_inspect(stdout: &str) -> BTreeMap<String, (Vec<i64>, String)> {
    stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut f = l.split('\t');
            let key = f.next().unwrap().to_string();
            let shape = f
                .next()
                .unwrap()
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect();
            (key, (shape, f.next().unwrap().to_string()))
        })
        .collect()
}

#[test]
fn lavit_inspect_lists_what_pytorch_sees() {
    let want = torch_listing();
    let pick = |prefix: &str| {
        let mut m = BTreeMap::new();
        for (rel, t) in &want {
            if rel.starts_with(prefix) {
                m.extend(t.clone());
            }
        }
        m
    };
    for (arg, prefix) in [
        (
            "visual_tokenizer/tokenizer_encoder.bin",
            "visual_tokenizer/tokenizer_encoder.bin",
        ),
        ("language_model/", "language_model/model-"),
        ("pixel_decoding/unet/", "pixel_decoding/unet/"),
    ] {
        let (ok, stdout, stderr) = run_inspect(&fixture_dir().join(arg));
        assert!(ok, "lavit inspect {arg}: {stderr}");
        let expect = pick(prefix);
        assert!(!expect.is_empty());
        assert_eq!(parse_inspect(&stdout), expect, "lavit inspect {arg}");
        let n: i64 = expect
            .values()
            .map(|(s, _)| s.iter().product::<i64>())
            .sum();
        assert!(
            stdout.contains(&format!(
                "# total: {} tensors, {n} parameters",
                expect.len()
            )),
            "{stdout}"
        );
    }
}

// ---- building hostile files ----------------------------------------------------------

/// A safetensors file from a raw JSON header and data bytes.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Pickle pieces (protocol 2, as torch.save writes).
mod pkl {
    pub fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }
    pub fn str(s: &str) -> Vec<u8> {
        let mut b = vec![b'X'];
        b.extend((s.len() as u32).to_le_bytes());
        b.extend(s.as_bytes());
        b
    }
    pub fn int(i: i64) -> Vec<u8> {
        if let Ok(x) = i32::try_from(i) {
            let mut b = vec![b'J'];
            b.extend(x.to_le_bytes());
            b
        } else {
            let mut b = vec![0x8a, 8];
            b.extend(i.to_le_bytes());
            b
        }
    }
    pub fn tuple(items: &[Vec<u8>]) -> Vec<u8> {
        let mut b = vec![b'('];
        for i in items {
            b.extend(i);
        }
        b.push(b't');
        b
    }
    /// `OrderedDict()`.
    pub fn ordered_dict() -> Vec<u8> {
        let mut b = global("collections", "OrderedDict");
        b.extend([b')', b'R']);
        b
    }
    /// `_rebuild_tensor_v2(storage('0', FloatStorage, numel), offset, size, stride, False, OrderedDict())`.
    pub fn tensor(numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Vec<u8> {
        let mut b = global("torch._utils", "_rebuild_tensor_v2");
        let pid = tuple(&[
            str("storage"),
            global("torch", "FloatStorage"),
            str("0"),
            str("cpu"),
            int(numel),
        ]);
        let mut storage = pid;
        storage.push(b'Q');
        let size: Vec<Vec<u8>> = size.iter().map(|&s| int(s)).collect();
        let stride: Vec<Vec<u8>> = stride.iter().map(|&s| int(s)).collect();
        b.extend(tuple(&[
            storage,
            int(offset),
            tuple(&size),
            tuple(&stride),
            vec![0x89],
            ordered_dict(),
        ]));
        b.push(b'R');
        b
    }
    /// `{key: value}` as a whole pickle.
    pub fn state_dict(key: &str, value: Vec<u8>) -> Vec<u8> {
        let mut b = vec![0x80, 2];
        b.extend(ordered_dict());
        b.extend(str(key));
        b.extend(value);
        b.extend([b's', b'.']);
        b
    }
}

/// A torch.save-style zip: `archive/data.pkl` + `archive/data/<key>` records.
fn torch_zip(pickle: &[u8], storages: &[(&str, &[u8])], deflate_pkl: bool) -> Vec<u8> {
    torch_zip_as("archive", 1, pickle, storages, deflate_pkl)
}

/// [`torch_zip`] with the archive's folder name and the storage records' alignment
/// (`torch.save` aligns them to 64 bytes).
fn torch_zip_as(
    archive: &str,
    align: u16,
    pickle: &[u8],
    storages: &[(&str, &[u8])],
    deflate_pkl: bool,
) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let method = if deflate_pkl {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        z.start_file(
            format!("{archive}/data.pkl"),
            SimpleFileOptions::default().compression_method(method),
        )
        .unwrap();
        z.write_all(pickle).unwrap();
        for (k, data) in storages {
            z.start_file(
                format!("{archive}/data/{k}"),
                SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored)
                    .with_alignment(align),
            )
            .unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn floats(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

fn assert_refused(path: &Path, needles: &[&str]) {
    let e = match checkpoint::load_path(path) {
        Ok(sd) => panic!("{} loaded ({} tensors)", path.display(), sd.len()),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(
            e.contains(n),
            "error for {} lacks `{n}`: {e}",
            path.display()
        );
    }
    // The CLI: non-zero exit, an error line, no panic.
    let (ok, _, stderr) = run_inspect(path);
    assert!(!ok, "lavit inspect {} succeeded", path.display());
    assert!(stderr.contains("error:"), "{}: {stderr}", path.display());
    assert!(!stderr.contains("panicked"), "{}: {stderr}", path.display());
}

// ---- the hostile files ---------------------------------------------------------------

#[test]
fn hand_built_pickle_loads() {
    // The builder itself is right: a well-formed file gives the tensor back, so the
    // refusals below fail for the reason they name.
    let d = tempfile::tempdir().unwrap();
    let pk = pkl::state_dict("w", pkl::tensor(6, 0, &[2, 3], &[3, 1]));
    let p = write(
        d.path(),
        "ok.bin",
        &torch_zip(&pk, &[("0", &floats(6))], false),
    );
    let sd = checkpoint::load_path(&p).unwrap();
    assert_eq!(sd["w"].size(), vec![2, 3]);
    let want = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
    assert!(sd["w"].equal(&want));
    // A transposed view (stride (1, 2)) reads the right elements.
    let pk = pkl::state_dict("t", pkl::tensor(6, 0, &[3, 2], &[1, 3]));
    let p = write(
        d.path(),
        "t.bin",
        &torch_zip(&pk, &[("0", &floats(6))], false),
    );
    assert!(checkpoint::load_path(&p).unwrap()["t"].equal(&want.tr()));
}

#[test]
fn malformed_safetensors_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut good = Vec::new();
    {
        let sd: StateDict = [("w".to_string(), Tensor::ones([4, 4], tch::kind::FLOAT_CPU))].into();
        let p = d.path().join("good.safetensors");
        checkpoint::save_safetensors(&p, &sd, None).unwrap();
        good.extend(std::fs::read(&p).unwrap());
    }
    let p = write(d.path(), "truncated.safetensors", &good[..good.len() - 10]);
    assert_refused(&p, &["truncated.safetensors", "invalid safetensors"]);
    let p = write(d.path(), "short-header.safetensors", &good[..20]);
    assert_refused(&p, &["short-header.safetensors"]);

    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let p = write(
        d.path(),
        "overlap.safetensors",
        &safetensors_bytes(h, &[0u8; 12]),
    );
    assert_refused(&p, &["overlap.safetensors", "invalid safetensors"]);

    let h = r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#;
    let p = write(
        d.path(),
        "shape-overflow.safetensors",
        &safetensors_bytes(h, &[0u8; 8]),
    );
    assert_refused(&p, &["shape-overflow.safetensors"]);

    let mut big = (1u64 << 40).to_le_bytes().to_vec();
    big.extend_from_slice(b"{}");
    let p = write(d.path(), "huge-header.safetensors", &big);
    assert_refused(&p, &["huge-header.safetensors", "cap"]);

    let p = write(d.path(), "garbage.safetensors", b"not a model at all");
    assert_refused(&p, &["garbage.safetensors", "neither"]);
}

#[test]
fn hostile_pickles_refused() {
    let d = tempfile::tempdir().unwrap();

    // posix.system('ls') through the GLOBAL opcode.
    let mut pk = vec![0x80, 2];
    pk.extend(pkl::global("posix", "system"));
    pk.extend(pkl::str("echo pwned"));
    pk.extend([0x85, b'R', b'.']);
    let p = write(d.path(), "system.bin", &torch_zip(&pk, &[], false));
    assert_refused(&p, &["system.bin", "posix.system"]);

    // builtins.eval through STACK_GLOBAL (protocol 4 style), inside a state dict value.
    let mut ev = pkl::str("builtins");
    ev.extend(pkl::str("eval"));
    ev.push(0x93);
    ev.extend(pkl::str("__import__('os').system('id')"));
    ev.extend([0x85, b'R']);
    let pk = pkl::state_dict("w", ev);
    let p = write(d.path(), "eval.bin", &torch_zip(&pk, &[], false));
    assert_refused(&p, &["eval.bin", "builtins.eval"]);

    // A storage record shorter than the storage it declares (6 floats declared, 2 stored).
    let pk = pkl::state_dict("w", pkl::tensor(6, 0, &[2, 3], &[3, 1]));
    let p = write(
        d.path(),
        "short.bin",
        &torch_zip(&pk, &[("0", &floats(2))], false),
    );
    assert_refused(&p, &["short.bin", "declares 6 elements"]);

    // A view reaching past its storage.
    let pk = pkl::state_dict("w", pkl::tensor(6, 4, &[2, 3], &[3, 1]));
    let p = write(
        d.path(),
        "past-end.bin",
        &torch_zip(&pk, &[("0", &floats(6))], false),
    );
    assert_refused(&p, &["past-end.bin", "storage"]);

    // Shape × stride overflowing 64 bits.
    let big = 1i64 << 40;
    let pk = pkl::state_dict("w", pkl::tensor(6, 0, &[big, big], &[big, 1]));
    let p = write(
        d.path(),
        "overflow.bin",
        &torch_zip(&pk, &[("0", &floats(6))], false),
    );
    assert_refused(&p, &["overflow.bin", "overflows"]);

    // A memo bomb: memo[i+1] = (memo[i], memo[i]) for 64 levels = 2^64 values if expanded.
    let mut pk = vec![0x80, 2, b']', b'q', 0];
    for i in 0..64u8 {
        pk.extend([b'h', i, b'h', i, 0x86, b'q', i + 1]);
    }
    pk.push(b'.');
    let p = write(d.path(), "memo-bomb.bin", &torch_zip(&pk, &[], false));
    assert_refused(&p, &["memo-bomb.bin", "bomb"]);

    // Containers nested a million deep (dropping them would overflow the stack).
    let mut pk = vec![0x80, 2, b')'];
    pk.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    pk.push(b'.');
    let p = write(d.path(), "deep.bin", &torch_zip(&pk, &[], false));
    assert_refused(&p, &["deep.bin", "nested"]);

    // A zip bomb: a deflated data.pkl whose declared size is 2 GiB.
    let pk = pkl::state_dict("w", pkl::tensor(6, 0, &[2, 3], &[3, 1]));
    let mut z = torch_zip(&pk, &[("0", &floats(6))], true);
    patch_uncompressed_size(&mut z, "archive/data.pkl", 0x8000_0000);
    let p = write(d.path(), "zip-bomb.bin", &z);
    assert_refused(&p, &["zip-bomb.bin", "bomb"]);

    // Not a zip at all behind the zip magic.
    let p = write(d.path(), "fake.bin", b"PK\x03\x04 definitely not a zip");
    assert_refused(&p, &["fake.bin"]);
}

/// Rewrite the uncompressed size of `name` in its local and central headers.
fn patch_uncompressed_size(z: &mut [u8], name: &str, size: u32) {
    let mut patched = 0;
    let mut i = 0;
    while i + 46 <= z.len() {
        let sig = &z[i..i + 4];
        if sig == b"PK\x03\x04" {
            let n = u16::from_le_bytes([z[i + 26], z[i + 27]]) as usize;
            if &z[i + 30..i + 30 + n] == name.as_bytes() {
                z[i + 22..i + 26].copy_from_slice(&size.to_le_bytes());
                patched += 1;
            }
        } else if sig == b"PK\x01\x02" {
            let n = u16::from_le_bytes([z[i + 28], z[i + 29]]) as usize;
            if &z[i + 46..i + 46 + n] == name.as_bytes() {
                z[i + 24..i + 28].copy_from_slice(&size.to_le_bytes());
                patched += 1;
            }
        }
        i += 1;
    }
    assert_eq!(patched, 2, "patched both headers");
}

/// A folder with `model.safetensors.index.json` (given as text) and shards.
fn sharded(dir: &Path, index: &str, shards: &[(&str, &[&str])]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (name, keys) in shards {
        let sd: StateDict = keys
            .iter()
            .map(|k| (k.to_string(), Tensor::ones([2], tch::kind::FLOAT_CPU)))
            .collect();
        checkpoint::save_safetensors(&dir.join(name), &sd, None).unwrap();
    }
    write(dir, "model.safetensors.index.json", index.as_bytes())
}

#[test]
fn hostile_shard_indexes_refused() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    // Sanity: a good index loads.
    let p = sharded(
        &root.join("good"),
        r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        &[("s1.safetensors", &["a"]), ("s2.safetensors", &["b"])],
    );
    assert_eq!(checkpoint::load_path(&p).unwrap().len(), 2);

    // A shard outside the folder, by `..`.
    sharded(root, "{}", &[("outside.bin", &["a"])]);
    let p = sharded(
        &root.join("dotdot"),
        r#"{"weight_map":{"a":"../outside.bin"}}"#,
        &[],
    );
    assert_refused(
        &p,
        &[
            "model.safetensors.index.json",
            "../outside.bin",
            "plain file name",
        ],
    );

    // An absolute path.
    let abs = root.join("outside.bin").display().to_string();
    let p = sharded(
        &root.join("abs"),
        &format!(r#"{{"weight_map":{{"a":"{abs}"}}}}"#),
        &[],
    );
    assert_refused(&p, &["plain file name"]);

    // A missing shard.
    let p = sharded(
        &root.join("missing"),
        r#"{"weight_map":{"a":"s1.safetensors","b":"gone.safetensors"}}"#,
        &[("s1.safetensors", &["a"])],
    );
    assert_refused(&p, &["gone.safetensors", "missing"]);

    // A symlink that leaves the folder.
    let p = sharded(
        &root.join("link"),
        r#"{"weight_map":{"a":"s1.safetensors"}}"#,
        &[],
    );
    std::os::unix::fs::symlink(root.join("outside.bin"), root.join("link/s1.safetensors")).unwrap();
    assert_refused(&p, &["s1.safetensors", "outside the model folder"]);

    // A tensor listed twice in the index.
    let p = sharded(
        &root.join("twice"),
        r#"{"weight_map":{"a":"s1.safetensors","a":"s2.safetensors"}}"#,
        &[("s1.safetensors", &["a"]), ("s2.safetensors", &["a"])],
    );
    assert_refused(&p, &["`a`", "listed twice"]);

    // A tensor stored in two shards (the index names one).
    let p = sharded(
        &root.join("two-shards"),
        r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        &[("s1.safetensors", &["a"]), ("s2.safetensors", &["a", "b"])],
    );
    assert_refused(&p, &["s2.safetensors", "`a`", "elsewhere"]);

    // A tensor the index lists but its shard lacks.
    let p = sharded(
        &root.join("absent"),
        r#"{"weight_map":{"a":"s1.safetensors","c":"s1.safetensors"}}"#,
        &[("s1.safetensors", &["a"])],
    );
    assert_refused(&p, &["s1.safetensors", "`c`", "absent"]);

    // Not JSON / no weight_map.
    let p = sharded(&root.join("nojson"), "{ nope", &[]);
    assert_refused(&p, &["invalid shard index"]);
}

#[test]
fn bad_model_configs_refused() {
    use lavit_runtime::config::load_model_config;
    let d = tempfile::tempdir().unwrap();
    for (name, text, needles) in [
        (
            "type.toml",
            "[tokenizer]\nimg_size = \"large\"\n",
            &["type.toml", "tokenizer.img_size", "large"][..],
        ),
        (
            "unknown.toml",
            "[llm]\nvocab_sise = 10\n",
            &["unknown.toml", "vocab_sise"][..],
        ),
        (
            "negative.toml",
            "[feature_decoder]\ndepth = -2\n",
            &["negative.toml", "feature_decoder.depth", "-2"][..],
        ),
    ] {
        let p = write(d.path(), name, text.as_bytes());
        let e = load_model_config(&p).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "{name}: `{n}` not in: {e}");
        }
    }
}

// ---- loading without copies ------------------------------------------------------------

/// A safetensors file whose header is padded to 8 bytes (as writers do), so the data starts
/// aligned.
fn padded_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    safetensors_bytes(&h, data)
}

/// [`padded_safetensors`] written to `dir/name`.
fn write_padded(dir: &Path, name: &str, header: &str, data: &[u8]) -> PathBuf {
    write(dir, name, &padded_safetensors(header, data))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn safetensors_load_as_views_of_one_mapping_and_models_take_them_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = ([1.5f32, -2.0, 3.25, 4.0], [0.5f32, 0.25]);
    let mut data = f32_bytes(&a);
    data.extend(f32_bytes(&b));
    let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#;
    let path = write_padded(dir.path(), "w.safetensors", header, &data);
    let sd = checkpoint::load_safetensors(&path).unwrap();
    assert_eq!(Vec::<f32>::try_from(sd["a"].view([-1])).unwrap(), a);
    assert_eq!(Vec::<f32>::try_from(&sd["b"]).unwrap(), b);
    // One buffer: `b` sits 16 bytes after `a`, as in the file (separate copies would not).
    assert_eq!(
        sd["b"].data_ptr() as usize - sd["a"].data_ptr() as usize,
        16
    );

    // A model moved onto them holds the same memory, and writing to it leaves the file as it was.
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let root = vs.root();
    let va = root.zeros("a", &[2, 2]);
    let vb = root.zeros("b", &[2]);
    let (pa, pb) = (sd["a"].data_ptr(), sd["b"].data_ptr());
    checkpoint::load_into_owned(&vs, "", sd, "w", &Default::default()).unwrap();
    assert_eq!((va.data_ptr(), vb.data_ptr()), (pa, pb));
    tch::no_grad(|| {
        let _ = va.shallow_clone().fill_(9.0);
    });
    let again = checkpoint::load_safetensors(&path).unwrap();
    assert_eq!(Vec::<f32>::try_from(again["a"].view([-1])).unwrap(), a);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        padded_safetensors(header, &data),
        "the model's write reached the file"
    );

    // A model of another dtype gets converted copies.
    let mut vs16 = tch::nn::VarStore::new(tch::Device::Cpu);
    vs16.set_kind(Kind::Half);
    let (ha, hb) = (
        vs16.root().zeros("a", &[2, 2]),
        vs16.root().zeros("b", &[2]),
    );
    let pa = again["a"].data_ptr();
    checkpoint::load_into_owned(&vs16, "", again, "w", &Default::default()).unwrap();
    assert_eq!((ha.kind(), hb.kind()), (Kind::Half, Kind::Half));
    assert_ne!(ha.data_ptr(), pa);
    assert_eq!(Vec::<f32>::try_from(hb.to_kind(Kind::Float)).unwrap(), b);
}

/// Where `needle` starts in `hay` (once).
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("bytes in the file")
}

#[test]
fn pickled_tensors_are_views_of_the_file_where_torch_save_aligned_them() {
    let dir = tempfile::tempdir().unwrap();
    // `w`: elements 2..6 of an 8-float storage, as a [2, 2] (a contiguous part: a view).
    let pk = pkl::state_dict("w", pkl::tensor(8, 2, &[2, 2], &[2, 1]));
    let storage = floats(8);
    let bytes = torch_zip_as("archive", 64, &pk, &[("0", &storage)], false);
    let start = find(&bytes, &storage);
    assert_eq!(start % 64, 0);
    let path = write(dir.path(), "aligned.bin", &bytes);
    let sd = checkpoint::load_path(&path).unwrap();
    let want = Tensor::arange_start(2, 6, (Kind::Float, tch::Device::Cpu)).view([2, 2]);
    assert!(sd["w"].equal(&want));
    // The mapping starts on a page: a view sits at the record's page offset + 8 bytes
    // (a fresh allocation would be 64-byte aligned, never 8 past it).
    assert_eq!(sd["w"].data_ptr() as usize % 4096, (start + 8) % 4096);
    // A model moved onto it writes to its own pages, not to the file.
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let var = vs.root().zeros("w", &[2, 2]);
    checkpoint::load_into_owned(&vs, "", sd, "w", &Default::default()).unwrap();
    tch::no_grad(|| {
        let _ = var.shallow_clone().fill_(9.0);
    });
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // A record at an offset not aligned for f32 is copied, with the right values.
    let odd = (1..8)
        .map(|n| torch_zip_as(&"a".repeat(n), 1, &pk, &[("0", &storage)], false))
        .find(|b| !find(b, &storage).is_multiple_of(4))
        .expect("some archive name misaligns the record");
    let path = write(dir.path(), "odd.bin", &odd);
    let sd = checkpoint::load_path(&path).unwrap();
    assert!(sd["w"].equal(&want));
    assert_eq!(sd["w"].data_ptr() as usize % 4, 0, "an aligned copy");
}

#[test]
fn misaligned_safetensors_tensors_are_copied_with_the_right_values() {
    let dir = tempfile::tempdir().unwrap();
    // a 1-byte tensor first: the f32 tensor after it starts at an odd offset
    let mut data = vec![7u8];
    data.extend(f32_bytes(&[1.5, -2.0]));
    let header = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}"#;
    let path = write_padded(dir.path(), "odd.safetensors", header, &data);
    let sd = checkpoint::load_safetensors(&path).unwrap();
    assert_eq!(Vec::<u8>::try_from(&sd["a"]).unwrap(), vec![7]);
    assert_eq!(Vec::<f32>::try_from(&sd["b"]).unwrap(), vec![1.5, -2.0]);
    assert_eq!(sd["b"].data_ptr() as usize % 4, 0, "an aligned copy");
}
