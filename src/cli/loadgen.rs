//! `odin-sidecar loadgen`: drive a running sidecar with streams or unary
//! calls, closed or open loop, and report per-frame latency.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::calib::sets::SplitMix64;
use crate::dataset::RawSet;
use crate::loadgen::{self, LoadConfig, Mode, Pacing, Target};
use crate::wire::odin_v1::{frame::Image, Frame, RawImage};

/// Report format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned table.
    Table,
    /// One JSON object.
    Json,
    /// Header row and value row.
    Csv,
}

/// Flags of `loadgen`.
#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// Target `host:port` (TCP).
    #[arg(long, default_value = crate::config::DEFAULT_ADDR, conflicts_with = "uds")]
    pub addr: String,
    /// Target Unix domain socket path instead of TCP.
    #[arg(long)]
    pub uds: Option<PathBuf>,
    /// HTTP/2 connections.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub connections: usize,
    /// Streams (or unary workers) per connection.
    #[arg(long, short = 's', default_value_t = 8)]
    pub streams: usize,
    /// Use unary DetectOne calls instead of Detect streams.
    #[arg(long)]
    pub unary: bool,
    /// Closed loop: frames in flight per stream or worker.
    #[arg(long, default_value_t = 4, conflicts_with = "rate")]
    pub in_flight: usize,
    /// Open loop: target frames per second over all streams.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Run this many seconds (warm-up included).
    #[arg(long, short = 'd')]
    pub duration: Option<f64>,
    /// Send this many frames in total.
    #[arg(long, short = 'n')]
    pub frames: Option<u64>,
    /// Seconds at the start whose frames are not measured.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Frames from a raw set NAME.u8 or a folder of JPEG/PNG; synthetic 32x32 noise if omitted.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Also write the report here.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// No live progress line.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The frames a run cycles through (also `bench tracing`'s).
pub(crate) fn frames(data: Option<&PathBuf>) -> anyhow::Result<Vec<Frame>> {
    let frame = |image| Frame {
        image: Some(image),
        ..Frame::default()
    };
    let Some(path) = data else {
        let mut rng = SplitMix64(3);
        return Ok((0..64)
            .map(|_| {
                let pixels = (0..32 * 32 * 3)
                    .map(|_| (rng.next_u64() & 0xff) as u8)
                    .collect();
                frame(Image::Raw(RawImage {
                    width: 32,
                    height: 32,
                    channels: 3,
                    pixels,
                }))
            })
            .collect());
    };
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        let mut out = Vec::new();
        for f in files {
            if f.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "jpg" | "jpeg" | "png"))
            {
                out.push(frame(Image::Encoded(std::fs::read(&f)?)));
            }
        }
        anyhow::ensure!(!out.is_empty(), "no JPEG/PNG files in {}", path.display());
        return Ok(out);
    }
    let set = RawSet::open(path)?;
    // At most 4096 distinct frames: plenty of variety, little memory.
    Ok((0..set.n.min(4096))
        .map(|i| frame(Image::Raw(set.raw(i).into())))
        .collect())
}

/// Runs `loadgen`.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<ExitCode> {
    let config = LoadConfig {
        target: match &args.uds {
            Some(path) => Target::Unix(path.clone()),
            None => Target::Tcp(args.addr.clone()),
        },
        mode: if args.unary {
            Mode::Unary
        } else {
            Mode::Stream
        },
        connections: args.connections,
        streams: args.streams,
        pacing: match args.rate {
            Some(rate) => {
                anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
                Pacing::Open { rate }
            }
            None => Pacing::Closed {
                in_flight: args.in_flight,
            },
        },
        duration: args.duration.map(Duration::from_secs_f64),
        frames: args.frames,
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        pool: Arc::new(frames(args.data.as_ref())?),
    };
    let report = loadgen::run(config, !args.quiet).await?;
    let text = match args.format {
        Format::Table => report.table(),
        Format::Json => serde_json::to_string_pretty(&report.json())? + "\n",
        Format::Csv => report.csv(),
    };
    print!("{text}");
    if let Some(path) = &args.output {
        std::fs::write(path, &text)?;
    }
    Ok(ExitCode::SUCCESS)
}
