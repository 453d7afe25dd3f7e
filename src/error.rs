//! Errors of the request path, and the one table that maps them to what a
//! client sees: a gRPC code and a stable reason for a per-frame error inside
//! a verdict (`FrameError`), or a gRPC `Status` for a whole call
//! (`CallError`).
//!
//! Stages return these typed errors; only this module decides codes and
//! reasons. Every protocol edge uses the same table.

use tonic::{Code, Status};

use crate::engine::EngineError;

/// Why one frame could not be judged. The stream it came on goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// The frame had no image at all, or an empty one.
    #[error("frame has no image: set one of `encoded`, `raw` or `tensor` with non-empty content")]
    Empty,
    /// The encoded bytes are not a JPEG or PNG the decoder accepts.
    #[error("cannot decode image ({format}): {detail}")]
    Decode {
        /// The format that was guessed from the bytes, or the sniffed name of a format that is not accepted.
        format: String,
        /// The decoder's own message.
        detail: String,
    },
    /// The image is not the model's size and the card forbids resizing.
    #[error("image is {width}x{height} but the model takes {want_width}x{want_height} and resizing is off (resize = \"none\")")]
    SizeMismatch {
        /// Width of the frame.
        width: u32,
        /// Height of the frame.
        height: u32,
        /// Width the model takes.
        want_width: u32,
        /// Height the model takes.
        want_height: u32,
    },
    /// The image is larger than the decoder is allowed to allocate (known
    /// from its header, before anything is allocated).
    #[error("image is {width}x{height}; the limits are {max_side} pixels per side and {max_pixels} pixels in all")]
    TooLarge {
        /// Width of the frame.
        width: u32,
        /// Height of the frame.
        height: u32,
        /// The largest side accepted.
        max_side: u32,
        /// The most pixels accepted.
        max_pixels: u64,
    },
    /// A raw frame's byte count does not match its stated dimensions.
    #[error("raw frame has {got} bytes but {width}x{height}x{channels} needs {want}")]
    RawLength {
        /// Bytes received.
        got: usize,
        /// Bytes `width * height * channels` requires.
        want: usize,
        /// Stated width.
        width: u32,
        /// Stated height.
        height: u32,
        /// Stated channel count.
        channels: u32,
    },
    /// A raw frame with a channel count other than 1, 3 or 4.
    #[error("raw frame has {0} channels; 1 (gray), 3 (RGB) or 4 (RGBA) are accepted")]
    Channels(u32),
    /// A tensor frame whose shape is not the model's input shape.
    #[error("tensor shape {got:?} does not match the model input [1, {c}, {h}, {w}] (or [{c}, {h}, {w}])", c = want[0], h = want[1], w = want[2])]
    TensorShape {
        /// Shape received.
        got: Vec<u32>,
        /// The model's C, H, W.
        want: [usize; 3],
    },
    /// A tensor frame whose data length does not match its shape.
    #[error("tensor has {got} values but its shape {shape:?} needs {want}")]
    TensorLength {
        /// Values received.
        got: usize,
        /// Values the shape requires.
        want: usize,
        /// The stated shape.
        shape: Vec<u32>,
    },
    /// A tensor frame value outside what the model's normalization can
    /// produce from pixels (with margin): garbage the model would still
    /// answer confidently.
    #[error("tensor value at flat index {index} is {value}; values must lie in [{min}, {max}] (what the card's normalization makes of pixels in [0, 255], with margin)")]
    ValueOutOfRange {
        /// Flat index of the first bad value.
        index: usize,
        /// The value found there.
        value: f32,
        /// Smallest accepted value.
        min: f32,
        /// Largest accepted value.
        max: f32,
    },
    /// A field besides the image is larger than its cap.
    #[error("{field} is {size} (limit {max})")]
    FieldTooLarge {
        /// Which field: "frame_id (bytes)", "attributes (count)", ...
        field: &'static str,
        /// Its size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// The frame's deadline passed before it reached the engine; it was
    /// not computed.
    #[error("the deadline passed before the frame reached the engine; it was not computed")]
    DeadlineExceeded,
    /// A tensor frame holding NaN or infinity.
    #[error("tensor value at flat index {index} is {value}; only finite values are accepted")]
    NonFinite {
        /// Flat index of the first bad value.
        index: usize,
        /// The value found there.
        value: f32,
    },
    /// A per-frame scoring override names an unknown method.
    #[error(
        "unknown scoring method {0:?} in the frame's override: use msp, odin, energy, maxlogit, gen, knn, vim, mds, rmds, react, fdbd or combined"
    )]
    UnknownMethod(String),
    /// A per-frame scoring override is outside the configured bounds.
    #[error("override {field} = {value} is outside the allowed range [{min}, {max}]")]
    OverrideOutOfBounds {
        /// "temperature", "epsilon" or "threshold".
        field: &'static str,
        /// The value asked for.
        value: f32,
        /// Smallest allowed value.
        min: f32,
        /// Largest allowed value.
        max: f32,
    },
    /// The frame asks for a perturbation but no gradient graph is loaded.
    #[error(
        "method {0} with epsilon > 0 needs the gradient graph, which this server did not load"
    )]
    PerturbationUnavailable(String),
    /// The frame asks for a detector this server cannot run: no feature
    /// taps, no fit statistics (or none with that KNN k, ViM D or ReAct
    /// percentile), or a combination at another T or ε.
    #[error("detector unavailable: {0}")]
    DetectorUnavailable(String),
    /// The engine failed on the batch that carried this frame.
    #[error("inference failed: {0}")]
    Engine(EngineError),
    /// A bug or a panic inside the server while handling this frame.
    #[error("internal error: {0}")]
    Internal(String),
    /// The engine is gone: the server is shutting down.
    #[error("the engine is shutting down")]
    Unavailable,
}

