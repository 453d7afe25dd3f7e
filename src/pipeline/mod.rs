//! The data path, as one straight line per frame:
//! receive → decode → batch → infer → score → respond.
//!
//! `Pipeline::judge` runs it for one frame and returns its `Judgement`;
//! `order::drive` runs it for a whole stream, keeping answers in frame
//! order. The pipeline speaks only the core's own types (`crate::domain`);
//! each protocol converts at its edge. It tells its `FrameRecorder` (see
//! `crate::telemetry`) when each stage ends; what that records is the
//! recorder's business.

pub mod admit;
pub mod batch;
pub mod decode;
pub mod fair;
pub mod order;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use opentelemetry::Context;

use crate::config::FieldLimits;
use crate::domain::{
    AppliedScoring, Decision, FrameRequest, ImageInput, Judgement, ModelInfo, ScoringRequest,
    Timings,
};
use crate::error::{CallError, FrameError};
use crate::score::{self, Scorers, Scoring};
use crate::telemetry::{FrameFinish, FrameRecorder, Gauges, Rpc, Stage, Telemetry};

pub use admit::{Admitted, Charge, MemoryBudget};
pub use batch::{BatchOptions, Batcher, Inference, ScoreWith};
pub use decode::{DecodeLimits, Preprocessor};
pub use fair::ClientId;

/// Scoring settings in force, and what frames may override.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringOptions {
    /// Method, temperature and ε of frames without an override.
    pub scoring: Scoring,
    /// Decision threshold δ: in-distribution iff score ≥ δ.
    pub threshold: f32,
    /// Bounds on per-frame overrides.
    pub bounds: OverrideBounds,
    /// Whether the gradient graph is loaded (ODIN and perturbed energy).
    pub can_perturb: bool,
}

/// The ranges a frame's scoring override must stay inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverrideBounds {
    /// Smallest temperature a frame may ask for.
    pub min_temperature: f32,
    /// Largest temperature a frame may ask for.
    pub max_temperature: f32,
    /// Largest ε a frame may ask for (the smallest is 0).
    pub max_epsilon: f32,
}

/// How the pipeline runs, whatever model it serves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineOptions {
    /// Concurrent decodes.
    pub decode_threads: usize,
    /// Bytes of frames held at once, over all streams and calls.
    pub memory_budget: usize,
    /// Caps on a frame's id, attributes and method name.
    pub fields: FieldLimits,
}

/// Who a frame came from: its call's trace context, RPC and client.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The call's trace context: the parent of frames without their own.
    pub parent: Context,
    /// The RPC the frame came on.
    pub rpc: Rpc,
    /// The client, for fair sharing of the decoders.
    pub client: ClientId,
}

impl Caller {
    /// An in-process caller (`detect`, benchmarks): no trace parent.
    pub fn in_process() -> Caller {
        Caller {
            parent: Context::new(),
            rpc: Rpc::InProcess,
            client: ClientId::default(),
        }
    }
}

/// What serves one model with one calibration: replaced as a whole by a
/// live reload. A frame takes the generation in force when it arrives and
/// keeps it to the end, so frames in flight finish on the old one while new
/// frames already use the new one.
#[derive(Debug)]
pub struct Generation {
    /// The model's preprocessing.
    pub preprocessor: Preprocessor,
    /// The model's engine workers.
    pub batcher: Batcher,
    /// Scoring in force and what frames may override.
    pub scoring: ScoringOptions,
    /// The fit statistics, calibrated combination and detectors frames are
    /// scored with.
    pub scorers: Arc<Scorers>,
    /// Class labels, in logit order.
    pub labels: Vec<String>,
    /// What is served, versions included.
    pub info: ModelInfo,
}

