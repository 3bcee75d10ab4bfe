//! Tests of the training infrastructure on a tiny MLP (CPU, seconds).

use super::*;
use crate::checkpoint::StateDict;
use tch::{nn, nn::Module, Device, Kind, Tensor};

fn vec_of(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * (1.0 + b.abs())
}

#[test]
fn adamw_two_steps_match_closed_form() {
    // With a constant gradient g, m̂ = g and v̂ = g² at every step, so each step is
    // p ← p·(1 − lr·wd) − lr·g/(|g| + eps).
    let (lr, wd) = (0.1, 0.5);
    let p = Tensor::from_slice(&[1.0f64, -2.0, 0.5]).set_requires_grad(true);
    let c = Tensor::from_slice(&[3.0f64, -0.25, 0.0]);
    let cfg = AdamWConfig {
        weight_decay: wd,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg.clone()).unwrap();
    let mut expect = vec![1.0f64, -2.0, 0.5];
    let g = [3.0f64, -0.25, 0.0];
    for _ in 0..2 {
        opt.zero_grad();
        (&p * &c).sum(Kind::Double).backward();
        opt.step(lr).unwrap();
        for i in 0..3 {
            expect[i] = expect[i] * (1.0 - lr * wd) - lr * g[i] / (g[i].abs() + cfg.eps);
        }
    }
    let got = vec_of(&p);
    for i in 0..3 {
        assert!(close(got[i], expect[i]), "{got:?} vs {expect:?}");
    }
    assert_eq!(opt.steps(), 2);
}

/// torch.optim.AdamW's update written out on scalars (amsgrad off).
fn scalar_adamw(p: &mut [f64], grads: &[Vec<f64>], lrs: &[f64], cfg: &AdamWConfig) {
    let (mut m, mut v) = (vec![0.0; p.len()], vec![0.0; p.len()]);
    for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
        let t = (t + 1) as f64;
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * cfg.weight_decay;
            m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
            v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let denom = (v[i] / (1.0 - cfg.beta2.powf(t))).sqrt() + cfg.eps;
            p[i] -= lr / (1.0 - cfg.beta1.powf(t)) * m[i] / denom;
        }
    }
}

#[test]
fn adamw_matches_the_scalar_reference_with_varying_gradients() {
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let init = [0.5f64, -1.0, 2.0];
    let p = Tensor::from_slice(&init).set_requires_grad(true);
    let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg.clone()).unwrap();
    let (mut grads, mut lrs) = (Vec::new(), Vec::new());
    for t in 0..5 {
        let tf = t as f64;
        let c = vec![(tf + 1.0).sin(), (2.0 * tf).cos(), tf - 2.0];
        let lr = 0.05 * (tf + 1.0) / 5.0;
        opt.zero_grad();
        (&p * Tensor::from_slice(&c)).sum(Kind::Double).backward();
        opt.step(lr).unwrap();
        grads.push(c);
        lrs.push(lr);
    }
    let mut want = init.to_vec();
    scalar_adamw(&mut want, &grads, &lrs, &cfg);
    let got = vec_of(&p);
    for i in 0..3 {
        assert!((got[i] - want[i]).abs() < 1e-12, "{got:?} vs {want:?}");
    }
}

#[test]
fn adamw_skips_params_without_grad_and_respects_no_decay() {
    let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    let bias = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
    let unused = Tensor::from_slice(&[5.0f32]).set_requires_grad(true);
    let mut opt = AdamW::new(
        vec![
            ("l.weight".into(), a.shallow_clone()),
            ("l.bias".into(), bias.shallow_clone()),
            ("other.weight".into(), unused.shallow_clone()),
        ],
        AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        },
    )
    .unwrap()
    .no_decay(is_no_decay);
    // The bias gets a zero gradient: it moves only through decay, which it is excluded from.
    ((&a * 1.0).sum(Kind::Float) + (&bias * 0.0).sum(Kind::Float)).backward();
    opt.step(0.1).unwrap();
    assert_eq!(vec_of(&unused), vec![5.0]);
    assert_eq!(vec_of(&bias), vec![1.0]);
    assert!(vec_of(&a)[0] < 1.0 * (1.0 - 0.05) + 1e-6);
    let sd = opt.state_dict().unwrap();
    assert_eq!(sd["step.other.weight"].int64_value(&[]), 0);
    assert_eq!(sd["step.l.weight"].int64_value(&[]), 1);
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let p = Tensor::from_slice(&[0.0f64, 0.0]).set_requires_grad(true);
    let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], Default::default()).unwrap();
    (&p * Tensor::from_slice(&[3.0f64, 4.0]))
        .sum(Kind::Double)
        .backward();
    let n = opt.clip_grad_norm(1.0).unwrap();
    assert!(close(n, 5.0));
    let g = vec_of(&p.grad());
    assert!(close(g[0], 0.6) && (g[1] - 0.8).abs() < 1e-6, "{g:?}");
    // Under the cap: unchanged.
    let n2 = opt.clip_grad_norm(10.0).unwrap();
    assert!((n2 - 1.0).abs() < 1e-5);
    assert!((vec_of(&p.grad())[0] - 0.6).abs() < 1e-6);
}

