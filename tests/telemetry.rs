//! Observability end to end, with real parts only: a real OTLP/gRPC trace
//! receiver (tonic serving the official `opentelemetry-proto` TraceService)
//! on loopback, the sidecar exporting to it, frames streamed with W3C trace
//! context; and `/metrics` scraped over HTTP.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use odin_sidecar::config::ServeConfig;
use odin_sidecar::score::Method;
use odin_sidecar::telemetry::OtlpConfig;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, RawImage, Verdict};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::Mutex;
use tokio_stream::StreamExt;

/// Every span the receiver got, with its resource's service name.
#[derive(Debug, Default, Clone)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().await;
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| string(kv.value.as_ref()?.value.as_ref()?))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Every metrics push the receiver got.
#[derive(Debug, Default, Clone)]
struct ReceivedMetrics(Arc<Mutex<Vec<ExportMetricsServiceRequest>>>);

#[tonic::async_trait]
impl MetricsService for ReceivedMetrics {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().await.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

/// Starts a receiver on loopback; returns its address and what it receives.
async fn receiver() -> (SocketAddr, Received) {
    let (addr, received, _) = receivers().await;
    (addr, received)
}

/// A trace and metrics receiver on one loopback port, like a collector's
/// OTLP/gRPC receiver.
async fn receivers() -> (SocketAddr, Received, ReceivedMetrics) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let metrics = ReceivedMetrics::default();
    let service = TraceServiceServer::new(received.clone());
    let metrics_service = MetricsServiceServer::new(metrics.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .add_service(metrics_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("receiver serves");
    });
    (addr, received, metrics)
}

fn otlp(endpoint: String) -> OtlpConfig {
    OtlpConfig {
        endpoint: Some(endpoint),
        always_on: true,
        schedule_delay: Some(Duration::from_millis(50)),
        ..OtlpConfig::default()
    }
}

/// Streams `frames` on one Detect call with `metadata` and collects the verdicts.
async fn detect(
    server: &TestServer,
    frames: Vec<Frame>,
    traceparent: Option<&str>,
) -> Vec<Verdict> {
    let mut client = server.client().await;
    let mut request = tonic::Request::new(tokio_stream::iter(frames));
    if let Some(tp) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", tp.parse().expect("ascii"));
    }
    let mut stream = client
        .detect(request)
        .await
        .expect("Detect starts")
        .into_inner();
    let mut verdicts = Vec::new();
    while let Some(v) = stream.next().await {
        verdicts.push(v.expect("verdict"));
    }
    verdicts
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CALL_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALL_SPAN: &str = "00f067aa0ba902b7";
const FRAME_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// One traced run, shared by the span tests: 16 good frames and a bad one
/// on one Detect call carrying the caller's `traceparent`; frames 8..16
/// carry their own. Every span the receiver got, once all have arrived.
struct Traced {
    /// The 16 good frames' verdicts, in order.
    verdicts: Vec<Verdict>,
    /// The bad frame's verdict.
    bad: Verdict,
    /// Every span received, with its resource's service name.
    received: Vec<(String, Span)>,
    spans: Vec<Span>,
    info: odin_sidecar::domain::ModelInfo,
}

