//! The server stack: every gRPC call passes through these layers, built in
//! one place, one per line, each with the reason it sits where it does.
//! Limits, deadlines and authentication live here, not in handlers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service};

use super::conn::{CallGuard, ConnInfo};
use super::receive::Receiving;
use crate::config::NetworkOptions;
use crate::error::CallError;
use crate::telemetry::Metrics;

/// The unary calls that admission control sheds: each holds frames in
/// memory and waits for the engine, so a burst of them must not queue
/// without bound. Streams are bounded by their own window instead.
pub const UNARY_CALLS: [&str; 2] = [
    "/odin.v1.Detector/DetectOne",
    "/inference.GRPCInferenceService/ModelInfer",
];

/// Calls that need no token and are answered while draining: probes must
/// reach health without credentials, and see NOT_SERVING (KServe: `ready`
/// false) during a drain. The KServe entries are whole method paths.
pub const OPEN_PREFIXES: [&str; 4] = [
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
];

/// What the stack enforces.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Unary calls in flight beyond which new ones get RESOURCE_EXHAUSTED
    /// (0 = no limit: unary callers then wait in the engine queue).
    pub max_unary_in_flight: usize,
    /// Connections, HTTP/2 settings and deadlines.
    pub network: NetworkOptions,
    /// The bearer token calls must present; `None` checks nothing.
    pub token: Option<Arc<[u8]>>,
    /// Turns true when the server starts shutting down.
    pub draining: watch::Receiver<bool>,
    /// Where refused calls are counted.
    pub metrics: Arc<Metrics>,
}

/// The layered server, ready for services.
pub type Stacked = Server<
    Stack<
        Receiving,
        Stack<
            Gate<Admission>,
            Stack<Gate<Auth>, Stack<Gate<Draining>, Stack<CallTracker, Identity>>>,
        >,
    >,
>;

/// The server with its HTTP/2 settings and every layer, outermost first.
pub fn server(options: &StackOptions) -> Stacked {
    let net = &options.network;
    let mut server = Server::builder()
        // Advertised in SETTINGS: one connection cannot open unbounded calls.
        .max_concurrent_streams(net.max_concurrent_streams)
        // Find peers that vanished without closing (NAT timeouts, crashes).
        .http2_keepalive_interval(Some(net.keepalive_interval))
        .http2_keepalive_timeout(Some(net.keepalive_timeout))
        // A client that makes the server reset streams over and over gets
        // GOAWAY (the "rapid reset" class, RUSTSEC-2024-0003).
        .http2_max_local_error_reset_streams(Some(net.max_local_resets))
        .http2_max_pending_accept_reset_streams(Some(net.max_local_resets.min(1024)));
    if let Some(age) = net.max_connection_age {
        // Long-lived connections pin clients to one replica: age them out.
        server = server
            .max_connection_age(age)
            .max_connection_age_grace(net.max_connection_age_grace);
    }
    // No `server.timeout()`: tonic would answer CANCELLED. The services
    // enforce --request-timeout-s and grpc-timeout themselves, a moment
    // before tonic's own timer, and answer DEADLINE_EXCEEDED (server/call.rs).
    server
        // Counts each call as open on its connection, so idle connections
        // (no open call) can be closed; outermost, so every call counts.
        .layer(CallTracker)
        // During shutdown, new calls are refused with UNAVAILABLE before
        // they do any work; health keeps answering (NOT_SERVING).
        .layer(Gate::new(
            Draining(options.draining.clone()),
            &options.metrics,
        ))
        // Unauthenticated calls are refused before they reach a handler or
        // take an admission slot.
        .layer(Gate::new(Auth(options.token.clone()), &options.metrics))
        // Shed unary calls past the limit before they hold a frame: a fast
        // RESOURCE_EXHAUSTED tells a client to back off, a queue would not.
        .layer(Gate::new(
            Admission::new(&UNARY_CALLS, options.max_unary_in_flight),
            &options.metrics,
        ))
        // Count each message from its length prefix, before tonic buffers
        // it whole: innermost, so refused calls never take a share.
        .layer(Receiving::new(net.receive_budget))
}

