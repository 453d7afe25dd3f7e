//! Deadlines: a frame whose call's `grpc-timeout` has passed before it
//! reaches the engine is answered DEADLINE_EXCEEDED and not computed.

use std::time::{Duration, Instant};

use odin_sidecar::wire::odin_v1::Frame;
use prost::Message;
use tonic::Request;

use crate::harness::*;
use crate::http2::{decode_verdicts, grpc_message, h2_connect, h2_finish, H2};

const DEADLINE_EXCEEDED: i32 = 4;

/// Frames the engine has computed so far (the sum of the batch-size histogram).
async fn computed(server: &Server) -> f64 {
    metric(&server.scrape().await, "odin_batch_size_sum")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_frames_of_a_stream_get_deadline_exceeded_and_are_not_computed() {
    let _serial = serial().await;
    let mut config = config();
    config.decode_threads = 1;
    config.workers = 1;
    let server = Server::start(config).await;
    let mut client = server.client().await;
    let before = computed(&server).await;

    // Two cheap frames, then ten that take ~100 ms each to decode: the
    // 50 ms deadline passes while the first of them is being decoded.
    let slow = slow_png(2048);
    let mut frames: Vec<Frame> = vec![tiny("fast-0"), tiny("fast-1")];
    frames.extend((0..10).map(|i| encoded_frame(&format!("slow-{i}"), slow.clone())));
    let mut request = Request::new(tokio_stream::iter(frames));
    request.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let mut stream = client.detect(request).await.expect("Detect").into_inner();
    let mut verdicts = Vec::new();
    let end = loop {
        match stream.message().await {
            Ok(Some(v)) => verdicts.push(v),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let took = started.elapsed();
    let late = verdicts
        .iter()
        .filter(|v| code(v) == DEADLINE_EXCEEDED)
        .count();
    let judged = verdicts.iter().filter(|v| v.error.is_none()).count();
    let summary: Vec<String> = verdicts
        .iter()
        .map(|v| {
            format!(
                "{}:{}",
                v.frame_id,
                if reason(v).is_empty() {
                    "ok"
                } else {
                    reason(v)
                }
            )
        })
        .collect();
    println!("50 ms deadline, 12 frames in {took:?}: {summary:?}; stream end {end:?}");
    assert_eq!(verdicts.len(), 12, "every frame is answered");
    assert_eq!(
        judged + late,
        12,
        "each frame is judged or DEADLINE_EXCEEDED"
    );
    assert!(
        late >= 9,
        "at least the slow frames after the first are late: {late}"
    );
    for v in verdicts.iter().filter(|v| code(v) == DEADLINE_EXCEEDED) {
        assert_eq!(reason(v), "DEADLINE_EXCEEDED");
    }
    // Late frames are answered at once, not after being decoded one by one.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let computed_now = settle_computed(&server, before + judged as f64).await;
    assert_eq!(
        computed_now - before,
        judged as f64,
        "the engine computed exactly the frames that were judged"
    );
    assert_eq!(
        metric(
            &server.scrape().await,
            r#"odin_frame_errors_total{reason="DEADLINE_EXCEEDED"}"#
        ),
        late as f64
    );
}

async fn settle_computed(server: &Server, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = computed(server).await;
        if now >= want || Instant::now() > deadline {
            // A little longer, to catch frames computed after all.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return computed(server).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A frame that goes through a decoder (256×256, above what is decoded in
/// place), so it queues behind the slow ones.
fn queued_frame(id: &str) -> Frame {
    encoded_frame(id, pattern_png(256, 256))
}

/// Keeps the single decoder busy with `n` slow frames on a stream over
/// `h2`'s connection; returns when they are all in flight. A call on the
/// same connection then waits behind them (the decoders are shared fairly
/// between connections, so a call on another one would not).
async fn occupy_decoder(
    server: &Server,
    h2: &mut H2,
    n: usize,
) -> tokio::task::JoinHandle<Vec<odin_sidecar::wire::odin_v1::Verdict>> {
    let slow = slow_png(2048);
    let stream: Vec<u8> = (0..n)
        .flat_map(|i| {
            grpc_message(&encoded_frame(&format!("busy-{i}"), slow.clone()).encode_to_vec())
        })
        .collect();
    let (response, mut body) = h2.open("/odin.v1.Detector/Detect", &[]).await;
    body.send_data(stream.into(), true)
        .expect("send the stream");
    let task = tokio::spawn(async move {
        let (data, _) = h2_finish(response).await;
        decode_verdicts(&data)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.pipeline.in_flight() < n {
        assert!(Instant::now() < deadline, "the busy frames never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_one_past_its_deadline_is_deadline_exceeded_and_not_computed() {
    let _serial = serial().await;
    let mut config = config();
    config.decode_threads = 1;
    let server = Server::start(config).await;
    let before = computed(&server).await;
    let mut h2 = h2_connect(server.addr).await;
    let busy = occupy_decoder(&server, &mut h2, 4).await;

    // What the server itself answers (no client-side timer in the way).
    let started = Instant::now();
    let (response, _) = h2
        .call(
            "/odin.v1.Detector/DetectOne",
            &[("grpc-timeout", "50m")],
            &queued_frame("late").encode_to_vec(),
            true,
        )
        .await;
    let (data, status) = h2_finish(response).await;
    let answered = started.elapsed();

    let verdicts = busy.await.expect("busy stream");
    assert_eq!(verdicts.len(), 4);
    verdicts.iter().for_each(assert_judged);
    let computed_now = settle_computed(&server, before + 4.0).await;
    println!(
        "DetectOne with a 50 ms deadline behind 4 slow decodes: server grpc-status {status:?} \
         after {answered:?} ({} bytes of body); engine computed {} frames (the 4 busy ones)",
        data.len(),
        computed_now - before
    );
    assert!(data.is_empty(), "no verdict for a call past its deadline");
    assert_eq!(
        computed_now - before,
        4.0,
        "the late frame was not computed"
    );
    assert_eq!(
        status.as_deref(),
        Some("4"),
        "the server answers DEADLINE_EXCEEDED (4) for a call past its grpc-timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_request_timeout_bounds_a_detect_one_without_a_deadline() {
    let _serial = serial().await;
    let mut config = config();
    config.decode_threads = 1;
    config.network.request_timeout = Some(Duration::from_millis(100));
    let server = Server::start(config).await;
    let before = computed(&server).await;
    let mut h2 = h2_connect(server.addr).await;
    let busy = occupy_decoder(&server, &mut h2, 4).await;
    let (response, _) = h2
        .call(
            "/odin.v1.Detector/DetectOne",
            &[],
            &queued_frame("no-deadline").encode_to_vec(),
            true,
        )
        .await;
    let (data, status) = h2_finish(response).await;
    let verdicts = busy.await.expect("busy stream");
    // Streams are not bounded by the request timeout.
    assert_eq!(verdicts.len(), 4);
    verdicts.iter().for_each(assert_judged);
    let computed_now = settle_computed(&server, before + 4.0).await;
    println!(
        "request timeout 100 ms: grpc-status {status:?}, computed {}",
        computed_now - before
    );
    assert!(data.is_empty());
    assert_eq!(
        computed_now - before,
        4.0,
        "the timed-out frame was not computed"
    );
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED");
}
