//! Panic guards. Generic code here is instantiated *in the plugin* (by `declare_plugin!`
//! and [`crate::Registrar`]), so each `catch_unwind` runs with the plugin's own copy of the
//! standard library: a panic never unwinds across the dylib boundary (the host's std would
//! abort on a panic raised by another std).

use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;

use crate::{Backbone, Codebook, Denoiser, DenoiserInput, PluginError, PluginResult, QuantizeOut};

/// Runs `f`, turning a panic into `PluginError("<what> panicked: <message>")`.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> PluginResult<T>) -> PluginResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(PluginError(format!(
            "{what} panicked: {}",
            panic_message(payload.as_ref())
        ))),
    }
}

/// The text of a panic payload (`panic!("...")` gives `&str` or `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Wraps a codebook so that no method can unwind: fallible methods return the panic as an
/// error; the constant ones (name, sizes) are read once at construction; the parameter list
/// falls back to the one read at construction.
pub struct GuardedCodebook<C: Codebook> {
    inner: ManuallyDrop<C>,
    name: String,
    num_codes: i64,
    code_dim: i64,
    params: Vec<Tensor>,
}

impl<C: Codebook> GuardedCodebook<C> {
    pub fn new(inner: C) -> PluginResult<Self> {
        let (name, num_codes, code_dim, params) = catch_panic("codebook description", || {
            Ok((
                inner.name(),
                inner.num_codes(),
                inner.code_dim(),
                inner.trainable_parameters(),
            ))
        })?;
        Ok(GuardedCodebook {
            inner: ManuallyDrop::new(inner),
            name,
            num_codes,
            code_dim,
            params,
        })
    }

    fn what(&self, method: &str) -> String {
        format!("codebook `{}`: {method}", self.name)
    }
}

impl<C: Codebook> Codebook for GuardedCodebook<C> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn num_codes(&self) -> i64 {
        self.num_codes
    }
    fn code_dim(&self) -> i64 {
        self.code_dim
    }
    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor> {
        catch_panic(&self.what("quantize"), || self.inner.quantize(z))
    }
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        catch_panic(&self.what("embed"), || self.inner.embed(ids))
    }
    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut> {
        let what = self.what("quantize_train");
        catch_panic(&what, || self.inner.quantize_train(z))
    }
    fn update(&mut self, z: &Tensor, ids: &Tensor) -> PluginResult<()> {
        let what = self.what("update");
        catch_panic(&what, || self.inner.update(z, ids))
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        catch_panic("", || Ok(self.inner.trainable_parameters()))
            .unwrap_or_else(|_| self.params.iter().map(|t| t.shallow_clone()).collect())
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        catch_panic(&self.what("state_dict"), || self.inner.state_dict())
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        let what = self.what("load_state_dict");
        catch_panic(&what, || self.inner.load_state_dict(state))
    }
    fn init_from_samples(&mut self, z: &Tensor, seed: u64) -> PluginResult<()> {
        let what = self.what("init_from_samples");
        catch_panic(&what, || self.inner.init_from_samples(z, seed))
    }
}

impl<C: Codebook> Drop for GuardedCodebook<C> {
    fn drop(&mut self) {
        // SAFETY: `inner` is dropped exactly once, here.
        let _ = catch_panic("drop", || {
            unsafe { ManuallyDrop::drop(&mut self.inner) };
            Ok(())
        });
    }
}

/// Wraps a backbone like [`GuardedCodebook`] wraps a codebook.
pub struct GuardedBackbone<B: Backbone> {
    inner: ManuallyDrop<B>,
    name: String,
    image_size: i64,
    patch_size: i64,
    width: i64,
    num_patches: i64,
    params: Vec<Tensor>,
}

