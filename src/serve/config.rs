//! `[server]` settings of `lavit serve`: request limits and HTTP server settings, and the
//! serve config file (`[server]` + `[pipeline]`).

use std::path::Path;

use serde::Deserialize;

use crate::pipeline::PipelineConfig;

/// Request limits and server settings (`[server]` in configs/serve.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Address to listen on.
    #[serde(default = "d_bind")]
    pub bind: String,
    /// HTTP worker threads (1 to [`MAX_WORKERS`]).
    #[serde(default = "d_workers")]
    pub workers: usize,
    /// Largest request body in bytes (413 above). Bodies with a `Content-Encoding` are
    /// refused (415), never inflated ([`intake`]).
    #[serde(default = "d_body")]
    pub body_limit_bytes: usize,
    /// Bytes of request bodies the server buffers at once, over all connections (429 when
    /// spent); at least `body_limit_bytes`.
    #[serde(default = "d_buffered")]
    pub max_buffered_body_bytes: usize,
    /// Seconds a request body may take to arrive (408 after).
    #[serde(default = "d_body_timeout")]
    pub body_timeout_s: u64,
    /// Largest request head (path, query and headers) in bytes (431 above).
    #[serde(default = "d_header")]
    pub max_header_bytes: usize,
    /// Most open connections, all workers together (more wait in the backlog).
    #[serde(default = "d_connections")]
    pub max_connections: usize,
    /// Connections the kernel queues before they are accepted.
    #[serde(default = "d_backlog")]
    pub backlog: u32,
    /// Milliseconds a client has to send a request head once connected (or once its
    /// previous request is answered), else the connection is closed.
    #[serde(default = "d_head_timeout")]
    pub request_head_timeout_ms: u64,
    /// Seconds an idle keep-alive connection stays open (0: no keep-alive).
    #[serde(default = "d_keep_alive")]
    pub keep_alive_s: u64,
    /// Longest prompt / question in characters.
    #[serde(default = "d_prompt")]
    pub max_prompt_chars: usize,
    /// Most text tokens a caption may ask for.
    #[serde(default = "d_tokens")]
    pub max_new_tokens: u64,
    /// Most images per generation request.
    #[serde(default = "d_n")]
    pub max_n: u64,
    /// Most diffusion steps.
    #[serde(default = "d_steps")]
    pub max_steps: u64,
    /// Largest guidance scale.
    #[serde(default = "d_guidance")]
    pub max_guidance: f64,
    /// Largest image side (input images and generated sizes).
    #[serde(default = "d_side")]
    pub max_image_side: usize,
    /// Per-request cost budget of a generation, in native-image diffusion steps:
    /// `n × steps × (width × height) / native²` (native = the decoder's native side) must not
    /// exceed it; checked before admission, so a refused request never reaches the LLM. The
    /// default, 200, allows e.g. 4 native images of 50 steps or 1 of 150 steps.
    #[serde(default = "d_cost")]
    pub max_request_cost: f64,
    /// Largest input image pixel count (checked from the header before decoding).
    #[serde(default = "d_pixels")]
    pub max_image_pixels: u64,
    /// Largest encoded input image in bytes.
    #[serde(default = "d_image_bytes")]
    pub max_image_bytes: usize,
    /// Most images per tokenize or image-edit request.
    #[serde(default = "d_images")]
    pub max_images: usize,
    /// Seconds a drain waits for admitted requests.
    #[serde(default = "d_drain")]
    pub drain_timeout_s: u64,
    /// API key `/v1/*` requires (`Authorization: Bearer <key>`); unset = no key.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Name of the environment variable holding the API key; when set and not empty it
    /// overrides `api_key`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Run one request of each kind before reporting ready.
    #[serde(default = "d_true")]
    pub warmup: bool,
    /// The model id this server answers to (`GET /v1/models`, `model` in replies); a request
    /// naming another model gets 404.
    #[serde(default = "d_model")]
    pub model_id: String,
    /// Serve the web playground at `/`.
    #[serde(default = "d_true")]
    pub playground: bool,
    /// Test hook: `POST /admin/fault {"stage", "fault": "error" | "panic"}` makes a stage's next
    /// forward pass fail. Off by default, and refused by a build without the `testing`
    /// feature; never turn it on for a real deployment.
    #[serde(default)]
    pub fault_injection: bool,
}

impl Limits {
    /// The caps of an input image for the one limited decoder.
    pub fn image_limits(&self) -> lavit_runtime::image_input::ImageLimits {
        let side = u32::try_from(self.max_image_side).unwrap_or(u32::MAX);
        lavit_runtime::image_input::ImageLimits::new(
            side,
            self.max_image_pixels,
            self.max_image_bytes as u64,
        )
    }

    /// The API key in force: the environment variable named by `api_key_env` when it is set
    /// and not empty, else `api_key`.
    /// The generation bounds of these limits, for the one options builder.
    pub fn budget(&self) -> crate::pipeline::options::GenerateBudget {
        crate::pipeline::options::GenerateBudget {
            max_n: self.max_n,
            max_steps: self.max_steps,
            max_guidance: self.max_guidance,
            max_image_side: self.max_image_side,
            max_request_cost: self.max_request_cost,
        }
    }

    pub fn effective_api_key(&self) -> Option<String> {
        self.api_key_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
            .filter(|k| !k.is_empty())
            .or_else(|| self.api_key.clone().filter(|k| !k.is_empty()))
    }
}

