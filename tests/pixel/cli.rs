//! `lavit generate` / `lavit reconstruct` from the fixture through the CLI, and bad inputs.

use std::process::Command;

use crate::common::fixture_dir;

fn lavit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lavit"))
}

fn png_size(p: &std::path::Path) -> (u32, u32) {
    let img = image::open(p).unwrap();
    (img.width(), img.height())
}

#[test]
fn generate_and_reconstruct_write_pngs_from_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gen.png");
    let o = lavit()
        .args(["generate", "--checkpoint"])
        .arg(fixture_dir())
        .args([
            "a photo of a cat",
            "--steps",
            "3",
            "--seed",
            "1",
            "--num-images",
            "2",
        ])
        .args(["--ratio", "4:3", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 4:3 at the fixture's 16 px native size, rounded to multiples of 4
    assert_eq!(png_size(&dir.path().join("gen-0.png")), (20, 16));
    assert_eq!(png_size(&dir.path().join("gen-1.png")), (20, 16));

    let out = dir.path().join("low.png");
    let o = lavit()
        .args(["generate", "--checkpoint"])
        .arg(fixture_dir())
        .args(["a cat", "--steps", "2", "--pixel-decoding", "lowres", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(png_size(&out), (16, 16));

    // reconstruct a real photo (written as PNG from the fixture's own image tensor)
    let photo = dir.path().join("photo.png");
    let reference =
        lavit_runtime::checkpoint::load_file(&fixture_dir().join("reference/expected.safetensors"))
            .unwrap();
    let mean = tch::Tensor::from_slice(&[0.48145466f64, 0.4578275, 0.40821073]).view([1, 3, 1, 1]);
    let std = tch::Tensor::from_slice(&[0.26862954f64, 0.26130258, 0.27577711]).view([1, 3, 1, 1]);
    let img = (&reference["images"].narrow(0, 0, 1) * std.to_kind(tch::Kind::Float)
        + mean.to_kind(tch::Kind::Float))
    .clamp(0.0, 1.0);
    lavit::generate::save_pngs(&img, &photo).unwrap();
    let out = dir.path().join("rec.png");
    let o = lavit()
        .args(["reconstruct", "--checkpoint"])
        .arg(fixture_dir())
        .arg(&photo)
        .args(["--steps", "2", "--seed", "0", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(png_size(&out), (16, 16));
    assert!(String::from_utf8_lossy(&o.stdout).contains("visual tokens"));
}

#[test]
fn bad_generate_and_reconstruct_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let not_image = dir.path().join("x.png");
    std::fs::write(&not_image, b"not a png").unwrap();
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "generate".into(),
                "--checkpoint".into(),
                fixture_dir().into(),
                "x".into(),
                "--width".into(),
                "15".into(),
            ],
            "multiple of",
        ),
        (
            vec![
                "generate".into(),
                "--checkpoint".into(),
                fixture_dir().into(),
                "x".into(),
                "--ratio".into(),
                "5:1".into(),
            ],
            "--ratio",
        ),
        (
            vec![
                "generate".into(),
                "--checkpoint".into(),
                dir.path().into(),
                "x".into(),
            ],
            "tokenizer_encoder",
        ),
        (
            vec![
                "reconstruct".into(),
                "--checkpoint".into(),
                fixture_dir().into(),
                not_image.clone().into(),
            ],
            "x.png",
        ),
    ];
    for (args, want) in cases {
        let o = lavit()
            .args(&args)
            .args(["-o", dir.path().join("o.png").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
