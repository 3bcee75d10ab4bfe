//! Data-parallel training over c10d (Gloo on 127.0.0.1): each test starts ranks as child
//! processes of this very test binary (`child_rank`, which does nothing unless
//! `LAVIT_DIST_CHILD` names a scenario), with torchrun's environment contract (`RANK`,
//! `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and waits for them with a
//! deadline: a test never hangs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lavit_runtime::dist::{
    self, DistEnv, GradSync, GroupOptions, ProcessGroup, ReduceOp, DEFAULT_BUCKET_BYTES,
};
use lavit_runtime::train::{AdamW, AdamWConfig};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Per-rank batch of the equivalence run (the one-rank reference takes twice this).
const BATCH: usize = 8;
const STEPS: usize = 10;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Start rank `rank` of `world` running `scenario`.
fn spawn_rank(
    scenario: &str,
    rank: usize,
    world: usize,
    port: u16,
    timeout_s: f64,
    out: &Path,
    extra: &[(&str, String)],
) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "dist::child_rank",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("LAVIT_DIST_CHILD", scenario)
    .env("LAVIT_DIST_OUT", out)
    .env("RANK", rank.to_string())
    .env("LOCAL_RANK", rank.to_string())
    .env("WORLD_SIZE", world.to_string())
    .env("MASTER_ADDR", "127.0.0.1")
    .env("MASTER_PORT", port.to_string())
    .env("LAVIT_DIST_TIMEOUT_S", timeout_s.to_string())
    .env_remove("TORCHELASTIC_USE_AGENT_STORE")
    .env_remove("GLOO_SOCKET_IFNAME")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawning a rank")
}

struct Finished {
    ok: bool,
    output: String,
}

/// Wait for `child` until `deadline`; kill it past that (and report it as failed).
fn finish(mut child: Child, deadline: Instant) -> Finished {
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().expect("polling a rank") {
            Some(s) => break Some(s),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut output = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut output);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut output);
    }
    if timed_out {
        output.push_str("\n[killed by the test: past its deadline]");
    }
    Finished {
        ok: status.map(|s| s.success()).unwrap_or(false),
        output,
    }
}

/// Run `world` ranks of `scenario` to completion (at most `limit`), asserting they all succeed.
fn run_ranks(scenario: &str, world: usize, limit: Duration, out: &Path) -> Vec<String> {
    let port = free_port();
    let children: Vec<Child> = (0..world)
        .map(|r| spawn_rank(scenario, r, world, port, 30.0, out, &[]))
        .collect();
    let deadline = Instant::now() + limit;
    let done: Vec<Finished> = children.into_iter().map(|c| finish(c, deadline)).collect();
    for (r, f) in done.iter().enumerate() {
        assert!(
            f.ok,
            "{scenario}: rank {r} of {world} failed:\n{}",
            f.output
        );
    }
    done.into_iter().map(|f| f.output).collect()
}

/// The rest of the line where a child printed `marker` (libtest may have printed
/// `test dist::child_rank ... ` before it on the same line).
fn report_line<'a>(output: &'a str, marker: &str) -> &'a str {
    let at = output
        .find(marker)
        .unwrap_or_else(|| panic!("no `{marker}` in:\n{output}"));
    output[at..].lines().next().unwrap_or_default()
}

/// (seconds, line) of a child's `failed as expected after X s: ...`.
fn failure_report(output: &str) -> (f64, String) {
    let line = report_line(output, "failed as expected after ");
    let secs = line
        .split_whitespace()
        .nth(4)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (secs, line.to_string())
}

// ---------------------------------------------------------------------------------------
// The tests (parents).

#[test]
fn collectives_over_gloo() {
    let dir = tempfile::tempdir().unwrap();
    let outs = run_ranks("collectives", 2, Duration::from_secs(120), dir.path());
    for (r, o) in outs.iter().enumerate() {
        assert!(o.contains(&format!("collectives ok on rank {r}")), "{o}");
    }
}

