//! Decode stage: turns a frame's image (encoded JPEG/PNG, raw u8 pixels, or a
//! ready f32 tensor) into the model's normalized CHW input, following the
//! model card. Every way a frame can be wrong is a specific `FrameError`
//! (see [`frame_error`], the one place decoder errors are mapped).
//!
//! The codec ([`codec`] and its parts) decodes straight to the model's input
//! size: the header first, checked against the limits on its *declared*
//! size; JPEG at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps the image
//! at least 4× the model input on both sides, with libjpeg-turbo when the
//! build found it (`tjdecode`), else the pure-Rust jpeg-decoder; PNG with
//! the `png` crate under explicit limits; then the card's resize filter in
//! integer arithmetic (`fast_image_resize` for bilinear, an exact area
//! average for area). [`legacy`] keeps the old full-resolution path of the
//! `image` crate, selectable (`--decode legacy`) only to measure fidelity
//! against it.

mod area;
pub mod codec;
#[cfg(test)]
mod codec_tests;
mod error;
mod header;
mod jpeg;
pub mod legacy;
mod png;
mod resize;

use std::borrow::Cow;

pub use codec::{
    decode_resized, decode_resized_with, jpeg_scale, probe, resize_raw, Filter, Header,
    ImageFormat, JpegBackend, JpegOptions, Limits, Rgb8Image,
};
pub use error::DecodeError;

use crate::domain::{ImageInput, RawPixels, TensorInput};
use crate::error::FrameError;
use crate::model::card::{ChannelOrder, InputSpec, Resize};

/// Largest accepted side of a decoded image: bounds the decoder's allocation
/// so one hostile frame cannot exhaust memory.
pub const MAX_SIDE: u32 = 8192;

/// Bytes of decoder working memory allowed per decoded pixel of the pixel
/// budget: 8 is 16-bit RGBA, the widest either format decodes to. The
/// budget's own check (on the declared size) comes first; this one bounds
/// what the declared size makes a decoder allocate (e.g. the full-size
/// coefficient buffers of a progressive JPEG, even at a 1/8 scale).
pub const ALLOC_BYTES_PER_PIXEL: u64 = 8;

/// Budget for buffered PNG ancillary chunks (`eXIf`, ...); text and ICC
/// chunks are skipped unread.
pub const MAX_METADATA_BYTES: usize = 1 << 20;

/// What a frame may make the decoder do, checked from the header before
/// anything is allocated, and what a tensor frame may hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLimits {
    /// Most pixels of a decoded image (width × height), on the size its
    /// header declares: a reduced-scale decode is no way around it.
    pub max_pixels: u64,
    /// Accepted range of tensor-frame values; `None` derives it from the
    /// card (see [`Preprocessor::with_limits`]).
    pub tensor_range: Option<(f32, f32)>,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: crate::config::DEFAULT_MAX_PIXELS,
            tensor_range: None,
        }
    }
}

/// Which decoder turns encoded and raw frames into the model's pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DecodePath {
    /// The codec: header-first checks, DCT-scaled JPEG, integer resize.
    #[default]
    Fast,
    /// The `image` crate at full resolution, then its f32 `Triangle` filter
    /// (`bilinear`) or the exact area average at full resolution (`area`):
    /// the path before the camera work, kept only to measure fidelity
    /// against (`--decode legacy`). Same size checks, several times slower
    /// on camera frames.
    Legacy,
}

impl DecodePath {
    /// The name used by `--decode`.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodePath::Fast => "fast",
            DecodePath::Legacy => "legacy",
        }
    }
}

impl std::str::FromStr for DecodePath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fast" => Ok(DecodePath::Fast),
            "legacy" => Ok(DecodePath::Legacy),
            _ => Err(format!("unknown decode path {s:?}: use fast or legacy")),
        }
    }
}

/// How frames are decoded, besides the limits: the path and, for the
/// fidelity comparisons, a resize filter that replaces the card's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// The decoder.
    pub path: DecodePath,
    /// Replaces the card's `resize` when set.
    pub resize: Option<Resize>,
    /// JPEG backend and DCT-scale choice of the fast path.
    pub jpeg: Option<JpegOptions>,
}

