//! Image sets on disk in the raw format of `shared/data`: `NAME.u8` (N×H×W×C
//! bytes, NHWC), `NAME.json` (`n`, `h`, `w`, `c`), and optionally
//! `NAME.labels.u8` (one class id per image). Used by `detect` and the tests.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::RawPixels;

/// A raw image set, loaded into memory.
#[derive(Debug, Clone)]
pub struct RawSet {
    /// Number of images.
    pub n: usize,
    /// Height of each image.
    pub height: u32,
    /// Width of each image.
    pub width: u32,
    /// Channels of each image (1 or 3).
    pub channels: u32,
    pixels: Vec<u8>,
    /// Class ids, when the set has labels.
    pub labels: Option<Vec<u8>>,
}

#[derive(Debug, Deserialize)]
struct Header {
    n: usize,
    h: u32,
    w: u32,
    c: u32,
}

/// Why a raw set could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The header or the sizes do not agree.
    #[error("{path}: {detail}")]
    Invalid {
        /// The `.u8` file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, DatasetError> {
    std::fs::read(path).map_err(|source| DatasetError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl RawSet {
    /// Opens `NAME.u8` with its `NAME.json` header and optional labels.
    pub fn open(path: &Path) -> Result<RawSet, DatasetError> {
        let invalid = |detail: String| DatasetError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        let header_path = path.with_extension("json");
        let header: Header = serde_json::from_slice(&read(&header_path)?)
            .map_err(|e| invalid(format!("{}: {e}", header_path.display())))?;
        let pixels = read(path)?;
        let per_image = header.h as usize * header.w as usize * header.c as usize;
        if per_image == 0 || pixels.len() != header.n * per_image {
            return Err(invalid(format!(
                "{} bytes, but the header says {} images of {}x{}x{}",
                pixels.len(),
                header.n,
                header.h,
                header.w,
                header.c
            )));
        }
        let labels_path = path.with_extension("labels.u8");
        let labels = if labels_path.exists() {
            let labels = read(&labels_path)?;
            if labels.len() != header.n {
                return Err(invalid(format!(
                    "{} labels for {} images",
                    labels.len(),
                    header.n
                )));
            }
            Some(labels)
        } else {
            None
        };
        Ok(RawSet {
            n: header.n,
            height: header.h,
            width: header.w,
            channels: header.c,
            pixels,
            labels,
        })
    }

    /// The pixels of image `i`, HWC.
    pub fn pixels(&self, i: usize) -> &[u8] {
        let size = self.height as usize * self.width as usize * self.channels as usize;
        &self.pixels[i * size..(i + 1) * size]
    }

    /// Image `i` as raw pixels.
    pub fn raw(&self, i: usize) -> RawPixels {
        RawPixels {
            width: self.width,
            height: self.height,
            channels: self.channels,
            pixels: self.pixels(i).to_vec(),
        }
    }
}

/// `../shared/data` beside the checkout, or `$ODIN_DATA`.
pub fn shared_data_dir() -> PathBuf {
    match std::env::var_os("ODIN_DATA") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    }
}