/// Everything needed to judge frames. Shared by all streams.
pub struct Pipeline {
    current: RwLock<Arc<Generation>>,
    // Decoding runs on tokio's blocking pool, a few frames at a time, shared
    // fairly: one client's expensive frames wait behind each other, not in
    // front of everyone else's.
    decoders: fair::FairPool,
    budget: MemoryBudget,
    options: PipelineOptions,
    in_flight: AtomicUsize,
    telemetry: Arc<Telemetry>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("options", &self.options)
            .finish()
    }
}

/// A frame's judgement, and the bookkeeping that closes when it is sent.
#[derive(Debug)]
pub struct Answer {
    /// The judgement to send.
    pub judgement: Judgement,
    /// Drop it once the judgement is sent (or abandoned): that ends the
    /// frame's respond stage, its span and its in-flight count.
    pub finish: Finish,
}

/// See [`Answer::finish`].
#[derive(Debug)]
pub struct Finish {
    _recorded: FrameFinish,
    _counted: InFlight,
    _charge: Charge,
}

impl Pipeline {
    /// Assembles the pipeline around its first generation.
    pub fn new(
        generation: Generation,
        options: PipelineOptions,
        telemetry: Arc<Telemetry>,
    ) -> Pipeline {
        Pipeline {
            current: RwLock::new(Arc::new(generation)),
            decoders: fair::FairPool::new(options.decode_threads),
            budget: MemoryBudget::new(options.memory_budget),
            options,
            in_flight: AtomicUsize::new(0),
            telemetry,
        }
    }

    /// The generation in force now.
    pub fn current(&self) -> Arc<Generation> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Puts `generation` in force for every frame that arrives from now
    /// on; returns the one it replaces (which serves its frames in flight
    /// and stops once they are answered).
    pub fn install(&self, generation: Generation) -> Arc<Generation> {
        let new = Arc::new(generation);
        match self.current.write() {
            Ok(mut g) => std::mem::replace(&mut *g, new),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }

    /// Waits until `request` fits in the memory budget and charges it: how
    /// streams are admitted (a stream waiting here is not read).
    pub async fn admit(&self, request: FrameRequest) -> Option<Admitted> {
        self.budget.admit(request).await
    }

    /// Charges `request` if it fits in the memory budget now: how unary
    /// calls are admitted.
    pub fn try_admit(&self, request: FrameRequest) -> Result<Admitted, CallError> {
        self.budget
            .try_admit(request)
            .map_err(|_| CallError::MemoryBudget {
                budget_mib: self.budget.total() >> 20,
            })
    }

    /// Bytes of frames held now.
    pub fn held_bytes(&self) -> usize {
        self.budget.held()
    }

    /// Metrics and tracing of this pipeline.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// The gauges `/metrics` reports, read now.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            queue_depth: self.queued() as u64,
            in_flight: self.in_flight() as u64,
            held_bytes: self.held_bytes() as u64,
            budget_bytes: self.budget.total() as u64,
        }
    }

    /// Frames received and not yet answered, over all streams and calls.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Frames waiting for an engine worker.
    pub fn queued(&self) -> usize {
        self.current().batcher.queued()
    }

    /// The scoring settings in force.
    pub fn options(&self) -> ScoringOptions {
        self.current().scoring
    }

    /// The scoring and threshold for one frame under the generation in
    /// force (see [`Generation::resolve`]).
    pub fn resolve(&self, over: Option<&ScoringRequest>) -> Result<AppliedScoring, FrameError> {
        self.current().resolve(over)
    }
}

