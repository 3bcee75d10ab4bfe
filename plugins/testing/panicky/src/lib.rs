//! Test plugin: a codebook and a backbone whose calls panic, to check that a panic inside a
//! plugin comes back to the host as an error and the host keeps working.
//!
//! Codebook `panicky` (config `{"panic_in_factory": bool}`): `quantize` panics, `embed`
//! works (zeros). Backbone `panicky`: `forward` panics.

use lavit_plugin_api::{
    declare_plugin, Backbone, Codebook, PluginArgs, PluginResult, QuantizeOut, Registrar,
};
use tch::{Kind, Tensor};

pub struct PanickyCodebook;

impl Codebook for PanickyCodebook {
    fn name(&self) -> String {
        "panicky".into()
    }
    fn num_codes(&self) -> i64 {
        4
    }
    fn code_dim(&self) -> i64 {
        2
    }
    fn quantize(&self, _z: &Tensor) -> PluginResult<Tensor> {
        panic!("quantize exploded on purpose")
    }
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        Ok(Tensor::f_zeros(
            [ids.size()[0], 2],
            (Kind::Float, ids.device()),
        )?)
    }
    fn quantize_train(&mut self, _z: &Tensor) -> PluginResult<QuantizeOut> {
        let v: Vec<i64> = Vec::new();
        let _ = v[3]; // an index out of bounds, the commonest real panic
        unreachable!()
    }
}

pub struct PanickyBackbone;

impl Backbone for PanickyBackbone {
    fn name(&self) -> String {
        "panicky".into()
    }
    fn image_size(&self) -> i64 {
        8
    }
    fn patch_size(&self) -> i64 {
        4
    }
    fn width(&self) -> i64 {
        2
    }
    fn forward(&self, _images: &Tensor) -> PluginResult<Tensor> {
        panic!("forward exploded on purpose")
    }
}

fn codebook(args: &PluginArgs) -> PluginResult<PanickyCodebook> {
    if args.config.contains("\"panic_in_factory\":true") {
        panic!("factory exploded on purpose");
    }
    Ok(PanickyCodebook)
}

pub fn register(r: &mut Registrar) -> PluginResult<()> {
    r.codebook("panicky", codebook);
    r.backbone("panicky", |_: &PluginArgs| Ok(PanickyBackbone));
    Ok(())
}

declare_plugin!(name: "lavit-plugin-test-panicky", register: register);