/// A rank killed between collectives: the survivor's next collective fails (with the
/// peer named by Gloo) well within the timeout, and every later call fails at once.
#[test]
fn dead_rank_fails_the_job_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let timeout = 20.0;
    let r0 = spawn_rank("die", 0, 2, port, timeout, dir.path(), &[]);
    let mut r1 = spawn_rank("die", 1, 2, port, timeout, dir.path(), &[]);
    // Wait for rank 1 to say it finished its first collective, then kill it.
    let ready = dir.path().join("ready-1");
    let t0 = Instant::now();
    while !ready.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "rank 1 never got ready"
        );
        if let Some(s) = r1.try_wait().unwrap() {
            let f = finish(r1, Instant::now());
            panic!("rank 1 ended early ({s}):\n{}", f.output);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r1.kill().unwrap();
    r1.wait().unwrap();
    std::fs::write(dir.path().join("killed"), b"").unwrap();
    let f = finish(r0, Instant::now() + Duration::from_secs_f64(timeout + 30.0));
    assert!(f.ok, "rank 0:\n{}", f.output);
    let (secs, line) = failure_report(&f.output);
    eprintln!("dead rank: {line}");
    assert!(secs < timeout, "{line}");
}

/// A rank alive but stuck (never joins the collective): the other's call fails after the
/// timeout, not before and not much after.
#[test]
fn stuck_rank_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let timeout = 4.0;
    let r0 = spawn_rank("stuck", 0, 2, port, timeout, dir.path(), &[]);
    let r1 = spawn_rank("stuck", 1, 2, port, timeout, dir.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let f0 = finish(r0, deadline);
    let f1 = finish(r1, deadline);
    assert!(f0.ok, "rank 0:\n{}", f0.output);
    assert!(f1.ok, "rank 1:\n{}", f1.output);
    let (secs, line) = failure_report(&f0.output);
    eprintln!("stuck rank: {line}");
    assert!(secs >= timeout - 0.5 && secs < timeout + 5.0, "{line}");
}

/// 10 AdamW steps of an MLP with 2 ranks × batch B end with the same parameters as 1 rank ×
/// batch 2B (≤ 1e-5 relative), starting from different per-rank initialisations (the
/// broadcast from rank 0 must make them equal). Also prints the step rate of both and the
/// communication share of the 2-rank run (a measurement, not asserted).
#[test]
fn two_ranks_train_like_one_rank_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let two = run_ranks("train", 2, Duration::from_secs(300), dir.path());
    let one = run_ranks("train", 1, Duration::from_secs(300), dir.path());
    let load = |name: &str| -> Vec<(String, Tensor)> {
        let mut v = Tensor::read_safetensors(dir.path().join(name)).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (r0, r1, single) = (
        load("w2-r0.safetensors"),
        load("w2-r1.safetensors"),
        load("w1-r0.safetensors"),
    );
    let (init0, init1) = (
        load("init-w2-r0.safetensors"),
        load("init-w2-r1.safetensors"),
    );
    assert_eq!(r0.len(), 4);
    // The ranks started apart (so the broadcast from rank 0 had work to do).
    assert!(init0.iter().zip(&init1).any(|((_, a), (_, b))| !a.equal(b)));
    let mut worst = 0f64;
    for (i, (name, a)) in r0.iter().enumerate() {
        let (b, s) = (&r1[i].1, &single[i].1);
        assert_eq!((&r1[i].0, &single[i].0), (name, name));
        // Both ranks hold exactly the same weights...
        assert!(a.equal(b), "{name}: ranks disagree");
        // ...which the 10 steps moved away from rank 0's initialisation...
        assert!(
            !a.allclose(&init0[i].1, 1e-4, 1e-4, false),
            "{name}: did not train"
        );
        // ...to where one rank with the whole batch went.
        let rel =
            (a - s).abs().max().double_value(&[]) / s.abs().max().double_value(&[]).max(1e-12);
        worst = worst.max(rel);
    }
    assert!(worst <= 1e-5, "max relative parameter difference {worst:e}");
    let rate = |outs: &[String]| -> (f64, f64) {
        let l = report_line(&outs[0], "timing ");
        let f: Vec<f64> = l
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (f[0], f[1])
    };
    let ((sps2, comm2), (sps1, _)) = (rate(&two), rate(&one));
    eprintln!(
        "ddp: 2 ranks vs 1 rank, max relative parameter difference {worst:.2e}; \
         timing MLP: 2 ranks × batch {B} {sps2:.1} steps/s ({:.0} % in collectives) vs 1 rank × batch {B2} {sps1:.1} steps/s: {:.2}×",
        comm2 * 100.0,
        sps2 / sps1,
        B = TIMING_BATCH,
        B2 = 2 * TIMING_BATCH,
    );
}

