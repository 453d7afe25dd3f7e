//! Errors of the request path, and the one place where they become wire
//! errors: a per-frame `FrameError` inside a verdict, or a gRPC `Status`.
//!
//! Stages return `FrameError`; only this module decides which gRPC code and
//! which stable `reason` string a client sees for each of them.

use tonic::{Code, Status};

use crate::wire;

/// Why one frame could not be judged. The stream it came on goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// The frame had no image at all, or an empty one.
    #[error("frame has no image: set one of `encoded`, `raw` or `tensor` with non-empty content")]
    Empty,
    /// The encoded bytes are not a JPEG or PNG the decoder accepts.
    #[error("cannot decode image ({format}): {detail}")]
    Decode {
        /// The format that was guessed from the bytes, or "unknown".
        format: String,
        /// The decoder's own message.
        detail: String,
    },
    /// The image is not the model's size and the card forbids resizing.
    #[error("image is {width}x{height} but the model takes {want_width}x{want_height} and its card sets resize = \"none\"")]
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
    /// The image is larger than the decoder is allowed to allocate.
    #[error("image is {width}x{height}; the limit is {max} pixels per side")]
    TooLarge {
        /// Width of the frame.
        width: u32,
        /// Height of the frame.
        height: u32,
        /// The largest side accepted.
        max: u32,
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
        "unknown scoring method {0:?} in the frame's override: use msp, odin, energy or maxlogit"
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
    /// The engine failed on the batch that carried this frame.
    #[error("inference failed: {0}")]
    Engine(String),
    /// The engine is gone: the server is shutting down.
    #[error("the engine is shutting down")]
    Unavailable,
}

impl FrameError {
    /// Every `reason()` there is, so metrics can keep one counter each
    /// without a map on the request path. Keep in step with `reason()`.
    pub const REASONS: [&'static str; 14] = [
        "EMPTY_FRAME",
        "DECODE_FAILED",
        "SIZE_MISMATCH",
        "IMAGE_TOO_LARGE",
        "RAW_LENGTH_MISMATCH",
        "UNSUPPORTED_CHANNELS",
        "TENSOR_SHAPE_MISMATCH",
        "TENSOR_LENGTH_MISMATCH",
        "NON_FINITE_VALUE",
        "UNKNOWN_METHOD",
        "OVERRIDE_OUT_OF_BOUNDS",
        "PERTURBATION_UNAVAILABLE",
        "ENGINE_FAILED",
        "UNAVAILABLE",
    ];

    /// The gRPC status code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            FrameError::Engine(_) => Code::Internal,
            FrameError::Unavailable => Code::Unavailable,
            FrameError::PerturbationUnavailable(_) => Code::FailedPrecondition,
            _ => Code::InvalidArgument,
        }
    }

    /// A stable, machine-readable name for the error, for client dashboards.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Empty => "EMPTY_FRAME",
            FrameError::Decode { .. } => "DECODE_FAILED",
            FrameError::SizeMismatch { .. } => "SIZE_MISMATCH",
            FrameError::TooLarge { .. } => "IMAGE_TOO_LARGE",
            FrameError::RawLength { .. } => "RAW_LENGTH_MISMATCH",
            FrameError::Channels(_) => "UNSUPPORTED_CHANNELS",
            FrameError::TensorShape { .. } => "TENSOR_SHAPE_MISMATCH",
            FrameError::TensorLength { .. } => "TENSOR_LENGTH_MISMATCH",
            FrameError::NonFinite { .. } => "NON_FINITE_VALUE",
            FrameError::UnknownMethod(_) => "UNKNOWN_METHOD",
            FrameError::OverrideOutOfBounds { .. } => "OVERRIDE_OUT_OF_BOUNDS",
            FrameError::PerturbationUnavailable(_) => "PERTURBATION_UNAVAILABLE",
            FrameError::Engine(_) => "ENGINE_FAILED",
            FrameError::Unavailable => "UNAVAILABLE",
        }
    }
}

impl From<&FrameError> for wire::FrameError {
    fn from(error: &FrameError) -> Self {
        wire::FrameError {
            code: error.code() as i32,
            reason: error.reason().to_string(),
            message: error.to_string(),
        }
    }
}

impl From<FrameError> for Status {
    fn from(error: FrameError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_invalid_argument_and_engine_failure_is_internal() {
        assert_eq!(FrameError::Empty.code(), Code::InvalidArgument);
        assert_eq!(FrameError::Channels(2).code(), Code::InvalidArgument);
        assert_eq!(FrameError::Engine("x".into()).code(), Code::Internal);
        let wire = wire::FrameError::from(&FrameError::Channels(2));
        assert_eq!(wire.code, 3);
        assert_eq!(wire.reason, "UNSUPPORTED_CHANNELS");
        assert!(wire.message.contains("2 channels"));
    }

    #[test]
    fn every_reason_is_listed() {
        for error in [
            FrameError::Empty,
            FrameError::Channels(2),
            FrameError::UnknownMethod("x".into()),
            FrameError::PerturbationUnavailable("odin".into()),
            FrameError::Engine("x".into()),
            FrameError::Unavailable,
        ] {
            assert!(FrameError::REASONS.contains(&error.reason()));
        }
    }
}
