//! `odin-sidecar detect FILES…`: judge frames in-process through the same
//! pipeline `serve` uses, and print one verdict per frame (table or JSON
//! lines), then a summary with frames/s (and accuracy when labels exist).
//!
//! A FILE is a JPEG/PNG image, a raw set `NAME.u8` (with `NAME.json`
//! beside it, as in `shared/data`), or a packed JPEG set `NAME.jpgpack`
//! (with `NAME.offsets.u64`); a set expands to all its images (packed ones
//! are read as they are sent, not all at once).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use tokio::sync::mpsc;

use super::ModelArgs;
use crate::app::App;
use crate::dataset::{JpegPack, RawSet};
use crate::domain::{FrameRequest, ImageInput, Judgement};
use crate::error::CallError;
use crate::pipeline::order;
use crate::pipeline::Caller;

/// Flags of `detect`.
#[derive(Debug, Clone, Args)]
pub struct DetectArgs {
    /// Images (JPEG/PNG), raw sets (NAME.u8 with NAME.json) or packed JPEG
    /// sets (NAME.jpgpack with NAME.offsets.u64).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print only the summary.
    #[arg(long, short)]
    pub quiet: bool,
    /// Judge at most this many frames per set.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// One frame to judge and, where known, its true class.
struct Item {
    frame: FrameRequest,
    /// Image `i` of a packed set, read when the frame is sent.
    packed: Option<(std::sync::Arc<JpegPack>, usize)>,
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
                frame: FrameRequest {
                    id: format!("{name}#{i}"),
                    image: Some(ImageInput::Raw(set.raw(i))),
                    ..FrameRequest::default()
                },
                packed: None,
                label: set.labels.as_ref().map(|l| l[i]),
            }));
        } else if path.extension().is_some_and(|e| e == "jpgpack") {
            let pack = std::sync::Arc::new(JpegPack::open(path)?);
            let n = args.limit.map_or(pack.n, |l| l.min(pack.n));
            items.extend((0..n).map(|i| Item {
                frame: FrameRequest {
                    id: format!("{name}#{i}"),
                    ..FrameRequest::default()
                },
                packed: Some((std::sync::Arc::clone(&pack), i)),
                label: pack.labels.as_ref().map(|l| l[i]),
            }));
        } else {
            let bytes =
                std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {name}: {e}"))?;
            items.push(Item {
                frame: FrameRequest {
                    id: name,
                    image: Some(ImageInput::Encoded(bytes)),
                    ..FrameRequest::default()
                },
                packed: None,
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
    let total = items.len();
    let labels: Vec<Option<u8>> = items.iter().map(|i| i.label).collect();
    let frames = items.into_iter().map(|item| {
        let mut frame = item.frame;
        if let Some((pack, i)) = item.packed {
            // An unreadable image is sent empty and gets its own error verdict.
            frame.image = match pack.encoded(i) {
                Ok(bytes) => Some(ImageInput::Encoded(bytes)),
                Err(e) => {
                    eprintln!("{}: {e}", frame.id);
                    None
                }
            };
        }
        frame
    });
    // The same ordered, windowed driver a gRPC stream uses.
    let window = 4 * args.model.max_batch.max(1) * args.model.workers.max(1);
    let (tx, mut rx) = mpsc::channel(window);
    let started = Instant::now();
    let inbound = tokio_stream::iter(frames.map(Ok::<_, CallError>));
    // Never drained: `detect` ends when its frames do.
    let (_never, draining) = tokio::sync::watch::channel(false);
    let options = order::StreamOptions {
        window,
        caller: Caller::in_process(),
        draining,
        admitted: order::AdmitHook::default(),
    };
    tokio::spawn(order::drive(
        app.pipeline(),
        inbound,
        tx,
        |judgement| judgement,
        options,
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
    while let Some(judgement) = rx.recv().await {
        let judgement = judgement?;
        let label = labels.next().flatten();
        match &judgement.outcome {
            Err(error) => {
                errors += 1;
                if !args.quiet && !args.json {
                    writeln!(
                        out,
                        "{:<32} error {}: {error}",
                        judgement.frame_id,
                        error.reason().as_str()
                    )?;
                }
            }
            Ok(decision) => {
                kept += usize::from(decision.in_distribution);
                if let Some(label) = label {
                    labelled += 1;
                    correct += usize::from(decision.predicted_class == usize::from(label));
                }
                if !args.quiet && !args.json {
                    writeln!(
                        out,
                        "{:<32} {:>5} {:<12} {:>10.6} {:>8} {:>11.6}",
                        judgement.frame_id,
                        decision.predicted_class,
                        decision.label,
                        decision.score,
                        decision.in_distribution,
                        decision.max_softmax
                    )?;
                }
            }
        }
        if args.json && !args.quiet {
            writeln!(out, "{}", judgement_json(&judgement))?;
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

/// One JSON line per frame: the fields of an `odin.v1` verdict.
fn judgement_json(j: &Judgement) -> serde_json::Value {
    let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let t = j.timings;
    let mut json = serde_json::json!({
        "frame_id": j.frame_id,
        "method": j.scoring.map(|s| s.scoring.method.as_str()).unwrap_or_default(),
        "threshold": j.scoring.map(|s| s.threshold).unwrap_or_default(),
        "timings_us": {"decode": us(t.decode), "queue": us(t.queue), "inference": us(t.inference), "total": us(t.total)},
    });
    match &j.outcome {
        Ok(d) => {
            json["in_distribution"] = d.in_distribution.into();
            json["score"] = d.score.into();
            json["predicted_class"] = d.predicted_class.into();
            json["label"] = d.label.clone().into();
            json["max_softmax"] = d.max_softmax.into();
            json["error"] = serde_json::Value::Null;
        }
        Err(e) => {
            json["error"] = serde_json::json!({"code": e.code() as i32, "reason": e.reason().as_str(), "message": e.to_string()});
        }
    }
    json
}