impl<B: Backbone> GuardedBackbone<B> {
    pub fn new(inner: B) -> PluginResult<Self> {
        let (name, image_size, patch_size, width, num_patches, params) =
            catch_panic("backbone description", || {
                Ok((
                    inner.name(),
                    inner.image_size(),
                    inner.patch_size(),
                    inner.width(),
                    inner.num_patches(),
                    inner.trainable_parameters(),
                ))
            })?;
        Ok(GuardedBackbone {
            inner: ManuallyDrop::new(inner),
            name,
            image_size,
            patch_size,
            width,
            num_patches,
            params,
        })
    }
}

impl<B: Backbone> Backbone for GuardedBackbone<B> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn image_size(&self) -> i64 {
        self.image_size
    }
    fn patch_size(&self) -> i64 {
        self.patch_size
    }
    fn width(&self) -> i64 {
        self.width
    }
    fn num_patches(&self) -> i64 {
        self.num_patches
    }
    fn forward(&self, images: &Tensor) -> PluginResult<Tensor> {
        let what = format!("backbone `{}`: forward", self.name);
        catch_panic(&what, || self.inner.forward(images))
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        catch_panic("", || Ok(self.inner.trainable_parameters()))
            .unwrap_or_else(|_| self.params.iter().map(|t| t.shallow_clone()).collect())
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        let what = format!("backbone `{}`: state_dict", self.name);
        catch_panic(&what, || self.inner.state_dict())
    }
}

impl<B: Backbone> Drop for GuardedBackbone<B> {
    fn drop(&mut self) {
        // SAFETY: `inner` is dropped exactly once, here.
        let _ = catch_panic("drop", || {
            unsafe { ManuallyDrop::drop(&mut self.inner) };
            Ok(())
        });
    }
}

/// Wraps a denoiser like [`GuardedCodebook`] wraps a codebook.
pub struct GuardedDenoiser<D: Denoiser> {
    inner: ManuallyDrop<D>,
    name: String,
    in_channels: i64,
    cross_attention_dim: i64,
    sample_size: i64,
    size_multiple: i64,
    params: Vec<(String, Tensor)>,
}

impl<D: Denoiser> GuardedDenoiser<D> {
    pub fn new(inner: D) -> PluginResult<Self> {
        let (name, in_channels, cross_attention_dim, sample_size, size_multiple, params) =
            catch_panic("denoiser description", || {
                Ok((
                    inner.name(),
                    inner.in_channels(),
                    inner.cross_attention_dim(),
                    inner.sample_size(),
                    inner.size_multiple(),
                    inner.trainable_parameters(),
                ))
            })?;
        Ok(GuardedDenoiser {
            inner: ManuallyDrop::new(inner),
            name,
            in_channels,
            cross_attention_dim,
            sample_size,
            size_multiple,
            params,
        })
    }

    fn what(&self, method: &str) -> String {
        format!("denoiser `{}`: {method}", self.name)
    }
}

impl<D: Denoiser> Denoiser for GuardedDenoiser<D> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn in_channels(&self) -> i64 {
        self.in_channels
    }
    fn cross_attention_dim(&self) -> i64 {
        self.cross_attention_dim
    }
    fn sample_size(&self) -> i64 {
        self.sample_size
    }
    fn size_multiple(&self) -> i64 {
        self.size_multiple
    }
    fn forward(&self, input: &DenoiserInput<'_>) -> PluginResult<Tensor> {
        catch_panic(&self.what("forward"), || self.inner.forward(input))
    }
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        catch_panic("", || Ok(self.inner.trainable_parameters())).unwrap_or_else(|_| {
            self.params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        })
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        catch_panic(&self.what("state_dict"), || self.inner.state_dict())
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        let what = self.what("load_state_dict");
        catch_panic(&what, || self.inner.load_state_dict(state))
    }
}

impl<D: Denoiser> Drop for GuardedDenoiser<D> {
    fn drop(&mut self) {
        // SAFETY: `inner` is dropped exactly once, here.
        let _ = catch_panic("drop", || {
            unsafe { ManuallyDrop::drop(&mut self.inner) };
            Ok(())
        });
    }
}
