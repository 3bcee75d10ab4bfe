//! Whole HTTP requests against a running server (mock stages, 127.0.0.1 only): the first
//! input byte picks the route, the content encoding, the framing (Content-Length exact,
//! short, or chunked) and a long header; the rest is the body. The answer must never be a
//! 5xx, and the server must go on answering `/health`.
#![no_main]
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

static SERVER: OnceLock<SocketAddr> = OnceLock::new();

/// One server for the whole run (mock stages, small caps, a 1 s body timeout).
fn server() -> SocketAddr {
    *SERVER.get_or_init(|| {
        let cfg = lavit::pipeline::PipelineConfig {
            max_in_flight: 2,
            max_queue: 8,
            ..Default::default()
        };
        let mock = lavit_runtime::mock::MockConfig::default();
        let pipe = std::sync::Arc::new(
            lavit::pipeline::Pipeline::mock(&mock, None, &cfg).expect("mock pipeline"),
        );
        let lim = lavit::serve::Limits {
            bind: "127.0.0.1:0".into(),
            warmup: false,
            body_limit_bytes: 256 << 10,
            max_buffered_body_bytes: 4 << 20,
            body_timeout_s: 1,
            max_header_bytes: 8 << 10,
            max_image_side: 256,
            max_image_pixels: 128 * 128,
            max_image_bytes: 96 << 10,
            ..Default::default()
        };
        let s = lavit::serve::spawn(pipe, lim).expect("server");
        let addr = s.addr;
        // Runs for the whole fuzzing process.
        std::mem::forget(s);
        addr
    })
}

fn status_of(addr: SocketAddr, bytes: &[u8]) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        panic!("the server stopped accepting connections");
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    std::str::from_utf8(raw.get(9..12).unwrap_or(b"000"))
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let addr = server();
    let route = [
        "/v1/images/generations",
        "/v1/chat/completions",
        "/v1/tokenize",
        "/v1/models",
    ][(sel & 3) as usize];
    let mut head = format!("POST {route} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if sel & 4 != 0 {
        head.push_str(["Content-Encoding: gzip\r\n", "Content-Encoding: br\r\n"][(sel >> 6) as usize & 1]);
    }
    if sel & 8 != 0 {
        head.push_str(&format!("X-Pad: {}\r\n", "p".repeat(10_000)));
    }
    let mut payload = Vec::new();
    if sel & 16 != 0 {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
        for part in body.chunks(97) {
            payload.extend(format!("{:x}\r\n", part.len()).bytes());
            payload.extend(part);
            payload.extend(b"\r\n");
        }
        payload.extend(b"0\r\n\r\n");
    } else {
        let declared = if sel & 32 != 0 { body.len() / 2 } else { body.len() };
        head.push_str(&format!("Content-Length: {declared}\r\n\r\n"));
        payload.extend(body);
    }
    let mut bytes = head.into_bytes();
    bytes.extend(payload);
    let status = status_of(addr, &bytes);
    assert!(!(500..600).contains(&status), "a {status} answer");
    assert_eq!(
        status_of(addr, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        200,
        "the server is no longer healthy"
    );
});
