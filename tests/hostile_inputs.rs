//! Hostile files, folders and sizes, round 3 (issue 29): what `lavit eval`, the training
//! folder readers, plugin loading and the checkpoint readers do with special files, link
//! loops, huge lines and sizes taken from configs, flags and file headers. Each case runs the
//! real `lavit` binary (or the library function behind it) on files built in a temp folder
//! at test time, and must end in a clean refusal naming what was wrong — exit 1, no panic,
//! within 60 s — with the peak memory of the process measured (`/usr/bin/time`) where the
//! case is about memory.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{fixture_dir, write_images};

/// A run of `lavit`: exit code, stderr, peak RSS in MiB (when `/usr/bin/time` is there).
pub struct Run {
    pub code: i32,
    pub err: String,
    pub peak_mib: Option<f64>,
}

/// Run `lavit ARGS` with `env`, under `/usr/bin/time` when present, killed after 60 s (a
/// failed test: a hang).
pub fn run_lavit(args: &[&OsStr], env: &[(&str, &str)]) -> Run {
    let time = Path::new("/usr/bin/time");
    let mut cmd = if time.exists() {
        let mut c = Command::new(time);
        c.args(["-f", "LAVIT_PEAK_KIB %M"])
            .arg(env!("CARGO_BIN_EXE_lavit"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_lavit"))
    };
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lavit {args:?} ran for more than 60 s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = reader.join().unwrap();
    let mut peak_mib = None;
    if let Some(at) = err.rfind("LAVIT_PEAK_KIB ") {
        peak_mib = err[at + 15..]
            .trim()
            .parse::<f64>()
            .ok()
            .map(|k| k / 1024.0);
        err.truncate(at);
    }
    Run {
        code: status.code().unwrap_or(-1),
        err,
        peak_mib,
    }
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Exit 1, no panic, a message naming each needle, a short message (nothing echoed whole),
/// and at most 1 GiB of peak memory.
fn assert_refused(case: &str, r: &Run, needles: &[&str]) {
    assert!(
        !r.err.contains("panicked"),
        "{case}: lavit panicked:\n{}",
        r.err
    );
    assert_eq!(
        r.code, 1,
        "{case}: exit code {}, stderr:\n{}",
        r.code, r.err
    );
    for n in needles {
        assert!(
            r.err.contains(n),
            "{case}: the error does not name `{n}`:\n{}",
            r.err
        );
    }
    assert!(r.err.len() < 4000, "{case}: a {}-byte error", r.err.len());
    if let Some(p) = r.peak_mib {
        assert!(p <= 1024.0, "{case}: peak RSS {p:.0} MiB");
    }
    eprintln!(
        "{case}: refused (peak RSS {})",
        r.peak_mib.map_or("n/a".into(), |p| format!("{p:.0} MiB"))
    );
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

fn symlink(target: impl AsRef<Path>, link: &Path) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// `lavit eval --checkpoint FIXTURE --tasks captions --captions FILE --out OUT`.
fn eval_captions(captions: &Path, out: &Path, extra: &[&OsStr]) -> Run {
    let fixture = fixture_dir();
    let mut args: Vec<&OsStr> = vec![
        os("eval"),
        os("--checkpoint"),
        fixture.as_os_str(),
        os("--tasks"),
        os("captions"),
        os("--captions"),
        captions.as_os_str(),
        os("--out"),
        out.as_os_str(),
    ];
    args.extend_from_slice(extra);
    let owned: Vec<OsString> = args.iter().map(|a| a.to_os_string()).collect();
    let refs: Vec<&OsStr> = owned.iter().map(|a| a.as_os_str()).collect();
    run_lavit(&refs, &[])
}

#[test]
fn eval_refuses_special_files_link_loops_and_huge_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("out");
    let caps = d.join("captions.jsonl");
    let line = |img: &str| format!("{{\"image\": \"{img}\", \"captions\": [\"a cat\"]}}\n");
    // An image that is a FIFO named .jpg: refused from its metadata (no open that hangs).
    mkfifo(&d.join("fifo.jpg"));
    std::fs::write(&caps, line("fifo.jpg")).unwrap();
    assert_refused(
        "eval: FIFO image",
        &eval_captions(&caps, &out, &[]),
        &["fifo.jpg", "FIFO"],
    );
    // /dev/zero named .jpg: never read.
    symlink("/dev/zero", &d.join("zero.jpg"));
    std::fs::write(&caps, line("zero.jpg")).unwrap();
    assert_refused(
        "eval: /dev/zero image",
        &eval_captions(&caps, &out, &[]),
        &["zero.jpg", "character device"],
    );
    // A link loop.
    symlink(d.join("b.png"), &d.join("a.png"));
    symlink(d.join("a.png"), &d.join("b.png"));
    std::fs::write(&caps, line("a.png")).unwrap();
    assert_refused(
        "eval: link loop image",
        &eval_captions(&caps, &out, &[]),
        &["a.png", "symbolic-link loop"],
    );
    // A 3 MiB line: refused by number, neither read whole nor echoed.
    let mut f = std::fs::File::create(&caps).unwrap();
    f.write_all(line("x.png").as_bytes()).unwrap();
    f.write_all(format!("{{\"image\": \"{}\"}}\n", "y".repeat(3 << 20)).as_bytes())
        .unwrap();
    drop(f);
    let r = eval_captions(&caps, &out, &[]);
    assert_refused(
        "eval: 3 MiB line",
        &r,
        &["captions.jsonl", "line 2 is longer"],
    );
    assert!(!r.err.contains("yyyyyyyy"), "{}", r.err);
    // A 500 MB file of one line (sparse): refused by its size before reading.
    let f = std::fs::File::create(&caps).unwrap();
    f.set_len(500 << 20).unwrap();
    drop(f);
    assert_refused(
        "eval: 500 MB JSONL",
        &eval_captions(&caps, &out, &[]),
        &["captions.jsonl", "cap"],
    );
    // A JSON error quotes at most 80 characters of its line.
    std::fs::write(
        &caps,
        format!("{{\"image\": 1, \"junk\": \"{}\"}}\n", "z".repeat(5000)),
    )
    .unwrap();
    let r = eval_captions(&caps, &out, &[]);
    assert_refused("eval: bad line", &r, &["captions.jsonl line 1"]);
    assert!(!r.err.contains(&"z".repeat(200)), "{}", r.err);
    // --images-per-prompt is capped like `lavit generate --num-images`, before loading.
    let r = eval_captions(&caps, &out, &[os("--images-per-prompt"), os("100000000")]);
    assert_refused(
        "eval: images per prompt",
        &r,
        &["--images-per-prompt", "1..=64"],
    );
    // A real-images folder holding a link to itself.
    let real = d.join("real");
    std::fs::create_dir_all(&real).unwrap();
    write_images(&real, 1);
    symlink("/dev/zero", &real.join("z.png"));
    let prompts = d.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"a cat\"}\n").unwrap();
    let fixture = fixture_dir();
    let r = run_lavit(
        &[
            os("eval"),
            os("--checkpoint"),
            fixture.as_os_str(),
            os("--tasks"),
            os("t2i"),
            os("--prompts"),
            prompts.as_os_str(),
            os("--real-images"),
            real.as_os_str(),
            os("--embedding"),
            os("pixels"),
            os("--out"),
            out.as_os_str(),
        ],
        &[],
    );
    assert_refused(
        "eval: device in the real images",
        &r,
        &["z.png", "character device"],
    );
}

/// A `lavit train decoder` config over `images`.
fn decoder_config(dir: &Path, images: &Path, image_size: u32) -> PathBuf {
    let p = dir.join("decoder.toml");
    std::fs::write(
        &p,
        format!(
            "out_dir = {:?}\n[data]\nimages = {:?}\nimage_size = {image_size}\n[train]\n\
             steps = 1\n",
            dir.join("run").display().to_string(),
            images.display().to_string()
        ),
    )
    .unwrap();
    p
}

#[test]
fn training_folders_and_sizes_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let imgs = d.join("imgs");
    write_images(&imgs.join("sub"), 2);
    // data.image_size is validated before anything is allocated (a 16 GiB resize buffer).
    let cfg = decoder_config(d, &imgs, 65536);
    let r = run_lavit(
        &[os("train"), os("decoder"), os("--config"), cfg.as_os_str()],
        &[],
    );
    assert_refused(
        "train decoder: image_size",
        &r,
        &["data.image_size", "65536"],
    );
    // A folder link back to the root: refused instead of walked forever.
    symlink(&imgs, &imgs.join("sub/up"));
    let cfg = decoder_config(d, &imgs, 32);
    let r = run_lavit(
        &[os("train"), os("decoder"), os("--config"), cfg.as_os_str()],
        &[],
    );
    assert_refused("train decoder: folder loop", &r, &["up", "link loop"]);
    std::fs::remove_file(imgs.join("sub/up")).unwrap();
    // A FIFO with an image name: refused from its metadata.
    mkfifo(&imgs.join("sub/f.png"));
    let r = run_lavit(
        &[os("train"), os("decoder"), os("--config"), cfg.as_os_str()],
        &[],
    );
    assert_refused("train decoder: FIFO image", &r, &["f.png", "FIFO"]);
    // The tokenizer trainer's folder reader is the same walk.
    let e = format!(
        "{:#}",
        lavit::train::tokenizer::load_image_folder(&imgs, 28, 0).unwrap_err()
    );
    assert!(
        e.contains("data_dir") && e.contains("f.png") && e.contains("FIFO"),
        "{e}"
    );
}

/// A safetensors file of `n` empty float tensors (a 60-byte header entry each).
fn empty_tensors_file(path: &Path, n: usize) {
    let mut h = String::from("{");
    for i in 0..n {
        if i > 0 {
            h.push(',');
        }
        h.push_str(&format!(
            "\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}"
        ));
    }
    h.push('}');
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(h.as_bytes()).unwrap();
}

/// A 16-bit RGBA PNG of `w`×`h` mid-grey pixels, written row by row (never held whole).
fn png16(path: &Path, w: u32, h: u32) {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = |out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.sum().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([16, 6, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let row: Vec<u8> = std::iter::once(0u8)
        .chain(std::iter::repeat_n(0x80, w as usize * 8))
        .collect();
    for _ in 0..h {
        z.write_all(&row).unwrap();
    }
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn sizes_from_files_are_bounded_before_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 200,000 empty tensors in one header: refused from the header's count.
    let st = d.join("many.safetensors");
    empty_tensors_file(&st, 200_000);
    let r = run_lavit(&[os("inspect"), st.as_os_str()], &[]);
    assert_refused(
        "safetensors: 200k tensors",
        &r,
        &["many.safetensors", "tensor cap"],
    );
    // The demo judge's widths come from its tensors: an empty conv1.weight claiming a
    // million channels is refused before the judge is built.
    let judge = d.join("judge.safetensors");
    let mut sd = lavit_runtime::checkpoint::StateDict::new();
    sd.insert(
        "conv1.weight".into(),
        tch::Tensor::zeros([1_000_000, 0, 3, 3], (tch::Kind::Float, tch::Device::Cpu)),
    );
    lavit_runtime::checkpoint::save_safetensors(&judge, &sd, None).unwrap();
    let e = lavit::demo::judge::Judge::load_file(&judge)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("conv1.weight") && e.contains("1..=1024"), "{e}");
    // A 16-bit PNG at the pixel cap (36 M pixels): decoded 8 bits per sample, within 1 GiB.
    let big = d.join("big16.png");
    png16(&big, 6000, 6000);
    let fixture = fixture_dir();
    let r = run_lavit(
        &[
            os("tokenize"),
            os("--checkpoint"),
            fixture.as_os_str(),
            big.as_os_str(),
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.err);
    let peak = r.peak_mib.map_or("n/a".into(), |p| format!("{p:.0} MiB"));
    eprintln!("16-bit 6000x6000 PNG through lavit tokenize: peak RSS {peak}");
    if let Some(p) = r.peak_mib {
        assert!(p <= 1024.0, "{p}");
    }
    // Past the pixel cap: refused from the header.
    let huge = d.join("huge16.png");
    png16(&huge, 8192, 8192);
    let r = run_lavit(
        &[
            os("tokenize"),
            os("--checkpoint"),
            fixture.as_os_str(),
            huge.as_os_str(),
        ],
        &[],
    );
    assert_refused("16-bit 8192x8192 PNG", &r, &["huge16.png", "8192x8192"]);
}

#[test]
fn plugin_paths_and_weights_are_checked_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("imgs");
    write_images(&img, 1);
    let img = img.join("img00.png");
    let fixture = fixture_dir();
    for (name, make) in [
        (
            "fifo.so",
            Box::new(|p: &Path| mkfifo(p)) as Box<dyn Fn(&Path)>,
        ),
        ("zero.so", Box::new(|p: &Path| symlink("/dev/zero", p))),
    ] {
        let lib = d.join(name);
        make(&lib);
        let cfg = d.join("serve.toml");
        std::fs::write(
            &cfg,
            format!("[plugins]\nload = [{:?}]\n", lib.display().to_string()),
        )
        .unwrap();
        let r = run_lavit(
            &[
                os("tokenize"),
                os("--checkpoint"),
                fixture.as_os_str(),
                os("--config"),
                cfg.as_os_str(),
                img.as_os_str(),
            ],
            &[],
        );
        assert_refused(&format!("plugin {name}"), &r, &[name, "not a regular file"]);
    }
}

#[test]
fn demo_data_files_are_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    symlink("/dev/zero", &d.join("train-images-idx3-ubyte.gz"));
    let e = lavit::demo::data::FashionMnist::load(d)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("character device"),
        "{e}"
    );
    // A gzip bomb: refused after the cap, not inflated whole.
    let bomb = d.join("train-images-idx3-ubyte.gz");
    std::fs::remove_file(&bomb).unwrap();
    let mut z = flate2::write::GzEncoder::new(
        std::fs::File::create(&bomb).unwrap(),
        flate2::Compression::fast(),
    );
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..300 {
        z.write_all(&zeros).unwrap();
    }
    z.finish().unwrap();
    let e = lavit::demo::data::FashionMnist::load(d)
        .unwrap_err()
        .to_string();
    assert!(e.contains("inflates to more than"), "{e}");
}
