//! The plugin host against the example plugins and hostile ones.

use super::*;
use lavit_plugin_api::QuantizeOut;
use tch::{Kind, Tensor};

/// One code per integer: id = round(z[:, 0]) clamped to 0..n.
struct Rounding(i64);

impl Codebook for Rounding {
    fn name(&self) -> String {
        "rounding".into()
    }
    fn num_codes(&self) -> i64 {
        self.0
    }
    fn code_dim(&self) -> i64 {
        1
    }
    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor> {
        Ok(z.f_select(1, 0)?
            .f_round()?
            .f_clamp(0, self.0 - 1)?
            .f_to_kind(Kind::Int64)?)
    }
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        assert!(ids.numel() > 0, "embed of nothing");
        Ok(ids.f_to_kind(Kind::Float)?.f_unsqueeze(1)?)
    }
    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut> {
        let ids = self.quantize(z)?;
        Ok(QuantizeOut {
            quantized: self.embed(&ids)?,
            ids,
            loss: Tensor::zeros([], (Kind::Float, z.device())),
        })
    }
}

fn register_rounding(r: &mut Registrar) -> PluginResult<()> {
    r.codebook("rounding", |args: &PluginArgs| {
        let cfg: serde_json::Value =
            serde_json::from_str(&args.config).map_err(|e| PluginError(e.to_string()))?;
        Ok(Rounding(cfg["n"].as_i64().unwrap_or(4)))
    });
    Ok(())
}

fn register_panicking(_: &mut Registrar) -> PluginResult<()> {
    panic!("register exploded")
}

fn spec(config: serde_json::Value) -> PluginComponent {
    PluginComponent {
        plugin: "rounding".into(),
        weights: None,
        config,
    }
}

#[test]
fn static_plugin_builds_and_guards_its_codebook() {
    let mut host = PluginHost::new();
    let info = host
        .register_static("static", "1", register_rounding)
        .unwrap();
    assert_eq!(info.codebooks, ["rounding"]);
    let cb = host
        .codebook(&spec(serde_json::json!({"n": 10})), tch::Device::Cpu)
        .unwrap();
    assert_eq!(cb.num_codes(), 10);
    let ids = cb
        .quantize(&Tensor::from_slice(&[2.2f32, 7.9, 42.0]).view([3, 1]))
        .unwrap();
    assert_eq!(Vec::<i64>::try_from(&ids).unwrap(), [2, 8, 9]);
    // A panic inside a method comes back as an error naming the codebook and the call.
    let e = cb
        .embed(&Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu)))
        .unwrap_err();
    assert!(
        e.0.contains("rounding") && e.0.contains("embed of nothing"),
        "{e}"
    );
    assert_eq!(cb.embed(&ids).unwrap().size(), [3, 1]);
}

#[test]
fn duplicate_unknown_and_panicking_registrations_are_errors() {
    let mut host = PluginHost::new();
    host.register_static("first", "1", register_rounding)
        .unwrap();
    let e = host
        .register_static("second", "1", register_rounding)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("first") && e.to_string().contains("second"),
        "{e}"
    );
    assert_eq!(host.plugins().len(), 1);

    let e = host
        .register_static("bad", "1", register_panicking)
        .err()
        .unwrap();
    assert!(e.to_string().contains("register exploded"), "{e}");

    let mut other = spec(serde_json::json!({}));
    other.plugin = "kmeans".into();
    let e = host.codebook(&other, tch::Device::Cpu).err().unwrap();
    assert!(
        e.to_string().contains("kmeans") && e.to_string().contains("rounding"),
        "{e}"
    );
    assert!(host.backbone(&other, tch::Device::Cpu).is_err());
}

#[test]
fn config_sections_parse() {
    let cfg: PluginsConfig = toml::from_str("load = [\"a/libx.so\"]").unwrap();
    assert_eq!(cfg.load, [PathBuf::from("a/libx.so")]);
    let full: PluginsConfig = toml::from_str(
        "load = [\"l.so\"]\n[codebook]\nplugin = \"residual-vq\"\nweights = \"c.safetensors\"\n[backbone]\nplugin = \"convnext\"",
    )
    .unwrap();
    assert_eq!(full.codebook.as_ref().unwrap().plugin, "residual-vq");
    assert_eq!(
        full.resolved(Path::new("/r")).codebook.unwrap().weights,
        Some(PathBuf::from("/r/c.safetensors"))
    );
    assert!(!full.is_empty() && PluginsConfig::default().is_empty());
    let c: PluginComponent = toml::from_str(
        "plugin = \"residual-vq\"\nweights = \"w.safetensors\"\nconfig = { levels = 3 }",
    )
    .unwrap();
    assert_eq!(c.config["levels"], 3);
    let bare: PluginComponent = toml::from_str("plugin = \"convnext\"").unwrap();
    assert_eq!(bare.config.to_string(), "{}");
    assert!(toml::from_str::<PluginComponent>("plugin = \"x\"\nweight = \"w\"").is_err());
    let base = Path::new("/etc/lavit");
    assert_eq!(
        c.resolved(base).weights.unwrap(),
        base.join("w.safetensors")
    );
    let abs = PluginsConfig {
        load: vec![PathBuf::from("/opt/libp.so"), PathBuf::from("libq.so")],
        ..Default::default()
    };
    assert_eq!(
        abs.resolved(base).load,
        [PathBuf::from("/opt/libp.so"), base.join("libq.so")]
    );
}
