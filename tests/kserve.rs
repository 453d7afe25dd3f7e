//! KServe v2 / Open Inference Protocol over real gRPC, beside odin.v1 on the
//! same port: NVIDIA's own `tritonclient[grpc]` (tests/python/) and the
//! generated tonic client against a real server. Data-free: the built-in
//! model and frames generated here, so these tests never skip.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use odin_sidecar::config::{ServeConfig, MAX_MESSAGE_BYTES};
use odin_sidecar::engine::Device;
use odin_sidecar::wire::kserve_v2::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    infer_parameter::ParameterChoice,
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest, ServerMetadataRequest,
    ServerReadyRequest,
};
use odin_sidecar::wire::odin_v1::{
    frame::Image, Frame, RawImage, ScoringOverride, Tensor, Verdict,
};
use serde_json::Value;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const MODEL: &str = "cifar10_cnn";

/// The built-in CNN on CPU, one intra-op thread: what `serve` runs with no flags
/// but the scoring (msp, T = 1, threshold 0.5).
fn builtin() -> ServeConfig {
    let mut config = ServeConfig::default();
    config.engine.device = Device::Cpu;
    config.engine.intra_threads = 1;
    config
}

/// Image `i` of a generated set: smooth colour gradients with a per-image
/// phase and a little hash noise, so the frames differ and the model's
/// answers spread over classes and scores.
fn pixels(i: usize, height: usize, width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(height * width * 3);
    for y in 0..height {
        for x in 0..width {
            for c in 0..3 {
                let wave = (x * (3 + i) + y * (5 + 2 * c) + i * 37 + c * 80) % 256;
                let mut h =
                    (i * 73_856_093) ^ (y * 19_349_663) ^ (x * 83_492_791) ^ (c * 2_654_435);
                h = h.wrapping_mul(0x9E37_79B9) >> 7;
                out.push(((wave + h % 48) % 256) as u8);
            }
        }
    }
    out
}

/// A scratch folder of this test process, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("odin-kserve-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `images` (each height × width × 3) as a raw set `set.u8` with its
/// `set.json`, the format `kserve_client.py --images` reads.
fn write_set(dir: &Path, images: &[Vec<u8>], height: usize, width: usize) -> PathBuf {
    let path = dir.join("set.u8");
    std::fs::write(&path, images.concat()).expect("writes set");
    let header = serde_json::json!({"n": images.len(), "h": height, "w": width, "c": 3});
    std::fs::write(dir.join("set.json"), header.to_string()).expect("writes header");
    path
}

fn python() -> PathBuf {
    let python = repo_dir().join(".venv-test/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/setup.sh --tests` (make test does)",
        python.display()
    );
    python
}

/// Runs a script of tests/python with `args`; its stdout, or a panic with
/// its stderr.
async fn run_python(script: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new(python())
        .arg(repo_dir().join("tests/python").join(script))
        .args(args)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn kserve(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(server.channel().await)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

async fn detect_one(
    server: &TestServer,
    image: Image,
    scoring: Option<ScoringOverride>,
) -> Verdict {
    let verdict = server
        .client()
        .await
        .detect_one(Frame {
            frame_id: "odin".into(),
            image: Some(image),
            scoring,
            ..Frame::default()
        })
        .await
        .expect("DetectOne")
        .into_inner();
    assert_eq!(verdict.error, None);
    verdict
}

fn raw_image(pixels: &[u8], height: usize, width: usize) -> Image {
    Image::Raw(RawImage {
        width: width as u32,
        height: height as u32,
        channels: 3,
        pixels: pixels.to_vec(),
    })
}

fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..InferInputTensor::default()
    }
}

/// A ModelInfer request of `images` (each height × width × 3) as one UINT8
/// batch in raw contents.
fn image_request(id: &str, images: &[Vec<u8>], height: usize, width: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: MODEL.into(),
        id: id.into(),
        inputs: vec![input(
            "image",
            "UINT8",
            vec![images.len() as i64, height as i64, width as i64, 3],
        )],
        raw_input_contents: vec![images.concat()],
        ..ModelInferRequest::default()
    }
}

