//! Per-stream ordering: frames of one stream are judged concurrently (so a
//! stream can fill a batch on its own) but answered strictly in the order
//! they arrived, exactly one answer per frame — or, when the stream cannot
//! go on, the answers already due followed by an error status. Never a
//! frame that silently disappears.
//!
//! A stream is read only while it has fewer than `window` frames in flight
//! and its next frame fits in the memory budget; otherwise HTTP/2 flow
//! control holds the producer back.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;

use super::{Admitted, Answer, Caller, Pipeline};
use crate::domain::{FrameRequest, Judgement};
use crate::error::CallError;

/// Default number of frames one stream may have in flight.
pub const DEFAULT_WINDOW: usize = 64;

/// One stream's settings.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Frames in flight before the stream stops being read.
    pub window: usize,
    /// Who the stream's frames come from.
    pub caller: Caller,
    /// Becomes `true` when the server starts shutting down: the stream is
    /// no longer read, its accepted frames are answered, then it ends with
    /// UNAVAILABLE. A receiver whose sender is gone never drains.
    pub draining: watch::Receiver<bool>,
    /// Called as each frame takes its share of the memory budget: the edge
    /// then releases what it counted for the message on its way in.
    pub admitted: AdmitHook,
}

/// A callback run once per admitted frame; the default does nothing.
#[derive(Clone, Default)]
pub struct AdmitHook(Option<Arc<dyn Fn() + Send + Sync>>);

impl AdmitHook {
    /// Runs `f` for every admitted frame.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> AdmitHook {
        AdmitHook(Some(Arc::new(f)))
    }

    fn run(&self) {
        if let Some(f) = &self.0 {
            f();
        }
    }
}

impl std::fmt::Debug for AdmitHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AdmitHook(set)"
        } else {
            "AdmitHook(none)"
        })
    }
}

type Admitting = Pin<Box<dyn Future<Output = Option<Admitted>> + Send>>;

/// Reads `frames` until the client half-closes, the stream fails, or the
/// server drains; answers every frame read, in order, on `answers` (each
/// judgement turned into the edge's message by `respond`); then ends the
/// stream: cleanly after a half-close, with the stream's own error after a
/// failure, with UNAVAILABLE after a drain. Returns early, dropping pending
/// work, when the client goes away.
pub async fn drive<S, E, T>(
    pipeline: Arc<Pipeline>,
    mut frames: S,
    answers: mpsc::Sender<Result<T, E>>,
    respond: impl Fn(Judgement) -> T,
    options: StreamOptions,
) where
    S: Stream<Item = Result<FrameRequest, E>> + Unpin,
    E: From<CallError> + std::fmt::Display,
{
    let StreamOptions {
        window,
        caller,
        mut draining,
        admitted: on_admitted,
    } = options;
    let window = window.max(1);
    let mut in_flight = FuturesOrdered::new();
    // A frame read but not yet admitted: reading stops until it fits.
    let mut admitting: Option<Admitting> = None;
    let mut reading = true;
    // A dropped sender means nobody will ever drain this stream.
    let mut watching = true;
    // How the stream ends once every accepted frame is answered.
    let mut ending: Option<E> = None;
    if *draining.borrow() {
        reading = false;
        ending = Some(CallError::ShuttingDown.into());
    }
    loop {
        tokio::select! {
            // Answer first: a judgement that is ready goes out before reading more.
            biased;
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                let Answer { judgement, finish } = answer;
                if answers.send(Ok(respond(judgement))).await.is_err() {
                    return; // The client left; dropping `in_flight` cancels the rest.
                }
                // Sent: the frame's respond stage, span and charge end here.
                drop(finish);
            }
            // The client left while the next answer is not ready: stop now,
            // so the frames behind a slow one are not computed for nobody.
            _ = answers.closed(), if reading || !in_flight.is_empty() => return,
            admitted = async { admitting.as_mut()?.await }, if admitting.is_some() => {
                admitting = None;
                match admitted {
                    Some(admitted) => {
                        on_admitted.run();
                        in_flight.push_back(judge(&pipeline, admitted, &caller));
                    }
                    None => {
                        reading = false;
                        ending = Some(CallError::ShuttingDown.into());
                    }
                }
            }
            changed = draining.changed(), if reading && watching => {
                // A frame already read but waiting for the budget is still
                // admitted and answered: it was accepted off the wire.
                if changed.is_err() {
                    watching = false;
                } else if *draining.borrow() {
                    reading = false;
                    ending = Some(CallError::ShuttingDown.into());
                }
            }
            frame = frames.next(),
                if reading && admitting.is_none() && in_flight.len() < window => match frame
            {
                Some(Ok(frame)) => match pipeline.budget.try_admit(frame) {
                    Ok(admitted) => {
                        on_admitted.run();
                        in_flight.push_back(judge(&pipeline, admitted, &caller));
                    }
                    Err(frame) => {
                        let budget = pipeline.budget.clone();
                        admitting = Some(Box::pin(async move { budget.admit(*frame).await }));
                    }
                },
                Some(Err(error)) => {
                    tracing::debug!(%error, "inbound stream failed; answering pending frames");
                    reading = false;
                    ending = Some(error);
                }
                None => reading = false,
            },
            else => break,
        }
    }
    if let Some(error) = ending {
        let _ = answers.send(Err(error)).await;
    }
}

fn judge(
    pipeline: &Arc<Pipeline>,
    admitted: Admitted,
    caller: &Caller,
) -> impl Future<Output = Answer> + use<> {
    let pipeline = Arc::clone(pipeline);
    let caller = caller.clone();
    async move { pipeline.judge(admitted, &caller).await }
}

#[cfg(test)]
mod tests;