/// The stable, machine-readable name of a per-frame error, for client
/// dashboards and the `odin_frame_errors_total{reason}` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// See [`FrameError::Empty`].
    EmptyFrame,
    /// See [`FrameError::Decode`].
    DecodeFailed,
    /// See [`FrameError::SizeMismatch`].
    SizeMismatch,
    /// See [`FrameError::TooLarge`].
    ImageTooLarge,
    /// See [`FrameError::RawLength`].
    RawLengthMismatch,
    /// See [`FrameError::Channels`].
    UnsupportedChannels,
    /// See [`FrameError::TensorShape`].
    TensorShapeMismatch,
    /// See [`FrameError::TensorLength`].
    TensorLengthMismatch,
    /// See [`FrameError::NonFinite`].
    NonFiniteValue,
    /// See [`FrameError::ValueOutOfRange`].
    ValueOutOfRange,
    /// See [`FrameError::FieldTooLarge`].
    FieldTooLarge,
    /// See [`FrameError::DeadlineExceeded`].
    DeadlineExceeded,
    /// See [`FrameError::UnknownMethod`].
    UnknownMethod,
    /// See [`FrameError::OverrideOutOfBounds`].
    OverrideOutOfBounds,
    /// See [`FrameError::PerturbationUnavailable`].
    PerturbationUnavailable,
    /// See [`FrameError::DetectorUnavailable`].
    DetectorUnavailable,
    /// See [`FrameError::Engine`].
    EngineFailed,
    /// See [`FrameError::Internal`].
    Internal,
    /// See [`FrameError::Unavailable`].
    Unavailable,
}

impl Reason {
    /// Every reason, in a fixed order (the metric's series order).
    pub const ALL: [Reason; 19] = [
        Reason::EmptyFrame,
        Reason::DecodeFailed,
        Reason::SizeMismatch,
        Reason::ImageTooLarge,
        Reason::RawLengthMismatch,
        Reason::UnsupportedChannels,
        Reason::TensorShapeMismatch,
        Reason::TensorLengthMismatch,
        Reason::NonFiniteValue,
        Reason::ValueOutOfRange,
        Reason::FieldTooLarge,
        Reason::DeadlineExceeded,
        Reason::UnknownMethod,
        Reason::OverrideOutOfBounds,
        Reason::PerturbationUnavailable,
        Reason::DetectorUnavailable,
        Reason::EngineFailed,
        Reason::Internal,
        Reason::Unavailable,
    ];

