//! Decode stage: turns a frame's image (encoded JPEG/PNG, raw u8 pixels, or a
//! ready f32 tensor) into the model's normalized CHW input, following the
//! model card. Every way a frame can be wrong is a specific `FrameError`.

use image::{imageops::FilterType, DynamicImage, ImageReader, RgbImage};

use crate::domain::{ImageInput, RawPixels, TensorInput};
use crate::error::FrameError;
use crate::model::card::{ChannelOrder, InputSpec, Resize};

/// Largest accepted side of a decoded image: bounds the decoder's allocation
/// so one hostile frame cannot exhaust memory.
pub const MAX_SIDE: u32 = 8192;

/// What a frame may make the decoder do, checked from the header before
/// anything is allocated, and what a tensor frame may hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLimits {
    /// Most pixels of a decoded image (width × height).
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

/// Per-model preprocessing, built once from the card.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: InputSpec,
    // 1 / (255 * std) and mean / std, so the per-pixel work is one fused multiply-add.
    scale: Vec<f32>,
    shift: Vec<f32>,
    max_pixels: u64,
    range: (f32, f32),
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
        }
    }

    /// The accepted range of tensor-frame values.
    pub fn tensor_range(&self) -> (f32, f32) {
        self.range
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

    /// Decodes and normalizes one frame's image into a CHW tensor.
    pub fn tensor(&self, image: Option<&ImageInput>) -> Result<Vec<f32>, FrameError> {
        match image {
            None => Err(FrameError::Empty),
            Some(ImageInput::Encoded(bytes)) if bytes.is_empty() => Err(FrameError::Empty),
            Some(ImageInput::Encoded(bytes)) => self.image_tensor(self.decode(bytes)?),
            Some(ImageInput::Raw(raw)) => self.image_tensor(self.raw_image(raw)?),
            Some(ImageInput::Tensor(tensor)) => self.checked_tensor(tensor),
        }
    }

    fn image_tensor(&self, image: DynamicImage) -> Result<Vec<f32>, FrameError> {
        let (w, h) = (self.spec.width, self.spec.height);
        let image = if (image.width(), image.height()) == (w, h) {
            image
        } else if self.spec.resize == Resize::None {
            return Err(FrameError::SizeMismatch {
                width: image.width(),
                height: image.height(),
                want_width: w,
                want_height: h,
            });
        } else {
            // Triangle is the bilinear filter.
            image.resize_exact(w, h, FilterType::Triangle)
        };
        Ok(match self.spec.channels {
            1 => self.normalize(image.to_luma8().as_raw(), 1),
            _ => self.normalize(
                rgb_in_order(image.to_rgb8(), self.spec.channel_order).as_raw(),
                3,
            ),
        })
    }

    /// HWC u8 → CHW f32, `(p / 255 - mean) / std`.
    fn normalize(&self, hwc: &[u8], channels: usize) -> Vec<f32> {
        let plane = hwc.len() / channels;
        let mut out = vec![0.0; hwc.len()];
        for (c, dst) in out.chunks_exact_mut(plane).enumerate() {
            let (scale, shift) = (self.scale[c], self.shift[c]);
            for (d, p) in dst.iter_mut().zip(hwc.iter().skip(c).step_by(channels)) {
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
        if self.spec.resize == Resize::None && (width, height) != (w, h) {
            return Err(FrameError::SizeMismatch {
                width,
                height,
                want_width: w,
                want_height: h,
            });
        }
        Ok(())
    }

    /// Wraps raw HWC pixels as an image after checking the byte count and
    /// the size, before copying anything.
    fn raw_image(&self, raw: &RawPixels) -> Result<DynamicImage, FrameError> {
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
        let length_error = || FrameError::RawLength {
            got: pixels.len(),
            want,
            width: *width,
            height: *height,
            channels: *channels,
        };
        if pixels.len() != want || want == 0 {
            return Err(length_error());
        }
        self.check_size(*width, *height)?;
        let (w, h, px) = (*width, *height, pixels.to_vec());
        let image = match channels {
            1 => image::GrayImage::from_raw(w, h, px).map(DynamicImage::ImageLuma8),
            3 => image::RgbImage::from_raw(w, h, px).map(DynamicImage::ImageRgb8),
            _ => image::RgbaImage::from_raw(w, h, px).map(DynamicImage::ImageRgba8),
        };
        image.ok_or_else(length_error)
    }

    /// Decodes JPEG or PNG bytes, after checking the declared size, with
    /// the decoder's own allocation limit as a second guard (PNG text
    /// chunks, 16-bit samples).
    fn decode(&self, bytes: &[u8]) -> Result<DynamicImage, FrameError> {
        let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| decode_error("unknown", e))?;
        let format = match reader.format() {
            Some(f @ (image::ImageFormat::Jpeg | image::ImageFormat::Png)) => f,
            other => {
                return Err(FrameError::Decode {
                    format: other.map_or("unknown".into(), |f| format!("{f:?}")),
                    detail: "only JPEG and PNG are accepted".into(),
                })
            }
        };
        let name = format!("{format:?}");
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        // 8 bytes per pixel: 16-bit RGBA, the widest either format decodes to.
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8));
        reader.limits(limits.clone());
        let (width, height) = reader
            .into_dimensions()
            .map_err(|e| decode_error(&name, e))?;
        self.check_size(width, height)?;
        let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
        reader.limits(limits);
        let image = reader.decode().map_err(|e| decode_error(&name, e))?;
        Ok(image)
    }
}

fn rgb_in_order(mut rgb: RgbImage, order: ChannelOrder) -> RgbImage {
    if order == ChannelOrder::BGR {
        rgb.pixels_mut().for_each(|p| p.0.swap(0, 2));
    }
    rgb
}

fn decode_error(format: &str, error: impl std::fmt::Display) -> FrameError {
    FrameError::Decode {
        format: format.to_string(),
        detail: error.to_string(),
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
        RgbImage::from_raw(2, 2, px.clone())
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
}
