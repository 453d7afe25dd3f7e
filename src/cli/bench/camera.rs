//! `bench camera`: camera-size JPEG frames, end to end and in-process, in
//! one run.
//!
//! 1. Frames: for each size, `--frames` JPEGs (q85, 4:2:0 like a camera's
//!    when libjpeg-turbo is linked) of camera-like content: mosaics of
//!    CIFAR-10 and TinyImageNet images upscaled (bicubic) to tiles of 96 px
//!    per 1080 rows (`--tile`), or, without `../shared/data`, of synthetic natural-ish
//!    tiles (smooth color fields, soft shapes, sensor-like noise). Real-world
//!    entropy: a 1080p frame is about 400 KB.
//! 2. In-process, one thread: the decode stage (header checks, decode,
//!    resize, normalize) of each size, median over `--reps`, for the fast
//!    path and the legacy full-resolution path side by side.
//! 3. End to end: the sidecar as its own process per thread split
//!    (`--split DECODE:WORKERSxTHREADS`, default the model flags'), driven
//!    over gRPC by `loadgen` (closed loop) with each size in turn, `--rounds`
//!    times alternating servers and sizes; medians of frames/s and of the
//!    verdicts' decode time (which includes waiting for a decoder).

use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::median;
use super::serve::model_flags;
use super::ServerProcess;
use crate::calib::sets::SplitMix64;
use crate::cli::ModelArgs;
use crate::dataset::{shared_data_dir, RawSet};
use crate::domain::ImageInput;
use crate::model::Resize;
use crate::pipeline::decode::{jpeg_scale, probe, DecodeOptions, DecodePath, JpegBackend};
use crate::pipeline::Preprocessor;
use crate::wire::odin_v1;

/// A frame size, `WxH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (w, h) = s
            .split_once('x')
            .ok_or_else(|| format!("size {s:?} is not WxH"))?;
        let parse = |v: &str| {
            v.parse::<u32>()
                .ok()
                .filter(|v| (1..=8192).contains(v))
                .ok_or_else(|| format!("size {s:?} is not WxH with sides in 1..=8192"))
        };
        Ok(Size {
            width: parse(w)?,
            height: parse(h)?,
        })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// How a server shares the cores: concurrent decodes, engine workers,
/// intra-op threads per worker session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// `--decode-threads`.
    pub decode: usize,
    /// `--workers`.
    pub workers: usize,
    /// `--threads`.
    pub threads: usize,
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("split {s:?} is not DECODE:WORKERSxTHREADS, e.g. 2:2x1");
        let (d, rest) = s.split_once(':').ok_or_else(bad)?;
        let (w, t) = rest.split_once('x').ok_or_else(bad)?;
        let n = |v: &str| v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(bad);
        Ok(Split {
            decode: n(d)?,
            workers: n(w)?,
            threads: n(t)?,
        })
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--decode-threads {} --workers {} --threads {}",
            self.decode, self.workers, self.threads
        )
    }
}

/// Flags of `bench camera`.
#[derive(Debug, Clone, Args)]
pub struct CameraBench {
    /// Frame sizes, WxH, comma-separated; the first is the reference of the
    /// ratio column (32x32: what the model takes without resizing).
    #[arg(long, value_delimiter = ',', default_values_t = [
        Size { width: 32, height: 32 },
        Size { width: 640, height: 480 },
        Size { width: 1280, height: 720 },
        Size { width: 1920, height: 1080 },
    ])]
    pub sizes: Vec<Size>,
    /// JPEG quality of the frames.
    #[arg(long, default_value_t = 85)]
    pub quality: u8,
    /// Distinct frames per size, sent in turn.
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    /// Seconds of each load run (after one second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Rounds of load runs; each runs every size on every server in turn.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Streams of the closed-loop runs.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Frames in flight per stream.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Thread splits to compare, DECODE:WORKERSxTHREADS (repeatable), one
    /// server each; default: the model flags' own (`--decode-threads`,
    /// `--workers`, `--threads`).
    #[arg(long = "split")]
    pub splits: Vec<Split>,
    /// Decode-stage timings per size in the in-process micro-benchmark.
    #[arg(long, default_value_t = 61)]
    pub reps: usize,
    /// Mosaic tile side per 1080 frame rows, in pixels: sets the frames'
    /// entropy. The default, 96, gives 1080p q85 frames of about 400 KB
    /// (390 KiB), in the 300–450 KB cameras send; the decode time grows
    /// with the JPEG's size (80 gives 455 KB, 112 gives 360 KB).
    #[arg(long, default_value_t = 96)]
    pub tile: u32,
    /// Skip the end-to-end runs (micro-benchmark only).
    #[arg(long)]
    pub no_serve: bool,
    /// Also serve with the legacy full-resolution decode path (one more
    /// server, the default split) and report its frames/s.
    #[arg(long)]
    pub compare_legacy: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The frames of one size.