/// A response's outputs, by name, read from its raw contents.
#[derive(Debug, Default)]
struct Outputs {
    names: Vec<String>,
    score: Vec<f32>,
    in_distribution: Vec<bool>,
    predicted_class: Vec<i64>,
    max_softmax: Vec<f32>,
    logits: Vec<Vec<f32>>,
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

fn outputs(response: &ModelInferResponse) -> Outputs {
    assert_eq!(
        response.raw_output_contents.len(),
        response.outputs.len(),
        "one raw_output_contents entry per output"
    );
    let mut out = Outputs::default();
    for (tensor, bytes) in response.outputs.iter().zip(&response.raw_output_contents) {
        out.names.push(tensor.name.clone());
        let n = tensor.shape[0] as usize;
        match tensor.name.as_str() {
            "score" => out.score = f32s(bytes),
            "max_softmax" => out.max_softmax = f32s(bytes),
            "in_distribution" => {
                assert_eq!(tensor.datatype, "BOOL");
                out.in_distribution = bytes.iter().map(|b| *b != 0).collect();
            }
            "predicted_class" => {
                assert_eq!(tensor.datatype, "INT64");
                out.predicted_class = bytes
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect();
            }
            "logits" => {
                let k = tensor.shape[1] as usize;
                out.logits = f32s(bytes).chunks(k).map(<[f32]>::to_vec).collect();
                assert_eq!(out.logits.len(), n);
            }
            other => panic!("unexpected output {other}"),
        }
    }
    out
}

/// Element `i` of `got` is `verdict`'s answer: score within 1e-6, the same
/// class and in-distribution call.
fn assert_same(got: &Outputs, i: usize, verdict: &Verdict, what: &str) {
    assert!(
        (got.score[i] - verdict.score).abs() <= 1e-6,
        "{what}[{i}]: score {} vs odin.v1 {}",
        got.score[i],
        verdict.score
    );
    assert!(
        (got.max_softmax[i] - verdict.max_softmax).abs() <= 1e-6,
        "{what}[{i}]"
    );
    assert_eq!(
        got.predicted_class[i],
        i64::from(verdict.predicted_class),
        "{what}[{i}]"
    );
    assert_eq!(
        got.in_distribution[i], verdict.in_distribution,
        "{what}[{i}]"
    );
}

fn double(value: f64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::DoubleParam(value)),
    }
}

