//! Evaluation image sets: raw `.u8` sets (the `shared/data` format), folders
//! of JPEG/PNG files, and the paper's synthetic noise sets, all turned into
//! the model's normalized input tensors.

use std::path::{Path, PathBuf};

use crate::dataset::RawSet;
use crate::domain::{ImageInput, RawPixels};
use crate::error::FrameError;
use crate::pipeline::Preprocessor;

/// Where a set's images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SetSource {
    /// A raw set `NAME.u8` with `NAME.json`.
    Raw(PathBuf),
    /// Every `.jpg`/`.jpeg`/`.png` file in a folder, in name order.
    Folder(PathBuf),
    /// i.i.d. U[0, 1] per pixel (ODIN's "Uniform"), seeded.
    Uniform {
        /// Number of images.
        n: usize,
        /// PRNG seed.
        seed: u64,
    },
    /// i.i.d. N(0.5, 1) clipped to [0, 1] per pixel (ODIN's "Gaussian"), seeded.
    Gaussian {
        /// Number of images.
        n: usize,
        /// PRNG seed.
        seed: u64,
    },
}

impl SetSource {
    /// Parses `uniform[:N[:SEED]]`, `gaussian[:N[:SEED]]` (default 10,000
    /// images, seeds 1 and 2: the evaluation's), a `.u8` file or a folder.
    pub fn parse(spec: &str) -> SetSource {
        let (head, rest) = match spec.split_once(':') {
            Some((h, r)) => (h, Some(r)),
            None => (spec, None),
        };
        let (n, seed) = match rest.map(|r| r.split_once(':').unwrap_or((r, ""))) {
            Some((n, seed)) => (n.parse().ok(), seed.parse().ok()),
            None => (None, None),
        };
        let n = n.unwrap_or(10_000);
        match head {
            "uniform" => SetSource::Uniform {
                n,
                seed: seed.unwrap_or(1),
            },
            "gaussian" => SetSource::Gaussian {
                n,
                seed: seed.unwrap_or(2),
            },
            _ if Path::new(spec).is_dir() => SetSource::Folder(PathBuf::from(spec)),
            _ => SetSource::Raw(PathBuf::from(spec)),
        }
    }

    /// A short name for tables: the file stem, or the synthetic kind.
    pub fn name(&self) -> String {
        match self {
            SetSource::Raw(p) | SetSource::Folder(p) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            SetSource::Uniform { .. } => "uniform".into(),
            SetSource::Gaussian { .. } => "gaussian".into(),
        }
    }
}

/// A set, loaded and preprocessed into model inputs.
#[derive(Debug, Clone)]
pub struct Set {
    /// Short name.
    pub name: String,
    /// Human description of exactly which images are in it.
    pub description: String,
    /// One CHW tensor per image, back to back.
    pub inputs: Vec<f32>,
    /// Number of images.
    pub n: usize,
}

/// Why a set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// Reading a file or folder failed.
    #[error("{0}")]
    Io(String),
    /// An image could not be turned into the model's input.
    #[error("{path}: {error}")]
    Frame {
        /// The image.
        path: String,
        /// Why.
        error: FrameError,
    },
    /// The range asked for is empty.
    #[error("{0} has no images in the range asked for")]
    Empty(String),
}