struct Frames {
    size: Size,
    jpegs: Vec<Vec<u8>>,
}

impl Frames {
    fn mean_kib(&self) -> f64 {
        self.jpegs.iter().map(Vec::len).sum::<usize>() as f64 / self.jpegs.len() as f64 / 1024.0
    }
}

/// 32×32 RGB tiles the frames are made of.
struct Tiles {
    images: Vec<Vec<u8>>,
    what: &'static str,
}

impl Tiles {
    fn load() -> Tiles {
        let dir = shared_data_dir();
        let sets: Vec<RawSet> = ["cifar10_test.u8", "tin_crop.u8"]
            .iter()
            .filter_map(|name| RawSet::open(&dir.join(name)).ok())
            .filter(|s| (s.width, s.height, s.channels) == (32, 32, 3))
            .collect();
        if sets.len() == 2 {
            // Alternate the two sets: a camera sees all sorts of things.
            let images = (0..4000)
                .map(|i| sets[i % 2].pixels(i / 2).to_vec())
                .collect();
            return Tiles {
                images,
                what: "mosaics of CIFAR-10 test and TinyImageNet-crop images (../shared/data)",
            };
        }
        let mut rng = SplitMix64(42);
        Tiles {
            images: (0..4000).map(|_| synthetic_tile(&mut rng)).collect(),
            what: "mosaics of synthetic tiles (no ../shared/data)",
        }
    }
}

/// A 32×32 natural-ish image: a smooth color field, a few soft-edged
/// ellipses, and noise, so upscaled mosaics compress like camera footage.
fn synthetic_tile(rng: &mut SplitMix64) -> Vec<u8> {
    let color = |rng: &mut SplitMix64| [0, 1, 2].map(|_| rng.uniform() * 255.0);
    let corners = [color(rng), color(rng), color(rng), color(rng)];
    let shapes: Vec<([f64; 3], f64, f64, f64, f64)> = (0..2 + rng.next_u64() % 3)
        .map(|_| {
            (
                color(rng),
                rng.uniform() * 32.0,
                rng.uniform() * 32.0,
                3.0 + rng.uniform() * 10.0,
                3.0 + rng.uniform() * 10.0,
            )
        })
        .collect();
    let mut px = Vec::with_capacity(32 * 32 * 3);
    for y in 0..32 {
        for x in 0..32 {
            let (fx, fy) = (f64::from(x) / 31.0, f64::from(y) / 31.0);
            for c in 0..3 {
                let mut v = corners[0][c] * (1.0 - fx) * (1.0 - fy)
                    + corners[1][c] * fx * (1.0 - fy)
                    + corners[2][c] * (1.0 - fx) * fy
                    + corners[3][c] * fx * fy;
                for (col, cx, cy, rx, ry) in &shapes {
                    let d = ((f64::from(x) - cx) / rx).powi(2) + ((f64::from(y) - cy) / ry).powi(2);
                    let inside = (1.5 - d).clamp(0.0, 1.0);
                    v = v * (1.0 - inside) + col[c] * inside;
                }
                v += rng.normal() * 12.0;
                px.push(v.clamp(0.0, 255.0) as u8);
            }
        }
    }
    px
}

