//! The codec: fast, bounded decode of camera frames straight to the model's
//! input size (everything but the normalization, which the `Preprocessor`
//! does).
//!
//! A 1080p JPEG decoded at full size and resized in f32 costs tens of
//! milliseconds, almost all of it spent producing pixels the 32×32 model never
//! sees. This module instead:
//!
//! 1. reads only the header ([`probe`]) and checks every [`Limits`] entry
//!    against the **declared** size before any pixel buffer exists;
//! 2. refuses JPEG/PNG data that is implausibly short for its declared size
//!    (a 1 KB file claiming 8192×8192 never reaches a decoder);
//! 3. decodes JPEG at the smallest DCT scale (1/8, 1/4, 1/2 or 1) whose
//!    output is still at least the target size (by default 4× the target)
//!    on both sides — for 1080p → 32×32 the IDCT, upsampling and color
//!    conversion then run on 1/64 of the pixels;
//! 4. resizes with `fast_image_resize`'s integer SIMD convolution
//!    for [`Filter::Bilinear`] (antialiased triangle, the same kernel as
//!    `image`'s `FilterType::Triangle`), or with an exact integer area
//!    average for [`Filter::Area`] (OpenCV `INTER_AREA`).
//!
//! JPEG backends ([`JpegBackend`]): libjpeg-turbo through its TurboJPEG API
//! (the `tjdecode` crate, which links the system `libturbojpeg.so.0` when its
//! build finds it), and the pure-Rust `jpeg-decoder` crate. When linked,
//! libjpeg-turbo is the default: it is 2–3× faster at every scale, and it
//! reports truncated or corrupt entropy-coded data (as libjpeg warnings,
//! which are treated as errors) where jpeg-decoder silently pads with zero
//! bits.
//!
//! All entry points are synchronous and CPU-bound; call them from a blocking
//! pool, not an async executor thread.

use std::borrow::Cow;
use std::fmt;

use super::{header, jpeg, png, resize, DecodeError};

/// Resource limits, checked against the header before any pixel allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded input accepted, in bytes.
    pub max_input_bytes: usize,
    /// Largest declared width or height.
    pub max_side: u32,
    /// Largest declared `width * height`. Checked on the size in the header,
    /// not on the (smaller) size of a DCT-scaled decode, so scaling is no way
    /// around it; also bounds the requested output size.
    pub max_pixels: u64,
    /// Largest estimated decoder working memory in bytes: output buffers,
    /// plus the full-size coefficient buffers of a progressive JPEG (which
    /// exist at the declared size whatever the output scale), or the 8-bit
    /// expanded PNG buffer.
    pub max_alloc_bytes: u64,
    /// Budget for buffered PNG ancillary chunks (`eXIf`, unknown chunks that
    /// are processed, ...). Text and ICC chunks are skipped unread and never
    /// inflated. Passed to the `png` crate as `png::Limits::bytes`.
    pub max_metadata_bytes: usize,
}

impl Default for Limits {
    /// Camera-frame defaults: up to 16 MiB of input, 8192 px a side,
    /// 16.8 Mpx (4096×4096; 4K UHD is 8.3 Mpx), 192 MiB of working memory,
    /// 1 MiB of PNG metadata.
    fn default() -> Self {
        Limits {
            max_input_bytes: 16 << 20,
            max_side: 8192,
            max_pixels: 4096 * 4096,
            max_alloc_bytes: 192 << 20,
            max_metadata_bytes: 1 << 20,
        }
    }
}

/// Resampling filter for the resize to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Filter {
    /// Antialiased bilinear: a triangle kernel whose support grows with the
    /// downscale factor, as in Pillow's BILINEAR and `image`'s
    /// `FilterType::Triangle` (which the sidecar used so far). Upscaling is
    /// plain bilinear interpolation.
    #[default]
    Bilinear,
    /// Exact area average (OpenCV `INTER_AREA` for downscales): each output
    /// pixel is the mean of the source area under it, with fractional weights
    /// for partly covered edge pixels, computed in exact integer arithmetic.
    /// Upscaling: each output is the coverage-weighted mean of the one or two
    /// source pixels under it (nearest, blended at pixel boundaries).
    Area,
}

/// The JPEG decoder used by [`decode_resized_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegBackend {
    /// libjpeg-turbo (system `libturbojpeg`, through `tjdecode`). The
    /// default when the build found it.
    Turbo,
    /// The pure-Rust `jpeg-decoder` crate: the fallback. Note: without its
    /// `rayon` feature it spawns one thread per color component for each
    /// image whose output is wider than 128 px, and it decodes truncated
    /// scan data as zeros.
    JpegDecoder,
}

