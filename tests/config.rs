//! One config mechanism: every command's config through `lavit_runtime::config` with
//! `LAVIT__SECTION__KEY` overrides, and `lavit serve` on built-in defaults without a file.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::common::fixture_dir;
use crate::serving::{post, request, wait_until, KillOnDrop};

/// Start `lavit serve --checkpoint FIXTURE` without a config file, with `env` overrides;
/// returns the child and its address.
fn serve_without_config(env: &[(&str, &str)]) -> (KillOnDrop, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lavit"));
    cmd.args(["serve", "--checkpoint"])
        .arg(fixture_dir())
        .args(["--bind", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .env_remove("LAVIT_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let (addr, _) = super::serving::listening_addr(&mut child);
    (child, addr)
}

#[test]
fn serve_without_a_config_file_takes_env_overrides() {
    let (_child, addr) = serve_without_config(&[("LAVIT__SERVER__MAX_N", "1")]);
    assert!(wait_until(120, || request(addr, "GET", "/ready", b"", &[])
        .status
        == 200));
    let two = post(
        addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a cat", "n": 2, "steps": 1, "size": "16x16"}),
    );
    assert_eq!(two.status, 400, "{}", two.body);
    assert!(two.body.contains('n'), "{}", two.body);
    let one = post(
        addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a cat", "n": 1, "steps": 1, "size": "16x16"}),
    );
    assert_eq!(one.status, 200, "{}", one.body);
}

#[test]
fn bad_overrides_are_refused_with_the_variable_and_key() {
    for (var, val, want) in [
        ("LAVIT__SERVER__MAX_N", "0", "server.max_n"),
        ("LAVIT__SERVER__MAX_NN", "2", "max_nn"),
        (
            "LAVIT__PIPELINE__MAX_IN_FLIGHT",
            "lots",
            "pipeline.max_in_flight",
        ),
        ("LAVIT__PIPELINE__PLACEMENT__LLM", "tpu:0", "placement.llm"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_lavit"))
            .args(["serve", "--checkpoint"])
            .arg(fixture_dir())
            .args(["--bind", "127.0.0.1:0"])
            .env(var, val)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{var}={val}: {err}");
        assert!(
            err.contains(var) || err.contains(want),
            "{var}={val}: {err}"
        );
        assert!(err.contains(want), "{var}={val}: {err}");
        assert!(!err.contains("panicked"), "{var}={val}: {err}");
    }
}

#[test]
fn a_device_the_machine_lacks_is_an_error_not_a_cpu_run() {
    if tch::Cuda::is_available() {
        return;
    }
    let img = tempfile::tempdir().unwrap();
    let p = img.path().join("x.png");
    image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]))
        .save(&p)
        .unwrap();
    for cmd in ["tokenize", "caption"] {
        let o = Command::new(env!("CARGO_BIN_EXE_lavit"))
            .args([cmd, "--device", "cuda:0", "--checkpoint"])
            .arg(fixture_dir())
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.contains("CUDA is not available"), "{cmd}: {err}");
    }
}
