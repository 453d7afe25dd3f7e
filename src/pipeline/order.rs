//! Per-stream ordering: frames of one stream are judged concurrently (so a
//! stream can fill a batch on its own) but answered strictly in the order
//! they arrived, exactly one verdict per frame.
//!
//! At most `window` frames of a stream are in flight; past that the stream
//! is not read, and HTTP/2 flow control holds the producer back.

use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use super::Pipeline;
use crate::wire::{Frame, Verdict};

/// Default number of frames one stream may have in flight.
pub const DEFAULT_WINDOW: usize = 64;

/// Reads `frames` until the client half-closes (or the stream fails),
/// answers every frame read, in order, on `verdicts`, then returns.
/// Returns early, dropping pending work, when the client goes away.
pub async fn drive<S>(
    pipeline: Arc<Pipeline>,
    mut frames: S,
    verdicts: mpsc::Sender<Result<Verdict, Status>>,
    window: usize,
) where
    S: Stream<Item = Result<Frame, Status>> + Unpin,
{
    let mut in_flight = FuturesOrdered::new();
    let mut reading = true;
    loop {
        tokio::select! {
            // Answer first: a verdict that is ready goes out before reading more.
            biased;
            Some(verdict) = in_flight.next(), if !in_flight.is_empty() => {
                if verdicts.send(Ok(verdict)).await.is_err() {
                    return; // The client left; dropping `in_flight` cancels the rest.
                }
            }
            frame = frames.next(), if reading && in_flight.len() < window.max(1) => match frame {
                Some(Ok(frame)) => in_flight.push_back(Arc::clone(&pipeline).judge(frame)),
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
