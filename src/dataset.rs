//! Image sets on disk in the formats of `shared/data`:
//!
//! - raw: `NAME.u8` (N×H×W×C bytes, NHWC), `NAME.json` (`n`, `h`, `w`, `c`),
//!   and optionally `NAME.labels.u8` (one class id per image);
//! - packed JPEG: `NAME.jpgpack` (the JPEG files concatenated, unchanged),
//!   `NAME.offsets.u64` (N + 1 little-endian byte offsets: image `i` is
//!   `pack[off[i]..off[i + 1]]`) and optionally `NAME.labels.u8` — the format
//!   of `cifar10_train.*` and of the camera-size sets
//!   `scripts/make-camera-sets.py` writes.
//!
//! Used by `detect`, `calibrate`, `eval`, the benchmarks and the tests.

use std::os::unix::fs::FileExt;
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

/// A packed JPEG set, opened: its offsets and labels in memory, the JPEG
/// bytes read from the file one image at a time (the packs of camera-size
/// frames run to gigabytes).
#[derive(Debug)]
pub struct JpegPack {
    /// Number of images.
    pub n: usize,
    /// Class ids, when the set has labels.
    pub labels: Option<Vec<u8>>,
    path: PathBuf,
    file: std::fs::File,
    offsets: Vec<u64>,
}

impl JpegPack {
    /// Opens `NAME.jpgpack` with `NAME.offsets.u64` and optional `NAME.labels.u8`.
    pub fn open(path: &Path) -> Result<JpegPack, DatasetError> {
        let invalid = |detail: String| DatasetError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        let offsets_path = path.with_extension("offsets.u64");
        let raw = read(&offsets_path)?;
        if raw.len() % 8 != 0 || raw.len() < 16 {
            return Err(invalid(format!(
                "{}: {} bytes is not N + 1 >= 2 little-endian u64 offsets",
                offsets_path.display(),
                raw.len()
            )));
        }
        let offsets: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        let file = std::fs::File::open(path).map_err(|source| DatasetError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| DatasetError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let ordered = offsets.windows(2).all(|w| w[0] <= w[1]);
        if offsets[0] != 0 || !ordered || offsets[offsets.len() - 1] != size {
            return Err(invalid(format!(
                "{} does not describe this file: offsets must rise from 0 to its size ({size} bytes)",
                offsets_path.display()
            )));
        }
        let n = offsets.len() - 1;
        let labels_path = path.with_extension("labels.u8");
        let labels = if labels_path.exists() {
            let labels = read(&labels_path)?;
            if labels.len() != n {
                return Err(invalid(format!("{} labels for {n} images", labels.len())));
            }
            Some(labels)
        } else {
            None
        };
        Ok(JpegPack {
            n,
            labels,
            path: path.to_path_buf(),
            file,
            offsets,
        })
    }

    /// The encoded bytes of image `i` (`i < n`).
    pub fn encoded(&self, i: usize) -> Result<Vec<u8>, DatasetError> {
        let (start, end) = (self.offsets[i], self.offsets[i + 1]);
        let len = usize::try_from(end - start).map_err(|_| DatasetError::Invalid {
            path: self.path.clone(),
            detail: format!("image {i} is too large"),
        })?;
        let mut bytes = vec![0; len];
        self.file
            .read_exact_at(&mut bytes, start)
            .map_err(|source| DatasetError::Read {
                path: self.path.clone(),
                source,
            })?;
        Ok(bytes)
    }

    /// Writes a pack: `NAME.jpgpack` and `NAME.offsets.u64` (and
    /// `NAME.labels.u8` when given), for tests and benchmarks.
    pub fn write(
        path: &Path,
        images: &[Vec<u8>],
        labels: Option<&[u8]>,
    ) -> Result<(), std::io::Error> {
        let mut offsets = vec![0u64];
        for image in images {
            offsets.push(offsets[offsets.len() - 1] + image.len() as u64);
        }
        std::fs::write(path, images.concat())?;
        let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        std::fs::write(path.with_extension("offsets.u64"), bytes)?;
        if let Some(labels) = labels {
            std::fs::write(path.with_extension("labels.u8"), labels)?;
        }
        Ok(())
    }
}

/// `../shared/data` beside the checkout, or `$ODIN_DATA`.
pub fn shared_data_dir() -> PathBuf {
    match std::env::var_os("ODIN_DATA") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_pack_reads_back_and_a_bad_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("odin-pack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("set.jpgpack");
        let images = vec![b"\xff\xd8one".to_vec(), vec![], b"three".to_vec()];
        JpegPack::write(&path, &images, Some(&[7, 8, 9])).expect("write");
        let pack = JpegPack::open(&path).expect("open");
        assert_eq!(pack.n, 3);
        assert_eq!(pack.labels.as_deref(), Some(&[7u8, 8, 9][..]));
        for (i, image) in images.iter().enumerate() {
            assert_eq!(&pack.encoded(i).expect("read"), image);
        }
        // Offsets that do not end at the file's size are refused.
        std::fs::write(&path, b"short").expect("write");
        let err = JpegPack::open(&path).unwrap_err();
        assert!(err.to_string().contains("offsets must rise"), "{err}");
        std::fs::write(path.with_extension("offsets.u64"), [0u8; 12]).expect("write");
        assert!(JpegPack::open(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
