//! End to end over real gRPC: a real tonic server on loopback, the real
//! ResNet-20 in ONNX Runtime, real CIFAR-10 and TinyImageNet frames.

mod common;

use common::*;
use odin_sidecar::engine::Device;
use odin_sidecar::wire::odin_v1::{
    frame::Image, Frame, GetModelInfoRequest, RawImage, Tensor, Verdict,
};
use tokio_stream::StreamExt;

fn frame(id: String, image: Image) -> Frame {
    Frame {
        frame_id: id,
        image: Some(image),
        ..Frame::default()
    }
}

/// Streams `frames` on one Detect call and collects every verdict.
async fn detect_all(server: &TestServer, frames: Vec<Frame>) -> Vec<Verdict> {
    common::detect_all(server.client().await, frames).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_image_form_gets_the_models_own_answer() {
    let config = resnet20();
    let server = TestServer::start(config.clone()).await;
    let mut engine = reference_engine(&config);

    let (cifar, tin) = (cifar10_test(), tin_crop());
    let mut frames = Vec::new();
    let mut expected = Vec::new(); // (frame_id, logits computed in-process)
    let pixels: Vec<(&str, usize, &[u8])> = (0..12)
        .map(|i| ("cifar", i, cifar.pixels(i)))
        .chain((0..12).map(|i| ("tin", i, tin.pixels(i))))
        .collect();
    for (set, i, px) in pixels {
        let forms: Vec<(&str, Image, Vec<u8>)> = {
            let jpeg = encode(px, 32, 32, image::ImageFormat::Jpeg);
            let decoded_jpeg = reference_jpeg_decode(&jpeg);
            vec![
                ("jpeg", Image::Encoded(jpeg), decoded_jpeg),
                (
                    "png",
                    Image::Encoded(encode(px, 32, 32, image::ImageFormat::Png)),
                    px.to_vec(),
                ),
                (
                    "raw",
                    Image::Raw(RawImage {
                        width: 32,
                        height: 32,
                        channels: 3,
                        pixels: px.to_vec(),
                    }),
                    px.to_vec(),
                ),
                (
                    "tensor",
                    Image::Tensor(Tensor {
                        shape: vec![1, 3, 32, 32],
                        data: normalize(px, &MEAN, &STD),
                    }),
                    px.to_vec(),
                ),
            ]
        };
        for (form, image, reference_pixels) in forms {
            let id = format!("{set}-{i}-{form}");
            let logits = engine
                .logits(&normalize(&reference_pixels, &MEAN, &STD), 1)
                .expect("runs");
            expected.push((id.clone(), logits));
            frames.push(frame(id, image));
        }
    }

    let verdicts = detect_all(&server, frames).await;
    assert_eq!(
        verdicts.len(),
        expected.len(),
        "exactly one verdict per frame"
    );
    for (verdict, (id, logits)) in verdicts.iter().zip(&expected) {
        assert_eq!(&verdict.frame_id, id, "verdicts come back in frame order");
        assert!(verdict.error.is_none(), "{id}: {:?}", verdict.error);
        assert_eq!(verdict.predicted_class as usize, argmax(logits), "{id}");
        let want = reference_max_softmax(logits);
        assert!(
            (f64::from(verdict.max_softmax) - want).abs() < 1e-5,
            "{id}: max_softmax {} vs {want}",
            verdict.max_softmax
        );
        assert_eq!(verdict.method, "msp");
        assert_eq!(
            verdict.score, verdict.max_softmax,
            "msp at T = 1 is the max softmax"
        );
        assert_eq!(verdict.in_distribution, verdict.score >= verdict.threshold);
        let t = verdict.timings.expect("timings");
        assert!(t.total_us >= t.decode_us && t.total_us > 0, "{t:?}");
    }
    let labels = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    assert_eq!(
        verdicts[0].label,
        labels[verdicts[0].predicted_class as usize]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_streams_of_100_frames_each_stay_whole_and_in_order() {
    let server = TestServer::start(resnet20()).await;
    let cifar = cifar10_test();
    let mut tasks = Vec::new();
    for s in 0..8 {
        let frames: Vec<Frame> = (0..100)
            .map(|i| {
                let idx = s * 100 + i;
                let mut f = frame(format!("s{s}-f{i}"), Image::Raw(cifar.raw(idx).into()));
                f.attributes.insert("camera".into(), format!("cam-{s}"));
                f
            })
            .collect();
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            (s, common::detect_all(client, frames).await)
        }));
    }
    for task in tasks {
        let (s, got) = task.await.expect("stream task");
        let ids: Vec<String> = got.iter().map(|v| v.frame_id.clone()).collect();
        let want: Vec<String> = (0..100).map(|i| format!("s{s}-f{i}")).collect();
        assert_eq!(ids, want, "stream {s}: every frame once, in order");
        assert!(got.iter().all(|v| v.error.is_none()));
        assert!(got
            .iter()
            .all(|v| v.attributes.get("camera") == Some(&format!("cam-{s}"))));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_their_own_errors_and_the_stream_goes_on() {
    let mut config = resnet20();
    config.decode.resize = Some(odin_sidecar::model::Resize::None);
    let server = TestServer::start(config).await;
    let cifar = cifar10_test();
    let good = |i: usize| frame(format!("good-{i}"), Image::Raw(cifar.raw(i).into()));
    let mut corrupt = encode(cifar.pixels(0), 32, 32, image::ImageFormat::Jpeg);
    corrupt.truncate(corrupt.len() / 3);
    let small_png = encode(&vec![90u8; 16 * 16 * 3], 16, 16, image::ImageFormat::Png);
    let frames = vec![
        good(0),
        frame("corrupt-jpeg".into(), Image::Encoded(corrupt)),
        good(1),
        frame("png-16x16".into(), Image::Encoded(small_png)),
        good(2),
        Frame {
            frame_id: "empty".into(),
            ..Frame::default()
        },
        good(3),
        frame(
            "raw-short".into(),
            Image::Raw(RawImage {
                width: 32,
                height: 32,
                channels: 3,
                pixels: vec![0; 32 * 32 * 3 - 1],
            }),
        ),
        good(4),
    ];
    let verdicts = detect_all(&server, frames).await;
    let summary: Vec<(String, String)> = verdicts
        .iter()
        .map(|v| {
            (
                v.frame_id.clone(),
                v.error
                    .as_ref()
                    .map(|e| e.reason.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let expect = |id: &str, reason: &str| (id.to_string(), reason.to_string());
    assert_eq!(
        summary,
        vec![
            expect("good-0", ""),
            expect("corrupt-jpeg", "DECODE_FAILED"),
            expect("good-1", ""),
            expect("png-16x16", "SIZE_MISMATCH"),
            expect("good-2", ""),
            expect("empty", "EMPTY_FRAME"),
            expect("good-3", ""),
            expect("raw-short", "RAW_LENGTH_MISMATCH"),
            expect("good-4", ""),
        ]
    );
    for v in verdicts.iter().filter(|v| v.error.is_some()) {
        let e = v.error.as_ref().expect("error");
        assert_eq!(
            e.code,
            tonic::Code::InvalidArgument as i32,
            "{}",
            v.frame_id
        );
        assert!(!e.message.is_empty());
    }
    let short = &verdicts[7].error.as_ref().expect("error").message;
    assert!(
        short.contains("3071 bytes") && short.contains("3072"),
        "{short}"
    );
    let png = &verdicts[3].error.as_ref().expect("error").message;
    assert!(png.contains("16x16") && png.contains("32x32"), "{png}");
}

/// Overwrites the size declared in a JPEG's SOF0 segment.
fn claim_size(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let at = jpeg
        .windows(2)
        .position(|m| m == [0xFF, 0xC0])
        .expect("SOF0");
    jpeg[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_size_jpegs_are_judged_and_checked_on_their_declared_size() {
    let mut config = resnet20();
    config.decode.resize = Some(odin_sidecar::model::Resize::Area);
    config.max_pixels = 1_000_000;
    let server = TestServer::start(config.clone()).await;
    let model = odin_sidecar::model::Model::load(&config.model).expect("model");
    let pre = odin_sidecar::app::preprocessor(&model, &config);
    let mut engine = reference_engine(&config);

    // CIFAR-10 images upscaled to 1280x720: decoded at 1/4 scale (320x180).
    let cifar = cifar10_test();
    let camera = |i: usize| {
        let img = image::RgbImage::from_raw(32, 32, cifar.pixels(i).to_vec()).expect("dims");
        image::imageops::resize(&img, 1280, 720, image::imageops::FilterType::CatmullRom).into_raw()
    };
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    for i in 0..6 {
        let px = camera(i);
        let jpeg = if i % 2 == 0 || !tjdecode::AVAILABLE {
            encode(&px, 1280, 720, image::ImageFormat::Jpeg)
        } else {
            tjdecode::compress(
                &px,
                1280,
                720,
                tjdecode::PixelFormat::Rgb,
                85,
                tjdecode::Subsampling::S420,
                i == 3,
            )
            .expect("encodes")
        };
        let tensor = pre
            .tensor(Some(&odin_sidecar::domain::ImageInput::Encoded(
                jpeg.clone(),
            )))
            .expect("decodes");
        expected.push(engine.logits(&tensor, 1).expect("runs"));
        frames.push(frame(format!("cam-{i}"), Image::Encoded(jpeg)));
    }
    let good = encode(&camera(0), 1280, 720, image::ImageFormat::Jpeg);
    frames.push(frame(
        "over-budget".into(),
        Image::Encoded(claim_size(good.clone(), 1600, 1200)),
    ));
    // Far too short for 1280x720: refused before decoding, with either JPEG
    // backend (the decoder tests cover cuts libjpeg-turbo reports itself).
    frames.push(frame(
        "truncated".into(),
        Image::Encoded([&good[..3000], &[0xFF, 0xD9][..]].concat()),
    ));
    let mut liar = claim_size(good[..2000].to_vec(), 1000, 1000);
    liar.extend_from_slice(&[0xFF, 0xD9]);
    frames.push(frame("liar".into(), Image::Encoded(liar)));

    let verdicts = detect_all(&server, frames).await;
    for (v, logits) in verdicts.iter().zip(&expected) {
        assert!(v.error.is_none(), "{}: {:?}", v.frame_id, v.error);
        assert_eq!(v.predicted_class as usize, argmax(logits), "{}", v.frame_id);
        let want = reference_max_softmax(logits);
        assert!(
            (f64::from(v.max_softmax) - want).abs() < 1e-5,
            "{}",
            v.frame_id
        );
    }
    let reasons: Vec<(&str, String)> = verdicts[6..]
        .iter()
        .map(|v| {
            let e = v.error.as_ref().expect("an error verdict");
            (v.frame_id.as_str(), e.reason.clone())
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("over-budget", "IMAGE_TOO_LARGE".to_string()),
            ("truncated", "DECODE_FAILED".to_string()),
            ("liar", "DECODE_FAILED".to_string()),
        ]
    );
    let over = &verdicts[6].error.as_ref().expect("error").message;
    assert!(
        over.contains("1600x1200") && over.contains("1000000"),
        "{over}"
    );
    let liar = &verdicts[8].error.as_ref().expect("error").message;
    assert!(liar.contains("implausibly short"), "{liar}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_one_and_model_info_answer_unary_calls() {
    let server = TestServer::start(resnet20()).await;
    let mut client = server.client().await;
    let cifar = cifar10_test();
    let mut f = frame("one".into(), Image::Raw(cifar.raw(7).into()));
    f.attributes.insert("k".into(), "v".into());
    let v = client.detect_one(f).await.expect("DetectOne").into_inner();
    assert_eq!(v.frame_id, "one");
    assert!(v.error.is_none());
    assert_eq!(v.attributes.get("k").map(String::as_str), Some("v"));
    let bad = client
        .detect_one(frame("bad".into(), Image::Encoded(b"GIF89a".to_vec())))
        .await
        .expect("a bad frame is a verdict, not a failed call")
        .into_inner();
    assert_eq!(bad.error.expect("error").reason, "DECODE_FAILED");

    let info = client
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "resnet20_cifar10");
    assert_eq!(info.input_name, "input");
    assert_eq!(info.input_shape, vec![-1, 3, 32, 32]);
    assert_eq!(info.labels.len(), 10);
    assert_eq!(info.execution_provider, "CPUExecutionProvider");
    let pre = info.preprocessing.expect("preprocessing");
    assert_eq!(
        (pre.height, pre.width, pre.resize.as_str()),
        (32, 32, "area")
    );
    assert_eq!(info.scoring.expect("scoring").method, "msp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_the_detector() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };

    let server = TestServer::start(resnet20()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "odin.v1.Detector"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.next().await.expect("one response").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"odin.v1.Detector".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_is_refused_clearly_without_a_gpu_and_auto_falls_back_to_cpu() {
    let mut cuda = resnet20();
    cuda.engine.device = Device::Cuda(0);
    match odin_sidecar::app::App::build(&cuda).await {
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("--device cuda:0"), "{message}");
            assert!(
                message.contains("CUDA execution provider could not be registered"),
                "{message}"
            );
        }
        // On a machine with a GPU and a CUDA build of ONNX Runtime the request is honoured.
        Ok(app) => assert!(app
            .info()
            .execution_provider
            .starts_with("CUDAExecutionProvider")),
    }

    let mut auto = resnet20();
    auto.engine.device = Device::Auto;
    let server = TestServer::start(auto).await;
    let provider = server.app_info.execution_provider.clone();
    assert!(provider == "CPUExecutionProvider" || provider.starts_with("CUDAExecutionProvider"));
    let mut client = server.client().await;
    let v = client
        .detect_one(frame(
            "auto".into(),
            Image::Raw(cifar10_test().raw(0).into()),
        ))
        .await
        .expect("served")
        .into_inner();
    assert!(v.error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_overrides_apply_per_frame_and_out_of_bounds_ones_are_rejected() {
    use odin_sidecar::wire::odin_v1::ScoringOverride;
    let server = TestServer::start(resnet20()).await;
    let cifar = cifar10_test();
    let with = |id: &str, over: ScoringOverride| Frame {
        frame_id: id.into(),
        image: Some(Image::Raw(cifar.raw(3).into())),
        scoring: Some(over),
        ..Frame::default()
    };
    let frames = vec![
        with(
            "energy",
            ScoringOverride {
                method: "energy".into(),
                threshold: Some(-1e9),
                ..Default::default()
            },
        ),
        with(
            "hot",
            ScoringOverride {
                temperature: Some(5000.0),
                ..Default::default()
            },
        ),
        with(
            "eps",
            ScoringOverride {
                method: "odin".into(),
                epsilon: Some(0.5),
                ..Default::default()
            },
        ),
        with(
            "bogus",
            ScoringOverride {
                method: "bogus".into(),
                ..Default::default()
            },
        ),
        with(
            "t10",
            ScoringOverride {
                temperature: Some(10.0),
                ..Default::default()
            },
        ),
    ];
    let v = detect_all(&server, frames).await;
    let reason = |i: usize| v[i].error.as_ref().map(|e| e.reason.clone());
    // Energy: T·logsumexp(z/T) at T = 1 of the model's own logits.
    let logits = {
        reference_engine(&resnet20())
            .logits(&normalize(cifar.pixels(3), &MEAN, &STD), 1)
            .expect("runs")
    };
    let lse = {
        let m = logits
            .iter()
            .map(|x| f64::from(*x))
            .fold(f64::NEG_INFINITY, f64::max);
        m + logits
            .iter()
            .map(|x| (f64::from(*x) - m).exp())
            .sum::<f64>()
            .ln()
    };
    assert_eq!(reason(0), None);
    assert_eq!(v[0].method, "energy");
    assert!(
        (f64::from(v[0].score) - lse).abs() < 1e-4 * lse.abs().max(1.0),
        "{} vs {lse}",
        v[0].score
    );
    assert!(v[0].in_distribution && v[0].threshold == -1e9);
    assert_eq!(reason(1).as_deref(), Some("OVERRIDE_OUT_OF_BOUNDS"));
    assert!(v[1]
        .error
        .as_ref()
        .expect("error")
        .message
        .contains("temperature = 5000"));
    assert_eq!(reason(2).as_deref(), Some("OVERRIDE_OUT_OF_BOUNDS"));
    assert_eq!(reason(3).as_deref(), Some("UNKNOWN_METHOD"));
    assert_eq!(reason(4), None);
    assert_eq!((v[4].method.as_str(), v[4].temperature), ("msp", 10.0));
    assert!(v[4].score < v[4].max_softmax, "T = 10 flattens the softmax");
}
