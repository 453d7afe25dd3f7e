//! Frames the tests make themselves: seeded synthetic images (smooth
//! patterns with noise, so that JPEG and resizing behave as on photos),
//! their PNG/JPEG encodings, `odin.v1` frames, and raw sets on disk in the
//! data directory's format.

use std::path::{Path, PathBuf};

use odin_sidecar::calib::sets::SplitMix64;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, RawImage, Tensor};

/// A `width × height` image with `channels` channels (HWC, row-major),
/// the same for the same seed.
pub fn synthetic(seed: u64, width: u32, height: u32, channels: u32) -> Vec<u8> {
    let mut rng = SplitMix64(seed.wrapping_mul(0x9e37_79b9).wrapping_add(1));
    let mut phase = [0.0f64; 4];
    for p in &mut phase {
        *p = rng.uniform() * std::f64::consts::TAU;
    }
    let (fx, fy) = (0.05 + 0.4 * rng.uniform(), 0.05 + 0.4 * rng.uniform());
    let mut out = Vec::with_capacity((width * height * channels) as usize);
    for y in 0..height {
        for x in 0..width {
            for (c, phase) in phase.iter().take(channels as usize).enumerate() {
                let wave =
                    ((x as f64) * fx + (y as f64) * fy * (1.0 + c as f64 * 0.3) + phase).sin();
                let noise = rng.uniform() - 0.5;
                out.push((128.0 + 90.0 * wave + 60.0 * noise).clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// A 32 × 32 RGB image: the size of the built-in model and the ResNets.
pub fn synthetic32(seed: u64) -> Vec<u8> {
    synthetic(seed, 32, 32, 3)
}

/// Encodes HWC pixels (1, 3 or 4 channels) as PNG or JPEG.
pub fn encode_channels(
    pixels: &[u8],
    width: u32,
    height: u32,
    channels: u32,
    format: image::ImageFormat,
) -> Vec<u8> {
    let img = match channels {
        1 => image::DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(width, height, pixels.to_vec()).expect("dims"),
        ),
        3 => image::DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(width, height, pixels.to_vec()).expect("dims"),
        ),
        4 => image::DynamicImage::ImageRgba8(
            image::RgbaImage::from_raw(width, height, pixels.to_vec()).expect("dims"),
        ),
        c => panic!("{c} channels"),
    };
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format)
        .expect("encodes");
    out
}

/// Encodes RGB pixels as PNG or JPEG.
pub fn encode(pixels: &[u8], width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    encode_channels(pixels, width, height, 3, format)
}

/// What a decoder makes of `bytes`, as RGB pixels.
pub fn decoded_rgb(bytes: &[u8]) -> Vec<u8> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return reference_jpeg_decode(bytes);
    }
    image::load_from_memory(bytes)
        .expect("decodes")
        .to_rgb8()
        .into_raw()
}

/// Full-size RGB of a JPEG, decoded by the library the sidecar decodes with
/// (libjpeg-turbo when linked, else jpeg-decoder), called directly: the
/// independent reference for frames the model takes at their own size.
pub fn reference_jpeg_decode(jpeg: &[u8]) -> Vec<u8> {
    let mut decoder = jpeg_decoder::Decoder::new(jpeg);
    decoder.read_info().expect("a JPEG header");
    let info = decoder.info().expect("frame info");
    if tjdecode::AVAILABLE {
        let (w, h) = (u32::from(info.width), u32::from(info.height));
        let mut out = vec![0; (w * h * 3) as usize];
        tjdecode::decompress(jpeg, w, h, tjdecode::PixelFormat::Rgb, &mut out).expect("decodes");
        return out;
    }
    assert_eq!(info.pixel_format, jpeg_decoder::PixelFormat::RGB24);
    decoder.decode().expect("decodes")
}

/// A frame with `image`.
pub fn frame(id: impl Into<String>, image: Image) -> Frame {
    Frame {
        frame_id: id.into(),
        image: Some(image),
        ..Frame::default()
    }
}

/// Raw 8-bit pixels as an `odin.v1` image.
pub fn raw(width: u32, height: u32, channels: u32, pixels: Vec<u8>) -> Image {
    Image::Raw(RawImage {
        width,
        height,
        channels,
        pixels,
    })
}

/// A raw 32 × 32 RGB frame of [`synthetic32`]`(seed)`.
pub fn raw_frame(id: impl Into<String>, seed: u64) -> Frame {
    frame(id, raw(32, 32, 3, synthetic32(seed)))
}

/// A tensor frame.
pub fn tensor(shape: Vec<u32>, data: Vec<f32>) -> Image {
    Image::Tensor(Tensor { shape, data })
}

/// Writes `n` images of [`synthetic`] (seeds `seed..seed + n`) as a raw set
/// `dir/NAME.u8` with `NAME.json`, and with `labels` as `NAME.labels.u8`;
/// returns the `.u8` path.
pub fn write_raw_set(
    dir: &Path,
    name: &str,
    n: usize,
    seed: u64,
    labels: Option<&[u8]>,
) -> PathBuf {
    let (h, w, c) = (32u32, 32u32, 3u32);
    let mut pixels = Vec::with_capacity(n * (h * w * c) as usize);
    for i in 0..n {
        pixels.extend(synthetic(seed + i as u64, w, h, c));
    }
    let path = dir.join(format!("{name}.u8"));
    std::fs::write(&path, pixels).expect("write set");
    std::fs::write(
        path.with_extension("json"),
        serde_json::json!({"n": n, "h": h, "w": w, "c": c}).to_string(),
    )
    .expect("write header");
    if let Some(labels) = labels {
        assert_eq!(labels.len(), n);
        std::fs::write(path.with_extension("labels.u8"), labels).expect("write labels");
    }
    path
}