impl Generation {
    /// The scoring and threshold for one frame: the server's, or the frame's
    /// override when it is valid and inside the bounds.
    pub fn resolve(&self, over: Option<&ScoringRequest>) -> Result<AppliedScoring, FrameError> {
        let options = self.scoring;
        let mut scoring = options.scoring;
        let Some(over) = over else {
            return Ok(AppliedScoring {
                scoring,
                threshold: options.threshold,
            });
        };
        if let Some(method) = &over.method {
            scoring.method = method
                .parse()
                .map_err(|_| FrameError::UnknownMethod(method.clone()))?;
        }
        let bounds = options.bounds;
        let check = |field, value: f32, min: f32, max: f32| {
            if value.is_finite() && value >= min && value <= max {
                Ok(value)
            } else {
                Err(FrameError::OverrideOutOfBounds {
                    field,
                    value,
                    min,
                    max,
                })
            }
        };
        if let Some(t) = over.temperature {
            scoring.temperature = check(
                "temperature",
                t,
                bounds.min_temperature,
                bounds.max_temperature,
            )?;
        }
        if let Some(e) = over.epsilon {
            scoring.epsilon = check("epsilon", e, 0.0, bounds.max_epsilon)?;
        }
        if scoring.perturbation().is_some() && !options.can_perturb {
            return Err(FrameError::PerturbationUnavailable(
                scoring.method.to_string(),
            ));
        }
        self.scorers
            .check(&scoring)
            .map_err(|e| FrameError::DetectorUnavailable(e.to_string()))?;
        let threshold = match over.threshold {
            Some(t) => check("threshold", t, f32::MIN, f32::MAX)?,
            None => options.threshold,
        };
        Ok(AppliedScoring { scoring, threshold })
    }

    fn score(&self, inference: Inference, applied: AppliedScoring) -> Decision {
        let Inference {
            logits,
            score: value,
            ..
        } = inference;
        let class = score::argmax(&logits);
        Decision {
            score: value,
            in_distribution: value >= applied.threshold,
            predicted_class: class,
            label: self.labels.get(class).cloned().unwrap_or_default(),
            max_softmax: score::max_softmax(&logits, 1.0),
            logits,
        }
    }
}

impl Pipeline {
    /// Judges one admitted frame. Never fails: a bad frame gets a judgement
    /// carrying its error. The frame's charge is returned when its answer's
    /// `finish` is dropped.
    pub async fn judge(self: Arc<Self>, admitted: Admitted, caller: &Caller) -> Answer {
        let arrived = Instant::now();
        let counted = InFlight::enter(Arc::clone(&self));
        let Admitted {
            mut request,
            charge,
        } = admitted;
        // Receive: oversized fields are cut before anything echoes them.
        let fields = check_fields(&mut request, &self.options.fields);
        let recorder = self.telemetry.frame(
            &caller.parent,
            &request.trace,
            caller.rpc,
            &request.id,
            arrived,
        );
        let FrameRequest {
            id,
            image,
            attributes,
            scoring,
            deadline,
            ..
        } = request;
        // The generation in force now judges this frame to the end, even if
        // a reload installs another meanwhile.
        let generation = self.current();
        // The frame's own scoring, checked against the bounds.
        let applied = fields.and_then(|()| generation.resolve(scoring.as_ref()));
        let in_force = applied.as_ref().ok().copied();
        recorder.stage(Stage::Receive, arrived, Instant::now());
        let mut timings = Timings::default();
        let work = Work {
            image,
            deadline,
            client: caller.client,
            generation: Arc::clone(&generation),
        };
        let outcome = match applied {
            Ok(applied) => {
                recorder
                    .scope(self.run(work, applied, &recorder, &mut timings))
                    .await
            }
            Err(error) => Err(error),
        };
        let ready = Instant::now();
        timings.total = ready - arrived;
        let judgement = Judgement {
            frame_id: id,
            attributes,
            scoring: in_force,
            outcome,
            timings,
            versions: generation.info.versions.clone(),
        };
        let recorded = recorder.finish(&judgement, ready);
        Answer {
            judgement,
            finish: Finish {
                _recorded: recorded,
                _counted: counted,
                _charge: charge,
            },
        }
    }

