//! Hostile HTTP traffic (issue 29): encoded bodies, oversized heads and bodies, slow uploads,
//! idle and half-open connections, image bombs over HTTP, request-scoped failures. Loopback
//! only; every loop is bounded; servers are stopped (or killed) at the end.
//!
//! The memory cases run `lavit serve` on the mock stages as its own process and read its
//! `/proc/<pid>/status` (VmRSS now, VmHWM the peak), so other tests of this binary do not
//! blur the numbers; each prints what it measured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use lavit::pipeline::{Fault, Pipeline, PipelineConfig, StageKind};
use lavit::serve::{self, Limits, RunningServer};
use lavit_runtime::actors::Input;
use lavit_runtime::messages::Task;
use lavit_runtime::mock::MockConfig;
use lavit_runtime::stage::{ExitStatus, StageError};
use tch::{Device, Kind, Tensor};

use crate::serving::{wait_until, KillOnDrop};

/// A zlib stream of `n` zero bytes (deflated: ~1/1000 of `n`), written 1 MiB at a time.
fn zlib_zeros(n: usize) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    zeros_into(&mut z, n);
    z.finish().unwrap()
}

fn zeros_into(w: &mut impl Write, n: usize) {
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        w.write_all(&chunk[..k]).unwrap();
        left -= k;
    }
}

/// A gzip stream of `n` zero bytes.
fn gzip_zeros(n: usize) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    zeros_into(&mut z, n);
    z.finish().unwrap()
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend(kind);
    out.extend(data);
    out.extend(crc.sum().to_be_bytes());
}

/// An 8-bit RGB PNG of `w`×`h` black pixels with an ICC profile (iCCP) inflating to
/// `icc_bytes` zero bytes: 512 MiB is a 0.5 MB file.
pub fn png_with_icc(w: u32, h: u32, icc_bytes: usize) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    let mut iccp = b"bomb\0\0".to_vec();
    iccp.extend(zlib_zeros(icc_bytes));
    png_chunk(&mut out, b"iCCP", &iccp);
    let rows = (1 + w as usize * 3) * h as usize;
    png_chunk(&mut out, b"IDAT", &zlib_zeros(rows));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn mock_server(lim: Limits) -> RunningServer {
    let cfg = PipelineConfig {
        max_in_flight: 2,
        max_queue: 8,
        ..PipelineConfig::default()
    };
    let pipe = Arc::new(Pipeline::mock(&MockConfig::default(), None, &cfg).unwrap());
    let s = serve::spawn(
        pipe,
        Limits {
            bind: "127.0.0.1:0".into(),
            warmup: false,
            ..lim
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve::mark_ready(&s)).unwrap();
    s
}

/// Write `head` and `body` (either may be partial), then read the whole answer:
/// (status, body); status 0 = closed without an answer.
fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    read_answer(&mut s)
}

fn read_answer(s: &mut TcpStream) -> (u16, String) {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn post_head(path: &str, len: usize, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: \
         {len}\r\nConnection: close\r\n{extra}\r\n"
    )
}

fn small_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(20, 12, |x, y| image::Rgb([x as u8 * 9, y as u8 * 20, 3]));
    let mut c = std::io::Cursor::new(Vec::new());
    img.write_to(&mut c, image::ImageFormat::Png).unwrap();
    c.into_inner()
}

