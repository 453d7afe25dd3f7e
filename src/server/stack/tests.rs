//! The Admission layer around a service whose calls finish when the test
//! says so.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::*;

const LIMITED: [&str; 1] = ["/odin.v1.Detector/DetectOne"];

/// The admission gate with `limit` slots on `LIMITED`.
fn admission(limit: usize) -> Gate<Admission> {
    Gate::new(
        Admission::new(&LIMITED, limit),
        &Arc::new(crate::telemetry::Metrics::default()),
    )
}

/// A request to `path` whose call ends when `gate` is sent to (or dropped).
fn request(path: &str) -> (http::Request<oneshot::Receiver<()>>, oneshot::Sender<()>) {
    let (gate, wait) = oneshot::channel();
    let request = http::Request::builder()
        .uri(format!("http://test{path}"))
        .body(wait)
        .unwrap();
    (request, gate)
}

/// The service behind the layer: counts the calls it gets and answers each
/// once its gate opens.
fn service(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    http::Request<oneshot::Receiver<()>>,
    Response = http::Response<String>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<String>, Infallible>> + Send + 'static,
> + Clone {
    tower::service_fn(move |request: http::Request<oneshot::Receiver<()>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = request.into_body().await;
            Ok(http::Response::new("answered".to_string()))
        }
    })
}

/// The gRPC status a response carries in its headers, if any.
fn status(response: &http::Response<String>) -> Option<tonic::Status> {
    tonic::Status::from_header_map(response.headers())
}

#[tokio::test]
async fn calls_past_the_limit_are_refused_at_once_without_reaching_the_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut admitted = admission(2).layer(service(Arc::clone(&calls)));
    let (a, _open_a) = request(LIMITED[0]);
    let (b, _open_b) = request(LIMITED[0]);
    let (c, _open_c) = request(LIMITED[0]);
    let mut first = admitted.call(a);
    let mut second = admitted.call(b);
    assert!((&mut first).now_or_never().is_none(), "admitted, waiting");
    assert!((&mut second).now_or_never().is_none(), "admitted, waiting");
    let refused = admitted
        .call(c)
        .now_or_never()
        .expect("answered at once")
        .unwrap();
    let status = status(&refused).expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("limit 2"), "{}", status.message());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the refused call never reached it"
    );
}

#[tokio::test]
async fn other_paths_are_not_limited() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut admitted = admission(1).layer(service(Arc::clone(&calls)));
    let (a, _open_a) = request(LIMITED[0]);
    let held = admitted.call(a);
    // The limit is full; streams, health and reflection still go through.
    let mut gates = Vec::new();
    let mut pending = Vec::new();
    for path in [
        "/odin.v1.Detector/Detect",
        "/odin.v1.Detector/GetModelInfo",
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ] {
        let (r, gate) = request(path);
        pending.push(admitted.call(r));
        gates.push(gate);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    for gate in gates {
        gate.send(()).unwrap();
    }
    for call in pending {
        let response = call.await.unwrap();
        assert!(status(&response).is_none());
        assert_eq!(response.body(), "answered");
    }
    drop(held);
}

#[tokio::test]
async fn a_slot_is_given_back_when_the_call_ends_or_is_dropped() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut admitted = admission(1).layer(service(Arc::clone(&calls)));
    let refused = |admitted: &mut Gated<_, Admission>| {
        let (r, _) = request(LIMITED[0]);
        let response: http::Response<String> =
            admitted.call(r).now_or_never().expect("at once").unwrap();
        status(&response).map(|s| s.code())
    };
    let (a, open_a) = request(LIMITED[0]);
    let first = admitted.call(a);
    assert_eq!(refused(&mut admitted), Some(tonic::Code::ResourceExhausted));
    // The call ends: its slot is free again.
    open_a.send(()).unwrap();
    let response = first.await.unwrap();
    assert_eq!(response.body(), "answered");
    let (b, _open_b) = request(LIMITED[0]);
    let mut second = admitted.call(b);
    assert!((&mut second).now_or_never().is_none(), "admitted");
    assert_eq!(refused(&mut admitted), Some(tonic::Code::ResourceExhausted));
    // The caller goes away mid-call: its slot is free too.
    drop(second);
    let (c, open_c) = request(LIMITED[0]);
    let third = admitted.call(c);
    open_c.send(()).unwrap();
    assert_eq!(third.await.unwrap().body(), "answered");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_limit_of_zero_admits_every_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut admitted = admission(0).layer(service(Arc::clone(&calls)));
    let mut held = Vec::new();
    for _ in 0..100 {
        let (r, gate) = request(LIMITED[0]);
        held.push((admitted.call(r), gate));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 100);
    for (call, gate) in held {
        gate.send(()).unwrap();
        assert!(status(&call.await.unwrap()).is_none());
    }
}

