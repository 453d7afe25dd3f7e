//! Per-stream ordering: frames of one stream are judged concurrently (so a
//! stream can fill a batch on its own) but answered strictly in the order
//! they arrived, exactly one verdict per frame.
//!
//! At most `window` frames of a stream are in flight; past that the stream
//! is not read, and HTTP/2 flow control holds the producer back.

use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, StreamExt};
use opentelemetry::Context;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use super::Pipeline;
use crate::telemetry::Method;
use crate::wire::{Frame, Verdict};

/// Default number of frames one stream may have in flight.
pub const DEFAULT_WINDOW: usize = 64;

/// Reads `frames` until the client half-closes (or the stream fails),
/// answers every frame read, in order, on `verdicts`, then returns.
/// Returns early, dropping pending work, when the client goes away.
/// Frames without their own `traceparent` are traced under `parent`, the
/// call's trace context.
pub async fn drive<S>(
    pipeline: Arc<Pipeline>,
    mut frames: S,
    verdicts: mpsc::Sender<Result<Verdict, Status>>,
    window: usize,
    parent: Context,
) where
    S: Stream<Item = Result<Frame, Status>> + Unpin,
{
    let mut in_flight = FuturesOrdered::new();
    let mut reading = true;
    loop {
        tokio::select! {
            // Answer first: a verdict that is ready goes out before reading more.
            biased;
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                let crate::pipeline::Answer { verdict, finish } = answer;
                if verdicts.send(Ok(verdict)).await.is_err() {
                    return; // The client left; dropping `in_flight` cancels the rest.
                }
                // Sent: the frame's respond stage and span end here.
                drop(finish);
            }
            frame = frames.next(), if reading && in_flight.len() < window.max(1) => match frame {
                Some(Ok(frame)) => {
                    let pipeline = Arc::clone(&pipeline);
                    let parent = parent.clone();
                    in_flight.push_back(async move {
                        pipeline.judge_traced(frame, &parent, Method::Detect).await
                    });
                }
                Some(Err(status)) => {
                    tracing::debug!(%status, "inbound stream failed; answering pending frames");
                    reading = false;
                }
                None => reading = false,
            },
            else => return,
        }
    }
}