#[test]
fn encoded_and_oversized_requests_are_refused_before_reading() {
    let s = mock_server(Limits {
        body_limit_bytes: 1 << 20,
        ..Limits::default()
    });
    // 256 MiB of zeros in a 256 KB gzip body: refused by its header, never inflated.
    let bomb = gzip_zeros(256 << 20);
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    for enc in ["gzip", "GZIP", "br", "zstd", "deflate", "gzip, identity"] {
        let start = Instant::now();
        let (status, body) = exchange(
            s.addr,
            &post_head(
                "/v1/tokenize",
                bomb.len(),
                &format!("Content-Encoding: {enc}\r\n"),
            ),
            &bomb,
        );
        assert_eq!(status, 415, "{enc}: {body}");
        assert!(
            body.contains("Content-Encoding") && body.contains("uncompressed"),
            "{body}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    // `identity` is no encoding: the request goes through.
    let ok = serde_json::json!({"image": b64(&small_png())}).to_string();
    let (status, body) = exchange(
        s.addr,
        &post_head("/v1/tokenize", ok.len(), "Content-Encoding: identity\r\n"),
        ok.as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    // A declared length over the limit: 413 at once, before the body is sent.
    let (status, body) = exchange(s.addr, &post_head("/v1/tokenize", 2 << 20, ""), b"");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("server.body_limit_bytes"), "{body}");
    // Chunked bodies are counted as they arrive.
    let mut chunked = Vec::new();
    for _ in 0..20 {
        chunked.extend(format!("{:x}\r\n", 100_000).bytes());
        chunked.extend(vec![b' '; 100_000]);
        chunked.extend(b"\r\n");
    }
    chunked.extend(b"0\r\n\r\n");
    let (status, body) = exchange(
        s.addr,
        "POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: \
         close\r\n\r\n",
        &chunked,
    );
    assert_eq!(status, 413, "{body}");
    // A head over server.max_header_bytes.
    let pad = format!("X-Pad: {}\r\n", "p".repeat(20_000));
    let (status, body) = exchange(s.addr, &post_head("/v1/tokenize", 2, &pad), b"{}");
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("server.max_header_bytes"), "{body}");
    assert_eq!(
        exchange(
            s.addr,
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b""
        )
        .0,
        200
    );
    s.stop();
}

#[test]
fn slow_bodies_time_out_and_share_one_budget() {
    let s = mock_server(Limits {
        body_limit_bytes: 256 << 10,
        max_buffered_body_bytes: 512 << 10,
        body_timeout_s: 2,
        ..Limits::default()
    });
    // Two uploads that stall after 200 KiB hold 400 KiB of the 512 KiB budget.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(post_head("/v1/tokenize", 256 << 10, "").as_bytes())
            .unwrap();
        c.write_all(&vec![b' '; 200 << 10]).unwrap();
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    // A third upload finds the budget spent: 429 (busy) before its body is complete.
    let start = Instant::now();
    let (status, body) = exchange(
        s.addr,
        &post_head("/v1/tokenize", 256 << 10, ""),
        &vec![b' '; 200 << 10],
    );
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("server.max_buffered_body_bytes"), "{body}");
    assert!(start.elapsed() < Duration::from_secs(2));
    // The stalled ones are answered 408 after server.body_timeout_s …
    for mut c in stalled {
        let (status, body) = read_answer(&mut c);
        assert_eq!(status, 408, "{body}");
        assert!(body.contains("server.body_timeout_s"), "{body}");
    }
    // … and their share is back: a full-size body goes through.
    let req = serde_json::json!({"image": b64(&small_png()), "pad": "x".repeat(200 << 10)});
    let req = req.to_string();
    assert!(wait_until(5, || exchange(
        s.addr,
        &post_head("/v1/tokenize", req.len(), ""),
        req.as_bytes()
    )
    .0 == 200));
    s.stop();
}

#[test]
fn workers_and_connection_keys_are_validated() {
    use lavit_runtime::config::Validate;
    let ok = serve::ServeConfig::default();
    ok.validate("serve.toml").unwrap();
    for (tweak, key) in [
        (
            Box::new(|c: &mut serve::ServeConfig| c.server.workers = 513)
                as Box<dyn Fn(&mut serve::ServeConfig)>,
            "server.workers",
        ),
        (Box::new(|c| c.server.workers = 0), "server.workers"),
        (
            Box::new(|c| c.server.max_connections = 0),
            "server.max_connections",
        ),
        (
            Box::new(|c| c.server.max_header_bytes = 0),
            "server.max_header_bytes",
        ),
        (
            Box::new(|c| c.server.body_timeout_s = 0),
            "server.body_timeout_s",
        ),
        (
            Box::new(|c| c.server.max_buffered_body_bytes = 1),
            "server.max_buffered_body_bytes",
        ),
    ] {
        let mut c = ok.clone();
        tweak(&mut c);
        let e = c.validate("serve.toml").unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
    }
    // Through the binary: refused by name with exit 1, before anything is loaded.
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/serve-mock.toml");
    let r = crate::hostile_inputs::run_lavit(
        &[
            std::ffi::OsStr::new("serve"),
            std::ffi::OsStr::new("--config"),
            cfg.as_os_str(),
        ],
        &[("LAVIT__SERVER__WORKERS", "100000")],
    );
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(
        r.err.contains("server.workers") && !r.err.contains("panicked"),
        "{}",
        r.err
    );
}