impl Traced {
    async fn run() -> Traced {
        let (receiver_addr, received) = receiver().await;
        let mut config = builtin();
        config.method = Method::Odin;
        config.temperature = 1000.0;
        config.epsilon = 0.0014;
        config.otlp = Some(otlp(format!("http://{receiver_addr}")));
        let server = TestServer::start(config).await;
        let mut frames: Vec<Frame> = (0..16u64)
            .map(|i| {
                let mut f = raw_frame(format!("f{i}"), i);
                if i >= 8 {
                    f.traceparent = format!("00-{FRAME_TRACE}-{:016x}-01", 0x1000 + i);
                }
                f
            })
            .collect();
        // And one bad frame: its span carries the error.
        frames.push(Frame {
            frame_id: "bad".into(),
            image: Some(Image::Encoded(b"not a jpeg".to_vec())),
            ..Frame::default()
        });
        let mut verdicts = detect(
            &server,
            frames,
            Some(&format!("00-{CALL_TRACE}-{CALL_SPAN}-01")),
        )
        .await;
        assert_eq!(verdicts.len(), 17);
        let bad = verdicts.pop().expect("17 verdicts");
        assert_eq!(
            bad.error.as_ref().map(|e| e.reason.as_str()),
            Some("DECODE_FAILED")
        );
        assert!(verdicts.iter().all(|v| v.error.is_none()));

        // Every frame brings 7 spans (frame + 6 stages); wait for them.
        let telemetry = Arc::clone(&server.telemetry);
        tokio::task::spawn_blocking(move || telemetry.flush())
            .await
            .expect("flush");
        let mut spans = Vec::new();
        for _ in 0..600 {
            spans = received.0.lock().await.clone();
            let frames = spans.iter().filter(|(_, s)| s.name == "frame").count();
            let respond = spans.iter().filter(|(_, s)| s.name == "respond").count();
            if frames == 17 && respond == 17 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Traced {
            verdicts,
            bad,
            spans: spans.iter().map(|(_, s)| s.clone()).collect(),
            received: spans,
            info: server.app_info.clone(),
        }
    }

    /// The frame span of `frame_id`.
    fn frame(&self, frame_id: &str) -> &Span {
        self.spans
            .iter()
            .find(|s| {
                s.name == "frame"
                    && attr(s, "odin.frame_id").and_then(string).as_deref() == Some(frame_id)
            })
            .unwrap_or_else(|| panic!("no frame span for {frame_id}"))
    }

    /// The children of `span`, by start time.
    fn children(&self, span: &Span) -> Vec<&Span> {
        let mut children: Vec<&Span> = self
            .spans
            .iter()
            .filter(|s| s.parent_span_id == span.span_id)
            .collect();
        children.sort_by_key(|s| s.start_time_unix_nano);
        children
    }

    fn by_id(&self, span_id: &[u8]) -> Option<&Span> {
        self.spans.iter().find(|s| s.span_id == span_id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_span_is_a_child_of_the_calls_traceparent() {
    let run = Traced::run().await;
    assert!(run
        .received
        .iter()
        .all(|(service, _)| service == "odin-sidecar"));
    for (i, verdict) in run.verdicts.iter().enumerate().take(8) {
        let frame = run.frame(&verdict.frame_id);
        assert_eq!(hex(&frame.trace_id), CALL_TRACE, "frame {i} trace id");
        assert_eq!(hex(&frame.parent_span_id), CALL_SPAN, "frame {i} parent");
    }
    // A failed frame too.
    assert_eq!(hex(&run.frame("bad").parent_span_id), CALL_SPAN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frames_own_traceparent_overrides_the_calls() {
    let run = Traced::run().await;
    for (i, verdict) in run.verdicts.iter().enumerate().skip(8) {
        let frame = run.frame(&verdict.frame_id);
        assert_eq!(hex(&frame.trace_id), FRAME_TRACE, "frame {i} trace id");
        assert_eq!(
            hex(&frame.parent_span_id),
            format!("{:016x}", 0x1000 + i),
            "frame {i} parent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_span_holds_its_six_stages_in_order_within_its_time() {
    let run = Traced::run().await;
    for (i, verdict) in run.verdicts.iter().enumerate() {
        let frame = run.frame(&verdict.frame_id);
        let stages = run.children(frame);
        let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["receive", "decode", "queue", "batch", "score", "respond"],
            "frame {i} stages"
        );
        // In order, inside the frame, not overlapping, in its trace.
        let mut at = frame.start_time_unix_nano;
        for stage in &stages {
            assert_eq!(stage.trace_id, frame.trace_id);
            assert!(
                stage.start_time_unix_nano >= at,
                "frame {i}: {} overlaps",
                stage.name
            );
            assert!(stage.end_time_unix_nano >= stage.start_time_unix_nano);
            at = stage.end_time_unix_nano;
        }
        assert!(
            at <= frame.end_time_unix_nano,
            "frame {i}: stages outlast the frame"
        );
        let busy: u64 = stages
            .iter()
            .map(|s| s.end_time_unix_nano - s.start_time_unix_nano)
            .sum();
        assert!(busy <= frame.end_time_unix_nano - frame.start_time_unix_nano);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_batch_spans_and_frames_link_both_ways() {
    let run = Traced::run().await;
    for (i, verdict) in run.verdicts.iter().enumerate() {
        let frame = run.frame(&verdict.frame_id);
        let stages = run.children(frame);
        let (queue, batch) = (stages[2], stages[3]);
        assert_eq!(
            (queue.name.as_str(), batch.name.as_str()),
            ("queue", "batch")
        );
        let Some(Value::IntValue(batch_size)) = attr(frame, "odin.batch_size") else {
            panic!("frame {i} has no batch size");
        };
        // The frame's batch stage links to the engine batch span, which
        // links back to the frame and holds the gradient and forward runs.
        assert_eq!(batch.links.len(), 1, "batch stage links to its engine run");
        let engine = run
            .by_id(&batch.links[0].span_id)
            .unwrap_or_else(|| panic!("frame {i}: engine.batch span not received"));
        assert_eq!(engine.name, "engine.batch");
        assert_eq!(
            attr(engine, "odin.batch_size"),
            Some(&Value::IntValue(*batch_size))
        );
        assert!(
            engine
                .links
                .iter()
                .any(|l| l.span_id == frame.span_id && l.trace_id == frame.trace_id),
            "engine.batch links to frame {i}"
        );
        assert_eq!(engine.links.len() as i64, *batch_size);
        let runs: Vec<&str> = run
            .children(engine)
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(runs, ["gradient", "forward"]);
        assert!(engine.start_time_unix_nano >= queue.end_time_unix_nano - 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_span_carries_its_call_verdict_and_model() {
    let run = Traced::run().await;
    for (i, verdict) in run.verdicts.iter().enumerate() {
        let frame = run.frame(&verdict.frame_id);
        let text = |key: &str| attr(frame, key).and_then(string);
        assert_eq!(text("rpc.system").as_deref(), Some("grpc"), "frame {i}");
        assert_eq!(text("rpc.service").as_deref(), Some("odin.v1.Detector"));
        assert_eq!(text("rpc.method").as_deref(), Some("Detect"));
        assert_eq!(text("odin.method").as_deref(), Some("odin"));
        assert_eq!(
            text("odin.verdict").as_deref(),
            Some(if verdict.in_distribution { "in" } else { "out" })
        );
        assert_eq!(
            attr(frame, "odin.predicted_class"),
            Some(&Value::IntValue(i64::from(verdict.predicted_class)))
        );
        match attr(frame, "odin.score") {
            Some(Value::DoubleValue(s)) => assert_eq!(*s as f32, verdict.score),
            other => panic!("odin.score: {other:?}"),
        }
        assert_eq!(text("odin.model.name"), Some(run.info.name.clone()));
        assert_eq!(text("odin.model.version"), Some(run.info.version.clone()));
        assert_eq!(
            text("odin.execution_provider"),
            Some(run.info.execution_provider.clone())
        );
        assert!(
            matches!(attr(frame, "odin.batch_size"), Some(Value::IntValue(n)) if *n >= 1),
            "frame {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_frames_span_has_error_status_and_type() {
    let run = Traced::run().await;
    let failed = run.frame("bad");
    let reason = run.bad.error.as_ref().expect("error").reason.clone();
    assert_eq!(
        attr(failed, "error.type").and_then(string).as_deref(),
        Some(reason.as_str())
    );
    assert_eq!(
        attr(failed, "odin.verdict").and_then(string).as_deref(),
        Some("error")
    );
    let status = failed.status.as_ref().expect("status");
    assert_eq!(status.code, 2, "STATUS_CODE_ERROR");
    assert!(
        status.message.contains("cannot decode"),
        "{}",
        status.message
    );
    // It never reached the queue or the engine.
    let mut stages: Vec<&str> = run
        .children(failed)
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    stages.sort();
    assert_eq!(stages, ["decode", "receive", "respond"]);
    // Good frames' spans are not errors.
    let good = run.frame(&run.verdicts[0].frame_id);
    assert_ne!(good.status.as_ref().map(|s| s.code), Some(2));
    assert!(attr(good, "error.type").is_none());
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse::<f64>()
        .expect("number") as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_frame_by_verdict() {
    // The server's threshold at the frames' median max-softmax, computed
    // here: about half are in-distribution, half out.
    let mut config = builtin();
    let mut reference = Reference::new(&config);
    let mut scores: Vec<f64> = (0..40u64)
        .map(|i| reference_max_softmax(&reference.logits(&synthetic32(i)), 1.0))
        .collect();
    scores.sort_by(f64::total_cmp);
    config.threshold = ((scores[19] + scores[20]) / 2.0) as f32;
    let server = TestServer::start(config).await;
    let mut frames: Vec<Frame> = (0..40u64).map(|i| raw_frame(format!("f{i}"), i)).collect();
    frames.push(Frame {
        frame_id: "bad".into(),
        image: Some(Image::Raw(RawImage {
            width: 2,
            height: 2,
            channels: 3,
            pixels: vec![0; 5],
        })),
        ..Frame::default()
    });
    let verdicts = detect(&server, frames, None).await;
    assert_eq!(verdicts.len(), 41);
    let count = |f: &dyn Fn(&Verdict) -> bool| verdicts.iter().filter(|v| f(v)).count() as u64;
    let (ins, outs, errors) = (
        count(&|v| v.error.is_none() && v.in_distribution),
        count(&|v| v.error.is_none() && !v.in_distribution),
        count(&|v| v.error.is_some()),
    );
    assert_eq!((ins, outs, errors), (20, 20, 1));

    let text = server.scrape().await;
    assert_eq!(metric(&text, r#"odin_frames_total{verdict="in"}"#), ins);
    assert_eq!(metric(&text, r#"odin_frames_total{verdict="out"}"#), outs);
    assert_eq!(metric(&text, r#"odin_frames_total{verdict="error"}"#), 1);
    assert_eq!(
        metric(
            &text,
            r#"odin_frame_errors_total{reason="RAW_LENGTH_MISMATCH"}"#
        ),
        1
    );
    assert_eq!(
        metric(
            &text,
            r#"rpc_server_duration_seconds_count{rpc_system="grpc",rpc_service="odin.v1.Detector",rpc_method="Detect"}"#
        ),
        41
    );
    for stage in ["receive", "decode", "respond"] {
        let series = format!(r#"odin_frame_stage_duration_seconds_count{{stage="{stage}"}}"#);
        assert_eq!(metric(&text, &series), 41, "{stage}");
    }
    for stage in ["queue", "batch", "score"] {
        let series = format!(r#"odin_frame_stage_duration_seconds_count{{stage="{stage}"}}"#);
        assert_eq!(metric(&text, &series), 40, "{stage}");
    }
    // Every judged frame was in exactly one engine run.
    assert!(metric(&text, "odin_batch_size_sum") == 40);
    assert_eq!(metric(&text, "odin_frames_in_flight"), 0);
    assert_eq!(metric(&text, "odin_streams_open"), 0);
    assert_eq!(metric(&text, "odin_queue_depth"), 0);
    assert_eq!(metric(&text, "odin_spans_dropped_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_receiver_down_serving_goes_on_and_dropped_spans_are_counted() {
    // A port that was just free: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut config: ServeConfig = builtin();
    config.otlp = Some(otlp(format!("http://{closed}")));
    let server = TestServer::start(config).await;
    let frames: Vec<Frame> = (0..64).map(|i| raw_frame(format!("f{i}"), i)).collect();
    let verdicts = detect(&server, frames, None).await;
    assert_eq!(verdicts.len(), 64);
    assert!(verdicts.iter().all(|v| v.error.is_none()));
    let mut dropped = 0;
    for _ in 0..300 {
        dropped = metric(&server.scrape().await, "odin_spans_dropped_total");
        if dropped > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dropped > 0, "no span counted as dropped");
    let text = server.scrape().await;
    assert_eq!(metric(&text, "odin_spans_exported_total"), 0);
    assert_eq!(
        metric(&text, r#"odin_frames_total{verdict="in"}"#)
            + metric(&text, r#"odin_frames_total{verdict="out"}"#),
        64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_over_otlp_with_the_same_counts() {
    let (addr, _, pushed) = receivers().await;
    let mut config = builtin();
    config.otlp = Some(OtlpConfig {
        metrics_interval: Some(Duration::from_millis(100)),
        ..otlp(format!("http://{addr}"))
    });
    let server = TestServer::start(config).await;
    let frames: Vec<Frame> = (0..12).map(|i| raw_frame(format!("f{i}"), i)).collect();
    let verdicts = detect(&server, frames, None).await;
    let ins = verdicts.iter().filter(|v| v.in_distribution).count() as i64;
    // The latest push after the run counts every frame.
    let mut counts = (-1, -1);
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pushes = pushed.0.lock().await;
        let Some(last) = pushes.last() else { continue };
        let resource = last.resource_metrics[0]
            .resource
            .as_ref()
            .expect("resource");
        assert!(resource
            .attributes
            .iter()
            .any(|kv| kv.key == "service.name"));
        let metrics = &last.resource_metrics[0].scope_metrics[0].metrics;
        let frames = metrics
            .iter()
            .find(|m| m.name == "odin.frames")
            .expect("odin.frames pushed");
        let Some(metric::Data::Sum(sum)) = &frames.data else {
            panic!("odin.frames is a sum")
        };
        assert!(sum.is_monotonic);
        let count = |verdict: &str| {
            sum.data_points
                .iter()
                .find(|p| {
                    p.attributes.iter().any(|kv| {
                        kv.key == "verdict"
                            && kv
                                .value
                                .as_ref()
                                .and_then(|v| v.value.as_ref())
                                .and_then(string)
                                == Some(verdict.to_string())
                    })
                })
                .and_then(|p| match p.value {
                    Some(number_data_point::Value::AsInt(v)) => Some(v),
                    _ => None,
                })
                .expect("a point per verdict")
        };
        counts = (count("in"), count("out"));
        if counts.0 + counts.1 == 12 {
            break;
        }
    }
    assert_eq!(counts, (ins, 12 - ins));
    assert!(
        server
            .telemetry
            .metrics()
            .frames(odin_sidecar::telemetry::Outcome::In) as i64
            == ins
    );
}

/// The real binary, configured the way an operator would: `ODIN_OTLP=1` and
/// the standard `OTEL_*` variables (set on the child only), `--metrics-addr`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_flags_and_otel_variables_reach_the_collector_and_metrics_port() {
    use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;

    let (receiver_addr, received) = receiver().await;
    let serve = ServeProcess::start(
        &[
            "--addr",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        |command| {
            command
                .env("ODIN_OTLP", "1")
                .env(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("http://{receiver_addr}"),
                )
                .env("OTEL_SERVICE_NAME", "cam-7-sidecar")
                .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
                .env("OTEL_TRACES_SAMPLER", "parentbased_always_off")
                .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        },
    )
    .await;
    let metrics = serve.metrics_addr.clone().expect("metrics address");

    // The sampler is parent-based: a sampled caller's frame is traced, an
    // unsampled one (flags 00) is not.
    let mut client = DetectorClient::new(serve.channel().await);
    for (i, flags) in ["01", "00"].iter().enumerate() {
        let mut request = tonic::Request::new(raw_frame(format!("u{i}"), i as u64));
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{CALL_TRACE}-{CALL_SPAN}-{flags}")
                .parse()
                .expect("ascii"),
        );
        let verdict = client
            .detect_one(request)
            .await
            .expect("verdict")
            .into_inner();
        assert!(verdict.error.is_none());
    }
    let mut spans = Vec::new();
    for _ in 0..600 {
        spans = received.0.lock().await.clone();
        if spans.iter().any(|(_, s)| s.name == "respond") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let frames: Vec<&Span> = spans
        .iter()
        .filter(|(_, s)| s.name == "frame")
        .map(|(_, s)| s)
        .collect();
    assert_eq!(frames.len(), 1, "only the sampled caller's frame is traced");
    assert_eq!(
        attr(frames[0], "odin.frame_id").and_then(string).as_deref(),
        Some("u0")
    );
    assert_eq!(
        attr(frames[0], "rpc.method").and_then(string).as_deref(),
        Some("DetectOne")
    );
    assert_eq!(hex(&frames[0].parent_span_id), CALL_SPAN);
    assert!(spans.iter().all(|(service, _)| service == "cam-7-sidecar"));

    // /metrics over plain HTTP, and a 404 elsewhere.
    let get = |path: &'static str| {
        let metrics = metrics.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(&metrics)
                .await
                .expect("connects");
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("writes");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("reads");
            response
        }
    };
    let response = get("/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("text/plain; version=0.0.4"));
    let body = response.split_once("\r\n\r\n").expect("body").1;
    let judged = metric(body, r#"odin_frames_total{verdict="in"}"#)
        + metric(body, r#"odin_frames_total{verdict="out"}"#);
    assert_eq!(judged, 2);
    assert_eq!(
        metric(
            body,
            r#"rpc_server_duration_seconds_count{rpc_system="grpc",rpc_service="odin.v1.Detector",rpc_method="DetectOne"}"#
        ),
        2
    );
    assert!(get("/").await.starts_with("HTTP/1.1 404"));

    let channel = serve.channel().await;
    terminate(serve, channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_beyond_the_export_queue_are_dropped_and_counted() {
    let (addr, received) = receiver().await;
    let mut config = builtin();
    config.otlp = Some(OtlpConfig {
        // Room for 5 spans, and no scheduled export during the run.
        max_queue: Some(5),
        schedule_delay: Some(Duration::from_secs(3600)),
        ..otlp(format!("http://{addr}"))
    });
    let server = TestServer::start(config).await;
    let frames: Vec<Frame> = (0..8).map(|i| raw_frame(format!("f{i}"), i)).collect();
    let verdicts = detect(&server, frames, None).await;
    assert_eq!(verdicts.len(), 8);
    assert!(verdicts.iter().all(|v| v.error.is_none()));
    let telemetry = Arc::clone(&server.telemetry);
    tokio::task::spawn_blocking(move || telemetry.flush())
        .await
        .expect("flush");
    let text = server.scrape().await;
    let (dropped, exported) = (
        metric(&text, "odin_spans_dropped_total"),
        metric(&text, "odin_spans_exported_total"),
    );
    // 8 frames make 56 frame and stage spans, plus the engine batches'.
    assert_eq!(exported, 5, "the queue held 5");
    assert!(dropped >= 56 - 5, "dropped {dropped}");
    assert_eq!(received.0.lock().await.len(), 5);
}