/// Each of the three trainers (stage-1 tokenizer, stage-2 LLM, stage-1b pixel decoder), run
/// by the shared driver for 10 steps with 2 ranks × batch B, ends with the parameters of one
/// rank × batch 2B (≤ 1e-5 relative, L2 over every tensor of the checkpoint): the same global batches, the per-row randomness of
/// the global batch (Gumbel noise, diffusion noise and timesteps), the codebook's EMA
/// update over every rank's codes, losses weighted to the global batch's mean.
#[test]
fn trainers_with_two_ranks_equal_one_rank_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::write_images(&dir.path().join("images"), 12);
    let two = run_ranks("trainers", 2, Duration::from_secs(600), dir.path());
    let _one = run_ranks("trainers", 1, Duration::from_secs(600), dir.path());
    for (r, o) in two.iter().enumerate() {
        assert!(o.contains(&format!("trainers ok on rank {r}")), "{o}");
    }
    let newest = |run: &str| {
        lavit_runtime::train::latest(&dir.path().join(run).join("checkpoints"))
            .unwrap()
            .unwrap_or_else(|| panic!("{run}: no checkpoint"))
    };
    let mut lines = Vec::new();
    for (trainer, parts) in [
        (
            "tok",
            &["selector_merger", "quantizer", "decoder", "codebook"][..],
        ),
        ("llm", &["model"][..]),
        ("dec", &["model", "ema"][..]),
    ] {
        let (p2, p1) = (
            newest(&format!("{trainer}-w2")),
            newest(&format!("{trainer}-w1")),
        );
        let (mut c2, mut c1) = (
            lavit_runtime::train::load(&p2).unwrap(),
            lavit_runtime::train::load(&p1).unwrap(),
        );
        assert_eq!((c2.state.step, c1.state.step), (STEPS as i64, STEPS as i64));
        // ‖θ₂ − θ₁‖ / ‖θ₁‖ over every float tensor of the parts (the parameters, the EMA
        // copies, the codebook and its statistics). An element-wise bound would not hold:
        // parameters whose gradient is rounding noise (an attention key's bias) take
        // full-size AdamW steps in whichever direction the noise points, on either side.
        let (mut num, mut den, mut elem) = (0f64, 0f64, 0f64);
        for part in parts {
            let (a, b) = (c2.take(part).unwrap(), c1.take(part).unwrap());
            assert_eq!(a.len(), b.len(), "{trainer}/{part}");
            for (name, s) in &b {
                let t = &a[name];
                if s.is_floating_point() {
                    let d = (t - s).to_kind(Kind::Double);
                    num += d.square().sum(Kind::Double).double_value(&[]);
                    den += s
                        .to_kind(Kind::Double)
                        .square()
                        .sum(Kind::Double)
                        .double_value(&[]);
                    let rel = d.abs().max().double_value(&[])
                        / s.abs().max().double_value(&[]).max(1e-12);
                    elem = elem.max(rel);
                } else {
                    assert!(t.equal(s), "{trainer}/{part}/{name}");
                }
            }
        }
        let worst = (num / den.max(1e-30)).sqrt();
        eprintln!(
            "{trainer}: largest element-wise difference {elem:.1e} of its tensor's largest value"
        );
        lines.push((trainer, worst));
    }
    let report: Vec<String> = lines.iter().map(|(t, w)| format!("{t} {w:.2e}")).collect();
    eprintln!(
        "ddp trainers: 2 ranks vs 1 rank, relative parameter difference (L2): {}",
        report.join(", ")
    );
    assert!(lines.iter().all(|(_, w)| *w <= 1e-5), "{report:?}");
}

