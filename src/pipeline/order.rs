//! Per-stream ordering: frames of one stream are judged concurrently (so a
//! stream can fill a batch on its own) but answered strictly in the order
//! they arrived, exactly one answer per frame.
//!
//! At most `window` frames of a stream are in flight; past that the stream
//! is not read, and HTTP/2 flow control holds the producer back.

use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, StreamExt};
use opentelemetry::Context;
use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::{Answer, Pipeline};
use crate::domain::{FrameRequest, Judgement};
use crate::telemetry::Rpc;

/// Default number of frames one stream may have in flight.
pub const DEFAULT_WINDOW: usize = 64;

/// One stream's settings.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Frames in flight before the stream stops being read.
    pub window: usize,
    /// The call's trace context: the parent of frames without their own.
    pub parent: Context,
    /// The RPC the stream came on.
    pub rpc: Rpc,
}

/// Reads `frames` until the client half-closes (or the stream fails),
/// answers every frame read, in order, on `answers` (each judgement turned
/// into the edge's message by `respond`), then returns. Returns early,
/// dropping pending work, when the client goes away.
pub async fn drive<S, E, T>(
    pipeline: Arc<Pipeline>,
    mut frames: S,
    answers: mpsc::Sender<Result<T, E>>,
    respond: impl Fn(Judgement) -> T,
    options: StreamOptions,
) where
    S: Stream<Item = Result<FrameRequest, E>> + Unpin,
    E: std::fmt::Display,
{
    let StreamOptions {
        window,
        parent,
        rpc,
    } = options;
    let mut in_flight = FuturesOrdered::new();
    let mut reading = true;
    loop {
        tokio::select! {
            // Answer first: a judgement that is ready goes out before reading more.
            biased;
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                let Answer { judgement, finish } = answer;
                if answers.send(Ok(respond(judgement))).await.is_err() {
                    return; // The client left; dropping `in_flight` cancels the rest.
                }
                // Sent: the frame's respond stage and span end here.
                drop(finish);
            }
            // The client left while the next answer is not ready: stop now,
            // so the frames behind a slow one are not computed for nobody.
            _ = answers.closed(), if reading || !in_flight.is_empty() => return,
            frame = frames.next(), if reading && in_flight.len() < window.max(1) => match frame {
                Some(Ok(frame)) => {
                    let pipeline = Arc::clone(&pipeline);
                    let parent = parent.clone();
                    in_flight.push_back(async move {
                        pipeline.judge(frame, &parent, rpc).await
                    });
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "inbound stream failed; answering pending frames");
                    reading = false;
                }
                None => reading = false,
            },
            else => return,
        }
    }
}

#[cfg(test)]
mod tests;
