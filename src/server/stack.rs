//! The server stack: every gRPC call passes through these layers, built in
//! one place, one per line, each with the reason it sits where it does.
//! Limits, deadlines and authentication belong here, not in handlers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tonic::codegen::http;
use tonic::transport::Server;
use tower::{Layer, Service};

use crate::error::CallError;

/// The unary calls that admission control sheds: each holds a frame in
/// memory and waits for the engine, so a burst of them must not queue
/// without bound. Streams are bounded by their own window instead.
pub const UNARY_CALLS: [&str; 1] = ["/odin.v1.Detector/DetectOne"];

/// What the stack enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackOptions {
    /// Unary calls in flight beyond which new ones get RESOURCE_EXHAUSTED
    /// (0 = no limit: unary callers then wait in the engine queue).
    pub max_unary_in_flight: usize,
}

/// The layered server, ready for services.
pub type Stacked = Server<tower::layer::util::Stack<Admission, tower::layer::util::Identity>>;

/// The server with every layer, outermost first.
pub fn server(options: &StackOptions) -> Stacked {
    Server::builder()
        // Shed unary calls past the limit before they hold a frame: a fast
        // RESOURCE_EXHAUSTED tells a client to back off, a queue would not.
        .layer(Admission::new(&UNARY_CALLS, options.max_unary_in_flight))
}

/// Admission control: at most `limit` calls to `paths` in flight; the rest
/// are answered at once with RESOURCE_EXHAUSTED (see `CallError`).
#[derive(Debug, Clone)]
pub struct Admission {
    paths: &'static [&'static str],
    slots: Option<Arc<Semaphore>>,
    limit: usize,
}

impl Admission {
    /// Limits calls to `paths` to `limit` in flight; 0 admits everything.
    pub fn new(paths: &'static [&'static str], limit: usize) -> Admission {
        Admission {
            paths,
            slots: (limit > 0).then(|| Arc::new(Semaphore::new(limit))),
            limit,
        }
    }
}

impl<S> Layer<S> for Admission {
    type Service = Admitted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admitted {
            inner,
            admission: self.clone(),
        }
    }
}

/// A service behind [`Admission`].
#[derive(Debug, Clone)]
pub struct Admitted<S> {
    inner: S,
    admission: Admission,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Admitted<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let Admission {
            paths,
            slots,
            limit,
        } = &self.admission;
        let slots = match slots {
            Some(slots) if paths.contains(&request.uri().path()) => slots,
            _ => return Box::pin(self.inner.call(request)),
        };
        match Arc::clone(slots).try_acquire_owned() {
            Ok(slot) => {
                let call = self.inner.call(request);
                Box::pin(async move {
                    let response = call.await;
                    drop(slot);
                    response
                })
            }
            Err(_) => {
                let status = tonic::Status::from(CallError::Overloaded { limit: *limit });
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests;
