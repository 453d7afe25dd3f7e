//! Unit tests of the codec with generated inputs: JPEG/PNG encoded by the
//! `image` crate (4:2:0 and progressive JPEG by libjpeg-turbo where it is
//! linked), headers patched by hand for the hostile cases.

use std::borrow::Cow;

use super::*;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

const T: u32 = 32;

/// Options for one backend, default scale choice.
fn opts(backend: JpegBackend) -> JpegOptions {
    JpegOptions {
        backend,
        ..JpegOptions::default()
    }
}

/// Every backend this build can run.
fn backends() -> Vec<JpegBackend> {
    JpegBackend::available()
}

/// Smooth, camera-like RGB content: gradients plus a few soft blobs.
fn scene(w: u32, h: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let blob = (((fx * 9.0).sin() * (fy * 7.0).cos()) * 60.0) as i32;
            v.push((40.0 + 180.0 * fx) as i32 + blob);
            v.push((200.0 - 150.0 * fy) as i32 - blob / 2);
            v.push((90.0 + 80.0 * (fx * fy)) as i32 + blob / 3);
        }
    }
    v.into_iter().map(|p| p.clamp(0, 255) as u8).collect()
}

/// High-entropy content (xorshift noise): JPEG data close to its worst case size.
fn noise(w: u32, h: u32, channels: u32) -> Vec<u8> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..w * h * channels)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn jpeg(pixels: &[u8], w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 85)
        .write_image(pixels, w, h, color)
        .unwrap();
    out
}

fn png(pixels: &[u8], w: u32, h: u32, color: ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(pixels, w, h, color)
        .unwrap();
    out
}

