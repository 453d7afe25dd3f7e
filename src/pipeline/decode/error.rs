//! The typed errors of the fast decode path.

use super::ImageFormat;

/// Everything that can go wrong while probing, decoding or resizing a frame.
///
/// Every variant is about the *input* (or the caller's arguments); none is a
/// bug in this module, so callers can map them all to "bad frame" responses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input holds no bytes (or no pixels).
    #[error("empty image")]
    Empty,

    /// The encoded input is larger than [`Limits::max_input_bytes`](super::Limits::max_input_bytes).
    #[error("encoded image is {len} bytes, more than the {max} allowed")]
    InputTooLarge {
        /// Bytes received.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// The bytes start with neither the JPEG nor the PNG signature; `seen`
    /// names a format we recognise but do not decode (GIF, WebP, ...), so a
    /// client learns what it actually sent.
    #[error("{seen} image: only JPEG and PNG are accepted")]
    UnknownFormat {
        /// The sniffed format, or "unrecognised".
        seen: &'static str,
    },

    /// The header (markers, chunk layout, frame header) is malformed.
    #[error("malformed {format} header: {detail}")]
    Header {
        /// Which format the signature announced.
        format: ImageFormat,
        /// What is wrong.
        detail: String,
    },

    /// A well-formed image that uses a feature this path does not decode
    /// (12-bit or lossless or arithmetic-coded JPEG, 2-component JPEG, ...).
    #[error("unsupported {format} image: {detail}")]
    Unsupported {
        /// The image's format.
        format: ImageFormat,
        /// The feature that is not supported.
        detail: String,
    },

    /// The declared width or height is zero.
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSize {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
    },

    /// A declared side exceeds [`Limits::max_side`](super::Limits::max_side).
    #[error("image is {width}x{height}; the largest side allowed is {max_side}")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The limit.
        max_side: u32,
    },

    /// The declared pixel count exceeds [`Limits::max_pixels`](super::Limits::max_pixels).
    /// Checked on the size the header declares, never on a reduced decode size.
    #[error("image is {width}x{height} = {pixels} pixels; at most {max} allowed")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// The limit.
        max: u64,
    },

    /// The decoder's working memory for this image (estimated from the header
    /// before anything is allocated) exceeds [`Limits::max_alloc_bytes`](super::Limits::max_alloc_bytes).
    #[error("decoding needs about {bytes} bytes of memory; at most {max} allowed")]
    AllocTooLarge {
        /// Estimated bytes.
        bytes: u64,
        /// The limit.
        max: u64,
    },

    /// The compressed data is far too short for the declared size: the file is
    /// truncated, or its header lies about the size. Refused before decoding.
    #[error(
        "{format} data is implausibly short for {width}x{height}: \
         {got} bytes of image data, at least {min} needed"
    )]
    Truncated {
        /// The image's format.
        format: ImageFormat,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Bytes of (entropy-coded / compressed) image data present.
        got: u64,
        /// Smallest byte count any complete image of that size can have.
        min: u64,
    },

    /// The decoder rejected the data (corrupt or truncated entropy-coded data,
    /// bad Huffman tables, CRC errors, a libjpeg-turbo warning, ...).
    #[error("corrupt {format} data: {detail}")]
    Corrupt {
        /// The image's format.
        format: ImageFormat,
        /// The decoder's message.
        detail: String,
    },

    /// The requested output size is zero or larger than the pixel budget.
    #[error("invalid output size {width}x{height}")]
    BadTarget {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },

    /// Raw pixels: the channel count is not 1, 3 or 4.
    #[error("raw image has {0} channels; 1, 3 or 4 are accepted")]
    RawChannels(u8),

    /// Raw pixels: the buffer length does not match `width * height * channels`.
    #[error("raw image is {got} bytes; {width}x{height}x{channels} needs {want}")]
    RawLength {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: u64,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Declared channels.
        channels: u8,
    },

    /// The resizer refused its arguments. Not expected for valid sizes; kept
    /// as an error rather than a panic.
    #[error("resize failed: {0}")]
    Resize(String),
}
