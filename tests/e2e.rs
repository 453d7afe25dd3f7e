//! End to end over real gRPC: a real tonic server on loopback serving the
//! built-in CIFAR-10 CNN in ONNX Runtime, frames the tests generate, and
//! answers checked against the model run in-process. One check is
//! ResNet-20-specific and needs the data directory.

#[macro_use]
mod common;

use common::*;
use odin_sidecar::engine::Device;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, GetModelInfoRequest, ScoringOverride};
use tokio_stream::StreamExt;

/// Streams `frames` on one Detect call and collects every verdict.
async fn detect(
    server: &TestServer,
    frames: Vec<Frame>,
) -> Vec<odin_sidecar::wire::odin_v1::Verdict> {
    detect_all(server.client().await, frames).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_image_form_gets_the_models_own_answer() {
    let config = builtin();
    let server = TestServer::start(config.clone()).await;
    let mut reference = Reference::new(&config);
    let input = reference.card.input.clone();

    let mut frames = Vec::new();
    let mut expected = Vec::new(); // (frame_id, logits computed in-process)
    for seed in 0..12 {
        let rgb = synthetic32(seed);
        let gray = synthetic(1000 + seed, 32, 32, 1);
        let rgba = synthetic(2000 + seed, 32, 32, 4);
        let jpeg = encode(&rgb, 32, 32, image::ImageFormat::Jpeg);
        let gray_as_rgb: Vec<u8> = gray.iter().flat_map(|g| [*g; 3]).collect();
        let rgba_as_rgb: Vec<u8> = rgba
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        let chw = normalize(&rgb, &input.mean, &input.std);
        // (form, image, the RGB pixels the model should see)
        let forms: Vec<(&str, Image, Vec<u8>)> = vec![
            ("jpeg", Image::Encoded(jpeg.clone()), decoded_rgb(&jpeg)),
            (
                "png",
                Image::Encoded(encode(&rgb, 32, 32, image::ImageFormat::Png)),
                rgb.clone(),
            ),
            (
                "png-gray",
                Image::Encoded(encode_channels(&gray, 32, 32, 1, image::ImageFormat::Png)),
                gray_as_rgb.clone(),
            ),
            ("raw", raw(32, 32, 3, rgb.clone()), rgb.clone()),
            ("raw-gray", raw(32, 32, 1, gray), gray_as_rgb),
            ("raw-rgba", raw(32, 32, 4, rgba), rgba_as_rgb),
        ];
        for (form, image, pixels) in forms {
            let id = format!("{seed}-{form}");
            expected.push((id.clone(), reference.logits(&pixels)));
            frames.push(frame(id, image));
        }
        // Tensor frames are taken as they are, NCHW with N = 1 or CHW.
        let logits = reference.tensor_logits(&chw);
        for (form, shape) in [
            ("tensor-nchw", vec![1, 3, 32, 32]),
            ("tensor-chw", vec![3, 32, 32]),
        ] {
            let id = format!("{seed}-{form}");
            expected.push((id.clone(), logits.clone()));
            frames.push(frame(id, tensor(shape, chw.clone())));
        }
    }

    let verdicts = detect(&server, frames).await;
    assert_eq!(
        verdicts.len(),
        expected.len(),
        "exactly one verdict per frame"
    );
    for (verdict, (id, logits)) in verdicts.iter().zip(&expected) {
        assert_eq!(&verdict.frame_id, id, "verdicts come back in frame order");
        reference.assert_answer(verdict, logits);
        assert_eq!(verdict.method, "msp");
        assert_eq!(
            verdict.score, verdict.max_softmax,
            "msp at T = 1 is the max softmax"
        );
        assert_eq!(verdict.in_distribution, verdict.score >= verdict.threshold);
    }
    // The forms of one image disagree somewhere (JPEG is lossy, gray and
    // RGBA are other images): the comparison can tell them apart.
    let distinct: std::collections::HashSet<u32> =
        verdicts.iter().map(|v| v.max_softmax.to_bits()).collect();
    assert!(
        distinct.len() > verdicts.len() / 2,
        "{} distinct",
        distinct.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings_account_for_each_stage_within_the_total() {
    let server = TestServer::start(builtin()).await;
    let mut frames: Vec<Frame> = (0..24).map(|i| raw_frame(i.to_string(), i)).collect();
    frames.push(frame(
        "undecodable",
        Image::Encoded(b"not an image".to_vec()),
    ));
    frames.push(Frame {
        scoring: Some(ScoringOverride {
            method: "bogus".into(),
            ..Default::default()
        }),
        ..raw_frame("bad-override", 0)
    });
    let verdicts = detect(&server, frames).await;
    assert_eq!(verdicts.len(), 26);
    for v in &verdicts {
        let t = v.timings.expect("timings");
        // Stages are disjoint stretches of the frame's time.
        assert!(
            t.decode_us + t.queue_us + t.inference_us <= t.total_us,
            "{}: {t:?}",
            v.frame_id
        );
        match v.frame_id.as_str() {
            // Failed in decode: never queued or computed.
            "undecodable" => {
                assert!(
                    t.decode_us > 0 && t.queue_us == 0 && t.inference_us == 0,
                    "{t:?}"
                )
            }
            // Refused on arrival: no stage reached.
            "bad-override" => {
                assert!(
                    t.decode_us == 0 && t.queue_us == 0 && t.inference_us == 0,
                    "{t:?}"
                )
            }
            id => {
                assert!(v.error.is_none(), "{id}: {:?}", v.error);
                assert!(
                    t.decode_us > 0 && t.queue_us > 0 && t.inference_us > 0,
                    "{id}: every stage was reached: {t:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_streams_of_100_frames_each_stay_whole_and_in_order() {
    let config = builtin();
    let server = TestServer::start(config.clone()).await;
    let mut reference = Reference::new(&config);
    let mut tasks = Vec::new();
    let mut expected = std::collections::HashMap::new();
    for s in 0..8u64 {
        let frames: Vec<Frame> = (0..100u64)
            .map(|i| {
                let id = format!("s{s}-f{i}");
                let mut f = raw_frame(id.clone(), s * 100 + i);
                expected.insert(id, reference.logits(&synthetic32(s * 100 + i)));
                f.attributes.insert("camera".into(), format!("cam-{s}"));
                f
            })
            .collect();
        let client = server.client().await;
        tasks.push(tokio::spawn(async move {
            (s, detect_all(client, frames).await)
        }));
    }
    for task in tasks {
        let (s, got) = task.await.expect("stream task");
        let ids: Vec<String> = got.iter().map(|v| v.frame_id.clone()).collect();
        let want: Vec<String> = (0..100).map(|i| format!("s{s}-f{i}")).collect();
        assert_eq!(ids, want, "stream {s}: every frame once, in order");
        for v in &got {
            // Each frame's own answer, whatever batch it shared with others.
            reference.assert_answer(v, &expected[&v.frame_id]);
            assert_eq!(v.attributes.get("camera"), Some(&format!("cam-{s}")));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_their_own_errors_and_the_stream_goes_on() {
    // A card that forbids resizing, so a frame of another size is an error.
    let dir = TempDir::new("bad-frames");
    let config = builtin_with_card(dir.path(), |card| {
        card.input.resize = odin_sidecar::model::Resize::None
    });
    let server = TestServer::start(config.clone()).await;
    let mut reference = Reference::new(&config);
    let mut corrupt = encode(&synthetic32(0), 32, 32, image::ImageFormat::Jpeg);
    corrupt.truncate(corrupt.len() / 3);
    let mut nan = vec![0.0f32; 3 * 32 * 32];
    nan[1234] = f32::NAN;
    let mut inf = vec![0.0f32; 3 * 32 * 32];
    inf[7] = f32::INFINITY;
    // (frame, reason, words its message must contain)
    let bad: Vec<(Frame, &str, Vec<&str>)> = vec![
        (
            frame("corrupt-jpeg", Image::Encoded(corrupt)),
            "DECODE_FAILED",
            vec!["JPEG"],
        ),
        (
            frame("gif", Image::Encoded(b"GIF89a\x01\x00\x01\x00".to_vec())),
            "DECODE_FAILED",
            vec!["GIF", "JPEG and PNG"],
        ),
        (
            frame(
                "png-16x16",
                Image::Encoded(encode(
                    &synthetic(5, 16, 16, 3),
                    16,
                    16,
                    image::ImageFormat::Png,
                )),
            ),
            "SIZE_MISMATCH",
            vec!["16x16", "32x32"],
        ),
        (
            Frame {
                frame_id: "no-image".into(),
                ..Frame::default()
            },
            "EMPTY_FRAME",
            vec![],
        ),
        (
            frame("empty-bytes", Image::Encoded(vec![])),
            "EMPTY_FRAME",
            vec![],
        ),
        (
            frame("empty-raw", raw(32, 32, 3, vec![])),
            "EMPTY_FRAME",
            vec![],
        ),
        (
            frame("raw-short", raw(32, 32, 3, vec![0; 32 * 32 * 3 - 1])),
            "RAW_LENGTH_MISMATCH",
            vec!["3071 bytes", "3072"],
        ),
        (
            frame("raw-2-channels", raw(32, 32, 2, vec![0; 32 * 32 * 2])),
            "UNSUPPORTED_CHANNELS",
            vec!["2 channels"],
        ),
        (
            frame("raw-9000-wide", raw(9000, 1, 3, vec![0; 9000 * 3])),
            "IMAGE_TOO_LARGE",
            vec!["9000x1", "8192"],
        ),
        (
            frame(
                "png-8193-high",
                Image::Encoded(encode(&vec![7; 8193 * 3], 1, 8193, image::ImageFormat::Png)),
            ),
            "IMAGE_TOO_LARGE",
            vec!["1x8193", "8192"],
        ),
        (
            frame(
                "tensor-shape",
                tensor(vec![1, 3, 32, 31], vec![0.0; 3 * 32 * 31]),
            ),
            "TENSOR_SHAPE_MISMATCH",
            vec!["[1, 3, 32, 31]", "[1, 3, 32, 32]"],
        ),
        (
            frame(
                "tensor-batch-2",
                tensor(vec![2, 3, 32, 32], vec![0.0; 2 * 3 * 32 * 32]),
            ),
            "TENSOR_SHAPE_MISMATCH",
            vec!["[2, 3, 32, 32]"],
        ),
        (
            frame("tensor-length", tensor(vec![1, 3, 32, 32], vec![0.0; 3071])),
            "TENSOR_LENGTH_MISMATCH",
            vec!["3071 values", "3072"],
        ),
        (
            frame("tensor-nan", tensor(vec![3, 32, 32], nan)),
            "NON_FINITE_VALUE",
            vec!["index 1234", "NaN"],
        ),
        (
            frame("tensor-inf", tensor(vec![3, 32, 32], inf)),
            "NON_FINITE_VALUE",
            vec!["index 7", "inf"],
        ),
    ];
    // Each bad frame between two good ones.
    let mut frames = vec![raw_frame("good-0", 0)];
    for (i, (f, _, _)) in bad.iter().enumerate() {
        frames.push(f.clone());
        frames.push(raw_frame(format!("good-{}", i + 1), i as u64 + 1));
    }
    let verdicts = detect(&server, frames).await;
    assert_eq!(verdicts.len(), 2 * bad.len() + 1);
    for (i, v) in verdicts.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        assert_eq!(v.frame_id, format!("good-{}", i / 2));
        let logits = reference.logits(&synthetic32(i as u64 / 2));
        reference.assert_answer(v, &logits);
    }
    for ((f, reason, words), v) in bad.iter().zip(verdicts.iter().skip(1).step_by(2)) {
        assert_eq!(v.frame_id, f.frame_id);
        let e = v
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no error", f.frame_id));
        assert_eq!(e.reason, *reason, "{}: {}", f.frame_id, e.message);
        assert_eq!(
            e.code,
            tonic::Code::InvalidArgument as i32,
            "{}",
            f.frame_id
        );
        assert!(!e.message.is_empty());
        for word in words {
            assert!(
                e.message.contains(word),
                "{}: {:?} lacks {word:?}",
                f.frame_id,
                e.message
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_one_and_model_info_answer_unary_calls() {
    use odin_sidecar::onnx::{tensor_shape_proto::dimension::Value as Dim, type_proto, ModelProto};
    use prost::Message;

    let config = builtin();
    let server = TestServer::start(config.clone()).await;
    let mut reference = Reference::new(&config);
    let mut client = server.client().await;
    let mut f = raw_frame("one", 7);
    f.attributes.insert("k".into(), "v".into());
    let v = client.detect_one(f).await.expect("DetectOne").into_inner();
    assert_eq!(v.frame_id, "one");
    let logits = reference.logits(&synthetic32(7));
    reference.assert_answer(&v, &logits);
    assert_eq!(v.attributes.get("k").map(String::as_str), Some("v"));
    let bad = client
        .detect_one(frame("bad", Image::Encoded(b"GIF89a".to_vec())))
        .await
        .expect("a bad frame is a verdict, not a failed call")
        .into_inner();
    assert_eq!(bad.error.expect("error").reason, "DECODE_FAILED");

    // What GetModelInfo says, against the card file and the ONNX file read here.
    let info = client
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("models/cifar10_cnn.card.json")).expect("card"),
    )
    .expect("card JSON");
    assert_eq!(info.name, card["name"].as_str().expect("name"));
    assert_eq!(info.version, card["version"].as_str().expect("version"));
    let labels: Vec<&str> = card["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| l.as_str().expect("label"))
        .collect();
    assert_eq!(info.labels, labels);
    let model = ModelProto::decode(odin_sidecar::model::DEFAULT_MODEL_ONNX).expect("ONNX");
    let input = &model.graph.as_ref().expect("graph").input[0];
    let Some(type_proto::Value::TensorType(t)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        panic!("input is not a tensor")
    };
    let dims: Vec<i64> = t
        .shape
        .as_ref()
        .expect("shape")
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) => v,
            _ => -1,
        })
        .collect();
    assert_eq!(info.input_name, input.name());
    assert_eq!(info.input_shape, dims);
    assert_eq!(info.input_layout, "NCHW");
    assert_eq!(info.execution_provider, "CPUExecutionProvider");
    let pre = info.preprocessing.expect("preprocessing");
    let spec = &card["input"];
    assert_eq!(
        (
            i64::from(pre.height),
            i64::from(pre.width),
            i64::from(pre.channels)
        ),
        (
            spec["height"].as_i64().expect("h"),
            spec["width"].as_i64().expect("w"),
            spec["channels"].as_i64().expect("c")
        )
    );
    assert_eq!(pre.resize, spec["resize"].as_str().expect("resize"));
    assert_eq!(
        pre.channel_order,
        spec["channel_order"].as_str().expect("order")
    );
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect()
    };
    assert_eq!(pre.mean, floats(&spec["mean"]));
    assert_eq!(pre.std, floats(&spec["std"]));
    let scoring = info.scoring.expect("scoring");
    assert_eq!(
        (
            scoring.method.as_str(),
            scoring.temperature,
            scoring.epsilon,
            scoring.threshold
        ),
        (
            &*config.method.as_str(),
            config.temperature,
            config.epsilon,
            config.threshold
        )
    );
    assert_eq!(scoring.threshold_source, "flag");
    assert_eq!(
        (
            scoring.min_temperature,
            scoring.max_temperature,
            scoring.max_epsilon
        ),
        (
            config.bounds.min_temperature,
            config.bounds.max_temperature,
            config.bounds.max_epsilon
        )
    );
    assert!(
        scoring.perturbation_available,
        "the built-in model has a gradient graph"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnet20_model_info_reports_its_card_and_model() {
    let server = TestServer::start(require!(resnet20())).await;
    let info = server
        .client()
        .await
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.name, "resnet20_cifar10");
    assert_eq!(info.input_name, "input");
    assert_eq!(info.input_shape, vec![-1, 3, 32, 32]);
    assert_eq!(info.labels.len(), 10);
    let pre = info.preprocessing.expect("preprocessing");
    assert_eq!(
        (pre.height, pre.width, pre.resize.as_str()),
        (32, 32, "area")
    );
    assert_eq!(pre.std, STD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_the_detector_in_v1_and_v1alpha() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::{v1, v1alpha};

    let server = TestServer::start(builtin()).await;
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
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let response = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection v1")
        .into_inner()
        .next()
        .await
        .expect("one response")
        .expect("ok");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in ["odin.v1.Detector", "grpc.health.v1.Health"] {
        assert!(names.contains(&service.to_string()), "{names:?}");
    }

    let mut reflection =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "odin.v1.Detector".into(),
            ),
        ),
    };
    let response = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection v1alpha")
        .into_inner()
        .next()
        .await
        .expect("one response")
        .expect("ok");
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        panic!("unexpected reflection answer: {response:?}");
    };
    use prost::Message;
    let described: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| {
            prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("descriptor")
        })
        .flat_map(|file| file.service.into_iter().map(|s| s.name().to_string()))
        .collect();
    assert!(described.contains(&"Detector".to_string()), "{described:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_is_refused_clearly_without_a_gpu_and_auto_falls_back_to_cpu() {
    let mut cuda = builtin();
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

    let mut auto = builtin();
    auto.engine.device = Device::Auto;
    let server = TestServer::start(auto).await;
    let provider = server.app_info.execution_provider.clone();
    assert!(provider == "CPUExecutionProvider" || provider.starts_with("CUDAExecutionProvider"));
    let mut client = server.client().await;
    let v = client
        .detect_one(raw_frame("auto", 0))
        .await
        .expect("served")
        .into_inner();
    assert!(v.error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_overrides_apply_per_frame_and_out_of_bounds_ones_are_rejected() {
    let config = builtin();
    let server = TestServer::start(config.clone()).await;
    let mut reference = Reference::new(&config);
    let seed = 3;
    let logits = reference.logits(&synthetic32(seed));
    let with = |id: &str, over: ScoringOverride| Frame {
        scoring: Some(over),
        ..raw_frame(id, seed)
    };
    let over = |method: &str, temperature: Option<f32>| ScoringOverride {
        method: method.into(),
        temperature,
        ..Default::default()
    };
    let frames = vec![
        with(
            "energy",
            ScoringOverride {
                threshold: Some(-1e9),
                ..over("energy", None)
            },
        ),
        with("energy-t7.5", over("energy", Some(7.5))),
        with("maxlogit", over("maxlogit", None)),
        with("msp-t10", over("", Some(10.0))),
        with("hot", over("", Some(5000.0))),
        with("cold", over("", Some(0.5))),
        with("t-nan", over("", Some(f32::NAN))),
        with(
            "eps",
            ScoringOverride {
                epsilon: Some(0.5),
                ..over("odin", None)
            },
        ),
        with(
            "eps-negative",
            ScoringOverride {
                epsilon: Some(-0.001),
                ..over("odin", None)
            },
        ),
        with(
            "threshold-nan",
            ScoringOverride {
                threshold: Some(f32::NAN),
                ..Default::default()
            },
        ),
        with("bogus", over("bogus", None)),
    ];
    let v = detect(&server, frames).await;
    let by_id = |id: &str| {
        v.iter()
            .find(|v| v.frame_id == id)
            .unwrap_or_else(|| panic!("{id}"))
    };
    let close = |id: &str, want: f64, tolerance: f64| {
        let got = by_id(id);
        assert!(got.error.is_none(), "{id}: {:?}", got.error);
        assert!(
            (f64::from(got.score) - want).abs() <= tolerance * want.abs().max(1.0),
            "{id}: score {} vs {want}",
            got.score
        );
        got
    };

    let energy = close("energy", reference_energy(&logits, 1.0), 1e-5);
    assert_eq!(
        (energy.method.as_str(), energy.temperature),
        ("energy", 1.0)
    );
    assert!(energy.in_distribution && energy.threshold == -1e9);
    let hot = close("energy-t7.5", reference_energy(&logits, 7.5), 1e-5);
    assert_eq!(hot.temperature, 7.5);
    assert!(
        (f64::from(hot.score) - reference_energy(&logits, 1.0)).abs() > 1e-3,
        "T changes the energy"
    );
    let max = close("maxlogit", reference_max_logit(&logits), 1e-6);
    assert_eq!(max.method, "maxlogit");
    let t10 = close("msp-t10", reference_max_softmax(&logits, 10.0), 1e-5);
    assert_eq!((t10.method.as_str(), t10.temperature), ("msp", 10.0));
    assert_eq!(
        t10.threshold, config.threshold,
        "without a threshold of its own the frame keeps the server's"
    );

    let rejected = |id: &str, reason: &str, words: &[&str]| {
        let e = by_id(id)
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{id}: no error"));
        assert_eq!(e.reason, reason, "{id}: {}", e.message);
        assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{id}");
        for word in words {
            assert!(
                e.message.contains(word),
                "{id}: {:?} lacks {word:?}",
                e.message
            );
        }
    };
    rejected(
        "hot",
        "OVERRIDE_OUT_OF_BOUNDS",
        &["temperature = 5000", "[1, 1000]"],
    );
    rejected("cold", "OVERRIDE_OUT_OF_BOUNDS", &["temperature = 0.5"]);
    rejected("t-nan", "OVERRIDE_OUT_OF_BOUNDS", &["temperature = NaN"]);
    rejected("eps", "OVERRIDE_OUT_OF_BOUNDS", &["epsilon = 0.5", "0.004"]);
    rejected(
        "eps-negative",
        "OVERRIDE_OUT_OF_BOUNDS",
        &["epsilon = -0.001"],
    );
    rejected(
        "threshold-nan",
        "OVERRIDE_OUT_OF_BOUNDS",
        &["threshold = NaN"],
    );
    rejected("bogus", "UNKNOWN_METHOD", &["\"bogus\""]);
}

/// The perturbed frame, computed in-process: the derived gradient graph run
/// on the frame gives x', the model on x' the perturbed logits.
fn perturbed_logits(
    reference: &mut Reference,
    seed: u64,
    temperature: f32,
    epsilon: f32,
) -> Vec<f32> {
    use odin_sidecar::grad::{derive, names, GradOptions};
    let options = GradOptions {
        std: reference.card.input.std.clone(),
        raw_gradient: false,
        features: None,
        fused: false,
    };
    let g = derive(odin_sidecar::model::DEFAULT_MODEL_ONNX, &options).expect("derives");
    let mut g = session(&g.bytes);
    let x = normalize(
        &synthetic32(seed),
        &reference.card.input.mean,
        &reference.card.input.std,
    );
    let input = g.inputs()[0].name().to_string();
    let out = run(
        &mut g,
        &input,
        &[1, 3, 32, 32],
        &x,
        &[(names::TEMPERATURE, temperature), (names::EPSILON, epsilon)],
    );
    let perturbed: Vec<f32> = out[output_index(&g, names::PERTURBED)]
        .iter()
        .map(|v| *v as f32)
        .collect();
    assert_ne!(perturbed, x, "ε moved the frame");
    reference.tensor_logits(&perturbed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odin_and_perturbed_energy_score_the_perturbed_frame() {
    let config = builtin();
    let server = TestServer::start(config.clone()).await;
    let mut reference = Reference::new(&config);
    let (t, eps) = (10.0f32, 0.002f32);
    let seeds = 0..8u64;
    let mut frames = Vec::new();
    for seed in seeds.clone() {
        for method in ["odin", "energy"] {
            frames.push(Frame {
                scoring: Some(ScoringOverride {
                    method: method.into(),
                    temperature: Some(t),
                    epsilon: Some(eps),
                    ..Default::default()
                }),
                ..raw_frame(format!("{seed}-{method}"), seed)
            });
        }
    }
    let verdicts = detect(&server, frames).await;
    let mut moved = 0;
    for (seed, pair) in seeds.zip(verdicts.chunks_exact(2)) {
        let (odin, energy) = (&pair[0], &pair[1]);
        assert!(odin.error.is_none() && energy.error.is_none(), "{pair:?}");
        assert_eq!((odin.method.as_str(), odin.epsilon), ("odin", eps));
        assert_eq!((energy.method.as_str(), energy.epsilon), ("energy", eps));
        let plain = reference.logits(&synthetic32(seed));
        let perturbed = perturbed_logits(&mut reference, seed, t, eps);
        // The verdict's class and max-softmax are the unperturbed frame's.
        reference.assert_answer(odin, &plain);
        let want = reference_max_softmax(&perturbed, f64::from(t));
        assert!(
            (f64::from(odin.score) - want).abs() < 1e-5,
            "{}: odin {} vs {want}",
            odin.frame_id,
            odin.score
        );
        let want = reference_energy(&perturbed, f64::from(t));
        assert!(
            (f64::from(energy.score) - want).abs() < 1e-5 * want.abs().max(1.0),
            "{}: energy {} vs {want}",
            energy.frame_id,
            energy.score
        );
        // The tolerance tells a perturbed frame from the frame as sent.
        let unperturbed = reference_max_softmax(&plain, f64::from(t));
        moved += usize::from((unperturbed - f64::from(odin.score)).abs() > 1e-5);
    }
    assert!(moved >= 6, "only {moved} of 8 scores moved with ε");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_gradient_graph_serves_msp_and_refuses_perturbation_per_frame() {
    use odin_sidecar::model::ModelSource;
    let dir = TempDir::new("no-gradient");
    let model = dir.join("sin.onnx");
    std::fs::write(&model, builtin_without_gradient()).expect("write model");
    std::fs::write(
        dir.join("sin.card.json"),
        serde_json::to_string(&builtin_card()).expect("card JSON"),
    )
    .expect("write card");
    let config = odin_sidecar::config::ServeConfig {
        model: ModelSource::File { model, card: None },
        ..builtin()
    };

    // Asking the server for ODIN fails at start-up, naming the node.
    let odin = odin_sidecar::config::ServeConfig {
        method: odin_sidecar::score::Method::Odin,
        temperature: 1000.0,
        epsilon: 0.0014,
        ..config.clone()
    };
    let error = odin_sidecar::app::App::build(&odin)
        .await
        .expect_err("no gradient graph for odin")
        .to_string();
    assert!(
        error.contains("gradient graph") && error.contains("Sin"),
        "{error}"
    );

    let server = TestServer::start(config.clone()).await;
    assert!(!server.app_info.scoring.perturbation_available);
    let mut reference = Reference::new(&config);
    let with = |id: &str, method: &str, epsilon: f32| Frame {
        scoring: Some(ScoringOverride {
            method: method.into(),
            temperature: Some(10.0),
            epsilon: Some(epsilon),
            ..Default::default()
        }),
        ..raw_frame(id, 4)
    };
    let verdicts = detect(
        &server,
        vec![
            raw_frame("plain", 4),
            with("odin", "odin", 0.002),
            with("energy", "energy", 0.002),
            with("odin-eps-0", "odin", 0.0),
            with("msp-eps", "msp", 0.002),
        ],
    )
    .await;
    let logits = reference.logits(&synthetic32(4));
    reference.assert_answer(&verdicts[0], &logits);
    for v in &verdicts[1..3] {
        let e = v
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no error", v.frame_id));
        assert_eq!(e.reason, "PERTURBATION_UNAVAILABLE", "{}", e.message);
        assert_eq!(e.code, tonic::Code::FailedPrecondition as i32);
        assert!(
            e.message.contains(&v.frame_id),
            "{}: {}",
            v.frame_id,
            e.message
        );
    }
    // Without a perturbation the methods need no gradient graph.
    let want = reference_max_softmax(&logits, 10.0);
    for v in &verdicts[3..] {
        assert!(v.error.is_none(), "{}: {:?}", v.frame_id, v.error);
        assert!(
            (f64::from(v.score) - want).abs() < 1e-5,
            "{}: {} vs {want}",
            v.frame_id,
            v.score
        );
    }
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
    let mut config = builtin();
    config.decode.resize = Some(odin_sidecar::model::Resize::Area);
    config.max_pixels = 1_000_000;
    let server = TestServer::start(config.clone()).await;
    let model = odin_sidecar::model::Model::load(&config.model).expect("model");
    let pre = odin_sidecar::app::preprocessor(&model, &config);
    let mut engine = reference_engine(&config);

    // 32x32 pictures upscaled to 1280x720: decoded at 1/4 scale (320x180).
    let camera = |i: u64| {
        let img = image::RgbImage::from_raw(32, 32, synthetic32(i)).expect("dims");
        image::imageops::resize(&img, 1280, 720, image::imageops::FilterType::CatmullRom).into_raw()
    };
    let mut frames = Vec::new();
    let mut expected = Vec::new();
    for i in 0..6u64 {
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
        "over-budget",
        Image::Encoded(claim_size(good.clone(), 1600, 1200)),
    ));
    // Far too short for 1280x720: refused before decoding, with either JPEG
    // backend (the decoder tests cover cuts libjpeg-turbo reports itself).
    frames.push(frame(
        "truncated",
        Image::Encoded([&good[..3000], &[0xFF, 0xD9][..]].concat()),
    ));
    let mut liar = claim_size(good[..2000].to_vec(), 1000, 1000);
    liar.extend_from_slice(&[0xFF, 0xD9]);
    frames.push(frame("liar", Image::Encoded(liar)));

    let verdicts = detect(&server, frames).await;
    for (v, logits) in verdicts.iter().zip(&expected) {
        assert!(v.error.is_none(), "{}: {:?}", v.frame_id, v.error);
        assert_eq!(v.predicted_class as usize, argmax(logits), "{}", v.frame_id);
        let want = reference_max_softmax(logits, 1.0);
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
