//! `lavit serve [--config FILE] [--checkpoint DIR] [--bind ADDR]`: the HTTP server.
//!
//! Without `--config` the built-in defaults apply (every stage on the CPU, the limits of
//! configs/serve.toml); any key can be overridden from the environment, e.g.
//! `LAVIT__SERVER__MAX_N=1 lavit serve --checkpoint DIR`.
//!
//! Loads the pipeline (each stage on its placement device), starts actix-web, runs the warm-up,
//! then reports ready. SIGTERM / SIGINT drain: new requests get 503, admitted ones finish within
//! `drain_timeout_s`, then the process exits 0. If a stage dies under the recovery policy (too
//! many panics in a row) the server drains and exits with an error so a supervisor restarts it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lavit::pipeline::Pipeline;
use lavit::serve::{self, ServeConfig};

/// Arguments of `lavit serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server config (configs/serve.toml): `[server]` limits, `[pipeline]`, `[plugins]`
    /// (plugins named there are native code loaded into this process, trusted like any shared library); without it, the built-in defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint folder (overrides `pipeline.checkpoint`).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (overrides `server.bind`).
    #[arg(long)]
    pub bind: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = ServeConfig::load(args.config.as_deref())?;
    if let Some(c) = args.checkpoint {
        cfg.pipeline.checkpoint = Some(c);
    }
    if let Some(b) = args.bind {
        cfg.server.bind = b;
    }
    tracing::info!(placement = ?cfg.pipeline.placement, "loading the pipeline");
    let pipe = Arc::new(Pipeline::build(&cfg.pipeline).context("building the pipeline")?);
    let drain_timeout = Duration::from_secs(cfg.server.drain_timeout_s);
    let server = serve::spawn(pipe.clone(), cfg.server.clone())?;
    tracing::info!(addr = %server.addr, "listening");
    // One plain line on stdout for scripts (the port when binding port 0).
    println!("listening on http://{}", server.addr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(async {
        serve::mark_ready(&server)
            .await
            .map_err(|e| anyhow::anyhow!("warm-up failed: {e}"))?;
        tracing::info!("ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let healthy = async {
            while pipe.graph().healthy() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let unhealthy = tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); false }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: draining"); false }
            _ = healthy => { tracing::error!("a stage died (recovery policy): draining and exiting"); true }
        };
        let finished = server.drain(drain_timeout).await;
        if !finished {
            tracing::warn!("drain timeout: some requests were still running");
        }
        anyhow::Ok(unhealthy)
    });
    server.join();
    match outcome? {
        false => Ok(()),
        true => anyhow::bail!("a stage exited under the recovery policy; restart the server"),
    }
}
