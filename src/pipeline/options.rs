//! The one builder of text → image options: what a caller asked for, over the checkpoint's
//! recommended settings (its manifest's `generation` section, [`ModelInfo::generate_defaults`]),
//! checked against the model's geometry and one budget. `lavit generate`, `lavit eval`, the
//! server and the library all build their [`GenerateOptions`] here, so the same request gets
//! the same options (and the same refusal) from every front-end.

use std::fmt;

use lavit_runtime::messages::GenerateOptions;
use lavit_runtime::stage::MAX_IMAGES_PER_REQUEST;

use super::ModelInfo;

/// What a caller may set for a text → image request. `None` takes the checkpoint's
/// recommended value (`size`: the decoder's native side).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateParams {
    pub n: Option<u64>,
    pub seed: Option<u64>,
    /// (width, height) in pixels.
    pub size: Option<(usize, usize)>,
    /// Decoder (U-Net) classifier-free guidance.
    pub guidance: Option<f64>,
    /// LLM classifier-free guidance of the image tokens.
    pub llm_guidance: Option<f64>,
    pub steps: Option<u64>,
    pub top_k: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<usize>,
    pub min_tokens: Option<usize>,
}

/// The bounds a front-end enforces on a generation request: the server's are its `[server]`
/// limits of the same names ([`crate::serve::Limits::budget`]); the local front-ends
/// (`lavit generate`, `lavit eval`, the library) use [`GenerateBudget::default`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateBudget {
    pub max_n: u64,
    pub max_steps: u64,
    pub max_guidance: f64,
    pub max_image_side: usize,
    /// `n × steps × width × height / native²`: native-size diffusion steps per request.
    pub max_request_cost: f64,
}

/// The local budget: the server's default limits, except that one call may ask for up to
/// [`MAX_IMAGES_PER_REQUEST`] images and what that many cost at 50 native-size steps each.
impl Default for GenerateBudget {
    fn default() -> Self {
        let n = MAX_IMAGES_PER_REQUEST as u64;
        GenerateBudget {
            max_n: n,
            max_request_cost: 50.0 * n as f64,
            ..crate::serve::Limits::default().budget()
        }
    }
}

/// A refused option: the request field at fault and why.
#[derive(Clone, Debug, PartialEq)]
pub struct OptionError {
    /// The field (`n`, `size`, `steps`, …); `None` for the budget, which no one field breaks.
    pub param: Option<&'static str>,
    pub message: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OptionError {}

fn refuse(param: &'static str, message: String) -> OptionError {
    OptionError {
        param: Some(param),
        message,
    }
}

/// The sizes a model draws: multiples of `multiple` in `[multiple, max]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SizeRule {
    pub multiple: usize,
    pub max: usize,
    /// The decoder's native side (the cost unit's image).
    pub native: usize,
}

impl ModelInfo {
    /// Sides the decoder takes (multiples of its size multiple: the VAE's downscale times
    /// the U-Net's) up to twice its native side and `max_image_side`.
    pub fn size_rule(&self, max_image_side: usize) -> SizeRule {
        let native = self.default_size.0.max(self.default_size.1).max(1);
        let multiple = self.size_multiple.max(1);
        let max = max_image_side.min(native.saturating_mul(2));
        SizeRule {
            multiple,
            max: max - max % multiple,
            native,
        }
    }

