//! Property tests: whatever a frame holds, validation and decoding never
//! panic and always give either the model's input tensor or a specific
//! per-frame error (INVALID_ARGUMENT, never INTERNAL).
//!
//! Cases per property: `PROPTEST_CASES`, or a default that keeps the whole
//! module well under a minute on two cores in a debug build.

use std::sync::{Arc, OnceLock};

use odin_sidecar::domain::{FrameRequest, ImageInput, RawPixels, ScoringRequest, TensorInput};
use odin_sidecar::error::FrameError;
use odin_sidecar::model::{Model, ModelSource};
use odin_sidecar::pipeline::{Caller, Pipeline, Preprocessor};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use tonic::Code;

use crate::harness::{encode, noise};

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Failures are reported with their minimal case; no files written
        // into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The built-in model's preprocessor, as the server builds it.
fn preprocessor() -> &'static Preprocessor {
    static PRE: OnceLock<Preprocessor> = OnceLock::new();
    PRE.get_or_init(|| {
        let model = Model::load(&ModelSource::Embedded).expect("the built-in model");
        Preprocessor::new(&model.card.input)
    })
}

/// The property every input must satisfy.
fn tensor_or_specific_error(input: &ImageInput) -> Result<Option<Vec<f32>>, TestCaseError> {
    let pre = preprocessor();
    match pre.tensor(Some(input)) {
        Ok(tensor) => {
            prop_assert_eq!(tensor.len(), pre.tensor_len());
            prop_assert!(
                tensor.iter().all(|v| v.is_finite()),
                "a non-finite input value"
            );
            Ok(Some(tensor))
        }
        Err(error) => {
            prop_assert!(
                !matches!(
                    error,
                    FrameError::Internal(_) | FrameError::Engine(_) | FrameError::Unavailable
                ),
                "not a specific error: {error}"
            );
            prop_assert_eq!(error.code(), Code::InvalidArgument, "{}", error);
            Ok(None)
        }
    }
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_MAGIC: &[u8] = b"\xff\xd8\xff\xe0";

fn bytes_with_magic() -> impl Strategy<Value = Vec<u8>> {
    let body = prop::collection::vec(any::<u8>(), 0..2048);
    prop_oneof![
        body.clone(),
        body.clone().prop_map(|b| [PNG_MAGIC, &b].concat()),
        body.prop_map(|b| [JPEG_MAGIC, &b].concat()),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn arbitrary_encoded_bytes_give_a_tensor_or_a_specific_error(bytes in bytes_with_magic()) {
        tensor_or_specific_error(&ImageInput::Encoded(bytes))?;
    }

    #[test]
    fn arbitrary_raw_frames_of_matching_length(
        width in 0u32..96,
        height in 0u32..96,
        channels in 0u32..6,
        seed in any::<u64>(),
    ) {
        let len = (width * height * channels) as usize;
        let raw = RawPixels { width, height, channels, pixels: noise(len, seed) };
        let judged = tensor_or_specific_error(&ImageInput::Raw(raw))?;
        // Every well-formed raw frame of a supported channel count is accepted.
        if len > 0 && matches!(channels, 1 | 3 | 4) {
            prop_assert!(judged.is_some());
        }
    }

    #[test]
    fn arbitrary_raw_dimensions_and_pixels(
        width in any::<u32>(),
        height in any::<u32>(),
        channels in any::<u32>(),
        pixels in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let raw = RawPixels { width, height, channels, pixels };
        tensor_or_specific_error(&ImageInput::Raw(raw))?;
    }

    #[test]
    fn arbitrary_raw_dimensions_with_a_supported_channel_count(
        width in any::<u32>(),
        height in any::<u32>(),
        channels in prop::sample::select(vec![1u32, 3, 4]),
        pixels in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let raw = RawPixels { width, height, channels, pixels };
        tensor_or_specific_error(&ImageInput::Raw(raw))?;
    }
}

fn shape() -> impl Strategy<Value = Vec<u32>> {
    prop_oneof![
        Just(vec![1, 3, 32, 32]),
        Just(vec![3, 32, 32]),
        prop::collection::vec(any::<u32>(), 0..6),
        prop::collection::vec(0u32..40, 0..6),
    ]
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -4.0f32..4.0,
        1 => any::<f32>(),
        1 => prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, f32::MIN_POSITIVE]),
    ]
}

fn data() -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        prop::collection::vec(value(), 3 * 32 * 32),
        prop::collection::vec(value(), 0..4000),
    ]
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn arbitrary_tensors_are_passed_through_exactly_or_refused(shape in shape(), data in data()) {
        let input = ImageInput::Tensor(TensorInput { shape, data: data.clone() });
        if let Some(tensor) = tensor_or_specific_error(&input)? {
            prop_assert_eq!(tensor, data, "a tensor frame is used as sent");
        }
    }
}

