//! `odin-sidecar detect FILES…`: judge frames in-process through the same
//! pipeline `serve` uses, and print one verdict per frame (table or JSON
//! lines), then a summary with frames/s (and accuracy when labels exist).
//!
//! A FILE is a JPEG/PNG image, or a raw set `NAME.u8` (with `NAME.json`
//! beside it, as in `shared/data`), which expands to all its images.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use tokio::sync::mpsc;

use super::ModelArgs;
use crate::app::App;
use crate::dataset::RawSet;
use crate::pipeline::order;
use crate::wire::{frame::Image, Frame, Verdict};

/// Flags of `detect`.
#[derive(Debug, Clone, Args)]
pub struct DetectArgs {
    /// Images (JPEG/PNG) or raw sets (NAME.u8 with NAME.json).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print only the summary.
    #[arg(long, short)]
    pub quiet: bool,
    /// Judge at most this many frames per raw set.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// One frame to judge and, where known, its true class.
struct Item {
    frame: Frame,
    label: Option<u8>,
}

fn items(args: &DetectArgs) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    for path in &args.files {
        let name = path.display().to_string();
        if path.extension().is_some_and(|e| e == "u8") {
            let set = RawSet::open(path)?;
            let n = args.limit.map_or(set.n, |l| l.min(set.n));
            items.extend((0..n).map(|i| Item {
                frame: Frame {
                    frame_id: format!("{name}#{i}"),
                    image: Some(Image::Raw(set.raw(i))),
                    ..Frame::default()
                },
                label: set.labels.as_ref().map(|l| l[i]),
            }));
        } else {
            let bytes =
                std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {name}: {e}"))?;
            items.push(Item {
                frame: Frame {
                    frame_id: name,
                    image: Some(Image::Encoded(bytes)),
                    ..Frame::default()
                },
                label: None,
            });
        }
    }
    Ok(items)
}

/// Runs `detect`.
pub async fn run(args: DetectArgs) -> anyhow::Result<ExitCode> {
    let items = items(&args)?;
    let app = App::build(&args.model.config()?).await?;
    let (frames, labels): (Vec<Frame>, Vec<Option<u8>>) =
        items.into_iter().map(|i| (i.frame, i.label)).unzip();
    let total = frames.len();
    // The same ordered, windowed driver a gRPC stream uses.
    let window = 4 * args.model.max_batch.max(1) * args.model.workers.max(1);
    let (tx, mut rx) = mpsc::channel(window);
    let started = Instant::now();
    let inbound = tokio_stream::iter(frames.into_iter().map(Ok));
    tokio::spawn(order::drive(
        app.pipeline(),
        inbound,
        tx,
        window,
        opentelemetry::Context::new(),
    ));

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if !args.quiet && !args.json {
        writeln!(
            out,
            "{:<32} {:>5} {:<12} {:>10} {:>8} {:>11}",
            "frame", "class", "label", "score", "in-dist", "max_softmax"
        )?;
    }
    let (mut correct, mut labelled, mut errors, mut kept) = (0usize, 0usize, 0usize, 0usize);
    let mut labels = labels.into_iter();
    while let Some(verdict) = rx.recv().await {
        let verdict = verdict?;
        let label = labels.next().flatten();
        if let Some(error) = &verdict.error {
            errors += 1;
            if !args.quiet && !args.json {
                writeln!(
                    out,
                    "{:<32} error {}: {}",
                    verdict.frame_id, error.reason, error.message
                )?;
            }
        } else {
            kept += usize::from(verdict.in_distribution);
            if let Some(label) = label {
                labelled += 1;
                correct += usize::from(verdict.predicted_class == i32::from(label));
            }
            if !args.quiet && !args.json {
                print_row(&mut out, &verdict)?;
            }
        }
        if args.json && !args.quiet {
            writeln!(out, "{}", verdict_json(&verdict))?;
        }
    }
    out.flush()?;
    let seconds = started.elapsed().as_secs_f64();
    let accuracy = if labelled > 0 {
        format!(
            ", accuracy {:.4} on {labelled} labelled",
            correct as f64 / labelled as f64
        )
    } else {
        String::new()
    };
    eprintln!(
        "{total} frames in {seconds:.2} s ({:.1} frames/s): {kept} in-distribution, {errors} errors{accuracy}",
        total as f64 / seconds
    );
    Ok(if errors > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_row(out: &mut impl Write, v: &Verdict) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32} {:>5} {:<12} {:>10.6} {:>8} {:>11.6}",
        v.frame_id, v.predicted_class, v.label, v.score, v.in_distribution, v.max_softmax
    )
}

fn verdict_json(v: &Verdict) -> serde_json::Value {
    let timings = v.timings.unwrap_or_default();
    serde_json::json!({
        "frame_id": v.frame_id,
        "in_distribution": v.in_distribution,
        "score": v.score,
        "threshold": v.threshold,
        "method": v.method,
        "predicted_class": v.predicted_class,
        "label": v.label,
        "max_softmax": v.max_softmax,
        "timings_us": {"decode": timings.decode_us, "queue": timings.queue_us, "inference": timings.inference_us, "total": timings.total_us},
        "error": v.error.as_ref().map(|e| serde_json::json!({"code": e.code, "reason": e.reason, "message": e.message})),
    })
}