    /// `params` over the checkpoint's recommended settings, each checked (ranges, the
    /// scheduler's step count, the size rule), then the request's cost against the budget.
    pub fn generate_options(
        &self,
        params: &GenerateParams,
        budget: &GenerateBudget,
    ) -> Result<GenerateOptions, OptionError> {
        let int = |name: &'static str, v: u64, lo: u64, hi: u64| {
            if v < lo || v > hi {
                Err(refuse(
                    name,
                    format!("`{name}` = {v} is out of range [{lo}, {hi}]"),
                ))
            } else {
                Ok(v as usize)
            }
        };
        let real = |name: &'static str, v: f64, lo: f64, hi: f64| {
            if !v.is_finite() || v < lo || v > hi {
                Err(refuse(
                    name,
                    format!("`{name}` = {v} is out of range [{lo}, {hi}]"),
                ))
            } else {
                Ok(v)
            }
        };
        let mut opts = self.generate_defaults.clone();
        if let Some(n) = params.n {
            opts.n = int("n", n, 1, budget.max_n)?;
        }
        if let Some(s) = params.seed {
            opts.seed = s;
        }
        let rule = self.size_rule(budget.max_image_side);
        let (w, h) = params.size.unwrap_or(self.default_size);
        for (name, v) in [("width", w), ("height", h)] {
            let m = rule.multiple;
            if v < m || v > rule.max || v % m != 0 {
                return Err(refuse(
                    "size",
                    format!(
                        "`size` {name} {v} must be a multiple of {m} in [{m}, {}] (this \
                         model's native side is {}; at most twice that, and at most \
                         server.max_image_side)",
                        rule.max, rule.native
                    ),
                ));
            }
        }
        (opts.width, opts.height) = (w, h);
        if let Some(g) = params.guidance {
            opts.guidance = real("guidance", g, 0.0, budget.max_guidance)?;
        }
        if let Some(g) = params.llm_guidance {
            opts.llm_guidance = real("llm_guidance", g, 0.0, budget.max_guidance)?;
        }
        if let Some(s) = params.steps {
            if s > self.max_steps as u64 {
                return Err(refuse(
                    "steps",
                    format!(
                        "`steps` = {s}: this model's scheduler takes at most {} steps",
                        self.max_steps
                    ),
                ));
            }
            opts.steps = int("steps", s, 1, budget.max_steps)?;
        }
        if let Some(k) = params.top_k {
            opts.top_k = k;
        }
        if let Some(t) = params.temperature {
            opts.temperature = real("temperature", t, 1e-3, 100.0)?;
        }
        if let Some(p) = params.top_p {
            opts.top_p = real("top_p", p, 1e-6, 1.0)?;
        }
        if let Some(n) = params.max_tokens {
            opts.max_tokens = Some(int("max_tokens", n as u64, 1, u32::MAX as u64)?);
        }
        if let Some(n) = params.min_tokens {
            opts.min_tokens = Some(int("min_tokens", n as u64, 0, u32::MAX as u64)?);
        }
        let cost = generation_cost(&opts, rule.native);
        if cost > budget.max_request_cost {
            return Err(OptionError {
                param: None,
                message: format!(
                    "this request costs {cost:.1} (n × steps × width×height / native² = {} × \
                     {} × {}x{} / {}²), over the per-request budget server.max_request_cost = \
                     {}; ask for fewer images, fewer steps or a smaller size",
                    opts.n,
                    opts.steps,
                    opts.width,
                    opts.height,
                    rule.native,
                    budget.max_request_cost
                ),
            });
        }
        Ok(opts)
    }
}

impl ModelInfo {
    /// [`ModelInfo::generate_options`] for a synthesis request (image parts in the prompt):
    /// its LLM guidance defaults to the checkpoint's synthesis guidance
    /// ([`super::SynthesisInfo::llm_guidance`], official 5.0) instead of text → image's.
    pub fn synthesis_options(
        &self,
        params: &GenerateParams,
        budget: &GenerateBudget,
    ) -> Result<GenerateOptions, OptionError> {
        let params = GenerateParams {
            llm_guidance: params.llm_guidance.or(Some(self.synthesis.llm_guidance)),
            ..params.clone()
        };
        self.generate_options(&params, budget)
    }
}

/// The cost of a generation request in native-image diffusion steps:
/// `n × steps × (width × height) / native²`. The diffusion loop dominates a generation (the
/// LLM part, `n` sequences of at most the manifest's `t2i_max_new_tokens`, is bounded by
/// `max_n` and the model); `max_request_cost` caps this number per request.
pub fn generation_cost(opts: &GenerateOptions, native: usize) -> f64 {
    let area = (opts.width as f64 * opts.height as f64) / (native as f64 * native as f64);
    opts.n as f64 * opts.steps as f64 * area
}