impl JpegBackend {
    /// libjpeg-turbo when it was linked at build time, else jpeg-decoder.
    pub fn preferred() -> JpegBackend {
        if tjdecode::AVAILABLE {
            JpegBackend::Turbo
        } else {
            JpegBackend::JpegDecoder
        }
    }

    /// Every backend this build can run.
    pub fn available() -> Vec<JpegBackend> {
        if tjdecode::AVAILABLE {
            vec![JpegBackend::Turbo, JpegBackend::JpegDecoder]
        } else {
            vec![JpegBackend::JpegDecoder]
        }
    }

    /// A short name for logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            JpegBackend::Turbo => "libjpeg-turbo",
            JpegBackend::JpegDecoder => "jpeg-decoder",
        }
    }
}

/// JPEG decoding choices for [`decode_resized_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegOptions {
    /// The decoder.
    pub backend: JpegBackend,
    /// The DCT-scaled image must be at least `min_oversample` times the
    /// target size on both sides (values below 1 count as 1; a frame smaller
    /// than that is decoded at full size). 1 picks the smallest scale that
    /// still covers the target: the fastest. The default, 4, keeps the DCT's
    /// 8×8 block averaging small against the resize kernel: at 640×480 →
    /// 32×32 the bilinear result is within 3 levels (mean 0.3) of a
    /// full-resolution resize instead of 12 (mean 2.0) with 1, for about 18%
    /// more decode time; 1920×1080 → 32×32 decodes at 1/8 either way.
    pub min_oversample: u32,
}

impl Default for JpegOptions {
    /// The preferred backend, `min_oversample` = 4.
    fn default() -> Self {
        JpegOptions {
            backend: JpegBackend::preferred(),
            min_oversample: 4,
        }
    }
}

/// An encoded image format this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// JPEG (JFIF/Exif): baseline, extended or progressive Huffman, 8-bit.
    Jpeg,
    /// PNG, any color type and bit depth.
    Png,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
        })
    }
}

/// Header facts of an encoded image, read without decoding pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The format.
    pub format: ImageFormat,
    /// Declared width in pixels.
    pub width: u32,
    /// Declared height in pixels.
    pub height: u32,
    /// Samples per pixel as stored: JPEG components (1 gray, 3 YCbCr/RGB,
    /// 4 CMYK/YCCK); PNG 1 gray, 2 gray+alpha, 3 RGB or palette, 4 RGBA.
    pub channels: u8,
    /// Bits per sample: JPEG precision (always 8 here), PNG bit depth (1–16).
    pub bit_depth: u8,
    /// Progressive JPEG, or Adam7-interlaced PNG.
    pub progressive: bool,
}

/// An 8-bit RGB image, rows top to bottom, interleaved `[R, G, B]` (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8Image {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl Rgb8Image {
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixels, `width * height * 3` bytes.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }

    /// Consumes the image, returning its pixel buffer.
    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }
}

/// Reads the header facts (format, size, channels, bit depth) without
/// decoding pixels. Only the bytes up to the JPEG's first scan header or the
/// PNG's `IHDR` chunk are read. No limit is applied.
pub fn probe(bytes: &[u8]) -> Result<Header, DecodeError> {
    header::parse(bytes).map(|p| p.header)
}

/// Decodes JPEG or PNG `bytes` and resizes to exactly `width`×`height` RGB8
/// (HWC), with the preferred [`JpegBackend`].
///
/// JPEG is decoded at the largest DCT scale-down (1/8, 1/4, 1/2) that keeps
/// the decoded image at least [`JpegOptions::min_oversample`] (default 4)
/// times `width`×`height` on both sides, then resized with `filter`; PNG is decoded at full size. All `limits` are checked on the
/// header's declared size before decoding. Gray images are replicated to RGB,
/// alpha is dropped (not composited), CMYK JPEG is converted to RGB.
pub fn decode_resized(
    bytes: &[u8],
    width: u32,
    height: u32,
    filter: Filter,
    limits: &Limits,
) -> Result<Rgb8Image, DecodeError> {
    decode_resized_with(
        bytes,
        width,
        height,
        filter,
        limits,
        &JpegOptions::default(),
    )
}