// ---------------------------------------------------------------------------------------
// The child side: a rank of a scenario.

#[test]
fn child_rank() {
    let Ok(scenario) = std::env::var("LAVIT_DIST_CHILD") else {
        return; // an ordinary test run: nothing to do
    };
    tch::set_num_threads(1);
    let out = PathBuf::from(std::env::var("LAVIT_DIST_OUT").expect("LAVIT_DIST_OUT"));
    let env = DistEnv::from_env().expect("torchrun environment");
    let opts = GroupOptions::from_env(dist::Backend::Gloo).expect("group options");
    let pg = ProcessGroup::new(&env, &opts).expect("joining the group");
    assert_eq!((pg.rank(), pg.world_size()), (env.rank, env.world_size));
    match scenario.as_str() {
        "collectives" => collectives(&pg),
        "die" => die(&pg, &out),
        "stuck" => stuck(&pg),
        "train" => train(&pg, &out),
        "trainers" => trainers(std::sync::Arc::new(pg), &out),
        other => panic!("unknown scenario {other}"),
    }
}

fn floats(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

fn collectives(pg: &ProcessGroup) {
    let (r, w) = (pg.rank() as f64, pg.world_size() as f64);
    let tri = w * (w + 1.0) / 2.0; // Σ (rank + 1)
                                   // all_reduce: sum, max, min, on floats and integers.
    let mut t = Tensor::from_slice(&[r + 1.0, 10.0 * (r + 1.0)]).to_kind(Kind::Float);
    pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(floats(&t), [tri, 10.0 * tri]);
    let mut t = Tensor::from_slice(&[pg.rank() as i64, -(pg.rank() as i64)]);
    pg.all_reduce(&mut t, ReduceOp::Max).unwrap();
    assert_eq!(Vec::<i64>::try_from(&t).unwrap(), [w as i64 - 1, 0]);
    pg.all_reduce(&mut t, ReduceOp::Min).unwrap();
    assert_eq!(Vec::<i64>::try_from(&t).unwrap(), [w as i64 - 1, 0]);
    // A non-contiguous tensor (a transposed view) is reduced through a copy, in place.
    let base = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
    let mut tt = (&base * (r + 1.0)).tr();
    assert!(!tt.is_contiguous());
    pg.all_reduce(&mut tt, ReduceOp::Sum).unwrap();
    assert_eq!(floats(&tt), floats(&(base.tr() * tri)));
    // broadcast from the last rank.
    let root = pg.world_size() - 1;
    let mut b = Tensor::full([3], r, (Kind::Double, Device::Cpu));
    pg.broadcast(&mut b, root).unwrap();
    assert_eq!(floats(&b), [root as f64; 3]);
    assert!(pg.broadcast(&mut b, 7).is_err());
    // broadcast_named: every rank gets rank 0's tensors, whatever order it lists them in.
    let x = Tensor::full([2, 2], r + 5.0, (Kind::Float, Device::Cpu));
    let y = Tensor::full([3], -r, (Kind::Double, Device::Cpu));
    let mut named = vec![
        ("x".to_string(), x.shallow_clone()),
        ("y".to_string(), y.shallow_clone()),
    ];
    if pg.rank() == 1 {
        named.reverse();
    }
    dist::broadcast_named(pg, &named).unwrap();
    assert_eq!(floats(&x), [5.0; 4]);
    assert_eq!(floats(&y), [0.0; 3]);
    // Statistics of several dtypes in one call (EMA codebook counts and sums).
    let counts = Tensor::from_slice(&[1i64, 2, 3]) * (pg.rank() as i64 + 1);
    let sums = Tensor::full([4, 2], r, (Kind::Float, Device::Cpu));
    dist::all_reduce_tensors(
        pg,
        &[counts.shallow_clone(), sums.shallow_clone()],
        ReduceOp::Sum,
    )
    .unwrap();
    assert_eq!(
        Vec::<i64>::try_from(&counts).unwrap(),
        [tri as i64, 2 * tri as i64, 3 * tri as i64]
    );
    assert_eq!(floats(&sums), [tri - w; 8]);
    let m = Tensor::from_slice(&[r]).to_kind(Kind::Float);
    dist::all_reduce_mean(pg, &[m.shallow_clone()]).unwrap();
    assert_eq!(floats(&m), [(w - 1.0) / 2.0]);
    assert!(dist::all_reduce_mean(pg, &[Tensor::from_slice(&[1i64])]).is_err());
    assert_eq!(dist::mean_scalar(pg, r).unwrap(), (w - 1.0) / 2.0);
    // Gradient averaging with a parameter only rank 0's loss reaches (`b`) and one no
    // rank's loss reaches (`c`): b's mean includes rank 1's zero, c keeps no gradient.
    let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    let bb = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
    let c = Tensor::from_slice(&[4.0f32]).set_requires_grad(true);
    let loss = if pg.rank() == 0 {
        (&a * (r + 1.0)).sum(Kind::Float) + (&bb * 2.0).sum(Kind::Float)
    } else {
        (&a * (r + 1.0)).sum(Kind::Float)
    };
    loss.backward();
    let params = vec![
        ("a".to_string(), a.shallow_clone()),
        ("b".to_string(), bb.shallow_clone()),
        ("c".to_string(), c.shallow_clone()),
    ];
    let gs = GradSync::new(pg, params, DEFAULT_BUCKET_BYTES).unwrap();
    assert_eq!(gs.bucket_count(), 1);
    gs.average(pg).unwrap();
    assert_eq!(floats(&a.grad()), [tri / w; 2]);
    assert_eq!(floats(&bb.grad()), [2.0 / w]);
    assert!(!c.grad().defined());
    // Ranks that disagree on the parameter set are told so (on every rank).
    let shape = if pg.rank() == 0 { [2] } else { [3] };
    let odd = vec![(
        "p".to_string(),
        Tensor::zeros(shape, (Kind::Float, Device::Cpu)),
    )];
    let e = GradSync::new(pg, odd, DEFAULT_BUCKET_BYTES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("differ"), "{e}");
    // The store, and a barrier.
    if pg.rank() == 0 {
        pg.store_set("greeting", b"hello from rank 0").unwrap();
    }
    assert_eq!(pg.store_get("greeting").unwrap(), b"hello from rank 0");
    pg.barrier().unwrap();
    let s = pg.stats();
    assert!(s.calls >= 10 && s.bytes > 0 && s.seconds > 0.0, "{s:?}");
    println!("collectives ok on rank {}", pg.rank());
}

fn die(pg: &ProcessGroup, out: &Path) {
    let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    if pg.rank() == 1 {
        std::fs::write(out.join("ready-1"), b"").unwrap();
        std::thread::sleep(Duration::from_secs(600)); // killed by the parent
        return;
    }
    let killed = out.join("killed");
    while !killed.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let t0 = Instant::now();
    let e = pg
        .all_reduce(&mut t, ReduceOp::Sum)
        .expect_err("a collective with a dead peer must fail");
    let secs = t0.elapsed().as_secs_f64();
    println!("failed as expected after {secs:.3} s: {e}");
    assert!(e.to_string().contains("all_reduce"), "{e}");
    // The group is broken now: later calls fail at once, naming the first error.
    let t1 = Instant::now();
    let e2 = pg.barrier().expect_err("a broken group");
    assert!(t1.elapsed() < Duration::from_secs(1));
    assert!(e2.to_string().contains("failed earlier"), "{e2}");
}

fn stuck(pg: &ProcessGroup) {
    let mut t = Tensor::ones([4], (Kind::Float, Device::Cpu));
    pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    if pg.rank() == 1 {
        // Alive but never joining the next collective; leave after rank 0 gave up.
        std::thread::sleep(pg.timeout() + Duration::from_secs(3));
        return;
    }
    let t0 = Instant::now();
    let e = pg
        .all_reduce(&mut t, ReduceOp::Sum)
        .expect_err("a collective with a stuck peer must time out");
    println!(
        "failed as expected after {:.3} s: {e}",
        t0.elapsed().as_secs_f64()
    );
}

/// Per-rank batch of the timing run.
const TIMING_BATCH: usize = 64;

fn mlp(vs: &nn::Path, dims: &[i64]) -> nn::Sequential {
    let mut s = nn::seq();
    for (i, w) in dims.windows(2).enumerate() {
        s = s.add(nn::linear(
            vs / format!("fc{i}"),
            w[0],
            w[1],
            Default::default(),
        ));
        if i + 2 < dims.len() {
            s = s.add_fn(|x| x.relu());
        }
    }
    s
}

/// `steps` AdamW steps of an MLP on this rank's slices of a fixed global order; returns
/// (steps per second, share of the time in collectives).
fn train_run(
    pg: &ProcessGroup,
    dims: &[i64],
    per_rank_batch: usize,
    steps: usize,
    out: Option<&Path>,
) -> (f64, f64) {
    let w = pg.world_size();
    // The same data on every rank (seeded), different initial weights per rank.
    tch::manual_seed(1234);
    let n = 4 * per_rank_batch * w * 2;
    let xs = Tensor::randn([n as i64, dims[0]], (Kind::Float, Device::Cpu));
    let ys = Tensor::randint(
        *dims.last().unwrap(),
        [n as i64],
        (Kind::Int64, Device::Cpu),
    );
    tch::manual_seed(100 + pg.rank() as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = mlp(&vs.root(), dims);
    if let Some(o) = out.filter(|_| pg.world_size() == 2) {
        let vars = dist::var_store_tensors(&vs);
        Tensor::write_safetensors(&vars, o.join(format!("init-w2-r{}.safetensors", pg.rank())))
            .unwrap();
    }
    dist::broadcast_var_store(pg, &vs).unwrap();
    let mut opt = AdamW::from_var_store(&vs, |_| true, AdamWConfig::default()).unwrap();
    let grads = GradSync::new(pg, opt.params(), DEFAULT_BUCKET_BYTES).unwrap();
    // A global order: a fixed permutation, the same on every rank.
    let order: Vec<i64> = {
        let mut v: Vec<i64> = (0..n as i64).collect();
        let mut s = 42u64;
        for i in (1..v.len()).rev() {
            s = lavit_runtime::train::splitmix64(s);
            v.swap(i, (s % (i as u64 + 1)) as usize);
        }
        v
    };
    let global = per_rank_batch * w;
    let before = pg.stats();
    let t0 = Instant::now();
    for step in 0..steps {
        let start = (step * global) % n;
        let batch = &order[start..start + global];
        let mine = dist::local_slice(batch, pg).unwrap();
        let idx = Tensor::from_slice(mine);
        let x = xs.index_select(0, &idx);
        let y = ys.index_select(0, &idx);
        let loss = model.forward(&x).cross_entropy_for_logits(&y);
        opt.zero_grad();
        loss.backward();
        grads.average(pg).unwrap();
        opt.clip_grad_norm(1.0).unwrap();
        opt.step(1e-2).unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let comm = pg.stats().seconds - before.seconds;
    if let Some(o) = out {
        let vars = dist::var_store_tensors(&vs);
        Tensor::write_safetensors(
            &vars,
            o.join(format!("w{}-r{}.safetensors", pg.world_size(), pg.rank())),
        )
        .unwrap();
    }
    (steps as f64 / secs, comm / secs)
}

fn train(pg: &ProcessGroup, out: &Path) {
    // Equivalence: a small MLP, 10 steps, per-rank batch B (one rank: 2B).
    let b = BATCH * 2 / pg.world_size();
    train_run(pg, &[8, 16, 4], b, STEPS, Some(out));
    // Timing: a wider MLP (~0.6 M parameters, 2.4 MB of gradients), global batch 128.
    let tb = TIMING_BATCH * 2 / pg.world_size();
    let _warm = train_run(pg, &[256, 512, 512, 64], tb, 5, None);
    let (sps, comm) = train_run(pg, &[256, 512, 512, 64], tb, 60, None);
    println!("timing {sps:.3} {comm:.4}");
}

/// The three trainers, 10 steps each, per-rank batch 4 / world.
fn trainers(pg: std::sync::Arc<ProcessGroup>, out: &Path) {
    let (rank, world) = (pg.rank(), pg.world_size());
    let tag = format!("w{world}");
    let own = out.join(format!("rank-{tag}-{rank}"));
    std::fs::create_dir_all(&own).unwrap();
    // Stage 1: the tokenizer on synthetic images.
    let mut cfg = crate::tokenizer::tiny_config(&own, "unused");
    cfg.data_dir = out.join("images");
    cfg.out_dir = out.join(format!("tok-{tag}"));
    // A codebook smaller than the k-means sample (no empty clusters re-seeded with copies of
    // one sample: tied codes would make nearest-code choices a matter of rounding).
    let manifest = cfg.manifest.clone().unwrap();
    let mut m = lavit_runtime::manifest::LavitManifest::from_json_file(&manifest).unwrap();
    m.tokenizer.n_code = 16;
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    cfg.batch_size = 4 / world;
    cfg.steps = STEPS as i64;
    cfg.steps_no_quant = 4;
    cfg.kmeans_batches = 2;
    cfg.save_every = STEPS as i64;
    cfg.grad_clip = 0.5;
    // The ratio term per image: the batch form (ρ − mean M)² over each rank's half is not
    // that over the whole batch, so only the per-image form is equal for 1 and 2 ranks.
    cfg.ratio_scope = lavit::train::tokenizer::RatioScope::Image;
    lavit::train::tokenizer::train_in_group(&cfg, &pg).expect("stage 1");
    // Stage 2: the tiny LLM on the structured caption set.
    use crate::llm::stage2::{caption_set, cfg as llm_cfg, copied, from_weights};
    let (vs, _m) = crate::llm::tiny_model(8);
    let mut c = llm_cfg(STEPS as i64, 0);
    c.batch_size = 4 / world;
    c.save_every = STEPS as i64;
    lavit::train::llm::train_llm(
        from_weights(copied(&vs)),
        &crate::llm::tiny_vocab(),
        &caption_set(),
        &[],
        &c,
        &out.join(format!("llm-{tag}")),
        &lavit_runtime::stage::Placement::default(),
        &pg,
    )
    .expect("stage 2");
    // Stage 1b: the pixel decoder on the same images (pixel space, no VAE).
    let (images, _) = lavit::train::decoder::load_image_folder(&out.join("images"), 16, 0).unwrap();
    let mut d = crate::pixel::training::config(&out.join(format!("dec-{tag}")), STEPS);
    d.train.batch_size = 4 / world as i64;
    d.train.save_every = STEPS;
    let cond = lavit::train::decoder::PatchConditioner::new(3, 16, 4, 16, 1, Device::Cpu).unwrap();
    lavit::train::decoder::train_placed(
        &d,
        &images,
        &cond,
        &lavit_runtime::stage::Placement::default(),
        &pg,
    )
    .expect("stage 1b");
    println!("trainers ok on rank {rank}");
}
