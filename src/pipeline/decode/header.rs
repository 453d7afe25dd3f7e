//! Header parsing without touching pixel data: the JPEG marker walk up to the
//! first scan, and the PNG `IHDR` chunk. This is what every limit is checked
//! against before any decoder allocates.

use super::{DecodeError, Header, ImageFormat};

/// JPEG start-of-image signature.
const JPEG_SOI: [u8; 2] = [0xFF, 0xD8];
/// PNG file signature.
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

/// One JPEG frame component's sampling factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sampling {
    pub h: u8,
    pub v: u8,
}

/// What the JPEG frame header and marker layout tell about the work ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JpegLayout {
    /// Sampling factors of each component (1, 3 or 4 entries).
    pub components: Vec<Sampling>,
    /// Byte offset of the first SOS marker: everything from there on is scan
    /// data (entropy-coded segments plus the scan headers between them).
    pub first_scan: usize,
}

impl JpegLayout {
    /// Number of 8×8 blocks the frame codes, summed over components, at the
    /// declared (full) size. Each costs at least one bit of entropy-coded data
    /// (a DC difference code is at least one bit long, in every coding mode
    /// this module accepts), which gives a hard lower bound on the scan bytes.
    pub fn total_blocks(&self, width: u32, height: u32) -> u64 {
        let h_max = self
            .components
            .iter()
            .map(|c| c.h)
            .max()
            .unwrap_or(1)
            .max(1);
        let v_max = self
            .components
            .iter()
            .map(|c| c.v)
            .max()
            .unwrap_or(1)
            .max(1);
        self.components
            .iter()
            .map(|c| {
                // T.81 A.1.1: component size is ceil(X * H_i / H_max).
                let cw = (u64::from(width) * u64::from(c.h)).div_ceil(u64::from(h_max));
                let ch = (u64::from(height) * u64::from(c.v)).div_ceil(u64::from(v_max));
                cw.div_ceil(8) * ch.div_ceil(8)
            })
            .sum()
    }
}

/// A parsed header plus format-specific layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    pub header: Header,
    /// Present for JPEG.
    pub jpeg: Option<JpegLayout>,
}

/// Identifies the format from the signature and parses its header.
pub(crate) fn parse(bytes: &[u8]) -> Result<Parsed, DecodeError> {
    if bytes.is_empty() {
        Err(DecodeError::Empty)
    } else if bytes.starts_with(&JPEG_SOI) {
        parse_jpeg(bytes)
    } else if bytes.starts_with(&PNG_SIGNATURE) {
        parse_png(bytes).map(|header| Parsed { header, jpeg: None })
    } else {
        Err(DecodeError::UnknownFormat { seen: sniff(bytes) })
    }
}

/// Names the common formats that are not accepted, from their signatures.
fn sniff(bytes: &[u8]) -> &'static str {
    const SIGNATURES: [(&[u8], &str); 6] = [
        (b"GIF8", "GIF"),
        (b"BM", "BMP"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
        (b"\x00\x00\x00\x0cjXL", "JPEG XL"),
        (b"\xff\x0a", "JPEG XL"),
    ];
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return "WebP";
    }
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return "HEIF/AVIF";
    }
    SIGNATURES
        .iter()
        .find(|(magic, _)| bytes.starts_with(magic))
        .map_or("unrecognised", |(_, name)| name)
}

fn jpeg_err(detail: impl Into<String>) -> DecodeError {
    DecodeError::Header {
        format: ImageFormat::Jpeg,
        detail: detail.into(),
    }
}

fn jpeg_unsupported(detail: impl Into<String>) -> DecodeError {
    DecodeError::Unsupported {
        format: ImageFormat::Jpeg,
        detail: detail.into(),
    }
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Walks JPEG markers from SOI to the first SOS, reading the frame header.
fn parse_jpeg(bytes: &[u8]) -> Result<Parsed, DecodeError> {
    let mut pos = JPEG_SOI.len();
    let mut frame: Option<(Header, Vec<Sampling>)> = None;
    loop {
        // Markers are 0xFF followed by a code; any number of 0xFF fill bytes may precede it.
        if bytes.get(pos) != Some(&0xFF) {
            return Err(jpeg_err(format!("expected a marker at byte {pos}")));
        }
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&code) = bytes.get(pos) else {
            return Err(jpeg_err("file ends before the first scan"));
        };
        let marker_start = pos - 1;
        pos += 1;
        match code {
            // Standalone markers without a length: TEM, RSTn (stray, tolerated).
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 => return Err(jpeg_err("second SOI marker")),
            0xD9 => return Err(jpeg_err("EOI before any scan: no image")),
            0x00 => {
                return Err(jpeg_err(format!(
                    "invalid marker 0xFF00 at byte {marker_start}"
                )))
            }
            _ => {}
        }
        let len = usize::from(
            be16(bytes, pos).ok_or_else(|| jpeg_err("file ends inside a segment length"))?,
        );
        if len < 2 {
            return Err(jpeg_err(format!(
                "segment 0xFF{code:02X} has invalid length {len}"
            )));
        }
        let body = bytes.get(pos + 2..pos + len).ok_or_else(|| {
            jpeg_err(format!(
                "segment 0xFF{code:02X} runs past the end of the file"
            ))
        })?;
        match code {
            0xC0..=0xCF if !matches!(code, 0xC4 | 0xC8 | 0xCC) => {
                if frame.is_some() {
                    return Err(jpeg_err("more than one frame header"));
                }
                frame = Some(parse_sof(code, body)?);
            }
            0xDA => {
                let (header, components) =
                    frame.ok_or_else(|| jpeg_err("scan before the frame header"))?;
                return Ok(Parsed {
                    header,
                    jpeg: Some(JpegLayout {
                        components,
                        first_scan: marker_start,
                    }),
                });
            }
            _ => {}
        }
        pos += len;
    }
}