impl Set {
    /// Loads images `skip .. skip + take` of `source`, preprocessed by `pre`.
    pub fn load(
        source: &SetSource,
        pre: &Preprocessor,
        skip: usize,
        take: Option<usize>,
    ) -> Result<Set, SetError> {
        let name = source.name();
        let images: Vec<(String, ImageInput)> = match source {
            SetSource::Raw(path) => {
                let set = RawSet::open(path).map_err(|e| SetError::Io(e.to_string()))?;
                let end = take.map_or(set.n, |t| (skip + t).min(set.n));
                (skip.min(end)..end)
                    .map(|i| {
                        (
                            format!("{}#{i}", path.display()),
                            ImageInput::Raw(set.raw(i)),
                        )
                    })
                    .collect()
            }
            SetSource::Folder(dir) => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| SetError::Io(format!("{}: {e}", dir.display())))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                        })
                    })
                    .collect();
                files.sort();
                let end = take.map_or(files.len(), |t| (skip + t).min(files.len()));
                files[skip.min(end)..end]
                    .iter()
                    .map(|p| {
                        std::fs::read(p)
                            .map(|b| (p.display().to_string(), ImageInput::Encoded(b)))
                            .map_err(|e| SetError::Io(format!("{}: {e}", p.display())))
                    })
                    .collect::<Result<_, _>>()?
            }
            SetSource::Uniform { n, seed } | SetSource::Gaussian { n, seed } => {
                let gaussian = matches!(source, SetSource::Gaussian { .. });
                let spec = pre.chw();
                let (h, w) = (spec[1] as u32, spec[2] as u32);
                let end = take.map_or(*n, |t| (skip + t).min(*n));
                let mut rng = SplitMix64(*seed);
                let mut images = Vec::new();
                for i in 0..end {
                    let pixels: Vec<u8> = (0..h * w * 3)
                        .map(|_| {
                            let v = if gaussian {
                                0.5 + rng.normal()
                            } else {
                                rng.uniform()
                            };
                            (v.clamp(0.0, 1.0) * 255.0).round() as u8
                        })
                        .collect();
                    // Generate and discard the skipped images so a given index
                    // is always the same image.
                    if i >= skip {
                        let raw = RawPixels {
                            width: w,
                            height: h,
                            channels: 3,
                            pixels,
                        };
                        images.push((format!("{name}#{i}"), ImageInput::Raw(raw)));
                    }
                }
                images
            }
        };
        if images.is_empty() {
            return Err(SetError::Empty(name));
        }
        let n = images.len();
        let mut inputs = Vec::with_capacity(n * pre.tensor_len());
        for (path, image) in &images {
            let tensor = pre.tensor(Some(image)).map_err(|error| SetError::Frame {
                path: path.clone(),
                error,
            })?;
            inputs.extend_from_slice(&tensor);
        }
        let description = match source {
            SetSource::Raw(p) | SetSource::Folder(p) => {
                format!("{} images {skip}..{}", p.display(), skip + n)
            }
            SetSource::Uniform { seed, .. } => format!(
                "uniform U[0,1] noise, seed {seed}, images {skip}..{}",
                skip + n
            ),
            SetSource::Gaussian { seed, .. } => {
                format!(
                    "gaussian N(0.5,1) clipped noise, seed {seed}, images {skip}..{}",
                    skip + n
                )
            }
        };
        Ok(Set {
            name,
            description,
            inputs,
            n,
        })
    }
}

/// A small, seeded PRNG (SplitMix64): reproducible synthetic sets without a
/// dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_noise_has_the_papers_statistics() {
        let mut rng = SplitMix64(7);
        let u: Vec<f64> = (0..100_000).map(|_| rng.uniform()).collect();
        let mean = u.iter().sum::<f64>() / u.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let g: Vec<f64> = (0..100_000).map(|_| rng.normal()).collect();
        let m = g.iter().sum::<f64>() / g.len() as f64;
        let var = g.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / g.len() as f64;
        assert!(m.abs() < 0.02 && (var - 1.0).abs() < 0.02, "{m} {var}");
    }

    #[test]
    fn specs_parse() {
        assert_eq!(
            SetSource::parse("uniform:50"),
            SetSource::Uniform { n: 50, seed: 1 }
        );
        assert_eq!(
            SetSource::parse("gaussian"),
            SetSource::Gaussian { n: 10_000, seed: 2 }
        );
        assert_eq!(SetSource::parse("x/tin_crop.u8").name(), "tin_crop");
        assert_eq!(
            SetSource::parse("uniform:1000:11"),
            SetSource::Uniform { n: 1000, seed: 11 }
        );
    }
}
