//! `llm.quantization`: how a checkpoint's LLM weights are quantised (int8 / int4).

use super::*;

/// `llm.quantization` of a manifest: how the LLM's linear layers are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationManifest {
    /// `int8` (per-output-channel scales) or `int4` (group-wise scales and zeros).
    pub mode: String,
    /// Input features per int4 group (32, 64 or 128); absent for int8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
}

/// Weight-only quantisation of the LLM's linear layers (q/k/v/o, gate/up/down; the
/// embeddings and the vocabulary head stay float).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMode {
    /// Float weights.
    #[default]
    None,
    /// int8 weights with one scale per output channel (`_weight_int8pack_mm`).
    Int8,
    /// int4 weights with a scale and a zero per `group_size` input features of each output
    /// channel (`_weight_int4pack_mm`).
    Int4 { group_size: i64 },
}

/// The int4 group sizes accepted (the packed kernels take 32 to 256).
pub const INT4_GROUP_SIZES: [i64; 3] = [32, 64, 128];

impl QuantMode {
    /// `mode` (`none`, `int8`, `int4`) with the int4 `group_size`; the error says which of
    /// the two is wrong (`Err((is_group_size, message))`).
    pub fn parse(mode: &str, group_size: Option<i64>) -> std::result::Result<Self, (bool, String)> {
        match mode {
            "none" => Ok(QuantMode::None),
            "int8" => Ok(QuantMode::Int8),
            "int4" => {
                let g = group_size.unwrap_or(128);
                if INT4_GROUP_SIZES.contains(&g) {
                    Ok(QuantMode::Int4 { group_size: g })
                } else {
                    Err((
                        true,
                        format!("int4 group size {g} is not one of {INT4_GROUP_SIZES:?}"),
                    ))
                }
            }
            other => Err((false, format!("`{other}` is not one of none, int8, int4"))),
        }
    }

    /// `none`, `int8` or `int4`.
    pub fn name(&self) -> &'static str {
        match self {
            QuantMode::None => "none",
            QuantMode::Int8 => "int8",
            QuantMode::Int4 { .. } => "int4",
        }
    }

    pub fn is_none(&self) -> bool {
        *self == QuantMode::None
    }

    /// The manifest record of a folder stored in this mode (None for float weights).
    pub fn manifest(&self) -> Option<QuantizationManifest> {
        match *self {
            QuantMode::None => None,
            QuantMode::Int8 => Some(QuantizationManifest {
                mode: "int8".into(),
                group_size: None,
            }),
            QuantMode::Int4 { group_size } => Some(QuantizationManifest {
                mode: "int4".into(),
                group_size: Some(group_size),
            }),
        }
    }
}

impl std::fmt::Display for QuantMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantMode::Int4 { group_size } => write!(f, "int4 (group size {group_size})"),
            other => f.write_str(other.name()),
        }
    }
}
