//! What the core speaks: a frame to judge, the judgement it gets, and what
//! the server says about its model. Every wire protocol converts to and from
//! these types at its edge (`crate::wire`), so the pipeline, the engine and
//! scoring never see a generated protocol type, and a second protocol is one
//! more edge module.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::FrameError;
use crate::model::card::InputSpec;
use crate::score::Scoring;

/// One image to judge, with what the client sent along with it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrameRequest {
    /// The client's name for the frame, echoed in the judgement.
    pub id: String,
    /// The image; `None` when the client sent none (a per-frame error).
    pub image: Option<ImageInput>,
    /// Caller attributes (camera id, timestamp, ...), echoed untouched.
    pub attributes: HashMap<String, String>,
    /// Per-frame scoring the client asked for, within the server's bounds.
    pub scoring: Option<ScoringRequest>,
    /// The frame's own W3C trace context, when it carries one.
    pub trace: TraceFields,
    /// When the answer stops being useful to the client: a frame still
    /// waiting at that moment is refused instead of computed.
    pub deadline: Option<Instant>,
}

/// An image in one of the forms a client may send.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageInput {
    /// An encoded JPEG or PNG file.
    Encoded(Vec<u8>),
    /// Raw 8-bit pixels.
    Raw(RawPixels),
    /// An already normalized float tensor in the model's input shape.
    Tensor(TensorInput),
}

/// Raw 8-bit pixels, row-major, height × width × channels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawPixels {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// 1 (gray), 3 (RGB) or 4 (RGBA).
    pub channels: u32,
    /// Exactly `width * height * channels` bytes.
    pub pixels: Vec<u8>,
}

/// A dense float tensor, NCHW with N = 1, or CHW.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorInput {
    /// The tensor's shape.
    pub shape: Vec<u32>,
    /// Its values, row-major.
    pub data: Vec<f32>,
}

/// Per-frame scoring asked for by a client; unset fields keep the server's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoringRequest {
    /// A method name ("msp", "odin", ...); checked by the pipeline, which
    /// answers an unknown one with a per-frame error.
    pub method: Option<String>,
    /// Softmax temperature T.
    pub temperature: Option<f32>,
    /// Perturbation size ε, in [0, 1] pixel units.
    pub epsilon: Option<f32>,
    /// Decision threshold for this frame.
    pub threshold: Option<f32>,
}

/// W3C trace context fields (empty when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceFields {
    /// `traceparent`.
    pub traceparent: String,
    /// `tracestate`.
    pub tracestate: String,
}

/// The scoring that produced (or would have produced) a judgement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AppliedScoring {
    /// Method, temperature and ε.
    pub scoring: Scoring,
    /// Decision threshold δ: in-distribution iff score ≥ δ.
    pub threshold: f32,
}

/// What the model and the detector concluded about one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Higher means more in-distribution, for every method.
    pub score: f32,
    /// `score >= threshold`.
    pub in_distribution: bool,
    /// The classifier's prediction (argmax of the unperturbed logits).
    pub predicted_class: usize,
    /// The card's label for `predicted_class` (empty if unnamed).
    pub label: String,
    /// Max softmax probability at T = 1 of the unperturbed input.
    pub max_softmax: f32,
    /// The unperturbed logits.
    pub logits: Vec<f32>,
}

/// Where one frame's time went. Stages the frame never reached stay zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Decoding and preprocessing (waiting for a decoder included).
    pub decode: Duration,
    /// Waiting for an engine worker, batching included.
    pub queue: Duration,
    /// The engine run of the batch that carried the frame.
    pub inference: Duration,
    /// From arrival to the judgement being ready.
    pub total: Duration,
}

/// The answer for one frame: a decision, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The request's `id`.
    pub frame_id: String,
    /// The request's attributes, echoed.
    pub attributes: HashMap<String, String>,
    /// The scoring in force; `None` when the frame's own override was invalid.
    pub scoring: Option<AppliedScoring>,
    /// The decision, or the frame's error.
    pub outcome: Result<Decision, FrameError>,
    /// Where the time went.
    pub timings: Timings,
    /// Which model and calibration judged it.
    pub versions: Versions,
}

/// Which model and which calibration are (or were) in force. They change on
/// a live reload; every judgement says which it got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Versions {
    /// The card's version and the start of the model file's SHA-256.
    pub model: Arc<str>,
    /// The start of the calibration's SHA-256, or "flags".
    pub calibration: Arc<str>,
}

/// What is being served: what a client needs to prepare frames and read
/// judgements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// Model name from its card.
    pub name: String,
    /// Model version from its card.
    pub version: String,
    /// The model's input tensor name.
    pub input_name: String,
    /// Its declared shape; -1 marks a dynamic axis.
    pub input_shape: Vec<i64>,
    /// Always "NCHW" for now.
    pub input_layout: String,
    /// Class labels, in logit order.
    pub labels: Vec<String>,
    /// How encoded and raw frames become the input tensor.
    pub preprocessing: InputSpec,
    /// The ONNX Runtime execution provider the engines run on.
    pub execution_provider: String,
    /// How frames are scored.
    pub scoring: ScoringInfo,
    /// The model and calibration versions.
    pub versions: Versions,
}

/// How frames are scored and thresholded, and what they may override.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoringInfo {
    /// Method name.
    pub method: String,
    /// Temperature T.
    pub temperature: f32,
    /// Effective ε (zero for methods that do not perturb).
    pub epsilon: f32,
    /// Decision threshold δ.
    pub threshold: f32,
    /// Where the threshold came from: "flag", or a calibration file.
    pub threshold_source: String,
    /// Smallest temperature a frame may ask for.
    pub min_temperature: f32,
    /// Largest temperature a frame may ask for.
    pub max_temperature: f32,
    /// Largest ε a frame may ask for.
    pub max_epsilon: f32,
    /// Whether the gradient graph is loaded, so ODIN can be asked for.
    pub perturbation_available: bool,
    /// The detector in full (a combination's parts, weights and inputs).
    pub detector: String,
    /// The fit statistics loaded: file name, start of the SHA-256, and
    /// whether their training features were perturbed.
    pub fit_stats: Vec<String>,
    /// The penultimate features' dimension D; 0 when not tapped.
    pub feature_dim: u32,
}