fn d_bind() -> String {
    "127.0.0.1:8080".into()
}
fn d_workers() -> usize {
    2
}
fn d_body() -> usize {
    8 << 20
}
fn d_buffered() -> usize {
    64 << 20
}
fn d_body_timeout() -> u64 {
    30
}
fn d_header() -> usize {
    16 << 10
}
fn d_connections() -> usize {
    1024
}
fn d_backlog() -> u32 {
    1024
}
fn d_head_timeout() -> u64 {
    5000
}
fn d_keep_alive() -> u64 {
    5
}
fn d_prompt() -> usize {
    2000
}
fn d_tokens() -> u64 {
    256
}
fn d_n() -> u64 {
    4
}
fn d_steps() -> u64 {
    150
}
fn d_guidance() -> f64 {
    50.0
}
fn d_cost() -> f64 {
    200.0
}
fn d_side() -> usize {
    2048
}
fn d_pixels() -> u64 {
    2048 * 2048
}
fn d_image_bytes() -> usize {
    6 << 20
}
fn d_images() -> usize {
    8
}
fn d_drain() -> u64 {
    30
}
fn d_true() -> bool {
    true
}
fn d_model() -> String {
    "lavit".into()
}

impl Default for Limits {
    fn default() -> Self {
        toml::Value::Table(Default::default())
            .try_into()
            .unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// configs/serve.toml: `[server]`, `[pipeline]` and the top-level `[plugins]`, loaded through
/// the one config mechanism ([`lavit_runtime::config`]): every key can be overridden as
/// `LAVIT__SERVER__MAX_N=1`, `LAVIT__PIPELINE__MAX_QUEUE=0`, …; without a file, the built-in
/// defaults (all stages on the CPU, the limits below) with those overrides.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub server: Limits,
    pub pipeline: PipelineConfig,
    /// The top-level `[plugins]` table (moved into `pipeline.plugins` on load).
    plugins: Option<lavit_runtime::plugin_host::PluginsConfig>,
}

impl lavit_runtime::config::Validate for ServeConfig {
    fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        self.server.validate(origin)?;
        self.pipeline.validate(origin)
    }
}

/// Most HTTP workers (`server.workers`): actix-web refuses (panics on) more than 512.
pub const MAX_WORKERS: usize = 512;

impl Limits {
    /// Range checks (every limit at least 1; workers at most [`MAX_WORKERS`]; guidance and
    /// cost budget finite and positive; the body budget holds at least one largest body).
    pub fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(lavit_runtime::Error::config(
                    origin,
                    format!("server.{key}"),
                    "must be at least 1",
                ))
            } else {
                Ok(())
            }
        };
        positive("workers", self.workers as u64)?;
        if self.workers > MAX_WORKERS {
            return Err(lavit_runtime::Error::config(
                origin,
                "server.workers",
                format!(
                    "{} is over the {MAX_WORKERS} HTTP workers actix-web runs",
                    self.workers
                ),
            ));
        }
        positive("body_limit_bytes", self.body_limit_bytes as u64)?;
        positive("body_timeout_s", self.body_timeout_s)?;
        positive("max_header_bytes", self.max_header_bytes as u64)?;
        positive("max_connections", self.max_connections as u64)?;
        positive("backlog", self.backlog as u64)?;
        positive("request_head_timeout_ms", self.request_head_timeout_ms)?;
        if self.max_buffered_body_bytes < self.body_limit_bytes {
            return Err(lavit_runtime::Error::config(
                origin,
                "server.max_buffered_body_bytes",
                format!(
                    "{} is less than server.body_limit_bytes = {}: one largest body must fit",
                    self.max_buffered_body_bytes, self.body_limit_bytes
                ),
            ));
        }
        positive("max_prompt_chars", self.max_prompt_chars as u64)?;
        positive("max_new_tokens", self.max_new_tokens)?;
        positive("max_n", self.max_n)?;
        positive("max_steps", self.max_steps)?;
        positive("max_image_side", self.max_image_side as u64)?;
        positive("max_image_pixels", self.max_image_pixels)?;
        positive("max_image_bytes", self.max_image_bytes as u64)?;
        positive("max_images", self.max_images as u64)?;
        for (key, v) in [
            ("max_guidance", self.max_guidance),
            ("max_request_cost", self.max_request_cost),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(lavit_runtime::Error::config(
                    origin,
                    format!("server.{key}"),
                    format!("must be finite and positive, got {v}"),
                ));
            }
        }
        if self.fault_injection && !cfg!(feature = "testing") {
            return Err(lavit_runtime::Error::config(
                origin,
                "server.fault_injection",
                "needs a build with the `testing` feature (`cargo build --features testing`); \
                 a release build has no fault injection",
            ));
        }
        Ok(())
    }
}

impl ServeConfig {
    /// Load a serving config file, or with `None` the built-in defaults; `LAVIT__*`
    /// environment overrides apply either way.
    pub fn load(path: Option<&Path>) -> crate::Result<Self> {
        let mut cfg: ServeConfig = lavit_runtime::config::load_optional_config(path)?;
        let origin = path.unwrap_or(Path::new("./(built-in defaults)"));
        cfg.pipeline = cfg.pipeline.resolved(cfg.plugins.take(), origin)?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> crate::Result<Self> {
        Self::load(Some(path))
    }
}