#[test]
fn optimizer_state_round_trip_is_exact_and_strict() {
    let make = || Tensor::from_slice(&[0.3f32, -0.7, 1.1]).set_requires_grad(true);
    let c = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
    let (p1, p2) = (make(), make());
    let mut o1 = AdamW::new(vec![("w".into(), p1.shallow_clone())], Default::default()).unwrap();
    for _ in 0..3 {
        o1.zero_grad();
        (&p1 * &p1 * &c).sum(Kind::Float).backward();
        o1.step(0.01).unwrap();
    }
    let sd = o1.state_dict().unwrap();
    let mut o2 = AdamW::new(vec![("w".into(), p2.shallow_clone())], Default::default()).unwrap();
    tch::no_grad(|| p2.shallow_clone().copy_(&p1));
    o2.load_state_dict(&sd, "test").unwrap();
    for (p, o) in [(&p1, &mut o1), (&p2, &mut o2)] {
        o.zero_grad();
        (p * p * &c).sum(Kind::Float).backward();
        o.step(0.01).unwrap();
    }
    assert!(p1.equal(&p2));
    // Strict: a state for another parameter set is refused with the source named.
    let mut o3 = AdamW::new(
        vec![("other".into(), make().shallow_clone())],
        Default::default(),
    )
    .unwrap();
    let e = o3.load_state_dict(&sd, "opt.safetensors").unwrap_err();
    assert!(e.to_string().contains("opt.safetensors"), "{e}");
}

#[test]
fn schedules() {
    let s = LrSchedule::warmup_cosine(1.0, 10, 110, 0.1);
    assert!(close(s.lr_at(0), 0.1));
    assert!(close(s.lr_at(9), 1.0));
    assert!(close(s.lr_at(10), 1.0));
    assert!(close(s.lr_at(60), 0.55));
    assert!(close(s.lr_at(110), 0.1));
    assert!(close(s.lr_at(1000), 0.1));
    for i in 10..110 {
        assert!(s.lr_at(i + 1) <= s.lr_at(i));
    }
    let c = LrSchedule::constant(3e-4);
    assert_eq!(c.lr_at(0), 3e-4);
    assert_eq!(c.lr_at(12345), 3e-4);
    let bad = LrSchedule {
        lr: -1.0,
        ..Default::default()
    };
    let e = bad
        .validate("configs/x.toml", "train.schedule")
        .unwrap_err();
    assert!(e.to_string().contains("train.schedule.lr"), "{e}");
}

// ---- a tiny training run, for resume / NaN / checkpoint tests ----------------------

struct Run {
    vs: nn::VarStore,
    net: nn::Sequential,
    opt: AdamW,
    x: Tensor,
    y: Tensor,
}

const BATCH: i64 = 8;
const N: i64 = 40;

