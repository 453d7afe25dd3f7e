//! `odin.v1`: the generated protocol types, the descriptor set reflection
//! serves, and the conversions between them and the core's domain types,
//! in one place.

use std::time::Duration;

use crate::domain;
use crate::error;

#[allow(missing_docs, clippy::all)]
mod generated {
    tonic::include_proto!("odin.v1");
}

pub use generated::*;

/// The encoded `FileDescriptorSet` of `odin.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("odin_v1_descriptor");

impl From<Frame> for domain::FrameRequest {
    fn from(frame: Frame) -> Self {
        let Frame {
            frame_id,
            image,
            attributes,
            scoring,
            traceparent,
            tracestate,
        } = frame;
        domain::FrameRequest {
            id: frame_id,
            image: image.map(domain::ImageInput::from),
            attributes,
            scoring: scoring.map(|s| domain::ScoringRequest {
                // proto3 has no "unset" for strings: empty keeps the server's.
                method: (!s.method.is_empty()).then_some(s.method),
                temperature: s.temperature,
                epsilon: s.epsilon,
                threshold: s.threshold,
            }),
            trace: domain::TraceFields {
                traceparent,
                tracestate,
            },
            deadline: None,
        }
    }
}

impl From<frame::Image> for domain::ImageInput {
    fn from(image: frame::Image) -> Self {
        match image {
            frame::Image::Encoded(bytes) => domain::ImageInput::Encoded(bytes),
            frame::Image::Raw(raw) => domain::ImageInput::Raw(raw.into()),
            frame::Image::Tensor(Tensor { shape, data }) => {
                domain::ImageInput::Tensor(domain::TensorInput { shape, data })
            }
        }
    }
}

impl From<RawImage> for domain::RawPixels {
    fn from(raw: RawImage) -> Self {
        let RawImage {
            width,
            height,
            channels,
            pixels,
        } = raw;
        domain::RawPixels {
            width,
            height,
            channels,
            pixels,
        }
    }
}

impl From<domain::RawPixels> for RawImage {
    fn from(raw: domain::RawPixels) -> Self {
        let domain::RawPixels {
            width,
            height,
            channels,
            pixels,
        } = raw;
        RawImage {
            width,
            height,
            channels,
            pixels,
        }
    }
}

impl From<domain::Judgement> for Verdict {
    fn from(judgement: domain::Judgement) -> Self {
        let domain::Judgement {
            frame_id,
            attributes,
            scoring,
            outcome,
            timings,
            versions,
        } = judgement;
        let mut verdict = Verdict {
            frame_id,
            attributes,
            timings: Some(timings.into()),
            model_revision: versions.model.to_string(),
            calibration_version: versions.calibration.to_string(),
            ..Verdict::default()
        };
        if let Some(applied) = scoring {
            verdict.method = applied.scoring.method.to_string();
            verdict.temperature = applied.scoring.temperature;
            verdict.epsilon = applied.scoring.effective_epsilon();
            verdict.threshold = applied.threshold;
        }
        match outcome {
            Ok(decision) => {
                verdict.score = decision.score;
                verdict.in_distribution = decision.in_distribution;
                verdict.predicted_class = i32::try_from(decision.predicted_class).unwrap_or(-1);
                verdict.label = decision.label;
                verdict.max_softmax = decision.max_softmax;
            }
            Err(error) => verdict.error = Some((&error).into()),
        }
        verdict
    }
}

impl From<domain::Timings> for Timings {
    fn from(timings: domain::Timings) -> Self {
        Timings {
            decode_us: micros(timings.decode),
            queue_us: micros(timings.queue),
            inference_us: micros(timings.inference),
            total_us: micros(timings.total),
        }
    }
}

impl From<&error::FrameError> for FrameError {
    fn from(error: &error::FrameError) -> Self {
        FrameError {
            code: error.code() as i32,
            reason: error.reason().as_str().to_string(),
            message: error.to_string(),
        }
    }
}

