//! LLaMA configuration as Hugging Face stores it in `config.json`
//! (reference: transformers `models/llama/configuration_llama.py`).

use std::path::Path;

use lavit_runtime::{Error, Result};
use serde::Deserialize;

/// `rope_parameters` of newer transformers versions (`rope_theta` moved inside it).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RopeParameters {
    /// Base of the rotary frequencies.
    pub rope_theta: Option<f64>,
    /// Only `default` is supported (LLaMA-2).
    pub rope_type: Option<String>,
}

/// The fields of HF `LlamaConfig` the model needs. Unknown keys are ignored (HF writes many).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Rows of `embed_tokens` and `lm_head` (text + [IMG] + [/IMG] + visual ids for LaVIT).
    pub vocab_size: i64,
    /// Residual stream width.
    pub hidden_size: i64,
    /// MLP inner width.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention); `None` = `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Width of one head; `None` = hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<i64>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (older transformers).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE settings (newer transformers).
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest sequence the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    /// Bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation (only `silu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> i64 {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl Default for LlamaConfig {
    /// HF `LlamaConfig()` defaults (LLaMA-7B shapes, vocab 32000).
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10000.0),
            rope_parameters: None,
            tie_word_embeddings: false,
            max_position_embeddings: 2048,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }
}

impl LlamaConfig {
    /// LLaMA-2-7B with LaVIT's extended vocabulary (`vocab_size` = 48386 for LaVIT-7B-v2).
    pub fn llama2_7b(vocab_size: i64) -> Self {
        Self {
            vocab_size,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            ..Self::default()
        }
    }

    /// A CPU-sized LLaMA for tests and demos.
    pub fn tiny(vocab_size: i64) -> Self {
        Self {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 172,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-5,
            max_position_embeddings: 1024,
            ..Self::default()
        }
    }

    /// Read a HF `config.json`, validated.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = lavit_runtime::fsread::read_config(path)?;
        let c: Self = serde_json::from_str(&text)
            .map_err(|e| Error::config(path.display().to_string(), "-", e.to_string()))?;
        c.validate(&path.display().to_string())?;
        Ok(c)
    }

    /// Check sizes before anything is allocated from them: positive, under the caps of
    /// [`lavit_runtime::manifest::caps`] (width, depth, vocabulary), heads dividing widths;
    /// errors name the file (`origin`), the key and the bad value.
    pub fn validate(&self, origin: &str) -> Result<()> {
        use lavit_runtime::manifest::caps::{MAX_DEPTH, MAX_VOCAB, MAX_WIDTH};
        /// Longest context accepted (LLaMA-2: 4096; long-context variants: 128k).
        const MAX_CONTEXT: i64 = 1 << 20;
        for (k, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_DEPTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("num_key_value_heads", self.kv_heads(), MAX_WIDTH),
            ("head_dim", self.head_dim(), MAX_WIDTH),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
        ] {
            if v <= 0 || v > max {
                return Err(Error::config(
                    origin,
                    k,
                    format!("must be in 1..={max}, got {v}"),
                ));
            }
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                origin,
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {} (and no head_dim is given)",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        // q/k/v widths: heads × head_dim, each under the width cap.
        if self.num_attention_heads * self.head_dim() > 4 * MAX_WIDTH {
            return Err(Error::config(
                origin,
                "head_dim",
                format!(
                    "{} heads × head_dim {} is over the cap of {}",
                    self.num_attention_heads,
                    self.head_dim(),
                    4 * MAX_WIDTH
                ),
            ));
        }
        for (k, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id {
                if !(0..self.vocab_size).contains(&id) {
                    return Err(Error::config(
                        origin,
                        k,
                        format!("id {id} is outside the vocabulary 0..{}", self.vocab_size),
                    ));
                }
            }
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(Error::config(
                origin,
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.num_attention_heads,
                    self.kv_heads()
                ),
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(Error::config(
                origin,
                "head_dim",
                format!("RoPE needs an even head_dim, got {}", self.head_dim()),
            ));
        }
        if self.hidden_act != "silu" {
            return Err(Error::config(
                origin,
                "hidden_act",
                format!("only `silu` is supported, got `{}`", self.hidden_act),
            ));
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.clone())
        {
            if t != "default" {
                return Err(Error::config(
                    origin,
                    "rope_parameters.rope_type",
                    format!("only `default` RoPE is supported, got `{t}`"),
                ));
            }
        }
        let theta_ok = self.rope_theta().is_finite() && self.rope_theta() > 0.0;
        let eps_ok = self.rms_norm_eps.is_finite() && (0.0..1.0).contains(&self.rms_norm_eps);
        if !(theta_ok && eps_ok) {
            return Err(Error::config(
                origin,
                "rope_theta/rms_norm_eps",
                format!("bad values {} / {}", self.rope_theta(), self.rms_norm_eps),
            ));
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// `rope_parameters.rope_theta`, else `rope_theta`, else 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }
}
