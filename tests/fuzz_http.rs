//! Seeded structured fuzzing of whole HTTP requests against a running server (issue 29):
//! request lines, headers (content encodings, wrong and huge lengths, chunked framing, long
//! and many headers, bytes that are not text), JSON bodies with hostile fields and data-URI
//! images (truncated, bomb headers, ICC chunks, 16-bit), multipart bodies and raw bytes, sent
//! over TCP to `lavit::serve` on 127.0.0.1 with mock stages. Bounded: `LAVIT_HTTP_FUZZ_CASES`
//! requests (default 300) and 90 s at most, each with a 10 s read timeout.
//!
//! Every answer must be a 2xx or a 4xx carrying an error message (or a closed connection for a
//! request whose framing is broken on purpose), never a 5xx and never a hang; afterwards the
//! server is healthy, nothing is left admitted, the body budget is whole again and no internal
//! error was counted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use lavit::pipeline::{Pipeline, PipelineConfig};
use lavit::serve::{self, Limits};
use lavit_runtime::mock::MockConfig;

use crate::fuzz::{http_seeds, image_seeds, mutate, mutate_json_numbers, Rng};

/// One request as bytes, and whether it is malformed at the HTTP level on purpose (broken
/// framing, bytes a header may not hold, too many headers): then the HTTP parser may answer
/// with a bare status, or the server just close the connection.
struct Case {
    bytes: Vec<u8>,
    broken_framing: bool,
    what: String,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Hostile images for data URIs: the seeds, mutated seeds, a bomb header, a PNG with a big
/// zero ICC profile, a 16-bit PNG.
fn image_payloads(rng: &mut Rng) -> Vec<u8> {
    let seeds = image_seeds();
    match rng.below(6) {
        0 => seeds[rng.below(seeds.len())].clone(),
        1 | 2 => {
            let s = &seeds[rng.below(seeds.len())];
            mutate(rng, s, &seeds)
        }
        3 => {
            let mut p = seeds[0].clone();
            p[16..20].copy_from_slice(&100_000u32.to_be_bytes());
            p[20..24].copy_from_slice(&100_000u32.to_be_bytes());
            p
        }
        4 => crate::hostile_http::png_with_icc(16, 16, 8 << 20),
        _ => {
            let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_fn(40, 30, |x, y| {
                image::Rgba([x as u16 * 1000, y as u16 * 2000, 7, 65535])
            });
            let mut c = std::io::Cursor::new(Vec::new());
            image::DynamicImage::ImageRgba16(img)
                .write_to(&mut c, image::ImageFormat::Png)
                .unwrap();
            c.into_inner()
        }
    }
}

/// A request body: a JSON seed with hostile numbers or raw mutations, a chat / tokenize body
/// around a hostile image, a multipart body, or random bytes.
fn body(rng: &mut Rng, seeds: &[Vec<u8>]) -> (Vec<u8>, &'static str) {
    match rng.below(7) {
        0 => {
            let s = rng.below(seeds.len());
            (mutate_json_numbers(rng, &seeds[s]), "json-numbers")
        }
        1 => {
            let s = rng.below(seeds.len());
            (mutate(rng, &seeds[s], seeds), "json-bytes")
        }
        2 => {
            let url = format!("data:image/png;base64,{}", b64(&image_payloads(rng)));
            let v = serde_json::json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": url}}]}], "max_tokens": 2});
            (v.to_string().into_bytes(), "chat-image")
        }
        3 => {
            let imgs: Vec<String> = (0..1 + rng.below(3))
                .map(|_| b64(&image_payloads(rng)))
                .collect();
            (
                serde_json::json!({"images": imgs}).to_string().into_bytes(),
                "tokenize-images",
            )
        }
        4 => {
            let boundary = format!("b{}", rng.next() % 100_000);
            let mut m = Vec::new();
            for i in 0..1 + rng.below(3) {
                m.extend(
                    format!(
                        "--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"; \
                     filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
                    )
                    .bytes(),
                );
                m.extend(image_payloads(rng));
                m.extend(b"\r\n");
            }
            if rng.below(3) != 0 {
                m.extend(format!("--{boundary}--\r\n").bytes());
            }
            (m, "multipart")
        }
        5 => (
            (0..rng.below(4096)).map(|_| rng.next() as u8).collect(),
            "random",
        ),
        _ => {
            let s = rng.below(seeds.len());
            (seeds[s].clone(), "seed")
        }
    }
}

const ROUTES: [&str; 8] = [
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/chat/completions",
    "/v1/tokenize",
    "/v1/models",
    "/v1/models/lavit",
    "/health",
    "/v1/nothing",
];

/// One structured request: method, route (sometimes mangled), headers and body, with the
/// framing sometimes broken on purpose.
fn case(rng: &mut Rng, seeds: &[Vec<u8>], addr: SocketAddr) -> Case {
    let (mut body, kind) = body(rng, seeds);
    let mut what = kind.to_string();
    let method = ["POST", "POST", "POST", "GET", "PUT", "POST\x01"][rng.below(6)];
    let mut path = ROUTES[rng.below(ROUTES.len())].to_string();
    if rng.below(10) == 0 {
        path.push_str(&format!("?x={}", "q".repeat(rng.below(40_000))));
        what.push_str("+long-query");
    }
    let content_type = [
        "application/json",
        "multipart/form-data; boundary=b1",
        "text/plain",
        "application/json; charset=utf-16",
        "",
    ][rng.below(5)];
    let mut headers = vec![format!("Host: {addr}"), "Connection: close".to_string()];
    if !content_type.is_empty() {
        headers.push(format!("Content-Type: {content_type}"));
    }
    let mut broken = false;
    match rng.below(12) {
        0 => {
            let enc = [
                "gzip", "br", "zstd", "deflate", "identity", "gzip, br", "x\u{7f}",
            ][rng.below(7)];
            headers.push(format!("Content-Encoding: {enc}"));
            // DEL is not allowed in a header value: the HTTP parser answers 400 itself.
            broken |= enc.contains('\u{7f}');
            what.push_str(&format!("+encoding({enc:?})"));
        }
        1 => {
            headers.push(format!("X-Pad: {}", "p".repeat(1 + rng.below(60_000))));
            what.push_str("+long-header");
        }
        2 => {
            let n = rng.below(120);
            for i in 0..n {
                headers.push(format!("X-H{i}: {i}"));
            }
            // Past 96 headers the HTTP parser itself answers 431 (no body).
            broken |= n + 4 > 90;
            what.push_str("+many-headers");
        }
        3 => {
            // NUL is not allowed in a header value either.
            headers.push("Authorization: Bearer \u{0}\u{ff}".to_string());
            broken = true;
            what.push_str("+nul-header");
        }
        _ => {}
    }
    match rng.below(16) {
        // Chunked framing, sometimes with a lying or truncated chunk.
        0 => {
            headers.push("Transfer-Encoding: chunked".into());
            let mut framed = Vec::new();
            for part in body.chunks(1 + rng.below(700)) {
                framed.extend(format!("{:x}\r\n", part.len()).bytes());
                framed.extend(part);
                framed.extend(b"\r\n");
            }
            if rng.below(4) == 0 {
                framed.extend(b"fffffff\r\nabc");
                broken = true;
            } else {
                framed.extend(b"0\r\n\r\n");
            }
            body = framed;
            what.push_str("+chunked");
        }
        // A declared length shorter than the body (the rest reads as a next request) or
        // longer (the body never completes: the server's body timeout answers).
        1 => {
            let n = rng.below(body.len() + 1);
            headers.push(format!("Content-Length: {n}"));
            broken |= n != body.len();
            what.push_str("+short-length");
        }
        2 => {
            headers.push(format!(
                "Content-Length: {}",
                body.len() + 1 + rng.below(1000)
            ));
            broken = true;
            what.push_str("+long-length");
        }
        3 => {
            headers.push("Content-Length: 99999999999999999999".into());
            broken = true;
            what.push_str("+huge-length");
        }
        _ => headers.push(format!("Content-Length: {}", body.len())),
    }
    let mut bytes = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    for h in headers {
        bytes.extend(h.bytes());
        bytes.extend(b"\r\n");
    }
    bytes.extend(b"\r\n");
    bytes.extend(&body);
    Case {
        bytes,
        broken_framing: broken || method.contains('\x01'),
        what,
    }
}

/// Send raw bytes, read the answer until the server closes: (status, body); status 0 = the
/// connection closed without an answer; `None` = no answer within 10 s (a hang).
fn try_send(addr: SocketAddr, bytes: &[u8]) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                let _ = start;
                return None;
            }
            Err(_) => break, // reset by the server
        }
    }
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
    Some((status, body))
}

