//! PNG: full-size decode with the `png` crate under explicit limits.

use std::io::Cursor;

use super::{DecodeError, Header, ImageFormat, Limits};

/// Largest deflate expansion: a 258-byte match can cost as little as two bits,
/// so no zlib stream inflates more than 1032× (RFC 1951). A PNG whose file is
/// smaller than its raw scanlines / 1032 cannot hold the image it declares.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Pixels decoded from a PNG, 8 bits per sample, interleaved HWC.
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    /// 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
    pub channels: u8,
    pub pixels: Vec<u8>,
}

fn corrupt(detail: impl ToString) -> DecodeError {
    DecodeError::Corrupt {
        format: ImageFormat::Png,
        detail: detail.to_string(),
    }
}

/// Raw (filtered, uncompressed) scanline bytes the declared image needs.
fn raw_bytes(header: &Header) -> u64 {
    let samples = u64::from(header.channels);
    let row_bits = u64::from(header.width) * samples * u64::from(header.bit_depth);
    (row_bits.div_ceil(8) + 1) * u64::from(header.height)
}

/// Refuses a file that is too small to inflate to its declared scanlines.
pub(crate) fn check_plausible(bytes: &[u8], header: &Header) -> Result<(), DecodeError> {
    let min = raw_bytes(header).div_ceil(MAX_DEFLATE_RATIO);
    let got = bytes.len() as u64;
    if got < min {
        return Err(DecodeError::Truncated {
            format: ImageFormat::Png,
            width: header.width,
            height: header.height,
            got,
            min,
        });
    }
    Ok(())
}

/// Upper bound of the decoded 8-bit buffer, from IHDR alone (a palette or a
/// `tRNS` chunk may add an alpha channel on expansion, so count 4 / 2).
pub(crate) fn working_memory(header: &Header) -> u64 {
    let channels = match header.channels {
        1 => 2, // gray + tRNS -> gray-alpha
        3 => 4, // RGB/palette + tRNS -> RGBA
        c => u64::from(c),
    };
    u64::from(header.width) * u64::from(header.height) * channels
}

/// Decodes the first (default) frame to 8-bit samples.
///
/// * 16-bit samples are reduced to 8 bits (`STRIP_16`: the high byte, at most
///   one level below rounding), palettes and sub-byte gray are expanded.
/// * Text (`tEXt`/`zTXt`/`iTXt`) and `iCCP` chunks are skipped unread, so
///   compressed text is never inflated; every other buffered ancillary chunk
///   (e.g. `eXIf`) counts against `limits.max_metadata_bytes`.
pub(crate) fn decode(bytes: &[u8], limits: &Limits) -> Result<Decoded, DecodeError> {
    let mut decoder = ::png::Decoder::new_with_limits(
        Cursor::new(bytes),
        ::png::Limits {
            bytes: limits.max_metadata_bytes,
        },
    );
    decoder.set_ignore_text_chunk(true);
    decoder.set_ignore_iccp_chunk(true);
    decoder.set_transformations(::png::Transformations::EXPAND | ::png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(corrupt)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| corrupt("output size overflows"))?;
    if size as u64 > limits.max_alloc_bytes {
        return Err(DecodeError::AllocTooLarge {
            bytes: size as u64,
            max: limits.max_alloc_bytes,
        });
    }
    let mut pixels = vec![0u8; size];
    let frame = reader.next_frame(&mut pixels).map_err(corrupt)?;
    pixels.truncate(frame.buffer_size());
    let channels = match frame.color_type {
        ::png::ColorType::Grayscale => 1,
        ::png::ColorType::GrayscaleAlpha => 2,
        ::png::ColorType::Rgb => 3,
        ::png::ColorType::Rgba => 4,
        ::png::ColorType::Indexed => return Err(corrupt("palette was not expanded")),
    };
    if frame.bit_depth != ::png::BitDepth::Eight
        || pixels.len() != frame.width as usize * frame.height as usize * channels
    {
        return Err(corrupt("unexpected output layout"));
    }
    Ok(Decoded {
        width: frame.width,
        height: frame.height,
        channels: channels as u8,
        pixels,
    })
}