/// Overwrites the size in the JPEG's SOF0 segment (and optionally its marker code).
fn patch_sof(mut bytes: Vec<u8>, w: u16, h: u16, code: Option<u8>) -> Vec<u8> {
    let at = bytes
        .windows(2)
        .position(|m| m == [0xFF, 0xC0])
        .expect("SOF0");
    if let Some(code) = code {
        bytes[at + 1] = code;
    }
    bytes[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
    bytes[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

/// A PNG chunk with a valid CRC.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    c.extend_from_slice(&crc.finalize().to_be_bytes());
    c
}

/// Inserts `extra` right after IHDR (8-byte signature + 25-byte IHDR chunk).
fn insert_after_ihdr(png: &[u8], extra: &[u8]) -> Vec<u8> {
    [&png[..33], extra, &png[33..]].concat()
}

fn reference_triangle(bytes: &[u8], w: u32, h: u32) -> Vec<u8> {
    image::load_from_memory(bytes)
        .unwrap()
        .resize_exact(w, h, image::imageops::FilterType::Triangle)
        .to_rgb8()
        .into_raw()
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn big_limits() -> Limits {
    Limits {
        max_input_bytes: usize::MAX,
        max_side: u32::MAX,
        max_pixels: u64::MAX,
        max_alloc_bytes: u64::MAX,
        max_metadata_bytes: 1 << 20,
    }
}

// ---- probe ------------------------------------------------------------------

#[test]
fn probe_reads_jpeg_and_png_headers() {
    let j = jpeg(&scene(64, 48), 64, 48, ExtendedColorType::Rgb8);
    let h = probe(&j).unwrap();
    assert_eq!(
        h,
        Header {
            format: ImageFormat::Jpeg,
            width: 64,
            height: 48,
            channels: 3,
            bit_depth: 8,
            progressive: false
        }
    );
    let g = jpeg(&noise(20, 10, 1), 20, 10, ExtendedColorType::L8);
    assert_eq!(probe(&g).unwrap().channels, 1);

    let p = png(&noise(5, 7, 4), 5, 7, ExtendedColorType::Rgba8);
    let h = probe(&p).unwrap();
    assert_eq!(
        (h.format, h.width, h.height, h.channels, h.bit_depth),
        (ImageFormat::Png, 5, 7, 4, 8)
    );
    let p16 = png(&noise(3, 2, 6), 3, 2, ExtendedColorType::Rgb16);
    assert_eq!(probe(&p16).unwrap().bit_depth, 16);
}

#[test]
fn probe_rejects_garbage() {
    assert_eq!(probe(&[]), Err(DecodeError::Empty));
    assert_eq!(
        probe(b"GIF89a......"),
        Err(DecodeError::UnknownFormat { seen: "GIF" })
    );
    assert_eq!(
        probe(b"RIFF\x10\0\0\0WEBPVP8 "),
        Err(DecodeError::UnknownFormat { seen: "WebP" })
    );
    assert_eq!(
        probe(b"hello world!"),
        Err(DecodeError::UnknownFormat {
            seen: "unrecognised"
        })
    );
    let j = jpeg(&scene(16, 16), 16, 16, ExtendedColorType::Rgb8);
    // Cut inside the header segments (before SOS).
    assert!(matches!(probe(&j[..40]), Err(DecodeError::Header { .. })));
    let p = png(&scene(4, 4), 4, 4, ExtendedColorType::Rgb8);
    assert!(matches!(probe(&p[..20]), Err(DecodeError::Header { .. })));
    // Progressive marker is reported, arithmetic coding is unsupported.
    assert!(
        probe(&patch_sof(j.clone(), 16, 16, Some(0xC2)))
            .unwrap()
            .progressive
    );
    assert!(matches!(
        probe(&patch_sof(j, 16, 16, Some(0xC9))),
        Err(DecodeError::Unsupported { .. })
    ));
}

// ---- decode + resize ----------------------------------------------------------

#[test]
fn jpeg_bilinear_close_to_image_triangle() {
    let (w, h) = (1280, 720);
    let j = jpeg(&scene(w, h), w, h, ExtendedColorType::Rgb8);
    let reference = reference_triangle(&j, T, T);
    for backend in backends() {
        let out = decode_resized_with(
            &j,
            T,
            T,
            Filter::Bilinear,
            &Limits::default(),
            &opts(backend),
        )
        .unwrap();
        assert_eq!(
            (out.width(), out.height(), out.as_raw().len()),
            (T, T, (T * T * 3) as usize)
        );
        let d = max_diff(out.as_raw(), &reference);
        assert!(d <= 4, "{backend:?}: max diff {d}");
    }
}

#[test]
fn area_is_exact_on_full_decode() {
    // PNG is decoded at full size, so Area must be the exact box mean: 64x64
    // blocks of 2x2 -> 32x32 block means.
    let px = noise(64, 64, 3);
    let out = decode_resized(
        &png(&px, 64, 64, ExtendedColorType::Rgb8),
        T,
        T,
        Filter::Area,
        &Limits::default(),
    )
    .unwrap();
    for (i, &v) in out.as_raw().iter().enumerate() {
        let (y, x, c) = (i / 96, (i / 3) % 32, i % 3);
        let at = |dy: usize, dx: usize| u32::from(px[((2 * y + dy) * 64 + 2 * x + dx) * 3 + c]);
        let mean = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1) + 2) / 4;
        assert_eq!(u32::from(v), mean);
    }
}

#[test]
fn non_square_targets_upscales_and_odd_aspect() {
    let j = jpeg(&scene(16, 16), 16, 16, ExtendedColorType::Rgb8);
    let wide = jpeg(&scene(100, 2000), 100, 2000, ExtendedColorType::Rgb8);
    for backend in backends() {
        for filter in [Filter::Bilinear, Filter::Area] {
            let up = decode_resized_with(&j, 40, 24, filter, &Limits::default(), &opts(backend))
                .unwrap();
            assert_eq!(
                (up.width(), up.height(), up.as_raw().len()),
                (40, 24, 40 * 24 * 3)
            );
            // 100x2000: 1/8 would give 13 px of width; the scale must respect both
            // sides (jpeg-decoder's own `scale` only needs one side to fit).
            let out = decode_resized_with(&wide, T, T, filter, &Limits::default(), &opts(backend))
                .unwrap();
            let reference = reference_triangle(&wide, T, T);
            if filter == Filter::Bilinear {
                assert!(max_diff(out.as_raw(), &reference) <= 6, "{backend:?}");
            }
        }
    }
}

#[test]
fn scale_choice_keeps_both_sides_at_least_target() {
    assert_eq!(jpeg::choose_scale(1920, 1080, 32, 32), (8, 240, 135));
    assert_eq!(jpeg::choose_scale(1920, 1080, 300, 200), (4, 480, 270));
    assert_eq!(jpeg::choose_scale(100, 2000, 32, 32), (2, 50, 1000));
    assert_eq!(jpeg::choose_scale(255, 255, 32, 32), (8, 32, 32));
    assert_eq!(jpeg::choose_scale(240, 240, 32, 32), (4, 60, 60));
    assert_eq!(jpeg::choose_scale(31, 500, 32, 32), (1, 31, 500));
}

#[test]
fn gray_jpeg_and_png_color_types_become_rgb() {
    let g = jpeg(&scene(64, 64)[..64 * 64], 64, 64, ExtendedColorType::L8);
    for backend in backends() {
        let out = decode_resized_with(
            &g,
            T,
            T,
            Filter::Bilinear,
            &Limits::default(),
            &opts(backend),
        )
        .unwrap();
        assert!(out.as_raw().chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }
    let rgb = scene(64, 64);
    let rgba: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], p[1], p[2], 7]).collect();
    let from_rgb = decode_resized(
        &png(&rgb, 64, 64, ExtendedColorType::Rgb8),
        T,
        T,
        Filter::Bilinear,
        &Limits::default(),
    )
    .unwrap();
    let from_rgba = decode_resized(
        &png(&rgba, 64, 64, ExtendedColorType::Rgba8),
        T,
        T,
        Filter::Bilinear,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(from_rgb, from_rgba, "alpha is dropped, not premultiplied");
    let la: Vec<u8> = rgb.chunks(3).flat_map(|p| [p[0], 200]).collect();
    let out = decode_resized(
        &png(&la, 64, 64, ExtendedColorType::La8),
        T,
        T,
        Filter::Area,
        &Limits::default(),
    )
    .unwrap();
    assert!(out.as_raw().chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
}

#[test]
fn png_16_bit_is_converted_to_8_bit() {
    let rgb8 = scene(48, 40);
    // Each 16-bit sample is the 8-bit one times 257 (+ noise in the low byte).
    let rgb16: Vec<u8> = rgb8
        .iter()
        .enumerate()
        .flat_map(|(i, &v)| {
            (u16::from(v) * 257 - (i % 200) as u16 * u16::from(v > 0)).to_ne_bytes()
        }) // image takes native-endian u16 samples
        .collect();
    let p8 = png(&rgb8, 48, 40, ExtendedColorType::Rgb8);
    let p16 = png(&rgb16, 48, 40, ExtendedColorType::Rgb16);
    let a = decode_resized(&p8, 48, 40, Filter::Bilinear, &Limits::default()).unwrap();
    let b = decode_resized(&p16, 48, 40, Filter::Bilinear, &Limits::default()).unwrap();
    assert!(max_diff(a.as_raw(), b.as_raw()) <= 1);
}

// ---- limits, checked before allocation -------------------------------------

#[test]
fn declared_size_limits() {
    let j = jpeg(&scene(64, 64), 64, 64, ExtendedColorType::Rgb8);
    let limits = Limits {
        max_side: 63,
        ..Limits::default()
    };
    assert!(matches!(
        decode_resized(&j, T, T, Filter::Bilinear, &limits),
        Err(DecodeError::TooLarge {
            width: 64,
            height: 64,
            max_side: 63
        })
    ));
    let limits = Limits {
        max_input_bytes: j.len() - 1,
        ..Limits::default()
    };
    assert!(matches!(
        decode_resized(&j, T, T, Filter::Bilinear, &limits),
        Err(DecodeError::InputTooLarge { .. })
    ));
    assert!(matches!(
        decode_resized(&j, 0, T, Filter::Bilinear, &Limits::default()),
        Err(DecodeError::BadTarget { .. })
    ));
    let zero = patch_sof(j, 0, 64, None);
    assert!(matches!(
        decode_resized(&zero, T, T, Filter::Bilinear, &Limits::default()),
        Err(DecodeError::ZeroSize { .. })
    ));
}

#[test]
fn scaled_decode_does_not_bypass_pixel_budget() {
    // 2048x2048 = 4.2 Mpx declared; a 1/8 decode would be only 256x256, but
    // the budget applies to the declared size.
    let j = jpeg(&scene(2048, 2048), 2048, 2048, ExtendedColorType::Rgb8);
    let limits = Limits {
        max_pixels: 1 << 20,
        ..Limits::default()
    };
    for backend in backends() {
        assert!(matches!(
            decode_resized_with(&j, T, T, Filter::Bilinear, &limits, &opts(backend)),
            Err(DecodeError::TooManyPixels {
                pixels: 4_194_304,
                max: 1_048_576,
                ..
            })
        ));
    }
    // Total pixels, not only sides: 4096x4096 has sides within 8192 but 16.8 Mpx.
    let big = patch_sof(
        jpeg(&scene(64, 64), 64, 64, ExtendedColorType::Rgb8),
        4096,
        4097,
        None,
    );
    assert!(matches!(
        decode_resized(&big, T, T, Filter::Bilinear, &Limits::default()),
        Err(DecodeError::TooManyPixels { .. })
    ));
}

#[test]
fn progressive_coefficient_memory_counts_declared_size() {
    // A progressive frame header: decoders keep 64 i16 coefficients per block
    // per component at the declared size, even when decoding at 1/8.
    let j = jpeg(&noise(512, 512, 3), 512, 512, ExtendedColorType::Rgb8);
    let prog = patch_sof(j, 4000, 4000, Some(0xC2));
    let limits = Limits {
        max_alloc_bytes: 64 << 20,
        ..big_limits()
    };
    // 4000x4000 4:4:4: 3 * 500 * 500 blocks * 128 B = 96 MB of coefficients.
    assert!(matches!(
        decode_resized(&prog, T, T, Filter::Bilinear, &limits),
        Err(DecodeError::AllocTooLarge { .. }) | Err(DecodeError::Truncated { .. })
    ));
    let layout = header::parse(&prog).unwrap().jpeg.unwrap();
    let hdr = probe(&prog).unwrap();
    assert_eq!(
        jpeg::working_memory(&hdr, &layout, 500, 500),
        500 * 500 * 3 * 2 + 3 * 500 * 500 * 128
    );
}

#[test]
fn jpeg_header_claiming_huge_size_is_refused_cheaply() {
    // A ~1.1 KB file whose header claims 8192x8192: under limits that allow
    // that size, the plausibility check still refuses it before any decode.
    let small = jpeg(&scene(16, 16), 16, 16, ExtendedColorType::Rgb8);
    let mut liar = patch_sof(small, 8192, 8192, None);
    liar.resize(1129 - 2, 0x00);
    liar.extend_from_slice(&[0xFF, 0xD9]);
    assert_eq!(liar.len(), 1129);
    for backend in backends() {
        let err = decode_resized_with(&liar, T, T, Filter::Bilinear, &big_limits(), &opts(backend))
            .unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Truncated {
                    width: 8192,
                    height: 8192,
                    min: 393_216,
                    ..
                }
            ),
            "{backend:?}: {err}"
        );
    }
}