    /// The reason's name on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::EmptyFrame => "EMPTY_FRAME",
            Reason::DecodeFailed => "DECODE_FAILED",
            Reason::SizeMismatch => "SIZE_MISMATCH",
            Reason::ImageTooLarge => "IMAGE_TOO_LARGE",
            Reason::RawLengthMismatch => "RAW_LENGTH_MISMATCH",
            Reason::UnsupportedChannels => "UNSUPPORTED_CHANNELS",
            Reason::TensorShapeMismatch => "TENSOR_SHAPE_MISMATCH",
            Reason::TensorLengthMismatch => "TENSOR_LENGTH_MISMATCH",
            Reason::NonFiniteValue => "NON_FINITE_VALUE",
            Reason::ValueOutOfRange => "VALUE_OUT_OF_RANGE",
            Reason::FieldTooLarge => "FIELD_TOO_LARGE",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::UnknownMethod => "UNKNOWN_METHOD",
            Reason::OverrideOutOfBounds => "OVERRIDE_OUT_OF_BOUNDS",
            Reason::PerturbationUnavailable => "PERTURBATION_UNAVAILABLE",
            Reason::DetectorUnavailable => "DETECTOR_UNAVAILABLE",
            Reason::EngineFailed => "ENGINE_FAILED",
            Reason::Internal => "INTERNAL",
            Reason::Unavailable => "UNAVAILABLE",
        }
    }

    /// The gRPC status code a frame with this reason reports.
    pub fn code(self) -> Code {
        match self {
            Reason::EngineFailed | Reason::Internal => Code::Internal,
            Reason::Unavailable => Code::Unavailable,
            Reason::PerturbationUnavailable | Reason::DetectorUnavailable => {
                Code::FailedPrecondition
            }
            Reason::DeadlineExceeded => Code::DeadlineExceeded,
            Reason::EmptyFrame
            | Reason::DecodeFailed
            | Reason::SizeMismatch
            | Reason::ImageTooLarge
            | Reason::RawLengthMismatch
            | Reason::UnsupportedChannels
            | Reason::TensorShapeMismatch
            | Reason::TensorLengthMismatch
            | Reason::NonFiniteValue
            | Reason::ValueOutOfRange
            | Reason::FieldTooLarge
            | Reason::UnknownMethod
            | Reason::OverrideOutOfBounds => Code::InvalidArgument,
        }
    }

    /// The position of this reason in [`Reason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl FrameError {
    /// Why this frame failed, as a stable reason.
    pub fn reason(&self) -> Reason {
        match self {
            FrameError::Empty => Reason::EmptyFrame,
            FrameError::Decode { .. } => Reason::DecodeFailed,
            FrameError::SizeMismatch { .. } => Reason::SizeMismatch,
            FrameError::TooLarge { .. } => Reason::ImageTooLarge,
            FrameError::RawLength { .. } => Reason::RawLengthMismatch,
            FrameError::Channels(_) => Reason::UnsupportedChannels,
            FrameError::TensorShape { .. } => Reason::TensorShapeMismatch,
            FrameError::TensorLength { .. } => Reason::TensorLengthMismatch,
            FrameError::NonFinite { .. } => Reason::NonFiniteValue,
            FrameError::ValueOutOfRange { .. } => Reason::ValueOutOfRange,
            FrameError::FieldTooLarge { .. } => Reason::FieldTooLarge,
            FrameError::DeadlineExceeded => Reason::DeadlineExceeded,
            FrameError::UnknownMethod(_) => Reason::UnknownMethod,
            FrameError::OverrideOutOfBounds { .. } => Reason::OverrideOutOfBounds,
            FrameError::PerturbationUnavailable(_) => Reason::PerturbationUnavailable,
            FrameError::DetectorUnavailable(_) => Reason::DetectorUnavailable,
            FrameError::Engine(_) => Reason::EngineFailed,
            FrameError::Internal(_) => Reason::Internal,
            FrameError::Unavailable => Reason::Unavailable,
        }
    }

    /// The gRPC status code this error maps to.
    pub fn code(&self) -> Code {
        self.reason().code()
    }
}

