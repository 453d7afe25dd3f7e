//! The decode path before the camera work, kept selectable (`--decode
//! legacy`, `ODIN_DECODE=legacy`) only to measure the fast path's fidelity
//! against it: the `image` crate decodes the whole frame at full resolution,
//! then `bilinear` is its f32 `Triangle` filter (exactly the old path) and
//! `area` the exact area average over the full-resolution pixels (what the
//! fast path's DCT-scaled decode plus area average approximates). The size
//! checks (declared size, pixel budget) are the same as the fast path's;
//! only the decoders differ.

use image::{imageops::FilterType, DynamicImage, ImageReader};

use super::{area, Filter, Header, Limits};
use crate::error::FrameError;

/// Decodes JPEG or PNG `bytes` (whose header was checked) at full size and
/// resizes to `width`×`height` RGB8.
pub fn decode(
    bytes: &[u8],
    header: &Header,
    width: u32,
    height: u32,
    filter: Filter,
    limits: &Limits,
) -> Result<Vec<u8>, FrameError> {
    let format = match header.format {
        super::ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        super::ImageFormat::Png => image::ImageFormat::Png,
    };
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_alloc_bytes);
    let mut reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    reader.limits(image_limits);
    let image = reader.decode().map_err(|e| FrameError::Decode {
        format: header.format.to_string(),
        detail: e.to_string(),
    })?;
    Ok(resize(image, width, height, filter))
}

/// Raw pixels (`channels` 1, 3 or 4, exact length, checked by the caller)
/// resized as the old path did.
pub fn resize_raw(
    pixels: &[u8],
    width: u32,
    height: u32,
    channels: u8,
    out_width: u32,
    out_height: u32,
    filter: Filter,
) -> Result<Vec<u8>, FrameError> {
    let px = pixels.to_vec();
    let image = match channels {
        1 => image::GrayImage::from_raw(width, height, px).map(DynamicImage::ImageLuma8),
        3 => image::RgbImage::from_raw(width, height, px).map(DynamicImage::ImageRgb8),
        _ => image::RgbaImage::from_raw(width, height, px).map(DynamicImage::ImageRgba8),
    }
    .ok_or_else(|| FrameError::Internal("raw frame length was not checked".into()))?;
    Ok(resize(image, out_width, out_height, filter))
}

fn resize(image: DynamicImage, width: u32, height: u32, filter: Filter) -> Vec<u8> {
    if (image.width(), image.height()) == (width, height) {
        return image.to_rgb8().into_raw();
    }
    match filter {
        Filter::Area => {
            let rgb = image.to_rgb8();
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            area::resize(rgb.as_raw(), w, h, 3, width as usize, height as usize)
        }
        // Triangle is image's (antialiased) bilinear filter.
        _ => image
            .resize_exact(width, height, FilterType::Triangle)
            .to_rgb8()
            .into_raw(),
    }
}
