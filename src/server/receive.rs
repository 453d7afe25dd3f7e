//! The receive budget: bytes of request messages on their way in, counted
//! from the moment a message's 5-byte gRPC prefix announces its length
//! until its frames are admitted to the pipeline's memory budget.
//!
//! Without it, tonic reads every open call's message whole before a handler
//! sees it: 256 unary calls of 2.7 MB frames held 0.7 GB outside the
//! frame budget. With it, a unary call whose message does not fit is
//! refused with RESOURCE_EXHAUSTED as its prefix arrives, and a stream
//! whose next message does not fit is not read further (HTTP/2 flow
//! control then holds its producer back). A message's charge is handed to
//! the handler through [`Receipts`], which drops it once the message's
//! frames hold their own charge: the two budgets never wait on each other.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::{http, Bytes};
use tower::{Layer, Service};

/// Streaming calls: they wait for room instead of being refused.
const STREAMING: [&str; 2] = [
    "/odin.v1.Detector/Detect",
    "/inference.GRPCInferenceService/ModelStreamInfer",
];

/// Services whose messages carry frames; others (health, reflection) are
/// small and not counted.
const METERED: [&str; 2] = ["/odin.v1.Detector/", "/inference.GRPCInferenceService/"];

/// Bytes counted per message beyond its length: buffers around it.
const OVERHEAD: usize = 512;

/// The layer; cheap to clone.
#[derive(Debug, Clone)]
pub struct Receiving {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Receiving {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Receiving {
        let total = total.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Receiving {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.total - self.bytes.available_permits()
    }
}

/// The charges of a call's messages, oldest first. A handler takes one
/// out ([`Receipts::settle`]) once a message's frames are admitted; the rest
/// go when the call ends.
#[derive(Debug, Clone, Default)]
pub struct Receipts(Arc<Mutex<VecDeque<OwnedSemaphorePermit>>>);

impl Receipts {
    /// Releases the charge of the oldest message still charged.
    pub fn settle(&self) {
        if let Ok(mut charges) = self.0.lock() {
            charges.pop_front();
        }
    }

    /// The receipts of `request`'s call; empty (settling nothing) for a
    /// call that did not come through the layer.
    pub fn of<T>(request: &tonic::Request<T>) -> Receipts {
        request
            .extensions()
            .get::<Receipts>()
            .cloned()
            .unwrap_or_default()
    }

    fn push(&self, charge: OwnedSemaphorePermit) {
        if let Ok(mut charges) = self.0.lock() {
            charges.push_back(charge);
        }
    }
}

impl<S> Layer<S> for Receiving {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            budget: self.clone(),
        }
    }
}

/// [`Receiving`] around a service.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    budget: Receiving,
}

impl<S> Service<http::Request<tonic::body::Body>> for Metered<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path();
        if !METERED.iter().any(|p| path.starts_with(p)) {
            return self.inner.call(request);
        }
        let waits = STREAMING.contains(&path);
        let receipts = Receipts::default();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(receipts.clone());
        let body = tonic::body::Body::new(Charged {
            inner: body,
            budget: self.budget.clone(),
            receipts,
            waits,
            prefix: Prefix::default(),
            held: None,
            waiting: None,
            refused: None,
        });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// Where the reader is in the gRPC framing: collecting a 5-byte prefix, or
/// inside a message with `left` bytes to go.
#[derive(Debug, Default)]
struct Prefix {
    bytes: [u8; 5],
    have: usize,
    left: u64,
}

impl Prefix {
    /// Walks `data` and returns where it should be split: right after a
    /// prefix completes (with the message length it announces), or `None`
    /// when no prefix completes in it.
    fn scan(&mut self, data: &[u8]) -> Option<(usize, u64)> {
        let mut at = 0;
        while at < data.len() {
            if self.left > 0 {
                let take = self.left.min((data.len() - at) as u64);
                self.left -= take;
                at += take as usize;
                continue;
            }
            self.bytes[self.have] = data[at];
            self.have += 1;
            at += 1;
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.bytes[1],
                    self.bytes[2],
                    self.bytes[3],
                    self.bytes[4],
                ]);
                self.left = u64::from(len);
                return Some((at, self.left));
            }
        }
        None
    }
}

type Acquiring =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>>;

/// A request body that charges each message to the receive budget before
/// passing on any of its bytes.
struct Charged {
    inner: tonic::body::Body,
    budget: Receiving,
    receipts: Receipts,
    waits: bool,
    prefix: Prefix,
    // Data read from `inner` and not yet passed on (it follows a prefix
    // whose charge is being waited for, or was not scanned yet).
    held: Option<Bytes>,
    waiting: Option<Acquiring>,
    // A unary message that did not fit: its bytes are read and dropped as
    // they come, and the refusal is the body's error once the message has
    // arrived. Answering while the client is still sending would reset its
    // stream, which some clients report as UNKNOWN instead of the refusal.
    refused: Option<tonic::Status>,
}

impl Charged {
    fn cost(&self, len: u64) -> u32 {
        let cost = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .saturating_add(OVERHEAD)
            .min(self.budget.total);
        u32::try_from(cost).unwrap_or(u32::MAX)
    }
}

impl Body for Charged {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        loop {
            if let Some(waiting) = this.waiting.as_mut() {
                match waiting.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(charge)) => this.receipts.push(charge),
                    // The semaphore is never closed.
                    Poll::Ready(Err(_)) => {}
                }
                this.waiting = None;
            }
            if this.refused.is_some() {
                // Drop what has come of the refused message; once all of it
                // has, answer with the refusal.
                if let Some(data) = this.held.take() {
                    this.prefix.scan(&data);
                }
                if this.prefix.left == 0 {
                    return Poll::Ready(this.refused.take().map(Err));
                }
            } else if let Some(mut data) = this.held.take() {
                let out = match this.prefix.scan(&data) {
                    None => data,
                    Some((split, len)) => {
                        let out = data.split_to(split);
                        if !data.is_empty() {
                            this.held = Some(data);
                        }
                        let cost = this.cost(len);
                        if this.waits {
                            let bytes = Arc::clone(&this.budget.bytes);
                            this.waiting = Some(Box::pin(bytes.acquire_many_owned(cost)));
                        } else {
                            match Arc::clone(&this.budget.bytes).try_acquire_many_owned(cost) {
                                Ok(charge) => this.receipts.push(charge),
                                Err(_) => {
                                    this.refused =
                                        Some(tonic::Status::resource_exhausted(format!(
                                        "the server's receive budget ({} MiB) is full: retry later",
                                        this.budget.total >> 20
                                    )));
                                    continue;
                                }
                            }
                        }
                        out
                    }
                };
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                continue;
            }
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.held = Some(data);
                        continue;
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                // The request ended before the refused message did.
                Poll::Ready(None) if this.refused.is_some() => {
                    Poll::Ready(this.refused.take().map(Err))
                }
                other => other,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none()
            && self.waiting.is_none()
            && self.refused.is_none()
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
