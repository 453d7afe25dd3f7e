//! Unit tests of the pipeline (`resolve`'s bounds, `judge`'s timings and
//! in-flight count), and the helpers the stage tests (`batch`, `order`)
//! share: the built-in model in a real ONNX Runtime session on CPU.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::engine::{Device, Engine, EngineOptions, Graphs};
use crate::model::{Model, ModelSource};
use crate::score::Method;

/// The built-in model.
pub(super) fn model() -> Model {
    Model::load(&ModelSource::Embedded).unwrap()
}

/// A CPU engine (one intra-op thread) for the built-in model, with its
/// fused gradient graph when `perturb`, as served by default.
pub(super) fn engine(perturb: bool) -> Engine {
    let model = model();
    let mut graphs = Graphs::plain(&model);
    if perturb {
        let options = crate::grad::GradOptions {
            std: model.card.input.std.clone(),
            raw_gradient: false,
            features: None,
            fused: true,
        };
        let derived = crate::grad::derive(&model.onnx, &options).unwrap();
        graphs.gradient = Some(Arc::from(derived.bytes));
        graphs.fused = true;
    }
    let options = EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
        fused: true,
    };
    Engine::load(&model, Some(&graphs), &options).unwrap()
}

/// A normalized input of the built-in model's shape, different per seed.
pub(super) fn input(seed: usize) -> Vec<f32> {
    (0..3 * 32 * 32)
        .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Raw 32 × 32 RGB pixels, different per seed.
pub(super) fn pixels(seed: usize) -> Vec<u8> {
    (0..3 * 32 * 32)
        .map(|i| ((i * 31 + seed * 97) % 256) as u8)
        .collect()
}

/// A frame of [`pixels`].
pub(super) fn frame(id: &str, seed: usize) -> FrameRequest {
    FrameRequest {
        id: id.into(),
        image: Some(ImageInput::Raw(crate::domain::RawPixels {
            width: 32,
            height: 32,
            channels: 3,
            pixels: pixels(seed),
        })),
        ..FrameRequest::default()
    }
}

/// The server's defaults: msp at T = 1, threshold 0.5, the default bounds.
pub(super) fn scoring(can_perturb: bool) -> ScoringOptions {
    ScoringOptions {
        scoring: Scoring {
            method: Method::Msp,
            temperature: 1.0,
            epsilon: 0.0,
        },
        threshold: 0.5,
        bounds: crate::config::DEFAULT_OVERRIDE_BOUNDS,
        can_perturb,
    }
}

/// A pipeline on the built-in model with one engine worker (with its
/// gradient graph when `options.can_perturb`). Must run inside a tokio
/// runtime.
pub(super) fn pipeline(options: ScoringOptions, batch: BatchOptions) -> Arc<Pipeline> {
    let model = model();
    let telemetry = Arc::new(Telemetry::metrics_only());
    let batcher = Batcher::start(
        vec![engine(options.can_perturb)],
        batch,
        Arc::clone(&telemetry),
    );
    let generation = Generation {
        preprocessor: Preprocessor::new(&model.card.input),
        batcher,
        scoring: options,
        scorers: Arc::new(crate::score::Scorers::new(Vec::new(), None, None)),
        labels: model.card.labels.clone(),
        info: info(&model),
    };
    let options = PipelineOptions {
        decode_threads: 2,
        memory_budget: crate::config::DEFAULT_MEMORY_BUDGET,
        fields: crate::config::DEFAULT_FIELD_LIMITS,
    };
    Arc::new(Pipeline::new(generation, options, telemetry))
}

/// What a server would report for the built-in model (only the versions
/// and the name matter to these tests).
fn info(model: &Model) -> ModelInfo {
    ModelInfo {
        name: model.card.name.clone(),
        version: model.card.version.clone(),
        input_name: "input".into(),
        input_shape: vec![-1, 3, 32, 32],
        input_layout: "NCHW".into(),
        labels: model.card.labels.clone(),
        preprocessing: model.card.input.clone(),
        execution_provider: "CPUExecutionProvider".into(),
        scoring: crate::domain::ScoringInfo {
            method: "msp".into(),
            temperature: 1.0,
            epsilon: 0.0,
            threshold: 0.5,
            threshold_source: "flag".into(),
            min_temperature: 1.0,
            max_temperature: 1000.0,
            max_epsilon: 0.004,
            perturbation_available: true,
            detector: "msp".into(),
            fit_stats: Vec::new(),
            feature_dim: 0,
        },
        versions: crate::domain::Versions {
            model: "1@test".into(),
            calibration: "flags".into(),
        },
    }
}

/// `frame`, charged to `p`'s memory budget.
pub(super) fn admitted(p: &Pipeline, frame: FrameRequest) -> Admitted {
    p.try_admit(frame).unwrap()
}

/// Batching as served by default.
pub(super) fn batching() -> BatchOptions {
    BatchOptions {
        max_batch: 8,
        max_queue_delay: Duration::ZERO,
        queue_capacity: 64,
    }
}

/// The logits of one input, computed alone by a fresh engine.
pub(super) fn alone(input: &[f32]) -> Vec<f32> {
    engine(false).logits(input, 1).unwrap()
}

/// Max softmax of `logits / t` in f64, written here.
fn reference_max_softmax(logits: &[f32], t: f64) -> f64 {
    let z: Vec<f64> = logits.iter().map(|v| f64::from(*v) / t).collect();
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    1.0 / z.iter().map(|v| (v - max).exp()).sum::<f64>()
}

fn request(
    method: Option<&str>,
    temperature: Option<f32>,
    epsilon: Option<f32>,
    threshold: Option<f32>,
) -> ScoringRequest {
    ScoringRequest {
        method: method.map(str::to_string),
        temperature,
        epsilon,
        threshold,
    }
}

fn out_of_bounds(result: Result<AppliedScoring, FrameError>) -> (&'static str, f32) {
    match result {
        Err(FrameError::OverrideOutOfBounds { field, value, .. }) => (field, value),
        other => panic!("expected OverrideOutOfBounds, got {other:?}"),
    }
}

#[tokio::test]
async fn resolve_keeps_the_servers_scoring_without_an_override() {
    let p = pipeline(scoring(true), batching());
    let applied = p.resolve(None).unwrap();
    assert_eq!(applied.scoring, scoring(true).scoring);
    assert_eq!(applied.threshold, 0.5);
    // An override of nothing changes nothing.
    assert_eq!(
        p.resolve(Some(&ScoringRequest::default())).unwrap(),
        applied
    );
}

#[tokio::test]
async fn resolve_takes_each_field_of_an_override_within_the_bounds() {
    let p = pipeline(scoring(true), batching());
    let bounds = crate::config::DEFAULT_OVERRIDE_BOUNDS;
    let applied = p
        .resolve(Some(&request(
            Some("odin"),
            Some(10.0),
            Some(0.002),
            Some(0.2),
        )))
        .unwrap();
    assert_eq!(applied.scoring.method, Method::Odin);
    assert_eq!(
        (
            applied.scoring.temperature,
            applied.scoring.epsilon,
            applied.threshold
        ),
        (10.0, 0.002, 0.2)
    );
    // The bounds themselves are allowed.
    for t in [bounds.min_temperature, bounds.max_temperature] {
        assert_eq!(
            p.resolve(Some(&request(None, Some(t), None, None)))
                .unwrap()
                .scoring
                .temperature,
            t
        );
    }
    for e in [0.0, bounds.max_epsilon] {
        assert_eq!(
            p.resolve(Some(&request(Some("odin"), None, Some(e), None)))
                .unwrap()
                .scoring
                .epsilon,
            e
        );
    }
    // Any finite threshold, with any method's scale.
    for d in [-1e9, 0.0, 7.5] {
        assert_eq!(
            p.resolve(Some(&request(Some("energy"), None, None, Some(d))))
                .unwrap()
                .threshold,
            d
        );
    }
}

#[tokio::test]
async fn resolve_refuses_values_past_the_bounds_naming_the_field() {
    let p = pipeline(scoring(true), batching());
    let bounds = crate::config::DEFAULT_OVERRIDE_BOUNDS;
    let above = |v: f32| f32::from_bits(v.to_bits() + 1);
    let below = |v: f32| f32::from_bits(v.to_bits() - 1);
    for t in [
        below(bounds.min_temperature),
        above(bounds.max_temperature),
        0.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
    ] {
        let (field, value) = out_of_bounds(p.resolve(Some(&request(None, Some(t), None, None))));
        assert_eq!(field, "temperature");
        assert!(value.to_bits() == t.to_bits(), "{value} vs {t}");
    }
    for e in [-1e-9, above(bounds.max_epsilon), f32::NAN, f32::INFINITY] {
        let (field, _) =
            out_of_bounds(p.resolve(Some(&request(Some("odin"), None, Some(e), None))));
        assert_eq!(field, "epsilon", "{e}");
    }
    for d in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (field, _) = out_of_bounds(p.resolve(Some(&request(None, None, None, Some(d)))));
        assert_eq!(field, "threshold", "{d}");
    }
    match p.resolve(Some(&request(Some("softmax"), None, None, None))) {
        Err(FrameError::UnknownMethod(m)) => assert_eq!(m, "softmax"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn without_a_gradient_graph_only_perturbing_scorings_are_refused() {
    let p = pipeline(scoring(false), batching());
    for method in ["odin", "energy"] {
        match p.resolve(Some(&request(Some(method), None, Some(0.002), None))) {
            Err(FrameError::PerturbationUnavailable(m)) => assert_eq!(m, method),
            other => panic!("{method}: {other:?}"),
        }
        // ε = 0 perturbs nothing.
        assert!(p
            .resolve(Some(&request(Some(method), None, Some(0.0), None)))
            .is_ok());
    }
    // msp and maxlogit never perturb, whatever ε says.
    for method in ["msp", "maxlogit"] {
        assert!(p
            .resolve(Some(&request(Some(method), None, Some(0.002), None)))
            .is_ok());
    }
    // With the graph, the same override is taken.
    let q = pipeline(scoring(true), batching());
    assert!(q
        .resolve(Some(&request(Some("odin"), None, Some(0.002), None)))
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judge_times_each_stage_within_the_total_and_counts_the_frame_until_sent() {
    let p = pipeline(scoring(true), batching());
    let answer = Arc::clone(&p)
        .judge(admitted(&p, frame("a", 1)), &Caller::in_process())
        .await;
    // Answered but not yet sent: still in flight.
    assert_eq!(p.in_flight(), 1);
    let Judgement {
        frame_id,
        outcome,
        timings: t,
        ..
    } = &answer.judgement;
    assert_eq!(frame_id, "a");
    let decision = outcome.as_ref().unwrap();
    let logits = alone(
        &Preprocessor::new(&model().card.input)
            .tensor(frame("a", 1).image.as_ref())
            .unwrap(),
    );
    assert_eq!(decision.predicted_class, crate::score::argmax(&logits));
    for (got, want) in decision.logits.iter().zip(&logits) {
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }
    assert!(
        !t.decode.is_zero() && !t.queue.is_zero() && !t.inference.is_zero(),
        "{t:?}"
    );
    assert!(t.decode + t.queue + t.inference <= t.total, "{t:?}");
    drop(answer);
    assert_eq!(p.in_flight(), 0);

    // A frame that fails in decode is never queued or computed.
    let mut bad = frame("bad", 2);
    bad.image = Some(ImageInput::Encoded(b"not an image".to_vec()));
    let answer = Arc::clone(&p)
        .judge(admitted(&p, bad), &Caller::in_process())
        .await;
    let t = answer.judgement.timings;
    assert!(matches!(
        answer.judgement.outcome,
        Err(FrameError::Decode { .. })
    ));
    assert!(
        !t.decode.is_zero() && t.queue.is_zero() && t.inference.is_zero(),
        "{t:?}"
    );
    assert!(t.decode <= t.total);

    // A frame refused on arrival reaches no stage, and has no scoring.
    let mut refused = frame("refused", 3);
    refused.scoring = Some(request(Some("bogus"), None, None, None));
    let answer = Arc::clone(&p)
        .judge(admitted(&p, refused), &Caller::in_process())
        .await;
    let t = answer.judgement.timings;
    assert!(answer.judgement.scoring.is_none());
    assert!(
        t.decode.is_zero() && t.queue.is_zero() && t.inference.is_zero(),
        "{t:?}"
    );
    assert!(!t.total.is_zero());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judge_applies_the_frames_scoring_and_threshold() {
    let p = pipeline(scoring(true), batching());
    let mut f = frame("t", 4);
    f.scoring = Some(request(None, Some(10.0), None, Some(0.0)));
    let answer = Arc::clone(&p)
        .judge(admitted(&p, f), &Caller::in_process())
        .await;
    let applied = answer.judgement.scoring.unwrap();
    assert_eq!(
        (applied.scoring.temperature, applied.threshold),
        (10.0, 0.0)
    );
    let decision = answer.judgement.outcome.unwrap();
    let close =
        |got: f32, want: f64| assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    close(
        decision.score,
        reference_max_softmax(&decision.logits, 10.0),
    );
    close(
        decision.max_softmax,
        reference_max_softmax(&decision.logits, 1.0),
    );
    assert!(decision.score < decision.max_softmax, "T = 10 flattens it");
    assert!(decision.in_distribution, "every score is ≥ 0");
    assert_eq!(
        decision.label,
        model().card.labels[decision.predicted_class]
    );
}