/// Tests that draw from libtorch's global generator hold this, so that parallel tests do
/// not interleave their draws.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny_run() -> Run {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = nn::seq()
        .add(nn::linear(&root / "fc1", 4, 16, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc2", 16, 1, Default::default()));
    let x = Tensor::randn([N, 4], (Kind::Float, Device::Cpu));
    let y = x.sum_dim_intlist(-1, true, Kind::Float).sin();
    let opt = AdamW::from_var_store(&vs, |_| true, AdamWConfig::default())
        .unwrap()
        .no_decay(is_no_decay);
    Run { vs, net, opt, x, y }
}

/// Train until `state.step == until`, saving every 2 steps; returns the losses.
/// `nan_at` steps get a NaN loss.
fn train(
    r: &mut Run,
    ck: &Checkpointer,
    state: &mut TrainState,
    until: i64,
    nan_at: &[i64],
    guard: &mut NanGuard,
) -> crate::Result<Vec<f64>> {
    let sched = LrSchedule::warmup_cosine(1e-2, 3, 20, 1e-3);
    let rng = StepRng::new(state.seed);
    let mut losses = Vec::new();
    while state.step < until {
        let step = state.step;
        rng.begin_step(step);
        let start = state.data_cursor as i64;
        let xb = r.x.narrow(0, start, BATCH);
        let yb = r.y.narrow(0, start, BATCH);
        // Dropout draws from libtorch's generator: resume must reproduce it.
        let h = r.net.forward(&xb).dropout(0.2, true);
        let mut loss = (h - yb).square().mean(Kind::Float);
        if nan_at.contains(&step) {
            loss *= f64::NAN;
        }
        let lv = loss.double_value(&[]);
        match guard.observe(step, lv) {
            StepVerdict::Apply => {
                r.opt.zero_grad();
                loss.backward();
                r.opt.clip_grad_norm(1.0)?;
                r.opt.step(sched.lr_at(step))?;
            }
            StepVerdict::Skip => {}
            StepVerdict::Stop => {
                let p = ck.save_training(state, &r.vs, &r.opt)?;
                return Err(guard.stop_error(step, Some(p)));
            }
        }
        losses.push(lv);
        state.data_cursor = ((start + BATCH) % N) as u64;
        if state.data_cursor == 0 {
            state.epoch += 1;
        }
        state.step += 1;
        state.consecutive_skips = guard.consecutive();
        state.skipped_total = guard.skipped_total();
        if state.step % 2 == 0 {
            ck.save_training(state, &r.vs, &r.opt)?;
        }
    }
    Ok(losses)
}

fn model_hash(r: &Run) -> u64 {
    hash_state_dict(&var_store_state_dict(&r.vs)).unwrap()
}

#[test]
fn resume_is_exact() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let n = 6;
    // 2N straight.
    let mut a = tiny_run();
    let ck_a = Checkpointer::new(tmp.path().join("a"), 2).unwrap();
    let mut st = TrainState {
        seed: 42,
        ..Default::default()
    };
    let mut g = NanGuard::new(3);
    let straight = train(&mut a, &ck_a, &mut st, 2 * n, &[], &mut g).unwrap();

    // N, then a fresh process-like restart (new model with other weights) resumes, then N.
    let ck_b = Checkpointer::new(tmp.path().join("b"), 2).unwrap();
    let mut b = tiny_run();
    let mut st_b = TrainState {
        seed: 42,
        ..Default::default()
    };
    let mut g = NanGuard::new(3);
    let mut first = train(&mut b, &ck_b, &mut st_b, n, &[], &mut g).unwrap();
    tch::manual_seed(999);
    let mut c = tiny_run();
    tch::no_grad(|| {
        for (_, mut v) in c.vs.variables() {
            v.copy_(&v.randn_like());
        }
    });
    let mut st_c = ck_b
        .resume(&c.vs, &mut c.opt)
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(st_c.step, n);
    let mut g = NanGuard::new(3).with_counts(st_c.consecutive_skips, st_c.skipped_total);
    first.extend(train(&mut c, &ck_b, &mut st_c, 2 * n, &[], &mut g).unwrap());

    assert_eq!(straight, first, "losses differ after resume");
    assert_eq!(
        model_hash(&a),
        model_hash(&c),
        "parameters differ after resume"
    );
    assert_eq!(
        hash_state_dict(&a.opt.state_dict().unwrap()).unwrap(),
        hash_state_dict(&c.opt.state_dict().unwrap()).unwrap()
    );
    // Keep-2 pruning: only the two newest committed checkpoints remain.
    let kept: Vec<i64> = ck_b.committed().unwrap().iter().map(|x| x.0).collect();
    assert_eq!(kept, vec![2 * n - 2, 2 * n]);
    // The loss went down over training.
    assert!(straight[2 * n as usize - 1] < straight[0]);
}

