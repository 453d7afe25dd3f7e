//! The model card: a small JSON file beside the model that says how frames
//! become its input (size, resize, channel order, mean/std), what its classes
//! are called, and default ODIN settings.
//!
//! ```json
//! { "name": "cifar10_cnn", "version": "1",
//!   "input": { "height": 32, "width": 32, "channels": 3, "channel_order": "RGB",
//!              "resize": "bilinear", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26] },
//!   "labels": ["airplane", "..."],
//!   "odin": { "temperature": 1000.0, "epsilon": 0.0014 } }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Everything the sidecar needs to know about a model besides its graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// Model name, reported in `GetModelInfo`.
    pub name: String,
    /// Model version, reported in `GetModelInfo`.
    #[serde(default)]
    pub version: String,
    /// How frames are turned into the input tensor.
    pub input: InputSpec,
    /// Class names in logit order; may be empty.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Default ODIN temperature and perturbation size for this model.
    #[serde(default)]
    pub odin: OdinDefaults,
    /// The tensor holding the penultimate features (the input of the final
    /// Gemm/MatMul, or a tensor that reaches it through Flatten/Reshape),
    /// when graph analysis should not pick it (see `grad::taps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<String>,
    /// Free-form notes on where the model came from; not interpreted.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub provenance: serde_json::Value,
}

/// Input geometry and normalization: `x = (pixel / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input height in pixels.
    pub height: u32,
    /// Input width in pixels.
    pub width: u32,
    /// 1 or 3.
    pub channels: u32,
    /// Channel order the model expects.
    #[serde(default)]
    pub channel_order: ChannelOrder,
    /// What to do with frames of another size.
    #[serde(default)]
    pub resize: Resize,
    /// Per-channel mean, in [0, 1] pixel units.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, in [0, 1] pixel units.
    pub std: Vec<f32>,
}

/// Channel order of the model's input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelOrder {
    /// Red, green, blue (what decoders produce).
    #[default]
    RGB,
    /// Blue, green, red (OpenCV-trained models).
    BGR,
}

impl ChannelOrder {
    /// The name used in the card and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelOrder::RGB => "RGB",
            ChannelOrder::BGR => "BGR",
        }
    }
}

/// Resizing policy for frames whose size differs from the model's: the
/// filter, or none. Both filters run on the DCT-scaled decode of a large
/// JPEG (at least 4× the model input on both sides), never on more pixels
/// than that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Antialiased bilinear (a triangle kernel whose support grows with the
    /// downscale factor, as Pillow's `BILINEAR` and the `image` crate's
    /// `Triangle`); plain bilinear interpolation when enlarging. The default.
    #[default]
    Bilinear,
    /// Area average (OpenCV's `INTER_AREA`): each output pixel is the exact
    /// mean of the source area under it, fractional edge pixels weighted by
    /// coverage. What a box-filtered downscale (e.g. a training set made
    /// with a 2×2 box filter) looks like; when enlarging, each output pixel
    /// blends the one or two source pixels under it.
    Area,
    /// Reject frames of another size: a camera sending the wrong resolution
    /// is a misconfiguration worth surfacing.
    None,
}

impl Resize {
    /// The name used in the card and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Resize::Bilinear => "bilinear",
            Resize::Area => "area",
            Resize::None => "none",
        }
    }
}

impl std::str::FromStr for Resize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bilinear" => Ok(Resize::Bilinear),
            "area" => Ok(Resize::Area),
            "none" => Ok(Resize::None),
            _ => Err(format!("unknown resize {s:?}: use bilinear, area or none")),
        }
    }
}

/// Default ODIN parameters (the paper's CIFAR settings unless the card says otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OdinDefaults {
    /// Softmax temperature T.
    pub temperature: f32,
    /// Perturbation size ε in [0, 1] pixel units.
    pub epsilon: f32,
}

impl Default for OdinDefaults {
    fn default() -> Self {
        OdinDefaults {
            temperature: 1000.0,
            epsilon: 0.0014,
        }
    }
}

/// `models/foo.onnx` → `models/foo.card.json`.
pub fn path_beside(model: &Path) -> PathBuf {
    model.with_extension("card.json")
}

impl ModelCard {
    /// Reads and validates a card file.
    pub fn load(path: &Path) -> Result<ModelCard, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ModelCard::parse(&text, path)
    }

    /// Parses and validates card JSON; `path` only names the card in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ModelCard, ModelError> {
        let invalid = |detail: String| ModelError::Card {
            path: path.to_path_buf(),
            detail,
        };
        let card: ModelCard = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        card.validate().map_err(invalid)?;
        Ok(card)
    }

    fn validate(&self) -> Result<(), String> {
        let input = &self.input;
        if !matches!(input.channels, 1 | 3) {
            return Err(format!(
                "input.channels is {}; 1 or 3 are supported",
                input.channels
            ));
        }
        if input.height == 0 || input.width == 0 {
            return Err("input.height and input.width must be positive".into());
        }
        let c = input.channels as usize;
        if input.mean.len() != c || input.std.len() != c {
            return Err(format!(
                "input.mean and input.std need {c} values each, found {} and {}",
                input.mean.len(),
                input.std.len()
            ));
        }
        if let Some(s) = input.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(format!(
                "input.std values must be positive and finite, found {s}"
            ));
        }
        if !(self.odin.temperature > 0.0 && self.odin.epsilon >= 0.0) {
            return Err("odin.temperature must be > 0 and odin.epsilon >= 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CARD: &str = r#"{"name":"m","input":{"height":32,"width":32,"channels":3,
        "mean":[0.5,0.5,0.5],"std":[0.25,0.25,0.25]},"labels":["a","b"]}"#;

    #[test]
    fn defaults_fill_optional_fields() {
        let card = ModelCard::parse(CARD, Path::new("x")).expect("valid");
        assert_eq!(card.input.resize, Resize::Bilinear);
        assert_eq!(card.input.channel_order, ChannelOrder::RGB);
        assert_eq!(card.odin, OdinDefaults::default());
    }

    #[test]
    fn resize_names_parse_in_lowercase() {
        for (name, want) in [
            ("bilinear", Resize::Bilinear),
            ("area", Resize::Area),
            ("none", Resize::None),
        ] {
            let card = CARD.replace(
                r#""channels":3,"#,
                &format!(r#""channels":3,"resize":"{name}","#),
            );
            let parsed = ModelCard::parse(&card, Path::new("x")).expect("valid");
            assert_eq!(parsed.input.resize, want);
            assert_eq!(want.as_str(), name);
            assert_eq!(name.parse::<Resize>(), Ok(want));
        }
        let bad = CARD.replace(r#""channels":3,"#, r#""channels":3,"resize":"Area","#);
        assert!(ModelCard::parse(&bad, Path::new("x")).is_err());
    }

    #[test]
    fn wrong_std_length_names_the_problem() {
        let bad = CARD.replace("[0.25,0.25,0.25]", "[0.25]");
        let err = ModelCard::parse(&bad, Path::new("card.json")).unwrap_err();
        assert!(err.to_string().contains("need 3 values each"), "{err}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let bad = CARD.replace(r#""labels""#, r#""lables""#);
        assert!(ModelCard::parse(&bad, Path::new("x")).is_err());
    }

    #[test]
    fn embedded_card_is_valid() {
        ModelCard::parse(crate::model::DEFAULT_MODEL_CARD, Path::new("<embedded>")).expect("valid");
    }

    #[test]
    fn card_path_sits_beside_the_model() {
        assert_eq!(
            path_beside(Path::new("m/foo.onnx")),
            PathBuf::from("m/foo.card.json")
        );
    }
}