/// The ways a file gets damaged.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Overwrite(Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Flip(i, bit) => {
                let i = i.index(bytes.len());
                bytes[i] ^= 1 << bit;
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Insert(i, extra) => {
                let i = i.index(bytes.len() + 1);
                bytes.splice(i..i, extra.iter().copied());
            }
            Mutation::Overwrite(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
        }
    }
    bytes
}

/// Valid 40×30 files to damage: PNG (RGB noise), JPEG, and a PNG of the
/// model's own size.
fn originals() -> &'static [Vec<u8>; 3] {
    static FILES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    FILES.get_or_init(|| {
        let image = image::RgbImage::from_raw(40, 30, noise(40 * 30 * 3, 3)).expect("dims");
        let small = image::RgbImage::from_raw(32, 32, noise(32 * 32 * 3, 4)).expect("dims");
        [
            encode(&image, image::ImageFormat::Png),
            encode(&image, image::ImageFormat::Jpeg),
            encode(&small, image::ImageFormat::Png),
        ]
    })
}

proptest! {
    #![proptest_config(cases(1024))]

    #[test]
    fn damaged_png_and_jpeg_files_give_a_tensor_or_a_specific_error(
        which in 0usize..3,
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let original = &originals()[which];
        prop_assert!(tensor_or_specific_error(&ImageInput::Encoded(original.clone()))?.is_some());
        let damaged = mutate(original.clone(), &mutations);
        tensor_or_specific_error(&ImageInput::Encoded(damaged))?;
    }
}

/// The whole per-frame path (field caps, scoring overrides, decode, engine)
/// of a real pipeline, judged in-process.
fn pipeline() -> &'static (tokio::runtime::Runtime, Arc<Pipeline>) {
    static PIPELINE: OnceLock<(tokio::runtime::Runtime, Arc<Pipeline>)> = OnceLock::new();
    PIPELINE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let app = runtime
            .block_on(odin_sidecar::app::App::build(&crate::harness::config()))
            .expect("the sidecar builds");
        let pipeline = app.pipeline();
        (runtime, pipeline)
    })
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter),
        (0..max * 4).prop_map(|n| "é".repeat(n / 2)),
    ]
}

fn scoring() -> impl Strategy<Value = Option<ScoringRequest>> {
    let method = prop::option::of(prop_oneof![
        prop::sample::select(vec!["msp", "odin", "energy", "maxlogit", "", "MSP"])
            .prop_map(String::from),
        text(48),
    ]);
    let number = || prop::option::of(value());
    prop::option::of((method, number(), number(), number())).prop_map(|s| {
        s.map(|(method, temperature, epsilon, threshold)| ScoringRequest {
            method,
            temperature,
            epsilon,
            threshold,
        })
    })
}

fn image() -> impl Strategy<Value = Option<ImageInput>> {
    prop_oneof![
        Just(None),
        Just(Some(ImageInput::Raw(RawPixels {
            width: 32,
            height: 32,
            channels: 3,
            pixels: noise(32 * 32 * 3, 1),
        }))),
        bytes_with_magic().prop_map(|b| Some(ImageInput::Encoded(b))),
    ]
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn any_frame_request_gets_a_judgement_with_bounded_echoes(
        id in text(400),
        attributes in prop::collection::hash_map(
            text(12),
            prop_oneof![9 => text(40), 1 => Just("v".repeat(1030))],
            0..40,
        ),
        scoring in scoring(),
        image in image(),
    ) {
        let (runtime, pipeline) = pipeline();
        let request = FrameRequest {
            id: id.clone(),
            image,
            attributes: attributes.clone(),
            scoring,
            ..FrameRequest::default()
        };
        let admitted = pipeline.try_admit(request).expect("fits in the default budget");
        let answer = runtime.block_on(
            Arc::clone(pipeline).judge(admitted, &Caller::in_process()),
        );
        let judgement = answer.judgement;
        prop_assert!(judgement.frame_id.len() <= 256);
        prop_assert!(id.starts_with(&judgement.frame_id), "the echoed id is a prefix");
        if id.len() <= 256 {
            prop_assert_eq!(&judgement.frame_id, &id);
        }
        let too_many = attributes.len() > 32;
        let too_long = attributes.iter().any(|(k, v)| k.len() + v.len() > 1024);
        if too_many || too_long || id.len() > 256 {
            prop_assert!(
                matches!(judgement.outcome, Err(FrameError::FieldTooLarge { .. })),
                "{:?}", judgement.outcome
            );
        }
        if too_many || too_long {
            prop_assert!(judgement.attributes.is_empty());
        } else {
            prop_assert_eq!(&judgement.attributes, &attributes);
        }
        if let Err(error) = &judgement.outcome {
            prop_assert!(
                !matches!(error, FrameError::Internal(_) | FrameError::Engine(_) | FrameError::Unavailable),
                "not a specific error: {error}"
            );
        }
        drop(answer.finish);
        prop_assert_eq!(pipeline.held_bytes(), 0, "the frame's charge is returned");
    }
}