fn param(choice: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(choice),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_descriptor_set_the_build_emits_matches_tritonclients() {
    let scratch = Scratch::new("descriptors");
    let set = scratch.0.join("kserve_v2_descriptor.bin");
    std::fs::write(&set, odin_sidecar::wire::kserve_v2::FILE_DESCRIPTOR_SET).expect("writes");
    let report = run_python("kserve_descriptors.py", &[set.to_str().expect("utf-8")]).await;
    assert!(
        report.contains("OK: every message, field and rpc of ours is identical"),
        "{report}"
    );
    assert!(report.contains("ModelStreamInfer"), "{report}");
}

/// Checks one run of kserve_client.py against DetectOne for the same frames.
async fn compare_python_with_detect_one(
    server: &TestServer,
    report: &Value,
    images: &[Vec<u8>],
    (height, width): (usize, usize),
    scoring: Option<ScoringOverride>,
    tolerance: f64,
) {
    let mut verdicts = Vec::new();
    for px in images {
        verdicts.push(detect_one(server, raw_image(px, height, width), scoring.clone()).await);
    }
    let phases = [
        "infer",
        "stream",
        "stream_batched",
        "encoded",
        "encoded_stream",
    ];
    for phase in phases {
        let answers = report[phase]
            .as_array()
            .unwrap_or_else(|| panic!("{phase}: {report}"));
        assert_eq!(answers.len(), images.len(), "{phase}");
        for (i, (answer, verdict)) in answers.iter().zip(&verdicts).enumerate() {
            let score = answer["score"].as_f64().expect("score");
            assert!(
                (score - f64::from(verdict.score)).abs() <= tolerance,
                "{phase}[{i}]: score {score} vs odin.v1 {}",
                verdict.score
            );
            let max_softmax = answer["max_softmax"].as_f64().expect("max_softmax");
            assert!((max_softmax - f64::from(verdict.max_softmax)).abs() <= tolerance);
            assert_eq!(
                answer["predicted_class"], verdict.predicted_class,
                "{phase}[{i}]"
            );
            assert_eq!(
                answer["in_distribution"], verdict.in_distribution,
                "{phase}[{i}]"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_gets_the_verdicts_detect_one_gives() {
    let server = TestServer::start(builtin()).await;
    // Not the model's 32x32: the `image` input takes any size and resizes.
    let (height, width) = (36, 40);
    let images: Vec<Vec<u8>> = (0..6).map(|i| pixels(i, height, width)).collect();
    let scratch = Scratch::new("client");
    let set = write_set(&scratch.0, &images, height, width);
    let url = server.addr.to_string();
    let args = [
        "--url",
        url.as_str(),
        "--model",
        MODEL,
        "--images",
        set.to_str().expect("utf-8"),
        "--count",
        "6",
        "--encoded",
        "--logits",
    ];
    let report: Value =
        serde_json::from_str(&run_python("kserve_client.py", &args).await).expect("JSON");
    assert_eq!(report["errors"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["live"], true);
    assert_eq!(report["ready"], true);
    assert_eq!(report["model_ready"], true);
    let server_metadata = &report["server_metadata"];
    assert_eq!(server_metadata["name"], "odin-sidecar");
    assert_eq!(server_metadata["version"], env!("CARGO_PKG_VERSION"));
    assert!(server_metadata["extensions"]
        .as_array()
        .expect("extensions")
        .contains(&Value::from("model_stream_infer")));
    assert_eq!(
        report["model_metadata"],
        serde_json::json!({
            "name": MODEL, "versions": ["1", &*server.app_info.versions.model], "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
                {"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                {"name": "encoded", "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "in_distribution", "datatype": "BOOL", "shape": [-1]},
                {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
                {"name": "max_softmax", "datatype": "FP32", "shape": [-1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            ],
        })
    );
    let response = &report["infer_response"];
    assert_eq!(response["id"], "infer-batch");
    assert_eq!(response["model_name"], MODEL);
    assert_eq!(response["model_version"], "1");
    assert_eq!(response["raw_output_contents"], 5);
    assert_eq!(response["parameters"]["method"], "msp");
    assert_eq!(response["parameters"]["threshold"], 0.5);
    for answer in report["infer"].as_array().expect("infer") {
        let logits: Vec<f64> = answer["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        assert_eq!(logits.len(), 10);
        let argmax = (0..10)
            .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
            .expect("ten");
        assert_eq!(answer["predicted_class"], argmax);
    }
    compare_python_with_detect_one(&server, &report, &images, (height, width), None, 1e-6).await;

    // The same through ODIN, its parameters sent as tritonclient sends a
    // float (double_param), against DetectOne with the same override.
    let args = [
        "--url",
        url.as_str(),
        "--model",
        MODEL,
        "--images",
        set.to_str().expect("utf-8"),
        "--count",
        "3",
        "--encoded",
        "--method",
        "odin",
        "--temperature",
        "100",
        "--epsilon",
        "0.004",
        "--threshold",
        "0.1",
    ];
    let report: Value =
        serde_json::from_str(&run_python("kserve_client.py", &args).await).expect("JSON");
    assert_eq!(report["errors"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["infer_response"]["parameters"]["method"], "odin");
    let odin = ScoringOverride {
        method: "odin".into(),
        temperature: Some(100.0),
        epsilon: Some(0.004),
        threshold: Some(0.1),
    };
    compare_python_with_detect_one(
        &server,
        &report,
        &images[..3],
        (height, width),
        Some(odin),
        1e-6,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_wrong_requests_get_the_expected_codes_and_messages() {
    let server = TestServer::start(builtin()).await;
    let images = vec![pixels(0, 32, 32)];
    let scratch = Scratch::new("bad");
    let set = write_set(&scratch.0, &images, 32, 32);
    let url = server.addr.to_string();
    let args = [
        "--url",
        url.as_str(),
        "--model",
        MODEL,
        "--images",
        set.to_str().expect("utf-8"),
        "--bad",
    ];
    let report: Value =
        serde_json::from_str(&run_python("kserve_client.py", &args).await).expect("JSON");
    let expected: [(&str, &str, &str); 14] = [
        ("unknown_input", "INVALID_ARGUMENT", "unknown input 'pixels'; the model takes exactly one of input (FP32 [-1, 3, 32, 32]), image (UINT8 [-1, -1, -1, 3]), encoded (BYTES [-1])"),
        ("wrong_datatype", "INVALID_ARGUMENT", "input 'image' must be UINT8, not \"FP32\""),
        ("byte_size_mismatch", "INVALID_ARGUMENT", "input 'image' has shape [2, 32, 32, 3] (UINT8): that is 6144 bytes, but raw_input_contents[0] holds 3072"),
        ("image_rank", "INVALID_ARGUMENT", "input 'image' has shape [32, 32, 3] (rank 3); it must be rank 4 [N, H, W, C], [-1, -1, -1, 3]"),
        ("input_shape_mismatch", "INVALID_ARGUMENT", "input 'input' has shape [1, 3, 16, 16], but the model takes [-1, 3, 32, 32] [N, C, H, W]"),
        ("two_inputs", "INVALID_ARGUMENT", "the request has 2 inputs 'image', 'input'; send exactly one of input, image, encoded"),
        ("encoded_garbage", "INVALID_ARGUMENT", "frame 0: cannot decode image"),
        ("temperature_out_of_bounds", "INVALID_ARGUMENT", "frame 0: override temperature = 1000000000 is outside the allowed range [1, 1000]"),
        ("unknown_method", "INVALID_ARGUMENT", "frame 0: unknown scoring method \"no_such_method\""),
        ("unknown_output", "INVALID_ARGUMENT", "unknown output 'no_such_output'; the model's outputs are score, in_distribution, predicted_class, max_softmax, logits"),
        ("unknown_model", "NOT_FOUND", "unknown model 'no_such_model'; this server serves 'cifar10_cnn'"),
        ("unknown_model_metadata", "NOT_FOUND", "unknown model 'no_such_model'"),
        ("unknown_model_version", "NOT_FOUND", "model 'cifar10_cnn' has no version '999'; its only version is '1'"),
        ("unknown_model_ready", "NOT_FOUND", "unknown model 'no_such_model'"),
    ];
    let bad = &report["bad"];
    for (case, code, message) in expected {
        let outcome = &bad[case];
        assert_eq!(outcome["ok"], false, "{case}: {outcome}");
        assert_eq!(outcome["code"], code, "{case}: {outcome}");
        let got = outcome["message"].as_str().expect("message");
        assert!(
            got.starts_with(message),
            "{case}: {got:?} does not start with {message:?}"
        );
    }
    // On a stream a bad request gets its error_message and the stream goes on.
    let stream = &bad["stream_unknown_input"];
    assert_eq!(stream["ok"], false, "{stream}");
    assert_eq!(
        stream["code"],
        Value::Null,
        "an error_message, not a status: {stream}"
    );
    assert!(stream["message"]
        .as_str()
        .expect("message")
        .starts_with("unknown input 'pixels'"));
    assert_eq!(
        stream["responses"][1],
        serde_json::json!({"ok": true, "id": "good"})
    );
    assert_eq!(report["errors"], serde_json::json!([]), "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fp32_tensors_in_typed_and_raw_contents_equal_detect_one_tensors() {
    let config = builtin();
    let server = TestServer::start(config.clone()).await;
    let card = &server.app_info.preprocessing;
    let tensors: Vec<Vec<f32>> = (0..4)
        .map(|i| normalize(&pixels(i, 32, 32), &card.mean, &card.std))
        .collect();
    let mut client = kserve(&server).await;
    let flat: Vec<f32> = tensors.concat();
    let mut typed = ModelInferRequest {
        model_name: MODEL.into(),
        model_version: "1".into(),
        id: "typed".into(),
        inputs: vec![input("input", "FP32", vec![4, 3, 32, 32])],
        outputs: [
            "score",
            "in_distribution",
            "predicted_class",
            "max_softmax",
            "logits",
        ]
        .map(|name| InferRequestedOutputTensor {
            name: name.into(),
            ..InferRequestedOutputTensor::default()
        })
        .to_vec(),
        ..ModelInferRequest::default()
    };
    typed.inputs[0].contents = Some(InferTensorContents {
        fp32_contents: flat.clone(),
        ..InferTensorContents::default()
    });
    let mut raw = typed.clone();
    raw.id = "raw".into();
    raw.model_version = String::new(); // empty: any version
    raw.inputs[0].contents = None;
    raw.raw_input_contents = vec![flat.iter().flat_map(|v| v.to_le_bytes()).collect()];

    let typed = client.model_infer(typed).await.expect("typed").into_inner();
    let raw = client.model_infer(raw).await.expect("raw").into_inner();
    assert_eq!((typed.id.as_str(), raw.id.as_str()), ("typed", "raw"));
    assert_eq!(raw.model_version, "1");
    let (typed, raw) = (outputs(&typed), outputs(&raw));
    // The model's own logits, in-process.
    let mut engine = reference_engine(&config);
    for (i, tensor) in tensors.iter().enumerate() {
        let verdict = detect_one(
            &server,
            Image::Tensor(Tensor {
                shape: vec![1, 3, 32, 32],
                data: tensor.clone(),
            }),
            None,
        )
        .await;
        assert_same(&typed, i, &verdict, "typed");
        assert_same(&raw, i, &verdict, "raw");
        let logits = engine.logits(tensor, 1).expect("runs");
        for (got, want) in typed.logits[i].iter().zip(&logits) {
            assert!((got - want).abs() <= 1e-5, "logits[{i}]: {got} vs {want}");
        }
        assert_eq!(typed.predicted_class[i] as usize, argmax(&logits));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_elements_are_length_prefixed_files() {
    let server = TestServer::start(builtin()).await;
    let mut client = kserve(&server).await;
    let files = [
        encode(&pixels(0, 32, 32), 32, 32, image::ImageFormat::Png),
        encode(&pixels(1, 48, 40), 40, 48, image::ImageFormat::Jpeg),
        encode(&pixels(2, 20, 24), 24, 20, image::ImageFormat::Png),
    ];
    let mut prefixed = Vec::new();
    for file in &files {
        prefixed.extend((file.len() as u32).to_le_bytes());
        prefixed.extend(file);
    }
    let request = ModelInferRequest {
        model_name: MODEL.into(),
        id: "files".into(),
        inputs: vec![input("encoded", "BYTES", vec![3])],
        raw_input_contents: vec![prefixed.clone()],
        ..ModelInferRequest::default()
    };
    let response = client
        .model_infer(request.clone())
        .await
        .expect("raw")
        .into_inner();
    let raw = outputs(&response);
    assert_eq!(
        raw.names,
        ["score", "in_distribution", "predicted_class", "max_softmax"]
    );
    // The same files as typed bytes_contents.
    let mut typed = request.clone();
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(InferTensorContents {
        bytes_contents: files.to_vec(),
        ..InferTensorContents::default()
    });
    let typed = outputs(&client.model_infer(typed).await.expect("typed").into_inner());
    for (i, file) in files.iter().enumerate() {
        let verdict = detect_one(&server, Image::Encoded(file.clone()), None).await;
        assert_same(&raw, i, &verdict, "raw");
        assert_same(&typed, i, &verdict, "typed");
    }
    // A length prefix that promises more than follows.
    let mut cut = request;
    cut.raw_input_contents[0].truncate(prefixed.len() - 10);
    let status = client.model_infer(cut).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("input 'encoded': element 2 of raw_input_contents[0] declares"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uint8_typed_contents_equal_raw_contents_and_raw_frames() {
    let server = TestServer::start(builtin()).await;
    let mut client = kserve(&server).await;
    // The README's grpcurl example: one red pixel, resized to the model's size.
    let mut typed = ModelInferRequest {
        model_name: MODEL.into(),
        id: "red".into(),
        inputs: vec![input("image", "UINT8", vec![1, 1, 1, 3])],
        ..ModelInferRequest::default()
    };
    typed.inputs[0].contents = Some(InferTensorContents {
        uint_contents: vec![255, 0, 0],
        ..InferTensorContents::default()
    });
    let typed = outputs(&client.model_infer(typed).await.expect("typed").into_inner());
    let raw = image_request("red", &[vec![255, 0, 0]], 1, 1);
    let raw = outputs(&client.model_infer(raw).await.expect("raw").into_inner());
    let verdict = detect_one(&server, raw_image(&[255, 0, 0], 1, 1), None).await;
    assert_same(&typed, 0, &verdict, "typed");
    assert_same(&raw, 0, &verdict, "raw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_override_the_scoring_as_odin_v1_does() {
    let server = TestServer::start(builtin()).await;
    let mut client = kserve(&server).await;
    let images: Vec<Vec<u8>> = (0..3).map(|i| pixels(i, 32, 32)).collect();
    let msp10 = ScoringOverride {
        method: "msp".into(),
        temperature: Some(10.0),
        epsilon: None,
        threshold: Some(0.2),
    };
    let mut verdicts = Vec::new();
    for px in &images {
        verdicts.push(detect_one(&server, raw_image(px, 32, 32), Some(msp10.clone())).await);
    }
    let plain = detect_one(&server, raw_image(&images[0], 32, 32), None).await;
    assert!(
        (plain.score - verdicts[0].score).abs() > 1e-3,
        "T = 10 must change the score, or the comparison below proves nothing"
    );
    // The same override in each accepted form.
    let forms = [
        ParameterChoice::DoubleParam(10.0),
        ParameterChoice::Int64Param(10),
        ParameterChoice::StringParam("10".into()),
    ];
    for temperature in forms {
        let mut request = image_request("msp10", &images, 32, 32);
        request.parameters = [
            (
                "method".to_string(),
                param(ParameterChoice::StringParam("msp".into())),
            ),
            ("temperature".to_string(), param(temperature.clone())),
            ("threshold".to_string(), double(0.2)),
        ]
        .into();
        let response = client
            .model_infer(request)
            .await
            .expect("infer")
            .into_inner();
        let got = outputs(&response);
        for (i, verdict) in verdicts.iter().enumerate() {
            assert_same(&got, i, verdict, &format!("{temperature:?}"));
        }
        let p = &response.parameters;
        assert_eq!(
            p["method"],
            param(ParameterChoice::StringParam("msp".into()))
        );
        assert_eq!(p["temperature"], double(10.0));
        assert_eq!(p["threshold"], double(0.2));
    }
    // Any method odin.v1 takes, e.g. the GEN detector (no statistics needed).
    let gen = ScoringOverride {
        method: "gen(gamma=0.1,M=5)".into(),
        temperature: None,
        epsilon: None,
        threshold: Some(-1.0),
    };
    let mut gen_verdicts = Vec::new();
    for px in &images {
        gen_verdicts.push(detect_one(&server, raw_image(px, 32, 32), Some(gen.clone())).await);
    }
    assert!(
        (gen_verdicts[0].score - verdicts[0].score).abs() > 1e-3,
        "GEN scores differently from MSP, or the comparison proves nothing"
    );
    let mut request = image_request("gen", &images, 32, 32);
    request.parameters = [
        (
            "method".to_string(),
            param(ParameterChoice::StringParam("gen(gamma=0.1,M=5)".into())),
        ),
        ("threshold".to_string(), double(-1.0)),
    ]
    .into();
    let response = client
        .model_infer(request)
        .await
        .expect("infer")
        .into_inner();
    let got = outputs(&response);
    for (i, verdict) in gen_verdicts.iter().enumerate() {
        assert_same(&got, i, verdict, "gen");
    }
    // Out of bounds, with odin.v1's bounds and message, for the whole request.
    let mut request = image_request("hot", &images, 32, 32);
    request.parameters = [("temperature".to_string(), double(1e9))].into();
    let status = client.model_infer(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "frame 0: override temperature = 1000000000 is outside the allowed range [1, 1000]"
    );
    let mut request = image_request("eps", &images, 32, 32);
    request.parameters = [(
        "epsilon".to_string(),
        param(ParameterChoice::StringParam("0.5".into())),
    )]
    .into();
    let status = client.model_infer(request).await.expect_err("refused");
    assert_eq!(
        status.message(),
        "frame 0: override epsilon = 0.5 is outside the allowed range [0, 0.004]"
    );
    let mut request = image_request("typo", &images, 32, 32);
    request.parameters = [("temprature".to_string(), double(2.0))].into();
    let status = client.model_infer(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status
        .message()
        .starts_with("unknown request parameter 'temprature'"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logits_come_only_when_requested_and_outputs_as_asked() {
    let server = TestServer::start(builtin()).await;
    let mut client = kserve(&server).await;
    let images: Vec<Vec<u8>> = (0..2).map(|i| pixels(i, 32, 32)).collect();
    let default = client
        .model_infer(image_request("d", &images, 32, 32))
        .await
        .expect("infer")
        .into_inner();
    let default = outputs(&default);
    assert_eq!(
        default.names,
        ["score", "in_distribution", "predicted_class", "max_softmax"]
    );
    let mut request = image_request("l", &images, 32, 32);
    request.outputs = ["logits", "predicted_class"]
        .map(|name| InferRequestedOutputTensor {
            name: name.into(),
            ..InferRequestedOutputTensor::default()
        })
        .to_vec();
    let response = client
        .model_infer(request)
        .await
        .expect("infer")
        .into_inner();
    assert_eq!(response.outputs[0].shape, vec![2, 10]);
    assert_eq!(response.outputs[0].datatype, "FP32");
    let asked = outputs(&response);
    assert_eq!(asked.names, ["logits", "predicted_class"]);
    for i in 0..2 {
        assert_eq!(argmax(&asked.logits[i]) as i64, default.predicted_class[i]);
        assert_eq!(asked.predicted_class[i], default.predicted_class[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_answers_each_request_in_order_and_goes_on_after_errors() {
    let server = TestServer::start(builtin()).await;
    let mut client = kserve(&server).await;
    let images: Vec<Vec<u8>> = (0..4).map(|i| pixels(i, 32, 32)).collect();
    let mut unknown_input = image_request("b", &images[..1], 32, 32);
    unknown_input.inputs[0].name = "pixels".into();
    let mut other_model = image_request("d", &images[..1], 32, 32);
    other_model.model_name = "nope".into();
    let garbage = ModelInferRequest {
        model_name: MODEL.into(),
        id: "e".into(),
        inputs: vec![input("encoded", "BYTES", vec![2])],
        raw_input_contents: vec![[
            &(4u32.to_le_bytes())[..],
            b"junk",
            &(3u32.to_le_bytes())[..],
            b"bad",
        ]
        .concat()],
        ..ModelInferRequest::default()
    };
    let requests = vec![
        image_request("a", &images[..1], 32, 32),
        unknown_input,
        image_request("c", &images[1..4], 32, 32),
        other_model,
        garbage,
        image_request("f", &images[..1], 32, 32),
    ];
    let mut responses = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .expect("stream starts")
        .into_inner();
    let mut got = Vec::new();
    while let Some(response) = responses.next().await {
        got.push(response.expect("a response, not a stream error"));
    }
    let ids: Vec<&str> = got
        .iter()
        .map(|r| {
            r.infer_response
                .as_ref()
                .expect("infer_response")
                .id
                .as_str()
        })
        .collect();
    assert_eq!(
        ids,
        ["a", "b", "c", "d", "e", "f"],
        "one response per request, in order"
    );
    let errors: Vec<&str> = got.iter().map(|r| r.error_message.as_str()).collect();
    assert_eq!(errors[0], "");
    assert!(
        errors[1].starts_with("unknown input 'pixels'"),
        "{}",
        errors[1]
    );
    assert_eq!(errors[2], "");
    assert!(
        errors[3].starts_with("unknown model 'nope'"),
        "{}",
        errors[3]
    );
    assert!(
        errors[4].starts_with("frame 0: cannot decode image"),
        "{}",
        errors[4]
    );
    assert_eq!(errors[5], "");
    let batch = outputs(got[2].infer_response.as_ref().expect("c"));
    for i in 0..3 {
        let verdict = detect_one(&server, raw_image(&images[1 + i], 32, 32), None).await;
        assert_same(&batch, i, &verdict, "stream batch");
    }

    // Every frame counted under its own RPC.
    let text = server.scrape().await;
    for (method, frames) in [("ModelStreamInfer", 7), ("ModelInfer", 0)] {
        let series = format!(
            "rpc_server_duration_seconds_count{{rpc_system=\"grpc\",rpc_service=\"inference.GRPCInferenceService\",rpc_method=\"{method}\"}} {frames}"
        );
        assert!(text.contains(&series), "{series} missing from\n{text}");
    }
    client
        .model_infer(image_request("u", &images[..2], 32, 32))
        .await
        .expect("infer");
    let text = server.scrape().await;
    assert!(text.contains(
        "rpc_server_duration_seconds_count{rpc_system=\"grpc\",rpc_service=\"inference.GRPCInferenceService\",rpc_method=\"ModelInfer\"} 2"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_health_and_a_drain_ends_streams_unavailable() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };

    let mut server = TestServer::start(builtin()).await;
    let mut client = kserve(&server).await;
    let ready = |client: &mut GrpcInferenceServiceClient<Channel>| {
        let mut client = client.clone();
        async move {
            let server = client
                .server_ready(ServerReadyRequest {})
                .await
                .expect("ServerReady");
            let model = client
                .model_ready(ModelReadyRequest {
                    name: MODEL.into(),
                    version: String::new(),
                })
                .await
                .expect("ModelReady");
            let live = client
                .server_live(ServerLiveRequest {})
                .await
                .expect("ServerLive");
            (
                live.into_inner().live,
                server.into_inner().ready,
                model.into_inner().ready,
            )
        }
    };
    assert_eq!(ready(&mut client).await, (true, true, true));
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "inference.GRPCInferenceService".into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let metadata = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("ServerMetadata")
        .into_inner();
    assert_eq!(metadata.name, "odin-sidecar");
    let model = client
        .model_metadata(ModelMetadataRequest {
            name: MODEL.into(),
            version: "1".into(),
        })
        .await
        .expect("ModelMetadata")
        .into_inner();
    // The card's version, then its revision (version @ model digest).
    assert_eq!(
        model.versions,
        ["1".to_string(), server.app_info.versions.model.to_string()]
    );

    // The switch health and /readyz report: KServe readiness follows it.
    server.health.not_serving().await;
    assert_eq!(ready(&mut client).await, (true, false, false));
    server.health.serving().await;
    assert_eq!(ready(&mut client).await, (true, true, true));

    // A drain: the open stream's request is answered, then it ends UNAVAILABLE.
    let (requests, inbound) = tokio::sync::mpsc::channel(4);
    let mut responses = client
        .model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .expect("stream starts")
        .into_inner();
    requests
        .send(image_request("before", &[pixels(0, 32, 32)], 32, 32))
        .await
        .expect("sends");
    let first = responses.next().await.expect("a response").expect("ok");
    assert_eq!(first.infer_response.expect("response").id, "before");
    server.shutdown();
    let end = tokio::time::timeout(Duration::from_secs(20), responses.next())
        .await
        .expect("the stream ends within the grace period")
        .expect("a status, not a silent end")
        .expect_err("UNAVAILABLE");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    drop(requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_memory_budget_is_refused_whole() {
    let mut config = builtin();
    config.memory_budget = MAX_MESSAGE_BYTES;
    let server = TestServer::start(config).await;
    let mut client = kserve(&server).await;
    // 1024 images of 64x85: 15.9 MiB of pixels, under the 16 MiB message
    // limit, but with each frame's bookkeeping over the 16 MiB budget.
    let (n, height, width) = (1024usize, 64usize, 85usize);
    let request = ModelInferRequest {
        model_name: MODEL.into(),
        id: "big".into(),
        inputs: vec![input(
            "image",
            "UINT8",
            vec![n as i64, height as i64, width as i64, 3],
        )],
        raw_input_contents: vec![vec![128; n * height * width * 3]],
        ..ModelInferRequest::default()
    };
    let status = client.model_infer(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("memory budget"),
        "{}",
        status.message()
    );
    assert_eq!(
        server.pipeline.held_bytes(),
        0,
        "the frames charged were given back"
    );
    // One element more than a request may carry.
    let many = vec![vec![7u8; 3]; 1025];
    let request = image_request("many", &many, 1, 1);
    let status = client.model_infer(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("a batch of 1025"),
        "{}",
        status.message()
    );
    // A call that fits is served.
    client
        .model_infer(image_request("small", &[pixels(0, 32, 32)], 32, 32))
        .await
        .expect("served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_inference_service() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let server = TestServer::start(builtin()).await;
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
    for service in ["inference.GRPCInferenceService", "odin.v1.Detector"] {
        assert!(names.contains(&service.to_string()), "{names:?}");
    }
}