/// Deterministic images for the mock encoder (B, 3, 28, 28), and a shape it refuses.
fn mock_images(side: i64) -> Tensor {
    (Tensor::arange(3 * side * side, (Kind::Float, Device::Cpu)) * 0.01)
        .sin()
        .reshape([1, 3, side, side])
}

#[test]
fn input_faults_never_count_toward_a_stage_death() {
    let cfg = PipelineConfig {
        max_in_flight: 2,
        max_queue: 2,
        ..PipelineConfig::default()
    };
    let pipe = Pipeline::mock(&MockConfig::default(), None, &cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let g = pipe.graph();
    let tokenize = |side| rt.block_on(g.run(Task::Tokenize, Input::Images(mock_images(side))));
    // Many invalid inputs (the mock encoder refuses a side that is not a multiple of its
    // patch): each is a 4xx for its request, and the stage stays up.
    for _ in 0..10 {
        assert!(matches!(tokenize(27), Err(StageError::Invalid(_))));
    }
    assert!(g.healthy());
    assert!(tokenize(28).is_ok());
    // Invalid inputs between the stage's own panics neither count nor break the row: three
    // panics of the stage still end it, as the policy says.
    for i in 0..3 {
        g.inject_fault(StageKind::Encoder, Fault::Panic);
        assert!(matches!(tokenize(28), Err(StageError::Panicked { .. })));
        if i < 2 {
            assert!(matches!(tokenize(27), Err(StageError::Invalid(_))));
            assert!(g.healthy());
        }
    }
    assert!(!g.healthy());
    assert_eq!(
        g.exit_status(StageKind::Encoder),
        Some(ExitStatus::Panicked)
    );
}

// ---------------------------------------------------------------------------------------
// Memory of a separate `lavit serve` process.

/// (VmRSS, VmHWM) of `pid` in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `lavit serve` on the mock stages with `env` overrides; its address once it listens.
fn serve_process(env: &[(&str, &str)]) -> (KillOnDrop, SocketAddr) {
    use std::process::{Command, Stdio};
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/serve-mock.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lavit"));
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .args(["--bind", "127.0.0.1:0"])
        .env("RUST_LOG", "error")
        .env_remove("LAVIT_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let (addr, _) = super::serving::listening_addr(&mut child);
    assert!(wait_until(60, || exchange(
        addr,
        "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b""
    )
    .0 == 200));
    (child, addr)
}

#[test]
fn idle_connections_and_compressed_and_icc_bombs_cost_little_memory() {
    let (child, addr) = serve_process(&[
        ("LAVIT__SERVER__REQUEST_HEAD_TIMEOUT_MS", "2000"),
        ("LAVIT__SERVER__BODY_TIMEOUT_S", "3"),
    ]);
    let pid = child.0.id();
    // Warm: a few ordinary requests first.
    let ok = serde_json::json!({"image": b64(&small_png())}).to_string();
    for _ in 0..3 {
        let r = exchange(
            addr,
            &post_head("/v1/tokenize", ok.len(), ""),
            ok.as_bytes(),
        );
        assert_eq!(r.0, 200, "{}", r.1);
    }

    // Five gzip bombs at once (1 GiB of zeros each): 415, nothing inflated.
    let bomb = Arc::new(gzip_zeros(1 << 30));
    let (_, hwm0) = rss_mib(pid);
    let threads: Vec<_> = (0..5)
        .map(|_| {
            let bomb = bomb.clone();
            std::thread::spawn(move || {
                exchange(
                    addr,
                    &post_head("/v1/tokenize", bomb.len(), "Content-Encoding: gzip\r\n"),
                    &bomb,
                )
                .0
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 415);
    }
    let (_, hwm1) = rss_mib(pid);
    // Eight PNGs whose ICC profile inflates to 512 MiB each (0.5 MB files): decoded with the
    // profile skipped.
    let png = png_with_icc(64, 64, 512 << 20);
    let body = Arc::new(serde_json::json!({"image": b64(&png)}).to_string());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                exchange(
                    addr,
                    &post_head("/v1/tokenize", body.len(), ""),
                    body.as_bytes(),
                )
            })
        })
        .collect();
    for t in threads {
        let (status, b) = t.join().unwrap();
        assert_eq!(status, 200, "{b}");
    }
    let (_, hwm2) = rss_mib(pid);
    eprintln!(
        "5 gzip bombs ({} KB → 1 GiB each) at once: peak RSS +{:.1} MiB; 8 ICC PNGs ({} KB → \
         512 MiB profile each) at once: peak RSS +{:.1} MiB",
        bomb.len() / 1000,
        hwm1 - hwm0,
        png.len() / 1000,
        hwm2 - hwm1
    );
    assert!(hwm1 - hwm0 < 64.0, "gzip: {hwm0} → {hwm1}");
    assert!(hwm2 - hwm1 < 128.0, "icc: {hwm1} → {hwm2}");
    // (VmHWM only grows: the bombs are measured first.)
    let (idle_rss, _) = rss_mib(pid);
    // 500 connections: a third connected and silent, a third with half a request head, a
    // third sending 5 MiB of a declared 6 MiB body and stalling (before the intake's budget,
    // that pattern held +907 MiB; the bodies are written from threads, as the server stops
    // reading those it refuses).
    let mut conns = Vec::new();
    let mut writers = Vec::new();
    for i in 0..500 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        match i % 3 {
            0 => {}
            1 => c
                .write_all(b"POST /v1/tokenize HTTP/1.1\r\nHost: x\r\nContent-Le")
                .unwrap(),
            _ => {
                let mut w = c.try_clone().unwrap();
                w.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                writers.push(std::thread::spawn(move || {
                    let _ = w.write_all(post_head("/v1/tokenize", 6 << 20, "").as_bytes());
                    let _ = w.write_all(&vec![b' '; 5 << 20]);
                }));
            }
        }
        conns.push(c);
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (held_rss, _) = rss_mib(pid);
    // The server answers meanwhile.
    let start = Instant::now();
    let (status, _) = exchange(
        addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"",
    );
    assert_eq!(status, 200);
    let health_ms = start.elapsed().as_millis();
    // Every one of them is closed by the server within its timeouts.
    let start = Instant::now();
    for c in &mut conns {
        let mut buf = [0u8; 512];
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // a 408 answer, then the close
            }
        }
    }
    let closed_s = start.elapsed().as_secs_f64();
    drop(conns);
    for w in writers {
        w.join().unwrap();
    }
    eprintln!(
        "500 idle / half-open connections: RSS {idle_rss:.0} MiB idle → {held_rss:.0} MiB \
         (+{:.1} MiB); /health in {health_ms} ms meanwhile; all closed by the server after \
         {closed_s:.1} s",
        held_rss - idle_rss
    );
    assert!(held_rss - idle_rss <= 300.0, "{held_rss} vs {idle_rss}");
    assert!(closed_s < 15.0, "{closed_s}");

    // Still serving.
    let r = exchange(
        addr,
        &post_head("/v1/tokenize", ok.len(), ""),
        ok.as_bytes(),
    );
    assert_eq!(r.0, 200, "{}", r.1);
    drop(child);
}