#[test]
fn truncated_jpeg_is_an_error() {
    let (w, h) = (256, 256);
    let j = jpeg(&noise(w, h, 3), w, h, ExtendedColorType::Rgb8);
    let scan = header::parse(&j).unwrap().jpeg.unwrap().first_scan;
    // Plausibility: 3 * 1024 blocks need >= 384 scan bytes; cut far below.
    let tiny = [&j[..scan + 100], &[0xFF, 0xD9][..]].concat();
    for backend in backends() {
        assert!(matches!(
            decode_resized_with(
                &tiny,
                T,
                T,
                Filter::Bilinear,
                &Limits::default(),
                &opts(backend)
            ),
            Err(DecodeError::Truncated { .. })
        ));
        // Cut at 60%, no EOI: every backend reports the end of data.
        let cut = &j[..j.len() * 6 / 10];
        assert!(
            matches!(
                decode_resized_with(
                    cut,
                    T,
                    T,
                    Filter::Bilinear,
                    &Limits::default(),
                    &opts(backend)
                ),
                Err(DecodeError::Corrupt { .. })
            ),
            "{backend:?}"
        );
    }
}

#[test]
fn truncated_jpeg_with_eoi_is_an_error_with_libjpeg_turbo() {
    // Cut at 60% and terminated with EOI: plausible size, so it reaches the
    // decoder. libjpeg reports "premature end of data segment" as a warning,
    // which is an error here. jpeg-decoder pads the scan with zero bits and
    // returns a (partly gray) image: see the next test.
    let j = jpeg(&noise(256, 256, 3), 256, 256, ExtendedColorType::Rgb8);
    let cut = [&j[..j.len() * 6 / 10], &[0xFF, 0xD9][..]].concat();
    if tjdecode::AVAILABLE {
        let err = decode_resized_with(
            &cut,
            T,
            T,
            Filter::Bilinear,
            &Limits::default(),
            &opts(JpegBackend::Turbo),
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Corrupt { .. }), "{err}");
        // A complete file must still decode (no spurious warnings).
        decode_resized_with(
            &j,
            T,
            T,
            Filter::Bilinear,
            &Limits::default(),
            &opts(JpegBackend::Turbo),
        )
        .unwrap();
    }
}

