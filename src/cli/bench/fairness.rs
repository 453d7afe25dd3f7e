//! `bench fairness`: does one client's expensive traffic stall another's?
//!
//! Client B sends small frames with `DetectOne` at a modest rate, on its own
//! connection, twice in one run: alone, then while client A streams the
//! most expensive frames the server accepts (a PNG at the pixel limit, which
//! must be decoded in full). The table gives B's latency both times, side
//! by side, and A's throughput. A hostile "bomb" (a tiny JPEG whose header
//! claims 8192×8192) is also timed: it must be refused from its header.

use std::io::Cursor;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::overload::raw_frames;
use super::serve::model_flags;
use super::ServerProcess;
use crate::cli::ModelArgs;
use crate::loadgen::{self, LoadConfig, Mode, Pacing, Target};
use crate::wire::odin_v1::{detector_client::DetectorClient, frame::Image, Frame};

/// Flags of `bench fairness`.
#[derive(Debug, Clone, Args)]
pub struct FairnessBench {
    /// Seconds of each of the two runs of client B.
    #[arg(long, default_value_t = 15.0)]
    pub seconds: f64,
    /// Client B's rate, frames per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Side of client A's square PNG frames, in pixels (at most the
    /// server's --max-pixels).
    #[arg(long, default_value_t = 4096)]
    pub side: u32,
    /// Size of client B's raw frames, WIDTHxHEIGHT. Frames of at most
    /// 128×128 are decoded in place and never wait for a decoder; larger
    /// ones show how the decoders are shared.
    #[arg(long, default_value = "32x32")]
    pub b_frame: String,
    /// Client A's streams.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Extra flags for the server process (`serve`).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub server_flags: String,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// A square PNG of side `side` with smooth content: small on the wire,
/// expensive to decode in full.
fn expensive_png(side: u32) -> anyhow::Result<Vec<u8>> {
    let image = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x / 16) as u8, (y / 16) as u8, ((x + y) / 32) as u8])
    });
    let mut png = Vec::new();
    image.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

/// The bytes of a baseline JPEG header claiming `side`×`side`, with a few
/// bytes of scan data: what a decoder that trusts headers would allocate
/// hundreds of megabytes for.
fn jpeg_bomb(side: u16) -> Vec<u8> {
    let tiny = image::RgbImage::from_pixel(8, 8, image::Rgb([128, 128, 128]));
    let mut jpeg = Vec::new();
    // An 8×8 encode is a valid file; its SOF0 dimensions are then patched.
    if tiny
        .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .is_err()
    {
        return jpeg;
    }
    if let Some(sof) = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]) {
        let [hi, lo] = side.to_be_bytes();
        // Marker, length (2), precision (1), then height and width.
        jpeg[sof + 5] = hi;
        jpeg[sof + 6] = lo;
        jpeg[sof + 7] = hi;
        jpeg[sof + 8] = lo;
    }
    jpeg
}

fn b_load(addr: &str, rate: f64, seconds: f64, pool: &Arc<Vec<Frame>>) -> LoadConfig {
    LoadConfig {
        target: Target::Tcp(addr.to_string()),
        mode: Mode::Unary,
        connections: 1,
        streams: 1,
        pacing: Pacing::Open { rate },
        duration: Some(Duration::from_secs_f64(seconds)),
        frames: None,
        warmup: Duration::from_secs(1),
        pool: Arc::clone(pool),
    }
}

/// Runs `bench fairness`.
pub async fn run(args: &FairnessBench) -> anyhow::Result<ExitCode> {
    let mut flags = model_flags(&args.model);
    flags.extend(args.server_flags.split_whitespace().map(str::to_string));
    let server = ServerProcess::start(&flags).await?;
    let addr = server.addr.clone();
    let small = raw_frames(&args.b_frame, 8)?;

    // A hostile header: refused before anything is allocated.
    let mut client = DetectorClient::connect(format!("http://{addr}")).await?;
    let bomb = Frame {
        image: Some(Image::Encoded(jpeg_bomb(8192))),
        ..Frame::default()
    };
    let started = Instant::now();
    let verdict = client.detect_one(bomb).await?.into_inner();
    let bomb_time = started.elapsed();
    let bomb_reason = verdict.error.map(|e| e.reason).unwrap_or_default();

    // Client B alone.
    let alone = loadgen::run(b_load(&addr, args.rate, args.seconds, &small), false).await?;

    // Client A's expensive frames, on their own connection, for as long as B runs.
    let png = expensive_png(args.side)?;
    let heavy = Arc::new(vec![Frame {
        frame_id: "expensive".into(),
        image: Some(Image::Encoded(png.clone())),
        ..Frame::default()
    }]);
    let attack = LoadConfig {
        target: Target::Tcp(addr.clone()),
        mode: Mode::Stream,
        connections: 1,
        streams: args.streams,
        pacing: Pacing::Closed { in_flight: 16 },
        duration: Some(Duration::from_secs_f64(args.seconds + 2.0)),
        frames: None,
        warmup: Duration::from_secs(1),
        pool: heavy,
    };
    let attacker = tokio::spawn(loadgen::run(attack, false));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attacked = loadgen::run(b_load(&addr, args.rate, args.seconds, &small), false).await?;
    let a = attacker.await??;
    drop(server);

    println!(
        "| client B ({:.0} DetectOne/s, {}) | p50 (ms) | p99 (ms) | max (ms) | decode p99, server (ms) | answered | errors |",
        args.rate, args.b_frame
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in [("alone", &alone), ("while A streams", &attacked)] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.latency_ms(0.5),
            r.latency_ms(0.99),
            r.latency_ms(1.0),
            r.stats.decode.value_at_quantile(0.99) as f64 / 1000.0,
            r.stats.answered,
            r.stats.error_count()
        );
    }
    println!();
    println!(
        "client A: {} streams of {}×{} PNG ({} KB each), {:.1} frames/s, median engine+decode latency {:.0} ms",
        args.streams,
        args.side,
        args.side,
        png.len() / 1024,
        a.frames_per_second(),
        a.latency_ms(0.5)
    );
    println!(
        "a {}-byte JPEG claiming 8192×8192: {bomb_reason} in {:.2} ms",
        jpeg_bomb(8192).len(),
        bomb_time.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}
