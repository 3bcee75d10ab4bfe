//! Benchmark (not a test): throughput of the pipelined stage graph against one request at a
//! time, over the same stages (the mock stages with real matmul work, or the fixture's real
//! LLM for the generate route when a checkpoint folder is given).
//!
//! ```text
//! cargo run --release --example bench_pipeline -- [REQUESTS] [WORK] [CHECKPOINT_DIR]
//! ```
//! Without `CHECKPOINT_DIR` the mock stages run (`WORK` extra matmuls per call); with it, the
//! checkpoint's real stages (e.g. `../shared/fixtures/tiny-lavit`): tokenize (encoder →
//! selector/merger → quantizer), caption (encoder → selector/merger → LLM) and generate
//! (LLM → decoder, `steps` 5 at the native size).
//! The pipelined rate should approach the slowest stage's rate; one-at-a-time is bounded by
//! the sum of all stages.

use std::sync::Arc;
use std::time::Instant;

use lavit::pipeline::{Pipeline, PipelineConfig};
use lavit_runtime::actors::Input;
use lavit_runtime::messages::{CaptionOptions, GenerateOptions, Task};
use lavit_runtime::mock::MockConfig;
use lavit_runtime::stage::StageKind;
use tch::{Device, Kind, Tensor};

fn tokenize_input(i: i64, size: i64) -> Input {
    tch::manual_seed(i);
    Input::Images(Tensor::randn(
        [1, 3, size, size],
        (Kind::Float, Device::Cpu),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let checkpoint = args.iter().find(|a| a.parse::<usize>().is_err());
    let requests = nums.first().copied().unwrap_or(24);
    let work = nums.get(1).copied().unwrap_or(40);
    tch::set_num_threads(1);
    let cfg = PipelineConfig {
        max_in_flight: 8,
        max_queue: requests,
        checkpoint: checkpoint.map(Into::into),
        ..PipelineConfig::default()
    };
    let pipe = Arc::new(match checkpoint {
        Some(_) => Pipeline::build(&cfg)?,
        None => {
            let m = MockConfig {
                work,
                ..MockConfig::default()
            };
            Pipeline::mock(&m, None, &cfg)?
        }
    });
    let size = pipe.info().image_size;
    let (w, h) = pipe.info().default_size;
    let real = checkpoint.is_some();
    println!(
        "stages: {}",
        checkpoint.map_or(format!("mock (work {work})"), |c| format!("checkpoint {c}"))
    );
    let gen = || Task::Generate {
        opts: GenerateOptions {
            steps: if real { 5 } else { 8 },
            width: w,
            height: h,
            ..GenerateOptions::default()
        },
    };
    let caption = || Task::Caption {
        prompt: String::new(),
        opts: CaptionOptions {
            max_new_tokens: 10,
            ..Default::default()
        },
    };

    let routes: &[(&str, usize)] = if real {
        &[
            ("tokenize (3 stages)", 0),
            ("generate (2 stages)", 1),
            ("caption (3 stages)", 2),
        ]
    } else {
        &[("tokenize (3 stages)", 0), ("generate (2 stages)", 1)]
    };
    for &(name, route) in routes {
        let input = |i: usize| {
            if route == 1 {
                Input::Prompt(format!("p{i}"))
            } else {
                tokenize_input(i as i64, size)
            }
        };
        let task = || match route {
            0 => Task::Tokenize,
            1 => gen(),
            _ => caption(),
        };
        // Warm-up.
        pipe.graph().run(task(), input(0)).await?;
        pipe.graph().shared().records.clear();

        let t = Instant::now();
        for i in 0..requests {
            pipe.graph().run(task(), input(i)).await?;
        }
        let serial = requests as f64 / t.elapsed().as_secs_f64();
        let busy = stage_busy(&pipe);

        let t = Instant::now();
        let futs = (0..requests).map(|i| {
            let p = pipe.clone();
            let (task, input) = (task(), input(i));
            async move { p.graph().run(task, input).await }
        });
        for r in futures::future::join_all(futs).await {
            r?;
        }
        let pipelined = requests as f64 / t.elapsed().as_secs_f64();
        println!(
            "{name}: one-at-a-time {serial:.1} req/s, pipelined {pipelined:.1} req/s ({:.2}x)",
            pipelined / serial
        );
        for (k, secs) in busy {
            println!("    {k:<16} {:.2} ms/request", secs * 1e3 / requests as f64);
        }
    }
    Ok(())
}

/// Total busy time per stage (from the stages' own records), then clear them.
fn stage_busy(pipe: &Pipeline) -> Vec<(StageKind, f64)> {
    let recs = pipe.graph().records();
    pipe.graph().shared().records.clear();
    StageKind::ALL
        .iter()
        .map(|&k| {
            (
                k,
                recs.iter()
                    .filter(|r| r.stage == k)
                    .map(|r| (r.end - r.start).as_secs_f64())
                    .sum(),
            )
        })
        .filter(|(_, s)| *s > 0.0)
        .collect()
}