/// Parses a start-of-frame segment body.
fn parse_sof(code: u8, body: &[u8]) -> Result<(Header, Vec<Sampling>), DecodeError> {
    let progressive = match code {
        0xC0 | 0xC1 => false,
        0xC2 => true,
        0xC3 => return Err(jpeg_unsupported("lossless JPEG")),
        0xC5..=0xC7 => return Err(jpeg_unsupported("hierarchical (differential) JPEG")),
        _ => return Err(jpeg_unsupported("arithmetic-coded JPEG")),
    };
    if body.len() < 6 {
        return Err(jpeg_err("frame header too short"));
    }
    let precision = body[0];
    let height = u32::from(be16(body, 1).unwrap_or(0));
    let width = u32::from(be16(body, 3).unwrap_or(0));
    let count = usize::from(body[5]);
    if body.len() < 6 + 3 * count {
        return Err(jpeg_err("frame header shorter than its component list"));
    }
    if precision != 8 {
        return Err(jpeg_unsupported(format!("{precision}-bit samples")));
    }
    if !matches!(count, 1 | 3 | 4) {
        return Err(jpeg_unsupported(format!("{count} components")));
    }
    if height == 0 {
        // Height 0 means "defined by a DNL marker after the first scan".
        return Err(jpeg_unsupported("height defined by a DNL marker"));
    }
    let mut components = Vec::with_capacity(count);
    for c in body[6..6 + 3 * count].chunks_exact(3) {
        let (h, v) = (c[1] >> 4, c[1] & 0x0F);
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
            return Err(jpeg_err(format!("invalid sampling factors {h}x{v}")));
        }
        components.push(Sampling { h, v });
    }
    let header = Header {
        format: ImageFormat::Jpeg,
        width,
        height,
        channels: count as u8,
        bit_depth: precision,
        progressive,
    };
    Ok((header, components))
}

/// Reads the PNG `IHDR` chunk, which the format requires to come first.
fn parse_png(bytes: &[u8]) -> Result<Header, DecodeError> {
    let err = |detail: &str| DecodeError::Header {
        format: ImageFormat::Png,
        detail: detail.to_string(),
    };
    let ihdr = bytes
        .get(8..8 + 8 + 13)
        .ok_or_else(|| err("file ends inside IHDR"))?;
    if ihdr[0..4] != [0, 0, 0, 13] || &ihdr[4..8] != b"IHDR" {
        return Err(err("first chunk is not a 13-byte IHDR"));
    }
    let width = u32::from_be_bytes([ihdr[8], ihdr[9], ihdr[10], ihdr[11]]);
    let height = u32::from_be_bytes([ihdr[12], ihdr[13], ihdr[14], ihdr[15]]);
    let (bit_depth, color_type, interlace) = (ihdr[16], ihdr[17], ihdr[20]);
    let channels = match color_type {
        0 => 1,
        2 => 3,
        3 => 3, // palette, expanded to RGB (RGBA if it has tRNS)
        4 => 2,
        6 => 4,
        _ => return Err(err("invalid color type")),
    };
    let depth_ok = match color_type {
        0 => matches!(bit_depth, 1 | 2 | 4 | 8 | 16),
        3 => matches!(bit_depth, 1 | 2 | 4 | 8),
        _ => matches!(bit_depth, 8 | 16),
    };
    if !depth_ok {
        return Err(err("invalid bit depth for the color type"));
    }
    if interlace > 1 {
        return Err(err("invalid interlace method"));
    }
    Ok(Header {
        format: ImageFormat::Png,
        width,
        height,
        channels,
        bit_depth,
        progressive: interlace == 1,
    })
}
