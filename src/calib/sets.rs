//! Evaluation image sets: raw `.u8` sets and packed JPEG `.jpgpack` sets (the
//! `shared/data` formats, see `crate::dataset`), folders of JPEG/PNG files,
//! and the paper's synthetic noise sets, all turned into the model's
//! normalized input tensors.

use std::path::{Path, PathBuf};

use crate::dataset::{JpegPack, RawSet};
use crate::domain::{ImageInput, RawPixels};
use crate::error::FrameError;
use crate::pipeline::Preprocessor;

/// Where a set's images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SetSource {
    /// A raw set `NAME.u8` with `NAME.json`.
    Raw(PathBuf),
    /// A packed JPEG set `NAME.jpgpack` with `NAME.offsets.u64`.
    Pack(PathBuf),
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
    /// images, seeds 1 and 2: the evaluation's), a `.jpgpack` or `.u8` file,
    /// or a folder.
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
            _ if spec.ends_with(".jpgpack") => SetSource::Pack(PathBuf::from(spec)),
            _ => SetSource::Raw(PathBuf::from(spec)),
        }
    }

    /// A short name for tables: the file stem, or the synthetic kind.
    pub fn name(&self) -> String {
        match self {
            SetSource::Raw(p) | SetSource::Folder(p) | SetSource::Pack(p) => p
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
    /// The class of each image, when the set has labels.
    pub labels: Option<Vec<u8>>,
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

/// Where the images of a set are read from, image by image.
enum Images {
    Raw(PathBuf, RawSet),
    Pack(PathBuf, JpegPack),
    Files(Vec<PathBuf>),
    /// Generated images `start..`, in order.
    Generated(String, usize, Vec<RawPixels>),
}

impl Images {
    fn open(
        source: &SetSource,
        pre: &Preprocessor,
        end: Option<usize>,
    ) -> Result<Images, SetError> {
        let io = |e: crate::dataset::DatasetError| SetError::Io(e.to_string());
        Ok(match source {
            SetSource::Raw(path) => Images::Raw(path.clone(), RawSet::open(path).map_err(io)?),
            SetSource::Pack(path) => Images::Pack(path.clone(), JpegPack::open(path).map_err(io)?),
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
                Images::Files(files)
            }
            SetSource::Uniform { n, seed } | SetSource::Gaussian { n, seed } => {
                let gaussian = matches!(source, SetSource::Gaussian { .. });
                let spec = pre.chw();
                let (h, w) = (spec[1] as u32, spec[2] as u32);
                let end = end.map_or(*n, |e| e.min(*n));
                let mut rng = SplitMix64(*seed);
                let images = (0..end)
                    .map(|_| RawPixels {
                        width: w,
                        height: h,
                        channels: 3,
                        pixels: (0..h * w * 3)
                            .map(|_| {
                                let v = if gaussian {
                                    0.5 + rng.normal()
                                } else {
                                    rng.uniform()
                                };
                                (v.clamp(0.0, 1.0) * 255.0).round() as u8
                            })
                            .collect(),
                    })
                    .collect();
                Images::Generated(source.name(), *n, images)
            }
        })
    }

    /// Images in the set.
    fn len(&self) -> usize {
        match self {
            Images::Raw(_, set) => set.n,
            Images::Pack(_, pack) => pack.n,
            Images::Files(files) => files.len(),
            Images::Generated(_, n, _) => *n,
        }
    }

    /// Image `i` and a name for it in errors.
    fn image(&self, i: usize) -> Result<(String, ImageInput), SetError> {
        Ok(match self {
            Images::Raw(path, set) => (
                format!("{}#{i}", path.display()),
                ImageInput::Raw(set.raw(i)),
            ),
            Images::Pack(path, pack) => (
                format!("{}#{i}", path.display()),
                ImageInput::Encoded(pack.encoded(i).map_err(|e| SetError::Io(e.to_string()))?),
            ),
            Images::Files(files) => {
                let p = &files[i];
                let bytes =
                    std::fs::read(p).map_err(|e| SetError::Io(format!("{}: {e}", p.display())))?;
                (p.display().to_string(), ImageInput::Encoded(bytes))
            }
            Images::Generated(name, _, images) => {
                (format!("{name}#{i}"), ImageInput::Raw(images[i].clone()))
            }
        })
    }

    fn labels(&self) -> Option<&[u8]> {
        match self {
            Images::Raw(_, set) => set.labels.as_deref(),
            Images::Pack(_, pack) => pack.labels.as_deref(),
            _ => None,
        }
    }
}

impl Set {
    /// Loads images `skip .. skip + take` of `source`, preprocessed by `pre`
    /// on every core (decoding camera-size JPEGs is most of the work).
    pub fn load(
        source: &SetSource,
        pre: &Preprocessor,
        skip: usize,
        take: Option<usize>,
    ) -> Result<Set, SetError> {
        let name = source.name();
        let images = Images::open(source, pre, take.map(|t| skip + t))?;
        let total = images.len();
        let end = take.map_or(total, |t| (skip + t).min(total));
        let start = skip.min(end);
        let n = end - start;
        if n == 0 {
            return Err(SetError::Empty(name));
        }
        let len = pre.tensor_len();
        let mut inputs = vec![0.0f32; n * len];
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(n);
        let per = n.div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = inputs
                .chunks_mut(per * len)
                .enumerate()
                .map(|(k, out)| {
                    let images = &images;
                    scope.spawn(move || -> Result<(), SetError> {
                        for (j, dst) in out.chunks_mut(len).enumerate() {
                            let (path, image) = images.image(start + k * per + j)?;
                            let tensor = pre
                                .tensor(Some(&image))
                                .map_err(|error| SetError::Frame { path, error })?;
                            dst.copy_from_slice(&tensor);
                        }
                        Ok(())
                    })
                })
                .collect();
            // The first failing image in set order is the one reported.
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(SetError::Io("a set loader thread panicked".into())))
            })
        })?;
        let labels = images.labels().map(|l| l[start..end].to_vec());
        let description = match source {
            SetSource::Raw(p) | SetSource::Folder(p) | SetSource::Pack(p) => {
                format!("{} images {start}..{end}", p.display())
            }
            SetSource::Uniform { seed, .. } => {
                format!("uniform U[0,1] noise, seed {seed}, images {start}..{end}")
            }
            SetSource::Gaussian { seed, .. } => {
                format!("gaussian N(0.5,1) clipped noise, seed {seed}, images {start}..{end}")
            }
        };
        Ok(Set {
            name,
            description,
            inputs,
            n,
            labels,
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
        assert_eq!(
            SetSource::parse("x/cam_640x480.jpgpack"),
            SetSource::Pack(PathBuf::from("x/cam_640x480.jpgpack"))
        );
        assert_eq!(
            SetSource::parse("x/cam_640x480.jpgpack").name(),
            "cam_640x480"
        );
    }

    #[test]
    fn a_packed_jpeg_set_loads_in_order_with_its_labels() {
        use crate::model::card::{ChannelOrder, InputSpec, Resize};
        let dir = std::env::temp_dir().join(format!("odin-set-pack-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("cam.jpgpack");
        let mut rng = SplitMix64(3);
        let images: Vec<Vec<u8>> = (0..7)
            .map(|_| {
                let px: Vec<u8> = (0..96 * 64 * 3)
                    .map(|_| (rng.next_u64() % 256) as u8)
                    .collect();
                let mut out = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85)
                    .encode(&px, 96, 64, image::ExtendedColorType::Rgb8)
                    .expect("encodes");
                out
            })
            .collect();
        let labels = [0u8, 1, 2, 3, 4, 5, 6];
        JpegPack::write(&path, &images, Some(&labels)).expect("write");
        let pre = Preprocessor::new(&InputSpec {
            height: 32,
            width: 32,
            channels: 3,
            channel_order: ChannelOrder::RGB,
            resize: Resize::Area,
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        });
        let source = SetSource::parse(path.to_str().expect("utf-8"));
        let set = Set::load(&source, &pre, 2, Some(4)).expect("loads");
        assert_eq!((set.n, set.labels.as_deref()), (4, Some(&labels[2..6])));
        for (k, tensor) in set.inputs.chunks(pre.tensor_len()).enumerate() {
            let want = pre
                .tensor(Some(&ImageInput::Encoded(images[2 + k].clone())))
                .expect("decodes");
            assert_eq!(tensor, &want[..], "image {}", 2 + k);
        }
        assert!(
            set.description.ends_with("images 2..6"),
            "{}",
            set.description
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
