//! Integration tests: the stage actors, the pipeline API and the HTTP server (loopback only,
//! bounded loops, every test stops what it started). Stages are the mock stages of
//! `lavit_runtime::mock` until the real models are wired (see `real_*` tests).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use lavit::pipeline::{Fault, Pipeline, PipelineConfig, StageKind};
use lavit::serve::{self, Limits, RunningServer};
use lavit_runtime::actors::Input;
use lavit_runtime::messages::{
    train_keys, CaptionOptions, DecodeRequest, GenerateOptions, LlmEvent, LlmOutput, LlmRequest,
    Output, PromptPart, Task, TrainBatch,
};
use lavit_runtime::mock::{self, Gate, MockConfig};
use lavit_runtime::stage::*;
use tch::{Device, Kind, Tensor};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn pcfg(in_flight: usize, queue: usize) -> PipelineConfig {
    PipelineConfig {
        max_in_flight: in_flight,
        max_queue: queue,
        ..PipelineConfig::default()
    }
}

/// Deterministic test images (no global RNG: tests run in parallel threads).
fn images(b: i64, seed: i64) -> Tensor {
    let n = b * 3 * 28 * 28;
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.37 + seed as f64 * 0.011))
        .sin()
        .reshape([b, 3, 28, 28])
}

/// Poll `cond` every 5 ms for at most `secs` seconds.
pub(crate) fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// A caption of `prefix` by an Llm stage alone (a direct call: the request runs through the
/// stage's batch by itself).
fn caption_alone(
    llm: &mut dyn LlmStage,
    prefix: &Tensor,
    prompt: &str,
    opts: &CaptionOptions,
) -> Vec<i64> {
    let mut parts = vec![PromptPart::ImageEmbeds(prefix.shallow_clone())];
    if !prompt.is_empty() {
        parts.push(PromptPart::Text(prompt.into()));
    }
    let req = LlmRequest::Text {
        prompts: vec![parts],
        opts: opts.clone(),
        stream: false,
    };
    match run_alone(llm, req, &|| false).unwrap().pop() {
        Some(LlmEvent::Done(LlmOutput::Text(mut a))) => a.swap_remove(0).ids,
        other => panic!("{other:?}"),
    }
}

/// Image tokens of `prompt` by an Llm stage alone.
fn image_tokens_alone(
    llm: &mut dyn LlmStage,
    prompt: &str,
    opts: &GenerateOptions,
) -> Vec<Vec<i64>> {
    let req = LlmRequest::ImageTokens {
        prompt: vec![PromptPart::Text(prompt.into())],
        uncond: Vec::new(),
        opts: opts.clone(),
    };
    match run_alone(llm, req, &|| false).unwrap().pop() {
        Some(LlmEvent::Done(LlmOutput::ImageTokens(ids))) => ids,
        other => panic!("{other:?}"),
    }
}

/// Pixels of `ids` by a Decoder stage alone.
fn decode_alone(dec: &mut dyn DecoderStage, ids: &[Vec<i64>], opts: &GenerateOptions) -> Tensor {
    let req = DecodeRequest {
        ids: ids.to_vec(),
        opts: opts.clone(),
    };
    run_alone(dec, req, &|| false).unwrap().pop().unwrap()
}

// ------------------------------------------------------------------------------------------
// Actors == direct calls, overlap, cancellation, faults (no HTTP).

mod actors;
mod http;
mod openai;
mod real;

fn limits() -> Limits {
    Limits {
        bind: "127.0.0.1:0".into(),
        warmup: true,
        max_steps: 100_000_000,
        // The long-running requests of the cancellation tests are far over the default budget.
        max_request_cost: 1e12,
        drain_timeout_s: 10,
        ..Limits::default()
    }
}

fn server(in_flight: usize, queue: usize, gate: Option<Gate>, lim: Limits) -> RunningServer {
    let pipe =
        Arc::new(Pipeline::mock(&MockConfig::default(), gate, &pcfg(in_flight, queue)).unwrap());
    serve::spawn(pipe, lim).unwrap()
}

fn ready(s: &RunningServer) {
    rt().block_on(serve::mark_ready(s)).unwrap();
}

pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) body: String,
}

pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    // Status 0 = no HTTP answer (connection refused or closed).
    let Ok(mut s) = TcpStream::connect(addr) else {
        return Resp {
            status: 0,
            body: String::new(),
        };
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    // JSON unless the caller names its own content type.
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (h, b) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if h
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(b)
    } else {
        b.to_string()
    };
    Resp { status, body }
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub(crate) fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    request(addr, "POST", path, body.to_string().as_bytes(), &[])
}

fn png_b64(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
}

fn chat_body(img: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "lavit", "stream": stream, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{img}")}}]}]})
}

/// Kills the child process if the test ends early (a failing assertion), so no server is
/// left running.
pub(crate) struct KillOnDrop(pub std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The address a started `lavit serve` (stdout piped) prints as `listening on
/// http://ADDR`; the thread that read it drains stdout until the process exits.
pub(crate) fn listening_addr(child: &mut KillOnDrop) -> (SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::BufRead;
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.strip_prefix("listening on http://") {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("no listening line")
        .parse()
        .unwrap();
    (addr, reader)
}

fn json_of(r: &Resp) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}