    /// Decode → batch and infer → score, for a frame whose scoring is valid.
    async fn run(
        self: &Arc<Self>,
        work: Work,
        applied: AppliedScoring,
        recorder: &FrameRecorder,
        timings: &mut Timings,
    ) -> Result<Decision, FrameError> {
        let started = Instant::now();
        let (deadline, client) = (work.deadline, work.client);
        let generation = Arc::clone(&work.generation);
        let input = self.decode(work).await;
        let decoded = Instant::now();
        recorder.stage(Stage::Decode, started, decoded);
        timings.decode = decoded - started;
        let input = input?;

        let score_with = ScoreWith {
            scoring: applied.scoring,
            scorers: Arc::clone(&generation.scorers),
        };
        let inference = generation
            .batcher
            .infer(client, input, score_with, deadline, recorder.trace())
            .await?;
        recorder.engine(inference.queued, inference.compute, inference.batch_size);
        timings.queue = inference.queued;
        timings.inference = inference.compute;

        let scored = Instant::now();
        let decision = generation.score(inference, applied);
        recorder.stage(Stage::Score, scored, Instant::now());
        Ok(decision)
    }

    /// Decodes on the blocking pool, a bounded number at a time, shared
    /// fairly among clients: a large JPEG takes milliseconds, which must not
    /// block the async runtime, and one client's must not block the others.
    /// A light frame (a thumbnail, a model-size tensor) is decoded in place:
    /// the handoff to a decoder thread would cost more than the decode.
    async fn decode(self: &Arc<Self>, work: Work) -> Result<Vec<f32>, FrameError> {
        if work.generation.preprocessor.is_light(work.image.as_ref()) {
            return work.generation.preprocessor.tensor(work.image.as_ref());
        }
        let slot = self.decoders.acquire(work.client).await;
        if past(work.deadline) {
            return Err(FrameError::DeadlineExceeded);
        }
        let Work {
            image, generation, ..
        } = work;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            generation.preprocessor.tensor(image.as_ref())
        })
        .await
        .map_err(|e| FrameError::Internal(format!("decode task failed: {e}")))?
    }
}

/// What `run` needs of a request once its scoring is resolved.
struct Work {
    image: Option<ImageInput>,
    deadline: Option<Instant>,
    client: ClientId,
    generation: Arc<Generation>,
}

/// Whether `deadline` has passed.
fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// Checks the caps on everything a frame carries besides its image. An
/// oversized id is cut to the cap and oversized attributes dropped, so the
/// judgement that reports the error (and echoes them) stays small.
fn check_fields(request: &mut FrameRequest, limits: &FieldLimits) -> Result<(), FrameError> {
    let too_large = |field, size, max| FrameError::FieldTooLarge { field, size, max };
    let mut error = None;
    if request.id.len() > limits.max_id_bytes {
        error = Some(too_large(
            "frame_id (bytes)",
            request.id.len(),
            limits.max_id_bytes,
        ));
        let mut cut = limits.max_id_bytes;
        while !request.id.is_char_boundary(cut) {
            cut -= 1;
        }
        request.id.truncate(cut);
    }
    let largest = request
        .attributes
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .max()
        .unwrap_or(0);
    if request.attributes.len() > limits.max_attributes {
        error = error.or(Some(too_large(
            "attributes (count)",
            request.attributes.len(),
            limits.max_attributes,
        )));
        request.attributes.clear();
    } else if largest > limits.max_attribute_bytes {
        error = error.or(Some(too_large(
            "an attribute's key and value (bytes)",
            largest,
            limits.max_attribute_bytes,
        )));
        request.attributes.clear();
    }
    let method = request
        .scoring
        .as_ref()
        .and_then(|s| s.method.as_ref())
        .map_or(0, String::len);
    if method > limits.max_method_bytes {
        error = error.or(Some(too_large(
            "scoring.method (bytes)",
            method,
            limits.max_method_bytes,
        )));
        request.scoring = None;
    }
    error.map_or(Ok(()), Err)
}

/// Counts a frame as in flight until dropped (also when its future is
/// cancelled mid-way).
#[derive(Debug)]
struct InFlight(Arc<Pipeline>);

impl InFlight {
    fn enter(pipeline: Arc<Pipeline>) -> InFlight {
        pipeline.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(pipeline)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