/// Says how this build decodes JPEG, once at start-up: a warning naming the
/// fix when libjpeg-turbo was not found at build time.
pub fn log_backend() {
    if tjdecode::AVAILABLE {
        tracing::info!(
            jpeg = JpegBackend::Turbo.as_str(),
            library = tjdecode::found_at().unwrap_or("system"),
            "JPEG decoder"
        );
    } else {
        tracing::warn!(
            "built without libjpeg-turbo: JPEG frames are decoded by the pure-Rust jpeg-decoder, \
             about 2x slower on camera frames. Fix: install libturbojpeg0-dev \
             (scripts/setup.sh does with apt-get when it can), then rebuild"
        );
    }
}

/// Largest image, in pixels, that [`Preprocessor::is_light`] decodes in
/// place: 128×128, a tenth of a millisecond to decode and resize.
pub const LIGHT_PIXELS: usize = 128 * 128;

/// Largest encoded image [`Preprocessor::is_light`] decodes in place.
pub const LIGHT_BYTES: usize = 64 * 1024;

/// Per-model preprocessing, built once from the card.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: InputSpec,
    // 1 / (255 * std) and mean / std, so the per-pixel work is one fused multiply-add.
    scale: Vec<f32>,
    shift: Vec<f32>,
    max_pixels: u64,
    range: (f32, f32),
    resize: Resize,
    path: DecodePath,
    limits: Limits,
    jpeg: JpegOptions,
}

impl Preprocessor {
    /// Builds the preprocessor for a card's input spec, with default limits.
    pub fn new(spec: &InputSpec) -> Preprocessor {
        Preprocessor::with_limits(spec, DecodeLimits::default())
    }

    /// Builds the preprocessor for a card's input spec. Without a configured
    /// tensor range, the accepted range is what the card's normalization
    /// makes of pixels in [0, 255], widened by one std-normalized unit on
    /// each side, so noise around valid inputs passes and garbage (1e30)
    /// does not.
    pub fn with_limits(spec: &InputSpec, limits: DecodeLimits) -> Preprocessor {
        Preprocessor::with_options(spec, limits, DecodeOptions::default())
    }

    /// [`Preprocessor::with_limits`] with a decode path, a resize filter
    /// replacing the card's, or JPEG options.
    pub fn with_options(
        spec: &InputSpec,
        limits: DecodeLimits,
        options: DecodeOptions,
    ) -> Preprocessor {
        let scale: Vec<f32> = spec.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let shift: Vec<f32> = spec
            .mean
            .iter()
            .zip(&spec.std)
            .map(|(m, s)| m / s)
            .collect();
        let range = limits.tensor_range.unwrap_or_else(|| {
            let lowest = shift.iter().map(|s| -s).fold(f32::INFINITY, f32::min);
            let highest = scale
                .iter()
                .zip(&shift)
                .map(|(k, s)| 255.0 * k - s)
                .fold(f32::NEG_INFINITY, f32::max);
            (lowest - 1.0, highest + 1.0)
        });
        Preprocessor {
            spec: spec.clone(),
            scale,
            shift,
            max_pixels: limits.max_pixels,
            range,
            resize: options.resize.unwrap_or(spec.resize),
            path: options.path,
            limits: Limits {
                max_input_bytes: crate::config::MAX_MESSAGE_BYTES,
                max_side: MAX_SIDE,
                max_pixels: limits.max_pixels,
                max_alloc_bytes: limits.max_pixels.saturating_mul(ALLOC_BYTES_PER_PIXEL),
                max_metadata_bytes: MAX_METADATA_BYTES,
            },
            jpeg: options.jpeg.unwrap_or_default(),
        }
    }

    /// The accepted range of tensor-frame values.
    pub fn tensor_range(&self) -> (f32, f32) {
        self.range
    }

    /// The resize policy in force (the card's, unless replaced).
    pub fn resize(&self) -> Resize {
        self.resize
    }

    /// The decode path in force.
    pub fn path(&self) -> DecodePath {
        self.path
    }

    /// The JPEG options of the fast path.
    pub fn jpeg_options(&self) -> JpegOptions {
        self.jpeg
    }

