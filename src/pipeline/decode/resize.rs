//! Resizing — [`Filter::Bilinear`] with `fast_image_resize` (integer
//! convolution, SSE4.1/AVX2 chosen at run time), [`Filter::Area`] with the
//! exact area average of [`super::area`] — and the final conversion to RGB8.

use std::borrow::Cow;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use super::{area, DecodeError, Filter};

/// `Convolution` (not `Interpolation`): the kernel support grows with the
/// downscale factor (antialiased), as in Pillow and image's `FilterType::Triangle`.
const BILINEAR: ResizeAlg = ResizeAlg::Convolution(FilterType::Bilinear);

fn pixel_type(channels: u8) -> Result<PixelType, DecodeError> {
    Ok(match channels {
        1 => PixelType::U8,
        2 => PixelType::U8x2,
        3 => PixelType::U8x3,
        4 => PixelType::U8x4,
        c => return Err(DecodeError::RawChannels(c)),
    })
}

/// Resizes `src` (`width`×`height`×`channels`, HWC u8, exact length) to
/// `out_w`×`out_h` and returns RGB8. When no resize is needed and the input
/// is already RGB, the input is returned as is (owned or borrowed: no copy).
///
/// Channels: 1 = gray (replicated to RGB after the resize), 2 = gray + alpha,
/// 4 = RGBA (alpha ignored, not premultiplied; dropped after the resize).
pub(crate) fn to_rgb8<'a>(
    src: Cow<'a, [u8]>,
    width: u32,
    height: u32,
    channels: u8,
    out_w: u32,
    out_h: u32,
    filter: Filter,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    let pt = pixel_type(channels)?;
    let resized: Cow<'a, [u8]> = if (width, height) == (out_w, out_h) {
        src
    } else if filter == Filter::Area {
        if u64::from(height) > area::MAX_HEIGHT {
            return Err(DecodeError::Resize(format!(
                "area resize supports at most {} rows",
                area::MAX_HEIGHT
            )));
        }
        let (w, h, c) = (width as usize, height as usize, usize::from(channels));
        Cow::Owned(area::resize(&src, w, h, c, out_w as usize, out_h as usize))
    } else {
        let view = ImageRef::new(width, height, &src, pt)
            .map_err(|e| DecodeError::Resize(e.to_string()))?;
        let mut dst = Image::new(out_w, out_h, pt);
        let options = ResizeOptions::new().resize_alg(BILINEAR).use_alpha(false);
        Resizer::new()
            .resize(&view, &mut dst, &options)
            .map_err(|e| DecodeError::Resize(e.to_string()))?;
        Cow::Owned(dst.into_vec())
    };
    Ok(match channels {
        3 => resized,
        c => {
            let c = usize::from(c);
            let mut rgb = Vec::with_capacity(resized.len() / c * 3);
            for p in resized.chunks_exact(c) {
                if c >= 3 {
                    rgb.extend_from_slice(&p[..3]);
                } else {
                    rgb.extend_from_slice(&[p[0]; 3]);
                }
            }
            Cow::Owned(rgb)
        }
    })
}