fn send(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    try_send(addr, bytes).expect("no answer within 10 s")
}

fn cases() -> usize {
    std::env::var("LAVIT_HTTP_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

#[test]
fn fuzz_http_server() {
    let lim = Limits {
        bind: "127.0.0.1:0".into(),
        warmup: false,
        body_limit_bytes: 256 << 10,
        max_buffered_body_bytes: 1 << 20,
        body_timeout_s: 1,
        max_header_bytes: 8 << 10,
        max_image_side: 256,
        max_image_pixels: 128 * 128,
        max_image_bytes: 96 << 10,
        max_prompt_chars: 200,
        ..Limits::default()
    };
    let cfg = PipelineConfig {
        max_in_flight: 2,
        max_queue: 4,
        ..PipelineConfig::default()
    };
    let pipe = Arc::new(Pipeline::mock(&MockConfig::default(), None, &cfg).unwrap());
    let s = serve::spawn(pipe, lim).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(serve::mark_ready(&s)).unwrap();
    let seeds = http_seeds();
    let mut rng = Rng::new(
        29 + std::env::var("LAVIT_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0),
    );
    let start = Instant::now();
    let mut by_class = std::collections::BTreeMap::new();
    let mut n = 0;
    while n < cases() && start.elapsed() < Duration::from_secs(90) {
        let c = case(&mut rng, &seeds, s.addr);
        let Some((status, body)) = try_send(s.addr, &c.bytes) else {
            panic!(
                "case {n} ({}): no answer within 10 s (a hang); request head:\n{}",
                c.what,
                String::from_utf8_lossy(&c.bytes[..c.bytes.len().min(600)])
            );
        };
        // A 4xx of the server carries an error object; the HTTP parser's own 400 for a
        // broken framing has no body.
        let ok = match status {
            200..=299 => true,
            400..=499 => body.contains("message") || (c.broken_framing && body.is_empty()),
            0 => c.broken_framing,
            _ => false,
        };
        assert!(
            ok,
            "case {n} ({}): status {status}, body {}",
            c.what,
            &body[..body.len().min(300)]
        );
        *by_class.entry(status / 100).or_insert(0) += 1;
        n += 1;
    }
    eprintln!(
        "fuzz http server: {n} requests in {:.1} s, answers by class {by_class:?}",
        start.elapsed().as_secs_f64()
    );
    // The server is healthy, nothing stays admitted, the body budget is whole again.
    assert_eq!(
        send(
            s.addr,
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .0,
        200
    );
    assert!(crate::serving::wait_until(10, || s
        .state
        .pipe
        .graph()
        .admission()
        .admitted()
        == 0));
    let (_, m) = send(
        s.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(
        m.contains("lavit_http_responses_total{class=\"5xx\"} 0"),
        "{m}"
    );
    for k in serve::metrics::INTERNAL_KINDS {
        assert!(
            m.contains(&format!("lavit_internal_errors_total{{kind=\"{k}\"}} 0")),
            "{k}: {m}"
        );
    }
    s.stop();
}
