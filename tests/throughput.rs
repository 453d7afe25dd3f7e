//! Batching across streams, flow control, cancellation, admission and the
//! load generator, against a real server on loopback serving the built-in
//! model, with frames the tests generate.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use odin_sidecar::calib::sets::SplitMix64;
use odin_sidecar::config::ServeConfig;
use odin_sidecar::loadgen::{self, LoadConfig, Mode, Pacing, Target};
use odin_sidecar::model::Model;
use odin_sidecar::pipeline::{Pipeline, Preprocessor};
use odin_sidecar::score::Method;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame};
use tokio_stream::StreamExt;

/// The built-in model made slow on purpose: ODIN (a gradient run and two
/// forwards per frame), one engine worker, one frame per run. Producers
/// then outrun the engine by far.
fn slow_builtin() -> ServeConfig {
    let mut config = builtin();
    config.method = Method::Odin;
    config.temperature = 1000.0;
    config.epsilon = 0.0014;
    config.workers = 1;
    config.batch.max_batch = 1;
    config
}

/// Highest values of the pipeline's in-flight and queued counts, sampled
/// every millisecond until dropped.
struct Peaks {
    in_flight: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Peaks {
    fn watch(pipeline: &Arc<Pipeline>) -> Peaks {
        let peaks = Peaks {
            in_flight: Arc::new(AtomicUsize::new(0)),
            queued: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (pipeline, in_flight, queued, stop) = (
            Arc::clone(pipeline),
            Arc::clone(&peaks.in_flight),
            Arc::clone(&peaks.queued),
            Arc::clone(&peaks.stop),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                in_flight.fetch_max(pipeline.in_flight(), Ordering::Relaxed);
                queued.fetch_max(pipeline.queued(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        peaks
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

impl Drop for Peaks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits (up to 30 s) until no frame is in flight on the server.
async fn settle(pipeline: &Pipeline) {
    for _ in 0..3000 {
        if pipeline.in_flight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} frames still in flight after 30 s", pipeline.in_flight());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_across_32_streams_keeps_order_and_equals_one_at_a_time() {
    // The built-in card resizes, so frames may come in any size.
    let mut config = builtin();
    config.batch.max_batch = 16;
    config.batch.max_queue_delay = Duration::from_millis(2);
    let server = TestServer::start(config.clone()).await;

    // 32 streams × 12 frames, PNG-encoded at random sizes.
    let mut rng = SplitMix64(11);
    let streams: Vec<Vec<Frame>> = (0..32u64)
        .map(|s| {
            (0..12u64)
                .map(|i| {
                    let side = 16 + (rng.next_u64() % 49) as u32; // 16..64 px
                    let pixels = synthetic(s * 12 + i, side, side, 3);
                    frame(
                        format!("{s}-{i}"),
                        Image::Encoded(encode(&pixels, side, side, image::ImageFormat::Png)),
                    )
                })
                .collect()
        })
        .collect();

    // The same frames one at a time, in-process, at batch 1.
    let model = Model::load(&config.model).expect("model");
    let pre = Preprocessor::new(&model.card.input);
    let mut reference = Reference::new(&config);
    let mut expected = std::collections::HashMap::new();
    for frame in streams.iter().flatten() {
        let input = pre
            .tensor(frame.image.clone().map(Into::into).as_ref())
            .expect("valid");
        expected.insert(frame.frame_id.clone(), reference.tensor_logits(&input));
    }

    let mut tasks = Vec::new();
    for frames in streams {
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let ids: Vec<String> = frames.iter().map(|f| f.frame_id.clone()).collect();
            (ids, detect_all(client, frames).await)
        }));
    }
    let mut answered = 0;
    for task in tasks {
        let (ids, got) = task.await.expect("stream");
        assert_eq!(
            got.iter().map(|v| v.frame_id.clone()).collect::<Vec<_>>(),
            ids,
            "one verdict per frame, in order"
        );
        for v in got {
            reference.assert_answer(&v, &expected[&v.frame_id]);
            answered += 1;
        }
    }
    assert_eq!(answered, 32 * 12);

    // Frames of different streams did share engine runs.
    let text = server.scrape().await;
    let runs = metric(&text, "odin_batch_size_count");
    let single = metric(&text, r#"odin_batch_size_bucket{le="1"}"#);
    let frames = metric(&text, "odin_batch_size_sum");
    assert_eq!(frames, (32 * 12) as f64, "every frame computed once");
    assert!(
        single < runs,
        "no batch had more than one frame ({runs} runs)"
    );
    assert!(runs < frames, "{runs} runs for {frames} frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_faster_than_the_engine_is_held_back_and_loses_nothing() {
    let mut config = builtin();
    config.stream_window = 16;
    config.batch.queue_capacity = 32;
    config.batch.max_batch = 4;
    let server = TestServer::start(config).await;
    const FRAMES: usize = 1500;
    let frames: Vec<Frame> = (0..FRAMES)
        .map(|i| raw_frame(i.to_string(), i as u64 % 100))
        .collect();
    let mut client = server.client().await;
    let mut stream = client
        .detect(tokio_stream::iter(frames))
        .await
        .expect("Detect")
        .into_inner();

    // Read slowly at first, so verdicts pile up on the server side too.
    let pipeline = Arc::clone(&server.pipeline);
    let peaks = Peaks::watch(&pipeline);
    let mut answered = 0;
    while let Some(v) = stream.next().await {
        let v = v.expect("verdict");
        assert_eq!(v.frame_id, answered.to_string());
        assert!(v.error.is_none(), "{:?}", v.error);
        answered += 1;
        if answered < 200 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(answered, FRAMES, "every frame sent gets its verdict");
    // The server reads a stream only while fewer than `stream_window` of its
    // frames are being judged, however many the client has sent.
    assert!(
        peaks.in_flight() <= 16,
        "{} frames in flight",
        peaks.in_flight()
    );
    assert!(peaks.queued() <= 16, "{} frames queued", peaks.queued());
    assert_eq!(pipeline.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_default_sizes_a_stream_holds_64_frames_and_the_queue_256() {
    // The README's promise: 64 frames in flight per stream, 256 queued for
    // the engine, and unary callers wait rather than fail. Only the engine
    // is slowed; the window and queue keep their defaults.
    let config = slow_builtin();
    assert_eq!(
        (config.stream_window, config.batch.queue_capacity),
        (
            ServeConfig::default().stream_window,
            ServeConfig::default().batch.queue_capacity
        )
    );
    let server = TestServer::start(config).await;
    let pipeline = Arc::clone(&server.pipeline);

    // One stream of 300 frames: never more than 64 of them in flight.
    let peaks = Peaks::watch(&pipeline);
    let frames: Vec<Frame> = (0..300u64).map(|i| raw_frame(i.to_string(), i)).collect();
    let verdicts = detect_all(server.client().await, frames).await;
    assert_eq!(verdicts.len(), 300);
    assert!(verdicts.iter().all(|v| v.error.is_none()));
    let one_stream = peaks.in_flight();
    drop(peaks);
    assert!(
        one_stream <= 64,
        "{one_stream} frames of one stream in flight"
    );
    assert!(one_stream >= 48, "the window filled only to {one_stream}");

    // Eight streams of 100 on one connection (one client): its engine
    // queue fills to 256 and holds there; the frames past it wait outside,
    // and a unary call on the same connection waits with them.
    let peaks = Peaks::watch(&pipeline);
    let channel = server.channel().await;
    let mut streams = Vec::new();
    for s in 0..8u64 {
        let frames: Vec<Frame> = (0..100u64)
            .map(|i| raw_frame(format!("{s}-{i}"), s * 100 + i))
            .collect();
        let client = DetectorClient::new(channel.clone());
        streams.push(tokio::spawn(
            async move { detect_all(client, frames).await },
        ));
    }
    for _ in 0..3000 {
        if pipeline.queued() >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unary = DetectorClient::new(channel.clone())
        .detect_one(raw_frame("unary", 7))
        .await
        .expect("a unary call waits for room instead of failing")
        .into_inner();
    assert!(unary.error.is_none(), "{:?}", unary.error);
    for (s, stream) in streams.into_iter().enumerate() {
        let verdicts = stream.await.expect("stream task");
        let ids: Vec<String> = verdicts.iter().map(|v| v.frame_id.clone()).collect();
        let want: Vec<String> = (0..100).map(|i| format!("{s}-{i}")).collect();
        assert_eq!(ids, want);
        assert!(verdicts.iter().all(|v| v.error.is_none()));
    }
    let (in_flight, queued) = (peaks.in_flight(), peaks.queued());
    drop(peaks);
    assert_eq!(queued, 256, "the client's engine queue holds 256 frames");
    assert!(in_flight <= 8 * 64 + 1, "{in_flight} frames in flight");
    assert!(
        in_flight > queued,
        "frames past the full queue wait outside it ({in_flight} in flight)"
    );
    settle(&pipeline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_streams_pending_frames_never_reach_the_engine() {
    const SENT: usize = 256;
    let mut config = slow_builtin();
    config.stream_window = SENT;
    let server = TestServer::start(config).await;
    let (tx, rx) = tokio::sync::mpsc::channel(SENT);
    // The first frame takes long to decode (a large noisy PNG): the frames
    // behind it are computed meanwhile, and none can be answered before it.
    let side = 1600;
    let large = encode(
        &synthetic(99, side, side, 3),
        side,
        side,
        image::ImageFormat::Png,
    );
    tx.send(frame("0", Image::Encoded(large)))
        .await
        .expect("queued");
    for i in 1..SENT {
        tx.send(raw_frame(i.to_string(), i as u64 % 50))
            .await
            .expect("queued");
    }
    let mut client = server.client().await;
    let verdicts = client
        .detect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Detect")
        .into_inner();
    // Wait until the server has read most frames: they are pending there.
    let mut pending = 0;
    for _ in 0..3000 {
        pending = server.pipeline.in_flight();
        if pending >= SENT * 3 / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(pending >= SENT * 3 / 4, "only {pending} frames pending");
    // The client goes away: it cancels the call and closes its connection.
    drop(verdicts);
    drop(tx);
    drop(client);
    settle(&server.pipeline).await;
    // Give any straggler batch time to reach the counters.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = server.scrape().await;
    let computed = metric(&text, "odin_batch_size_sum") as usize;
    assert!(
        computed <= SENT / 2,
        "{computed} of {SENT} frames were computed although the client cancelled with {pending} pending"
    );
    assert_eq!(metric(&text, "odin_streams_open"), 0.0);
    assert_eq!(metric(&text, "odin_queue_depth"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_reports_consistent_counts_against_a_real_server() {
    let server = TestServer::start(builtin()).await;
    let mut pool: Vec<Frame> = (0..50u64)
        .map(|i| Frame {
            image: Some(raw(32, 32, 3, synthetic32(i))),
            ..Frame::default()
        })
        .collect();
    // One bad frame in the pool: its verdicts are errors, counted by reason.
    pool.push(Frame::default());

    for (mode, pacing) in [
        (Mode::Stream, Pacing::Closed { in_flight: 4 }),
        (Mode::Unary, Pacing::Closed { in_flight: 2 }),
        (Mode::Stream, Pacing::Open { rate: 400.0 }),
    ] {
        let before = server.scrape().await;
        let config = LoadConfig {
            target: Target::Tcp(server.addr.to_string()),
            mode,
            connections: 2,
            streams: 2,
            pacing,
            duration: None,
            frames: Some(306),
            warmup: Duration::ZERO,
            pool: Arc::new(pool.clone()),
        };
        let peaks = Peaks::watch(&server.pipeline);
        let report = loadgen::run(config, false).await.expect("runs");
        let peak = peaks.in_flight();
        drop(peaks);
        let after = server.scrape().await;
        let s = &report.stats;
        let case = format!("{mode:?} {pacing:?}");

        // Counts: every frame sent once, answered once, measured once.
        assert_eq!(report.sent, 306, "{case}");
        assert_eq!(s.answered, 306, "{case}: every frame answered");
        assert_eq!(s.measured, 306, "{case}: no warm-up, all measured");
        assert_eq!(s.latency.len(), 306, "{case}: one latency per frame");
        assert_eq!(
            s.compute.len(),
            300,
            "{case}: one compute time per judged frame"
        );
        // The bad frame is 1 in 51: 6 errors, and no other error at all.
        assert_eq!(
            s.errors.get("EMPTY_FRAME"),
            Some(&6),
            "{case}: {:?}",
            s.errors
        );
        assert_eq!(s.error_count(), 6, "{case}: {:?}", s.errors);
        assert_eq!(
            s.in_distribution + s.out_of_distribution + s.error_count(),
            s.answered
        );
        // The server counted the same verdicts.
        let delta = |verdict: &str| {
            let series = format!(r#"odin_frames_total{{verdict="{verdict}"}}"#);
            (metric(&after, &series) - metric(&before, &series)) as u64
        };
        assert_eq!(
            (delta("in"), delta("out"), delta("error")),
            (s.in_distribution, s.out_of_distribution, 6),
            "{case}"
        );
        // Latencies: each judged frame's is at least its batch's compute
        // time, so the largest is too; none is longer than the whole run.
        assert!(
            report.latency_ms(1.0) * 1000.0 >= s.compute.max() as f64,
            "{case}: max latency {} ms < max compute {} µs",
            report.latency_ms(1.0),
            s.compute.max()
        );
        // The k-th shortest latency is at least the (k - 6)-th shortest
        // compute time (6 error frames have no compute time): the median
        // latency covers the median engine run (to the histograms' 0.1%).
        let median = s.compute.value_at_quantile(147.0 / 300.0) as f64;
        assert!(
            report.latency_ms(0.5) * 1000.0 >= 0.99 * median,
            "{case}: median latency {} ms < median compute {median} µs",
            report.latency_ms(0.5)
        );
        assert!(
            report.latency_ms(1.0) <= report.elapsed.as_secs_f64() * 1000.0,
            "{case}"
        );
        assert!(report.latency_ms(0.5) <= report.latency_ms(0.99));
        // frames/s is measured over a window inside the run.
        assert!(
            report.frames_per_second() >= 305.0 / report.elapsed.as_secs_f64(),
            "{case}: {} frames/s over {:?}",
            report.frames_per_second(),
            report.elapsed
        );
        match pacing {
            // 4 connections × streams, each with its frames in flight.
            Pacing::Closed { in_flight } => {
                assert!(peak <= 4 * in_flight, "{case}: {peak} frames in flight")
            }
            // Each of the 4 senders spaces its frames 4/400 s apart, and one
            // of them sends at least ⌈306 / 4⌉ = 77: its last is due at
            // 76 × 4 / 400 s.
            Pacing::Open { rate } => assert!(
                report.elapsed.as_secs_f64() >= 76.0 * 4.0 / rate,
                "{case}: done in {:?}",
                report.elapsed
            ),
        }
        let json = report.json();
        assert_eq!(json["answered"], 306);
        assert!(report.csv().lines().count() == 2 && report.table().contains("p99.9"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_past_the_admission_limit_get_resource_exhausted() {
    let mut config = slow_builtin();
    config.max_unary_in_flight = 2;
    let server = TestServer::start(config.clone()).await;
    let mut reference = Reference::new(&config);
    // 32 calls at once on one connection: at most 2 are admitted at a time.
    let client = server.client().await;
    let start = Arc::new(tokio::sync::Barrier::new(32));
    let peaks = Peaks::watch(&server.pipeline);
    let mut calls = Vec::new();
    for i in 0..32u64 {
        let (mut client, start) = (client.clone(), Arc::clone(&start));
        calls.push(tokio::spawn(async move {
            start.wait().await;
            client.detect_one(raw_frame(i.to_string(), i)).await
        }));
    }
    let (mut served, mut shed) = (0, 0);
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.expect("call task") {
            Ok(v) => {
                let v = v.into_inner();
                let logits = reference.logits(&synthetic32(i as u64));
                reference.assert_answer(&v, &logits);
                served += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("too many unary calls")
                        && status.message().contains("limit 2"),
                    "{}",
                    status.message()
                );
                shed += 1;
            }
        }
    }
    let peak = peaks.in_flight();
    drop(peaks);
    assert_eq!(served + shed, 32);
    assert!(served >= 2 && shed >= 1, "served {served}, shed {shed}");
    assert!(
        peak <= 2,
        "{peak} unary frames in flight past the limit of 2"
    );

    // The slots were given back: calls one after another are all admitted.
    let mut client = server.client().await;
    for i in 0..4 {
        let v = client
            .detect_one(raw_frame(format!("after-{i}"), i))
            .await
            .expect("admitted once the burst is over")
            .into_inner();
        assert!(v.error.is_none());
    }

    // Streams are not subject to the unary limit.
    let frames: Vec<Frame> = (0..40u64).map(|i| raw_frame(i.to_string(), i)).collect();
    let verdicts = detect_all(server.client().await, frames).await;
    assert_eq!(verdicts.len(), 40);
    for (i, v) in verdicts.iter().enumerate() {
        let logits = reference.logits(&synthetic32(i as u64));
        reference.assert_answer(v, &logits);
    }
}