/// [`decode_resized`] with explicit JPEG options (backend, scale choice).
pub fn decode_resized_with(
    bytes: &[u8],
    width: u32,
    height: u32,
    filter: Filter,
    limits: &Limits,
    jpeg_options: &JpegOptions,
) -> Result<Rgb8Image, DecodeError> {
    if bytes.len() > limits.max_input_bytes {
        return Err(DecodeError::InputTooLarge {
            len: bytes.len(),
            max: limits.max_input_bytes,
        });
    }
    check_target(width, height, limits)?;
    let parsed = header::parse(bytes)?;
    let header = &parsed.header;
    check_declared(header, limits)?;
    let (pixels, w, h, channels) = match &parsed.jpeg {
        Some(layout) => {
            jpeg::check_plausible(bytes, header, layout)?;
            let (denom, sw, sh) = jpeg_scale(header, width, height, jpeg_options);
            check_alloc(jpeg::working_memory(header, layout, sw, sh), limits)?;
            let d = jpeg::decode(bytes, header, denom, sw, sh, jpeg_options.backend, limits)?;
            (d.pixels, d.width, d.height, d.channels)
        }
        None => {
            png::check_plausible(bytes, header)?;
            check_alloc(png::working_memory(header), limits)?;
            let d = png::decode(bytes, limits)?;
            (d.pixels, d.width, d.height, d.channels)
        }
    };
    let data = resize::to_rgb8(Cow::Owned(pixels), w, h, channels, width, height, filter)?;
    Ok(Rgb8Image {
        width,
        height,
        data: data.into_owned(),
    })
}

/// The DCT scale a JPEG with `header` is decoded at for a `width`×`height`
/// target: `(d, w, h)` for scale 1/d (1, 2, 4 or 8) giving `w`×`h` pixels —
/// the smallest image at least `min_oversample` times the target on both
/// sides, or full size.
pub fn jpeg_scale(
    header: &Header,
    width: u32,
    height: u32,
    jpeg_options: &JpegOptions,
) -> (u32, u32, u32) {
    let m = jpeg_options.min_oversample.max(1);
    let (want_w, want_h) = (width.saturating_mul(m), height.saturating_mul(m));
    jpeg::choose_scale(header.width, header.height, want_w, want_h)
}

/// Resizes raw `pixels` (HWC u8, `channels` = 1 gray, 3 RGB or 4 RGBA, exactly
/// `width * height * channels` bytes) to `out_width`×`out_height` RGB8.
///
/// When the input is already RGB at the output size, the result borrows
/// `pixels` (no resize, no copy). Gray is replicated, alpha dropped, after
/// the resize. `limits.max_side`/`max_pixels` apply to the input.
#[allow(clippy::too_many_arguments)]
pub fn resize_raw<'a>(
    pixels: &'a [u8],
    width: u32,
    height: u32,
    channels: u8,
    out_width: u32,
    out_height: u32,
    filter: Filter,
    limits: &Limits,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    if pixels.is_empty() {
        return Err(DecodeError::Empty);
    }
    if !matches!(channels, 1 | 3 | 4) {
        return Err(DecodeError::RawChannels(channels));
    }
    check_target(out_width, out_height, limits)?;
    check_size(width, height, limits)?;
    let want = u64::from(width) * u64::from(height) * u64::from(channels);
    if pixels.len() as u64 != want {
        return Err(DecodeError::RawLength {
            got: pixels.len(),
            want,
            width,
            height,
            channels,
        });
    }
    resize::to_rgb8(
        Cow::Borrowed(pixels),
        width,
        height,
        channels,
        out_width,
        out_height,
        filter,
    )
}

fn check_target(width: u32, height: u32, limits: &Limits) -> Result<(), DecodeError> {
    if width == 0 || height == 0 || u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(DecodeError::BadTarget { width, height });
    }
    Ok(())
}

fn check_size(width: u32, height: u32, limits: &Limits) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::ZeroSize { width, height });
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_side: limits.max_side,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(DecodeError::TooManyPixels {
            width,
            height,
            pixels,
            max: limits.max_pixels,
        });
    }
    Ok(())
}

fn check_declared(header: &Header, limits: &Limits) -> Result<(), DecodeError> {
    check_size(header.width, header.height, limits)
}

fn check_alloc(bytes: u64, limits: &Limits) -> Result<(), DecodeError> {
    if bytes > limits.max_alloc_bytes {
        return Err(DecodeError::AllocTooLarge {
            bytes,
            max: limits.max_alloc_bytes,
        });
    }
    Ok(())
}