    /// The model's input size, width × height.
    pub fn input_size(&self) -> (u32, u32) {
        (self.spec.width, self.spec.height)
    }

    /// Number of f32 values in one input tensor (C × H × W).
    pub fn tensor_len(&self) -> usize {
        (self.spec.channels * self.spec.height * self.spec.width) as usize
    }

    /// The model's input as [C, H, W].
    pub fn chw(&self) -> [usize; 3] {
        [
            self.spec.channels as usize,
            self.spec.height as usize,
            self.spec.width as usize,
        ]
    }

    /// Whether `image` is so small that decoding it costs less than handing
    /// it to a decoder thread (tens of microseconds): a tensor or raw frame
    /// of at most [`LIGHT_PIXELS`], or an encoded image of at most
    /// [`LIGHT_BYTES`] whose header declares at most that many pixels. Such
    /// frames are decoded where they arrive; on a busy machine the thread
    /// handoff alone waits milliseconds for a core.
    pub fn is_light(&self, image: Option<&ImageInput>) -> bool {
        match image {
            None => true,
            Some(ImageInput::Tensor(t)) => t.data.len() <= 3 * LIGHT_PIXELS,
            Some(ImageInput::Raw(raw)) => {
                u64::from(raw.width) * u64::from(raw.height) <= LIGHT_PIXELS as u64
            }
            Some(ImageInput::Encoded(bytes)) => {
                bytes.len() <= LIGHT_BYTES
                    && codec::probe(bytes).map_or(true, |h| {
                        u64::from(h.width) * u64::from(h.height) <= LIGHT_PIXELS as u64
                    })
            }
        }
    }

    /// Decodes and normalizes one frame's image into a CHW tensor.
    pub fn tensor(&self, image: Option<&ImageInput>) -> Result<Vec<f32>, FrameError> {
        match image {
            None => Err(FrameError::Empty),
            Some(ImageInput::Encoded(bytes)) if bytes.is_empty() => Err(FrameError::Empty),
            Some(ImageInput::Encoded(bytes)) => Ok(self.normalize(&self.pixels(bytes)?)),
            Some(ImageInput::Raw(raw)) => Ok(self.normalize(&self.raw_pixels(raw)?)),
            Some(ImageInput::Tensor(tensor)) => self.checked_tensor(tensor),
        }
    }

    /// Decodes JPEG or PNG bytes to the model's size as RGB8 (HWC), after
    /// checking the declared size: what [`Preprocessor::tensor`] normalizes.
    pub fn pixels(&self, bytes: &[u8]) -> Result<Vec<u8>, FrameError> {
        if bytes.is_empty() {
            return Err(FrameError::Empty);
        }
        let header = probe(bytes).map_err(|e| frame_error(e, None, &self.limits))?;
        self.check_size(header.width, header.height)?;
        let (w, h) = (self.spec.width, self.spec.height);
        match self.path {
            DecodePath::Fast => {
                decode_resized_with(bytes, w, h, self.filter(), &self.limits, &self.jpeg)
                    .map(Rgb8Image::into_raw)
                    .map_err(|e| frame_error(e, Some(&header), &self.limits))
            }
            DecodePath::Legacy => legacy::decode(bytes, &header, w, h, self.filter(), &self.limits),
        }
    }

    /// The filter of the resize policy (`none` only ever resizes to the
    /// same size, which is no resize).
    fn filter(&self) -> Filter {
        match self.resize {
            Resize::Area => Filter::Area,
            Resize::Bilinear | Resize::None => Filter::Bilinear,
        }
    }