/// A rule that admits or refuses a call by its path and headers, and may
/// hold something (a slot) for as long as the call runs.
pub trait Policy: Clone + Send + Sync + 'static {
    /// Held until the call's response is ready.
    type Permit: Send + 'static;
    /// Admits the call, or says why not.
    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<Self::Permit, CallError>;
}

/// A layer applying one [`Policy`]; a refused call is answered at once
/// with the `CallError`'s status and counted.
#[derive(Debug, Clone)]
pub struct Gate<P> {
    policy: P,
    metrics: Arc<Metrics>,
}

impl<P> Gate<P> {
    /// A gate applying `policy`, counting refusals in `metrics`.
    pub fn new(policy: P, metrics: &Arc<Metrics>) -> Gate<P> {
        Gate {
            policy,
            metrics: Arc::clone(metrics),
        }
    }
}

impl<S, P: Clone> Layer<S> for Gate<P> {
    type Service = Gated<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Gated {
            inner,
            gate: self.clone(),
        }
    }
}

/// A service behind a [`Gate`].
#[derive(Debug, Clone)]
pub struct Gated<S, P> {
    inner: S,
    gate: Gate<P>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, P, ReqBody, ResBody> Service<http::Request<ReqBody>> for Gated<S, P>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    P: Policy,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        match self
            .gate
            .policy
            .check(request.uri().path(), request.headers())
        {
            Ok(permit) => {
                let call = self.inner.call(request);
                Box::pin(async move {
                    let response = call.await;
                    drop(permit);
                    response
                })
            }
            Err(error) => {
                self.gate
                    .metrics
                    .calls_refused
                    .fetch_add(1, Ordering::Relaxed);
                let status = tonic::Status::from(error);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Admission control: at most `limit` calls to `paths` in flight; the rest
/// are refused with RESOURCE_EXHAUSTED.
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

impl Policy for Admission {
    type Permit = Option<OwnedSemaphorePermit>;

    fn check(&self, path: &str, _: &http::HeaderMap) -> Result<Self::Permit, CallError> {
        match &self.slots {
            Some(slots) if self.paths.contains(&path) => Arc::clone(slots)
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| CallError::Overloaded { limit: self.limit }),
            _ => Ok(None),
        }
    }
}

/// Refuses new calls once the server is draining.
#[derive(Debug, Clone)]
pub struct Draining(watch::Receiver<bool>);

impl Policy for Draining {
    type Permit = ();

    fn check(&self, path: &str, _: &http::HeaderMap) -> Result<(), CallError> {
        if *self.0.borrow() && !open(path) {
            return Err(CallError::ShuttingDown);
        }
        Ok(())
    }
}

/// Requires `authorization: Bearer <token>` on every call but health.
#[derive(Debug, Clone)]
pub struct Auth(Option<Arc<[u8]>>);

impl Policy for Auth {
    type Permit = ();

    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), CallError> {
        let Some(token) = &self.0 else { return Ok(()) };
        if open(path) {
            return Ok(());
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if constant_time_eq(presented, token) {
            Ok(())
        } else {
            // The header is never logged: it may hold a near-miss token.
            tracing::debug!(path, "refused a call without a valid bearer token");
            Err(CallError::Unauthenticated)
        }
    }
}

fn open(path: &str) -> bool {
    OPEN_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// Compares two byte strings in time that depends only on their lengths,
/// so a wrong guess learns nothing from how long the refusal took.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Counts each call as open on its connection until its response body is
/// done (see `conn::ConnInfo`), so the connection's idle timer only runs
/// while no call is open.
#[derive(Debug, Clone, Copy)]
pub struct CallTracker;

impl<S> Layer<S> for CallTracker {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tracked { inner }
    }
}

/// A service behind [`CallTracker`].
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Tracked<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let guard = request.extensions().get::<ConnInfo>().map(ConnInfo::call);
        // Deadlines count from here, as tonic's own timer does, not from
        // when the handler starts (after the whole message has arrived).
        request.extensions_mut().insert(Arrived(Instant::now()));
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| TrackedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

/// When a call's headers arrived (see `call::arrived`).
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// A response body that keeps its call counted as open until it is done.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    _guard: Option<CallGuard>,
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