impl From<FrameError> for Status {
    fn from(error: FrameError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

/// Why a whole call (not one frame) is refused or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Too many unary calls are in flight: shed, so a burst cannot queue
    /// without bound behind the engine.
    #[error("too many unary calls (DetectOne, ModelInfer) in flight (limit {limit}); retry with backoff or use a stream (Detect, ModelStreamInfer)")]
    Overloaded {
        /// The configured limit.
        limit: usize,
    },
    /// The frames held by the server fill its memory budget.
    #[error("the server holds {budget_mib} MiB of frames, its memory budget; retry with backoff")]
    MemoryBudget {
        /// The budget, in MiB.
        budget_mib: usize,
    },
    /// The server is shutting down: no new calls, and open streams end
    /// once their accepted frames are answered.
    #[error("the server is shutting down; reconnect to another replica")]
    ShuttingDown,
    /// The call lacks the bearer token, or it is wrong.
    #[error("missing or invalid bearer token (send `authorization: Bearer <token>`)")]
    Unauthenticated,
}

impl From<CallError> for Status {
    fn from(error: CallError) -> Self {
        let code = match error {
            CallError::Overloaded { .. } | CallError::MemoryBudget { .. } => {
                Code::ResourceExhausted
            }
            CallError::ShuttingDown => Code::Unavailable,
            CallError::Unauthenticated => Code::Unauthenticated,
        };
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every variant, so the table can be checked whole.
    fn one_of_each() -> Vec<FrameError> {
        vec![
            FrameError::Empty,
            FrameError::Decode {
                format: "Jpeg".into(),
                detail: "x".into(),
            },
            FrameError::SizeMismatch {
                width: 1,
                height: 1,
                want_width: 2,
                want_height: 2,
            },
            FrameError::TooLarge {
                width: 9000,
                height: 1,
                max_side: 8192,
                max_pixels: 1 << 24,
            },
            FrameError::RawLength {
                got: 1,
                want: 2,
                width: 1,
                height: 1,
                channels: 2,
            },
            FrameError::Channels(2),
            FrameError::TensorShape {
                got: vec![1],
                want: [3, 2, 2],
            },
            FrameError::TensorLength {
                got: 1,
                want: 2,
                shape: vec![2],
            },
            FrameError::NonFinite {
                index: 0,
                value: f32::NAN,
            },
            FrameError::ValueOutOfRange {
                index: 0,
                value: 1e30,
                min: -3.0,
                max: 3.0,
            },
            FrameError::FieldTooLarge {
                field: "frame_id (bytes)",
                size: 1000,
                max: 256,
            },
            FrameError::DeadlineExceeded,
            FrameError::UnknownMethod("x".into()),
            FrameError::OverrideOutOfBounds {
                field: "temperature",
                value: 0.0,
                min: 1.0,
                max: 2.0,
            },
            FrameError::PerturbationUnavailable("odin".into()),
            FrameError::DetectorUnavailable("knn(k=50): no fit statistics".into()),
            FrameError::Engine(EngineError::Model("x".into())),
            FrameError::Internal("x".into()),
            FrameError::Unavailable,
        ]
    }

    /// Does not compile once `FrameError` gains a variant, until it is
    /// named here: the reminder to add it to [`one_of_each`], which the
    /// test below checks against `Reason::ALL`.
    #[allow(dead_code)]
    fn named_in_one_of_each(error: &FrameError) {
        match error {
            FrameError::Empty
            | FrameError::Decode { .. }
            | FrameError::SizeMismatch { .. }
            | FrameError::TooLarge { .. }
            | FrameError::RawLength { .. }
            | FrameError::Channels(_)
            | FrameError::TensorShape { .. }
            | FrameError::TensorLength { .. }
            | FrameError::NonFinite { .. }
            | FrameError::ValueOutOfRange { .. }
            | FrameError::FieldTooLarge { .. }
            | FrameError::DeadlineExceeded
            | FrameError::UnknownMethod(_)
            | FrameError::OverrideOutOfBounds { .. }
            | FrameError::PerturbationUnavailable(_)
            | FrameError::DetectorUnavailable(_)
            | FrameError::Engine(_)
            | FrameError::Internal(_)
            | FrameError::Unavailable => {}
        }
    }

    /// Does not compile once `Reason` gains a variant, until it is named
    /// here: the reminder to add it to `Reason::ALL`.
    #[allow(dead_code)]
    fn named_in_all(reason: Reason) {
        match reason {
            Reason::EmptyFrame
            | Reason::DecodeFailed
            | Reason::SizeMismatch
            | Reason::ImageTooLarge
            | Reason::RawLengthMismatch
            | Reason::UnsupportedChannels
            | Reason::TensorShapeMismatch
            | Reason::TensorLengthMismatch
            | Reason::NonFiniteValue
            | Reason::ValueOutOfRange
            | Reason::FieldTooLarge
            | Reason::DeadlineExceeded
            | Reason::UnknownMethod
            | Reason::OverrideOutOfBounds
            | Reason::PerturbationUnavailable
            | Reason::DetectorUnavailable
            | Reason::EngineFailed
            | Reason::Internal
            | Reason::Unavailable => {}
        }
    }

    #[test]
    fn bad_input_is_invalid_argument_and_engine_failure_is_internal() {
        assert_eq!(FrameError::Empty.code(), Code::InvalidArgument);
        assert_eq!(FrameError::Channels(2).code(), Code::InvalidArgument);
        assert_eq!(
            FrameError::Engine(EngineError::Model("x".into())).code(),
            Code::Internal
        );
        assert_eq!(FrameError::Internal("x".into()).code(), Code::Internal);
        assert_eq!(FrameError::Unavailable.code(), Code::Unavailable);
        assert_eq!(
            FrameError::PerturbationUnavailable("odin".into()).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            FrameError::DetectorUnavailable("knn".into()).code(),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn every_variant_has_its_own_reason_and_every_reason_is_listed_once() {
        let errors = one_of_each();
        let reasons: Vec<Reason> = errors.iter().map(FrameError::reason).collect();
        assert_eq!(
            reasons,
            Reason::ALL,
            "one variant per reason, in ALL's order"
        );
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let names: std::collections::HashSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len(), "names are distinct");
    }

    #[test]
    fn an_overloaded_call_is_resource_exhausted() {
        let status = Status::from(CallError::Overloaded { limit: 4 });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().contains("limit 4"), "{}", status.message());
    }
}