    /// HWC RGB8 at the model's size → CHW f32, `(p / 255 - mean) / std`, in
    /// the card's channel order (or luma for a one-channel model).
    fn normalize(&self, rgb: &[u8]) -> Vec<f32> {
        let plane = rgb.len() / 3;
        if self.spec.channels == 1 {
            let (scale, shift) = (self.scale[0], self.shift[0]);
            return rgb
                .chunks_exact(3)
                .map(|p| f32::from(luma(p)) * scale - shift)
                .collect();
        }
        let mut out = vec![0.0; rgb.len()];
        for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
            let source = match self.spec.channel_order {
                ChannelOrder::RGB => c,
                ChannelOrder::BGR => 2 - c,
            };
            let (scale, shift) = (self.scale[c], self.shift[c]);
            for (d, p) in dst.iter_mut().zip(rgb.iter().skip(source).step_by(3)) {
                *d = f32::from(*p) * scale - shift;
            }
        }
        out
    }

    fn checked_tensor(&self, tensor: &TensorInput) -> Result<Vec<f32>, FrameError> {
        let chw = self.chw();
        let dims: Vec<usize> = tensor.shape.iter().map(|d| *d as usize).collect();
        let shape_ok = dims == chw || (dims.len() == 4 && dims[0] == 1 && dims[1..] == chw);
        if !shape_ok {
            return Err(FrameError::TensorShape {
                got: tensor.shape.clone(),
                want: chw,
            });
        }
        if tensor.data.len() != self.tensor_len() {
            return Err(FrameError::TensorLength {
                got: tensor.data.len(),
                want: self.tensor_len(),
                shape: tensor.shape.clone(),
            });
        }
        if let Some(index) = tensor.data.iter().position(|v| !v.is_finite()) {
            return Err(FrameError::NonFinite {
                index,
                value: tensor.data[index],
            });
        }
        let (min, max) = self.range;
        if let Some(index) = tensor.data.iter().position(|v| *v < min || *v > max) {
            return Err(FrameError::ValueOutOfRange {
                index,
                value: tensor.data[index],
                min,
                max,
            });
        }
        Ok(tensor.data.clone())
    }

    /// Refuses, from its declared size alone, an image larger than the
    /// limits or, with `"resize": "none"`, of the wrong size.
    fn check_size(&self, width: u32, height: u32) -> Result<(), FrameError> {
        let pixels = u64::from(width) * u64::from(height);
        if width > MAX_SIDE || height > MAX_SIDE || pixels > self.max_pixels {
            return Err(FrameError::TooLarge {
                width,
                height,
                max_side: MAX_SIDE,
                max_pixels: self.max_pixels,
            });
        }
        let (w, h) = (self.spec.width, self.spec.height);
        if self.resize == Resize::None && (width, height) != (w, h) {
            return Err(FrameError::SizeMismatch {
                width,
                height,
                want_width: w,
                want_height: h,
            });
        }
        Ok(())
    }

    /// Raw HWC pixels at the model's size as RGB8, after checking the byte
    /// count and the size. RGB at the model's size is borrowed, not copied.
    fn raw_pixels<'a>(&self, raw: &'a RawPixels) -> Result<Cow<'a, [u8]>, FrameError> {
        let RawPixels {
            width,
            height,
            channels,
            pixels,
        } = raw;
        if pixels.is_empty() {
            return Err(FrameError::Empty);
        }
        if !matches!(channels, 1 | 3 | 4) {
            return Err(FrameError::Channels(*channels));
        }
        // Checked: a header can claim sizes whose product overflows (a
        // length no buffer can have, so the frame is refused as such).
        let want = (*width as usize)
            .checked_mul(*height as usize)
            .and_then(|v| v.checked_mul(*channels as usize))
            .unwrap_or(usize::MAX);
        if pixels.len() != want || want == 0 {
            return Err(FrameError::RawLength {
                got: pixels.len(),
                want,
                width: *width,
                height: *height,
                channels: *channels,
            });
        }
        self.check_size(*width, *height)?;
        let (w, h) = (self.spec.width, self.spec.height);
        let c = *channels as u8;
        match self.path {
            DecodePath::Fast => resize_raw(
                pixels,
                *width,
                *height,
                c,
                w,
                h,
                self.filter(),
                &self.limits,
            )
            .map_err(|e| frame_error(e, None, &self.limits)),
            DecodePath::Legacy => {
                legacy::resize_raw(pixels, *width, *height, c, w, h, self.filter()).map(Cow::Owned)
            }
        }
    }
}

/// ITU-R BT.709 luma in integers, as the `image` crate computes it (so gray
/// models see what they saw before): gray replicated to RGB stays itself.
fn luma(p: &[u8]) -> u8 {
    let l = 2126 * u32::from(p[0]) + 7152 * u32::from(p[1]) + 722 * u32::from(p[2]);
    (l / 10_000) as u8
}