/// One frame of `size`: tiles of `tile` px per 1080 rows (32 px at least),
/// upscaled bicubically, starting at tile `first`.
fn mosaic(tiles: &Tiles, size: Size, tile: u32, first: usize) -> Vec<u8> {
    let tile = (size.height * tile / 1080).max(32);
    let (cols, rows) = (size.width.div_ceil(tile), size.height.div_ceil(tile));
    let mut frame = image::RgbImage::new(size.width, size.height);
    for r in 0..rows {
        for c in 0..cols {
            let i = (first + (r * cols + c) as usize) % tiles.images.len();
            let Some(src) = image::RgbImage::from_raw(32, 32, tiles.images[i].clone()) else {
                continue;
            };
            let up = if tile == 32 {
                src
            } else {
                image::imageops::resize(&src, tile, tile, image::imageops::FilterType::CatmullRom)
            };
            image::imageops::replace(&mut frame, &up, i64::from(c * tile), i64::from(r * tile));
        }
    }
    frame.into_raw()
}

/// JPEG-encodes RGB pixels: libjpeg-turbo 4:2:0 (what cameras send) when
/// linked, else the `image` crate's encoder (4:4:4).
fn encode(rgb: &[u8], size: Size, quality: u8) -> anyhow::Result<Vec<u8>> {
    if tjdecode::AVAILABLE {
        return Ok(tjdecode::compress(
            rgb,
            size.width,
            size.height,
            tjdecode::PixelFormat::Rgb,
            quality,
            tjdecode::Subsampling::S420,
            false,
        )?);
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode(
        rgb,
        size.width,
        size.height,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// Median time of `pre`'s decode stage on `inputs`, taken in turn, `reps` times.
fn decode_stage(
    pre: &Preprocessor,
    inputs: &[ImageInput],
    reps: usize,
) -> anyhow::Result<Duration> {
    let mut times = Vec::with_capacity(reps);
    for r in 0..reps + 2 {
        let input = &inputs[r % inputs.len()];
        let t = Instant::now();
        let tensor = pre.tensor(Some(input))?;
        let elapsed = t.elapsed();
        std::hint::black_box(tensor);
        if r >= 2 {
            times.push(elapsed);
        }
    }
    Ok(median(times))
}

/// What one load run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    fps: f64,
    decode_us: f64,
    errors: u64,
}

/// Runs `bench camera`.
pub async fn run(args: &CameraBench) -> anyhow::Result<ExitCode> {
    use crate::loadgen::{self, LoadConfig, Mode, Pacing, Target};

    anyhow::ensure!(
        !args.sizes.is_empty() && args.frames > 0 && args.rounds > 0,
        "--sizes, --frames and --rounds need at least one"
    );
    // 1. Frames.
    let tiles = Tiles::load();
    let mut sets = Vec::new();
    let mut first = 0;
    for &size in &args.sizes {
        let mut jpegs = Vec::new();
        for _ in 0..args.frames {
            jpegs.push(encode(
                &mosaic(&tiles, size, args.tile, first),
                size,
                args.quality,
            )?);
            first += 400;
        }
        sets.push(Frames { size, jpegs });
    }
    let config = args.model.config()?;
    let model = crate::model::Model::load(&config.model)?;
    let fast = crate::app::preprocessor(&model, &config);
    // The old path: full-resolution decode, then image's f32 Triangle.
    let legacy = Preprocessor::with_options(
        &model.card.input,
        config.decode_limits(),
        DecodeOptions {
            path: DecodePath::Legacy,
            resize: Some(Resize::Bilinear),
            jpeg: None,
        },
    );
    let (w, h) = fast.input_size();
    println!(
        "model {name} ({w}x{h}, resize {resize}); frames: JPEG q{q} {encoder}, {n} per size, {what}; JPEG decoder {backend}",
        name = model.card.name,
        resize = fast.resize().as_str(),
        q = args.quality,
        encoder = if tjdecode::AVAILABLE {
            "4:2:0 (libjpeg-turbo)"
        } else {
            "4:4:4 (image's encoder: built without libjpeg-turbo)"
        },
        n = args.frames,
        what = tiles.what,
        backend = JpegBackend::preferred().as_str()
    );

    // 2. In-process, one thread, before any server runs.
    let mut micro = Vec::new();
    for set in &sets {
        let inputs: Vec<ImageInput> = set
            .jpegs
            .iter()
            .map(|j| ImageInput::Encoded(j.clone()))
            .collect();
        let f = decode_stage(&fast, &inputs, args.reps)?;
        let l = decode_stage(&legacy, &inputs, (args.reps / 4).max(5))?;
        let header = probe(&set.jpegs[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (d, sw, sh) = jpeg_scale(&header, w, h, &fast.jpeg_options());
        micro.push((f, l, format!("1/{d} → {sw}x{sh}")));
    }

    // 3. End to end, one server per split (and the legacy path), alternating.
    let default_split = Split {
        decode: args.model.decode_threads,
        workers: args.model.workers,
        threads: args.model.threads,
    };
    let mut splits: Vec<(Split, DecodePath)> = if args.splits.is_empty() {
        vec![(default_split, args.model.decode)]
    } else {
        args.splits
            .iter()
            .map(|s| (*s, args.model.decode))
            .collect()
    };
    if args.compare_legacy {
        splits.push((default_split, DecodePath::Legacy));
    }
    let label = |(split, path): &(Split, DecodePath)| match path {
        DecodePath::Fast => split.to_string(),
        DecodePath::Legacy => format!("{split} --decode legacy --resize bilinear (the old path)"),
    };
    let mut runs = vec![vec![Vec::<Run>::new(); sets.len()]; splits.len()];
    let mut rss = vec![None; splits.len()];
    if !args.no_serve {
        let mut servers: Vec<ServerProcess> = Vec::new();
        for (split, path) in &splits {
            let mut model_args = args.model.clone();
            model_args.workers = split.workers;
            model_args.threads = split.threads;
            let mut flags = model_flags(&model_args);
            flags.extend([
                "--decode-threads".into(),
                split.decode.to_string(),
                "--decode".into(),
                path.as_str().into(),
            ]);
            let resize = match path {
                DecodePath::Legacy => Some(Resize::Bilinear),
                DecodePath::Fast => args.model.resize,
            };
            if let Some(resize) = resize {
                flags.extend(["--resize".into(), resize.as_str().into()]);
            }
            servers.push(ServerProcess::start(&flags).await?);
        }
        let pools: Vec<Arc<Vec<odin_v1::Frame>>> = sets
            .iter()
            .map(|set| {
                Arc::new(
                    set.jpegs
                        .iter()
                        .map(|j| odin_v1::Frame {
                            image: Some(odin_v1::frame::Image::Encoded(j.clone())),
                            ..Default::default()
                        })
                        .collect(),
                )
            })
            .collect();
        for round in 0..args.rounds {
            for (k, set) in sets.iter().enumerate() {
                for (s, server) in servers.iter().enumerate() {
                    let report = loadgen::run(
                        LoadConfig {
                            target: Target::Tcp(server.addr.clone()),
                            mode: Mode::Stream,
                            connections: 1,
                            streams: args.streams,
                            pacing: Pacing::Closed {
                                in_flight: args.in_flight,
                            },
                            duration: Some(Duration::from_secs_f64(args.seconds + 1.0)),
                            frames: None,
                            warmup: Duration::from_secs(1),
                            pool: Arc::clone(&pools[k]),
                        },
                        false,
                    )
                    .await?;
                    let run = Run {
                        fps: report.frames_per_second(),
                        decode_us: report.stats.decode.value_at_quantile(0.5) as f64,
                        errors: report.stats.error_count(),
                    };
                    eprintln!(
                        "round {}/{}, {}, {}: {:.0} frames/s, median decode {:.0} µs, {} errors",
                        round + 1,
                        args.rounds,
                        set.size,
                        label(&splits[s]),
                        run.fps,
                        run.decode_us,
                        run.errors
                    );
                    runs[s][k].push(run);
                }
            }
        }
        for (s, server) in servers.iter().enumerate() {
            rss[s] = server.peak_rss_mib();
        }
    }

    // Tables.
    let med = |v: &[Run], f: fn(&Run) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x.get(x.len() / 2).copied().unwrap_or(0.0)
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let serve = |text: String| {
        if args.no_serve {
            "—".to_string()
        } else {
            text
        }
    };
    println!();
    if !args.no_serve {
        println!(
            "server: {}; {} streams × {} in flight, {} rounds of {} s, medians; peak RSS {}",
            label(&splits[0]),
            args.streams,
            args.in_flight,
            args.rounds,
            args.seconds,
            rss[0].map_or("unavailable".into(), |r| format!("{r:.0} MiB")),
        );
    }
    println!(
        "| frame | JPEG | DCT scale | decode stage, 1 thread | old path, 1 thread | end-to-end ODIN frames/s | median decode per frame (verdicts) | frames/s ÷ {} |",
        sets[0].size
    );
    println!("|---|---|---|---|---|---|---|---|");
    let base = med(&runs[0][0], |r| r.fps);
    for (k, set) in sets.iter().enumerate() {
        let (f, l, scale) = &micro[k];
        let fps = med(&runs[0][k], |r| r.fps);
        let errors: u64 = runs[0][k].iter().map(|r| r.errors).sum();
        println!(
            "| {} | {:.0} KiB | {scale} | {:.2} ms | {:.2} ms | {} | {} | {} |",
            set.size,
            set.mean_kib(),
            ms(*f),
            ms(*l),
            serve(if errors > 0 {
                format!("{fps:.0} ({errors} errors)")
            } else {
                format!("{fps:.0}")
            }),
            serve(format!(
                "{:.2} ms",
                med(&runs[0][k], |r| r.decode_us) / 1000.0
            )),
            serve(if base == 0.0 {
                "—".to_string()
            } else {
                format!("{:.2}", fps / base)
            }),
        );
    }
    if splits.len() > 1 && !args.no_serve {
        println!("\nend-to-end ODIN frames/s, medians:\n");
        let sizes: Vec<String> = sets.iter().map(|s| s.size.to_string()).collect();
        println!("| server | {} | peak RSS |", sizes.join(" | "));
        println!("|---|{}---|", "---|".repeat(sets.len()));
        for (s, contender) in splits.iter().enumerate() {
            let fps: Vec<String> = (0..sets.len())
                .map(|k| format!("{:.0}", med(&runs[s][k], |r| r.fps)))
                .collect();
            println!(
                "| `{}` | {} | {} |",
                label(contender),
                fps.join(" | "),
                rss[s].map_or("—".into(), |r| format!("{r:.0} MiB")),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_splits_parse() {
        assert_eq!(
            "1920x1080".parse::<Size>(),
            Ok(Size {
                width: 1920,
                height: 1080
            })
        );
        assert!("1920".parse::<Size>().is_err() && "0x5".parse::<Size>().is_err());
        assert_eq!(
            "1:2x1".parse::<Split>(),
            Ok(Split {
                decode: 1,
                workers: 2,
                threads: 1
            })
        );
        assert!("2x1".parse::<Split>().is_err() && "0:1x1".parse::<Split>().is_err());
    }

    #[test]
    fn synthetic_frames_are_camera_like() {
        let mut rng = SplitMix64(1);
        let tiles = Tiles {
            images: (0..400).map(|_| synthetic_tile(&mut rng)).collect(),
            what: "",
        };
        let size = Size {
            width: 960,
            height: 540,
        };
        let jpeg = encode(&mosaic(&tiles, size, 96, 0), size, 85).expect("encodes");
        let header = probe(&jpeg).expect("a JPEG");
        assert_eq!((header.width, header.height), (960, 540));
        // Neither flat nor noise: 1.5 bits per pixel is a 400 KB 1080p frame.
        let bits = jpeg.len() as f64 * 8.0 / f64::from(960 * 540);
        assert!((0.5..4.0).contains(&bits), "{bits} bits per pixel");
    }
}