#[test]
fn jpeg_decoder_pads_truncated_scan_documented() {
    // Documents the jpeg-decoder weakness the TurboJPEG backend does not have.
    // If this starts failing, jpeg-decoder learnt to report truncation: good.
    let j = jpeg(&noise(256, 256, 3), 256, 256, ExtendedColorType::Rgb8);
    let cut = [&j[..j.len() * 6 / 10], &[0xFF, 0xD9][..]].concat();
    let r = decode_resized_with(
        &cut,
        T,
        T,
        Filter::Bilinear,
        &Limits::default(),
        &opts(JpegBackend::JpegDecoder),
    );
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn png_limits() {
    // Header claiming 8192x8192 RGBA in a few hundred bytes: implausible for
    // deflate (at most 1032:1), refused before decoding.
    let p = png(&scene(8, 8), 8, 8, ExtendedColorType::Rgb8);
    let mut liar = p.clone();
    liar[16..20].copy_from_slice(&8192u32.to_be_bytes());
    liar[20..24].copy_from_slice(&8192u32.to_be_bytes());
    assert!(matches!(
        decode_resized(&liar, T, T, Filter::Bilinear, &big_limits()),
        Err(DecodeError::Truncated {
            format: ImageFormat::Png,
            ..
        })
    ));
    // Working memory from IHDR: RGB may gain alpha via tRNS, so 4 B/px.
    let limits = Limits {
        max_alloc_bytes: 8 * 8 * 4 - 1,
        ..Limits::default()
    };
    assert!(matches!(
        decode_resized(&p, T, T, Filter::Bilinear, &limits),
        Err(DecodeError::AllocTooLarge { .. })
    ));
    // Truncated IDAT.
    let big = png(&noise(64, 64, 3), 64, 64, ExtendedColorType::Rgb8);
    assert!(matches!(
        decode_resized(
            &big[..big.len() / 2],
            T,
            T,
            Filter::Bilinear,
            &Limits::default()
        ),
        Err(DecodeError::Corrupt { .. })
    ));
}

#[test]
fn png_text_chunks_are_skipped_and_never_inflated() {
    let p = png(&scene(8, 8), 8, 8, ExtendedColorType::Rgb8);
    // zTXt/iTXt bombs (a valid zlib stream inflating to 64 MiB) and a 1 MiB
    // plain tEXt, all larger than the metadata budget.
    let bomb = fdeflate::compress_to_vec(&vec![0u8; 64 << 20]);
    let ztxt = [b"Comment\0\0".as_slice(), &bomb].concat();
    let itxt = [b"Comment\0\x01\0\0\0".as_slice(), &bomb].concat();
    let text = [b"Comment\0".as_slice(), &vec![b'x'; 1 << 20]].concat();
    let chunks = [
        chunk(b"zTXt", &ztxt),
        chunk(b"tEXt", &text),
        chunk(b"iTXt", &itxt),
    ]
    .concat();
    let hostile = insert_after_ihdr(&p, &chunks);
    let limits = Limits {
        max_metadata_bytes: bomb.len() / 2,
        ..Limits::default()
    };
    let a = decode_resized(&p, T, T, Filter::Bilinear, &limits).unwrap();
    let b = decode_resized(&hostile, T, T, Filter::Bilinear, &limits).unwrap();
    assert_eq!(a, b);
    // Not skipped, the png crate buffers them against the same budget and fails.
    let budget = ::png::Limits {
        bytes: limits.max_metadata_bytes,
    };
    let r = ::png::Decoder::new_with_limits(std::io::Cursor::new(&hostile), budget).read_info();
    assert!(r.is_err());
}

#[test]
fn png_buffered_ancillary_chunks_are_bounded() {
    // eXIf cannot be skipped by the png crate; it is buffered against
    // max_metadata_bytes.
    let p = png(&scene(8, 8), 8, 8, ExtendedColorType::Rgb8);
    let exif = insert_after_ihdr(&p, &chunk(b"eXIf", &vec![0u8; 2 << 20]));
    assert!(matches!(
        decode_resized(&exif, T, T, Filter::Bilinear, &Limits::default()),
        Err(DecodeError::Corrupt {
            format: ImageFormat::Png,
            ..
        })
    ));
    let limits = Limits {
        max_metadata_bytes: 4 << 20,
        ..Limits::default()
    };
    decode_resized(&exif, T, T, Filter::Bilinear, &limits).unwrap();
}

// ---- raw pixels -------------------------------------------------------------

#[test]
fn resize_raw_same_size_is_a_copy_and_channels_convert() {
    let px = noise(T, T, 3);
    let out = resize_raw(&px, T, T, 3, T, T, Filter::Bilinear, &Limits::default()).unwrap();
    assert!(
        matches!(out, Cow::Borrowed(_)),
        "no copy of RGB at the output size"
    );
    assert_eq!(&out[..], &px[..]);
    let gray = noise(T, T, 1);
    let out = resize_raw(&gray, T, T, 1, T, T, Filter::Area, &Limits::default()).unwrap();
    assert!(out.chunks(3).zip(&gray).all(|(p, g)| p == [*g; 3]));
    let rgba = noise(64, 48, 4);
    let out = resize_raw(&rgba, 64, 48, 4, T, T, Filter::Bilinear, &Limits::default()).unwrap();
    assert_eq!(out.len(), (T * T * 3) as usize);
}

#[test]
fn resize_raw_validates() {
    let l = Limits::default();
    assert_eq!(
        resize_raw(&[], 1, 1, 3, T, T, Filter::Bilinear, &l),
        Err(DecodeError::Empty)
    );
    assert_eq!(
        resize_raw(&[0; 8], 2, 2, 2, T, T, Filter::Bilinear, &l),
        Err(DecodeError::RawChannels(2))
    );
    assert!(matches!(
        resize_raw(&[0; 11], 2, 2, 3, T, T, Filter::Bilinear, &l),
        Err(DecodeError::RawLength {
            got: 11,
            want: 12,
            ..
        })
    ));
    let limits = Limits {
        max_pixels: 3,
        ..Limits::default()
    };
    assert!(matches!(
        resize_raw(&[0; 12], 2, 2, 3, 1, 1, Filter::Bilinear, &limits),
        Err(DecodeError::TooManyPixels { .. })
    ));
}

#[test]
fn oversample_trades_speed_for_fidelity() {
    // Sharp-edged 13 px color cells (not aligned with the 8x8 DCT grid): the
    // 1/8 decode of a 640x480 frame (80x60, only 2.5x the target) averages
    // across cell edges; the default (>= 4x target -> 1/2, 320x240) does not.
    let (w, h) = (640, 480);
    let cells = noise(w / 13 + 1, h / 13 + 1, 3);
    let px: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y / 13, x / 13)))
        .flat_map(|(cy, cx)| {
            let i = ((cy * (w / 13 + 1) + cx) * 3) as usize;
            [cells[i], cells[i + 1], cells[i + 2]]
        })
        .collect();
    let j = jpeg(&px, w, h, ExtendedColorType::Rgb8);
    let reference = reference_triangle(&j, T, T);
    for backend in backends() {
        let fast = JpegOptions {
            backend,
            min_oversample: 1,
        };
        let d1 = max_diff(
            decode_resized_with(&j, T, T, Filter::Bilinear, &Limits::default(), &fast)
                .unwrap()
                .as_raw(),
            &reference,
        );
        let d4 = max_diff(
            decode_resized_with(
                &j,
                T,
                T,
                Filter::Bilinear,
                &Limits::default(),
                &opts(backend),
            )
            .unwrap()
            .as_raw(),
            &reference,
        );
        assert!(
            d4 <= 4 && d4 < d1,
            "{backend:?}: oversample 4 -> {d4}, 1 -> {d1}"
        );
    }
}

#[test]
fn camera_style_and_progressive_jpegs_decode_at_scale() {
    // 4:2:0 baseline (what cameras send) and progressive, as libjpeg-turbo
    // writes them; both backends, against image's full decode + Triangle.
    if !tjdecode::AVAILABLE {
        return; // the encoder is libjpeg-turbo's
    }
    let (w, h) = (1280, 720);
    let px = scene(w, h);
    for progressive in [false, true] {
        let j = tjdecode::compress(
            &px,
            w,
            h,
            tjdecode::PixelFormat::Rgb,
            85,
            tjdecode::Subsampling::S420,
            progressive,
        )
        .unwrap();
        assert_eq!(probe(&j).unwrap().progressive, progressive);
        let reference = reference_triangle(&j, T, T);
        for backend in backends() {
            let out = decode_resized_with(
                &j,
                T,
                T,
                Filter::Bilinear,
                &Limits::default(),
                &opts(backend),
            )
            .unwrap();
            let d = max_diff(out.as_raw(), &reference);
            assert!(
                d <= 4,
                "{backend:?}, progressive {progressive}: max diff {d}"
            );
        }
    }
}
