//! Batching across streams, flow control, and the load generator, against a
//! real server on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use odin_sidecar::calib::sets::SplitMix64;
use odin_sidecar::loadgen::{self, LoadConfig, Mode, Pacing, Target};
use odin_sidecar::model::{Model, ModelCard, ModelSource, Resize};
use odin_sidecar::pipeline::Preprocessor;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame};
use tokio_stream::StreamExt;

/// ResNet-20 with a card that resizes, so frames may come in any size.
fn resizing_resnet20(dir: &std::path::Path) -> odin_sidecar::config::ServeConfig {
    let mut card =
        ModelCard::load(&repo_dir().join("models/resnet20_cifar10.card.json")).expect("card");
    card.input.resize = Resize::Bilinear;
    let path = dir.join("resnet20.card.json");
    std::fs::write(&path, serde_json::to_string(&card).expect("json")).expect("write card");
    let mut config = resnet20();
    config.model = ModelSource::File {
        model: data_dir().join("models/resnet20_cifar10.onnx"),
        card: Some(path),
    };
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batching_across_32_streams_keeps_order_and_equals_one_at_a_time() {
    let dir = std::env::temp_dir().join(format!("odin-batching-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let mut config = resizing_resnet20(&dir);
    config.batch.max_batch = 16;
    config.batch.max_queue_delay = Duration::from_millis(2);
    let server = TestServer::start(config.clone()).await;

    // 32 streams × 12 frames: real CIFAR-10 pixels, PNG-encoded at random sizes.
    let cifar = cifar10_test();
    let mut rng = SplitMix64(11);
    let streams: Vec<Vec<Frame>> = (0..32)
        .map(|s| {
            (0..12)
                .map(|i| {
                    let side = 16 + (rng.next_u64() % 49) as u32; // 16..64 px
                    let img = image::RgbImage::from_raw(32, 32, cifar.pixels(s * 12 + i).to_vec())
                        .expect("dims");
                    let resized = image::imageops::resize(
                        &img,
                        side,
                        side,
                        image::imageops::FilterType::Nearest,
                    );
                    Frame {
                        frame_id: format!("{s}-{i}"),
                        image: Some(Image::Encoded(encode(
                            resized.as_raw(),
                            side,
                            side,
                            image::ImageFormat::Png,
                        ))),
                        ..Frame::default()
                    }
                })
                .collect()
        })
        .collect();

    // The same frames one at a time, in-process, at batch 1.
    let model = Model::load(&config.model).expect("model");
    let pre = Preprocessor::new(&model.card.input);
    let mut engine = reference_engine(&config);
    let mut expected = std::collections::HashMap::new();
    for frame in streams.iter().flatten() {
        let logits = engine
            .logits(
                &pre.tensor(frame.image.clone().map(Into::into).as_ref())
                    .expect("valid"),
                1,
            )
            .expect("runs");
        expected.insert(frame.frame_id.clone(), logits);
    }

    let mut tasks = Vec::new();
    for frames in streams {
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let ids: Vec<String> = frames.iter().map(|f| f.frame_id.clone()).collect();
            (ids, detect_all(client, frames).await)
        }));
    }
    let mut batched = 0;
    for task in tasks {
        let (ids, got) = task.await.expect("stream");
        assert_eq!(
            got.iter().map(|v| v.frame_id.clone()).collect::<Vec<_>>(),
            ids,
            "one verdict per frame, in order"
        );
        for v in got {
            assert!(v.error.is_none(), "{:?}", v.error);
            let logits = &expected[&v.frame_id];
            assert_eq!(v.predicted_class as usize, argmax(logits), "{}", v.frame_id);
            let want = reference_max_softmax(logits);
            assert!(
                (f64::from(v.max_softmax) - want).abs() < 1e-5,
                "{}: {} vs {want}",
                v.frame_id,
                v.max_softmax
            );
            batched += 1;
        }
    }
    assert_eq!(batched, 32 * 12);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_faster_than_the_engine_is_held_back_and_loses_nothing() {
    let mut config = resnet20();
    config.stream_window = 16;
    config.batch.queue_capacity = 32;
    config.batch.max_batch = 4;
    let server = TestServer::start(config).await;
    let cifar = cifar10_test();
    const FRAMES: usize = 1500;
    let frames = (0..FRAMES).map(move |i| Frame {
        frame_id: i.to_string(),
        image: Some(Image::Raw(cifar.raw(i).into())),
        ..Frame::default()
    });
    let mut client = server.client().await;
    let mut stream = client
        .detect(tokio_stream::iter(frames))
        .await
        .expect("Detect")
        .into_inner();

    // Read slowly at first, so verdicts pile up on the server side too.
    let pipeline = Arc::clone(&server.pipeline);
    let mut peak = 0;
    let mut answered = 0;
    while let Some(v) = stream.next().await {
        let v = v.expect("verdict");
        assert_eq!(v.frame_id, answered.to_string());
        answered += 1;
        peak = peak.max(pipeline.in_flight());
        if answered < 200 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(answered, FRAMES, "every frame sent gets its verdict");
    // The server reads a stream only while fewer than `stream_window` of its
    // frames are being judged, however many the client has sent.
    assert!(peak <= 16, "{peak} frames in flight on the server");
    assert_eq!(pipeline.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_reports_consistent_counts_against_a_real_server() {
    let server = TestServer::start(resnet20()).await;
    let cifar = cifar10_test();
    let mut pool: Vec<Frame> = (0..50)
        .map(|i| Frame {
            image: Some(Image::Raw(cifar.raw(i).into())),
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
        let report = loadgen::run(config, false).await.expect("runs");
        let s = &report.stats;
        assert_eq!(report.sent, 306, "{mode:?} {pacing:?}");
        assert_eq!(s.answered, 306, "every frame answered");
        assert_eq!(
            s.in_distribution + s.out_of_distribution + s.error_count(),
            s.answered
        );
        assert_eq!(s.errors.get("EMPTY_FRAME"), Some(&6), "{:?}", s.errors);
        assert!(report.frames_per_second() > 0.0);
        assert!(report.latency_ms(0.5) <= report.latency_ms(0.99));
        let json = report.json();
        assert_eq!(json["answered"], 306);
        assert!(report.csv().lines().count() == 2 && report.table().contains("p99.9"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_past_the_admission_limit_get_resource_exhausted() {
    let mut config = resnet20();
    config.max_unary_in_flight = 2;
    config.workers = 1;
    let server = TestServer::start(config).await;
    let cifar = cifar10_test();
    // 32 calls at once on one connection: at most 2 are admitted at a time.
    let client = server.client().await;
    let start = Arc::new(tokio::sync::Barrier::new(32));
    let mut calls = Vec::new();
    for i in 0..32 {
        let (mut client, start) = (client.clone(), Arc::clone(&start));
        let frame = Frame {
            frame_id: i.to_string(),
            image: Some(Image::Raw(cifar.raw(i).into())),
            ..Frame::default()
        };
        calls.push(tokio::spawn(async move {
            start.wait().await;
            client.detect_one(frame).await
        }));
    }
    let (mut served, mut shed) = (0, 0);
    for call in calls {
        match call.await.expect("call task") {
            Ok(v) => {
                assert!(v.into_inner().error.is_none());
                served += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("too many unary calls"));
                shed += 1;
            }
        }
    }
    assert_eq!(served + shed, 32);
    assert!(served >= 2 && shed >= 1, "served {served}, shed {shed}");
    // Streams are not subject to the unary limit.
    let frames: Vec<Frame> = (0..40)
        .map(|i| Frame {
            frame_id: i.to_string(),
            image: Some(Image::Raw(cifar.raw(i).into())),
            ..Frame::default()
        })
        .collect();
    let verdicts = detect_all(server.client().await, frames).await;
    assert_eq!(verdicts.len(), 40);
}