#[test]
fn latest_ignores_torn_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpointer::new(tmp.path(), 3).unwrap();
    let sd: StateDict = [("w".to_string(), Tensor::from_slice(&[1.0f32, 2.0]))].into();
    for step in [1, 2] {
        let st = TrainState {
            step,
            ..Default::default()
        };
        ck.save(&st, &[("model", &sd)]).unwrap();
    }
    // A save killed before its marker: files present, no COMMITTED.
    let torn = tmp.path().join("step-00000003");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::copy(
        tmp.path().join("step-00000002/model.safetensors"),
        torn.join("model.safetensors"),
    )
    .unwrap();
    let l = latest(tmp.path()).unwrap().unwrap();
    assert!(l.ends_with("step-00000002"), "{}", l.display());
    let e = load(&torn).err().expect("torn checkpoint refused");
    assert!(e.to_string().contains("COMMITTED"), "{e}");
    let mut ld = load(&l).unwrap();
    assert_eq!(ld.state.step, 2);
    assert!(ld.take("model").unwrap()["w"].equal(&sd["w"]));
    assert!(ld.take("ema").is_err());
    // No folder at all: no checkpoint, not an error.
    assert!(latest(&tmp.path().join("nothing")).unwrap().is_none());
}

#[test]
fn nan_loss_skips_and_repeated_nans_stop_with_checkpoint() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let ck = Checkpointer::new(tmp.path(), 2).unwrap();
    let mut r = tiny_run();
    let mut st = TrainState {
        seed: 1,
        ..Default::default()
    };
    let mut g = NanGuard::new(3);
    train(&mut r, &ck, &mut st, 3, &[], &mut g).unwrap();
    let before = model_hash(&r);
    let opt_before = hash_state_dict(&r.opt.state_dict().unwrap()).unwrap();
    // One NaN step: skipped, parameters and optimiser untouched, counted.
    train(&mut r, &ck, &mut st, 4, &[3], &mut g).unwrap();
    assert_eq!(model_hash(&r), before);
    assert_eq!(
        hash_state_dict(&r.opt.state_dict().unwrap()).unwrap(),
        opt_before
    );
    assert_eq!(g.skipped_total(), 1);
    // A finite step resets the run of skips.
    train(&mut r, &ck, &mut st, 5, &[], &mut g).unwrap();
    assert_eq!(g.consecutive(), 0);
    // Three in a row stop the run at the third, with a checkpoint.
    let e = train(&mut r, &ck, &mut st, 20, &[5, 6, 7], &mut g).unwrap_err();
    match &e {
        crate::Error::NonFiniteLoss {
            step,
            consecutive,
            checkpoint,
            ..
        } => {
            assert_eq!(*step, 7);
            assert_eq!(*consecutive, 3);
            let p = checkpoint.as_ref().unwrap();
            assert!(p.join(COMMIT_MARKER).is_file());
        }
        other => panic!("wrong error {other}"),
    }
    assert!(e.to_string().contains("step 7"), "{e}");
}

#[test]
fn metrics_log_resume_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(tmp.path(), 0).unwrap();
    for s in 0..10 {
        log.log(s, &[("loss", 10.0 - s as f64), ("lr", 0.1)])
            .unwrap();
    }
    log.log(10, &[("loss", f64::NAN)]).unwrap();
    drop(log);
    // Resume at step 6: steps 6.. are dropped from the log.
    let mut log = MetricsLog::open(tmp.path(), 6).unwrap();
    assert_eq!(log.records().len(), 6);
    log.log(6, &[("loss", 1.0), ("text_loss", 2.0)]).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 7);
    let (html, png) = log.write_report("tiny <run>").unwrap();
    let h = std::fs::read_to_string(html).unwrap();
    assert!(h.contains("<svg") && h.contains("tiny &lt;run&gt;") && h.contains("text_loss"));
    assert_eq!(h.matches("<polyline").count(), 3);
    let img = image::open(png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (800, 400));
    // The first series' colour is drawn.
    assert!(img.pixels().any(|p| p.0 == [31, 119, 180]));
    // Text is drawn: the title band holds dark (glyph) pixels only when there is a title.
    let dark_in_title_band = |img: &image::RgbImage| {
        (0..28)
            .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count()
    };
    let titled = dark_in_title_band(&img);
    let untitled = tmp.path().join("untitled.png");
    crate::train::write_line_plot_png(&untitled, &[vec![(0.0, 1.0), (1.0, 2.0)]], 800, 400)
        .unwrap();
    let img = image::open(untitled).unwrap().to_rgb8();
    // (The band also holds the top tick label and the legend, in both plots.)
    let untitled = dark_in_title_band(&img);
    assert!(
        titled > untitled + 50,
        "no title text drawn: {titled} vs {untitled}"
    );
    // Axis labels: the y label is drawn rotated in the left margin.
    assert!((0..400).any(|y| (0..20).any(|x| img.get_pixel(x, y).0.iter().all(|&c| c < 100))));
}