impl From<&domain::ModelInfo> for ModelInfo {
    fn from(info: &domain::ModelInfo) -> Self {
        let input = &info.preprocessing;
        let scoring = &info.scoring;
        ModelInfo {
            name: info.name.clone(),
            version: info.version.clone(),
            input_name: info.input_name.clone(),
            input_shape: info.input_shape.clone(),
            input_layout: info.input_layout.clone(),
            labels: info.labels.clone(),
            preprocessing: Some(Preprocessing {
                height: input.height,
                width: input.width,
                channels: input.channels,
                channel_order: input.channel_order.as_str().to_string(),
                resize: input.resize.as_str().to_string(),
                mean: input.mean.clone(),
                std: input.std.clone(),
            }),
            execution_provider: info.execution_provider.clone(),
            scoring: Some(Scoring {
                method: scoring.method.clone(),
                temperature: scoring.temperature,
                epsilon: scoring.epsilon,
                threshold: scoring.threshold,
                threshold_source: scoring.threshold_source.clone(),
                min_temperature: scoring.min_temperature,
                max_temperature: scoring.max_temperature,
                max_epsilon: scoring.max_epsilon,
                perturbation_available: scoring.perturbation_available,
                calibration_version: info.versions.calibration.to_string(),
                detector: scoring.detector.clone(),
                fit_stats: scoring.fit_stats.clone(),
                feature_dim: scoring.feature_dim,
            }),
            revision: info.versions.model.to_string(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn descriptor_set_names_the_detector_service() {
        let set =
            prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).expect("decodes");
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "odin.v1")
            .expect("odin.v1 file present");
        assert!(file.service.iter().any(|s| s.name() == "Detector"));
    }

    #[test]
    fn an_empty_method_keeps_the_servers_and_fields_move_across() {
        let frame = Frame {
            frame_id: "f1".into(),
            image: Some(frame::Image::Encoded(vec![1, 2, 3])),
            attributes: [("camera".to_string(), "7".to_string())].into(),
            scoring: Some(ScoringOverride {
                method: String::new(),
                temperature: Some(10.0),
                epsilon: None,
                threshold: Some(0.25),
            }),
            traceparent: "tp".into(),
            tracestate: String::new(),
        };
        let request = domain::FrameRequest::from(frame);
        assert_eq!(request.id, "f1");
        assert_eq!(
            request.image,
            Some(domain::ImageInput::Encoded(vec![1, 2, 3]))
        );
        assert_eq!(request.attributes["camera"], "7");
        let scoring = request.scoring.expect("override kept");
        assert_eq!(scoring.method, None);
        assert_eq!(scoring.temperature, Some(10.0));
        assert_eq!(scoring.threshold, Some(0.25));
        assert_eq!(request.trace.traceparent, "tp");
    }

    #[test]
    fn a_failed_judgement_carries_its_error_and_the_scoring_in_force() {
        use crate::score::{Method, Scoring as Applied};
        let judgement = domain::Judgement {
            frame_id: "bad".into(),
            attributes: Default::default(),
            scoring: Some(domain::AppliedScoring {
                scoring: Applied {
                    method: Method::Msp,
                    temperature: 2.0,
                    epsilon: 0.003,
                },
                threshold: 0.4,
            }),
            outcome: Err(error::FrameError::Channels(2)),
            timings: domain::Timings {
                total: Duration::from_micros(1500),
                ..Default::default()
            },
            versions: domain::Versions {
                model: "1@00ff00ff".into(),
                calibration: "flags".into(),
            },
        };
        let verdict = Verdict::from(judgement);
        assert_eq!(verdict.method, "msp");
        assert_eq!(verdict.epsilon, 0.0, "msp never perturbs");
        assert_eq!(verdict.threshold, 0.4);
        let error = verdict.error.expect("error set");
        assert_eq!(
            (error.code, error.reason.as_str()),
            (3, "UNSUPPORTED_CHANNELS")
        );
        assert_eq!(verdict.timings.map(|t| t.total_us), Some(1500));
        assert_eq!(
            (
                verdict.model_revision.as_str(),
                verdict.calibration_version.as_str()
            ),
            ("1@00ff00ff", "flags")
        );
    }
}