/// The one table from decoder errors to per-frame errors: size and budget
/// refusals from the header are `IMAGE_TOO_LARGE`, raw-frame mistakes their
/// own reasons, everything the data itself gets wrong `DECODE_FAILED` with
/// the decoder's words, and what cannot happen for a valid card `INTERNAL`.
/// `header`, when known, names the format of a decoder failure; `limits`
/// are the ones the codec was given.
pub fn frame_error(error: DecodeError, header: Option<&Header>, limits: &Limits) -> FrameError {
    let format = |f: ImageFormat| f.to_string();
    let named = header.map_or_else(|| "unknown".to_string(), |h| format(h.format));
    match error {
        DecodeError::Empty => FrameError::Empty,
        DecodeError::TooLarge { width, height, .. }
        | DecodeError::TooManyPixels { width, height, .. } => FrameError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
            max_pixels: limits.max_pixels,
        },
        DecodeError::RawChannels(c) => FrameError::Channels(u32::from(c)),
        DecodeError::RawLength {
            got,
            want,
            width,
            height,
            channels,
        } => FrameError::RawLength {
            got,
            want: usize::try_from(want).unwrap_or(usize::MAX),
            width,
            height,
            channels: u32::from(channels),
        },
        DecodeError::BadTarget { width, height } => FrameError::Internal(format!(
            "the model input {width}x{height} is not a valid output size"
        )),
        DecodeError::Resize(detail) => FrameError::Internal(format!("resize failed: {detail}")),
        DecodeError::UnknownFormat { seen } => FrameError::Decode {
            format: seen.into(),
            detail: "only JPEG and PNG are accepted".into(),
        },
        DecodeError::Header { format: f, .. }
        | DecodeError::Unsupported { format: f, .. }
        | DecodeError::Truncated { format: f, .. }
        | DecodeError::Corrupt { format: f, .. } => FrameError::Decode {
            format: format(f),
            detail: error.to_string(),
        },
        DecodeError::InputTooLarge { .. }
        | DecodeError::ZeroSize { .. }
        | DecodeError::AllocTooLarge { .. } => FrameError::Decode {
            format: named,
            detail: error.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resize: Resize, order: ChannelOrder) -> InputSpec {
        InputSpec {
            height: 2,
            width: 2,
            channels: 3,
            channel_order: order,
            resize,
            mean: vec![0.5, 0.25, 0.0],
            std: vec![0.5, 0.25, 1.0],
        }
    }

    fn raw(width: u32, height: u32, channels: u32, pixels: Vec<u8>) -> ImageInput {
        ImageInput::Raw(RawPixels {
            width,
            height,
            channels,
            pixels,
        })
    }

    #[test]
    fn raw_rgb_is_normalized_into_chw() {
        let pre = Preprocessor::new(&spec(Resize::None, ChannelOrder::RGB));
        // Four pixels: (255,0,0) (0,255,0) (0,0,255) (255,255,255).
        let px = vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
        let t = pre.tensor(Some(&raw(2, 2, 3, px))).expect("valid");
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&t[0..4], &[1.0, -1.0, -1.0, 1.0]), "{t:?}");
        assert!(close(&t[4..8], &[-1.0, 3.0, -1.0, 3.0]), "{t:?}");
        assert!(close(&t[8..12], &[0.0, 0.0, 1.0, 1.0]), "{t:?}");
    }

    #[test]
    fn bgr_swaps_the_first_and_last_planes() {
        let mut s = spec(Resize::None, ChannelOrder::BGR);
        s.mean = vec![0.0; 3];
        s.std = vec![1.0; 3];
        let pre = Preprocessor::new(&s);
        let t = pre
            .tensor(Some(&raw(2, 2, 3, [255, 0, 0].repeat(4))))
            .expect("valid");
        assert_eq!(&t[0..4], &[0.0; 4]);
        assert_eq!(&t[8..12], &[1.0; 4]);
    }

    #[test]
    fn other_sizes_are_resized_or_rejected_per_card() {
        let big = raw(4, 4, 3, vec![128; 48]);
        let pre = Preprocessor::new(&spec(Resize::Bilinear, ChannelOrder::RGB));
        assert_eq!(pre.tensor(Some(&big)).expect("resized").len(), 12);
        let strict = Preprocessor::new(&spec(Resize::None, ChannelOrder::RGB));
        assert!(matches!(
            strict.tensor(Some(&big)),
            Err(FrameError::SizeMismatch { width: 4, .. })
        ));
    }

    #[test]
    fn each_bad_frame_gets_its_own_error() {
        let pre = Preprocessor::new(&spec(Resize::Bilinear, ChannelOrder::RGB));
        assert_eq!(pre.tensor(None), Err(FrameError::Empty));
        assert_eq!(
            pre.tensor(Some(&ImageInput::Encoded(vec![]))),
            Err(FrameError::Empty)
        );
        assert!(matches!(
            pre.tensor(Some(&raw(2, 2, 3, vec![0; 11]))),
            Err(FrameError::RawLength {
                got: 11,
                want: 12,
                ..
            })
        ));
        assert_eq!(
            pre.tensor(Some(&raw(2, 2, 2, vec![0; 8]))),
            Err(FrameError::Channels(2))
        );
        let garbage = ImageInput::Encoded(b"\xff\xd8\xff\xe0 not really a jpeg".to_vec());
        assert!(matches!(
            pre.tensor(Some(&garbage)),
            Err(FrameError::Decode { .. })
        ));
        let tensor =
            |shape: Vec<u32>, data: Vec<f32>| ImageInput::Tensor(TensorInput { shape, data });
        assert!(matches!(
            pre.tensor(Some(&tensor(vec![1, 3, 2, 3], vec![0.0; 18]))),
            Err(FrameError::TensorShape { .. })
        ));
        assert!(matches!(
            pre.tensor(Some(&tensor(vec![3, 2, 2], vec![0.0; 5]))),
            Err(FrameError::TensorLength { got: 5, .. })
        ));
        let mut data = vec![0.0; 12];
        data[7] = f32::NAN;
        assert!(matches!(
            pre.tensor(Some(&tensor(vec![1, 3, 2, 2], data))),
            Err(FrameError::NonFinite { index: 7, .. })
        ));
    }

    #[test]
    fn png_round_trips_to_the_same_tensor_as_raw() {
        let pre = Preprocessor::new(&spec(Resize::None, ChannelOrder::RGB));
        let px: Vec<u8> = (0..12).map(|i| (i * 20) as u8).collect();
        let mut png = Vec::new();
        image::RgbImage::from_raw(2, 2, px.clone())
            .expect("size")
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encodes");
        let from_png = pre
            .tensor(Some(&ImageInput::Encoded(png)))
            .expect("decodes");
        assert_eq!(
            from_png,
            pre.tensor(Some(&raw(2, 2, 3, px))).expect("valid")
        );
    }

    /// A camera-like RGB scene: gradients and soft blobs.
    fn scene(w: u32, h: u32) -> Vec<u8> {
        let mut v = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                let blob = ((fx * 9.0).sin() * (fy * 7.0).cos() * 60.0) as i32;
                v.push(((40.0 + 180.0 * fx) as i32 + blob).clamp(0, 255) as u8);
                v.push(((200.0 - 150.0 * fy) as i32 - blob / 2).clamp(0, 255) as u8);
                v.push(((90.0 + 80.0 * fx * fy) as i32 + blob / 3).clamp(0, 255) as u8);
            }
        }
        v
    }

    fn jpeg(px: &[u8], w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
            .encode(px, w, h, image::ExtendedColorType::Rgb8)
            .expect("encodes");
        out
    }

    /// Overwrites the size in a JPEG's SOF0 segment.
    fn claim_size(mut bytes: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
        let at = bytes
            .windows(2)
            .position(|m| m == [0xFF, 0xC0])
            .expect("SOF0");
        bytes[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
        bytes[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
        bytes
    }

    fn card32(resize: Resize) -> InputSpec {
        InputSpec {
            height: 32,
            width: 32,
            channels: 3,
            channel_order: ChannelOrder::RGB,
            resize,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        }
    }

    fn encoded(bytes: Vec<u8>) -> ImageInput {
        ImageInput::Encoded(bytes)
    }

    #[test]
    fn decoder_errors_map_to_their_own_frame_errors() {
        let pre = Preprocessor::with_limits(
            &card32(Resize::Bilinear),
            DecodeLimits {
                max_pixels: 1 << 20,
                tensor_range: None,
            },
        );
        let good = jpeg(&scene(64, 48), 64, 48);
        // Declared size over the side limit or the pixel budget: refused from
        // the header, whatever the file holds.
        for (w, h) in [(9000u16, 10u16), (2048, 1024)] {
            let err = pre
                .tensor(Some(&encoded(claim_size(good.clone(), w, h))))
                .unwrap_err();
            assert!(
                matches!(err, FrameError::TooLarge { width, height, max_pixels: 1_048_576, .. }
                    if (width, height) == (u32::from(w), u32::from(h))),
                "{err}"
            );
            assert_eq!(err.reason(), crate::error::Reason::ImageTooLarge);
        }
        // Within the limits but implausibly short for its claim: refused
        // before any decode, as DECODE_FAILED naming the problem.
        let err = pre
            .tensor(Some(&encoded(claim_size(good.clone(), 1000, 1000))))
            .unwrap_err();
        assert!(
            matches!(&err, FrameError::Decode { format, detail }
                if format == "JPEG" && detail.contains("implausibly short")),
            "{err}"
        );
        // Other formats, broken headers and, with libjpeg-turbo (which
        // reports it; jpeg-decoder pads the scan), truncated scan data.
        let mut bad = vec![b"GIF89a.....".to_vec(), good[..30].to_vec()];
        if tjdecode::AVAILABLE {
            bad.push([&good[..good.len() * 2 / 3], &[0xFF, 0xD9][..]].concat());
        }
        for bad in bad {
            let err = pre.tensor(Some(&encoded(bad))).unwrap_err();
            assert_eq!(err.reason(), crate::error::Reason::DecodeFailed, "{err}");
        }
        // A zero height in the frame header.
        let err = pre
            .tensor(Some(&encoded(claim_size(good, 64, 0))))
            .unwrap_err();
        assert_eq!(err.reason(), crate::error::Reason::DecodeFailed, "{err}");
    }

    #[test]
    fn the_pixel_budget_applies_to_the_declared_size_not_the_scaled_decode() {
        // 1600x1200 = 1.92 Mpx; its 1/8 decode (200x150) would be tiny.
        let big = jpeg(&scene(1600, 1200), 1600, 1200);
        let limits = |max_pixels| DecodeLimits {
            max_pixels,
            tensor_range: None,
        };
        let strict = Preprocessor::with_limits(&card32(Resize::Bilinear), limits(1_900_000));
        assert!(matches!(
            strict.tensor(Some(&encoded(big.clone()))),
            Err(FrameError::TooLarge {
                width: 1600,
                height: 1200,
                ..
            })
        ));
        let enough = Preprocessor::with_limits(&card32(Resize::Bilinear), limits(1_920_000));
        assert_eq!(
            enough.tensor(Some(&encoded(big))).expect("fits").len(),
            3 * 32 * 32
        );
    }

    #[test]
    fn thumbnails_are_light_and_camera_frames_and_bombs_are_not() {
        let pre = Preprocessor::new(&card32(Resize::Area));
        let raw = |w: u32, h: u32| {
            ImageInput::Raw(crate::domain::RawPixels {
                width: w,
                height: h,
                channels: 3,
                pixels: vec![0; (w * h * 3) as usize],
            })
        };
        assert!(pre.is_light(Some(&raw(32, 32))));
        assert!(pre.is_light(Some(&raw(128, 128))));
        assert!(!pre.is_light(Some(&raw(1280, 720))));
        assert!(pre.is_light(Some(&encoded(jpeg(&scene(64, 48), 64, 48)))));
        assert!(!pre.is_light(Some(&encoded(jpeg(&scene(640, 480), 640, 480)))));
        // A small file whose header claims a large image goes to a decoder
        // (where the header check refuses it).
        let mut bomb = jpeg(&scene(16, 16), 16, 16);
        let sof = bomb
            .windows(2)
            .position(|m| m == [0xFF, 0xC0])
            .expect("SOF0");
        bomb[sof + 5..sof + 9].copy_from_slice(&[0x20, 0x00, 0x20, 0x00]);
        assert!(!pre.is_light(Some(&encoded(bomb))));
        // Bytes that are no image at all fail at once, in place.
        assert!(pre.is_light(Some(&encoded(b"GIF89a".to_vec()))));
    }

    #[test]
    fn fast_path_is_close_to_the_legacy_full_decode() {
        let j = jpeg(&scene(1280, 720), 1280, 720);
        for resize in [Resize::Bilinear, Resize::Area] {
            let spec = card32(resize);
            let fast = Preprocessor::new(&spec);
            let legacy = Preprocessor::with_options(
                &spec,
                DecodeLimits::default(),
                DecodeOptions {
                    path: DecodePath::Legacy,
                    ..DecodeOptions::default()
                },
            );
            let (a, b) = (
                fast.pixels(&j).expect("fast"),
                legacy.pixels(&j).expect("legacy"),
            );
            let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max();
            assert!(worst <= Some(4), "{resize:?}: {worst:?}");
        }
        // Legacy bilinear is exactly the old path: image's decode + Triangle.
        let legacy = Preprocessor::with_options(
            &card32(Resize::Bilinear),
            DecodeLimits::default(),
            DecodeOptions {
                path: DecodePath::Legacy,
                ..DecodeOptions::default()
            },
        );
        let old = image::load_from_memory(&j)
            .expect("decodes")
            .resize_exact(32, 32, image::imageops::FilterType::Triangle)
            .to_rgb8()
            .into_raw();
        assert_eq!(legacy.pixels(&j).expect("legacy"), old);
    }

    #[test]
    fn area_is_the_block_mean_and_the_override_replaces_the_card() {
        // 64x64 raw -> 32x32: each output is the rounded mean of a 2x2 block.
        let px: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect();
        let frame = raw(64, 64, 3, px.clone());
        let area = Preprocessor::with_options(
            &card32(Resize::Bilinear),
            DecodeLimits::default(),
            DecodeOptions {
                resize: Some(Resize::Area),
                ..DecodeOptions::default()
            },
        );
        assert_eq!(area.resize(), Resize::Area);
        let t = area.tensor(Some(&frame)).expect("resized");
        for (y, x) in [(0usize, 0usize), (5, 17), (31, 31)] {
            for c in 0..3 {
                let at =
                    |dy: usize, dx: usize| u32::from(px[((2 * y + dy) * 64 + 2 * x + dx) * 3 + c]);
                let mean = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1) + 2) / 4;
                let got = t[c * 1024 + y * 32 + x] * 255.0;
                assert!(
                    (got - mean as f32).abs() < 1e-3,
                    "({y},{x},{c}): {got} vs {mean}"
                );
            }
        }
        let bilinear = Preprocessor::new(&card32(Resize::Bilinear));
        assert_ne!(bilinear.tensor(Some(&frame)).expect("resized"), t);
    }

    #[test]
    fn a_gray_model_sees_luma_and_gray_frames_unchanged() {
        let mut spec = card32(Resize::Bilinear);
        spec.channels = 1;
        spec.mean = vec![0.0];
        spec.std = vec![1.0];
        let pre = Preprocessor::new(&spec);
        let gray: Vec<u8> = (0..32 * 32).map(|i| (i % 256) as u8).collect();
        let t = pre
            .tensor(Some(&raw(32, 32, 1, gray.clone())))
            .expect("gray");
        assert!(t
            .iter()
            .zip(&gray)
            .all(|(v, g)| (v * 255.0 - f32::from(*g)).abs() < 1e-3));
        // Pure green: BT.709 luma 0.7152 * 255 = 182.
        let t = pre
            .tensor(Some(&raw(32, 32, 3, [0, 255, 0].repeat(32 * 32))))
            .expect("rgb");
        assert!((t[0] * 255.0 - 182.0).abs() < 1e-3, "{}", t[0] * 255.0);
    }
}
