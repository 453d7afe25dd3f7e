//! The classifier being served: its ONNX bytes and its card.
//!
//! `serve` without `--model` uses the small CIFAR-10 CNN compiled into the
//! binary, so a fresh machine has something real to serve.

pub mod card;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use card::{ChannelOrder, ModelCard, Resize};

/// The default model's ONNX bytes, trained by `scripts/train-default-model.sh`.
pub const DEFAULT_MODEL_ONNX: &[u8] = include_bytes!("../../models/cifar10_cnn.onnx");
/// The default model's card.
pub const DEFAULT_MODEL_CARD: &str = include_str!("../../models/cifar10_cnn.card.json");
/// The default model's calibration (`calibrate` output), used by `serve`
/// when no scoring flags are given.
pub const DEFAULT_MODEL_CALIBRATION: &str =
    include_str!("../../models/cifar10_cnn.calibration.json");

/// The first 4 bytes (8 hex digits) of the SHA-256 of `bytes`: a short,
/// stable version tag for a model or calibration file.
pub fn short_digest(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The full SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// The CIFAR-10 CNN compiled into the binary.
    Embedded,
    /// An ONNX file; its card is given or found beside it.
    File {
        /// The `.onnx` file.
        model: PathBuf,
        /// The card; `None` looks for `NAME.card.json` beside the model.
        card: Option<PathBuf>,
    },
}

/// A model loaded into memory with its card.
#[derive(Debug, Clone)]
pub struct Model {
    /// The ONNX protobuf bytes; shared by every engine worker.
    pub onnx: Arc<[u8]>,
    /// Preprocessing, labels and provenance.
    pub card: ModelCard,
}

/// Why a model or its card could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The card is not valid JSON for the card schema.
    #[error("model card {path} is invalid: {detail}")]
    Card {
        /// The card file (or "<embedded>").
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No card was given and none lies beside the model.
    #[error("no model card for {model}: pass --card or create {expected}")]
    NoCard {
        /// The model file.
        model: PathBuf,
        /// Where the card was looked for.
        expected: PathBuf,
    },
}

impl Model {
    /// Loads the model and card named by `source`.
    pub fn load(source: &ModelSource) -> Result<Model, ModelError> {
        match source {
            ModelSource::Embedded => Ok(Model {
                onnx: Arc::from(DEFAULT_MODEL_ONNX),
                card: ModelCard::parse(DEFAULT_MODEL_CARD, Path::new("<embedded>"))?,
            }),
            ModelSource::File { model, card } => {
                let onnx = std::fs::read(model).map_err(|source| ModelError::Read {
                    path: model.clone(),
                    source,
                })?;
                let card_path = match card {
                    Some(path) => path.clone(),
                    None => {
                        let expected = card::path_beside(model);
                        if !expected.exists() {
                            return Err(ModelError::NoCard {
                                model: model.clone(),
                                expected,
                            });
                        }
                        expected
                    }
                };
                Ok(Model {
                    onnx: Arc::from(onnx),
                    card: ModelCard::load(&card_path)?,
                })
            }
        }
    }
}
