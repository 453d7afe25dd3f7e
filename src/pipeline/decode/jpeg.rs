//! JPEG: the cheap plausibility check, the DCT-scale choice, the working-memory
//! estimate, and the decode at a reduced scale with either backend.

use super::header::JpegLayout;
use super::{DecodeError, Header, ImageFormat, JpegBackend, Limits};

/// Pixels decoded from a JPEG at some scale, interleaved HWC.
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    /// 1 (gray) or 3 (RGB). CMYK is converted to RGB here.
    pub channels: u8,
    pub pixels: Vec<u8>,
}

/// Refuses scan data that is far too short for the declared frame size.
///
/// Every 8×8 block of every component costs at least one bit (its DC
/// difference code) in every process this module accepts (baseline, extended
/// and progressive Huffman). So a complete image has at least
/// `total_blocks / 8` bytes after its first SOS marker. A file below that is
/// truncated or lies about its size; libjpeg (with warnings ignored) and
/// jpeg-decoder would otherwise pad the missing data with zero bits and decode
/// the full declared size for nothing.
pub(crate) fn check_plausible(
    bytes: &[u8],
    header: &Header,
    layout: &JpegLayout,
) -> Result<(), DecodeError> {
    let got = (bytes.len() - layout.first_scan.min(bytes.len())) as u64;
    let min = layout.total_blocks(header.width, header.height).div_ceil(8);
    if got < min {
        return Err(DecodeError::Truncated {
            format: ImageFormat::Jpeg,
            width: header.width,
            height: header.height,
            got,
            min,
        });
    }
    Ok(())
}

/// The largest DCT scale-down (8, 4, 2 or 1) that still yields an image at
/// least `target_w`×`target_h`; with it the decoded size `ceil(W/d)`×`ceil(H/d)`.
pub(crate) fn choose_scale(
    width: u32,
    height: u32,
    target_w: u32,
    target_h: u32,
) -> (u32, u32, u32) {
    for denom in [8u32, 4, 2] {
        let (w, h) = (width.div_ceil(denom), height.div_ceil(denom));
        if w >= target_w && h >= target_h {
            return (denom, w, h);
        }
    }
    (1, width, height)
}

/// Estimated peak decoder working memory for a decode at `out_w`×`out_h`:
/// the output buffer twice (decoder output plus per-component planes or the
/// resize input) and, for progressive files, the whole-image coefficient
/// buffers both libjpeg and jpeg-decoder keep at the **declared** size,
/// whatever the output scale (64 i16 per block per component).
pub(crate) fn working_memory(header: &Header, layout: &JpegLayout, out_w: u32, out_h: u32) -> u64 {
    let out_channels = u64::from(header.channels.max(3));
    let output = u64::from(out_w) * u64::from(out_h) * out_channels * 2;
    let coefficients = if header.progressive {
        layout.total_blocks(header.width, header.height) * 64 * 2
    } else {
        0
    };
    output + coefficients
}

/// Decodes at scale `1/denom`; `out_w`×`out_h` is the matching rounded-up size.
pub(crate) fn decode(
    bytes: &[u8],
    header: &Header,
    denom: u32,
    out_w: u32,
    out_h: u32,
    backend: JpegBackend,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    match backend {
        JpegBackend::Turbo => decode_turbo(bytes, header, out_w, out_h),
        JpegBackend::JpegDecoder => decode_rust(bytes, header, denom, out_w, out_h, limits),
    }
}

fn corrupt(detail: impl Into<String>) -> DecodeError {
    DecodeError::Corrupt {
        format: ImageFormat::Jpeg,
        detail: detail.into(),
    }
}

fn decode_turbo(
    bytes: &[u8],
    header: &Header,
    out_w: u32,
    out_h: u32,
) -> Result<Decoded, DecodeError> {
    use tjdecode::{decompress, PixelFormat};
    let format = match header.channels {
        1 => PixelFormat::Gray,
        4 => PixelFormat::Cmyk,
        _ => PixelFormat::Rgb,
    };
    let bpp = format.bytes_per_pixel();
    let mut pixels = vec![0u8; out_w as usize * out_h as usize * bpp];
    decompress(bytes, out_w, out_h, format, &mut pixels).map_err(|e| match e {
        tjdecode::Error::Unavailable => DecodeError::Unsupported {
            format: ImageFormat::Jpeg,
            detail: "this build has no libjpeg-turbo".into(),
        },
        e => corrupt(e.to_string()),
    })?;
    let (pixels, channels) = if bpp == 4 {
        (cmyk_to_rgb(&pixels), 3)
    } else {
        (pixels, bpp as u8)
    };
    Ok(Decoded {
        width: out_w,
        height: out_h,
        channels,
        pixels,
    })
}

fn decode_rust(
    bytes: &[u8],
    header: &Header,
    denom: u32,
    out_w: u32,
    out_h: u32,
    limits: &Limits,
) -> Result<Decoded, DecodeError> {
    use jpeg_decoder::{Decoder, PixelFormat};
    let mut decoder = Decoder::new(bytes);
    decoder.set_max_decoding_buffer_size(
        usize::try_from(limits.max_alloc_bytes).unwrap_or(usize::MAX),
    );
    decoder.read_info().map_err(|e| corrupt(e.to_string()))?;
    let (mut w, mut h) = (header.width, header.height);
    if denom > 1 {
        // jpeg-decoder's `scale` picks the smallest IDCT size whose output
        // reaches the request on EITHER side, so request the exact scaled size
        // and check both sides of what it chose; fall back to full size.
        let (sw, sh) = (
            u16::try_from(out_w).unwrap_or(u16::MAX),
            u16::try_from(out_h).unwrap_or(u16::MAX),
        );
        let (gw, gh) = decoder.scale(sw, sh).map_err(|e| corrupt(e.to_string()))?;
        if u32::from(gw) >= out_w && u32::from(gh) >= out_h {
            (w, h) = (u32::from(gw), u32::from(gh));
        } else {
            let full = (
                u16::try_from(w).unwrap_or(u16::MAX),
                u16::try_from(h).unwrap_or(u16::MAX),
            );
            decoder
                .scale(full.0, full.1)
                .map_err(|e| corrupt(e.to_string()))?;
        }
    }
    let pixels = decoder.decode().map_err(|e| corrupt(e.to_string()))?;
    let info = decoder
        .info()
        .ok_or_else(|| corrupt("no frame information after decode"))?;
    let (pixels, channels) = match info.pixel_format {
        PixelFormat::L8 => (pixels, 1),
        PixelFormat::RGB24 => (pixels, 3),
        PixelFormat::CMYK32 => (cmyk_to_rgb(&pixels), 3),
        PixelFormat::L16 => {
            return Err(DecodeError::Unsupported {
                format: ImageFormat::Jpeg,
                detail: "16-bit samples".into(),
            })
        }
    };
    if pixels.len() != w as usize * h as usize * usize::from(channels) {
        return Err(corrupt("decoder returned an unexpected buffer size"));
    }
    Ok(Decoded {
        width: w,
        height: h,
        channels,
        pixels,
    })
}

/// CMYK as stored by Adobe applications (inverted: 255 = no ink) to RGB:
/// `R = C·K/255`, the same simple conversion image/zune-jpeg apply.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        let k = u16::from(p[3]);
        for &c in &p[..3] {
            rgb.push(((u16::from(c) * k + 127) / 255) as u8);
        }
    }
    rgb
}