#[test]
fn the_server_stack_limits_the_unary_detector_call_and_not_the_stream() {
    // Paths as tonic routes them.
    let service = <crate::wire::odin_v1::detector_server::DetectorServer<
        crate::server::DetectorService,
    > as tonic::server::NamedService>::NAME;
    let path = |method: &str| format!("/{service}/{method}");
    assert!(UNARY_CALLS.contains(&path("DetectOne").as_str()));
    assert!(!UNARY_CALLS.contains(&path("Detect").as_str()));
}

#[test]
fn tokens_compare_whole() {
    assert!(constant_time_eq(b"secret", b"secret"));
    assert!(!constant_time_eq(b"secret", b"secreT"));
    assert!(!constant_time_eq(b"secret", b"secret2"));
    assert!(!constant_time_eq(b"", b"secret"));
    assert!(constant_time_eq(b"", b""));
}

#[test]
fn health_is_open_and_everything_else_needs_the_token() {
    let auth = Auth(Some(Arc::from(&b"t0k"[..])));
    let mut headers = http::HeaderMap::new();
    assert!(auth.check("/grpc.health.v1.Health/Check", &headers).is_ok());
    assert_eq!(
        auth.check("/odin.v1.Detector/DetectOne", &headers),
        Err(CallError::Unauthenticated)
    );
    // KServe's probes are open too; its inference and metadata are not.
    assert!(auth
        .check("/inference.GRPCInferenceService/ModelReady", &headers)
        .is_ok());
    for path in [
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
        "/inference.GRPCInferenceService/ModelMetadata",
    ] {
        assert_eq!(
            auth.check(path, &headers),
            Err(CallError::Unauthenticated),
            "{path}"
        );
    }
    headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer t0k"),
    );
    assert!(auth.check("/odin.v1.Detector/DetectOne", &headers).is_ok());
    headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer t0"),
    );
    assert!(auth.check("/odin.v1.Detector/DetectOne", &headers).is_err());
}

#[test]
fn a_draining_server_refuses_all_but_health() {
    let (tx, rx) = watch::channel(false);
    let draining = Draining(rx);
    let none = http::HeaderMap::new();
    assert!(draining.check("/odin.v1.Detector/Detect", &none).is_ok());
    let _ = tx.send(true);
    assert_eq!(
        draining.check("/odin.v1.Detector/Detect", &none),
        Err(CallError::ShuttingDown)
    );
    assert!(draining
        .check("/grpc.health.v1.Health/Check", &none)
        .is_ok());
    // KServe readiness answers `false` during a drain, inference does not start.
    assert!(draining
        .check("/inference.GRPCInferenceService/ServerReady", &none)
        .is_ok());
    assert_eq!(
        draining.check("/inference.GRPCInferenceService/ModelInfer", &none),
        Err(CallError::ShuttingDown)
    );
}

#[test]
fn admission_limits_only_its_paths_and_frees_slots() {
    let admission = Admission::new(&UNARY_CALLS, 1);
    let none = http::HeaderMap::new();
    let first = admission.check(UNARY_CALLS[0], &none).expect("a free slot");
    assert_eq!(
        admission.check(UNARY_CALLS[0], &none).err(),
        Some(CallError::Overloaded { limit: 1 })
    );
    assert!(admission.check("/odin.v1.Detector/Detect", &none).is_ok());
    assert_eq!(
        admission.check(UNARY_CALLS[1], &none).err(),
        Some(CallError::Overloaded { limit: 1 }),
        "ModelInfer shares the DetectOne slots"
    );
    drop(first);
    assert!(admission.check(UNARY_CALLS[0], &none).is_ok());
}
